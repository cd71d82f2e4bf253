"""One vocabulary across the entry points: each argument has the name it has in ``sdegen.sample``, and each name
it replaced still works for a release with a DeprecationWarning.

For every renamed argument: the new name gives the same result as the old one (same seed), the old one warns,
and both together raise ValueError naming them. Also: ``sdegen.train(model, sdegen.dsm_loss, data, steps)`` runs
as written (the random source reaches the loss's ``seed``, never the network), and checkpoints round-trip every
SDE and every ScoreModel setting.
"""

import math
import warnings

import pytest
import torch

import sdegen
from sdegen import distributed, training
from sdegen.analytic import GaussianMixture
# toy tables of a few timesteps: their prior gap (warned about at construction) is not what these tests measure
pytestmark = pytest.mark.filterwarnings("ignore:alphas_cumprod ends at:UserWarning")


@pytest.fixture
def no_warnings():
    """Turn every warning into an error inside the block: the library itself must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------------ log_likelihood
LIK_GM = GaussianMixture.random(dim=2, n_components=2, seed=1)
LIK_X = LIK_GM.sample(4, seed=2)
LIK_FIXED = dict(divergence="hutchinson", probes=1, steps=3, seed=5, t_min=1e-2)


def _loglik(**kwargs):
    return sdegen.log_likelihood(sdegen.VPSDE(), LIK_GM, LIK_X, **LIK_FIXED, **kwargs).log_prob


@pytest.mark.parametrize("new, old, value, other", [("solver", "method", "rk4", "euler"),
                                                    ("probe", "noise", "gaussian", "rademacher")])
def test_log_likelihood_renamed_arguments(new, old, value, other, no_warnings):
    base = {"solver": "rk4"} if new == "probe" else {}
    got = _loglik(**base, **{new: value})
    # the argument is used: another value gives another result (else the comparison below proves nothing)
    assert not torch.equal(got, _loglik(**base, **{new: other}))
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated.*use {new}="):
        torch.testing.assert_close(_loglik(**base, **{old: value}), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{new}=.*{old}="):
        _loglik(**base, **{new: value, old: value})


def test_log_likelihood_names_the_argument_given_in_errors():
    with pytest.raises(ValueError, match="solver must be 'multistep' or a torchdiffeq method"):
        _loglik(solver="nope")
    with pytest.raises(ValueError, match="probe must be one of"):
        _loglik(probe="uniform")


def test_log_likelihood_sharded_forwards_the_new_names(no_warnings):
    sde = sdegen.VPSDE()
    kw = dict(divergence="hutchinson", steps=3, t_min=1e-2)
    ref = sdegen.log_likelihood(sde, LIK_GM, LIK_X, solver="rk4", probe="gaussian", seed=7, **kw).log_prob
    new = distributed.log_likelihood_sharded(sde, LIK_GM, LIK_X, seed=7, batch_size=4, solver="rk4",
                                             probe="gaussian", **kw)
    torch.testing.assert_close(new["log_prob"], ref, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning) as record:
        old = distributed.log_likelihood_sharded(sde, LIK_GM, LIK_X, seed=7, batch_size=4, method="rk4",
                                                 noise="gaussian", **kw)
    assert {str(w.message).split(":")[0] for w in record} == {"log_likelihood_sharded"}
    assert len(record) == 2 and all(w.filename == __file__ for w in record)  # each points at this call
    torch.testing.assert_close(old["log_prob"], ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="solver=.*method="):
        distributed.log_likelihood_sharded(sde, LIK_GM, LIK_X, solver="rk4", method="rk4", **kw)


# ------------------------------------------------------------------------------------------ losses
LOSS_SDE = sdegen.VPSDE()
LOSS_GM = GaussianMixture.random(dim=3, n_components=2, seed=0)
LOSS_X, LOSS_K = LOSS_GM.sample(16, seed=1, return_components=True)


def _clf(x, t):
    # exact noise-conditional logits of the mixture's components: differentiable, cheap, no parameters
    return torch.log(LOSS_GM.responsibilities(LOSS_SDE, x, t))


LOSSES = {
    "dsm_loss": lambda **kw: sdegen.dsm_loss(LOSS_GM.score_fn(LOSS_SDE), LOSS_X, sde=LOSS_SDE,
                                             return_per_example=True, **kw),
    "ddpm_loss": lambda **kw: sdegen.ddpm_loss(LOSS_GM.score_fn(LOSS_SDE), LOSS_X, sde=LOSS_SDE, num_steps=10,
                                               return_per_example=True, **kw),
    "sliced_score_matching_loss": lambda **kw: sdegen.sliced_score_matching_loss(
        LOSS_GM.score_fn(LOSS_SDE), LOSS_X, sde=LOSS_SDE, return_per_example=True, **kw),
    "classifier_loss": lambda **kw: sdegen.classifier_loss(_clf, LOSS_SDE, LOSS_X, LOSS_K, return_per_example=True,
                                                           **kw),
    "sample_time": lambda **kw: torch.stack(sdegen.sample_time(LOSS_SDE, 16, importance_sampling=True, **kw)),
    "drop_labels": lambda **kw: sdegen.drop_labels(LOSS_K, 0.5, 7, **kw),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_take_seed(name):
    fn = LOSSES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_int = fn(seed=3)
        by_gen = fn(seed=torch.Generator().manual_seed(3))
        assert not torch.equal(by_int, fn(seed=4))  # the seed is used
        with torch.random.fork_rng():  # None draws from torch's global generator, as documented
            torch.manual_seed(3)
            global_draw = fn(seed=None)
    torch.testing.assert_close(by_gen, by_int, rtol=0, atol=0)
    torch.testing.assert_close(global_draw, by_int, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match=f"{name}: generator= is deprecated.*use seed="):
        old = fn(generator=3)
    torch.testing.assert_close(old, by_int, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed=.*generator="):
        fn(seed=3, generator=3)
    with pytest.raises(TypeError, match="seed must be an int, a torch.Generator or None"):
        fn(seed=1.5)


def test_seed_of_dsm_loss_is_not_passed_to_the_model():
    seen = []

    def score(x, t, *args, **kwargs):
        seen.append((args, kwargs))
        return -x

    y = torch.arange(LOSS_X.shape[0])
    sdegen.dsm_loss(score, LOSS_X, y, sde=LOSS_SDE, seed=torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0][1] == {} and len(seen[0][0]) == 1 and seen[0][0][0] is y


# ------------------------------------------------------------------------------------------ train
class _GuardedMLP(torch.nn.Module):
    """An MLP that records the type of every argument it receives after (x, t)."""

    def __init__(self, dim, num_classes=None):
        super().__init__()
        self.mlp = sdegen.MLP(dim, hidden=32, depth=1, num_classes=num_classes)
        self.config = self.mlp.config
        self.extra = []

    def forward(self, x, t, *args, **kwargs):
        self.extra.append(tuple(type(a) for a in args) + tuple(type(v) for v in kwargs.values()))
        return self.mlp(x, t, *args, **kwargs)


def _dsm_minimum(sde, cov):
    """The DSM (s^2 weighting, reduce="sum") minimum for data N(mu, cov): the true score leaves
    (1/(T - t_min)) int sum_i m^2 l_i / (m^2 l_i + s^2) dt, l_i the eigenvalues of cov."""
    t = torch.linspace(sde.t_min, sde.T, 20001, dtype=torch.float64)
    m2, s2 = torch.exp(2 * sde.log_mean_coeff(t)), sde.std(t) ** 2
    ev = torch.linalg.eigvalsh(cov)
    return float(torch.trapezoid((m2[:, None] * ev / (m2[:, None] * ev + s2[:, None])).sum(1), t)) / (sde.T - sde.t_min)


def test_train_runs_dsm_loss_as_written():
    """``sdegen.train(model, sdegen.dsm_loss, data, steps)``: in 60 steps the loss on held-out Gaussian data
    closes 80% of its gap to the closed-form DSM minimum (measured: 97%), stays above that minimum (4.5 standard
    errors), and the network only ever receives (x, t)."""
    sde = sdegen.VPSDE()
    gm = GaussianMixture([1.0], [[0.5, -1.0]], [[[0.3, 0.1], [0.1, 0.2]]])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = _GuardedMLP(2)
    model = sdegen.ScoreModel(net, sde, prediction="eps").double()
    data, test_x = gm.sample(2048, seed=0), gm.sample(8000, seed=1)
    L_min = _dsm_minimum(sde, gm.covs[0])

    def held_out():
        with torch.no_grad():
            per = sdegen.dsm_loss(model, test_x, seed=5, return_per_example=True)
        return per.mean().item(), (per.var() / per.numel()).sqrt().item()

    start, _ = held_out()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sdegen.train(model, sdegen.dsm_loss, data, 60, batch_size=128, lr=3e-3, ema_decay=None,
                           progress=False)
    end, se = held_out()
    assert len(res.losses) == 60
    assert end - L_min < 0.2 * (start - L_min), (start, end, L_min)
    assert end > L_min - 4.5 * se
    assert set(net.extra) == {()}  # no Generator, no label: (x, t) only


def test_train_passes_labels_and_seed_to_the_loss():
    """Tuple data (x, y) reaches a loss with a ``seed`` parameter as loss(model, x, y, seed=generator), rows of x
    and y staying paired; dsm_loss passes y on to the network as its class label."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x[:, 0] > 0).long()  # a label that is a function of its row
    calls = []

    def loss(model, xb, yb, *, seed):
        calls.append((xb, yb, type(seed)))
        return sdegen.dsm_loss(model, xb, yb, seed=seed)

    net = _GuardedMLP(2, num_classes=2)
    model = sdegen.ScoreModel(net, sdegen.VPSDE(), prediction="eps").double()
    sdegen.train(model, loss, (x, y), 3, batch_size=16, progress=False, ema_decay=None)
    assert len(calls) == 3
    for xb, yb, kind in calls:
        assert kind is torch.Generator and torch.equal(yb, (xb[:, 0] > 0).long())
    assert set(net.extra) == {(torch.Tensor,)}  # the label, nothing else
    net.extra.clear()
    sdegen.train(model, sdegen.dsm_loss, (x, y), 2, batch_size=16, progress=False, ema_decay=None)
    assert set(net.extra) == {(torch.Tensor,)}


def test_train_keeps_three_argument_losses():
    """A loss without a ``seed`` parameter is called loss(model, batch, generator), the batch as it is."""
    seen = []

    def loss(model, batch, gen):
        seen.append((type(batch), len(batch), type(gen)))
        return (model(batch[0]) ** 2).mean()

    training.train(torch.nn.Linear(2, 1), loss, (torch.randn(8, 2), torch.arange(8)), 2, batch_size=4,
                   progress=False)
    assert seen == [(tuple, 2, torch.Generator)] * 2
    assert not training.takes_seed(loss) and training.takes_seed(sdegen.dsm_loss)
    assert training.takes_seed(lambda m, x, *, seed: None) and not training.takes_seed(lambda m, x, **kw: None)


def test_train_is_reproducible_and_train_ddp_matches_it_in_one_process():
    def run(fn):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sdegen.VPSDE(), prediction="eps")
        x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
        return fn(model, sdegen.dsm_loss, x, 3, batch_size=8, progress=False, seed=4).losses

    a = run(sdegen.train)
    assert a == run(sdegen.train) and a == run(sdegen.train_ddp)


def test_rank_loss_gives_each_rank_its_rows_and_a_seed():
    """Under train_ddp, rank r of W calls a ``seed`` loss on rows [r b, (r + 1) b) of the global batch, the labels
    of the same rows, and a generator of its own."""
    calls = []

    def loss(model, x, y, *, seed):
        calls.append((x, y, seed))
        return x.sum()

    x, y = torch.arange(8.0)[:, None], torch.arange(8)
    draws = []
    for rank in (0, 1):
        ctx = distributed.DistributedContext(rank=rank, world_size=2)
        distributed._rank_loss(loss, ctx, 4, True, seed=0)(None, (x, y), torch.Generator().manual_seed(0))
        draws.append(torch.rand(4, generator=calls[-1][2]))
    for rank, (xb, yb, seed) in enumerate(calls):
        assert isinstance(seed, torch.Generator)
        assert torch.equal(yb, torch.arange(4 * rank, 4 * rank + 4)) and torch.equal(xb[:, 0], yb.float())
    assert not torch.equal(draws[0], draws[1])


# ------------------------------------------------------------------------------------------ sample_sharded
def test_sample_sharded_takes_shape(no_warnings):
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    kw = dict(method="euler_maruyama", steps=5, seed=3, batch_size=4, dtype=torch.float64)
    new = distributed.sample_sharded(sde, gm, shape=(6, 2), **kw)["samples"]
    # the samples of sdegen.sample with the same shape and seed (a fixed-step sampler is batch-size invariant)
    ref = sdegen.sample(sde, gm, shape=(6, 2), seed=3, method="euler_maruyama", steps=5, dtype=torch.float64)
    torch.testing.assert_close(new, ref, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="num_samples and event_shape are deprecated"):
        old = distributed.sample_sharded(sde, gm, 6, (2,), **kw)["samples"]
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        by_keyword = distributed.sample_sharded(sde, gm, num_samples=6, event_shape=(2,), **kw)["samples"]
    torch.testing.assert_close(by_keyword, new, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape=.*num_samples/event_shape"):
        distributed.sample_sharded(sde, gm, 6, (2,), shape=(6, 2), **kw)
    with pytest.raises(ValueError, match="needs shape"):
        distributed.sample_sharded(sde, gm, **kw)
    with pytest.raises(ValueError, match=r"shape\[0\]"):
        distributed.sample_sharded(sde, gm, shape=(0, 2), **kw)


# ------------------------------------------------------------------------------------------ the oracle
ORACLE = GaussianMixture.random(dim=3, n_components=3, seed=6)
ORACLE_X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
ORACLE_T = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)


@pytest.mark.parametrize("method", ["score", "log_prob", "responsibilities"])
def test_oracle_takes_the_sde_first(method):
    sde = sdegen.SubVPSDE()
    fn = getattr(ORACLE, method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = fn(sde, ORACLE_X, ORACLE_T)
        assert torch.equal(fn(sde=sde, x=ORACLE_X, t=ORACLE_T), new)
        data = fn(ORACLE_X)  # no time: the data distribution, which involves no SDE
        torch.testing.assert_close(fn(None, ORACLE_X), data, rtol=0, atol=0)
    assert not torch.allclose(new, data)
    with pytest.warns(DeprecationWarning, match=rf"{method}\(x, t, sde\) is deprecated.*{method}\(sde, x, t\)"):
        old = fn(ORACLE_X, ORACLE_T, sde)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        by_keyword = fn(ORACLE_X, t=ORACLE_T, sde=sde)
    torch.testing.assert_close(by_keyword, new, rtol=0, atol=0)
    with pytest.raises(TypeError, match="multiple values"):
        fn(ORACLE_X, ORACLE_T, sde, x=ORACLE_X)


def test_oracle_in_the_new_order_is_exact():
    """score(sde, x, t) is the gradient of log_prob(sde, x, t), and log_prob at one time is the log-density of
    marginal(sde, t): the reordered methods compute p_t, not something that merely agrees with the old order."""
    sde = sdegen.VESDE()
    x = ORACLE_X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ORACLE.log_prob(sde, x, ORACLE_T).sum(), x)
    torch.testing.assert_close(ORACLE.score(sde, ORACLE_X, ORACLE_T), grad, rtol=1e-10, atol=1e-10)
    pt = ORACLE.marginal(sde, 0.4)
    torch.testing.assert_close(ORACLE.log_prob(sde, ORACLE_X, 0.4), pt.log_prob(ORACLE_X), rtol=1e-12, atol=1e-12)
    # the marginal of an SDE with m = 1: the covariances grow by s(t)^2 I, the means stay
    s2 = float(sde.std(0.4)) ** 2
    torch.testing.assert_close(pt.covs, ORACLE.covs + s2 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(pt.means, ORACLE.means)


def test_oracle_marginal_and_sample_names(no_warnings):
    sde = sdegen.VPSDE()
    new = ORACLE.marginal(sde, 0.3)
    with pytest.warns(DeprecationWarning, match=r"marginal\(t, sde\) is deprecated.*marginal\(sde, t\)"):
        old = ORACLE.marginal(0.3, sde)
    assert torch.equal(old.means, new.means) and torch.equal(old.covs, new.covs)
    drawn = ORACLE.sample(50, sde=sde, t=0.3, seed=2)
    assert torch.equal(ORACLE.sample(50, sde=sde, t=0.3, seed=torch.Generator().manual_seed(2)), drawn)
    assert torch.equal(new.sample(50, seed=2), drawn)
    with pytest.warns(DeprecationWarning, match="generator= is deprecated.*use seed="):
        old_draw = ORACLE.sample(50, sde=sde, t=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(old_draw, drawn)
    with pytest.raises(ValueError, match="seed=.*generator="):
        ORACLE.sample(5, seed=1, generator=torch.Generator())


def test_score_fn_and_sampling_through_the_oracle_do_not_warn(no_warnings):
    sde = sdegen.VPSDE()
    score = ORACLE.score_fn(sde)
    torch.testing.assert_close(score(ORACLE_X, ORACLE_T), ORACLE.score(sde, ORACLE_X, ORACLE_T), rtol=0, atol=0)
    sdegen.sample(sde, ORACLE, shape=(3, 3), method="euler", steps=2, seed=0)


# ------------------------------------------------------------------------------------------ optimize_schedule
def test_optimize_schedule_counts_the_nfe_the_driver_reports():
    """fit.nfe is the sum of the NFE that sdegen.sample reports, so a model whose call costs two network
    evaluations (``nfe_per_call = 2``, like classifier-free guidance) is counted twice per call."""
    sde, ring = sdegen.VPSDE(), GaussianMixture.ring()

    class TwoEvaluations(sdegen.Model):
        nfe_per_call = 2

        def score(self, x, t):
            return ring.score(self.sde, x, t)

    x_T = sde.prior_sample((16, 2), seed=0, dtype=torch.float64)
    ref = sdegen.sample(sde, ring, x_T, method="ode", rtol=1e-7, atol=1e-7)
    kw = dict(method="ddim", steps=3, reference=ref, init="log_snr", max_evals=6)
    one = sdegen.optimize_schedule(sde, ring, x_T, **kw)
    two = sdegen.optimize_schedule(sde, TwoEvaluations(sde), x_T, **kw)
    assert one.nfe == 3 * one.evaluations and two.nfe == 2 * 3 * two.evaluations
    assert torch.equal(one.times, two.times)
    # seed: an int or a torch.Generator, the same draw of the unscreened points
    a = sdegen.optimize_schedule(sde, ring, x_T, subset=6, seed=3, **kw)
    b = sdegen.optimize_schedule(sde, ring, x_T, subset=6, seed=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.times, b.times) and a.loss == b.loss
    with pytest.raises(TypeError, match="seed"):
        sdegen.optimize_schedule(sde, ring, x_T, seed=1.5, **kw)


# ------------------------------------------------------------------------------------------ checkpoints
class UserSDE(sdegen.SDE):
    """A user's SDE (m = exp(-a t), s = b t) with constructor arguments, rebuilt from its config()."""

    def __init__(self, a: float = 1.0, b: float = 2.0):
        self.a, self.b = float(a), float(b)

    def config(self):
        return {"a": self.a, "b": self.b}

    def log_mean_coeff(self, t):
        return -self.a * t

    def std(self, t):
        return self.b * t


CHECKPOINT_CASES = {
    "user": (lambda: UserSDE(0.5, 3.0), dict(prediction="x0")),
    "discrete_vp": (lambda: sdegen.DiscreteVPSDE.from_betas(torch.linspace(1e-3, 0.2, 20)),
                    dict(prediction="eps", time_input="timestep")),
    "edm": (lambda: sdegen.EDMSDE(sigma_min=0.01, sigma_max=40.0),
            dict(prediction="edm", sigma_data=0.7)),
    "flow": (lambda: sdegen.FlowSDE(T=0.99), dict(prediction="flow", scale_input=True)),
    "ve_paper": (lambda: sdegen.VESDE(sigma_min=0.02, sigma_max=30.0, kernel="paper"),
                 dict(prediction="edm", preconditioning="ve", time_input="log_sigma")),
    "cosine_vp": (lambda: sdegen.CosineVPSDE(cosine_s=0.01), dict(prediction="edm", preconditioning="vp", M=500)),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoints_round_trip_every_sde_and_model_setting(case, tmp_path):
    make_sde, options = CHECKPOINT_CASES[case]
    sde = make_sde()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, **options)
    path = str(tmp_path / f"{case}.pt")
    sdegen.save_checkpoint(path, model)
    loaded, state = sdegen.load_checkpoint(path)
    assert type(loaded.sde) is type(sde) and loaded.sde.config() == sde.config()
    times = torch.linspace(sde.t_min, sde.T, 7, dtype=torch.float64)
    torch.testing.assert_close(loaded.sde.std(times), sde.std(times), rtol=0, atol=0)
    torch.testing.assert_close(loaded.sde.log_mean_coeff(times), sde.log_mean_coeff(times), rtol=0, atol=0)
    for name in ("prediction", "time_input", "num_steps", "scale_input", "sigma_data", "preconditioning", "M"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert training.model_config(loaded) == state["config"] == training.model_config(model)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, times), model(x, times), rtol=0, atol=0)


def test_model_config_records_every_score_model_setting():
    sde = sdegen.DiscreteVPSDE.from_betas(torch.linspace(1e-3, 0.2, 20))
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="edm", time_input="timestep",
                              preconditioning="vp", M=200)
    cfg = training.model_config(model)
    assert {k: cfg[k] for k in ("prediction", "time_input", "scale_input", "sigma_data", "preconditioning", "M")} == \
        {"prediction": "edm", "time_input": "timestep", "scale_input": True, "sigma_data": None,
         "preconditioning": "vp", "M": 200}
    assert training.model_config(training.build_model(cfg)) == cfg
    scaled = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="v", scale_input=True)
    assert training.build_model(training.model_config(scaled)).scale_input is True
    edm_own = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sdegen.EDMSDE(), prediction="edm", sigma_data=0.3)
    assert training.build_model(training.model_config(edm_own)).sigma_data == 0.3
    # prediction="edm" picks EDM's c_noise as its time input; the config records "the default", not the name
    edm = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sdegen.EDMSDE(), prediction="edm")
    assert training.model_config(edm)["time_input"] is None
    assert training.build_model(training.model_config(edm)).time_input == edm.time_input


OLD_NET = {"kind": "net", "name": "MLP", "config": {"dim": 2, "hidden": 8, "depth": 1, "num_classes": None,
                                                    "time_scale": 1000.0}}
OLD_SDES = {
    "VPSDE": ({"name": "VPSDE", "beta_min": 0.2, "beta_max": 15.0, "T": 1.0, "t_min": 1e-3},
              lambda: sdegen.VPSDE(0.2, 15.0)),
    "cosine": ({"name": "VPSDE", "schedule": "cosine", "cosine_s": 0.008, "T": 0.9946, "t_min": 1e-3},
               lambda: sdegen.CosineVPSDE()),
    "SubVPSDE": ({"name": "SubVPSDE", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_min": 1e-3},
                 lambda: sdegen.SubVPSDE()),
    "VESDE": ({"name": "VESDE", "sigma_min": 0.01, "sigma_max": 50.0, "T": 1.0, "t_min": 1e-5},
              lambda: sdegen.VESDE()),
}


@pytest.mark.parametrize("name", sorted(OLD_SDES))
def test_checkpoints_in_the_older_format_still_load(name, tmp_path):
    """A checkpoint written before SDEs described themselves ({"name": "VPSDE", ...}, no scale_input etc.)."""
    sde_cfg, expected = OLD_SDES[name]
    config = {"kind": "ScoreModel", "net": OLD_NET, "sde": sde_cfg, "prediction": "eps", "time_input": "t",
              "num_steps": 1000}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), expected(), prediction="eps")
    path = str(tmp_path / "old.pt")
    torch.save({"config": config, "model": reference.state_dict(), "ema": None, "optimizer": None, "extra": {}}, path)
    loaded, _ = sdegen.load_checkpoint(path)
    assert type(loaded.sde) is type(reference.sde) and loaded.sde.config() == reference.sde.config()
    assert loaded.scale_input is False and loaded.preconditioning == "edm" and loaded.M == 1000
    x, t = torch.randn(3, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), reference(x, t), rtol=0, atol=0)


def test_the_library_uses_its_own_vocabulary(no_warnings, tmp_path):
    """The library's calls between its own modules emit no DeprecationWarning."""
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    distributed.sample_sharded(sde, gm, shape=(3, 2), steps=2, method="euler")
    distributed.log_likelihood_sharded(sde, gm, gm.sample(3, seed=0), solver="rk4", steps=2)
    sdegen.optimize_schedule(sde, gm, sde.prior_sample((8, 2), seed=0), method="ddim", steps=2,
                             reference=torch.zeros(8, 2), max_evals=2, init="log_snr")
    assert math.isfinite(float(sdegen.dsm_loss(gm.score_fn(sde), gm.sample(4, seed=1), sde=sde, seed=0)))


# ------------------------------------------------------------------------------------------ guidance and inpainting
INP_KNOWN = GaussianMixture.ring().sample(6, seed=1)
INP_MASK = torch.tensor([True, False])


def _inpaint(**kwargs):
    return sdegen.inpaint(sdegen.VPSDE(), GaussianMixture.ring(), INP_KNOWN, INP_MASK, steps=6, seed=2, **kwargs)


def test_inpaint_takes_the_sampler_as_method(no_warnings):
    """inpaint's sampler is method=, as in sample and optimize_schedule; sampler= is its deprecated name."""
    new = _inpaint(method="ddim")
    assert not torch.equal(new, _inpaint(method="euler"))  # the argument is used
    assert torch.equal(_inpaint(), _inpaint(method="reverse_diffusion"))  # the default
    torch.testing.assert_close(_inpaint(method=sdegen.samplers.get_sampler("ddim")), new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="inpaint: sampler= is deprecated.*use method=") as record:
        old = _inpaint(sampler="ddim")
    assert record[0].filename == __file__
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method=.*sampler="):
        _inpaint(method="ddim", sampler="ddim")
    with pytest.raises(TypeError, match="method must be a fixed-step sampler"):
        _inpaint(method="adaptive")
    with pytest.raises(TypeError, match="does not take"):
        _inpaint(method="ddim", not_an_option=1)


def test_classifier_free_guidance_takes_the_model_as_score(no_warnings):
    """The model argument is score=, as in classifier_guidance, sample and log_likelihood; model= is its
    deprecated name; positional calls are unchanged."""
    net = sdegen.MLP(2, hidden=8, depth=1, num_classes=3)
    model = sdegen.ScoreModel(net, sdegen.VPSDE(), prediction="eps")
    x, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        new = sdegen.classifier_free_guidance(score=model, y=y, w=2.0)(x, t)
        assert torch.equal(sdegen.classifier_free_guidance(model, y, 2.0)(x, t), new)
        assert not torch.equal(sdegen.classifier_free_guidance(model, y, 0.5)(x, t), new)
        with pytest.warns(DeprecationWarning, match="classifier_free_guidance: model= is deprecated.*use score="):
            old = sdegen.classifier_free_guidance(model=model, y=y, w=2.0)(x, t)
    assert torch.equal(old, new)
    with pytest.raises(ValueError, match="score=.*model="):
        sdegen.classifier_free_guidance(model, y, model=model)
    with pytest.raises(TypeError, match="classifier_free_guidance needs y"):
        sdegen.classifier_free_guidance(model)
    with pytest.raises(TypeError, match="score must be a callable conditional model"):
        sdegen.classifier_free_guidance(3, 0)


@pytest.mark.parametrize("make", ["pilot_grid", "sensitivity_grid"])
def test_grids_take_the_model_as_score(make, no_warnings):
    """The second argument is named score everywhere; model= still works, with a DeprecationWarning, and gives the
    same grid."""
    from sdegen.sensitivity_grid import sensitivity_grid
    fn = {"pilot_grid": sdegen.pilot_grid, "sensitivity_grid": sensitivity_grid}[make]
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    new = fn(sde, score=ring, steps=6, shape=(2,), batch=8)
    with pytest.warns(DeprecationWarning, match="score="):
        old = fn(sde, model=ring, steps=6, shape=(2,), batch=8)
    times = (lambda g: g.times) if make == "pilot_grid" else (lambda g: g[0])
    assert torch.equal(times(new), times(old))
    with pytest.raises(ValueError, match="both"):
        fn(sde, ring, 6, (2,), model=ring)
    with pytest.raises(TypeError, match="steps"):
        fn(sde, ring)


def test_vp_constructors_show_their_parameters():
    import inspect
    assert list(inspect.signature(sdegen.VPSDE).parameters)[:2] == ["beta_min", "beta_max"]
    assert inspect.signature(sdegen.SubVPSDE).parameters["beta_max"].default == 20.0
    assert "cosine_s" in inspect.signature(sdegen.CosineVPSDE).parameters
