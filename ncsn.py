"""
NCSN: Noise Conditional Score Networks with annealed Langevin dynamics (and the NCSNv2 techniques).

Song & Ermon (2019), "Generative Modeling by Estimating Gradients of the Data Distribution", arXiv 1907.05600.
Song & Ermon (2020), "Improved Techniques for Training Score-Based Generative Models" (NCSNv2), arXiv 2006.09011.
Official code (PyTorch): github.com/ermongroup/ncsn, github.com/ermongroup/ncsnv2.

Commands
    python ncsn.py --train                                  # 8x8 digits on the CPU, ~6 CPU-min, runs/ncsn/
    python ncsn.py --sample --ckpt runs/ncsn/ckpt.pt --n-samples 64   # samples.png + samples.npz
    python ncsn.py --inpaint --ckpt runs/ncsn/ckpt.pt       # inpaint.png: original | masked | inpainted
    python ncsn.py --inpaint --ckpt runs/ncsn/ckpt.pt --mask center   # unknown: right|left|top|bottom|center
    python ncsn.py --train --resume                         # continue runs/ncsn/ckpt.pt exactly
    python ncsn.py --train --device cuda --precision bf16 --compile true   # bf16 autocast + torch.compile on a GPU
    python ncsn.py --train --preset v1                      # the 2019 paper's settings (sigma, eps on [-1, 1])
    python ncsn.py --train --preset v2                      # NCSNv2: Techniques 1-5 computed for the data
    python ncsn.py --train --dataset moons --steps 4000 --lr 3e-3 --L 30   # a 2-D toy (MLP), ~20 s; add --loss ssm|ism
    torchrun --nproc_per_node=8 ncsn.py --train --preset v2-cifar10        # 8 GPUs; --batch-size is the global batch
    torchrun --nproc_per_node=8 ncsn.py --sample --ckpt runs/ncsn/ckpt.pt --n-samples 50000   # samples split over ranks

Map (paper -> code; 2019 = NCSN, 2020 = NCSNv2; numbers as printed in the arXiv versions)
    2019 Eq. 1  implicit score matching (Hyvarinen 2005)     -> NCSN.ism_loss (exact Jacobian trace)
    2019 Eq. 2  denoising score matching (Vincent 2011)      -> NCSN.loss (one noise level of it)
    2019 Eq. 3  sliced score matching (Song et al. 2019)     -> NCSN.ssm_loss
    2019 Eq. 4  Langevin dynamics                            -> NCSN.langevin
    2019 Eqs. 5-6  NCSN objective, lambda(sigma) = sigma^2   -> NCSN.loss (the default --loss dsm)
    2019 Alg. 1 annealed Langevin dynamics                   -> NCSN.sample
    2019 App. B.3, Alg. 2 inpainting (annealed Langevin)     -> NCSN.inpaint
    2020 Technique 1 (sigma_1 = max pairwise distance)       -> technique1_sigma_1
    2020 Technique 2 (geometric ratio rule for L)            -> technique2_L
    2020 Technique 3 (noise conditioning s = net(x) / sigma) -> ScoreNet (--cond divide / both)
    2020 Technique 4 (eps and T from Proposition 3)          -> technique4_step_lr
    2020 Technique 5 (EMA of the weights)                    -> train (--ema-decay)
    2020 final denoising step x + sigma_L^2 s(x, sigma_L)    -> NCSN.sample(denoise=True)
    VDM (Kingma et al. 2021) App. I.1 low-discrepancy levels -> low_discrepancy_uniform, NCSN.sample_levels

Symbols (paper -> code)
    sigma_1 > ... > sigma_L   noise levels, a geometric sequence          NCSN.sigmas (float64), index i = 0..L-1
    s_theta(x, sigma)         the score network                            model(x, sigma), sigma of shape (B,)
    q_sigma(x~ | x)           N(x~; x, sigma^2 I), the perturbation kernel x_tilde = x + sigma * z
    lambda(sigma)             loss weight, sigma^2 (2019 Sec. 4.2)
    eps, T                    Langevin step size and steps per level       step_lr, n_steps_each
    alpha_i                   eps * sigma_i^2 / sigma_L^2 (Alg. 1)         alpha
    gamma                     sigma_{i-1} / sigma_i (NCSNv2)               gamma
    D                         data dimension                               D

Conventions (the same in all four scripts of this project)
    Data are in [-1, 1] (common.py maps them there before any noise is added). The papers' sigma values are
    for pixels in [0, 1]: on [-1, 1] distances double, so sigma doubles and eps (a variance, like sigma^2)
    is multiplied by 4. The presets below give both values. Technique 1 is computed on the data as loaded.
    Noise levels: tensor index i = 0..L-1 is the paper's level i + 1 (sigma_1 = sigmas[0], the largest).
    Langevin step: this file uses the 2019 paper's form x <- x + (alpha/2) s + sqrt(alpha) z everywhere.
    CONVENTION TRAP: the official NCSN/NCSNv2 code (and NCSNv2's Algorithm 1 and Proposition 3) write
    x <- x + alpha s + sqrt(2 alpha) z: the same chain with eps_here = 2 * step_lr_there (NCSNv2's CIFAR-10
    6.2e-6 is 1.24e-5 here on [0, 1] pixels, 4.96e-5 on [-1, 1]). The 2019 paper's text gives eps = 2e-5 in
    its own form, but its official run (ermongroup/ncsn, anneal_runner.py) used step_lr = 2e-5 in the code's
    form, i.e. eps = 4e-5: preset v1 follows that run (it made the paper's samples and scores), 1.6e-4 on
    [-1, 1]; the text's value would be 8e-5.
    Devices: NCSN.sigmas, the float64 master table, stays on the CPU; sigmas_on casts it, then moves it, once.
    The network is given sigma: s(x, sigma) = net(x, 100 log sigma) / sigma by default (ScoreNet, --cond).
    The last sampling step can be noise-free: NCSNv2's Tweedie denoise (--denoise).

Notation clashes
    The 2019 paper's alpha_i is a step size; DDPM's alpha_t is 1 - beta_t. NCSNv2's eps is half of the
    2019 paper's eps (see above). Score SDE's VE sigma_max / sigma_min are sigma_1 / sigma_L here.
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import (MLP, PRESETS, TOYS, DataError, UNet, draw_indices, levels_to_unit, load_data, save_grid, save_npz,
                    save_scatter, second_order, training_images)

SCRIPT = "ncsn"  # the name written into every checkpoint


# -----------------------------------------------------------------------------
# Config: every default cites the paper; CPU defaults that differ say the paper's value.
# Values 0 for sigma_1, L and step_lr mean "choose by NCSNv2 Technique 1, 2, 4" for the data as loaded.

@dataclass
class Config:
    dataset: str = "digits"       # common.load_data name or an image folder; papers: MNIST, CelebA, CIFAR-10, LSUN
    image_size: int = 0           # 0 = the dataset's native size (digits 8, CIFAR-10 32)
    stream_gb: float = 4.0        # not in the papers: an image folder over this many GB (as uint8) stays on disk and is
    #                               read by DataLoader workers while training; smaller sets are held on the device
    model: str = "tiny"           # U-Net preset in common.PRESETS; papers: RefineNet (v1), NCSNv2 net. Toys use MLP
    loss: str = "dsm"             # 2019 Eqs. 5-6 (dsm); ssm = sliced SM (2019 Eq. 3); ism = Eq. 1, D <= 16 only
    sigma_1: float = 0.0          # 0 = Technique 1 (max pairwise distance; digits: 9.6); v1: 1 on [0,1] = 2 on [-1,1]
    sigma_L: float = 0.02         # 2019 Sec. 5 and NCSNv2: 0.01 on [0, 1] pixels = 0.02 on [-1, 1]
    L: int = 0                    # 0 = Technique 2 (digits: 22); 2019 Sec. 5: L = 10; NCSNv2 CIFAR-10: 232
    cond: str = "both"            # net(x, 100 log sigma)/sigma; "divide" = Technique 3 (NCSNv2); "embed" ~ v1
    n_steps_each: int = 20        # T, Langevin steps per level; 2019 Sec. 5: 100; NCSNv2 CIFAR-10: 5
    step_lr: float = 0.0          # eps (2019 paper's form, data scale); 0 = Technique 4 for this T; v1: 1.6e-4 (header)
    denoise: bool = True          # NCSNv2 official code (configs/*.yml denoise: true): final x + sigma_L^2 s; v1: off
    steps: int = 1500             # total optimisation steps; official configs: 200k (2019), 300k (NCSNv2 CIFAR-10)
    batch_size: int = 128         # the global batch (torchrun: split over ranks); official configs of both: 128
    lr: float = 1e-3              # Adam; official configs: 1e-3 (2019, anneal.yml), 1e-4 (NCSNv2, every dataset)
    warmup: int = 0               # linear warm-up steps; papers and official code: none
    grad_clip: float = 0.0        # global gradient-norm clip, 0 = off; papers and official code: none
    adam_beta2: float = 0.999     # Adam's beta2 (beta1 0.9): not in the papers; official code (both): 0.999
    ema_decay: float = 0.99       # Technique 5: EMA 0.999 (shortened for the 1500-step CPU run); 0 = off (v1)
    t_sampling: str = "iid"       # level index per example: "iid" (Eq. 6 estimate) or "low_discrepancy" (VDM App. I.1)
    ckpt_every: int = 500         # steps between checkpoints (and one at the end, and on Ctrl-C)
    sample_every: int = 500       # steps between sample grids from fixed noise
    log_every: int = 100          # steps between progress lines
    out: str = "runs/ncsn"        # output folder: ckpt.pt, grid_<step>.png, samples.png, samples.npz, inpaint.png
    seed: int = 0                 # seeds the data generator (data order, flips, levels, noise, v); seed + rank: dropout
    device: str = "auto"          # auto = cuda -> mps -> cpu
    precision: str = "auto"       # auto|fp32|tf32|bf16 (network under bf16 autocast); auto = tf32 on CUDA, else fp32
    compile: bool = False         # torch.compile the network (dsm loss and samplers; ssm/ism need double backward)
    deterministic: bool = False   # deterministic kernels: a CUDA run (and its resume) repeats bitwise
    ckpt: str = ""                # --sample / --inpaint: the checkpoint
    n_samples: int = 64           # --sample: number of samples
    n_inpaint: int = 8            # --inpaint: held-out images (rows of inpaint.png)
    mask: str = "right"           # --inpaint: the unknown part, right | left | top | bottom | center


# `--preset NAME`: the papers' settings, converted to data in [-1, 1]. Explicit flags override a preset.
PRESET_CONFIGS = {
    "cpu": {},  # the CPU defaults above: Techniques 1, 2, 4, 5 computed for the data, T = 20
    # 2019 Sec. 5: sigma 1 -> 0.01 on [0,1] (2 -> 0.02 here), L = 10, T = 100, uniform initial samples; eps of
    # the official run, not the text (see the header). configs/anneal.yml: Adam 1e-3, 200k steps; no EMA, no denoise.
    "v1": dict(sigma_1=2.0, sigma_L=0.02, L=10, step_lr=1.6e-4, n_steps_each=100, denoise=False, cond="embed",
               lr=1e-3, ema_decay=0.0, steps=200_000, ckpt_every=5000, sample_every=5000, log_every=1000),
    # NCSNv2 for any dataset: Techniques 1, 2, 4 (T = 5) for sigma_1, L, eps; s = net(x)/sigma (Technique 3),
    # EMA 0.999 (Technique 5); the official configs' lr 1e-4, 300k steps, denoising step on.
    "v2": dict(sigma_1=0.0, sigma_L=0.02, L=0, step_lr=0.0, n_steps_each=5, denoise=True, cond="divide",
               lr=1e-4, ema_decay=0.999, steps=300_000, ckpt_every=5000, sample_every=5000, log_every=1000),
    # NCSNv2's CIFAR-10 run as published (configs/cifar10.yml): sigma 50 -> 0.01, L = 232, step_lr 6.2e-6,
    # all on [0,1]: here sigma 100 -> 0.02 and eps = 6.2e-6 * 2 (step convention) * 4 (data scale) = 4.96e-5.
    "v2-cifar10": dict(dataset="cifar10", model="cifar10", sigma_1=100.0, sigma_L=0.02, L=232, step_lr=4.96e-5,
                       n_steps_each=5, denoise=True, cond="divide", lr=1e-4, ema_decay=0.999, steps=300_000,
                       ckpt_every=5000, sample_every=5000, log_every=1000),
}

# Defaults that follow the data (--train): the Config above is the CPU run on the 8x8 digits. For larger images the
# first line that fits the data's largest side and the device sets the values it names; a flag or --preset given
# wins. The 32-px CPU line takes the network, the budget, Adam's beta2 (0.95) and the EMA (0.98) measured for
# ddpm.py on Fashion-MNIST (README); it is not measured here. The CUDA lines: NCSNv2's optimiser (lr 1e-4,
# EMA 0.999) in a shorter run, not yet measured.
DATA_RECIPES = [
    (16, "any", {}),  # the 8x8 digits
    (32, "cpu", dict(model="mini", steps=2000, batch_size=64, adam_beta2=0.95, ema_decay=0.98,
                     sample_every=1000)),
    (32, "cuda", dict(model="small", steps=20_000, lr=1e-4, ema_decay=0.999, ckpt_every=2000, sample_every=5000,
                      log_every=500)),
    (1024, "cuda", dict(model="cifar10", steps=100_000, lr=1e-4, ema_decay=0.999, ckpt_every=5000,
                        sample_every=10_000, log_every=1000)),
]

ISM_MAX_DIM = 16      # ism_loss takes one backward pass per dimension: 2-D toys yes, images no
LOG_SIGMA_SCALE = 100.0  # the U-Net's time input is t = 100 * log(sigma) (common.py: it resolves ~0.01-1 steps)


# -----------------------------------------------------------------------------
# Noise levels (float64) and the NCSNv2 rules that choose them

def technique1_sigma_1(x, max_points=5000):
    """NCSNv2 Technique 1: sigma_1 = the maximum Euclidean distance between two training points (exact for up to
    max_points points; larger data sets use the first max_points: a lower bound)."""
    x = x[:max_points].flatten(1).double()  # (N, D)
    best = 0.0
    for start in range(0, len(x), 1000):  # blocks of rows keep the distance matrix small
        best = max(best, torch.cdist(x[start:start + 1000], x).max().item())
    return best


def technique2_gamma(D):
    """NCSNv2 Technique 2: gamma with Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma) = 0.5."""
    if 2 * D <= 9:  # sqrt(2D) <= 3: the left side tends to 1, never 0.5 (e.g. 2-D toys)
        raise ValueError(f"Technique 2 has no solution for data of dimension D={D} <= 4; give --L")
    Phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))
    f = lambda g: Phi(math.sqrt(2 * D) * (g - 1) + 3 * g) - Phi(math.sqrt(2 * D) * (g - 1) - 3 * g)
    lo, hi = 1.0, 2.0
    while f(hi) > 0.5:  # f(1) = 0.997 and f falls to 0 as gamma grows: bracket, then bisect
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0.5 else (lo, mid)
    return lo


def technique2_L(D, sigma_1, sigma_L):
    """NCSNv2 Technique 2: the number of levels of a geometric sequence sigma_1 -> sigma_L with ratio gamma(D).

    Note: for CIFAR-10 (D = 3072, sigma 50 -> 0.01) this gives L = 220; the paper's 232 (and CelebA's 500,
    church's 788) correspond to the left side of the rule being ~0.57 rather than 0.5.
    """
    return math.ceil(math.log(sigma_1 / sigma_L) / math.log(technique2_gamma(D))) + 1


def technique4_step_lr(T, gamma, sigma_L):
    """NCSNv2 Technique 4 (Proposition 3): the eps whose T steps bring the variance of one level to sigma_i^2.

    Proposition 3 (in NCSNv2's step convention x + a s + sqrt(2a) z, a = e sigma_i^2/sigma_L^2): started from
    N(0, sigma_{i-1}^2 I) with the score of N(0, sigma_i^2 I), after T steps x ~ N(0, s_T^2 I) with
        s_T^2 / sigma_i^2 = (1 - r)^(2T) (gamma^2 - c) + c,   r = e / sigma_L^2,   c = 2 r / (1 - (1 - r)^2).
    It is always above 1; Technique 4 takes the r that makes it closest to 1. Returned in THIS file's
    convention: eps = 2 e = 2 r sigma_L^2.
    """
    r = torch.logspace(-12, 0, 400_001, dtype=torch.float64)[:-1]  # r in (0, 1): fine log grid
    c = 2 * r / (1 - (1 - r) ** 2)
    ratio = (1 - r) ** (2 * T) * (gamma ** 2 - c) + c
    return 2 * r[ratio.argmin()].item() * sigma_L ** 2


def resolve_levels(cfg, data_x=None, log=print):
    """Fill in sigma_1, L and step_lr given as 0 with Techniques 1, 2 and 4 (the first two need the training data
    data_x); returns a new Config."""
    sigma_1, L = cfg.sigma_1 or technique1_sigma_1(data_x), cfg.L
    if not L and data_x[0].numel() <= 4:  # Technique 2 is undefined in 2-D: fall back to the 2019 paper's L, say so
        L = 10
        log(f"note: Technique 2 has no solution for D={data_x[0].numel()}; using L=10 (2019 paper)", flush=True)
    elif not L:
        L = technique2_L(data_x[0].numel(), sigma_1, cfg.sigma_L)
    if sigma_1 <= cfg.sigma_L:
        raise ValueError(f"need sigma_1 > sigma_L, got sigma_1={sigma_1:g} and sigma_L={cfg.sigma_L:g}")
    step_lr = cfg.step_lr
    if not step_lr:
        if L < 2:
            raise ValueError("Technique 4 needs L >= 2 (it uses the ratio sigma_{i-1}/sigma_i); give --step-lr")
        step_lr = technique4_step_lr(cfg.n_steps_each, (sigma_1 / cfg.sigma_L) ** (1 / (L - 1)), cfg.sigma_L)
    return dataclasses.replace(cfg, sigma_1=float(sigma_1), L=int(L), step_lr=float(step_lr))


def wide(device):
    """The widest float a device has: float64, except on MPS (no float64 there) float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def expand(v, x):
    """A per-example (B,) tensor shaped (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def low_discrepancy_uniform(B, device="cpu", generator=None):
    """VDM App. I.1 (Kingma et al. 2021): u_i = mod(u_0 + i/B, 1), i = 0..B-1, one u_0 ~ U(0, 1): one u_i in each
    interval [i/B, (i+1)/B), each alone uniform (every loss estimate stays unbiased). On device, in its widest float."""
    dt = wide(device)
    u_0 = torch.rand((), generator=generator, dtype=dt, device=device)
    return (u_0 + torch.arange(B, dtype=dt, device=device) / B) % 1


class NCSN:
    """The noise levels of Song & Ermon (2019) and every objective and sampler built on them; the methods take the
    score model as a plain callable model(x, sigma) -> tensor shaped like x, sigma of shape (B,)."""

    def __init__(self, sigma_1=1.0, sigma_L=0.01, L=10, t_sampling="iid"):
        self.t_sampling = t_sampling
        if not (isinstance(L, int) and L >= 1):
            raise ValueError(f"L must be an integer >= 1, got {L}")
        if not (0 < sigma_L < sigma_1 and math.isfinite(sigma_1)):
            raise ValueError(f"need 0 < sigma_L < sigma_1, got sigma_1={sigma_1} and sigma_L={sigma_L}")
        self.sigma_1, self.sigma_L, self.L = sigma_1, sigma_L, L
        # 2019 Sec. 4.1: a geometric sequence sigma_1 > ... > sigma_L (float64; L = 1 is the single level sigma_1).
        self.sigmas = torch.exp(torch.linspace(math.log(sigma_1), math.log(sigma_L), L, dtype=torch.float64))
        self._sigmas_on = {}  # (device, dtype) -> the table cast and moved there (see sigmas_on)

    def sigmas_on(self, device, dtype=torch.float32):
        """The float64 CPU table as dtype on device: cast on the CPU, then moved, once per (device, dtype)."""
        key = (torch.device(device), dtype)
        if key not in self._sigmas_on:
            self._sigmas_on[key] = self.sigmas.to(dtype).to(key[0])
        return self._sigmas_on[key]

    def level_sigma(self, sigma, x):
        """One noise level as the (B,) tensor the model takes, in the dtype of x."""
        return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)

    # -------------------------------------------------------------------------
    # Objectives

    def sample_levels(self, B, device, generator=None):
        """Level indices (B,): i.i.d. uniform on {0..L-1}, or VDM App. I.1's low-discrepancy i = floor(L u_k) (one
        per stratum of L/B levels, each still uniform: Eq. 6's estimate stays unbiased). generator: None = global."""
        if self.t_sampling == "iid":
            return torch.randint(self.L, (B,), device=device, generator=generator)
        return (low_discrepancy_uniform(B, device, generator) * self.L).long().clamp(max=self.L - 1)

    def perturb(self, x, i=None, z=None):
        """A level per example (uniform over 1..L: an unbiased estimate of Eq. 6's average) and x~ = x + sigma z."""
        if i is None:
            i = self.sample_levels(x.shape[0], x.device)
        if z is None:
            z = torch.randn_like(x)
        sigma = self.sigmas_on(x.device, x.dtype)[i]  # (B,), the cached table in the data's dtype
        return x + expand(sigma, x) * z, sigma, z

    def loss(self, model, x, i=None, z=None):
        """Eqs. 5-6 of Song & Ermon (2019): denoising score matching over all levels, lambda(sigma) = sigma^2.

        l(theta; sigma) = 1/2 E || s(x~, sigma) + (x~ - x)/sigma^2 ||^2 with x~ = x + sigma z (Eq. 5), so
        lambda(sigma) l = 1/2 E || sigma s(x~, sigma) + z ||^2; Eq. 6 averages it over the L levels.
        Summed over dimensions, averaged over the batch (as the official code does). i, z: optional levels/noise.
        """
        x_tilde, sigma, z = self.perturb(x, i, z)
        s = model(x_tilde, sigma)  # (B, ...) the score estimate
        return 0.5 * (expand(sigma, x) * s + z).pow(2).flatten(1).sum(1).mean()

    def ism_loss(self, model, x, i=None, z=None):
        """Eq. 1 of Song & Ermon (2019) (Hyvarinen 2005): implicit score matching on the perturbed data.

        sigma^2 [ tr(grad_x~ s(x~, sigma)) + 1/2 ||s(x~, sigma)||^2 ], weighted and averaged like Eq. 6.
        The trace is exact: one backward pass per dimension, which is why it is for low-dimensional data only.
        """
        D = x[0].numel()
        if D > ISM_MAX_DIM:
            raise ValueError(f"--loss ism takes the exact Jacobian trace (one backward pass per dimension); "
                             f"the data have D={D} > {ISM_MAX_DIM}: use --loss dsm or --loss ssm")
        x_tilde, sigma, _ = self.perturb(x, i, z)
        x_tilde = x_tilde.detach().requires_grad_(True)
        with second_order():  # the loss's backward differentiates s twice
            s = model(x_tilde, sigma).flatten(1)  # (B, D)
        trace = 0
        for d in range(D):  # d-th diagonal entry of the Jacobian, kept in the graph for training
            trace = trace + torch.autograd.grad(s[:, d].sum(), x_tilde, create_graph=True)[0].flatten(1)[:, d]
        return (sigma ** 2 * (trace + 0.5 * s.pow(2).sum(1))).mean()

    def ssm_loss(self, model, x, i=None, z=None, v=None):
        """Eq. 3 of Song & Ermon (2019) (Song, Garg, Shi, Ermon 2019): sliced score matching on the perturbed data.

        sigma^2 [ v^T grad_x~ s(x~, sigma) v + 1/2 ||s(x~, sigma)||^2 ], v ~ N(0, I): one Jacobian-vector
        product instead of D (the official code's anneal_sliced_score_estimation_vr). v: optional projections.
        """
        x_tilde, sigma, _ = self.perturb(x, i, z)
        x_tilde = x_tilde.detach().requires_grad_(True)
        with second_order():  # the loss's backward differentiates s twice
            s = model(x_tilde, sigma)
        if v is None:
            v = torch.randn_like(x)
        grad_vs = torch.autograd.grad((v * s).sum(), x_tilde, create_graph=True)[0]  # (grad s)^T v
        vJv = (v * grad_vs).flatten(1).sum(1)  # v^T (grad s) v, (B,)
        return (sigma ** 2 * (vJv + 0.5 * s.flatten(1).pow(2).sum(1))).mean()

    # -------------------------------------------------------------------------
    # Samplers (all in the 2019 paper's form x + (alpha/2) s + sqrt(alpha) z)

    def init(self, shape, generator, device, dtype):
        """Initial samples: uniform noise over the data range [-1, 1] (2019 Sec. 5; NCSNv2 code likewise)."""
        return torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1

    @torch.no_grad()
    def langevin(self, model, shape, sigma, n_steps, step_lr, generator=None, x=None, device="cpu",
                 dtype=torch.float32):
        """Eq. 4 of Song & Ermon (2019): Langevin dynamics x <- x + (eps/2) s(x, sigma) + sqrt(eps) z at one level.

        The official code's x + a s + sqrt(2a) z is the same chain with eps = 2a (header: CONVENTION TRAP).
        """
        x = self.init(shape, generator, device, dtype) if x is None else x.clone()
        s_in = self.level_sigma(sigma, x)
        for _ in range(n_steps):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + step_lr / 2 * model(x, s_in) + math.sqrt(step_lr) * z  # one Langevin step
        return x

    @torch.no_grad()
    def sample(self, model, shape, n_steps_each=100, step_lr=2e-5, denoise=False, generator=None, x=None,
               device="cpu", dtype=torch.float32):
        """Algorithm 1 of Song & Ermon (2019): annealed Langevin dynamics (+ NCSNv2's final denoising step).

        for i = 1..L: alpha_i = eps sigma_i^2 / sigma_L^2; T times x <- x + (alpha_i/2) s(x, sigma_i) + sqrt(alpha_i) z.
        step_lr: the paper's eps (twice the official code's). x: optional initial samples. denoise: return
        x + sigma_L^2 s(x, sigma_L), the posterior mean E[x_0 | x] (Tweedie), noise-free.
        """
        x = self.init(shape, generator, device, dtype) if x is None else x.clone()
        sigma_L = self.sigmas[-1].item()
        for sigma in self.sigmas.tolist():
            alpha = step_lr * sigma ** 2 / sigma_L ** 2  # step size of this level, float64
            s_in = self.level_sigma(sigma, x)
            for _ in range(n_steps_each):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + alpha / 2 * model(x, s_in) + math.sqrt(alpha) * z  # Langevin step at level i
        if denoise:  # final Tweedie step: no noise added (NCSNv2; Jolicoeur-Martineau et al. 2020)
            x = x + sigma_L ** 2 * model(x, self.level_sigma(sigma_L, x))
        return x

    @torch.no_grad()
    def inpaint(self, model, x, mask, n_steps_each=100, step_lr=2e-5, generator=None, x_init=None):
        """Algorithm 2 of Song & Ermon (2019) (App. B.3): inpainting with annealed Langevin dynamics.

        mask = 1 where x is known. At level i the known entries are y = x + sigma_i z~ (one draw per level); each
        Langevin step of Algorithm 1 is followed by x~ <- x~ (1 - m) + y m: only the unknown entries evolve, the
        network sees a consistently noised image. Returns x~ with the known entries set back to the clean x.
        """
        mask = mask.to(x.dtype).expand_as(x)
        x_t = self.init(x.shape, generator, x.device, x.dtype) if x_init is None else x_init.clone()
        sigma_L = self.sigmas[-1].item()
        for sigma in self.sigmas.tolist():
            alpha = step_lr * sigma ** 2 / sigma_L ** 2
            s_in = self.level_sigma(sigma, x)
            y = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # noised known
            x_t = x_t * (1 - mask) + y * mask  # (the official code also imposes y before the level's first step)
            for _ in range(n_steps_each):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x_t = x_t + alpha / 2 * model(x_t, s_in) + math.sqrt(alpha) * z  # Langevin step, all entries
                x_t = x_t * (1 - mask) + y * mask  # known entries replaced by their noised versions
        return x_t * (1 - mask) + x * mask


# -----------------------------------------------------------------------------
# The score network: how sigma reaches common.UNet / common.MLP (make_model, after the fence, builds it)

class ScoreNet(torch.nn.Module):
    """s_theta(x, sigma) from a net(x, t): the noise conditioning of NCSNv2 Technique 3 and/or the time input.

    cond = "both":   net(x, 100 log sigma) / sigma   (default: 1/sigma scaling plus the U-Net's time embedding)
    cond = "divide": net(x, 0) / sigma               (Technique 3 exactly: an unconditional network)
    cond = "embed":  net(x, 100 log sigma)           (a noise-conditional network without the scaling, ~NCSN v1)
    """

    def __init__(self, net, cond):
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, x, sigma):
        t = torch.zeros_like(sigma) if self.cond == "divide" else LOG_SIGMA_SCALE * torch.log(sigma)
        out = self.net(x, t).to(x.dtype)  # bf16 autocast: divide in x's float32, not in bfloat16
        return out if self.cond == "embed" else out / expand(sigma, out)


# -----------------------------------------------------------------------------
# Evaluation: none beyond the losses (NCSN has no likelihood); samples are judged by eye here.

# ==== Running it (not in the paper; identical in all four scripts) ====================================
# Checkpoints, devices, precision, random numbers, EMA, the stop flag, torchrun and the command line: the
# machinery, byte-identical in ddpm.py, ddim.py, ncsn.py and score_sde.py (tests/test_common.py checks it).
#
# Devices, one rule for every mode: the model's device is the run's device. Every tensor a mode makes
# lives there; random numbers come from make_generator(seed, device), a generator that feeds that device;
# float64 tables are kept on the CPU and cast to float32 before they move (MPS has no float64). Training
# and sampling loops make no per-step host syncs: .item() and finiteness checks wait for log and
# checkpoint steps.
#
# Checkpoints: one dict {"script", "config", "step", "model", "ema", "optimizer", "rng"} of plain
# tensors / numbers / strings, written atomically and read with weights_only=True (no code runs).

def save_checkpoint(path, ckpt):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a broken file."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint of this script, or raise DataError saying what the file is."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that is not plain data
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise DataError(f"{path}: not a checkpoint of this project")
    if ckpt["script"] != SCRIPT:
        raise DataError(f"{path}: a {ckpt['script']} checkpoint, expected one written by {SCRIPT}.py")
    return ckpt


def pick_device(name):
    """--device: auto = cuda, else mps, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def make_generator(seed, device):
    """A torch.Generator seeded with seed that feeds tensors made on device (CPU, CUDA and MPS each have their own)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def rng_state():
    """Every global RNG stream the run draws from, for exact resume: the CPU's, and CUDA's or MPS's where used."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one ByteTensor per visible GPU
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state() saved (a stream this machine lacks is skipped: resume on another device type)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def setup_precision(device, precision, deterministic=False):
    """--precision and --deterministic; returns the context manager that the network's forward pass runs in.

    fp32: strict float32. tf32: TensorFloat-32 matmuls and convolutions on CUDA (float32 range, 10-bit
    mantissa inputs, float32 accumulation; elsewhere the same as fp32). bf16: the network runs under bfloat16
    autocast; weights, optimizer, schedules, losses and sampler arithmetic stay float32/float64.
    auto: tf32 on CUDA, fp32 elsewhere. deterministic: deterministic kernels (cuDNN and cuBLAS included),
    so that a CUDA run repeats bitwise.
    """
    if precision == "auto":
        precision = "tf32" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must be set before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)  # a kernel without one warns, never stops the run
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        for kernel in ("flash", "mem_efficient", "cudnn"):  # fused attention's backward is not deterministic: use
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp", lambda on: None)(False)  # the plain formula (math)
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def network(net, autocast=contextlib.nullcontext, use_compile=False):
    """The callable that losses and samplers are given: net(x, t) in autocast, output back in float32.

    use_compile=True wraps the network in torch.compile (the parameters stay net's own, so checkpoints and
    the EMA are unchanged). torch.compile fails lazily, at the first call, where it is unsupported (no compiler
    toolchain, say): then one line says so and the eager network is used from there on.
    """
    fn = [torch.compile(net) if use_compile else net]

    def call(x, t):
        with autocast():
            if fn[0] is net:
                return net(x, t).float()
            try:
                return fn[0](x, t).float()
            except Exception as e:
                print(f"{SCRIPT}.py: torch.compile failed ({type(e).__name__}); running eagerly", file=sys.stderr)
                fn[0] = net
                return net(x, t).float()
    return call


@torch.no_grad()
def ema_update(ema, model, decay):
    """EMA of the weights, p_ema <- decay p_ema + (1 - decay) p, over every parameter in one fused call."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def has_nonfinite(*modules):
    """True if any parameter holds NaN or inf (one host sync for all of them)."""
    return not torch.stack([torch.isfinite(p).all() for m in modules for p in m.parameters()]).all().item()


def write_samples(x, path, dataset):
    """A PNG of samples x (any device): an image grid, or for a 2-D toy a scatter plot over 2,000 held-out points."""
    x = x.cpu()
    if dataset in TOYS:
        save_scatter(x, path, data=load_data(dataset, train=False, n_toy=2000).x)
    else:
        save_grid(x, path)


# Several processes (torchrun). Plain `python script.py` is one process with no distributed setup at all.
# --batch-size is the global batch. Every rank draws the whole global batch's randomness (example indices,
# t, noise, flips) from one data generator seeded alike on every rank, in the order one process would, and
# keeps its own slice (rank_slice); gradients are averaged over the ranks (average_gradients). An N-process
# run so computes the 1-process run's gradients, up to the order of the float reduction. Dropout draws from
# each rank's own global RNG (seeded seed + rank), so with dropout on, N-process runs are equal to the
# 1-process run in distribution only. Rank 0 alone writes checkpoints, images and progress lines.

def setup_distributed(device):
    """(rank, world, device): under torchrun join the process group (NCCL on CUDA, one GPU per local rank; gloo
    on the CPU); without torchrun (0, 1, device) and nothing is set up."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise ValueError("torchrun on MPS is not supported (gloo cannot all-reduce MPS tensors): use one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Every rank waits until all are connected: gloo's init can return on one rank while another is still
        # connecting, and a rank that then failed on bad input and exited would crash that one with a traceback.
        torch.distributed.barrier()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def rank_slice(n, rank, world):
    """This rank's contiguous share of a global batch of n examples (n must be a multiple of world)."""
    if n % world:
        raise ValueError(f"--batch-size {n} must be a multiple of the number of processes ({world})")
    return slice(rank * n // world, (rank + 1) * n // world)


def average_gradients(model, world):
    """Mean of every parameter's gradient over the ranks (each rank's loss is the mean over its equal slice, so
    the mean of the ranks' gradients is the gradient of the global batch's mean loss); one all-reduce."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def mean_over_ranks(x, world):
    """The mean of tensor x over the ranks (the same value on every rank)."""
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= world
    return x


def any_rank(flag, world, device):
    """True on every rank once flag is True on any rank: a stop signal must stop all ranks at the same step
    (under torchrun this is one tiny all-reduce, and one host sync, per step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: CPU tensors, arrays, dicts)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def rng_checkpoint(data_gen, world):
    """The "rng" entry of a checkpoint: the data generator's state (alike on every rank) and every rank's own
    global RNG streams (rng_state), so that a resume with the same number of processes continues each exactly."""
    return {"data": data_gen.get_state(), "ranks": gather_objects(rng_state(), world)}


def restore_rng(state, data_gen, rank, path):
    """Undo rng_checkpoint on this rank (a rank beyond the saved ones takes rank 0's streams); DataError where the
    checkpoint holds no such state or one of another device type (a CUDA generator's state does not fit a CPU one)."""
    try:
        data_gen.set_state(state["data"])
        set_rng_state(state["ranks"][rank if rank < len(state["ranks"]) else 0])
    except (KeyError, TypeError, RuntimeError):
        raise DataError(f"{path}: its random-number state is missing or of another device type; resume on the device "
                        "type it was written on") from None


def my_chunks(n, size, rank, world):
    """(start, count) of the chunks of n samples, size at a time, that this rank makes: chunk k goes to rank
    k % world. Chunk k draws from chunk_generator(seed, start), so the samples do not depend on the ranks."""
    return [(s, min(size, n - s)) for k, s in enumerate(range(0, n, size)) if k % world == rank]


def chunk_generator(seed, start, device):
    """The generator of the chunk of samples that begins at sample index start: derived from --seed and start,
    mixed into 32 bits (a CPU generator keeps only the low 32 bits of its seed); distinct starts of one seed
    never share a seed (40503 is odd)."""
    return make_generator((seed * 2654435761 + start * 40503 + 1) % 2 ** 32, device)


def gather_chunks(chunks, world):
    """Every rank's [(start, CPU tensor), ...] -> one tensor in sample order (on every rank)."""
    parts = sorted((p for rank_parts in gather_objects(chunks, world) for p in rank_parts), key=lambda p: p[0])
    return torch.cat([x for _, x in parts])


class StopFlag:
    """Ctrl-C and SIGTERM set a flag; the loop checks it between steps, saves, and exits cleanly."""

    def __init__(self):
        self.set = False
        signal.signal(signal.SIGINT, self.handler)
        signal.signal(signal.SIGTERM, self.handler)

    def handler(self, signum, frame):
        self.set = True


def leave_distributed():
    """Called from main's `finally` under torchrun. After a finished or stopped run, wait for every rank (not after
    an error: the others may be inside a collective), then end the process with os._exit: gloo's threads, torn down
    by a normal interpreter shutdown, now and then abort a rank ("terminate called without an active exception").
    An unexpected exception leaves normally, so that its traceback is printed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    exc = sys.exc_info()[1]
    code = (exc.code or 0) if isinstance(exc, SystemExit) else 0 if exc is None else None
    if code in (0, 130):  # 130: every rank stopped after the same step (any_rank)
        torch.distributed.barrier()
    if not isinstance(code, int):
        torch.distributed.destroy_process_group()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The command line. Every Config field is a flag (--batch-size for batch_size); its --help is the field's inline
# comment in Config, with the paper's value; a flag the command line does not give keeps the preset's value, else the
# Config default. Bad input of any kind is one line on stderr and exit code 2, never a traceback.

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other error here."""

    def error(self, message):
        sys.stderr.write(f"{SCRIPT}.py: error: {message}\n")  # one write: the lines of torchrun's ranks never mix
        sys.exit(2)


def config_help(config):
    """Each field's inline comment in the Config class, with its continuation lines (comment lines whose text starts
    in the same column): the field's --help text."""
    helps, name, column = {}, None, -1
    for line in inspect.getsource(config).splitlines()[1:]:
        code, _, comment = line.partition("#")
        field, start = code.split(":")[0].strip(), len(line) - len(comment.lstrip())  # where the comment's text starts
        if ":" in code and field.isidentifier():
            name, column, helps[field] = field, start, comment.strip()
        elif name and not code.strip() and start == column:
            helps[name] += " " + comment.strip()
        else:
            name = None
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def make_parser(config, modes, choices, presets, recipes):
    """One switch per mode (modes: name -> help; the run picks exactly one), --preset, and a flag per Config field.
    Switch fields (bool) take --name / --no-name; every field's default here is None, so that parse_config can tell
    what the command line gave. The recipes (see follow_data) are listed at the end of --help."""
    flags = lambda values: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items()) or "the defaults above"
    lines = [f"  images up to {side} px, {'any device' if kind == 'any' else kind}: {flags(values)}"
             for side, kind, values in recipes]
    p = OneLineParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="--train's defaults follow the data (the first line that fits its largest side and the "
                             f"device;\n\"cpu\" takes MPS too; a flag{' or --preset' if presets else ''} given wins):\n"
                             + "\n".join(lines))
    group = p.add_argument_group("what to do (pick one)")
    for name, text in modes.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    if presets:
        p.add_argument("--preset", choices=sorted(presets), help="the papers' settings; flags given override them")
    helps, settings = config_help(config), p.add_argument_group("settings (the Config)")
    for f in dataclasses.fields(config):
        # a field named like a Python keyword ends in "_" (class_): its flag does not (--class)
        flag, text = "--" + f.name.rstrip("_").replace("_", "-"), f"{helps.get(f.name, '')} (default {f.default})"
        if isinstance(f.default, bool):
            settings.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            settings.add_argument(flag, dest=f.name, metavar=f.name.rstrip("_").upper(), type=type(f.default),
                                  default=None, choices=choices.get(f.name), help=text)
    return p


def parse_config(p, argv, config, modes, presets):
    """-> (args, mode, cfg, given): the one mode chosen; cfg = Config(defaults <- preset <- the flags given);
    given = the Config fields the command line set."""
    args = p.parse_args(argv)
    chosen = [m for m in modes if getattr(args, m)]
    if len(chosen) != 1:
        raise ValueError("choose exactly one of " + ", ".join("--" + m.replace("_", "-") for m in modes))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if getattr(args, f.name) is not None}
    named = getattr(args, "preset", None)
    preset = presets.get(named, {})
    cfg = config(**{**preset, **given})
    # not a Config field: what follow_data leaves alone; a preset named is a whole recipe ("--preset digits" on
    # 28-px data runs the digits defaults), so it leaves all of it
    cfg.fixed = {f.name for f in dataclasses.fields(config)} if named else set(given)
    return args, chosen[0], cfg, given


def follow_data(cfg, recipes, shape, device):
    """The defaults that follow the data: the first recipe (largest image side, device kind "any" / "cpu" / "cuda",
    values) that fits image data of this shape (C, H, W) on this device sets its values in cfg, except those the
    command line set (cfg.fixed; with a --preset it sets none). A Config made in Python (no cfg.fixed) and 2-D toy
    data run as they are. MPS counts as "cpu". Returns the values set."""
    if not hasattr(cfg, "fixed") or len(shape) != 3:
        return {}
    kind = "cuda" if device.type == "cuda" else "cpu"
    for side, dev, values in recipes:
        if max(shape[1:]) <= side and dev in ("any", kind):
            chosen = {k: v for k, v in values.items() if k not in cfg.fixed}
            for k, v in chosen.items():
                setattr(cfg, k, v)
            return chosen
    return {}


def check_common(cfg, positive):
    """The checks every script makes (ValueError naming the flag): the fields in positive > 0 and finite,
    0 <= ema_decay, adam_beta2 < 1, image_size 0 (native) or 4..1024, the device present, the output folder
    writable."""
    for name in positive:
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0 <= cfg.adam_beta2 < 1:
        raise ValueError(f"--adam-beta2 must be in [0, 1), got {cfg.adam_beta2}")
    if cfg.image_size != 0 and not 4 <= cfg.image_size <= 1024:
        raise ValueError(f"--image-size must be 0 (native) or 4..1024, got {cfg.image_size}")
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device {cfg.device!r} is not a torch device") from None
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.type not in ("cpu", "cuda", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()) or (
                dev.type == "cuda" and (dev.index or 0) >= n_cuda):
            raise ValueError(f"--device {cfg.device!r} is not available on this machine")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write_test{os.getpid()}")  # one per process: torchrun's ranks probe at once
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {cfg.out}: output folder is not writable ({e.strerror})") from None


@contextlib.contextmanager
def one_line_errors():
    """Around a command: bad input (DataError, ValueError) is one line on stderr and exit code 2 (argparse's
    convention), no traceback; under torchrun every rank then leaves together (leave_distributed)."""
    try:
        yield
    except (DataError, ValueError) as e:
        sys.stderr.write(f"{SCRIPT}.py: error: {e}\n")  # one write: the lines of torchrun's ranks never mix
        sys.exit(2)
    finally:
        leave_distributed()
# ==== end of Running it ==============================================================================


# -----------------------------------------------------------------------------
# Training loop

# Fields a checkpoint's "config" leaves out: where and how a run ran, not what defines the model, its noise levels,
# the training recipe or the sampler settings (n_steps_each, step_lr, denoise: Technique 4 ties them to the levels,
# so they are stored, and are the defaults of --sample / --inpaint).
NOT_STORED = ("out", "device", "precision", "compile", "deterministic", "stream_gb", "ckpt", "n_samples", "n_inpaint",
              "mask")
# Fields a resumed run (or a sampler) must share with the checkpoint: they fix the network and the levels.
MUST_MATCH = ("dataset", "image_size", "model", "cond", "sigma_1", "sigma_L", "L")


def make_model(config):
    """The score network for a checkpoint config: common.MLP for 2-D toys, else the U-Net, wrapped in ScoreNet."""
    if config["dataset"] in TOYS:
        net = MLP()
    else:
        C, H = config["data_shape"][0], config["data_shape"][-1]
        net = UNet(in_ch=C, image_size=H, **PRESETS[config["model"]])
    return ScoreNet(net, config["cond"])


def read_ckpt(path, cfg=None):
    """load_checkpoint plus the checks of this script: all keys present; config matches cfg where it must."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("config", "step", "model", "ema", "optimizer", "rng") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or "data_shape" not in ckpt["config"] or any(
            k not in ckpt["config"] for k in MUST_MATCH + ("n_steps_each", "step_lr", "denoise")):
        raise DataError(f"{path}: a {SCRIPT} checkpoint with missing fields ({', '.join(missing) or 'config'})")
    for k in MUST_MATCH if cfg is not None else ():
        if ckpt["config"][k] != getattr(cfg, k):
            raise DataError(f"{path}: trained with {k}={ckpt['config'][k]!r}, this run has {k}={getattr(cfg, k)!r}")
    return ckpt


def train(cfg):
    """Song & Ermon (2019) Sec. 4.2 (Eq. 6 by Adam) with NCSNv2's Techniques 1-5; under torchrun a slice per rank."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    resume = cfg.resume
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)  # before any CUDA work (cuBLAS settings)
    torch.manual_seed(cfg.seed)  # the initial weights: alike on every rank
    data_gen = make_generator(cfg.seed, device)  # alike on every rank: data order, flips, levels, noise, v
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None, stream_gb=cfg.stream_gb)
    if recipe := follow_data(cfg, DATA_RECIPES, data.u.shape[1:], device):
        log(f"for {'x'.join(map(str, data.u.shape[1:]))} images on {device.type}: {recipe}", flush=True)
    part = rank_slice(cfg.batch_size, rank, world)  # this rank's examples of every global batch
    cfg = resolve_levels(cfg, data.x, log)  # Techniques 1, 2, 4 for fields given as 0
    ncsn = NCSN(cfg.sigma_1, cfg.sigma_L, cfg.L, cfg.t_sampling)
    log(f"noise levels: sigma {cfg.sigma_1:.4g} -> {cfg.sigma_L:.4g}, L = {cfg.L}; sampling: T = "
        f"{cfg.n_steps_each}, eps = {cfg.step_lr:.4g} (paper's form), denoise {cfg.denoise}", flush=True)
    config = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_STORED},
              "data_shape": list(data.u.shape[1:])}
    model = make_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # Technique 5 (EMA of parameters; no buffers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2))
    torch.manual_seed(cfg.seed + rank)  # from here the global RNGs draw dropout only, per rank
    path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if resume:  # every rank reads the same checkpoint
        ckpt = read_ckpt(path, cfg)
        if list(ckpt["config"]["data_shape"]) != config["data_shape"]:
            raise DataError(f"{path}: data shape {ckpt['config']['data_shape']}, this run has {config['data_shape']}")
        if not isinstance(ckpt["rng"], dict) or "data" not in ckpt["rng"]:
            raise DataError(f"{path}: written before the data generator's state was saved: it samples, cannot resume")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        for g in opt.param_groups:  # the checkpoint's moments with this run's beta2 (lr, too, is this run's)
            g["betas"] = (0.9, cfg.adam_beta2)
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank, path)  # the data generator, and this rank's CPU and CUDA/MPS streams
        log(f"resumed from {path} at step {step}", flush=True)
    x_data = training_images(data, device, cfg.batch_size, part, cfg.seed)  # on the device (uint8 for images)
    grid_shape = (1000 if cfg.dataset in TOYS else 64, *data.u.shape[1:])
    loss_fn = {"dsm": ncsn.loss, "ssm": ncsn.ssm_loss, "ism": ncsn.ism_loss}[cfg.loss]
    use_compile = cfg.compile and cfg.loss == "dsm"  # ssm / ism differentiate through the score: no compile
    if cfg.compile and not use_compile:
        log(f"note: --compile applies to sampling only with --loss {cfg.loss} (it needs double backward)", flush=True)
    score = network(model, autocast, use_compile)      # what the loss is given: model(x, sigma) -> float32
    score_ema = network(ema, autocast, cfg.compile)    # what the sample grids use

    def check_loss():
        # The losses of the window since the last progress line are summed on the device; one NaN poisons the sum.
        # Its mean over the ranks is the same number on every rank, so every rank takes the same decision.
        loss_mean = mean_over_ranks(loss_sum, world).item() / max(step - log_step, 1)
        if not math.isfinite(loss_mean):
            raise DataError(f"non-finite loss in steps {log_step + 1}-{step}; last good checkpoint kept in {path}")
        return loss_mean

    def checkpoint():
        check_loss()
        if any_rank(has_nonfinite(model, ema), world, device):  # never save NaN weights; the previous one stays
            raise DataError(f"non-finite weights at step {step}; last good checkpoint kept in {path}")
        rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
        if rank > 0:
            return
        try:
            save_checkpoint(path, {"script": SCRIPT, "config": config, "step": step,
                                   "model": model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": rng})
        except (OSError, RuntimeError) as e:  # disk full, folder removed: say so in one line
            raise DataError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0]})") from None

    stop, t0, step0, stopping = StopFlag(), time.time(), step, False
    loss_sum, log_step = torch.zeros((), device=device), step  # loss summed on the device since step log_step
    B, shape = cfg.batch_size, tuple(data.u.shape[1:])
    model.train()
    while step < cfg.steps and not stopping:
        # The global batch's randomness, all from data_gen in a fixed order; this rank keeps part of each.
        idx = draw_indices(x_data, B, device, data_gen, step)  # i.i.d. minibatch: exact resume
        if data.flip:  # random horizontal flips (CIFAR-10, as in both papers' code)
            flip = (torch.rand(B, device=device, generator=data_gen) < 0.5).reshape(-1, 1, 1, 1)
        i = ncsn.sample_levels(B, device, data_gen)  # (B,) level indices
        z = torch.randn((B, *shape), device=device, generator=data_gen)  # (B, ...) perturbation noise
        v = torch.randn((B, *shape), device=device, generator=data_gen) if cfg.loss == "ssm" else None  # SSM's v
        x = levels_to_unit(x_data[idx[part]], data.levels)  # to [-1, 1], float32, on the device
        if data.flip:
            x = torch.where(flip[part], x.flip(-1), x)
        extra = {"v": v[part]} if v is not None else {}
        loss = loss_fn(score, x, i[part], z[part], **extra)  # Eq. 6 (or its SSM / ISM counterpart) on this slice
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))  # linear warm-up (off by default)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, world)  # the gradient of the global batch's mean loss, on every rank
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)  # Technique 5: exponential moving average of the weights
        step += 1
        loss_sum += loss.detach()  # no host sync: read at the next progress line or checkpoint
        stopping = any_rank(stop.set, world, device)  # Ctrl-C / SIGTERM on any rank stops all at this step
        if step % cfg.log_every == 0 or step == cfg.steps:  # progress line: step, loss, it/s, ETA
            loss_mean = check_loss()
            rate = (step - step0) / (time.time() - t0)
            eta = (cfg.steps - step) / rate
            log(f"step {step}/{cfg.steps}  loss {loss_mean:.4f}  {rate:.2f} it/s  "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            loss_sum, log_step = torch.zeros((), device=device), step
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            checkpoint()
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            # Fixed noise (its own generator, the training RNG untouched): the grids differ only by the weights.
            x = ncsn.sample(score_ema, grid_shape, cfg.n_steps_each, cfg.step_lr, cfg.denoise,
                            generator=make_generator(cfg.seed + 1, device), device=device)
            write_samples(x, os.path.join(cfg.out, f"grid_{step:07d}.png"), cfg.dataset)
    if stopping:
        log(f"stopped at step {step}; checkpoint saved to {path}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    log(f"done: {step} steps in {time.time() - t0:.0f} s; checkpoint {path}", flush=True)


# -----------------------------------------------------------------------------
# Sampling and inpainting from a checkpoint

def load_for_inference(cfg_overrides):
    """Rebuild (cfg, ckpt, ncsn, EMA score callable, device, rank, world) from a checkpoint, without the data."""
    path = cfg_overrides["ckpt"]
    ckpt = read_ckpt(path)
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in fields and k not in NOT_STORED})  # older: ignored
    cfg = resolve_levels(dataclasses.replace(cfg, **cfg_overrides))  # runtime flags (see main); --step-lr 0: Tech. 4
    rank, world, device = setup_distributed(pick_device(cfg.device))
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    ncsn = NCSN(cfg.sigma_1, cfg.sigma_L, cfg.L)
    net = make_model(ckpt["config"])
    try:
        net.load_state_dict(ckpt["ema"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: EMA weights do not fit the network of its config ({str(e).splitlines()[0]})")
    if has_nonfinite(net):
        raise DataError(f"{path}: the EMA weights contain NaN or inf")
    return cfg, ckpt, ncsn, network(net.to(device).eval(), autocast, cfg.compile), device, rank, world


def run_sample(cfg_overrides):
    """--sample: n images (or 2-D points) by Algorithm 1 from the EMA network -> samples.png and samples.npz. Chunks of
    --batch-size, chunk k on rank k % world, each from chunk_generator(seed, start): the same for any ranks."""
    cfg, ckpt, ncsn, net, device, rank, world = load_for_inference(cfg_overrides)
    shape, chunks = tuple(ckpt["config"]["data_shape"]), []
    for start, n in my_chunks(cfg.n_samples, cfg.batch_size, rank, world):
        g = chunk_generator(cfg.seed, start, device)
        chunks.append((start, ncsn.sample(net, (n, *shape), cfg.n_steps_each, cfg.step_lr, cfg.denoise, generator=g,
                                          device=device).cpu()))
        if rank == 0:
            print(f"sampled {start + n}/{cfg.n_samples}", flush=True)
    x = gather_chunks(chunks, world)  # (n_samples, ...) in sample order, on every rank
    if rank > 0:
        return
    os.makedirs(cfg.out, exist_ok=True)
    toy = cfg.dataset in TOYS  # 2-D points: scatter over the data; npz holds the raw float coordinates
    write_samples(x, os.path.join(cfg.out, "samples.png"), cfg.dataset)
    if toy:
        np.savez(os.path.join(cfg.out, "samples.npz"), arr_0=x.numpy())
    else:
        save_npz(x, os.path.join(cfg.out, "samples.npz"))
    print(f"wrote {cfg.out}/samples.png and {cfg.out}/samples.npz ({len(x)} samples)")


MASKS = ("right", "left", "top", "bottom", "center")  # --mask: which part of the image is unknown


def known_mask(shape, unknown="right", device="cpu"):
    """1 where a pixel is known, 0 where --inpaint must fill it: a half of the image (right, left, top, bottom)
    or the centre square of half the height and width. shape = (B, C, H, W)."""
    H, W = shape[-2:]
    mask = torch.ones(shape, device=device)
    region = {"right": (slice(None), slice(W // 2, None)), "left": (slice(None), slice(None, W - W // 2)),
              "top": (slice(None, H - H // 2), slice(None)), "bottom": (slice(H // 2, None), slice(None)),
              "center": (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))}[unknown]
    mask[(..., *region)] = 0
    return mask


def run_inpaint(cfg_overrides):
    """--inpaint: the --mask part of held-out images is unknown -> inpaint.png, rows of original | masked | inpainted.
    Split over the ranks like --sample."""
    cfg, ckpt, ncsn, net, device, rank, world = load_for_inference(cfg_overrides)
    if cfg.dataset in TOYS:
        raise ValueError("--inpaint needs an image dataset (the checkpoint was trained on a 2-D toy)")
    data = load_data(cfg.dataset, train=False, image_size=cfg.image_size or None)
    x = data.x[:cfg.n_inpaint].to(device)
    mask = known_mask(x.shape, cfg.mask, device)
    chunks = []
    for start, n in my_chunks(len(x), cfg.batch_size, rank, world):
        g = chunk_generator(cfg.seed, start, device)
        chunks.append((start, ncsn.inpaint(net, x[start:start + n], mask[start:start + n], cfg.n_steps_each,
                                           cfg.step_lr, generator=g).cpu()))
    x_hat = gather_chunks(chunks, world).to(device)  # (n, C, H, W) in image order, on every rank
    if rank > 0:
        return
    rows = torch.stack([x, x * mask, x_hat], 1).flatten(0, 1)  # (3n, C, H, W): original | masked (grey) | inpainted
    os.makedirs(cfg.out, exist_ok=True)
    save_grid(rows.cpu(), os.path.join(cfg.out, "inpaint.png"), nrow=3)
    print(f"wrote {cfg.out}/inpaint.png ({len(x)} rows: original | masked | inpainted)")


# -----------------------------------------------------------------------------
# CLI

CHOICES = {"model": sorted(PRESETS), "loss": ["dsm", "ssm", "ism"], "cond": ["both", "divide", "embed"],
           "t_sampling": ["iid", "low_discrepancy"], "precision": ["auto", "fp32", "tf32", "bf16"], "mask": list(MASKS)}


def validate(cfg):
    """Reject settings that make no sense, with one ValueError naming the flag."""
    check_common(cfg, ("steps", "batch_size", "n_steps_each", "ckpt_every", "sample_every", "log_every", "lr",
                       "sigma_L", "n_samples", "n_inpaint"))
    for name in ("sigma_1", "step_lr", "grad_clip"):  # 0 = Technique 1 / Technique 4 / no clipping
        v = getattr(cfg, name)
        if not v >= 0 or not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = automatic/off), got {v}")
    if cfg.sigma_1 and cfg.sigma_1 <= cfg.sigma_L:
        raise ValueError(f"need sigma_1 > sigma_L, got --sigma-1 {cfg.sigma_1} and --sigma-L {cfg.sigma_L}")
    if cfg.L < 0:
        raise ValueError(f"--L must be >= 1 (or 0 = Technique 2), got {cfg.L}")
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")


MODES = {"train": "train (Eq. 6); writes <out>/ckpt.pt and grids",
         "sample": "sample (Algorithm 1) from --ckpt's EMA weights",
         "inpaint": "inpaint held-out images, --mask unknown (Algorithm 2)"}
# Fields that --sample / --inpaint take from the command line over the checkpoint's (how to run, not what).
RUNTIME = ("out", "device", "seed", "batch_size", "n_steps_each", "step_lr", "denoise", "precision", "compile",
           "deterministic", "ckpt", "n_samples", "n_inpaint", "mask")


def main(argv=None):
    p = make_parser(Config, MODES, CHOICES, PRESET_CONFIGS, DATA_RECIPES)
    p.add_argument("--resume", action="store_true", help="continue <out>/ckpt.pt exactly (--steps is the run's total)")
    with one_line_errors():
        args, mode, cfg, given = parse_config(p, argv, Config, MODES, PRESET_CONFIGS)
        if mode != "train" and not cfg.ckpt:
            raise ValueError(f"--{mode} needs --ckpt PATH")
        validate(cfg)
        if mode == "train":
            cfg.resume = args.resume  # not a Config field: it is an action, not a setting stored in ckpt.pt
            train(cfg)
        else:
            runtime = {k: v for k, v in given.items() if k in RUNTIME}
            (run_sample if mode == "sample" else run_inpaint)(runtime)


if __name__ == "__main__":
    main()
