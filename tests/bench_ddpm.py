"""Benchmark for ddpm.py (not collected by pytest). Run: OMP_NUM_THREADS=1 python3 tests/bench_ddpm.py

Prints three markdown tables, all with exact predictors (no training, so the numbers are the maths itself):
  1. the variational bound (Eq. 5) against the true NLL for a quantised Gaussian (17 levels), by T and variance;
  2. the minibatch loss-estimator standard deviation with i.i.d. vs low-discrepancy timesteps (VDM App. I.1);
  3. VDM's discrete-time bound L_T and continuous L_inf for N(0, 0.5^2) data, two schedules with equal endpoints;
  4. the objectives compared on a 2-D toy (8 Gaussians, MLP, equal steps): held-out bits/dim of the bound for
     L_simple with the linear / cosine schedule (Eq. 5, T = 1000), the continuous VLB with the fixed linear-SNR
     schedule, and the continuous VLB with a learned schedule (MonotoneGamma, trained jointly on the plain bound);
and the wall time of one default training step (digits, tiny U-Net, batch 128).

  python3 tests/bench_ddpm.py --digits   adds table 5 instead (~40 min on 2 cores): the same objectives on the
  shipped 8x8 digits through the CLI itself -- `python ddpm.py --train` with the default tiny U-Net and 1500 steps,
  then `--eval-nll` on the 297 held-out digits -- two runs at a time, one thread each.
"""
import math
import os
import re
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import ddpm  # noqa: E402
from test_ddpm import C, LEVELS, P, S_DATA, continuous_bound_bits, continuous_gauss_eps, discrete_eps  # noqa: E402

F64 = torch.float64


def bound_table():
    H = -(P * P.log2()).sum().item()
    print(f"\n### Bound (Eq. 5) with the exact predictor, 17-level quantised Gaussian; true NLL = {H:.4f} bits/dim\n")
    print("| T | variance | bound (bits/dim) | gap | L_T | L_0 | seconds |")
    print("|---|---|---|---|---|---|---|")
    x0 = C[:, None].repeat(1, 64)
    for T in (250, 1000, 4000):
        for variance in ("beta", "beta_tilde"):
            d = ddpm.DDPM(T=T, variance=variance, levels=LEVELS)
            torch.manual_seed(0)
            t0 = time.time()
            bpd, terms = d.nll_bpd(discrete_eps(d.alpha_bar, C, P), x0, clip_denoised=False, return_terms=True)
            b = (P * bpd).sum().item()
            print(f"| {T} | {variance} | {b:.4f} | {b - H:.4f} | {(P * terms['prior']).sum():.2e} | "
                  f"{(P * terms['decoder']).sum():.2e} | {time.time() - t0:.1f} |")


def variance_table():
    print("\n### Loss-estimator spread over 500 minibatches (batch 64 x 16 coords, exact predictor, T = 1000)\n")
    print("| loss | t sampling | mean | std | variance ratio vs iid |")
    print("|---|---|---|---|---|")
    x0 = C[torch.multinomial(P, 64 * 16, replacement=True, generator=torch.Generator().manual_seed(6))].reshape(64, 16)
    for loss_type in ("simple", "elbo"):
        ref = None
        for mode in ("iid", "low_discrepancy"):
            d = ddpm.DDPM(T=1000, loss_type=loss_type, t_sampling=mode, levels=LEVELS)
            torch.manual_seed(1)
            v = torch.tensor([d.loss(discrete_eps(d.alpha_bar, C, P), x0).item() for _ in range(500)], dtype=F64)
            ref = v.var() if ref is None else ref
            print(f"| {loss_type} | {mode} | {v.mean():.4f} | {v.std():.4f} | {v.var() / ref:.3f} |")
    print("\n| continuous L_inf (N(0, 0.5^2), exact predictor), schedule | t sampling | mean of 400 minibatch "
          "estimates (bits/dim) | their std | variance ratio vs iid |")
    print("|---|---|---|---|---|")
    for name, gamma in ddpm.GAMMAS.items():
        ref = None
        for mode in ("iid", "low_discrepancy"):
            torch.manual_seed(2)
            v = torch.tensor([ddpm.vlb_continuous(continuous_gauss_eps(gamma), S_DATA * torch.randn(64, 16, dtype=F64),
                                                  gamma, t_sampling=mode)[0].mean().item() for _ in range(400)])
            ref = v.var() if ref is None else ref
            print(f"| {name} | {mode} | {v.mean():.4f} | {v.std():.4f} | {v.var() / ref:.3f} |")


def vdm_table():
    truth = 0.5 * math.log2(2 * math.pi * math.e * S_DATA ** 2)
    print(f"\n### VDM bounds for N(0, 0.5^2), closed form (bits/dim); true NLL = {truth:.4f}\n")
    print("| schedule | T = 10 | T = 100 | T = 1000 | T = 10000 | L_inf |")
    print("|---|---|---|---|---|---|")
    for name, gamma in ddpm.GAMMAS.items():
        row = [continuous_bound_bits(gamma, T) for T in (10, 100, 1000, 10000)] + [continuous_bound_bits(gamma)]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |")


def train_toy(objective, steps=2000, seed=0):
    """Train common.MLP on 8 Gaussians with one objective; return (net, gamma or diffusion, seconds)."""
    from common import MLP, make_toy
    torch.manual_seed(seed)
    data, net = make_toy("8gaussians", 20000), MLP()
    params = list(net.parameters())
    if objective in ("linear", "cosine"):
        sched = ddpm.DDPM(T=1000, schedule=objective)
    else:
        learned = objective.startswith("learned")
        holder = ddpm.VDMNet(net, learned)  # the denoiser and (for learned) gamma_phi, as the CLI trains them
        sched = holder.gamma_fn()
        params = list(holder.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    t0 = time.time()
    for step in range(steps):
        opt.param_groups[0]["lr"] = 2e-3 * (1 - step / steps)
        x0 = data[torch.randint(len(data), (256,))]
        if objective in ("linear", "cosine"):
            loss = sched.loss(net, x0)
        else:
            bpd, terms = ddpm.vlb_continuous(net, x0, sched, t_sampling="low_discrepancy")
        opt.zero_grad()
        if objective in ("linear", "cosine"):
            loss.backward()
        else:  # "learned_variance": the interior of gamma_phi minimises the estimator's variance (VDM Sec. 5.3)
            ddpm.vdm_backward(holder, bpd, terms, "variance" if objective == "learned_variance" else "bound")
        opt.step()
    return net, sched, time.time() - t0


OBJECTIVES = ("linear", "cosine", "vlb_linear_snr", "learned", "learned_variance")


def toy_table():
    from common import make_toy
    x_test = make_toy("8gaussians", 2000, seed=1)
    truth = (3 + 2 * 0.5 * math.log2(2 * math.pi * math.e * 0.2 ** 2)) / 2  # 8 equal modes, sd 0.2, well apart
    print("\n### 8 Gaussians (2-D, continuous density), MLP, 2000 steps each: held-out bound in bits/dim "
          f"(true NLL ~ {truth:.3f})\n")
    print("| objective | bound (bits/dim) | L_T or prior | diffusion | L_0 or recon | std of one 2000-point "
          "estimate | train s |")
    print("|---|---|---|---|---|---|---|")
    for objective in OBJECTIVES:
        net, sched, secs = train_toy(objective)
        torch.manual_seed(3)
        with torch.no_grad():
            if objective in ("linear", "cosine"):
                bpd, terms = sched.nll_bpd(net, x_test, return_terms=True)
                parts = [terms["prior"], terms["diffusion"], terms["decoder"]]
            else:
                runs = [ddpm.vlb_continuous(net, x_test, sched, t_sampling="low_discrepancy") for _ in range(20)]
                spread = torch.stack([r[0].mean() for r in runs]).std().item()  # estimator spread over draws
                bpd = torch.stack([r[0] for r in runs]).mean(0)
                parts = [torch.stack([r[1][k] for r in runs]).mean(0) for k in ("prior", "diffusion", "recon")]
            spread = spread if objective not in ("linear", "cosine") else float("nan")
        print(f"| {objective} | {bpd.mean():.3f} | {parts[0].mean():.4f} | {parts[1].mean():.3f} | "
              f"{parts[2].mean():.3f} | {spread:.4f} | {secs:.0f} |")


def step_time():
    from common import PRESETS, UNet, load_data
    data = load_data("digits")
    net = UNet(in_ch=1, image_size=8, **PRESETS["tiny"])
    d = ddpm.DDPM()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for i in range(12):
        t0 = time.time()
        loss = d.loss(net, data.x[torch.randint(len(data.x), (128,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - t0)
    net.eval()
    with torch.no_grad():
        t0 = time.time()
        for _ in range(20):
            net(torch.randn(64, 1, 8, 8), torch.zeros(64, dtype=torch.long))
        ev = (time.time() - t0) / 20
    print(f"\n### Default run costs ({torch.get_num_threads()} threads)\n")
    print(f"train step (batch 128): {sorted(times[2:])[len(times[2:]) // 2]:.3f} s;  one 64-image network call: "
          f"{ev:.4f} s -> a 64-image grid (T = 1000 calls) ~ {1000 * ev:.0f} s")


DIGITS_RUNS = {  # objective -> ddpm.py flags; everything else is the default config (1500 steps, batch 128)
    "L_simple, linear beta": [],
    "L_simple, cosine": ["--schedule", "cosine"],
    "L_simple, linear beta, low-discrepancy t": ["--t-sampling", "low_discrepancy"],
    "continuous VLB, fixed linear-SNR gamma": ["--loss-type", "vlb", "--schedule", "linear_snr", "--fourier", "off"],
    "continuous VLB, learned gamma (bound)": ["--loss-type", "vlb", "--schedule", "learned", "--fourier", "off"],
    "continuous VLB, learned gamma (variance, Sec. 5.3)": ["--loss-type", "vlb", "--schedule", "learned",
                                                            "--schedule-grad", "variance", "--fourier", "off"],
    "continuous VLB, learned gamma and endpoints": ["--loss-type", "vlb", "--schedule", "learned",
                                                     "--learn-endpoints", "--fourier", "off"],
    "continuous VLB, fixed linear-SNR gamma, Fourier features": ["--loss-type", "vlb", "--schedule", "linear_snr"],
    "continuous VLB, learned gamma (bound), Fourier features": ["--loss-type", "vlb", "--schedule", "learned"],
    "continuous VLB, learned gamma (variance), Fourier features": ["--loss-type", "vlb", "--schedule", "learned",
                                                                    "--schedule-grad", "variance"],
    "continuous VLB, learned gamma and endpoints, Fourier features": ["--loss-type", "vlb", "--schedule", "learned",
                                                                       "--learn-endpoints"],
}
RESULT = re.compile(r"bits/dim ([0-9.]+) on .*prior L_T ([0-9.]+), diffusion ([0-9.]+), decoder L_0 ([0-9.]+)")


def digits_table(root="/tmp/bench_ddpm_digits", parallel=2):
    """The objectives compared on real data: each objective trained by the CLI for the same 1500 steps, then the
    held-out bound (--eval-nll: Eq. 5 at T = 1000 for L_simple models, VDM's continuous bound for VLB models).
    A run whose logs are already in root (run<i>.eval.log, run<i>.secs) is read, not repeated."""
    script = os.path.join(os.path.dirname(HERE), "ddpm.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = list(DIGITS_RUNS.items())
    results, pending = {}, list(enumerate(runs))

    def start(i, flags):
        out = os.path.join(root, f"run{i}")
        cmd = (f"{sys.executable} {script} --train --out {out} {' '.join(flags)} > {out}.train.log 2>&1 && "
               f"{sys.executable} {script} --eval-nll --ckpt {out}/ckpt.pt --out {out} > {out}.eval.log 2>&1")
        return subprocess.Popen(cmd, shell=True, env=env), time.time()

    os.makedirs(root, exist_ok=True)
    for i, _ in list(pending):
        log, secs = (os.path.join(root, f"run{i}.{ext}") for ext in ("eval.log", "secs"))
        m = RESULT.search(open(log).read()) if os.path.exists(log) and os.path.exists(secs) else None
        if m:
            results[i] = (m.groups(), float(open(secs).read()))
            pending.remove((i, runs[i]))
    active = {}
    while pending or active:
        while pending and len(active) < parallel:
            i, (name, flags) = pending.pop(0)
            active[i] = start(i, flags)
        time.sleep(5)
        for i, (proc, t0) in list(active.items()):
            if proc.poll() is not None:
                del active[i]
                log = open(os.path.join(root, f"run{i}.eval.log")).read() if proc.returncode == 0 else ""
                m = RESULT.search(log)
                results[i] = (m.groups() if m else ("failed",) * 4, time.time() - t0)
                with open(os.path.join(root, f"run{i}.secs"), "w") as f:
                    f.write(f"{results[i][1]:.0f}")
    print("\n### 8x8 digits (17 levels), tiny U-Net, 1500 steps each, `ddpm.py --train` then `--eval-nll` on the "
          "297 held-out digits (bits/dim; uniform over 17 levels = 4.09)\n")
    print("| objective | bound | prior | diffusion | decoder / recon | train + eval s (1 thread) |")
    print("|---|---|---|---|---|---|")
    for i, (name, _) in enumerate(runs):
        (b, prior, diff, dec), secs = results[i]
        print(f"| {name} | {b} | {prior} | {diff} | {dec} | {secs:.0f} |")


if __name__ == "__main__":
    if "--digits" in sys.argv:
        digits_table()
        sys.exit(0)
    bound_table()
    variance_table()
    vdm_table()
    toy_table()
    step_time()
