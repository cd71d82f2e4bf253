"""Tests of the sensitivity grid for stochastic samplers (sdegen.sensitivity_grid): the pilot's estimate of the RMS
eigenvalue of J (I - J) against its closed form on Gaussian data, the grid's equal step errors and its limits, and
bad input."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.sensitivity_grid import _equidistribute, sensitivity_grid, sensitivity_profile

F64 = torch.float64
VP = sdegen.VPSDE()


def gaussian(v: float, dim: int) -> GaussianMixture:
    return GaussianMixture([1.0], [[0.0] * dim], [(v * torch.eye(dim, dtype=F64)).tolist()])


def j_one_minus_j(sde, ts, v):
    """J (1 - J) of N(0, v I) data, J = v / (v + sigma^2), sigma = s / m."""
    sig2 = sde.sigma(ts) ** 2
    j = v / (v + sig2)
    return j * (1.0 - j)


@pytest.mark.parametrize("sde", [VP, sdegen.VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("v", [0.01, 0.5])
def test_profile_is_j_times_one_minus_j_on_gaussian_data(sde, v):
    """On N(0, v I), J (I - J) = c I with c = J (1 - J): the estimate is c times the RMS of 2048 standard normal
    entries (batch 256, d = 8), within 7% (4.5 standard deviations of that RMS) wherever c is not negligible; the
    forward differences add O(sqrt(eps)) relative error only."""
    ts, c, nfe = sensitivity_profile(sde, gaussian(v, 8), (8,), points=24, batch=256)
    exact = j_one_minus_j(sde, ts, v)
    assert nfe == 24 + 3 * 25
    keep = exact > 1e-3 * float(exact.max())
    assert int(keep.sum()) >= 6
    torch.testing.assert_close(c[keep], exact[keep], rtol=0.07, atol=0.0)


def test_profile_vanishes_for_a_point_mass():
    """Data at one point: D is constant (J = 0) at every noise level."""
    def score(x, t):
        return -x / VP.std(t).reshape(-1, *([1] * (x.ndim - 1))) ** 2

    ts, c, _ = sensitivity_profile(VP, score, (3,), points=8, batch=16)
    assert float(c.abs().max()) < 1e-5
    grid, _ = sensitivity_grid(VP, score, 6, (3,), points=8, batch=16)
    torch.testing.assert_close(grid, sdegen.time_grid(VP, 6, "log_snr"))


@pytest.mark.parametrize("order", [1, 3])
def test_steps_have_equal_error_estimates(order):
    """On the closed-form profile of N(0, 0.01 I) under VP, every step's max C (1 - e^{-2h})^{q+1} (C evaluated
    densely) is the same up to the 2048-cell discretisation: within 15% of each other."""
    ts = sdegen.time_grid(VP, 400, "log_snr")
    u = 0.5 * VP.log_snr(ts)
    c = j_one_minus_j(VP, ts, 0.01)
    points = _equidistribute(u, c, 12, order)
    assert len(points) == 13 and bool((points[1:] > points[:-1]).all())
    assert math.isclose(float(points[0]), float(u[0])) and math.isclose(float(points[-1]), float(u[-1]))
    dense = torch.linspace(float(u[0]), float(u[-1]), 20001, dtype=F64)
    sig2 = torch.exp(-2.0 * dense)
    c_dense = (0.01 / (0.01 + sig2)) * (sig2 / (0.01 + sig2))
    errors = []
    for a, b in zip(points[:-1].tolist(), points[1:].tolist()):
        inside = (dense >= a) & (dense <= b)
        errors.append(float(c_dense[inside].max()) * (-math.expm1(-2.0 * (b - a))) ** (order + 1))
    assert max(errors) / min(errors) < 1.15


def test_one_long_step_above_the_data_scale():
    """For data of scale 0.1 under VP (sigma from 152 down to 0.01), the first step of a 20-step grid for an order-3
    sampler runs from the prior to below sigma = 30 times the data's scale (where C = J (1 - J) <= v / sigma^2 is
    below 1/900, the step's error bound whatever its length) but not into the data's own scale; a log-SNR grid
    would spend 9 of its 20 steps above 30 times the scale."""
    grid, _ = sensitivity_grid(VP, gaussian(0.01, 4), 20, (4,), order=3)
    sigma = VP.sigma(grid)
    assert len(grid) == 21 and bool((grid[1:] < grid[:-1]).all())
    assert float(grid[0]) == VP.T and float(grid[-1]) == VP.t_min
    assert 0.1 < float(sigma[1]) < 3.0


def test_grid_dtype_float32_pilot():
    grid, nfe = sensitivity_grid(VP, GaussianMixture.ring(), 8, (2,), points=12, batch=32, dtype=torch.float32)
    assert grid.dtype == F64 and len(grid) == 9 and nfe == 12 + 3 * 13
    assert bool((grid[1:] < grid[:-1]).all())


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps"), ({"steps": 4, "order": 0}, "order"),
                                          ({"steps": 4, "points": 1}, "points"), ({"steps": 4, "batch": 0}, "batch"),
                                          ({"steps": 2.0}, "steps")])
def test_bad_input(kwargs, match):
    steps = kwargs.pop("steps")
    with pytest.raises(TypeError if isinstance(steps, float) else ValueError, match=match):
        sensitivity_grid(VP, GaussianMixture.ring(), steps, (2,), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("v", [4e-4, 1e-2])
def test_sa_solver_on_the_grid_samples_gaussian_data_at_ten_steps(v):
    """SA-Solver (tau = 0.7) with 10 steps on N(0, v I), d = 8: on the sensitivity grid the sample variance is
    v + sigma(t_min)^2 within 3% (the Monte-Carlo standard error over 8000 x 8 entries is 0.5%); on the log-SNR
    grid it is not (most of its steps lie above the data's scale, where D is constant)."""
    gm = gaussian(v, 8)
    target = v + float(VP.sigma(torch.tensor(VP.t_min, dtype=F64))) ** 2
    grids = {"sensitivity": sensitivity_grid(VP, gm, 10, (8,), order=4)[0],
             "log_snr": sdegen.time_grid(VP, 10, "log_snr")}
    ratio = {name: float(sdegen.sample(VP, gm, shape=(8000, 8), method="sa_solver", tau=0.7, schedule=grid,
                                       seed=3, dtype=F64).var(0).mean()) / target for name, grid in grids.items()}
    assert abs(ratio["sensitivity"] - 1.0) < 0.03
    assert abs(ratio["log_snr"] - 1.0) > 0.05


def test_sample_resolves_the_sensitivity_schedule():
    """schedule="sensitivity" in sdegen.sample is sensitivity_grid for the sampler's order on draws shaped like x:
    the same samples as the explicit grid, and the pilot's calls reported as pilot_nfe, not as nfe."""
    gm = gaussian(0.3, 4)
    sampler = sdegen.samplers.get_sampler("sa_solver", tau=0.7)
    times, pilot_nfe = sensitivity_grid(VP, gm, 8, (4,), order=sampler.order)
    x_named, info = sdegen.sample(VP, gm, shape=(16, 4), method="sa_solver", tau=0.7, steps=8,
                                  schedule="sensitivity", seed=3, dtype=F64, return_info=True)
    x_explicit = sdegen.sample(VP, gm, shape=(16, 4), method="sa_solver", tau=0.7, schedule=times, seed=3, dtype=F64)
    torch.testing.assert_close(x_named, x_explicit, rtol=0.0, atol=0.0)
    assert info.pilot_nfe == pilot_nfe > 0
    with pytest.raises(ValueError, match="sensitivity_grid"):
        sdegen.time_grid(VP, 8, "sensitivity")


def test_seed_takes_a_generator_and_none():
    """seed is an int, a torch.Generator or None, as for the other random functions: a Generator gives the grid of
    its state, None the grid of torch's global generator's state, an int does not touch the global generator."""
    ring = GaussianMixture.ring()
    kw = dict(points=8, batch=8)
    state = torch.get_rng_state()
    by_int, _ = sensitivity_grid(VP, ring, 6, (2,), seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    by_gen, _ = sensitivity_grid(VP, ring, 6, (2,), seed=torch.Generator().manual_seed(4), **kw)
    again, _ = sensitivity_grid(VP, ring, 6, (2,), seed=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(by_gen, again) and not torch.equal(by_gen, by_int)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        by_global, _ = sensitivity_grid(VP, ring, 6, (2,), seed=None, **kw)
        torch.manual_seed(4)
        assert torch.equal(sensitivity_grid(VP, ring, 6, (2,), seed=None, **kw)[0], by_global)
    with pytest.raises(TypeError, match="seed must be an int, a torch.Generator or None"):
        sensitivity_grid(VP, ring, 6, (2,), seed="4", **kw)


def test_the_grid_never_grows_a_step_more_than_twice_the_one_before():
    """Below the data's scale the sensitivity vanishes and the equidistributed grid ended in one step 24x the one
    before (VE with sigma_max 1000, data of std 100): sa_solver's extrapolation over it gave a variance 2300x the
    truth at 10 steps. Capped at the adaptive controllers' growth limit 2, the same run is within 5%."""
    sde = sdegen.VESDE(sigma_max=1000.0)
    gm = sdegen.GaussianMixture([1.0], [[200.0]], [100.0**2])
    ts, _ = sensitivity_grid(sde, gm, 10, (1,))
    u = 0.5 * sde.log_snr(ts)
    h = u[1:] - u[:-1]
    assert bool((h > 0).all()) and float((h[1:] / h[:-1]).max()) <= 2.0 + 1e-9
    x_T = gm.sample(4000, sde=sde, t=sde.T, seed=123)
    x = sdegen.sample(sde, gm, x_T, method="sa_solver", steps=10, schedule="sensitivity", seed=0)
    exact = float(gm.marginal(sde, sde.t_min).covs[0, 0, 0])
    assert abs(float(x.var()) / exact - 1) < 0.05  # Monte-Carlo standard error of the ratio: 0.022
