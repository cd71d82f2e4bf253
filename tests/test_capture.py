"""Captured sampling loops (sdegen.capture): the replayed run equals the eager run.

On the CPU the graph is replaced by a recorder that reruns the captured body on the same input buffers, which
checks everything but the graph itself (buffers, seeds, counts, the cache and its keys); on CUDA the same checks
run through real CUDA graphs."""

import pytest
import torch

import sdegen
from sdegen import capture, sampling
from sdegen.analytic import GaussianMixture

CASES = [("ddim", {}), ("dpmpp_2m", {}), ("heun", {}), ("dpmpp_2m_sde", {}), ("euler_maruyama", {}),
         ("pc", {"snr": 0.1})]


@pytest.fixture
def on_any_device(monkeypatch):
    """capture=True allowed off CUDA (with the rerun recorder) for the duration of a test."""
    real = sampling.check_capture

    def allow_any_device(device, *args):
        return real(torch.device("cuda"), *args)

    monkeypatch.setattr(sampling, "check_capture", allow_any_device)
    capture.clear_captured()
    yield
    capture.clear_captured()


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_replays_equal_the_eager_run(on_any_device, name, options):
    """Three calls with new x_T and seeds: each replay gives exactly the eager samples and the eager NFE."""
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    for call, seed in enumerate((0, 7, 123)):
        x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        eager, info = sdegen.sample(sde, gm, x_T, method=name, steps=6, seed=seed + 1, denoise=True,
                                    return_info=True, **options)
        replay, cinfo = sdegen.sample(sde, gm, x_T, method=name, steps=6, seed=seed + 1, denoise=True,
                                      capture=True, return_info=True, **options)
        assert torch.equal(replay, eager), (call, (replay - eager).abs().max())
        assert cinfo.nfe == info.nfe
        assert len(capture._CACHE) == 1  # one captured run serves every call with these settings


def test_other_settings_capture_another_run(on_any_device):
    sde, gm = sdegen.VESDE(), GaussianMixture.ring()
    x_T = sde.prior_std * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    for steps in (4, 5):
        for schedule in ("log_snr", "edm"):
            got = sdegen.sample(sde, gm, x_T, method="dpmpp_2m", steps=steps, schedule=schedule, capture=True)
            want = sdegen.sample(sde, gm, x_T, method="dpmpp_2m", steps=steps, schedule=schedule)
            assert torch.equal(got, want)
    assert len(capture._CACHE) == capture.KEEP


def test_the_caller_keeps_its_tensors(on_any_device):
    gm = GaussianMixture.ring()
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    first = sdegen.sample(sdegen.VPSDE(), gm, x_T, method="ddim", steps=3, capture=True)
    before = first.clone()
    sdegen.sample(sdegen.VPSDE(), gm, -x_T, method="ddim", steps=3, capture=True)
    assert torch.equal(first, before)  # a replay does not overwrite an earlier result


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ode"), "step samplers"),
    (dict(method="ode", solver="rk4", steps=3), "step samplers"),
    (dict(method="adaptive"), "step samplers"),
    (dict(method="euler_maruyama", noise="generator", steps=3), "per_example"),
    (dict(method="ddim", steps=3, progress=True), "progress"),
    (dict(method="ddim", steps=3, return_trajectory=True), "trajectory"),
])
def test_what_cannot_be_captured_is_named(on_any_device, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdegen.sample(sdegen.VPSDE(), GaussianMixture.ring(), shape=(4, 2), seed=0, capture=True, **kwargs)


def test_options_that_print_alike_capture_runs_of_their_own(on_any_device):
    """The key holds tensors and objects by identity, not by their printed form: an inpainting image whose repr
    equals another's (values 1.00001 and 1.00002) and a predictor whose repr hides its setting replayed the first
    call's run."""
    class Shift(sdegen.samplers.EulerMaruyama):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def step(self, ctx, x, t, t_next, state):
            x, state = super().step(ctx, x, t, t_next, state)
            return x + self.shift, state

        def __repr__(self):
            return "Shift()"

    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[:, 0] = True
    for value in (1.00001, 1.00002):
        known = torch.full((4, 2), value, dtype=torch.float64)
        kw = dict(shape=(4, 2), dtype=torch.float64, method="inpaint", known=known, mask=mask, steps=5, seed=0)
        assert torch.equal(sdegen.sample(sde, gm, capture=True, **kw), sdegen.sample(sde, gm, **kw))
    for shift in (0.0, 5.0):
        kw = dict(shape=(4, 2), method="pc", predictor=Shift(shift), corrector_steps=0, steps=3, seed=0)
        assert torch.equal(sdegen.sample(sde, gm, capture=True, **kw), sdegen.sample(sde, gm, **kw))
    assert len(capture._CACHE) == 4


def test_a_refused_capture_draws_no_seed():
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="capture=True"):
        sdegen.sample(sdegen.VPSDE(), GaussianMixture.ring(), shape=(4, 2), method="euler_maruyama", steps=3,
                      capture=True, **({} if not torch.cuda.is_available() else {"noise": "generator"}))
    assert torch.equal(torch.get_rng_state(), state)


def test_capture_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="capture=True .* CUDA"):
        sdegen.sample(sdegen.VPSDE(), GaussianMixture.ring(), shape=(4, 2), method="ddim", steps=3, seed=0,
                      capture=True)
    with pytest.raises(TypeError, match="capture"):
        sdegen.sample(sdegen.VPSDE(), GaussianMixture.ring(), shape=(4, 2), method="ddim", steps=3, seed=0,
                      capture="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_cuda_graph_replays_equal_the_eager_run(name, options):
    capture.clear_captured()
    sde = sdegen.VPSDE()
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)).cuda()
    model = sdegen.ScoreModel(lambda x, t: net(torch.cat([x, t[:, None]], 1)), sde, prediction="eps")
    for seed in (0, 1, 2):
        x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = sdegen.sample(sde, model, x_T, method=name, steps=8, seed=seed, **options)
        replay = sdegen.sample(sde, model, x_T, method=name, steps=8, seed=seed, capture=True, **options)
        torch.testing.assert_close(replay, eager, rtol=1e-6, atol=1e-6)
    capture.clear_captured()


def test_options_made_in_inference_mode_are_keyed(on_any_device):
    """An inference tensor keeps no version counter: the key read one and raised."""
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    with torch.inference_mode():
        known = torch.ones(4, 2, dtype=torch.float64)
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[:, 0] = True
    kw = dict(shape=(4, 2), dtype=torch.float64, method="inpaint", known=known, mask=mask, steps=3, seed=0)
    assert torch.equal(sdegen.sample(sde, gm, capture=True, **kw), sdegen.sample(sde, gm, **kw))
