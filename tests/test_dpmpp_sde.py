"""The stochastic single-step DPM-Solver++(2S) ("dpmpp_sde"): its deterministic order, its marginal variance on
Gaussian data against the closed form, the correlation of its two stages' noise, batch invariance, options."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.samplers import StepSampler

SDE = sdegen.VPSDE()
MIXTURE = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
V = 0.25  # data variance of the Gaussian problem N(0, V I)
D = 16
GAUSS = GaussianMixture([1.0], torch.zeros(1, D, dtype=torch.float64), [V])
N = 4000  # examples: N * D = 64000 independent values (the dimensions decouple for isotropic Gaussian data)


def _variance_ratio(method, steps, seed=0, **options):
    """Sample variance at t_min over the exact marginal variance m^2 V + s^2, and the grid's (m, s)."""
    x, info = sdegen.sample(SDE, GAUSS, shape=(N, D), method=method, steps=steps, seed=seed, dtype=torch.float64,
                            return_info=True, **options)
    t = info.times[-1]
    exact = float(SDE.mean_coeff(t)) ** 2 * V + float(SDE.std(t)) ** 2
    return float(x.pow(2).mean()) / exact, info.times


# relative standard deviation of the mean of N * D squares of centred normals: sqrt(2 / (N D)) = 0.56%
MC_SD = math.sqrt(2.0 / (N * D))


def test_deterministic_part_is_second_order():
    """eta = 0: least-squares slope of log RMS endpoint error against log steps (40, 80, 160, log-SNR grid) against
    a torchdiffeq solve of the probability-flow ODE (rtol = atol = 1e-11) is 2 within 0.3."""
    sampler = sdegen.get_sampler("dpmpp_sde", eta=0.0)
    assert not sampler.stochastic and sampler.order == 2 and sampler.nfe_per_step == 2
    x_T = SDE.prior_sample((8, 2), seed=3, dtype=torch.float64)
    ref = sdegen.sample(SDE, MIXTURE, x_T, method="ode", rtol=1e-11, atol=1e-11)
    log_n, log_err = [], []
    for steps in (40, 80, 160):
        x, info = sdegen.sample(SDE, MIXTURE, x_T, method=sampler, steps=steps, return_info=True)
        assert info.nfe == 2 * steps
        log_n.append(math.log(steps))
        log_err.append(math.log(float((x - ref).pow(2).sum(1).mean().sqrt())))
    n, e = torch.tensor(log_n), torch.tensor(log_err)
    slope = -float(((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())
    assert abs(slope - 2.0) <= 0.3, (slope, [math.exp(v) for v in log_err])


def test_sde_variance_is_the_exact_marginal_and_beats_ddim():
    """eta = 1, 100 steps (NFE 200) on N(0, V I): the sample second moment equals m^2 V + s^2 at t_min within 4 Monte
    Carlo standard deviations (2.2%; the closed-form discretisation bias at 100 steps is 0.4%, second order in the
    step); DDIM with eta = 1 at the same NFE (200 steps) under-disperses by more (first order: about 4.5%)."""
    ratio, _ = _variance_ratio("dpmpp_sde", 100)
    assert abs(ratio - 1.0) <= 4.0 * MC_SD, ratio
    ddim, _ = _variance_ratio("ddim", 200, eta=1.0)
    assert abs(ratio - 1.0) < abs(ddim - 1.0), (ratio, ddim)
    assert ddim < 1.0 - 4.0 * MC_SD, ddim


def _recursion(times, brownian):
    """Variance ratio after the documented steps on 1-D N(0, V) data, computed in closed form: D(y) = k y with
    k = V / (V + sigma^2) in y = x/m, so each stage is linear in y and in its Gaussian noise, and the two stages'
    noises have the documented variances and correlation rho."""
    log_m, s = SDE.log_mean_coeff(times), SDE.std(times)
    us = (log_m - torch.log(s)).tolist()
    k = lambda u: V / (V + math.exp(-2.0 * u))  # noqa: E731
    var = V + math.exp(-2.0 * us[0])
    for u, u2 in zip(us[:-1], us[1:]):
        h = u2 - u
        a1 = math.exp(-h) + (1.0 - math.exp(-h)) * k(u)  # stage at h/2: e^{-2 (h/2)} y + (1 - e^{-2 (h/2)}) k y
        n1 = math.exp(-2.0 * (u + h / 2)) * (1.0 - math.exp(-h))
        n2 = math.exp(-2.0 * u2) * (1.0 - math.exp(-2.0 * h))
        if brownian == "snr":
            rho = math.sqrt(math.expm1(h) / math.expm1(2.0 * h))
        else:
            rho = math.sqrt(math.expm1(-h / 2) / math.expm1(-h))
        b = (1.0 - math.exp(-2.0 * h)) * k(u + h / 2)
        a = math.exp(-2.0 * h) + b * a1
        var = a * a * var + b * b * n1 + n2 + 2.0 * b * rho * math.sqrt(n1 * n2)
    return var / (V + math.exp(-2.0 * us[-1]))


@pytest.mark.parametrize("brownian", ["snr", "sigma", "tree"])
def test_stage_noises_have_the_documented_correlation(brownian):
    """At 10 steps the variance is far from the truth and depends on the correlation of the two stages' noise
    (0.75 with the exact rho, 0.84 with the sigma clock, 0.56 with independent noise): the sample second moment
    equals the closed-form recursion within 4 Monte Carlo standard deviations (2.2%). The tree's path has the
    exact correlation's law."""
    ratio, times = _variance_ratio("dpmpp_sde", 10, seed=7, brownian=brownian)
    expected = _recursion(times.double(), "sigma" if brownian == "sigma" else "snr")
    assert abs(ratio / expected - 1.0) <= 4.0 * MC_SD, (ratio, expected)


def test_registered_with_its_declared_properties_and_batch_invariant():
    assert sdegen.SAMPLERS["dpmpp_sde"] is sdegen.samplers.stochastic.DPMSolverPPSDE
    sampler = sdegen.get_sampler("dpmpp_sde")
    assert isinstance(sampler, StepSampler) and sampler.stochastic and sampler.order == 2
    assert sampler.nfe_per_step == 2 and sampler.total_nfe(7) == 14 and sampler.eta == 1.0
    seeds = torch.tensor([11, 12, 13, 14, 15])
    five = sdegen.sample(SDE, MIXTURE, shape=(5, 2), method="dpmpp_sde", steps=6, seed=seeds, dtype=torch.float64)
    two = sdegen.sample(SDE, MIXTURE, shape=(2, 2), method="dpmpp_sde", steps=6, seed=seeds[[1, 3]],
                        dtype=torch.float64)
    torch.testing.assert_close(two, five[[1, 3]], rtol=1e-12, atol=1e-12)
    # s_noise scales the injected noise and nothing else: with D constant in x (a point mass) the step is linear
    point = GaussianMixture([1.0], [[0.3, -0.1]], [1e-12])
    x_T = SDE.prior_sample((4, 2), seed=2, dtype=torch.float64)
    run = lambda s_noise: sdegen.sample(SDE, point, x_T, method="dpmpp_sde", s_noise=s_noise,  # noqa: E731
                                        steps=3, seed=5)
    torch.testing.assert_close(run(0.5) - run(0.0), 0.5 * (run(1.0) - run(0.0)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_the_tree_path_is_the_ou_process_at_any_times(lam):
    """OUPath queried in increasing order at irregular times (two inside one leaf of its tree, the tree's ends, times
    beyond both ends): over 20000 examples the sample covariance is e^{-lam |u - v|} within 5 Monte Carlo standard
    deviations of a correlation (5 / sqrt(20000) = 0.035), means within the same bound of 0."""
    from sdegen.noise import Noise, make_seeds
    from sdegen.noise import OUPath

    batch = 20000
    path = OUPath(Noise(make_seeds(3, batch)), lam, -5.0, 5.0)
    us = [-7.0, -5.0, -4.3, -0.123, 0.0, 0.0001, 0.0003, 1.7, 4.99, 5.0, 5.3, 6.0]
    x = torch.zeros(batch, 1, dtype=torch.float64)
    z = torch.cat([path.at(u, x) for u in us], 1)
    cov = z.T @ z / batch
    want = torch.tensor([[math.exp(-lam * abs(a - b)) for b in us] for a in us], dtype=torch.float64)
    tol = 5.0 / math.sqrt(batch)
    assert float((cov - want).abs().max()) <= tol and float(z.mean(0).abs().max()) <= tol


def test_the_tree_gives_one_sample_at_any_step_count():
    """brownian="tree": one seed at 25, 50, 100 and 200 steps converges to one sample (the median distance between
    successive step counts falls by at least 1.3x per doubling, strong order 1/2 giving 1.41x, and is below 5% of
    the distance between two seeds at 100 vs 200), where the per-step draws of "snr" give samples as far apart as two seeds'. Examples stay
    batch-invariant, and the generator stream gives the path too."""
    x_T = SDE.prior_sample((128, 2), seed=4, dtype=torch.float64)
    run = lambda steps, seed=1, **kw: sdegen.sample(SDE, MIXTURE, x_T, method="dpmpp_sde", steps=steps,  # noqa
                                                    seed=seed, brownian=kw.pop("brownian", "tree"), **kw)
    runs = {n: run(n) for n in (25, 50, 100, 200)}
    gaps = [float((runs[n] - runs[2 * n]).norm(dim=1).median()) for n in (25, 50, 100)]
    seeds_apart = float((runs[200] - run(200, seed=2)).norm(dim=1).median())
    assert gaps[0] > 1.3 * gaps[1] > 1.69 * gaps[2] and gaps[2] < 0.05 * seeds_apart, (gaps, seeds_apart)
    snr_gap = float((run(100, brownian="snr") - run(200, brownian="snr")).norm(dim=1).median())
    assert snr_gap > 0.5 * seeds_apart
    seeds = torch.tensor([21, 22, 23, 24])
    four = sdegen.sample(SDE, MIXTURE, x_T[:4], method="dpmpp_sde", steps=8, seed=seeds, brownian="tree")
    two = sdegen.sample(SDE, MIXTURE, x_T[[1, 3]], method="dpmpp_sde", steps=8, seed=seeds[[1, 3]], brownian="tree")
    torch.testing.assert_close(two, four[[1, 3]], rtol=1e-12, atol=1e-12)
    gen = [float((run(n, noise="generator") - run(2 * n, noise="generator")).norm(dim=1).median()) for n in (50, 100)]
    assert gen[1] < 0.05 * seeds_apart and gen[0] > 1.3 * gen[1]


@pytest.mark.parametrize("kw", [dict(eta=-0.1), dict(eta=math.inf), dict(s_noise=-1.0), dict(r=0.0), dict(r=1.5),
                                dict(eta="1"), dict(brownian="time")])
def test_bad_options(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        sdegen.get_sampler("dpmpp_sde", **kw)
