"""The Gaussian-mixture oracle: exact scores, densities and marginals."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture

SDES = [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE(), sdegen.VPSDE(schedule="cosine")]


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve", "cos"])
def test_score_is_gradient_of_log_density(sde):
    gm = GaussianMixture.random(dim=5, n_components=4, seed=2)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.01, 0.9, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), grad, rtol=1e-10, atol=1e-10)


def test_density_integrates_to_one_on_a_grid():
    gm = GaussianMixture.ring()
    sde = sdegen.VPSDE()
    h = 0.01
    g = torch.arange(-5.0, 5.0, h, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for t in (None, 0.3):
        mass = gm.log_prob(xy, t, sde if t else None).exp().sum() * h * h
        assert abs(float(mass) - 1) < 1e-4


@pytest.mark.parametrize("sde", SDES[:3], ids=["vp", "subvp", "ve"])
def test_marginal_matches_perturbed_samples(sde):
    # p_t is the law of m(t) x0 + s(t) z: compare exact marginal samples' law with perturbed data samples
    gm = GaussianMixture.random(dim=3, n_components=3, seed=4)
    t = 0.4
    n = 40000
    x0 = gm.sample(n, seed=1)
    xt = sde.perturb(x0, t, torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    pt = gm.marginal(t, sde)
    sd = pt.covariance().diagonal().sqrt()
    assert torch.all((xt.mean(0) - pt.mean()).abs() < 5 * sd / math.sqrt(n))
    torch.testing.assert_close(torch.cov(xt.T), pt.covariance(), atol=float(5 * sd.max() ** 2 * math.sqrt(2 / n)),
                               rtol=0)
    # and the average exact log-density of perturbed samples is the negative entropy, estimated both ways
    lp_a, lp_b = gm.log_prob(xt, t, sde), pt.log_prob(pt.sample(n, seed=3))
    assert abs(float(lp_a.mean() - lp_b.mean())) < 5 * float(lp_a.std()) * math.sqrt(2 / n)


def test_samples_have_the_mixture_moments_and_weights():
    gm = GaussianMixture([0.2, 0.8], [[0.0, 2.0], [1.0, -1.0]], [[0.3, 0.1], [0.2, 0.5]])
    x, k = gm.sample(50000, generator=torch.Generator().manual_seed(0), return_components=True)
    assert abs(float((k == 0).double().mean()) - 0.2) < 5 * math.sqrt(0.16 / 50000)
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.05, rtol=0)


def test_shapes_dtypes_and_errors(dtype):
    gm = GaussianMixture.random(dim=12, n_components=2, seed=0)
    x = torch.randn(4, 3, 2, 2, dtype=dtype)
    s = gm.score(x, 0.5, sdegen.VPSDE())
    assert s.shape == x.shape and s.dtype == dtype
    assert gm.log_prob(x).shape == (4,)
    with pytest.raises(ValueError, match="12 values"):
        gm.score(torch.zeros(4, 5), 0.5, sdegen.VPSDE())
    with pytest.raises(ValueError, match="sde"):
        gm.log_prob(torch.zeros(4, 12), t=0.5)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([-1.0, 2.0], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_score_fn_gives_nan_rows_for_non_finite_states(bad):
    """Inside a solve the oracle is a model: a state with a NaN or an infinity has no score, so its row is NaN and
    every other row equals the score of that row alone (gradients included); called directly, the public methods
    still refuse NaN input."""
    sde, gm = sdegen.VPSDE(), GaussianMixture.random(dim=4, n_components=3, seed=2)
    x = torch.randn(5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 0, 1] = bad
    t = torch.full((5,), 0.3, dtype=torch.float64)
    good = [0, 2, 3, 4]
    leaf = x.clone().requires_grad_(True)
    s = gm.score_fn(sde)(leaf, t)
    assert s.shape == x.shape and bool(torch.isnan(s[1]).all())
    torch.testing.assert_close(s[good], gm.score(sde, x[good], t[good]), rtol=0, atol=0)
    s.nan_to_num(0.0).sum().backward()
    assert bool(torch.isfinite(leaf.grad).all()) and bool((leaf.grad[1] == 0).all())
    if math.isnan(bad):
        for method in (gm.score, gm.log_prob, gm.responsibilities):
            with pytest.raises(ValueError, match="NaN"):
                method(sde, x, t)


def test_score_fn_still_checks_shape_and_type():
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    with pytest.raises(ValueError, match="2 values per example"):
        gm.score_fn(sde)(torch.zeros(3, 3), torch.full((3,), 0.5))
    with pytest.raises(TypeError, match="floating"):
        gm.score_fn(sde)(torch.zeros(3, 2, dtype=torch.int64), torch.full((3,), 0.5))


def test_sample_refuses_a_non_floating_dtype():
    """An integer dtype would truncate every draw (the ring's draws would all be 0)."""
    gm = GaussianMixture.ring()
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match=r"dtype must be a floating dtype.*got torch\.(int64|bool)"):
            gm.sample(3, seed=0, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        gm.sample(3, seed=0, dtype="float32")
    with pytest.raises(ValueError, match="n must be"):
        gm.sample(True, seed=0)
    x = gm.sample(3, seed=0, dtype=torch.float32)
    assert x.dtype == torch.float32 and torch.equal(x, gm.sample(3, seed=0).float())


def test_mixture_validation_names_the_bad_input():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([math.inf, 1.0], [[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture([1.0], [[0.0, 0.0]], [math.nan])
    a, b = GaussianMixture.random(dim=3, seed=2**64 + 5), GaussianMixture.random(dim=3, seed=5)
    assert torch.equal(a.means, b.means)  # an int of any size, modulo 2^64 as everywhere


def test_a_singular_mixture_has_no_density_at_the_data():
    """A zero-variance direction: p_0 has no density, so log_prob/score at s(t) = 0 raise (they were NaN); at
    s(t) > 0 the marginal is a proper Gaussian mixture again."""
    sing = GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 0.0]])
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    for call in (lambda: sing.log_prob(x), lambda: sing.score(x), lambda: sing.log_prob(sdegen.VPSDE(), x, 0.0)):
        with pytest.raises(ValueError, match="no density"):
            call()
    sde = sdegen.VPSDE()
    t = 0.3
    m, s = float(sde.mean_coeff(t)), float(sde.std(t))
    exact = (-0.5 * (0.25 / (m**2 + s**2)) - 0.5 * math.log(m**2 + s**2) - 0.5 * math.log(s**2) - math.log(2 * math.pi))
    assert float(sing.log_prob(sde, x, t)) == pytest.approx(exact, rel=1e-12)


def test_the_oracle_is_differentiable_in_t():
    """d/dt log p_t(x) by autograd equals a central difference (a host time requiring grad keeps its graph)."""
    gm, sde = GaussianMixture.ring(), sdegen.VPSDE()
    x = gm.sample(4, sde=sde, t=0.3, seed=0)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gm.log_prob(sde, x, t).sum(), t)
    h = 1e-6
    fd = (gm.log_prob(sde, x, 0.3 + h).sum() - gm.log_prob(sde, x, 0.3 - h).sum()) / (2 * h)
    assert float(grad) == pytest.approx(float(fd), rel=1e-6)


def test_a_mixture_keeps_its_parameters():
    """Its device copies were made once: changed weights reached sample but not score. Reassigning a parameter is
    refused, and one modified in place is named at the next use."""
    gm = sdegen.GaussianMixture.ring()
    with pytest.raises(AttributeError, match="weights: a mixture's parameters are fixed"):
        gm.weights = torch.ones(8, dtype=torch.float64) / 8
    means = torch.zeros(2, 2, dtype=torch.float64)
    own = sdegen.GaussianMixture(torch.tensor([0.5, 0.5]), means, torch.ones(2, dtype=torch.float64))
    own.score(sdegen.VPSDE(), torch.zeros(1, 2), 0.5)
    own.means.add_(1.0)
    with pytest.raises(ValueError, match="modified in place"):
        own.score(sdegen.VPSDE(), torch.zeros(1, 2), 0.5)


def test_a_mixture_survives_copies():
    """Copies hold new tensors whose version counters start afresh: the parameter check must not take them for
    modified ones (deepcopy, pickle and torch.save/load all raised 'modified in place')."""
    import copy
    import io
    import pickle
    gm, sde = sdegen.GaussianMixture.ring(), sdegen.VPSDE()
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = gm.score(sde, x, 0.5)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(copied.score(sde, x, 0.5), want, rtol=0, atol=0)


def test_mixture_parameters_may_be_lists_of_tensors():
    """Lists of 0-d tensors (even ones requiring grad) are read as their numbers, as before the dtype check."""
    w = [torch.tensor(0.3, requires_grad=True), torch.tensor(0.7)]
    with pytest.warns(UserWarning):  # torch's own note on reading a grad-requiring tensor as a number
        gm = GaussianMixture(w, [[0.0], [1.0]], [1.0, 2.0])
    torch.testing.assert_close(gm.weights, torch.tensor([0.3, 0.7], dtype=torch.float64))
