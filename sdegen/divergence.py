"""Divergence of a vector field, exactly or by the Hutchinson-Skilling trace estimator.

A field here is a function ``fn(x) -> f`` on states of shape (B, ...) whose example i depends only on x[i]
(the probability-flow drift of a score model). Its divergence per example is the trace of the per-example
Jacobian df_i/dx_i:

- exact: tr J = sum_j e_j^T J e_j, one vector-Jacobian product per dimension, vectorised with
  ``torch.func.vmap`` over the backward pass (and chunked over dimensions when B * D * D is large);
- Hutchinson-Skilling: tr J = E[v^T J v] for probes v with E[v v^T] = I (Hutchinson 1990; Skilling 1989),
  as used by FFJORD (Grathwohl et al. 2019, section 3.1) and by Song et al. 2021 (appendix D.2) for
  likelihoods; K probes per example are averaged.

Each evaluation computes the field and the products from one forward pass and one (vmapped) backward pass.
With ``create_graph=True`` the divergence is itself differentiable (for adjoint training).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._deprecation import renamed
from ._validate import check_device, check_floating_dtype, check_int
from .noise import Seed, make_seeds, normal_from_seeds

Field = Callable[[torch.Tensor], torch.Tensor]
PROBE_KINDS = ("rademacher", "gaussian")
_CHUNK_ELEMENTS = 1 << 24  # cap on the elements of one batched set of basis cotangents


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def check_differentiable_output(out, x: torch.Tensor, what: str = "the field") -> torch.Tensor:
    """``out`` must be a tensor of x's shape that depends on x through autograd (the divergence needs its gradient)."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return a tensor of x's shape {tuple(x.shape)}; got {got}.")
    if not out.requires_grad:
        if torch.is_inference_mode_enabled():
            raise TypeError(f"{what} cannot be differentiated inside torch.inference_mode(), and the divergence needs "
                            "its gradient: call it under torch.no_grad() instead (which works) or outside both.")
        raise TypeError(f"{what} returned a tensor that does not depend on x through autograd (computed under "
                        "torch.no_grad() inside the field, or outside torch?); the divergence needs a differentiable "
                        "field.")
    return out


def _forward(fn: Field, x: torch.Tensor) -> torch.Tensor:
    return check_differentiable_output(fn(x), x)


def _vjps(f: torch.Tensor, x: torch.Tensor, vs: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """v^T df/dx for each v in vs (K, B, ...): vmap over the backward pass, shape (K, B, ...)."""
    def vjp(v: torch.Tensor) -> torch.Tensor:
        g, = torch.autograd.grad(f, x, v, retain_graph=True, create_graph=create_graph, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    if vs.shape[0] == 1:
        return vjp(vs[0])[None]
    return torch.func.vmap(vjp)(vs)


def divergence_exact(fn: Field, x: torch.Tensor, *, chunk_size: Optional[int] = None,
                     create_graph: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The field and its exact divergence tr(df_i/dx_i) per example.

    Args:
        fn: field on (B, ...) states, example i depending only on x[i].
        x: (B, ...) state.
        chunk_size: basis vectors per vmapped backward pass (default: all D if B * D * D <= 2**24 elements).
        create_graph: keep the graph of the divergence (default: whether grad mode is on at the call).
    Returns:
        (f, div): f of x's shape, div of shape (B,).
    Cost: one forward pass and ceil(D / chunk_size) vmapped backward passes of D vector-Jacobian products.
    """
    create_graph = torch.is_grad_enabled() if create_graph is None else bool(create_graph)
    B, D = x.shape[0], x[0].numel()
    if chunk_size is None:
        chunk_size = max(1, min(D, _CHUNK_ELEMENTS // max(1, B * D)))
    else:
        chunk_size = check_int(chunk_size, "chunk_size", lo=1)
    with torch.enable_grad():
        x = _leaf(x)
        f = _forward(fn, x)
        eye = torch.eye(D, dtype=x.dtype, device=x.device)
        div = torch.zeros(B, dtype=x.dtype, device=x.device)
        for lo in range(0, D, chunk_size):
            hi = min(D, lo + chunk_size)
            # basis e_j for every example: cotangents (c, B, ...)
            vs = eye[lo:hi, None, :].expand(hi - lo, B, D).reshape((hi - lo,) + tuple(x.shape))
            g = _vjps(f, x, vs, create_graph).reshape(hi - lo, B, D)
            idx = torch.arange(lo, hi, device=x.device)
            div = div + g[torch.arange(hi - lo, device=x.device), :, idx].sum(0)
    return (f, div) if create_graph else (f.detach(), div.detach())


def divergence_hutchinson(fn: Field, x: torch.Tensor, probes: torch.Tensor, *,
                          create_graph: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The field and the Hutchinson-Skilling estimate (1/K) sum_k v_k^T (df_i/dx_i) v_k per example.

    Args:
        fn: field on (B, ...) states, example i depending only on x[i].
        x: (B, ...) state.
        probes: (K, B, ...) probe vectors with E[v v^T] = I (see :func:`make_probes`).
        create_graph: keep the graph of the estimate (default: whether grad mode is on at the call).
    Returns:
        (f, div): f of x's shape, div of shape (B,). Unbiased for the exact divergence; its variance is
        2 ||(J + J^T)/2||_F^2 / K for Gaussian probes and that minus 2 sum_j J_jj^2 / K for Rademacher probes.
    """
    create_graph = torch.is_grad_enabled() if create_graph is None else bool(create_graph)
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}); "
                         f"got {tuple(probes.shape)}.")
    with torch.enable_grad():
        x = _leaf(x)
        f = _forward(fn, x)
        vs = probes.to(dtype=x.dtype, device=x.device)
        g = _vjps(f, x, vs, create_graph)
        div = (g * vs).reshape(vs.shape[0], x.shape[0], -1).sum(2).mean(0)
    return (f, div) if create_graph else (f.detach(), div.detach())


def make_probes(shape, probes: int = 1, probe: Optional[str] = None, *, seed: Seed = None,
                dtype: torch.dtype = torch.float32, device=None, noise: Optional[str] = None) -> torch.Tensor:
    """K probe vectors per example for :func:`divergence_hutchinson`, shape (K, B, ...).

    probe="rademacher" (default): entries +-1 with probability 1/2; "gaussian": N(0, 1) entries (``noise=`` is
    its deprecated name). Probe k of example i
    depends only on the example's seed (see :func:`sdegen.noise.make_seeds`), so an estimate does not
    depend on the batch it is computed in.
    """
    shape = tuple(shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must be (B, ...) with B >= 1; got {shape}.")
    probes = check_int(probes, "probes", lo=1, hint=" (probes per example)")
    check_floating_dtype(dtype, "dtype", "integer probes would be truncated")
    device = None if device is None else check_device(device)
    probe, used = renamed("make_probes", "probe", probe, "noise", noise)
    probe = "rademacher" if probe is None else probe
    if probe not in PROBE_KINDS:
        raise ValueError(f"{used} (the probe law, formerly named noise) must be one of {PROBE_KINDS}; got {probe!r}.")
    seeds = make_seeds(seed, shape[0], device)
    v = torch.stack([normal_from_seeds(seeds, (1 << 44) + k, shape[1:], dtype) for k in range(probes)])
    if probe == "rademacher":
        v = torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))
    return v


def hutchinson_variance(jacobian: torch.Tensor, probe: Optional[str] = None, *, noise: Optional[str] = None
                        ) -> torch.Tensor:
    """Variance of the one-probe estimate v^T J v for per-example Jacobians (B, D, D), shape (B,), for the probe law
    ``probe`` ("rademacher" by default, or "gaussian"; ``noise=`` is its deprecated name).

    With A = (J + J^T)/2: Gaussian probes give 2 ||A||_F^2; Rademacher probes 2 (||A||_F^2 - sum_j A_jj^2).
    """
    probe, used = renamed("hutchinson_variance", "probe", probe, "noise", noise)
    probe = "rademacher" if probe is None else probe
    if probe not in PROBE_KINDS:
        raise ValueError(f"{used} (the probe law, formerly named noise) must be one of {PROBE_KINDS}; got {probe!r}.")
    a = 0.5 * (jacobian + jacobian.transpose(-1, -2))
    var = 2.0 * a.pow(2).sum((-1, -2))
    if probe == "rademacher":
        var = var - 2.0 * torch.diagonal(a, dim1=-2, dim2=-1).pow(2).sum(-1)
    return var


__all__ = ["divergence_exact", "divergence_hutchinson", "make_probes", "hutchinson_variance", "PROBE_KINDS"]
