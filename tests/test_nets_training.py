"""Reference networks (shapes, conditioning), the EMA recursion, checkpoints, and training to the DSM minimum."""

import math

import pytest
import torch

import sdegen
from sdegen import training


@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 3)])
def test_mlp_shapes_and_conditioning(shape, dtype):
    net = sdegen.MLP(6 if len(shape) == 3 else 3, hidden=16, depth=2, num_classes=4).to(dtype)
    x, t = torch.randn(shape, dtype=dtype), torch.rand(5, dtype=dtype)
    out = net(x, t, torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape == x.shape and out.dtype == dtype
    # y=None is the null label (index num_classes)
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((5,), 4)))
    with pytest.raises(ValueError, match="no class conditioning"):
        sdegen.MLP(3, hidden=8)(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 16, 12)])
def test_unet_and_classifier_shapes(shape):
    net = sdegen.UNet(shape[1], base=8, num_classes=10)
    x, t = torch.randn(shape), torch.rand(2)
    assert net(x, t, torch.tensor([1, 9])).shape == x.shape
    clf = sdegen.ConvClassifier(shape[1], num_classes=7, base=8)
    assert clf(x, t).shape == (2, 7) and clf.features(x, t).shape == (2, 16)
    clean = sdegen.ConvClassifier(shape[1], num_classes=7, base=8, time_conditional=False)
    assert clean(x).shape == (2, 7)
    with pytest.raises(ValueError, match="noise-conditional"):
        clf(x)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 6, 6), t)


def test_unet_examples_are_independent():
    """Example i's output depends only on example i (no batch coupling: GroupNorm, not BatchNorm)."""
    net = sdegen.UNet(1, base=8).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    torch.testing.assert_close(net(x, t)[1:2], net(x[1:2], t[1:2]), rtol=1e-5, atol=1e-6)


def test_ema_recursion_is_exact():
    lin = torch.nn.Linear(2, 2)
    ema = training.EMA(lin, decay=0.9, warmup=False)
    start = lin.weight.detach().clone()
    expected = start.clone()
    for k in range(5):
        with torch.no_grad():
            lin.weight.add_(1.0)
        ema.update(lin)
        expected = 0.9 * expected + 0.1 * lin.weight.detach()
    torch.testing.assert_close(ema.module.weight, expected)
    with pytest.raises(ValueError, match="decay"):
        training.EMA(lin, decay=1.0)


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    sde = sdegen.VPSDE(schedule="cosine")
    model = sdegen.ScoreModel(sdegen.UNet(1, base=8, num_classes=3), sde, prediction="v", time_input="log_sigma")
    ema = training.EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model)
    path = str(tmp_path / "ck.pt")
    sdegen.save_checkpoint(path, model, ema=ema, extra={"note": "x"})
    loaded, state = sdegen.load_checkpoint(path)
    assert isinstance(loaded, sdegen.ScoreModel) and loaded.prediction == "v" and loaded.time_input == "log_sigma"
    assert isinstance(loaded.sde, sdegen.VPSDE) and loaded.sde.schedule == "cosine" and loaded.sde.T == sde.T
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    torch.testing.assert_close(loaded(x, t, torch.tensor([0, 2])), ema.module(x, t, torch.tensor([0, 2])))
    raw, _ = sdegen.load_checkpoint(path, use_ema=False)
    torch.testing.assert_close(raw(x, t), model(x, t))
    assert state["extra"] == {"note": "x"}
    # weights_only loading refuses arbitrary objects
    torch.save({"config": object()}, str(tmp_path / "bad.pt"))
    with pytest.raises(Exception):
        sdegen.load_checkpoint(str(tmp_path / "bad.pt"))


def test_iterate_batches_covers_each_example_once_per_epoch():
    data = torch.arange(10)
    it = training.iterate_batches(data, 5, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(it), next(it)])
    assert sorted(epoch.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="first dimension"):
        next(training.iterate_batches((torch.zeros(3), torch.zeros(4)), 2))


def test_training_reaches_the_dsm_minimum_on_gaussian_data():
    """DSM (s^2 weighting) is minimised by the true score with the closed-form minimum
    (1/(T - t_min)) int sum_i m^2 l_i / (m^2 l_i + s^2) dt; a trained MLP must close 85% of the gap from its
    initial loss to that minimum, and cannot go below it (4.5 standard errors)."""
    torch.manual_seed(0)
    sde = sdegen.VPSDE()
    gm = sdegen.GaussianMixture([1.0], [[0.5, -1.0]], [[[0.3, 0.1], [0.1, 0.2]]])
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=64, depth=2), sde, prediction="eps").double()
    data = gm.sample(4096, seed=0)
    t = torch.linspace(sde.t_min, sde.T, 20001, dtype=torch.float64)
    m2, s2 = torch.exp(2 * sde.log_mean_coeff(t)), sde.std(t) ** 2
    ev = torch.linalg.eigvalsh(gm.covs[0])
    L_min = float(torch.trapezoid((m2[:, None] * ev / (m2[:, None] * ev + s2[:, None])).sum(1), t)) / (sde.T - sde.t_min)
    test_x = gm.sample(20000, seed=1)

    def evaluate():
        with torch.no_grad():
            per = sdegen.dsm_loss(model, test_x, generator=5, return_per_example=True)
        return per.mean().item(), (per.var() / per.numel()).sqrt().item()

    start, _ = evaluate()
    res = sdegen.train(model, lambda m, b, g: sdegen.dsm_loss(m, b, generator=g), data, 600, batch_size=256, lr=3e-3,
                       ema_decay=None, progress=False, seed=0)
    end, se = evaluate()
    assert len(res.losses) == 600
    assert end - L_min < 0.15 * (start - L_min), (start, end, L_min)
    assert end > L_min - 4.5 * se


def test_train_hooks_and_errors():
    calls = []
    model = torch.nn.Linear(2, 1)
    wrapped = []

    def wrap(m):
        wrapped.append(m)
        return m

    res = training.train(model, lambda m, b, g: (m(b) ** 2).mean(), torch.randn(16, 2), 3, batch_size=4,
                         progress=False, wrap_model=wrap, on_step=lambda s, v: calls.append(s), ema_decay=0.9)
    assert calls == [0, 1, 2] and wrapped == [model] and res.ema is not None
    with pytest.raises(FloatingPointError, match="step 0"):
        training.train(model, lambda m, b, g: m(b).sum() * float("nan"), torch.randn(4, 2), 2, batch_size=2,
                       progress=False)
    with pytest.raises(ValueError, match="steps"):
        training.train(model, lambda m, b, g: m(b).sum(), torch.randn(4, 2), -1)


def test_ema_of_a_linear_drift_matches_its_closed_form():
    """Weights moving as w_k = w_0 - k c: the EMA e_n = d^n w_0 + sum_k (1 - d) d^(n-k) w_k equals
    w_0 - c (n - d (1 - d^n) / (1 - d))."""
    lin = torch.nn.Linear(3, 2).double()
    ema = training.EMA(lin, decay=0.8, warmup=False)
    w0, c, d = lin.weight.detach().clone(), torch.randn(2, 3, dtype=torch.float64), 0.8
    for n in range(1, 13):
        with torch.no_grad():
            lin.weight.sub_(c)
        ema.update(lin)
        torch.testing.assert_close(ema.module.weight, w0 - c * (n - d * (1 - d**n) / (1 - d)), rtol=1e-12, atol=1e-12)


def test_train_reads_losses_back_in_blocks_and_names_the_first_bad_step():
    count = []

    def loss_fn(m, b, g):
        count.append(1)
        return (m(b) * 0.0).sum() + float(len(count) - 1)  # the loss at step k is k

    model = torch.nn.Linear(2, 1)
    res = training.train(model, loss_fn, torch.randn(8, 2), 13, batch_size=4, progress=False, check_every=5)
    assert res.losses == [float(k) for k in range(13)]

    def bad_at_7(m, b, g):
        count.append(1)
        return (m(b) ** 2).mean() * (float("nan") if len(count) == 8 else 1.0)

    count.clear()
    with pytest.raises(FloatingPointError, match="at step 7"):
        training.train(model, bad_at_7, torch.randn(8, 2), 20, batch_size=4, progress=False, check_every=5)
    assert len(count) == 10  # found at the read-back after step 9, not later
    with pytest.raises(ValueError, match="check_every"):
        training.train(model, loss_fn, torch.randn(8, 2), 2, check_every=0)


def test_train_draws_on_the_data_device(device):
    """The loss's generator lives where the batch is, and its stream is that of a torch.Generator on that device
    seeded with ``seed`` (after the first epoch's permutation), so runs are reproducible."""
    seen, first = [], []

    def loss_fn(m, b, g):
        seen.append((g.device.type, b.device.type))
        if not first:
            first.append(torch.rand(3, generator=g, device=g.device))
        return sdegen.dsm_loss(m, b, seed=g)

    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sdegen.VPSDE()).to(device)
    training.train(model, loss_fn, torch.randn(16, 2, device=device), 3, batch_size=8, progress=False, seed=3)
    assert seen == [(torch.device(device).type,) * 2] * 3
    gen = torch.Generator(device=device).manual_seed(3)
    torch.randperm(16, generator=gen, device=device)
    torch.testing.assert_close(first[0], torch.rand(3, generator=gen, device=device), rtol=0, atol=0)


def test_early_stopping_restores_the_best_evaluations_weights():
    """evaluate() scores the EMA weights, first the starting ones; with values 9, 3, 1, 2, 5, 4 and patience 3 the
    run stops after the 6th evaluation, and restore_best puts back exactly the weights (model and EMA) of the 3rd."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    script, seen, modules = [9.0, 3.0, 1.0, 2.0, 5.0, 4.0, 0.0], [], []

    def evaluate(module):
        assert not torch.is_grad_enabled() and module is not model
        modules.append(module)
        seen.append((_state(module), _state(model)))
        return script[len(seen) - 1]

    res = training.train(model, lambda m, b, g: ((m(b) - 1.0) ** 2).mean(), torch.randn(64, 3), 100, batch_size=8,
                         lr=1e-2, progress=False, evaluate=evaluate, eval_every=4, patience=3, restore_best=True,
                         ema_decay=0.9)
    assert all(m is res.ema.module for m in modules)
    assert res.evaluations == [(0, 9.0), (4, 3.0), (8, 1.0), (12, 2.0), (16, 5.0), (20, 4.0)]
    assert res.stopped_early and len(res.losses) == 20 and (res.best_step, res.best_value) == (8, 1.0)
    for got, want in ((_state(res.ema.module), seen[2][0]), (_state(model), seen[2][1])):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(seen[2][1]["weight"], seen[5][1]["weight"])  # training did move on after the best
    with pytest.raises(ValueError, match="eval_every"):
        training.train(model, lambda m, b, g: m(b).sum(), torch.randn(4, 3), 2, evaluate=evaluate, progress=False)
    with pytest.raises(ValueError, match="evaluate callback"):
        training.train(model, lambda m, b, g: m(b).sum(), torch.randn(4, 3), 2, patience=2, progress=False)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _tiny(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sdegen.VPSDE(), prediction="eps")


TRAIN_X = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("option, error, message", [
    ({"grad_clip": -1.0}, ValueError, r"grad_clip must be a finite number > 0 or None; got -1.0"),
    ({"grad_clip": 0.0}, ValueError, r"grad_clip must be a finite number > 0 or None; got 0.0"),
    ({"grad_clip": float("nan")}, ValueError, r"grad_clip must be a finite number > 0 or None; got nan"),
    ({"warmup_steps": -5}, ValueError, r"warmup_steps must be an int >= 0; got -5"),
    ({"warmup_steps": 2.5}, TypeError, r"warmup_steps must be an int >= 0; got float 2.5"),
    ({"ema_decay": 2.0}, ValueError, r"ema_decay must be a finite number in \[0, 1\) or None; got 2.0"),
    ({"lr": float("inf")}, ValueError, r"lr must be a finite number > 0; got inf"),
    ({"lr": 0.0}, ValueError, r"lr must be a finite number > 0; got 0.0"),
    ({"steps": 1.5}, TypeError, r"steps must be an int >= 0; got float 1.5"),
    ({"progress": "no"}, TypeError, r"progress must be True or False; got str 'no'"),
    ({"restore_best": 1}, TypeError, r"restore_best must be True or False; got int 1"),
    ({"is_main": None}, TypeError, r"is_main must be True or False; got NoneType None"),
    ({"seed": 0.5}, TypeError, r"seed must be an int or a torch.Generator; got float 0.5"),
    ({"seed": None}, TypeError, r"seed must be an int or a torch.Generator; got NoneType None"),
    ({"seed": "0"}, TypeError, r"seed must be an int or a torch.Generator; got str '0'"),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
def test_train_refuses_bad_options_before_any_step(option, error, message):
    """A negative grad_clip would reverse every gradient (clip_grad_norm_ scales by a negative factor) and a
    negative warm-up would give a negative learning rate: each bad option raises naming itself, and the model is
    left untouched."""
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"steps": 2, "progress": False, **option}
    steps = kw.pop("steps")
    with pytest.raises(error, match=message):
        training.train(model, sdegen.dsm_loss, TRAIN_X, steps, batch_size=8, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_train_seed_is_an_int_of_any_size_or_a_generator():
    """An int seeds a generator on the data's device modulo 2^64; a torch.Generator is used as it is, so
    Generator().manual_seed(4) trains exactly as seed=4, and 2^64 + 4 as 4."""
    def losses(seed):
        return training.train(_tiny(), sdegen.dsm_loss, TRAIN_X, 4, batch_size=8, progress=False, seed=seed).losses

    by_int = losses(4)
    assert by_int == losses(torch.Generator().manual_seed(4)) == losses(2**64 + 4)
    assert by_int != losses(5)


def test_model_config_records_the_settings_that_apply():
    """model_config records num_steps and EDM's settings only where they apply (None elsewhere), and build_model
    rebuilds the same config; an older config that recorded defaults for every model still loads."""
    sde = sdegen.VPSDE()
    index = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="eps", time_input="index",
                              num_steps=50)
    cfg = training.model_config(index)
    assert (cfg["num_steps"], cfg["sigma_data"], cfg["preconditioning"], cfg["M"]) == (50, None, None, None)
    assert training.model_config(training.build_model(cfg)) == cfg and training.build_model(cfg).num_steps == 50
    vp = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="edm", preconditioning="vp", M=200)
    cfg = training.model_config(vp)
    assert (cfg["num_steps"], cfg["sigma_data"], cfg["preconditioning"], cfg["M"]) == (None, None, "vp", 200)
    assert training.model_config(training.build_model(cfg)) == cfg
    legacy = dict(training.model_config(_tiny()), num_steps=1000, sigma_data=0.5, preconditioning="edm", M=1000)
    rebuilt = training.build_model(legacy)
    assert (rebuilt.prediction, rebuilt.time_input) == ("eps", "t")
    assert training.model_config(rebuilt) == training.model_config(_tiny())


def _ring_model():
    torch.manual_seed(0)
    return sdegen.ScoreModel(sdegen.MLP(2, hidden=16, depth=1), sdegen.VPSDE(), prediction="eps")


def test_a_given_optimizer_keeps_its_learning_rate_unless_lr_is_given():
    """train(optimizer=SGD(lr=0.1)) trains at 0.1 (the warm-up scales the optimizer's own rate); an explicit lr
    overrides it; without an optimizer, Adam runs at the default 2e-4."""
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    seen = []
    for opt_lr, lr, expected in ((0.1, None, 0.1), (0.1, 0.02, 0.02)):
        model = _ring_model()
        opt = torch.optim.SGD(model.parameters(), lr=opt_lr)
        sdegen.train(model, sdegen.dsm_loss, x, 4, batch_size=16, optimizer=opt, lr=lr, warmup_steps=2,
                     progress=False, on_step=lambda step, loss, o=opt: seen.append(o.param_groups[0]["lr"]))
        assert seen[-4:] == pytest.approx([expected / 2, expected, expected, expected], rel=1e-12)
    result = sdegen.train(_ring_model(), sdegen.dsm_loss, x, 2, batch_size=16, progress=False)
    assert result.optimizer.param_groups[0]["lr"] == 2e-4


def test_a_run_resumed_from_its_result_equals_the_continuous_run():
    """30 + 30 steps, the second call given the first's optimizer, EMA, step count and random stream (an epoch
    boundary at step 30: 64 rows, batches of 16), reproduce 60 steps in one call bit for bit: weights, EMA, losses
    and the warm-up's learning rates; the step count is 60."""
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    kw = dict(batch_size=16, warmup_steps=40, seed=3, progress=False)
    whole = sdegen.train(_ring_model(), sdegen.dsm_loss, x, 60, **kw)
    model = _ring_model()
    first = sdegen.train(model, sdegen.dsm_loss, x, 32, **kw)
    second = sdegen.train(model, sdegen.dsm_loss, x, 28, **{**kw, "seed": first.generator},
                          optimizer=first.optimizer, ema=first.ema, start_step=first.steps)
    assert (first.steps, second.steps, whole.steps) == (32, 60, 60)
    assert first.losses + second.losses == whole.losses
    for a, b in zip(model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(second.ema.module.state_dict().values(), whole.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert second.ema.num_updates == 60
    with pytest.raises(TypeError, match="ema must be an sdegen.EMA"):
        sdegen.train(model, sdegen.dsm_loss, x, 1, ema=model, progress=False)
    with pytest.raises(ValueError, match="ema_decay: the given ema keeps its own decay"):
        sdegen.train(model, sdegen.dsm_loss, x, 1, ema=second.ema, ema_decay=0.5, progress=False)
    with pytest.raises(ValueError, match="start_step"):
        sdegen.train(model, sdegen.dsm_loss, x, 1, start_step=-1, progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_checkpoint_restores_the_weights_in_their_own_dtype(tmp_path, dtype):
    """A float64 or bfloat16 network comes back in its dtype with bit-identical outputs (not cast to float32)."""
    model = _ring_model().to(dtype)
    path = str(tmp_path / "m.pt")
    sdegen.save_checkpoint(path, model)
    loaded, _ = sdegen.load_checkpoint(path)
    assert next(loaded.parameters()).dtype == dtype
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_an_lr_scheduler_takes_effect_after_the_warm_up():
    """train writes the learning rate only during its warm-up: a torch scheduler stepped in on_step, or between
    two calls, sets the rate of the steps that follow (StepLR's gamma 0.1: 1e-3, 1e-4, 1e-5, ...)."""
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    model = _ring_model()
    seen = []

    class Spy(torch.optim.Adam):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    opt = Spy(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1)
    first = sdegen.train(model, sdegen.dsm_loss, x, 3, batch_size=16, optimizer=opt, progress=False,
                         on_step=lambda step, loss: scheduler.step())
    assert seen == pytest.approx([1e-3, 1e-4, 1e-5], rel=1e-12)
    scheduler.step()
    sdegen.train(model, sdegen.dsm_loss, x, 1, batch_size=16, optimizer=opt, progress=False,
                 start_step=first.steps, seed=first.generator)
    assert seen[-1] == pytest.approx(1e-7, rel=1e-12)


def test_ema_of_bfloat16_weights_is_averaged_in_float32():
    """theta_ema after n updates towards a constant theta from theta_0: theta - (theta - theta_0) decay^n. In
    bfloat16 the increment 0.0005 (1.5 - theta_ema) is below half an ulp of 1, which froze the average at 1.0; the
    float32 average gives the closed form to bfloat16's rounding of the result."""
    lin = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    lin.weight.data.fill_(1.0)
    ema = training.EMA(lin, decay=0.999, warmup=False)
    lin.weight.data.fill_(1.5)
    for _ in range(1000):
        ema.update(lin)
    exact = 1.5 - 0.5 * 0.999**1000
    assert ema.module.weight.dtype == torch.bfloat16
    assert abs(float(ema.module.weight) - exact) <= 2.0**-8 * exact  # bfloat16's rounding of the average
    # the float32 average and warmup survive a state_dict round trip into a default EMA
    state = ema.state_dict()
    other = training.EMA(lin)
    other.load_state_dict(state)
    assert other.warmup is False and other.num_updates == 1000
    for _ in range(500):
        ema.update(lin)
        other.update(lin)
    assert torch.equal(ema.module.weight, other.module.weight)
    assert abs(float(other.module.weight) - (1.5 - 0.5 * 0.999**1500)) <= 2.0**-8


def test_float16_weights_need_an_optimizer_that_suits_them():
    """Adam's eps = 1e-8 is 0 in float16: the first step made the weights NaN and a 1-step run returned them
    without an error. train refuses float16 weights for its own Adam, and non-finite weights at the end raise."""
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    half = _ring_model().half()
    with pytest.raises(ValueError, match="float16"):
        sdegen.train(half, sdegen.dsm_loss, x, 1, batch_size=16, progress=False)
    opt = torch.optim.Adam(half.parameters(), lr=1e-3)  # the same eps, chosen by the user
    with pytest.raises(FloatingPointError, match="weights are not finite"):
        sdegen.train(half, sdegen.dsm_loss, x, 1, batch_size=16, optimizer=opt, progress=False)


def test_train_refuses_options_it_would_ignore():
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    model = _ring_model()
    ema = training.EMA(model, decay=0.5)
    with pytest.raises(ValueError, match="ema_decay: the given ema keeps its own decay"):
        sdegen.train(model, sdegen.dsm_loss, x, 1, ema=ema, ema_decay=0.999, progress=False)
    sdegen.train(model, sdegen.dsm_loss, x, 1, ema=ema, ema_decay=0.5, progress=False)  # its own: accepted
    with pytest.raises(ValueError, match="evaluate callback"):
        sdegen.train(model, sdegen.dsm_loss, x, 1, eval_every=5, progress=False)


def test_load_checkpoint_names_a_device_it_cannot_map_to(tmp_path):
    """map_location='cuda' without CUDA is a device problem, not 'not an sdegen checkpoint'."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the mapping succeeds")
    path = tmp_path / "m.pt"
    training.save_checkpoint(str(path), _tiny())
    with pytest.raises(ValueError, match="sees no CUDA device"):
        training.load_checkpoint(str(path), map_location="cuda")


def test_ema_follows_its_module_changed_outside_update():
    """Weights loaded into ema.module, or a recast module, are what the average continues from (the float32 copy of
    16-bit weights used to write its stale average back: 0.92 instead of about 5)."""
    lin = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    lin.weight.data.fill_(1.0)
    ema = training.EMA(lin, decay=0.999, warmup=False)
    ema.module.weight.data.fill_(5.0)  # loaded directly
    ema.update(lin)
    assert float(ema.module.weight) == pytest.approx(5.0 - 0.001 * 4.0, abs=2.0**-6)
    ema.module.float()  # recast: no 16-bit copy any more
    ema.module.weight.data.fill_(3.0)
    lin.float()
    ema.update(lin)
    assert float(ema.module.weight) == pytest.approx(3.0 - 0.001 * 2.0, rel=1e-6)
    ema.module.to(torch.bfloat16)
    lin.to(torch.bfloat16)
    ema.update(lin)  # 16 bits again: a fresh float32 copy from the module's weights
    assert float(ema.module.weight) == pytest.approx(2.998 - 0.001 * 1.998, abs=2.0**-7)
    state = ema.state_dict()
    assert "float32_shadow" in state


def test_frozen_non_finite_parameters_are_not_a_training_failure():
    x = sdegen.GaussianMixture.ring().sample(64, seed=0).float()
    model = _ring_model()
    model.register_parameter("mask", torch.nn.Parameter(torch.tensor(-math.inf), requires_grad=False))
    sdegen.train(model, sdegen.dsm_loss, x, 2, batch_size=16, progress=False)


def test_checkpoints_hold_plain_data_that_load_checkpoint_reads(tmp_path):
    """NumPy numbers in a network's config or in extra are stored as Python numbers (torch.load(weights_only=True)
    refused the file they made); other objects are refused at save time, naming the entry, and leave no
    temporary file; a file with objects is named as such when loaded."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "np.pt"
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=np.int64(8), depth=1), sdegen.VPSDE())
    training.save_checkpoint(str(path), model, extra={"val_loss": np.float64(0.25), "epochs": [np.int32(3)]})
    loaded, state = training.load_checkpoint(str(path))
    assert state["extra"] == {"val_loss": 0.25, "epochs": [3]} and type(state["extra"]["val_loss"]) is float
    assert loaded.net.config["hidden"] == 8 and type(loaded.net.config["hidden"]) is int
    assert torch.load(str(path))["version"] == training.CHECKPOINT_VERSION  # torch's default weights_only=True
    for extra, where in (({"p": tmp_path}, r"extra\['p'\]"), ({"sde": sdegen.VPSDE()}, r"extra\['sde'\]"),
                         ({"f": lambda: 0}, r"extra\['f'\]")):
        with pytest.raises(TypeError, match=where):
            training.save_checkpoint(str(tmp_path / "bad.pt"), model, extra=extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["np.pt"]
    torch.save({"config": {}, "model": {}, "obj": tmp_path}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="refused an object in it .*Unsupported global") as err:
        training.load_checkpoint(str(tmp_path / "foreign.pt"))
    assert "\x1b[" not in str(err.value)


def test_checkpoints_of_networks_load_checkpoint_cannot_rebuild(tmp_path):
    """A torch.compile'd network is saved as the module it compiled; a network of the user's with a .config is
    refused at save time (load_checkpoint rebuilds sdegen.nets only) unless config= is given."""
    net = sdegen.MLP(2, hidden=8, depth=1)
    compiled = torch.compile(net)
    training.save_checkpoint(str(tmp_path / "c.pt"), sdegen.ScoreModel(compiled, sdegen.VPSDE()))
    loaded, _ = training.load_checkpoint(str(tmp_path / "c.pt"))
    x, t = torch.randn(3, 2), torch.rand(3)
    torch.testing.assert_close(loaded.net(x, t), net(x, t), rtol=0, atol=0)

    class Mine(torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.config = {}

    with pytest.raises(ValueError, match="Mine: load_checkpoint rebuilds the networks of sdegen.nets only"):
        training.save_checkpoint(str(tmp_path / "m.pt"), Mine())
    training.save_checkpoint(str(tmp_path / "m.pt"), Mine(), config={"kind": "mine"})  # the caller's own config


def test_load_checkpoint_leaves_torch_rng_alone_and_maps_with_a_dict(tmp_path):
    path = tmp_path / "m.pt"
    training.save_checkpoint(str(path), _tiny())
    before = torch.get_rng_state()
    training.load_checkpoint(str(path))
    assert torch.equal(torch.get_rng_state(), before)
    for location in ({"cpu": "cpu"}, lambda storage, loc: storage):
        model, _ = training.load_checkpoint(str(path), map_location=location)
        assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_damaged_or_newer_checkpoint_is_named(tmp_path):
    path = tmp_path / "m.pt"
    training.save_checkpoint(str(path), _tiny())
    state = torch.load(str(path))
    state["config"]["sde"]["config"]["option_of_a_newer_release"] = 1
    state["version"] = training.CHECKPOINT_VERSION + 1
    torch.save(state, str(path))
    with pytest.raises(ValueError, match="cannot rebuild the model .*written by a newer sdegen") as err:
        training.load_checkpoint(str(path))
    assert "implement" not in str(err.value)  # a built-in SDE: the advice for user SDEs does not apply
    del state["config"]["sde"]
    torch.save(state, str(path))
    with pytest.raises(ValueError, match="cannot rebuild the model"):
        training.load_checkpoint(str(path))


def test_dropout_follows_the_seed_and_leaves_the_global_rng_alone():
    """Dropout draws from torch's global generator: train seeds it per step from (seed, step) inside a fork, so two
    runs with one seed agree whatever else used the global generator, a resumed run equals one run, and the
    caller's global state is untouched (it differed run to run: losses 63.6962 vs 63.6924 after a torch.rand)."""
    def run(steps, start=0, model=None, opt=None, seed=0):
        if model is None:
            with torch.random.fork_rng():
                torch.manual_seed(3)
                model = sdegen.ScoreModel(sdegen.UNet(1, base=8, dropout=0.5), sdegen.VPSDE())
        return sdegen.train(model, sdegen.dsm_loss, x, steps, batch_size=4, lr=1e-3, seed=seed, start_step=start,
                            optimizer=opt, ema_decay=None, progress=False)

    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = run(4)
    torch.rand(1)  # the global generator moves between the runs
    state = torch.get_rng_state()
    b = run(4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.losses == b.losses
    first = run(2)
    second = run(2, start=2, model=first.model, opt=first.optimizer, seed=first.generator)
    assert first.losses + second.losses == a.losses
    for p, q in zip(a.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
