"""Probability-flow log-likelihoods against the Gaussian-mixture oracle, whose log p_0 is exact."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.backends import AugmentedNorm
from sdegen.likelihood import bits_per_dim, dequantize, log_likelihood

SDES = {"ve": lambda: sdegen.VESDE(sigma_min=0.01, sigma_max=50.0),
        "vp": lambda: sdegen.VPSDE(),
        "subvp": lambda: sdegen.SubVPSDE()}
PROBLEMS = {"ring2d": lambda: GaussianMixture.ring(), "mix16d": lambda: GaussianMixture.random(dim=16, seed=0)}
T_MIN = 1e-6  # log p_{t_min} -> log p_0 as t_min -> 0; at 1e-6 the gap is < 1e-4 nats/dim on these problems


def _exact_prior(gm, sde):
    return gm.marginal(sde.T, sde).log_prob


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_exact_divergence_matches_the_oracle(sde_name, problem):
    sde, gm = SDES[sde_name](), PROBLEMS[problem]()
    x = gm.sample(6, seed=5)
    r = log_likelihood(sde, gm, x, divergence="exact", rtol=1e-6, atol=1e-6, t_min=T_MIN,
                       prior=_exact_prior(gm, sde))
    err = (r.log_prob - gm.log_prob(x)).abs() / gm.dim
    assert float(err.max()) <= 1e-3, err
    # bits/dim is the same number in other units
    torch.testing.assert_close(r.bpd, -r.log_prob / (gm.dim * math.log(2)))
    torch.testing.assert_close(r.log_prob, r.prior_log_prob + r.delta_log_prob)
    assert r.nfe > 0 and r.steps > 0 and r.latent.shape == x.shape


def test_latent_flows_back_to_the_data():
    # the core sampler's ODE, started at the latent, returns to x: an independent check of x_T
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(5, seed=2)
    r = log_likelihood(sde, gm, x, divergence="exact", rtol=1e-7, atol=1e-7, t_min=1e-3)
    back = sdegen.sample(sde, gm, r.latent, method="ode", t_min=1e-3, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased(noise):
    # 300 copies of one point, each with its own probes fixed along its solve: their mean is within
    # 3 standard errors of the exact-divergence result
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=3, seed=1)
    x = gm.sample(1, seed=0).expand(300, 4)
    prior = _exact_prior(gm, sde)
    exact = log_likelihood(sde, gm, x[:1], divergence="exact", rtol=1e-6, atol=1e-6, t_min=1e-4, prior=prior)
    est = log_likelihood(sde, gm, x, divergence="hutchinson", noise=noise, probes=2, seed=9, rtol=1e-6, atol=1e-6,
                         t_min=1e-4, prior=prior)
    se = est.log_prob.std() / math.sqrt(x.shape[0])
    assert float(est.log_prob.std()) > 1e-3  # the estimates genuinely vary
    assert abs(float(est.log_prob.mean() - exact.log_prob[0])) <= 3 * float(se)


def test_prior_mismatch_equals_the_log_ratio_and_its_mean_the_kl():
    # A VP SDE that stops short of the standard normal (m(T)^2 = e^{-2.05} = 0.13). With the SDE's own prior
    # pi = N(0, I) instead of the exact p_T, example i's error is log pi(x_T) - log p_T(x_T) at its latent, and
    # over x ~ p_0 (so x_T ~ p_T) its mean is -KL(p_T || pi), which we compute by Monte Carlo from p_T directly.
    sde, gm = sdegen.VPSDE(beta_min=0.1, beta_max=4.0), GaussianMixture.ring()
    pT = gm.marginal(sde.T, sde)
    x = gm.sample(96, seed=4)
    r = log_likelihood(sde, gm, x, divergence="exact", rtol=1e-6, atol=1e-6, t_min=T_MIN)
    err = r.log_prob - gm.log_prob(x)
    log_ratio = sde.prior_log_prob(r.latent) - pT.log_prob(r.latent)
    assert float(log_ratio.abs().mean()) > 0.05  # the mismatch is large enough to see
    torch.testing.assert_close(err, log_ratio, atol=2e-3, rtol=0)
    z = pT.sample(200_000, seed=8)
    mc = sde.prior_log_prob(z) - pT.log_prob(z)  # E = -KL(p_T || pi)
    se = math.sqrt(float(err.var()) / err.numel() + float(mc.var()) / mc.numel())
    assert abs(float(err.mean() - mc.mean())) <= 3 * se


def test_adjoint_gradients_match_the_closed_form():
    # data N(0, c^2 I): the exact score under VP is -x / (m^2 c^2 + s^2), and log p_0 = log N(x; 0, c^2 I), so
    # d/dc log p = -D/c + |x|^2/c^3 and d/dx log p = -x/c^2
    sde = sdegen.VPSDE()

    class GaussScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def var(self, t):
            return torch.exp(2 * sde.log_mean_coeff(t)) * self.c**2 + sde.std(t) ** 2

        def forward(self, x, t):
            return -x / self.var(t.to(torch.float64))[:, None]

        def prior(self, z):
            v = self.var(torch.tensor(sde.T, dtype=torch.float64))
            return -0.5 * (z**2).sum(1) / v - 0.5 * z.shape[1] * torch.log(2 * math.pi * v)

    model = GaussScore()
    x = torch.tensor([[0.3, -1.1, 0.5], [1.2, 0.1, -0.4]], dtype=torch.float64, requires_grad=True)
    r = log_likelihood(sde, model, x, divergence="exact", rtol=1e-7, atol=1e-7, t_min=1e-6, prior=model.prior,
                       adjoint=True)
    gc, gx = torch.autograd.grad(r.log_prob.sum(), (model.c, x))
    c = 0.7
    torch.testing.assert_close(gc, (-3 / c + (x.detach() ** 2).sum(1) / c**3).sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(gx, -x.detach() / c**2, rtol=1e-4, atol=1e-6)


class _EpsNet(torch.nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(3, 16, generator=generator, dtype=torch.float64) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(16, 2, generator=generator, dtype=torch.float64) / 4)

    def forward(self, x, t):
        return torch.tanh(torch.cat([x, t[:, None]], 1) @ self.w1) @ self.w2


def test_adjoint_reaches_the_parameters_of_a_score_model(generator):
    # a small eps-network inside sdegen.ScoreModel: the adjoint gradient of the mean log-likelihood with respect
    # to one weight matches a central finite difference of two tight solves
    sde = sdegen.VPSDE()
    net = _EpsNet(generator)
    model = sdegen.ScoreModel(net, sde, prediction="eps")
    x = GaussianMixture.ring().sample(3, seed=0)
    r = log_likelihood(sde, model, x, divergence="exact", adjoint=True, t_min=1e-2, rtol=1e-6, atol=1e-6)
    r.log_prob.mean().backward()
    eps = 1e-5
    with torch.no_grad():
        net.w1[2, 5] += eps
        up = log_likelihood(sde, model, x, divergence="exact", t_min=1e-2, rtol=1e-8, atol=1e-8).log_prob.mean()
        net.w1[2, 5] -= 2 * eps
        down = log_likelihood(sde, model, x, divergence="exact", t_min=1e-2, rtol=1e-8, atol=1e-8).log_prob.mean()
        net.w1[2, 5] += eps
    fd = float(up - down) / (2 * eps)
    assert abs(fd) > 1e-3  # the weight matters
    assert abs(float(net.w1.grad[2, 5]) - fd) <= 1e-3 * max(1.0, abs(fd))


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_any_rank_dtype_and_callers_tensor_untouched(divergence, dtype, device):
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=2, seed=3)
    flat = gm.sample(3, seed=1, dtype=dtype, device=device)
    x = flat.reshape(3, 1, 2, 2).clone().requires_grad_(True)
    before = x.detach().clone()
    r = log_likelihood(sde, gm, x, divergence=divergence, seed=0, t_min=1e-4)
    r_flat = log_likelihood(sde, gm, flat, divergence=divergence, seed=0, t_min=1e-4)
    assert r.log_prob.dtype == dtype and r.log_prob.device == x.device and r.latent.shape == x.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(r.log_prob, r_flat.log_prob, atol=tol, rtol=tol)
    assert torch.equal(x.detach(), before) and x.requires_grad and x.grad is None and x.is_leaf
    assert not r.log_prob.requires_grad  # no gradient without adjoint=True
    assert not flat.requires_grad


def test_fixed_grid_methods_converge():
    # rk4 on a fixed grid: the error against the adaptive exact-divergence result falls with the step count
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=3, n_components=2, seed=4, cov_scale=0.5)
    x = gm.sample(4, seed=3)
    ref = log_likelihood(sde, gm, x, divergence="exact", rtol=1e-8, atol=1e-8, t_min=1e-3)
    errs = []
    for n in (10, 40):
        r = log_likelihood(sde, gm, x, divergence="exact", method="rk4", steps=n, t_min=1e-3)
        assert r.steps == n and r.nfe == 4 * n
        errs.append(float((r.log_prob - ref.log_prob).abs().max()))
    assert errs[1] < errs[0] / 20  # fourth order: a 4x finer grid cuts the error by ~256; ask for 20
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(sde, gm, x, method="rk4", steps=0)


def test_per_example_error_norm():
    # one example with a large error ratio decides the step, not the batch average; per example the norm is the
    # RMS over the D + 1 augmented components (the log term is one of them)
    ratio = torch.full((100, 5), 0.1)
    ratio[37, 2] = 30.0
    norm = AugmentedNorm()
    assert float(norm(ratio)) == pytest.approx(math.sqrt((30.0**2 + 4 * 0.1**2) / 5), rel=1e-6)  # example 37 alone
    ratio[:, :4] = 0.1
    ratio[12, 4] = 5.0  # the log-density term is one component of the example's RMS
    assert float(norm(ratio)) == pytest.approx(math.sqrt((5.0**2 + 4 * 0.1**2) / 5), rel=1e-6)
    assert int(norm.last.argmax()) == 12


def test_step_limit_names_the_examples():
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(4, seed=0)
    with pytest.raises(RuntimeError, match=r"max_steps=3.*examples \["):
        log_likelihood(sde, gm, x, divergence="exact", rtol=1e-9, atol=1e-9, max_steps=3, t_min=1e-5)


def test_discrete_data_bits_per_dim():
    K, lo, hi = 17, -1.0, 1.0
    n = torch.tensor([[0, 16, 8], [3, 5, 11]], dtype=torch.float64)
    x = lo + (hi - lo) * n / (K - 1)
    z = dequantize(x, K, data_range=(lo, hi), seed=4)
    cell = torch.floor((z - lo) / (hi - lo) * K)
    assert torch.equal(cell, n)  # each level dequantizes inside its own cell of side (hi - lo)/K
    # a model uniform on [lo, hi]^D gives every one of the K^D cells the same mass: exactly log2 K bits
    uniform_log_p = torch.full((2,), -3 * math.log(hi - lo), dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(uniform_log_p, 3, levels=K, data_range=(lo, hi)),
                               torch.full((2,), math.log2(K), dtype=torch.float64))
    # the familiar offset: 8-bit images in [-1, 1] get +7 bits, in [0, 1] +8 bits
    zero = torch.zeros(1)
    assert float(bits_per_dim(zero, 10, levels=256)) == pytest.approx(7.0)
    assert float(bits_per_dim(zero, 10, levels=256, data_range=(0.0, 1.0))) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="levels"):
        dequantize(x + 0.01, K)
    with pytest.raises(ValueError, match="levels"):
        dequantize(x, 1)


def test_log_likelihood_with_levels_is_the_dequantized_density_plus_offset():
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=3, n_components=2, seed=2)
    K = 17
    x = torch.round((gm.sample(4, seed=1).clamp(-1, 1) + 1) / 2 * (K - 1)) / (K - 1) * 2 - 1
    r = log_likelihood(sde, gm, x, divergence="exact", levels=K, seed=6, t_min=1e-4)
    z = dequantize(x, K, seed=6)
    rz = log_likelihood(sde, gm, z, divergence="exact", t_min=1e-4)
    torch.testing.assert_close(r.bpd, bits_per_dim(rz.log_prob, 3, levels=K))


def test_bad_input():
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(3, seed=0)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(sde, gm, bad)
    with pytest.raises(ValueError, match="shape"):
        log_likelihood(sde, gm, torch.tensor(1.0))
    with pytest.raises(ValueError, match="2 values per example"):
        log_likelihood(sde, gm, torch.zeros(3, 3))
    with pytest.raises(TypeError):
        log_likelihood(sde, gm, torch.zeros(3, 2, dtype=torch.int64))
    for kwargs, match in [({"divergence": "trace"}, "divergence"), ({"probes": 0}, "probes"),
                          ({"noise": "uniform"}, "noise"), ({"rtol": -1.0}, "rtol"), ({"t_min": 2.0}, "t_min"),
                          ({"method": "nope"}, "method"), ({"prior": lambda z: z}, "prior")]:
        with pytest.raises(ValueError, match=match):
            log_likelihood(sde, gm, x, **kwargs)
    with pytest.raises(TypeError, match="autograd"):
        log_likelihood(sde, lambda z, t: torch.zeros_like(z), x, divergence="exact")


@pytest.mark.parametrize("problem", ["ring", "mix4d"])
def test_default_t_min_is_where_the_kernel_is_an_eighth_of_a_bin(problem):
    """The default t_min puts the kernel std sigma(t_min) at 1/1024 (an eighth of an 8-bit bin of [-1, 1]); on
    exact draws its error against the exact log p_0 is a small fraction of the error at the sampling t_min."""
    from sdegen.likelihood import LIKELIHOOD_SIGMA, default_t_min

    sde = sdegen.VPSDE()
    gm = GaussianMixture.ring() if problem == "ring" else GaussianMixture.random(dim=4, n_components=3, seed=5)
    t_default = default_t_min(sde)
    assert float(sde.sigma(t_default)) == pytest.approx(LIKELIHOOD_SIGMA, rel=1e-9) and t_default < sde.t_min
    assert default_t_min(sdegen.SubVPSDE()) == sdegen.SubVPSDE().t_min  # its kernel is narrower already
    x = gm.sample(64, seed=11)
    exact = gm.log_prob(None, x)
    errors = {}
    for t_min in (None, sde.t_min):
        r = log_likelihood(sde, gm, x, divergence="exact", rtol=1e-6, atol=1e-6, t_min=t_min)
        errors[t_min] = float(((r.log_prob - exact) / gm.dim).abs().mean())
    assert r.t_min == sde.t_min
    # the blur's error scales with sigma^2: (1/1024 / 0.0105)^2 ~ 1/100 of the old default's
    assert errors[None] < 0.1 * errors[sde.t_min], errors


@pytest.mark.parametrize("steps", [14, 29, 58])
def test_fixed_grid_takes_exactly_the_steps_asked_for(steps):
    """torchdiffeq's step_size rule, ceil(span / step_size + 1) points, gave steps + 1 steps for these counts (a last
    step of round-off length); the grid is built with exactly ``steps`` equal steps (rk4: 4 evaluations each)."""
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    result = sdegen.log_likelihood(sde, gm, gm.sample(3, seed=0), divergence="exact", solver="rk4", steps=steps)
    _, info = sdegen.sample(sde, gm, shape=(3, 2), method="ode", solver="rk4", steps=steps, seed=0, return_info=True)
    assert (result.steps, result.nfe, info.steps, info.nfe) == (steps, 4 * steps, steps, 4 * steps)


def test_sixteen_bit_levels_in_float32_are_on_the_grid():
    """Levels n / 65535 in [0, 1] rounded to float32 are off the exact grid by up to 2e-3 of a level spacing."""
    n = torch.arange(0, 65536, 97, dtype=torch.float64)
    x = (n / 65535.0).to(torch.float32).reshape(-1, 1)
    z = dequantize(x, 65536, data_range=(0.0, 1.0), seed=0)
    offset = z.double() * 65536.0 - n[:, None]  # u in [0, 1), up to float32's rounding of z
    assert bool(((offset > -0.01) & (offset < 1.01)).all())
    with pytest.raises(ValueError, match="off that grid"):
        dequantize(x + 0.3 / 65535.0, 65536, data_range=(0.0, 1.0), seed=0)


def test_messages_for_the_prior_shape_and_inference_mode():
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    x = gm.sample(8, seed=0)
    with pytest.raises(ValueError, match=r"shape \(B,\) for x_T of shape \(B, \.\.\.\)"):
        log_likelihood(sde, gm, x, divergence="exact", prior=lambda z: torch.zeros(3))
    with torch.inference_mode(), pytest.raises(TypeError, match="inference_mode"):
        log_likelihood(sde, gm, x, divergence="exact")
    with torch.no_grad():  # works: the divergence enables gradients itself
        assert bool(torch.isfinite(log_likelihood(sde, gm, x, divergence="exact").log_prob).all())


@pytest.mark.parametrize("sde_name", ["VPSDE", "VESDE", "EDMSDE", "FlowSDE"])
def test_fixed_grids_converge_on_every_sde(sde_name):
    """Fixed grids take equal steps in log sigma on every SDE: in t itself, EDM's t = sigma put the first of 200
    steps from sigma 0.001 to 0.4 and the likelihood stayed 2.5 nats off. The likelihood and the ODE samples
    converge to the oracle's at RK4's order: an error ratio above 4^3 from 50 to 200 steps (slope >= 3; measured
    3.2-4.5)."""
    sde = getattr(sdegen, sde_name)()
    gm = GaussianMixture.ring()
    x = gm.sample(16, seed=0, dtype=torch.float64)
    prior = gm.marginal(sde, sde.T).log_prob
    errors = []
    for steps in (50, 200):
        r = log_likelihood(sde, gm, x, divergence="exact", solver="rk4", steps=steps, prior=prior)
        exact = gm.log_prob(sde, x, torch.full((16,), r.t_min, dtype=torch.float64))
        errors.append(float((r.log_prob - exact).abs().max()))
    assert errors[1] < 1e-3 and errors[0] > 64 * errors[1], errors
    x_T = sde.prior_sample((16, 2), seed=1, dtype=torch.float64)
    ref = sdegen.sample(sde, gm, x_T, method="ode", rtol=1e-10, atol=1e-10)
    errors = [float((sdegen.sample(sde, gm, x_T, method="ode", solver="rk4", steps=n) - ref).abs().max())
              for n in (50, 200)]
    assert errors[1] < 1e-4 and errors[0] > 64 * errors[1], errors


def test_bits_per_dim_options_are_named():
    lp = torch.tensor([-10.0, -20.0])
    with pytest.raises(ValueError, match="data_range: it is the range of discrete data"):
        bits_per_dim(lp, 4, data_range=(0.0, 1.0))  # forgetting levels=256 cost 8 bits/dim
    torch.testing.assert_close(bits_per_dim(lp, 4, levels=256), bits_per_dim(lp, 4, levels=256,
                                                                            data_range=(-1.0, 1.0)))
    with pytest.raises(TypeError, match="dim"):
        bits_per_dim(lp, True)
    for bad in ((0.0,), (0.0, 1.0, 2.0), "ab"):
        with pytest.raises(ValueError, match="data_range must be"):
            bits_per_dim(lp, 4, levels=256, data_range=bad)
