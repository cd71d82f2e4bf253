"""Forward SDEs: closed-form kernels against simulation and ODE moments, precision near t = 0, errors."""

import math

import pytest
import torch
import torchdiffeq
import torchsde

import sdegen

ALL_SDES = [sdegen.VPSDE(), sdegen.VPSDE(schedule="cosine"), sdegen.SubVPSDE(), sdegen.VESDE()]
IDS = ["vp", "vp_cosine", "subvp", "ve"]


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_kernel_moments_solve_the_moment_odes(sde):
    # mean m(t) solves dm/dt = f(t) m; variance v(t) = s(t)^2 solves dv/dt = 2 f(t) v + g(t)^2 (linear SDE moments)
    def rhs(t, y):
        m, v = y[0], y[1]
        t = t.clamp(0.0, sde.T)  # adaptive steps probe past the end
        f, g = sde.drift_coeff(t), sde.diffusion(t)
        return torch.stack([f * m, 2 * f * v + g**2])

    ts = torch.tensor([0.0, 0.05, 0.3, 0.7, sde.T], dtype=torch.float64)
    y = torchdiffeq.odeint(rhs, torch.tensor([1.0, 0.0], dtype=torch.float64), ts, rtol=1e-11, atol=1e-13)
    m, s = sde.mean_coeff(ts), sde.std(ts)
    torch.testing.assert_close(y[:, 0], m, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(y[:, 1], s**2, rtol=1e-7, atol=1e-10)


class _Forward(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def f(self, t, y):
        return self.sde.drift(y, t)

    def g(self, t, y):
        return self.sde.diffusion(t).to(y.dtype).expand(y.shape)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_kernel_matches_monte_carlo_simulation_with_torchsde(sde):
    n, x0 = 10000, 0.8
    y0 = torch.full((n, 1), x0, dtype=torch.float64)
    # the cosine schedule's beta reaches ~370 at T, beyond what Euler with dt = 1e-3 resolves: stop it at 0.9
    t_end = min(sde.T, 0.9)
    ts = torch.tensor([0.0, 0.3, 0.7, t_end], dtype=torch.float64)
    bm = torchsde.BrownianInterval(0.0, t_end, size=(n, 1), dtype=torch.float64, entropy=7)
    ys = torchsde.sdeint(_Forward(sde), y0, ts, bm=bm, method="euler", dt=1e-3)[1:, :, 0]
    m, s = sde.mean_coeff(ts[1:]), sde.std(ts[1:])
    # 5 standard errors of the sample mean and sample std, plus the Euler step's O(dt) bias
    mean_tol = 5 * s / math.sqrt(n) + 2e-3 * abs(x0)
    std_tol = 5 * s / math.sqrt(2 * n) + 2e-3 * s
    assert torch.all((ys.mean(1) - m * x0).abs() <= mean_tol), (ys.mean(1), m * x0)
    assert torch.all((ys.std(1) - s).abs() <= std_tol), (ys.std(1), s)


def test_subvp_std_is_one_minus_exp_not_its_square():
    sde = sdegen.SubVPSDE()
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    B = sde.integral_beta(t)
    torch.testing.assert_close(sde.std(t), 1 - torch.exp(-B))
    # and it is not the variance (the two differ visibly at t = 0.1)
    assert (sde.std(t)[0] - (1 - torch.exp(-B[0])) ** 2).abs() > 0.05


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_std_is_accurate_near_zero(sde):
    # leading-order behaviour s(t)^2 ~ g(0)^2 t for VP/VE and s ~ beta_min t for sub-VP, to full relative precision
    t = torch.tensor([1e-12, 1e-10], dtype=torch.float64)
    s = sde.std(t)
    if isinstance(sde, sdegen.SubVPSDE):
        expected = sde.beta(torch.zeros((), dtype=torch.float64)) * t
    else:
        expected = sde.diffusion(torch.zeros((), dtype=torch.float64)) * t.sqrt()
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    assert torch.all(s > 0)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_log_snr_and_sigma_inverses(sde):
    t = torch.linspace(1e-4, sde.T, 37, dtype=torch.float64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-12)
    assert torch.all(sde.log_snr(t)[1:] < sde.log_snr(t)[:-1])


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_transitions_compose_to_the_kernel(sde):
    t1, t2 = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    a1, b1 = sde.transition(0.0, t1)
    a2, b2 = sde.transition(t1, t2)
    torch.testing.assert_close(a1 * a2, sde.mean_coeff(t2))
    torch.testing.assert_close(a2**2 * b1**2 + b2**2, sde.std(t2) ** 2)
    torch.testing.assert_close(b1, sde.std(t1))


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_kernel_score_is_gradient_of_kernel_log_density(sde, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, generator=g, dtype=dtype)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = sde.perturb(x0, t, torch.randn(5, 3, 2, generator=g, dtype=dtype)).requires_grad_(True)
    logp = sde.kernel_log_prob(x, x0, t)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = sde.kernel_score(x.detach(), x0, t)
    assert score.dtype == dtype and score.shape == x0.shape
    torch.testing.assert_close(score, grad, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (7, 3), (7, 2, 4, 4), (7, 5, 6)])
def test_any_shape_and_any_time_form(shape, dtype, device):
    sde = sdegen.VPSDE()
    x = torch.randn(shape, dtype=dtype, device=device)
    for t in (0.3, torch.tensor(0.3), torch.full((7,), 0.3, device=device)):
        f = sde.drift(x, t)
        assert f.shape == x.shape and f.dtype == dtype and f.device == x.device
        torch.testing.assert_close(f, -0.5 * float(sde.beta(0.3)) * x)
    mean, std = sde.marginal_prob(x, torch.full((7,), 0.5))
    assert mean.shape == x.shape and std.shape == (7,)


def test_prior_sampling_and_log_density():
    for sde in (sdegen.VPSDE(), sdegen.VESDE()):
        x = sde.prior_sample((20000, 3), seed=0, dtype=torch.float64)
        assert abs(float(x.std()) / sde.prior_std - 1) < 0.02
        lp = sde.prior_log_prob(x[:4])
        expected = torch.distributions.Normal(0.0, sde.prior_std).log_prob(x[:4]).sum(1)
        torch.testing.assert_close(lp, expected)
    a = sdegen.VPSDE().prior_sample((3, 2), seed=5)
    b = sdegen.VPSDE().prior_sample((10, 2), seed=5)
    torch.testing.assert_close(a, b[:3])  # example i does not depend on the batch size


def test_discretize_is_ddpm_for_vp_and_smld_for_ve():
    x = torch.randn(4, 2, dtype=torch.float64)
    vp = sdegen.VPSDE()
    t, tn = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.49, dtype=torch.float64)
    F, G = vp.discretize(x, t, tn)
    beta_i = 1 - torch.exp(-(vp.integral_beta(t) - vp.integral_beta(tn)))
    torch.testing.assert_close(F, (torch.sqrt(1 - beta_i) - 1) * x)
    torch.testing.assert_close(G, beta_i.sqrt())
    ve = sdegen.VESDE()
    F, G = ve.discretize(x, t, tn)
    torch.testing.assert_close(F, torch.zeros_like(x))
    torch.testing.assert_close(G**2, ve.std(t) ** 2 - ve.std(tn) ** 2)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="beta_max"):
        sdegen.VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        sdegen.VESDE(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        sdegen.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="t_min"):
        sdegen.VPSDE(t_min=2.0)
    with pytest.raises(ValueError, match="schedule"):
        sdegen.VPSDE(schedule="quadratic")
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sde.std(1.5)
    with pytest.raises(ValueError, match=r"t must lie"):
        sde.std(float("nan"))
    with pytest.raises(ValueError, match="batch size"):
        sde.drift(torch.zeros(4, 2), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="noise"):
        sde.perturb(torch.zeros(4, 2), 0.5, torch.zeros(4, 3))


def test_reverse_and_probability_flow_run_in_torchsde_and_torchdiffeq():
    # the reverse-time objects plug into the solvers as they are; the pf-ODE from a Gaussian is exact:
    # for p_0 = N(0, c^2 I) under VP, x_t / std_t(p) is conserved along the flow
    sde, c = sdegen.VPSDE(), 0.5
    gm = sdegen.GaussianMixture([1.0], [[0.0, 0.0]], [c**2])
    ode = sde.probability_flow(gm)
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    ts = torch.tensor([1.0, 0.2], dtype=torch.float64)
    out = torchdiffeq.odeint(ode, x1, ts, rtol=1e-10, atol=1e-10)[-1]
    sd = lambda t: torch.sqrt(sde.mean_coeff(t) ** 2 * c**2 + sde.std(t) ** 2)
    torch.testing.assert_close(out, x1 * sd(ts[1]) / sd(ts[0]), rtol=1e-7, atol=1e-9)
    rsde = sde.reverse(gm, event_shape=(2,))
    taus = rsde.solver_time(ts)
    y = torchsde.sdeint(rsde, x1.repeat(3, 1), taus, dt=1e-2)
    assert y.shape == (2, 3, 2) and torch.isfinite(y).all()


def test_prior_sample_generator_is_a_deprecated_name_of_seed():
    """prior_sample(generator=g) draws what seed=g draws, with a DeprecationWarning that points at the caller;
    given both, neither silently wins: ValueError naming both."""
    sde = sdegen.VPSDE()
    new = sde.prior_sample((5, 2), seed=torch.Generator().manual_seed(3))
    assert not torch.equal(new, sde.prior_sample((5, 2), seed=torch.Generator().manual_seed(4)))
    with pytest.warns(DeprecationWarning, match=r"SDE.prior_sample: generator= is deprecated.*use seed=") as record:
        old = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(old, new) and record[0].filename == __file__
    with pytest.warns(DeprecationWarning):
        assert torch.equal(sde.prior_sample((5, 2), generator=7), sde.prior_sample((5, 2), seed=7))
    with pytest.raises(ValueError, match="got both seed= and its deprecated name generator="):
        sde.prior_sample((5, 2), seed=123, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="seed must be an int, a"):
        sde.prior_sample((5, 2), seed=0.5)
