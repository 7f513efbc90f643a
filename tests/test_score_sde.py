"""Tests for score_sde.py (Song et al. 2021, arXiv 2011.13456).

The samplers are checked with the EXACT score of a 2-D Gaussian mixture, which is closed-form at every t
(p_t = sum_k w_k N(m_t mu_k, m_t^2 C_k + std_t^2 I) for all three SDEs), in float64, with fixed seeds.
Each docstring says which deliberate mutation of score_sde.py the test was seen to catch.
Run: python3 -m pytest -q tests/test_score_sde.py --durations=10
"""
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import score_sde as S  # noqa: E402
from conftest import two_ranks  # noqa: E402  (tests/ is on sys.path under pytest)

F64 = torch.float64
# Deliberate breaks of score_sde.py and the tests that catch them: python tests/mutations.py sde.
MUTATIONS = [
    {"name": "sde-prior-normaliser", "file": "score_sde.py",
     "find": "math.log(2 * math.pi * self.prior_std ** 2)",
     "replace": "math.log(2 * math.pi * self.prior_std)",
     "tests": ["tests/test_score_sde.py::test_prior_logp_is_the_normal_density[ve]"]},
    {"name": "sde-likelihood-weighting-g", "file": "score_sde.py",
     "find": "g2 = sde.sde(torch.zeros_like(x), t)[1] ** 2",
     "replace": "g2 = sde.sde(torch.zeros_like(x), t)[1]",
     "tests": ["tests/test_score_sde.py::test_weighted_loss_of_a_wrong_score[vp]",
               "tests/test_score_sde.py::test_weighted_loss_of_a_wrong_score[ve]"]},
    {"name": "sde-ald-step-size", "file": "score_sde.py",
     "find": "step = 2 * alpha * (snr * std) ** 2",
     "replace": "step = 2 * alpha * snr ** 2 * std",
     "tests": ["tests/test_score_sde.py::test_corrector_step_sizes[vp]",
               "tests/test_score_sde.py::test_corrector_step_sizes[ve]"]},
    {"name": "sde-langevin-step-no-square", "file": "score_sde.py",
     "find": "step = 2 * alpha * (snr * ratio) ** 2",
     "replace": "step = 2 * alpha * (snr * ratio)",
     "tests": ["tests/test_score_sde.py::test_corrector_step_sizes[ve]"]},
    {"name": "sde-langevin-noise-sqrt-e", "file": "score_sde.py",
     "find": "x = x_mean + expand((2 * step).sqrt(), x) * z             # Langevin noise",
     "replace": "x = x_mean + expand(step.sqrt(), x) * z             # Langevin noise",
     "tests": ["tests/test_score_sde.py::test_corrector_keeps_p_t_stationary[langevin-vp]"]},
    {"name": "sde-vp-alpha-is-beta", "file": "score_sde.py",
     "find": "return 1 - self.beta_i(t, dt)",
     "replace": "return self.beta_i(t, dt)",
     "tests": ["tests/test_score_sde.py::test_corrector_step_sizes[vp]"]},
    {"name": "sde-probability-flow-half", "file": "score_sde.py",
     "find": "return drift - 0.5 * expand(g ** 2, x) * score",
     "replace": "return drift - expand(g ** 2, x) * score",
     "tests": ["tests/test_score_sde.py::test_probability_flow_maps_prior_quantiles_to_data_quantiles[vp]"]},
    {"name": "sde-int-beta-half", "file": "score_sde.py",
     "find": "0.5 * t ** 2 * (self.beta_max - self.beta_min)",
     "replace": "t ** 2 * (self.beta_max - self.beta_min)",
     "tests": ["tests/test_score_sde.py::test_marginal_prob_solves_the_moment_odes[vp]"]},
    {"name": "sde-ve-g-factor-2", "file": "score_sde.py",
     "find": "math.sqrt(2 * self.log_ratio)).to(x.dtype)",
     "replace": "math.sqrt(self.log_ratio)).to(x.dtype)",
     "tests": ["tests/test_score_sde.py::test_marginal_prob_solves_the_moment_odes[ve]"]},
    {"name": "sde-vp-ancestral-no-sqrt", "file": "score_sde.py",
     "find": "x_mean = (x + expand(beta, x) * score) / expand((1 - beta).sqrt(), x)",
     "replace": "x_mean = x + expand(beta, x) * score",
     "tests": ["tests/test_score_sde.py::test_vp_ancestral_equals_ddpm_step"]},
    {"name": "sde-subvp-ancestral-noise", "file": "score_sde.py",
     "find": "std = s_next * b2.sqrt() / s",
     "replace": "std = b2.sqrt()",
     "tests": ["tests/test_score_sde.py::test_ancestral_is_gaussian_posterior_with_tweedie_x0[subvp]"]},
    {"name": "sde-divergence-sign", "file": "score_sde.py",
     "find": "logp = sde.prior_logp(z) + delta_logp",
     "replace": "logp = sde.prior_logp(z) - delta_logp",
     "tests": ["tests/test_score_sde.py::test_likelihood_exact_trace_matches_closed_form"]},
    {"name": "sde-couple-not-inverse", "file": "score_sde.py",
     "find": "torch.linalg.inv(COLOR_M).to(u.dtype)",
     "replace": "COLOR_M.to(u.dtype)",
     "tests": ["tests/test_score_sde.py::test_colorize_keeps_grey_and_transform_is_orthogonal"]},
    {"name": "sde-ve-sigma0-not-zero", "file": "score_sde.py",
     "find": "torch.where(t > 0, sigma, torch.zeros_like(sigma))",
     "replace": "sigma",
     "tests": ["tests/test_score_sde.py::test_last_predictor_step_denoises[ve]"]},
    {"name": "sde-grid-ends-at-eps", "file": "score_sde.py",
     "find": "    return list(zip(ts, ts[1:] + [0.0]))",
     "replace": "    ts = [eps + (1 - eps) * k / N for k in range(N, -1, -1)]\n    return list(zip(ts[:-1], ts[1:]))",
     "tests": ["tests/test_score_sde.py::test_point_mass_spread_after_pc_and_ode[ve]"]},
    {"name": "sde-rk45-growth-after-rejection", "file": "score_sde.py",
     "find": "h *= min(1.0, grow) if rejected else grow",
     "replace": "h *= grow",
     "tests": ["tests/test_score_sde.py::test_rk45_no_step_growth_right_after_a_rejection"]},
    {"name": "sde-ode-no-denoise", "file": "score_sde.py",
     "find": "        if denoise:\n",
     "replace": "        if False:\n",
     "tests": ["tests/test_score_sde.py::test_point_mass_spread_after_pc_and_ode[ve]"]},
    # torchrun / DDP
    {"name": "sde-ddp-no-average-gradients", "file": "score_sde.py",
     "find": "            average_gradients(net, world)  # the gradient",
     "replace": "            pass  # the gradient",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-data-generator-seeded-by-rank", "file": "score_sde.py",
     "find": "    data_gen = make_generator(cfg.seed, device)\n    data = load_data(",
     "replace": "    data_gen = make_generator(cfg.seed + rank, device)\n    data = load_data(",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-initial-weights-seeded-by-rank", "file": "score_sde.py",
     "find": "    torch.manual_seed(cfg.seed)  # the initial weights: alike on every rank\n",
     "replace": "    torch.manual_seed(cfg.seed + rank)  # the initial weights\n",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-every-rank-same-slice", "file": "score_sde.py",
     "find": "    B, part = cfg.batch_size, rank_slice(cfg.batch_size, rank, world)"
             "  # the global batch and this rank's slice\n",
     "replace": "    B, part = cfg.batch_size, rank_slice(cfg.batch_size, 0, world)\n",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-t-not-sliced", "file": "score_sde.py",
     "find": "x0, cfg.likelihood_weighting, cfg.train_eps, t=t[part], z=z[part])",
     "replace": "x0, cfg.likelihood_weighting, cfg.train_eps, t=t[:len(x0)], z=z[part])",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-noise-not-sliced", "file": "score_sde.py",
     "find": "x0, cfg.likelihood_weighting, cfg.train_eps, t=t[part], z=z[part])",
     "replace": "x0, cfg.likelihood_weighting, cfg.train_eps, t=t[part], z=z[:len(x0)])",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-low-discrepancy-per-slice", "file": "score_sde.py",
     "find": "        t = sample_t(B, cfg.train_eps, cfg.t_sampling, device, data_gen)  # (B,)",
     "replace": "        t = sample_t(B, cfg.train_eps, cfg.t_sampling, device, data_gen)  # (B,)\n"
                "        t = t.clone(); t[part] = sample_t(len(t[part]), cfg.train_eps, cfg.t_sampling, "
                "device, data_gen)",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[ve-lowdisc]"]},
    {"name": "sde-ddp-printed-loss-not-averaged", "file": "score_sde.py",
     "find": "                loss_sum = mean_over_ranks(loss_sum, world)  # the global batch's loss",
     "replace": "                loss_sum = loss_sum  # the global batch's loss",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-every-rank-prints", "file": "score_sde.py",
     "find": "    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 alone prints\n",
     "replace": "    log = print\n",
     "tests": ["tests/test_score_sde.py::test_ddp_train_equals_one_process[vp]"]},
    {"name": "sde-ddp-resume-data-generator-not-restored", "file": "score_sde.py",
     "find": "        restore_rng(ckpt[\"rng\"], data_gen, rank, path)  # the data generator",
     "replace": "        set_rng_state(ckpt[\"rng\"][\"ranks\"][rank])  # the data generator",
     "tests": ["tests/test_score_sde.py::test_ddp_sigterm_then_resume_equals_straight_run"]},
    {"name": "sde-ddp-old-checkpoint-rng-not-refused", "file": "score_sde.py",
     "find": "if not isinstance(ckpt.get(\"rng\"), dict) or \"data\" not in ckpt[\"rng\"]:",
     "replace": "if False:",
     "tests": ["tests/test_score_sde.py::test_old_checkpoint_is_refused_for_resume_but_samples"]},
    {"name": "sde-ddp-classifier-no-average-gradients", "file": "score_sde.py",
     "find": "        average_gradients(net, world)",
     "replace": "        pass",
     "tests": ["tests/test_score_sde.py::test_ddp_classifier_equals_one_process"]},
    {"name": "sde-ddp-classifier-t-not-sliced", "file": "score_sde.py",
     "find": "y_data[idx[part]], t[part], z[part])",
     "replace": "y_data[idx[part]], t[:B // world], z[part])",
     "tests": ["tests/test_score_sde.py::test_ddp_classifier_equals_one_process"]},
    {"name": "sde-ddp-classifier-stop-not-saved", "file": "score_sde.py",
     "find": "            save = step % cfg.ckpt_every == 0 or step == total or stopping",
     "replace": "            save = step % cfg.ckpt_every == 0 or step == total",
     "tests": ["tests/test_score_sde.py::test_ddp_classifier_sigterm_then_resume_equals_straight_run"]},
    {"name": "sde-ddp-sample-chunk-offset-by-rank", "file": "score_sde.py",
     "find": "        x, nfe = make(start, m, chunk_generator(cfg.seed, start, device))",
     "replace": "        x, nfe = make(start, m, chunk_generator(cfg.seed, start + rank, device))",
     "tests": ["tests/test_score_sde.py::test_ddp_sample_and_class_equal_one_process"]},
    {"name": "sde-ddp-sample-chunk-ignores-start", "file": "score_sde.py",
     "find": "        x, nfe = make(start, m, chunk_generator(cfg.seed, start, device))",
     "replace": "        x, nfe = make(start, m, chunk_generator(cfg.seed, 0, device))",
     "tests": ["tests/test_score_sde.py::test_ddp_sample_and_class_equal_one_process"]},
    {"name": "sde-ddp-nll-rank0-chunks-only", "file": "score_sde.py",
     "find": "    return gather_chunks(chunks, world), max(",
     "replace": "    return gather_chunks(chunks, 1), max(",
     "tests": ["tests/test_score_sde.py::test_ddp_eval_nll_equals_one_process"]},
    {"name": "sde-ddp-rank0-mode-on-every-rank", "file": "score_sde.py",
     "find": "    _, x = held_out(saved, cfg, \"--colorize\" if colour else \"--inpaint\", device)\n    if rank > 0:",
     "replace": "    _, x = held_out(saved, cfg, \"--colorize\" if colour else \"--inpaint\", device)\n    if False:",
     "tests": ["tests/test_score_sde.py::test_ddp_rank0_modes_equal_one_process"]},
]

# The mixture: two well-separated, correlated components with unequal weights (data scale ~[-2, 2]).
W = torch.tensor([0.3, 0.7], dtype=F64)
MU = torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=F64)
C = torch.tensor([[[0.10, 0.03], [0.03, 0.05]], [[0.06, -0.02], [-0.02, 0.12]]], dtype=F64)
SDES = {"vp": lambda: S.VPSDE(), "subvp": lambda: S.subVPSDE(), "ve": lambda: S.VESDE(0.01, 8.0)}


def mixture_at(sde, t):
    """Means (K, 2) and covariances (K, 2, 2) of p_t's components: N(m_t mu_k, m_t^2 C_k + std_t^2 I)."""
    m, s = sde.marginal_prob(torch.ones(1, dtype=F64), torch.tensor([t], dtype=F64))
    return m * MU, m ** 2 * C + s ** 2 * torch.eye(2, dtype=F64)


def like(a, x):
    """A CPU float64 constant in x's dtype on x's device (cast on the CPU first: MPS has no float64)."""
    return a.to(x.dtype).to(x.device)


def mix_score(sde):
    """Exact grad log p_t(x) of the mixture (all samples of a call share one t, as in every sampler), on x's device."""
    def score(x, t):
        mean, cov = mixture_at(sde, float(t[0]))
        P, mean = like(torch.linalg.inv(cov), x), like(mean, x)     # (K, 2, 2), (K, 2)
        d = x[:, None, :] - mean[None]                               # (B, K, 2)
        Pd = torch.einsum("kij,bkj->bki", P, d)
        logp = like(torch.log(W) - 0.5 * torch.logdet(cov), x) - 0.5 * (d * Pd).sum(-1)
        return -(torch.softmax(logp, 1)[:, :, None] * Pd).sum(1)     # sum_k r_k(x) (-P_k d_k)
    return score


def sample_mixture(n, mean, cov, g):
    """n exact samples of a mixture with weights W."""
    k = (torch.rand(n, generator=g, dtype=F64) < W[1]).long()
    L = torch.linalg.cholesky(cov)
    return mean[k] + torch.einsum("bij,bj->bi", L[k], torch.randn(n, 2, generator=g, dtype=F64))


def mixture_errors(x, mean=MU, cov=C):
    """(weight error of component 1, max |mean error|, max relative covariance error) of samples x,
    each point assigned to the nearer component mean; covariance errors are divided by sqrt(C_ii C_jj)."""
    x = x.cpu().double()
    near1 = (x - mean[1]).norm(dim=1) < (x - mean[0]).norm(dim=1)
    errs = [abs(float(near1.double().mean() - W[1])), 0.0, 0.0]
    for k, sel in enumerate((~near1, near1)):
        xs = x[sel]
        if len(xs) < 10:  # a component (almost) lost: as wrong as it gets
            return [errs[0], math.inf, math.inf]
        sd = cov[k].diagonal().sqrt()
        errs[1] = max(errs[1], float((xs.mean(0) - mean[k]).abs().max()))
        errs[2] = max(errs[2], float(((torch.cov(xs.T) - cov[k]).abs() / sd.outer(sd)).max()))
    return errs


TOL = (0.04, 0.05, 0.15)  # weight, mean, relative covariance: ~4 standard errors at 4000 samples, N = 200


def assert_matches(x, what, tol=TOL):
    errs = mixture_errors(x)
    assert all(e <= t for e, t in zip(errs, tol)), f"{what}: weight/mean/cov errors {errs} exceed {tol}"


# -----------------------------------------------------------------------------
# 1. Marginals (App. B) against the SDEs' own moment equations, and the VP chain against prod(1 - beta_i)

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_marginal_prob_solves_the_moment_odes(name):
    """marginal_prob's mean coefficient m(t) and variance v(t) solve dm/dt = a(t) m, dv/dt = 2 a(t) v + g(t)^2,
    the moment equations of the linear SDE dx = a(t) x dt + g(t) dw, integrated here with RK4 from sde().
    Caught: sub-VP std without the square (std^2 = 1 - e^{-int beta}); int_beta missing the 1/2; VE g
    without the factor 2 inside the sqrt; VP std = 1 - exp(-int beta)."""
    sde = SDES[name]()
    one = torch.ones(1, 1, dtype=F64)

    def rhs(t, mv):
        tt = torch.tensor([t], dtype=F64)
        drift, g = sde.sde(one, tt)
        a = float(drift)  # drift = a(t) * x at x = 1
        return torch.stack([a * mv[0], 2 * a * mv[1] + float(g) ** 2])

    m0, s0 = sde.marginal_prob(torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64))
    mv, t, h = torch.tensor([float(m0), float(s0) ** 2], dtype=F64), 0.0, 1e-3
    for _ in range(1000):
        k1 = rhs(t, mv); k2 = rhs(t + h / 2, mv + h / 2 * k1); k3 = rhs(t + h / 2, mv + h / 2 * k2); k4 = rhs(t + h, mv + h * k3)
        mv, t = mv + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
        if round(t * 1000) % 250 == 0:
            m, s = sde.marginal_prob(torch.ones(1, dtype=F64), torch.tensor([t], dtype=F64))
            assert float(m) == pytest.approx(float(mv[0]), rel=1e-6)
            assert float(s) ** 2 == pytest.approx(float(mv[1]), rel=1e-6)
    # The prior is the t = 1 marginal (up to the data): std(1) = prior_std.
    assert float(s) == pytest.approx(sde.prior_std, rel=1e-4)


def test_vp_marginal_equals_product_of_chain():
    """The DDPM chain of VPSDE.discretize (Eq. 10, beta_i = beta(t_i) dt) has prod(1 - beta_i) -> exp(-int beta)
    = mean_coef(1)^2 as N grows, with an O(1/N) error (quartering from N = 2500 to 10000); its variance
    recursion ends at std(1)^2; the VE chain's variances add up to sigma(1)^2 - sigma(eps)^2 (Eq. 8).
    Caught: beta_i = beta(t) (no dt); G = beta_i instead of sqrt(beta_i)."""
    sde = S.VPSDE()
    m, s = sde.marginal_prob(torch.ones(1, dtype=F64), torch.ones(1, dtype=F64))
    errors = []
    for N in (2500, 10000):
        t = torch.arange(N, 0, -1, dtype=F64) / N                            # t_i = i / N, all N steps at once
        f, G = sde.discretize(torch.ones(N, 1, dtype=F64), t, 1 / N)
        prod_alpha = float(((f[:, 0] + 1) ** 2).prod())                     # prod (sqrt(1 - beta_i))^2
        errors.append(abs(prod_alpha / float(m) ** 2 - 1))
        var = 0.0
        for b in (G ** 2).flip(0).tolist():                                  # x_i = sqrt(1 - b) x_{i-1} + sqrt(b) z
            var = (1 - b) * var + b
        assert var == pytest.approx(float(s) ** 2, rel=1e-4)
    assert errors[1] < 0.02 and 3.5 < errors[0] / errors[1] < 4.5, errors
    ve, x = S.VESDE(0.01, 8.0), torch.ones(1, 1, dtype=F64)
    total = sum(float(ve.discretize(x, torch.tensor([t], dtype=F64), t - tn)[1]) ** 2 for t, tn in S.time_grid(50, 1e-5))
    assert total == pytest.approx(8.0 ** 2, rel=1e-10)   # the grid ends at the data, sigma_0 = 0 (Eq. 8)


def test_time_grid_is_the_official_linspace():
    """time_grid(N, eps): the N levels of the official torch.linspace(1, eps, N), each paired with the next, and the
    last level eps paired with t = 0 (the data); N = 1 is the single step 1 -> 0.
    Caught: the old grid of N steps from 1 to eps (its last step landed at eps, not the data)."""
    grid = S.time_grid(7, 1e-3)
    levels = torch.tensor([t for t, _ in grid], dtype=F64)
    torch.testing.assert_close(levels, torch.linspace(1, 1e-3, 7, dtype=F64), rtol=0, atol=1e-15)
    assert [tn for _, tn in grid] == [t for t, _ in grid[1:]] + [0.0]
    assert S.time_grid(1, 1e-3) == [(1.0, 0.0)]


# -----------------------------------------------------------------------------
# 2. Every predictor x corrector, and the ODE sampler, with the exact mixture score

PC = [(p, c) for p in ("euler_maruyama", "reverse_diffusion", "ancestral_sampling") for c in ("langevin", "ald", "none")]


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_pc_sampler_every_combination(name, device, f64):
    """pc_sample with every predictor x corrector (N = 200, M = 1, snr 0.16) on 4000 particles reproduces the
    mixture's weights, component means and covariances. Caught: Langevin noise sqrt(e) instead of sqrt(2 e);
    VE ancestral std without the 1/sigma_i^2; reverse diffusion without G^2 on the score; VP ancestral without
    the 1/sqrt(1 - beta) (all fail by far); EM drift with + instead of - dt."""
    sde = SDES[name]()
    score = mix_score(sde)
    for p, c in PC:
        x = S.pc_sample(score, sde, (4000, 2), p, c, n_steps=200, generator=S.make_generator(1, device), dtype=f64,
                        device=device)
        assert_matches(x, f"{name} {p} + {c}")


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_corrector_only(name, device, f64):
    """Corrector-only sampling (predictor none, Langevin, M = 4 per level) also gets there on VP and sub-VP
    (the official corrector cannot run on sub-VP at all). Caught: alpha_i = beta_i instead of 1 - beta_i.
    (Corrector-only is the paper's weakest sampler: with the VE SDE and ALD it does not converge at this budget.)"""
    sde = SDES[name]()
    x = S.pc_sample(mix_score(sde), sde, (4000, 2), "none", "langevin", n_corrector_steps=4, n_steps=200,
                    generator=S.make_generator(2, device), dtype=f64, device=device)
    assert_matches(x, f"{name} corrector only", (0.04, 0.05, 0.2))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("corrector", ["langevin", "ald"])
def test_corrector_keeps_p_t_stationary(name, corrector, device, f64):
    """Started from exact samples of p_t, 30 corrector steps at that t leave p_t unchanged (Langevin MCMC targets
    p_t, Alg. 4/5). Caught: noise sqrt(e) instead of sqrt(2 e) (covariance halves); step 2 (r|z|/|g|) (no square)."""
    sde, t = SDES[name](), 0.05
    mean, cov = mixture_at(sde, t)
    g = torch.Generator().manual_seed(3)
    x = sample_mixture(4000, mean, cov, g).to(f64).to(device)
    g = g if device.type == "cpu" else S.make_generator(3, device)   # CPU: the same stream continues
    x, _ = S.CORRECTORS[corrector](mix_score(sde), sde, x, t, 1 / 200, 0.16, 30, g)
    errs = mixture_errors(x, mean, cov)
    assert all(e <= tol for e, tol in zip(errs, TOL)), f"{errs}"


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_ode_sampler(name, device, f64):
    """ode_sample (Eq. 13 with RK45, rtol = atol = 1e-4) reproduces the mixture, with a modest NFE.
    Caught: probability flow with g^2 instead of g^2 / 2 on the score; RK45 with one wrong tableau entry."""
    sde = SDES[name]()
    x, nfe = S.ode_sample(mix_score(sde), sde, (4000, 2), rtol=1e-4, atol=1e-4,
                          generator=S.make_generator(4, device), dtype=f64, device=device)
    assert_matches(x, f"{name} ode")
    assert 20 < nfe < 400


class WrongDiffusion(S.VPSDE):
    """A VP SDE whose diffusion coefficient g is 20% too large (Euler-Maruyama and the ODE read sde())."""
    def sde(self, x, t):
        drift, g = super().sde(x, t)
        return drift, 1.2 * g


class WrongChain(S.VPSDE):
    """A VP SDE whose discrete chain has G 20% too large (reverse diffusion reads discretize())."""
    def discretize(self, x, t, dt):
        f, G = super().discretize(x, t, dt)
        return f, 1.2 * G


class WrongDrift(S.VPSDE):
    """A VP SDE whose drift f is 20% too small."""
    def sde(self, x, t):
        drift, g = super().sde(x, t)
        return 0.8 * drift, g


@pytest.mark.parametrize("bad,sampler", [(WrongDiffusion, "euler_maruyama"), (WrongChain, "reverse_diffusion"),
                                         (WrongDiffusion, "ode"), (WrongDrift, "ode")])
def test_negative_wrong_coefficient_fails(bad, sampler, device, f64):
    """The tolerances of the tests above reject a sampler with a 20% wrong diffusion or drift coefficient
    (the score stays exact for the correct VP SDE)."""
    sde, score = bad(), mix_score(S.VPSDE())
    g = S.make_generator(1, device)
    if sampler == "ode":
        x, _ = S.ode_sample(score, sde, (4000, 2), rtol=1e-4, atol=1e-4, generator=g, dtype=f64, device=device)
    else:
        x = S.pc_sample(score, sde, (4000, 2), sampler, "none", n_steps=200, generator=g, dtype=f64, device=device)
    with pytest.raises(AssertionError):
        assert_matches(x, "mutant")


def test_none_none_returns_prior_and_unknown_names_fail():
    """predictor none + corrector none is the prior itself; unknown names raise ValueError."""
    sde = S.VESDE(0.01, 8.0)
    x = S.pc_sample(mix_score(sde), sde, (3000, 2), "none", "none", n_steps=5, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert float(x.std()) == pytest.approx(8.0, rel=0.05)
    for kw in ({"predictor": "heun"}, {"corrector": "mala"}):
        with pytest.raises(ValueError):
            S.pc_sample(mix_score(sde), sde, (2, 2), **kw)


# -----------------------------------------------------------------------------
# 3. The VP ancestral predictor is DDPM's step

def test_vp_ancestral_equals_ddpm_step():
    """ancestral_sampling on VP (Eq. 4) equals Ho et al.'s Algorithm 2 step written with a noise predictor:
    x_{i-1} = (x_i - beta_i / sqrt(1 - alpha_bar_i) eps(x_i)) / sqrt(1 - beta_i) + sqrt(beta_i) z, with
    DDPM's linear schedule beta_i = (0.1 + 19.9 i / N) / N and alpha_bar_i = prod_{j <= i} (1 - beta_j),
    computed here independently (numpy, float64), the score given as -eps / sqrt(1 - alpha_bar_i).
    Caught: beta_i = beta(t_next) dt (off by one level); noise std beta instead of sqrt(beta)."""
    import numpy as np
    N = 1000
    beta = (0.1 + 19.9 * np.arange(1, N + 1) / N) / N               # beta_1 ... beta_N
    alpha_bar = np.cumprod(1 - beta)
    sde = S.VPSDE(0.1, 20.0, N)
    eps_net = lambda x: torch.sin(3 * x) + 0.5 * x                   # any noise predictor
    for i in (N, 500, 2):
        t, t_next = i / N, (i - 1) / N                                # t_i = i / N
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(i), dtype=F64)
        z = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
        b, ab = beta[i - 1], alpha_bar[i - 1]
        ddpm = (x - b / math.sqrt(1 - ab) * eps_net(x)) / math.sqrt(1 - b) + math.sqrt(b) * z
        score = lambda y, tt: -eps_net(y) / math.sqrt(1 - ab)
        ours, ours_mean = S.ancestral_sampling(score, sde, x, t, t_next, torch.Generator().manual_seed(7))
        torch.testing.assert_close(ours, ddpm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours_mean, ddpm - math.sqrt(b) * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["subvp", "ve"])
def test_ancestral_is_gaussian_posterior_with_tweedie_x0(name):
    """sub-VP ancestral (ours) and VE ancestral (App. F) both equal q(x_s | x_t, x0_hat): Gaussian conditioning of
    the chain x_s = m_s x0 + std_s e1, x_t = (m_t / m_s) x_s + b e2 (b^2 = std_t^2 - (m_t/m_s)^2 std_s^2), written
    here as mean m_s x0 + c (x_t - m_t x0), c = a std_s^2 / std_t^2, var std_s^2 - a c std_s^2, with Tweedie's
    x0_hat = (x_t + std_t^2 s) / m_t. Caught: sub-VP noise std b instead of std_s b / std_t (which the mixture
    statistics miss)."""
    sde = SDES[name]()
    score = lambda y, tt: torch.sin(2 * y) - 0.3 * y                  # any score function
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    for t, s_ in ((0.9, 0.6), (0.05, 0.01)):
        (m_t, std_t), (m_s, std_s) = [[float(v) for v in sde.marginal_prob(torch.ones(1, dtype=F64), torch.tensor([u], dtype=F64))]
                                      for u in (t, s_)]
        a = m_t / m_s
        c = a * std_s ** 2 / std_t ** 2
        x0_hat = (x + std_t ** 2 * score(x, None)) / m_t
        expected = m_s * x0_hat + c * (x - m_t * x0_hat) + math.sqrt(std_s ** 2 - a * c * std_s ** 2) * z
        ours, _ = S.ancestral_sampling(score, sde, x, t, s_, torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


# -----------------------------------------------------------------------------
# 4. RK45 and the probability-flow ODE

def test_rk45_linear_ode():
    """dy/dt = A y with A = [[-1, 2], [-2, -1]] has y(t) = e^{-t} R(2t) y0 (a damped rotation); RK45 reaches
    it within tolerance, backwards in time too. Caught: any wrong Dormand-Prince weight or error coefficient."""
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)

    def exact(t):
        c, s = math.cos(2 * t), math.sin(2 * t)
        return math.exp(-t) * y0 @ torch.tensor([[c, -s], [s, c]], dtype=F64)

    y1, nfe = S.rk45(lambda t, y: y @ A.T, y0, 0.0, 3.0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(y1, exact(3.0), rtol=1e-6, atol=1e-8)
    yb, _ = S.rk45(lambda t, y: y @ A.T, exact(3.0), 3.0, 0.0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(yb, y0, rtol=1e-6, atol=1e-7)


def test_rk45_nfe_falls_as_rtol_loosens():
    """Looser tolerances take fewer function evaluations (and the error grows no faster than the tolerance)."""
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
    nfes = []
    for rtol in (1e-9, 1e-7, 1e-5, 1e-3):
        _, nfe = S.rk45(lambda t, y: y @ A.T, y0, 0.0, 3.0, rtol=rtol, atol=rtol)
        nfes.append(nfe)
    assert nfes == sorted(nfes, reverse=True) and nfes[0] > 2 * nfes[-1], nfes


def test_rk45_no_step_growth_right_after_a_rejection():
    """scipy's RK45 rule (followed by the official code's solver): the step accepted right after a rejected one
    is not followed by a larger step. Read from the evaluation times: after the two evaluations of the initial
    step estimate, each attempt (t, h) evaluates t + h/5, t + 3h/10, t + 4h/5, t + 8h/9, t + h, t + h; an attempt
    was accepted when the next one starts at t + h. A narrow bump in f forces rejections.
    Caught: growth allowed right after a rejection."""
    times = []

    def f(t, y):
        times.append(t)
        return -y + 50 * math.exp(-((t - 0.5) / 0.02) ** 2)

    S.rk45(f, torch.ones(1, 1, dtype=F64), 0.0, 1.0, rtol=1e-6, atol=1e-6)
    ev = times[2:]
    att = [(ev[i + 4] - 1.25 * (ev[i + 4] - ev[i]), 1.25 * (ev[i + 4] - ev[i])) for i in range(0, len(ev), 6)]
    accepted = [abs(b[0] - (a[0] + a[1])) < 1e-12 for a, b in zip(att, att[1:])] + [True]
    after_reject = [k for k in range(1, len(att) - 1) if not accepted[k - 1] and accepted[k]]
    assert len(after_reject) >= 2, att
    assert all(att[k + 1][1] <= att[k][1] * (1 + 1e-9) for k in after_reject), att


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_probability_flow_maps_prior_quantiles_to_data_quantiles(name, device, f64):
    """For 1-D Gaussian data N(mu, s^2), p_t is Gaussian and the probability-flow ODE is the monotone affine
    map between p_1 and p_eps: the q-quantile of p_1 lands on the q-quantile of p_eps. Caught: the 1/2 in
    Eq. 13 (probability_flow with g^2 s); a wrong sign of the drift."""
    mu, s2 = 0.7, 0.2
    sde = SDES[name]()
    eps = sde.sample_eps

    def moments(t):
        m, std = sde.marginal_prob(torch.ones(1, dtype=F64), torch.tensor([t], dtype=F64))
        return float(m) * mu, float(m) ** 2 * s2 + float(std) ** 2

    score = lambda x, t: -(x - moments(float(t[0]))[0]) / moments(float(t[0]))[1]
    q = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=F64)
    normal_q = math.sqrt(2) * torch.erfinv(2 * q - 1)                  # standard normal quantiles
    m1, v1 = moments(1.0)
    m0, v0 = moments(eps)
    z = (m1 + math.sqrt(v1) * normal_q)[:, None].to(f64).to(device)    # quantiles of p_1
    tol = 1e-7 if f64 == F64 else 1e-5                                  # float32 (MPS) cannot resolve 1e-7
    x, nfe = S.ode_sample(score, sde, (len(q), 1), rtol=tol, atol=tol, eps=eps, z=z, dtype=f64, device=device,
                          denoise=False)
    torch.testing.assert_close(x[:, 0].cpu().double(), m0 + math.sqrt(v0) * normal_q, rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# Issue 13: the last step lands on the data (t = 0), checked with point masses (exact score)

def pm(name, t):
    """(mean coefficient m_t, std_t, g(t)^2) of the test SDEs written out here (App. B), independently of score_sde:
    VP / sub-VP with beta(t) = 0.1 + 19.9 t, int_0^t beta = 0.1 t + 9.95 t^2; VE (SDES: 0.01, 8) sigma = 0.01 800^t."""
    if name == "ve":
        sigma = 0.01 * 800.0 ** t
        return 1.0, sigma, 2 * math.log(800.0) * sigma ** 2
    B, beta = 0.1 * t + 9.95 * t * t, 0.1 + 19.9 * t
    if name == "vp":
        return math.exp(-B / 2), math.sqrt(-math.expm1(-B)), beta
    return math.exp(-B / 2), -math.expm1(-B), beta * -math.expm1(-2 * B)


def pm_reverse_step(name, t, t_next, m, std):
    """The reverse-diffusion predictor from t to t_next with the exact score -(x - m x0) / std^2 of a point mass x0,
    written as x' = A x + C x0 + G z: VE (Eq. 8, sigma_0 = 0), VP (Eq. 10, beta_i = beta(t) dt), sub-VP (App. E:
    Euler-Maruyama chain f = -beta x dt / 2, G^2 = g^2 dt). Returns (A, C, G)."""
    dt = t - t_next
    if name == "ve":
        G2 = pm(name, t)[1] ** 2 - (pm(name, t_next)[1] ** 2 if t_next > 0 else 0.0)
        return 1 - G2 / std ** 2, G2 * m / std ** 2, math.sqrt(G2)
    if name == "vp":
        b = (0.1 + 19.9 * t) * dt
        return 2 - math.sqrt(1 - b) - b / std ** 2, b * m / std ** 2, math.sqrt(b)
    G2 = pm(name, t)[2] * dt
    return 1 + (0.1 + 19.9 * t) * dt / 2 - G2 / std ** 2, G2 * m / std ** 2, math.sqrt(G2)


def pm_score(name, x0):
    def score(x, t):
        m, std, _ = pm(name, float(t[0]))
        return -(x - m * x0) / std ** 2
    return score


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_last_predictor_step_denoises(name, device, f64):
    """The last predictor step goes from t = eps to the data (t = 0), as in the official code. Started from exact
    samples x = m x0 + std z of p_eps for a point mass x0, its x_mean is Tweedie's x0 for VE (reverse diffusion
    and ancestral: sigma_0 = 0) and sub-VP ancestral, and for VP / sub-VP reverse diffusion the affine map
    A x + C x0 written out in pm_reverse_step (VP: |A| std = 0.09 std(eps) left). Caught: sigma_0 = sigma(0)
    instead of 0 in the VE chain (the last step would barely move)."""
    sde, eps = SDES[name](), SDES[name]().sample_eps
    m, std, _ = pm(name, eps)
    x0 = torch.tensor([0.3, -0.5], dtype=f64, device=device)
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=F64).to(device, f64)
    x = m * x0 + std * z
    A, C, _ = pm_reverse_step(name, eps, 0.0, m, std)
    tol = dict(rtol=1e-9, atol=1e-12) if f64 == F64 else dict(rtol=1e-4, atol=1e-6)
    _, x_mean = S.reverse_diffusion(pm_score(name, x0), sde, x, eps, 0.0, S.make_generator(1, device))
    torch.testing.assert_close(x_mean, A * x + C * x0, **tol)
    _, x_mean = S.ancestral_sampling(pm_score(name, x0), sde, x, eps, 0.0, S.make_generator(1, device))
    if name == "vp":  # x0_hat with beta(eps) eps for std(eps)^2: (x - b (x - m x0) / std^2) / sqrt(1 - b)
        b = (0.1 + 19.9 * eps) * eps
        torch.testing.assert_close(x_mean, (x - b * (x - m * x0) / std ** 2) / math.sqrt(1 - b), **tol)
    else:
        torch.testing.assert_close(x_mean, x0.expand_as(x), **tol)
    if name == "ve":
        assert A == 0                                             # Tweedie: no spread left at all


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_point_mass_spread_after_pc_and_ode(name, device, f64):
    """With the exact score of a point mass x0, PC sampling (reverse diffusion, no corrector, N = 100) and the ODE
    sampler end at the spread that the discretisation leaves, computed exactly here: PC by the mean / variance
    recursion of the affine Gaussian chain x' = A x + C x0 + G z (pm_reverse_step), the ODE by its closed form
    x(eps) = m_eps x0 + (std_eps / std_1)(x(1) - m_1 x0) followed by the noise-free last step (noise_removal).
    VE: no spread (Tweedie); VP ~0.09 std(eps); sub-VP ~1.2 std(eps) ~ 1e-4 (its chain is Euler-Maruyama).
    Caught: the time grid ending at eps (no step to the data); ode_sample without its denoising step."""
    sde, eps, N = SDES[name](), SDES[name]().sample_eps, 100
    x0 = torch.tensor([0.3, -0.5], dtype=f64, device=device)
    score = pm_score(name, x0)
    # PC, predictor only: exact mean and variance of every coordinate through the chain.
    x = S.pc_sample(score, sde, (4000, 2), "reverse_diffusion", "none", n_steps=N,
                    generator=S.make_generator(0, device), dtype=f64, device=device)
    mu, var = torch.zeros(2, dtype=F64), sde.prior_std ** 2
    for t, t_next in S.time_grid(N, eps):
        m, std, _ = pm(name, t)
        A, C, G = pm_reverse_step(name, t, t_next, m, std)
        mu, var, last = A * mu + C * x0.cpu().double(), A * A * var + G * G, A * A * var
    spread = float((x.cpu().double() - mu).std())
    if name == "ve":
        assert spread < (1e-9 if f64 == F64 else 1e-5), spread
    else:
        assert spread == pytest.approx(math.sqrt(last), rel=0.05), (spread, math.sqrt(last))
        assert float((x.cpu().double().mean(0) - mu).abs().max()) < 4 * math.sqrt(last / 4000) + 1e-12
    # The ODE: deterministic, so every sample is checked.
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=F64).to(device, f64)
    tol = 1e-7 if f64 == F64 else 1e-5                                  # float32 (MPS) cannot resolve 1e-7
    x, _ = S.ode_sample(score, sde, z.shape, rtol=tol, atol=tol, eps=eps, z=z, dtype=f64, device=device)
    (m1, s1, _), (m, std, _) = pm(name, 1.0), pm(name, eps)
    A, C, _ = pm_reverse_step(name, eps, 0.0, m, std)
    x_eps = m * x0 + std / s1 * (z - m1 * x0)
    torch.testing.assert_close(x, A * x_eps + C * x0, rtol=0, atol=1e-7 if f64 == F64 else 1e-5)
    if name == "ve":
        assert float((x - x0).abs().max()) < (1e-9 if f64 == F64 else 1e-5)


# -----------------------------------------------------------------------------
# Issue 13: formulas the samplers' statistics cannot see

@pytest.mark.parametrize("name", ["vp", "ve"])
def test_prior_logp_is_the_normal_density(name, device, f64):
    """prior_logp(z) = log N(z; 0, prior_std^2 I) summed over dimensions, against torch.distributions.Normal.
    Caught: the VE normaliser log(2 pi sigma) instead of log(2 pi sigma^2) (the VE likelihood test replaces
    prior_logp with the exact p_1, so only this test sees it)."""
    sde = SDES[name]()
    z = 1.3 * sde.prior_std * torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z.to(device, f64)).cpu().double(), want,
                               rtol=1e-8 if f64 == F64 else 1e-5, atol=0)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_weighted_loss_of_a_wrong_score(name, device, f64):
    """Eq. 7 with a deliberately wrong score: data at x0 = 0, model score = the exact score of a point mass at
    c = (0.5, 0.5), i.e. of N(m_t c, std_t^2 I). Then s + z / std_t = m_t c / std_t^2 for every z, and the loss is
    E_t[lambda(t) m_t^2 |c|^2 / (d std_t^4)], computed here by Simpson's rule over t in [0.5, 1] (t drawn
    low-discrepancy in [0.5, 1], so the Monte-Carlo error is below 1e-3): lambda = std^2 (default) and lambda = g^2
    (likelihood weighting). Caught: likelihood weighting g instead of g^2 (the exact-score loss test gives 0 under
    any weighting)."""
    sde, lo = SDES[name](), 0.5
    c2 = 0.25                                                          # |c|^2 / d
    u = torch.linspace(lo, 1, 2001, dtype=F64).tolist()
    w = [1 if i in (0, 2000) else 4 if i % 2 else 2 for i in range(2001)]

    def simpson(f):
        return sum(wi * f(t) for wi, t in zip(w, u)) / 6000                  # the mean over U[lo, 1]

    want_std2 = simpson(lambda t: pm(name, t)[0] ** 2 * c2 / pm(name, t)[1] ** 2)
    want_g2 = simpson(lambda t: pm(name, t)[2] * pm(name, t)[0] ** 2 * c2 / pm(name, t)[1] ** 4)
    x0 = torch.zeros(2000, 2, dtype=f64, device=device)
    c = torch.full((2,), 0.5, dtype=f64, device=device)

    def score(x, t):  # the exact score of N(m_t c, std_t^2 I)
        m, std = sde.marginal_prob(torch.ones_like(t), t)
        return -(x - S.expand(m, x) * c) / S.expand(std, x) ** 2

    torch.manual_seed(0)
    got_std2 = float(S.loss(score, sde, x0, eps=lo, t_sampling="low_discrepancy"))
    got_g2 = float(S.loss(score, sde, x0, likelihood_weighting=True, eps=lo, t_sampling="low_discrepancy"))
    assert got_std2 == pytest.approx(want_std2, rel=2e-3) and got_g2 == pytest.approx(want_g2, rel=2e-3), \
        (got_std2, want_std2, got_g2, want_g2)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_corrector_step_sizes(name, device, f64):
    """One corrector step on the score -x / v of N(0, v I) is x' = (1 - e / v) x + sqrt(2 e) z; with z redrawn
    from the same generator, the output is checked exactly for the step sizes of Alg. 4 / 5:
    ALD (official form) e = 2 alpha (r std_t)^2; Langevin e = 2 alpha (r |z| / |g|)^2 with batch-mean norms;
    alpha = 1 (VE), 1 - beta(t) dt (VP). Caught: ALD step 2 alpha r^2 std_t (the stationarity test holds for any
    small step); Langevin step without the square; alpha_i = beta_i instead of 1 - beta_i."""
    sde, t, dt, r, v = SDES[name](), 0.3, 1 / 200, 0.16, 0.7
    alpha = 1.0 if name == "ve" else 1 - (0.1 + 19.9 * t) * dt
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64).to(device, f64)
    score = lambda y, tt: -y / v
    z = torch.randn(x.shape, generator=S.make_generator(5, device), dtype=f64, device=device)
    tol = dict(rtol=1e-10, atol=1e-12) if f64 == F64 else dict(rtol=1e-4, atol=1e-5)
    e = 2 * alpha * (r * pm(name, t)[1]) ** 2
    out, _ = S.ald(score, sde, x, t, dt, r, 1, S.make_generator(5, device))
    torch.testing.assert_close(out, (1 - e / v) * x + math.sqrt(2 * e) * z, **tol)
    e = 2 * alpha * (r * float(z.norm(dim=1).mean()) / float((x / v).norm(dim=1).mean())) ** 2
    out, _ = S.langevin(score, sde, x, t, dt, r, 1, S.make_generator(5, device))
    torch.testing.assert_close(out, (1 - e / v) * x + math.sqrt(2 * e) * z, **tol)


# -----------------------------------------------------------------------------
# Loss (Eq. 7) and the network's score parameterisation

def test_loss_is_minimised_by_the_true_score():
    """For data at a single point x0 = 0, the true score of p_0t is -x/std_t^2, and Eq. 7 with lambda = std^2
    is then exactly 0 for every t; the likelihood weighting too. A score off by 10% gives a loss > 0."""
    for name in ("vp", "subvp", "ve"):
        sde = SDES[name]()
        x0 = torch.zeros(256, 2, dtype=F64)
        exact = lambda x, t: (-(x - sde.marginal_prob(torch.zeros_like(x), t)[0])
                              / S.expand(sde.marginal_prob(x, t)[1], x) ** 2)
        torch.manual_seed(0)
        assert float(S.loss(exact, sde, x0)) < 1e-20
        assert float(S.loss(exact, sde, x0, likelihood_weighting=True)) < 1e-20
        assert float(S.loss(lambda x, t: 1.1 * exact(x, t), sde, x0)) == pytest.approx(0.01, rel=0.2)


def test_score_from_network():
    """make_score_fn: VP/sub-VP give -net(x, 999 t) / std_t; VE gives net(x, c(sigma)) / sigma with
    c(sigma) = 999 log(sigma / sigma_min) / log(sigma_max / sigma_min) (= 999 t for the geometric schedule)."""
    seen = {}

    def net(x, t_in):
        seen["t"] = t_in
        return torch.ones_like(x)

    x, t = torch.zeros(3, 2), torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    for name in ("vp", "subvp", "ve"):
        sde = SDES[name]()
        s = S.make_score_fn(net, sde)(x, t)
        std = sde.marginal_prob(x, t)[1]
        sign = 1 if name == "ve" else -1
        torch.testing.assert_close(s[:, 0], (sign / std).float())
        torch.testing.assert_close(seen["t"].double(), 999 * t, rtol=1e-5, atol=1e-3)


# -----------------------------------------------------------------------------
# Issue 7 (part): likelihood through the probability-flow ODE, encode / decode

def mixture_logp(sde, t, x):
    """Closed-form log p_t(x) of the mixture, (B,)."""
    mean, cov = mixture_at(sde, t)
    d = x[:, None] - mean[None]
    return torch.logsumexp(torch.log(W) - 0.5 * torch.logdet(2 * math.pi * cov)
                           - 0.5 * torch.einsum("bki,kij,bkj->bk", d, torch.linalg.inv(cov), d), 1)


class ExactPriorVE(S.VESDE):
    """VE SDE whose prior term is the exact p_1 (the paper's N(0, sigma_max^2 I) is off by ~0.02 nats/dim
    here, the price of a finite sigma_max: the data's mean and variance are not negligible against 8^2)."""
    def prior_logp(self, z):
        return like(mixture_logp(self, 1.0, z.cpu().double()), z)


def test_likelihood_exact_trace_matches_closed_form(device, f64):
    """likelihood(dequantize=False, exact trace) with the exact mixture score equals the closed-form
    -log p_eps(x) / (d ln 2) within 0.005 nats/dim; the Rademacher and Gaussian Hutchinson estimates agree with
    it on average (mean of 64 probes per point within 4 standard errors). Caught: the sign of the divergence
    term. (A probe redrawn at every evaluation is NOT caught here: still unbiased, it only makes RK45 take ~10x
    more steps.)"""
    for sde in (S.VPSDE(), ExactPriorVE(0.01, 8.0)):
        eps = 1e-3
        x = torch.tensor([[-1.5, 0.5], [1.0, -0.3], [0.0, 0.0]], dtype=F64)
        exact_bpd = -mixture_logp(sde, eps, x) / (2 * math.log(2))
        x = x.to(f64).to(device)
        bpd, nfe = S.likelihood(mix_score(sde), sde, x, "exact", dequantize=False, eps=eps, rtol=1e-6, atol=1e-6)
        bpd = bpd.cpu().double()
        assert ((bpd - exact_bpd) * math.log(2)).abs().max() < 0.005, (sde.name, bpd, exact_bpd)
        for est in ("rademacher", "gaussian"):
            b, _ = S.likelihood(mix_score(sde), sde, x.repeat(64, 1), est, dequantize=False, eps=eps, rtol=1e-4,
                                atol=1e-4, generator=S.make_generator(5, device))
            b = b.cpu().double().reshape(64, 3)
            se = b.std(0) / 8
            assert ((b.mean(0) - exact_bpd).abs() <= 4 * se + 0.005).all(), (sde.name, est, b.mean(0), exact_bpd, se)


def test_dequantized_bits_per_dim_1d(device, f64):
    """1-D Gaussian data on K = 17 levels: the dequantised bits/dim is >= the continuous NLL of the same points
    (in bits, after the bin-width shift) and equals the direct numerical value
    -(E_u log p_eps(x + delta (u - 1/2)) + log delta) / ln 2 computed by quadrature over u."""
    K, mu, s2 = 17, 0.1, 0.3
    delta = 2 / (K - 1)
    sde = S.VPSDE()
    eps = 1e-3

    def moments(t):
        m, std = sde.marginal_prob(torch.ones(1, dtype=F64), torch.tensor([t], dtype=F64))
        return float(m) * mu, float(m) ** 2 * s2 + float(std) ** 2

    score = lambda x, t: -(x - moments(float(t[0]))[0]) / moments(float(t[0]))[1]
    x = torch.full((400, 1), 0.25, dtype=f64, device=device)           # one level (u = 10 of 0..16)
    bpd, _ = S.likelihood(score, sde, x, "exact", dequantize=True, levels=K, eps=eps, rtol=1e-6, atol=1e-6,
                          generator=S.make_generator(0, device))
    bpd = bpd.cpu().double()
    m0, v0 = moments(eps)
    logp = lambda y: -0.5 * math.log(2 * math.pi * v0) - (y - m0) ** 2 / (2 * v0)
    u = (torch.arange(2000, dtype=F64) + 0.5) / 2000
    direct = -(logp(0.25 + delta * (u - 0.5)).mean() + math.log(delta)) / math.log(2)
    se = float(bpd.std()) / 20
    assert abs(float(bpd.mean()) - float(direct)) < 4 * se + 1e-3
    continuous = -(logp(torch.tensor(0.25, dtype=F64)) + math.log(delta)) / math.log(2)
    assert float(direct) >= float(continuous)


def test_encode_decode_round_trip(device, f64):
    """decode(encode(x)) == x with the exact score (the probability-flow ODE is invertible); the code of the
    mixture's data is ~N(0, I) for VP."""
    sde = S.VPSDE()
    g = torch.Generator().manual_seed(6)
    x = sample_mixture(200, *mixture_at(sde, 1e-3), g).to(f64).to(device)
    z = S.encode(mix_score(sde), sde, x, eps=1e-3)
    assert abs(float(z.std()) - 1) < 0.1 and float(z.mean().abs()) < 0.1
    torch.testing.assert_close(S.decode(mix_score(sde), sde, z, eps=1e-3), x, rtol=0, atol=2e-3)


def test_slerp_parallel_and_orthogonal_codes():
    """slerp (App. D.5, Eq. 67) per batch element: orthogonal unit codes stay on the unit circle at the angle lam
    pi / 2; parallel codes (sin theta = 0) give the codes themselves, finite, not 0 / 0."""
    a = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=F64)
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=F64)
    out = S.slerp(a, b, 0.25)
    torch.testing.assert_close(out[0], torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)], dtype=F64))
    torch.testing.assert_close(out[1], a[1])


# -----------------------------------------------------------------------------
# 6. Controllable generation (Sec. 5, App. I)

def conditional_x1(x0):
    """Analytic p(x1 | x0) of the mixture: weights, means and variances of its components."""
    lw, ms, vs = [], [], []
    for k in range(2):
        c = C[k]
        lw.append(math.log(W[k]) - 0.5 * math.log(2 * math.pi * c[0, 0]) - 0.5 * (x0 - MU[k, 0]) ** 2 / c[0, 0])
        ms.append(float(MU[k, 1] + c[1, 0] / c[0, 0] * (x0 - MU[k, 0])))
        vs.append(float(c[1, 1] - c[1, 0] ** 2 / c[0, 0]))
    return torch.softmax(torch.tensor(lw), 0), ms, vs


@pytest.mark.parametrize("name,x0", [("vp", -1.5), ("ve", 1.0)])
def test_inpaint_matches_analytic_conditional(name, x0, device, f64):
    """App. I.2 inpainting with the exact joint score, x0 known: samples of x1 have the analytic conditional's
    weights, mean and variance (x0 at a component's mean, where that component's posterior weight is > 0.999).
    Caught (each mutation applied, test failed): known part imposed without its forward noise (mean only) and
    std of p_0t squared in the re-noising (both only by the check of what the score sees: the x1 moments at
    a component mean do not notice them); known part not re-imposed after the predictor (moments).
    Honest limit (measured, not asserted): the paper's replacement method is an approximation of conditioning,
    not exact. At x0 = -0.3, where the analytic conditional is 99.7% component 0, it returns ~50% / 50%:
    the unknown coordinate picks its component at noise levels where the known one is drowned in fresh noise."""
    sde, g = SDES[name](), S.make_generator(0, device)
    w, ms, vs = conditional_x1(x0)
    x = torch.zeros(4000, 2, dtype=f64, device=device)
    x[:, 0] = x0
    seen, exact = [], mix_score(sde)

    def spy(x, t):  # the known coordinate the score sees must be a fresh draw of p_0t(. | x0) (App. B)
        m, s = sde.marginal_prob(torch.full((1,), x0, dtype=f64, device=device), t[:1])
        seen.append((float((x[:, 0].mean() - m) / s), float(x[:, 0].std() / s)))
        return exact(x, t)

    out = S.inpaint(spy, sde, x, torch.tensor([1.0, 0.0], dtype=f64, device=device), n_steps=200, generator=g)
    out = out.cpu().double()
    assert max(abs(z) for z, _ in seen) < 0.1 and max(abs(r - 1) for _, r in seen) < 0.07, "known part's noise"
    assert float((out[:, 0] - x0).abs().max()) < 1e-3                      # the known coordinate is kept
    x1 = out[:, 1]
    mean = sum(float(w[k]) * ms[k] for k in range(2))
    var = sum(float(w[k]) * (vs[k] + ms[k] ** 2) for k in range(2)) - mean ** 2
    assert float(w.max()) > 0.999                                       # one component dominates
    assert abs(float(x1.mean()) - mean) < 0.015, (float(x1.mean()), mean)       # ~4.5 SE
    assert abs(float(x1.var()) / var - 1) < 0.1, (float(x1.var()), var)         # ~4.5 SE


def test_inpaint_mask_of_wrong_shape_is_one_error():
    sde = S.VPSDE()
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not match data of shape \(5, 2\)"):
        S.inpaint(mix_score(sde), sde, torch.zeros(5, 2, dtype=F64), torch.ones(3, dtype=F64))


def test_colorize_keeps_grey_and_transform_is_orthogonal(device, f64):
    """App. I.3: COLOR_M is orthogonal (M M^T = I to float32 rounding) with first column (1,1,1)/sqrt(3); colorize
    with the exact score of a 3-D Gaussian over (R, G, B) keeps every pixel's grey value and fills in colour
    with the Gaussian's conditional mean. Caught: grey channel taken as mask index 1; couple using M instead of M^-1."""
    M = S.COLOR_M
    assert torch.allclose(M @ M.T, torch.eye(3, dtype=F64), atol=1e-6)
    assert torch.allclose(M[:, 0], torch.full((3,), 3 ** -0.5, dtype=F64), atol=1e-6)
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    A = torch.tensor([[0.2, 0.05, 0.0], [0.0, 0.15, 0.04], [0.03, 0.0, 0.1]], dtype=F64)
    Sig = A @ A.T + 0.01 * torch.eye(3, dtype=F64)
    sde, g = S.VPSDE(), S.make_generator(1, device)

    def score(x, t):
        m, s = sde.marginal_prob(torch.ones(1, dtype=F64), t[:1].cpu().double())
        cov = m ** 2 * Sig + s ** 2 * torch.eye(3, dtype=F64)
        d = x.flatten(1) - like(m * mu, x)
        return -(d @ like(torch.linalg.inv(cov), x)).reshape(x.shape)

    grey = torch.full((2000, 3, 1, 1), 0.2, dtype=f64, device=device)
    out = S.colorize(score, sde, grey, n_steps=200, generator=g).cpu().double()
    assert float((out.mean(1) - 0.2).abs().max()) < 1e-3                 # grey value kept
    # Conditional mean of x given its channel mean = 0.2 (a linear Gaussian condition a^T x = 0.2, a = 1/3).
    a = torch.full((3,), 1 / 3, dtype=F64)
    want = mu + Sig @ a * (0.2 - a @ mu) / (a @ Sig @ a)
    assert float((out.flatten(1).mean(0) - want).abs().max()) < 0.02, (out.flatten(1).mean(0), want)


def test_colorize_refuses_grey_data():
    sde = S.VPSDE()
    with pytest.raises(ValueError, match="colorize needs RGB data"):
        S.colorize(lambda x, t: x, sde, torch.zeros(2, 1, 4, 4))


def mixture_log_posterior(sde):
    """Exact log p_t(y | x) of the labelled mixture (label = component): log_softmax_k(log w_k + log N_k(x; t))."""
    def log_prob(x, t):
        mean, cov = mixture_at(sde, float(t[0]))
        d = x[:, None, :] - like(mean, x)[None]
        Pd = torch.einsum("kij,bkj->bki", like(torch.linalg.inv(cov), x), d)
        return torch.log_softmax(like(torch.log(W) - 0.5 * torch.logdet(cov), x) - 0.5 * (d * Pd).sum(-1), 1)
    return log_prob


@pytest.mark.parametrize("name,y", [("vp", 0), ("ve", 1)])
def test_class_guidance_with_exact_posterior_samples_the_class(name, y, device, f64):
    """Sec. 5: score + grad log p_t(y | x) with the exact posterior is the exact score of component y, so every
    sample lands in it with its mean and covariance. Caught: scale 0 (weight error 0.3 / 0.7); sign of the
    classifier gradient flipped; log p_t summed over all classes instead of taking class y."""
    sde, g = SDES[name](), S.make_generator(2, device)
    labels = torch.full((3000,), y, dtype=torch.long, device=device)
    x = S.class_sample(mix_score(sde), mixture_log_posterior(sde), sde, (3000, 2), labels, scale=1.0,
                       n_steps=200, generator=g, dtype=f64, device=device).cpu().double()
    near = (x - MU[1]).norm(dim=1) < (x - MU[0]).norm(dim=1)
    frac = float((near == bool(y)).double().mean())
    assert frac > 0.99, frac
    xs = x[near == bool(y)]
    sd = C[y].diagonal().sqrt()
    assert float((xs.mean(0) - MU[y]).abs().max()) < 0.05
    assert float(((torch.cov(xs.T) - C[y]).abs() / sd.outer(sd)).max()) < 0.15


# -----------------------------------------------------------------------------
# 5 (and issue 9). CLI: smoke tests, exact resume, interruption, bad input

def run(*args, cwd=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "score_sde.py"), *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=timeout, env=env)


TOY = ["--dataset", "moons", "--batch-size", "64", "--log-every", "5", "--n-steps", "25", "--n-samples", "50"]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory, device):
    """A 10-step VE run on the moons toy (the VE path exercises Technique 1 and the sigma input), in-process, with
    its sample grid at step 10 (on --device: the grid's generator must feed that device)."""
    out = tmp_path_factory.mktemp("toy")
    S.main(["--train", "--sde", "ve", "--steps", "10", "--sample-every", "10", "--ckpt-every", "5", "--out", str(out),
            "--device", device.type, *TOY])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["sigma_max"] > 1 and ckpt["config"]["data_shape"] == [2]
    # The checkpoint keeps what defines the model and the SDE (and the training recipe), not the run's settings.
    assert not {"sampler", "n_samples", "out", "ckpt", "device", "precision", "compile"} & set(ckpt["config"])
    assert (out / "train_000010.png").exists()
    return out


@pytest.mark.parametrize("sampler", ["pc", "ode", "em", "reverse", "ancestral"])
def test_cli_sample_each_sampler(toy_ckpt, sampler, tmp_path, capsys, device):
    """`--sample --sampler X` (in-process main()) writes samples.png and samples.npz of --n-samples points."""
    S.main(["--sample", "--sampler", sampler, "--ckpt", str(toy_ckpt / "ckpt.pt"), "--out", str(tmp_path),
            "--device", device.type,
            "--n-steps", "10", "--n-samples", "20", "--rtol", "1e-3", "--atol", "1e-3"])
    assert "score evaluations" in capsys.readouterr().out
    assert (tmp_path / "samples.png").exists()
    import numpy as np
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (20, 2)


def test_cli_digits_default_paths(tmp_path, device):
    """The digits U-Net path: train 2 steps with the defaults' code path, then `--sample` with no --ckpt
    (default <out>/ckpt.pt) works; here --out points into tmp_path and --n-steps is small for speed."""
    dev = ("--device", device.type)
    r = run("--train", "--steps", "2", "--sample-every", "2", "--n-steps", "25", "--n-samples", "4", "--out", str(tmp_path),
            *dev)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "train_000002.png").exists()
    r = run("--sample", "--out", str(tmp_path), "--n-steps", "25", "--n-samples", "4", *dev)
    assert r.returncode == 0, r.stderr
    import numpy as np
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory, device):
    """A 2-step digits U-Net (VP, low-discrepancy t: the training-loop path of that option; its sample grid at
    the last step) and a 3-step time-dependent classifier next to it, both in-process on --device."""
    out = tmp_path_factory.mktemp("digits")
    S.main(["--train", "--steps", "2", "--n-steps", "25", "--n-samples", "4", "--t-sampling", "low_discrepancy",
            "--out", str(out), "--device", device.type])
    assert (out / "train_000002.png").exists()
    S.main(["--train-classifier", "--classifier-steps", "3", "--batch-size", "16", "--out", str(out),
            "--device", device.type])
    ckpt = torch.load(out / "classifier.pt", weights_only=True)
    assert ckpt["kind"] == "classifier" and ckpt["config"]["n_classes"] == 10 and ckpt["config"]["sde"] == "vp"
    return out


FAST = ["--n-eval", "4", "--n-steps", "25", "--rtol", "1e-2", "--atol", "1e-2", "--n-samples", "10"]


@pytest.mark.parametrize("mode,png,words", [
    (["--eval-nll"], "nll_sorted.png", "bits/dim (dequantised, 17 levels)"),
    (["--eval-nll", "--estimator", "gaussian"], "nll_sorted.png", "gaussian trace"),
    (["--encode"], "encode.png", "max |decode(encode(x)) - x|"),
    (["--interpolate"], "interpolate.png", "interpolations"),
    (["--inpaint"], "inpaint.png", "bottom half removed"),
    (["--sample", "--class", "3"], "class_3.png", "samples of class 3"),
    (["--sample", "--class", "all"], "class_all.png", "samples of class all"),
])
def test_cli_modes_write_pngs(digits_ckpt, mode, png, words, capsys, device):
    """Each evaluation / controllable-generation mode on the tiny digits checkpoint, on --device: runs, prints its
    summary, writes its PNG."""
    S.main([*mode, "--out", str(digits_ckpt), "--device", device.type, *FAST])
    assert words in capsys.readouterr().out
    assert (digits_ckpt / png).exists()


def test_cli_colorize_rgb_folder(tmp_path, capsys, device):
    """--colorize on RGB data (a folder of 8 random 8x8 PNGs as the dataset): train 2 steps, then colourise."""
    import numpy as np
    from PIL import Image
    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = str(tmp_path / "out")
    S.main(["--train", "--dataset", str(folder), "--image-size", "8", "--steps", "2", "--batch-size", "8",
            "--sampler", "em", "--n-steps", "25", "--n-samples", "4", "--out", out, "--device", device.type])
    S.main(["--colorize", "--corrector", "none", "--out", out, "--device", device.type, *FAST])
    assert "colourised" in capsys.readouterr().out and (tmp_path / "out" / "colorize.png").exists()


def test_cli_bf16_smoke(tmp_path, capsys, device):
    """--precision bf16 (autocast for the network; on the CPU, CPU autocast): train 2 steps with a sample grid,
    then --sample; samples finite, the checkpoint's weights float32. A checkpoint written with bf16 samples with
    --precision fp32 too (precision is a runtime setting)."""
    out = str(tmp_path)
    S.main(["--train", "--steps", "2", "--sample-every", "2", "--sampler", "em", "--n-steps", "25", "--n-samples", "4",
            "--out", out, "--precision", "bf16", "--device", device.type])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    for precision in ("bf16", "fp32"):
        S.main(["--sample", "--sampler", "em", "--out", out, "--n-steps", "25", "--n-samples", "4",
                "--precision", precision, "--device", device.type])
        assert "score evaluations" in capsys.readouterr().out
    import numpy as np
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)


@pytest.mark.parametrize("args,words", [
    (["--colorize"], "--colorize needs RGB data; digits has 1 channel(s)"),
    (["--sample", "--class", "10"], "--class 10 is out of range: the classifier knows classes 0..9"),
    (["--sample", "--class", "seven"], "--class must be an integer"),
    (["--sample", "--class", "1", "--classifier-ckpt", "{ckpt}"], "not a classifier checkpoint"),
])
def test_cli_mode_errors_are_one_line(digits_ckpt, args, words, capsys):
    """Colourising grey digits, a class out of range, a score checkpoint given as classifier -> one line, exit 2."""
    args = [a.replace("{ckpt}", str(digits_ckpt / "ckpt.pt")) for a in args]
    with pytest.raises(SystemExit) as e:
        S.main([*args, "--out", str(digits_ckpt), *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err, err


def test_low_discrepancy_t_one_per_stratum():
    """Issue 8's low-discrepancy times: t_i = eps + (1 - eps) mod(u_0 + i/B, 1) put exactly one t in each of the
    B strata [eps + (1-eps) j/B, eps + (1-eps)(j+1)/B), and consecutive t differ by (1 - eps)/B modulo the wrap;
    iid times (the default) do not. Caught: mod dropped (t > 1); u_0 drawn per sample (strata with two t)."""
    torch.manual_seed(0)
    eps, B = 1e-5, 64
    for _ in range(20):
        t = S.sample_t(B, eps, "low_discrepancy")
        assert float(t.min()) >= eps and float(t.max()) <= 1
        strata = ((t - eps) / (1 - eps) * B).floor().long()
        assert sorted(strata.tolist()) == list(range(B))
    t = S.sample_t(B, eps, "iid")
    assert len(set(((t - eps) / (1 - eps) * B).floor().long().tolist())) < B   # iid collides (p(no collision) ~ 1e-27)


def test_resume_is_exact(tmp_path, capsys, device):
    """2N steps straight == N steps, stop, --resume to 2N: bitwise identical model, EMA and optimizer (on CUDA with
    --deterministic). Caught: not restoring the RNG state (different minibatches after the resume)."""
    base = ["--train", "--dataset", "moons", "--batch-size", "32", "--sample-every", "1000", "--log-every", "1000",
            "--sde", "subvp", "--n-steps", "25", "--device", device.type]
    base += ["--deterministic"] if device.type == "cuda" else []
    if device.type == "mps":
        pytest.skip("MPS has no deterministic mode: bitwise resume is checked on the CPU and on CUDA")
    S.main(base + ["--steps", "8", "--out", str(tmp_path / "a")])
    S.main(base + ["--steps", "4", "--out", str(tmp_path / "b")])
    S.main(base + ["--steps", "8", "--out", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])  # the data generator
    ra, rb = a["rng"]["ranks"][0], b["rng"]["ranks"][0]      # the one rank's global streams
    assert torch.equal(ra["torch"], rb["torch"])
    for i, state in enumerate(ra.get("cuda", [])):
        assert torch.equal(state, rb["cuda"][i])


def test_sigkill_then_resume(tmp_path, device):
    """SIGKILL mid-run leaves the last atomic checkpoint readable; --resume finishes the run from it."""
    args = ["--train", "--dataset", "moons", "--batch-size", "32", "--steps", "100000", "--ckpt-every", "20",
            "--sample-every", "100000", "--log-every", "100000", "--n-steps", "25", "--device", device.type,
            "--out", str(tmp_path)]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "score_sde.py"), *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt, deadline = tmp_path / "ckpt.pt", time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 40):
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step >= 40 and step % 20 == 0
    r = run(*args[:-1], str(tmp_path), "--resume", "--steps", str(step + 10))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpt} at step {step}" in r.stdout
    assert torch.load(ckpt, weights_only=True)["step"] == step + 10


def test_sigterm_saves_and_exits(tmp_path, device):
    """SIGTERM (like Ctrl-C) stops between steps, writes the checkpoint, exits 130 with a resume hint."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "score_sde.py"), "--train", "--dataset", "moons",
                          "--device", device.type,
                          "--steps", "100000", "--log-every", "1", "--sample-every", "100000", "--ckpt-every", "100000",
                          "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdout.readline()  # the first progress line: training is under way
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "continue with --resume" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 1


def test_nonfinite_loss_is_one_line(tmp_path, monkeypatch, capsys, device):
    """A NaN in the data gives a non-finite loss: one line naming the window of steps since the last check (the
    loss is read only at log / checkpoint / sample steps, here the last step 3), exit 2, nothing saved.
    A NaN that only reaches the weights is caught there too (the weights are checked before every checkpoint)."""
    real = S.load_data

    def poisoned(*a, **k):
        d = real(*a, **k)
        d.x[:] = float("nan")
        return d

    monkeypatch.setattr(S, "load_data", poisoned)
    with pytest.raises(SystemExit) as e:
        S.main(["--train", "--dataset", "moons", "--steps", "3", "--out", str(tmp_path), "--device", device.type])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "non-finite loss in steps 1-3" in err, err
    assert not (tmp_path / "ckpt.pt").exists()


def test_nonfinite_weights_never_reach_a_checkpoint(tmp_path, monkeypatch, capsys, device):
    """Weights turned NaN after a good step (an optimizer step gone wrong) are caught before the checkpoint of
    that step: one line naming the step, exit 2, the checkpoint of the last good step kept."""
    real = S.ema_update
    calls = []

    def poison(ema, model, decay):
        real(ema, model, decay)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(S, "ema_update", poison)
    with pytest.raises(SystemExit) as e:
        S.main(["--train", "--dataset", "moons", "--steps", "4", "--ckpt-every", "2", "--log-every", "100",
                "--out", str(tmp_path), "--device", device.type])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "non-finite weights in steps 3-4" in err, err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


BAD = [  # (arguments, words the one-line message must contain)
    (["--train", "--sde", "ou"], "invalid choice"),
    (["--sample", "--predictor", "heun"], "invalid choice"),
    (["--sample", "--corrector", "mala"], "invalid choice"),
    (["--sample", "--sampler", "dpm"], "invalid choice"),
    (["--sample", "--snr", "0"], "--snr must be positive"),
    (["--sample", "--snr", "-0.1"], "--snr must be positive"),
    (["--sample", "--sample-eps", "1.5"], "--sample-eps"),
    (["--sample", "--sample-eps=-1e-3"], "--sample-eps"),
    (["--train", "--train-eps", "0"], "--train-eps"),
    (["--train", "--steps", "0"], "--steps must be positive"),
    (["--train", "--steps", "-5"], "--steps must be positive"),
    (["--train", "--batch-size", "0"], "--batch-size must be positive"),
    (["--train", "--lr=-1e-3"], "--lr must be positive"),
    (["--sample", "--n-steps", "0"], "--n-steps must be positive"),
    (["--train", "--n-steps", "5"], "beta(t) dt < 1"),
    (["--sample", "--n-samples", "0"], "--n-samples must be positive"),
    (["--sample", "--rtol", "0"], "--rtol must be positive"),
    (["--train", "--beta-max", "0.05"], "--beta-max"),
    (["--train", "--sde", "ve", "--sigma-max", "0.001"], "--sigma-max"),
    (["--train", "--ema-decay", "1"], "--ema-decay"),
    (["--train", "--steps", "abc"], "invalid int"),
    (["--train", "--dataset", "nope"], "unknown dataset"),
    (["--sample", "--predictor", "none", "--corrector", "none"], "prior noise"),
    ([], "exactly one of --train, --sample"),
    (["--train", "--sample"], "exactly one of --train, --sample"),
    (["--sample", "--ckpt", "{tmp}/missing.pt"], "no such checkpoint"),
    (["--sample", "--ckpt", "{tmp}/corrupt.pt"], "not a readable checkpoint"),
    (["--sample", "--ckpt", "{tmp}/ddpm.pt"], "a ddpm checkpoint"),
    (["--sample", "--ckpt", "{tmp}/foreign.pt"], "not a checkpoint of this project"),
    (["--train", "--out", "{tmp}/a_file/sub"], "not writable"),
    (["--train", "--class", "3"], "--class goes with --sample"),
    (["--eval-nll", "--estimator", "bogus"], "invalid choice"),
    (["--train", "--t-sampling", "sobol"], "invalid choice"),
    (["--eval-nll", "--n-eval", "0"], "--n-eval must be positive"),
    (["--train-classifier", "--classifier-steps", "0"], "--classifier-steps must be positive"),
    (["--encode", "--inpaint"], "exactly one of --train, --sample"),
]


def bad_files(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    torch.save({"script": "ddpm", "config": {}}, tmp_path / "ddpm.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "a_file").write_text("x")


def with_out(args, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    return args if "--out" in args else args + ["--out", str(tmp_path / "out")]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) or "no-mode" for a, _ in BAD])
def test_bad_input_table(args, words, tmp_path, capsys):
    """Each bad flag / file through main(): exit code 2 and exactly one line `score_sde.py: error: ...`."""
    bad_files(tmp_path)
    with pytest.raises(SystemExit) as e:
        S.main(with_out(args, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("score_sde.py: error: ") and words in err, err


def test_bad_input_subprocess(tmp_path):
    """A representative subset as real processes (parallel): exit code 2, one stderr line, no traceback. One row
    per path to the error: argparse, validation, checkpoint loading, the output folder (the whole table runs
    in-process in test_bad_input_table)."""
    bad_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = [BAD[i] for i in (0, 4, 26, 29)]
    procs = [(args, words, subprocess.Popen([sys.executable, os.path.join(ROOT, "score_sde.py"), *with_out(args, tmp_path)],
                                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
             for args, words in rows]
    for args, words, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("score_sde.py: error: ") and words in err, (args, err)


# -----------------------------------------------------------------------------
# Several processes: torchrun with gloo on the CPU

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd, nproc=2, timeout=300, popen=False, real=False):
    """python -m torch.distributed.run --nproc_per_node=nproc score_sde.py args (one thread per process); a finished
    2-process run starts its two ranks directly (conftest.two_ranks) unless real (torchrun's own summary)."""
    if not (popen or real) and nproc == 2:
        return two_ranks(os.path.join(ROOT, "score_sde.py"), args, cwd, timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(free_port()), os.path.join(ROOT, "score_sde.py"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def state(path):
    return torch.load(path, weights_only=True)


def assert_close_weights(a, b, rel):
    """Model and EMA of two checkpoints equal up to rel times each tensor's largest entry (float reduction order)."""
    for key in ("model", "ema"):
        for k in a[key]:
            u, v = a[key][k].double(), b[key][k].double()
            assert (u - v).abs().max() <= rel * u.abs().max() + 1e-7, (key, k, float((u - v).abs().max()))


def same(a, b):
    """Bitwise equality of nested dicts / lists of tensors and numbers (a state dict, an optimizer's state)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def progress_losses(stdout):
    return [float(m) for m in re.findall(r"^step \d+/\d+  loss (\S+)", stdout, re.M)]


DDP_TOY = ["--dataset", "moons", "--batch-size", "16", "--steps", "10", "--log-every", "5", "--ckpt-every", "5",
           "--sample-every", "1000", "--n-steps", "25", "--device", "cpu"]


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
@pytest.mark.parametrize("extra", [[], ["--sde", "ve", "--t-sampling", "low_discrepancy", "--likelihood-weighting"]],
                         ids=["vp", "ve-lowdisc"])
def test_ddp_train_equals_one_process(extra, tmp_path, one_process):
    """2 processes, global batch 16 (8 per rank), 10 steps on the moons toy (the MLP has no dropout) = 1 process with
    batch 16: model and EMA equal to 1e-4 of each tensor's largest entry (the ranks' gradients are averaged in
    another order), same step and data generator state; rank 0 alone prints, and its progress lines show the
    global batch's loss. ve-lowdisc: the low-discrepancy t's strata span the global batch, sliced.
    Catches: no gradient averaging, the data generator or the initial weights seeded by rank, every rank on the same
    slice, t or the noise not sliced, the printed loss of rank 0's slice, every rank printing."""
    one = one_process(S.main, "--train", *DDP_TOY, *extra, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(["--train", *DDP_TOY, *extra, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = state(tmp_path / "one" / "ckpt.pt"), state(tmp_path / "two" / "ckpt.pt")
    assert a["step"] == b["step"] == 10 and torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert_close_weights(a, b, 1e-4)
    ranks = b["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # dropout streams per rank
    assert two.stdout.count("step 10/10") == 1 and two.stdout.count("done: 10 steps") == 1
    la, lb = progress_losses(one.stdout), progress_losses(two.stdout)
    assert len(la) == len(lb) == 2 and all(abs(p - q) <= 2e-4 for p, q in zip(la, lb)), (la, lb)


@pytest.fixture(scope="module")
def ddp_digits(tmp_path_factory):
    """One uninterrupted 2-process run of 12 steps on the digits (tiny U-Net, dropout 0.1: per-rank streams; warm-up
    1 so that the network is no longer ~0 and the likelihood depends on its probes), then a 2-process classifier."""
    d = tmp_path_factory.mktemp("ddp_digits")
    r = torchrun(["--train", *DDP_DIGITS, "--out", str(d / "run")], d)
    assert r.returncode == 0, r.stderr
    return d / "run"


DDP_DIGITS = ["--steps", "12", "--warmup", "1", "--lr", "1e-3", "--batch-size", "16", "--ckpt-every", "2",
              "--sample-every", "1000", "--n-steps", "25", "--device", "cpu"]


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_sigterm_then_resume_equals_straight_run(ddp_digits, tmp_path):
    """SIGTERM to torchrun mid-run (it forwards the signal to both ranks): every rank stops at the same step, rank
    0 saves one checkpoint and says so once, no rank hangs; --resume with 2 processes to 12 steps is bitwise the
    straight 2-process run (model, EMA, the data generator and both ranks' dropout streams).
    Catches: the data generator not restored on resume."""
    out = tmp_path / "run"
    args = ["--train", *DDP_DIGITS, "--out", str(out)]
    p = torchrun(args + ["--log-every", "1"], tmp_path, popen=True)
    for line in p.stdout:  # wait until a checkpoint exists and training is under way
        if line.startswith("step 3/"):
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("continue with --resume") == 1, err
    stopped = state(out / "ckpt.pt")["step"]
    assert 3 <= stopped < 12 and f"stopped at step {stopped};" in err and not (out / "ckpt.pt.tmp").exists()
    r = torchrun(args + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"resumed from {out}/ckpt.pt at step {stopped}") == 1
    a, b = state(ddp_digits / "ckpt.pt"), state(out / "ckpt.pt")
    assert a["step"] == b["step"] == 12 and torch.equal(a["rng"]["data"], b["rng"]["data"])
    for key in ("model", "ema", "optimizer"):
        assert same(a[key], b[key]), key
    for ra, rb in zip(a["rng"]["ranks"], b["rng"]["ranks"]):
        assert torch.equal(ra["torch"], rb["torch"])


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_classifier_equals_one_process(ddp_digits, tmp_path, one_process):
    """--train-classifier, global batch 16 over 2 processes = 1 process (5 steps): weights equal to 2e-3 of each
    tensor's largest entry (Adam magnifies the reduction-order noise of the biases before GroupNorm, whose gradient
    nearly cancels); rank 0 alone prints and writes. Catches: no gradient averaging, t not sliced."""
    common = ["--train-classifier", "--classifier-steps", "5", "--batch-size", "16", "--device", "cpu",
              "--ckpt", str(ddp_digits / "ckpt.pt"), "--log-every", "5"]
    one = one_process(S.main, *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun([*common, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("classifier step 5/5") == 1 and two.stdout.count("classifier ->") == 1
    assert_close_weights(state(tmp_path / "one" / "classifier.pt"), state(tmp_path / "two" / "classifier.pt"), 2e-3)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_sample_and_class_equal_one_process(ddp_digits, tmp_path, one_process):
    """--sample --n-samples 7 --batch-size 2 under 2 processes (chunks 0, 4 on rank 0; 2, 6 on rank 1) writes exactly
    7 samples, equal to the 1-process samples, and the chunks differ; --sample --class all (a 1-step classifier),
    split the same way, writes the same class_all.png as 1 process.
    Catches: a chunk generator that depends on the rank, or one that ignores the chunk's start."""
    import numpy as np
    r = one_process(S.main, "--train-classifier", "--classifier-steps", "1", "--batch-size", "16", "--out",
                   str(tmp_path), "--ckpt", str(ddp_digits / "ckpt.pt"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    common = ["--ckpt", str(ddp_digits / "ckpt.pt"), "--classifier-ckpt", str(tmp_path / "classifier.pt"),
              "--batch-size", "2", "--n-steps", "25", "--device", "cpu"]
    for mode in (["--sample", "--n-samples", "7"], ["--sample", "--class", "all", "--n-samples", "10"]):
        one = one_process(S.main, *mode, *common, "--out", str(tmp_path / "one"))
        assert one.returncode == 0, one.stderr
        two = torchrun([*mode, *common, "--out", str(tmp_path / "two")], tmp_path)
        assert two.returncode == 0, two.stderr
        assert two.stdout.count(" -> ") == 1, two.stdout
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("one", "two"))
    assert a.shape == b.shape == (7, 8, 8, 1) and (a == b).all()
    assert not (a[0:2] == a[2:4]).all() and not (a[2:4] == a[4:6]).all()
    assert (tmp_path / "one" / "class_all.png").read_bytes() == (tmp_path / "two" / "class_all.png").read_bytes()


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_eval_nll_equals_one_process(ddp_digits, tmp_path, one_process):
    """--eval-nll of 5 held-out digits in chunks of 2 (chunks 0, 4 on rank 0, 2 on rank 1): 2 processes print the
    same bits/dim (mean and standard error over all 5, and NFE) as 1 process, once; another --seed prints another
    number (the dequantisation noise and the probes come from the chunk generators).
    Catches: a chunk generator that depends on the rank."""
    common = ["--eval-nll", "--ckpt", str(ddp_digits / "ckpt.pt"), "--n-eval", "5", "--batch-size", "2",
              "--rtol", "1e-2", "--atol", "1e-2", "--device", "cpu"]
    head = lambda out: re.findall(r"^(.* bits/dim .*NFE \d+)", out, re.M)  # noqa: E731  (no timing)
    one = one_process(S.main, *common, "--out", str(tmp_path / "one"))
    two = torchrun([*common, "--out", str(tmp_path / "two")], tmp_path)
    other = one_process(S.main, *common, "--seed", "1", "--out", str(tmp_path / "other"))
    assert one.returncode == two.returncode == other.returncode == 0, (one.stderr, two.stderr, other.stderr)
    assert len(head(one.stdout)) == len(head(two.stdout)) == 1 and head(one.stdout) == head(two.stdout), two.stdout
    assert "on 5 held-out points" in two.stdout and head(other.stdout) != head(one.stdout)


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_rank0_modes_equal_one_process(ddp_digits, tmp_path, one_process):
    """--inpaint and --interpolate under 2 processes: rank 0 alone works and writes, once, the same PNG as 1 process."""
    common = ["--ckpt", str(ddp_digits / "ckpt.pt"), "--n-steps", "25", "--rtol", "1e-2", "--atol", "1e-2",
              "--device", "cpu"]
    for mode, png in (("--inpaint", "inpaint.png"), ("--interpolate", "interpolate.png")):
        one = one_process(S.main, mode, *common, "--out", str(tmp_path / "one"))
        two = torchrun([mode, *common, "--out", str(tmp_path / "two")], tmp_path)
        assert one.returncode == two.returncode == 0, (one.stderr, two.stderr)
        assert two.stdout.count(" -> ") == 1, two.stdout
        assert (tmp_path / "one" / png).read_bytes() == (tmp_path / "two" / png).read_bytes(), mode


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
@pytest.mark.parametrize("mode", ["--train", "--train-classifier"])
def test_ddp_batch_not_divisible_is_one_line(mode, tmp_path):
    """--batch-size 9 with 2 processes: each rank exits 2 with the one line naming both numbers, and no traceback
    of score_sde.py (what torchrun itself prints about a failed child is torchrun's)."""
    r = torchrun([mode, "--dataset", "moons" if mode == "--train" else "digits", "--batch-size", "9", "--device", "cpu",
                  "--out", str(tmp_path / "run")], tmp_path, real=True)
    ours = {line for line in (r.stdout + r.stderr).splitlines() if line.startswith("score_sde.py")}
    assert r.returncode != 0 and ours == {
        "score_sde.py: error: --batch-size 9 must be a multiple of the number of processes (2)"}, r.stderr
    assert "exitcode  : 2" in r.stderr and 'score_sde.py", line' not in r.stdout + r.stderr


def test_old_checkpoint_is_refused_for_resume_but_samples(tmp_path, capsys, device):
    """A checkpoint from before the data generator (rng = {"torch": ...}), its config with keys this script no longer
    writes, cannot resume (one line, exit 2), but --sample still reads it."""
    S.main(["--train", "--dataset", "moons", "--steps", "2", "--batch-size", "8", "--sample-every", "1000",
            "--n-steps", "25", "--device", device.type, "--out", str(tmp_path)])
    ckpt = state(tmp_path / "ckpt.pt")
    ckpt["rng"] = {"torch": torch.get_rng_state()}
    ckpt["config"].update(sampler="pc", out="runs/old", unknown_old_key=1)  # older checkpoints kept more keys
    torch.save(ckpt, tmp_path / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        S.main(["--train", "--resume", "--dataset", "moons", "--steps", "4", "--batch-size", "8", "--n-steps", "25",
                "--device", device.type, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot resume" in err, err
    S.main(["--sample", "--n-samples", "3", "--n-steps", "25", "--device", device.type, "--out", str(tmp_path)])
    assert "3 samples" in capsys.readouterr().out


@pytest.mark.cpu_only("torchrun with gloo on the CPU")
def test_ddp_classifier_sigterm_then_resume_equals_straight_run(ddp_digits, tmp_path):
    """--train-classifier under 2 processes, stopped by SIGTERM to torchrun: every rank stops at the same step, rank 0
    saves classifier.pt once and says so once; --resume with 2 processes to 30 steps is bitwise the straight
    2-process run (weights, EMA, optimizer, data generator). Catches: the classifier's data generator not restored."""
    common = ["--train-classifier", "--classifier-steps", "30", "--batch-size", "16", "--device", "cpu",
              "--ckpt", str(ddp_digits / "ckpt.pt"), "--ckpt-every", "1000"]
    straight = torchrun([*common, "--out", str(tmp_path / "straight")], tmp_path)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "run"
    p = torchrun([*common, "--out", str(out), "--log-every", "1"], tmp_path, popen=True)
    for line in p.stdout:  # wait until training is under way
        if line.startswith("classifier step 3/"):
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("continue with --resume") == 1, err
    stopped = state(out / "classifier.pt")["step"]
    assert 3 <= stopped < 30 and f"stopped at step {stopped};" in err
    r = torchrun([*common, "--out", str(out), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"resumed from {out}/classifier.pt at step {stopped}") == 1
    a, b = state(tmp_path / "straight" / "classifier.pt"), state(out / "classifier.pt")
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema", "optimizer", "rng"):
        assert same(a[key], b[key]), key
