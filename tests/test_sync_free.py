"""The step loops of the fixed-step samplers never wait for the device.

A run on the ``meta`` device (tensors with shapes and dtypes but no values) cannot read a state value on the host,
so any ``.item()``, ``bool()`` or ``.tolist()`` of a state-derived tensor raises there; a dispatch mode counts the
host-to-device copies, which block on CUDA too. On a CUDA machine the same runs go through
``torch.cuda.set_sync_debug_mode("error")``."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sdegen
from sdegen.samplers import SAMPLERS, StepSampler, get_sampler

FIXED_STEP = sorted(name for name in SAMPLERS
                    if name != "inpaint" and isinstance(get_sampler(name), StepSampler))


class HostToDeviceCopies(TorchDispatchMode):
    """Counts copies of host tensors to another device made by the operations it sees."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "copy" in func.__name__:
            sources = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            targets = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
            if any(a.device.type == "cpu" for a in sources) and any(o.device.type != "cpu" for o in targets):
                self.copies.append(func.__name__)
        return out


class TinyEpsNet(torch.nn.Module):
    """eps(x, t) = W x + t b: a network with parameters and a time input, on any device."""

    def __init__(self, dim, device):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, device=device)
        self.time = torch.nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x, t):
        return self.lin(x) + t[:, None] * self.time


def _models(device, dtype):
    net = TinyEpsNet(3, device).to(dtype)
    function = lambda x, t: -x / (1.0 + t.reshape(-1, 1))  # noqa: E731
    labels = torch.zeros(16, dtype=torch.long, device=device)
    lin = torch.nn.Linear(3, 4, device=device).to(dtype)

    def conditional(x, t, y):  # a plain callable with a label input: y = 4 is the null label
        return function(x, t) + 0.1 * y[:, None].to(x.dtype)

    return {"function": function,
            "eps network": sdegen.ScoreModel(net, sdegen.VPSDE(), prediction="eps"),
            "classifier guidance": sdegen.classifier_guidance(function, lambda x, t: lin(x) + t[:, None], labels,
                                                              1.0, num_classes=4),
            "classifier-free guidance": sdegen.classifier_free_guidance(conditional, labels, 2.0, null_label=4),
            "mixture oracle": sdegen.GaussianMixture.random(dim=3, n_components=2, seed=0)}


def _run(name, model, device, dtype):
    x_T = torch.empty(16, 3, device=device, dtype=dtype)
    name, _, variant = name.partition(":")  # "dpmpp_sde:tree": a sampler with one of its options
    options = {"brownian": variant} if variant else {}
    return sdegen.sample(sdegen.VPSDE(), model, x_T, method=name, steps=5, seed=0, return_info=True, **options)


@pytest.mark.parametrize("name", FIXED_STEP + ["dpmpp_sde:tree", "dpmpp_2m_sde:tree"])
def test_fixed_step_loop_reads_nothing_back_and_copies_nothing_in(name):
    for dtype in (torch.float32, torch.float64):
        for label, model in _models("meta", dtype).items():
            with torch.no_grad():  # once per model and device (the oracle copies its parameters there once)
                _run(name, model, "meta", dtype)
            spy = HostToDeviceCopies()
            with torch.no_grad(), spy:
                x, info = _run(name, model, "meta", dtype)
            assert x.device.type == "meta" and x.dtype == dtype and x.shape == (16, 3)
            assert info.nfe == get_sampler(name.partition(":")[0]).total_nfe(5), (label, info.nfe)
            assert spy.copies == [], (label, spy.copies)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FIXED_STEP + ["dpmpp_sde:tree", "dpmpp_2m_sde:tree"])
def test_fixed_step_loop_under_cuda_sync_debug_mode(name):
    for label, model in _models("cuda", torch.float32).items():
        _run(name, model, "cuda", torch.float32)  # warm-up: one-time checks and caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                x, _ = _run(name, model, "cuda", torch.float32)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(x).all(), label


def _classifier(device):
    lin = torch.nn.Linear(3, 4, device=device)
    return lambda x, t: lin(x) + t[:, None]


def test_training_losses_read_nothing_back():
    """The losses a training step calls never read a value of the data, the labels or the network's output back
    to the host: on ``meta`` any such read raises. (An int seed draws t and the noise from a host generator;
    sdegen.train passes a generator on the data's device instead.)"""
    x0 = torch.empty(8, 3, device="meta")
    y = torch.empty(8, dtype=torch.long, device="meta")
    net = sdegen.ScoreModel(TinyEpsNet(3, "meta"), sdegen.VPSDE(), prediction="eps")
    with torch.no_grad():
        losses = [sdegen.dsm_loss(net, x0, seed=0),
                  sdegen.classifier_loss(_classifier("meta"), sdegen.VPSDE(), x0, y, seed=0)]
    assert all(v.device.type == "meta" and v.shape == () for v in losses)


def test_rank_loss_seeds_its_generator_once_from_the_host():
    """train_ddp's per-rank loss takes its generator from (seed, rank) on the host: ranks differ, a rank's draws
    continue from step to step, and the shared shuffling generator is not advanced by the loss."""
    from sdegen.distributed import DistributedContext, _rank_loss

    def draws(rank, steps=2):
        ctx = DistributedContext(rank=rank, world_size=2, local_rank=0, device=torch.device("cpu"))
        loss = _rank_loss(lambda net, batch, gen: torch.rand(2, generator=gen), ctx, 4, True, seed=5)
        shared = torch.Generator().manual_seed(0)
        out = [loss(None, torch.zeros(8, 1), shared) for _ in range(steps)]
        return out, shared.initial_seed(), torch.rand(1, generator=shared)

    (a0, a1), _, shared_next = draws(0)
    (b0, _), _, _ = draws(1)
    assert not torch.equal(a0, a1) and not torch.equal(a0, b0)
    assert torch.equal(draws(0)[0][0], a0)
    assert torch.equal(shared_next, torch.rand(1, generator=torch.Generator().manual_seed(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifier_loss_on_cuda_marks_out_of_range_labels_with_nan():
    x0 = torch.randn(6, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, -1], device="cuda")
    clf = _classifier("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        per = sdegen.classifier_loss(clf, sdegen.VPSDE(), x0, y, seed=0, return_per_example=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(per[:4]).all() and torch.isnan(per[4:]).all()
    y_valid = torch.tensor([0, 1, 2, 3, 0, 0])  # on the host: checked, and the same draws of t and noise
    ref = sdegen.classifier_loss(clf, sdegen.VPSDE(), x0, y_valid, seed=0, return_per_example=True)
    assert torch.allclose(per[:4], ref[:4])


@pytest.mark.parametrize("kw", [dict(steps=5), dict(solver="heun", steps=5)])
def test_the_torchsde_path_runs_on_another_device(kw):
    """ReverseSDE.g built its diffusion on the host clock's device: torchsde's product with the Brownian increment
    then mixed a (B, D) CPU tensor with a device one, so method="sde" could not run off the CPU at all."""
    x_T = torch.empty(4, 3, device="meta")
    spy = HostToDeviceCopies()
    with spy:
        x = sdegen.sample(sdegen.VPSDE(), lambda x, t: -x, x_T, method="sde",
                          seed=torch.zeros(4, dtype=torch.long, device="meta"), **kw)
    assert x.device.type == "meta" and x.shape == (4, 3)
    assert spy.copies == []  # the host clock's times were copied to the device at every drift evaluation


def test_device_labels_and_generator_noise_read_nothing_back():
    """Labels on a device are checked there (an assert on the device, no host read), and noise="generator" reads
    its seed only when a draw is made: a deterministic run on a device reads nothing."""
    labels = torch.zeros(8, dtype=torch.long, device="meta")
    model = sdegen.ScoreModel(sdegen.MLP(3, num_classes=4).to("meta"), sdegen.VPSDE(), prediction="eps")
    sdegen.classifier_free_guidance(model, labels, 2.0)
    x = sdegen.sample(sdegen.VPSDE(), lambda x, t: -x, torch.empty(8, 3, device="meta"), method="ddim", steps=3,
                      seed=0, noise="generator")
    assert x.device.type == "meta"
