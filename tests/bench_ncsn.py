"""Benchmarks for ncsn.py (not collected by pytest): python tests/bench_ncsn.py [--quick] [--device cuda|mps|cpu]

1. NCSNv2 Techniques 2 and 4 for the papers' datasets: gamma, L by the rule as printed vs the paper's L,
   and Technique 4's eps for T = 5 (the code's convention and ours).
2. The 2019 paper's Fig. 3 with exact scores: weight of the (5,5) mode (true 0.8) for annealed Langevin
   (L = 10, sigma 10 -> 0.1) at several eps and T, and for plain Langevin at sigma = 0.1.
3. Annealed Langevin in 64 dimensions with the exact score of the digits training set (a mixture of
   1,500 point masses), no denoising step: distance of the samples to their nearest training image
   (sigma_L sqrt(D) = 0.16 if the last level is in equilibrium) and how many different training images
   the 200 samples land on, per T with Technique 4's eps.
"""
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ncsn  # noqa: E402
from common import load_data  # noqa: E402

torch.set_num_threads(1)
DEVICE = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu")
F64 = torch.float32 if DEVICE.type == "mps" else torch.float64  # the score's arithmetic (MPS has no float64)


def gen(seed):
    return ncsn.make_generator(seed, DEVICE)


def mixture_score(weights, means, stds):
    """Exact score of sum_k w_k N(mu_k, s_k^2 I) perturbed by N(0, sigma^2 I) (as in tests/test_ncsn.py), on DEVICE."""
    w, mu = torch.tensor(weights, dtype=F64, device=DEVICE), torch.as_tensor(means, dtype=F64).to(DEVICE)
    s2, d = torch.tensor(stds, dtype=F64, device=DEVICE) ** 2, mu.shape[1]

    def model(x, sigma):
        shape, x = x.shape, x.flatten(1).to(F64)
        v = s2[None] + sigma.to(F64)[:, None] ** 2
        # |x - mu|^2 without forming (B, K, d): |x|^2 - 2 x.mu + |mu|^2
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ mu.T + mu.pow(2).sum(1)[None]
        r = torch.softmax(w.log()[None] - 0.5 * d2 / v - 0.5 * d * v.log(), 1)  # (B, K)
        return (-(x * (r / v).sum(1, keepdim=True)) + (r / v) @ mu).reshape(shape).float()
    return model


def techniques_table():
    print("1. Techniques 2 and 4 (sigma_L = 0.01 on [0, 1] pixels; settings of ermongroup/ncsnv2 configs/*.yml)")
    print(f"{'dataset':14s} {'D':>7s} {'sigma_1':>8s} {'gamma':>8s} {'L rule':>7s} {'L paper':>8s} {'T':>3s} "
          f"{'eps code':>10s} {'eps ours':>10s} {'paper':>8s}")
    for name, D, s1, L_paper, T, paper_eps in (("CIFAR-10", 3072, 50, 232, 5, "6.2e-6"),
                                               ("CelebA 64", 12288, 90, 500, 5, "3.3e-6"),
                                               ("church 64", 12288, 140, 788, 4, "4.9e-6"),
                                               ("FFHQ 256", 196608, 348, 2311, 3, "9e-7"),
                                               ("digits [-1,1]", 64, 9.6, None, 5, "-")):
        sL = 0.02 if "digits" in name else 0.01
        g = ncsn.technique2_gamma(D)
        L = ncsn.technique2_L(D, s1, sL)
        L_used = L_paper or L  # Technique 4 with the paper's L (its gamma), as the paper did
        eps = ncsn.technique4_step_lr(T, (s1 / sL) ** (1 / (L_used - 1)), sL)
        print(f"{name:14s} {D:7d} {s1:8.1f} {g:8.4f} {L:7d} {str(L_paper or '-'):>8s} {T:3d} {eps / 2:10.3g} {eps:10.3g} "
              f"{paper_eps:>8s}")


def fig3_table(quick):
    print("\n2. Fig. 3 of the 2019 paper, exact scores, 2,000 samples from U[-8, 8]^2: weight of the (5,5) mode (true 0.8)")
    score = mixture_score([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0])
    n = ncsn.NCSN(10.0, 0.1, 10)
    x0 = (torch.rand(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 16 - 8).to(DEVICE)
    for T, eps in ((100, 1e-4), (100, 5e-4), (100, 2e-3), (100, 1e-2)) + (() if quick else ((300, 2e-3), (30, 2e-3))):
        t = time.time()
        x = n.sample(score, x0.shape, T, eps, generator=gen(1), x=x0.float())
        print(f"   annealed  T={T:4d} eps={eps:<7g}: weight {(x.sum(1) > 0).float().mean():.3f}   ({time.time() - t:.1f} s)")
    for steps, eps in ((1000, 0.1), (10000, 0.1)) if not quick else ((1000, 0.1),):
        t = time.time()
        x = n.langevin(score, x0.shape, 0.1, steps, eps, generator=gen(1), x=x0.float())
        print(f"   plain     {steps:5d} steps eps={eps:<5g}: weight {(x.sum(1) > 0).float().mean():.3f}   ({time.time() - t:.1f} s)")


def digits_exact_score_table(quick):
    print("\n3. Digits, exact score of the 1,500 training images (64-D), sigma 9.6 -> 0.02, L = 22, Technique 4 eps")
    data = load_data("digits").x
    X = data.flatten(1).to(DEVICE)
    score = mixture_score([1 / len(X)] * len(X), X, [0.0] * len(X))
    n = ncsn.NCSN(9.6, 0.02, 22)
    for T in (1, 2, 5) if quick else (1, 2, 5, 20):
        eps = ncsn.technique4_step_lr(T, (9.6 / 0.02) ** (1 / 21), 0.02)
        t = time.time()
        x = n.sample(score, (200, 1, 8, 8), T, eps, generator=gen(0), device=DEVICE)
        nn = torch.cdist(x.flatten(1), X).min(1)
        print(f"   T={T:3d} eps={eps:.3g}: nearest-training-image distance median {nn.values.median():.3f} "
              f"(sigma_L sqrt(D) = 0.16), {len(set(nn.indices.tolist()))} distinct images of 200   ({time.time() - t:.1f} s)")


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    techniques_table()
    fig3_table(quick)
    digits_exact_score_table(quick)
