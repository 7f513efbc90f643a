"""
Score-based generative modeling through stochastic differential equations (score SDEs).

Paper: Yang Song, Jascha Sohl-Dickstein, Diederik P. Kingma, Abhishek Kumar, Stefano Ermon, Ben Poole (2021),
"Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021, arXiv 2011.13456.
Equation, algorithm and appendix numbers below are those printed in the arXiv version.

Commands (outputs under runs/score_sde):
    python score_sde.py --train                          # VP SDE on the embedded 8x8 digits (~4-5 min, idle 2-core CPU)
    python score_sde.py --train --sde subvp              # or ve (sigma_max from the data, NCSNv2 Technique 1)
    python score_sde.py --sample --sampler pc            # predictor-corrector (reverse diffusion + Langevin)
    python score_sde.py --sample --sampler ode           # probability-flow ODE, adaptive RK45, prints the NFE
    python score_sde.py --sample --sampler em            # also: reverse, ancestral (predictor only)
    python score_sde.py --sample --predictor euler_maruyama --corrector ald --snr 0.1 --n-steps 200
    python score_sde.py --train --resume                 # continue an interrupted run exactly
    python score_sde.py --train --dataset moons          # 2-D toy (MLP instead of the U-Net)
    python score_sde.py --eval-nll --estimator rademacher  # bits/dim of held-out digits (also: gaussian, exact)
    python score_sde.py --encode                         # held-out | code | decode(code)  -> encode.png
    python score_sde.py --interpolate                    # slerp between two codes, decoded -> interpolate.png
    python score_sde.py --inpaint                        # held-out | bottom half removed | completed -> inpaint.png
    python score_sde.py --colorize                       # RGB data only (grey digits: explained, exit 2)
    python score_sde.py --train-classifier               # time-dependent classifier p_t(y | x) -> classifier.pt
    python score_sde.py --sample --class 3               # class-conditional samples (--class all: a row per class)
    python score_sde.py --train --t-sampling low_discrepancy   # one training t per stratum of the batch
    python score_sde.py --train --device cuda --precision bf16 --compile   # GPU: bf16 autocast, torch.compile
    torchrun --nproc_per_node=8 score_sde.py --train --device cuda       # 8 GPUs; --batch-size stays the global batch
    torchrun --nproc_per_node=8 score_sde.py --sample --n-samples 50000  # samples split over 8 (also --eval-nll)
Under torchrun (one process per GPU, NCCL; gloo on the CPU) a training run equals the 1-process run with the same
global batch, up to float reduction order and per-rank dropout (the tiny U-Net's dropout 0.1; the MLP has none);
--sample (also --class), --eval-nll give the same numbers for any number of processes (chunks of --batch-size,
each with its own generator); --encode / --interpolate / --inpaint / --colorize run on rank 0 alone.
Multi-node (torchrun's --nnodes and rendezvous flags) is untested.

Map of the paper onto this file:
    Eq. 5   forward SDE  dx = f(x, t) dt + g(t) dw          -> VESDE / VPSDE / subVPSDE .sde()
    Eq. 6   reverse SDE  dx = [f - g^2 grad log p_t] dt + g dw_bar   -> SDE.reverse_sde
    Eq. 7   continuous-time denoising score matching         -> loss   (likelihood weighting: Song et al. 2021b)
    Eq. 8   SMLD (NCSN) Markov chain -> Eq. 9 VE SDE          -> VESDE (.discretize is Eq. 8)
    Eq. 10  DDPM Markov chain -> Eq. 11 VP SDE                -> VPSDE (.discretize is Eq. 10)
    Eq. 12  sub-VP SDE                                        -> subVPSDE
    Eq. 13  probability-flow ODE  dx = [f - g^2/2 grad log p_t] dt   -> SDE.probability_flow, ode_sample
    Eq. 4   DDPM ancestral step in score form                 -> ancestral_sampling (VP)
    App. B  perturbation kernels p_0t(x(t) | x(0))            -> .marginal_prob, .prior_sampling, .prior_logp
    App. C  sigma_min / sigma_max / epsilon choices           -> Config, sigma_max_technique1
    App. D  probability-flow sampling with RK45 (rtol=atol=1e-5)  -> rk45, ode_sample
    App. E  reverse diffusion samplers                        -> reverse_diffusion, euler_maruyama
    App. F  ancestral sampling for SMLD (VE) models           -> ancestral_sampling (VE)
    App. G  Alg. 1 PC sampling; Alg. 2 / 3 PC for VE / VP; Alg. 4 / 5 correctors   -> pc_sample, langevin, ald
    Sec. 4.3, App. D.2  exact likelihood by the instantaneous change of variables, latent codes
                                                              -> likelihood (+ divergence), encode, decode
    Sec. 5, App. I.2  inpainting (known part replaced by its forward-noised copy) -> pc_known, inpaint
    App. I.3  colourisation in the orthogonal colour basis    -> COLOR_M, decouple, couple, colorize
    Sec. 5, App. I.1  conditional score grad log p_t(x) + grad log p_t(y | x), time-dependent classifier
                                                              -> guided_score, class_sample, TimeClassifier, classifier_loss

Symbols (paper -> code):
    t in [eps, 1]  continuous time             t            (B,) float tensor
    f(x, t), g(t)  drift and diffusion         drift, g
    beta(t)        VP/sub-VP noise rate        sde.beta(t) = beta_min + t (beta_max - beta_min)
    sigma(t)       VE noise level              sde.sigma(t) = sigma_min (sigma_max / sigma_min)^t
    s_theta(x, t)  score network               score_fn(x, t)
    z              standard normal noise       z
    r              signal-to-noise ratio       snr          (Alg. 4 / 5)
    eps_i          Langevin step size          step         (Alg. 4 / 5)
    N, M           predictor / corrector steps n_steps, n_corrector_steps

Conventions and notation clashes:
  * Data range: models see x in [-1, 1] (common.py). The paper's VE values (sigma_min 0.01, sigma_max 50 on
    CIFAR-10) are for data in [0, 1] (App. C); in [-1, 1] all distances double, so our sigma_min default is
    0.02, and sigma_max is recomputed on the data as loaded (NCSNv2 Technique 1: the largest pairwise distance).
    The paper's VP/sub-VP models already use centred [-1, 1] data (official configs: data.centered=True),
    so beta_min = 0.1, beta_max = 20 carry over unchanged.
  * Two "eps": the paper's epsilon is the smallest time (1e-5 in training, 1e-3 (VP, sub-VP) or 1e-5 (VE) when
    sampling); the noise predicted by a DDPM-style network is eps_hat. "alpha" is the corrector's 1 - beta_i
    (Alg. 5), not DDPM's alpha_bar.
  * The network: common.UNet (or common.MLP for 2-D toys) gets continuous time as 999 t for VP / sub-VP, as the
    official code does, and for VE the input 999 log(sigma / sigma_min) / log(sigma_max / sigma_min), derived
    from sigma (for the geometric VE schedule this number equals 999 t). The score is read from the network as
    in the official code (models/utils.py get_score_fn): VP / sub-VP predict the noise, s = -eps_hat / std_t;
    VE networks output sigma * score (NCSN++ scale_by_sigma), s = net / sigma_t.
  * Time grid (as the official code's linspace(1, eps, N)): a sampler with N steps visits the N levels
    t_N = 1 > ... > t_1 = eps, t_k = eps + (1 - eps) (k - 1) / (N - 1), and its last predictor step goes on to the
    data, t_0 = 0; built once as (t, t_next) pairs. Each predictor step goes from t to t_next (the chain index
    i = k), and the discrete chains use beta_i = beta(t) dt (VP, Eq. 10, dt = t - t_next) and sigma_i = sigma(t_i)
    with sigma_0 = 0 (VE, Eq. 8).
  * Langevin step: the paper's Alg. 4/5 form x + e s + sqrt(2 e) z; NCSN's x + (a/2) s + sqrt(a) z is the same
    with a = 2 e.
  * Devices and precision: every mode runs on --device (the rule is stated in the "Running it" block below).
    Schedules, sampler and likelihood arithmetic run on the model's device in float64 (wide()), in float32 on
    MPS, which has no float64; the ODE state too (the official code integrates in float64 with scipy). The
    network runs under --precision (fp32 | tf32 | bf16 autocast; auto = tf32 on CUDA) and returns float32.
    The fixed-step samplers make no host sync per step; RK45 reads its error norm once per step (step-size
    control needs it on the host).
  * Last step is noise-free: pc_sample returns x_mean of its last predictor step, t = eps -> 0, which (reverse
    diffusion, ancestral) is a Tweedie denoise x(0) ~ x + std^2 s; ode_sample ends with the same step (the
    official noise_removal). From exact samples of p_eps of a point mass (exact score) this step leaves no
    spread for VE, and for VP |2 - sqrt(1 - b) - b / std(eps)^2| std(eps) with b = beta(eps) eps (0.09 std(eps)
    ~ 0.001 at eps = 1e-3); the official b = beta_min / N leaves 0.09 std(eps) at N = 1000 too, 0.82 std(eps) at
    N = 500. sub-VP's chain is Euler-Maruyama: ~1.2 std(eps) ~ 1e-4 left (tests: test_point_mass_spread_*).
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

from common import (MLP, PRESETS, TOYS, DataError, ResBlock, UNet, load_data, save_grid, save_npz, save_scatter,
                    timestep_embedding)

SCRIPT = "score_sde"  # the name written into every checkpoint


# -----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # data and network
    dataset: str = "digits"       # common.load_data name, or a folder of images (paper: CIFAR-10, CelebA, LSUN, FFHQ)
    image_size: int = 0           # 0 = the dataset's native size
    model: str = "tiny"           # UNet preset in common.PRESETS (paper: DDPM++ / NCSN++, ~60 M); toys use the MLP
    # the SDE (Sec. 3.4, App. B)
    sde: str = "vp"               # vp | subvp | ve
    beta_min: float = 0.1         # App. B / C: beta(0) = 0.1 (VP, sub-VP; data in [-1, 1] as in the paper)
    beta_max: float = 20.0        # App. B / C: beta(1) = 20
    sigma_min: float = 0.02       # App. C: 0.01 for data in [0, 1] -> 0.02 in our [-1, 1]
    sigma_max: float = 0.0        # 0 = NCSNv2 Technique 1 on the training data (paper: 50 for CIFAR-10 in [0, 1])
    # training (Sec. 3.3, Eq. 7; App. H)
    likelihood_weighting: bool = False  # lambda = g^2 (Song, Durkan, Murray, Ermon 2021); default lambda = std_t^2
    train_eps: float = 1e-5       # App. C: t ~ U[1e-5, 1] while training
    t_sampling: str = "iid"       # iid (paper) | low_discrepancy (one t per stratum of the batch; VDM, issue 8)
    steps: int = 1600             # total optimisation steps of the run (paper: 1.3 M; CPU default shortened)
    batch_size: int = 128         # the global batch (torchrun: split over the ranks); paper: 128
    lr: float = 2e-4              # paper: Adam 2e-4
    warmup: int = 100             # paper: 5000 warm-up steps (CPU default shortened)
    grad_clip: float = 1.0        # paper: gradient clipping at norm 1
    ema_decay: float = 0.995      # paper: 0.999 (VE) / 0.9999 (VP, sub-VP); shortened for a ~2k-step CPU run
    ckpt_every: int = 200         # steps between checkpoints (also written on Ctrl-C / SIGTERM and at the end)
    sample_every: int = 800       # steps between sample grids from fixed noise
    log_every: int = 100          # steps between progress lines
    out: str = "runs/score_sde"   # output folder
    ckpt: str = ""                # checkpoint to sample from ("" = <out>/ckpt.pt)
    seed: int = 0
    device: str = "auto"          # auto = cuda -> mps -> cpu
    precision: str = "auto"       # auto | fp32 | tf32 | bf16 (auto: tf32 on CUDA, else fp32; bf16: network autocast)
    compile: bool = False         # torch.compile the network (a one-line message where unsupported)
    deterministic: bool = False   # deterministic kernels, so a CUDA run repeats bitwise (slower)
    # sampling (Sec. 4, App. D / E / G). The pc defaults below are the official VE CIFAR-10 settings
    # (configs/ve/cifar10_ncsnpp_continuous.py: reverse_diffusion + langevin, snr 0.16), used here for every SDE
    # (our choice). The official VP / sub-VP configs use no corrector: euler_maruyama (continuous models,
    # e.g. configs/vp/cifar10_ddpmpp_continuous.py; here --sampler em) or ancestral_sampling (discrete DDPM++,
    # configs/vp/cifar10_ddpmpp.py; --sampler ancestral).
    sampler: str = "pc"           # pc | ode | em | reverse | ancestral (the last three: predictor only)
    predictor: str = "reverse_diffusion"  # for --sampler pc: euler_maruyama | reverse_diffusion | ancestral_sampling | none
    corrector: str = "langevin"   # for --sampler pc: langevin | ald | none
    snr: float = 0.16             # App. G: r = 0.16 (VE, CIFAR-10; official default_cifar10_configs.py)
    n_steps: int = 500            # N discretisation steps (paper: 1000; CPU default halved)
    n_corrector_steps: int = 1    # M corrector steps per level (paper: 1)
    sample_eps: float = 0.0       # 0 = paper default per SDE: 1e-3 (VP, sub-VP), 1e-5 (VE)
    rtol: float = 1e-5            # App. D: RK45 rtol = atol = 1e-5
    atol: float = 1e-5
    n_samples: int = 64           # images written by --sample
    # evaluation and controllable generation (Sec. 4.3, Sec. 5, App. D.2, App. I)
    estimator: str = "rademacher" # --eval-nll trace estimator: rademacher | gaussian (App. D.2) | exact (d backward passes)
    n_eval: int = 64              # held-out images for --eval-nll / --encode / --interpolate / --inpaint / --colorize
    classifier_steps: int = 800   # --train-classifier steps (paper's CIFAR-10 classifier: a WRN on noisy data, App. I.1)
    classifier_scale: float = 1.0 # weight of grad log p_t(y | x) in the conditional score (paper: 1)
    classifier_ckpt: str = ""     # classifier for --class ("" = <out>/classifier.pt)


# -----------------------------------------------------------------------------
# Noise schedules: the three SDEs (Sec. 3.4, App. B)

def bc(a, x):
    """Broadcast a per-sample (B,) tensor against x (B, ...), in x's dtype."""
    return a.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def randn(x, generator=None):
    """Standard normal noise shaped like x, on x's device, optionally from a torch.Generator that feeds that
    device (make_generator(seed, device): reproducible sampling)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def wide(t):
    """t in the schedules' precision, on its own device: float64 on CPU and CUDA, float32 on MPS (no float64)."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


class SDE:
    """What the three SDEs share: Eq. 6, Eq. 13, an Euler-Maruyama chain and the Gaussian prior's log-density.

    Schedules are computed on t's device in float64 (float32 on MPS: wide(t)) and returned in x's dtype.
    """
    N = 1000          # default number of discretisation steps for samplers
    prior_std = 1.0   # std of the prior p_T = N(0, prior_std^2 I)
    sample_eps = 1e-3 # App. C: smallest sampling time (VP, sub-VP)
    name = ""

    def reverse_sde(self, x, t, score):
        """Eq. 6: the reverse-time SDE dx = [f(x, t) - g(t)^2 score] dt + g(t) dw_bar; returns (drift, g)."""
        drift, g = self.sde(x, t)
        return drift - bc(g ** 2, x) * score, g

    def probability_flow(self, x, t, score):
        """Eq. 13: the probability-flow ODE dx/dt = f(x, t) - g(t)^2 score / 2 (same marginals as Eq. 5)."""
        drift, g = self.sde(x, t)
        return drift - 0.5 * bc(g ** 2, x) * score

    def discretize(self, x, t, dt):
        """App. E: a Markov chain x_{i+1} = x_i + f_i + G_i z from Euler-Maruyama, f_i = f dt, G_i = g sqrt(dt)."""
        drift, g = self.sde(x, t)
        return drift * dt, g * math.sqrt(dt)

    def prior_sampling(self, shape, generator=None, dtype=torch.float32, device="cpu"):
        """x(T) ~ p_T = N(0, prior_std^2 I) (App. B)."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * self.prior_std

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample, (B,): the prior term of the likelihood (App. D.2)."""
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi * self.prior_std ** 2) - z.flatten(1).pow(2).sum(1) / (2 * self.prior_std ** 2)

    def check_chain(self, N, eps):
        """Any N-step grid works for VE (the VP chain overrides this)."""

    def langevin_alpha(self, t, dt):
        """Alg. 4 / 5: the corrector's step-size factor alpha_i (1 for VE)."""
        return torch.ones_like(wide(t))


class VESDE(SDE):
    """Eq. 9: the variance-exploding SDE dx = sqrt(d[sigma^2(t)]/dt) dw, continuous limit of SMLD / NCSN."""
    name = "ve"
    sample_eps = 1e-5  # App. C: VE samples end at t = 1e-5

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        self.sigma_min, self.sigma_max, self.N = float(sigma_min), float(sigma_max), int(N)
        self.prior_std = self.sigma_max
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        """App. C: sigma(t) = sigma_min (sigma_max / sigma_min)^t, a geometric sequence in t."""
        return self.sigma_min * torch.exp(wide(t) * self.log_ratio)

    def sde(self, x, t):
        """f = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)) = sqrt(d[sigma^2]/dt)."""
        return torch.zeros_like(x), (self.sigma(t) * math.sqrt(2 * self.log_ratio)).to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0), sigma(t)^2 I), taking x(0) as the data perturbed by sigma_min (as the official code)."""
        return x, self.sigma(t).to(x.dtype)

    def chain_sigma(self, t):
        """sigma_i of the SMLD chain (Eq. 8) at time t: sigma(t), except sigma_0 = 0 at t = 0 (Eq. 8's x_0 is the
        data; the official discretize: adjacent sigma 0 at the first index). The last predictor step, from
        t = eps to t = 0, is then x + sigma(eps)^2 s(x, eps): Tweedie's denoise."""
        sigma = self.sigma(t)
        return torch.where(t > 0, sigma, torch.zeros_like(sigma))

    def discretize(self, x, t, dt):
        """Eq. 8, the SMLD chain: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, between t - dt and t."""
        G = (self.sigma(t) ** 2 - self.chain_sigma(t - dt) ** 2).sqrt()
        return torch.zeros_like(x), G.to(x.dtype)


class VPSDE(SDE):
    """Eq. 11: the variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, continuous limit of DDPM."""
    name = "vp"

    def __init__(self, beta_min=0.1, beta_max=20.0, N=1000):
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)

    def beta(self, t):
        """App. B: beta(t) = beta_min + t (beta_max - beta_min) (DDPM's linear beta_i = beta(i/N) / N)."""
        return self.beta_min + wide(t) * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        """Integral of beta from 0 to t: beta_min t + t^2 (beta_max - beta_min) / 2."""
        t = wide(t)
        return self.beta_min * t + 0.5 * t ** 2 * (self.beta_max - self.beta_min)

    def beta_i(self, t, dt):
        """beta_i = beta(t) dt of the DDPM chain (Eq. 10 with dt the grid step; official: beta(t) / N). The last
        step, t = eps -> 0, has beta(eps) eps (official: beta_min / N; the same at N = 1 / eps up to beta(eps) vs
        beta(0)). beta_i < 1 is checked once per sampler by check_chain, not here (no host sync per step)."""
        return self.beta(t) * dt

    def check_chain(self, N, eps):
        """The DDPM chain of an N-step grid needs beta_i = beta(t) dt < 1 at every level (else sqrt(1 - beta_i)
        and the corrector's alpha_i = 1 - beta_i fail): ValueError naming --n-steps if not."""
        b = max((self.beta_min + t * (self.beta_max - self.beta_min)) * (t - t_next) for t, t_next in time_grid(N, eps))
        if b >= 1:
            raise ValueError(f"the VP chain needs beta(t) dt < 1 (got {b:.2f}): use more steps "
                             f"(--n-steps > beta_max + 1 = {self.beta_max + 1:g})")

    def sde(self, x, t):
        """f = -beta(t) x / 2, g = sqrt(beta(t))."""
        beta = self.beta(t)
        return -0.5 * bc(beta, x) * x, beta.sqrt().to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0) exp(-int beta / 2), (1 - exp(-int beta)) I)."""
        B = self.int_beta(t)
        return bc(torch.exp(-0.5 * B), x) * x, (-torch.expm1(-B)).sqrt().to(x.dtype)

    def discretize(self, x, t, dt):
        """Eq. 10, the DDPM chain: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = beta(t) dt."""
        beta_i = self.beta_i(t, dt)
        return bc((1 - beta_i).sqrt(), x) * x - x, beta_i.sqrt().to(x.dtype)

    def langevin_alpha(self, t, dt):
        """Alg. 5: alpha_i = 1 - beta_i, the VP corrector's step-size factor."""
        return 1 - self.beta_i(t, dt)


class subVPSDE(VPSDE):
    """Eq. 12: the sub-VP SDE dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 int beta))) dw (variance below VP's)."""
    name = "subvp"
    discretize = SDE.discretize  # no Markov chain behind it: Euler-Maruyama (as the official code)
    # langevin_alpha is inherited: alpha_i = 1 - beta_i with sub-VP's beta(t). The official Langevin corrector
    # reads `alphas`, which its subVPSDE lacks, and fails; this choice is ours.

    def sde(self, x, t):
        """f = -beta(t) x / 2, g = sqrt(beta(t) (1 - exp(-2 int_0^t beta)))."""
        beta = self.beta(t)
        return -0.5 * bc(beta, x) * x, (beta * -torch.expm1(-2 * self.int_beta(t))).sqrt().to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0) exp(-int beta / 2), (1 - exp(-int beta))^2 I)."""
        B = self.int_beta(t)
        return bc(torch.exp(-0.5 * B), x) * x, (-torch.expm1(-B)).to(x.dtype)


def make_sde(name, beta_min=0.1, beta_max=20.0, sigma_min=0.02, sigma_max=50.0, N=1000):
    """The SDE object for a --sde name."""
    if name == "ve":
        return VESDE(sigma_min, sigma_max, N)
    if name in ("vp", "subvp"):
        return (VPSDE if name == "vp" else subVPSDE)(beta_min, beta_max, N)
    raise ValueError(f"unknown SDE {name!r}; choose vp, subvp or ve")


def sigma_max_technique1(x, n_max=5000):
    """Technique 1 of Song & Ermon (2020, NCSNv2, arXiv 2006.09011): sigma_max = the largest pairwise
    Euclidean distance between training points (on a random subset of n_max points for large datasets)."""
    x = x.flatten(1).double()
    if len(x) > n_max:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_max]]
    return max(float(torch.cdist(x[i:i + 1000], x).max()) for i in range(0, len(x), 1000))


# -----------------------------------------------------------------------------
# Forward process and loss (Sec. 3.3, Eq. 7)

def ve_noise_input(sde, sigma):
    """The VE network's noise input: 999 log(sigma / sigma_min) / log(sigma_max / sigma_min), in [0, 999]."""
    return 999 * torch.log(wide(sigma) / sde.sigma_min) / sde.log_ratio


def make_score_fn(net, sde):
    """The score s_theta(x, t) read from a network as the official code does (models/utils.py get_score_fn).

    VP / sub-VP: the network predicts the noise from (x, 999 t), and s = -eps_hat / std_t (std_t from App. B).
    VE: the network sees a sigma-derived input and outputs sigma_t * score, so s = net / sigma_t.
    """
    def score_fn(x, t):
        std = sde.marginal_prob(x, t)[1]  # (B,)
        if isinstance(sde, VESDE):
            out = net(x.float(), ve_noise_input(sde, std).float()).to(x.dtype)
            return out / bc(std, x)
        return -net(x.float(), (999 * t).float()).to(x.dtype) / bc(std, x)
    return score_fn


def sample_t(B, eps, t_sampling="iid", device="cpu", generator=None):
    """Training times t in [eps, 1], (B,). iid: t ~ U[eps, 1]. low_discrepancy (Kingma, Salimans, Poole, Ho 2021,
    Variational Diffusion Models, arXiv 2107.00630; issue 8): one uniform u_0 per batch, t_i = eps + (1 - eps) mod(u_0 + i / B, 1), one t in each of B strata:
    each t_i is still U[eps, 1], so the loss stays unbiased, with lower variance across the batch.
    generator: a torch.Generator feeding device (None: the global RNG)."""
    if t_sampling == "iid":
        return torch.rand(B, device=device, generator=generator) * (1 - eps) + eps
    if t_sampling == "low_discrepancy":
        u0 = torch.rand(1, device=device, generator=generator)
        return eps + (1 - eps) * torch.remainder(u0 + torch.arange(B, device=device) / B, 1.0)
    raise ValueError(f"unknown t sampling {t_sampling!r}; choose iid or low_discrepancy")


def loss(score_model, sde, x, likelihood_weighting=False, eps=1e-5, t_sampling="iid", t=None, z=None):
    """Eq. 7 of Song et al. (2021): continuous-time denoising score matching.

    E_t E_x(0) E_x(t)|x(0) [ lambda(t) |s_theta(x(t), t) - grad log p_0t(x(t) | x(0))|^2 ],  t ~ U[eps, 1],
    with grad log p_0t = -z / std_t for x(t) = mean_t + std_t z. Weighting: lambda(t) = std_t^2 (Sec. 3.3,
    proportional to 1 / E|grad log p_0t|^2), giving |std_t s + z|^2; or the likelihood weighting lambda = g(t)^2
    of Song, Durkan, Murray, Ermon (2021, arXiv 2101.09258), the official code's `likelihood_weighting` flag.
    Averaged over dimensions (official reduce_mean=True; the other choice, a half-sum, only rescales it).
    t (B,) and z (like x) may be given (the training loop draws them for the global batch); else they are drawn
    from the global RNG.
    """
    t = sample_t(len(x), eps, t_sampling, x.device) if t is None else t   # t ~ U[eps, 1]
    z = torch.randn_like(x) if z is None else z
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + bc(std, x) * z                                  # a sample of p_0t(x(t) | x(0)) (App. B)
    score = score_model(x_t, t)
    if not likelihood_weighting:
        losses = (score * bc(std, x) + z) ** 2                   # lambda = std_t^2
    else:
        g2 = sde.sde(torch.zeros_like(x), t)[1] ** 2
        losses = (score + z / bc(std, x)) ** 2 * bc(g2, x)       # lambda = g(t)^2
    return losses.flatten(1).mean(1).mean()


# -----------------------------------------------------------------------------
# Samplers (Sec. 4, App. D-G). Every sampler takes score_fn(x, t), t a (B,) tensor in (0, 1].
# Predictors and correctors return (x, x_mean): the new state and the same update without its noise.

def time_grid(N, eps):
    """The (t, t_next) pairs of N predictor steps, as in the official code: N levels t_k = eps + (1 - eps) (k - 1) /
    (N - 1), k = N ... 1 (t_N = 1, t_1 = eps; N = 1: the single level 1), and after t_1 = eps the data, t_0 = 0."""
    ts = [eps + (1 - eps) * (k - 1) / (N - 1) for k in range(N, 0, -1)] if N > 1 else [1.0]
    return list(zip(ts, ts[1:] + [0.0]))


def full(x, t):
    """A time t (float) as the (B,) tensor the score function takes, on x's device (float64; float32 on MPS)."""
    return torch.full((len(x),), t, dtype=torch.float32 if x.device.type == "mps" else torch.float64, device=x.device)


def euler_maruyama(score_fn, sde, x, t, t_next, generator=None):
    """App. E (and D.3): one Euler-Maruyama step of the reverse SDE (Eq. 6) from t to t_next < t."""
    dt = t - t_next
    drift, g = sde.reverse_sde(x, full(x, t), score_fn(x, full(x, t)))
    x_mean = x - drift * dt                                   # deterministic part (time runs backwards)
    return x_mean + bc(g, x) * math.sqrt(dt) * randn(x, generator), x_mean


def reverse_diffusion(score_fn, sde, x, t, t_next, generator=None, noise=True):
    """App. E: the reverse-diffusion predictor, the forward chain run backwards in the same discretisation:
    x_i = x_{i+1} - f_{i+1}(x_{i+1}) + G_{i+1}^2 s(x_{i+1}, t_{i+1}) + G_{i+1} z.  noise=False: x_mean only
    (returned twice; no noise is drawn)."""
    f, G = sde.discretize(x, full(x, t), t - t_next)
    x_mean = x - f + bc(G ** 2, x) * score_fn(x, full(x, t))
    if not noise:
        return x_mean, x_mean
    return x_mean + bc(G, x) * randn(x, generator), x_mean


def ancestral_sampling(score_fn, sde, x, t, t_next, generator=None):
    """Ancestral sampling of the discrete chain: App. F for VE (SMLD), Eq. 4 (DDPM's step) for VP.

    VE: x_{i-1} = x_i + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z.
    VP: x_{i-1} = (x_i + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z,  beta_i = beta(t) dt.
    sub-VP (not in the paper; ours): the posterior q(x_{t_next} | x_t, x0_hat) of the Gaussian chain that has
    sub-VP's marginals, with x0_hat = (x + std_t^2 s) / mean_coef_t (Tweedie). For VE it reduces to App. F.
    """
    tt = full(x, t)
    score = score_fn(x, tt)
    if isinstance(sde, VESDE):
        s2, s2_next = sde.sigma(tt) ** 2, sde.chain_sigma(full(x, t_next)) ** 2  # sigma_0 = 0 at t_next = 0
        x_mean = x + bc(s2 - s2_next, x) * score
        std = (s2_next * (s2 - s2_next) / s2).sqrt()
    elif isinstance(sde, subVPSDE):
        m, s = sde.marginal_prob(torch.ones_like(tt), tt)      # mean coefficient and std at t
        m_next, s_next = sde.marginal_prob(torch.ones_like(tt), full(x, t_next))
        a = m / m_next                                          # x_t = a x_next + b z in the chain
        b2 = s ** 2 - a ** 2 * s_next ** 2
        x0_hat = (x + bc(s ** 2, x) * score) / bc(m, x)         # Tweedie's estimate of x(0)
        x_mean = (bc(a * s_next ** 2, x) * x + bc(b2 * m_next, x) * x0_hat) / bc(s ** 2, x)
        std = s_next * b2.sqrt() / s
    else:
        beta = sde.beta_i(tt, t - t_next)                       # beta_i of the DDPM chain (Eq. 10)
        x_mean = (x + bc(beta, x) * score) / bc((1 - beta).sqrt(), x)
        std = beta.sqrt()
    return x_mean + bc(std, x) * randn(x, generator), x_mean


def no_predictor(score_fn, sde, x, t, t_next, generator=None):
    """The empty predictor: corrector-only sampling (annealed Langevin dynamics over the grid)."""
    return x, x


PREDICTORS = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion,
              "ancestral_sampling": ancestral_sampling, "none": no_predictor}


def langevin(score_fn, sde, x, t, dt, snr, n_steps, generator=None):
    """Algorithms 4 (VE) and 5 (VP) of Song et al. (2021): Langevin corrector with step size from the snr r.

    Repeat M times: g = s(x, t); z ~ N(0, I); e = 2 alpha (r |z| / |g|)^2; x = x + e g + sqrt(2 e) z,
    with alpha = 1 (VE) or 1 - beta_i (VP, sub-VP). As in the official code, |z| and |g| are the batch
    averages of the per-sample norms. A score that is exactly zero (an untrained network: its last layer
    starts at zero) gives step 0 where the formula would give infinity.
    """
    tt = full(x, t)
    alpha = sde.langevin_alpha(tt, dt)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, tt)                                    # g = s(x, t)
        z = randn(x, generator)                                   # z ~ N(0, I)
        grad_norm = grad.flatten(1).norm(dim=1).mean()            # |g|, batch mean of per-sample norms
        noise_norm = z.flatten(1).norm(dim=1).mean()              # |z|, likewise
        ratio = torch.where(grad_norm > 0, noise_norm / grad_norm, torch.zeros_like(grad_norm))
        step = 2 * alpha * (snr * ratio) ** 2                     # e_i, (B,)
        x_mean = x + bc(step, x) * grad                         # Langevin drift
        x = x_mean + bc((2 * step).sqrt(), x) * z               # Langevin noise
    return x, x_mean


def ald(score_fn, sde, x, t, dt, snr, n_steps, generator=None):
    """Annealed Langevin dynamics as in NCSN (Song & Ermon 2019, Alg. 1), in the official code's form:
    step e = 2 alpha (r std_t)^2, i.e. proportional to the noise variance at t, instead of the norm ratio."""
    tt = full(x, t)
    alpha = sde.langevin_alpha(tt, dt)
    std = wide(sde.marginal_prob(torch.ones_like(tt), tt)[1])      # std_t of p_0t (App. B)
    step = 2 * alpha * (snr * std) ** 2                              # fixed per level, proportional to std_t^2
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, tt)                                       # s(x, t)
        z = randn(x, generator)
        x_mean = x + bc(step, x) * grad                              # Langevin drift
        x = x_mean + bc((2 * step).sqrt(), x) * z                    # Langevin noise
    return x, x_mean


def no_corrector(score_fn, sde, x, t, dt, snr, n_steps, generator=None):
    """The empty corrector: predictor-only sampling."""
    return x, x


CORRECTORS = {"langevin": langevin, "ald": ald, "none": no_corrector}


def pc_sample(score_fn, sde, shape, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
              n_corrector_steps=1, eps=None, denoise=True, generator=None, n_steps=None, z=None,
              dtype=torch.float32, device="cpu"):
    """Algorithm 1 of Song et al. (2021): predictor-corrector sampling (Alg. 2 for VE, Alg. 3 for VP).

    x_N ~ p_T; at each level t_k, k = N ... 1 (time_grid: t_N = 1, ..., t_1 = eps): M corrector steps targeting
    p_{t_k}, then one predictor step of the reverse SDE from t_k to t_{k-1}. This is the official code's order;
    Alg. 2/3 print the corrector after the predictor, which is the same chain except that it corrects at t = eps
    instead of t = 1, and would make the last update a Langevin step. The last predictor step goes from t_1 = eps
    to the data, t_0 = 0, as in the official code: reverse diffusion and ancestral sampling then end with a
    Tweedie denoise (VE: sigma_0 = 0, x + sigma(eps)^2 s exactly; VP: beta(eps) eps against std(eps)^2 =
    1 - exp(-int_0^eps beta), 1.09x at eps = 1e-3), Euler-Maruyama with an Euler step of length eps. With
    denoise=True the result is x_mean of that last update (its noise left out). eps=None takes the paper's
    per-SDE default (1e-3 VP / sub-VP, 1e-5 VE); n_steps=None takes sde.N; z (optional) is the starting x_N.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose from {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; choose from {', '.join(CORRECTORS)}")
    eps = sde.sample_eps if eps is None else eps
    N = n_steps or sde.N
    sde.check_chain(N, eps)
    x = sde.prior_sampling(shape, generator, dtype, device) if z is None else z.to(dtype)
    x_mean = x
    with torch.no_grad():
        for t, t_next in time_grid(N, eps):
            # Corrector: M Langevin steps targeting p_t.
            if corrector != "none":
                x, x_mean = CORRECTORS[corrector](score_fn, sde, x, t, t - t_next, snr, n_corrector_steps, generator)
            # Predictor: one step of the reverse-time SDE from t to t_next.
            if predictor != "none":
                x, x_mean = PREDICTORS[predictor](score_fn, sde, x, t, t_next, generator)
    return x_mean if denoise else x


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), the method of scipy's RK45 used by the official code.
DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1]
DP_A = [[],
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]]
DP_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]      # 5th order (also the 7th stage's row)
DP_E = [71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]  # 5th minus 4th order


def rk45(f, y, t0, t1, rtol=1e-5, atol=1e-5, max_steps=100000):
    """Adaptive Dormand-Prince RK45 for dy/dt = f(t, y) from t0 to t1 (either direction); returns (y(t1), nfe).

    Error control as scipy's solve_ivp: err = RMS over all entries of (local error) / (atol + rtol max(|y|, |y_new|)),
    accept when err <= 1, next step h * min(10, max(0.2, 0.9 err^(-1/5))), and, as scipy, no growth on the step
    right after a rejection. The first stage of each step reuses the last stage of the previous one (FSAL), so
    an accepted or rejected step costs 6 evaluations. The step-size control reads err on the host: one sync per
    step, inherent to an adaptive solver (the fixed-step samplers make none).
    """
    nfe = 0

    def fn(t, y):
        nonlocal nfe
        nfe += 1
        return f(t, y)

    def rms(v):
        return float(v.pow(2).mean().sqrt())

    direction = 1.0 if t1 > t0 else -1.0
    t, k1 = t0, fn(t0, y)
    # Initial step (Hairer, Norsett & Wanner, Sec. II.4), as in scipy: two evaluations.
    scale = atol + rtol * y.abs()
    d0, d1 = rms(y / scale), rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(t1 - t0))
    d2 = rms((fn(t + direction * h0, y + direction * h0 * k1) - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1, abs(t1 - t0))
    rejected = False                                                # the last attempt was rejected
    for _ in range(max_steps):
        if direction * (t1 - t) <= 0:
            return y, nfe
        h = min(h, abs(t1 - t))
        hs = direction * h
        # Six stages (k1 is the previous step's last stage), then the 5th-order solution and its error.
        k = [k1]
        for i in range(1, 6):
            k.append(fn(t + DP_C[i] * hs, y + hs * sum(a * kj for a, kj in zip(DP_A[i], k))))
        y_new = y + hs * sum(b * kj for b, kj in zip(DP_B, k))
        k.append(fn(t + hs, y_new))                                 # 7th stage = f at the new point (FSAL)
        err = hs * sum(e * kj for e, kj in zip(DP_E, k))
        err_norm = rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if err_norm <= 1:                                           # accept: advance, grow the step
            t, y, k1 = t + hs, y_new, k[6]
            grow = min(10.0, 0.9 * err_norm ** -0.2) if err_norm > 0 else 10.0
            h *= min(1.0, grow) if rejected else grow                # scipy: no growth right after a rejection
            rejected = False
        else:                                                       # reject: shrink the step, retry
            h *= max(0.2, 0.9 * err_norm ** -0.2)
            rejected = True
    raise RuntimeError(f"rk45: no convergence in {max_steps} steps")


def ode_sample(score_fn, sde, shape, rtol=1e-5, atol=1e-5, eps=None, z=None, generator=None,
               dtype=torch.float32, device="cpu", denoise=True):
    """App. D.3 of Song et al. (2021): sample by solving the probability-flow ODE (Eq. 13) from t = 1 to eps
    with adaptive RK45 (the whole batch as one state vector, as the official code does); returns (x, nfe).
    denoise=True (the official sampling.noise_removal): then one reverse-diffusion predictor step without noise
    from t = eps to the data (t = 0), a Tweedie denoise as at the end of pc_sample (one more evaluation).
    The ODE state is integrated in float64 as in the official code (scipy), float32 on MPS; the network still
    sees float32 (make_score_fn); the result is returned in dtype."""
    eps = sde.sample_eps if eps is None else eps
    x = wide(sde.prior_sampling(shape, generator, dtype, device) if z is None else z.to(dtype))

    def f(t, y):
        tt = full(y, t)
        return sde.probability_flow(y, tt, score_fn(y, tt))

    with torch.no_grad():
        x, nfe = rk45(f, x, 1.0, eps, rtol, atol)
        if denoise:
            x, nfe = reverse_diffusion(score_fn, sde, x, eps, 0.0, noise=False)[0], nfe + 1
    return x.to(dtype), nfe


SAMPLERS = {"pc": None, "ode": None, "em": ("euler_maruyama", "none"),
            "reverse": ("reverse_diffusion", "none"), "ancestral": ("ancestral_sampling", "none")}


def sample(score_fn, sde, cfg, shape, generator=None, device="cpu"):
    """Run the sampler named in cfg (--sampler, --predictor, --corrector, ...); returns (x, nfe)."""
    eps = cfg.sample_eps or sde.sample_eps
    if cfg.sampler == "ode":
        return ode_sample(score_fn, sde, shape, cfg.rtol, cfg.atol, eps, generator=generator, device=device)
    pred, corr = (cfg.predictor, cfg.corrector) if cfg.sampler == "pc" else SAMPLERS[cfg.sampler]
    x = pc_sample(score_fn, sde, shape, pred, corr, cfg.snr, cfg.n_corrector_steps, eps,
                  generator=generator, n_steps=cfg.n_steps, device=device)
    nfe = cfg.n_steps * ((pred != "none") + (corr != "none") * cfg.n_corrector_steps)
    return x, nfe


# -----------------------------------------------------------------------------
# Evaluation: exact likelihood and latent codes through the probability-flow ODE (Sec. 4.3, App. D.2)

def divergence(f, x, estimator="rademacher", generator=None):
    """div_x f(x) per sample, (B,): exact (d backward passes), or the Skilling-Hutchinson estimate
    v^T (df/dx) v with one Rademacher or Gaussian probe v per sample (one vector-Jacobian product).
    Returns (f(x), div)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x)
        if estimator == "exact":
            flat = fx.flatten(1)
            div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                      for i in range(flat.shape[1]))
        else:
            v = randn(x, generator)
            if estimator == "rademacher":
                v = v.sign()
            elif estimator != "gaussian":
                raise ValueError(f"unknown estimator {estimator!r}; choose rademacher, gaussian or exact")
            div = (torch.autograd.grad((fx * v).sum(), x)[0] * v).flatten(1).sum(1)
    return fx.detach(), div.detach()


def likelihood(score_fn, sde, x, estimator="rademacher", dequantize=True, eps=1e-5, levels=None,
               rtol=1e-5, atol=1e-5, generator=None):
    """App. D.2 of Song et al. (2021): bits/dim via the instantaneous change of variables along Eq. 13.

    log p_eps(x(eps)) = log p_T(x(1)) + int_eps^1 div f_tilde(x(t), t) dt, with f_tilde the probability-flow
    drift, solved forwards by RK45 on the joint state [x, int div]. The Hutchinson probe of each sample is drawn
    once and kept along the path (as the official code). Returns (bits/dim (B,), nfe).
    dequantize=False: -log p_eps(x) / (d ln 2) for x in the coordinates passed (no rescaling).
    dequantize=True (x on `levels` grey levels in [-1, 1], bin width delta = 2 / (levels - 1)): x + delta (u - 1/2),
    u ~ U[0, 1)^d, is scored, and bits/dim = -(log p(x + delta (u - 1/2)) + d log delta) / (d ln 2), an upper bound
    on -log2 P(x) per dimension of the discrete data (Jensen). The official code skips dequantisation
    (score_sde issue #24), which scores a density on a point set and understates bits/dim.
    """
    B, d = len(x), x[0].numel()
    x = wide(x)                                                      # float64 (float32 on MPS), on x's device
    if dequantize:
        if not levels or levels < 2:
            raise ValueError("dequantize=True needs the number of grey levels of the data (levels >= 2)")
        delta = 2.0 / (levels - 1)
        x = x + delta * (torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 0.5)
    seed = torch.randint(2 ** 31, (1,), generator=generator, device=x.device if generator is None else generator.device)
    probe = make_generator(int(seed), x.device)                      # one host read per call, not per step

    def f(t, y):
        xt = y[:, :d].reshape(x.shape)
        tt = full(xt, t)
        probe.manual_seed(probe.initial_seed())                      # the same probe v at every t
        drift, div = divergence(lambda z: sde.probability_flow(z, tt, score_fn(z, tt)), xt, estimator, probe)
        return torch.cat([drift.flatten(1), div[:, None]], 1)

    y0 = torch.cat([x.flatten(1), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], 1)
    y1, nfe = rk45(f, y0, eps, 1.0, rtol, atol)
    z, delta_logp = y1[:, :d].reshape(x.shape), y1[:, d]
    logp = sde.prior_logp(z) + delta_logp                            # log p_eps(x), nats
    bpd = -logp / (d * math.log(2))
    if dequantize:
        bpd = bpd - math.log2(delta)                                 # density on bins of width delta -> probability
    return bpd, nfe


def encode(score_fn, sde, x, eps=1e-5, rtol=1e-5, atol=1e-5):
    """Sec. 4.3: the latent code z = x(1) of data x(eps) under the probability-flow ODE (uniquely identifiable);
    integrated in float64 (float32 on MPS), returned in x's dtype."""
    with torch.no_grad():
        f = lambda t, y: sde.probability_flow(y, full(y, t), score_fn(y, full(y, t)))
        return rk45(f, wide(x), eps, 1.0, rtol, atol)[0].to(x.dtype)


def decode(score_fn, sde, z, eps=1e-5, rtol=1e-5, atol=1e-5):
    """Sec. 4.3: data x(eps) from a latent code z = x(1), the ODE run backwards (ode_sample with a given start)."""
    return ode_sample(score_fn, sde, z.shape, rtol, atol, eps, z=z, dtype=z.dtype, device=z.device, denoise=False)[0]


# -----------------------------------------------------------------------------
# Controllable generation (Sec. 5, App. I): inpainting, colourisation, class-conditional sampling

def check_mask(x, mask):
    """The mask must have the data's shape (B, ...) or one sample's shape (...); 1 = known, 0 = to fill in."""
    if tuple(mask.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match data of shape {tuple(x.shape)} "
                         f"(give one sample's shape {tuple(x.shape[1:])} or the batch's)")
    return mask.to(x.dtype).expand_as(x)


def pc_known(score_fn, sde, known, mask, couple=None, decouple=None, predictor="reverse_diffusion",
             corrector="langevin", snr=0.16, n_corrector_steps=1, eps=None, n_steps=None, generator=None):
    """App. I.2 / I.3 of Song et al. (2021): PC sampling of the unknown part with the known part imposed.

    Works in coordinates u = decouple(x) (identity for inpainting; the orthogonal colour transform for
    colourisation). After every corrector and predictor update at time t -> t', the known coordinates are
    replaced by a fresh forward-noised copy of the data, u_known(t') ~ p_0t'(. | known) (App. B), while the
    unknown ones keep what the sampler produced; x_mean gets the noise-free mean m_t' known. The official code
    (controllable_generation.py) re-noises the known part to the level t the predictor started from; we noise
    it to the level t' it arrives at, so the state is consistent with p_t' (identical in the limit N -> inf).
    Two more differences from the official pc_inpainter / pc_colorizer, both ours on purpose: they start from
    the known part clean (data * mask + prior * (1 - mask), noised only after the first update) where we start
    it noised to t = 1 like the rest; and their eps defaults to 1e-5 for every SDE, where eps=None here takes
    the SDE's sampling eps (1e-3 VP / sub-VP, 1e-5 VE), as pc_sample does. (Their x_mean also mixes in the
    noisy x; ours keeps the update's x_mean.)
    """
    couple = couple or (lambda u: u)
    decouple = decouple or (lambda u: u)
    eps = sde.sample_eps if eps is None else eps
    N = n_steps or sde.N
    sde.check_chain(N, eps)
    u_known = decouple(known)

    def impose(x, x_mean, t):
        mean, std = sde.marginal_prob(u_known, full(x, t))             # p_0t(u(t) | u_known)
        std = std * (t > 0)                                            # t = 0 is the data itself (VE: sigma_0 = 0)
        noisy = mean + bc(std, x) * randn(x, generator)
        x = couple(decouple(x) * (1 - mask) + noisy * mask)
        x_mean = couple(decouple(x_mean) * (1 - mask) + mean * mask)
        return x, x_mean

    prior = sde.prior_sampling(known.shape, generator, known.dtype, known.device)
    x, x_mean = impose(prior, prior, 1.0)                              # start: prior noise, known part noised to t=1
    with torch.no_grad():
        for t, t_next in time_grid(N, eps):
            if corrector != "none":
                x, x_mean = CORRECTORS[corrector](score_fn, sde, x, t, t - t_next, snr, n_corrector_steps, generator)
                x, x_mean = impose(x, x_mean, t)
            if predictor != "none":
                x, x_mean = PREDICTORS[predictor](score_fn, sde, x, t, t_next, generator)
                x, x_mean = impose(x, x_mean, t_next)
    return x_mean


def inpaint(score_fn, sde, x, mask, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
            n_corrector_steps=1, eps=None, n_steps=None, generator=None):
    """App. I.2 of Song et al. (2021): inpainting. mask = 1 where x is known; returns the completed x
    (known entries equal to x, up to the last step's m_eps factor: exactly x(eps)'s mean)."""
    mask = check_mask(x, mask)
    return pc_known(score_fn, sde, x, mask, predictor=predictor, corrector=corrector, snr=snr,
                    n_corrector_steps=n_corrector_steps, eps=eps, n_steps=n_steps, generator=generator)


# App. I.3: the orthogonal colour transform of the official code (first column = (1, 1, 1) / sqrt(3), so the
# first decoupled channel is sqrt(3) x the grey value; the other two span the colour plane).
COLOR_M = torch.tensor([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
                        [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                        [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]], dtype=torch.float64)


def decouple(x):
    """RGB (B, 3, H, W) -> decoupled channels u_j = sum_i x_i M_ij (u_0 = grey channel)."""
    return torch.einsum("bihw,ij->bjhw", x, COLOR_M.to(x.dtype).to(x.device))  # cast on the CPU (MPS: no float64)


def couple(u):
    """Inverse of decouple: x_i = sum_j u_j M^-1_ji (M is orthogonal, so M^-1 = M^T up to float32 rounding)."""
    return torch.einsum("bjhw,ji->bihw", u, torch.linalg.inv(COLOR_M).to(u.dtype).to(u.device))


def colorize(score_fn, sde, x_grey, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
             n_corrector_steps=1, eps=None, n_steps=None, generator=None):
    """App. I.3 of Song et al. (2021): colourisation. x_grey (B, 3, H, W): an RGB image whose channel mean is the
    grey value (a colour image is reduced to it first). In the decoupled coordinates of COLOR_M the grey channel
    is known and the two colour channels are inpainted; returns RGB images with the same grey channel."""
    if x_grey.dim() != 4 or x_grey.shape[1] != 3:
        raise ValueError(f"colorize needs RGB data (B, 3, H, W); got shape {tuple(x_grey.shape)} "
                         f"(grey data has no colour to restore)")
    grey = x_grey.mean(1, keepdim=True).expand_as(x_grey)
    mask = torch.zeros_like(grey)
    mask[:, 0] = 1                                                     # decoupled channel 0 (grey) is known
    return pc_known(score_fn, sde, grey, mask, couple, decouple, predictor, corrector, snr, n_corrector_steps,
                    eps, n_steps, generator)


def guided_score(score_fn, log_prob_fn, y, scale=1.0):
    """Sec. 5 of Song et al. (2021): the conditional score
    grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x), with the classifier term scaled
    (scale = 1 is the paper's; > 1 sharpens towards the class). log_prob_fn(x, t) -> (B, K) log p_t(. | x)."""
    def score(x, t):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp_y = log_prob_fn(xg, t).gather(1, y[:, None]).sum()   # sum_b log p_t(y_b | x_b)
            grad = torch.autograd.grad(logp_y, xg)[0]
        return score_fn(x, t) + scale * grad
    return score


def class_sample(score_fn, log_prob_fn, sde, shape, y, scale=1.0, **pc_kwargs):
    """Sec. 5 / App. I.1 of Song et al. (2021): class-conditional PC sampling (labels y (B,)): pc_sample with the
    guided score of guided_score."""
    return pc_sample(guided_score(score_fn, log_prob_fn, y, scale), sde, shape, **pc_kwargs)


class TimeClassifier(torch.nn.Module):
    """App. I.1: a time-dependent classifier p_t(y | x(t)) for noisy images, built from common.py's U-Net pieces:
    the downsampling half of a small U-Net (ResBlocks with the sinusoidal time embedding, average-pool
    downsampling), then global average pooling and a linear layer to K logits. The paper uses a Wide-ResNet
    conditioned on the noise level; this is a CPU-sized stand-in. Called as net(x, t_in) with the score net's
    time input (999 t; VE: the sigma-derived input), so it shares make_score_fn's convention."""

    def __init__(self, in_ch, n_classes, ch=32, emb_dim=128):
        super().__init__()
        self.ch, self.embed = ch, timestep_embedding
        self.emb = torch.nn.Sequential(torch.nn.Linear(ch, emb_dim), torch.nn.SiLU(), torch.nn.Linear(emb_dim, emb_dim))
        self.conv_in = torch.nn.Conv2d(in_ch, ch, 3, padding=1)
        self.blocks = torch.nn.ModuleList([ResBlock(ch, ch, emb_dim, 0.0), ResBlock(ch, 2 * ch, emb_dim, 0.0)])
        self.head = torch.nn.Sequential(torch.nn.GroupNorm(8, 2 * ch), torch.nn.SiLU())
        self.out = torch.nn.Linear(2 * ch, n_classes)

    def forward(self, x, t_in):
        emb = self.emb(self.embed(t_in, self.ch))
        h = self.blocks[0](self.conv_in(x), emb)
        h = self.blocks[1](torch.nn.functional.avg_pool2d(h, 2, ceil_mode=True), emb)   # downsample x2
        return self.out(self.head(h).mean((2, 3)))                                        # (B, K) logits


def net_time(sde, t):
    """The networks' time input for continuous t (B,): 999 t (VP, sub-VP), the sigma-derived input (VE)."""
    if isinstance(sde, VESDE):
        return ve_noise_input(sde, sde.marginal_prob(torch.ones_like(t), t)[1])
    return 999 * t


def make_log_prob_fn(classifier, sde):
    """log p_t(. | x) (B, K) from the time-dependent classifier, for guided_score."""
    return lambda x, t: torch.log_softmax(classifier(x.float(), net_time(sde, t).float()), 1).to(x.dtype)


def classifier_loss(classifier, sde, x, y, eps=1e-5, t=None, z=None):
    """App. I.1: cross-entropy of the classifier on x(t) ~ p_0t(x(t) | x(0)), t ~ U[eps, 1] (noisy training data).
    t and z (the noise) may be given, as in loss; else drawn from the global RNG."""
    t = sample_t(len(x), eps, "iid", x.device) if t is None else t
    z = torch.randn_like(x) if z is None else z
    mean, std = sde.marginal_prob(x, t)
    x_t = (mean + bc(std, x) * z).float()
    return torch.nn.functional.cross_entropy(classifier(x_t, net_time(sde, t).float()), y)


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
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def restore_rng(state, data_gen, rank):
    """Undo rng_checkpoint on this rank (a rank beyond the saved ones takes rank 0's streams)."""
    data_gen.set_state(state["data"])
    set_rng_state(state["ranks"][rank if rank < len(state["ranks"]) else 0])


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


def make_parser(config, modes, choices, presets):
    """One switch per mode (modes: name -> help; the run picks exactly one), --preset, and a flag per Config field.
    Switch fields (bool) take --name / --no-name; every field's default here is None, so that parse_config can tell
    what the command line gave."""
    p = OneLineParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("what to do (pick one)")
    for name, text in modes.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    if presets:
        p.add_argument("--preset", choices=sorted(presets), help="the papers' settings; flags given override them")
    helps, settings = config_help(config), p.add_argument_group("settings (the Config)")
    for f in dataclasses.fields(config):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps.get(f.name, '')} (default {f.default})"
        if isinstance(f.default, bool):
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            settings.add_argument(flag, type=type(f.default), default=None, choices=choices.get(f.name), help=text)
    return p


def parse_config(p, argv, config, modes, presets):
    """-> (args, mode, cfg, given): the one mode chosen; cfg = Config(defaults <- preset <- the flags given);
    given = the Config fields the command line set."""
    args = p.parse_args(argv)
    chosen = [m for m in modes if getattr(args, m)]
    if len(chosen) != 1:
        raise ValueError("choose exactly one of " + ", ".join("--" + m.replace("_", "-") for m in modes))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if getattr(args, f.name) is not None}
    return args, chosen[0], config(**{**presets.get(getattr(args, "preset", None), {}), **given}), given


def check_common(cfg, positive):
    """The checks every script makes (ValueError naming the flag): the fields in positive > 0 and finite,
    0 <= ema_decay < 1, image_size 0 (native) or 4..1024, the device present, the output folder writable."""
    for name in positive:
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
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

def make_model(cfg, data_shape):
    """common.MLP for 2-D toys, else common.UNet with the preset; data_shape = one sample's shape."""
    if cfg.dataset in TOYS:
        return MLP(dim=data_shape[0])
    return UNet(in_ch=data_shape[0], image_size=data_shape[-1], **PRESETS[cfg.model])


def save_samples(x, path, cfg, data=None):
    """A grid PNG of images, or a scatter PNG over the data for 2-D toys."""
    if cfg.dataset in TOYS:
        save_scatter(x, path, data)
    else:
        save_grid(x, path)


MUST_MATCH = ("dataset", "image_size", "model", "sde", "beta_min", "beta_max", "sigma_min", "sigma_max")


def finite_or_die(what, loss_sum, net, first, last, path):
    """The finiteness check of the training loops, at log / checkpoint / sample steps only (one host sync for
    the window of steps first..last): the loss accumulated on the device and the weights must be finite, else
    DataError naming the window, so that a NaN never reaches a checkpoint."""
    norms = torch.stack(torch._foreach_norm([p.detach() for p in net.parameters()]))
    ok = torch.stack([torch.isfinite(loss_sum), torch.isfinite(norms).all()]).tolist()
    steps = f"at step {first}" if first == last else f"in steps {first}-{last}"
    if not ok[0]:
        raise DataError(f"non-finite {what}loss {steps}; last good checkpoint kept in {path}")
    if not ok[1]:
        raise DataError(f"non-finite {what}weights {steps}; last good checkpoint kept in {path}")


def train(cfg, resume=False):
    """Training by Eq. 7 (Adam, warm-up, clipping, EMA: App. H). Under torchrun each rank computes the loss on its
    slice of the global batch (see setup_distributed); rank 0 alone prints and writes."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)  # the global batch and this rank's slice
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    torch.manual_seed(cfg.seed)  # the initial weights: alike on every rank
    # The data generator, alike on every rank, draws all of the global batch's randomness (indices, flips, t, noise).
    data_gen = make_generator(cfg.seed, device)
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None)
    if cfg.sde == "ve" and cfg.sigma_max == 0:
        cfg = dataclasses.replace(cfg, sigma_max=sigma_max_technique1(data.x))  # NCSNv2 Technique 1
        log(f"sigma_max = {cfg.sigma_max:.3f} (largest pairwise distance in the training data)")
    data_shape = list(data.x.shape[1:])
    sde = make_sde(cfg.sde, cfg.beta_min, cfg.beta_max, cfg.sigma_min, cfg.sigma_max, cfg.n_steps)
    model = make_model(cfg, data_shape).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # EMA of parameters only (the nets have no buffers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    torch.manual_seed(cfg.seed + rank)  # from here the global RNGs draw dropout only, one stream per rank
    score_fn = make_score_fn(network(model, autocast, cfg.compile), sde)
    ema_score_fn = make_score_fn(network(ema, autocast, cfg.compile), sde)   # for the sample grids
    os.makedirs(cfg.out, exist_ok=True)
    path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if resume:  # every rank reads the same checkpoint
        ckpt = load_checkpoint(path)
        old = ckpt["config"]
        if cfg.sde == "ve" and old.get("sde") == "ve":
            cfg = dataclasses.replace(cfg, sigma_max=old["sigma_max"])  # Technique 1 was run once, at the start
        for k in MUST_MATCH + ("data_shape",):
            mine = data_shape if k == "data_shape" else getattr(cfg, k)
            if old.get(k) != mine:
                raise DataError(f"{path}: checkpoint has {k}={old.get(k)!r}, this run has {mine!r}; "
                                f"use another --out or the same settings")
        if not isinstance(ckpt.get("rng"), dict) or "data" not in ckpt["rng"]:
            raise DataError(f"{path}: written before the data generator (issue 16): it samples, but cannot resume")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank)  # the data generator, and this rank's CPU and CUDA/MPS streams
        log(f"resumed from {path} at step {step}")
    fixed = make_generator(cfg.seed + 1, device)  # fixed noise for the progress grids
    grid_shape = (min(cfg.n_samples, 64) if cfg.dataset not in TOYS else 2000, *data_shape)
    x_data = data.x.to(device)

    def checkpoint():
        rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
        if rank == 0:
            save_checkpoint(path, {"script": SCRIPT, "config": {**dataclasses.asdict(cfg), "data_shape": data_shape},
                                   "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": rng})

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop, t0, step0, stopping = StopFlag(), time.time(), step, False
    # No host sync per step: the loss is summed on the device and read, with the finiteness check, only at
    # log / checkpoint / sample steps (finite_or_die names the window since the last check). The check reads the
    # mean over the ranks (and the weights, alike on every rank), so every rank takes the same decision.
    loss_sum, n_sum, checked = torch.zeros((), device=device), 0, step
    model.train()
    try:
        while step < cfg.steps and not stopping:
            # The global batch's randomness from data_gen, in this order on every rank: i.i.d. example indices
            # (exact resume), flips, t, noise; this rank keeps its slice of each.
            idx = torch.randint(len(x_data), (B,), device=device, generator=data_gen)
            if data.flip:
                flip = torch.rand(B, 1, 1, 1, device=device, generator=data_gen) < 0.5
            t = sample_t(B, cfg.train_eps, cfg.t_sampling, device, data_gen)  # (B,)
            z = torch.randn((B, *data_shape), device=device, generator=data_gen)  # (B, ...)
            x0 = x_data[idx[part]]
            if data.flip:
                x0 = torch.where(flip[part], x0.flip(-1), x0)
            L = loss(score_fn, sde, x0, cfg.likelihood_weighting, cfg.train_eps, t=t[part], z=z[part])
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)  # linear warm-up (App. H)
            opt.zero_grad(set_to_none=True)
            L.backward()
            average_gradients(model, world)  # the gradient of the global batch's mean loss, on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema_update(ema, model, cfg.ema_decay)
            loss_sum, n_sum, step = loss_sum + L.detach(), n_sum + 1, step + 1
            stopping = any_rank(stop.set, world, device)  # Ctrl-C / SIGTERM on any rank stops all at this step
            is_log = step % cfg.log_every == 0 or step == cfg.steps
            save = step % cfg.ckpt_every == 0 or step == cfg.steps or stopping
            grid = step % cfg.sample_every == 0 or step == cfg.steps
            if is_log or save or grid:
                loss_sum = mean_over_ranks(loss_sum, world)  # the global batch's loss, alike on every rank
                finite_or_die("", loss_sum, model, checked + 1, step, path)
                checked = step
            if is_log:
                rate = (step - step0) / (time.time() - t0)
                log(f"step {step}/{cfg.steps}  loss {float(loss_sum) / n_sum:.4f}  {rate:.2f} it/s  "
                    f"ETA {(cfg.steps - step) / rate / 60:.1f} min", flush=True)
                loss_sum, n_sum = torch.zeros((), device=device), 0
            if save:
                checkpoint()
            if grid and rank == 0:
                ema.eval()
                x, _ = sample(ema_score_fn, sde, cfg, grid_shape, fixed.manual_seed(cfg.seed + 1), device)
                save_samples(x, os.path.join(cfg.out, f"train_{step:06d}.png"), cfg, data.x)
        if stopping:
            if rank == 0:  # one write: the lines of several processes never interleave
                sys.stderr.write(f"stopped at step {step}; checkpoint saved to {path}; continue with --resume\n")
            sys.exit(130)
        log(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {path}")
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def run_sample(cfg):
    """--sample: rebuild the network and SDE from the checkpoint's config (its --sde, --dataset, ... win over
    the command line's), sample with the EMA weights using this command line's sampler flags.

    Chunks of --batch-size samples, chunk k on rank k % world (torchrun), each from its own generator derived from
    --seed and its first sample's index: the samples depend on --seed and --batch-size only, not on the ranks
    (the Langevin corrector's step and RK45's step sizes are shared by a chunk, so the chunk size matters)."""
    saved, data_shape, score_fn, sde, device, rank, world = load_score_model(cfg)
    t0, chunks, nfes = time.time(), [], []
    for start, n in my_chunks(cfg.n_samples, cfg.batch_size, rank, world):
        x, nfe = sample(score_fn, sde, cfg, (n, *data_shape), chunk_generator(cfg.seed, start, device), device)
        chunks.append((start, x.cpu()))
        nfes.append(nfe)
    x = gather_chunks(chunks, world)  # (n_samples, ...) in sample order, on every rank
    nfe = max(sum(gather_objects(nfes, world), []))
    if not torch.isfinite(x).all():  # the same gathered x, so the same decision, on every rank
        raise DataError(f"sampling produced non-finite values (try smaller --snr or more --n-steps)")
    if rank > 0:
        return
    os.makedirs(cfg.out, exist_ok=True)
    png = os.path.join(cfg.out, "samples.png")
    save_samples(x, png, saved, load_data(saved.dataset, train=False).x if saved.dataset in TOYS else None)
    if saved.dataset in TOYS:  # 2-D points are not images: keep them as float32 (N, 2)
        np.savez(os.path.join(cfg.out, "samples.npz"), arr_0=x.float().numpy())
    else:
        save_npz(x, os.path.join(cfg.out, "samples.npz"))
    chunked = f" per chunk of {cfg.batch_size}" if cfg.n_samples > cfg.batch_size else ""
    print(f"{cfg.n_samples} samples ({saved.sde} SDE, {cfg.sampler} sampler, {nfe} score evaluations{chunked}, "
          f"{time.time() - t0:.1f} s" + (f", {world} processes" if world > 1 else "")
          + f") -> {png}, {os.path.join(cfg.out, 'samples.npz')}")


def train_classifier(cfg, resume=False):
    """--train-classifier: fit TimeClassifier on noisy labelled training data (App. I.1) for the SDE of the
    score checkpoint (--ckpt, so the two share the schedule), or of --sde when there is none; writes
    <out>/classifier.pt (EMA weights used for guidance) every --ckpt-every steps, at the end, and on Ctrl-C /
    SIGTERM; --resume continues it. Under torchrun the global batch is split as in train."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)  # the global batch and this rank's slice
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    torch.manual_seed(cfg.seed)  # the initial weights: alike on every rank
    data_gen = make_generator(cfg.seed, device)  # alike on every rank: the global batch's indices, t, noise
    spath = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if os.path.isfile(spath):                       # the score model's SDE, sigma_max and dataset win
        old = load_checkpoint(spath)["config"]
        cfg = dataclasses.replace(cfg, **{k: old[k] for k in MUST_MATCH if k in old})
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None)
    if data.y is None or data.x.dim() != 4:
        raise DataError(f"--train-classifier needs labelled image data; {cfg.dataset} has none")
    if cfg.sde == "ve" and cfg.sigma_max == 0:
        cfg = dataclasses.replace(cfg, sigma_max=sigma_max_technique1(data.x))
    sde = make_sde(cfg.sde, cfg.beta_min, cfg.beta_max, cfg.sigma_min, cfg.sigma_max, cfg.n_steps)
    K = int(data.y.max()) + 1
    net = TimeClassifier(data.x.shape[1], K).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr * 5)   # a classifier tolerates a larger step than the score net
    torch.manual_seed(cfg.seed + rank)  # from here the global RNGs are per rank (the classifier has no dropout)
    net_fn, ema_fn = network(net, autocast, cfg.compile), network(ema, autocast, cfg.compile)
    path, step = cfg.classifier_ckpt or os.path.join(cfg.out, "classifier.pt"), 0
    config = {**dataclasses.asdict(cfg), "data_shape": list(data.x.shape[1:]), "n_classes": K}
    if resume:  # every rank reads the same checkpoint
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "classifier" or not isinstance(ckpt.get("rng"), dict) or "data" not in ckpt["rng"]:
            raise DataError(f"{path}: not a classifier checkpoint written with its data generator: cannot resume")
        for k in MUST_MATCH + ("data_shape", "n_classes"):
            if ckpt["config"].get(k) != config[k]:
                raise DataError(f"{path}: classifier has {k}={ckpt['config'].get(k)!r}, this run {config[k]!r}")
        net.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank)
        log(f"resumed from {path} at step {step}")
    x_data, y_data = data.x.to(device), data.y.to(device)

    def checkpoint():
        rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
        if rank == 0:
            save_checkpoint(path, {"script": SCRIPT, "kind": "classifier", "config": config, "step": step,
                                   "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                   "rng": rng})

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop, stopping, step0 = StopFlag(), False, step
    t0, loss_sum, n_sum, checked = time.time(), torch.zeros((), device=device), 0, step
    try:
        while step < cfg.classifier_steps and not stopping:
            # The global batch's indices, t and noise from data_gen on every rank; this rank keeps its slice.
            idx = torch.randint(len(x_data), (B,), device=device, generator=data_gen)
            t = sample_t(B, cfg.train_eps, "iid", device, data_gen)
            z = torch.randn((B, *x_data.shape[1:]), device=device, generator=data_gen)
            L = classifier_loss(net_fn, sde, x_data[idx[part]], y_data[idx[part]], cfg.train_eps, t=t[part],
                                z=z[part])
            opt.zero_grad(set_to_none=True)
            L.backward()
            average_gradients(net, world)  # the gradient of the global batch's mean cross-entropy, on every rank
            opt.step()
            ema_update(ema, net, cfg.ema_decay)
            loss_sum, n_sum, step = loss_sum + L.detach(), n_sum + 1, step + 1  # read at log steps only
            stopping = any_rank(stop.set, world, device)  # Ctrl-C / SIGTERM on any rank stops all at this step
            is_log = step % cfg.log_every == 0 or step == cfg.classifier_steps
            save = step % cfg.ckpt_every == 0 or step == cfg.classifier_steps or stopping
            if is_log or save:
                loss_sum = mean_over_ranks(loss_sum, world)  # alike on every rank: the same decision everywhere
                finite_or_die("classifier ", loss_sum, net, checked + 1, step, path)
                checked = step
            if is_log:
                log(f"classifier step {step}/{cfg.classifier_steps}  cross-entropy {float(loss_sum) / n_sum:.4f}  "
                    f"{(step - step0) / (time.time() - t0):.2f} it/s", flush=True)
                loss_sum, n_sum = torch.zeros((), device=device), 0
            if save:
                checkpoint()
        if stopping:
            if rank == 0:  # one write: the lines of several processes never interleave
                sys.stderr.write(f"stopped at step {step}; classifier saved to {path}; continue with --resume\n")
            sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    if rank > 0:
        return
    # Held-out accuracy at three noise levels, so a person can see what the guidance has to work with.
    test = load_data(cfg.dataset, train=False, image_size=cfg.image_size or None)
    tx, ty = test.x.to(device), test.y.to(device)
    with torch.no_grad():
        for t in (0.1, 0.5, 0.9):
            tt = torch.full((len(tx),), t, device=device)
            mean, std = sde.marginal_prob(tx, tt)
            xt = (mean + bc(std, tx) * torch.randn_like(tx)).float()
            acc = float((ema_fn(xt, net_time(sde, tt).float()).argmax(1) == ty).float().mean())
            print(f"held-out accuracy at t = {t}: {acc:.3f}")
    print(f"classifier -> {path}")


def load_score_model(cfg):
    """The EMA score network and SDE of --ckpt (default <out>/ckpt.pt), on --device with this command line's
    --precision / --compile: (saved config, data_shape, score_fn, sde, device, rank, world); under torchrun
    every rank loads it (rank and world from setup_distributed)."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    path = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    try:
        if ckpt.get("kind") == "classifier":
            raise KeyError("kind")
        saved = Config(**{k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__})
        data_shape = ckpt["config"]["data_shape"]
        model = make_model(saved, data_shape)
        model.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{path}: checkpoint does not match this script's network ({type(e).__name__})") from None
    model.to(device).eval()
    sde = make_sde(saved.sde, saved.beta_min, saved.beta_max, saved.sigma_min, saved.sigma_max, cfg.n_steps)
    return saved, data_shape, make_score_fn(network(model, autocast, cfg.compile), sde), sde, device, rank, world


def held_out(saved, cfg, what, device):
    """The first --n-eval held-out images of the checkpoint's dataset on device, float64 (float32 on MPS);
    image modes refuse 2-D toys."""
    if saved.dataset in TOYS and what != "--eval-nll":
        raise ValueError(f"{what} needs image data; the checkpoint was trained on the 2-D toy {saved.dataset}")
    data = load_data(saved.dataset, train=False, image_size=saved.image_size or None)
    return data, wide(data.x[:cfg.n_eval].to(device))


def run_eval_nll(cfg):
    """--eval-nll: bits/dim (App. D.2) of --n-eval held-out points with --estimator, mean +- standard error.

    Chunks of --batch-size points, chunk k on rank k % world (torchrun); each chunk's dequantisation noise and
    Hutchinson probes come from chunk_generator(--seed, start), so the per-point values, gathered on rank 0, do
    not depend on the number of processes."""
    saved, _, score_fn, sde, device, rank, world = load_score_model(cfg)
    data, x = held_out(saved, cfg, "--eval-nll", device)
    t0, chunks, nfes = time.time(), [], []
    for start, n in my_chunks(len(x), cfg.batch_size, rank, world):
        bpd, nfe = likelihood(score_fn, sde, x[start:start + n], cfg.estimator, dequantize=data.levels is not None,
                              levels=data.levels, rtol=cfg.rtol, atol=cfg.atol,
                              generator=chunk_generator(cfg.seed, start, device))
        chunks.append((start, bpd.cpu()))
        nfes.append(nfe)
    bpd = gather_chunks(chunks, world)  # (n_eval,) in held-out order, on every rank
    nfe = max(sum(gather_objects(nfes, world), []))
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    if rank > 0:
        return float(bpd.mean()), se, nfe
    unit = "bits/dim (dequantised, %d levels)" % data.levels if data.levels else "bits/dim (continuous)"
    chunked = f" per chunk of {cfg.batch_size}" if len(x) > cfg.batch_size else ""
    print(f"{float(bpd.mean()):.4f} +- {se:.4f} {unit} on {len(x)} held-out points ({saved.sde} SDE, "
          f"{cfg.estimator} trace, NFE {nfe}{chunked}, {time.time() - t0:.1f} s"
          + (f", {world} processes" if world > 1 else "") + ")")
    os.makedirs(cfg.out, exist_ok=True)
    if saved.dataset not in TOYS:  # held-out images from most to least likely under the model
        png = os.path.join(cfg.out, "nll_sorted.png")
        save_grid(x[bpd.argsort().to(x.device)].float(), png)
        print(f"images sorted by bits/dim (lowest first) -> {png}")
    return float(bpd.mean()), se, nfe


def slerp(z0, z1, lam):
    """Spherical interpolation of Gaussian codes (keeps the norm typical of N(0, I))."""
    a, b = z0.flatten(), z1.flatten()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    return (torch.sin((1 - lam) * omega) * z0 + torch.sin(lam * omega) * z1) / torch.sin(omega)


def run_encode(cfg, interpolate=False):
    """--encode: rows of held-out images | their codes z = x(1) | decode(z) (Sec. 4.3).
    --interpolate: 8 rows, each decoding slerp(z_a, z_b, lambda) for 9 lambdas between two encoded images.
    Under torchrun rank 0 does it all (at most 16 held-out images); the other ranks return."""
    saved, _, score_fn, sde, device, rank, world = load_score_model(cfg)
    _, x = held_out(saved, cfg, "--interpolate" if interpolate else "--encode", device)
    if rank > 0:  # after the checks above, so that every rank reports a bad input alike
        return
    x = x[:16 if interpolate else 8]
    eps = cfg.sample_eps or 1e-5
    z = encode(score_fn, sde, x, eps, cfg.rtol, cfg.atol)
    os.makedirs(cfg.out, exist_ok=True)
    if interpolate:
        lams = torch.linspace(0, 1, 9, dtype=z.dtype, device=z.device)
        zs = torch.cat([torch.stack([slerp(z[2 * i], z[2 * i + 1], l) for l in lams]) for i in range(len(z) // 2)])
        out, png = decode(score_fn, sde, zs, eps, cfg.rtol, cfg.atol), os.path.join(cfg.out, "interpolate.png")
        save_grid(out.float(), png, nrow=9)
        print(f"{len(z) // 2} interpolations (9 steps, ends = decoded codes of two held-out images) -> {png}")
        return
    rec = decode(score_fn, sde, z, eps, cfg.rtol, cfg.atol)
    png = os.path.join(cfg.out, "encode.png")
    save_grid(torch.cat([x, (z / 3).clamp(-1, 1), rec]).float(), png, nrow=len(x))
    print(f"rows: held-out | code / 3 | decoded; max |decode(encode(x)) - x| = {float((rec - x).abs().max()):.4f}, "
          f"code std {float(z.std()):.3f} (N(0, I) would be 1) -> {png}")


def run_inpaint(cfg, colour=False):
    """--inpaint: rows originals | masked (bottom half removed) | completed (App. I.2).
    --colorize: rows originals | grey | colourised (App. I.3); grey data -> a one-line explanation.
    Under torchrun rank 0 does it all (at most 16 held-out images); the other ranks return."""
    saved, data_shape, score_fn, sde, device, rank, world = load_score_model(cfg)
    if colour and data_shape[0] != 3:
        raise ValueError(f"--colorize needs RGB data; {saved.dataset} has {data_shape[0]} channel(s), so there is "
                         f"no colour to restore (App. I.3 works on 3-channel images)")
    _, x = held_out(saved, cfg, "--colorize" if colour else "--inpaint", device)
    if rank > 0:  # after the checks above, so that every rank reports a bad input alike
        return
    x = x[:16]
    gen = make_generator(cfg.seed, device)
    kw = dict(predictor=cfg.predictor, corrector=cfg.corrector, snr=cfg.snr, n_corrector_steps=cfg.n_corrector_steps,
              eps=cfg.sample_eps or None, n_steps=cfg.n_steps, generator=gen)
    if colour:
        shown = x.mean(1, keepdim=True).expand_as(x)
        out, png = colorize(score_fn, sde, shown, **kw), os.path.join(cfg.out, "colorize.png")
    else:
        mask = torch.ones(x.shape[1:], dtype=x.dtype, device=x.device)
        mask[..., x.shape[-2] // 2:, :] = 0                              # bottom half unknown
        shown = x * mask - (1 - mask)                                    # masked part drawn black
        out, png = inpaint(score_fn, sde, x, mask, **kw), os.path.join(cfg.out, "inpaint.png")
    os.makedirs(cfg.out, exist_ok=True)
    save_grid(torch.cat([x, shown, out]).float(), png, nrow=len(x))
    print(f"rows: held-out | {'grey' if colour else 'bottom half removed'} | "
          f"{'colourised' if colour else 'completed'} -> {png}")


def run_class(cfg, label):
    """--sample --class K: class-conditional PC samples (Sec. 5) with the time-dependent classifier of
    --classifier-ckpt; --class all: one row per class. Split over the ranks like --sample: chunks of --batch-size
    samples (labels in order), each from chunk_generator(--seed, start)."""
    saved, data_shape, score_fn, sde, device, rank, world = load_score_model(cfg)
    path = cfg.classifier_ckpt or os.path.join(cfg.out, "classifier.pt")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "classifier":
        raise DataError(f"{path}: not a classifier checkpoint (train one with --train-classifier)")
    cc = ckpt["config"]
    for k in ("sde", "beta_min", "beta_max", "sigma_min", "sigma_max", "dataset"):
        if cc.get(k) != getattr(saved, k):
            raise DataError(f"{path}: classifier has {k}={cc.get(k)!r}, the score model {getattr(saved, k)!r}")
    K = cc["n_classes"]
    if label == "all":
        n = max(1, cfg.n_samples // K)
        y = torch.arange(K, device=device).repeat_interleave(n)
    else:
        try:
            k = int(label)
        except ValueError:
            raise ValueError(f"--class must be an integer in [0, {K - 1}] or 'all' (got {label!r})") from None
        if not 0 <= k < K:
            raise ValueError(f"--class {k} is out of range: the classifier knows classes 0..{K - 1}")
        n, y = cfg.n_samples, torch.full((cfg.n_samples,), k, device=device)
    clf = TimeClassifier(data_shape[0], K)
    clf.load_state_dict(ckpt["ema"])
    clf.to(device).eval()
    clf = network(clf, setup_precision(device, cfg.precision, cfg.deterministic), cfg.compile)
    pred, corr = (cfg.predictor, cfg.corrector) if cfg.sampler == "pc" else SAMPLERS.get(cfg.sampler) or ("x", "x")
    if pred == "x":
        raise ValueError("--class needs an SDE sampler (pc, em, reverse, ancestral), not the ODE")
    chunks = []
    for start, m in my_chunks(len(y), cfg.batch_size, rank, world):
        chunks.append((start, class_sample(
            score_fn, make_log_prob_fn(clf, sde), sde, (m, *data_shape), y[start:start + m], cfg.classifier_scale,
            predictor=pred, corrector=corr, snr=cfg.snr, n_corrector_steps=cfg.n_corrector_steps,
            eps=cfg.sample_eps or None, generator=chunk_generator(cfg.seed, start, device), n_steps=cfg.n_steps,
            device=device).cpu()))
    x = gather_chunks(chunks, world).to(device)  # (len(y), ...) in label order, on every rank
    if rank > 0:
        return
    os.makedirs(cfg.out, exist_ok=True)
    png = os.path.join(cfg.out, f"class_{label}.png")
    save_grid(x.float(), png, nrow=n if label == "all" else None)
    with torch.no_grad():
        t_eps = torch.full((len(x),), sde.sample_eps, dtype=x.dtype, device=x.device)
        acc = float((make_log_prob_fn(clf, sde)(x, t_eps).argmax(1) == y).float().mean())
    print(f"{len(y)} samples of class {label} (scale {cfg.classifier_scale}); the classifier at t = eps agrees "
          f"on {acc:.0%} -> {png}")


# -----------------------------------------------------------------------------
# CLI

CHOICES = {"sde": ("vp", "subvp", "ve"), "precision": ("auto", "fp32", "tf32", "bf16"),
           "estimator": ("rademacher", "gaussian", "exact"),
           "t_sampling": ("iid", "low_discrepancy"), "sampler": tuple(SAMPLERS), "predictor": tuple(PREDICTORS),
           "corrector": tuple(CORRECTORS), "model": tuple(PRESETS)}


MODES = {"train": "train a score model (Eq. 7)",
         "sample": "sample from --ckpt (default <out>/ckpt.pt); with --class K: class-conditional (App. I.1)",
         "train_classifier": "train a time-dependent classifier p_t(y | x) on noisy data -> <out>/classifier.pt",
         "eval_nll": "bits/dim of held-out data under --ckpt (Sec. 4.3, App. D.2)",
         "encode": "encode / decode held-out images (Sec. 4.3) -> encode.png",
         "interpolate": "slerp between codes of held-out images -> interpolate.png",
         "inpaint": "fill in the bottom half of held-out images (App. I.2)",
         "colorize": "colourise grey versions of RGB images (App. I.3)"}


def validate(cfg, args):
    """Flags that parse but make no sense -> ValueError (one line, exit 2)."""
    if args.klass and not args.sample:
        raise ValueError("--class goes with --sample (and --classifier-ckpt)")
    check_common(cfg, ("n_eval", "classifier_steps", "steps", "batch_size", "lr", "warmup", "grad_clip", "ckpt_every",
                       "sample_every", "log_every", "beta_min", "sigma_min", "snr", "n_steps", "rtol", "atol",
                       "n_samples"))
    if cfg.classifier_scale < 0:
        raise ValueError(f"--classifier-scale must be >= 0 (got {cfg.classifier_scale})")
    if cfg.beta_max <= cfg.beta_min:
        raise ValueError(f"--beta-max must exceed --beta-min (got {cfg.beta_max} <= {cfg.beta_min})")
    if cfg.sigma_max != 0 and cfg.sigma_max <= cfg.sigma_min:
        raise ValueError(f"--sigma-max must exceed --sigma-min, or be 0 for Technique 1 (got {cfg.sigma_max})")
    if cfg.n_corrector_steps < 0:
        raise ValueError(f"--n-corrector-steps must be >= 0 (got {cfg.n_corrector_steps})")
    if not 0 < cfg.train_eps < 1:
        raise ValueError(f"--train-eps must be in (0, 1) (got {cfg.train_eps})")
    if not (cfg.sample_eps == 0 or 0 < cfg.sample_eps < 1):
        raise ValueError(f"--sample-eps must be in (0, 1), or 0 for the paper's default (got {cfg.sample_eps})")
    if args.train and cfg.sde != "ve" and (cfg.n_steps < 2 or cfg.beta_max / (cfg.n_steps - 1) >= 1):
        raise ValueError(f"the VP chain needs beta(t) dt < 1: use --n-steps > beta_max + 1 = {cfg.beta_max + 1:g}")
    if cfg.sampler == "pc" and cfg.predictor == "none" and cfg.corrector == "none":
        raise ValueError("--predictor none with --corrector none would return the prior noise")


def main(argv=None):
    p = make_parser(Config, MODES, CHOICES, {})
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/ckpt.pt to --steps (with --train-classifier: classifier.pt)")
    p.add_argument("--class", dest="klass", default="", help="with --sample: class K, or 'all' (one row per class)")
    with one_line_errors():
        args, mode, cfg, _ = parse_config(p, argv, Config, MODES, {})
        validate(cfg, args)
        if mode == "train":
            train(cfg, resume=args.resume)
        elif mode == "train_classifier":
            train_classifier(cfg, resume=args.resume)
        elif mode == "eval_nll":
            run_eval_nll(cfg)
        elif mode in ("encode", "interpolate"):
            run_encode(cfg, interpolate=mode == "interpolate")
        elif mode in ("inpaint", "colorize"):
            run_inpaint(cfg, colour=mode == "colorize")
        elif args.klass:
            run_class(cfg, args.klass)
        else:
            run_sample(cfg)


if __name__ == "__main__":
    main()
