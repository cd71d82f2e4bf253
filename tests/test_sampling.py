"""Samplers against the exact oracle: convergence to p0, convergence order, agreement with torchdiffeq,
tolerances, reproducibility, batch invariance, shapes, NFE, errors."""

import math

import numpy as np
import pytest
import torch
import torchdiffeq

import sdegen
from sdegen.analytic import GaussianMixture

SDES = {"vp": sdegen.VPSDE(), "subvp": sdegen.SubVPSDE(), "ve": sdegen.VESDE()}
# a 2-D three-component mixture with anisotropic components
GM2 = GaussianMixture([0.5, 0.3, 0.2], [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]],
                      [[0.1, 0.05], [0.05, 0.2], [0.15, 0.15]])


def _isotropic16():
    g = torch.Generator().manual_seed(0)
    return GaussianMixture([0.5, 0.3, 0.2], 1.5 * torch.randn(3, 16, generator=g, dtype=torch.float64),
                           [0.09, 0.09, 0.09])


def _check_matches_p0(gm, x, bias_w=0.01, bias_mean=0.03, bias_cov=0.06):
    """Mixture weights (by responsibility), mean and covariance of samples against p0.

    Tolerance = 4 Monte-Carlo standard errors + a stated allowance for the sampler's discretisation bias.
    """
    n = x.shape[0]
    w = gm.responsibilities(x).mean(0)
    se_w = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert torch.all((w - gm.weights).abs() <= 4 * se_w + bias_w), (w, gm.weights)
    sd = gm.covariance().diagonal().sqrt()
    assert torch.all((x.mean(0) - gm.mean()).abs() <= 4 * sd / math.sqrt(n) + bias_mean), (x.mean(0), gm.mean())
    cov_se = 4 * float(sd.max()) ** 2 * math.sqrt(2 / n)
    assert float((torch.cov(x.T) - gm.covariance()).abs().max()) <= cov_se + bias_cov


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("method,kw", [("euler_maruyama", dict(steps=300)), ("reverse_diffusion", dict(steps=300)),
                                       ("ancestral", dict(steps=300)), ("euler", dict(steps=300)),
                                       ("ode", dict()), ("sde", dict(steps=200))])
def test_samplers_converge_to_p0(sde_name, method, kw):
    x = sdegen.sample(SDES[sde_name], GM2, shape=(3000, 2), method=method, seed=1, denoise=True,
                      dtype=torch.float64, **kw)
    _check_matches_p0(GM2, x)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_predictor_corrector_converges_to_p0(sde_name):
    # the snr step rule assumes norms concentrate, i.e. moderate dimension: use a 16-D mixture
    gm = _isotropic16()
    x = sdegen.sample(SDES[sde_name], gm, shape=(1500, 16), method="pc", steps=200, snr=0.05, seed=2,
                      denoise=True, dtype=torch.float64)
    _check_matches_p0(gm, x, bias_w=0.02, bias_mean=0.08, bias_cov=0.15)


def test_annealed_langevin_converges_under_ve():
    gm = _isotropic16()
    errs = []
    for steps_each in (1, 6):
        x = sdegen.sample(SDES["ve"], gm, shape=(1500, 16), method="annealed_langevin", steps=100,
                          steps_each=steps_each, seed=3, denoise=True, dtype=torch.float64)
        errs.append(float((gm.responsibilities(x).mean(0) - gm.weights).abs().max()))
    # more Langevin steps per level move the weights towards p0 (unadjusted Langevin keeps a small bias)
    assert errs[1] < errs[0] and errs[1] < 0.05, errs


def _reference(sde, x, t_end):
    ode = sde.probability_flow(GM2, t_clamp=(t_end, sde.T))
    ts = torch.tensor([sde.T, t_end], dtype=torch.float64)
    return torchdiffeq.odeint(ode, x, ts, rtol=1e-10, atol=1e-10)[-1]


@pytest.mark.parametrize("sde_name", list(SDES))
def test_euler_on_the_ode_is_first_order(sde_name):
    sde = SDES[sde_name]
    x_T = sde.prior_sample((200, 2), seed=4, dtype=torch.float64)
    ref = _reference(sde, x_T, sde.t_min)
    ns = [25, 50, 100, 200]
    errs = []
    for n in ns:
        x = sdegen.sample(sde, GM2, x_T, method="euler", steps=n)
        # the median per-point error: the few trajectories that switch mode at coarse steps dominate an RMS
        errs.append(float((x - ref).norm(dim=1).median()))
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope + 1.0) < 0.3, (slope, errs)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_adaptive_ode_meets_tolerance_and_agrees_with_reference(sde_name):
    sde = SDES[sde_name]
    x_T = sde.prior_sample((300, 2), seed=5, dtype=torch.float64)
    ref = _reference(sde, x_T, sde.t_min)
    errs = {}
    for tol in (1e-4, 1e-7):
        x, info = sdegen.sample(sde, GM2, x_T, method="ode", rtol=tol, atol=tol, return_info=True)
        errs[tol] = float((x - ref).abs().max())
        assert info.nfe > 0 and info.steps > 0
    # global error within a few orders of the local tolerance, and shrinking with it
    assert errs[1e-7] < 1e-4 and errs[1e-7] < errs[1e-4] / 50, errs
    x = sdegen.sample(sde, GM2, x_T, method="ode", solver="rk4", steps=400)
    assert float((x - ref).abs().max()) < 1e-2


def test_score_never_evaluated_outside_the_interval():
    sde, seen = SDES["vp"], []

    def spy(x, t):
        seen.append(t.detach())
        return GM2.score(x, t, sde)

    for method, kw in (("ode", {}), ("ode", dict(solver="bosh3", rtol=1e-3, atol=1e-3)), ("sde", dict(steps=20)),
                       ("euler_maruyama", dict(steps=20)), ("pc", dict(steps=10))):
        seen.clear()
        sdegen.sample(sde, spy, shape=(64, 2), method=method, t_min=0.01, seed=0, **kw)
        ts = torch.cat([t.reshape(-1) for t in seen])
        assert float(ts.min()) >= 0.01 - 1e-7 and float(ts.max()) <= sde.T + 1e-7, method


@pytest.mark.parametrize("method,kw", [("euler_maruyama", {}), ("ancestral", {}), ("reverse_diffusion", {}),
                                       ("pc", dict(corrector_steps=2)), ("annealed_langevin", dict(steps_each=2)),
                                       ("sde", {}), ("sde", dict(solver="heun")), ("sde", dict(solver="milstein"))])
def test_seed_reproducibility_and_batch_invariance(method, kw):
    sde = SDES["ve"]
    a = sdegen.sample(sde, GM2, shape=(40, 2), method=method, steps=20, seed=7, dtype=torch.float64, **kw)
    b = sdegen.sample(sde, GM2, shape=(40, 2), method=method, steps=20, seed=7, dtype=torch.float64, **kw)
    c = sdegen.sample(sde, GM2, shape=(5, 2), method=method, steps=20, seed=7, dtype=torch.float64, **kw)
    d = sdegen.sample(sde, GM2, shape=(40, 2), method=method, steps=20, seed=8, dtype=torch.float64, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, a[:5], rtol=1e-12, atol=1e-12)  # example i depends only on its seed
    assert (a - d).abs().min() > 0


def test_one_seed_per_example_and_generators():
    sde = SDES["vp"]
    seeds = torch.tensor([11, 12, 13])
    a = sdegen.sample(sde, GM2, shape=(3, 2), method="ancestral", steps=10, seed=seeds)
    b = sdegen.sample(sde, GM2, shape=(1, 2), method="ancestral", steps=10, seed=seeds[1:2])
    torch.testing.assert_close(a[1:2], b, rtol=1e-6, atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(sdegen.sample(sde, GM2, shape=(4, 2), method="ancestral", steps=5, seed=g1),
                               sdegen.sample(sde, GM2, shape=(4, 2), method="ancestral", steps=5, seed=g2))


@pytest.mark.parametrize("shape", [(6,), (6, 3), (6, 2, 2, 3)])
@pytest.mark.parametrize("method", ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "annealed_langevin",
                                    "euler", "ode", "sde"])
def test_shapes_dtypes_devices(shape, method, dtype, device):
    d = int(np.prod(shape[1:]))
    gm = GaussianMixture.random(dim=d, n_components=2, seed=0)
    x_T = torch.randn(shape, dtype=dtype, device=device)
    x_copy = x_T.clone()
    options = {"solver": "rk4"} if method == "ode" else {}  # steps= needs a fixed-grid torchdiffeq solver
    out = sdegen.sample(SDES["vp"], gm, x_T, method=method, steps=4, seed=0, **options)
    assert out.shape == x_T.shape and out.dtype == dtype and out.device == x_T.device
    assert torch.isfinite(out).all()
    torch.testing.assert_close(x_T, x_copy, rtol=0, atol=0)  # the caller's tensor is untouched


def test_nfe_counts_and_info():
    sde = SDES["vp"]
    cases = [("euler_maruyama", {}, 30), ("ancestral", {}, 30), ("pc", dict(corrector_steps=2), 90),
             ("annealed_langevin", dict(steps_each=3), 90), ("euler", {}, 30)]
    for method, kw, nfe in cases:
        _, info = sdegen.sample(sde, GM2, shape=(8, 2), method=method, steps=30, seed=0, return_info=True, **kw)
        assert info.nfe == nfe and info.steps == 30, method
        assert info.nfe == sdegen.get_sampler(method, **kw).total_nfe(30)
    _, info = sdegen.sample(sde, GM2, shape=(8, 2), method="euler", steps=30, denoise=True, return_info=True,
                            return_trajectory=True)
    assert info.nfe == 31 and info.trajectory.shape == (31, 8, 2) and info.wall_time > 0
    torch.testing.assert_close(info.times[[0, -1]], torch.tensor([sde.T, sde.t_min], dtype=torch.float64))


def test_denoise_is_tweedie_at_t_min():
    sde = SDES["vp"]
    x_T = torch.randn(16, 2, dtype=torch.float64)
    x = sdegen.sample(sde, GM2, x_T, method="euler", steps=10)
    xd = sdegen.sample(sde, GM2, x_T, method="euler", steps=10, denoise=True)
    t = sde.t_min
    expected = (x + sde.std(t) ** 2 * GM2.score(x, t, sde)) / sde.mean_coeff(t)
    torch.testing.assert_close(xd, expected)


def test_schedules_produce_valid_grids():
    for sde in SDES.values():
        for schedule in ("uniform", "log_snr", "edm", "quadratic"):
            ts = sdegen.time_grid(sde, 10, schedule)
            assert ts.dtype == torch.float64 and ts.shape == (11,)
            assert ts[0] == sde.T and ts[-1] == sde.t_min and torch.all(ts[1:] < ts[:-1])
        lam = sde.log_snr(sdegen.time_grid(sde, 8, "log_snr"))
        torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(8))
    explicit = torch.tensor([1.0, 0.5, 0.1])
    x = sdegen.sample(SDES["vp"], GM2, shape=(4, 2), method="euler", schedule=explicit, return_info=True)[1]
    assert x.steps == 2


def test_gradients_flow_through_sampling():
    sde = SDES["vp"]
    x_T = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    f = lambda x: sdegen.sample(sde, GM2, x, method="euler", steps=3, t_min=0.3)
    assert torch.autograd.gradcheck(f, (x_T,))
    g = lambda x: sdegen.sample(sde, GM2, x, method="ancestral", steps=3, t_min=0.3, seed=1)
    assert torch.autograd.gradcheck(g, (x_T,))


def test_errors():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="valid methods are: .*ancestral.*euler_maruyama"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="leapfrog")
    with pytest.raises(ValueError, match="steps"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="euler", steps=0)
    with pytest.raises(ValueError, match="x_T or shape"):
        sdegen.sample(sde, GM2, method="euler")
    with pytest.raises(ValueError, match="NaN"):
        sdegen.sample(sde, GM2, torch.full((2, 2), float("nan")), method="euler")
    with pytest.raises(ValueError, match="schedule"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="euler", schedule="cubic")
    with pytest.raises(ValueError, match="t_min"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="euler", t_min=1.5)
    with pytest.raises(ValueError, match="snr"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="pc", snr=-1.0)
    with pytest.raises(TypeError, match="does not take"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="euler", snr=0.1)
    with pytest.raises(ValueError, match="solver"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="ode", solver="rk45")
    with pytest.raises(RuntimeError, match="max_steps"):
        sdegen.sample(sde, GM2, shape=(4, 2), method="ode", rtol=1e-12, atol=1e-12, max_steps=5)


@pytest.mark.parametrize("method", ["ancestral", "sde"])
def test_generator_noise_is_reproducible_and_correct(method):
    sde = SDES["vp"]
    kw = dict(shape=(3000, 2), method=method, steps=200, seed=5, noise="generator", denoise=True, dtype=torch.float64)
    a, b = sdegen.sample(sde, GM2, **kw), sdegen.sample(sde, GM2, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _check_matches_p0(GM2, a)
    with pytest.raises(ValueError, match="noise must be one of"):
        sdegen.sample(sde, GM2, shape=(4, 2), method=method, noise="philox")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch build without CUDA")
def test_a_cuda_device_without_cuda_names_the_parameter():
    with pytest.raises(ValueError, match="device='cuda'"):
        sdegen.sample(sdegen.VPSDE(), sdegen.GaussianMixture.ring(), shape=(2, 2), method="ddim", steps=3, seed=0,
                      device="cuda")


def test_sde_steps_are_exactly_the_steps_asked_for():
    """torchsde's min(t + dt, t1) left a step of round-off length after n steps for about half of all n (the default
    1000 among them): one more step's evaluations. Every n now takes n steps: NFE n for Euler (torchsde's own check
    of the drift at the start shares the first step's evaluation; it cost one more), 10 n for srk."""
    calls = []

    def score(x, t):
        calls.append(float(t[0]))
        return -x

    for steps in (7, 100, 200, 1000):
        calls.clear()
        _, info = sdegen.sample(SDES["vp"], score, shape=(2, 1), method="sde", steps=steps, seed=0, return_info=True)
        assert info.nfe == len(calls) == steps, steps
    calls.clear()
    _, info = sdegen.sample(SDES["vp"], score, shape=(2, 1), method="sde", solver="srk", steps=3, seed=0,
                            return_info=True)
    assert info.nfe == len(calls) == 30


def test_reversible_heun_is_refused_for_the_reverse_sde():
    """Its stability region is the imaginary axis: on the contracting reverse drift the variance came out 0.80 for
    the exact 1.39 (and on dy = -5 y dt + dW, 1e5 for 0.1)."""
    with pytest.raises(ValueError, match="reversible_heun.*does not sample the reverse SDE"):
        sdegen.sample(SDES["vp"], GM2, shape=(4, 2), method="sde", solver="reversible_heun", steps=5, seed=0)


def test_per_example_brownian_increments_inside_one_fine_interval():
    """Var(W(b) - W(a)) = b - a and disjoint increments independent, also for times much closer than the solver's
    step (two query times inside one leaf of the tree shared one normal: variance 0.2-0.4 of b - a, correlation
    0.99). 20000 paths: the variance ratio's standard error is 0.01, the correlation's 0.007."""
    from sdegen.backends import PerExampleBrownian

    B = 20000
    bm = PerExampleBrownian(sdegen.make_seeds(0, B), 0.0, 1.0, (B, 1), torch.float64, "cpu", h=0.01)
    for a, b in ((0.3, 0.31), (0.30001, 0.300011), (0.123456, 0.1234565)):
        assert abs(float(bm(a, b).var()) / (b - a) - 1) < 0.05, (a, b)
    a, h = 0.123456, 2e-7
    d1, d2 = bm(a, a + h), bm(a + h, a + 2 * h)
    assert abs(float(torch.corrcoef(torch.stack([d1[:, 0], d2[:, 0]]))[0, 1])) < 0.035
    with pytest.raises(ValueError, match="t1 must be greater than t0"):
        PerExampleBrownian(sdegen.make_seeds(0, 2), 1.0, 0.0, (2, 1), torch.float64, "cpu")
    with pytest.raises(ValueError, match="seeds must be a"):
        PerExampleBrownian(sdegen.make_seeds(0, 3), 0.0, 1.0, (2, 1), torch.float64, "cpu")
    with pytest.raises(TypeError, match="floating dtype"):
        PerExampleBrownian(sdegen.make_seeds(0, 2), 0.0, 1.0, (2, 1), torch.int64, "cpu")


def test_torchsde_options_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="not options of torchsde's 'euler'"):
        sdegen.sample(SDES["vp"], GM2, shape=(4, 2), method="sde", options={"bogus": 1}, steps=5, seed=0)
    with pytest.raises(ValueError, match="dt_min=5 must be below the span"):
        sdegen.sample(SDES["vp"], GM2, shape=(4, 2), method="sde", adaptive=True, dt_min=5.0, seed=0)


def test_reverse_passes_the_sde_type_to_torchsde():
    import torchsde
    rsde = SDES["vp"].reverse(GM2, sde_type="stratonovich")
    y0 = torch.zeros(3, 2, dtype=torch.float64)
    ys = torchsde.sdeint(rsde, y0, torch.tensor([0.0, 0.5], dtype=torch.float64), method="heun", dt=0.05,
                         bm=torchsde.BrownianInterval(0.0, 0.5, size=(3, 2), dtype=torch.float64, entropy=0))
    assert ys.shape == (2, 3, 2) and bool(torch.isfinite(ys).all())
