"""Exact log-likelihoods of score-based models through the probability-flow ODE.

The probability-flow ODE dx/dt = f~(x, t) = f(t) x - 1/2 g(t)^2 s(x, t) (Song et al. 2021, eq. 13) is a
continuous normalizing flow, so by the instantaneous change of variables (Chen et al. 2018, theorem 1;
Song et al. 2021, section 4.3 and appendix D.2)

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{T} div f~(x_t, t) dt,

where x_t solves the ODE from x_{t_min} = x. :func:`log_likelihood` integrates the augmented state
(x_t, int div f~) forward in time with torchdiffeq, the divergence exact or estimated by Hutchinson-Skilling
probes held fixed along the solve (:mod:`sdegen.divergence`). For discrete data, :func:`dequantize` and
:func:`bits_per_dim` give bits per dimension under uniform dequantization.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from ._deprecation import renamed
from ._util import batch_time, check_finite_tensor
from .models import as_model
from .backends import ODE_METHODS, solve_augmented
from .divergence import (PROBE_KINDS, check_differentiable_output, divergence_exact, divergence_hutchinson,
                         make_probes)
from .noise import Seed, make_seeds, normal_from_seeds
from .sde import SDE

DIVERGENCES = ("hutchinson", "exact")
_LN2 = math.log(2.0)


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` computed, per example.

    log_prob: (B,) log p_{t_min}(x) in nats (for ``levels=...``: the dequantized lower bound on log P(x) of
        the discrete data, in nats, with the density of the scaled data converted as in :func:`bits_per_dim`).
    bpd: (B,) bits per dimension, -log_prob / (D ln 2) (see :func:`bits_per_dim` for discrete data).
    latent: x_T, the end of the flow, x's shape.
    prior_log_prob: (B,) log p_T(x_T) under the prior used.
    delta_log_prob: (B,) the integral of the divergence from t_min to T.
    nfe: evaluations of the augmented field (each one score forward pass plus its backward pass(es)).
    steps: accepted solver steps. wall_time: seconds. t_min, T: the integration interval.
    """

    log_prob: torch.Tensor
    bpd: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: int
    steps: int
    wall_time: float
    t_min: float
    T: float


class _AugmentedFlow(torch.nn.Module):
    """d/dt (x, l) = (f~(x, t), div f~(x, t)) on flattened states y = (x, l) of shape (B, D + 1)."""

    def __init__(self, sde: SDE, score: Callable, event_shape: Tuple[int, ...], t_lo: float, t_hi: float,
                 probes: Optional[torch.Tensor], chunk_size: Optional[int]):
        super().__init__()
        # the model is a submodule, so that adjoint solves find its parameters
        self.sde, self.model, self.event_shape = sde, as_model(score, sde), event_shape
        self.t_lo, self.t_hi, self.probes, self.chunk_size = t_lo, t_hi, probes, chunk_size

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = check_differentiable_output(self.model.score(x, batch_time(t, x).to(x.dtype)), x, "score(x, t)")
        return self.sde.reverse_drift(x, t, s, True)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # solvers probe past the interval's end; the score is only asked for times inside [t_min, T]
        t = t.clamp(self.t_lo, self.t_hi)
        x = y[:, :-1].reshape((y.shape[0],) + self.event_shape)
        field = lambda z: self.drift(z, t)  # noqa: E731
        if self.probes is None:
            f, div = divergence_exact(field, x, chunk_size=self.chunk_size)
        else:
            f, div = divergence_hutchinson(field, x, self.probes)
        return torch.cat([f.reshape(y.shape[0], -1), div[:, None].to(f.dtype)], dim=1)


def _check_x(x: torch.Tensor) -> None:
    check_finite_tensor(x, "x")
    if x.ndim < 1 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1 and at least one value per example; "
                         f"got {tuple(x.shape)}.")
    if bool(torch.isinf(x).any()):
        raise ValueError("x contains inf; log-likelihoods need finite data.")


def _check_options(divergence: str, probes: int, probe: Tuple[str, str], solver: Tuple[str, str], rtol: float,
                   atol: float, max_steps: int) -> None:
    """Validate the options; ``probe`` and ``solver`` are (value, the name the caller gave it under)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}; got {divergence!r}.")
    if not (isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1):
        raise ValueError(f"probes must be a positive int (Hutchinson probes per example); got {probes!r}.")
    if probe[0] not in PROBE_KINDS:
        raise ValueError(f"{probe[1]} must be one of {PROBE_KINDS} (the law of the Hutchinson probes); "
                         f"got {probe[0]!r}.")
    if solver[0] not in ODE_METHODS:
        raise ValueError(f"{solver[1]} must be a torchdiffeq method, one of {ODE_METHODS}; got {solver[0]!r}.")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive int; got {max_steps!r}.")


def _resolve_t_min(sde: SDE, t_min: Optional[float]) -> float:
    t_min = sde.t_min if t_min is None else t_min
    if not (isinstance(t_min, (int, float)) and 0.0 < t_min < sde.T):
        raise ValueError(f"t_min must lie in (0, T={sde.T:g}); got {t_min!r}.")
    return float(t_min)


def _prior_log_prob(prior: Optional[Callable], sde: SDE, x_T: torch.Tensor) -> torch.Tensor:
    lp = sde.prior_log_prob(x_T) if prior is None else prior(x_T)
    if not isinstance(lp, torch.Tensor) or lp.shape != (x_T.shape[0],):
        got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ValueError(f"prior(x_T) must return per-example log-densities of shape ({x_T.shape[0]},); got {got}.")
    return lp.to(x_T.dtype)


def log_likelihood(sde: SDE, score, x: torch.Tensor, *, divergence: str = "hutchinson", probes: int = 1,
                   probe: Optional[str] = None, solver: Optional[str] = None, rtol: float = 1e-5,
                   atol: float = 1e-5, steps: Optional[int] = None, t_min: Optional[float] = None,
                   prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, seed: Seed = None,
                   max_steps: int = 10_000, adjoint: bool = False,
                   adjoint_params: Optional[Sequence[torch.Tensor]] = None, chunk_size: Optional[int] = None,
                   levels: Optional[int] = None, data_range: Tuple[float, float] = (-1.0, 1.0),
                   method: Optional[str] = None, noise: Optional[str] = None) -> LikelihoodResult:
    """Per-example log p_{t_min}(x) through the probability-flow ODE (Song et al. 2021, appendix D.2).

    Args:
        sde: the forward SDE; score: a callable ``score(x, t)`` (t of shape (B,)), a :class:`sdegen.ScoreModel`,
            or an oracle with ``score_fn(sde)``. It must be differentiable in x and example i must depend only on x[i].
        x: data (B, ...), float32 or float64, any device; never modified.
        divergence: "exact" (trace of the Jacobian, D vmapped vector-Jacobian products) or "hutchinson".
        probes, probe: Hutchinson probes per example and their law, "rademacher" (default) or "gaussian"; the
            probes are drawn once per example from ``seed`` and held fixed along the solve. K probes cost K
            vector-Jacobian products per evaluation, so for K >= D the exact divergence is as cheap and has no
            variance.
        solver, rtol, atol: the torchdiffeq method ("dopri5" by default; the ``solver`` of
            ``sdegen.sample(method="ode", solver=...)``) and its tolerances; the error is controlled for every
            example and for its log-density term (not for a batch average). ``steps``: the step count of
            fixed-grid methods ("rk4", "euler", ...).
        t_min: start of the integration (default ``sde.t_min``); the result is log p_{t_min}, which tends to
            log p_0 as t_min -> 0 (VP with t_min = 1e-3 blurs data by a kernel of std ~0.01).
        prior: log-density of x_T, ``prior(x_T) -> (B,)``; default ``sde.prior_log_prob``.
        max_steps: adaptive step limit; running out raises RuntimeError naming the examples that limited the step.
        adjoint: gradients through the result (to x and the score's parameters) by the adjoint method
            (torchdiffeq.odeint_adjoint, memory constant in the steps), for maximum-likelihood fine-tuning.
            Without it the solve runs without a graph and the result carries no gradient.
        adjoint_params: the tensors to receive gradients under ``adjoint=True``; default: the parameters of the
            score when it is a ``torch.nn.Module`` (pass them explicitly for a plain function closing over a net).
        chunk_size: basis vectors per vmapped backward pass of the exact divergence.
        levels, data_range: for discrete data with ``levels`` values per dimension scaled to ``data_range``,
            x is dequantized (:func:`dequantize`, seeded by ``seed``) and ``bpd`` is that of the discrete data
            (:func:`bits_per_dim`).
        method, noise: deprecated names of ``solver`` and ``probe`` (DeprecationWarning; both names: ValueError).
    Returns:
        :class:`LikelihoodResult` (log_prob and bpd of shape (B,), latent x_T, NFE, steps).
    """
    solver, solver_name = renamed("log_likelihood", "solver", solver, "method", method)
    probe, probe_name = renamed("log_likelihood", "probe", probe, "noise", noise)
    solver = "dopri5" if solver is None else solver
    probe = "rademacher" if probe is None else probe
    _check_x(x)
    _check_options(divergence, probes, (probe, probe_name), (solver, solver_name), rtol, atol, max_steps)
    t_lo, t_hi = _resolve_t_min(sde, t_min), float(sde.T)
    start = time.perf_counter()
    B, event_shape, D = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    seeds = make_seeds(seed, B, x.device)
    data = dequantize(x, levels, data_range=data_range, seed=seeds) if levels is not None else x
    probe_vs = None
    if divergence == "hutchinson":
        probe_vs = make_probes(x.shape, probes, probe, seed=seeds, dtype=x.dtype, device=x.device)
    field = _AugmentedFlow(sde, score, event_shape, t_lo, t_hi, probe_vs, chunk_size)
    with torch.set_grad_enabled(adjoint and torch.is_grad_enabled()):
        src = data if adjoint else data.detach()
        y0 = torch.cat([src.reshape(B, D), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], dim=1)
        y1, info = solve_augmented(field, y0, t_lo, t_hi, method=solver, rtol=rtol, atol=atol, max_steps=max_steps,
                                   steps=steps, adjoint=adjoint,
                                   adjoint_params=None if adjoint_params is None else tuple(adjoint_params))
        latent = y1[:, :-1].reshape(x.shape)
        prior_lp = _prior_log_prob(prior, sde, latent)
        delta = y1[:, -1]
        log_prob = prior_lp + delta
        if levels is not None:
            log_prob = log_prob + D * (math.log(data_range[1] - data_range[0]) - math.log(levels))
        bpd = -log_prob / (D * _LN2)
    return LikelihoodResult(log_prob, bpd, latent, prior_lp, delta, info["nfe"], info["steps"],
                            time.perf_counter() - start, t_lo, t_hi)


def _check_discrete(levels: int, data_range: Sequence[float]) -> Tuple[float, float]:
    if not (isinstance(levels, int) and not isinstance(levels, bool) and levels >= 2):
        raise ValueError(f"levels must be an int >= 2 (values per dimension, e.g. 256 for 8-bit images); "
                         f"got {levels!r}.")
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be (lo, hi) with lo < hi; got {tuple(data_range)!r}.")
    return lo, hi


def dequantize(x: torch.Tensor, levels: int, *, data_range: Tuple[float, float] = (-1.0, 1.0),
               seed: Seed = None) -> torch.Tensor:
    """Uniform dequantization of discrete data, shape (B, ...) -> (B, ...) (Theis et al. 2016; Ho et al. 2019).

    x holds the levels n in {0, ..., K - 1} scaled to data_range = [lo, hi] as x = lo + (hi - lo) n / (K - 1)
    (K = ``levels``; e.g. 8-bit images in [-1, 1]: K = 256). The result is
        z = lo + (hi - lo) (n + u) / K,  u ~ U[0, 1)^D,
    so each level owns a cell of side (hi - lo) / K. Noise is per example (``seed`` as in
    :func:`sdegen.noise.make_seeds`). Raises ValueError when x is not on the K-level grid.
    """
    check_finite_tensor(x, "x")
    lo, hi = _check_discrete(levels, data_range)
    n = (x.double() - lo) / (hi - lo) * (levels - 1)
    n_int = n.round()
    if bool(((n - n_int).abs() > 1e-3).any()) or bool(((n_int < 0) | (n_int > levels - 1)).any()):
        raise ValueError(f"x must hold {levels} levels scaled to data_range=({lo:g}, {hi:g}), i.e. values "
                         f"lo + (hi - lo) n / {levels - 1}; got values off that grid.")
    seeds = make_seeds(seed, x.shape[0], x.device)
    z = normal_from_seeds(seeds, (1 << 43), x.shape[1:], torch.float64)
    u = torch.special.ndtr(z).clamp(0.0, 1.0 - 2.0**-52)  # U[0, 1) from the per-example normal stream
    return (lo + (hi - lo) * (n_int + u) / levels).to(x.dtype)


def bits_per_dim(log_prob: torch.Tensor, dim: int, *, levels: Optional[int] = None,
                 data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Bits per dimension from per-example log-densities (B,) of D-dimensional data.

    Continuous data (levels=None): bpd = -log p(x) / (D ln 2).
    Discrete data with K levels scaled to [lo, hi] and dequantized by :func:`dequantize`, where ``log_prob`` is the
    model's log-density of the dequantized z: the discrete probability is bounded as
        log P(n) >= E_u[log p(z)] + D log((hi - lo) / K),
    so bpd = -log p(z) / (D ln 2) + log2(K) - log2(hi - lo).
    For data mapped to [-1, 1] (hi - lo = 2) the offset is log2(K) - 1, i.e. 7 bits for 8-bit images;
    for [0, 1] it is log2(K), i.e. 8 bits.
    """
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive int (values per example); got {dim!r}.")
    bpd = -log_prob / (dim * _LN2)
    if levels is not None:
        lo, hi = _check_discrete(levels, data_range)
        bpd = bpd + math.log2(levels) - math.log2(hi - lo)
    return bpd
