"""Losses against closed forms: for Gaussian data N(mu, Sigma) the perturbed marginal is N(m mu, C), C = m^2 Sigma + s^2 I,
so at the exact score
    DSM(t)  = lambda(t) (d / s^2 - tr C^{-1})       (E||kernel score||^2 - E||exact score||^2)
    SSM(t)  = -lambda(t) tr(C^{-1}) / 2            (E tr(grad s) + E||s||^2 / 2)
    DDPM(t) = (d - s^2 tr C^{-1}) / d              (mean over the d values)
and the t-averaged losses equal (1/(T - t_min)) int w(t) L(t) dt, computed by quadrature in the log-SNR."""

import math

import pytest
import torch

import sdegen
from sdegen import losses

SDES = {"vp": lambda: sdegen.VPSDE(), "ve": lambda: sdegen.VESDE(sigma_max=10.0), "subvp": lambda: sdegen.SubVPSDE()}
N = 20000


def gaussian(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return sdegen.GaussianMixture([1.0], torch.randn(1, d, generator=g, dtype=torch.float64) * 0.5,
                                  (A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64))[None])


def tr_prec(gm, sde, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    m, s2 = torch.exp(sde.log_mean_coeff(t)), sde.std(t) ** 2
    ev = torch.linalg.eigvalsh(gm.covs[0])
    return (1.0 / (m[..., None] ** 2 * ev + s2[..., None])).sum(-1), s2


def dsm_at(gm, sde, t, weighting):
    trp, s2 = tr_prec(gm, sde, t)
    return losses.loss_weight(sde, torch.as_tensor(t, dtype=torch.float64), weighting) * (gm.dim / s2 - trp)


def dsm_average(gm, sde, weighting, n=200001):
    """(1/(T - t_min)) int w L dt = (1/(T - t_min)) int (s^2 / g^2) w L dlambda: smooth in lambda."""
    lam_hi, lam_lo = sde.log_snr(sde.t_min), sde.log_snr(sde.T)
    lam = torch.linspace(float(lam_lo), float(lam_hi), n, dtype=torch.float64)
    t = sde.t_from_log_snr(lam).clamp(sde.t_min, sde.T)
    f = sde.std(t) ** 2 / sde.diffusion(t) ** 2 * dsm_at(gm, sde, t, weighting)
    return float(torch.trapezoid(f, lam)) / (sde.T - sde.t_min)


def within(per, expected, k=4.5):
    mean, se = per.mean().item(), (per.var() / per.numel()).sqrt().item()
    assert abs(mean - expected) < k * se, f"MC mean {mean:.5f} vs exact {expected:.5f} (SE {se:.2e})"


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("weighting", ["s2", "likelihood"])
@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_dsm_at_exact_score_equals_its_minimum(name, weighting, t):
    sde, gm = SDES[name](), gaussian()
    x0 = gm.sample(N, seed=1)
    per = sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, weighting=weighting, t=t, generator=2,
                          return_per_example=True)
    within(per, float(dsm_at(gm, sde, t, weighting)))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("weighting,importance", [("s2", False), ("likelihood", False), ("likelihood", True),
                                                  ("s2", True)])
def test_dsm_time_average_is_unbiased_with_and_without_importance_sampling(name, weighting, importance):
    sde, gm = SDES[name](), gaussian(seed=3)
    x0 = gm.sample(N, seed=4)
    per = sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, weighting=weighting, importance_sampling=importance,
                          generator=5, return_per_example=True)
    within(per, dsm_average(gm, sde, weighting))


def test_importance_sampling_density_is_uniform_in_log_snr():
    sde = sdegen.VPSDE()
    t, w = losses.sample_time(sde, 50000, seed=0, importance_sampling=True)
    lam = sde.log_snr(t)
    lo, hi = float(sde.log_snr(sde.T)), float(sde.log_snr(sde.t_min))
    u = (lam - lo) / (hi - lo)
    # Kolmogorov-Smirnov distance to U[0, 1]; 1.63 / sqrt(n) is the 1% critical value
    ks = (torch.sort(u).values - torch.linspace(0, 1, u.numel(), dtype=torch.float64)).abs().max()
    assert ks < 1.63 / math.sqrt(u.numel())
    # weight 1 / (p(t) (T - t_min)) has mean 1 under p
    within(w, 1.0)
    assert bool(((t >= sde.t_min) & (t <= sde.T)).all())


def test_importance_sampling_reduces_variance_of_likelihood_weighted_loss():
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(N, seed=1)
    v = [sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, weighting="likelihood", importance_sampling=i, generator=7,
                         return_per_example=True).var() for i in (False, True)]
    assert v[1] < 0.2 * v[0]


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_ddpm_loss_equals_mean_reduced_dsm_and_its_minimum(t):
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(N, seed=1)
    score = gm.score_fn(sde)
    per = sdegen.ddpm_loss(score, x0, sde=sde, t=t, generator=3, return_per_example=True)
    trp, s2 = tr_prec(gm, sde, t)
    within(per, float((gm.dim - s2 * trp) / gm.dim))
    a = sdegen.ddpm_loss(score, x0, sde=sde, generator=11)
    b = sdegen.dsm_loss(score, x0, sde=sde, reduce="mean", generator=11)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_ddpm_discrete_times_lie_on_the_grid():
    sde = sdegen.VPSDE()
    seen = []
    score = lambda x, t: (seen.append(t.clone()), -x)[1]  # noqa: E731
    sdegen.ddpm_loss(score, torch.zeros(500, 2, dtype=torch.float64), sde=sde, num_steps=10, generator=0)
    grid = torch.linspace(sde.t_min, sde.T, 10, dtype=torch.float64)
    assert bool((seen[0][:, None] - grid[None]).abs().min(1).values.max() < 1e-12)
    assert len(torch.unique(seen[0])) == 10


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_sliced_score_matching_at_exact_score(projection, name):
    sde, gm = SDES[name](), gaussian()
    x0 = gm.sample(N, seed=1)
    t = 0.2
    per = sdegen.sliced_score_matching_loss(gm.score_fn(sde), x0, sde=sde, projection=projection, t=t, generator=4,
                                            return_per_example=True)
    trp, s2 = tr_prec(gm, sde, t)
    within(per, float(-0.5 * trp * s2))


def test_sliced_score_matching_is_differentiable_in_parameters():
    sde, gm = sdegen.VPSDE(), gaussian()
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    score = lambda x, t: gm.score(x - b, t, sde)  # noqa: E731
    loss = sdegen.sliced_score_matching_loss(score, gm.sample(64, seed=0), sde=sde, generator=0)
    (g,) = torch.autograd.grad(loss, b)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_classifier_loss_of_exact_classifier_equals_expected_posterior_entropy():
    """Proper scoring: E_{x,y}[-log p(y|x)] = E_x[H(p(.|x))] for the exact posterior (paired MC estimates)."""
    sde = sdegen.VPSDE()
    gm = sdegen.GaussianMixture([0.2, 0.3, 0.5], [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.3, 0.3, 0.3])
    clf = sdegen.MixtureClassifier(gm, [[0], [1, 2]], sde)
    x0, k = gm.sample(N, seed=0, return_components=True)
    y = (k > 0).long()
    t = 0.4
    ce = sdegen.classifier_loss(clf, sde, x0, y, t=t, generator=1, return_per_example=True)
    gen = torch.Generator().manual_seed(1)  # with a fixed t the loss draws only z: reproduce it
    z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    x_t = sde.perturb(x0, t, z)
    logp = torch.log_softmax(clf(x_t, torch.full((N,), t, dtype=torch.float64)), 1)
    ent = -(logp.exp() * logp).sum(1)
    within(ce - ent, 0.0)


def test_classifier_loss_at_T_is_the_label_entropy():
    sde = sdegen.VPSDE()
    gm = sdegen.GaussianMixture([0.2, 0.3, 0.5], [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.3, 0.3, 0.3])
    clf = sdegen.MixtureClassifier(gm, [[0], [1], [2]], sde)
    x0, k = gm.sample(N, seed=0, return_components=True)
    ce = sdegen.classifier_loss(clf, sde, x0, k, t=sde.T, generator=1, return_per_example=True)
    H = float(-(gm.weights * gm.weights.log()).sum())
    # at T the posterior is the prior up to O(m(T)) = O(7e-3), so E[CE] - H = O(m^2), far below the MC error
    within(ce, H)


def test_losses_backpropagate_through_a_score_model(dtype):
    sde = sdegen.VPSDE()
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=16, depth=1), sde).to(dtype)
    x0 = torch.randn(8, 2, dtype=dtype)
    for fn in (sdegen.dsm_loss, sdegen.ddpm_loss, sdegen.sliced_score_matching_loss):
        loss = fn(model, x0, generator=0)
        assert loss.ndim == 0 and loss.dtype == dtype
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_losses_are_reproducible_and_do_not_mutate_input():
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(32, seed=0)
    before = x0.clone()
    a = sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, generator=3)
    b = sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, generator=torch.Generator().manual_seed(3))
    assert a == b and torch.equal(x0, before)


def test_loss_errors():
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(4, seed=0)
    score = gm.score_fn(sde)
    with pytest.raises(ValueError, match="weighting"):
        sdegen.dsm_loss(score, x0, sde=sde, weighting="bad")
    with pytest.raises(TypeError, match="sde"):
        sdegen.dsm_loss(score, x0)
    with pytest.raises(ValueError, match="projection"):
        sdegen.sliced_score_matching_loss(score, x0, sde=sde, projection="sphere")
    with pytest.raises(ValueError, match="t must lie"):
        sdegen.dsm_loss(score, x0, sde=sde, t=2.0)
    with pytest.raises(ValueError, match="NaN"):
        sdegen.dsm_loss(score, torch.full_like(x0, float("nan")), sde=sde)
    clf = sdegen.MixtureClassifier(gm, [[0]], sde)
    with pytest.raises(ValueError, match="labels y must lie in"):
        sdegen.classifier_loss(clf, sde, x0, torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"p must be a finite number in \[0, 1\]; got 1.5"):
        sdegen.drop_labels(torch.zeros(3, dtype=torch.long), 1.5, 10)


def test_drop_labels_rate():
    y = torch.zeros(20000, dtype=torch.long)
    out = sdegen.drop_labels(y, 0.1, 10, generator=0)
    frac = (out == 10).double()
    within(frac, 0.1)
    assert torch.equal(y, torch.zeros_like(y))


# ------------------------------------------------------------------------------------------ one SDE per model
class _Wrapped:
    """A wrapper that calls a model and exposes it as ``.module`` (as train_ddp's DDPModel does)."""

    def __init__(self, module):
        self.module, self.sde = module, module.sde

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eps(self, *args, **kwargs):
        return self.module.eps(*args, **kwargs)


@pytest.mark.parametrize("loss", [sdegen.dsm_loss, sdegen.ddpm_loss, sdegen.sliced_score_matching_loss],
                         ids=lambda f: f.__name__)
def test_losses_refuse_an_sde_other_than_the_models_own(loss):
    """A ScoreModel converts its network output under its own SDE: a loss given another sde= would perturb with one
    kernel and convert with the other, so it raises the ValueError of sdegen.sample; the same process under another
    instance is the model's SDE and changes nothing."""
    sde, gm = sdegen.VPSDE(), gaussian()
    model = sdegen.ScoreModel(gm.score_fn(sde), sde, prediction="score")
    x0 = gm.sample(64, seed=0)
    own = loss(model, x0, seed=1, return_per_example=True)
    torch.testing.assert_close(loss(model, x0, sde=sdegen.VPSDE(), seed=1, return_per_example=True), own,
                               rtol=0, atol=0)
    for wrong in (sdegen.VPSDE(beta_max=10.0), sdegen.VESDE()):
        with pytest.raises(ValueError, match=r"sde: the model was built for VPSDE\(.*but is used under sde=" +
                           type(wrong).__name__):
            loss(model, x0, sde=wrong, seed=1)
        with pytest.raises(ValueError, match="sde: the model was built for"):
            loss(_Wrapped(model), x0, sde=wrong, seed=1)
    with pytest.raises(TypeError, match="sde must be an sdegen.SDE or None"):
        loss(model, x0, sde="vp", seed=1)


# ------------------------------------------------------------------------------------------ times and their options
def _recording_score(seen):
    def score(x, t, **kwargs):
        seen.append((t.clone(), kwargs))
        return -x
    return score


def test_ddpm_loss_t_min_is_the_lower_end_of_the_times_as_in_dsm_loss():
    """ddpm_loss(t_min=...) draws t uniformly on [t_min, T], the draw of dsm_loss with the same seed (so the two
    losses agree to round-off), and never passes t_min to the network; with num_steps the grid runs from t_min."""
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(4000, seed=0)
    seen = []
    a = sdegen.ddpm_loss(_recording_score(seen), x0, sde=sde, t_min=0.5, seed=11, return_per_example=True)
    t, kwargs = seen[0]
    assert kwargs == {} and bool((t >= 0.5).all() and (t <= sde.T).all())
    assert float(t.min()) < 0.501 and float(t.max()) > 0.999  # it spans [t_min, T]
    torch.testing.assert_close(t, losses.sample_time(sde, 4000, seed=11, t_min=0.5)[0], rtol=0, atol=0)
    b = sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, reduce="mean", t_min=0.5, seed=11, return_per_example=True)
    c = sdegen.ddpm_loss(gm.score_fn(sde), x0, sde=sde, t_min=0.5, seed=11, return_per_example=True)
    torch.testing.assert_close(c, b, rtol=1e-10, atol=0)
    assert not torch.equal(a, sdegen.ddpm_loss(_recording_score([]), x0, sde=sde, seed=11, return_per_example=True))
    seen.clear()
    sdegen.ddpm_loss(_recording_score(seen), x0, sde=sde, t_min=0.5, num_steps=5, seed=0)
    grid = torch.linspace(0.5, sde.T, 5, dtype=torch.float64)
    assert torch.equal(torch.unique(seen[0][0]), grid)
    with pytest.raises(ValueError, match=r"t_min must be a finite number in \(0, 1\)"):
        sdegen.ddpm_loss(gm.score_fn(sde), x0, sde=sde, t_min=1.5, seed=0)


@pytest.mark.parametrize("loss, option", [(sdegen.ddpm_loss, {"num_steps": 10}), (sdegen.ddpm_loss, {"t_min": 0.1}),
                                          (sdegen.dsm_loss, {"t_min": 0.1}),
                                          (sdegen.dsm_loss, {"importance_sampling": True}),
                                          (sdegen.sliced_score_matching_loss, {"t_min": 0.1})],
                         ids=lambda v: getattr(v, "__name__", None) or next(iter(v)))
def test_fixed_times_refuse_the_options_of_the_draw(loss, option):
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(8, seed=0)
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}: it shapes how t is drawn, while t= fixes the times; leave {name} "
                                         "unset with fixed t"):
        loss(gm.score_fn(sde), x0, sde=sde, t=0.5, seed=0, **option)
    loss(gm.score_fn(sde), x0, sde=sde, t=0.5, seed=0)  # the same call without the option runs
    with pytest.raises(ValueError, match="importance_sampling and t_min: they shape how t is drawn"):
        sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, t=0.5, importance_sampling=True, t_min=0.1)


def test_importance_sampling_is_one_name_and_a_bool():
    """sample_time and dsm_loss call the log-SNR proposal importance_sampling; sample_time's importance= still works
    with a DeprecationWarning; a non-bool such as "no" (truthy) is refused naming the argument as written."""
    sde = sdegen.VPSDE()
    t, w = losses.sample_time(sde, 64, seed=3, importance_sampling=True)
    uniform = losses.sample_time(sde, 64, seed=3)
    assert not torch.equal(t, uniform[0]) and torch.equal(uniform[1], torch.ones(64, dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="sample_time: importance= is deprecated.*use importance_sampling="):
        old = losses.sample_time(sde, 64, seed=3, importance=True)
    assert torch.equal(old[0], t) and torch.equal(old[1], w)
    with pytest.raises(ValueError, match="importance_sampling=.*importance="):
        losses.sample_time(sde, 64, seed=3, importance_sampling=True, importance=True)
    with pytest.raises(TypeError, match="importance_sampling must be True or False; got str 'no'"):
        losses.sample_time(sde, 64, importance_sampling="no")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="importance must be True or False"):
        losses.sample_time(sde, 64, importance="no")
    gm = gaussian()
    with pytest.raises(TypeError, match="importance_sampling must be True or False"):
        sdegen.dsm_loss(gm.score_fn(sde), gm.sample(4, seed=0), sde=sde, importance_sampling="no")


def test_drop_labels_refuses_bad_labels_and_null_labels():
    y = torch.tensor([0, 1, 2, 1])
    assert torch.equal(sdegen.drop_labels(y, 1.0, 3, seed=0), torch.full((4,), 3))
    assert torch.equal(sdegen.drop_labels(y, 0.0, 3, seed=0), y)
    with pytest.raises(ValueError, match="null_label must be an int >= 0; got -1"):
        sdegen.drop_labels(y, 0.5, -1, seed=0)
    with pytest.raises(TypeError, match="null_label must be an int >= 0; got float 3.0"):
        sdegen.drop_labels(y, 0.5, 3.0, seed=0)
    for bad in (y.float(), y.bool(), y[:, None], [0, 1]):
        with pytest.raises(TypeError, match=r"y must be an integer tensor of class labels, shape \(B,\)"):
            sdegen.drop_labels(bad, 0.5, 3, seed=0)


def test_loss_seeds_of_any_size_follow_torch_manual_seed():
    """An int seed seeds the loss's generator modulo 2^64, the range torch.manual_seed takes (negative ints wrap):
    so 2^64 + 5 draws as 5, and -1 as 2^64 - 1, instead of an overflow that does not name seed."""
    sde, gm = sdegen.VPSDE(), gaussian()
    x0 = gm.sample(16, seed=0)

    def loss(seed):
        return sdegen.dsm_loss(gm.score_fn(sde), x0, sde=sde, seed=seed, return_per_example=True)

    torch.testing.assert_close(loss(2**64 + 5), loss(5), rtol=0, atol=0)
    torch.testing.assert_close(loss(-1), loss(2**64 - 1), rtol=0, atol=0)
    assert not torch.equal(loss(5), loss(6))
    for bad in (1.5, True, "5", torch.tensor(5)):
        with pytest.raises(TypeError, match=r"seed must be an int, a torch.Generator or None \(torch's global "
                                            r"generator\); got "):
            loss(bad)


@pytest.mark.parametrize("loss, option", [("ddpm_loss", "weighting"), ("sliced_score_matching_loss",
                                                                         "importance_sampling"),
                                          ("dsm_loss", "importance"), ("dsm_loss", "num_steps")])
def test_a_loss_option_of_another_loss_is_refused_not_passed_to_the_network(loss, option):
    """Keywords other than a loss's options go to the network (class labels); one that names another loss's option
    was dropped by a network taking **kwargs, or blamed on its forward(). It raises naming the option."""
    seen = []

    def score(x, t, **kwargs):
        seen.append(kwargs)
        return -x

    with pytest.raises(TypeError, match=f"no option '{option}'"):
        getattr(sdegen, loss)(score, torch.randn(8, 2), sde=sdegen.VPSDE(), seed=0, **{option: True})
    assert not seen
    sdegen.dsm_loss(score, torch.randn(8, 2), sde=sdegen.VPSDE(), seed=0, label=3)  # other keywords pass through
    assert seen == [{"label": 3}]


def test_classifier_loss_names_a_misplaced_sde():
    clf = sdegen.ConvClassifier(1, 3, base=8)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(0))
    for bad in ("vp", None, x):
        with pytest.raises(TypeError, match="sde .classifier_loss's second argument"):
            sdegen.classifier_loss(clf, bad, x, y, seed=0)


def test_the_losses_take_any_model_the_samplers_take():
    """A plain callable is called as the samplers call it (time in x's dtype, output shape checked), an oracle is
    accepted, and a network with an unrelated eps attribute is a score network: a (B, 1) output gave a finite
    loss, a float32 network crashed on a float64 time, and ddpm_loss called a float eps."""
    sde = sdegen.VPSDE()
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    losses = (sdegen.dsm_loss, sdegen.ddpm_loss, sdegen.sliced_score_matching_loss)
    for loss in losses:
        with pytest.raises(ValueError, match="must return x's shape"):
            loss(lambda x, t: -x.mean(1, keepdim=True), x0, sde=sde, seed=0)

    class Plain(torch.nn.Module):  # float32 weights, t used in arithmetic with them
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 4)
            self.eps = 1e-5  # an unrelated attribute of that name

        def forward(self, x, t):
            return self.lin(torch.cat([x, t[:, None]], 1))

    net = Plain()
    for loss in losses:
        assert torch.isfinite(loss(net, x0, sde=sde, seed=0))
    # the eps view of a score network is -s * score: ddpm_loss equals dsm_loss(weighting="s2", reduce="mean")
    torch.testing.assert_close(sdegen.ddpm_loss(net, x0, sde=sde, seed=3),
                               sdegen.dsm_loss(net, x0, sde=sde, seed=3, weighting="s2", reduce="mean"))
    ring = sdegen.GaussianMixture.ring()
    x = ring.sample(64, seed=1)
    torch.testing.assert_close(sdegen.dsm_loss(ring, x, sde=sde, seed=2),
                               sdegen.dsm_loss(ring.score_fn(sde), x, sde=sde, seed=2))


def test_sliced_score_matching_of_a_score_independent_of_x():
    """The Jacobian term is zero: the loss equals that of b + 0 x, whose Jacobian autograd sees (it raised torch's
    'appears to not have been used in the graph')."""
    sde = sdegen.VPSDE()
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    loss = sdegen.sliced_score_matching_loss(lambda x, t: b.expand_as(x), x0, sde=sde, seed=0, weighting="none",
                                             return_per_example=True)
    same = sdegen.sliced_score_matching_loss(lambda x, t: b + 0.0 * x, x0, sde=sde, seed=0, weighting="none",
                                             return_per_example=True)
    torch.testing.assert_close(loss, same, rtol=0, atol=0)
    loss.sum().backward()
    assert b.grad is not None


def test_classifier_loss_labels():
    sde = sdegen.VPSDE()
    x0 = torch.randn(4, 2)
    clf = lambda x, t: torch.stack([x[:, 0], -x[:, 0]], 1)  # noqa: E731
    a = sdegen.classifier_loss(clf, sde, x0, torch.tensor([0, 1, 1, 0], dtype=torch.int32), seed=0)
    b = sdegen.classifier_loss(clf, sde, x0, torch.tensor([0, 1, 1, 0]), seed=0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not bool"):
        sdegen.classifier_loss(clf, sde, x0, torch.tensor([True, False, True, False]), seed=0)


def test_losses_take_torchs_wrappers_of_a_model():
    """A torch.compile'd ScoreModel (refused by the losses' model check) and a DataParallel one (ddpm_loss asked it
    for an eps view it does not have) train as the model itself does."""
    sde = sdegen.VPSDE()
    torch.manual_seed(0)
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="eps")
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    for loss in (sdegen.dsm_loss, sdegen.ddpm_loss):
        want = loss(model, x0, seed=0)
        torch.testing.assert_close(loss(torch.nn.DataParallel(model), x0, sde=sde, seed=0), want)
        torch.testing.assert_close(loss(torch.compile(model, backend="eager"), x0, sde=sde, seed=0), want)
