"""Tests of sdegen.samplers.exponential: the exponential-Adams family against closed forms written here
(DDIM's eq. 12, the first-order SDE step, DPM-Solver++(2M)'s second step, the exact solution for a denoiser
linear in u), and the named samplers as settings of :class:`ExponentialAdams`."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.models import Model, as_model
from sdegen.samplers import Context, get_sampler
from sdegen.samplers.exponential import (DDIM, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP3MSDE, ExponentialAdams,
                                         ExponentialPC, SASolver)

RING = GaussianMixture.ring()
SDES = {
    "vp": sdegen.VPSDE(),
    "vp_cosine": sdegen.VPSDE(schedule="cosine"),
    "subvp": sdegen.SubVPSDE(),
    "ve": sdegen.VESDE(),
}
F64 = dict(dtype=torch.float64)


def _batch_time(x, t):
    """The model contract's time, a 0-d or (B,) tensor, as a (B,) tensor in x's dtype."""
    return (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)


class ListNoise:
    """A noise stream that hands out the given tensors in turn (and counts the draws)."""

    def __init__(self, draws):
        self.draws, self.taken = list(draws), 0

    def like(self, x):
        z = self.draws[self.taken]
        self.taken += 1
        return z


class LinearInU(Model):
    """D(x, t) = a + b u(t), u = log(m/s): a denoiser independent of x, for which the mean dynamics
    dy = c (D - y) du have the closed-form solution used below."""

    def __init__(self, sde, a, b):
        super().__init__(sde)
        self.a, self.b = a, b

    def denoise(self, x, t):
        u = 0.5 * self.sde.log_snr(_batch_time(x, t)).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.a + self.b * u).expand_as(x).clone()


class Recording(Model):
    """The oracle's denoiser, keeping every output and a copy of it."""

    def __init__(self, sde):
        super().__init__(sde)
        self.outputs = []

    def denoise(self, x, t):
        t = _batch_time(x, t)
        m, s = self.sde.mean_coeff(t)[:, None], self.sde.std(t)[:, None]  # x is (B, 2)
        out = (x + s**2 * RING.score(self.sde, x, t)) / m
        self.outputs.append((out, out.clone()))
        return out


def _oracle_denoised(sde, x, t):
    m, s = float(sde.mean_coeff(t)), float(sde.std(t))
    return (x + s * s * RING.score(sde, x, t.expand(x.shape[0]))) / m


def _run(sampler, sde, model, x, ts, noise=None):
    """The fixed-step protocol driven by hand, so that the test chooses the noise draws."""
    ctx = Context(sde, model, noise)
    state = sampler.start(ctx, x, ts)
    times = ts.unbind()
    for t, t_next in zip(times[:-1], times[1:]):
        x, state = sampler.step(ctx, x, t, t_next, state)
    return x, ctx


def _ms_u(sde, t):
    m, s = float(sde.mean_coeff(t)), float(sde.std(t))
    return m, s, math.log(m / s)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_song_et_al_eq_12(sde_name, eta):
    """One DDIM step is x' = m' D + sqrt(s'^2 - c^2) eps + c z with eps = (x - m D)/s and c = eta b s'/s, b^2 the
    SDE's forward transition variance from t' to t (Song et al. 2021, eqs. 12 and 16 for any linear SDE)."""
    sde = SDES[sde_name]
    x = sde.prior_sample((16, 2), seed=2, **F64) * 0.7
    ts = torch.tensor([0.55, 0.3], **F64) * sde.T
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), **F64)
    got, ctx = _run(DDIM(eta), sde, RING, x, ts, ListNoise([z]))
    t, t2 = ts.unbind()
    (m, s, _), (m2, s2, _) = _ms_u(sde, t), _ms_u(sde, t2)
    d = _oracle_denoised(sde, x, t)
    c = eta * math.sqrt(float(sde.transition_var(t2, t))) * s2 / s
    want = m2 * d + math.sqrt(s2 * s2 - c * c) * (x - m * d) / s + c * z
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ctx.noise.taken == (1 if eta else 0) and ctx.nfe == 1


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("sampler,lam", [
    (ExponentialAdams(predictor_order=1, eta=0.3), 0.3), (ExponentialAdams(predictor_order=3, eta=2.5), 2.5),
    (DPMSolverPP2MSDE(1.0), 1.0), (DPMSolverPP3MSDE(0.4), 0.4), (SASolver(1, 0, tau=1.5), 2.25),
    (DPMSolverPP(3), 0.0),
])
def test_first_step_is_the_exact_first_order_sde_step(sde_name, sampler, lam):
    """Without history the step integrates dy = (1 + lam)(D - y) du + sqrt(2 lam) sigma dw with D frozen:
    y' = e^{-c h} y + (1 - e^{-c h}) D + sigma' sqrt(1 - e^{-2 lam h}) z, c = 1 + lam, x = m y."""
    sde = SDES[sde_name]
    x = sde.prior_sample((16, 2), seed=3, **F64) * 0.8
    ts = torch.tensor([0.6, 0.35], **F64) * sde.T
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), **F64)
    got, ctx = _run(sampler, sde, RING, x, ts, ListNoise([z]))
    t, t2 = ts.unbind()
    (m, _, u), (m2, s2, u2) = _ms_u(sde, t), _ms_u(sde, t2)
    h, c = u2 - u, 1.0 + lam
    y2 = math.exp(-c * h) * x / m + (1 - math.exp(-c * h)) * _oracle_denoised(sde, x, t)
    want = m2 * y2 + s2 * math.sqrt(1 - math.exp(-2 * lam * h)) * z
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ctx.noise.taken == (1 if lam else 0) and ctx.nfe == 1


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("sampler,eta", [(DPMSolverPP(2), 0.0), (DPMSolverPP2MSDE(0.0), 0.0),
                                         (DPMSolverPP2MSDE(0.3), 0.3), (DPMSolverPP2MSDE(1.0), 1.0)])
def test_second_step_is_the_2m_midpoint_rule(sde_name, sampler, eta):
    """DPM-Solver++(2M) (Lu et al. 2022b, algorithm 2) and its SDE variant: the second step uses
    D_mid = (1 + 1/(2r)) D_1 - 1/(2r) D_0, r = h_prev / h, in y' = e^{-c h} y + (1 - e^{-c h}) D_mid + noise."""
    sde = SDES[sde_name]
    x0 = sde.prior_sample((16, 2), seed=4, **F64)
    ts = torch.tensor([0.8, 0.5, 0.3], **F64) * sde.T
    gen = torch.Generator().manual_seed(2)
    zs = [torch.randn(16, 2, generator=gen, **F64) for _ in range(2)]
    got, ctx = _run(sampler, sde, RING, x0, ts, ListNoise(zs))
    (m0, s0, u0), (m1, s1, u1), (m2, s2, u2) = (_ms_u(sde, t) for t in ts.unbind())
    c = 1.0 + eta
    h = u1 - u0
    d0 = _oracle_denoised(sde, x0, ts[0])
    x1 = m1 * (math.exp(-c * h) * x0 / m0 + (1 - math.exp(-c * h)) * d0) + s1 * math.sqrt(
        1 - math.exp(-2 * eta * h)) * zs[0]
    h, r = u2 - u1, (u1 - u0) / (u2 - u1)
    d_mid = (1 + 0.5 / r) * _oracle_denoised(sde, x1, ts[1]) - 0.5 / r * d0
    want = m2 * (math.exp(-c * h) * x1 / m1 + (1 - math.exp(-c * h)) * d_mid) + s2 * math.sqrt(
        1 - math.exp(-2 * eta * h)) * (zs[1] if eta else 0.0)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    assert ctx.nfe == 2


# (settings, degree of D in u that the whole run integrates exactly): a corrector with >= 2 values and a predictor
# with >= 2 values make every step exact for linear D (the first step's corrector, the last step's predictor);
# midpoint and lower_order_final rules are exact for constant D only
EXACT = [({"predictor_order": 2, "corrector_order": 2}, 1), ({"predictor_order": 2, "corrector_order": 3}, 1),
         ({"predictor_order": 3, "corrector_order": 4, "eta": 0.5}, 1),
         ({"predictor_order": 4, "corrector_order": 3, "eta": 1.0}, 1),
         ({"predictor_order": 3, "corrector_order": 2, "eta": 2.0, "s_tmax": 3.0}, 1),
         ({"predictor_order": 2, "midpoint": True, "eta": 0.3}, 0),
         ({"predictor_order": 3, "lower_order_final": True}, 0),
         ({"predictor_order": 1, "eta": 1.0}, 0)]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("settings,degree", EXACT)
def test_exact_for_denoisers_polynomial_in_u(sde_name, settings, degree):
    """With D = a + b u (independent of x) and the noise set to zero, the mean dynamics dy = c (D - y) du,
    c = 1 + eta on the noisy steps, have the solution y = a + b (u - 1/c) + C e^{-c u}; the samplers reproduce it
    through 7 steps. Steps outside the sigma window (s_tmax) have c = 1."""
    sde = SDES[sde_name]
    a = torch.tensor([0.4, -1.2], **F64)
    b = torch.tensor([0.3, 0.05], **F64) if degree else torch.zeros(2, **F64)
    x = sde.prior_sample((8, 2), seed=5, **F64)
    ts = sdegen.time_grid(sde, 7, "log_snr")
    sampler = ExponentialAdams(**settings)
    zero = torch.zeros_like(x)
    got, ctx = _run(sampler, sde, LinearInU(sde, a, b), x, ts, ListNoise([zero] * 7))
    assert ctx.nfe == 7
    y = x / float(sde.mean_coeff(ts[0]))
    for t, t2 in zip(ts[:-1].unbind(), ts[1:].unbind()):
        (m, s, u), (_, _, u2) = _ms_u(sde, t), _ms_u(sde, t2)
        c = 1.0 + (settings.get("eta", 0.0) if s / m <= settings.get("s_tmax", math.inf) else 0.0)
        particular = lambda v: a + b * (v - 1.0 / c)
        y = particular(u2) + (y - particular(u)) * math.exp(-c * (u2 - u))
    torch.testing.assert_close(got, float(sde.mean_coeff(ts[-1])) * y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("settings", [{"predictor_order": 3, "corrector_order": 4, "eta": 0.6, "s_tmax": 2.0},
                                      {"predictor_order": 2, "midpoint": True, "lower_order_final": True},
                                      {"predictor_order": 4, "corrector_order": 2, "eta": 0.5, "noise": "ddim"}])
def test_planned_steps_are_the_steps_computed_on_the_fly(settings):
    """start() tabulates every step's coefficients for its grid (kept for the next run on the same grid); steps
    without the table (or off its grid) compute them from the history, and the samples agree bit for bit."""
    sde = SDES["vp"]
    x = sde.prior_sample((8, 2), seed=2, **F64)
    ts = sdegen.time_grid(sde, 9, "log_snr")
    draws = [torch.randn(8, 2, generator=torch.Generator().manual_seed(k), **F64) for k in range(9)]
    sampler = ExponentialAdams(**settings)
    planned, _ = _run(sampler, sde, as_model(RING, sde), x, ts, ListNoise(draws))
    again, _ = _run(sampler, sde, as_model(RING, sde), x, ts, ListNoise(draws))
    ctx = Context(sde, as_model(RING, sde), ListNoise(draws))
    state, y = sampler.start(ctx, x, ts), x
    del state["plan"]
    for t, t_next in zip(ts[:-1].unbind(), ts[1:].unbind()):
        y, state = sampler.step(ctx, y, t, t_next, state)
    assert torch.equal(planned, again) and torch.equal(planned, y)


ALIASES = [
    ("ddim", {"eta": 0.5}, {"predictor_order": 1, "eta": 0.5, "noise": "ddim"}, 1),
    ("dpmpp_2m", {"lower_order_final": True}, {"predictor_order": 2, "midpoint": True, "lower_order_final": True}, 2),
    ("dpmpp_3m", {}, {"predictor_order": 3}, 3),
    ("exp_pc", {"order": 2}, {"predictor_order": 2, "corrector_order": 3}, 3),
    ("dpmpp_2m_sde", {"eta": 0.3}, {"predictor_order": 2, "eta": 0.3, "midpoint": True}, 2),
    ("dpmpp_3m_sde", {"eta": 0.5}, {"predictor_order": 3, "eta": 0.5}, 3),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 3, "tau": 0.7, "s_tmax": 1.0},
     {"predictor_order": 2, "corrector_order": 3, "eta": 0.7**2, "s_tmax": 1.0}, 3),
    ("sa_solver", {"predictor_order": 3, "corrector_order": 2, "tau": 0.0},
     {"predictor_order": 3, "corrector_order": 2}, 2),
]


@pytest.mark.parametrize("name,opts,settings,order", ALIASES)
def test_named_samplers_are_settings_of_the_general_class(name, opts, settings, order):
    """Each registry name gives the same samples (bit for bit, same seed) as ExponentialAdams with the
    corresponding settings, declares that global order and costs one NFE per step."""
    sde = SDES["vp"]
    x_T = sde.prior_sample((8, 2), seed=6, **F64)
    named = get_sampler(name, **opts)
    general = ExponentialAdams(**settings)
    a, info = sdegen.sample(sde, RING, x_T, method=named, steps=9, seed=3, return_info=True)
    b = sdegen.sample(sde, RING, x_T, method=general, steps=9, seed=3, schedule=named.default_schedule)
    assert torch.equal(a, b)
    assert named.order == general.order == order
    assert named.stochastic == general.stochastic == bool(settings.get("eta", 0.0))
    assert info.nfe == 9 == named.total_nfe(9) and named.nfe_per_step == 1


def test_named_samplers_keep_their_attributes():
    assert repr(DDIM(0.5)) == "DDIM(eta=0.5)" and DDIM().default_steps == 50 and DDIM(1).eta == 1.0
    assert repr(DPMSolverPP(3, True)) == "DPMSolverPP(order=3, lower_order_final=True)"
    assert repr(ExponentialPC(2)) == "ExponentialPC(order=2)" and ExponentialPC(2).order == 3
    assert repr(DPMSolverPP2MSDE(0.3)) == "DPMSolverPP2MSDE(eta=0.3)" and DPMSolverPP2MSDE().default_steps == 50
    assert repr(SASolver()) == "SASolver(predictor_order=3, corrector_order=4, tau=1.0, s_tmin=0.0, s_tmax=inf)"
    assert SASolver().order == 4 and SASolver(3, 0).order == 3 and SASolver(2, 1).order == 1
    three = DPMSolverPP3MSDE(0.25)
    assert repr(three) == "DPMSolverPP3MSDE(eta=0.25)" and three.tau == 0.5 and three.eta == 0.25
    assert not DPMSolverPP3MSDE(0.0).stochastic and isinstance(three, SASolver)
    for sampler in (DDIM(), DPMSolverPP(), ExponentialPC(), DPMSolverPP2MSDE(), SASolver(), three):
        assert isinstance(sampler, ExponentialAdams) and sampler.default_schedule == "log_snr"


@pytest.mark.parametrize("settings", [{"predictor_order": 3, "corrector_order": 4, "eta": 1.0},
                                      {"predictor_order": 2, "midpoint": True, "eta": 0.5},
                                      {"predictor_order": 1, "eta": 0.7, "noise": "ddim"}])
def test_outputs_and_inputs_are_not_modified(settings, dtype):
    """Model outputs (kept in the sampler's history) and x_T are never written to; shapes and dtype are kept."""
    sde = SDES["vp"]
    model = Recording(sde)
    x_T = sde.prior_sample((6, 2), seed=0, dtype=dtype)
    x_copy = x_T.clone()
    x = sdegen.sample(sde, model, x_T, method=ExponentialAdams(**settings), steps=6, seed=1)
    assert x.shape == x_T.shape and x.dtype == dtype and torch.isfinite(x).all()
    assert torch.equal(x_T, x_copy) and len(model.outputs) == 6
    assert all(torch.equal(out, copy) for out, copy in model.outputs)


@pytest.mark.parametrize("settings,err,word", [
    ({"predictor_order": 0}, ValueError, "predictor_order"), ({"corrector_order": 5}, ValueError, "corrector_order"),
    ({"eta": -0.1}, ValueError, "eta"), ({"eta": math.inf}, ValueError, "eta"), ({"eta": True}, ValueError, "eta"),
    ({"eta": 1.5, "noise": "ddim"}, ValueError, "eta"), ({"noise": "ode"}, ValueError, "noise"),
    ({"midpoint": 1}, TypeError, "midpoint"), ({"lower_order_final": "yes"}, TypeError, "lower_order_final"),
    ({"s_tmin": -1.0}, ValueError, "s_tmin"), ({"s_tmin": 2.0, "s_tmax": 1.0}, ValueError, "s_tmax"),
])
def test_bad_settings(settings, err, word):
    with pytest.raises(err, match=word):
        ExponentialAdams(**settings)


def test_the_noise_rule_is_reachable_by_name_through_sample():
    """exp_adams' noise rule is an option of sample (noise_rule=), apart from sample's own noise= (the streams):
    the DDIM rule at order 1 is "ddim" bit for bit; the old name noise= still works on the class, with a warning."""
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    a = sdegen.sample(sde, gm, shape=(8, 2), method="exp_adams", steps=5, seed=0, eta=0.5, noise_rule="ddim",
                      predictor_order=1)
    assert torch.equal(a, sdegen.sample(sde, gm, shape=(8, 2), method="ddim", steps=5, seed=0, eta=0.5))
    with pytest.warns(DeprecationWarning, match="noise_rule"):
        old = ExponentialAdams(predictor_order=1, eta=0.5, noise="ddim")
    assert old.noise_rule == "ddim"
    with pytest.raises(ValueError, match="noise_rule"):
        ExponentialAdams(noise_rule="sde", noise="ddim")


@pytest.mark.parametrize("method, options", [("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}), ("sa_solver", {"tau": 0.7}),
                                             ("exp_adams", {"eta": 1.0, "corrector_order": 3})])
def test_a_brownian_tree_gives_one_sample_at_any_step_count_with_the_same_law(method, options):
    """brownian="tree": each step's noise is an increment of one path for the run. One seed at 25, 50, 100 and 200
    steps converges to one sample (median distance between successive step counts falls by at least 1.3x per
    doubling, strong order 1/2 giving 1.41x, and is under 5% of two seeds' distance at 100 vs 200), where fresh
    draws give samples as far apart as two seeds'. The law is that of fresh draws: on N(0, 0.25 I) in 16 dimensions
    at 10 steps the two sample second moments (4000 examples each) agree within 4 Monte Carlo standard deviations
    of their difference (4 sqrt(2) sqrt(2 / 64000) = 3.2%)."""
    sde = sdegen.VPSDE()
    mixture = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
    x_T = sde.prior_sample((128, 2), seed=4, dtype=torch.float64)
    run = lambda steps, seed=1, brownian="tree": sdegen.sample(sde, mixture, x_T, method=method,  # noqa: E731
                                                              steps=steps, seed=seed, brownian=brownian, **options)
    runs = {n: run(n) for n in (25, 50, 100, 200)}
    gaps = [float((runs[n] - runs[2 * n]).norm(dim=1).median()) for n in (25, 50, 100)]
    apart = float((runs[200] - run(200, seed=2)).norm(dim=1).median())
    assert gaps[0] > 1.3 * gaps[1] > 1.69 * gaps[2] and gaps[2] < 0.05 * apart, (gaps, apart)
    assert float((run(100, brownian=None) - run(200, brownian=None)).norm(dim=1).median()) > 0.5 * apart
    gauss = GaussianMixture([1.0], torch.zeros(1, 16, dtype=torch.float64), [0.25])
    second = [float(sdegen.sample(sde, gauss, shape=(4000, 16), method=method, steps=10, seed=seed,
                                  dtype=torch.float64, brownian=brownian, **options).pow(2).mean())
              for seed, brownian in ((5, None), (6, "tree"))]
    assert abs(second[1] / second[0] - 1.0) <= 4.0 * math.sqrt(2.0) * math.sqrt(2.0 / 64000), second


def test_a_brownian_tree_needs_the_sde_noise_rule():
    with pytest.raises(ValueError, match="brownian"):
        ExponentialAdams(eta=0.5, noise_rule="ddim", brownian="tree")
    with pytest.raises(ValueError, match="brownian"):
        get_sampler("dpmpp_2m_sde", brownian="snr")
    assert repr(get_sampler("dpmpp_2m_sde", brownian="tree")) == "DPMSolverPP2MSDE(eta=1.0, brownian='tree')"


def test_a_brownian_tree_reaches_below_the_sdes_t_min_with_the_same_law():
    """A grid ending below sde.t_min (t_min=1e-6 under VPSDE) is covered by the tree too: the law is that of fresh
    draws (second moment on N(0, 0.25 I) in 16 dimensions at 10 steps within the 3.2% of the test above; querying a
    step's end before its start gave 0.42x), and one seed still converges to one sample (gaps fall by at least 1.3x
    per doubling of 50, 100, 200 steps)."""
    sde = sdegen.VPSDE()
    gauss = GaussianMixture([1.0], torch.zeros(1, 16, dtype=torch.float64), [0.25])
    second = [float(sdegen.sample(sde, gauss, shape=(4000, 16), method="dpmpp_2m_sde", steps=10, seed=seed,
                                  t_min=1e-6, dtype=torch.float64, brownian=brownian).pow(2).mean())
              for seed, brownian in ((5, None), (6, "tree"))]
    assert abs(second[1] / second[0] - 1.0) <= 4.0 * math.sqrt(2.0) * math.sqrt(2.0 / 64000), second
    x_T = sde.prior_sample((128, 2), seed=4, dtype=torch.float64)
    runs = {n: sdegen.sample(sde, RING, x_T, method="dpmpp_2m_sde", steps=n, seed=1, t_min=1e-6, brownian="tree")
            for n in (50, 100, 200, 400)}
    gaps = [float((runs[n] - runs[2 * n]).norm(dim=1).median()) for n in (50, 100, 200)]
    assert gaps[0] > 1.3 * gaps[1] > 1.69 * gaps[2], gaps


def test_the_tree_draws_from_its_own_stream_keys():
    """A path on a spawned stream draws that stream's keys (base + node), never the parent stream's draw numbers
    (draw 0 made x_T, draws 1, 2, ... the sampler's own noise)."""
    from sdegen.noise import Noise, OUPath, make_seeds, normal_from_seeds

    seeds = make_seeds(3, 5)
    x = torch.zeros(5, 4, dtype=torch.float64)
    child = Noise(seeds).spawn(1)
    path = OUPath(child, 1.0, -2.0, 2.0)
    torch.testing.assert_close(path.at(-2.0, x), normal_from_seeds(seeds, child.key, (4,), torch.float64),
                               rtol=0, atol=0)
    assert not torch.equal(path.at(-2.0, x), normal_from_seeds(seeds, 0, (4,), torch.float64))
