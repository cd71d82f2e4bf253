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
    return {"function": lambda x, t: -x / (1.0 + t.reshape(-1, 1)),
            "eps network": sdegen.ScoreModel(net, sdegen.VPSDE(), prediction="eps")}


def _run(name, model, device, dtype):
    x_T = torch.empty(16, 3, device=device, dtype=dtype)
    return sdegen.sample(sdegen.VPSDE(), model, x_T, method=name, steps=5, seed=0, return_info=True)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_fixed_step_loop_reads_nothing_back_and_copies_nothing_in(name):
    for dtype in (torch.float32, torch.float64):
        for label, model in _models("meta", dtype).items():
            spy = HostToDeviceCopies()
            with torch.no_grad(), spy:
                x, info = _run(name, model, "meta", dtype)
            assert x.device.type == "meta" and x.dtype == dtype and x.shape == (16, 3)
            assert info.nfe == 5 * get_sampler(name).nfe_per_step, (label, info.nfe)
            assert spy.copies == [], (label, spy.copies)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FIXED_STEP)
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
