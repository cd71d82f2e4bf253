"""Tests of Restart sampling (sdegen.samplers.restart.Restart; Xu et al. 2023, algorithm 1): the algorithm against
its composition from the driver's own pieces, the declared NFE, the exact forward draw's effect on the marginal,
and bad input."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.noise import Noise
from sdegen.samplers import Restart

F64 = torch.float64
VP = sdegen.VPSDE()
MIXTURE = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
SEEDS = torch.tensor([3, 4, 5, 6, 7])


@pytest.mark.parametrize("solver,schedule,opts", [("dpmpp_2s", "log_snr", {"eta": 0.0}),
                                                  ("heun", "edm", {"final_step": "heun"}),
                                                  ("dpm_2", "edm", {})])
@pytest.mark.parametrize("sde", [VP, sdegen.VESDE()], ids=["vp", "ve"])
def test_restart_is_the_solve_the_forward_draw_and_the_resolve(sde, solver, schedule, opts):
    """K = 2 restarts, written out with the driver: the solver down to t_j (sigma nearest 0.1 in log), then twice
    y <- y + sqrt(sigma_max^2 - sigma_j^2) z (draws 0 and 1 of the per-example stream) and a re-solve from
    sigma_max = 2 to t_j on the solver's grid of 3 steps, then the solver on the rest of the grid."""
    method = {"dpmpp_2s": "dpmpp_2s_ancestral"}.get(solver, solver)
    ts = sdegen.time_grid(sde, 12, schedule)
    sigmas = sde.sigma(ts)
    j = int((sigmas[1:].log() - math.log(0.1)).abs().argmin()) + 1
    t_hi = float(sde.t_from_sigma(torch.tensor(2.0, dtype=F64)))
    sub = sdegen.time_grid(sde, 3, schedule, t_min=float(ts[j]), t_max=t_hi)
    x_T = sde.prior_sample((5, 2), seed=1, dtype=F64)
    x, info = sdegen.sample(sde, MIXTURE, x_T, method="restart", restarts=2, restart_steps=3, solver=solver,
                            schedule=ts, seed=SEEDS, return_info=True)
    x_ref = sdegen.sample(sde, MIXTURE, x_T, method=method, schedule=ts[:j + 1], **opts)
    stream = Noise(SEEDS, key=1)
    std = math.sqrt(float(sde.sigma(sub[0])) ** 2 - float(sigmas[j]) ** 2)
    m_j, m_hi = float(sde.mean_coeff(ts[j])), float(sde.mean_coeff(sub[0]))
    for _ in range(2):
        x_hi = (x_ref / m_j + std * stream.like(x_ref)) * m_hi
        x_ref = sdegen.sample(sde, MIXTURE, x_hi, method=method, schedule=sub, **opts)
    final = {"final_step": "euler"} if solver == "heun" else {}
    x_ref = sdegen.sample(sde, MIXTURE, x_ref, method=method, schedule=ts[j:], **{**opts, **final})
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10)
    assert info.nfe == info.sampler.total_nfe(12) == (23 if solver == "heun" else 24) + 2 * 2 * 3


@pytest.mark.parametrize("opts", [{}, {"restarts": 0}, {"restarts": 3, "restart_steps": 2},
                                  {"solver": "heun"}, {"solver": "heun", "final_step": "heun"},
                                  {"solver": "dpm_2", "restart_steps": 1}])
@pytest.mark.parametrize("steps", [1, 4, 9])
def test_declared_nfe_is_counted(opts, steps):
    x, info = sdegen.sample(VP, MIXTURE, shape=(3, 2), method="restart", steps=steps, seed=0, return_info=True,
                            **opts)
    sampler = info.sampler
    main = 2 * steps - int(sampler.solver == "heun" and sampler.final_step == "euler")
    n_restart = opts.get("restart_steps", max(1, round(steps / 4)))
    assert info.nfe == sampler.total_nfe(steps) == main + 2 * sampler.restarts * n_restart


def test_no_restart_is_the_plain_solver():
    x_T = VP.prior_sample((4, 2), seed=2, dtype=F64)
    a = sdegen.sample(VP, MIXTURE, x_T, method="restart", restarts=0, steps=10)
    b = sdegen.sample(VP, MIXTURE, x_T, method="dpmpp_2s_ancestral", eta=0.0, steps=10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not Restart(restarts=0).stochastic and Restart(s_noise=0.0).stochastic  # the limit s_noise -> 0


def _variance_ratio(restarts, steps, n=8000):
    """Per-dimension sample variance of N(0, c^2 I) data over the exact variance of p_{t_min}."""
    c2, d = 0.25, 2
    data = GaussianMixture([1.0], torch.zeros(1, d, dtype=F64), torch.full((1, d), c2, dtype=F64))
    x = sdegen.sample(VP, data, shape=(n, d), method="restart", restarts=restarts, steps=steps, seed=9, dtype=F64)
    t = torch.tensor(VP.t_min, dtype=F64)
    return float(x.var(dim=0).mean()) / (float(VP.mean_coeff(t)) ** 2 * c2 + float(VP.std(t)) ** 2)


def test_restarts_keep_the_exact_marginal_of_gaussian_data():
    """Gaussian data: the flow's steps and the exact forward draw both map p_sigma to p_sigma', so with an accurate
    solve (40 steps) any number of restarts keeps the marginal's variance within 4 Monte-Carlo standard errors
    (sqrt(2 / (n d)) = 0.011) plus 1% of discretisation error."""
    se = math.sqrt(2.0 / (8000 * 2))
    for restarts in (1, 3):
        ratio = _variance_ratio(restarts, 40)
        assert abs(ratio - 1.0) <= 4 * se + 0.01, (restarts, ratio)


def test_interval_outside_the_grid_raises_at_the_run():
    with pytest.raises(ValueError, match="restart_sigmas"):
        sdegen.sample(VP, MIXTURE, shape=(2, 2), method="restart", steps=5, seed=0, t_min=0.9,
                      restart_sigmas=(0.001, 0.01))


@pytest.mark.parametrize("kwargs,match", [
    ({"restarts": -1}, "restarts"), ({"restarts": 1.0}, "restarts"), ({"restart_steps": 0}, "restart_steps"),
    ({"restart_sigmas": (2.0, 1.0)}, "restart_sigmas"), ({"restart_sigmas": (0.0, 1.0)}, "restart_sigmas"),
    ({"restart_sigmas": 0.5}, "restart_sigmas"), ({"restart_sigmas": (0.1, math.nan)}, "restart_sigmas"),
    ({"s_noise": -0.5}, "s_noise"), ({"solver": "euler"}, "solver"), ({"final_step": "rk4"}, "final_step"),
    ({"solver": "heun", "final_step": "rk4"}, "final_step must be one of"),
    ({"final_step": "heun"}, "final_step applies to solver='heun'"),  # inert for dpmpp_2s: refused, not ignored
])
def test_bad_options_raise_naming_the_parameter(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Restart(**kwargs)


def test_restarts_contract_an_error_made_above_the_interval():
    """Restart's purpose (Xu et al. 2023, theorem 2): the forward draw to sigma_max followed by an accurate ODE solve
    back is a Markov chain on p_{sigma_j} whose invariant law is the true p_{sigma_j}, and it contracts an error
    made before the interval. Data: two components at -1 and +1 (std 0.3) with weights 1/2; the score is the
    oracle's below sigma = 2 and, above it, that of weights (0.9, 0.1). The ODE alone keeps the error (about a
    third of the samples in the right component); each restart shrinks it, and four restore the weights within
    4 Monte-Carlo standard errors (sqrt(0.25 / n) = 0.008)."""
    true = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [[0.09], [0.09]])
    wrong = GaussianMixture([0.9, 0.1], [[-1.0], [1.0]], [[0.09], [0.09]])

    def score(x, t):
        above = (VP.sigma(t) > 2.0).reshape(-1, 1)
        return torch.where(above, wrong.score(VP, x, t), true.score(VP, x, t))

    n = 4000
    errors = []
    for restarts in (0, 1, 4):
        x = sdegen.sample(VP, score, shape=(n, 1), method="restart", restarts=restarts, restart_steps=10, steps=40,
                          seed=1, dtype=F64)
        errors.append(abs(float((x > 0).double().mean()) - 0.5))
    assert errors[0] > 0.1 and errors[1] < 0.6 * errors[0], errors
    assert errors[2] <= 4 * math.sqrt(0.25 / n), errors


def test_no_restart_needs_no_restart_interval():
    """restarts=0 is the plain solver even where the grid could not hold the restart interval."""
    x_T = VP.prior_sample((4, 2), seed=2, dtype=F64)
    a = sdegen.sample(VP, MIXTURE, x_T, method="restart", restarts=0, steps=6, t_min=0.5)
    b = sdegen.sample(VP, MIXTURE, x_T, method="dpmpp_2s_ancestral", eta=0.0, steps=6, t_min=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_restart_point_lies_below_the_interval_on_coarse_grids():
    """On a 2-step grid of EDMSDE(sigma_max=1e4) the grid time nearest the interval's bottom was above its top, and
    the error blamed restart_sigmas, which were the defaults and inside the grid's range."""
    gm = sdegen.GaussianMixture([1.0], [[0.5]], [0.04])
    for sde in (sdegen.EDMSDE(sigma_max=1e4), sdegen.FlowSDE(T=0.9999)):
        x = sdegen.sample(sde, gm, shape=(4, 1), method="restart", steps=2, seed=0)
        assert bool(torch.isfinite(x).all())
