"""
DDIM: Denoising Diffusion Implicit Models -- fast deterministic sampling, inversion and interpolation.

Paper: Jiaming Song, Chenlin Meng, Stefano Ermon, "Denoising Diffusion Implicit Models", ICLR 2021,
arXiv:2010.02502. Equation numbers below are those printed in the arXiv version.

Commands (run from the repository root)
    python ddim.py --train                                   # L_simple on the 8x8 digits, ~5 min on 2 CPU cores
    python ddim.py --sample --ckpt runs/ddim/ckpt.pt --S 50 --eta 0 --n-samples 64
    python ddim.py --sample --ckpt runs/ddpm/ckpt.pt --S 50 --eta 0      # a ddpm.py checkpoint works too
    python ddim.py --sample --ckpt runs/ddim/ckpt.pt --S 20 --eta 1 --skip quad --grid trailing
    python ddim.py --sample --ckpt runs/ddim/ckpt.pt --S 100 --sigma hat  # Table 1's sigma-hat row
    python ddim.py --encode --ckpt runs/ddim/ckpt.pt --S 100             # x_0 -> x_T -> x_0, prints Table-2 error
    python ddim.py --interpolate --ckpt runs/ddim/ckpt.pt --S 50         # slerp between two latents x_T
    python ddim.py --train --resume                                   # finish an interrupted run exactly
    python ddim.py --train --device cuda --precision bf16 --compile   # on a GPU: bf16 autocast + torch.compile
    torchrun --nproc_per_node=8 ddim.py --train --device cuda        # 8 GPUs; --batch-size stays the global batch
    torchrun --nproc_per_node=8 ddim.py --sample --ckpt runs/ddim/ckpt.pt --n-samples 50000   # samples split over 8
--steps is always the number of training steps, --S the length of the sampling sub-sequence tau (Sec. 4.2).
Under torchrun --sample gives the same samples for any number of processes; --encode / --interpolate run on
rank 0 alone (see "Several processes" below).

Map (paper -> code)
    Eq. 4  q(x_t | x_0) = N(sqrt(alpha_t) x_0, (1 - alpha_t) I)    -> DDIM.q_sample
    Eq. 5 with gamma = 1 (L_1 = DDPM's L_simple), Theorem 1         -> DDIM.loss
    Eq. 9  predicted x_0 f_theta(x_t)                                -> DDIM.predict_x0
    Eq. 12 generalised generative step                               -> DDIM.step
    Eq. 16 sigma_tau_i(eta)                                          -> DDIM.sigma
    Table 1's sigma-hat (DDPM's larger variance, --sigma hat)        -> DDIM.sigma_hat, DDIM.step(hat=True)
    Sec. 4.2 + App. D.2 sub-sequence tau ("uniform"/"quad")          -> DDIM.timesteps
    Sec. 4.2, Eq. 12 on tau: the sampler                             -> DDIM.sample
    Eq. 13 / 14 run backwards and forwards (Sec. 4.3, 5.4)           -> DDIM.encode / DDIM.decode
    Sec. 5.3 + App. D.5 (Eq. 67) spherical interpolation of x_T      -> slerp, DDIM.interpolate
    Table 2 per-dimension reconstruction MSE on [0, 1] pixels        -> reconstruction_error
    Kingma et al. 2021 (VDM) App. I.1 low-discrepancy training t     -> low_discrepancy_uniform, DDIM.sample_t

Symbols (paper -> code)
    alpha_t      DDIM's alpha_t, the product of (1 - beta_s) for s <= t (code: alpha_bar[i])
    beta_t       the forward-process variances of DDPM (same schedule as ddpm.py)
    tau, S       increasing sub-sequence of [1..T] and its length S (--S); sampled in reverse
    sigma_t      standard deviation of the fresh noise in Eq. 12; eta scales it (Eq. 16)
    eps_theta    the network: eps_theta(x_t, t) predicts the noise in x_t
    x0_hat       Eq. 9: the "predicted x_0" inside Eq. 12

Conventions (the same in all four scripts of this project)
Time index: tensor index i is the paper's t = i + 1 (i = 0..T-1); the network is called as eps_theta(x, i), i a
LongTensor (B,), as in ddpm.py. The paper's alpha_0 := 1 (after Eq. 12) is alpha_bar "at index -1". Every sampler
grid is built once as a list of (t, t_prev) index pairs ending with t_prev = -1: the last step of every sampler
lands on alpha = 1 and returns the predicted x_0 with no noise added.

Data range: x in [-1, 1] (common.py maps the data there before any noise is added).

Devices: the float64 schedule stays on the CPU; samplers read it as Python floats, the training loss uses
float32 copies cached on the device (DDIM.table); slerp works in wide(device) on the device.

Notation clashes
    DDIM's alpha_t is DDPM's alpha-bar_t (the cumulative product), NOT DDPM's alpha_t = 1 - beta_t. This file
    stores it as `alpha_bar` so it reads the same as ddpm.py.
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

import torch

from common import (MLP, PRESETS, TOYS, DataError, UNet, draw_indices, levels_to_unit, load_data, load_pretrained,
                    save_grid, save_npz, save_scatter, training_images)

SCRIPT = "ddim"  # the name written into every checkpoint
EPS_SCRIPTS = ("ddim", "ddpm")  # checkpoints holding the same eps-network and schedule: both can be sampled


# -----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    dataset: str = "digits"       # common.load_data name, or a folder of images (paper: CIFAR-10, CelebA, LSUN)
    image_size: int = 0           # 0 = the dataset's native size
    stream_gb: float = 4.0        # not in the papers: an image folder over this many GB (as uint8) stays on disk and is
    #                               read by DataLoader workers while training; smaller sets are held on the device
    model: str = "tiny"           # UNet preset in common.PRESETS (paper: the DDPM U-Net, "cifar10"); toys use the MLP
    T: int = 1000                 # Sec. 5: T = 1000 for every model, as in DDPM
    schedule: str = "linear"      # DDPM's linear beta schedule (Sec. 5 reuses DDPM models); or "cosine"
    beta_1: float = 1e-4          # DDPM Sec. 4: beta_1 = 1e-4
    beta_T: float = 0.02          # DDPM Sec. 4: beta_T = 0.02
    steps: int = 2000             # total optimisation steps of --train (paper: DDPM's 800k on CIFAR-10)
    batch_size: int = 128         # DDPM App. B, DDIM configs: 128; global batch (torchrun); --sample: made at once
    lr: float = 1e-3              # paper (DDPM App. B): Adam 2e-4, as the official DDIM configs (raised for CPU)
    warmup: int = 100             # not in the papers; official code: DDPM 5000 steps, DDIM none (CPU: shortened)
    grad_clip: float = 1.0        # not in the papers; both official codes: 1.0 (DDIM's loss sums over pixels,
                                  # ours is DDPM's per-pixel mean, so the same 1.0 clips DDIM's harder)
    adam_beta2: float = 0.999     # Adam's beta2 (beta1 0.9): not in the paper; official code: 0.999
    ema_decay: float = 0.995      # paper (DDPM App. B) and DDIM configs: 0.9999 (shortened for 2000 steps)
    t_sampling: str = "iid"       # training t per minibatch: "iid" (DDPM Alg. 1) or "low_discrepancy" (VDM App. I.1);
                                  # the official DDIM code draws t antithetically (half t, half T - 1 - t)
    ckpt_every: int = 500         # steps between checkpoints
    sample_every: int = 500       # steps between sample grids from fixed noise (S, eta, sigma, skip, grid below)
    log_every: int = 100          # steps between progress lines
    out: str = "runs/ddim"        # folder for ckpt.pt and the PNGs
    seed: int = 0                 # seeds the data generator (indices, t, noise), dropout (seed + rank), sampling
    device: str = "auto"          # auto = cuda -> mps -> cpu
    precision: str = "auto"       # auto = tf32 on CUDA, fp32 elsewhere; fp32 | tf32 | bf16 (autocast; not the papers')
    compile: bool = False         # torch.compile the network (--compile; a one-line message where unsupported)
    deterministic: bool = False   # deterministic kernels (--deterministic): a CUDA run and its resume repeat bitwise
    ckpt: str = ""                # checkpoint to sample from (--sample / --encode / --interpolate)
    S: int = 50                   # Sec. 4.2: S = dim(tau), the sampling steps; Table 1: S in {10, 20, 50, 100, 1000}
    eta: float = 0.0              # Eq. 16: 0 = DDIM (deterministic), 1 = DDPM-like
    sigma: str = "eta"            # "eta" = sigma_tau_i(eta) of Eq. 16; "hat" = Table 1's sigma-hat (ignores eta)
    skip: str = "uniform"         # App. D.2: "uniform" tau_i ~ i, "quad" tau_i ~ i^2 (the paper's CIFAR-10 grid;
                                  # the default for images of 17-32 px, see SAMPLER_RECIPES)
    grid: str = "leading"         # "leading" = official range(0, T, T//S); "trailing" starts at t = T (Lin et al. 2024)
    clip_denoised: str = "auto"   # clamp x0_hat to [-1, 1]: auto = on for images, off for 2-D toys. Not in the
                                  # paper nor the official eta sampler; its sigma-hat sampler and DDPM's clip. Short
                                  # CPU runs need it: unclipped 50-step samples of a 500-step model diverge
    n_samples: int = 64           # images written by --sample (and used by --encode / --interpolate)
    n_interp: int = 9             # points on each interpolation strip (Fig. 6 of the paper shows 11)


# Defaults that follow the data (--train): the Config above is the CPU run on the 8x8 digits. For larger images the
# first line that fits the data's largest side and the device sets the values it names; a flag given wins. The
# training is DDPM's, so these are ddpm.py's recipes (the 32-px CPU line measured there on Fashion-MNIST, README);
# the CUDA lines are the papers' optimiser (DDPM App. B) in a shorter run, not yet measured.
DATA_RECIPES = [
    (16, "any", {}),  # the 8x8 digits
    (32, "cpu", dict(model="mini", steps=2000, batch_size=64, adam_beta2=0.95, ema_decay=0.98,
                     sample_every=1000)),  # Fashion-MNIST
    (32, "cuda", dict(model="small", steps=20_000, lr=2e-4, warmup=1000, ema_decay=0.9995, ckpt_every=2000,
                      sample_every=5000, log_every=500)),
    (1024, "cuda", dict(model="cifar10", steps=100_000, lr=2e-4, warmup=5000, ema_decay=0.9999, ckpt_every=5000,
                        sample_every=10_000, log_every=1000)),
]


# The sampler's grid follows the data too (--sample, --encode, --interpolate, --train's grids; read from the
# checkpoint's image shape, same format as above, a --skip given wins). App. D.2 takes the quadratic grid for
# CIFAR-10 and the linear one for its other, larger datasets. Measured on Fashion-MNIST with the 32-px CPU recipe
# (README): with eta = 0 the quadratic grid's FD is lower at each paired sampling seed.
SAMPLER_RECIPES = [
    (16, "any", {}),  # the 8x8 digits: the uniform grid of the README's tables
    (32, "any", dict(skip="quad")),  # CIFAR-10-sized images, as App. D.2
]


# -----------------------------------------------------------------------------
# Noise schedule (float64; copied from ddpm.py so this file stands alone)

def make_beta(schedule, T, beta_1, beta_T):
    """beta_1..beta_T as a float64 tensor (T,): DDPM's linear schedule, or the cosine one of Nichol & Dhariwal."""
    if schedule == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)  # DDPM Sec. 4
    if schedule == "cosine":
        s = 0.008  # Nichol & Dhariwal (2021), Eq. 17: f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
        u = torch.arange(T + 1, dtype=torch.float64) / T  # t/T for t = 0..T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # beta_t, clipped so that alpha_T > 0
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


def low_discrepancy_uniform(B, device="cpu", generator=None):
    """VDM App. I.1 (Kingma et al. 2021): u_i = mod(u_0 + i/B, 1), i = 0..B-1, one u_0 ~ U(0, 1): one u_i in each
    interval [i/B, (i+1)/B), each alone uniform (every loss estimate stays unbiased). On device, in its widest float."""
    dt = wide(device)
    u_0 = torch.rand((), generator=generator, dtype=dt, device=device)
    return (u_0 + torch.arange(B, dtype=dt, device=device) / B) % 1


class DDIM:
    """The diffusion quantities and samplers of Song et al. (2021) for one schedule of length T."""

    def __init__(self, T=1000, schedule="linear", beta_1=1e-4, beta_T=0.02, t_sampling="iid"):
        self.T, self.t_sampling = T, t_sampling
        self.beta = make_beta(schedule, T, beta_1, beta_T)       # (T,) float64, on the CPU (the masters)
        self.alpha_bar = torch.cumprod(1 - self.beta, dim=0)     # (T,) DDIM's alpha_t = DDPM's alpha-bar_t
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()              # (T,) the two coefficients of Eq. 4
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        self.copies = {}                                         # (name, device, dtype) -> cached device copy

    def table(self, name, x):
        """The float64 CPU table self.<name> in x's dtype on x's device: cast on the CPU, moved once, cached."""
        key = (name, x.device, x.dtype)
        if key not in self.copies:
            self.copies[key] = getattr(self, name).to(x.dtype).to(x.device)
        return self.copies[key]

    def a(self, i):
        """DDIM's alpha at tensor index i as a Python float (no device sync); at index -1 ("alpha_0 := 1") 1."""
        return 1.0 if i < 0 else float(self.alpha_bar[i])

    # -------------------------------------------------------------------------
    # Forward process and loss

    def q_sample(self, x0, i, eps):
        """Eq. 4 of Song et al. (2021): x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps, t = i + 1."""
        return (extract(self.table("sqrt_alpha_bar", x0), i, x0) * x0
                + extract(self.table("sqrt_one_minus_alpha_bar", x0), i, x0) * eps)

    def sample_t(self, B, device, generator=None):
        """Training indices (B,): i.i.d. uniform on {0..T-1}, or VDM App. I.1's low-discrepancy i = floor(T u_k)
        (one index per stratum of T/B steps, each still uniform: L_simple unbiased, less variance)."""
        if self.t_sampling == "iid":
            return torch.randint(self.T, (B,), device=device, generator=generator)
        return (low_discrepancy_uniform(B, device, generator) * self.T).long().clamp(max=self.T - 1)

    def loss(self, model, x0, i=None, eps=None):
        """Eq. 5 of Song et al. (2021) with gamma = 1, i.e. DDPM's L_simple: E || eps - eps_theta(x_t, t) ||^2.

        Theorem 1: every J_sigma equals some L_gamma up to a constant, and with eps_theta^(t) not shared across t
        the optimum of L_1 is optimal for every sigma: the one network (DDPM's training) serves every sampler.
        i and eps: drawn from the global RNG unless given (the training loop draws them for the global batch).
        """
        if i is None:
            i = self.sample_t(len(x0), x0.device)                # t ~ Uniform{1..T} as index i = t - 1
        if eps is None:
            eps = torch.randn_like(x0)                            # the noise the network must recover
        x_t = self.q_sample(x0, i, eps)
        return (eps - model(x_t, i)).pow(2).mean()

    # -------------------------------------------------------------------------
    # Samplers

    def timesteps(self, S, skip="uniform", grid="leading"):
        """Sec. 4.2 + App. D.2 of Song et al. (2021): the sub-sequence tau as explicit (t, t_prev) index pairs.

        Returns S pairs (t, t_prev) of tensor indices, t strictly decreasing, each t_prev the next t,
        and the last t_prev = -1 (alpha = 1). tau in paper indexing is {i + 1 for the listed i}.
          uniform, leading:  i = 0, c, 2c, ..., (S-1)c with c = T // S: the official range(0, T, T // S), which
                             never visits t = T (ermongroup/ddim#40); its first S entries when S does not divide T.
          uniform, trailing: i = round(T - k T/S) - 1, k = 0..S-1: starts at t = T (Lin et al. 2024).
          quad, leading:     i = int((sqrt(0.8 T) k / (S-1))^2), k = 0..S-1: the official CIFAR-10 choice,
                             tau_i ~ i^2 up to 0.8 T (App. D.2 says "close to T").
          quad, trailing:    i = round(T (k/S)^2) - 1, k = 1..S: tau_i ~ i^2 ending at t = T.
        Rounding can repeat small indices (quad); repeats are pushed up by one, then capped at T - 1, so
        tau is strictly increasing with exactly S entries (the official code silently repeats them).
        """
        T = self.T
        if not 1 <= S <= T:
            raise ValueError(f"the number of sampling steps must be in 1..T={T}, got {S}")
        k = torch.arange(S, dtype=torch.float64)
        if skip == "uniform" and grid == "leading":
            tau = (k * (T // S)).long()
        elif skip == "uniform" and grid == "trailing":
            tau = torch.round(T - k * T / S).long().flip(0) - 1
        elif skip == "quad" and grid == "leading":
            tau = ((k * math.sqrt(0.8 * T) / max(S - 1, 1)) ** 2).long()
        elif skip == "quad" and grid == "trailing":
            tau = (torch.round(T * ((k + 1) / S) ** 2).long() - 1).clamp(min=0)
        else:
            raise ValueError(f"unknown skip/grid {skip!r}/{grid!r}; choose uniform|quad and leading|trailing")
        tau = tau.tolist()
        for n in range(1, S):  # strictly increasing: push repeats up ...
            tau[n] = max(tau[n], tau[n - 1] + 1)
        tau[-1] = min(tau[-1], T - 1)
        for n in range(S - 2, -1, -1):  # ... and keep the top inside 0..T-1
            tau[n] = min(tau[n], tau[n + 1] - 1)
        tau = tau[::-1]  # sampling runs through reversed(tau)
        return list(zip(tau, tau[1:] + [-1]))

    def sigma(self, t, t_prev, eta):
        """Eq. 16 of Song et al. (2021): sigma_tau_i(eta) = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev).

        eta = 1 gives DDPM's posterior std sqrt(beta-tilde) on the sub-sequence; eta = 0 gives DDIM.
        """
        a_t, a_prev = self.a(t), self.a(t_prev)
        return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)

    def sigma_hat(self, t, t_prev):
        """Table 1's last row: sigma-hat_tau_i = sqrt(1 - alpha_tau_i / alpha_tau_{i-1}), DDPM's "larger variance"
        (sigma_t^2 = beta_t) on the sub-sequence; 0 on the last step (t_prev = -1), as in the official code.

        It cannot go into Eq. 12 as it stands (1 - a_prev - sigma-hat^2 < 0 wherever a_prev^2 > a_t): the official
        code (ddpm_steps) keeps the eta = 1 mean and only swaps the noise, as `step(hat=True)` does.
        """
        return math.sqrt(1 - self.a(t) / self.a(t_prev)) if t_prev >= 0 else 0.0

    def predict_x0(self, x_t, eps, t):
        """Eq. 9 of Song et al. (2021): f_theta(x_t) = (x_t - sqrt(1 - alpha_t) eps_theta(x_t)) / sqrt(alpha_t)."""
        a_t = self.a(t)
        return (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)

    def step(self, x_t, eps, t, t_prev, eta=0.0, z=None, clip=False, hat=False):
        """Eq. 12 of Song et al. (2021): one generative step from index t to index t_prev.

        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z,   sigma from Eq. 16.
        With eta = 0 and the indices swapped it is one encoder step (Eq. 13 from t_prev up to t; see `encode`).
        clip=True clamps x0_hat to [-1, 1] and re-derives eps from it, so x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps
        still holds (not in the paper; see Config.clip_denoised). hat=True: the eta = 1 mean, sigma-hat noise.
        """
        a_prev = self.a(t_prev)
        sigma = self.sigma(t, t_prev, 1.0 if hat else eta) if (eta > 0 or hat) else 0.0
        c = 1 - a_prev - sigma ** 2  # squared weight of the "direction pointing to x_t"
        if c < -1e-12:
            raise ValueError(f"eta={eta} too large: sigma^2 exceeds 1 - alpha_prev at t={t + 1}")
        x0_hat = self.predict_x0(x_t, eps, t)                     # "predicted x_0"
        if clip:  # keep x0_hat in [-1, 1]; the eps consistent with it points from x0_hat to x_t
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x_t - math.sqrt(self.a(t)) * x0_hat) / math.sqrt(1 - self.a(t))
        x_prev = math.sqrt(a_prev) * x0_hat + math.sqrt(max(c, 0.0)) * eps  # + "direction pointing to x_t"
        if hat:  # Table 1's sigma-hat: the eta = 1 mean above, the larger noise here
            sigma = self.sigma_hat(t, t_prev)
        if sigma > 0:
            x_prev = x_prev + sigma * z                           # + "random noise"
        return x_prev

    def run(self, model, x, pairs, eta=0.0, generator=None, clip=False, hat=False):
        """Eq. 12 of Song et al. (2021) along a list of (t, t_prev) pairs; returns the final x."""
        for t, t_prev in pairs:
            i = torch.full((len(x),), t, dtype=torch.long, device=x.device)
            eps = model(x, i).to(x.dtype)                         # eps_theta(x_t, t)
            # Fresh noise for every step when eta > 0 (the last step has sigma = 0 since alpha_prev = 1).
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if eta > 0 or hat else None
            x = self.step(x, eps, t, t_prev, eta, z, clip, hat)   # x_t -> x_{t_prev}
        return x

    @torch.no_grad()
    def sample(self, model, shape, steps=50, eta=0.0, skip="uniform", generator=None, grid="leading",
               x_T=None, dtype=torch.float32, device="cpu", clip=False, hat=False):
        """Sec. 4.2 of Song et al. (2021): Eq. 12 along reversed(tau), dim(tau) = steps (the paper's S).

        x_T ~ N(0, I) (drawn from `generator`, or given), then one Eq. 12 step per (t, t_prev) pair; the last
        goes to alpha = 1 and returns x0_hat without noise. eta = 0 is deterministic. clip, hat: see `step`.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (Eq. 16), got {eta}")
        pairs = self.timesteps(steps, skip, grid)  # the grid, built once
        if x_T is None:
            x_T = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.run(model, x_T, pairs, eta, generator, clip, hat)

    @torch.no_grad()
    def decode(self, model, x_T, steps, skip="uniform", grid="leading", clip=False):
        """Sec. 4.3 of Song et al. (2021): x_T -> x_0 by the eta = 0 process (Euler steps of Eq. 14)."""
        return self.run(model, x_T, self.timesteps(steps, skip, grid), eta=0.0, clip=clip)

    @torch.no_grad()
    def encode(self, model, x0, steps, skip="uniform", grid="leading"):
        """Sec. 4.3 / 5.4 of Song et al. (2021): x_0 -> x_T, Eq. 13 run from t = 0 up to T (reverse of Eq. 14).

        Each step moves from index t_prev up to t with eps_theta evaluated at the current, less noisy point:
        x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps, x0_hat from Eq. 9 at t_prev. The network is not defined at
        alpha = 1 (t = 0), so the first step uses eps_theta(x_0, index 0): part of the reconstruction error.
        """
        x = x0
        for t, t_prev in reversed(self.timesteps(steps, skip, grid)):
            i = torch.full((len(x),), max(t_prev, 0), dtype=torch.long, device=x.device)
            eps = model(x, i).to(x.dtype)                          # eps_theta at the less noisy end
            x = self.step(x, eps, t_prev, t)                       # Eq. 12 with sigma = 0, indices swapped
        return x

    @torch.no_grad()
    def interpolate(self, model, x_T0, x_T1, n, steps=50, skip="uniform", grid="leading", clip=False):
        """Sec. 5.3 of Song et al. (2021): decode slerp(x_T0, x_T1, k / (n - 1)), k = 0..n-1 -> (n, *x_T0.shape)."""
        lam = torch.linspace(0, 1, n, dtype=torch.float64).tolist()
        x_T = torch.stack([slerp(x_T0, x_T1, l) for l in lam])    # (n, B, ...)
        x0 = self.decode(model, x_T.reshape(-1, *x_T0.shape[1:]), steps, skip, grid, clip)
        return x0.reshape(n, *x_T0.shape)


def slerp(x0, x1, lam):
    """App. D.5, Eq. 67 of Song et al. (2021): spherical interpolation (Shoemake 1985), per batch element.

    theta = arccos(<x0, x1> / (|x0| |x1|)),  x = sin((1 - lam) theta)/sin(theta) x0 + sin(lam theta)/sin(theta) x1.
    Computed on the latents' device in wide(device) (float64; float32 on MPS).
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
# Evaluation

def reconstruction_error(x0, x_rec):
    """Table 2 of Song et al. (2021): per-dimension mean squared error with pixels scaled to [0, 1]."""
    return ((x0 - x_rec) / 2).pow(2).mean().item()  # [-1, 1] -> [0, 1] halves every difference


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

def clip_for(cfg, dataset):
    """Config.clip_denoised resolved for a dataset: auto = on for images (bounded in [-1, 1]), off for toys."""
    return cfg.clip_denoised == "on" or (cfg.clip_denoised == "auto" and dataset not in TOYS)


def make_model(config):
    """The eps-network for a checkpoint config ("dataset", "model", "data_shape"): MLP for 2-D toys, else U-Net."""
    if config["dataset"] in TOYS:
        return MLP()
    C, H = config["data_shape"][0], config["data_shape"][-1]
    return UNet(in_ch=C, image_size=H, **PRESETS[config["model"]])


# A checkpoint's "config": what defines the model and the diffusion (must match on --resume), one sample's shape,
# and the training recipe; not the sampler, paths, device or precision of the run (readers ignore other keys).
MUST_MATCH = ("dataset", "image_size", "model", "T", "schedule", "beta_1", "beta_T")
RECIPE = ("steps", "batch_size", "lr", "warmup", "grad_clip", "adam_beta2", "ema_decay", "t_sampling", "seed")


def train(cfg):
    """DDPM's Algorithm 1 (L_simple = Eq. 5 with gamma = 1) with Adam and an EMA; under torchrun a slice per rank."""
    rank, world, device = setup_distributed(pick_device(cfg.device))  # (0, 1, device) without torchrun
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data = load_data(cfg.dataset, train=True, image_size=cfg.image_size or None, stream_gb=cfg.stream_gb)
    if (recipe := follow_data(cfg, DATA_RECIPES, data.u.shape[1:], device)) and rank == 0:
        print(f"for {'x'.join(map(str, data.u.shape[1:]))} images on {device.type}: {recipe}", flush=True)
    follow_data(cfg, SAMPLER_RECIPES, data.u.shape[1:], device)  # the grids' skip
    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)  # the global batch and this rank's slice
    data_shape = list(data.u.shape[1:])
    data_u = training_images(data, device, B, part, cfg.seed)  # uint8 levels on the device: batches gathered there
    diffusion = DDIM(cfg.T, cfg.schedule, cfg.beta_1, cfg.beta_T, cfg.t_sampling)
    config = {**{k: getattr(cfg, k) for k in MUST_MATCH + RECIPE}, "data_shape": data_shape}  # what ckpt.pt stores
    model = make_model(config).to(device)
    data_gen = make_generator(cfg.seed, device)  # alike on every rank: the global batch's indices, flips, t, noise
    torch.manual_seed(cfg.seed + rank)  # the global RNGs, one stream per rank, are left to dropout
    ema = copy.deepcopy(model).requires_grad_(False)  # EMA of parameters only (the nets have no buffers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2))
    path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if getattr(cfg, "resume", False):
        ckpt = load_checkpoint(path)
        old = ckpt.get("config", {})
        for k in MUST_MATCH:  # precision, compile, deterministic and device are runtime settings: free to change
            if old.get(k) != getattr(cfg, k):
                raise DataError(f"{path}: checkpoint has {k}={old.get(k)!r}, this run {k}={getattr(cfg, k)!r}")
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            for g in opt.param_groups:  # the checkpoint's moments with this run's beta2 (lr, too, is this run's)
                g["betas"] = (0.9, cfg.adam_beta2)
        except (KeyError, RuntimeError, ValueError) as e:
            raise DataError(f"{path}: weights do not fit this network ({type(e).__name__})") from None
        step = ckpt["step"]
        restore_rng(ckpt["rng"], data_gen, rank, path)  # the data generator, and this rank's CPU and CUDA/MPS streams
        if rank == 0:
            print(f"resumed from {path} at step {step}")
    if rank == 0:
        print(f"ddim: {cfg.dataset} {tuple(data.u.shape)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"parameters, T={cfg.T} {cfg.schedule}, {cfg.steps} steps on {device}"
              + (f" x {world} processes" if world > 1 else ""))
    eps_model = network(model, autocast, cfg.compile)  # what the loss calls: eps_theta in autocast, float32 out
    eps_ema = network(ema, autocast, cfg.compile)      # what the sample grids call
    # Fixed noise for the progress grids, from its own generator so the data generator (and --resume) is untouched.
    g = make_generator(cfg.seed, device)
    x_T_fixed = torch.randn((64, *data_shape), generator=g, device=device)
    # The loss is summed on the device and read at log and checkpoint steps only (no per-step host sync).
    loss_sum, n_sum, checked = torch.zeros((), device=device), 0, step
    stop, stopping, t0, step0 = StopFlag(), False, time.time(), step
    while step < cfg.steps and not stopping:
        model.train()
        # The global batch's randomness, in this order on every rank: i.i.d. example indices, flips, t, noise.
        idx = draw_indices(data_u, B, device, data_gen, step)
        flip = torch.rand(B, device=device, generator=data_gen) < 0.5 if data.flip else None  # DDPM App. B
        i = diffusion.sample_t(B, device, data_gen)
        eps = torch.randn((B, *data_shape), device=device, generator=data_gen)
        # This rank's slice of it.
        x0 = levels_to_unit(data_u[idx[part]], data.levels)  # to [-1, 1], float32, on the device
        if data.flip:  # random horizontal flips (DDPM App. B, CIFAR-10)
            x0 = torch.where(flip[part, None, None, None], x0.flip(-1), x0)
        loss = diffusion.loss(eps_model, x0, i[part], eps[part])  # the mean over this rank's slice
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)  # linear warm-up
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, world)  # the gradient of the global batch's mean loss, on every rank
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
        loss_sum += loss.detach()
        n_sum += 1
        step += 1
        stopping = any_rank(stop.set, world, device)  # a signal on any rank stops every rank after this step
        log = step % cfg.log_every == 0 or step == cfg.steps
        save = step % cfg.ckpt_every == 0 or step == cfg.steps or stopping
        if log or save:  # the one host sync of these steps; the same mean (so the same decision) on every rank
            mean_loss = mean_over_ranks(loss_sum, world).item() / n_sum
            if not math.isfinite(mean_loss):
                raise DataError(f"non-finite loss in steps {checked + 1}-{step}; last good checkpoint kept in {path}")
            checked = step
        if log and rank == 0:
            rate = (step - step0) / (time.time() - t0)
            print(f"step {step}/{cfg.steps}  loss {mean_loss:.4f}  {rate:.2f} it/s  "
                  f"ETA {(cfg.steps - step) / rate / 60:.1f} min", flush=True)
        if log:
            loss_sum, n_sum = torch.zeros((), device=device), 0
        if save:
            finite = torch.stack([torch.isfinite(p).all() for m in (model, ema) for p in m.parameters()]).all()
            if not finite:  # one host sync; never overwrite a good checkpoint with NaN weights (alike on every rank)
                raise DataError(f"non-finite weights at step {step}; last good checkpoint kept in {path}")
            rng = rng_checkpoint(data_gen, world)  # a collective: every rank takes part, rank 0 writes
            if rank == 0:
                save_checkpoint(path, {"script": SCRIPT, "step": step, "config": config, "model": model.state_dict(),
                                       "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": rng})
        if (step % cfg.sample_every == 0 or step == cfg.steps) and rank == 0:
            ema.eval()
            x = diffusion.sample(eps_ema, None, cfg.S, cfg.eta, cfg.skip, g, cfg.grid, x_T=x_T_fixed,
                                 device=device, clip=clip_for(cfg, cfg.dataset), hat=cfg.sigma == "hat")
            write_samples(x, os.path.join(cfg.out, f"train_{step:06d}.png"), cfg.dataset)
    if stopping:
        if rank == 0:
            print(f"stopped at step {step}; checkpoint saved to {path}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    if rank == 0:
        print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {path}")


# -----------------------------------------------------------------------------
# Sampling, encoding and interpolation from a checkpoint (ddim.py's or ddpm.py's)

def load_eps_checkpoint(path):
    """A checkpoint of ddim.py or of ddpm.py (the same eps-network and schedule): both can be sampled here."""
    try:
        return load_checkpoint(path)
    except DataError:  # not ddim.py's: a readable ddpm.py checkpoint is welcome, anything else keeps the error
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            ckpt = None
        if isinstance(ckpt, dict) and ckpt.get("script") in EPS_SCRIPTS:
            return ckpt
        if isinstance(ckpt, dict) and "script" in ckpt:
            raise DataError(f"{path}: a {ckpt['script']} checkpoint, expected one written by ddim.py or ddpm.py "
                            "(an eps-prediction network)") from None
        raise


def load_for_sampling(cfg, device=None):
    """(EMA network as the callable of `network`, DDIM schedule, checkpoint config + "script", device) of a ddim.py /
    ddpm.py checkpoint or of a released DDPM model in diffusers' format (common.load_pretrained), on device."""
    if os.path.isdir(cfg.ckpt) or cfg.ckpt.endswith((".safetensors", ".bin")):  # a released model: its scheduler's T
        net, info = load_pretrained(cfg.ckpt)
        s = info["schedule"]
        diffusion = DDIM(s["T"], s["schedule"], s["beta_1"], s["beta_T"])
        c = {"dataset": "pretrained", "data_shape": info["data_shape"], "script": "pretrained"}
    else:
        ckpt = load_eps_checkpoint(cfg.ckpt)
        try:
            c = {**ckpt["config"], "script": ckpt["script"]}
            diffusion = DDIM(int(c["T"]), c["schedule"], float(c["beta_1"]), float(c["beta_T"]))
            net = make_model(c)
            net.load_state_dict(ckpt["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{cfg.ckpt}: {ckpt['script']} checkpoint that this script cannot rebuild "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not 1 <= cfg.S <= diffusion.T:
        raise ValueError(f"--S {cfg.S}: must be in 1..T={diffusion.T} of this checkpoint")
    device = device or pick_device(cfg.device)  # precision, compile and device come from this run, not the checkpoint
    follow_data(cfg, SAMPLER_RECIPES, c["data_shape"], device)  # the grid that follows the image size (a flag wins)
    autocast = setup_precision(device, cfg.precision, cfg.deterministic)
    return network(net.to(device).eval(), autocast, cfg.compile), diffusion, c, device


def sample_cmd(cfg):
    """--n-samples in chunks of --batch-size, split over the processes (torchrun); the chunk starting at sample
    `start` draws from chunk_generator(seed, start): the samples do not depend on the ranks. Rank 0 writes them."""
    rank, world, device = setup_distributed(pick_device(cfg.device))  # (0, 1, device) without torchrun
    net, diffusion, c, device = load_for_sampling(cfg, device)
    t0, chunks, clip = time.time(), [], clip_for(cfg, c["dataset"])
    for start, n in my_chunks(cfg.n_samples, cfg.batch_size, rank, world):
        g = chunk_generator(cfg.seed, start, device)
        x = diffusion.sample(net, (n, *c["data_shape"]), cfg.S, cfg.eta, cfg.skip, g, cfg.grid, device=device,
                             clip=clip, hat=cfg.sigma == "hat")
        chunks.append((start, x.cpu()))
    x = gather_chunks(chunks, world)  # (n_samples, ...) in sample order, on the CPU
    if rank != 0:
        return
    write_samples(x, os.path.join(cfg.out, "samples.png"), c["dataset"])
    save_npz(x if x.dim() == 4 else x[:, None, None, :], os.path.join(cfg.out, "samples.npz"))
    noise = "sigma-hat" if cfg.sigma == "hat" else f"eta={cfg.eta}"
    print(f"{cfg.n_samples} samples from a {c['dataset']} {c['script']} checkpoint, S={cfg.S} {noise} "
          f"{cfg.skip}/{cfg.grid} clip={clip} in {time.time() - t0:.1f} s"
          + (f" on {world} processes" if world > 1 else "") + f" -> {cfg.out}/samples.png, samples.npz")


def encode_cmd(cfg):
    """Table 2 of the paper on held-out data: encode with S steps, decode with S steps, report the MSE.
    Under torchrun rank 0 does it all (a few held-out examples); the other ranks exit."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    if rank != 0:
        return
    net, diffusion, c, device = load_for_sampling(cfg, device)
    data = load_data(c["dataset"], train=False, image_size=c.get("image_size") or None)
    x0 = data.x[:cfg.n_samples].to(device)
    chunk = lambda fn, x: torch.cat([fn(x[k:k + 256]) for k in range(0, len(x), 256)])  # noqa: E731
    x_T = chunk(lambda xb: diffusion.encode(net, xb, cfg.S, cfg.skip, cfg.grid), x0)
    x_rec = chunk(lambda xb: diffusion.decode(net, xb, cfg.S, cfg.skip, cfg.grid), x_T)
    path = os.path.join(cfg.out, "encode.png")
    if c["dataset"] in TOYS:
        save_scatter(x_rec, path, data=x0)
    else:  # rows of 8: originals, then their reconstructions below
        rows = [torch.cat([x0[k:k + 8], x_rec[k:k + 8]]) for k in range(0, len(x0), 8)]
        save_grid(torch.cat(rows), path, nrow=min(8, len(x0)))
    print(f"encode->decode with S={cfg.S}: per-dim MSE (pixels in [0,1]) {reconstruction_error(x0, x_rec):.6f}; "
          f"latent std {x_T.std().item():.3f} -> {path}")


def interpolate_cmd(cfg):
    """Sec. 5.3: strips decoded from slerp between pairs of latents x_T. Under torchrun rank 0 does it all (a few
    strips); the other ranks exit."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    if rank != 0:
        return
    net, diffusion, c, device = load_for_sampling(cfg, device)
    g = make_generator(cfg.seed, device)
    rows = min(cfg.n_samples, 8)
    x_T0 = torch.randn((rows, *c["data_shape"]), generator=g, device=device)
    x_T1 = torch.randn((rows, *c["data_shape"]), generator=g, device=device)
    x = diffusion.interpolate(net, x_T0, x_T1, cfg.n_interp, cfg.S, cfg.skip, cfg.grid,
                              clip_for(cfg, c["dataset"]))  # (n, rows, ...)
    path = os.path.join(cfg.out, "interpolate.png")
    if c["dataset"] in TOYS:
        save_scatter(x.reshape(-1, 2), path)
    else:
        save_grid(x.transpose(0, 1).reshape(-1, *x.shape[2:]), path, nrow=cfg.n_interp)  # one strip per row
    print(f"{rows} interpolation strips of {cfg.n_interp} points, S={cfg.S} -> {path}")


# -----------------------------------------------------------------------------
# CLI

CHOICES = {"schedule": ("linear", "cosine"), "skip": ("uniform", "quad"), "grid": ("leading", "trailing"),
           "t_sampling": ("iid", "low_discrepancy"), "clip_denoised": ("auto", "on", "off"), "sigma": ("eta", "hat"),
           "precision": ("auto", "fp32", "tf32", "bf16"), "model": tuple(PRESETS)}


def validate(cfg, mode):
    """Raise ValueError naming the first flag that makes no sense."""
    check_common(cfg, ("steps", "batch_size", "T", "warmup", "ckpt_every", "sample_every", "log_every",
                       "S", "n_samples", "n_interp", "lr", "grad_clip", "beta_1", "beta_T"))
    if not (cfg.beta_1 <= cfg.beta_T < 1):
        raise ValueError(f"need 0 < --beta-1 <= --beta-T < 1, got {cfg.beta_1}, {cfg.beta_T}")
    if not (math.isfinite(cfg.eta) and cfg.eta >= 0):
        raise ValueError(f"--eta must be >= 0 (Eq. 16), got {cfg.eta}")
    if mode == "train" and cfg.S > cfg.T:
        raise ValueError(f"--S {cfg.S} exceeds T={cfg.T}")
    if mode != "train" and not cfg.ckpt:
        raise ValueError(f"--{mode} needs --ckpt PATH (a ddim.py or ddpm.py checkpoint)")


MODES = {"train": "train (Eq. 5 with gamma = 1: DDPM's L_simple); writes <out>/ckpt.pt and grids",
         "sample": "sample with the generalized process (Eq. 12) from --ckpt",
         "encode": "encode held-out images to x_T (Eq. 13 run forward, Sec. 4.3) and decode them back",
         "interpolate": "slerp between the codes of held-out images (Sec. 5.4)"}


def main(argv=None):
    p = make_parser(Config, MODES, CHOICES, {}, DATA_RECIPES)
    p.add_argument("--resume", action="store_true", help="continue <out>/ckpt.pt exactly (with --train)")
    with one_line_errors():
        args, mode, cfg, _ = parse_config(p, argv, Config, MODES, {})
        if args.resume and mode != "train":
            raise ValueError("--resume goes with --train")
        validate(cfg, mode)
        if mode == "train":
            cfg.resume = args.resume  # not a Config field: it would be saved into the checkpoint's config
            train(cfg)
        else:
            {"sample": sample_cmd, "encode": encode_cmd, "interpolate": interpolate_cmd}[mode](cfg)


if __name__ == "__main__":
    main()
