"""Tests of sdegen.adaptive: tolerance, NFE accounting, output times and errors."""

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture

RING = GaussianMixture.ring()
SDES = {"vp": sdegen.VPSDE(), "vp_cosine": sdegen.VPSDE(schedule="cosine"), "subvp": sdegen.SubVPSDE(),
        "ve": sdegen.VESDE()}


def _reference(sde, x_T, ts=None):
    return sdegen.sample(sde, RING, x_T, method="ode", rtol=1e-10, atol=1e-10, schedule=ts,
                         return_trajectory=ts is not None, return_info=ts is not None)


@pytest.mark.parametrize("method,opts", [("adaptive", {}), ("adaptive", {"error": "predictor", "order": 3}),
                                         ("adaptive_rk23", {})])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_meets_tolerance_and_counts_nfe(sde_name, method, opts):
    """Tighter tolerances give smaller errors; at rtol = atol = tol the worst example's endpoint error is
    within 10 tol of the float64 reference; NFE is what the docstring says."""
    sde = SDES[sde_name]
    x_T = sde.prior_sample((64, 2), seed=4, dtype=torch.float64)
    ref = _reference(sde, x_T)
    errors = []
    for tol in (1e-3, 1e-5):
        x, info = sdegen.sample(sde, RING, x_T, method=method, rtol=tol, atol=tol, return_info=True, **opts)
        err = (x - ref).norm(dim=1).max().item()
        assert err <= 10 * tol, f"{method} on {sde_name}: max error {err:.2e} at tol {tol:g}"
        errors.append(err)
        stats = info.sampler.stats
        assert info.steps == stats["accepted"]
        if method == "adaptive":
            assert info.nfe == 1 + stats["accepted"] + stats["rejected"]
        else:
            assert info.nfe == 3 * stats["accepted"] + 2 * stats["rejected"]
    assert errors[1] < errors[0]


def test_fewer_nfe_than_dopri5_at_equal_error():
    """'adaptive' at rtol = atol = 3e-3 is at least as accurate as torchdiffeq's dopri5 (in t) at 1e-2 with at most
    half its NFE (measured: RMS 2.6e-4 at 34 NFE against 4.3e-4 at 86 NFE)."""
    sde = SDES["vp"]
    x_T = sde.prior_sample((256, 2), seed=0, dtype=torch.float64)
    ref = _reference(sde, x_T)
    x, info = sdegen.sample(sde, RING, x_T, method="adaptive", rtol=3e-3, atol=3e-3, return_info=True)
    y, info_d = sdegen.sample(sde, RING, x_T, method="ode", rtol=1e-2, atol=1e-2, return_info=True)
    rms = lambda z: (z - ref).pow(2).sum(1).mean().sqrt().item()
    assert rms(x) <= rms(y)
    assert 2 * info.nfe <= info_d.nfe


def test_output_times_and_shapes(dtype):
    """With explicit output times the trajectory matches the reference at each; any state shape and dtype works."""
    sde = SDES["vp"]
    ts = torch.tensor([1.0, 0.5, 0.1, 0.01, 1e-3], dtype=torch.float64)
    x_T = sde.prior_sample((32, 2), seed=1, dtype=torch.float64)
    _, ref = _reference(sde, x_T, ts)
    _, info = sdegen.sample(sde, RING, x_T, method="adaptive", rtol=1e-6, atol=1e-6, schedule=ts,
                            return_trajectory=True, return_info=True)
    assert info.trajectory.shape == (5, 32, 2)
    torch.testing.assert_close(info.trajectory, ref.trajectory, rtol=0, atol=1e-4)
    times = torch.tensor(info.sampler.stats["times"], dtype=torch.float64)  # accepted times: a valid grid
    assert len(times) == info.steps + 1 and float(times[0]) == 1.0 and float(times[-1]) == 1e-3
    assert bool((times[1:] < times[:-1]).all())
    assert set(ts.tolist()) <= set(times.tolist())
    mix = GaussianMixture.random(dim=4, n_components=3, seed=2)
    x_T = sde.prior_sample((3, 1, 2, 2), seed=0, dtype=dtype)
    x = sdegen.sample(sde, mix, x_T, method="adaptive")
    assert x.shape == x_T.shape and x.dtype == dtype


@pytest.mark.parametrize("opts,err", [
    ({"rtol": 0.0}, ValueError), ({"atol": -1.0}, ValueError), ({"h_init": 0.0}, ValueError),
    ({"order": 5}, ValueError), ({"error": "global"}, ValueError), ({"safety": 1.5}, ValueError), ({"max_steps": 0}, ValueError),
    ({"max_factor": 1.0}, ValueError), ({"steps": 10}, ValueError), ({"schedule": "edm"}, ValueError),
])
def test_bad_options(opts, err):
    with pytest.raises(err, match=r"rtol|atol|h_init|order|error|safety|max_steps|max_factor|steps|schedule"):
        sdegen.sample(SDES["vp"], RING, shape=(4, 2), method="adaptive", **opts)


def test_max_steps_raises_with_location():
    with pytest.raises(RuntimeError, match="max_steps"):
        sdegen.sample(SDES["vp"], RING, shape=(4, 2), method="adaptive", rtol=1e-9, atol=1e-9, max_steps=5)


def _gaussian_flow(gauss, sde, x, t, t_new):
    """Exact probability-flow map of the one-component mixture N(mu, C) from (x, t) to t_new: in y = x/m and
    sigma = s/m, y - mu scales by (C + sigma_new^2)^{1/2} (C + sigma^2)^{-1/2} (commuting, so per eigenvalue)."""
    mu, (evals, evecs) = gauss.means[0], torch.linalg.eigh(gauss.covs[0])
    m, sig = sde.mean_coeff(t), sde.sigma(t)
    m_new, sig_new = sde.mean_coeff(t_new), sde.sigma(t_new)
    factor = ((evals + sig_new**2) / (evals + sig**2)).sqrt()
    return m_new * (mu + ((x / m - mu) @ evecs * factor) @ evecs.T)


@pytest.mark.parametrize("error", ["corrector", "predictor"])
@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE(), sdegen.EDMSDE()], ids=["vp", "ve", "edm"])
def test_accepted_steps_meet_the_tolerance(sde, error):
    """Every accepted step's true local error (against the closed-form flow of a Gaussian, from the step's own start)
    is within the tolerance: RMS over the state of err / (atol + rtol max(|x|, |x'|)) <= 1 for every example. For
    error="corrector" this holds because the estimate bounds the denoiser's Jacobian (c / (c + sigma^2) < 1 here)."""
    gauss = GaussianMixture.random(dim=3, n_components=1, seed=3)
    x_T = sde.prior_sample((64, 3), seed=1, dtype=torch.float64)
    steps = []

    class Recording(sdegen.AdaptiveMultistep):
        def _error(self, diff, x, x_new, t, h):
            e = super()._error(diff, x, x_new, t, h)
            if e <= 1.0:
                steps.append((x, t, h, x_new))
            return e

    for tol in (1e-3, 1e-4):
        steps.clear()
        sdegen.sample(sde, gauss, x_T, method=Recording(rtol=tol, atol=tol, error=error))
        assert len(steps) > 5
        for x, t, h, x_new in steps:
            u_new = 0.5 * float(sde.log_snr(t)) + h
            t_new = sde.t_from_log_snr(torch.tensor(2.0 * u_new, dtype=torch.float64))
            local = x_new - _gaussian_flow(gauss, sde, x, t, t_new)
            scale = torch.maximum(x.abs(), x_new.abs()) * tol + tol
            ratio = (local / scale).pow(2).mean(1).sqrt().max().item()
            assert ratio <= 1.0, f"{error} at tol {tol:g}: a step from t={float(t):.3g} (h={h:.3g}) has ratio {ratio:.2f}"
