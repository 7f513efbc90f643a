"""Benchmark for ddim.py: sample quality vs number of steps S and eta, beside the paper's Table 1.

    python tests/bench_ddim.py                                  # 2-D toy: trains an MLP (~1-2 min), then the table
    python tests/bench_ddim.py --ckpt runs/ddim/ckpt.pt         # also the digits model of `python ddim.py --train`
    python tests/bench_ddim.py --device cuda                    # the same on a GPU (sampling there, distances on the CPU)

Song et al. (2021), Table 1 reports CIFAR-10 FID for S in {10, 20, 50, 100, 1000} and eta in {0, 1}.
We cannot compute FID here (no Inception network, CPU only), so the distance to held-out data is
  SW2: the sliced Wasserstein-2 distance (mean over 512 random unit directions of the 1-D W2 between
       the projected point sets, computed by sorting), and
  MMD: the unbiased squared maximum mean discrepancy (x 1000) with a sum of Gaussian kernels whose
       bandwidths are 0.1, 0.3 and 1 times the median pairwise distance,
both written below from their definitions. "floor" is the same distance between two independent
held-out samples of the same size: no sampler can beat it on average.
Not collected by pytest (the file name does not start with test_).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddim  # noqa: E402
from common import load_data  # noqa: E402

STEPS = (10, 20, 50, 100, 1000)
PAPER_FID = {0.0: (13.36, 6.84, 4.67, 4.16, 4.04), 1.0: (41.07, 18.36, 8.01, 5.78, 4.73)}  # Table 1, CIFAR-10


def sliced_w2(x, y, n_dir=512, seed=0):
    """Sliced Wasserstein-2: sqrt(mean over directions of W2^2 of the 1-D projections); x, y (N, D), equal N."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_dir, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0)                                      # unit directions (D, n_dir)
    px, _ = (x.double() @ d).sort(0)                           # sorted projections (N, n_dir)
    py, _ = (y.double() @ d).sort(0)
    return (px - py).pow(2).mean().sqrt().item()               # 1-D W2 pairs the order statistics


def mmd2(x, y):
    """Unbiased MMD^2 (x 1000) with a sum of Gaussian kernels exp(-|a - b|^2 / (2 h^2)), h = (0.1, 0.3, 1) x the
    median pairwise distance of the pooled sets (the median alone is blind to the fine structure)."""
    x, y = x.double(), y.double()
    z = torch.cat([x, y])
    dist2 = torch.cdist(z, z).pow(2)
    med2 = dist2[dist2 > 0].median()
    k = sum(torch.exp(-dist2 / (2 * f ** 2 * med2)) for f in (0.1, 0.3, 1.0))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item() * 1000


def table(name, net, diffusion, shape, held_out, floor_set, rows=((0.0, "leading"), (1.0, "leading"),
                                                                  ("hat", "leading"), (0.0, "trailing")), clip=False,
          device=torch.device("cpu")):
    """Print SW2 / MMD for every (eta, grid) row and S column, with the paper's FIDs beside them.
    eta "hat" is Table 1's sigma-hat row (`ddim.py --sigma hat`). Sampling runs on `device` (noise from its own
    generator), the distances on the CPU."""
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    print(f"\n{name}: {shape[0]} samples vs {len(held_out)} held-out; "
          f"floor SW2 {sliced_w2(flat(floor_set), flat(held_out)):.4f}, "
          f"MMD {mmd2(flat(floor_set), flat(held_out)):.3f}")
    print(f"{'':22s}" + "".join(f"S={s:<14d}" for s in STEPS))
    for eta, grid in rows:
        cells, secs = [], 0.0
        for S in STEPS:
            g = ddim.make_generator(1, device)
            t0 = time.time()
            x = diffusion.sample(net, shape, steps=S, eta=0.0 if eta == "hat" else eta, generator=g, grid=grid,
                                 clip=clip, hat=eta == "hat", device=device).cpu()
            secs += time.time() - t0
            cells.append(f"{sliced_w2(flat(x), flat(held_out)):.4f}/{mmd2(flat(x), flat(held_out)):.3f}")
        label = "sigma-hat" if eta == "hat" else f"eta={eta:.0f}"
        print(f"{label:9s} {grid:8s} SW2/MMD " + "".join(f"{c:16s}" for c in cells) + f"  ({secs:.0f} s)")
    for eta in (0.0, 1.0):
        print(f"paper eta={eta:.0f} CIFAR-10 FID " + "".join(f"{v:<16.2f}" for v in PAPER_FID[eta]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="", help="a ddim.py / ddpm.py digits checkpoint to evaluate as well")
    p.add_argument("--toy", default="moons")
    p.add_argument("--toy-steps", type=int, default=4000)
    p.add_argument("--out", default="runs/bench_ddim")
    p.add_argument("--device", default="cpu", help="cpu (the README's numbers), cuda, mps or auto")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")

    # 1. A 2-D toy: train the MLP with ddim.py's own CLI (L_simple), then the table.
    ck = os.path.join(args.out, "ckpt.pt")
    if not os.path.exists(ck):
        t0 = time.time()
        try:
            ddim.main(["--train", "--dataset", args.toy, "--steps", str(args.toy_steps), "--batch-size", "256",
                       "--lr", "1e-3", "--log-every", "1000", "--sample-every", str(args.toy_steps),
                       "--out", args.out, "--device", args.device])
        except SystemExit as e:
            if e.code:
                raise
        print(f"trained the {args.toy} MLP in {time.time() - t0:.0f} s")
    cfg = ddim.Config(ckpt=ck, device=args.device)
    net, diffusion, c, device = ddim.load_for_sampling(cfg)
    held = load_data(args.toy, train=False, n_toy=2000, seed=0).x       # held-out split (seed + 1 inside)
    floor = load_data(args.toy, train=False, n_toy=4000, seed=7).x[2000:]  # an independent held-out sample
    with torch.no_grad():
        table(f"{args.toy} (MLP, T={diffusion.T})", net, diffusion, (2000, 2), held, floor, device=device)

    # 2. Optionally the digits model of the default run (64-D pixel space).
    if args.ckpt:
        net, diffusion, c, device = ddim.load_for_sampling(ddim.Config(ckpt=args.ckpt, device=args.device))
        held = load_data("digits", train=False).x                          # the 297 held-out digits
        floor = load_data("digits", train=True).x[:297]                    # 297 training digits
        with torch.no_grad():
            table(f"digits ({c['script']} checkpoint step {torch.load(args.ckpt, weights_only=True)['step']})",
                  net, diffusion, (297, 1, 8, 8), held, floor,
                  rows=((0.0, "leading"), (1.0, "leading"), ("hat", "leading")),
                  clip=True, device=device)  # as the CLI samples images (clip_denoised=auto)


if __name__ == "__main__":
    main()
