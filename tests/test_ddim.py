"""Tests for ddim.py (Song, Meng, Ermon 2021, arXiv:2010.02502).

    python -m pytest -q tests/test_ddim.py                  # CPU (what CI runs)
    python -m pytest -q tests/test_ddim.py --device cuda    # the same tests on a GPU (also mps, auto)
    python tests/mutations.py ddim                          # the deliberate breaks in MUTATIONS below, all CAUGHT

The maths is checked against closed forms: an exact noise predictor eps*(x, t) of a 2-D Gaussian
mixture (known at every noise level) is plugged into the sampler in float64 (float32 on MPS) on the
chosen device, so any error in the samples comes from the sampler, not from a network. Each test's
docstring lists the mutations of ddim.py it was seen to catch; those in MUTATIONS are re-checked by
tests/mutations.py. Then CLI and reliability tests on tiny runs (subprocess or in-process, tmp dirs),
every mode on the chosen device.
"""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ddim  # noqa: E402
from conftest import two_ranks  # noqa: E402  (tests/ is on sys.path under pytest)
from common import MLP, PRESETS, UNet  # noqa: E402


# Deliberate breaks of ddim.py that the named tests must catch: `python tests/mutations.py ddim` (all CAUGHT).
MUTATIONS = [
    {"name": "ddim-clip-eps-not-rederived", "file": "ddim.py",
     "find": "            eps = (x_t - math.sqrt(self.a(t)) * x0_hat) / math.sqrt(1 - self.a(t))\n",
     "replace": "            pass\n",
     "tests": ["tests/test_ddim.py::test_clip_rederives_eps_from_the_clipped_x0_hat"]},
    {"name": "ddim-encoder-eps-at-noisier-end", "file": "ddim.py",
     "find": "i = torch.full((len(x),), max(t_prev, 0), dtype=torch.long, device=x.device)",
     "replace": "i = torch.full((len(x),), t, dtype=torch.long, device=x.device)",
     "tests": ["tests/test_ddim.py::test_encoder_is_eq13_with_eps_at_the_less_noisy_end"]},
    {"name": "ddim-sigma-without-variance-ratio", "file": "ddim.py",
     "find": "return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)",
     "replace": "return eta * math.sqrt(1 - a_t / a_prev)",
     "tests": ["tests/test_ddim.py::test_sigma_eq16_values"]},
    {"name": "ddim-x0-coefficient-not-sqrt", "file": "ddim.py",
     "find": "x_prev = math.sqrt(a_prev) * x0_hat + math.sqrt(max(c, 0.0)) * eps",
     "replace": "x_prev = a_prev * x0_hat + math.sqrt(max(c, 0.0)) * eps",
     "tests": ["tests/test_ddim.py::test_oracle_samples_match_mixture[50-0.0-uniform-leading]"]},
    {"name": "ddim-direction-without-sigma2", "file": "ddim.py",
     "find": "c = 1 - a_prev - sigma ** 2",
     "replace": "c = 1 - a_prev",
     "tests": ["tests/test_ddim.py::test_eta1_all_steps_is_ddpm_ancestral_sampling[linear]"]},
    {"name": "ddim-eq9-variance-for-std", "file": "ddim.py",
     "find": "return (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)",
     "replace": "return (x_t - (1 - a_t) * eps) / math.sqrt(a_t)",
     "tests": ["tests/test_ddim.py::test_oracle_samples_match_mixture[50-0.0-uniform-leading]"]},
    {"name": "ddim-alpha-prev-one-index-off", "file": "ddim.py",
     "find": "        a_prev = self.a(t_prev)\n        sigma = ",
     "replace": "        a_prev = self.a(t_prev - 1)\n        sigma = ",
     "tests": ["tests/test_ddim.py::test_eta1_all_steps_is_ddpm_ancestral_sampling[linear]"]},
    {"name": "ddim-sigma-hat-without-sqrt", "file": "ddim.py",
     "find": "return math.sqrt(1 - self.a(t) / self.a(t_prev)) if t_prev >= 0 else 0.0",
     "replace": "return (1 - self.a(t) / self.a(t_prev)) if t_prev >= 0 else 0.0",
     "tests": ["tests/test_ddim.py::test_sigma_hat_is_ddpm_with_larger_variance"]},
    {"name": "ddim-grid-repeats-kept", "file": "ddim.py",
     "find": "tau[n] = max(tau[n], tau[n - 1] + 1)",
     "replace": "tau[n] = tau[n]",
     "tests": ["tests/test_ddim.py::test_grids_decreasing_unique_end_at_alpha_1"]},
    {"name": "ddim-trailing-grid-below-T", "file": "ddim.py",
     "find": "tau = torch.round(T - k * T / S).long().flip(0) - 1",
     "replace": "tau = torch.round(T - k * T / S).long().flip(0) - 2",
     "tests": ["tests/test_ddim.py::test_grids_decreasing_unique_end_at_alpha_1"]},
    {"name": "ddim-decode-with-eta1", "file": "ddim.py",
     "find": "self.timesteps(steps, skip, grid), eta=0.0, clip=clip)",
     "replace": "self.timesteps(steps, skip, grid), eta=1.0, clip=clip)",
     "tests": ["tests/test_ddim.py::test_encode_decode_round_trip_shrinks_with_steps"]},
    {"name": "ddim-sampler-grid-ignores-the-data", "file": "ddim.py",
     "find": "    follow_data(cfg, SAMPLER_RECIPES, c[\"data_shape\"], device)  #",
     "replace": "    pass  #",
     "tests": ["tests/test_ddim.py::test_sampler_grid_follows_the_image_size"]},
    {"name": "ddim-resume-without-rng", "file": "ddim.py",
     "find": "        restore_rng(ckpt[\"rng\"], data_gen, rank, path)  #",
     "replace": "        pass  #",
     "tests": ["tests/test_ddim.py::test_resume_is_exact"]},
    {"name": "ddim-low-discrepancy-ignored", "file": "ddim.py",
     "find": "if self.t_sampling == \"iid\":",
     "replace": "if True:",
     "tests": ["tests/test_ddim.py::test_low_discrepancy_t_sampling_and_resume"]},
    {"name": "ddim-nan-window-not-narrowed", "file": "ddim.py",
     "find": "            checked = step\n",
     "replace": "            pass\n",
     "tests": ["tests/test_ddim.py::test_nonfinite_loss_stops_and_keeps_last_good_checkpoint"]},
    # Issue 16 (torchrun): each break makes a 2-process run differ from the 1-process run (or the samples repeat).
    {"name": "ddim-ddp-no-average-gradients", "file": "ddim.py",
     "find": "        average_gradients(model, world)  #",
     "replace": "        None  #",
     "tests": ["tests/test_ddim.py::test_torchrun_train_equals_one_process"]},
    {"name": "ddim-ddp-data-generator-seeded-by-rank", "file": "ddim.py",
     "find": "data_gen = make_generator(cfg.seed, device)",
     "replace": "data_gen = make_generator(cfg.seed + rank, device)",
     "tests": ["tests/test_ddim.py::test_torchrun_train_equals_one_process"]},
    {"name": "ddim-ddp-every-rank-takes-the-first-slice", "file": "ddim.py",
     "find": "rank_slice(cfg.batch_size, rank, world)",
     "replace": "rank_slice(cfg.batch_size, 0, world)",
     "tests": ["tests/test_ddim.py::test_torchrun_train_equals_one_process"]},
    {"name": "ddim-ddp-noise-not-sliced", "file": "ddim.py",
     "find": "diffusion.loss(eps_model, x0, i[part], eps[part])",
     "replace": "diffusion.loss(eps_model, x0, i[part], eps[:len(x0)])",
     "tests": ["tests/test_ddim.py::test_torchrun_train_equals_one_process"]},
    {"name": "ddim-ddp-initial-weights-seeded-by-rank", "file": "ddim.py",
     "find": "torch.manual_seed(cfg.seed)  # the same initial weights on every rank",
     "replace": "torch.manual_seed(cfg.seed + rank)",
     "tests": ["tests/test_ddim.py::test_torchrun_train_equals_one_process"]},
    {"name": "ddim-ddp-chunk-generator-ignores-start", "file": "ddim.py",
     "find": "g = chunk_generator(cfg.seed, start, device)",
     "replace": "g = chunk_generator(cfg.seed, 0, device)",
     "tests": ["tests/test_ddim.py::test_torchrun_sample_equals_one_process"]},
    {"name": "ddim-ddp-samples-not-split", "file": "ddim.py",
     "find": "my_chunks(cfg.n_samples, cfg.batch_size, rank, world)",
     "replace": "my_chunks(cfg.n_samples, cfg.batch_size, 0, 1)",
     "tests": ["tests/test_ddim.py::test_torchrun_sample_equals_one_process"]},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for this file: the small float64 oracle tensors run 5x faster than with two contended threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Exact oracle: data x_0 ~ sum_k w_k N(mu_k, s^2 I) in 2-D. Then q(x_t) = sum_k w_k N(sqrt(a) mu_k, v I)
# with v = a s^2 + 1 - a (a = DDIM's alpha_t), its score is closed form, and eps* = -sqrt(1 - a) * score.

W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MU = torch.tensor([[-1.0, -0.5], [1.0, 0.8]], dtype=torch.float64)
S = 0.3


def like(t, x):
    """A float64 CPU constant in x's dtype on x's device (cast on the CPU first: MPS has no float64)."""
    return t.to(x.dtype).to(x.device)


def responsibilities(x, a):
    """p(k | x_t) for the noised mixture at level a, and the component means and variance there."""
    m, v = math.sqrt(a) * like(MU, x), a * S ** 2 + 1 - a
    logp = -((x[:, None] - m) ** 2).sum(-1) / (2 * v) + torch.log(like(W, x))
    return torch.softmax(logp, 1), m, v


class Oracle:
    """eps*(x_t, i): the exact noise predictor (the minimiser of L_simple) of the mixture, in x's dtype and device."""

    def __init__(self, diffusion):
        self.alpha_bar = diffusion.alpha_bar
        self.calls, self.indices = 0, []

    def __call__(self, x, i):
        assert i.dtype == torch.long and i.shape == (len(x),) and i.device == x.device  # the net(x, t) contract
        assert (i == i[0]).all() and 0 <= int(i[0]) < len(self.alpha_bar)
        self.calls += 1
        self.indices.append(int(i[0]))
        a = float(self.alpha_bar[int(i[0])])
        r, m, v = responsibilities(x, a)
        score = (r[..., None] * (-(x[:, None] - m) / v)).sum(1)
        return -math.sqrt(1 - a) * score


def mixture(n, seed, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = (torch.rand(n, generator=g) < W[1]).long()
    return (MU[k] + S * torch.randn(n, 2, generator=g, dtype=torch.float64)).to(dtype).to(device)


def stats(x):
    """mean (2), covariance (xx, xy, yy) and the weight of component 0 (mean responsibility, exact in expectation),
    as a float64 CPU tensor."""
    w0 = responsibilities(x, 1.0)[0][:, 0].mean()
    return torch.cat([x.mean(0), torch.cov(x.T).flatten()[[0, 1, 3]], w0[None]]).cpu().double()


def gen(seed, device):
    return ddim.make_generator(seed, device)


def exact(f64, tol):
    """tol where the device has float64; on MPS (float32 only) a float32-sized one."""
    return tol if f64 == torch.float64 else max(tol, 2e-3)


MEAN = (W[:, None] * MU).sum(0)
COV = (W[:, None, None] * (S ** 2 * torch.eye(2, dtype=torch.float64) + MU[:, :, None] * MU[:, None, :])).sum(0) \
    - MEAN[:, None] * MEAN[None]
TRUE = torch.cat([MEAN, COV.flatten()[[0, 1, 3]], W[:1]])  # (0.4, 0.41, 0.93, 0.546, 0.445, 0.3)


# -----------------------------------------------------------------------------
# 1. eta = 1 with steps = T is DDPM's ancestral sampler with sigma^2 = beta-tilde

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_eta1_all_steps_is_ddpm_ancestral_sampling(schedule, device, f64):
    """DDIM(eta=1, S=T) == Algorithm 2 of Ho et al. (2020) with sigma_t^2 = beta-tilde_t, to 1e-6.

    The reference below is written from the DDPM paper only (alpha_t = 1 - beta_t, beta-tilde =
    (1 - abar_{t-1})/(1 - abar_t) beta_t), with the same noise draws: x_T, then one z per step.
    Caught: sigma-hat = sqrt(1 - a_t/a_prev) instead of Eq. 16 (7e-2); sigma^2 in place of sigma;
    the sqrt(1 - a_prev - sigma^2) coefficient without sigma^2; alpha_prev read one index off;
    a grid that skips t = T or stops before alpha = 1.
    """
    T, B = 1000, 256
    d = ddim.DDIM(T, schedule)
    pairs = d.timesteps(T)
    assert pairs == [(i, i - 1) for i in range(T - 1, -1, -1)]  # S = T visits every t, ends at alpha_0 = 1
    assert d.timesteps(T, grid="trailing") == pairs
    oracle = Oracle(d)
    x = d.sample(oracle, (B, 2), steps=T, eta=1.0, generator=gen(3, device), dtype=f64, device=device)
    assert oracle.calls == T and x.device.type == device.type

    # Independent DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), float64 numbers, same noise draws.
    beta = ddim.make_beta(schedule, T, 1e-4, 0.02).tolist()
    alpha = [1 - b for b in beta]
    abar = torch.cumprod(torch.tensor(alpha, dtype=torch.float64), 0).tolist()
    g = gen(3, device)
    y = torch.randn((B, 2), generator=g, dtype=f64, device=device)
    for t in range(T, 0, -1):  # paper t; tensor index t - 1
        abar_prev = abar[t - 2] if t > 1 else 1.0
        beta_tilde = (1 - abar_prev) / (1 - abar[t - 1]) * beta[t - 1]
        eps = oracle(y, torch.full((B,), t - 1, dtype=torch.long, device=device))
        z = torch.randn((B, 2), generator=g, dtype=f64, device=device)
        y = (y - beta[t - 1] / math.sqrt(1 - abar[t - 1]) * eps) / math.sqrt(alpha[t - 1]) + math.sqrt(beta_tilde) * z
    assert (x - y).abs().max() < exact(f64, 1e-6)

    # And one step on its own, at several t: Eq. 12 + Eq. 16 (eta = 1) == the DDPM posterior step.
    x_t, z = torch.randn(8, 2, dtype=f64, device=device), torch.randn(8, 2, dtype=f64, device=device)
    for i in (T - 1, 500, 10, 1, 0):
        eps = oracle(x_t, torch.full((8,), i, dtype=torch.long, device=device))
        ab_prev = abar[i - 1] if i > 0 else 1.0
        ddpm = (x_t - beta[i] / math.sqrt(1 - abar[i]) * eps) / math.sqrt(alpha[i]) \
            + math.sqrt((1 - ab_prev) / (1 - abar[i]) * beta[i]) * z
        assert (d.step(x_t, eps, i, i - 1, eta=1.0, z=z) - ddpm).abs().max() < exact(f64, 1e-9)


def test_sigma_eq16_values():
    """Eq. 16 by hand at one pair of levels: eta scales it, eta = 0 is 0, eta = 1 is sqrt(beta-tilde) on tau.

    Caught: a missing factor sqrt((1 - a_prev)/(1 - a_t)); a/a_prev swapped (NaN); eta applied squared.
    """
    d = ddim.DDIM(1000)
    a_t, a_p = float(d.alpha_bar[600]), float(d.alpha_bar[400])
    expected = math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    assert d.sigma(600, 400, 1.0) == pytest.approx(expected, rel=1e-12)
    assert d.sigma(600, 400, 0.5) == pytest.approx(0.5 * expected, rel=1e-12)
    assert d.sigma(600, 400, 0.0) == 0.0
    assert d.sigma(20, -1, 1.0) == 0.0  # the last step (alpha_prev = 1) never adds noise
    assert d.a(-1) == 1.0 and d.a(0) == pytest.approx(1 - 1e-4)


def test_sigma_hat_is_ddpm_with_larger_variance(device, f64):
    """--sigma hat (Table 1's last row, the official code's "ddpm_noisy"): with S = T it is Algorithm 2 of Ho et al.
    (2020) with sigma_t^2 = beta_t -- the reference is written from the DDPM paper, same noise draws -- to 1e-6;
    on a 10-step grid each step is the eta = 1 mean plus sigma-hat z, sigma-hat = sqrt(1 - a_t / a_prev) is
    larger than sigma(eta = 1) and 0 on the last step. With the exact predictor, S = T = 1000 samples the mixture
    (mean, covariance, weight within 0.05); on a 5-step grid sigma-hat overshoots var(y) by 0.20 where eta = 1
    falls short by 0.23 (the larger noise is not removed again on a short grid).
    Caught (each applied alone): sigma(eta = 1) in place of sigma-hat; noise on the last step; the Eq. 12 mean
    with sigma-hat; the square root dropped from sigma-hat."""
    T, B = 1000, 256
    d = ddim.DDIM(T)
    oracle = Oracle(d)
    x = d.sample(oracle, (B, 2), steps=T, hat=True, generator=gen(4, device), dtype=f64, device=device)
    beta = ddim.make_beta("linear", T, 1e-4, 0.02).tolist()
    alpha = [1 - b for b in beta]
    abar = torch.cumprod(torch.tensor(alpha, dtype=torch.float64), 0).tolist()
    g = gen(4, device)
    y = torch.randn((B, 2), generator=g, dtype=f64, device=device)
    for t in range(T, 0, -1):  # paper t; tensor index t - 1; no noise at t = 1 (Algorithm 2)
        eps = oracle(y, torch.full((B,), t - 1, dtype=torch.long, device=device))
        z = torch.randn((B, 2), generator=g, dtype=f64, device=device)
        y = (y - beta[t - 1] / math.sqrt(1 - abar[t - 1]) * eps) / math.sqrt(alpha[t - 1]) \
            + (t > 1) * math.sqrt(beta[t - 1]) * z
    assert (x - y).abs().max() < exact(f64, 1e-6)

    pairs = d.timesteps(10)
    x_t, z = torch.randn(8, 2, dtype=f64, device=device), torch.randn(8, 2, dtype=f64, device=device)
    for t, t_prev in pairs:
        eps = oracle(x_t, torch.full((8,), t, dtype=torch.long, device=device))
        want = d.step(x_t, eps, t, t_prev, eta=1.0, z=torch.zeros_like(z))
        s_hat = math.sqrt(1 - float(d.alpha_bar[t]) / d.a(t_prev)) if t_prev >= 0 else 0.0
        assert d.sigma_hat(t, t_prev) == pytest.approx(s_hat, rel=1e-12)
        assert (t_prev < 0 and s_hat == 0) or s_hat > d.sigma(t, t_prev, 1.0)
        assert (d.step(x_t, eps, t, t_prev, z=z, hat=True) - (want + s_hat * z)).abs().max() < exact(f64, 1e-12)

    full = d.sample(oracle, (10000, 2), steps=T, hat=True, generator=gen(0, device), dtype=f64, device=device)
    assert (stats(full) - TRUE).abs().max() < 0.05
    short = [d.sample(oracle, (10000, 2), steps=5, eta=1.0, hat=hat, generator=gen(0, device), dtype=f64,
                      device=device) for hat in (True, False)]
    dev_yy = [(stats(x) - TRUE)[4].item() for x in short]  # var(y) minus its true value
    assert dev_yy[0] > 0.1 and dev_yy[1] < -0.1, dev_yy


# -----------------------------------------------------------------------------
# 2. Exact-oracle sampling matches the data statistics

@pytest.mark.parametrize("steps,eta,skip,grid", [
    (50, 0.0, "uniform", "leading"), (100, 0.0, "uniform", "leading"), (50, 0.0, "uniform", "trailing"),
    (50, 0.0, "quad", "leading"), (1000, 1.0, "uniform", "leading")])
def test_oracle_samples_match_mixture(steps, eta, skip, grid, device, f64):
    """10,000 samples with the exact eps: mean, covariance and mixture weight within 0.05 of the truth.

    Correct sampler: max deviation 0.019 (the statistics' own standard error is 0.005-0.011).
    Caught (deviation seen): sqrt(a_prev) -> a_prev on x0_hat (>0.4); sqrt(1 - a_prev) -> (1 - a_prev)
    on eps (>0.28); Eq. 9 with (1 - a_t) for sqrt(1 - a_t) (diverges); at eta = 1, sigma without the
    sqrt((1 - a_prev)/(1 - a_t)) factor (>13) and the eps coefficient without -sigma^2 (>0.14);
    a_prev read one index off at eta = 1 (>0.09).
    """
    d = ddim.DDIM(1000)
    x = d.sample(Oracle(d), (10000, 2), steps=steps, eta=eta, skip=skip, grid=grid, generator=gen(0, device),
                 dtype=f64, device=device)
    dev = (stats(x) - TRUE).abs()
    assert dev.max() < 0.05, f"mean/cov/weight off by {dev.tolist()}"


def test_eta0_is_deterministic_and_eta_validated(device, f64):
    """eta = 0 draws no noise: two runs from the same x_T agree exactly; eta < 0 and too large an eta raise."""
    d = ddim.DDIM(1000)
    x_T = torch.randn(64, 2, dtype=f64, device=device)
    a = d.sample(Oracle(d), None, steps=20, x_T=x_T, generator=gen(1, device))
    b = d.sample(Oracle(d), None, steps=20, x_T=x_T, generator=gen(2, device))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        d.sample(Oracle(d), (4, 2), steps=10, eta=-0.1, device=device)
    with pytest.raises(ValueError):
        d.sample(Oracle(d), (4, 2), steps=10, eta=50.0, device=device)  # sigma^2 > 1 - alpha_prev: Eq. 12 undefined


# -----------------------------------------------------------------------------
# 3. encode -> decode round trip

def test_encode_decode_round_trip_shrinks_with_steps(device, f64):
    """Sec. 5.4 / Table 2: reconstruction error of x_0 -> x_T -> x_0 falls as S grows; latents ~ N(0, I).

    Measured with the oracle: 0.014 (S=10), 0.0013 (S=50), 0.00018 (S=200) per-dim MSE on [0,1] --
    the same order as the paper's CIFAR-10 Table 2 (0.014 at S=10). Caught: decode using eta = 1.
    Not caught here (both ends of an encoder step give a consistent O(step) error): evaluating eps at the
    noisier end of each encoder step -- test_encoder_is_eq13_with_eps_at_the_less_noisy_end catches that.
    """
    d = ddim.DDIM(1000)
    oracle = Oracle(d)
    x0 = mixture(2000, seed=5, device=device, dtype=f64)
    errs = []
    for S_ in (10, 50, 200):
        x_T = d.encode(oracle, x0, S_)
        errs.append(ddim.reconstruction_error(x0, d.decode(oracle, x_T, S_)))
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] < 0.03 and errs[2] < 5e-4, errs
    # The encoder maps data to (approximately) the prior: mean 0, std 0.95 at S = 200 (Euler steps
    # under-disperse a little; 0.99 at S = 1000).
    assert x_T.mean().abs() < 0.05 and abs(x_T.std().item() - 1) < 0.08
    # Decoding is the eta = 0 sampler itself.
    assert torch.equal(d.decode(oracle, x_T, 20), d.sample(oracle, None, steps=20, x_T=x_T))


def test_slerp_and_interpolate(device, f64):
    """Sec. 5.3: slerp keeps the norm of equal-norm orthogonal latents, hits both ends; interpolate decodes them.
    On the chosen device (slerp computes in float64 there, float32 on MPS) and in the latents' dtype."""
    a, b = torch.tensor([[3.0, 0.0]], device=device), torch.tensor([[0.0, 3.0]], device=device)
    mid = ddim.slerp(a, b, 0.5)
    assert mid.device.type == device.type and mid.dtype == torch.float32
    assert torch.allclose(mid.cpu(), torch.tensor([[3 / math.sqrt(2), 3 / math.sqrt(2)]]), atol=1e-6)
    assert torch.allclose(ddim.slerp(a, b, 0.0), a) and torch.allclose(ddim.slerp(a, b, 1.0), b)
    assert torch.allclose(ddim.slerp(a, a, 0.3), a)  # parallel latents: no division by sin(0)
    d = ddim.DDIM(1000)
    oracle = Oracle(d)
    x0, x1 = torch.randn(4, 2, dtype=f64, device=device), torch.randn(4, 2, dtype=f64, device=device)
    path = d.interpolate(oracle, x0, x1, n=5, steps=10)
    assert path.shape == (5, 4, 2)
    assert torch.allclose(path[0], d.decode(oracle, x0, 10)) and torch.allclose(path[-1], d.decode(oracle, x1, 10))


# -----------------------------------------------------------------------------
# 4. The sub-sequence tau

@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("skip", ["uniform", "quad"])
@pytest.mark.parametrize("grid", ["leading", "trailing"])
def test_grids_decreasing_unique_end_at_alpha_1(T, skip, grid):
    """Every grid: S pairs, t strictly decreasing and unique in 0..T-1, chained, ending at t_prev = -1 (alpha = 1).

    Caught: the official quad rounding (repeats at small t, e.g. 0, 0, 1 for S=50); a leading grid
    using range(0, T, T//S) in full (more than S steps when S does not divide T); trailing grids
    starting below t = T; a grid whose last step stops at t = 1 instead of alpha = 1.
    """
    d = ddim.DDIM(T)
    for S_ in sorted({1, 2, 3, 7, 10, 20, 50, 100, 333, 999, 1000} & set(range(1, T + 1)) | {T}):
        pairs = d.timesteps(S_, skip, grid)
        ts = [t for t, _ in pairs]
        assert len(pairs) == S_
        assert all(a > b for a, b in zip(ts, ts[1:])) and len(set(ts)) == S_
        assert 0 <= ts[-1] and ts[0] <= T - 1
        assert [p for _, p in pairs] == ts[1:] + [-1]
        assert d.a(pairs[-1][1]) == 1.0
        if grid == "trailing":
            assert ts[0] == T - 1  # starts at the paper's t = T
        if skip == "uniform" and grid == "leading":
            assert ts[::-1] == list(range(0, T, T // S_))[:S_]  # the official grid (its first S entries)
    with pytest.raises(ValueError):
        d.timesteps(T + 1)
    with pytest.raises(ValueError):
        d.timesteps(0)


def test_official_grids_where_they_are_well_defined():
    """Leading grids equal the official code's: range(0, 1000, 20) for S=50; int(linspace(0, sqrt(800), 10)^2)."""
    d = ddim.DDIM(1000)
    assert [t for t, _ in d.timesteps(50)][::-1] == list(range(0, 1000, 20))  # first t = 981, not 1000
    official_quad = [int(v) for v in (torch.linspace(0, math.sqrt(800), 10, dtype=torch.float64) ** 2).tolist()]
    assert [t for t, _ in d.timesteps(10, "quad")][::-1] == official_quad
    assert [t for t, _ in d.timesteps(4, grid="trailing")] == [999, 749, 499, 249]  # starts at t = T


def test_schedules_float64_and_loss(device):
    """Schedules are float64 CPU masters and match DDPM's definitions; the loss is L_simple (near 1 for
    eps_theta = 0) on the chosen device, its tables copied there once in the data's dtype and cached."""
    d = ddim.DDIM(1000)
    assert d.alpha_bar.dtype == torch.float64
    assert torch.allclose(d.beta, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    c = ddim.DDIM(1000, "cosine")
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(c.alpha_bar[499]) == pytest.approx(f(500) / f(0), rel=1e-9)  # abar(t) = f(t)/f(0) (no clip hit)
    assert d.alpha_bar.device.type == "cpu" and d.sqrt_alpha_bar.dtype == torch.float64
    torch.manual_seed(0)
    x0 = torch.randn(4096, 2, device=device)
    assert d.loss(lambda x, i: torch.zeros_like(x), x0).item() == pytest.approx(1.0, abs=0.05)
    # An exact eps model of a point mass at 0 has zero loss: x_t = sqrt(1-a) eps.
    zero = torch.zeros(512, 2, device=device)
    assert d.loss(lambda x, i: x / like(1 - d.alpha_bar, x)[i].sqrt()[:, None], zero).item() < 1e-10
    copy = d.table("sqrt_alpha_bar", x0)
    assert copy.device == x0.device and copy.dtype == torch.float32 and d.table("sqrt_alpha_bar", zero) is copy


# -----------------------------------------------------------------------------
# 5. CLI (subprocess), checkpoints, interop with ddpm.py, reliability (issue 9)

def on(device):
    """The CLI flag that puts a run on the device the tests were asked for (--device of pytest)."""
    return ["--device", device.type]


def run(*args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "ddim.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


TOY = ["--dataset", "moons", "--batch-size", "64", "--log-every", "10", "--sample-every", "1000", "--S", "5"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, device):
    """One tiny training run on the 2-D moons (MLP), shared by the sampling CLI tests."""
    out = tmp_path_factory.mktemp("toy")
    r = run("--train", "--steps", "40", "--ckpt-every", "20", "--out", str(out), *TOY, *on(device), cwd=out)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_train_sample_encode_interpolate(toy_run, device):
    """Subprocess smoke of every sampling mode on a moons (MLP) checkpoint: --sample (eta = 1), --encode,
    --interpolate, on the chosen device. --S is the number of sampling steps; --steps (training steps) leaves it."""
    out = toy_run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ck) == {"script", "config", "step", "model", "ema", "optimizer", "rng"}
    assert ck["script"] == "ddim" and ck["step"] == 40 and ck["config"]["data_shape"] == [2]
    # the config holds what defines the model and the diffusion, and the recipe: no sampler, path or device
    assert set(ck["config"]) == {*ddim.MUST_MATCH, *ddim.RECIPE, "data_shape"}
    ck = str(out / "ckpt.pt")
    runs = [["--sample", "--ckpt", ck, "--S", "10", "--steps", "3", "--eta", "1", "--n-samples", "100", "--out",
             str(out / "s")],
            ["--encode", "--ckpt", ck, "--S", "5", "--n-samples", "16", "--out", str(out / "e")],
            ["--interpolate", "--ckpt", ck, "--S", "5", "--n-samples", "4", "--out", str(out / "e")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "ddim.py"), *a, *on(device)], cwd=out, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in runs]
    for p, word in zip(procs, ("S=10 ", "S=5:", "S=5 ")):
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0 and word in stdout, (stdout, stderr)
    import numpy as np
    assert (out / "s" / "samples.png").exists()
    assert np.load(out / "s" / "samples.npz")["arr_0"].shape[0] == 100
    assert (out / "e" / "encode.png").exists() and (out / "e" / "interpolate.png").exists()


def test_cli_every_mode_on_images(tmp_path, capsys, device):
    """Issue 14: every mode on the chosen device with the U-Net on 8x8 digits, in-process: --train with sample grids
    at eta = 0.5 and with --sigma hat (fresh noise from the run's device generator: a CPU generator crashed here on
    CUDA), --resume, then --sample (eta = 0.5), --encode and --interpolate of the checkpoint."""
    out = tmp_path / "run"
    args = ["--train", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "2", "--log-every", "2",
            "--S", "3", "--out", str(out), *on(device)]
    r = main_inproc(capsys, *args, "--steps", "2", "--eta", "0.5")
    assert r.returncode == 0, r.stderr
    r = main_inproc(capsys, *args, "--steps", "4", "--sigma", "hat", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout and f"on {device.type}" in r.stdout, r.stderr
    assert (out / "train_000002.png").exists() and (out / "train_000004.png").exists()
    ck = str(out / "ckpt.pt")
    assert torch.load(ck, weights_only=True)["step"] == 4
    for mode, extra in (("--sample", ["--eta", "0.5"]), ("--encode", []), ("--interpolate", ["--n-interp", "3"])):
        r = main_inproc(capsys, mode, "--ckpt", ck, "--S", "3", "--n-samples", "4", "--out", str(tmp_path / "s"),
                        *on(device), *extra)
        assert r.returncode == 0, (mode, r.stderr)
    for name in ("samples.png", "samples.npz", "encode.png", "interpolate.png"):
        assert (tmp_path / "s" / name).exists(), name


def test_cli_bf16_and_runtime_settings(tmp_path, capsys, device):
    """--precision bf16 (autocast; on the CPU too) trains with a sample grid and samples; precision is a runtime
    setting: a bf16 checkpoint resumes under fp32 and samples under bf16, tf32 and the default."""
    out = tmp_path / "run"
    args = ["--train", "--dataset", "moons", "--batch-size", "16", "--T", "50", "--ckpt-every", "2",
            "--sample-every", "2", "--log-every", "1", "--S", "3", "--out", str(out), *on(device)]
    r = main_inproc(capsys, *args, "--steps", "2", "--precision", "bf16")
    assert r.returncode == 0 and "loss" in r.stdout, r.stderr
    assert "precision" not in torch.load(out / "ckpt.pt", weights_only=True)["config"]  # a runtime setting
    r = main_inproc(capsys, *args, "--steps", "3", "--precision", "fp32", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    for precision in ("bf16", "tf32", "auto"):
        r = main_inproc(capsys, "--sample", "--ckpt", str(out / "ckpt.pt"), "--S", "3", "--n-samples", "8",
                        "--eta", "0.5", "--precision", precision, "--out", str(tmp_path / precision), *on(device))
        assert r.returncode == 0, (precision, r.stderr)
        assert (tmp_path / precision / "samples.npz").exists()


def ddpm_like_checkpoint(path, script="ddpm", side=8):
    """A checkpoint in the layout ddpm.py documents (notes/ddpm.md): digits, tiny U-Net, EMA under "ema"."""
    cfg = {"dataset": "digits", "image_size": 0 if side == 8 else side, "model": "tiny", "T": 1000,
           "schedule": "linear", "beta_1": 1e-4, "beta_T": 0.02, "data_shape": [1, side, side]}
    torch.manual_seed(0)
    net = UNet(in_ch=1, image_size=side, **PRESETS["tiny"])
    torch.save({"script": script, "config": cfg, "step": 0, "model": net.state_dict(), "ema": net.state_dict(),
                "optimizer": {}, "rng": {"torch": torch.get_rng_state()}}, path)


def test_cli_samples_a_ddpm_checkpoint(tmp_path, capsys, device):
    """A checkpoint written in ddpm.py's agreed layout samples with ddim.py (grid PNG + npz of --n-samples).

    In-process through main() (the subprocess path is covered by the tests above and below)."""
    ddpm_like_checkpoint(tmp_path / "ddpm.pt")
    r = main_inproc(capsys, "--sample", "--ckpt", str(tmp_path / "ddpm.pt"), "--S", "5", "--n-samples", "12",
                    "--out", str(tmp_path), *on(device))
    assert r.returncode == 0, r.stderr
    r = main_inproc(capsys, "--sample", "--ckpt", str(tmp_path / "ddpm.pt"), "--S", "5", "--n-samples", "12",
                    "--sigma", "hat", "--out", str(tmp_path / "hat"), *on(device))
    assert r.returncode == 0 and "sigma-hat" in r.stdout, r.stderr
    assert "ddpm checkpoint" in r.stdout
    import numpy as np
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (12, 8, 8, 1)


def test_sampler_grid_follows_the_image_size(tmp_path, capsys, device):
    """SAMPLER_RECIPES: a checkpoint of 17-32 px images samples on App. D.2's quadratic grid (its CIFAR-10 choice)
    unless --skip is given; the 8x8 digits keep the uniform grid."""
    for side, default in ((8, "uniform"), (28, "quad"), (32, "quad")):
        ddpm_like_checkpoint(tmp_path / f"c{side}.pt", side=side)
        for extra, grid in (([], default), (["--skip", "uniform"], "uniform"), (["--skip", "quad"], "quad")):
            r = main_inproc(capsys, "--sample", "--ckpt", str(tmp_path / f"c{side}.pt"), "--S", "3", "--n-samples",
                            "2", "--out", str(tmp_path / "s"), *on(device), *extra)
            assert r.returncode == 0 and f" {grid}/leading " in r.stdout, (side, extra, r.stdout, r.stderr)
    assert ddim.Config().skip == "uniform"  # the Config is the digits run


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "ddpm.py")), reason="ddpm.py not written yet")
def test_cli_samples_a_checkpoint_trained_by_ddpm_py(tmp_path, capsys, device):
    """Interop for real: ddpm.py trains a few steps, ddim.py samples its checkpoint (both on the chosen device)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ddpm.py"), "--train", "--dataset", "moons",
                        "--steps", "5", "--batch-size", "16", "--T", "50", "--out", str(tmp_path / "ddpm"),
                        *on(device)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    r = run("--sample", "--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--S", "5", "--n-samples", "8",
            "--out", str(tmp_path / "s"), *on(device), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ddpm checkpoint" in r.stdout
    # S is checked against the checkpoint's own T (50 here), not the default 1000.
    one_line_error(main_inproc(capsys, "--sample", "--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--S", "51",
                               "--out", str(tmp_path / "s")), "1..T=50")
    assert (tmp_path / "s" / "samples.npz").exists()


def one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("ddim.py: error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def main_inproc(capsys, *argv):
    """ddim.main(argv) in this process: (exit code, stdout, stderr). Saves a Python start-up per case."""
    code = 0
    try:
        ddim.main(list(argv))
    except SystemExit as e:
        code = e.code
    finally:  # undo StopFlag's signal handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def bad_flag_cases(tmp_path, ck):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    foreign, corrupt = tmp_path / "ncsn.pt", tmp_path / "corrupt.pt"
    torch.save({"script": "ncsn", "config": {}, "model": {}}, foreign)
    corrupt.write_bytes(open(ck, "rb").read()[:300])
    return [  # (argv, words the one-line message must contain)
        (["--sample", "--ckpt", ck, "--eta", "-0.5"], ["--eta"]),
        (["--sample", "--ckpt", ck, "--eta", "nan"], ["--eta"]),
        (["--sample", "--ckpt", ck, "--S", "0"], ["--S must be positive"]),
        (["--sample", "--ckpt", ck, "--S", "-3"], ["--S"]),
        (["--sample", "--ckpt", ck, "--S", "1001"], ["1..T=1000"]),
        (["--sample", "--ckpt", ck, "--n-samples", "0"], ["--n-samples"]),
        (["--train", "--steps", "0"], ["--steps"]),
        (["--train", "--batch-size", "0"], ["--batch-size"]),
        (["--train", "--lr", "-1e-3"], ["--lr"]),
        (["--train", "--lr", "0"], ["--lr"]),
        (["--train", "--T", "0"], ["--T"]),
        (["--train", "--T", "10", "--S", "50"], ["exceeds T=10"]),
        (["--train", "--beta-T", "1.5"], ["--beta-T"]),
        (["--train", "--ema-decay", "1"], ["--ema-decay"]),
        (["--train", "--image-size", "-8"], ["--image-size"]),
        (["--train", "--schedule", "quadratic"], ["schedule"]),
        (["--train", "--model", "huge"], ["model"]),
        (["--sample", "--ckpt", ck, "--skip", "cubic"], ["skip"]),
        (["--sample", "--ckpt", ck, "--grid", "middle"], ["grid"]),
        (["--sample"], ["--ckpt"]),
        (["--encode", "--resume", "--ckpt", ck], ["--resume"]),
        (["--train", "--sample"], ["choose exactly one of"]),
        (["--train", "--out", str(blocker / "sub")], ["--out"]),
        (["--sample", "--ckpt", str(tmp_path / "missing.pt")], ["no such checkpoint"]),
        (["--sample", "--ckpt", str(foreign)], ["ncsn", "ddpm.py"]),
        (["--sample", "--ckpt", str(corrupt)], ["corrupt.pt", "not a readable checkpoint"]),
        (["--train", "--resume", "--out", str(tmp_path / "empty")], ["no such checkpoint"]),
        ([], ["--train"]),
        (["--train", "--dataset", "nonsense"], ["nonsense"]),
        (["--train", "--steps", "abc"], ["--steps"]),
        (["--sample", "--ckpt", ck, "--sigma", "large"], ["sigma"]),
        (["--train", "--precision", "fp16"], ["precision"]),
        (["--sample", "--ckpt", ck, "--compile", "yes"], ["unrecognized"]),
    ]


@pytest.mark.cpu_only("flag and checkpoint validation happen before any device work")
def test_bad_flags_table(tmp_path, toy_run, capsys):
    """Issue 9: each nonsense flag -> exit 2, one line `ddim.py: error: ...` naming the problem, no traceback.

    The whole table runs in-process through main(); the cases that go through argparse, checkpoint
    loading and validation are also run as real subprocesses (concurrently) below.
    """
    cases = bad_flag_cases(tmp_path, str(toy_run / "ckpt.pt"))
    for argv, words in cases:
        extra = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
        one_line_error(main_inproc(capsys, *argv, *extra), *words)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    picked = [cases[i] for i in (0, 15, 24, 25)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "ddim.py"), *argv, "--out", str(tmp_path / "o")]
                              if "--out" not in argv else [sys.executable, os.path.join(ROOT, "ddim.py"), *argv],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in picked]
    for (argv, words), p in zip(picked, procs):
        stdout, stderr = p.communicate(timeout=240)
        one_line_error(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr), *words)


def same(a, b, device):
    """Bitwise on the CPU; on a GPU (nondeterministic kernels, no --deterministic here) to float tolerance."""
    return torch.equal(a, b) if device.type == "cpu" else torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_exact(tmp_path, capsys, device):
    """Issue 9: 6 steps straight == 3 steps, stop, --resume to 6: identical model, EMA, optimizer, RNG (bitwise on the
    CPU; on a GPU every RNG stream exactly, the weights to float tolerance).

    Digits + U-Net so that minibatch indices, t and noise (the data generator, on the device) and dropout (the
    global RNGs) all come from restored streams; the checkpoint keeps every one of them (rng_checkpoint: the data
    generator's state and rng_state, CPU and CUDA / MPS where used).
    Caught: not restoring the RNG state; restarting the warm-up counter at 0.
    """
    args = ["--train", "--batch-size", "8", "--ckpt-every", "100", "--sample-every", "1000", "--log-every", "1",
            "--warmup", "4", "--S", "2", *on(device)]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main_inproc(capsys, *args, "--steps", "6", "--out", str(a)).returncode == 0
    assert main_inproc(capsys, *args, "--steps", "3", "--out", str(b)).returncode == 0
    r = main_inproc(capsys, *args, "--steps", "6", "--out", str(b), "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for k in ca[key]:
            assert same(ca[key][k], cb[key][k], device), (key, k)
    for k, s in ca["optimizer"]["state"].items():
        assert all(same(s[n], cb["optimizer"]["state"][k][n], device) for n in s)
    assert torch.equal(ca["rng"]["data"], cb["rng"]["data"])  # the data generator (indices, t, noise)
    (ra,), (rb,) = ca["rng"]["ranks"], cb["rng"]["ranks"]  # one process: one rank's global streams (dropout)
    assert set(ra) == set(rb) and (device.type != "cuda" or "cuda" in ra)
    assert torch.equal(ra["torch"], rb["torch"])
    for name in set(ra) - {"torch"}:  # the device's streams: CUDA's one per GPU, MPS's one
        u, v = ([s] if isinstance(s, torch.Tensor) else s for s in (ra[name], rb[name]))
        assert len(u) == len(v) and all(torch.equal(p, q) for p, q in zip(u, v)), name
    # --resume refuses a run whose schedule differs from the checkpoint's.
    one_line_error(main_inproc(capsys, *args, "--steps", "8", "--out", str(b), "--resume", "--schedule", "cosine"),
                   "schedule")


def test_deterministic_resume_is_bitwise(tmp_path, capsys, monkeypatch, device):
    """Issue 14: with --deterministic (deterministic kernels, cuDNN flags, the cuBLAS workspace variable) 2 steps +
    --resume to 4 equal 4 straight bitwise on every device, a GPU included (test_resume_is_exact allows float
    tolerance there). On a GPU in subprocesses (the switch is process-wide and must come before cuBLAS starts);
    on the CPU in-process, the switch undone afterwards."""
    args = ["--train", "--batch-size", "8", "--ckpt-every", "100", "--sample-every", "1000", "--log-every", "2",
            "--warmup", "4", "--S", "2", "--deterministic", *on(device)]
    a, b = tmp_path / "a", tmp_path / "b"
    if device.type == "cpu":
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # restored after the test, as the flags below
        flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, \
            torch.backends.cudnn.deterministic
        try:
            for n, o, extra in (("4", a, []), ("2", b, []), ("4", b, ["--resume"])):
                r = main_inproc(capsys, *args, "--steps", n, "--out", str(o), *extra)
                assert r.returncode == 0, r.stderr
        finally:
            torch.use_deterministic_algorithms(flags[0])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[1:]
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "ddim.py"), *args, "--steps", n, "--out",
                                   str(o)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for n, o in (("4", a), ("2", b))]
        for p in procs:
            assert p.wait(timeout=240) == 0, p.communicate()[1]
        r = run(*args, "--steps", "4", "--out", str(b), "--resume", cwd=tmp_path)
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == 4
    for key in ("model", "ema"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)


def wait_for_checkpoint(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes(tmp_path, sig, capsys, device):
    """Issue 9: SIGKILL mid-run leaves a loadable last checkpoint and --resume continues from it;
    SIGTERM saves a checkpoint at the current step and exits with 130."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddim.py"), "--train", *TOY, "--steps", "100000",
                          "--ckpt-every", "5", "--log-every", "1000", "--out", str(out), *on(device)], cwd=tmp_path,
                         env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out / "ckpt.pt", p)
    time.sleep(0.5)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert p.returncode == 130 and "continue with --resume" in err
    else:
        assert p.returncode == -signal.SIGKILL
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 5
    r = main_inproc(capsys, "--train", *TOY, "--steps", str(step + 5), "--ckpt-every", "5", "--out", str(out),
                    "--resume", *on(device))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {step}" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 5


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys, device):
    """Issue 9 / 14: a NaN loss at step 5 -> one line naming the window of steps since the last check (5-6: the
    loss is summed on the device and checked at log and checkpoint steps, no host sync per step), exit 2; the
    checkpoint of step 4 stays, finite: the NaN weights of step 6 never reach a checkpoint."""
    real_loss, calls = ddim.DDIM.loss, []

    def loss(self, model, x0, *drawn):  # drawn: the training loop's t and noise
        calls.append(1)
        value = real_loss(self, model, x0, *drawn)
        return value * float("nan") if len(calls) >= 5 else value

    monkeypatch.setattr(ddim.DDIM, "loss", loss)
    r = main_inproc(capsys, "--train", *TOY, "--steps", "10", "--ckpt-every", "2", "--out", str(tmp_path), *on(device))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err == [f"ddim.py: error: non-finite loss in steps 5-6; last good checkpoint kept in {tmp_path / 'ckpt.pt'}"]
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_net_contract_with_real_networks(device):
    """The sampler calls real networks with LongTensor t of shape (B,) and keeps shapes (U-Net and MLP), on the
    chosen device with that device's generator (eta > 0 draws fresh noise there)."""
    d = ddim.DDIM(1000)
    for net, shape in ((MLP(), (5, 2)), (UNet(in_ch=1, image_size=8, **PRESETS["tiny"]).eval(), (3, 1, 8, 8))):
        x = d.sample(ddim.network(net.to(device)), shape, steps=3, eta=0.5, generator=gen(0, device), device=device)
        assert x.shape == shape and x.device.type == device.type


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "ddpm.py")), reason="ddpm.py not written yet")
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_copied_from_ddpm_py_is_identical(schedule):
    """The copy (not import) of ddpm.py's schedule in ddim.py gives bit-identical betas."""
    import ddpm
    assert torch.equal(ddim.make_beta(schedule, 1000, 1e-4, 0.02), ddpm.make_schedule(schedule, 1000, 1e-4, 0.02))


def test_clip_keeps_x0_hat_in_range_and_is_off_by_default(device, f64):
    """clip=True: every x0_hat is clamped to [-1, 1] and eps re-derived, so the eta = 0 sample lies in [-1, 1];
    the default (the paper's sampler) does not clip, and clipping changes nothing when x0_hat is already inside."""
    d = ddim.DDIM(1000)
    wild = lambda x, i: -3 * x  # noqa: E731  an eps-model whose x0_hat leaves [-1, 1]
    x_T = torch.randn(256, 2, dtype=f64, generator=gen(0, device), device=device)
    assert d.sample(wild, None, 20, x_T=x_T).abs().max() > 1
    assert d.sample(wild, None, 20, x_T=x_T, clip=True).abs().max() <= 1
    # A point mass at 0.5: eps* = (x - sqrt(a) 0.5)/sqrt(1 - a), x0_hat = 0.5 exactly, so clipping is a no-op.
    point = lambda x, i: ((x - like(d.sqrt_alpha_bar, x)[i, None] * 0.5)  # noqa: E731
                          / like(d.sqrt_one_minus_alpha_bar, x)[i, None])
    a, b = d.sample(point, None, 20, x_T=x_T), d.sample(point, None, 20, x_T=x_T, clip=True)
    assert torch.allclose(a, b, atol=exact(f64, 1e-12)) and torch.allclose(a, torch.full_like(a, 0.5),
                                                                            atol=exact(f64, 1e-9))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_clip_rederives_eps_from_the_clipped_x0_hat(eta, device, f64):
    """One Eq. 12 step with clip=True against a hand-written reference: x0c = clamp(Eq. 9, -1, 1), then the
    direction term uses eps' = (x_t - sqrt(a_t) x0c) / sqrt(1 - a_t), the noise that x0c and x_t imply:
        x_prev = sqrt(a_prev) x0c + sqrt(1 - a_prev - sigma^2) eps' + sigma z     (to 1e-12).
    Caught (issue 13): eps not re-derived (the clipped x0c with the network's eps in the direction term) -- the
    sample-range test above passes either way, since its last step lands on x0c alone."""
    d = ddim.DDIM(1000)
    g = gen(7, device)
    x_t = 2 * torch.randn(64, 2, dtype=f64, device=device, generator=g)
    eps = torch.randn(64, 2, dtype=f64, device=device, generator=g)  # a network output whose x0_hat leaves [-1, 1]
    z = torch.randn(64, 2, dtype=f64, device=device, generator=g)
    for t, t_prev in ((600, 300), (50, 10), (999, 899)):
        a_t, a_p = float(d.alpha_bar[t]), float(d.alpha_bar[t_prev])
        x0c = ((x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        assert (x0c.abs() == 1).float().mean() > 0.2  # the clip is active on many entries
        eps_c = (x_t - math.sqrt(a_t) * x0c) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        want = math.sqrt(a_p) * x0c + math.sqrt(1 - a_p - sigma ** 2) * eps_c + sigma * z
        got = d.step(x_t, eps, t, t_prev, eta=eta, z=z, clip=True)
        assert (got - want).abs().max() < exact(f64, 1e-12), (t, (got - want).abs().max())


def gaussian_eps(d, m, s):
    """Exact eps* of data N(m, s^2 I): eps*(x, a) = sqrt(1 - a) (x - sqrt(a) m) / (a s^2 + 1 - a), a = alpha at i."""
    def eps(x, i):
        a = float(d.alpha_bar[int(i[0])])
        return math.sqrt(1 - a) * (x - math.sqrt(a) * m) / (a * s * s + 1 - a)
    return eps


def test_encoder_is_eq13_with_eps_at_the_less_noisy_end(device, f64):
    """The DDIM encoder (Sec. 4.3 / 5.4): Eq. 13 run from alpha = 1 up to the top of tau, one Euler step
        x_next / sqrt(a_next) = x / sqrt(a_cur) + (sbar_next - sbar_cur) eps(x, t_cur),   sbar = sqrt((1 - a)/a),
    with eps evaluated at the current, less noisy point (index max(t_cur, 0): the network has no alpha = 1).
    Reference: that Euler step written out in this (sbar) form, with the exact eps of Gaussian data N(m, s^2),
    on coarse grids (S = 3, 10), to 1e-10; and the network is called at the indices 0, tau_1, ..., tau_{S-1}.
    Then the limit: at S = 1000 the encoding is the probability-flow ODE's, known in closed form for Gaussian
    data, x_T = sqrt(a_T) (m + (x_0 - m) sqrt((s^2 + sbar_T^2) / s^2)), to 1% (Euler's O(1/S) error: 0.5%).
    Caught (issue 13): eps evaluated at the noisier end of each step (index t_next with the current x) -- the
    round-trip and closed-form errors are of the same O(1/S) size either way, the Euler reference is not."""
    d = ddim.DDIM(1000)
    m, s = 0.5, 0.2
    x0 = (m + s * torch.randn(512, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).to(f64)
    x0 = x0.to(device)
    sbar = lambda t: math.sqrt((1 - d.a(t)) / d.a(t))  # noqa: E731
    for S_, grid in ((3, "leading"), (10, "trailing")):
        calls = []
        eps = gaussian_eps(d, m, s)
        got = d.encode(lambda x, i: calls.append(int(i[0])) or eps(x, i), x0, S_, grid=grid)
        up = list(reversed(d.timesteps(S_, grid=grid)))  # (t_next, t_cur) pairs from alpha = 1 upwards
        assert calls == [max(t_cur, 0) for _, t_cur in up]
        x = x0
        for t_next, t_cur in up:
            i = torch.full((len(x),), max(t_cur, 0), dtype=torch.long, device=device)
            xbar = x / math.sqrt(d.a(t_cur)) + (sbar(t_next) - sbar(t_cur)) * eps(x, i)
            x = math.sqrt(d.a(t_next)) * xbar
        assert (got - x).abs().max() < exact(f64, 1e-10), (S_, (got - x).abs().max())
    a_T = d.a(999)
    ode = math.sqrt(a_T) * (m + (x0 - m) * math.sqrt((s * s + (1 - a_T) / a_T) / (s * s)))
    got = d.encode(gaussian_eps(d, m, s), x0, 1000)
    assert ((got - ode).abs().max() / ode.abs().max()).item() < 0.01


def test_low_discrepancy_t_sampling_and_resume(tmp_path, capsys, device):
    """Issue 8 (VDM App. I.1 copied here): with --t-sampling low_discrepancy a minibatch of B indices has exactly one
    index in each stratum [kT/B, (k+1)T/B), each index is marginally uniform on {0..T-1}, the loss draws its t
    through it, and a run with it resumes bitwise exactly (and differs from the i.i.d. run of the same seed).
    Catches: the i.i.d. sampler in its place, the option not reaching the training loop, u_0 not from the
    data generator (resume no longer exact)."""
    torch.manual_seed(0)
    d = ddim.DDIM(T=1000, t_sampling="low_discrepancy")
    seen = []
    d.loss(lambda x, i: seen.append(i) or torch.zeros_like(x), torch.zeros(8, 2, device=device))
    assert seen[0].device.type == device.type and sorted((seen[0] // 125).tolist()) == list(range(8))
    first = torch.stack([d.sample_t(8, device)[0] for _ in range(4000)]).cpu().double()  # one slot: uniform
    assert abs(first.mean().item() - 499.5) < 4 * 288.7 / math.sqrt(4000)
    assert abs(first.var().item() / (1000 ** 2 / 12) - 1) < 0.1
    args = ["--train", "--dataset", "moons", "--T", "50", "--batch-size", "16", "--ckpt-every", "100",
            "--sample-every", "1000", "--log-every", "1", "--warmup", "2", "--S", "2", *on(device)]
    runs = {n: tmp_path / n for n in ("ld", "split", "iid")}
    ld = ["--t-sampling", "low_discrepancy"]
    assert main_inproc(capsys, *args, "--steps", "4", "--out", str(runs["ld"]), *ld).returncode == 0
    assert main_inproc(capsys, *args, "--steps", "4", "--out", str(runs["iid"])).returncode == 0
    assert main_inproc(capsys, *args, "--steps", "2", "--out", str(runs["split"]), *ld).returncode == 0
    r = main_inproc(capsys, *args, "--steps", "4", "--out", str(runs["split"]), *ld, "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    ca, cb, ci = (torch.load(p / "ckpt.pt", weights_only=True) for p in runs.values())
    assert ca["config"]["t_sampling"] == "low_discrepancy" and ca["step"] == cb["step"] == 4
    for k in ca["model"]:
        assert same(ca["model"][k], cb["model"][k], device) and same(ca["ema"][k], cb["ema"][k], device), k
    assert torch.equal(ca["rng"]["data"], cb["rng"]["data"])
    assert any(not same(ca["model"][k], ci["model"][k], device) for k in ca["model"])


# -----------------------------------------------------------------------------
# 6. Several processes (issue 16): torchrun with gloo on the CPU, 2 processes against 1

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, cwd, wait=True, timeout=240, real=False):
    """`torchrun --nproc_per_node=2 ddim.py args` (a finished CompletedProcess, or the running Popen). A finished
    run starts its two ranks directly (conftest.two_ranks) unless real (torchrun's own summary)."""
    if wait and not real:
        return two_ranks(os.path.join(ROOT, "ddim.py"), args, cwd, timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "ddim.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# The 2-D toy: the MLP has no dropout, so 2 processes compute the 1-process run's gradients (up to float order).
DDP = ["--train", "--dataset", "moons", "--T", "50", "--batch-size", "16", "--warmup", "5", "--log-every", "1000",
       "--sample-every", "100000", "--S", "2", "--device", "cpu"]


def assert_same_weights(a, b, rtol):
    """Model and EMA of two checkpoints equal to rtol, relative to each tensor's largest entry."""
    for key in ("model", "ema"):
        for k in a[key]:
            err = ((a[key][k] - b[key][k]).abs().max() / a[key][k].abs().max()).item()
            assert err <= rtol, (key, k, err)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_train_equals_one_process(tmp_path, capsys):
    """Issue 16: 2 processes with a global batch of 16 (8 each) for 12 steps == 1 process with batch 16: model and
    EMA to 1e-5 (relative; seen: 3e-7, the float order of the gradient average), the same step and data generator
    state; rank 0 alone prints and writes; the checkpoint keeps both ranks' global RNG streams.
    Caught: no gradient average; the data generator seeded by rank; every rank on the first slice; the noise not
    sliced; the initial weights seeded by rank."""
    args = [*DDP, "--steps", "12", "--ckpt-every", "6"]
    r = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ddim: moons") == 1 and r.stdout.count("done: 12 steps") == 1, r.stdout
    assert "x 2 processes" in r.stdout
    assert main_inproc(capsys, *args, "--out", str(tmp_path / "one")).returncode == 0
    one, two = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("one", "two"))
    assert one["step"] == two["step"] == 12
    assert torch.equal(one["rng"]["data"], two["rng"]["data"]) and len(two["rng"]["ranks"]) == 2
    assert_same_weights(one, two, 1e-5)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_sigterm_then_resume_equals_straight_run(tmp_path):
    """Issue 16: SIGTERM to torchrun (it forwards it to both ranks) mid-run -> every rank stops after the same step,
    rank 0 saves once and says so; --resume with 2 processes to step s + 6 == a straight 2-process run to s + 6
    (model and EMA to 1e-6 relative). With low-discrepancy t: its u_0 comes from the data generator too."""
    args = [*DDP, "--ckpt-every", "5", "--t-sampling", "low_discrepancy"]
    out = tmp_path / "stopped"
    p = torchrun(*args, "--steps", "100000", "--out", str(out), cwd=tmp_path, wait=False)
    wait_for_checkpoint(out / "ckpt.pt", p)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("continue with --resume") == 1, err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 5 and f"stopped at step {step}" in err
    total = str(step + 6)
    procs = [torchrun(*args, "--steps", total, "--out", str(o), *extra, cwd=tmp_path, wait=False)
             for o, extra in ((out, ["--resume"]), (tmp_path / "straight", []))]
    for q in procs:
        stdout, stderr = q.communicate(timeout=240)
        assert q.returncode == 0, stderr
    assert stdout.count("done:") == 1
    a, b = (torch.load(o / "ckpt.pt", weights_only=True) for o in (out, tmp_path / "straight"))
    assert a["step"] == b["step"] == step + 6 and torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert_same_weights(a, b, 1e-6)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_sample_equals_one_process(toy_run, tmp_path, capsys):
    """Issue 16: 2-process --sample (eta = 1: x_T and the noise of every step from the chunk's generator) writes
    exactly --n-samples samples, equal to the 1-process samples of the same seed; the chunks of 4, 4 and 2 samples
    (rank 0 makes the first and the last) draw different noise. Caught: chunk generators that ignore the chunk's
    start (repeated chunks); every rank making every chunk (twice the samples)."""
    args = ["--sample", "--ckpt", str(toy_run / "ckpt.pt"), "--S", "5", "--eta", "1", "--n-samples", "10",
            "--batch-size", "4", "--clip-denoised", "on", "--device", "cpu"]  # clipped: samples inside [-1, 1]
    r = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("10 samples") == 1, r.stderr
    assert main_inproc(capsys, *args, "--out", str(tmp_path / "one")).returncode == 0
    import numpy as np
    one, two = (np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("one", "two"))
    assert one.shape == two.shape == (10, 1, 2, 1) and (one == two).all()
    flat = one.reshape(10, -1)
    assert (flat[:4] != flat[4:8]).any(axis=1).all() and (flat[:2] != flat[8:]).any(axis=1).all()


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_encode_and_interpolate_on_rank_0(toy_run, tmp_path):
    """Issue 16: --encode and --interpolate under torchrun: rank 0 does the work and writes, once."""
    ck = str(toy_run / "ckpt.pt")
    procs = [torchrun(mode, "--ckpt", ck, "--S", "5", "--n-samples", "8", "--out", str(tmp_path), "--device",
                      "cpu", cwd=tmp_path, wait=False) for mode in ("--encode", "--interpolate")]
    for q, word in zip(procs, ("encode->decode", "interpolation strips")):
        stdout, stderr = q.communicate(timeout=240)
        assert q.returncode == 0 and stdout.count(word) == 1, stderr
    assert (tmp_path / "encode.png").exists() and (tmp_path / "interpolate.png").exists()


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_batch_not_divisible_is_one_line_error(tmp_path):
    """Issue 16: a global batch that 2 processes cannot split -> each rank says so in one line and exits 2 (no
    traceback from ddim.py; torchrun then prints its own summary), before any training."""
    import re
    r = torchrun(*DDP, "--steps", "5", "--batch-size", "15", "--out", str(tmp_path), cwd=tmp_path, real=True)
    msg = "ddim.py: error: --batch-size 15 must be a multiple of the number of processes (2)"
    assert r.returncode != 0 and set(re.findall(r"ddim\.py: error: [^\n]*?\(2\)", r.stderr)) == {msg}, r.stderr
    assert "exitcode  : 2" in r.stderr and f'File "{os.path.join(ROOT, "ddim.py")}"' not in r.stderr
    assert not (tmp_path / "ckpt.pt").exists()
