"""
Score-based generative modeling through stochastic differential equations (score SDEs).

Paper: Yang Song, Jascha Sohl-Dickstein, Diederik P. Kingma, Abhishek Kumar, Stefano Ermon, Ben Poole (2021),
"Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021, arXiv 2011.13456.
Equation, algorithm and appendix numbers below are those printed in the arXiv version.

Commands (outputs under runs/score_sde)
    python score_sde.py --train                     # VP SDE on the embedded 8x8 digits (~4-5 min, idle 2-core CPU)
    python score_sde.py --train --sde subvp         # or ve (sigma_max from the data, NCSNv2 Technique 1)
    python score_sde.py --sample --sampler pc       # predictor-corrector (reverse diffusion + Langevin)
    python score_sde.py --sample --sampler ode      # probability-flow ODE, adaptive RK45; also em, reverse, ancestral
    python score_sde.py --sample --predictor euler_maruyama --corrector ald --snr 0.1 --n-steps 200
    python score_sde.py --train --resume            # continue an interrupted run exactly
    python score_sde.py --train --dataset moons     # 2-D toy (MLP instead of the U-Net)
    python score_sde.py --eval-nll --estimator rademacher   # bits/dim of held-out digits (also gaussian, exact)
    python score_sde.py --encode                    # held-out | code | decode(code) -> encode.png (also --interpolate)
    python score_sde.py --inpaint                   # bottom half removed, then completed (--colorize: RGB data only)
    python score_sde.py --train-classifier          # time-dependent classifier p_t(y | x) -> classifier.pt
    python score_sde.py --sample --class 3          # class-conditional samples (--class all: a row per class)
    python score_sde.py --train --t-sampling low_discrepancy   # one training t per stratum of the batch
    python score_sde.py --train --device cuda --precision bf16 --compile   # GPU: bf16 autocast, torch.compile
    torchrun --nproc_per_node=8 score_sde.py --train --device cuda       # 8 GPUs; --batch-size stays the global batch
Under torchrun a training run equals the 1-process run with the same global batch, up to float reduction order and
per-rank dropout; --sample (also --class) and --eval-nll give the same numbers for any number of processes;
--encode / --interpolate / --inpaint / --colorize run on rank 0 alone. Multi-node is untested.

Map (paper -> code)
    Eq. 5   forward SDE  dx = f(x, t) dt + g(t) dw          -> VESDE / VPSDE / subVPSDE .sde()
    Eq. 6   reverse SDE  dx = [f - g^2 grad log p_t] dt + g dw_bar   -> SDE.reverse_sde
    Eq. 7   continuous-time denoising score matching         -> loss   (likelihood weighting: Song et al. 2021b)
    Eq. 8   SMLD (NCSN) Markov chain -> Eq. 9 VE SDE          -> VESDE (.discretize is Eq. 8)
    Eq. 10  DDPM Markov chain -> Eq. 11 VP SDE                -> VPSDE (.discretize is Eq. 10)
    Eq. 12  sub-VP SDE                                        -> subVPSDE
    Eq. 13  probability-flow ODE  dx = [f - g^2/2 grad log p_t] dt   -> SDE.probability_flow, ode_sample
    Eq. 4   DDPM ancestral step in score form                 -> ancestral_sampling (VP)
    App. B  perturbation kernels p_0t(x(t) | x(0))            -> .marginal_prob, perturb, .prior_sampling, .prior_logp
    App. C  sigma_min / sigma_max / epsilon choices           -> Config, sigma_max_technique1
    App. D  probability-flow sampling with RK45 (rtol=atol=1e-5)  -> rk45, ode_sample
    App. E  reverse diffusion samplers                        -> reverse_diffusion, euler_maruyama
    App. F  ancestral sampling for SMLD (VE) models           -> ancestral_sampling (VE)
    App. G  Alg. 1 PC sampling; Alg. 2 / 3 PC for VE / VP; Alg. 4 / 5 correctors   -> pc_sample, langevin, ald
    Sec. 4.3, App. D.2  exact likelihood by the instantaneous change of variables, latent codes
                                                              -> likelihood (+ divergence), encode, decode
    Sec. 5, App. I.2  inpainting (known part replaced by its forward-noised copy) -> impose_known, inpaint
    App. I.3  colourisation in the orthogonal colour basis    -> COLOR_M, decouple, couple, colorize
    Sec. 5, App. I.1  conditional score grad log p_t(x) + grad log p_t(y | x), time-dependent classifier
                                          -> guided_score, class_sample, TimeClassifier, classifier_loss

Symbols (paper -> code)
    t in [eps, 1]  continuous time             t            (B,) float tensor
    f(x, t), g(t)  drift and diffusion         drift, g
    beta(t)        VP/sub-VP noise rate        sde.beta(t) = beta_min + t (beta_max - beta_min)
    sigma(t)       VE noise level              sde.sigma(t) = sigma_min (sigma_max / sigma_min)^t
    s_theta(x, t)  score network               score_fn(x, t)
    z              standard normal noise       z
    r              signal-to-noise ratio       snr          (Alg. 4 / 5)
    eps_i          Langevin step size          step         (Alg. 4 / 5)
    N, M           predictor / corrector steps n_steps, n_corrector_steps

Conventions (the same in all four scripts of this project) and notation clashes
  * Data range: models see x in [-1, 1] (common.py). The paper's VE values (sigma_min 0.01, sigma_max 50 on
    CIFAR-10) are for data in [0, 1] (App. C); in [-1, 1] all distances double, so our sigma_min default is
    0.02, and sigma_max is recomputed on the data as loaded (NCSNv2 Technique 1: the largest pairwise distance).
    The paper's VP/sub-VP models already use centred [-1, 1] data (official configs: data.centered=True),
    so beta_min = 0.1, beta_max = 20 carry over unchanged.
  * Two "eps": the paper's epsilon is the smallest time (1e-5 in training, 1e-3 (VP, sub-VP) or 1e-5 (VE) when
    sampling); the noise predicted by a DDPM-style network is eps_hat. "alpha" is the corrector's 1 - beta_i
    (Alg. 5), not DDPM's alpha_bar.
  * The network (common.UNet, or common.MLP for 2-D toys) gets time_input(t): 999 t for VP / sub-VP, as the
    official code, and for VE 999 log(sigma / sigma_min) / log(sigma_max / sigma_min), derived from sigma (for the
    geometric VE schedule this number equals 999 t). The score is read from it as in the official code
    (models/utils.py get_score_fn): VP / sub-VP predict the noise, s = -eps_hat / std_t; VE networks output
    sigma * score (NCSN++ scale_by_sigma), s = net / sigma_t.
  * Time grid (as the official code's linspace(1, eps, N)): a sampler with N steps visits the N levels
    t_N = 1 > ... > t_1 = eps, t_k = eps + (1 - eps) (k - 1) / (N - 1), and its last predictor step goes on to the
    data, t_0 = 0; built once as (t, t_next) pairs. Each predictor step goes from t to t_next (the chain index
    i = k), and the discrete chains use beta_i = beta(t) dt (VP, Eq. 10, dt = t - t_next) and sigma_i = sigma(t_i)
    with sigma_0 = 0 (VE, Eq. 8).
  * Langevin step: the paper's Alg. 4/5 form x + e s + sqrt(2 e) z; NCSN's x + (a/2) s + sqrt(a) z is the same
    with a = 2 e.
  * Devices and precision: every mode runs on --device (the rule is stated in the "Running it" block below).
    Schedules, sampler, ODE and likelihood arithmetic run on the model's device in float64 (wide(); float32 on MPS,
    which has no float64; the official code integrates in float64 with scipy). The network runs under --precision
    and returns float32. Fixed-step samplers make no host sync per step; RK45 reads its error norm once per step.
  * Last step is noise-free: pc_sample returns x_mean of its last predictor step, t = eps -> 0, which (reverse
    diffusion, ancestral) is a Tweedie denoise x(0) ~ x + std^2 s; ode_sample ends with the same step (the official
    noise_removal). With the exact score of a point mass, it leaves no spread for VE; for VP |2 - sqrt(1 - b) -
    b / std(eps)^2| std(eps), b = beta(eps) eps (0.09 std(eps) at eps = 1e-3; the official b = beta_min / N leaves
    0.82 std(eps) at N = 500); sub-VP's Euler-Maruyama chain ~1.2 std(eps) ~ 1e-4 (tests: test_point_mass_spread_*).
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

from common import (MLP, PRESETS, TOYS, DataError, ResBlock, UNet, draw_indices, levels_to_unit, load_data, save_grid,
                    save_npz, save_scatter, timestep_embedding, training_images)

SCRIPT = "score_sde"  # the name written into every checkpoint


# -----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # data and network
    dataset: str = "digits"       # common.load_data name, or a folder of images (paper: CIFAR-10, CelebA, LSUN, FFHQ)
    image_size: int = 0           # 0 = the dataset's native size
    stream_gb: float = 4.0        # not in the papers: an image folder over this many GB (as uint8) stays on disk and is
    #                               read by DataLoader workers while training; smaller sets are held on the device
    model: str = "tiny"           # UNet preset in common.PRESETS (paper: DDPM++ / NCSN++, ~60 M); toys use the MLP
    # the SDE (Sec. 3.4, App. B)
    sde: str = "vp"               # vp (Eq. 11, DDPM's limit) | subvp (Eq. 12, Sec. 3.4) | ve (Eq. 9, SMLD's limit)
    beta_min: float = 0.1         # App. B / C: beta(0) = 0.1 (VP, sub-VP; data in [-1, 1] as in the paper)
    beta_max: float = 20.0        # App. B / C: beta(1) = 20
    sigma_min: float = 0.02       # App. C: 0.01 for data in [0, 1] -> 0.02 in our [-1, 1]
    sigma_max: float = 0.0        # 0 = NCSNv2 Technique 1 on the training data (paper: 50 for CIFAR-10 in [0, 1])
    # training (Sec. 3.3, Eq. 7; App. H)
    likelihood_weighting: bool = False  # lambda = g^2 (Song, Durkan, Murray, Ermon 2021); default lambda = std_t^2
    train_eps: float = 1e-5       # App. C: t ~ U[1e-5, 1] while training
    t_sampling: str = "iid"       # iid (paper) | low_discrepancy (one t per stratum of the batch; VDM App. I.1)
    steps: int = 1600             # total optimisation steps of the run (paper: 1.3 M; CPU default shortened)
    batch_size: int = 128         # the global batch (torchrun: split over the ranks); paper: 128
    lr: float = 2e-4              # paper: Adam 2e-4
    warmup: int = 100             # paper: 5000 warm-up steps (CPU default shortened)
    grad_clip: float = 1.0        # paper: gradient clipping at norm 1
    adam_beta2: float = 0.999     # Adam's beta2 (beta1 0.9): not in the paper; official code: 0.999
    ema_decay: float = 0.995      # paper: 0.999 (VE) / 0.9999 (VP, sub-VP); shortened for a ~2k-step CPU run
    ckpt_every: int = 200         # steps between checkpoints (also written on Ctrl-C / SIGTERM and at the end)
    sample_every: int = 800       # steps between sample grids from fixed noise
    log_every: int = 100          # steps between progress lines
    out: str = "runs/score_sde"   # output folder: checkpoint, sample grids, samples.npz
    ckpt: str = ""                # checkpoint to sample from ("" = <out>/ckpt.pt)
    seed: int = 0                 # seeds the data generator (indices, flips, t, noise), the weights, sampling
    device: str = "auto"          # auto = cuda -> mps -> cpu
    precision: str = "auto"       # auto | fp32 | tf32 | bf16 (auto: tf32 on CUDA, else fp32; bf16: network autocast)
    compile: bool = False         # torch.compile the network (a one-line message where unsupported)
    deterministic: bool = False   # deterministic kernels, so a CUDA run repeats bitwise (slower)
    # sampling (Sec. 4, App. D / E / G). The pc defaults below are the official VE CIFAR-10 settings
    # (configs/ve/cifar10_ncsnpp_continuous.py: reverse_diffusion + langevin, snr 0.16), used here for every SDE
    # (our choice). The official VP / sub-VP configs use no corrector: euler_maruyama (continuous models,
    # e.g. configs/vp/cifar10_ddpmpp_continuous.py; here --sampler em) or ancestral_sampling (discrete DDPM++,
    # configs/vp/cifar10_ddpmpp.py; --sampler ancestral).
    sampler: str = "pc"           # pc (Alg. 1-3) | ode (Eq. 13, App. D) | em | reverse | ancestral (the last three:
    #                               predictor only); official VE CIFAR-10: pc
    predictor: str = "reverse_diffusion"  # --sampler pc: euler_maruyama | reverse_diffusion (App. E) |
    #                                       ancestral_sampling (App. F) | none; official VE CIFAR-10: reverse_diffusion
    corrector: str = "langevin"   # --sampler pc: langevin (Alg. 4, 5) | ald (annealed Langevin of NCSN) | none;
    #                               official VE CIFAR-10: langevin
    snr: float = 0.16             # App. G: r = 0.16 (VE, CIFAR-10; official default_cifar10_configs.py)
    n_steps: int = 500            # N discretisation steps (paper: 1000; CPU default halved)
    n_corrector_steps: int = 1    # M corrector steps per level (paper: 1)
    sample_eps: float = 0.0       # 0 = paper default per SDE: 1e-3 (VP, sub-VP), 1e-5 (VE)
    rtol: float = 1e-5            # App. D: RK45 relative tolerance 1e-5
    atol: float = 1e-5            # App. D: RK45 absolute tolerance 1e-5
    n_samples: int = 64           # images written by --sample
    # evaluation and controllable generation (Sec. 4.3, Sec. 5, App. D.2, App. I)
    estimator: str = "rademacher" # --eval-nll trace: rademacher | gaussian (App. D.2) | exact (d backward passes)
    n_eval: int = 64              # held-out images for --eval-nll / --encode / --interpolate / --inpaint / --colorize
    classifier_steps: int = 800   # --train-classifier steps (paper, App. I.1: a WRN on noisy CIFAR-10)
    classifier_scale: float = 1.0 # weight of grad log p_t(y | x) in the conditional score (paper: 1)
    classifier_ckpt: str = ""     # classifier for --class ("" = <out>/classifier.pt)
    class_: str = ""              # --sample: samples of class y by the conditional score (Sec. 5, App. I.1): an
    #                               integer, or "all" (one row per class); "" = unconditional


# Defaults that follow the data (--train, --train-classifier): the Config above is the CPU run on the 8x8 digits.
# For larger images the first line that fits the data's largest side and the device sets the values it names; a
# flag given wins. The 32-px CPU line takes the network, the budget, Adam's beta2 (0.95) and the EMA (0.98)
# measured for ddpm.py on Fashion-MNIST (README); it is not measured here (the noisy classifier keeps Adam's
# 0.999). The CUDA lines: the paper's optimiser (App. H) in a shorter run, not yet measured.
DATA_RECIPES = [
    (16, "any", {}),  # the 8x8 digits
    (32, "cpu", dict(model="mini", steps=2000, batch_size=64, adam_beta2=0.95, ema_decay=0.98,
                     sample_every=1000)),
    (32, "cuda", dict(model="small", steps=20_000, lr=2e-4, warmup=1000, ema_decay=0.999, ckpt_every=2000,
                      sample_every=5000, log_every=500)),
    (1024, "cuda", dict(model="cifar10", steps=100_000, lr=2e-4, warmup=5000, ema_decay=0.9999, ckpt_every=5000,
                        sample_every=10_000, log_every=1000)),
]

# -----------------------------------------------------------------------------
# Noise schedules: the three SDEs (Sec. 3.4, App. B)

class SDE:
    """What the three SDEs share: Eq. 6, Eq. 13, an Euler-Maruyama chain and the Gaussian prior's log-density.
    Schedules are computed on t's device in its widest float (wide) and returned in x's dtype."""
    N = 1000          # default number of discretisation steps for samplers
    prior_std = 1.0   # std of the prior p_T = N(0, prior_std^2 I)
    sample_eps = 1e-3 # App. C: smallest sampling time (VP, sub-VP)
    name = ""

    def reverse_sde(self, x, t, score):
        """Eq. 6: the reverse-time SDE dx = [f(x, t) - g(t)^2 score] dt + g(t) dw_bar; returns (drift, g)."""
        drift, g = self.sde(x, t)
        return drift - expand(g ** 2, x) * score, g

    def probability_flow(self, x, t, score):
        """Eq. 13: the probability-flow ODE dx/dt = f(x, t) - g(t)^2 score / 2 (same marginals as Eq. 5)."""
        drift, g = self.sde(x, t)
        return drift - 0.5 * expand(g ** 2, x) * score

    def discretize(self, x, t, dt):
        """App. E: a Markov chain x_{i+1} = x_i + f_i + G_i z from Euler-Maruyama, f_i = f dt, G_i = g sqrt(dt)."""
        drift, g = self.sde(x, t)
        return drift * dt, g * math.sqrt(dt)

    def prior_sampling(self, shape, generator=None, dtype=torch.float32, device="cpu"):
        """x(T) ~ p_T = N(0, prior_std^2 I) (App. B)."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * self.prior_std

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample, (B,): the prior term of the likelihood (App. D.2)."""
        d, var = z[0].numel(), self.prior_std ** 2
        return -0.5 * d * math.log(2 * math.pi * self.prior_std ** 2) - z.flatten(1).pow(2).sum(1) / (2 * var)

    def check_chain(self, N, eps):
        """Any N-step grid works for VE (the VP chain overrides this)."""

    def langevin_alpha(self, t, dt):
        """Alg. 4 / 5: the corrector's step-size factor alpha_i (1 for VE)."""
        return torch.ones_like(t, dtype=wide(t.device))


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
        return self.sigma_min * torch.exp(t.to(wide(t.device)) * self.log_ratio)

    def sde(self, x, t):
        """f = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)) = sqrt(d[sigma^2]/dt)."""
        return torch.zeros_like(x), (self.sigma(t) * math.sqrt(2 * self.log_ratio)).to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0), sigma(t)^2 I), x(0) the data perturbed by sigma_min (as the official code)."""
        return x, self.sigma(t).to(x.dtype)

    def chain_sigma(self, t):
        """sigma_i of the SMLD chain (Eq. 8) at time t: sigma(t), but sigma_0 = 0 at t = 0 (x_0 is the data; official
        discretize too), so the last predictor step, eps -> 0, is Tweedie's denoise x + sigma(eps)^2 s(x, eps)."""
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
        return self.beta_min + t.to(wide(t.device)) * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        """Integral of beta from 0 to t: beta_min t + t^2 (beta_max - beta_min) / 2."""
        t = t.to(wide(t.device))
        return self.beta_min * t + 0.5 * t ** 2 * (self.beta_max - self.beta_min)

    def beta_i(self, t, dt):
        """beta_i = beta(t) dt of the DDPM chain (Eq. 10, dt the grid step; official: beta(t) / N; last step eps -> 0:
        beta(eps) eps, official beta_min / N). beta_i < 1 is checked once per sampler (check_chain), not per step."""
        return self.beta(t) * dt

    def check_chain(self, N, eps):
        """The DDPM chain of an N-step grid needs beta_i = beta(t) dt < 1 at every level (else sqrt(1 - beta_i)
        and the corrector's alpha_i = 1 - beta_i fail): ValueError naming --n-steps if not."""
        b = max((self.beta_min + t * (self.beta_max - self.beta_min)) * (t - tn) for t, tn in time_grid(N, eps))
        if b >= 1:
            raise ValueError(f"the VP chain needs beta(t) dt < 1 (got {b:.2f}): use more steps "
                             f"(--n-steps > beta_max + 1 = {self.beta_max + 1:g})")

    def sde(self, x, t):
        """f = -beta(t) x / 2, g = sqrt(beta(t))."""
        beta = self.beta(t)
        return -0.5 * expand(beta, x) * x, beta.sqrt().to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0) exp(-int beta / 2), (1 - exp(-int beta)) I)."""
        B = self.int_beta(t)
        return expand(torch.exp(-0.5 * B), x) * x, (-torch.expm1(-B)).sqrt().to(x.dtype)

    def discretize(self, x, t, dt):
        """Eq. 10, the DDPM chain: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = beta(t) dt."""
        beta_i = self.beta_i(t, dt)
        return expand((1 - beta_i).sqrt(), x) * x - x, beta_i.sqrt().to(x.dtype)

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
        return -0.5 * expand(beta, x) * x, (beta * -torch.expm1(-2 * self.int_beta(t))).sqrt().to(x.dtype)

    def marginal_prob(self, x, t):
        """App. B: p_0t = N(x(0) exp(-int beta / 2), (1 - exp(-int beta))^2 I)."""
        B = self.int_beta(t)
        return expand(torch.exp(-0.5 * B), x) * x, (-torch.expm1(-B)).to(x.dtype)


def make_sde(config, N=1000):
    """The SDE of a config dict with "sde" (vp | subvp | ve), "beta_min", "beta_max", "sigma_min", "sigma_max"."""
    if config["sde"] == "ve":
        return VESDE(config["sigma_min"], config["sigma_max"], N)
    return (VPSDE if config["sde"] == "vp" else subVPSDE)(config["beta_min"], config["beta_max"], N)


def sigma_max_technique1(x, n_max=5000):
    """Technique 1 of Song & Ermon (2020, NCSNv2, arXiv 2006.09011): sigma_max = the largest pairwise
    Euclidean distance between training points (on a random subset of n_max points for large datasets)."""
    x = x.flatten(1).double()
    if len(x) > n_max:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_max]]
    return max(float(torch.cdist(x[i:i + 1000], x).max()) for i in range(0, len(x), 1000))


# Three small helpers of the code above and below (not in the paper).

def wide(device):
    """The widest float a device has: float64, except on MPS (no float64 there) float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def expand(v, x):
    """A per-example (B,) tensor shaped (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def randn(x, generator=None):
    """Standard normal noise like x (shape, dtype, device), from a generator feeding x's device (or the global RNG)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# -----------------------------------------------------------------------------
# Forward process and loss (Sec. 3.3, Eq. 7)

def perturb(sde, x0, t, z):
    """App. B: x(t) = mean_t + std_t z, the sample of p_0t(x(t) | x(0)) for noise z ~ N(0, I); returns
    (x(t), mean_t, std_t (B,)). At t = 0 it is the data itself, std 0 (VE's marginal_prob says sigma_min there)."""
    mean, std = sde.marginal_prob(x0, t)
    std = std * (t > 0)
    return mean + expand(std, x0) * z, mean, std


def time_input(sde, t, dtype=None):
    """The networks' time input (B,), float32, for continuous t (B,), as the official code: 999 t (VP, sub-VP); VE:
    999 log(sigma_t / sigma_min) / log(sigma_max / sigma_min) (= 999 t), from sigma_t rounded to dtype (default t's).
    Score network and time-dependent classifier both take it."""
    if isinstance(sde, VESDE):
        sigma = sde.sigma(t).to(dtype or t.dtype)
        return (999 * torch.log(sigma.to(wide(t.device)) / sde.sigma_min) / sde.log_ratio).float()
    return (999 * t).float()


def make_score_fn(net, sde):
    """The score s_theta(x, t) read from a network as the official code (get_score_fn): -net / std_t (VP, sub-VP:
    the net predicts the noise), net / sigma_t (VE: the net outputs sigma_t * score)."""
    def score_fn(x, t):
        std = sde.marginal_prob(x, t)[1]  # (B,)
        out = net(x.float(), time_input(sde, t, x.dtype)).to(x.dtype) / expand(std, x)
        return out if isinstance(sde, VESDE) else -out
    return score_fn


def low_discrepancy_uniform(B, device="cpu", generator=None):
    """VDM App. I.1 (Kingma et al. 2021): u_i = mod(u_0 + i/B, 1), i = 0..B-1, one u_0 ~ U(0, 1): one u_i in each
    interval [i/B, (i+1)/B), each alone uniform (every loss estimate stays unbiased). On device, in its widest float."""
    dt = wide(device)
    u_0 = torch.rand((), generator=generator, dtype=dt, device=device)
    return (u_0 + torch.arange(B, dtype=dt, device=device) / B) % 1


def sample_t(B, eps, t_sampling="iid", device="cpu", generator=None):
    """Training times t in [eps, 1], (B,): iid t ~ U[eps, 1] (the paper), or low_discrepancy, t_i = eps + (1 - eps) u_i
    with low_discrepancy_uniform's u_i (one t per stratum of the batch: lower variance, still unbiased)."""
    if t_sampling == "low_discrepancy":
        return eps + (1 - eps) * low_discrepancy_uniform(B, device, generator)
    return torch.rand(B, device=device, generator=generator) * (1 - eps) + eps


def loss(score_model, sde, x, likelihood_weighting=False, eps=1e-5, t_sampling="iid", t=None, z=None):
    """Eq. 7 of Song et al. (2021): continuous-time denoising score matching.

    E_t E_x(0) E_x(t)|x(0) [ lambda(t) |s_theta(x(t), t) - grad log p_0t(x(t) | x(0))|^2 ],  t ~ U[eps, 1],
    grad log p_0t = -z / std_t for x(t) = mean_t + std_t z. lambda = std_t^2 (Sec. 3.3) gives |std_t s + z|^2;
    likelihood_weighting: lambda = g(t)^2 (Song, Durkan, Murray, Ermon 2021, arXiv 2101.09258). Mean over dimensions
    (official reduce_mean). t (B,) and z may be given (the training loop's); else drawn from the global RNG.
    """
    t = sample_t(len(x), eps, t_sampling, x.device) if t is None else t   # t ~ U[eps, 1]
    z = torch.randn_like(x) if z is None else z
    x_t, _, std = perturb(sde, x, t, z)
    score = score_model(x_t, t)
    if not likelihood_weighting:
        losses = (score * expand(std, x) + z) ** 2                   # lambda = std_t^2
    else:
        g2 = sde.sde(torch.zeros_like(x), t)[1] ** 2
        losses = (score + z / expand(std, x)) ** 2 * expand(g2, x)   # lambda = g(t)^2
    return losses.flatten(1).mean(1).mean()


# -----------------------------------------------------------------------------
# Samplers (Sec. 4, App. D-G). Every sampler takes score_fn(x, t), t a (B,) tensor in (0, 1].
# Predictors and correctors return (x, x_mean): the new state and the same update without its noise.

def time_grid(N, eps):
    """The (t, t_next) pairs of N predictor steps, as in the official code: N levels t_k = eps + (1 - eps) (k - 1) /
    (N - 1), k = N ... 1 (t_N = 1, t_1 = eps; N = 1: the single level 1), and after t_1 = eps the data, t_0 = 0."""
    ts = [eps + (1 - eps) * (k - 1) / (N - 1) for k in range(N, 0, -1)] if N > 1 else [1.0]
    return list(zip(ts, ts[1:] + [0.0]))


def time_vector(x, t):
    """A time t (float) as the (B,) tensor the score function takes, on x's device in its widest float."""
    return torch.full((len(x),), t, dtype=wide(x.device), device=x.device)


def euler_maruyama(score_fn, sde, x, t, t_next, generator=None):
    """App. E (and D.3): one Euler-Maruyama step of the reverse SDE (Eq. 6) from t to t_next < t."""
    dt, tt = t - t_next, time_vector(x, t)
    drift, g = sde.reverse_sde(x, tt, score_fn(x, tt))
    x_mean = x - drift * dt                                   # deterministic part (time runs backwards)
    return x_mean + expand(g, x) * math.sqrt(dt) * randn(x, generator), x_mean


def reverse_diffusion(score_fn, sde, x, t, t_next, generator=None, noise=True):
    """App. E: the reverse-diffusion predictor, the forward chain run backwards in the same discretisation:
    x_i = x_{i+1} - f_{i+1}(x_{i+1}) + G_{i+1}^2 s(x_{i+1}, t_{i+1}) + G_{i+1} z.  noise=False: x_mean only
    (returned twice; no noise is drawn)."""
    tt = time_vector(x, t)
    f, G = sde.discretize(x, tt, t - t_next)
    x_mean = x - f + expand(G ** 2, x) * score_fn(x, tt)
    if not noise:
        return x_mean, x_mean
    return x_mean + expand(G, x) * randn(x, generator), x_mean


def ancestral_sampling(score_fn, sde, x, t, t_next, generator=None):
    """Ancestral sampling of the discrete chain: App. F for VE (SMLD), Eq. 4 (DDPM's step) for VP.

    VE: x_{i-1} = x_i + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z.
    VP: x_{i-1} = (x_i + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z,  beta_i = beta(t) dt.
    sub-VP (not in the paper; ours): the posterior q(x_{t_next} | x_t, x0_hat) of the Gaussian chain that has
    sub-VP's marginals, with x0_hat = (x + std_t^2 s) / mean_coef_t (Tweedie). For VE it reduces to App. F.
    """
    tt, tt_next = time_vector(x, t), time_vector(x, t_next)
    score = score_fn(x, tt)
    if isinstance(sde, VESDE):
        s2, s2_next = sde.sigma(tt) ** 2, sde.chain_sigma(tt_next) ** 2  # sigma_0 = 0 at t_next = 0
        x_mean = x + expand(s2 - s2_next, x) * score
        std = (s2_next * (s2 - s2_next) / s2).sqrt()
    elif isinstance(sde, subVPSDE):
        m, s = sde.marginal_prob(torch.ones_like(tt), tt)      # mean coefficient and std at t
        m_next, s_next = sde.marginal_prob(torch.ones_like(tt), tt_next)
        a = m / m_next                                          # x_t = a x_next + b z in the chain
        b2 = s ** 2 - a ** 2 * s_next ** 2
        x0_hat = (x + expand(s ** 2, x) * score) / expand(m, x)         # Tweedie's estimate of x(0)
        x_mean = (expand(a * s_next ** 2, x) * x + expand(b2 * m_next, x) * x0_hat) / expand(s ** 2, x)
        std = s_next * b2.sqrt() / s
    else:
        beta = sde.beta_i(tt, t - t_next)                       # beta_i of the DDPM chain (Eq. 10)
        x_mean = (x + expand(beta, x) * score) / expand((1 - beta).sqrt(), x)
        std = beta.sqrt()
    return x_mean + expand(std, x) * randn(x, generator), x_mean


PREDICTORS = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion,
              "ancestral_sampling": ancestral_sampling, "none": None}   # none: corrector-only sampling


def langevin(score_fn, sde, x, t, dt, snr, n_steps, generator=None, ald=False):
    """Algorithms 4 (VE) and 5 (VP) of Song et al. (2021): Langevin corrector with step size from the snr r.

    Repeat M times: g = s(x, t); z ~ N(0, I); e = 2 alpha (r |z| / |g|)^2; x = x + e g + sqrt(2 e) z, alpha = 1 (VE)
    or 1 - beta_i (VP, sub-VP); |z|, |g| batch means of per-sample norms (official code); a zero score (an
    untrained network) gives step 0, not infinity. ald=True: NCSN's annealed Langevin dynamics (Song & Ermon 2019,
    Alg. 1) in the official code's form, e = 2 alpha (r std_t)^2, proportional to the noise variance at t.
    """
    tt = time_vector(x, t)
    alpha = sde.langevin_alpha(tt, dt)
    std = sde.marginal_prob(torch.ones_like(tt), tt)[1]            # std_t of p_0t (App. B)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, tt)                                    # g = s(x, t)
        z = randn(x, generator)                                   # z ~ N(0, I)
        if ald:
            step = 2 * alpha * (snr * std) ** 2                   # e_i, fixed per level
        else:
            grad_norm = grad.flatten(1).norm(dim=1).mean()        # |g|, batch mean of per-sample norms
            noise_norm = z.flatten(1).norm(dim=1).mean()          # |z|, likewise
            ratio = torch.where(grad_norm > 0, noise_norm / grad_norm, torch.zeros_like(grad_norm))
            step = 2 * alpha * (snr * ratio) ** 2                 # e_i, (B,)
        x_mean = x + expand(step, x) * grad                       # Langevin drift
        x = x_mean + expand((2 * step).sqrt(), x) * z             # Langevin noise
    return x, x_mean


def ald(score_fn, sde, x, t, dt, snr, n_steps, generator=None):
    """Annealed Langevin dynamics as in NCSN (Song & Ermon 2019, Alg. 1): langevin with ald=True."""
    return langevin(score_fn, sde, x, t, dt, snr, n_steps, generator, ald=True)


CORRECTORS = {"langevin": langevin, "ald": ald, "none": None}   # none: predictor-only sampling


def pc_sample(score_fn, sde, shape, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
              n_corrector_steps=1, eps=None, denoise=True, generator=None, n_steps=None, z=None,
              dtype=torch.float32, device="cpu", known=None):
    """Algorithm 1 of Song et al. (2021): predictor-corrector sampling (Alg. 2 for VE, Alg. 3 for VP).

    x_N ~ p_T (or z); at each level t_k of time_grid: M corrector steps targeting p_{t_k}, then one predictor step
    of the reverse SDE to t_{k-1}. This is the official code's order; Alg. 2/3 print the corrector after the
    predictor (the same chain, but correcting at t = eps instead of t = 1, and ending on a Langevin step). The last
    predictor step goes from eps to the data, t = 0 (header: a Tweedie denoise); denoise=True returns its x_mean.
    eps=None: the SDE's sample_eps (1e-3 VP / sub-VP, 1e-5 VE); n_steps=None: sde.N. known(x, x_mean, t) ->
    (x, x_mean) (impose_known) runs on the start (t = 1) and after every update, at the time it arrives at.
    """
    if predictor not in PREDICTORS or corrector not in CORRECTORS:
        raise ValueError(f"unknown predictor {predictor!r} or corrector {corrector!r}; choose from "
                         f"{', '.join(PREDICTORS)} / {', '.join(CORRECTORS)}")
    predict, correct, known = PREDICTORS[predictor], CORRECTORS[corrector], known or (lambda x, x_mean, t: (x, x_mean))
    eps = sde.sample_eps if eps is None else eps
    N = n_steps or sde.N
    sde.check_chain(N, eps)
    x = sde.prior_sampling(shape, generator, dtype, device) if z is None else z.to(dtype)
    x, x_mean = known(x, x, 1.0)
    with torch.no_grad():
        for t, t_next in time_grid(N, eps):
            if correct:  # Corrector: M Langevin steps targeting p_t.
                x, x_mean = known(*correct(score_fn, sde, x, t, t - t_next, snr, n_corrector_steps, generator), t)
            if predict:  # Predictor: one step of the reverse-time SDE from t to t_next.
                x, x_mean = known(*predict(score_fn, sde, x, t, t_next, generator), t_next)
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
    accept when err <= 1, next step h * min(10, max(0.2, 0.9 err^(-1/5))), no growth right after a rejection.
    FSAL: a step costs 6 evaluations. Step-size control reads err on the host: one sync per step.
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


def flow(score_fn, sde):
    """Eq. 13's right-hand side as the f(t, y) of rk45, t a float."""
    def f(t, y):
        tt = time_vector(y, t)
        return sde.probability_flow(y, tt, score_fn(y, tt))
    return f


def ode_sample(score_fn, sde, shape, rtol=1e-5, atol=1e-5, eps=None, z=None, generator=None,
               dtype=torch.float32, device="cpu", denoise=True):
    """App. D.3 of Song et al. (2021): sample by solving the probability-flow ODE (Eq. 13) from t = 1 to eps with
    adaptive RK45 (the batch as one state, in float64, as the official code); returns (x in dtype, nfe).
    denoise=True (official noise_removal): then one noise-free reverse-diffusion step from eps to 0, as pc_sample."""
    eps = sde.sample_eps if eps is None else eps
    x = sde.prior_sampling(shape, generator, dtype, device) if z is None else z.to(dtype)
    with torch.no_grad():
        x, nfe = rk45(flow(score_fn, sde), x.to(wide(x.device)), 1.0, eps, rtol, atol)
        if denoise:
            x, nfe = reverse_diffusion(score_fn, sde, x, eps, 0.0, noise=False)[0], nfe + 1
    return x.to(dtype), nfe


PREDICTOR_ONLY = {"em": "euler_maruyama", "reverse": "reverse_diffusion", "ancestral": "ancestral_sampling"}
SAMPLERS = ("pc", "ode", *PREDICTOR_ONLY)  # --sampler: pc takes --predictor / --corrector; em, ...: no corrector


def pc_options(cfg, sampler="pc"):
    """pc_sample's keyword arguments from the command line; sampler em / reverse / ancestral: its predictor alone."""
    pred, corr = (cfg.predictor, cfg.corrector) if sampler == "pc" else (PREDICTOR_ONLY[sampler], "none")
    return dict(predictor=pred, corrector=corr, snr=cfg.snr, n_corrector_steps=cfg.n_corrector_steps,
                eps=cfg.sample_eps or None, n_steps=cfg.n_steps)


def sample(score_fn, sde, cfg, shape, generator=None, device="cpu"):
    """Run the sampler named in cfg (--sampler, --predictor, --corrector, ...); returns (x, nfe)."""
    if cfg.sampler == "ode":
        eps = cfg.sample_eps or sde.sample_eps
        return ode_sample(score_fn, sde, shape, cfg.rtol, cfg.atol, eps, generator=generator, device=device)
    opt = pc_options(cfg, cfg.sampler)
    x = pc_sample(score_fn, sde, shape, generator=generator, device=device, **opt)
    return x, cfg.n_steps * ((opt["predictor"] != "none") + (opt["corrector"] != "none") * cfg.n_corrector_steps)


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
            v = randn(x, generator)                                  # gaussian probe; rademacher: its sign
            if estimator == "rademacher":
                v = v.sign()
            div = (torch.autograd.grad((fx * v).sum(), x)[0] * v).flatten(1).sum(1)
    return fx.detach(), div.detach()


def likelihood(score_fn, sde, x, estimator="rademacher", dequantize=True, eps=1e-5, levels=None,
               rtol=1e-5, atol=1e-5, generator=None):
    """App. D.2 of Song et al. (2021): bits/dim via the instantaneous change of variables along Eq. 13.

    log p_eps(x(eps)) = log p_T(x(1)) + int_eps^1 div f_tilde(x(t), t) dt, f_tilde the probability-flow drift,
    solved forwards by RK45 on [x, int div]; each sample's Hutchinson probe is kept along the path (as the official
    code). Returns (bits/dim (B,), nfe). dequantize=False: -log p_eps(x) / (d ln 2). dequantize=True (x on `levels`
    grey levels, bin width delta = 2 / (levels - 1)): -(log p(x + delta (u - 1/2)) + d log delta) / (d ln 2),
    u ~ U[0, 1)^d, an upper bound on -log2 P(x) per dimension (Jensen); the official code does not dequantise
    (yang-song/score_sde issue #24) and so understates bits/dim.
    """
    B, d = len(x), x[0].numel()
    x = x.to(wide(x.device))                                         # float64 (float32 on MPS), on x's device
    if dequantize:
        delta = 2.0 / (levels - 1)
        x = x + delta * (torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 0.5)
    seed = torch.randint(2 ** 31, (1,), generator=generator, device=x.device if generator is None else generator.device)
    probe = make_generator(int(seed), x.device)                      # one host read per call, not per step
    drift = flow(score_fn, sde)

    def f(t, y):
        probe.manual_seed(probe.initial_seed())                      # the same probe v at every t
        fx, div = divergence(lambda z: drift(t, z), y[:, :d].reshape(x.shape), estimator, probe)
        return torch.cat([fx.flatten(1), div[:, None]], 1)

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
        return rk45(flow(score_fn, sde), x.to(wide(x.device)), eps, 1.0, rtol, atol)[0].to(x.dtype)


def decode(score_fn, sde, z, eps=1e-5, rtol=1e-5, atol=1e-5):
    """Sec. 4.3: data x(eps) from a latent code z = x(1), the ODE run backwards (ode_sample with a given start)."""
    return ode_sample(score_fn, sde, z.shape, rtol, atol, eps, z=z, dtype=z.dtype, device=z.device, denoise=False)[0]


def slerp(x0, x1, lam):
    """App. D.5, Eq. 67 of Song et al. (2021): spherical interpolation (Shoemake 1985), per batch element.

    theta = arccos(<x0, x1> / (|x0| |x1|)),  x = sin((1 - lam) theta)/sin(theta) x0 + sin(lam theta)/sin(theta) x1.
    Computed on the latents' device in float64 (float32 on MPS, which has no float64).
    """
    f = wide(x0.device)
    a, b = x0.flatten(1).to(f), x1.flatten(1).to(f)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.acos(cos)[:, None]                               # (B, 1)
    sin = torch.sin(theta).clamp(min=1e-12)                        # parallel latents: fall back to a lerp below
    w0 = torch.where(theta > 1e-6, torch.sin((1 - lam) * theta) / sin, torch.full_like(theta, 1 - lam))
    w1 = torch.where(theta > 1e-6, torch.sin(lam * theta) / sin, torch.full_like(theta, lam))
    return (w0 * a + w1 * b).to(x0.dtype).reshape(x0.shape)


# -----------------------------------------------------------------------------
# Controllable generation (Sec. 5, App. I): inpainting, colourisation, class-conditional sampling

def impose_known(sde, known, mask, generator=None, couple=None, decouple=None):
    """App. I.2 / I.3 of Song et al. (2021): pc_sample's known(x, x_mean, t) hook: the known part imposed.

    In coordinates u = decouple(x) (identity for inpainting, the colour transform for colourisation) the known ones
    (mask = 1) are replaced at time t by a fresh forward-noised copy u_known(t) ~ p_0t(. | known) (perturb), in x_mean
    by its mean. Ours on purpose, against the official pc_inpainter / pc_colorizer: they noise the known part to the
    level the predictor started from, we to the level it arrives at (the same as N -> inf); they start it clean, we
    noised to t = 1; their eps is 1e-5 for every SDE, ours the SDE's; their x_mean mixes in the noisy x.
    """
    couple = couple or (lambda u: u)
    decouple = decouple or (lambda u: u)
    u_known = decouple(known)

    def impose(x, x_mean, t):
        noisy, mean, _ = perturb(sde, u_known, time_vector(x, t), randn(x, generator))
        return (couple(decouple(x) * (1 - mask) + noisy * mask),
                couple(decouple(x_mean) * (1 - mask) + mean * mask))
    return impose


def inpaint(score_fn, sde, x, mask, generator=None, **pc_kwargs):
    """App. I.2 of Song et al. (2021): inpainting. mask = 1 where x is known, of the data's shape (B, ...) or one
    sample's; returns the completed x (known entries equal to x, up to the last step's m_eps factor)."""
    if tuple(mask.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match data of shape {tuple(x.shape)} "
                         f"(give one sample's shape {tuple(x.shape[1:])} or the batch's)")
    known = impose_known(sde, x, mask.to(x.dtype).expand_as(x), generator)
    return pc_sample(score_fn, sde, x.shape, generator=generator, dtype=x.dtype, device=x.device, known=known,
                     **pc_kwargs)


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


def colorize(score_fn, sde, x_grey, generator=None, **pc_kwargs):
    """App. I.3 of Song et al. (2021): colourisation. x_grey (B, 3, H, W): an RGB image whose channel mean is the
    grey value (a colour image is reduced to it first). In the decoupled coordinates of COLOR_M the grey channel
    is known and the two colour channels are inpainted; returns RGB images with the same grey channel."""
    if x_grey.dim() != 4 or x_grey.shape[1] != 3:
        raise ValueError(f"colorize needs RGB data (B, 3, H, W); got shape {tuple(x_grey.shape)} "
                         f"(grey data has no colour to restore)")
    grey = x_grey.mean(1, keepdim=True).expand_as(x_grey)
    mask = torch.zeros_like(grey)
    mask[:, 0] = 1                                                     # decoupled channel 0 (grey) is known
    known = impose_known(sde, grey, mask, generator, couple, decouple)
    return pc_sample(score_fn, sde, grey.shape, generator=generator, dtype=grey.dtype, device=grey.device,
                     known=known, **pc_kwargs)


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
    """App. I.1: a time-dependent classifier p_t(y | x(t)), net(x, time_input(sde, t)) -> (B, K) logits: the
    downsampling half of a small U-Net from common.py's pieces, pooled, then linear (a CPU-sized stand-in for the
    paper's Wide-ResNet conditioned on the noise level)."""

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


def make_log_prob_fn(classifier, sde):
    """log p_t(. | x) (B, K) from the time-dependent classifier, for guided_score."""
    return lambda x, t: torch.log_softmax(classifier(x.float(), time_input(sde, t)), 1).to(x.dtype)


def classifier_loss(classifier, sde, x, y, t, z):
    """App. I.1: cross-entropy of the classifier on x(t) = perturb(x(0), t, z), t ~ U[eps, 1] (noisy training data)."""
    return torch.nn.functional.cross_entropy(classifier(perturb(sde, x, t, z)[0].float(), time_input(sde, t)), y)


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

# A checkpoint's "config": what defines the model and the SDE (must match on --resume), one sample's shape, and the
# training recipe; not the sampler, paths, device or precision of the run (a reader ignores any key it does not use).
MUST_MATCH = ("dataset", "image_size", "model", "sde", "beta_min", "beta_max", "sigma_min", "sigma_max")
RECIPE = ("likelihood_weighting", "train_eps", "t_sampling", "steps", "classifier_steps", "batch_size", "lr", "warmup",
          "grad_clip", "adam_beta2", "ema_decay", "seed")


def make_model(config):
    """The score network of a checkpoint config (a dict with "dataset", "model", "data_shape"), on the CPU:
    common.MLP for 2-D toys, else common.UNet with the preset."""
    shape = config["data_shape"]
    if config["dataset"] in TOYS:
        return MLP(dim=shape[0])
    return UNet(in_ch=shape[0], image_size=shape[-1], **PRESETS[config["model"]])


def finite_or_die(what, loss_sum, net, first, last, path):
    """The finiteness check of the training loop, at log / checkpoint / sample steps only (one host sync for
    the window of steps first..last): the loss accumulated on the device and the weights must be finite, else
    DataError naming the window, so that a NaN never reaches a checkpoint."""
    norms = torch.stack(torch._foreach_norm([p.detach() for p in net.parameters()]))
    ok = torch.stack([torch.isfinite(loss_sum), torch.isfinite(norms).all()]).tolist()
    steps = f"at step {first}" if first == last else f"in steps {first}-{last}"
    if not all(ok):
        bad = "weights" if ok[0] else "loss"
        raise DataError(f"non-finite {what}{bad} {steps}; last good checkpoint kept in {path}")


def start(cfg, labels=False):
    """Both training modes' start: (cfg, run = (rank, world, device, log, data_gen), autocast, data, config, sde). The
    data generator, alike on every rank, draws the global batch's randomness (indices, flips, t, noise); each rank
    keeps its slice. config: the checkpoint's; VE with sigma_max 0: NCSNv2 Technique 1 on the data."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    torch.manual_seed(cfg.seed)  # the initial weights: alike on every rank
    data_gen = make_generator(cfg.seed, device)
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None, stream_gb=cfg.stream_gb)
    if recipe := follow_data(cfg, DATA_RECIPES, data.u.shape[1:], device):
        log(f"for {'x'.join(map(str, data.u.shape[1:]))} images on {device.type}: {recipe}", flush=True)
    if labels and (data.y is None or data.u.dim() != 4):
        raise DataError(f"--train-classifier needs labelled image data; {cfg.dataset} has none")
    if cfg.sde == "ve" and cfg.sigma_max == 0:
        cfg = dataclasses.replace(cfg, sigma_max=sigma_max_technique1(data.x))
        log(f"sigma_max = {cfg.sigma_max:.3f} (largest pairwise distance in the training data)")
    config = {**{k: getattr(cfg, k) for k in MUST_MATCH + RECIPE}, "data_shape": list(data.u.shape[1:]),
              **({"n_classes": int(data.y.max()) + 1} if labels else {})}
    return cfg, (rank, world, device, log, data_gen), autocast, data, config, make_sde(config, cfg.n_steps)


def fit(cfg, what, net, ema, opt, batch_loss, total, path, head, resume, run, lr, warmup=1, clip=None, grid=None):
    """The training loop of train (Eq. 7) and train_classifier (App. I.1): Adam, linear warm-up (App. H), gradients
    averaged over the ranks, optional clipping, EMA; batch_loss(step): this rank's loss on its slice. Checkpoints
    (head + state) every --ckpt-every steps, at the end and on Ctrl-C / SIGTERM (exit 130), resumed exactly;
    grid(step) on rank 0 every --sample-every steps."""
    rank, world, device, log, data_gen = run
    prefix, label = ("", "loss") if what == "score" else (what + " ", "cross-entropy")
    step = 0
    if resume:  # every rank reads the same checkpoint
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != head.get("kind"):
            raise DataError(f"{path}: not a {what} checkpoint: cannot resume")
        for k in MUST_MATCH + ("data_shape", "n_classes"):
            if ckpt["config"].get(k) != head["config"].get(k):
                raise DataError(f"{path}: checkpoint has {k}={ckpt['config'].get(k)!r}, this run has "
                                f"{head['config'].get(k)!r}; use another --out or the same settings")
        if not isinstance(ckpt.get("rng"), dict) or "data" not in ckpt["rng"]:
            raise DataError(f"{path}: written before checkpoints carried the data generator: it samples, but cannot "
                            f"resume")
        net.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        for g in opt.param_groups:  # the checkpoint's moments with this run's beta2 (lr, too, is this run's)
            g["betas"] = (0.9, cfg.adam_beta2)
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank, path)  # the data generator, and this rank's CPU and CUDA/MPS streams
        log(f"resumed from {path} at step {step}")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop, t0, step0, stopping = StopFlag(), time.time(), step, False
    # No host sync per step: the loss is summed on the device and read, with the finiteness check, only at
    # log / checkpoint / sample steps (finite_or_die names the window since the last check). The check reads the
    # mean over the ranks (and the weights, alike on every rank), so every rank takes the same decision.
    loss_sum, n_sum, checked = torch.zeros((), device=device), 0, step
    net.train()
    try:
        while step < total and not stopping:
            L = batch_loss(step)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup)  # linear warm-up (App. H)
            opt.zero_grad(set_to_none=True)
            L.backward()
            average_gradients(net, world)  # the gradient of the global batch's mean loss, on every rank
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            ema_update(ema, net, cfg.ema_decay)
            loss_sum, n_sum, step = loss_sum + L.detach(), n_sum + 1, step + 1
            stopping = any_rank(stop.set, world, device)  # Ctrl-C / SIGTERM on any rank stops all at this step
            is_log = step % cfg.log_every == 0 or step == total
            save = step % cfg.ckpt_every == 0 or step == total or stopping
            is_grid = grid is not None and (step % cfg.sample_every == 0 or step == total)
            if is_log or save or is_grid:
                loss_sum = mean_over_ranks(loss_sum, world)  # the global batch's loss, alike on every rank
                finite_or_die(prefix, loss_sum, net, checked + 1, step, path)
                checked = step
            if is_log:
                rate = (step - step0) / (time.time() - t0)
                log(f"{prefix}step {step}/{total}  {label} {float(loss_sum) / n_sum:.4f}  {rate:.2f} it/s  "
                    f"ETA {(total - step) / rate / 60:.1f} min", flush=True)
                loss_sum, n_sum = torch.zeros((), device=device), 0
            if save:
                rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
                if rank == 0:
                    save_checkpoint(path, {**head, "step": step, "model": net.state_dict(), "ema": ema.state_dict(),
                                           "optimizer": opt.state_dict(), "rng": rng})
            if is_grid and rank == 0:
                grid(step)
        if stopping:
            if rank == 0:  # one write: the lines of several processes never interleave
                sys.stderr.write(f"stopped at step {step}; {what} checkpoint saved to {path}; continue with --resume\n")
            sys.exit(130)
        log(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {path}")
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def train(cfg, resume=False):
    """Training by Eq. 7 (Adam, warm-up, clipping, EMA: App. H). Under torchrun each rank computes the loss on its
    slice of the global batch (see setup_distributed); rank 0 alone prints and writes."""
    cfg, run, autocast, data, config, sde = start(cfg)
    rank, world, device, _, data_gen = run
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)  # the global batch and this rank's slice
    model = make_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # EMA of parameters only (the nets have no buffers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2))
    torch.manual_seed(cfg.seed + rank)  # from here the global RNGs draw dropout only, one stream per rank
    score_fn = make_score_fn(network(model, autocast, cfg.compile), sde)
    ema_score_fn = make_score_fn(network(ema, autocast, cfg.compile), sde)   # for the sample grids
    fixed = make_generator(cfg.seed + 1, device)  # fixed noise for the progress grids
    grid_shape = (min(cfg.n_samples, 64) if cfg.dataset not in TOYS else 2000, *config["data_shape"])
    x_data = training_images(data, device, B, part, cfg.seed)  # on the device (uint8 levels for images)

    def batch_loss(step):
        # The global batch's randomness from data_gen, in this order on every rank: i.i.d. example indices
        # (exact resume), flips, t, noise; this rank keeps its slice of each.
        idx = draw_indices(x_data, B, device, data_gen, step)
        if data.flip:
            flip = torch.rand(B, 1, 1, 1, device=device, generator=data_gen) < 0.5
        t = sample_t(B, cfg.train_eps, cfg.t_sampling, device, data_gen)  # (B,)
        z = torch.randn((B, *x_data.shape[1:]), device=device, generator=data_gen)  # (B, ...)
        x0 = levels_to_unit(x_data[idx[part]], data.levels)  # to [-1, 1], float32, on the device
        if data.flip:
            x0 = torch.where(flip[part], x0.flip(-1), x0)
        return loss(score_fn, sde, x0, cfg.likelihood_weighting, cfg.train_eps, t=t[part], z=z[part])

    def grid(step):
        ema.eval()
        x, _ = sample(ema_score_fn, sde, cfg, grid_shape, fixed.manual_seed(cfg.seed + 1), device)
        write_samples(x, os.path.join(cfg.out, f"train_{step:06d}.png"), cfg.dataset)

    os.makedirs(cfg.out, exist_ok=True)
    fit(cfg, "score", model, ema, opt, batch_loss, cfg.steps, os.path.join(cfg.out, "ckpt.pt"),
        {"script": SCRIPT, "config": config}, resume, run, cfg.lr, cfg.warmup, cfg.grad_clip, grid)


def train_classifier(cfg, resume=False):
    """--train-classifier: fit TimeClassifier on noisy labelled training data (App. I.1) for the SDE of the
    score checkpoint (--ckpt, so the two share the schedule), or of --sde when there is none; writes
    <out>/classifier.pt (EMA weights used for guidance) as train writes ckpt.pt; --resume continues it. Adam at 5x
    the score net's --lr (a classifier tolerates it), no warm-up, no clipping."""
    spath = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if os.path.isfile(spath):                       # the score model's SDE, sigma_max and dataset win
        old = load_checkpoint(spath)["config"]
        cfg = dataclasses.replace(cfg, **{k: old[k] for k in MUST_MATCH if k in old})
    cfg, run, autocast, data, config, sde = start(cfg, labels=True)
    rank, world, device, _, data_gen = run
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)
    net = TimeClassifier(data.u.shape[1], config["n_classes"]).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr * 5)
    torch.manual_seed(cfg.seed + rank)  # from here the global RNGs are per rank (the classifier has no dropout)
    net_fn, ema_fn = network(net, autocast, cfg.compile), network(ema, autocast, cfg.compile)
    x_data, y_data = data.u.to(device), data.y.to(device)

    def batch_loss(step):
        # The global batch's indices, t and noise from data_gen on every rank; this rank keeps its slice.
        idx = torch.randint(len(x_data), (B,), device=device, generator=data_gen)
        t = sample_t(B, cfg.train_eps, "iid", device, data_gen)
        z = torch.randn((B, *x_data.shape[1:]), device=device, generator=data_gen)
        x0 = levels_to_unit(x_data[idx[part]], data.levels)
        return classifier_loss(net_fn, sde, x0, y_data[idx[part]], t[part], z[part])

    path = cfg.classifier_ckpt or os.path.join(cfg.out, "classifier.pt")
    fit(cfg, "classifier", net, ema, opt, batch_loss, cfg.classifier_steps, path,
        {"script": SCRIPT, "kind": "classifier", "config": config}, resume, run, cfg.lr * 5)
    if rank > 0:
        return
    # Held-out accuracy at three noise levels, so a person can see what the guidance has to work with.
    test = load_data(cfg.dataset, train=False, image_size=cfg.image_size or None)
    tx, ty = test.x.to(device), test.y.to(device)
    with torch.no_grad():
        for t in (0.1, 0.5, 0.9):
            tt = torch.full((len(tx),), t, device=device)
            acc = (ema_fn(perturb(sde, tx, tt, torch.randn_like(tx))[0].float(), time_input(sde, tt)).argmax(1) == ty)
            print(f"held-out accuracy at t = {t}: {float(acc.float().mean()):.3f}")
    print(f"classifier -> {path}")


# -----------------------------------------------------------------------------
# CLI modes: the steps they share (model from --ckpt, held-out data, chunks over the ranks, PNGs), then one each

def load_score_model(cfg):
    """(config, score_fn, sde, device, rank, world) of --ckpt's EMA network (default <out>/ckpt.pt), with this command
    line's --device / --precision / --compile / --n-steps; under torchrun on every rank."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    path = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    try:
        if ckpt.get("kind") == "classifier":
            raise KeyError("kind")
        saved = ckpt["config"]
        model, sde = make_model(saved), make_sde(saved, cfg.n_steps)
        model.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{path}: checkpoint does not match this script's network ({type(e).__name__})") from None
    return saved, make_score_fn(network(model.to(device).eval(), autocast, cfg.compile), sde), sde, device, rank, world


def held_out(saved, cfg, what, device):
    """(held-out data, its first --n-eval examples on device in its widest float) of the checkpoint's dataset;
    the image modes (what) refuse 2-D toys."""
    if saved["dataset"] in TOYS and what != "--eval-nll":
        raise ValueError(f"{what} needs image data; the checkpoint was trained on the 2-D toy {saved['dataset']}")
    data = load_data(saved["dataset"], train=False, image_size=saved["image_size"] or None)
    return data, data.x[:cfg.n_eval].to(device).to(wide(device))


def in_chunks(cfg, n, rank, world, device, make):
    """make(start, count, generator) -> (tensor, nfe) for each chunk of --batch-size of n items that this rank makes
    (chunk k on rank k % world, drawing from chunk_generator(--seed, start)), so that the result does not depend on
    the number of processes; returns (the n items in order, on every rank, on the CPU; the largest nfe)."""
    chunks, nfes = [], []
    for start, m in my_chunks(n, cfg.batch_size, rank, world):
        x, nfe = make(start, m, chunk_generator(cfg.seed, start, device))
        chunks.append((start, x.cpu()))
        nfes.append(nfe)
    return gather_chunks(chunks, world), max(sum(gather_objects(nfes, world), []))


def write_png(cfg, name, x, nrow=None):
    """A grid of images x as <out>/name; returns the path."""
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, name)
    save_grid(x.float(), path, nrow=nrow)
    return path


def run_sample(cfg):
    """--sample: rebuild the network and SDE from the checkpoint's config (its --sde, --dataset, ... win over
    the command line's), sample with the EMA weights using this command line's sampler flags. In chunks of
    --batch-size (in_chunks): the samples depend on --seed and --batch-size only (the Langevin corrector's step and
    RK45's step sizes are shared by a chunk, so the chunk size matters)."""
    saved, score_fn, sde, device, rank, world = load_score_model(cfg)
    t0, shape, toy = time.time(), saved["data_shape"], saved["dataset"] in TOYS
    x, nfe = in_chunks(cfg, cfg.n_samples, rank, world, device,
                       lambda start, n, gen: sample(score_fn, sde, cfg, (n, *shape), gen, device))
    if not torch.isfinite(x).all():  # the same gathered x, so the same decision, on every rank
        raise DataError("sampling produced non-finite values (try smaller --snr or more --n-steps)")
    if rank > 0:
        return
    os.makedirs(cfg.out, exist_ok=True)
    png, npz = os.path.join(cfg.out, "samples.png"), os.path.join(cfg.out, "samples.npz")
    write_samples(x, png, saved["dataset"])
    if toy:  # 2-D points are not images: keep them as float32 (N, 2)
        np.savez(npz, arr_0=x.float().numpy())
    else:
        save_npz(x, npz)
    chunked = f" per chunk of {cfg.batch_size}" if cfg.n_samples > cfg.batch_size else ""
    print(f"{cfg.n_samples} samples ({saved['sde']} SDE, {cfg.sampler} sampler, {nfe} score evaluations{chunked}, "
          f"{time.time() - t0:.1f} s" + (f", {world} processes" if world > 1 else "") + f") -> {png}, {npz}")


def run_eval_nll(cfg):
    """--eval-nll: bits/dim (App. D.2) of --n-eval held-out points with --estimator, mean +- standard error, in
    chunks (in_chunks: the dequantisation noise and the probes do not depend on the number of processes)."""
    saved, score_fn, sde, device, rank, world = load_score_model(cfg)
    data, x = held_out(saved, cfg, "--eval-nll", device)
    t0 = time.time()
    bpd, nfe = in_chunks(cfg, len(x), rank, world, device, lambda start, n, gen: likelihood(
        score_fn, sde, x[start:start + n], cfg.estimator, dequantize=data.levels is not None, levels=data.levels,
        rtol=cfg.rtol, atol=cfg.atol, generator=gen))
    if rank > 0:
        return
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    unit = "bits/dim (dequantised, %d levels)" % data.levels if data.levels else "bits/dim (continuous)"
    chunked = f" per chunk of {cfg.batch_size}" if len(x) > cfg.batch_size else ""
    print(f"{float(bpd.mean()):.4f} +- {se:.4f} {unit} on {len(x)} held-out points ({saved['sde']} SDE, "
          f"{cfg.estimator} trace, NFE {nfe}{chunked}, {time.time() - t0:.1f} s"
          + (f", {world} processes" if world > 1 else "") + ")")
    if saved["dataset"] not in TOYS:  # held-out images from most to least likely under the model
        png = write_png(cfg, "nll_sorted.png", x[bpd.argsort().to(x.device)])
        print(f"images sorted by bits/dim (lowest first) -> {png}")


def run_encode(cfg, interpolate=False):
    """--encode: rows of held-out images | their codes z = x(1) | decode(z) (Sec. 4.3).
    --interpolate: 8 rows, each decoding slerp(z_a, z_b, lambda) for 9 lambdas between two encoded images.
    Under torchrun rank 0 does it all (at most 16 held-out images); the other ranks return."""
    saved, score_fn, sde, device, rank, world = load_score_model(cfg)
    _, x = held_out(saved, cfg, "--interpolate" if interpolate else "--encode", device)
    if rank > 0:  # after the checks above, so that every rank reports a bad input alike
        return
    x, eps = x[:16 if interpolate else 8], cfg.sample_eps or 1e-5
    z = encode(score_fn, sde, x, eps, cfg.rtol, cfg.atol)
    if interpolate:
        P = len(z) // 2                                                  # pairs (z_0, z_1), (z_2, z_3), ...
        lams = torch.linspace(0, 1, 9, dtype=torch.float64).tolist()
        zs = torch.stack([slerp(z[0:2 * P:2], z[1:2 * P:2], lam) for lam in lams], 1).flatten(0, 1)  # a row per pair
        png = write_png(cfg, "interpolate.png", decode(score_fn, sde, zs, eps, cfg.rtol, cfg.atol), nrow=9)
        print(f"{P} interpolations (9 steps, ends = decoded codes of two held-out images) -> {png}")
        return
    rec = decode(score_fn, sde, z, eps, cfg.rtol, cfg.atol)
    png = write_png(cfg, "encode.png", torch.cat([x, (z / 3).clamp(-1, 1), rec]), nrow=len(x))
    print(f"rows: held-out | code / 3 | decoded; max |decode(encode(x)) - x| = {float((rec - x).abs().max()):.4f}, "
          f"code std {float(z.std()):.3f} (N(0, I) would be 1) -> {png}")


def run_inpaint(cfg, colour=False):
    """--inpaint: rows originals | masked (bottom half removed) | completed (App. I.2).
    --colorize: rows originals | grey | colourised (App. I.3); grey data -> a one-line explanation.
    Under torchrun rank 0 does it all (at most 16 held-out images); the other ranks return."""
    saved, score_fn, sde, device, rank, world = load_score_model(cfg)
    if colour and saved["data_shape"][0] != 3:
        raise ValueError(f"--colorize needs RGB data; {saved['dataset']} has {saved['data_shape'][0]} channel(s), so "
                         f"there is no colour to restore (App. I.3 works on 3-channel images)")
    _, x = held_out(saved, cfg, "--colorize" if colour else "--inpaint", device)
    if rank > 0:  # after the checks above, so that every rank reports a bad input alike
        return
    x, gen = x[:16], make_generator(cfg.seed, device)
    if colour:
        shown = x.mean(1, keepdim=True).expand_as(x)
        out = colorize(score_fn, sde, shown, gen, **pc_options(cfg))
    else:
        mask = torch.ones(x.shape[1:], dtype=x.dtype, device=x.device)
        mask[..., x.shape[-2] // 2:, :] = 0                              # bottom half unknown
        shown = x * mask - (1 - mask)                                    # masked part drawn black
        out = inpaint(score_fn, sde, x, mask, gen, **pc_options(cfg))
    png = write_png(cfg, "colorize.png" if colour else "inpaint.png", torch.cat([x, shown, out]), nrow=len(x))
    print(f"rows: held-out | {'grey' if colour else 'bottom half removed'} | "
          f"{'colourised' if colour else 'completed'} -> {png}")


def run_class(cfg, label):
    """--sample --class K: class-conditional PC samples (Sec. 5) with the time-dependent classifier of
    --classifier-ckpt; --class all: one row per class. In chunks like --sample (labels in order)."""
    saved, score_fn, sde, device, rank, world = load_score_model(cfg)
    path = cfg.classifier_ckpt or os.path.join(cfg.out, "classifier.pt")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "classifier":
        raise DataError(f"{path}: not a classifier checkpoint (train one with --train-classifier)")
    for k in ("sde", "beta_min", "beta_max", "sigma_min", "sigma_max", "dataset"):
        if ckpt["config"].get(k) != saved.get(k):
            raise DataError(f"{path}: classifier has {k}={ckpt['config'].get(k)!r}, the score model {saved.get(k)!r}")
    K = ckpt["config"]["n_classes"]
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
    if cfg.sampler == "ode":
        raise ValueError("--class needs an SDE sampler (pc, em, reverse, ancestral), not the ODE")
    clf, shape = TimeClassifier(saved["data_shape"][0], K), saved["data_shape"]
    clf.load_state_dict(ckpt["ema"])
    clf = network(clf.to(device).eval(), setup_precision(device, cfg.precision, cfg.deterministic), cfg.compile)
    log_prob_fn = make_log_prob_fn(clf, sde)
    x, _ = in_chunks(cfg, len(y), rank, world, device, lambda start, m, gen: (class_sample(
        score_fn, log_prob_fn, sde, (m, *shape), y[start:start + m], cfg.classifier_scale, generator=gen,
        device=device, **pc_options(cfg, cfg.sampler)), 0))
    if rank > 0:
        return
    x = x.to(device)  # (len(y), ...) in label order
    png = write_png(cfg, f"class_{label}.png", x, nrow=n if label == "all" else None)
    with torch.no_grad():
        t_eps = torch.full((len(x),), sde.sample_eps, dtype=x.dtype, device=x.device)
        acc = float((log_prob_fn(x, t_eps).argmax(1) == y).float().mean())
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
    if cfg.class_ and not args.sample:
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
    p = make_parser(Config, MODES, CHOICES, {}, DATA_RECIPES)
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/ckpt.pt to --steps (with --train-classifier: classifier.pt)")
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
        elif cfg.class_:
            run_class(cfg, cfg.class_)
        else:
            run_sample(cfg)


if __name__ == "__main__":
    main()
