"""Shape, dtype and validation helpers shared by every module (the bottom of the import graph)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Union

import torch

Time = Union[float, torch.Tensor]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a 0-d or (B,) tensor so that it broadcasts against a tensor of rank ``ndim``."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def bcast(v: torch.Tensor, x: torch.Tensor) -> Union[torch.Tensor, float]:
    """Per-example coefficient ``v`` (0-d or (B,)) cast to ``x``'s dtype/device and shaped to broadcast with x.

    A 0-d host tensor without gradient (a coefficient at a grid time) becomes a Python float, which multiplies x
    in x's dtype on any device: on an accelerator it rides along with the kernel launch, where a tensor would need
    a blocking host-to-device copy at every step.
    """
    if v.ndim == 0 and v.device.type == "cpu" and not v.requires_grad:
        return float(v)
    return append_dims(v.to(dtype=x.dtype, device=x.device), x.ndim)


def as_time(t: Time, name: str = "t") -> torch.Tensor:
    """Turn a float, int or tensor time into a floating tensor (Python numbers become float64 0-d tensors)."""
    if isinstance(t, torch.Tensor):
        if t.ndim > 1:
            raise ValueError(f"{name} must be a float, a 0-d tensor or a (B,) tensor; got shape {tuple(t.shape)}.")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real (floating or integer) tensor; got {t.dtype}.")
        return t if t.is_floating_point() else t.to(torch.float64)
    if isinstance(t, Real) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=torch.float64)
    raise TypeError(f"{name} must be a float or a tensor; got {type(t).__name__}.")


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def check_range(t: torch.Tensor, lo: float, hi: float, name: str = "t") -> None:
    """Raise ValueError unless every entry of t lies in [lo, hi] and is finite.

    On an accelerator the check is queued on the device (``torch._assert_async``) instead of forcing a
    host-device sync on every call of a solver loop; it then fails with a device-side assertion.
    """
    ok = (t >= lo) & (t <= hi)
    if not _on_host(t):
        torch._assert_async(ok.all(), f"{name} must lie in [{lo:g}, {hi:g}]")
        return
    bad = ~ok
    if bool(bad.any()):
        got = t[bad].flatten()[:4].tolist()
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}]; got values {got} outside it.")


def check_batch(t: torch.Tensor, x: torch.Tensor, name: str = "t") -> None:
    """A (B,) time must match the batch size of x; a 0-d time applies to every example."""
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension: shape (B, ...); got a 0-d tensor.")
    if t.ndim == 1 and t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has batch size {t.shape[0]} but x has batch size {x.shape[0]}; "
                         f"pass a float, a 0-d tensor or a tensor of shape ({x.shape[0]},).")


def batch_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expand a 0-d or (B,) time to shape (B,) on x's device (the form a score network receives). A host scalar
    (a grid time) fills the tensor on the device in one launch: copying it there would wait for the device."""
    if t.ndim == 0 and t.device.type == "cpu" and x.device.type != "cpu" and not t.requires_grad:
        return torch.full(x.shape[:1], float(t), dtype=t.dtype, device=x.device)
    t = t.to(device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number > 0; got {type(value).__name__} {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return float(value)


def check_finite_tensor(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32 or float64); got {x.dtype}.")
    if not _on_host(x):
        torch._assert_async(~torch.isnan(x).any(), f"{name} contains NaN")
    elif bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN.")


def flat_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example Euclidean norm of a (B, ...) tensor, shape (B,)."""
    return x.reshape(x.shape[0], -1).norm(dim=1)
