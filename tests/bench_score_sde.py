"""Benchmark for score_sde.py: sample quality vs number of score evaluations (the paper's Table 1 question).

Trains a small score model (common.MLP) on a 2-D toy with the script's own loss, for the VP and VE SDEs,
then compares samplers at matched numbers of score-function evaluations (NFE):
  P   predictor only (reverse diffusion, Euler-Maruyama, ancestral), N steps        -> NFE = N
  C   corrector only (Langevin, snr 0.16), N levels x 1 step                        -> NFE = N
  PC  reverse diffusion + Langevin, N levels                                        -> NFE = 2N
  ODE probability flow with RK45 at rtol = atol = 1e-3 and 1e-5                     -> adaptive NFE
Quality: sliced Wasserstein-1 distance (128 random directions) between 6000 samples and 6000 held-out
points (common.load_data(train=False)); the floor is the distance between two held-out halves of the
same size. Mean over 2 sampling seeds.

Run: OMP_NUM_THREADS=1 python3 tests/bench_score_sde.py [--dataset 8gaussians] [--steps 4000]

Issue 7's likelihood benchmark (--nll): trains VP, sub-VP and VE digits U-Nets (the script's CLI, the same
--nll-steps each, same seed) and reports bits/dim of the first --n-eval held-out digits (dequantised, 17 levels,
Hutchinson Rademacher trace, RK45 rtol = atol = 1e-5) with its standard error over images and the ODE's NFE.
The paper's finding to compare (Table 2): sub-VP <= VP in bits/dim.
Run: OMP_NUM_THREADS=1 python3 tests/bench_score_sde.py --nll [--nll-steps 600] [--n-eval 64]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import score_sde as S  # noqa: E402
from common import MLP, load_data  # noqa: E402


def sliced_w1(a, b, n_dir=128, seed=0):
    """Sliced Wasserstein-1 between equal-size point clouds: the mean over random directions of the W1 of the
    1-D projections (mean |difference| of the sorted values). W1 rather than W2: between two samples of a
    multimodal distribution, W2 is dominated by mode-weight fluctuations and shrinks only like n^(-1/4)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_dir, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    pa, pb = (a.double() @ d).sort(0)[0], (b.double() @ d).sort(0)[0]
    return float((pa - pb).abs().mean())


def train_toy(sde, data, steps, batch=256, lr=2e-3, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=2, hidden=256, depth=3)
    ema = MLP(dim=2, hidden=256, depth=3)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    score_fn = S.make_score_fn(net, sde)
    for step in range(steps):
        x0 = data[torch.randint(len(data), (batch,))]
        loss = S.loss(score_fn, sde, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / steps)  # linear decay: a cleaner model in a short run
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - 0.999)
    return ema.eval(), float(loss.detach())


def nll_benchmark(steps, n_eval, out_root=None):
    """Issue 7: bits/dim on held-out digits for VP, sub-VP and VE trained the same number of steps."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "score_sde.py")
    out_root = out_root or tempfile.mkdtemp(prefix="bench_nll_")
    rows = []
    for name in ("vp", "subvp", "ve"):
        out = os.path.join(out_root, name)
        t0 = time.time()
        subprocess.run([sys.executable, script, "--train", "--sde", name, "--steps", str(steps), "--n-steps", "100",
                        "--sample-every", str(10 ** 9), "--out", out], check=True, capture_output=True)
        t_train = time.time() - t0
        r = subprocess.run([sys.executable, script, "--eval-nll", "--n-eval", str(n_eval), "--out", out],
                           check=True, capture_output=True, text=True)
        m = re.search(r"([\d.]+) \+- ([\d.]+) .*NFE (\d+), ([\d.]+) s", r.stdout)
        rows.append((name, float(m[1]), float(m[2]), int(m[3]), t_train, float(m[4])))
        print(f"{name}: {r.stdout.splitlines()[0]} (training {t_train:.0f} s)", flush=True)
    print(f"\n| SDE | steps | bits/dim (held-out, n = {n_eval}) | SE | NFE (whole batch) | train s | eval s |")
    print("|---|---|---|---|---|---|---|")
    for name, bpd, se, nfe, tt, te in rows:
        print(f"| {name} | {steps} | {bpd:.3f} | {se:.3f} | {nfe} | {tt:.0f} | {te:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="8gaussians")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--nll", action="store_true", help="issue 7: bits/dim of VP / sub-VP / VE digits models")
    ap.add_argument("--nll-steps", type=int, default=600)
    ap.add_argument("--n-eval", type=int, default=64)
    args = ap.parse_args()
    if args.nll:
        return nll_benchmark(args.nll_steps, args.n_eval)
    train = load_data(args.dataset, train=True).x
    held = load_data(args.dataset, train=False).x[: 2 * args.n]
    ref = held[: args.n]
    floor = sliced_w1(held[: args.n], held[args.n:2 * args.n]) if len(held) >= 2 * args.n else float("nan")
    print(f"dataset {args.dataset}; sliced-W1 floor (two held-out halves of {args.n}) = {floor:.4f}\n")
    rows = []
    for name in ("vp", "ve"):
        sde = S.make_sde({"sde": name, "beta_min": 0.1, "beta_max": 20.0, "sigma_min": 0.02,
                          "sigma_max": S.sigma_max_technique1(train)})
        t0 = time.time()
        net, last = train_toy(sde, train, args.steps)
        print(f"{name}: trained {args.steps} steps in {time.time() - t0:.0f} s (last loss {last:.3f})")
        score_fn = S.make_score_fn(net, sde)
        runs = []
        for N in (25, 50, 100, 250):  # N > beta_max = 20 (the VP chain needs beta_i < 1)
            for pred in ("reverse_diffusion", "euler_maruyama", "ancestral_sampling"):
                runs.append((f"P  {pred}", N, dict(predictor=pred, corrector="none", n_steps=N)))
            runs.append(("C  langevin", N, dict(predictor="none", corrector="langevin", n_steps=N)))
            if N <= 125:
                runs.append(("PC reverse_diffusion+langevin", 2 * N, dict(predictor="reverse_diffusion", corrector="langevin", n_steps=N)))
        for label, nfe, kw in runs:
            d = []
            for seed in (0, 1):
                with torch.no_grad():
                    x = S.pc_sample(score_fn, sde, (args.n, 2), generator=torch.Generator().manual_seed(seed), **kw)
                d.append(sliced_w1(x, ref) if torch.isfinite(x).all() else float("inf"))
            rows.append((name, label, kw["n_steps"], nfe, sum(d) / 2))
            print(f"  {label:32s} N={kw['n_steps']:4d} NFE={nfe:5d}  SW1={sum(d) / 2:.4f}", flush=True)
        for rtol in (1e-3, 1e-5):
            d, nfes = [], []
            for seed in (0, 1):
                x, nfe = S.ode_sample(score_fn, sde, (args.n, 2), rtol=rtol, atol=rtol, generator=torch.Generator().manual_seed(seed))
                d.append(sliced_w1(x, ref))
                nfes.append(nfe)
            rows.append((name, f"ODE rk45 rtol={rtol:g}", "-", sum(nfes) // 2, sum(d) / 2))
            print(f"  {'ODE rk45 rtol=%g' % rtol:32s}        NFE={sum(nfes) // 2:5d}  SW1={sum(d) / 2:.4f}", flush=True)
    print("\n| SDE | sampler | N | NFE | sliced W1 (lower is better) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.4f} |")
    print(f"\nfloor (held-out vs held-out): {floor:.4f}")


if __name__ == "__main__":
    main()
