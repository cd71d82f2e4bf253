"""Tests of sdegen.calibration.optimize_schedule on the Gaussian-mixture oracle."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.calibration import optimize_schedule

RING = GaussianMixture.ring()
_CACHE = {}


def _batch(sde_name, n, seed):
    """x_T from the prior and its float64 reference endpoint (torchdiffeq at rtol = atol = 1e-8: the errors
    compared here are 1e-3 and larger)."""
    key = (sde_name, n, seed)
    if key not in _CACHE:
        sde = {"vp": sdegen.VPSDE(), "subvp": sdegen.SubVPSDE(), "ve": sdegen.VESDE()}[sde_name]
        x_T = sde.prior_sample((n, 2), seed=seed, dtype=torch.float64)
        _CACHE[key] = sde, x_T, sdegen.sample(sde, RING, x_T, method="ode", rtol=1e-8, atol=1e-8)
    return _CACHE[key]


def _rms(sde, x_T, ref, times, **opts):
    x = sdegen.sample(sde, RING, x_T, schedule=times, **opts)
    return (x - ref).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_fitted_grid_generalises_to_held_out_points(sde_name):
    """Fitted on 128 calibration points, the grid lowers the RMS error of 256 other points by at least 30%
    against the log-SNR grid it started from (5 steps of exp_pc-2 on the ring, a search of <= 150 runs)."""
    sde, x_cal, ref_cal = _batch(sde_name, 128, 1)
    _, x_val, ref_val = _batch(sde_name, 256, 2)
    fit = optimize_schedule(sde, RING, x_cal, method="exp_pc", order=2, steps=5, reference=ref_cal, init="log_snr",
                            max_evals=150)
    start = sdegen.time_grid(sde, 5, "log_snr")
    assert fit.loss < fit.initial_loss
    assert _rms(sde, x_val, ref_val, fit.times, method="exp_pc", order=2) <= 0.7 * _rms(
        sde, x_val, ref_val, start, method="exp_pc", order=2)


def test_grid_is_valid_deterministic_and_its_loss_is_the_mse():
    sde, x_cal, ref_cal = _batch("vp", 128, 3)
    kw = dict(method="dpmpp_2m", steps=5, reference=ref_cal, init="few_step", max_evals=60)
    fit = optimize_schedule(sde, RING, x_cal, **kw)
    again = optimize_schedule(sde, RING, x_cal, **kw)
    ts = fit.times
    assert ts.dtype == torch.float64 and ts.shape == (6,)
    assert float(ts[0]) == sde.T and float(ts[-1]) == sde.t_min and bool((ts[1:] < ts[:-1]).all())
    assert torch.equal(ts, again.times)
    # the reported objective is the mean squared per-example error of the returned grid
    mse = _rms(sde, x_cal, ref_cal, ts, method="dpmpp_2m") ** 2
    assert fit.loss == pytest.approx(mse, rel=1e-10)
    assert fit.history[0] == fit.initial_loss and fit.history[-1] == fit.loss
    assert all(b < a for a, b in zip(fit.history, fit.history[1:]))


def test_nfe_accounting_and_multi_start_keeps_the_best():
    sde, x_cal, ref_cal = _batch("vp", 64, 4)
    kw = dict(method="ddim", steps=4, reference=ref_cal, max_evals=40)
    a = optimize_schedule(sde, RING, x_cal, init="log_snr", **kw)
    b = optimize_schedule(sde, RING, x_cal, init="edm", **kw)
    both = optimize_schedule(sde, RING, x_cal, init=["log_snr", "edm"], **kw)
    assert a.nfe == 4 * a.evaluations  # the reference was given: only sampler runs cost NFE
    assert both.loss == min(a.loss, b.loss)
    assert both.evaluations == a.evaluations + b.evaluations and both.nfe == 4 * both.evaluations
    solved = optimize_schedule(sde, RING, x_cal, method="ddim", steps=4, init="log_snr", max_evals=40,
                               reference_options={"rtol": 1e-7, "atol": 1e-7})
    assert solved.nfe > 4 * solved.evaluations  # the reference solve is counted too
    assert solved.loss == pytest.approx(a.loss, rel=1e-3)  # its reference agrees with ref_cal


def test_inputs_untouched_and_bad_arguments():
    sde, x_cal, ref_cal = _batch("vp", 32, 5)
    x_copy, ref_copy = x_cal.clone(), ref_cal.clone()
    optimize_schedule(sde, RING, x_cal, method="ddim", steps=3, reference=ref_cal, max_evals=10, init="log_snr")
    assert torch.equal(x_cal, x_copy) and torch.equal(ref_cal, ref_copy)
    with pytest.raises(ValueError, match="stochastic"):
        optimize_schedule(sde, RING, x_cal, method="dpmpp_2m_sde", steps=3, reference=ref_cal)
    with pytest.raises(ValueError, match="steps"):
        optimize_schedule(sde, RING, x_cal, steps=1, reference=ref_cal)
    with pytest.raises(ValueError, match="objective"):
        optimize_schedule(sde, RING, x_cal, steps=3, reference=ref_cal, objective="max")
    with pytest.raises(ValueError, match="reference"):
        optimize_schedule(sde, RING, x_cal, steps=3, reference=ref_cal[:4])
    with pytest.raises(ValueError, match="init"):
        optimize_schedule(sde, RING, x_cal, steps=3, reference=ref_cal, init=[])
    with pytest.raises(ValueError, match="'ode' integrates a whole span"):
        optimize_schedule(sde, RING, x_cal, method="ode", steps=3, reference=ref_cal)
    with pytest.raises(ValueError, match="max_evals"):
        optimize_schedule(sde, RING, x_cal, steps=3, reference=ref_cal, max_evals=0)


def test_screened_subset_estimates_the_objective_of_all_points():
    """With subset = 96 of 384 points, the weighted objective of the starting grid (no search: max_evals = 1)
    is within 25% of the MSE of all 384 points, for three random draws of the unscreened part; the NFE spent is
    the screening (steps + 2 steps calls) plus the one run; the reference is needed on the subset only."""
    sde, x_pool, ref_pool = _batch("vp", 384, 6)
    full = _rms(sde, x_pool, ref_pool, sdegen.time_grid(sde, 4, "log_snr"), method="ddim") ** 2
    for seed in range(3):
        fit = optimize_schedule(sde, RING, x_pool, method="ddim", steps=4, reference=ref_pool, init="log_snr",
                                max_evals=1, subset=96, seed=seed)
        assert fit.evaluations == 1 and fit.nfe == 3 * 4 + 4
        assert fit.initial_loss == pytest.approx(full, rel=0.25)
    with pytest.raises(ValueError, match="subset"):
        optimize_schedule(sde, RING, x_pool, steps=4, reference=ref_pool, subset=1)


def test_fitted_grid_saved_and_loaded_reruns_the_same_samples(tmp_path):
    """ScheduleFit.save/load: the times bit for bit, the fit's record, its SDE; the loaded grid gives the same
    samples; a fit loaded for another SDE or from a pilot grid's file fails naming the problem."""
    sde, x_cal, ref_cal = _batch("ve", 128, 3)
    fit = optimize_schedule(sde, RING, x_cal, method="ddim", steps=4, reference=ref_cal, init="log_snr", max_evals=20)
    assert fit.sde is sde and fit.method == "ddim"
    path = tmp_path / "ring.fit.json"
    fit.save(path)
    back = type(fit).load(path)
    assert torch.equal(back.times, fit.times) and back.sde.describe() == sde.describe()
    assert (back.loss, back.initial_loss, back.evaluations, back.nfe, back.history, back.method) == (
        fit.loss, fit.initial_loss, fit.evaluations, fit.nfe, fit.history, "ddim")
    x_T = sde.prior_sample((16, 2), seed=5, dtype=torch.float64)
    assert torch.equal(sdegen.sample(back.sde, RING, x_T, method="ddim", schedule=back.times),
                       sdegen.sample(sde, RING, x_T, method="ddim", schedule=fit.times))
    with pytest.raises(ValueError, match="sde"):
        type(fit).load(path, sde=sdegen.VPSDE())
    pilot = sdegen.schedules.pilot_grid(sde, RING, 4, (2,))
    pilot.save(tmp_path / "pilot.json")
    with pytest.raises(ValueError, match="ScheduleFit"):
        type(fit).load(tmp_path / "pilot.json")


def test_refined_fit_starts_from_the_coarse_fit():
    """The README's coarse-to-fine step: refine_grid(sde, fit.times, 2) is a valid explicit start of an 8-step fit;
    with no search (max_evals = 1) the fit returns that grid and its objective is the MSE on it; the same start
    works in a multi-start list and with a screened subset; ``steps`` of a fit is len(times) - 1."""
    sde, x_cal, ref_cal = _batch("vp", 64, 7)
    coarse = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=4, reference=ref_cal, init="log_snr",
                               max_evals=20)
    finer = sdegen.refine_grid(sde, coarse.times, 2)
    start = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=8, reference=ref_cal, init=finer,
                              max_evals=1)
    torch.testing.assert_close(start.times, finer, rtol=1e-12, atol=0)
    assert start.steps == 8 and coarse.steps == 4
    assert start.loss == start.initial_loss == pytest.approx(_rms(sde, x_cal, ref_cal, finer, method="dpmpp_2m") ** 2,
                                                              rel=1e-9)
    fit = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=8, reference=ref_cal, init=finer,
                            max_evals=30)
    assert fit.initial_loss == start.initial_loss and fit.loss < fit.initial_loss
    both = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=8, reference=ref_cal,
                             init=[finer, "log_snr"], max_evals=30)
    log_snr = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=8, reference=ref_cal, init="log_snr",
                                max_evals=30)
    assert both.loss == min(fit.loss, log_snr.loss) and both.evaluations == fit.evaluations + log_snr.evaluations
    screened = optimize_schedule(sde, RING, x_cal, method="dpmpp_2m", steps=8, reference=ref_cal, init=finer,
                                 max_evals=1, subset=16, seed=0)
    torch.testing.assert_close(screened.times, finer, rtol=1e-12, atol=0)


def test_explicit_start_sets_the_end_time_and_must_fit_the_grid():
    """An explicit start ending at 0.01 sets the fitted grid's t_min (and the reference solve's end) when t_min is
    not given; a start of another step count, one that does not begin at T, one that misses a given t_min, and
    explicit starts with different ends are refused naming init."""
    sde, x_cal, _ = _batch("vp", 32, 8)
    init = sdegen.time_grid(sde, 4, "log_snr", t_min=0.01)
    fit = optimize_schedule(sde, RING, x_cal, method="ddim", steps=4, init=init, max_evals=1,
                            reference_options={"rtol": 1e-8, "atol": 1e-8})
    assert float(fit.times[-1]) == 0.01 and float(fit.times[0]) == sde.T
    ref = sdegen.sample(sde, RING, x_cal, method="ode", rtol=1e-8, atol=1e-8, t_min=0.01)
    assert fit.loss == pytest.approx(_rms(sde, x_cal, ref, init, method="ddim") ** 2, rel=1e-4)
    named = optimize_schedule(sde, RING, x_cal, method="ddim", steps=4, init=[init, "edm"], max_evals=1,
                              reference=ref)
    assert float(named.times[-1]) == 0.01
    kw = dict(method="ddim", reference=ref, max_evals=1)
    with pytest.raises(ValueError, match=r"init: an explicit starting grid of 5 times has 4 steps, but steps=3"):
        optimize_schedule(sde, RING, x_cal, steps=3, init=init, **kw)
    with pytest.raises(ValueError, match="init: an explicit starting grid must start at T=1.0"):
        optimize_schedule(sde, RING, x_cal, steps=4, init=sdegen.time_grid(sde, 4, "log_snr", t_max=0.9), **kw)
    with pytest.raises(ValueError, match=r"init: an explicit starting grid must end at t_min=0.02.*got one ending at "
                                         r"0.01"):
        optimize_schedule(sde, RING, x_cal, steps=4, init=init, t_min=0.02, **kw)
    with pytest.raises(ValueError, match=r"init: the explicit starting grids end at different times \[0.001, 0.01\]"):
        optimize_schedule(sde, RING, x_cal, steps=4, init=[init, sdegen.time_grid(sde, 4, "log_snr")], **kw)


def test_options_with_a_sampler_object_are_refused():
    """Options go with a sampler name; with a sampler object they would be dropped (even unknown ones), so they
    raise as in sdegen.sample."""
    sde, x_cal, ref_cal = _batch("vp", 16, 9)
    sampler = sdegen.samplers.get_sampler("exp_pc")
    kw = dict(steps=3, reference=ref_cal, init="log_snr", max_evals=1)
    with pytest.raises(ValueError, match=r"sampler options \['order'\] were given with a sampler object"):
        optimize_schedule(sde, RING, x_cal, method=sampler, order=1, **kw)
    with pytest.raises(ValueError, match=r"sampler options \['not_an_option'\]"):
        optimize_schedule(sde, RING, x_cal, method=sampler, not_an_option=123, **kw)
    by_object = optimize_schedule(sde, RING, x_cal, method=sdegen.samplers.get_sampler("exp_pc", order=1), **kw)
    by_name = optimize_schedule(sde, RING, x_cal, method="exp_pc", order=1, **kw)
    assert by_object.loss == by_name.loss


def test_seed_of_any_int_size():
    """seed = 2^64 + 5 draws the unscreened points as seed = 5 (an int seeds a generator modulo 2^64)."""
    sde, x_pool, ref_pool = _batch("vp", 64, 6)
    kw = dict(method="ddim", steps=3, reference=ref_pool, init="log_snr", max_evals=1, subset=8)
    a = optimize_schedule(sde, RING, x_pool, seed=2**64 + 5, **kw)
    assert a.loss == optimize_schedule(sde, RING, x_pool, seed=5, **kw).loss
    assert a.loss != optimize_schedule(sde, RING, x_pool, seed=6, **kw).loss
    with pytest.raises(TypeError, match=r"seed must be an int or a torch.Generator; got NoneType None"):
        optimize_schedule(sde, RING, x_pool, seed=None, **kw)


def test_a_fixed_grid_reference_takes_no_tolerances_and_fits_the_same_grid():
    """reference_options={"solver": "rk4", "steps": N}: the reference is a fixed-grid solve (no rtol/atol are added
    to it); at 200 RK4 steps it agrees with the default adaptive reference far below the sampler's error, so the
    pattern search takes the same decisions and returns the same grid."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    x_T = sde.prior_sample((16, 2), seed=0, dtype=torch.float64)
    fixed = sdegen.optimize_schedule(sde, ring, x_T, steps=4, method="ddim", seed=0, max_evals=6,
                                     reference_options={"solver": "rk4", "steps": 200})
    adaptive = sdegen.optimize_schedule(sde, ring, x_T, steps=4, method="ddim", seed=0, max_evals=6)
    torch.testing.assert_close(fixed.times, adaptive.times, rtol=0, atol=1e-12)


def test_a_fit_that_cannot_be_measured_is_named():
    """One calibration point whose score is infinite made every loss NaN: no move was ever accepted, max_evals runs
    were spent and the starting grid came back with loss NaN. Now the first evaluation names the examples, and an
    objective that returns a non-finite value for finite errors is refused."""
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    pool = sde.prior_sample((20, 2), seed=0, dtype=torch.float64)
    exact = gm.score_fn(sde)

    def score(x, t):
        out = exact(x, t)
        return torch.where((x[:, :1] == pool[7, 0]) & (t[:, None] == sde.T), torch.full_like(out, math.inf), out)

    ref = sdegen.sample(sde, gm, pool, method="ode", rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match=r"x_T: the endpoint errors .* calibration examples \[7\]"):
        sdegen.optimize_schedule(sde, score, pool, method="exp_pc", steps=4, reference=ref, max_evals=20, seed=0)
    with pytest.raises(ValueError, match="objective returned nan"):
        sdegen.optimize_schedule(sde, gm, pool, method="exp_pc", steps=4, reference=ref, max_evals=5, seed=0,
                                 objective=lambda e, w: (w * e).sum() * math.nan)
