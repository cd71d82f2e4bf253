"""log_likelihood(solver="multistep"): the exponential multistep solver of sdegen.likelihood_multistep against closed
forms (its step weights, a single Gaussian's flow and density), the Gaussian-mixture oracle's exact log p_{t_min}
across SDEs, its convergence order on a fixed grid, per-example error control and its failures."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.errors import SolverError
from sdegen.likelihood import log_likelihood
from sdegen.likelihood_multistep import MultistepLikelihood, exp_moments, step_weights
from sdegen.models import as_model

SDES = {"vp": sdegen.VPSDE, "subvp": sdegen.SubVPSDE, "ve": sdegen.VESDE, "cosine": sdegen.CosineVPSDE,
        "edm": sdegen.EDMSDE, "flow": sdegen.FlowSDE}


def _gaussian(d=3, c=0.2):
    return GaussianMixture([1.0], [[0.3, -0.5, 0.8, 0.1][:d]], [c**2])


def test_exp_moments_match_their_integral():
    # M_k = int_0^1 e^{h (1 - rho)} rho^k drho: closed forms for k = 0, 1, and the trapezoid rule on a fine grid
    for h in (1e-6, 0.03, 0.7, 4.0, 15.0):
        m = exp_moments(h, 4)
        assert m[0] == pytest.approx(math.expm1(h) / h, rel=1e-13)
        assert m[1] == pytest.approx((math.expm1(h) - h) / h**2, rel=1e-9 if h > 1e-3 else 1e-6)
        rho = torch.linspace(0, 1, 200001, dtype=torch.float64)
        for k in range(4):
            quad = torch.trapezoid(torch.exp(h * (1 - rho)) * rho**k, rho)
            assert m[k] == pytest.approx(float(quad), rel=1e-8)


def test_step_weights_integrate_polynomials_exactly():
    # weights at nodes (in units of h) integrate every polynomial of degree < number of nodes exactly, against
    # e^{h - r} and plainly; closed forms int_0^h e^{h - r} dr = e^h - 1, int_0^h e^{h - r} r dr = e^h - 1 - h
    h, nodes = 0.4, [1.0, 0.0, -0.7, -1.9]
    w_exp, w_quad = step_weights(nodes, h)
    r = [h * rho for rho in nodes]
    assert sum(w_exp) == pytest.approx(math.expm1(h), rel=1e-12)
    assert sum(w * v for w, v in zip(w_exp, r)) == pytest.approx(math.expm1(h) - h, rel=1e-10)
    for k in range(4):
        assert sum(w * v**k for w, v in zip(w_quad, r)) == pytest.approx(h ** (k + 1) / (k + 1), rel=1e-10)
    # a cubic against e^{h - r} by a fine trapezoid rule
    cubic = lambda v: 1.0 - 2.0 * v + 0.5 * v**3  # noqa: E731
    grid = torch.linspace(0, h, 200001, dtype=torch.float64)
    truth = float(torch.trapezoid(torch.exp(h - grid) * cubic(grid), grid))
    assert sum(w * cubic(v) for w, v in zip(w_exp, r)) == pytest.approx(truth, rel=1e-8)


@pytest.mark.parametrize("sde_name", ["vp", "ve", "edm"])
def test_single_gaussian_flow_and_density_in_closed_form(sde_name):
    # data N(mu, c^2 I): p_t = N(m mu, v_t I) with v_t = m^2 c^2 + s^2, the flow map x_T = m_T mu +
    # sqrt(v_T / v_0) (x - m_0 mu) and log p_{t_min}(x) = log N(x; m_0 mu, v_0 I)
    sde, c, d = SDES[sde_name](), 0.2, 3
    gm = _gaussian(d, c)
    x = gm.sample(5, seed=1, dtype=torch.float64)
    t_lo, t_hi = sdegen.likelihood.default_t_min(sde), float(sde.T)
    m0, s0 = float(sde.mean_coeff(torch.tensor(t_lo))), float(sde.std(torch.tensor(t_lo)))
    m1, s1 = float(sde.mean_coeff(torch.tensor(t_hi))), float(sde.std(torch.tensor(t_hi)))
    v0, v1 = m0**2 * c**2 + s0**2, m1**2 * c**2 + s1**2
    mu = gm.means[0]
    latent = m1 * mu + math.sqrt(v1 / v0) * (x - m0 * mu)
    log_p = -0.5 * (x - m0 * mu).pow(2).sum(1) / v0 - 0.5 * d * math.log(2 * math.pi * v0)
    prior = lambda z: -0.5 * (z - m1 * mu).pow(2).sum(1) / v1 - 0.5 * d * math.log(2 * math.pi * v1)  # noqa: E731
    tol = 1e-7
    r = log_likelihood(sde, gm, x, divergence="exact", solver="multistep", rtol=tol, atol=tol, prior=prior)
    assert r.t_min == t_lo
    torch.testing.assert_close(r.latent, latent, rtol=0, atol=50 * tol * (1 + float(latent.abs().max())))
    torch.testing.assert_close(r.delta_log_prob, torch.full((5,), 0.5 * d * math.log(v1 / v0), dtype=torch.float64),
                               rtol=0, atol=50 * tol * d)
    torch.testing.assert_close(r.log_prob, log_p, rtol=0, atol=50 * tol * d)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_matches_the_mixture_oracle_and_tightens_with_the_tolerance(sde_name):
    # against the oracle's exact log p_{t_min}: the worst example's error per dimension within 20 tol at 1e-6, and
    # 100x tighter tolerances cut it at least 10x
    sde, gm = SDES[sde_name](), GaussianMixture.random(dim=4, n_components=3, seed=11, cov_scale=0.3)
    x = gm.sample(6, seed=2, dtype=torch.float64)
    prior = gm.marginal(sde, sde.T).log_prob
    worst = {}
    for tol in (1e-4, 1e-6):
        r = log_likelihood(sde, gm, x, divergence="exact", solver="multistep", rtol=tol, atol=tol, prior=prior)
        exact = gm.marginal(sde, r.t_min).log_prob(x)
        worst[tol] = float((r.log_prob - exact).abs().max()) / gm.dim
    assert worst[1e-6] <= 20 * 1e-6, worst
    assert worst[1e-6] <= worst[1e-4] / 10, worst


@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order_on_a_fixed_grid(order):
    # tolerances no step can fail and max_factor=1 hold the step at h_init: a fixed grid in log sigma. The
    # predictor of order k and the corrector of order k + 1 (evaluated at the predicted point) give a global error
    # of order k + 1 in the step; the fitted slope of log error against log steps must be -(k + 1) within 0.3.
    # (Order 4's starting steps, of orders 1-3, cap its fixed-grid order at 3; the adaptive controller sizes them.)
    sde, gm = sdegen.VPSDE(), _gaussian()
    x = gm.sample(4, seed=0, dtype=torch.float64)
    t_lo, t_hi = 1e-3, 1.0
    exact, prior = gm.marginal(sde, t_lo).log_prob(x), gm.marginal(sde, t_hi).log_prob
    sigma = sde.sigma(torch.tensor([t_lo, t_hi], dtype=torch.float64))
    span = float(torch.log(sigma[1] / sigma[0]))
    ns, errs = (20, 40, 80, 160), []
    for n in ns:  # (the last step is cut to end at T)
        solver = MultistepLikelihood(1e10, 1e10, order=order, h_init=span / n * (1 + 1e-9), max_factor=1.0)
        x_T, delta = solver.solve(sde, as_model(gm, sde), x, t_lo, t_hi)
        assert solver.stats["accepted"] == n and solver.stats["nfe"] == n + 1
        errs.append(float((prior(x_T) + delta - exact).abs().max()))
    logs = torch.tensor([[math.log(n), 1.0] for n in ns], dtype=torch.float64)
    slope = float(torch.linalg.lstsq(logs, torch.tensor(errs, dtype=torch.float64).log()[:, None]).solution[0])
    assert abs(slope + (order + 1)) <= 0.3, (slope, errs)


def test_step_count_follows_the_error_model():
    # the corrector's local error is of order k + 2 = 6 (order 4): steps ~ tol^(-1/6), so 10^4 tighter tolerances
    # take about 10^(4/6) = 4.6x the steps; the fitted exponent of steps against tol must lie in [1/8, 1/4]
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=3, seed=11, cov_scale=0.3)
    x = gm.sample(4, seed=2, dtype=torch.float64)
    tols = (1e-5, 1e-7, 1e-9)
    steps = [log_likelihood(sde, gm, x, divergence="exact", solver="multistep", rtol=t, atol=t).steps for t in tols]
    a = torch.tensor([[math.log(t), 1.0] for t in tols], dtype=torch.float64)
    slope = float(torch.linalg.lstsq(a, torch.tensor(steps, dtype=torch.float64).log()[:, None]).solution[0])
    assert 1 / 8 <= -slope <= 1 / 4, (slope, steps)


class _ZeroNoise(torch.nn.Module):
    """A noise-prediction network that predicts zero (an output layer initialised at zero): D(x, t) = x / m. Like
    such a layer its output stays in x's autograd graph (torch.zeros_like would not: a network run without autograd
    is refused, since its divergence cannot be taken)."""

    def forward(self, x, t):
        return 0.0 * x


@pytest.mark.parametrize("sde_name", ["vp", "edm"])
def test_a_vanishing_field_costs_a_few_steps_and_is_exact(sde_name):
    # with D = x/m the flow keeps y = x/m fixed: x_T = x m_T / m_0 and log p_0(x) = log p_T(x_T) + d log(m_T / m_0)
    # (for EDM, m = 1: the identity). Every step is exact, so the step grows from a tenth of the span at once.
    sde = SDES[sde_name]()
    model = sdegen.ScoreModel(_ZeroNoise(), sde, prediction="eps")
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r = log_likelihood(sde, model, x, divergence="exact", solver="multistep", rtol=1e-6, atol=1e-6)
    t0, t1 = torch.tensor(r.t_min, dtype=torch.float64), torch.tensor(sde.T, dtype=torch.float64)
    ratio = sde.mean_coeff(t1) / sde.mean_coeff(t0)
    expected = sde.prior_log_prob(x * ratio) + 6 * torch.log(ratio)
    torch.testing.assert_close(r.log_prob, expected, rtol=0, atol=1e-9)
    assert r.nfe <= 8, r.nfe  # 1 + the steps 0.1, 0.2, 0.4, rest of the span in tau (Hairer's 1e-6 start: 27)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_integrates_the_same_estimator_as_dopri5(probe):
    # the estimate v^T (d f~/dx) v dt of the x-space flow and |v|^2 log(s_T/s_0) - v^T (dD/dy) v dtau of the y-space
    # one are the same integral: both solvers converge to one number for every probe. (With Gaussian probes the
    # y-space solve took the identity's share as exactly D: an estimate of the same mean with 10x the variance.)
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=3, seed=11, cov_scale=0.3)
    x = gm.sample(5, seed=2, dtype=torch.float64)
    ms = log_likelihood(sde, gm, x, solver="multistep", rtol=1e-8, atol=1e-8, seed=3, probe=probe)
    rk = log_likelihood(sde, gm, x, solver="dopri5", rtol=1e-8, atol=1e-8, seed=3, probe=probe)
    torch.testing.assert_close(ms.log_prob, rk.log_prob, rtol=0, atol=1e-5)


def test_steps_are_set_by_each_example_not_the_batch_average():
    # per-example norm: 15 copies of an easy example leave the steps and the hard example's result unchanged
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(5, seed=3, dtype=torch.float64)
    run = lambda z: log_likelihood(sde, gm, z, divergence="exact", solver="multistep", rtol=1e-4, atol=1e-4)  # noqa
    alone = [run(x[i:i + 1]).nfe for i in range(5)]
    hard, easy = max(range(5), key=alone.__getitem__), min(range(5), key=alone.__getitem__)
    assert alone[hard] > alone[easy]
    pair, padded = run(x[[hard, easy]]), run(x[[hard] + [easy] * 15])
    assert padded.nfe == pair.nfe and padded.steps == pair.steps
    torch.testing.assert_close(padded.log_prob[:2], pair.log_prob, rtol=0, atol=1e-10)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_nfe_counts_every_evaluation(divergence):
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=3, seed=11, cov_scale=0.3)
    exact_score, calls = gm.score_fn(sde), [0]

    def score(x, t):
        calls[0] += 1
        return exact_score(x, t)

    r = log_likelihood(sde, score, gm.sample(5, seed=1), divergence=divergence, solver="multistep", rtol=1e-4,
                       atol=1e-4, seed=0)
    assert r.nfe == calls[0] and r.nfe > r.steps > 0


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_any_rank_dtype_and_callers_tensor_untouched(divergence, dtype, device):
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=2, seed=3)
    flat = gm.sample(3, seed=1, dtype=dtype, device=device)
    x = flat.reshape(3, 1, 2, 2).clone()
    before = x.clone()
    r = log_likelihood(sde, gm, x, divergence=divergence, solver="multistep", seed=0, t_min=1e-4)
    r_flat = log_likelihood(sde, gm, flat, divergence=divergence, solver="multistep", seed=0, t_min=1e-4)
    assert r.log_prob.dtype == dtype and r.log_prob.device == x.device and r.latent.shape == x.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(r.log_prob, r_flat.log_prob, atol=tol, rtol=tol)
    assert torch.equal(x, before) and not r.log_prob.requires_grad


def test_mask_sets_failing_examples_aside_and_raise_names_them():
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=3, n_components=2, seed=4, cov_scale=0.5)
    exact_score = gm.score_fn(sde)
    x = gm.sample(4, seed=5, dtype=torch.float64)
    x[2] = 7.0  # marks the example whose score the model below breaks

    def score(z, t):
        out = exact_score(z, t)
        broken = (z.detach() == 7.0).all(1, keepdim=True)  # a constant: the gradients of other rows stay finite
        return out + torch.where(broken, math.nan, 0.0)

    with pytest.raises(SolverError, match=r"examples \[2\]"):
        log_likelihood(sde, score, x, divergence="exact", solver="multistep")
    r = log_likelihood(sde, score, x, divergence="exact", solver="multistep", on_failure="mask")
    alone = log_likelihood(sde, gm, x[[0, 1, 3]], divergence="exact", solver="multistep")
    assert r.failed == [2] and bool(torch.isnan(r.log_prob[2]))
    torch.testing.assert_close(r.log_prob[[0, 1, 3]], alone.log_prob, rtol=0, atol=1e-12)


def test_step_limit_raises_in_either_mode():
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(4, seed=0)
    for mode in ("raise", "mask"):
        with pytest.raises(SolverError, match=r"max_steps=3.*examples \["):
            log_likelihood(sde, gm, x, divergence="exact", solver="multistep", rtol=1e-9, atol=1e-9, max_steps=3,
                           on_failure=mode)


def test_bad_options():
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(2, seed=0)
    with pytest.raises(ValueError, match="adjoint=True.*solver='dopri5'"):
        log_likelihood(sde, gm, x, solver="multistep", adjoint=True)
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(sde, gm, x, solver="multistep", steps=10)
    with pytest.raises(ValueError, match="'multistep'"):
        log_likelihood(sde, gm, x, solver="multistop")
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(sde, gm, x, solver="multistep", rtol=0.0)
    with pytest.raises(ValueError, match="order"):
        MultistepLikelihood(order=5)
    with pytest.raises(ValueError, match="error"):
        MultistepLikelihood(error="both")
    with pytest.raises(ValueError, match="max_factor"):
        MultistepLikelihood(max_factor=0.5)


@pytest.mark.parametrize("solver", ["multistep", "dopri5"])
def test_a_network_run_without_autograd_is_refused(solver):
    """An eps network under torch.no_grad gives a denoiser D = (x - s eps)/m that still depends on x through x
    itself: taking the divergence of D would silently return the identity's (the multistep solver gave log p
    about 15 nats off); both solvers take it of the score, and refuse."""
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    exact = gm.score_fn(sde)

    @torch.no_grad()
    def eps_net(x, t):
        return -sde.std(t)[:, None].to(x.dtype) * exact(x, t)

    model = sdegen.ScoreModel(eps_net, sde, prediction="eps")
    with pytest.raises(TypeError, match="autograd"):
        log_likelihood(sde, model, gm.sample(4, seed=0), divergence="exact", solver=solver)
