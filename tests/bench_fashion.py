"""Fashion-MNIST quality benchmark for ddpm.py at a fixed budget (issue 17). Not collected by pytest.

  python tests/bench_fashion.py                                   # today's defaults, 2000 steps x batch 64
  python tests/bench_fashion.py --label small --extra "--model small --lr 2e-4"
  python tests/bench_fashion.py --label baseline --reuse          # score an existing run folder again
  python tests/bench_fashion.py --label baseline --reuse --eta 1  # its samples with eta = 1, in <dir>/eta1/
  python tests/bench_fashion.py --label baseline --reuse --eta 1 --raw   # the weights without their EMA
  python tests/bench_fashion.py --label baseline --reuse --eta 1 --sample-seed 1  # the same, other sampling noise
  python tests/bench_fashion.py --label mini --reuse --sample-extra "--skip uniform"  # the issue's grid (28 px: quad)
  python tests/bench_fashion.py --label mini --reuse --eta 1 --readme mini_2000_eta1  # refresh a README picture
  python tests/bench_fashion.py --steps-flag=--steps              # ddim.py from before "--S" (note the "=")
  OMP_NUM_THREADS=1 nice -n 10 python tests/bench_fashion.py ...  # long: 30-90 min per run on 2 CPU cores

On a 2-core machine busy with other jobs, give the run one thread (OMP_NUM_THREADS=1): niced, with two threads,
the training ran at 0.06 it/s (each thread spinning while the other waited); with one, 0.4 it/s, same load.

A run is three steps, each through the scripts' own CLI (subprocesses), in <out>/<label>/:
  1. python ddpm.py --train --dataset fashion_mnist --steps 2000 --batch-size 64 --out <dir> [--extra flags]
     (wall time measured; the last progress line's it/s gives ms/step)
  2. python ddim.py --sample --ckpt <dir>/ckpt.pt --S 100 --eta 0 --n-samples N --out <dir> [--sample-extra flags]
     (DDIM, 100 steps, eta = 0 or --eta; writes samples.npz: uint8 levels 0..255, shape (N, 28, 28, 1), and samples.png;
     on ddim.py's grid for 28-px images: App. D.2's quadratic one since 2026-12-02, the uniform one before, as the
     issue sampled: --sample-extra "--skip uniform")
  3. the score of samples.npz against N test images.

The measure (stated here, computed below):
  - a small CNN classifier trained on the real Fashion-MNIST training set (seed 0, 3 epochs, Adam; its test
    accuracy is printed), cached in <out>/classifier.pt; its features are the penultimate layer (128-d);
  - FD: the Frechet distance between Gaussians fitted to the features of N generated samples and of N test
    images, ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (FID's formula, our own network);
  - class spread: the entropy of the histogram of predicted classes over the N samples, divided by ln 10
    (1 = every class equally often, 0 = one class), and the largest class share;
  - the floor: the same FD between N training images and the same N test images (real vs real at equal N;
    FD is biased upwards at small N, so compare runs only at the same N).
All images enter the classifier in [-1, 1], as common.load_data gives them and as the samples are mapped back.

Fashion-MNIST comes from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), read with
common.load_data("fashion_mnist"); no network is used.
"""
import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import common  # noqa: E402

SAMPLE_STEPS_FLAG = "--S"  # ddim.py's flag for the number S of sampling steps ("--steps" before it was renamed)
DATA_DIR = common.SYSTEM_DIRS["fashion_mnist"]
DATA_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CLASSES = 10


# -----------------------------------------------------------------------------
# The measure: a small CNN classifier and the Frechet distance of its features

class Classifier(nn.Module):
    """Two conv layers and a 128-d penultimate layer: 0.42 M parameters, 0.900 test accuracy after 3 epochs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
        )
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, CLASSES)

    def features(self, x):
        """Penultimate-layer features (B, 128) of images x (B, 1, 28, 28) in [-1, 1]."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(train, test, path, epochs=3, batch=128, seed=0):
    """Train (or load from path) the classifier on the real training set; returns (model, test accuracy)."""
    model = Classifier()
    if os.path.exists(path):
        c = torch.load(path, weights_only=True)
        model.load_state_dict(c["model"])
        return model.eval(), c["test_acc"]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train.x), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model.eval(), test)
        print(f"classifier epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"model": model.state_dict(), "test_acc": acc, "epochs": epochs, "seed": seed}, path)
    return model.eval(), acc


@torch.no_grad()
def accuracy(model, data, batch=1000):
    hits = sum((model(data.x[i:i + batch]).argmax(1) == data.y[i:i + batch]).sum().item()
               for i in range(0, len(data.x), batch))
    return hits / len(data.x)


@torch.no_grad()
def embed(model, x, batch=500):
    """(features (N, 128) float64, predicted classes (N,)) of images x (N, 1, 28, 28) in [-1, 1]."""
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch])
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of Gaussians fitted to features f1, f2 (float64).

    tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix (eigh).
    """
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def class_spread(preds):
    """(entropy of the predicted-class histogram / ln 10, largest class share)."""
    p = np.bincount(preds, minlength=CLASSES) / len(preds)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(CLASSES)), float(p.max())


# -----------------------------------------------------------------------------
# A run: train with ddpm.py, sample with ddim.py, score

def run(cmd, log_path):
    """Run cmd (a list) from the repository root, stdout+stderr to log_path; returns wall seconds."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        sys.exit(f"exit status {rc}: {' '.join(cmd)}\n{tail}")
    return seconds


def last_rate(log_path):
    """it/s of the last progress line of a ddpm.py training log ("step 2000/2000  loss ...  3.21 it/s  ETA ...")."""
    with open(log_path) as f:
        rates = re.findall(r"^step \d+/\d+\s+loss \S+\s+([\d.]+) it/s", f.read(), re.M)
    return float(rates[-1]) if rates else float("nan")


def train_and_sample(args, d):
    """Train (unless --reuse finds a finished run) and sample (unless --reuse finds samples.npz) in folder d."""
    os.makedirs(d, exist_ok=True)
    ckpt, train_log, seconds_file = (os.path.join(d, f) for f in ("ckpt.pt", "train.log", "train_seconds.txt"))
    if not (args.reuse and os.path.exists(ckpt)):  # --reuse never retrains over an existing checkpoint
        cmd = [sys.executable, "ddpm.py", "--train", "--dataset", "fashion_mnist", "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--out", d] + shlex.split(args.extra)
        seconds = run(cmd, train_log)
        with open(seconds_file, "w") as f:
            f.write(f"{seconds:.1f}\n")
        if os.path.exists(os.path.join(d, "samples.npz")):
            os.remove(os.path.join(d, "samples.npz"))  # from an earlier run: stale
    seconds = float(open(seconds_file).read().split()[0]) if os.path.exists(seconds_file) else float("nan")
    sd = d if args.eta == 0 else os.path.join(d, f"eta{args.eta:g}")  # eta != 0: samples in their own folder
    sd = os.path.join(d, "ddpm") if args.sampler == "ddpm" else sd    # and those of ddpm.py's sampler
    sd = os.path.join(sd, f"seed{args.sample_seed}") if args.sample_seed else sd  # another sampling seed: its own
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", args.sample_extra).strip("_")
    sd = os.path.join(sd, tag) if tag else sd  # other sampler flags (e.g. --skip quad): their own folder too
    if args.raw:  # the trained weights instead of their EMA: a copy of the checkpoint whose "ema" is the model
        sd = os.path.join(d, "raw", os.path.relpath(sd, d))
        os.makedirs(sd, exist_ok=True)
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        c["ema"] = c["model"]
        ckpt = os.path.join(sd, "ckpt_raw.pt")
        torch.save(c, ckpt)
    os.makedirs(sd, exist_ok=True)
    npz = os.path.join(sd, "samples.npz")
    if not (args.reuse and os.path.exists(npz)):
        cmd = [sys.executable, "ddim.py", "--sample", "--ckpt", ckpt, args.steps_flag, str(args.sample_steps),
               "--eta", f"{args.eta:g}", "--n-samples", str(args.n), "--out", sd]
        if args.sampler == "ddpm":  # Algorithm 2 of Ho et al., all T steps (slow: 10x the NFE of S = 100)
            cmd = [sys.executable, "ddpm.py", "--sample", "--ckpt", ckpt, "--n-samples", str(args.n), "--out", sd]
        cmd += ["--seed", str(args.sample_seed)] + shlex.split(args.sample_extra)
        sample_seconds = run(cmd, os.path.join(sd, "sample.log"))
        print(f"sampling: {sample_seconds / 60:.1f} min", flush=True)
    with np.load(npz) as f:
        u = f["arr_0"]  # (N, H, W, C) uint8 levels 0..255, as common.save_npz writes them
    if u.dtype != np.uint8 or u.shape[1:] != (28, 28, 1):
        sys.exit(f"{npz}: expected uint8 (N, 28, 28, 1), got {u.dtype} {u.shape}")
    x = common.levels_to_unit(torch.from_numpy(u.transpose(0, 3, 1, 2).copy()), 256)  # (N, 1, 28, 28) in [-1, 1]
    return x, seconds, last_rate(train_log), sd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--label", default="baseline", help="run name: the folder <out>/<label> and the table row")
    p.add_argument("--extra", default="", help='extra flags for ddpm.py --train, e.g. "--model small --lr 2e-4"')
    p.add_argument("--steps", type=int, default=2000, help="training steps (the issue's budget)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (the issue's budget)")
    p.add_argument("--n", type=int, default=500, help="N: generated samples, test images and training images")
    p.add_argument("--sample-steps", type=int, default=100, help="DDIM steps S")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="ddim: ddim.py --S --eta (the "
                   "issue's); ddpm: ddpm.py --sample, Algorithm 2 with all T steps (samples in <out>/<label>/ddpm/)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 = the issue's deterministic sampler, 1 = "
                   "DDPM-like ancestral steps (samples then go to <out>/<label>/eta<eta>/)")
    p.add_argument("--sample-extra", default="", help='extra flags for the sampler, e.g. "--skip quad" (samples '
                   "in a subfolder named after them)")
    p.add_argument("--sample-seed", type=int, default=0, help="the sampling noise's seed (not 0: samples in a "
                   "seed<N>/ subfolder), to see the measure's noise between two draws from one checkpoint")
    p.add_argument("--raw", action="store_true", help="sample the trained weights, not their EMA (a copy of the "
                   "checkpoint in <out>/<label>/raw/; samples there too)")
    p.add_argument("--steps-flag", default=SAMPLE_STEPS_FLAG, help='ddim.py\'s flag for S ("--steps" on older code)')
    p.add_argument("--epochs", type=int, default=3, help="classifier epochs (changing it retrains the cache)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_fashion"), help="output folder (not committed)")
    p.add_argument("--reuse", action="store_true", help="keep a finished run and its samples.npz in the folder")
    p.add_argument("--readme", default="", help="also write the first 64 samples to data/readme/fashion_<NAME>.png "
                   "(the README's pictures, e.g. --readme mini_2000_eta1)")
    p.add_argument("--measure-only", action="store_true", help="train the classifier and print the real-vs-real floor")
    args = p.parse_args()

    missing = [f for f in DATA_FILES if not os.path.exists(os.path.join(DATA_DIR, f))]
    if missing:
        sys.exit(f"Fashion-MNIST not found: {DATA_DIR} lacks {', '.join(missing)}.\n"
                 "Install Debian's package (apt-get install dataset-fashion-mnist); this benchmark never downloads.")
    # data_dir points nowhere, so load_data finds Debian's files (SYSTEM_DIRS) and never a download
    train = common.load_data("fashion_mnist", train=True, data_dir=os.path.join(args.out, "no-download"))
    test = common.load_data("fashion_mnist", train=False, data_dir=os.path.join(args.out, "no-download"))

    model, acc = train_classifier(train, test, os.path.join(args.out, f"classifier_e{args.epochs}.pt"), args.epochs)
    g = torch.Generator().manual_seed(0)  # the same N real images for every run
    test_idx = torch.randperm(len(test.x), generator=g)[:args.n]
    train_idx = torch.randperm(len(train.x), generator=g)[:args.n]
    f_test, pred_test = embed(model, test.x[test_idx])
    f_train, _ = embed(model, train.x[train_idx])
    floor = frechet_distance(f_train, f_test)
    h_test, max_test = class_spread(pred_test)
    print(f"classifier test accuracy {acc:.4f}; N = {args.n}: real-vs-real FD {floor:.2f}; "
          f"test-set class spread {h_test:.3f} (max share {max_test:.2f})", flush=True)
    if args.measure_only:
        return

    d = os.path.join(args.out, args.label)
    x, seconds, rate, sd = train_and_sample(args, d)
    f_gen, pred_gen = embed(model, x[:args.n])
    fd = frechet_distance(f_gen, f_test)
    h, mx = class_spread(pred_gen)
    how = f"DDIM S={args.sample_steps}, eta {args.eta:g}" if args.sampler == "ddim" else "DDPM Alg. 2, all T steps"
    how += "; the raw weights (no EMA)" if args.raw else ""
    how += f"; sampling seed {args.sample_seed}" if args.sample_seed else ""
    how += f"; sampler flags {args.sample_extra}" if args.sample_extra else ""
    print(f"\nextra flags: {args.extra or '(none)'}; budget {args.steps} x {args.batch_size}; {how}; "
          f"N = {len(f_gen)}; classifier test accuracy {acc:.4f}")
    print("| run | train min | ms/step | FD | class spread (H/ln10) | max class share | real-vs-real FD |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.label} | {seconds / 60:.1f} | {1000 / rate:.0f} | {fd:.2f} | {h:.3f} | {mx:.2f} | {floor:.2f} |")
    common.save_grid(x[:64], os.path.join(sd, "grid64.png"), nrow=16, scale=2)  # the README's picture
    print(f"sample grids: {os.path.join(sd, 'samples.png')} (all), {os.path.join(sd, 'grid64.png')} (the first 64)")
    if args.readme:  # the same picture where the README shows it
        path = os.path.join(ROOT, "data", "readme", f"fashion_{args.readme}.png")
        common.save_grid(x[:64], path, nrow=16, scale=2)
        print(f"README picture: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
