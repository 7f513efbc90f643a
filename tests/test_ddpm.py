"""Tests for ddpm.py: closed forms first, then exact-oracle sampling and likelihood, then training and the CLI.

The exact oracles: for data from a Gaussian mixture (or a discrete distribution), E[eps | x_t] has a closed
form at every t, so the samplers and the bound are checked with no network in the way.
Run: python3 -m pytest -q tests/test_ddpm.py --durations=10        (add --device cuda|mps|auto for a GPU)
The oracle sampler / likelihood tests and the CLI smoke tests run on --device; the closed-form tests of the
schedule build CPU tables whatever the device. MUTATIONS (below) is read by tests/mutations.py.
"""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import ddpm  # noqa: E402
from conftest import two_ranks  # noqa: E402  (tests/ is on sys.path under pytest)
from ddpm import DDPM, Config, make_schedule  # noqa: E402

SCRIPT = os.path.join(ROOT, "ddpm.py")
F64 = torch.float64

MUTATIONS = [  # deliberate breaks of ddpm.py, each caught by the tests named (python tests/mutations.py ddpm)
    {"name": "ddpm-decoder-edges-not-widened", "file": "ddpm.py",
     "find": "return torch.where(x0 < -1 + 1e-6, log_cdf_plus, torch.where(x0 > 1 - 1e-6, log_sf_minus, log_mid))",
     "replace": "return log_mid",
     "tests": ["tests/test_ddpm.py::test_decoder_edge_bins_reach_infinity"]},
    {"name": "ddpm-decoder-flip-branch-wrong", "file": "ddpm.py",
     "find": "a, b = torch.where(flip, -z_plus, z_minus), torch.where(flip, -z_minus, z_plus)",
     "replace": "a, b = torch.where(flip, -z_minus, z_minus), torch.where(flip, -z_plus, z_plus)",
     "tests": ["tests/test_ddpm.py::test_decoder_matches_numerical_integration"]},
    {"name": "ddpm-decoder-no-flip", "file": "ddpm.py",
     "find": "flip = z_minus > 0",
     "replace": "flip = z_minus > 1e9",
     "tests": ["tests/test_ddpm.py::test_decoder_matches_numerical_integration"]},
    {"name": "ddpm-prior-mean-sqrt-dropped", "file": "ddpm.py",
     "find": "normal_kl(math.sqrt(ab_T) * x0.to(dt)",
     "replace": "normal_kl(ab_T * x0.to(dt)",
     "tests": ["tests/test_ddpm.py::test_prior_term_at_small_T"]},
    {"name": "ddpm-prior-left-out-of-total", "file": "ddpm.py",
     "find": "total = (prior + diffusion + decoder) * to_bpd",
     "replace": "total = (diffusion + decoder) * to_bpd",
     "tests": ["tests/test_ddpm.py::test_prior_term_at_small_T"]},
    {"name": "ddpm-noise-at-last-step", "file": "ddpm.py",
     "find": "if i == 0:\n            return mean",
     "replace": "if i == -1:\n            return mean",
     "tests": ["tests/test_ddpm.py::test_exact_oracle_sampling_matches_mixture"]},
    {"name": "ddpm-variance-swapped", "file": "ddpm.py",
     "find": "sigma2 = self.beta if variance == \"beta\" else self.beta_tilde",
     "replace": "sigma2 = self.beta_tilde if variance == \"beta\" else self.beta",
     "tests": ["tests/test_ddpm.py::test_exact_oracle_sampling_matches_mixture"]},
    {"name": "ddpm-sigma-for-variance", "file": "ddpm.py",
     "find": "return mean + var.sqrt() * z",
     "replace": "return mean + var * z",
     "tests": ["tests/test_ddpm.py::test_exact_oracle_sampling_matches_mixture"]},
    {"name": "ddpm-eq11-sqrt-dropped", "file": "ddpm.py",
     "find": "self.eps_coef = self.beta / self.sqrt_one_minus_alpha_bar",
     "replace": "self.eps_coef = self.beta / (1 - self.alpha_bar)",
     "tests": ["tests/test_ddpm.py::test_posterior_is_product_of_gaussians"]},
    {"name": "ddpm-kl-arguments-swapped", "file": "ddpm.py",
     "find": "for v in (q_mean, q_var, mean, var)",
     "replace": "for v in (mean, var, q_mean, q_var)",
     "tests": ["tests/test_ddpm.py::test_nll_bpd_gaussian_matches_closed_form[beta]"]},
    {"name": "ddpm-decoder-variance-beta1", "file": "ddpm.py",
     "find": "self.sigma2 = torch.cat([self.beta_tilde[1:2], sigma2[1:]])",
     "replace": "self.sigma2 = torch.cat([self.beta[0:1], sigma2[1:]])",
     "tests": ["tests/test_ddpm.py::test_nll_bpd_gaussian_matches_closed_form[beta]"]},
    {"name": "ddpm-elbo-constant-dropped", "file": "ddpm.py",
     "find": " + self.at(\"C\", i, x0)",
     "replace": "",
     "tests": ["tests/test_ddpm.py::test_elbo_loss_is_unbiased_estimate_of_bound"]},
    {"name": "ddpm-elbo-old-scale", "file": "ddpm.py",
     "find": "return per_elem.flatten(1).mean(1).mean() / math.log(2)",
     "replace": "return self.T * per_elem.flatten(1).mean(1).mean()",
     "tests": ["tests/test_ddpm.py::test_elbo_loss_is_unbiased_estimate_of_bound"]},
    {"name": "ddpm-clip-x_t-not-x0_hat", "file": "ddpm.py",
     "find": "x0_hat = self.predict_x0(x_t, i, eps).clamp(-1, 1)",
     "replace": "x0_hat = self.predict_x0(x_t.clamp(-1, 1), i, eps)",
     "tests": ["tests/test_ddpm.py::test_clip_denoised_posterior_form"]},
    {"name": "ddpm-low-discrepancy-is-iid", "file": "ddpm.py",
     "find": "return (u * self.T).long().clamp(max=self.T - 1)",
     "replace": "return torch.randint(self.T, (B,), device=device)",
     "tests": ["tests/test_ddpm.py::test_low_discrepancy_t_one_per_stratum"]},
    {"name": "ddpm-vdm-half-dropped", "file": "ddpm.py",
     "find": "diffusion = 0.5 * dg_dt *",
     "replace": "diffusion = dg_dt *",
     "tests": ["tests/test_ddpm.py::test_continuous_loss_matches_closed_form_and_is_schedule_invariant"]},
    {"name": "ddpm-vdm-sampler-z0-as-data", "file": "ddpm.py",
     "find": "ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])          # t = 0",
     "replace": "ab_prev = torch.cat([torch.sigmoid(-gamma(t_grid[:1] * 0)).cpu().double(), ab[:-1]])  # t = 0",
     "tests": ["tests/test_ddpm.py::test_vdm_sampler_ends_on_the_data"]},
    # torchrun: each break makes a 2-process run differ from the 1-process run (or the samples repeat).
    {"name": "ddpm-ddp-no-average-gradients", "file": "ddpm.py",
     "find": "        average_gradients(model, world)  #",
     "replace": "        None  #",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[simple]"]},
    {"name": "ddpm-ddp-schedule-gradients-not-averaged", "file": "ddpm.py",
     "find": "        average_gradients(model, world)  #",
     "replace": "        average_gradients(model.net if vlb else model, world)  #",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[vlb-learned]"]},
    {"name": "ddpm-ddp-data-generator-seeded-by-rank", "file": "ddpm.py",
     "find": "data_gen = make_generator(cfg.seed, device)",
     "replace": "data_gen = make_generator(cfg.seed + rank, device)",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[simple]"]},
    {"name": "ddpm-ddp-initial-weights-seeded-by-rank", "file": "ddpm.py",
     "find": "torch.manual_seed(cfg.seed)  # the same initial weights on every rank",
     "replace": "torch.manual_seed(cfg.seed + rank)",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[simple]"]},
    {"name": "ddpm-ddp-every-rank-takes-the-first-slice", "file": "ddpm.py",
     "find": "rank_slice(cfg.batch_size, rank, world)",
     "replace": "rank_slice(cfg.batch_size, 0, world)",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[simple]"]},
    {"name": "ddpm-ddp-noise-not-sliced", "file": "ddpm.py",
     "find": "diffusion.loss(net, x0, i[part], noise[part])",
     "replace": "diffusion.loss(net, x0, i[part], noise[:len(x0)])",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[simple]"]},
    {"name": "ddpm-ddp-elbo-t-not-sliced", "file": "ddpm.py",
     "find": "diffusion.loss(net, x0, i[part], noise[part])",
     "replace": "diffusion.loss(net, x0, i[:len(x0)], noise[part])",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[elbo]"]},
    {"name": "ddpm-ddp-vlb-draws-its-own-noise", "file": "ddpm.py",
     "find": "draws=(t[part], eps[part], eps_0[part]))",
     "replace": "draws=None)",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[vlb-learned]"]},
    {"name": "ddpm-ddp-vlb-t-not-sliced", "file": "ddpm.py",
     "find": "draws=(t[part], eps[part], eps_0[part]))",
     "replace": "draws=(t[:len(x0)], eps[part], eps_0[part]))",
     "tests": ["tests/test_ddpm.py::test_torchrun_train_equals_one_process[vlb-learned]"]},
    {"name": "ddpm-ddp-stop-on-one-rank-only", "file": "ddpm.py",
     "find": "stopping = any_rank(stop.set, world, device)",
     "replace": "stopping = stop.set",
     "tests": ["tests/test_ddpm.py::test_torchrun_sigterm_to_one_rank_stops_every_rank"]},
    {"name": "ddpm-ddp-resume-restores-no-data-generator", "file": "ddpm.py",
     "find": "        restore_rng(ckpt[\"rng\"], data_gen, rank, path)  #",
     "replace": "        set_rng_state(ckpt[\"rng\"][\"ranks\"][rank])  #",
     "tests": ["tests/test_ddpm.py::test_torchrun_sigterm_then_resume_equals_straight_run"]},
    {"name": "ddpm-ddp-sample-chunk-generator-ignores-start", "file": "ddpm.py",
     "find": "g = chunk_generator(cfg.seed, start, device)  # x_T and every z of this chunk",
     "replace": "g = chunk_generator(cfg.seed, 0, device)  # x_T and every z of this chunk",
     "tests": ["tests/test_ddpm.py::test_torchrun_sample_and_eval_nll_equal_one_process"]},
    {"name": "ddpm-ddp-samples-not-split", "file": "ddpm.py",
     "find": "my_chunks(cfg.n_samples, cfg.batch_size, rank, world)",
     "replace": "my_chunks(cfg.n_samples, cfg.batch_size, 0, 1)",
     "tests": ["tests/test_ddpm.py::test_torchrun_sample_and_eval_nll_equal_one_process"]},
    {"name": "ddpm-ddp-eval-generator-seeded-by-rank", "file": "ddpm.py",
     "find": "g = chunk_generator(cfg.seed, start, device)  # every x_t, t and noise of this chunk's bound",
     "replace": "g = chunk_generator(cfg.seed + rank, start, device)  # every x_t, t and noise of this chunk's bound",
     "tests": ["tests/test_ddpm.py::test_torchrun_sample_and_eval_nll_equal_one_process"]},
    {"name": "ddpm-ddp-eval-not-split", "file": "ddpm.py",
     "find": "my_chunks(len(x), cfg.batch_size, rank, world)",
     "replace": "my_chunks(len(x), cfg.batch_size, 0, 1)",
     "tests": ["tests/test_ddpm.py::test_torchrun_sample_and_eval_nll_equal_one_process"]},
    {"name": "ddpm-ddp-old-checkpoint-resumed", "file": "ddpm.py",
     "find": "if not isinstance(ckpt[\"rng\"], dict) or \"data\" not in ckpt[\"rng\"]:",
     "replace": "if False:",
     "tests": ["tests/test_ddpm.py::test_old_checkpoint_samples_but_does_not_resume"]},
]


# -----------------------------------------------------------------------------
# Exact noise predictors

# A 2-D mixture of three axis-aligned Gaussians, well separated (>= 6 sd apart), one of them tight
# (sd 0.03) so that a wrong variance at the last sampling steps changes its covariance by > 10 %.
PI = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
MU = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], dtype=F64)
SD = torch.tensor([[0.03, 0.03], [0.3, 0.45], [0.2, 0.15]], dtype=F64)


def on(a, x):
    """A CPU float64 constant as x's dtype on x's device (cast first: MPS has no float64)."""
    return a.to(x.dtype).to(x.device)


def gmm_eps(alpha_bar):
    """E[eps | x_t] for the mixture above: x_t | k ~ N(sqrt(ab) mu_k, ab sd_k^2 + 1 - ab), eps = -sqrt(1-ab) score."""
    def model(x, t):
        ab = on(alpha_bar, x)[t][:, None]                           # (N, 1)
        sd, mu = on(SD, x), on(MU, x)
        logw, parts = [], []
        for k in range(3):
            var = ab * sd[k] ** 2 + (1 - ab)                        # (N, 2)
            diff = x - ab.sqrt() * mu[k]                            # (N, 2)
            logw.append(math.log(PI[k]) - 0.5 * (diff[:, 0] ** 2 / var[:, 0] + diff[:, 1] ** 2 / var[:, 1]
                                                 + var[:, 0].log() + var[:, 1].log()))
            parts.append(diff / var)
        w = torch.softmax(torch.stack(logw, 1), 1)                  # (N, K) posterior over components
        score = -sum(w[:, k:k + 1] * parts[k] for k in range(3))    # grad log p_t(x)
        return -(1 - ab).sqrt() * score
    return model


def component_stats(x):
    """Assign samples to the most likely component; return (weight, mean, per-axis variance / sd^2) each."""
    x = x.cpu().double()
    logp = PI.log() - 0.5 * (((x[:, None] - MU[None]) / SD[None]) ** 2).sum(-1) - SD.log().sum(-1)
    k = logp.argmax(1)
    return [((k == j).double().mean().item(), x[k == j].mean(0), x[k == j].var(0) / SD[j] ** 2) for j in range(3)]


def discrete_eps(alpha_bar, c, p):
    """E[eps | x_t] for i.i.d. coordinates taking value c_j with probability p_j (a mixture of point masses)."""
    def model(x, t):
        ab = on(alpha_bar, x)[t].reshape(-1, *([1] * (x.dim() - 1)))[..., None]
        logw = on(p, x).log() - (x[..., None] - ab.sqrt() * on(c, x)) ** 2 / (2 * (1 - ab))   # (..., K)
        x0_mean = (torch.softmax(logw, -1) * on(c, x)).sum(-1)                                  # E[x0 | x_t]
        return (x - ab[..., 0].sqrt() * x0_mean) / (1 - ab[..., 0]).sqrt()
    return model


# -----------------------------------------------------------------------------
# 1-2. Schedule, forward process, posterior: closed forms

def test_schedules_float64_finite_and_match_formulas():
    """Linear = linspace(1e-4, 0.02); cosine = Nichol & Dhariwal's alpha_bar ratio, clipped at 0.999, all finite.

    Catches: cosine without the 0.999 clip (beta_T = 1 -> 1/sqrt(alpha_T) infinite, lambda_T infinite),
    a float32 schedule, an off-by-one in the cosine grid.
    """
    lin = make_schedule("linear", 1000)
    assert lin.dtype == F64 and torch.allclose(lin, torch.tensor(np.linspace(1e-4, 0.02, 1000)), atol=0, rtol=1e-12)
    cos = make_schedule("cosine", 1000)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    want = np.minimum(1 - (f[1:] / f[0]) / (f[:-1] / f[0]), 0.999)
    assert np.allclose(cos.numpy(), want, rtol=1e-12, atol=0) and cos.max().item() == 0.999
    for schedule in ("linear", "cosine"):
        for variance in ("beta", "beta_tilde"):
            d = DDPM(1000, schedule, variance=variance)
            lam = d.beta ** 2 / (2 * d.sigma2 * d.alpha * (1 - d.alpha_bar))
            for name, v in [("beta", d.beta), ("alpha_bar", d.alpha_bar), ("sigma2", d.sigma2), ("coef_x0", d.coef_x0),
                            ("coef_xt", d.coef_xt), ("1/sqrt(alpha)", d.alpha.rsqrt()), ("lambda", lam),
                            ("1/sqrt(alpha_bar)", d.alpha_bar.rsqrt()), ("log sigma2", d.sigma2.log())]:
                assert v.dtype == F64 and torch.isfinite(v).all(), (schedule, variance, name)
            assert d.alpha_bar[-1] < 1e-4  # x_T is (almost) pure noise: L_T ~ 0


def test_index_convention():
    """Tensor index i is the paper's t = i + 1: q_sample at i = 0 uses alpha_bar_1 = 1 - beta_1, the sampler
    calls the network with i = T-1, ..., 0 in order, and alpha_bar "before the first step" is 1.
    Catches: the network called with t = i + 1, or a loop that starts at T or ends at 1.
    """
    d = DDPM(T=20)
    x0 = torch.ones(1, 3, dtype=F64)
    x1 = d.q_sample(x0, torch.tensor([0]), torch.zeros_like(x0))
    assert torch.allclose(x1, torch.full_like(x0, math.sqrt(1 - 1e-4)))
    assert d.alpha_bar_prev[0] == 1 and d.beta_tilde[0] == 0
    seen = []

    def model(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    d.sample(model, (2, 3), generator=torch.Generator().manual_seed(0))
    assert seen == list(range(19, -1, -1))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_moments(schedule):
    """Eq. 4: empirical mean and variance of x_t over 200k noise draws = sqrt(alpha_bar_t) x0 and 1 - alpha_bar_t,
    with alpha_bar computed independently as the product of (1 - beta_s). Catches alpha for alpha_bar, sqrt missing,
    an index shift (at t = 1 vs t = 2 the moments differ by > 10 standard errors for x0 = 2)."""
    d = DDPM(1000, schedule)
    beta = make_schedule(schedule, 1000).numpy()
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for i in (0, 1, 10, 300, 999):
        ab = np.prod(1 - beta[:i + 1])
        x0 = torch.full((n, 1), 2.0, dtype=F64)
        x = d.q_sample(x0, torch.full((n,), i), torch.randn(n, 1, generator=g, dtype=F64))
        se_mean = math.sqrt((1 - ab) / n)
        assert abs(x.mean().item() - 2 * math.sqrt(ab)) < 4 * se_mean + 1e-12, i
        assert abs(x.var().item() / (1 - ab) - 1) < 4 * math.sqrt(2 / n), i


def test_posterior_is_product_of_gaussians():
    """Eqs. 6-7 against Bayes' rule done independently: q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times
    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t), multiplied as Gaussians in x_{t-1} (precisions add).
    Also Eq. 11 = Eq. 7 evaluated at x0_hat (the two forms of the reverse mean agree), and at t = 1 the
    posterior is the point mass at x0. Catches a swapped coefficient or a wrong alpha_bar_{t-1}."""
    for schedule in ("linear", "cosine"):
        d = DDPM(1000, schedule)
        beta = make_schedule(schedule, 1000)
        ab = torch.cumprod(1 - beta, 0)
        g = torch.Generator().manual_seed(2)
        x0, x_t = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64)
        for i in (1, 2, 50, 500, 999):
            t = torch.full((7,), i)
            mean, var = d.q_posterior(x0, x_t, t)
            prec = 1 / (1 - ab[i - 1]) + (1 - beta[i]) / beta[i]
            want_mean = (ab[i - 1].sqrt() * x0 / (1 - ab[i - 1]) + (1 - beta[i]).sqrt() * x_t / beta[i]) / prec
            assert torch.allclose(mean, want_mean, rtol=1e-9, atol=1e-12), (schedule, i)
            assert torch.allclose(var, torch.full_like(var, 1 / prec.item()), rtol=1e-9), (schedule, i)
            eps = torch.randn(7, 3, generator=g, dtype=F64)
            via_x0 = d.q_posterior(d.predict_x0(x_t, t, eps), x_t, t)[0]
            assert torch.allclose(d.mean_from_eps(x_t, t, eps), via_x0, rtol=1e-8, atol=1e-10), (schedule, i)
        mean, var = d.q_posterior(x0, x_t, torch.zeros(7, dtype=torch.long))
        assert torch.allclose(mean, x0) and (var == 0).all()


# -----------------------------------------------------------------------------
# 3. Exact-oracle sampling

@pytest.fixture(scope="module")
def oracle_samples(device, f64):
    d = DDPM(T=1000, variance="beta")
    x = d.sample(gmm_eps(d.alpha_bar), (20_000, 2), generator=ddpm.make_generator(0, device), dtype=f64, device=device)
    assert x.device.type == device.type
    return component_stats(x)


def test_exact_oracle_sampling_matches_mixture(oracle_samples):
    """Algorithm 2 with the exact E[eps | x_t] of a 3-component 2-D mixture reproduces its weights, means and
    per-axis variances (20k samples, T = 1000, sigma_t^2 = beta_t).

    Tolerances: weights +-0.015 (>= 5 standard errors), means +-5 s.e., variance ratios +-0.035 for the tight
    component and +-0.08 for the broad ones (the exact-chain bias, computed by a variance recursion, is < 1.5 %).
    Confirmed to fail (mutations applied by hand to ddpm.py, then reverted):
      - noise added at the last step (t = 1): tight-component variance ratio 1.11;
      - sigma_t^2 = beta~_t used where beta_t is asked (variance swapped): ratio 0.77;
      - sigma_t instead of sigma_t^2 as the variance (var.sqrt() dropped): samples blow up;
      - Eq. 11 with beta_t / (1 - alpha_bar_t) (sqrt dropped): means and weights off;
      - the network called with t = i + 1 (index off by one): tight ratio 1.30.
    """
    for j, (w, mean, ratio) in enumerate(oracle_samples):
        n_j = 20_000 * PI[j].item()
        assert abs(w - PI[j].item()) < 0.015, (j, w)
        assert ((mean - MU[j]).abs() < 5 * SD[j] / math.sqrt(n_j)).all(), (j, mean)
        tol = 0.035 if j == 0 else 0.08
        assert ((ratio - 1).abs() < tol).all(), (j, ratio)


def test_beta_tilde_is_the_lower_variance_choice(oracle_samples, device, f64):
    """Sec. 3.2: sigma^2 = beta~ is optimal for a point mass, beta for N(0, I): on the tight component (sd 0.03)
    beta~ gives a markedly smaller variance than beta (both with the exact predictor). An exact variance
    recursion for one Gaussian of sd 0.03 predicts ratios 0.768 (beta~) and 0.995 (beta).
    Catches the 'variance' option being ignored or the two choices swapped."""
    d = DDPM(T=1000, variance="beta_tilde")
    x = d.sample(gmm_eps(d.alpha_bar), (6_000, 2), generator=ddpm.make_generator(1, device), dtype=f64, device=device)
    ratio = component_stats(x)[0][2].mean().item()
    assert abs(ratio - 0.768) < 0.05, ratio
    assert abs(oracle_samples[0][2].mean().item() - 0.995) < 0.03


def test_clip_denoised_posterior_form():
    """clip_denoised: p_mean_variance's mean is Eq. 7 at clip(x0_hat, -1, 1); without clipping it is Eq. 11.
    With a predictor whose x0_hat is far outside [-1, 1] the two must differ, and the clipped mean must equal
    the posterior mean at the clipped x0 computed by hand. Catches clipping x_t instead of x0_hat."""
    d = DDPM(T=100)
    x_t = torch.full((4, 1, 2, 2), 0.5, dtype=F64)
    t = torch.full((4,), 40)
    model = lambda x, t: torch.full_like(x, -3.0)  # noqa: E731  (x0_hat > 1)
    mean_clip, _ = d.p_mean_variance(model, x_t, t, clip_denoised=True)
    mean_raw, _ = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    i = 40
    want = d.coef_x0[i] * 1.0 + d.coef_xt[i] * 0.5
    assert torch.allclose(mean_clip, torch.full_like(x_t, want.item()))
    assert not torch.allclose(mean_raw, mean_clip)


# -----------------------------------------------------------------------------
# 4. The variational bound with the exact oracle

LEVELS = 17
C = torch.linspace(-1, 1, LEVELS, dtype=F64)
P = torch.softmax(-C ** 2 / (2 * 0.4 ** 2), 0)  # a Gaussian quantised to the 17 digit levels


S_DATA = 0.5  # sd of the continuous Gaussian data


def gauss_eps(alpha_bar):
    """E[eps | x_t] for x0 ~ N(0, s^2) per coordinate: eps_hat = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    def model(x, t):
        ab = on(alpha_bar, x)[t].reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * x / (ab * S_DATA ** 2 + 1 - ab)
    return model


def gaussian_bound_bits(d):
    """The expected bound of Eq. 5 for N(0, s^2) data and the exact predictor, derived independently:
    with mu_theta = E[mu~ | x_t], E (mu~ - mu_theta)^2 = coef_x0^2 Var(x0 | x_t), Var(x0 | x_t) = s^2 (1-ab)/(ab s^2 + 1-ab),
    so every term of Eq. 5 is a Gaussian expectation in closed form (bits per dimension)."""
    ab, s2, bt = d.alpha_bar, S_DATA ** 2, d.beta_tilde
    sig2 = torch.cat([bt[1:2], (d.beta if d.variance == "beta" else bt)[1:]])   # beta~_2 at t = 1 (official code)
    v = s2 * (1 - ab) / (ab * s2 + 1 - ab)
    c0 = ab.roll(1).sqrt() * d.beta / (1 - ab)          # sqrt(ab_{t-1}) beta_t / (1 - ab_t), used for t >= 2 only
    L_T = 0.5 * (-torch.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * s2 - 1)
    L_t = 0.5 * (torch.log(sig2 / bt) + bt / sig2 - 1) + c0 ** 2 * v / (2 * sig2)
    L_0 = 0.5 * torch.log(2 * math.pi * sig2[0]) + v[0] / (2 * sig2[0])   # decoder mean E[x0 | x1] (mu~_1 = x0)
    return ((L_T + L_t[1:].sum() + L_0) / math.log(2)).item()


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_nll_bpd_gaussian_matches_closed_form(variance, device, f64):
    """Eq. 5 by nll_bpd (Monte Carlo, one x_t per t, 256 x 256 coordinates) with the exact predictor of N(0, 0.5^2)
    data equals the bound computed in closed form within 0.04 bit/dim (~4 standard errors), and that bound lies above
    the true NLL (the differential entropy, 1.047 bits): by 0.165 bits for sigma^2 = beta, 0.82 for beta~.
    Confirmed to fail: KL arguments swapped (q and p), sigma^2 = beta_1 instead of beta~_2 at t = 1 (decoder
    moves 0.2 bit), L_T dropped with T = 10, a sum over t that skips t = 2 or includes the decoder twice."""
    d = DDPM(T=1000, variance=variance)  # levels=None: continuous data, Gaussian density decoder
    torch.manual_seed(3)
    x0 = S_DATA * torch.randn(256, 256, dtype=F64)
    bpd = d.nll_bpd(gauss_eps(d.alpha_bar), x0.to(f64).to(device), clip_denoised=False).mean().item()
    want = gaussian_bound_bits(d)
    truth = 0.5 * math.log2(2 * math.pi * math.e * S_DATA ** 2)
    assert abs(bpd - want) < 0.04, (bpd, want)
    assert want > truth and want - truth < (0.2 if variance == "beta" else 0.9), (want, truth)


def test_nll_bpd_discrete_decoder_bin_width(device, f64):
    """Eq. 13 with the data's own quantisation: for a Gaussian quantised to the 17 digit levels the bound with the
    exact predictor (sigma^2 = beta~) is above the entropy and within 0.3 bit of it (the Gaussian reverse steps'
    own gap at T = 1000: 0.25 bit, 0.16 at T = 4000); L_0 ~ 0 since bins are 2/16 wide. Read with an 8-bit bin
    (levels=256, half-width 1/255) L_0 costs > 1 bit: the bin width must follow the data's levels."""
    H = -(P * P.log2()).sum().item()
    x0 = C[:, None].repeat(1, 64)                       # (17, 64): row j is level j, so the mean over x0 is exact
    for levels, lo, hi in ((LEVELS, 0, 0.01), (256, 1.0, 3.0)):
        d = DDPM(T=1000, variance="beta_tilde", levels=levels)
        torch.manual_seed(3)
        bpd, terms = d.nll_bpd(discrete_eps(d.alpha_bar, C, P), x0.to(f64).to(device), clip_denoised=False,
                               return_terms=True)
        bpd, terms = bpd.cpu().double(), {k: v.cpu().double() for k, v in terms.items()}
        assert lo <= (P * terms["decoder"]).sum() < hi, (levels, terms["decoder"])
        if levels == LEVELS:
            bound = (P * bpd).sum().item()
            assert 0 <= bound - H < 0.3, (bound, H)
            assert (P * terms["prior"]).sum() < 1e-4


def test_elbo_loss_is_unbiased_estimate_of_bound(device, f64):
    """loss_type="elbo" (Eq. 12 weights plus Eq. 8's constant for t >= 2, the Eq. 13 decoder at t = 1) is the
    sampled term in bits/dim, as the official "kl" loss: averaged over every t and fresh noise and times T it equals
    (bound - L_T) in bits/dim from nll_bpd's own terms, within 3 %; each t = 1 example's loss is exactly its
    decoder term L_0 (same noise). Catches: the old T x nats/dim scale (or any other factor), Eq. 8's constant C_t
    dropped (sigma^2 = beta makes it ~0.4 nat)."""
    d = DDPM(T=200, variance="beta", loss_type="elbo", levels=LEVELS)
    model = discrete_eps(d.alpha_bar, C, P)
    torch.manual_seed(4)
    x0 = C[torch.multinomial(P, 16 * 64, replacement=True)].reshape(16, 64).to(f64).to(device)
    _, terms = d.nll_bpd(model, x0, return_terms=True)
    want = (terms["diffusion"] + terms["decoder"]).mean().item()
    i = torch.arange(200, device=device).repeat_interleave(16)  # every t, each with all 16 rows
    got = d.loss(model, x0.repeat(200, 1), i=i).item()
    assert abs(200 * got - want) < 0.03 * want + 1e-3, (200 * got, want)
    noise = torch.randn(x0.shape, dtype=f64, device=device)
    first = d.loss(model, x0, i=torch.zeros(16, dtype=torch.long, device=device), noise=noise).item()
    x1 = d.q_sample(x0, torch.zeros(16, dtype=torch.long, device=device), noise)
    mean, var = d.p_mean_variance(model, x1, torch.zeros(16, dtype=torch.long, device=device), clip_denoised=False)
    ll = ddpm.discretized_gaussian_log_likelihood(x0, mean, var, LEVELS)
    assert abs(first - (-ll.mean().item() / math.log(2))) < (1e-9 if f64 == F64 else 1e-4), first


def log_mass(lo, hi, mean, std, n=20_001):
    """log of the N(mean, std^2) mass on [lo, hi], by Simpson's rule on the density in float64 on the CPU
    (log-sum-exp of log density + log weight: no CDF and no cancellation), independent of ddpm.py's ndtr route."""
    x = torch.linspace(lo, hi, n, dtype=F64)
    w = torch.ones(n, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    log_pdf = -0.5 * ((x - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))
    return torch.logsumexp(log_pdf + w.log(), 0).item() + math.log((hi - lo) / (n - 1) / 3)


def decoder_cases(x0_values, offsets, stds):
    """(x0, mean, std) triples as float64 CPU tensors: the decoder mean at x0 + offset."""
    rows = [(x0, x0 + o, s) for x0 in x0_values for o in offsets for s in stds]
    return (torch.tensor(col, dtype=F64) for col in zip(*rows))


def test_decoder_matches_numerical_integration(device):
    """Eq. 13, interior bins: log p(x0 | x1) = log of the Gaussian mass on [x0 - 1/16, x0 + 1/16] (17 levels) equals
    Simpson integration of the density within 1e-7 in log, for decoder means on both sides of x0, near and far
    (up to 20 sd: the mass is ~1e-64 there). Means more than half a bin below x0 take the `flip` branch, which
    no other test reaches. Catches: a wrong formula in the flip branch (e.g. Phi(-z_minus) - Phi(-z_plus) with
    the signs swapped: a negative mass, clamped), and the flip dropped (Phi(z_plus) - Phi(z_minus) = 1 - 1 in the
    far tail: log 0)."""
    if device.type == "mps":
        pytest.skip("MPS has no float64, and masses of 1e-64 need it")
    offsets = [-0.4, -0.2, -0.1, -0.07, -0.03, 0.0, 0.03, 0.07, 0.1, 0.2, 0.4]
    x0, mean, std = decoder_cases([-0.75, 0.0, 0.25, 0.875], offsets, [0.02, 0.05])
    half = 1 / 16
    assert ((x0 - mean - half) / std > 0).sum() >= 16  # the flip branch is exercised
    got = ddpm.discretized_gaussian_log_likelihood(x0.to(device), mean.to(device), (std ** 2).to(device), LEVELS).cpu()
    cases = zip(x0.tolist(), mean.tolist(), std.tolist())
    want = torch.tensor([log_mass(a - half, a + half, m, s) for a, m, s in cases], dtype=F64)
    assert (got - want).abs().max() < 1e-7, (got - want).abs().max()
    assert want.min() < -100  # far tails really tested


def test_decoder_edge_bins_reach_infinity(device, f64):
    """Eq. 13 at the two edge levels: x0 = -1 takes all the mass below -1 + 1/16 and x0 = +1 all the mass above
    1 - 1/16 (the bins widen to -inf and +inf), checked against Simpson integration over the open side (down to 40 sd
    beyond); at mean = x0 with sd 0.05 that is log Phi(1.25) = -0.112, where the unwidened bin would give
    log 0.789 = -0.237. Catches the first and last bins not widened to +-inf."""
    half = 1 / 16
    offsets = [-0.3, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3]
    for edge in (-1.0, 1.0):
        x0, mean, std = decoder_cases([edge], offsets, [0.02, 0.05])
        got = ddpm.discretized_gaussian_log_likelihood(x0.to(f64).to(device), mean.to(f64).to(device),
                                                       (std ** 2).to(f64).to(device), LEVELS).cpu().double()
        want = []
        for m, s in zip(mean.tolist(), std.tolist()):
            if edge < 0:  # (-inf, -1 + half]
                hi = -1 + half
                want.append(log_mass(min(m, hi) - 40 * s, hi, m, s))
            else:         # [1 - half, +inf)
                lo = 1 - half
                want.append(log_mass(lo, max(m, lo) + 40 * s, m, s))
        tol = 1e-7 if f64 == F64 else 1e-4
        assert (got - torch.tensor(want, dtype=F64)).abs().max() < tol, (edge, got, want)


@pytest.mark.parametrize("T", [10, 20])
def test_prior_term_at_small_T(T, device, f64):
    """L_T = KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) where it is far from 0: T = 10 and 20 with the linear
    schedule (ab_T = 0.90 and 0.81), against the closed form 1/2 (ab_T x0^2 + (1 - ab_T) - log(1 - ab_T) - 1) per
    dimension, ab_T = prod(1 - beta_t) computed here with numpy; and nll_bpd's total is the sum of its three parts.
    Catches a wrong mean (ab_T x0 for sqrt(ab_T) x0) or variance in L_T, and L_T left out of the total (at T = 1000
    both pass unnoticed: L_T ~ 1e-5 bit there)."""
    d = DDPM(T=T)
    ab_T = float(np.prod(1 - np.linspace(1e-4, 0.02, T)))
    torch.manual_seed(14)
    x0 = torch.rand(6, 1, 4, 4, dtype=F64) * 2 - 1
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  (any predictor: L_T does not depend on it)
    total, terms = d.nll_bpd(zero, x0.to(f64).to(device), return_terms=True)
    want = (0.5 * (ab_T * x0 ** 2 + (1 - ab_T) - math.log(1 - ab_T) - 1)).flatten(1).sum(1) / (16 * math.log(2))
    tol = 1e-10 if f64 == F64 else 1e-5
    assert torch.allclose(terms["prior"].cpu().double(), want, rtol=tol, atol=0), (terms["prior"], want)
    assert want.min() > 0.5  # bits/dim: far from 0
    parts = (terms["prior"] + terms["diffusion"] + terms["decoder"]).cpu().double()
    assert torch.allclose(total.cpu().double(), parts, rtol=tol, atol=0)


def test_tables_cached_per_device(device):
    """The float64 schedule masters stay on the CPU; extract-style lookups get one cached copy per (device, dtype),
    made on first use (no host-to-device copy per sampling step), and results land on x's device and dtype."""
    d = DDPM(T=50)
    x = torch.randn(3, 2, device=device)
    t = torch.full((3,), 7, device=device)
    y = d.q_sample(x, t, torch.randn_like(x))
    assert y.device.type == device.type and y.dtype == torch.float32
    copy = d.copies[("sqrt_alpha_bar", x.device, torch.float32)]
    d.q_sample(x, t, torch.randn_like(x))
    assert d.copies[("sqrt_alpha_bar", x.device, torch.float32)] is copy and copy.device.type == device.type
    masters = [getattr(d, n) for n in ("beta", "alpha_bar", "sigma2")]
    assert all(m.device.type == "cpu" and m.dtype == F64 for m in masters)
    want = (d.alpha_bar[7].sqrt() * x.cpu().double()).float()
    assert torch.allclose(d.q_sample(x, t, torch.zeros_like(x)).cpu(), want, rtol=1e-6)


# -----------------------------------------------------------------------------
# 5. Training on a 2-D toy

def test_short_training_on_toy_lands_on_data():
    """Algorithm 1 with the MLP on 8 Gaussians (ring of radius 2.5, sd 0.2), 2000 steps: the loss falls and
    >= 85 % of the samples land within 0.8 (4 sd) of a mode, with all 8 modes hit (measured: 90 %).
    The untrained MLP puts < 30 % there."""
    from common import MLP, make_toy
    torch.manual_seed(0)
    d = DDPM(T=100, beta_1=1e-3, beta_T=0.2)  # a short chain keeps the test fast
    data, net = make_toy("8gaussians", 5000), MLP()
    angles = 2 * math.pi * torch.arange(8) / 8
    modes = 2.5 * torch.stack([angles.cos(), angles.sin()], 1)

    def near():
        x = d.sample(net, (2000, 2), generator=torch.Generator().manual_seed(0))
        dist, which = torch.cdist(x, modes).min(1)
        return (dist < 0.8).float().mean().item(), len(which[dist < 0.8].unique())
    assert near()[0] < 0.3
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(2000):
        opt.param_groups[0]["lr"] = 3e-3 * (1 - step / 2000)  # linear decay: a cleaner end point in few steps
        loss = d.loss(net, data[torch.randint(len(data), (256,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-100:]) < 0.7 * np.mean(losses[:20])
    frac, n_modes = near()
    assert frac > 0.85 and n_modes == 8, (frac, n_modes)


# -----------------------------------------------------------------------------
# Low-discrepancy timesteps (VDM App. I.1)

def test_low_discrepancy_t_one_per_stratum():
    """t_i = floor(T mod(u0 + i/k, 1)): exactly one u per interval [j/k, (j+1)/k), so with k dividing T each
    block of T/k indices holds one t; marginally uniform over many draws."""
    d = DDPM(T=1000, t_sampling="low_discrepancy")
    torch.manual_seed(5)
    for k in (1, 8, 100):
        t = d.sample_i(k, "cpu")
        assert sorted((t // (1000 // k)).tolist()) == list(range(k))
    counts = torch.bincount(torch.cat([d.sample_i(10, "cpu") for _ in range(5000)]) // 100, minlength=10)
    assert (counts == 5000).all()  # one per decile, every time
    first = torch.stack([d.sample_i(10, "cpu")[0] for _ in range(4000)]).double()
    assert abs(first.mean().item() - 499.5) < 4 * 288.7 / math.sqrt(4000)


@pytest.mark.parametrize("loss_type,max_ratio", [("simple", 0.4), ("elbo", 0.5)])
def test_low_discrepancy_lowers_loss_variance(loss_type, max_ratio):
    """On a fixed predictor (the exact one of the 17-level data) and a fixed batch of 64, the minibatch loss
    estimate varies less across 300 draws with low-discrepancy t than with i.i.d. t, with the same mean.
    Measured variance ratios: 0.16 (L_simple), 0.27 (ELBO). An i.i.d. sampler labelled low-discrepancy gives ~1."""
    x0 = C[torch.multinomial(P, 64 * 16, replacement=True, generator=torch.Generator().manual_seed(6))].reshape(64, 16)
    out = {}
    for mode in ("iid", "low_discrepancy"):
        d = DDPM(T=1000, loss_type=loss_type, t_sampling=mode, levels=LEVELS)
        model = discrete_eps(d.alpha_bar, C, P)
        torch.manual_seed(7)
        out[mode] = torch.tensor([d.loss(model, x0).item() for _ in range(300)], dtype=F64)
    assert abs(out["iid"].mean() - out["low_discrepancy"].mean()) < 4 * out["iid"].std() / math.sqrt(300)
    assert out["low_discrepancy"].var() < max_ratio * out["iid"].var()


# -----------------------------------------------------------------------------
# 6. CLI, checkpoints, resume

def run(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


TINY = ["--batch-size", "8", "--T", "20", "--warmup", "2", "--log-every", "1"]


def test_cli_train_sample_resume_eval(tmp_path, capsys, device):
    """--train (a real subprocess) writes ckpt.pt (weights_only-loadable, with the agreed layout) and a grid;
    then, in-process through ddpm.main: --resume continues the step count; --sample writes samples.png and
    samples.npz; --eval-nll prints bits/dim. All on --device."""
    out = str(tmp_path / "run")
    dev = ["--device", device.type]
    r = run("--train", "--steps", "3", "--sample-every", "3", "--out", out, *TINY, *dev)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stdout and "it/s" in r.stdout and "ETA" in r.stdout  # the progress line
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["script"] == "ddpm" and ckpt["step"] == 3 and ckpt["config"]["data_shape"] == [1, 8, 8]
    assert set(ckpt) == {"script", "config", "step", "model", "ema", "optimizer", "rng"}
    assert {"T", "schedule", "beta_1", "beta_T", "dataset", "image_size", "model"} <= set(ckpt["config"])
    assert not set(ddpm.NOT_STORED) & set(ckpt["config"])  # no path, device or precision in a checkpoint
    assert os.path.exists(os.path.join(out, "grid_0000003.png"))
    assert set(ckpt["rng"]) == {"data", "ranks"} and len(ckpt["rng"]["ranks"]) == 1  # data gen. + ranks
    assert "torch" in ckpt["rng"]["ranks"][0] and ("cuda" in ckpt["rng"]["ranks"][0]) == (device.type == "cuda")
    ddpm.main(["--train", "--resume", "--steps", "5", "--sample-every", "100", "--out", out, *TINY, *dev])
    assert "resumed from" in capsys.readouterr().out and state(out)["step"] == 5
    ddpm.main(["--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-samples", "5", "--batch-size", "3",
               "--out", out, *dev])
    assert np.load(os.path.join(out, "samples.npz"))["arr_0"].shape == (5, 8, 8, 1)
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    capsys.readouterr()
    ddpm.main(["--eval-nll", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-eval", "4", "--out", out, *dev])
    bpd = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert 0 < bpd < 50


@pytest.mark.parametrize("objective", ["elbo", "vlb-learned", "bf16"])
def test_cli_every_mode_on_device(tmp_path, capsys, device, objective):
    """Every objective through every mode on --device (in-process): --train a few steps with a sample grid, --resume,
    --sample, --eval-nll. "elbo": the true bound (Eq. 12 + L_0); "vlb-learned": VDM's continuous bound with a
    learned gamma and Fourier features on the digits (the grid and --sample run vdm_sampler on the device);
    "bf16": --precision bf16 (autocast for the network, on the CPU too) trains and samples, resumes without it and
    samples with --precision fp32 (runtime settings, like --device)."""
    out, dev = str(tmp_path / objective), ["--device", device.type]
    flags = {"elbo": ["--loss-type", "elbo"], "vlb-learned": ["--loss-type", "vlb", "--schedule", "learned"],
             "bf16": ["--precision", "bf16"]}[objective]
    ddpm.main(["--train", "--steps", "2", "--sample-every", "2", "--out", out, *TINY, *flags, *dev])
    ck = state(out)
    assert ck["step"] == 2 and os.path.exists(os.path.join(out, "grid_0000002.png"))
    assert all(torch.isfinite(v).all() for v in ck["ema"].values())
    again = [] if objective == "bf16" else flags
    ddpm.main(["--train", "--resume", "--steps", "3", "--sample-every", "100", "--out", out, *TINY, *again, *dev])
    assert state(out)["step"] == 3
    other = ["--precision", "fp32"] if objective == "bf16" else []
    for extra in ([], other) if other else ([],):
        ddpm.main(["--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-samples", "4", "--out", out, *dev, *extra])
        x = np.load(os.path.join(out, "samples.npz"))["arr_0"]
        assert x.shape == (4, 8, 8, 1)
    capsys.readouterr()
    ddpm.main(["--eval-nll", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-eval", "4", "--out", out, *dev])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bits/dim") and 0 < float(last.split()[1]) < 50, last


def test_cli_vdm_objective_round_trip(tmp_path, capsys, device):
    """VDM from the CLI (in-process): --loss-type vlb --schedule learned --learn-endpoints --cond t trains jointly
    (the checkpoint holds gamma_phi's weights, the two flags are in its config), --resume refuses another --cond or
    a missing --learn-endpoints, --sample runs the discretised ancestral sampler, --eval-nll prints the continuous
    bound, and a checkpoint whose config lacks the two fields is refused in one line naming them."""
    out = str(tmp_path / "vlb")
    common = ["--dataset", "moons", "--loss-type", "vlb", "--schedule", "learned", "--T", "20", "--out", out,
              "--device", device.type]
    ddpm.main(["--train", "--steps", "4", "--batch-size", "32", "--log-every", "2", "--sample-every", "4", *common,
               "--learn-endpoints", "--cond", "t"])
    ck = state(out)
    assert ck["step"] == 4 and any(k.startswith("gamma.") for k in ck["ema"])
    assert ck["config"]["learn_endpoints"] is True and ck["config"]["cond"] == "t"
    for flags, word in ((["--learn-endpoints"], "cond"), (["--cond", "t"], "learn_endpoints")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            ddpm.main(["--train", "--resume", "--steps", "5", *common, *flags])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and word in err, err
    old = {**ck, "config": {k: v for k, v in ck["config"].items() if k not in ("cond", "learn_endpoints")}}
    torch.save(old, os.path.join(out, "old.pt"))
    dev = ["--device", device.type]
    code, _, err = in_process(capsys, "--sample", "--ckpt", os.path.join(out, "old.pt"), "--out", out, *dev)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing fields (learn_endpoints, cond)" in err, err
    ddpm.main(["--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-samples", "50", "--out", out, *dev])
    assert np.load(os.path.join(out, "samples.npz"))["arr_0"].shape == (50, 2)
    capsys.readouterr()
    ddpm.main(["--eval-nll", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-eval", "64", "--out", out, *dev])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bits/dim") and math.isfinite(float(last.split()[1]))


def cfg_for(tmp_path, name, device="cpu", **kw):
    base = dict(dataset="moons", T=20, batch_size=16, warmup=3, ckpt_every=1000, sample_every=1000, log_every=1000,
                out=str(tmp_path / name), device=str(device))
    c = Config(**{**base, **kw})
    c.resume = False
    return c


def state(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_state(a, b, exact=True):
    """Model, EMA, Adam state and every RNG stream equal: bitwise, or (exact=False) weights to float tolerance."""
    same = torch.equal if exact else (lambda u, v: torch.allclose(u.double(), v.double(), rtol=1e-4, atol=1e-6))
    for key in ("model", "ema"):
        for k in a[key]:
            assert same(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert same(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert a["step"] == b["step"] and torch.equal(a["rng"]["data"], b["rng"]["data"])  # the data generator
    assert len(a["rng"]["ranks"]) == len(b["rng"]["ranks"])
    for ra, rb in zip(a["rng"]["ranks"], b["rng"]["ranks"]):  # each rank's global RNG streams
        assert set(ra) == set(rb)
        for k in ra:  # "torch" (CPU), "cuda" (a list, one per GPU), "mps"
            for u, v in zip(*(x if isinstance(x, list) else [x] for x in (ra[k], rb[k]))):
                assert torch.equal(u, v), k


def exactness(device):
    """(Config overrides, bitwise?) for resume tests: CUDA repeats bitwise with --deterministic; MPS to tolerance."""
    if device.type == "cuda":
        return {"deterministic": True}, True
    return {}, device.type == "cpu"


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # --deterministic sets a process-wide flag


@pytest.mark.parametrize("dataset", ["moons", "digits", "moons-vlb-learned", "moons-vlb-learned-ends"])
def test_resume_is_bitwise_exact(tmp_path, dataset, device, restore_determinism):
    """2N steps straight == N steps, stop, resume to 2N: model, EMA, Adam state and RNG bitwise equal
    (the digits U-Net has dropout, so the RNG state must be restored too; on CUDA with --deterministic, and the
    checkpoint's "rng" holds the CUDA streams too; on MPS the weights to float tolerance). Catches a resume that
    re-seeds, restarts warm-up, skips the optimizer state or the EMA. The learned schedule's endpoints stay at
    (-13.3, 5.0) by default and move with learn_endpoints=True (catches the flag not reaching MonotoneGamma)."""
    extra, exact = exactness(device)
    kw = {"digits": dict(dataset="digits", batch_size=4), "moons": {},
          "moons-vlb-learned": dict(loss_type="vlb", schedule="learned", cond="t"),
          "moons-vlb-learned-ends": dict(loss_type="vlb", schedule="learned", learn_endpoints=True)}[dataset]
    kw = {**kw, **extra, "device": device.type}
    ddpm.train(cfg_for(tmp_path, "straight", steps=6, **kw))
    ddpm.train(cfg_for(tmp_path, "split", steps=3, **kw))
    c = cfg_for(tmp_path, "split", steps=6, **kw)
    c.resume = True
    ddpm.train(c)
    straight = state(str(tmp_path / "straight"))
    assert_same_state(straight, state(str(tmp_path / "split")), exact)
    if "learned" in dataset:
        ends = straight["model"]["gamma.ends"]
        moved = (ends - torch.tensor([-13.3, 5.0], dtype=F64)).abs()
        assert (moved > 1e-4).all() if "ends" in dataset else (moved == 0).all(), ends


def test_sigkill_then_resume(tmp_path, device, restore_determinism):
    """SIGKILL a training process mid-run; the last checkpoint on disk is intact (atomic write), and resuming
    from it to step k + 10 gives bitwise the same weights as a straight run of k + 10 steps (see exactness())."""
    out = str(tmp_path / "killed")
    extra, exact = exactness(device)
    args = ["--dataset", "moons", "--T", "20", "--batch-size", "16", "--warmup", "3", "--ckpt-every", "10",
            "--sample-every", "100000", "--log-every", "100000", "--out", out, "--device", device.type,
            *(["--deterministic"] if extra else [])]
    p = subprocess.Popen([sys.executable, SCRIPT, "--train", "--steps", "100000", *args],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            time.sleep(0.5)  # let it run past a few more checkpoints, then kill it mid-run
            break
        time.sleep(0.1)
    p.kill()
    p.wait()
    k = state(out)["step"]
    assert k >= 10 and k % 10 == 0
    r = run("--train", "--resume", "--steps", str(k + 10), *args)
    assert r.returncode == 0, r.stderr
    ddpm.train(cfg_for(tmp_path, "straight", device, steps=k + 10, **extra))
    assert_same_state(state(str(tmp_path / "straight")), state(out), exact)


def test_sigterm_saves_and_exits(tmp_path, device):
    """SIGTERM (like Ctrl-C) stops between steps, saves a checkpoint at the current step and exits 130."""
    out = str(tmp_path / "term")
    p = subprocess.Popen([sys.executable, SCRIPT, "--train", "--steps", "100000", "--dataset", "moons", "--T", "20",
                          "--ckpt-every", "50", "--sample-every", "100000", "--log-every", "100000", "--out", out,
                          "--device", device.type],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(out, "ckpt.pt")):
        time.sleep(0.1)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "continue with --resume" in err
    assert state(out)["step"] >= 50


@pytest.mark.parametrize("ckpt_every", [1, 7])
def test_nonfinite_loss_stops_without_saving_nan(tmp_path, device, ckpt_every):
    """A learning rate of 1e30 drives the weights to inf within a few steps: one line naming the step (or, as the
    loss is read only at log and checkpoint steps, the window of steps), exit 2, and every checkpoint left on disk
    is finite. With checkpoints every 7 steps and progress lines every 5 the window is between two such steps."""
    out = str(tmp_path / "nan")
    r = run("--train", "--steps", "50", "--lr", "1e30", "--warmup", "0", "--dataset", "moons", "--T", "20",
            "--ckpt-every", str(ckpt_every), "--log-every", "5", "--sample-every", "1000", "--out", out,
            "--device", device.type)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "non-finite" in line and "step" in line, line
    assert "last good checkpoint kept in" in line, line
    if "loss between steps" in line:
        a, b = (int(w) for w in line.split("between steps ")[1].split(";")[0].split(" and "))
        assert 1 <= a <= b <= 50 and (b % 5 == 0 or b % ckpt_every == 0), line
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        ck = state(out)
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
        assert all(torch.isfinite(v).all() for v in ck["ema"].values())


# -----------------------------------------------------------------------------
# 7. Bad input: one line, exit code 2, no traceback (subprocesses run in parallel)

def make_bad_files(tmp):
    good = str(tmp / "good")
    ddpm.train(cfg_for(tmp, "good", steps=2))
    torch.save({"script": "ncsn", "config": {}, "step": 1}, str(tmp / "foreign.pt"))
    raw = open(os.path.join(good, "ckpt.pt"), "rb").read()
    open(str(tmp / "truncated.pt"), "wb").write(raw[:len(raw) // 2])
    open(str(tmp / "corrupt.pt"), "wb").write(b"not a checkpoint at all" * 10)
    torch.save({"script": "ddpm", "step": 3}, str(tmp / "partial.pt"))
    open(str(tmp / "a_file"), "w").write("x")
    return good


BAD = [  # (flags, a word the one-line message must contain)
    (["--train", "--schedule", "quadratic"], "schedule"),
    (["--train", "--variance", "learned"], "variance"),
    (["--train", "--model", "huge"], "model"),
    (["--train", "--steps", "0"], "--steps"),
    (["--train", "--steps", "-5"], "--steps"),
    (["--train", "--steps", "ten"], "steps"),
    (["--train", "--batch-size", "0"], "--batch-size"),
    (["--train", "--lr", "0"], "--lr"),
    (["--train", "--lr", "-1e-4"], "--lr"),
    (["--train", "--T", "0"], "--T"),
    (["--train", "--ema-decay", "1.5"], "--ema-decay"),
    (["--train", "--warmup", "-1"], "--warmup"),
    (["--train", "--beta-1", "0.5", "--beta-T", "0.1"], "beta"),
    (["--train", "--schedule", "learned"], "do not go together"),
    (["--train", "--loss-type", "vlb"], "do not go together"),
    (["--train", "--loss-type", "vlb", "--schedule", "linear_snr", "--learn-endpoints"], "--learn-endpoints"),
    (["--train", "--loss-type", "vlb", "--schedule", "learned", "--cond", "sigma"], "cond"),
    (["--train", "--fourier", "on"], "--fourier"),
    (["--train", "--dataset", "moons", "--loss-type", "vlb", "--schedule", "linear_snr", "--fourier", "on"], "--fourier"),
    (["--train", "--fourier", "yes"], "fourier"),
    (["--train", "--image-size", "2"], "--image-size"),
    (["--train", "--device", "cuda:99"], "device"),
    (["--train", "--dataset", "no_such_data"], "no_such_data"),
    (["--train", "--out", "{tmp}/a_file/sub"], "not writable"),
    (["--train", "--resume", "--out", "{tmp}/empty"], "no such checkpoint"),
    (["--train", "--resume", "--dataset", "moons", "--T", "20", "--schedule", "cosine", "--out", "{good}"], "schedule"),
    (["--sample"], "--ckpt"),
    (["--eval-nll"], "--ckpt"),
    (["--sample", "--ckpt", "{tmp}/missing.pt"], "no such checkpoint"),
    (["--sample", "--ckpt", "{tmp}/foreign.pt"], "ncsn"),
    (["--sample", "--ckpt", "{tmp}/truncated.pt"], "truncated.pt"),
    (["--sample", "--ckpt", "{tmp}/corrupt.pt"], "corrupt.pt"),
    (["--sample", "--ckpt", "{tmp}/partial.pt"], "missing"),
    (["--sample", "--ckpt", "{good}/ckpt.pt", "--n-samples", "0"], "--n-samples"),
    ([], "--train"),
    (["--train", "--sample"], "exactly one"),
    (["--train", "--no-such-flag"], "unrecognized"),
]


@pytest.mark.parametrize("flags,word", BAD, ids=[" ".join(f) or "no-mode" for f, _ in BAD])
def test_bad_input_table(flags, word, bad_files, capsys, monkeypatch):
    """Every case (run through ddpm.main in this process, so no torch import per case): SystemExit(2), exactly
    one line on stderr starting 'ddpm.py: error:', naming the problem. Any other exception fails the test,
    which is what "no traceback" means in-process; test_bad_input_subprocess checks the real CLI."""
    tmp, good = bad_files
    monkeypatch.chdir(tmp)  # the default --out runs/ddpm is relative: keep it out of the repository
    argv = [f.format(tmp=tmp, good=good) for f in flags]
    with pytest.raises(SystemExit) as e:
        ddpm.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, (argv, e.value.code, err)
    assert len(lines) == 1 and lines[0].startswith("ddpm.py: error:"), (argv, err)
    assert word in lines[0], (argv, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return str(tmp), make_bad_files(tmp)


def test_bad_input_subprocess(bad_files):
    """A slice of the table through real subprocesses (in parallel): exit code 2, one stderr line, no traceback."""
    tmp, good = bad_files
    procs = []
    for flags, word in [BAD[0], BAD[22], BAD[23]]:  # an argparse choice, a foreign and a truncated checkpoint
        argv = [f.format(tmp=tmp, good=good) for f in flags]
        procs.append((argv, word, subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=tmp, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   env={**os.environ, "OMP_NUM_THREADS": "1"})))
    for argv, word, p in procs:
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in err, (argv, p.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("ddpm.py: error:") and word in lines[0], (argv, err)


# -----------------------------------------------------------------------------
# VDM: the SNR view (SNR, discrete and continuous-time bounds)

def test_snr_view_of_ddpm_schedules():
    """gamma_t = -log SNR_t is increasing (SNR decreasing) for both DDPM schedules, and VDM's discrete-time term
    (SNR_{t-1} - SNR_t)/2 ||x0 - x0_hat||^2 equals Eq. 5's KL between the two posteriors of Eq. 7 (sigma^2 = beta~),
    computed with normal_kl. Catches an SNR off by one index or a missing 1/2."""
    for schedule in ("linear", "cosine"):
        d = DDPM(1000, schedule)
        g = ddpm.gamma_discrete(d)
        assert (g.diff() > 0).all() and torch.isfinite(g).all()
        gen = torch.Generator().manual_seed(8)
        x0, x0_hat, x_t = (torch.randn(5, 6, generator=gen, dtype=F64) for _ in range(3))
        for i in (1, 7, 500, 999):
            t = torch.full((5,), i)
            m1, v = d.q_posterior(x0, x_t, t)
            m2, _ = d.q_posterior(x0_hat, x_t, t)
            kl = ddpm.normal_kl(m1, v, m2, v).sum(1)
            assert torch.allclose(ddpm.vdm_discrete_term(d, x0, x0_hat, t), kl, rtol=1e-7), (schedule, i)


def continuous_gauss_eps(gamma):
    """E[eps | z_t] for x ~ N(0, s^2): sigma_t z / (alpha_t^2 s^2 + sigma_t^2); the network is given 999 t."""
    def model(z, t999):
        g = gamma(t999 / 999).reshape(-1, *([1] * (z.dim() - 1)))
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        return s2.sqrt() * z / (a2 * S_DATA ** 2 + s2)
    return model


def continuous_bound_bits(gamma, T=None):
    """Closed form for N(0, s^2) data, per dimension, in bits: prior KL + recon + diffusion, where
    L_inf = 1/2 [log(1 + s^2 e^-gamma_0) - log(1 + s^2 e^-gamma_1)] (depends on the endpoints only), and
    L_T = sum_i 1/2 (SNR(s_i) - SNR(t_i)) s^2 / (1 + s^2 SNR(t_i)) (Var(x | z_t) = s^2 / (1 + s^2 SNR))."""
    s2 = S_DATA ** 2
    g0, g1 = (gamma(torch.tensor(v, dtype=F64)).item() for v in (0.0, 1.0))
    var1 = 1 / (1 + math.exp(-g1))
    prior = 0.5 * ((1 - var1) * s2 + var1 - math.log(var1) - 1)
    recon = 0.5 * math.log(2 * math.pi * math.exp(g0)) + 0.5
    if T is None:
        diff = 0.5 * (math.log1p(s2 * math.exp(-g0)) - math.log1p(s2 * math.exp(-g1)))
    else:
        snr = torch.exp(-gamma(torch.arange(T + 1, dtype=F64) / T))
        diff = (0.5 * (snr[:-1] - snr[1:]) * s2 / (1 + s2 * snr[1:])).sum().item()
    return (prior + recon + diff) / math.log(2)


@pytest.mark.parametrize("t_sampling", ["iid", "low_discrepancy"])
def test_continuous_loss_matches_closed_form_and_is_schedule_invariant(t_sampling):
    """VDM Eqs. 11, 17 with the exact predictor of N(0, 0.5^2) data: vlb_continuous (Monte Carlo over 4096 examples x 64
    coordinates) matches the closed-form bound within 4 standard errors for the linear-SNR and the cosine log-SNR
    with the same endpoints; the two expected losses agree (Sec. 5.1: only the endpoints matter) although the
    per-example variance differs; the bound is above the true NLL (differential entropy) by < 0.01 bit.
    Catches a missing 1/2, gamma' replaced by gamma, alpha and sigma swapped in z_t, a wrong prior or recon term."""
    truth = 0.5 * math.log2(2 * math.pi * math.e * S_DATA ** 2)
    means = {}
    for name, gamma in ddpm.GAMMAS.items():
        torch.manual_seed(9)
        x0 = S_DATA * torch.randn(4096, 64, dtype=F64)
        bpd, terms = ddpm.vlb_continuous(continuous_gauss_eps(gamma), x0, gamma, t_sampling=t_sampling)
        want = continuous_bound_bits(gamma)
        se = bpd.std().item() / math.sqrt(len(bpd))
        assert abs(bpd.mean().item() - want) < 4 * se + 1e-4, (name, bpd.mean().item(), want, se)
        means[name] = (bpd.mean().item(), se)
        assert 0 < want - truth < 0.01
    (m1, s1), (m2, s2) = means.values()
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2)
    assert abs(continuous_bound_bits(ddpm.gamma_linear_snr) - continuous_bound_bits(ddpm.gamma_cosine)) < 1e-9


def test_discrete_vdm_bound_decreases_to_continuous():
    """VDM Eq. 13 / Sec. 4.1: the discrete-time bound with T steps on the same schedule is above L_inf and approaches it as T
    grows (closed form: T = 10, 100, 1000 give 15.1, 1.81, 1.12 bits against L_inf = 1.047: the gap shrinks
    like 1/T, dominated by the first step where SNR(0) = e^13.3), and
    vlb_continuous(T=...) estimates each closed form within 4 standard errors."""
    gamma = ddpm.gamma_linear_snr
    cont = continuous_bound_bits(gamma)
    vals = [continuous_bound_bits(gamma, T) for T in (10, 100, 1000)]
    assert vals[0] > vals[1] > vals[2] > cont and vals[2] - cont < 0.1, (vals, cont)
    assert (vals[1] - cont) / (vals[2] - cont) > 5  # the gap shrinks like 1/T (0.76 -> 0.07 bit)
    for T, want in zip((10, 100, 1000), vals):
        torch.manual_seed(10)
        bpd, _ = ddpm.vlb_continuous(continuous_gauss_eps(gamma), S_DATA * torch.randn(4096, 64, dtype=F64), gamma,
                                     t_sampling="low_discrepancy", T=T)
        assert abs(bpd.mean().item() - want) < 4 * bpd.std().item() / math.sqrt(4096) + 1e-4, (T, bpd.mean(), want)


class ContinuousDiscreteOracle(torch.nn.Module):
    """E[eps | z_t] for i.i.d. coordinates at the 17 levels C with probabilities P, under a log-SNR schedule gamma;
    called like VDMNet, model(z, 999 t). A module (with one unused parameter) so vdm_sampler finds its device."""

    def __init__(self, gamma, device):
        super().__init__()
        self.gamma, self.anchor = gamma, torch.nn.Parameter(torch.zeros((), device=device))

    def gamma_fn(self):
        return self.gamma

    def forward(self, z, t999):
        g = self.gamma(t999 / 999).reshape(-1, *([1] * (z.dim() - 1)))[..., None]
        a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        logw = on(P, z).log() - (z[..., None] - a * on(C, z)) ** 2 / (2 * s ** 2)    # (..., K)
        x_mean = (torch.softmax(logw, -1) * on(C, z)).sum(-1)                         # E[x | z_t]
        return (z - a[..., 0] * x_mean) / s[..., 0]


def test_vdm_sampler_ends_on_the_data(device, f64):
    """vdm_sampler with the exact predictor of 17-level data under VDM's linear log-SNR schedule (T = 100): the samples
    land on the levels (within 1e-6) with the data's frequencies (within 5 standard errors). The chain's t = 0 is the
    clean data (alpha_bar before the first step is 1) and the last step returns x_hat. Catches the chain normalised
    by alpha_0^2 (z_0 treated as the data: at t = 1/T it removes sigma_{t|0}, ~2.4x less than the sigma_t in z_t at
    T = 100, and leaves noise of sd ~1e-3 in the samples). Also runs a learned gamma on the device (its grid there)."""
    diffusion, model = ddpm.vdm_sampler(ContinuousDiscreteOracle(ddpm.gamma_linear_snr, device), 100)
    x = diffusion.sample(model, (500, 16), generator=ddpm.make_generator(15, device), dtype=f64, device=device)
    x = x.cpu().double()
    dist, level = (x[..., None] - C).abs().min(-1)
    assert dist.max() < (1e-6 if f64 == F64 else 1e-3), dist.max()
    freq = torch.bincount(level.flatten(), minlength=LEVELS).double() / level.numel()
    assert ((freq - P).abs() < 5 * (P * (1 - P) / level.numel()).sqrt() + 1e-3).all(), (freq, P)
    learned = ddpm.place(ddpm.VDMNet(torch.nn.Identity(), learned=True), device)
    d, _ = ddpm.vdm_sampler(learned, 10)
    assert d.alpha_bar.device.type == "cpu" and (d.alpha_bar.diff() < 0).all()


def test_learned_gamma_monotone_with_endpoints_and_trainable():
    """VDM App. H's monotone network: gamma_phi is increasing on [0, 1] (so SNR decreases), hits its endpoints
    -13.3 and 5.0 exactly, and the continuous loss sends gradients into phi (through gamma'(t) and gamma(t)).
    A few Adam steps on the bound with the exact predictor keep it monotone with the same endpoints.
    Catches negative weights (a non-monotone gamma) and a missing rescaling to the endpoints."""
    torch.manual_seed(11)
    t = torch.linspace(0, 1, 1001, dtype=F64)
    for _ in range(5):  # monotone for ANY raw parameter values, not just at the initialisation
        g = ddpm.MonotoneGamma(n=64)
        with torch.no_grad():
            for p in (g.w1, g.b1, g.w2, g.b2, g.w3):
                p.copy_(3 * torch.randn_like(p))
        vals = g(t).detach()
        assert (vals.diff() > 0).all() and abs(vals[0] + 13.3) < 1e-9 and abs(vals[-1] - 5.0) < 1e-9
    g = ddpm.MonotoneGamma(n=64)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    for _ in range(3):
        x0 = S_DATA * torch.randn(128, 16, dtype=F64)
        bpd, _ = ddpm.vlb_continuous(continuous_gauss_eps(g), x0, g)
        opt.zero_grad()
        bpd.mean().backward()
        assert g.w2.grad is not None and g.w2.grad.abs().sum() > 0
        opt.step()
    vals = g(t).detach()
    assert (vals.diff() > 0).all() and abs(vals[0] + 13.3) < 1e-9 and abs(vals[-1] - 5.0) < 1e-9


def test_vdm_net_conditioning_on_gamma():
    """VDMNet(cond="gamma") hands the network 999 (gamma(t) + 13.3) / 18.3: for the fixed linear-SNR schedule that is
    999 t again (the two options coincide), for a learned gamma it is the noise level, not t, and the gradient of
    the network's output reaches gamma_phi through it. cond="t" passes 999 t unchanged. Catches the conditioning
    not applied, applied with the learned endpoints instead of VDM's reference ones, or detached."""
    seen = []

    class Spy(torch.nn.Module):  # a "network" that records its time input and depends on it smoothly
        def forward(self, z, c):
            seen.append(c)
            return z * c[:, None] / 999

    torch.manual_seed(0)
    t = torch.rand(16, dtype=F64)
    t999 = (999 * t).float()
    z = torch.randn(16, 2)
    ddpm.VDMNet(Spy(), learned=False, cond="gamma")(z, t999)
    assert torch.allclose(seen[-1].double(), 999 * t, atol=1e-3)
    m = ddpm.VDMNet(Spy(), learned=True, learn_endpoints=True, cond="gamma")
    with torch.no_grad():
        m.gamma.ends.copy_(torch.tensor([-10.0, 3.0], dtype=F64))  # learned endpoints away from the reference
    out = m(z, t999)
    want = 999 * (m.gamma(t) + 13.3) / 18.3
    assert torch.allclose(seen[-1].double(), want, atol=1e-3) and (seen[-1].double() - 999 * t).abs().max() > 10
    out.sum().backward()
    assert m.gamma.w2.grad is not None and m.gamma.w2.grad.abs().sum() > 0
    ddpm.VDMNet(Spy(), learned=True, cond="t")(z, t999)
    assert torch.equal(seen[-1], t999)


def test_fourier_features_and_cli(tmp_path, capsys, device):
    """VDM Sec. 3.4 / App. C: --fourier hands the U-Net z plus sin, cos of z at periods of two and one quantisation
    steps of the data (17-level digits: step 1/8, frequencies 8 pi and 16 pi), so its input has 5 channels and its
    output 1. The features repeat when z moves by two steps, the finest pair by one step, and its sine flips sign
    at half a step. From the CLI: --fourier auto (the default) trains with them for a VLB model on digits and
    stores "on"; --resume with --fourier off is refused; the bound evaluates; the same config with fourier "off"
    builds the plain U-Net.
    Catches frequencies off by a factor of two, sin/cos missing, the features not reaching the network."""
    z = torch.randn(4, 1, 8, 8, dtype=F64)
    f = ddpm.fourier_features(z, 17)
    assert f.shape == (4, 4, 8, 8)
    assert torch.allclose(f[:, 0:1], torch.sin(8 * math.pi * z)) and torch.allclose(f[:, 3:4], torch.cos(16 * math.pi * z))
    step = 2 / 16
    assert torch.allclose(ddpm.fourier_features(z + 2 * step, 17), f, atol=1e-9)
    assert torch.allclose(ddpm.fourier_features(z + step, 17)[:, 2:], f[:, 2:], atol=1e-9)
    assert torch.allclose(ddpm.fourier_features(z + step / 2, 17)[:, 2], -f[:, 2], atol=1e-9)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z_in, c):
            seen.append(z_in)
            return z_in[:, :1]

    zf = z.float()
    ddpm.VDMNet(Spy(), learned=False, fourier_levels=17)(zf, torch.full((4,), 500.0))
    assert seen[-1].shape == (4, 5, 8, 8) and torch.equal(seen[-1][:, :1], zf)
    assert torch.allclose(seen[-1][:, 1:], ddpm.fourier_features(zf, 17))

    out = str(tmp_path / "ff")
    flags = ["--loss-type", "vlb", "--schedule", "linear_snr", "--batch-size", "8", "--T", "20", "--out", out,
             "--device", device.type]
    ddpm.main(["--train", "--steps", "2", "--sample-every", "1000", "--log-every", "1", *flags])
    ck = state(out)
    assert ck["config"]["fourier"] == "on" and ck["model"]["net.conv_in.weight"].shape[1] == 5
    assert ddpm.make_model({**ck["config"], "fourier": "off"}).net.conv_in.weight.shape[1] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--train", "--resume", "--steps", "3", "--fourier", "off", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "fourier" in err, err
    ddpm.main(["--eval-nll", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-eval", "8", "--out", out,
               "--device", device.type])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bits/dim") and math.isfinite(float(last.split()[1]))


def test_variance_gradient_lowers_estimator_variance_keeps_bound():
    """VDM Sec. 5.3 via vdm_backward(schedule_grad="variance"): training only gamma_phi's interior on E[L_diff^2], with the
    exact predictor of N(0, 0.5^2) data, lowers the variance of the per-example diffusion loss while its mean (the
    bound, Sec. 5.1) stays put, and the endpoints do not move. Measured: 62.2 -> 39.6 in 20 steps (the rest is the
    chi-square noise of ||eps - eps_hat||^2 that no schedule removes). Fails if the interior descends the bound instead
    (its mean is flat in the interior, so the variance does not move)."""
    torch.manual_seed(12)
    g = ddpm.MonotoneGamma(n=64)

    class Holder(torch.nn.Module):  # what vdm_backward expects: a module with a .gamma
        def __init__(self):
            super().__init__()
            self.gamma = g

    def oracle(z, t999):  # exact predictor; the schedule's value is detached so only the loss weights carry gradients
        with torch.no_grad():
            gg = g(t999 / 999).reshape(-1, *([1] * (z.dim() - 1)))
        a2, s2 = torch.sigmoid(-gg), torch.sigmoid(gg)
        return s2.sqrt() * z / (a2 * S_DATA ** 2 + s2)

    def stats():
        torch.manual_seed(13)
        d = ddpm.vlb_continuous(oracle, S_DATA * torch.randn(8192, 8, dtype=F64), g)[1]["diffusion"].detach()
        return d.mean().item(), d.var().item(), d.std().item() / math.sqrt(len(d))
    m0, v0, se0 = stats()
    opt = torch.optim.Adam(g.parameters(), lr=1e-1)
    for _ in range(20):
        bpd, terms = ddpm.vlb_continuous(oracle, S_DATA * torch.randn(256, 8, dtype=F64), g)
        opt.zero_grad()
        ddpm.vdm_backward(Holder(), bpd, terms, "variance")
        opt.step()
    m1, v1, se1 = stats()
    assert v1 < 0.75 * v0, (v0, v1)
    assert abs(m1 - m0) < 4 * math.hypot(se0, se1), (m0, m1)
    ends = g(torch.tensor([0.0, 1.0], dtype=F64)).detach()
    assert abs(ends[0] + 13.3) < 1e-9 and abs(ends[1] - 5.0) < 1e-9


# -----------------------------------------------------------------------------
# 8. Several processes: torchrun with gloo on the CPU, 2 processes against 1

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, cwd, wait=True, timeout=240, real=False):
    """`torchrun --nproc_per_node=2 ddpm.py args` (a finished CompletedProcess, or the running Popen, in a session of
    its own so that stop_hung can end its workers too). A finished run starts its two ranks directly
    (conftest.two_ranks) unless real (torchrun's own summary)."""
    if wait and not real:
        return two_ranks(SCRIPT, args, cwd, timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(capsys, *argv):
    """ddpm.main(argv) in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        ddpm.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# The 2-D toy: the MLP has no dropout, so 2 processes compute the 1-process run's gradients (up to float order).
DDP = ["--train", "--dataset", "moons", "--T", "20", "--batch-size", "16", "--warmup", "3", "--log-every", "1000",
       "--sample-every", "100000", "--device", "cpu"]


def assert_same_weights(a, b, rtol):
    """Model and EMA of two checkpoints equal to rtol, relative to each tensor's largest entry."""
    for key in ("model", "ema"):
        for k in a[key]:
            err = ((a[key][k] - b[key][k]).abs().max() / a[key][k].abs().max()).item()
            assert err <= rtol, (key, k, err)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
@pytest.mark.parametrize("objective", ["simple", "elbo", "vlb-learned"])
def test_torchrun_train_equals_one_process(objective, tmp_path, capsys):
    """2 processes with a global batch of 16 (8 each) for 8 steps == 1 process with batch 16: model and
    EMA to 1e-4 (relative to each tensor's largest entry; seen: <= 9e-6, the float order of the gradient average),
    the same step and data generator state; rank 0 alone prints and writes; the checkpoint keeps both ranks' streams.
    "elbo" with low-discrepancy t; "vlb-learned": VDM's bound with the drawn t and both noises handed to
    vlb_continuous, a learned gamma with learned endpoints and the variance gradient (vdm_backward), whose gradients
    are averaged too. Caught: no gradient average (or none for gamma_phi); the data generator or the initial weights
    seeded by rank; every rank on the first slice; t or the noise not sliced; vlb_continuous drawing its own noise."""
    flags = {"simple": [], "elbo": ["--loss-type", "elbo", "--t-sampling", "low_discrepancy"],
             "vlb-learned": ["--loss-type", "vlb", "--schedule", "learned", "--learn-endpoints",
                             "--schedule-grad", "variance"]}[objective]
    args = [*DDP, *flags, "--steps", "8", "--ckpt-every", "4"]
    r = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("step 8/8") == 1 and r.stdout.count("done: 8 steps") == 1, r.stdout
    assert "on 2 processes" in r.stdout
    assert in_process(capsys, *args, "--out", str(tmp_path / "one"))[0] == 0
    one, two = (state(str(tmp_path / n)) for n in ("one", "two"))
    assert one["step"] == two["step"] == 8
    assert torch.equal(one["rng"]["data"], two["rng"]["data"]) and len(two["rng"]["ranks"]) == 2
    assert_same_weights(one, two, 1e-4)


def communicate_or_fail(p, timeout=120):
    """The stderr of a stopping torchrun Popen; if a rank is left waiting for the other, kill its session and fail."""
    try:
        return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers
        p.communicate()
        raise AssertionError("the 2-process run hung after SIGTERM") from None


def worker_pid(p, rank, timeout=60):
    """The pid of the torchrun worker of this rank: a child of p whose environment holds RANK=rank (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if ppid == p.pid else []
            except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun {p.pid}")


def wait_for_checkpoint(path, p, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not os.path.exists(path):
        time.sleep(0.1)
    assert os.path.exists(path), p.communicate()[1] if p.poll() is not None else "no checkpoint in time"


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_sigterm_then_resume_equals_straight_run(tmp_path):
    """SIGTERM to torchrun (it forwards it to both ranks) mid-run -> every rank stops after the same step,
    rank 0 saves once and says so; --resume with 2 processes to step s + 6 == a straight 2-process run to
    s + 6 (model and EMA to 1e-6 relative, the data generator's state equal). Caught: a resume that does not restore
    the data generator."""
    args = [*DDP, "--ckpt-every", "5"]
    out = tmp_path / "stopped"
    p = torchrun(*args, "--steps", "100000", "--out", str(out), cwd=tmp_path, wait=False)
    wait_for_checkpoint(str(out / "ckpt.pt"), p)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    err = communicate_or_fail(p)
    assert p.returncode != 0 and err.count("continue with --resume") == 1, err
    step = state(str(out))["step"]
    assert step >= 5 and f"stopped at step {step}" in err
    total = str(step + 6)
    procs = [torchrun(*args, "--steps", total, "--out", str(o), *extra, cwd=tmp_path, wait=False)
             for o, extra in ((out, ["--resume"]), (tmp_path / "straight", []))]
    for q in procs:
        stdout, stderr = q.communicate(timeout=240)
        assert q.returncode == 0, stderr
    assert stdout.count("done:") == 1
    a, b = (state(str(o)) for o in (out, tmp_path / "straight"))
    assert a["step"] == b["step"] == step + 6 and torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert_same_weights(a, b, 1e-6)


@pytest.fixture(scope="module")
def ddp_ckpts(tmp_path_factory):
    """Two tiny moons checkpoints (4 steps): L_simple and VDM's bound with a learned gamma."""
    tmp = tmp_path_factory.mktemp("ddp")
    ddpm.train(cfg_for(tmp, "simple", steps=4))
    ddpm.train(cfg_for(tmp, "vlb", steps=4, loss_type="vlb", schedule="learned"))
    return {k: str(tmp / k / "ckpt.pt") for k in ("simple", "vlb")}


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_sample_and_eval_nll_equal_one_process(ddp_ckpts, tmp_path, capsys):
    """2-process --sample writes exactly --n-samples samples, equal to the 1-process samples of the same seed
    (chunks of 4, 4 and 2: rank 0 makes the first and the last; they draw different noise); 2-process --eval-nll
    prints the 1-process bits/dim and terms, on as many examples (Eq. 5 for L_simple, VDM's bound for vlb).
    Caught: chunk generators that ignore the chunk's start (repeated chunks) or depend on the rank; every rank
    doing every chunk (twice the samples / examples)."""
    runs = {"sample": ["--sample", "--ckpt", ddp_ckpts["simple"], "--n-samples", "10"],
            "eval-simple": ["--eval-nll", "--ckpt", ddp_ckpts["simple"], "--n-eval", "10"],
            "eval-vlb": ["--eval-nll", "--ckpt", ddp_ckpts["vlb"], "--n-eval", "10"]}
    common = ["--batch-size", "4", "--device", "cpu"]
    procs = {k: torchrun(*a, *common, "--out", str(tmp_path / "two" / k), cwd=tmp_path, wait=False)
             for k, a in runs.items()}
    two = {}
    for k, q in procs.items():
        two[k] = q.communicate(timeout=240)
        assert q.returncode == 0, two[k][1]
    for k, a in runs.items():
        code, out, err = in_process(capsys, *a, *common, "--out", str(tmp_path / "one" / k))
        assert code == 0, err
        if k.startswith("eval"):  # the last line: bits/dim and its three terms, the same digits
            last_two, last_one = two[k][0].strip().splitlines()[-1], out.strip().splitlines()[-1]
            assert last_one.startswith("bits/dim") and "on 10 held-out" in last_one, last_one
            assert last_two == last_one and two[k][0].count("bits/dim ") == 1 + two[k][0].count("running"), two[k][0]
    assert two["sample"][0].count("10 samples on 2 processes") == 1, two["sample"][0]
    one, two = (np.load(tmp_path / n / "sample" / "samples.npz")["arr_0"] for n in ("one", "two"))
    assert one.shape == two.shape == (10, 2) and (one == two).all()
    assert (one[:4] != one[4:8]).any(axis=1).all() and (one[:2] != one[8:]).any(axis=1).all()


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_torchrun_batch_not_divisible_is_one_line_error(tmp_path):
    """A global batch that 2 processes cannot split -> each rank says so in one line and exits 2 (no
    traceback from ddpm.py; torchrun then prints its own summary), before any training."""
    import re
    r = torchrun(*DDP, "--steps", "5", "--batch-size", "15", "--out", str(tmp_path), cwd=tmp_path, real=True)
    msg = "ddpm.py: error: --batch-size 15 must be a multiple of the number of processes (2)"
    assert r.returncode != 0 and set(re.findall(r"ddpm\.py: error: [^\n]*?\(2\)", r.stderr)) == {msg}, r.stderr
    assert "exitcode  : 2" in r.stderr and f'File "{SCRIPT}"' not in r.stderr
    assert not (tmp_path / "ckpt.pt").exists()


def test_old_checkpoint_samples_but_does_not_resume(tmp_path, capsys):
    """A checkpoint whose "rng" holds the bare global streams and no data generator state: --resume refuses
    it in one line (exit 2: its minibatches cannot continue exactly); --sample still reads it."""
    out = str(tmp_path / "old")
    ddpm.train(cfg_for(tmp_path, "old", steps=2))
    ck = state(out)
    torch.save({**ck, "rng": ck["rng"]["ranks"][0]}, os.path.join(out, "ckpt.pt"))  # {"torch": ...} as before
    code, _, err = in_process(capsys, *DDP, "--steps", "4", "--resume", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot resume" in err, err
    code, _, err = in_process(capsys, "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--n-samples", "3",
                              "--out", out, "--device", "cpu")
    assert code == 0 and np.load(os.path.join(out, "samples.npz"))["arr_0"].shape == (3, 2), err


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker processes in /proc (Linux)")
def test_torchrun_sigterm_to_one_rank_stops_every_rank(tmp_path):
    """A SIGTERM that reaches rank 1 alone (not the rank that writes) stops both ranks after the same step:
    rank 0 saves once and says so, the workers exit 130, nothing hangs. Caught: a stop decided per rank (rank 1
    leaves alone and rank 0 waits for it, or the two ranks' collectives no longer match)."""
    out = tmp_path / "one-rank"
    p = torchrun(*DDP, "--ckpt-every", "5", "--steps", "100000", "--out", str(out), cwd=tmp_path, wait=False)
    wait_for_checkpoint(str(out / "ckpt.pt"), p)
    os.kill(worker_pid(p, 1), signal.SIGTERM)
    err = communicate_or_fail(p)
    step = state(str(out))["step"]
    assert err.count("continue with --resume") == 1 and f"stopped at step {step}" in err, (p.returncode, err)
    assert "exitcode  : 130" in err, (p.returncode, err)  # torchrun's summary of its workers
