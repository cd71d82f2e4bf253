"""Tests of sdegen.schedules: refine_grid, grids from step densities and the pilot grid (the fixed named schedules
are tested with the sampling driver)."""

import math

import pytest
import torch

import sdegen
from sdegen.schedules import refine_grid


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VPSDE(schedule="cosine"), sdegen.SubVPSDE(), sdegen.VESDE()])
def test_refined_log_snr_grid_is_the_finer_log_snr_grid(sde):
    """Splitting each of 5 equal log-SNR steps in 3 gives the 15-step log-SNR grid; the old times are kept
    exactly; a warped grid stays strictly decreasing with its end points."""
    coarse = sdegen.time_grid(sde, 5, "log_snr")
    fine = refine_grid(sde, coarse, 3)
    assert fine.dtype == torch.float64 and fine.shape == (16,)
    torch.testing.assert_close(sde.log_snr(fine), sde.log_snr(sdegen.time_grid(sde, 15, "log_snr")),
                               rtol=0, atol=1e-9)
    assert torch.equal(fine[::3], coarse)
    warped = refine_grid(sde, sdegen.time_grid(sde, 7, "few_step"), 2)
    assert bool((warped[1:] < warped[:-1]).all()) and warped[0] == sde.T and warped[-1] == sde.t_min
    assert torch.equal(refine_grid(sde, coarse, 1), coarse)


def test_refine_grid_rejects_bad_input():
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match="factor"):
        refine_grid(sde, sdegen.time_grid(sde, 4), 0)
    with pytest.raises(ValueError, match="decreasing"):
        refine_grid(sde, torch.tensor([0.1, 0.5]))


# ---------------------------------------------------------------- grids from step sizes and the pilot grid
from sdegen.schedules import PILOT_ORDER, grid_from_step_sizes, pilot_grid  # noqa: E402


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE()])
def test_equal_steps_give_the_log_snr_grid_at_any_power(sde):
    """A grid of equal steps in u has a constant density whatever the power: re-spaced to N steps it is the
    N-step log-SNR grid."""
    pilot = sdegen.time_grid(sde, 13, "log_snr")
    for power in (0.0, 0.8, 1.0, 4.0 / 3.0):
        out = grid_from_step_sizes(sde, pilot, 7, power)
        torch.testing.assert_close(sde.log_snr(out), sde.log_snr(sdegen.time_grid(sde, 7, "log_snr")),
                                   rtol=0, atol=1e-9)
        assert out[0] == pilot[0] and out[-1] == pilot[-1]


def test_step_density_is_inverse_step_size_to_the_power():
    """Two stretches of equal length L in u, stepped with h1 = L/2 and h2 = L/8: the density (1/h)^p puts
    N h1^-p / (h1^-p + h2^-p) of the N new steps in the first, evenly; p = 1 re-spaces (here: keeps) the grid."""
    sde = sdegen.VPSDE()
    lam = sde.log_snr(torch.tensor([sde.T, sde.t_min], dtype=torch.float64))
    u0, u1 = 0.5 * float(lam[0]), 0.5 * float(lam[1])
    L = (u1 - u0) / 2
    us = [u0, u0 + L / 2, u0 + L] + [u0 + L + k * L / 8 for k in range(1, 9)]
    ts = sde.t_from_log_snr(2.0 * torch.tensor(us, dtype=torch.float64))
    ts[0], ts[-1] = sde.T, sde.t_min
    same = grid_from_step_sizes(sde, ts, 10, 1.0)
    torch.testing.assert_close(0.5 * sde.log_snr(same), torch.tensor(us, dtype=torch.float64), rtol=0, atol=1e-9)
    # p = 0.5: weights h^(1 - p) per step = (L/2)^0.5 * 2 and (L/8)^0.5 * 8, i.e. 1 : 2 -> 4 of 12 steps in the first
    half = 0.5 * sde.log_snr(grid_from_step_sizes(sde, ts, 12, 0.5))
    expect = torch.tensor([u0 + k * L / 4 for k in range(4)] + [u0 + L + k * L / 8 for k in range(9)],
                          dtype=torch.float64)
    torch.testing.assert_close(half, expect, rtol=0, atol=1e-9)


def test_pilot_grid_cost_is_reported_and_the_run_uses_its_grid():
    """schedule="pilot_local" in sample() runs pilot_grid for the sampler's order: the same times, its model calls in
    SampleInfo.pilot_nfe (not in nfe), the caller's state untouched; the pilot's own steps are unequal in u
    (the grid adapts to the problem)."""
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    grid = pilot_grid(sde, mix, 12, (2,), order=3, error="local")
    assert grid.nfe >= len(grid.pilot_times) - 1 and grid.batch == 64
    assert grid.times.shape == (13,) and bool((grid.times[1:] < grid.times[:-1]).all())
    assert grid.times[0] == sde.T and grid.times[-1] == sde.t_min
    x_T = sde.prior_sample((16, 2), seed=3, dtype=torch.float64)
    before = x_T.clone()
    x, info = sdegen.sample(sde, mix, x_T, method="exp_pc", order=2, steps=12, schedule="pilot_local",
                            return_info=True)
    assert torch.equal(x_T, before) and info.nfe == 12 and info.pilot_nfe == grid.nfe
    torch.testing.assert_close(info.times, grid.times, rtol=0, atol=0)
    fixed = sdegen.sample(sde, mix, x_T, method="exp_pc", order=2, steps=12, schedule=grid.times)
    torch.testing.assert_close(x, fixed, rtol=0, atol=0)
    _, plain = sdegen.sample(sde, mix, x_T, method="exp_pc", order=2, steps=12, return_info=True)
    assert plain.pilot_nfe == 0
    h = (0.5 * sde.log_snr(grid.pilot_times)).diff()
    assert float(h.max() / h.min()) > 2.0  # the pilot's steps are not equal in u: the grid adapts


def test_pilot_schedule_needs_a_model_and_valid_arguments():
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    with pytest.raises(ValueError, match="pilot"):
        sdegen.time_grid(sde, 10, "pilot")
    with pytest.raises(ValueError, match="order"):
        pilot_grid(sde, mix, 10, (2,), order=0)
    with pytest.raises(ValueError, match="batch"):
        pilot_grid(sde, mix, 10, (2,), batch=0)
    with pytest.raises(ValueError, match="power"):
        grid_from_step_sizes(sde, sdegen.time_grid(sde, 4), 3, -1.0)


def test_weighted_pilot_refuses_a_score_without_gradient():
    """A score computed outside autograd (detached) has no Jacobian to weigh the steps with: the weighted pilot
    raises and names the local one, which still works."""
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()

    def detached(x, t):
        return mix.score(sde, x.detach(), t).detach()

    with pytest.raises(TypeError, match="pilot_local"):
        pilot_grid(sde, detached, 6, (2,))
    with pytest.raises(TypeError, match="model"):
        sdegen.sample(sde, detached, shape=(4, 2), steps=6, method="unipc", schedule="pilot", seed=0)
    assert pilot_grid(sde, detached, 6, (2,), error="local").times.shape == (7,)


def test_step_sizes_override_a_cut_last_step():
    """A pilot's last step is cut short to land on t_min; given the controller's size for it (``sizes``), the
    density is that of the steps before: here constant, so the result is the log-SNR grid of the whole span,
    whereas the cut step's own length would crowd a whole step's share of points into it."""
    sde = sdegen.VPSDE()
    lam = 0.5 * sde.log_snr(torch.tensor([sde.T, sde.t_min], dtype=torch.float64))
    u0, u1 = float(lam[0]), float(lam[1])
    a = (u1 - u0) / 3.05
    us = torch.tensor([u0, u0 + a, u0 + 2 * a, u0 + 3 * a, u1], dtype=torch.float64)
    ts = sde.t_from_log_snr(2.0 * us)
    ts[0], ts[-1] = sde.T, sde.t_min
    out = grid_from_step_sizes(sde, ts, 6, 1.0, sizes=torch.full((4,), a, dtype=torch.float64))
    torch.testing.assert_close(sde.log_snr(out), sde.log_snr(sdegen.time_grid(sde, 6, "log_snr")), rtol=0, atol=1e-9)
    crowded = 0.5 * sde.log_snr(grid_from_step_sizes(sde, ts, 8, 1.0))
    assert float(crowded[-2]) > u0 + 3 * a - 1e-9  # 2 of 8 points (a quarter, one step of four) in the last 0.05 a
    with pytest.raises(ValueError, match="sizes"):
        grid_from_step_sizes(sde, ts, 6, 1.0, sizes=torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------- the flow's adjoint and the globally weighted pilot
from sdegen.schedules import PilotGrid, flow_adjoint  # noqa: E402


def _diagonal_gaussian(var):
    d = len(var)
    return sdegen.GaussianMixture(torch.ones(1, dtype=torch.float64), torch.linspace(-0.5, 0.5, d, dtype=torch.float64)[None],
                                  torch.diag(torch.tensor(var, dtype=torch.float64))[None])


def test_flow_adjoint_is_the_closed_form_amplification_of_a_gaussian():
    """For Gaussian data N(mu, diag(c^2)) the denoiser is linear with J_D = c^2/(c^2 + sigma^2) per coordinate, so
    the probability-flow map is linear: Phi'(t_end <- t) = (m_end/m_t) sqrt((c^2 + sigma_end^2)/(c^2 + sigma_t^2))
    per coordinate (the integral of dD/dxbar - 1 over u = -log sigma). The adjoint reproduces it to first order:
    its error halves when the grid is refined twofold."""
    sde, var = sdegen.VPSDE(), [0.01, 0.25, 4.0]
    mix = _diagonal_gaussian(var)
    c2 = torch.tensor(var, dtype=torch.float64)
    lam_end = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (60, 120):
        ts = sdegen.time_grid(sde, n, "log_snr")
        states = sde.prior_sample((n + 1, 3, 3), seed=1, dtype=torch.float64)  # J_D does not depend on the state
        lam = flow_adjoint(sde, mix, ts, states, lam_end)
        m, s2 = torch.exp(sde.log_mean_coeff(ts)), sde.sigma(ts) ** 2
        amp = (m[-1] / m)[:, None] * ((c2 + s2[-1]) / (c2 + s2[:, None])).sqrt()
        exact = amp[:, None, :] * lam_end
        assert lam.shape == (n + 1, 3, 3) and torch.equal(lam[-1], lam_end)
        errors.append(float(((lam - exact).abs() / exact.abs()).max()))
    assert errors[1] < 0.08 and 0.4 < errors[1] / errors[0] < 0.6, errors


def test_global_pilot_grid_accounts_for_the_adjoint_and_is_deterministic():
    """error="global": the same pilot run as error="local" (same accepted times and calls) plus one
    vector-Jacobian product per accepted step after the first, all in nfe; a strictly decreasing grid with the
    exact end points; the same grid at the same seed; sample(schedule="pilot") uses it and reports its cost."""
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    local = pilot_grid(sde, mix, 10, (2,), order=3, error="local")
    grid = pilot_grid(sde, mix, 10, (2,), order=3, error="global")
    torch.testing.assert_close(grid.pilot_times, local.pilot_times, rtol=0, atol=0)
    assert grid.adjoint_nfe == len(grid.pilot_times) - 2 and grid.nfe == local.nfe + grid.adjoint_nfe
    assert local.adjoint_nfe == 0 and local.weights is None
    assert grid.weights.shape == (len(grid.pilot_times) - 1,) and float(grid.weights.max()) == 1.0
    assert bool((grid.weights > 0).all())
    assert grid.times.shape == (11,) and bool((grid.times[1:] < grid.times[:-1]).all())
    assert grid.times[0] == sde.T and grid.times[-1] == sde.t_min
    assert not torch.equal(grid.times, local.times)  # the weights reshape the density
    with torch.inference_mode():  # the same grid again, the adjoint's autograd working inside inference mode
        assert torch.equal(pilot_grid(sde, mix, 10, (2,), order=3, error="global").times, grid.times)
    x_T = sde.prior_sample((8, 2), seed=3, dtype=torch.float64)
    _, info = sdegen.sample(sde, mix, x_T, method="exp_pc", order=2, steps=10, schedule="pilot",
                            return_info=True)
    assert info.pilot_nfe == grid.nfe and info.nfe == 10
    torch.testing.assert_close(info.times, grid.times, rtol=0, atol=0)
    with pytest.raises(ValueError, match="error"):
        pilot_grid(sde, mix, 10, (2,), error="adjoint")
    with pytest.raises(ValueError, match="pilot_local"):
        sdegen.time_grid(sde, 10, "pilot_local")


def test_pilot_grid_saved_and_loaded_is_the_same_grid(tmp_path):
    """save/load round-trips the times bit for bit with the SDE, order and settings; loading for another SDE, a
    file of another kind, a grid that is not decreasing or a missing file fails naming the problem."""
    sde, mix = sdegen.VESDE(sigma_max=50.0), sdegen.GaussianMixture.ring()
    grid = pilot_grid(sde, mix, 6, (2,), order=2, error="global")
    path = tmp_path / "model.grid.json"
    grid.save(path)
    back = PilotGrid.load(path)
    assert torch.equal(back.times, grid.times) and torch.equal(back.pilot_times, grid.pilot_times)
    assert torch.equal(back.weights, grid.weights)
    assert (back.nfe, back.batch, back.order, back.error, back.adjoint_nfe) == (grid.nfe, 64, 2, "global",
                                                                               grid.adjoint_nfe)
    assert back.sde.describe() == sde.describe() and back.settings == grid.settings
    assert torch.equal(PilotGrid.load(str(path), sde=sdegen.VESDE(sigma_max=50.0)).times, grid.times)
    with pytest.raises(ValueError, match="sde"):
        PilotGrid.load(path, sde=sdegen.VESDE(sigma_max=80.0))
    with pytest.raises(FileNotFoundError, match="no such"):
        PilotGrid.load(tmp_path / "missing.json")
    import json
    record = json.loads(path.read_text())
    (tmp_path / "flat.json").write_text(json.dumps({**record, "times": [0.5, 0.5, 0.1]}))
    with pytest.raises(ValueError, match="decreasing"):
        PilotGrid.load(tmp_path / "flat.json")
    (tmp_path / "other.json").write_text(json.dumps({**record, "kind": "ScheduleFit"}))
    with pytest.raises(ValueError, match="PilotGrid"):
        PilotGrid.load(tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="not a grid file"):
        PilotGrid.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="sde"):
        PilotGrid(times=grid.times, nfe=0, batch=1, pilot_times=grid.pilot_times).save(tmp_path / "x.json")


def test_growth_limit_bounds_the_step_ratio_and_keeps_an_even_grid():
    """growth=r: a grid whose steps would jump from L/16 to L/2 (a density dropping eightfold) grows them by at
    most r per step, with the same number of steps and end points; a constant density (steps equal in u) is
    already within any limit and stays the log-SNR grid."""
    sde = sdegen.VPSDE()
    lam = 0.5 * sde.log_snr(torch.tensor([sde.T, sde.t_min], dtype=torch.float64))
    u0, u1 = float(lam[0]), float(lam[1])
    L = (u1 - u0) / 2
    us = [u0 + k * L / 16 for k in range(17)] + [u0 + L + k * L / 2 for k in range(1, 3)]
    ts = sde.t_from_log_snr(2.0 * torch.tensor(us, dtype=torch.float64))
    ts[0], ts[-1] = sde.T, sde.t_min
    free = 0.5 * sde.log_snr(grid_from_step_sizes(sde, ts, 12, 1.0))
    assert float((free.diff()[1:] / free.diff()[:-1]).max()) > 3.0  # the jump the limit removes
    for r in (1.5, 2.0):
        out = grid_from_step_sizes(sde, ts, 12, 1.0, growth=r)
        h = (0.5 * sde.log_snr(out)).diff()
        assert out.shape == (13,) and out[0] == ts[0] and out[-1] == ts[-1] and bool((h > 0).all())
        assert float((h[1:] / h[:-1]).max()) <= r * (1 + 1e-3)
    even = sdegen.time_grid(sde, 9, "log_snr")
    torch.testing.assert_close(sde.log_snr(grid_from_step_sizes(sde, even, 6, 1.0, growth=1.2)),
                               sde.log_snr(sdegen.time_grid(sde, 6, "log_snr")), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="growth"):
        grid_from_step_sizes(sde, even, 6, 1.0, growth=1.0)


def test_pilot_steps_follow_the_predictor_error_model():
    """pilot_grid reads the pilot's steps as C(u) h^(p+1) = tol with p = PILOT_ORDER (the predictor's local error,
    which the pilot controls): its number of steps then grows as tol^(-1/(p+1)). Fitted over two decades of
    tolerance on the ring mixture, the exponent is 1/(p+1) = 0.25 within 0.02 (a controller of the corrected
    state's error, of order p + 2, gives 1/(p+2) = 0.2)."""
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    tols = (1e-4, 1e-5, 1e-6)
    steps = [len(pilot_grid(sde, mix, 4, (2,), error="local", rtol=tol, atol=tol).pilot_times) - 1 for tol in tols]
    slope = math.log(steps[-1] / steps[0]) / math.log(tols[0] / tols[-1])
    assert abs(slope - 1.0 / (PILOT_ORDER + 1)) < 0.02, (steps, slope)


@pytest.mark.parametrize("error", ["local", "global"])
def test_pilot_grid_takes_the_seeds_of_the_library(error):
    """seed: an int, a torch.Generator (the same state gives the same grid; it draws the prior states and the
    adjoint's cotangents) or None (torch's global generator, reproducible under torch.manual_seed); an int seed
    leaves the global generator alone. A non-seed raises TypeError before anything is drawn. The grid has
    ``steps`` steps; its settings record an int seed, and None for the others (a Generator is not plain data)."""
    sde, mix = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    kw = dict(batch=8, error=error)
    state = torch.get_rng_state()
    by_int = pilot_grid(sde, mix, 6, (2,), seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert by_int.steps == 6 and by_int.settings["seed"] == 3
    assert torch.equal(by_int.times, pilot_grid(sde, mix, 6, (2,), seed=2**64 + 3, **kw).times)  # low 63 bits
    by_gen = pilot_grid(sde, mix, 6, (2,), seed=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(by_gen.times, pilot_grid(sde, mix, 6, (2,), seed=torch.Generator().manual_seed(3), **kw).times)
    assert by_gen.settings["seed"] is None and not torch.equal(by_gen.times, by_int.times)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        by_global = pilot_grid(sde, mix, 6, (2,), seed=None, **kw)
        torch.manual_seed(5)
        assert torch.equal(pilot_grid(sde, mix, 6, (2,), seed=None, **kw).times, by_global.times)
    state = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"seed must be an int, a torch.Generator or None \(torch's global "
                                        r"generator\); got float 1.5"):
        pilot_grid(sde, mix, 6, (2,), seed=1.5, **kw)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_explicit_grid_written_in_float32_may_start_at_T_rounded_up():
    """FlowSDE's T = 0.999 is 0.99900001 in float32 (cosine VP's 0.9946 rounds down): a float32 grid starting there
    starts at T (the grid comes back with T exactly); a time beyond T is refused, naming the schedule."""
    for sde in (sdegen.FlowSDE(), sdegen.CosineVPSDE()):
        ts = sdegen.time_grid(sde, 2, torch.tensor([sde.T, sde.T / 2, sde.t_min], dtype=torch.float32))
        assert ts.dtype == torch.float64 and float(ts[0]) == sde.T
    with pytest.raises(ValueError, match=r"schedule: grid times must lie in \(0, T=0.999\]"):
        sdegen.time_grid(sdegen.FlowSDE(), 2, torch.tensor([0.9991, 0.5, 0.01], dtype=torch.float64))


def test_pilot_costs_are_counted_in_network_evaluations_and_classifier_gradients():
    """SampleInfo.pilot_nfe is in info.nfe's unit (a guided model without a null label costs 2 per call, the
    adjoint's and the sensitivity probes' calls included); pilot_classifier_nfe counts the pilot's classifier calls."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    exact = ring.score_fn(sde)
    calls = [0]

    def conditional(x, t, y=None):
        calls[0] += 1
        return exact(x, t) * (1.0 if y is None else 1.0 + 0.01 * y[:, None].to(x.dtype))

    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    clf_calls = [0]

    def classifier(x, t):
        clf_calls[0] += 1
        return clf(x, t)

    free = sdegen.classifier_free_guidance(conditional, y=1, w=1.0)
    guided = sdegen.classifier_guidance(ring, classifier, y=1, num_classes=2)
    for schedule in ("pilot", "pilot_local", "sensitivity"):
        calls[0] = clf_calls[0] = 0
        _, info = sdegen.sample(sde, free, shape=(8, 2), method="exp_pc", steps=6, schedule=schedule, seed=0,
                                return_info=True)
        assert info.pilot_nfe + info.nfe == calls[0] and info.pilot_nfe > 0
        _, info = sdegen.sample(sde, guided, shape=(8, 2), method="exp_pc", steps=6, schedule=schedule, seed=0,
                                return_info=True)
        assert info.pilot_classifier_nfe + info.classifier_nfe == clf_calls[0] and info.pilot_classifier_nfe > 0


def test_grid_files_are_validated_and_name_no_module_to_import_when_the_sde_is_given(tmp_path):
    import json
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    grid = sdegen.pilot_grid(sde, ring, 5, (2,), batch=8)
    path = tmp_path / "grid.json"
    grid.save(path)
    record = json.loads(path.read_text())
    for key, value in (("order", "two"), ("order", -5), ("error", "bogus"), ("weights", [0.5]), ("nfe", 3.7),
                       ("nfe", "abc"), ("times", ["a", "b"])):
        path.write_text(json.dumps({**record, key: value}))
        with pytest.raises(ValueError, match=str(path)):
            type(grid).load(path, sde=sde)
    # an SDE that differs is refused by comparing descriptions: the file's module is never imported
    path.write_text(json.dumps({**record, "sde": {"class": "a_module_that_does_not_exist:X", "config": {}}}))
    with pytest.raises(ValueError, match="made for"):
        type(grid).load(path, sde=sde)


def test_a_grid_finer_than_float64_resolves_is_refused():
    sde = sdegen.VPSDE(beta_max=50.0, t_min=1e-5)
    with pytest.raises(ValueError, match="float64's resolution"):
        sdegen.time_grid(sde, 10000, "log_snr", t_min=1.0 - 1e-12)  # steps of 1e-16 near t = 1


def test_a_fitted_grid_records_its_samplers_options():
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    x_T = sde.prior_sample((16, 2), seed=0, dtype=torch.float64)
    one = sdegen.optimize_schedule(sde, ring, x_T, steps=4, method="exp_pc", order=1, max_evals=10)
    plain = sdegen.optimize_schedule(sde, ring, x_T, steps=4, method="exp_pc", max_evals=10)
    assert "order=1" in one.method and plain.method == "exp_pc"
    with pytest.raises(ValueError, match="own steps.*'dpmpp_2m'"):
        sdegen.optimize_schedule(sde, ring, x_T, steps=4, method="adaptive")


def test_grid_arguments_that_cannot_mean_what_they_say():
    """An explicit grid's steps must agree with steps (10 asked, 2 returned without a word); the EDM grid stays
    finite for any rho > 0 (sigma_max^(1/rho) overflowed at rho = 1e-3 and the error named sigma); a pilot over a
    span its solver crosses in one step is refused by name (a bare torch RuntimeError before)."""
    sde = sdegen.EDMSDE()
    times = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    with pytest.raises(ValueError, match="steps: an explicit schedule of 3 times takes 2 steps"):
        sdegen.time_grid(sde, 10, times)
    assert torch.equal(sdegen.time_grid(sde, 2, times), times) and torch.equal(sdegen.time_grid(sde, None, times),
                                                                               times)
    for rho in (1e-3, 1.0, 7.0):
        grid = sdegen.time_grid(sde, 10, "edm", rho=rho)
        sig = sde.sigma(grid)
        assert torch.isfinite(grid).all() and bool((grid[1:] < grid[:-1]).all())
        # Karras et al. eq. 5 where it does not overflow: sigma_i^(1/rho) is linear in i
        if rho >= 1.0:
            root = sig ** (1.0 / rho)
            torch.testing.assert_close(root[1:] - root[:-1], (root[1] - root[0]).expand(10), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="too narrow for a pilot"):
        sdegen.sample(sdegen.VPSDE(), sdegen.GaussianMixture.ring(), shape=(8, 2), method="exp_pc", steps=3,
                      schedule="pilot", t_min=0.9999999999999, seed=0)


def test_a_pilot_whose_local_errors_vanish_lays_out_its_local_density():
    """Near T the exponential integrator is exact for the oracle: every adjoint weight was 0 and the pilot blamed the
    model's vector-Jacobian products. The grid now follows the pilot's own step density there."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    x, info = sdegen.sample(sde, ring, shape=(8, 2), method="exp_pc", steps=3, schedule="pilot", t_min=0.999999,
                            seed=0, return_info=True)
    assert torch.isfinite(x).all() and info.times.numel() == 4 and bool((info.times[1:] < info.times[:-1]).all())
