"""Captured sampling loops: a fixed-step run recorded once as a CUDA graph and replayed.

A small network spends most of a step waiting for kernel launches from Python. ``sample(..., capture=True)``
records the whole run (every step's kernels, the noise included) once into a CUDA graph, then each call copies
its x_T and per-example seeds into the graph's input buffers and replays the graph: one launch per run. The
replay runs the same kernels with the same constants as the eager loop, so the samples are the eager samples.

Limits:
- CUDA only; fixed-step samplers only (not the adaptive or back-end methods); per-example noise or a
  deterministic sampler (``noise="generator"`` is not captured); no ``progress`` bar and no ``return_trajectory``;
- inference only: the run is captured and replayed under ``torch.no_grad()``;
- a graph serves one (SDE, model, sampler settings, grid, shape, dtype, device, denoise): another of these
  captures a new graph (the most recent few are kept). The graph reads the network's parameters where they are,
  so weights updated in place (an optimiser step, ``load_state_dict``) are seen by the next replay; a network
  whose parameters are replaced by new tensors, or whose forward pass changes with Python state, needs a new
  capture (``clear_captured()``);
- tensors that the model or the sampler reads (guidance labels, inpainting's known values and mask) must already
  be on the state's device: a copy from the host cannot be recorded, and CUDA refuses the capture;
- the first capture costs one eager warm-up run plus the capture itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch

from . import noise as _noise

KEEP = 4  # captured runs kept; each holds its graph's memory pool
_CACHE: "OrderedDict[tuple, CapturedRun]" = OrderedDict()

Body = Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, dict]]


class _CudaGraph:
    """Records ``fn()`` into a CUDA graph after one warm-up run on a side stream (the usual recipe: lazy
    initialisation of cuBLAS/cuDNN workspaces must not happen during capture)."""

    def __init__(self, fn: Callable[[], tuple], device: torch.device):
        with torch.cuda.device(device):  # the capture stream is the current device's: make it the state's
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn()
        # the graph reads memory it did not allocate: the closure's objects (sampler, model, their device
        # tensors) and the noise streams' cached element terms, which the cache may drop later
        self.fn = fn
        self.cached_terms = [t for t in _noise._ELEMENT_TERMS.values() if t.device == device]

    def replay(self) -> tuple:
        self.graph.replay()
        return self.outputs


class _Rerun:
    """Runs ``fn()`` again at every replay, on the same buffers: what a graph replays, without the graph.
    It checks everything about a capture except the graph itself, on any device."""

    def __init__(self, fn: Callable[[], tuple], device: torch.device):
        self.fn = fn
        self.outputs = fn()

    def replay(self) -> tuple:
        self.outputs = self.fn()
        return self.outputs


class CapturedRun:
    """One captured run: input buffers for x_T (B, ...) and the per-example seeds (B,), and a graph that maps them
    to the samples. ``body(x_T, seeds)`` is the eager run; it returns (samples, counts), where counts (e.g. NFE)
    are read at capture and hold for every replay."""

    def __init__(self, body: Body, x_T: torch.Tensor, seeds: Optional[torch.Tensor], recorder=None):
        recorder = recorder or (_CudaGraph if x_T.device.type == "cuda" else _Rerun)
        self.x_T = torch.empty_like(x_T).copy_(x_T)
        self.seeds = None if seeds is None else torch.empty_like(seeds).copy_(seeds)
        self.counts: dict = {}

        def run():
            with torch.no_grad():
                out, counts = body(self.x_T, self.seeds)
            self.counts = counts
            return (out,)

        self.recorder = recorder(run, x_T.device)

    def __call__(self, x_T: torch.Tensor, seeds: Optional[torch.Tensor]) -> torch.Tensor:
        self.x_T.copy_(x_T)
        if self.seeds is not None:
            self.seeds.copy_(seeds)
        (out,) = self.recorder.replay()
        return out.clone()  # the graph's output buffer is overwritten by the next replay


def captured(key: tuple, body: Body, x_T: torch.Tensor, seeds: Optional[torch.Tensor], recorder=None
             ) -> Tuple[torch.Tensor, dict]:
    """The samples of ``body(x_T, seeds)`` from the captured run stored under ``key`` (captured now if absent)."""
    run = _CACHE.pop(key, None)
    if run is None:
        run = CapturedRun(body, x_T, seeds, recorder)
        while len(_CACHE) >= KEEP:
            _CACHE.popitem(last=False)
    _CACHE[key] = run
    return run(x_T, seeds), run.counts


def clear_captured() -> None:
    """Drop every captured run (and the memory its graph holds)."""
    _CACHE.clear()


def check_capture(device: torch.device, sampler, noise: str, stochastic: bool, progress: bool,
                  return_trajectory: bool, requires_grad: bool) -> None:
    """Raise a ValueError naming what stands in the way of ``capture=True``."""
    from .samplers import StepSampler

    if device.type != "cuda":
        raise ValueError(f"capture=True records the run as a CUDA graph and needs a CUDA device; got {device}. "
                         "Leave capture unset on other devices.")
    if not isinstance(sampler, StepSampler):
        raise ValueError(f"capture=True applies to sdegen's step samplers (StepSampler); got "
                         f"{type(sampler).__name__}, which runs the whole span at once (an adaptive solver, or the "
                         "torchdiffeq/torchsde back ends of method='ode'/'sde'), so it cannot be recorded as a graph.")
    if stochastic and noise != "per_example":
        raise ValueError(f"capture=True needs noise='per_example' for a stochastic sampler; got noise={noise!r}.")
    if progress or return_trajectory:
        raise ValueError("capture=True replays the whole run at once: it cannot show progress or return a "
                         "trajectory; set progress=False and return_trajectory=False.")
    if requires_grad:
        raise ValueError("capture=True samples without gradients; x_T requires grad: pass x_T.detach() or leave "
                         "capture unset to differentiate through sampling.")
