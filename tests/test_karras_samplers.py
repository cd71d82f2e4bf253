"""Tests of the k-diffusion-style samplers in EDM's sigma view (sdegen.samplers.karras): DPM-2, DPM-2 ancestral,
DPM-Solver++(2S) ancestral and Heun's final Euler step, against k-diffusion's functions (where installed), the
flow's float64 reference, closed forms and the exact marginals of Gaussian data."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.noise import Noise
from sdegen.samplers import DPM2, DPM2Ancestral, DPMPP2SAncestral, Heun

from peers import k_diffusion_sampling

F64 = torch.float64
VP = sdegen.VPSDE()
EDM = sdegen.EDMSDE()
SIGMA_VIEW = sdegen.EDMSDE(sigma_max=1000.0)  # time = sigma: the oracle's p_sigma in y = x/m for every SDE
# two overlapping anisotropic components: a smooth flow, so that 40-160 steps are in the asymptotic regime
MIXTURE = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
SEEDS = torch.tensor([11, 12, 13, 14, 15, 16])


def _k_sampling():
    return k_diffusion_sampling()


def _k_denoiser(y, sigma):
    """k-diffusion's model contract D(y, sigma) in y = x/m, from the oracle's exact score of p_sigma (EDM SDE)."""
    sigma = sigma.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
    return y + sigma**2 * MIXTURE.score(SIGMA_VIEW, y, sigma.flatten())


def _k_run(fn, sde, ts, x_T, **kw):
    """k-diffusion's sampler on the sigmas of the grid ``ts`` followed by 0, started at y_T = x_T / m(T), with the
    per-example noise stream sdegen's driver gives a sampler (draw k of the seeds' stream is step k's noise)."""
    sigmas = torch.cat([sde.sigma(ts), torch.zeros(1, dtype=F64)])
    stream = Noise(SEEDS, key=1)
    kw = {k: v for k, v in kw.items() if k in ("eta", "s_noise")}  # sdegen-only options (final_step) dropped
    if "eta" in kw:
        kw["noise_sampler"] = lambda a, b: stream.like(x_T)
    return fn(_k_denoiser, x_T / float(sde.mean_coeff(ts[0])), sigmas, disable=True, **kw)


@pytest.mark.parametrize("sde", [VP, EDM], ids=["vp", "edm"])
@pytest.mark.parametrize("name,kname,opts", [
    ("dpm_2", "sample_dpm_2", {}),
    ("heun", "sample_heun", {"final_step": "heun"}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 1.0}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.0}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
])
def test_equals_k_diffusion(sde, name, kname, opts):
    """k-diffusion's run on sigmas [sigma_0, ..., sigma_min, 0] ends with a step to sigma = 0 that returns D: the
    same as sdegen's sampler on the grid down to sigma_min with denoise=True (same denoiser, same noise)."""
    k = _k_sampling()
    ts = sdegen.time_grid(sde, 7, "edm")
    x_T = sde.prior_sample((6, 2), seed=4, dtype=F64)
    x, info = sdegen.sample(sde, MIXTURE, x_T, method=name, schedule=ts, seed=SEEDS, denoise=True,
                            return_info=True, **opts)
    reference = _k_run(getattr(k, kname), sde, ts, x_T, **opts)
    torch.testing.assert_close(x, reference, rtol=1e-6, atol=1e-8)
    assert info.nfe == 2 * 7 + 1


def _denoise(sde, x, t):
    """Tweedie's D(x, t) = (x + s^2 score) / m from the oracle's exact score."""
    m, s = float(sde.mean_coeff(t)), float(sde.std(t))
    return (x + s * s * MIXTURE.score(sde, x, t.expand(x.shape[0]))) / m


def _observed_order(method, steps_list, **opts):
    x_T = VP.prior_sample((8, 2), seed=3, dtype=F64)
    ref = sdegen.sample(VP, MIXTURE, x_T, method="ode", rtol=1e-11, atol=1e-11)
    log_n, log_e = [], []
    for steps in steps_list:
        x = sdegen.sample(VP, MIXTURE, x_T, method=method, steps=steps, **opts)
        log_n.append(math.log(steps))
        log_e.append(math.log(float((x - ref).pow(2).sum(1).mean().sqrt())))
    n, e = torch.tensor(log_n), torch.tensor(log_e)
    return -float(((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())


@pytest.mark.parametrize("method,opts", [("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpm_2_ancestral", {"eta": 0.0}),
                                         ("heun", {"final_step": "heun"}), ("heun", {"final_step": "euler"})])
def test_deterministic_variants_are_second_order(method, opts):
    """Slope of log RMS endpoint error against log steps (40, 80, 160) is 2 within 0.3 (the registry test covers
    every entry's defaults; these are the eta = 0 and final-step variants)."""
    slope = _observed_order(method, (40, 80, 160), **opts)
    assert abs(slope - 2.0) <= 0.3, (method, opts, slope)


@pytest.mark.parametrize("sde", [VP, sdegen.VESDE(), EDM], ids=["vp", "ve", "edm"])
def test_dpm_2_is_dpm_solver_2_with_noise_prediction(sde):
    """k-diffusion's midpoint rule in sigma, y' = y + (sigma' - sigma) eps(y_m, sigma_m), is DPM-Solver-2's
    y' = y - sigma' (e^h - 1) eps(y_m) (sigma' e^h = sigma), with the same stage: equal to round-off."""
    data = GaussianMixture.random(dim=3, n_components=3, seed=4)
    ts = sdegen.time_grid(sde, 9, "edm")
    x_T = sde.prior_sample((5, 3), seed=0, dtype=F64)
    a = sdegen.sample(sde, data, x_T, method="dpm_2", schedule=ts)
    b = sdegen.sample(sde, data, x_T, method="dpm_solver", order=2, prediction="noise", schedule=ts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dpm_2_ancestral_at_eta_0_is_dpm_2():
    x_T = VP.prior_sample((6, 3), seed=1, dtype=F64)
    data = GaussianMixture.random(dim=3, n_components=2, seed=2)
    a = sdegen.sample(VP, data, x_T, method="dpm_2", steps=9)
    b = sdegen.sample(VP, data, x_T, method="dpm_2_ancestral", eta=0.0, steps=9)
    assert not DPM2Ancestral(eta=0.0).stochastic
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sde", [VP, sdegen.VESDE()], ids=["vp", "ve"])
def test_dpmpp_2s_ancestral_at_eta_0_is_dpmpp_2s(sde):
    """eta = 0: y' = e^{-h} y + (1 - e^{-h}) D(y_m, u + h/2), y_m = e^{-h/2} y + (1 - e^{-h/2}) D(y, u): the
    deterministic DPM-Solver++(2S) of ``dpmpp_sde`` at eta = 0, and the closed form written out here."""
    x_T = sde.prior_sample((6, 2), seed=2, dtype=F64)
    ts = sdegen.time_grid(sde, 6, "log_snr")
    a = sdegen.sample(sde, MIXTURE, x_T, method="dpmpp_2s_ancestral", eta=0.0, schedule=ts)
    b = sdegen.sample(sde, MIXTURE, x_T, method="dpmpp_sde", eta=0.0, schedule=ts)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x = x_T.clone()
    for t, t2 in zip(ts[:-1], ts[1:]):
        m, m2 = float(sde.mean_coeff(t)), float(sde.mean_coeff(t2))
        u, u2 = -math.log(float(sde.sigma(t))), -math.log(float(sde.sigma(t2)))
        h = u2 - u
        t_mid = sde.t_from_log_snr(torch.tensor(2.0 * (u + h / 2), dtype=F64))
        y = x / m
        y_mid = math.exp(-h / 2) * y - math.expm1(-h / 2) * _denoise(sde, x, t)
        y = math.exp(-h) * y - math.expm1(-h) * _denoise(sde, y_mid * float(sde.mean_coeff(t_mid)), t_mid)
        x = y * m2
    torch.testing.assert_close(a, x, rtol=1e-10, atol=1e-12)


def test_heun_final_step_is_euler_and_counts_one_nfe_less():
    """With final_step="euler" the grid's last step is y' = y + (sigma' - sigma) eps(y, sigma): the run equals
    final_step="heun" on the grid without its last time followed by that Euler step; NFE 2 steps - 1."""
    ts = sdegen.time_grid(VP, 6, "edm")
    x_T = VP.prior_sample((5, 2), seed=5, dtype=F64)
    x, info = sdegen.sample(VP, MIXTURE, x_T, method="heun", schedule=ts, return_info=True)
    assert info.nfe == 11 == Heun().total_nfe(6)
    before, info_h = sdegen.sample(VP, MIXTURE, x_T, method="heun", final_step="heun", schedule=ts[:-1],
                                   return_info=True)
    assert info_h.nfe == 10 == Heun(final_step="heun").total_nfe(5)
    t, t2 = ts[-2], ts[-1]
    m, m2 = float(VP.mean_coeff(t)), float(VP.mean_coeff(t2))
    sigma, sigma2 = float(VP.sigma(t)), float(VP.sigma(t2))
    eps = -float(VP.std(t)) * MIXTURE.score(VP, before, t.expand(5))
    torch.testing.assert_close(x, (before / m + (sigma2 - sigma) * eps) * m2, rtol=1e-12, atol=1e-12)
    all_heun = sdegen.sample(VP, MIXTURE, x_T, method="heun", final_step="heun", schedule=ts)
    assert float((all_heun - x).abs().max()) > 1e-8


def _gaussian_variance_ratio(method, steps, n=20000, **opts):
    """Per-dimension variance of samples of N(0, c^2 I) data over the exact variance of p_{t_min}, and its
    Monte-Carlo standard error (var of a sample variance of n normals: 2 sigma^4 / (n - 1))."""
    c2, d = 0.25, 2
    data = GaussianMixture([1.0], torch.zeros(1, d, dtype=F64), torch.full((1, d), c2, dtype=F64))
    x = sdegen.sample(VP, data, shape=(n, d), method=method, steps=steps, seed=7, dtype=F64, **opts)
    t = torch.tensor(VP.t_min, dtype=F64)
    exact = float(VP.mean_coeff(t)) ** 2 * c2 + float(VP.std(t)) ** 2
    ratio = float(x.var(dim=0).mean()) / exact
    return ratio, math.sqrt(2.0 / (n - 1) / d)


@pytest.mark.parametrize("method", ["dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_ancestral_variance_matches_the_exact_marginal(method):
    """Gaussian data N(0, 0.25 I): at 200 steps the samples' variance is the exact variance of p_{t_min} within
    4 Monte-Carlo standard errors plus 1% (the weak-order-1 bias at 200 steps, O(1/steps))."""
    ratio, se = _gaussian_variance_ratio(method, 200)
    assert abs(ratio - 1.0) <= 4 * se + 0.01, (method, ratio, se)


@pytest.mark.parametrize("method", ["dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_ancestral_variance_bias_shrinks_with_steps(method):
    """The variance error of the ancestral samplers at 10 steps is larger than at 40 (first weak order), and at 40
    it is within 4 standard errors plus 3%."""
    r10, _ = _gaussian_variance_ratio(method, 10, n=8000)
    r40, se = _gaussian_variance_ratio(method, 40, n=8000)
    assert abs(r40 - 1.0) < abs(r10 - 1.0), (method, r10, r40)
    assert abs(r40 - 1.0) <= 4 * se + 0.03, (method, r40, se)


@pytest.mark.parametrize("factory,kwargs,match", [
    (DPM2Ancestral, {"eta": 1.5}, "eta"), (DPM2Ancestral, {"eta": -0.1}, "eta"), (DPM2Ancestral, {"eta": "1"}, "eta"),
    (DPM2Ancestral, {"s_noise": -1.0}, "s_noise"), (DPM2Ancestral, {"s_noise": math.inf}, "s_noise"),
    (DPMPP2SAncestral, {"eta": True}, "eta"), (DPMPP2SAncestral, {"s_noise": math.nan}, "s_noise"),
    (Heun, {"final_step": "midpoint"}, "final_step"), (Heun, {"final_step": None}, "final_step"),
])
def test_bad_options_raise_naming_the_parameter(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_repr_and_declarations():
    assert repr(DPM2Ancestral(eta=0.5)) == "DPM2Ancestral(eta=0.5, s_noise=1.0)"
    for sampler in (DPM2(), DPM2Ancestral(), DPMPP2SAncestral()):
        assert sampler.order == 2 and sampler.nfe_per_step == 2 and sampler.total_nfe(7) == 14
    assert DPM2Ancestral().stochastic and not DPM2().stochastic and not DPMPP2SAncestral(eta=0.0).stochastic
    assert "final_step='euler'" in repr(Heun())



@pytest.mark.parametrize("method, options", [("euler_ancestral", dict(eta=1.0)), ("dpm_2_ancestral", dict(eta=0.5)),
                                             ("dpmpp_2s_ancestral", dict(eta=1.0)), ("dpmpp_sde", dict(eta=1.0)),
                                             ("restart", dict(restarts=1)), ("heun", dict(s_churn=1.0))])
def test_without_its_fresh_noise_a_stochastic_sampler_stays_stochastic(method, options):
    """s_noise = 0 with noise asked for keeps the room the step makes for the noise (sigma_down, a restart's jump,
    the churn's raised sigma): it is the s_noise -> 0 limit of the stochastic sampler, not the probability-flow ODE
    (whose order it would otherwise claim), so it is declared stochastic; with the noise switched off (eta,
    restarts or s_churn 0) the sampler is deterministic."""
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    x_T = sde.prior_sample((64, 2), seed=1, dtype=torch.float64)
    _, info = sdegen.sample(sde, gm, x_T, method=method, steps=8, seed=0, s_noise=0.0, return_info=True, **options)
    assert info.sampler.stochastic
    off = {name: 0 for name in options}
    _, info = sdegen.sample(sde, gm, x_T, method=method, steps=8, seed=0, s_noise=0.0, return_info=True, **off)
    assert not info.sampler.stochastic

@pytest.mark.parametrize("method, name", [("heun", "s_churn"), ("heun", "s_noise"), ("heun", "s_tmax"),
                                          ("annealed_langevin", "steps_each")])
def test_bools_are_not_numbers(method, name):
    with pytest.raises((TypeError, ValueError), match=name):
        sdegen.sample(sdegen.VPSDE(), sdegen.GaussianMixture.ring(), shape=(2, 2), method=method, steps=2, seed=0,
                      **{name: True})


def test_ancestral_split_without_cancellation():
    """sigma_down = sigma' sqrt(1 - eta^2 + eta^2 (sigma'/sigma)^2): at eta = 1 it is sigma'^2 / sigma, also where
    sigma'^2 - sigma_up^2 cancelled to 0 (sigma'/sigma = 1e-10) and the sampler took a log of 0."""
    from sdegen.samplers.karras import ancestral_split
    for sigma, nxt in ((1e4, 1e-6), (80.0, 0.5), (2.0, 1.9)):
        down, up = ancestral_split(sigma, nxt, 1.0)
        assert down == pytest.approx(nxt * nxt / sigma, rel=1e-12)
        assert down**2 + up**2 == pytest.approx(nxt**2, rel=1e-12)
    assert ancestral_split(2.0, 1.0, 0.0) == (1.0, 0.0)
    sde = sdegen.EDMSDE(sigma_min=1e-6, sigma_max=1e4)
    x = sdegen.sample(sde, sdegen.GaussianMixture([1.0], [[0.5]], [0.04]), shape=(4, 1), method="dpmpp_2s_ancestral",
                      steps=1, seed=0)
    assert bool(torch.isfinite(x).all())
