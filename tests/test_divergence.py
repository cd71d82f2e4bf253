"""Exact and Hutchinson divergences against full Jacobians, and the estimator's mean and variance."""

import math

import pytest
import torch

from sdegen.divergence import divergence_exact, divergence_hutchinson, hutchinson_variance, make_probes


def _weights(D, dtype):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    M = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    return W.to(dtype), M.to(dtype)


def _field(shape, dtype):
    """A nonlinear field with a non-symmetric Jacobian; example i depends only on x[i]."""
    D = math.prod(shape[1:]) if len(shape) > 1 else 1
    W, M = _weights(D, dtype)

    def f(x):
        z = x.reshape(x.shape[0], -1)
        return (torch.tanh(z @ W.to(z.device)) @ M.to(z.device) + 0.3 * z**2).reshape(x.shape)
    return f


def _jacobians(f, x):
    """Per-example Jacobians (B, D, D) by autograd, one example at a time (the reference)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach()
        J = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), xi).reshape(xi.numel(), xi.numel())
        out.append(J)
    return torch.stack(out).detach()


@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 2, 2, 3)])
def test_exact_divergence_is_the_jacobian_trace(shape, dtype, device, generator):
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    x_before = x.clone()
    f = _field(shape, dtype)
    fx, div = divergence_exact(f, x)
    ref = torch.diagonal(_jacobians(f, x), dim1=-2, dim2=-1).sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert div.shape == (shape[0],) and div.dtype == dtype and div.device == x.device
    torch.testing.assert_close(div, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(fx, f(x))
    for chunk in (1, 5):  # chunked over basis vectors: the same sum
        torch.testing.assert_close(divergence_exact(f, x, chunk_size=chunk)[1], div, atol=tol, rtol=tol)
    assert torch.equal(x, x_before) and not x.requires_grad


def test_hutchinson_with_all_basis_probes_is_exact(generator):
    # v = e_j for j = 1..D, averaged and scaled by D, gives tr J exactly
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    f = _field(x.shape, x.dtype)
    basis = torch.eye(4, dtype=x.dtype)[:, None, :].expand(4, 6, 4)
    _, est = divergence_hutchinson(f, x, basis)
    torch.testing.assert_close(4 * est, divergence_exact(f, x)[1])


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_mean_and_variance(noise):
    # N copies of one point, each with its own probes: N independent estimates of the same trace
    D, N = 6, 4000
    x0 = torch.linspace(-1.0, 1.2, D, dtype=torch.float64)
    x = x0.expand(N, D)
    f = _field(x.shape, x.dtype)
    J = _jacobians(f, x[:1])
    exact = torch.diagonal(J, dim1=-2, dim2=-1).sum()
    var_theory = hutchinson_variance(J, noise)[0]
    assert float(var_theory) > 0.1  # the test has power: the estimator is genuinely noisy here
    for K in (1, 4, 16):
        probes = make_probes(x.shape, K, noise, seed=K, dtype=x.dtype)
        _, est = divergence_hutchinson(f, x, probes, create_graph=False)
        se_mean = est.std() / math.sqrt(N)
        assert abs(float(est.mean() - exact)) <= 3 * float(se_mean)
        # the sample variance against the closed form 2||(J+J^T)/2||_F^2 (- 2 sum diag^2) / K, within 3 of its
        # standard errors estimated from the sample fourth central moment
        c = est - est.mean()
        var, m4 = c.pow(2).mean(), c.pow(4).mean()
        se_var = torch.sqrt((m4 - var**2) / N)
        assert abs(float(var - var_theory / K)) <= 3 * float(se_var), (K, float(var), float(var_theory / K))


def test_rademacher_beats_gaussian_for_a_diagonal_jacobian(generator):
    # a diagonal Jacobian: Rademacher probes are exact (variance 0), Gaussian ones are not
    x = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    f = lambda z: torch.sin(z)  # noqa: E731
    exact = torch.cos(x).sum(1)
    with torch.no_grad():
        _, est_r = divergence_hutchinson(f, x, make_probes(x.shape, 1, "rademacher", seed=0, dtype=x.dtype))
        _, est_g = divergence_hutchinson(f, x, make_probes(x.shape, 1, "gaussian", seed=0, dtype=x.dtype))
    torch.testing.assert_close(est_r, exact)
    assert float((est_g - exact).abs().max()) > 1e-2


def test_probes_are_per_example_and_distributed_right():
    v = make_probes((4000, 5), 3, "rademacher", seed=11, dtype=torch.float64)
    assert v.shape == (3, 4000, 5) and set(v.unique().tolist()) == {-1.0, 1.0}
    g = make_probes((4000, 5), 2, "gaussian", seed=11, dtype=torch.float64)
    # mean 0 and variance 1 within 4 standard errors (40000 draws)
    assert abs(float(g.mean())) < 4 / math.sqrt(g.numel())
    assert abs(float(g.var()) - 1.0) < 4 * math.sqrt(2 / g.numel())
    # example i's probes depend only on (seed, i): a sub-batch reproduces them
    torch.testing.assert_close(make_probes((7, 5), 3, "gaussian", seed=11, dtype=torch.float64),
                               make_probes((4000, 5), 3, "gaussian", seed=11, dtype=torch.float64)[:, :7])
    assert not torch.equal(v[0], v[1])  # the K probes differ


def test_divergence_is_differentiable_with_create_graph():
    f = _field((3, 3), torch.float64)

    def div_of(x):
        return divergence_exact(f, x, create_graph=True)[1]

    def hutch_of(x):
        probes = make_probes(x.shape, 2, "gaussian", seed=3, dtype=x.dtype)
        return divergence_hutchinson(f, x, probes, create_graph=True)[1]

    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(div_of, (x,))
    assert torch.autograd.gradcheck(hutch_of, (x,))


def test_no_graph_is_kept_by_default_under_no_grad(generator):
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        fx, div = divergence_exact(_field(x.shape, x.dtype), x)
    assert not fx.requires_grad and not div.requires_grad


def test_errors():
    x = torch.randn(4, 3, dtype=torch.float64)
    f = _field(x.shape, x.dtype)
    with pytest.raises(ValueError, match="shape"):
        divergence_exact(lambda z: z.sum(1), x)
    with pytest.raises(TypeError, match="autograd"):
        divergence_exact(lambda z: z.detach() * 2, x)
    with pytest.raises(ValueError, match="probes"):
        divergence_hutchinson(f, x, torch.ones(4, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        divergence_exact(f, x, chunk_size=0)
    with pytest.raises(ValueError, match="probes"):
        make_probes(x.shape, 0)
    with pytest.raises(ValueError, match="noise"):
        make_probes(x.shape, 1, "uniform")
    with pytest.raises(ValueError, match="noise"):
        hutchinson_variance(torch.eye(3)[None], "uniform")
