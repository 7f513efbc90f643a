"""
DDPM: Denoising Diffusion Probabilistic Models.

Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models", arXiv 2006.11239; official code (TensorFlow):
github.com/hojonathanho/diffusion. Extras from VDM: Kingma, Salimans, Poole, Ho (2021), "Variational Diffusion
Models", arXiv 2107.00630v6 (the NeurIPS 2021 text). This file imports only common.py (U-Net, data, PNG writers).

Commands
    python ddpm.py --train                                  # 8x8 digits, runs/ddpm/; ~6 min on 2 CPU cores
    python ddpm.py --sample --ckpt runs/ddpm/ckpt.pt --n-samples 64   # samples.png + samples.npz
    python ddpm.py --eval-nll --ckpt runs/ddpm/ckpt.pt      # variational bound on held-out data, bits/dim
    python ddpm.py --train --resume                         # continue runs/ddpm/ckpt.pt exactly
    python ddpm.py --train --dataset moons --steps 3000     # a 2-D toy (MLP instead of the U-Net)
    python ddpm.py --train --preset cifar10                 # the paper's CIFAR-10 run (35.7 M U-Net, 800k steps, GPU)
    python ddpm.py --train --loss-type vlb --schedule learned   # VDM: continuous bound, learned log-SNR, Fourier feat.
    python ddpm.py --train --preset cifar10 --device cuda --precision bf16 --compile   # bf16 autocast, compiled U-Net
    torchrun --nproc_per_node=8 ddpm.py --train --preset cifar10 --device cuda   # 8 GPUs; --batch-size: global
    torchrun --nproc_per_node=8 ddpm.py --sample --ckpt runs/ddpm/ckpt.pt --n-samples 50000   # samples split over 8
    torchrun --nproc_per_node=8 ddpm.py --eval-nll --ckpt runs/ddpm/ckpt.pt --n-eval 10000   # examples split over 8
Under torchrun see "Several processes" below; --sample and --eval-nll give the same numbers for any number of
processes. Multi-node: untested.

Map (paper -> code; Ho et al.'s numbers bare, VDM's prefixed "VDM")
    Eq. 2  forward step q(x_t | x_{t-1})             -> make_schedule (beta), DDPM.__init__ (alpha)
    Eq. 4  q(x_t | x_0), closed form                 -> DDPM.q_sample
    Eq. 5  L = L_T + sum L_{t-1} + L_0 (KL form)     -> DDPM.nll_bpd
    Eqs. 6-7 posterior q(x_{t-1} | x_t, x_0)          -> DDPM.q_posterior
    Eq. 11 mean mu_theta from eps_theta              -> DDPM.mean_from_eps, DDPM.p_mean_variance
    Eq. 12 L_{t-1} as weighted eps error (lambda_t)   -> DDPM.loss(loss_type="elbo")
    Eq. 13 discretized Gaussian decoder L_0           -> discretized_gaussian_log_likelihood
    Eq. 14 L_simple; Algorithm 1 (training)           -> DDPM.loss(loss_type="simple"), train
    Algorithm 2 (sampling)                            -> DDPM.p_sample (one step), DDPM.sample (the loop)
    VDM Eqs. 2, 5  SNR(t) = exp(-gamma(t))           -> gamma_discrete, gamma_linear_snr, gamma_cosine
    VDM Eq. 9  p(z_s | z_t) = q(z_s | z_t, x = x_hat) -> vdm_sampler (the DDPM step with sigma^2 = beta~)
    VDM Eq. 11 -VLB = prior + recon + diffusion      -> vlb_continuous (terms "prior", "recon", "diffusion")
    VDM Eq. 13 discrete-time diffusion loss L_T      -> vdm_discrete_term, vlb_continuous(T=...)
    VDM Eq. 17 continuous-time loss L_inf, eps form  -> vlb_continuous
    VDM Eq. 18 L_inf sees gamma only at 0 and 1      -> VDMNet (--cond gamma: the net sees the noise level)
    VDM Sec. 3.4, App. C  Fourier features of z      -> fourier_features, VDMNet (--fourier)
    VDM Sec. 5.3, App. I.2  schedule for low variance -> vdm_backward (--schedule-grad variance)
    VDM App. H  monotone network gamma_phi           -> MonotoneGamma (--learn-endpoints: gamma(0), gamma(1) too)
    VDM App. I.1  low-discrepancy timesteps          -> low_discrepancy_uniform (--t-sampling low_discrepancy)

Symbols (paper -> code)
    T                 number of diffusion steps                        T
    t, i              paper step t = 1..T; its tensor index i = t - 1    i (LongTensor (B,) or int)
    beta_t            forward variance of step t                       beta
    alpha_t           1 - beta_t                                       alpha
    alpha_bar_t       prod_{s<=t} alpha_s (signal kept at step t)      alpha_bar
    beta~_t           posterior variance (1-alpha_bar_{t-1})/(1-alpha_bar_t) beta_t   beta_tilde
    sigma_t^2         reverse-process variance (beta_t or beta~_t)     sigma2
    eps_theta         the network, predicts the noise eps              model(x_t, i)
    x0_hat            (x_t - sqrt(1-alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)   x0_hat

Conventions (the same in all four scripts of this project)
    Data are in [-1, 1] (common.py maps the K grey levels there before any noise is added).
    Discrete time: tables and network calls take i = t - 1 (a variable named t is VDM's continuous time in [0, 1]);
    alpha_bar "before the first step" (t = 0) is 1; the last sampling step (t = 1) adds no noise (Algorithm 2).
    Devices: schedules are float64 masters on the CPU; DDPM.at() keeps one copy per (device, dtype) it meets; the
    bound and the decoder compute in float64 where the device has it (not on MPS).

Notation clashes
    DDIM's alpha_t is this paper's alpha_bar_t. VDM's alpha_t^2 is alpha_bar_t and its sigma_t^2 is
    1 - alpha_bar_t (the marginal variance); here sigma_t is the reverse-process standard deviation.
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

from common import (MLP, PRESETS, TOYS, DataError, UNet, draw_indices, levels_to_unit, load_data, load_pretrained,
                    save_grid, save_npz, save_scatter, training_images)

SCRIPT = "ddpm"  # the name written into every checkpoint


# -----------------------------------------------------------------------------
# Config: every default cites the paper; CPU defaults that differ say the paper's value.

@dataclass
class Config:
    dataset: str = "digits"       # common.load_data name or an image folder; paper: CIFAR-10, CelebA-HQ, LSUN
    image_size: int = 0           # 0 = the dataset's native size (digits 8, CIFAR-10 32)
    stream_gb: float = 4.0        # not in the papers: an image folder over this many GB (as uint8) stays on disk and is
    #                               read by DataLoader workers while training; smaller sets are held on the device
    model: str = "tiny"           # U-Net preset in common.PRESETS; paper: "cifar10" (35.7 M, App. B). Toys: common.MLP
    T: int = 1000                 # Sec. 4: T = 1000
    schedule: str = "linear"      # Sec. 4: linear; "cosine" is Nichol & Dhariwal (2021), Eq. 17 there;
    #                               with --loss-type vlb: "linear_snr" (VDM's fixed gamma) or "learned" (VDM App. H)
    beta_1: float = 1e-4          # Sec. 4: beta_1 = 1e-4 (linear schedule only)
    beta_T: float = 0.02          # Sec. 4: beta_T = 0.02 (linear schedule only)
    variance: str = "beta"        # Sec. 3.2: sigma_t^2 = beta_t or "beta_tilde" ("similar results", the paper says);
    #                               beta_t is the official code's CIFAR-10 setting (run_cifar.py: "fixedlarge")
    loss_type: str = "simple"     # Sec. 3.4: "simple" = L_simple (Eq. 14, the paper's); "elbo" = the bound (Eq. 12 +
    #                               L_0) as the official "kl" loss, in bits/dim; "vlb" = VDM Eqs. 11, 17 (see --cond)
    clip_denoised: str = "auto"   # official code clips x0_hat to [-1, 1] when sampling: auto = on for images, not toys
    t_sampling: str = "iid"       # timesteps per minibatch: "iid" uniform (Alg. 1) or "low_discrepancy" (VDM App. I.1)
    schedule_grad: str = "bound"  # --schedule learned: "bound" = all of gamma on the bits/dim loss (VDM official code);
    #                               "variance" = gamma's interior minimises the estimator's variance (VDM Sec. 5.3)
    learn_endpoints: bool = False  # --schedule learned: also learn gamma(0), gamma(1) as VDM's code (off: -13.3, 5.0)
    fourier: str = "auto"         # VDM Sec. 3.4, App. C: Fourier features of z as extra input channels (on in VDM's
    #                               models and official code): auto = on for --loss-type vlb on image data
    cond: str = "gamma"           # --loss-type vlb: the net sees the noise level gamma(t), rescaled to 0..999 as VDM's
    #                               official ScoreUNet does, or "t" (999 t); identical for linear_snr. Ignored otherwise
    steps: int = 1500             # total optimisation steps of the run; paper: 800k (CIFAR-10)
    batch_size: int = 128         # App. B: 128. The global batch under torchrun (each process takes its share);
    #                               --sample / --eval-nll: the chunk size (each chunk has its own generator)
    lr: float = 1e-3              # App. B: Adam 2e-4 (raised for the short CPU run)
    warmup: int = 100             # official code (run_cifar.py, not the paper): 5000 steps of linear warm-up (CPU: 100)
    grad_clip: float = 1.0        # official code (run_cifar.py, not the paper): global gradient norm clipped at 1.0
    adam_beta2: float = 0.999     # Adam's beta2 (beta1 0.9): not in the paper; official code: TF's default 0.999
    ema_decay: float = 0.995      # App. B: 0.9999 (shortened: 1500 steps are too few to average over 10k)
    ckpt_every: int = 500         # steps between checkpoints (and one at the end, and on Ctrl-C)
    sample_every: int = 500       # steps between sample grids from fixed noise
    log_every: int = 100          # steps between progress lines
    out: str = "runs/ddpm"        # output folder: ckpt.pt, grid_<step>.png, samples.png, samples.npz
    seed: int = 0                 # seeds the data generator (data order, flips, t, noise), the initial weights,
    #                               the sampling generators, and the global RNG (dropout; seed + rank under torchrun)
    device: str = "auto"          # auto = cuda -> mps -> cpu
    precision: str = "auto"       # fp32 | tf32 | bf16 (autocast for the network only); auto = tf32 on CUDA, else fp32
    compile: bool = False         # torch.compile the network (a runtime setting, like device and precision)
    deterministic: bool = False   # deterministic kernels: a CUDA run (and its resume) repeats bitwise
    ckpt: str = ""                # --sample / --eval-nll: a checkpoint of ours, or a released model's folder or file
    n_samples: int = 64           # --sample: number of samples
    n_eval: int = 297             # --eval-nll: held-out examples (297: all of the digits' test split)


# `--preset cifar10`: the paper's CIFAR-10 run (Sec. 4, App. B; the 5000-step warm-up and the clip at 1.0 are the
# official run_cifar.py's, the paper does not give them). Explicit flags override a preset.
PRESET_CONFIGS = {
    "digits": {},  # the CPU defaults above
    "cifar10": dict(dataset="cifar10", model="cifar10", steps=800_000, batch_size=128, lr=2e-4, warmup=5000,
                    ema_decay=0.9999, ckpt_every=5000, sample_every=10_000, log_every=1000),
}

# Defaults that follow the data (--train): the Config above is the CPU run on the 8x8 digits. For larger images the
# first line that fits the data's largest side and the device sets the values it names; a flag or --preset given
# wins. The 32-px CPU line was measured on Fashion-MNIST (tests/bench_fashion.py, README): the 3-level `mini` net is
# 4-6 % faster per step than `tiny` and ahead of it when sampled with eta = 1; a shorter EMA than the digits' 0.995
# helped at each step down (0.998 worse; 0.99, then 0.98 better at paired sampling seeds): 2000 steps move the
# weights too fast for a long average. Adam's beta2 = 0.95 instead of the official code's 0.999 (a second-moment
# average over ~20 steps, not ~1000) lowered FD by 24 and 26 % at two training seeds, at every sampling seed. The
# CUDA lines are the paper's optimiser (App. B) in a shorter run, not yet measured.
DATA_RECIPES = [
    (16, "any", {}),  # the 8x8 digits
    (32, "cpu", dict(model="mini", steps=2000, batch_size=64, adam_beta2=0.95, ema_decay=0.98,
                     sample_every=1000)),  # ~19 min here
    (32, "cuda", dict(model="small", steps=20_000, lr=2e-4, warmup=1000, ema_decay=0.9995, ckpt_every=2000,
                      sample_every=5000, log_every=500)),
    (1024, "cuda", dict(model="cifar10", steps=100_000, lr=2e-4, warmup=5000, ema_decay=0.9999, ckpt_every=5000,
                        sample_every=10_000, log_every=1000)),
]


# -----------------------------------------------------------------------------
# Noise schedule (float64 throughout; cast once, where a coefficient meets the data)

def make_schedule(schedule, T, beta_1=1e-4, beta_T=0.02):
    """Sec. 4 of Ho et al. (2020): the forward variances beta_1..beta_T as a float64 tensor of length T.

    linear: beta_t evenly spaced from beta_1 to beta_T (the paper's choice).
    cosine: Nichol & Dhariwal (2021), alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008;
            beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) clipped at 0.999 (else beta_T = 1: 1/sqrt(alpha_T) infinite).
    A tensor of betas is taken as given (vdm_sampler's discretised log-SNR schedule)."""
    if isinstance(schedule, torch.Tensor):
        return schedule.double()
    if schedule == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        u = torch.arange(T + 1, dtype=torch.float64) / T  # t/T for t = 0..T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")


def wide(device):
    """The widest float a device has: float64, except on MPS (no float64 there) float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def expand(v, x):
    """A per-example (B,) tensor shaped (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def extract(a, i, x):
    """a[i] for a batch of 0-based indices i (B,), shaped to broadcast against x."""
    return expand(a[i], x)


def normal_kl(mean1, var1, mean2, var2):
    """KL( N(mean1, var1) || N(mean2, var2) ) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x0, mean, var, levels):
    """Eq. 13 of Ho et al. (2020): log p(x0 | x1) of a Gaussian integrated over x0's quantisation bin, per element,
    in nats. K = levels values 2/(K-1) apart in [-1, 1] (K = 256: the paper's 1/255 half-width); the bin widens to
    -inf at x0 = -1 and +inf at x0 = +1. levels=None: continuous data, the Gaussian log density."""
    if x0.device.type == "mps":  # MPS has neither log_ndtr nor float64: this arithmetic runs on the CPU (in float64)
        return discretized_gaussian_log_likelihood(x0.cpu(), mean.cpu(), var.cpu(), levels).to(x0.device, torch.float32)
    dt = wide(x0.device)
    x0, mean, var = x0.to(dt), mean.to(dt), var.to(dt)
    if levels is None:
        return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x0 - mean) ** 2 / var)
    half, std = 1.0 / (levels - 1), var.sqrt()
    z_plus, z_minus = (x0 - mean + half) / std, (x0 - mean - half) / std
    log_cdf_plus = torch.special.log_ndtr(z_plus)          # log P(X <= upper edge), used at x0 = -1
    log_sf_minus = torch.special.log_ndtr(-z_minus)        # log P(X >= lower edge), used at x0 = +1
    # Middle bins: P(lower < X < upper) on the side of the mean where it does not cancel (flipped so that b <= 0
    # when the bin lies above the mean), with Phi(z) = erfc(-z / sqrt 2) / 2: exact in the lower tail, where
    # torch.special.ndtr (1 + erf) / 2 loses its digits below z = -5 and is 0 below z = -8.3.
    flip = z_minus > 0
    a, b = torch.where(flip, -z_plus, z_minus), torch.where(flip, -z_minus, z_plus)
    Phi = lambda z: 0.5 * torch.special.erfc(-z / math.sqrt(2))  # noqa: E731
    tiny = 1e-300 if dt == torch.float64 else torch.finfo(torch.float32).tiny  # float32: its smallest normal number
    log_mid = torch.log((Phi(b) - Phi(a)).clamp(min=tiny))
    return torch.where(x0 < -1 + 1e-6, log_cdf_plus, torch.where(x0 > 1 - 1e-6, log_sf_minus, log_mid))


# -----------------------------------------------------------------------------
# Forward process and loss

class DDPM:
    """Ho et al. (2020): schedule tables, forward process, loss, ancestral sampler and bound. The network is a plain
    callable model(x_t, i) -> eps_hat, i a LongTensor (B,) (paper t = i + 1): tests pass exact predictors."""

    def __init__(self, T=1000, schedule="linear", beta_1=1e-4, beta_T=0.02, variance="beta",
                 loss_type="simple", clip_denoised=False, levels=None, t_sampling="iid"):
        self.T, self.variance, self.loss_type, self.t_sampling = T, variance, loss_type, t_sampling
        self.clip_denoised, self.levels = clip_denoised, levels
        self.beta = make_schedule(schedule, T, beta_1, beta_T)                  # (T,) float64
        self.alpha = 1 - self.beta                                              # Eq. 4's alpha_t
        self.alpha_bar = torch.cumprod(self.alpha, 0)                           # Eq. 4's alpha_bar_t
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])  # t = 0: 1
        self.sqrt_alpha, self.sqrt_alpha_bar = self.alpha.sqrt(), self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        self.eps_coef = self.beta / self.sqrt_one_minus_alpha_bar           # Eq. 11: beta_t / sqrt(1 - alpha_bar_t)
        # Eq. 7: posterior variance beta~_t; beta~_1 = 0 because x_0 is known exactly given x_1 and x_0.
        self.beta_tilde = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.beta
        # Reverse variance sigma_t^2 (Sec. 3.2). At t = 1 it only enters the decoder L_0 (no noise is added there
        # when sampling); the official code puts beta~_2 there for both choices ("fixedlarge": "to get a better
        # decoder log likelihood"; "fixedsmall" clips the zero beta~_1 the same way).
        sigma2 = self.beta if variance == "beta" else self.beta_tilde
        self.sigma2 = torch.cat([self.beta_tilde[1:2], sigma2[1:]])
        # Eq. 7: posterior mean mu~_t = coef_x0 * x_0 + coef_xt * x_t.
        self.coef_x0 = self.alpha_bar_prev.sqrt() * self.beta / (1 - self.alpha_bar)
        self.coef_xt = self.alpha.sqrt() * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        # Eq. 12's weights lambda_t and Eq. 8's constant C_t per dimension (zero for sigma^2 = beta~), for loss "elbo".
        self.lam = self.beta ** 2 / (2 * self.sigma2 * self.alpha * (1 - self.alpha_bar))
        self.C = 0.5 * (torch.log(self.sigma2 / self.beta_tilde) + self.beta_tilde / self.sigma2 - 1)
        self.C[0] = 0                                                          # (t = 1 takes the decoder term instead)
        self.copies = {}  # (table name, device, dtype) -> the float64 CPU master cast and moved there, made once

    def at(self, name, i, x):
        """extract(self.<name>, i, x) from a copy of the table in x's dtype on x's device, made once per (device,
        dtype): cast on the CPU, then moved (MPS has no float64), so a sampling step makes no host-device copy."""
        key = (name, x.device, x.dtype)
        if key not in self.copies:
            self.copies[key] = getattr(self, name).to(x.dtype).to(x.device)
        return extract(self.copies[key], i, x)

    def q_sample(self, x0, i, noise):
        """Eq. 4 of Ho et al. (2020): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return self.at("sqrt_alpha_bar", i, x0) * x0 + self.at("sqrt_one_minus_alpha_bar", i, x0) * noise

    def q_posterior(self, x0, x_t, i):
        """Eqs. 6-7 of Ho et al. (2020): mean mu~_t and variance beta~_t of q(x_{t-1} | x_t, x_0), with
        mu~_t = (sqrt(alpha_bar_{t-1}) beta_t x_0 + sqrt(alpha_t)(1 - alpha_bar_{t-1}) x_t) / (1 - alpha_bar_t)."""
        mean = self.at("coef_x0", i, x_t) * x0 + self.at("coef_xt", i, x_t) * x_t
        return mean, self.at("beta_tilde", i, x_t)

    def predict_x0(self, x_t, i, eps):
        """Eq. 4 of Ho et al. (2020) inverted: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - self.at("sqrt_one_minus_alpha_bar", i, x_t) * eps) / self.at("sqrt_alpha_bar", i, x_t)

    def sample_i(self, B, device, generator=None):
        """Algorithm 1 of Ho et al. (2020), line 3: indices i (B,) uniform on 0..T-1, i.i.d. or low-discrepancy
        (VDM App. I.1: i = floor(T u) with u from low_discrepancy_uniform). From generator (default: the global RNG)."""
        if self.t_sampling == "iid":
            return torch.randint(self.T, (B,), device=device, generator=generator)
        u = low_discrepancy_uniform(B, device, generator)  # (B,) in [0, 1), one per interval [k/B, (k+1)/B)
        return (u * self.T).long().clamp(max=self.T - 1)

    def loss(self, model, x0, i=None, noise=None):
        """Algorithm 1 of Ho et al. (2020): one minibatch estimate of the training objective (i, noise drawn if None).

        "simple": L_simple = || eps - eps_theta(x_t, t) ||^2 (Eq. 14), mean over pixels and batch (the paper's choice).
        "elbo": one term of the bound per example, in bits/dim as the official "kl" loss (T times its mean is
          (L - L_T)/D): t >= 2: L_{t-1} = lambda_t || eps - eps_theta ||^2 + C_t (Eq. 12, lambda_t = beta_t^2 /
          (2 sigma_t^2 alpha_t (1 - alpha_bar_t)); C_t is Eq. 8's constant, zero for sigma^2 = beta~, so the term is
          Eq. 5's KL exactly); t = 1: L_0 = -log p_theta(x_0 | x_1) (Eq. 13).
        """
        i = self.sample_i(x0.shape[0], x0.device) if i is None else i
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, i, noise)                    # Eq. 4
        eps = model(x_t, i)                                  # eps_theta(x_t, t)
        if self.loss_type == "simple":
            return (noise - eps).pow(2).mean()               # Eq. 14
        kl = self.at("lam", i, x0) * (noise - eps).pow(2) + self.at("C", i, x0)  # L_{t-1}, t >= 2 (Eq. 12 + C_t), nats
        mean = self.mean_from_eps(x_t, i, eps)               # Eq. 11: decoder mean at t = 1
        nll0 = -discretized_gaussian_log_likelihood(x0, mean, self.at("sigma2", i, x0), self.levels)
        first = (i == 0).reshape(-1, *([1] * (x0.dim() - 1)))  # t = 1 takes the decoder term
        per_elem = torch.where(first, nll0.to(x0.dtype), kl)
        return per_elem.flatten(1).mean(1).mean() / math.log(2)  # bits/dim of the sampled term

    # ------------------------------------------------------------------------------------------------
    # Sampler

    def mean_from_eps(self, x_t, i, eps):
        """Eq. 11 of Ho et al. (2020): mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t)."""
        return (x_t - self.at("eps_coef", i, x_t) * eps) / self.at("sqrt_alpha", i, x_t)

    def p_mean_variance(self, model, x_t, i, clip_denoised=None):
        """Eq. 1 of Ho et al. (2020): mean (Eq. 11) and variance (Sec. 3.2) of p_theta(x_{t-1} | x_t). clip_denoised
        (default: this object's) takes Eq. 7's mean at clip(x0_hat, -1, 1), as the official code samples images, NOT
        as Algorithm 2 prints; unclipped both forms are the same number (Eq. 7 with Eq. 4 inverted = Eq. 11)."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        eps = model(x_t, i)
        if clip:
            x0_hat = self.predict_x0(x_t, i, eps).clamp(-1, 1)
            mean, _ = self.q_posterior(x0_hat, x_t, i)
        else:
            mean = self.mean_from_eps(x_t, i, eps)
        return mean, self.at("sigma2", i, x_t)

    @torch.no_grad()
    def p_sample(self, model, x_t, i, generator=None, clip_denoised=None):
        """One step of Algorithm 2 of Ho et al. (2020): x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 1.
        i (an int) is the index of t for the whole batch."""
        i_b = torch.full((x_t.shape[0],), i, dtype=torch.long, device=x_t.device)  # (B,)
        mean, var = self.p_mean_variance(model, x_t, i_b, clip_denoised)
        if i == 0:
            return mean  # the last step (t = 1) returns the mean: no noise is added
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype,
                        device=generator.device if generator is not None else x_t.device).to(x_t.device)
        return mean + var.sqrt() * z

    @torch.no_grad()
    def sample(self, model, shape, generator=None, clip_denoised=None, device="cpu", dtype=torch.float32, x_T=None):
        """Algorithm 2 of Ho et al. (2020): ancestral sampling from x_T ~ N(0, I) (or the x_T given) down to x_0.
        generator drives x_T and every z (fixed noise -> comparable grids)."""
        g_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, dtype=dtype, device=g_device).to(device) if x_T is None else x_T
        for i in reversed(range(self.T)):  # paper t = T, ..., 1
            x = self.p_sample(model, x, i, generator, clip_denoised)  # x_{t-1} from x_t
        return x

    # ------------------------------------------------------------------------------------------------
    # Evaluation

    @torch.no_grad()
    def nll_bpd(self, model, x0, clip_denoised=None, return_terms=False, generator=None):
        """Eq. 5 of Ho et al. (2020): the variational bound L = L_T + sum_{t>1} L_{t-1} + L_0, in bits/dim, (B,).

        L_T = KL(q(x_T | x_0) || N(0, I)); L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) with one
        x_t ~ q(x_t | x_0) per t (T network calls); L_0 from Eq. 13. Summed in the widest float. Noise: generator."""
        B, D, dev, dt = x0.shape[0], x0[0].numel(), x0.device, wide(x0.device)
        ab_T = self.alpha_bar[-1].item()                                      # a CPU master: no device sync
        prior = normal_kl(math.sqrt(ab_T) * x0.to(dt), torch.tensor(1 - ab_T, dtype=dt, device=dev),
                          torch.zeros((), device=dev), torch.ones((), dtype=dt, device=dev))  # L_T
        prior = prior.flatten(1).sum(1)
        diffusion, decoder = torch.zeros(B, dtype=dt, device=dev), torch.zeros(B, dtype=dt, device=dev)
        for i in range(self.T):
            i_b = torch.full((B,), i, dtype=torch.long, device=dev)           # (B,)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev)
            x_t = self.q_sample(x0, i_b, noise)                                 # Eq. 4
            mean, var = self.p_mean_variance(model, x_t, i_b, clip_denoised)   # p_theta(x_{t-1} | x_t)
            if i == 0:   # L_0, Eq. 13
                decoder = -discretized_gaussian_log_likelihood(x0, mean, var, self.levels).flatten(1).sum(1)
            else:        # L_{t-1}, Eqs. 5-7
                q_mean, q_var = self.q_posterior(x0, x_t, i_b)
                kl = normal_kl(*(v.to(dt) for v in (q_mean, q_var, mean, var)))
                diffusion += kl.flatten(1).sum(1)
        to_bpd = 1.0 / (D * math.log(2))
        total = (prior + diffusion + decoder) * to_bpd
        if return_terms:
            return total, {"prior": prior * to_bpd, "diffusion": diffusion * to_bpd, "decoder": decoder * to_bpd}
        return total


# -----------------------------------------------------------------------------
# VDM: Kingma, Salimans, Poole, Ho (2021), "Variational Diffusion Models", arXiv 2107.00630v6. Every citation in
# this section is VDM's. VDM writes z_t = alpha_t x + sigma_t eps (VDM Eq. 1), its alpha_t^2 = DDPM's alpha_bar_t,
# sigma_t^2 = 1 - alpha_bar_t, and names a schedule by its log-SNR gamma (VDM Eqs. 2, 5):
#     SNR(t) = alpha_t^2 / sigma_t^2 = exp(-gamma(t)),  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)).
# Continuous time t in [0, 1]; model callables get 999 t (common.py's convention for continuous inputs).

def low_discrepancy_uniform(B, device="cpu", generator=None):
    """VDM App. I.1 (Kingma et al. 2021): u_i = mod(u_0 + i/B, 1), i = 0..B-1, one u_0 ~ U(0, 1): one u_i in each
    interval [i/B, (i+1)/B), each alone uniform (every loss estimate stays unbiased). On device, in its widest float."""
    dt = wide(device)
    u_0 = torch.rand((), generator=generator, dtype=dt, device=device)
    return (u_0 + torch.arange(B, dtype=dt, device=device) / B) % 1


def gamma_discrete(diffusion):
    """VDM Eq. 5 for DDPM's tables: gamma_t = -log SNR_t = log((1 - alpha_bar_t) / alpha_bar_t), at index i = t - 1."""
    return torch.log1p(-diffusion.alpha_bar) - torch.log(diffusion.alpha_bar)


def vdm_discrete_term(diffusion, x0, x0_hat, i):
    """VDM Eq. 13, one term per example: (SNR_{t-1} - SNR_t) / 2 || x0 - x0_hat ||^2, which is Ho et al.'s L_{t-1}
    (Eq. 5 there) KL(q(x_{t-1} | x_t, x0) || q(x_{t-1} | x_t, x0_hat)) when sigma_t^2 = beta~_t. t >= 2 (i >= 1)."""
    snr = diffusion.alpha_bar / (1 - diffusion.alpha_bar)                    # float64, on the CPU
    d_snr = snr[(torch.arange(diffusion.T) - 1).clamp(min=0)] - snr         # SNR_{t-1} - SNR_t at every i
    return 0.5 * d_snr.to(x0.dtype).to(x0.device)[i] * (x0 - x0_hat).flatten(1).pow(2).sum(1)


def gamma_linear_snr(t, gamma_min=-13.3, gamma_max=5.0):
    """VDM's fixed schedule (official code: "fixed_linear"): gamma(t) = gamma_min + (gamma_max - gamma_min) t."""
    return gamma_min + (gamma_max - gamma_min) * t


def gamma_cosine(t, gamma_min=-13.3, gamma_max=5.0):
    """Nichol & Dhariwal's cosine schedule as a log-SNR, gamma = 2 log tan(pi u / 2) (alpha_bar = cos^2(pi u / 2)),
    u linear in t between gamma_linear_snr's endpoints: only the shape between them differs (VDM Sec. 5.1's test)."""
    u0, u1 = (2 / math.pi * math.atan(math.exp(g / 2)) for g in (gamma_min, gamma_max))
    return 2 * torch.log(torch.tan(math.pi / 2 * (u0 + (u1 - u0) * t)))


GAMMA_REF = (-13.3, 5.0)  # VDM's gamma_min, gamma_max: the fixed schedule's endpoints and the learned one's start
GAMMAS = {"linear_snr": gamma_linear_snr, "cosine": gamma_cosine}


class MonotoneGamma(torch.nn.Module):
    """VDM App. H: a learned schedule gamma_phi(t), monotone because every weight is kept positive (softplus):
    gamma~(t) = l1(t) + l3(sigmoid(l2(l1(t)))), layers 1 -> 1 -> n -> 1, rescaled to the endpoints (VDM App. I.2),
    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)); endpoints fixed at
    -13.3, 5.0 or learned (learn_endpoints). float64 (float32 on MPS)."""

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, n=1024, learn_endpoints=False):
        super().__init__()
        p = lambda v: torch.nn.Parameter(torch.as_tensor(v, dtype=torch.float64))  # noqa: E731
        self.w1, self.b1 = p([[1.0]]), p([0.0])
        self.w2, self.b2 = p(torch.randn(n, 1, dtype=torch.float64)), p(torch.randn(n, dtype=torch.float64))
        self.w3 = p(torch.randn(1, n, dtype=torch.float64) / n)
        self.ends = torch.nn.Parameter(torch.tensor([gamma_min, gamma_max], dtype=torch.float64),
                                       requires_grad=learn_endpoints)

    def shape(self, t):  # the unnormalised monotone network gamma~(t), t (B,)
        pos = torch.nn.functional.softplus
        h1 = t.to(self.w1.dtype)[:, None] @ pos(self.w1).T + self.b1            # (B, 1)
        h2 = torch.sigmoid(h1 @ pos(self.w2).T + self.b2)                       # (B, n)
        return (h1 + h2 @ pos(self.w3).T)[:, 0]                                 # (B,)

    def forward(self, t):
        ends = self.shape(torch.tensor([0.0, 1.0], dtype=self.w1.dtype, device=t.device))
        g0, g1 = self.ends[0], self.ends[1]                                     # gamma(0), gamma(1)
        g = g0 + (g1 - g0) * (self.shape(t.reshape(-1)) - ends[0]) / (ends[1] - ends[0])
        return g.reshape(t.shape)


def vdm_draws(shape, t_sampling, device, generator=None):
    """One minibatch's randomness for vlb_continuous, in this order: t ~ U(0, 1) (B,) i.i.d. or low-discrepancy
    (VDM App. I.1), the noise eps of z_t and the noise of z_0 (shape); on device, in its widest float."""
    B, dt = shape[0], wide(device)
    t = (low_discrepancy_uniform(B, device, generator) if t_sampling == "low_discrepancy"
         else torch.rand(B, generator=generator, dtype=dt, device=device))
    return [t] + [torch.randn(shape, generator=generator, dtype=dt, device=device) for _ in range(2)]


def vlb_continuous(model, x0, gamma=gamma_linear_snr, levels=None, t_sampling="iid", T=None, net_dtype=None,
                   generator=None, draws=None):
    """VDM Eq. 11 with VDM Eq. 17: the continuous-time bound, eps form; (B,) bits/dim and its terms.

    -log p(x) <= L_prior + L_recon + L_inf:  L_prior = KL(q(z_1 | x) || N(0, I));
      L_inf = 1/2 E_{t ~ U(0,1), eps} [ gamma'(t) || eps - eps_hat(z_t; t) ||^2 ],  z_t = alpha_t x + sigma_t eps;
      L_recon = -log p(x | z_0): N(z_0 / alpha_0, sigma_0^2 / alpha_0^2) over x's bin (Ho et al.'s Eq. 13 decoder;
      VDM takes a softmax over the levels). gamma'(t) by autograd: a learned gamma gets gradients too.
    T given: VDM Eq. 13's L_T = T/2 E_j [ (SNR(s) - SNR(t)) || x - x_hat ||^2 ], t = j/T, s = (j-1)/T, j in 1..T,
    instead of L_inf (it decreases to L_inf as T grows, VDM Sec. 4.1). Arithmetic in the widest float; the network
    gets net_dtype (default: float32 for a Module, the wide float for exact oracles). draws: (t, eps, eps_0) from
    vdm_draws (the training loop's, for the global batch), else drawn here from generator.
    """
    D, dev, dt = x0[0].numel(), x0.device, wide(x0.device)
    x0 = x0.to(dt)
    t, eps, eps_0 = draws if draws is not None else vdm_draws(x0.shape, t_sampling, dev, generator)
    if T is not None:
        t = torch.ceil(t.to(dt) * T).clamp(min=1) / T                         # t = j/T, j in 1..T (VDM's i)
    t = t.to(dt).detach().requires_grad_(True)
    with torch.enable_grad():
        g_t = gamma(t)                                                        # (B,)
        dg_dt = torch.autograd.grad(g_t.sum(), t, create_graph=True)[0]     # gamma'(t) > 0
    alpha, sigma = expand(torch.sigmoid(-g_t).sqrt(), x0), expand(torch.sigmoid(g_t).sqrt(), x0)
    eps = eps.to(dt)
    z_t = alpha * x0 + sigma * eps
    if net_dtype is None:
        net_dtype = torch.float32 if isinstance(model, torch.nn.Module) else dt  # oracles take the wide float
    eps_hat = model(z_t.to(net_dtype), (999 * t.detach()).to(net_dtype))      # eps_hat(z_t; t), t passed as 999 t
    if T is None:   # L_inf (VDM Eq. 17): 1/2 gamma'(t) ||eps - eps_hat||^2
        diffusion = 0.5 * dg_dt * (eps - eps_hat.to(dt)).flatten(1).pow(2).sum(1)
    else:           # L_T (VDM Eq. 13) with x_hat = (z_t - sigma_t eps_hat) / alpha_t (VDM Eq. 10)
        x_hat = (z_t - sigma * eps_hat.to(dt)) / alpha
        d_snr = torch.exp(-gamma(t.detach() - 1.0 / T)) - torch.exp(-g_t)
        diffusion = 0.5 * T * d_snr * (x0 - x_hat).flatten(1).pow(2).sum(1)
    g_01 = gamma(torch.tensor([0.0, 1.0], dtype=dt, device=dev))
    var_1 = torch.sigmoid(g_01[1])                                            # sigma_1^2
    prior = 0.5 * ((1 - var_1) * x0 ** 2 + var_1 - torch.log(var_1) - 1).flatten(1).sum(1)
    alpha_0, var_ratio = torch.sigmoid(-g_01[0]).sqrt(), torch.exp(g_01[0])  # sigma_0^2 / alpha_0^2 = exp(gamma_0)
    z_0 = alpha_0 * x0 + torch.sigmoid(g_01[0]).sqrt() * eps_0.to(dt)
    recon = -discretized_gaussian_log_likelihood(x0, z_0 / alpha_0, var_ratio.expand_as(x0), levels).flatten(1).sum(1)
    to_bpd = 1.0 / (D * math.log(2))
    terms = {"prior": prior * to_bpd, "diffusion": diffusion * to_bpd, "recon": recon * to_bpd}
    return terms["prior"] + terms["diffusion"] + terms["recon"], terms


def fourier_features(z, levels):
    """VDM Sec. 3.4, App. C: channels sin(f z), cos(f z) that resolve z at the data's quantisation step (at high SNR
    q(z_t) peaks at the K levels). VDM's f = 2^7 pi, 2^8 pi for 8-bit data are periods of two steps and one; our
    levels are 2/(K-1) apart: f = (K-1) pi / 2, (K-1) pi. z (B, C, H, W) -> (B, 4C, H, W): sin, cos f1; sin, cos f2."""
    f = [(levels - 1) * math.pi / 2, (levels - 1) * math.pi]
    return torch.cat([fn(w * z) for w in f for fn in (torch.sin, torch.cos)], dim=1)


class VDMNet(torch.nn.Module):
    """The denoiser eps_hat(z_t; .) and, for --schedule learned, gamma_phi: one state_dict. Called as model(z_t, 999 t).

    cond="gamma": the network sees the noise level 999 (gamma(t) - gamma_min) / (gamma_max - gamma_min) with VDM's
    reference endpoints (the official ScoreUNet's), so eps_hat is a function of (z, SNR) as VDM Sec. 5.1 (VDM Eq. 18)
    assumes; = 999 t for linear_snr; gradients reach gamma_phi through it. cond="t": 999 t. fourier_levels K > 0:
    fourier_features(z, K) as extra input (5 C channels). DDPM's U-Net, not VDM's (full resolution, z added to eps_hat).
    """

    def __init__(self, net, learned, learn_endpoints=False, cond="t", fourier_levels=0):
        super().__init__()
        self.net, self.cond, self.fourier_levels = net, cond, fourier_levels
        self.gamma = MonotoneGamma(learn_endpoints=learn_endpoints) if learned else None

    def forward(self, z, t999):
        if self.cond == "gamma":  # t = t999 / 999 (float32 rounding of t: ~1e-7, harmless for gamma)
            with torch.autocast(z.device.type, enabled=False):  # gamma stays in its own precision under bf16
                g = self.gamma_fn()(t999.to(wide(t999.device)) / 999)
            t999 = 999 * (g - GAMMA_REF[0]) / (GAMMA_REF[1] - GAMMA_REF[0])
        if self.fourier_levels:
            z = torch.cat([z, fourier_features(z, self.fourier_levels)], dim=1)
        return self.net(z, t999.to(z.dtype))

    def gamma_fn(self):
        return self.gamma if self.gamma is not None else gamma_linear_snr


def vdm_backward(model, bpd, terms, schedule_grad):
    """Gradients for one VDM minibatch. "bound": everything descends the mean bits/dim. "variance" (VDM Sec. 5.3):
    the bound depends on the schedule only through its endpoints (VDM Sec. 5.1), so gamma_phi's interior descends
    the estimator's variance, i.e. E[L_diff^2] (VDM App. I.2); the denoiser and the endpoints descend the bound."""
    loss = bpd.mean()
    if schedule_grad != "variance" or getattr(model, "gamma", None) is None:
        loss.backward()
        return
    interior = [p for n, p in model.gamma.named_parameters() if n != "ends" and p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in interior)]
    g_rest = torch.autograd.grad(loss, rest, retain_graph=True, allow_unused=True) if rest else ()
    g_int = torch.autograd.grad(terms["diffusion"].pow(2).mean(), interior, allow_unused=True)
    for p, g in zip(rest + interior, g_rest + g_int):
        p.grad = g


@torch.no_grad()
def vdm_sampler(vdm_net, T, variance="beta_tilde", clip=False, levels=None, net=None):
    """VDM Eq. 9 as a DDPM chain: (DDPM, model) on the grid t_i = (i+1)/T, alpha_bar_i = sigmoid(-gamma(t_i)),
    model(x, i) = net(x, 999 t_i) (net: default vdm_net). alpha_bar before the first step is 1 (t = 0 is the data x,
    not z_0); with sigma^2 = beta~ each step is p(z_s | z_t) = q(z_s | z_t, x = x_hat), and the last returns x_hat,
    where VDM samples z_0 and decodes it. gamma runs on vdm_net's device, the float64 tables on the CPU."""
    gamma = vdm_net.gamma_fn()
    dev = next(vdm_net.parameters(), torch.zeros(())).device if isinstance(vdm_net, torch.nn.Module) else "cpu"
    t_grid = torch.arange(1, T + 1, dtype=wide(dev), device=dev) / T
    ab = torch.sigmoid(-gamma(t_grid).detach().cpu().double())                  # alpha_{t_i}^2, float64 on the CPU
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])          # t = 0: the data, alpha_0 = 1
    diffusion = DDPM(T, 1 - ab / ab_prev, variance=variance, clip_denoised=clip, levels=levels)
    call = vdm_net if net is None else net
    return diffusion, lambda x, i: call(x, (999 * (i + 1) / T).to(x.dtype))


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
# Training loop (Algorithm 1) and the CLI modes

# Fields that --sample / --eval-nll take from the command line over the checkpoint's (how and where to run, not what);
# a --resume simply runs with the values given (none of them is in MUST_MATCH); a checkpoint may lack them.
RUNTIME = ("out", "device", "seed", "clip_denoised", "batch_size", "precision", "compile", "deterministic",
           "stream_gb", "ckpt", "n_samples", "n_eval")
# Fields a checkpoint's "config" leaves out: where and how a run ran (paths, device, precision, the sampler's
# clipping), not what defines the model, the diffusion or the training recipe.
NOT_STORED = ("out", "device", "clip_denoised", "precision", "compile", "deterministic", "stream_gb", "ckpt",
              "n_samples", "n_eval")
# Fields a resumed run must share with the checkpoint: they fix the network and the diffusion (VDM's: --loss-type vlb).
MUST_MATCH = ("dataset", "image_size", "model", "T", "schedule", "beta_1", "beta_T", "variance", "loss_type")
# Fields added after checkpoints of this script were first written: an older file without them has their default.
LATER = ("adam_beta2",)
VDM_MUST_MATCH = ("learn_endpoints", "cond", "fourier")


def data_levels(dataset):
    """K, the number of values per dimension of a dataset as common.load_data delivers it (None: continuous)."""
    return 17 if dataset == "digits" else (None if dataset in TOYS else 256)


def make_model(config):
    """The network for a checkpoint's config dict (as in ckpt.pt), on the CPU: common.MLP for 2-D toys, else the
    U-Net; for --loss-type vlb inside a VDMNet (with the learned schedule and Fourier features it asks for)."""
    vlb = config.get("loss_type") == "vlb"
    fourier = vlb and config["fourier"] == "on"
    if config["dataset"] in TOYS:
        net = MLP()
    else:
        C, H = config["data_shape"][0], config["data_shape"][-1]
        net = UNet(in_ch=5 * C if fourier else C, image_size=H, out_ch=C, **PRESETS[config["model"]])
    if not vlb:
        return net
    return VDMNet(net, learned=config["schedule"] == "learned", learn_endpoints=config["learn_endpoints"],
                  cond=config["cond"], fourier_levels=data_levels(config["dataset"]) if fourier else 0)


def place(net, device):
    """net on device; on MPS (no float64) a learned schedule's float64 parameters become float32."""
    return net.to(device, torch.float32) if device.type == "mps" else net.to(device)


def make_diffusion(cfg, levels, net, net_fn):
    """(DDPM, model(x, i)) for a Config: clip_denoised "auto" clips x0_hat for images only. For --loss-type vlb the
    DDPM discretises net's gamma (vdm_sampler) and model maps i to 999 t; else model is net_fn itself."""
    clip = {"on": True, "off": False, "auto": cfg.dataset not in TOYS}[cfg.clip_denoised]
    if cfg.loss_type == "vlb":
        return vdm_sampler(net, cfg.T, clip=clip, levels=levels, net=net_fn)
    return DDPM(cfg.T, cfg.schedule, cfg.beta_1, cfg.beta_T, cfg.variance, cfg.loss_type, clip, levels,
                cfg.t_sampling), net_fn


def read_ckpt(path, cfg=None):
    """load_checkpoint plus this script's checks: every entry and config field present; for a resume (cfg given)
    the fields that fix the network and the diffusion equal to cfg's."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config")
    missing = [k for k in ("config", "step", "model", "ema", "optimizer", "rng") if k not in ckpt] or [
        k for k in (*(f.name for f in dataclasses.fields(Config) if f.name not in RUNTIME + LATER), "data_shape")
        if not isinstance(config, dict) or k not in config]
    if missing:
        raise DataError(f"{path}: a {SCRIPT} checkpoint with missing fields ({', '.join(missing)})")
    for k in (*MUST_MATCH, *(VDM_MUST_MATCH if cfg.loss_type == "vlb" else ())) if cfg is not None else ():
        if config[k] != getattr(cfg, k):
            raise DataError(f"{path}: trained with {k}={config[k]!r}, this run has {k}={getattr(cfg, k)!r}")
    return ckpt


def train(cfg):
    """Algorithm 1 of Ho et al. (2020) with the official recipe: Adam, warm-up, gradient clipping, EMA.
    Under torchrun each rank computes the loss on its slice of the global batch (see "Several processes")."""
    rank, world, device = setup_distributed(pick_device(cfg.device))  # (0, 1, device) without torchrun
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None, stream_gb=cfg.stream_gb)
    if recipe := follow_data(cfg, DATA_RECIPES, data.u.shape[1:], device):
        log(f"for {'x'.join(map(str, data.u.shape[1:]))} images on {device.type}: {recipe}", flush=True)
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)  # the global batch and this rank's slice
    is_toy, vlb = cfg.dataset in TOYS, cfg.loss_type == "vlb"
    if cfg.fourier == "auto":  # resolved before it is stored or compared with a checkpoint's
        cfg.fourier = "on" if vlb and not is_toy else "off"
    config = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_STORED},
              "data_shape": list(data.u.shape[1:])}
    model = place(make_model(config), device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # EMA of parameters only (the nets have no buffers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2))
    # The data generator, alike on every rank, draws all of the global batch's randomness (indices, flips, t, noise);
    # the global RNGs, one stream per rank, are left to dropout.
    data_gen = make_generator(cfg.seed, device)
    torch.manual_seed(cfg.seed + rank)
    os.makedirs(cfg.out, exist_ok=True)
    path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if cfg.resume:  # every rank reads the same checkpoint
        ckpt = read_ckpt(path, cfg)
        if list(ckpt["config"]["data_shape"]) != config["data_shape"]:
            raise DataError(f"{path}: data shape {ckpt['config']['data_shape']}, this run has {config['data_shape']}")
        if not isinstance(ckpt["rng"], dict) or "data" not in ckpt["rng"]:
            raise DataError(f"{path}: its \"rng\" holds no data generator state: it samples, but cannot resume")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        for g in opt.param_groups:  # the checkpoint's moments with this run's beta2 (lr, too, is this run's)
            g["betas"] = (0.9, cfg.adam_beta2)
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank, path)  # the data generator, and this rank's CPU and CUDA/MPS streams
        log(f"resumed from {path} at step {step}", flush=True)
    net = network(model, autocast, cfg.compile)  # what the loss calls: in autocast, float32 out
    if not vlb:
        diffusion, _ = make_diffusion(cfg, data.levels, model, net)
    x_data, shape = training_images(data, device, B, part, cfg.seed), tuple(data.u.shape[1:])  # uint8, on the device
    checked, loss_sum = [step], torch.zeros((), device=device)  # the last step checked, the loss sum since (NaN stays)
    log_sum, n_log = torch.zeros((), device=device), 0   # since the last progress line

    def check_finite():
        # The loss's one host sync, at log and checkpoint steps; the mean over the ranks: every rank decides alike.
        nonlocal loss_sum
        if not math.isfinite(mean_over_ranks(loss_sum, world).item()):
            raise DataError(f"non-finite loss between steps {checked[0] + 1} and {step}; "
                            f"last good checkpoint kept in {path}")
        loss_sum, checked[0] = torch.zeros((), device=device), step

    def checkpoint():
        check_finite()
        if any_rank(has_nonfinite(model, ema), world, device):  # never save NaN weights; the previous one stays
            raise DataError(f"non-finite weights at step {step}; last good checkpoint kept in {path}")
        rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
        if rank == 0:
            save_checkpoint(path, {"script": SCRIPT, "config": config, "step": step,
                                   "model": model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": rng})

    def sample_grid():
        # Fixed noise (its own generator, so the data generator is untouched): the grids differ only by the weights.
        d, fn = make_diffusion(cfg, data.levels, ema, network(ema, autocast))
        g = make_generator(cfg.seed + 1, device)
        x = d.sample(fn, (2000 if is_toy else 64, *shape), generator=g, device=device)
        write_samples(x, os.path.join(cfg.out, f"grid_{step:07d}.png"), cfg.dataset)

    stop, t0, step0, stopping = StopFlag(), time.time(), step, False
    model.train()
    while step < cfg.steps and not stopping:
        # The global batch's randomness, all from data_gen in this order on every rank; this rank keeps part of each.
        idx = draw_indices(x_data, B, device, data_gen, step)  # i.i.d. minibatch: exact resume
        if data.flip:  # random horizontal flips (the paper's CIFAR-10 augmentation)
            flip = (torch.rand(B, device=device, generator=data_gen) < 0.5).reshape(-1, 1, 1, 1)
        if vlb:  # VDM: continuous t, the noise of z_t and that of z_0
            t, eps, eps_0 = vdm_draws((B, *shape), cfg.t_sampling, device, data_gen)
        else:
            i = diffusion.sample_i(B, device, data_gen)                                     # Algorithm 1, line 3
            noise = torch.randn((B, *shape), generator=data_gen, device=device)             # Algorithm 1, line 4
        x0 = levels_to_unit(x_data[idx[part]], data.levels)  # to [-1, 1], float32, on the device
        if data.flip:
            x0 = torch.where(flip[part], x0.flip(-1), x0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))  # linear warm-up
        opt.zero_grad(set_to_none=True)
        if vlb:  # VDM Eqs. 11, 17: the bound itself, bits/dim (a learned gamma trains jointly on it)
            bpd, terms = vlb_continuous(net, x0, model.gamma_fn(), data.levels, net_dtype=torch.float32,
                                        draws=(t[part], eps[part], eps_0[part]))
            loss = bpd.mean()
            vdm_backward(model, bpd, terms, cfg.schedule_grad)
        else:
            loss = diffusion.loss(net, x0, i[part], noise[part])  # Algorithm 1, line 5, on this rank's slice
            loss.backward()
        average_gradients(model, world)  # the gradient of the global batch's mean loss (gamma_phi's too), every rank
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # a NaN here shows in the weights' check
        opt.step()
        ema_update(ema, model, cfg.ema_decay)  # EMA of the parameters (App. B)
        step += 1
        loss_sum, log_sum, n_log = loss_sum + loss.detach(), log_sum + loss.detach(), n_log + 1  # on the device
        stopping = any_rank(stop.set, world, device)  # Ctrl-C / SIGTERM on any rank stops every rank after this step
        if step % cfg.log_every == 0 or step == cfg.steps:  # progress line: step, loss, it/s, ETA
            check_finite()
            rate = (step - step0) / (time.time() - t0)
            eta = (cfg.steps - step) / rate
            log(f"step {step}/{cfg.steps}  loss {mean_over_ranks(log_sum, world).item() / n_log:.4f}  {rate:.2f} it/s  "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            log_sum, n_log = torch.zeros((), device=device), 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            checkpoint()
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            sample_grid()  # a signal that comes during it stops the run after the next step
    if stopping:
        if rank == 0:
            sys.stderr.write(f"stopped at step {step}; checkpoint saved to {path}; continue with --resume\n")
        sys.exit(130)
    on = f" on {world} processes" if world > 1 else ""
    log(f"done: {step} steps in {time.time() - t0:.0f} s{on}; checkpoint {path}", flush=True)


def load_for_inference(cfg_overrides):
    """(cfg, ckpt, net, net_fn, device, rank, world) for --sample / --eval-nll: the EMA network of a checkpoint
    (without its data), or a released DDPM model in diffusers' format (a folder, or a .safetensors / .bin file:
    common.load_pretrained; T, betas, variance and clipping from its scheduler_config.json, else the paper's).
    net is on the device; net_fn is net wrapped by network() (precision, compile). Every rank loads the same."""
    path = cfg_overrides["ckpt"]
    if os.path.isdir(path) or path.endswith((".safetensors", ".bin")):
        net, info = load_pretrained(path)
        s, shape = info["schedule"], info["data_shape"]
        cfg = Config(dataset="cifar10" if shape == [3, 32, 32] else "pretrained", T=s["T"], schedule=s["schedule"],
                     beta_1=s["beta_1"], beta_T=s["beta_T"], variance=info["variance"],
                     clip_denoised="on" if info["clip_denoised"] else "off")  # the official sampler clips x0_hat
        ckpt = {"config": {**dataclasses.asdict(cfg), "data_shape": shape}}
    else:
        ckpt = read_ckpt(path)
        cfg = Config(**{f.name: ckpt["config"].get(f.name, f.default) for f in dataclasses.fields(Config)
                        if f.name not in NOT_STORED})  # an older file's paths, device, ...: ignored
        net = make_model(ckpt["config"])
        try:
            net.load_state_dict(ckpt["ema"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: EMA weights do not fit the network of its config "
                            f"({str(e).splitlines()[0]})") from None
    cfg = dataclasses.replace(cfg, **cfg_overrides)  # RUNTIME fields given on the command line
    rank, world, device = setup_distributed(pick_device(cfg.device))  # (0, 1, device) without torchrun
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    if has_nonfinite(net):
        raise DataError(f"{path}: the EMA weights contain NaN or inf")
    net = place(net, device).eval()
    return cfg, ckpt, net, network(net, autocast, cfg.compile), device, rank, world


def run_sample(cfg_overrides):
    """--sample: n images (or 2-D points) from the EMA network -> samples.png and samples.npz.

    Chunks of --batch-size samples, chunk k on rank k % world (torchrun), each from its own generator derived from
    --seed and its first sample's index: the samples depend on --seed and --batch-size only. Rank 0 writes them."""
    cfg, ckpt, net, net_fn, device, rank, world = load_for_inference(cfg_overrides)
    diffusion, model = make_diffusion(cfg, data_levels(cfg.dataset), net, net_fn)
    os.makedirs(cfg.out, exist_ok=True)
    shape, chunks = tuple(ckpt["config"]["data_shape"]), []
    for start, n in my_chunks(cfg.n_samples, cfg.batch_size, rank, world):
        g = chunk_generator(cfg.seed, start, device)  # x_T and every z of this chunk
        chunks.append((start, diffusion.sample(model, (n, *shape), generator=g, device=device).cpu()))
        if rank == 0:
            print(f"sampled {start + n}/{cfg.n_samples}", flush=True)
    x = gather_chunks(chunks, world)  # (n_samples, ...) in sample order, on the CPU
    if rank != 0:
        return
    toy = cfg.dataset in TOYS  # 2-D points: a scatter over the data; npz holds the raw float coordinates
    write_samples(x, os.path.join(cfg.out, "samples.png"), cfg.dataset)
    if toy:
        np.savez(os.path.join(cfg.out, "samples.npz"), arr_0=x.numpy())
    else:
        save_npz(x, os.path.join(cfg.out, "samples.npz"))
    on = f" on {world} processes" if world > 1 else ""
    print(f"wrote {cfg.out}/samples.png and {cfg.out}/samples.npz ({len(x)} samples{on})")


def run_eval_nll(cfg_overrides):
    """--eval-nll: the variational bound on held-out data in bits/dim (Eq. 5; VDM Eq. 11 for --loss-type vlb).

    Chunks of --batch-size examples, split over the ranks like --sample's, each with the generator of its first
    example's index: the per-example values do not depend on the ranks; rank 0 prints the mean over all of them."""
    cfg, ckpt, net, net_fn, device, rank, world = load_for_inference(cfg_overrides)
    data = load_data(cfg.dataset, train=False, image_size=cfg.image_size or None)
    diffusion, model = make_diffusion(cfg, data.levels, net, net_fn)
    x = data.x[:cfg.n_eval].to(device)
    chunks = []  # (start, (n, 4) CPU tensor of bits/dim, prior, diffusion, decoder per example)
    for start, n in my_chunks(len(x), cfg.batch_size, rank, world):
        xb = x[start:start + n]
        g = chunk_generator(cfg.seed, start, device)  # every x_t, t and noise of this chunk's bound
        if cfg.loss_type == "vlb":  # VDM Eq. 11 (VDM Eq. 17 diffusion term), mean of 16 low-discrepancy draws of t
            with torch.no_grad():
                runs = [vlb_continuous(net_fn, xb, net.gamma_fn(), data.levels, "low_discrepancy",
                                       net_dtype=torch.float32, generator=g) for _ in range(16)]
            mean = lambda k: torch.stack([r[1][k] for r in runs]).mean(0)  # noqa: E731
            bpd = torch.stack([r[0] for r in runs]).mean(0)
            terms = {"prior": runs[0][1]["prior"], "diffusion": mean("diffusion"), "decoder": mean("recon")}
        else:
            bpd, terms = diffusion.nll_bpd(model, xb, return_terms=True, generator=g)
        chunks.append((start, torch.stack([bpd, terms["prior"], terms["diffusion"], terms["decoder"]], 1).cpu()))
        if rank == 0:
            mine = torch.cat([c for _, c in chunks])[:, 0]
            share = f" (this process's {len(mine)})" if world > 1 else ""
            print(f"evaluated {start + n}/{len(x)}: running bits/dim {mine.mean():.4f}{share}", flush=True)
    values = gather_chunks(chunks, world)  # (n_eval, 4) in example order, on the CPU
    if rank == 0:
        total, prior, diffusion_bpd, decoder = values.mean(0).tolist()  # means over all of the examples
        print(f"bits/dim {total:.4f} on {len(values)} held-out {cfg.dataset} examples "
              f"(prior L_T {prior:.4f}, diffusion {diffusion_bpd:.4f}, decoder L_0 {decoder:.4f})")


# -----------------------------------------------------------------------------
# CLI

CHOICES = {"model": sorted(PRESETS), "schedule": ["linear", "cosine", "linear_snr", "learned"],
           "variance": ["beta", "beta_tilde"], "loss_type": ["simple", "elbo", "vlb"],
           "clip_denoised": ["auto", "on", "off"],
           "t_sampling": ["iid", "low_discrepancy"], "schedule_grad": ["bound", "variance"], "cond": ["gamma", "t"],
           "fourier": ["auto", "on", "off"], "precision": ["auto", "fp32", "tf32", "bf16"]}


def validate(cfg):
    """Reject settings that make no sense, with one ValueError naming the flag."""
    check_common(cfg, ("steps", "batch_size", "T", "ckpt_every", "sample_every", "log_every", "lr", "grad_clip",
                       "n_samples", "n_eval"))
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    if (cfg.loss_type == "vlb") != (cfg.schedule in ("linear_snr", "learned")):
        raise ValueError(f"--schedule {cfg.schedule} and --loss-type {cfg.loss_type} do not go together: "
                         "linear_snr / learned are log-SNR schedules for --loss-type vlb, linear / cosine otherwise")
    if cfg.fourier == "on" and (cfg.loss_type != "vlb" or cfg.dataset in TOYS):
        raise ValueError("--fourier on goes with --loss-type vlb on image data (its features resolve the levels)")
    if cfg.learn_endpoints and cfg.schedule != "learned":
        raise ValueError("--learn-endpoints needs --schedule learned (the fixed schedules have fixed endpoints)")
    if cfg.schedule == "linear" and not 0 < cfg.beta_1 <= cfg.beta_T < 1:
        raise ValueError(f"need 0 < --beta-1 <= --beta-T < 1, got {cfg.beta_1} and {cfg.beta_T}")
    if cfg.T < 2:
        raise ValueError(f"--T must be at least 2, got {cfg.T}")


MODES = {"train": "train (Algorithm 1); writes <out>/ckpt.pt and grids",
         "sample": "sample (Algorithm 2) from --ckpt's EMA weights",
         "eval_nll": "variational bound (Eq. 5) on held-out data, bits/dim"}


def main(argv=None):
    p = make_parser(Config, MODES, CHOICES, PRESET_CONFIGS, DATA_RECIPES)
    p.add_argument("--resume", action="store_true", help="continue <out>/ckpt.pt exactly (--steps is the run's total)")
    with one_line_errors():
        args, mode, cfg, given = parse_config(p, argv, Config, MODES, PRESET_CONFIGS)
        if mode != "train" and not cfg.ckpt:
            raise ValueError(f"--{mode.replace('_', '-')} needs --ckpt PATH")
        validate(cfg)
        if mode == "train":
            cfg.resume = args.resume  # not a Config field: it is an action, not a setting stored in ckpt.pt
            train(cfg)
        else:
            runtime = {k: v for k, v in given.items() if k in RUNTIME}
            (run_sample if mode == "sample" else run_eval_nll)(runtime)


if __name__ == "__main__":
    main()
