"""The sampling driver: one entry point over every sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._util import check_finite_tensor
from .models import as_model
from .noise import NOISE_KINDS, Seed, make_seeds, normal_from_seeds
from .samplers import SAMPLERS, Context, Solver, StepSampler, get_sampler
from .schedules import time_grid
from .sde import SDE


@dataclass
class SampleInfo:
    """What a sampling run cost and did.

    nfe: network evaluations (each call of the model on the batch counts one; a classifier-free guided model
        evaluates its conditional and unconditional branches in one batched call, 1 NFE).
    steps: steps taken (accepted steps for adaptive ODE solvers; None where the back end does not say).
    wall_time: seconds.
    times: the float64 grid of output times (the fixed-step grid, or [T, t_min] for a back end).
    trajectory: states at ``times`` when ``return_trajectory=True``, shape (len(times), B, ...), else None.
    sampler: the sampler object used.
    """

    nfe: int
    steps: Optional[int]
    wall_time: float
    times: torch.Tensor
    trajectory: Optional[torch.Tensor] = None
    sampler: Any = None
    extra: dict = field(default_factory=dict)
    classifier_nfe: int = 0  # classifier-gradient evaluations (classifier guidance), not counted in nfe


class _CountedScore:
    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, *args, **kwargs):
        self.calls += 1
        return self.fn(x, t, *args, **kwargs)


def sample(sde: SDE, score, x_T: Optional[torch.Tensor] = None, *, shape: Optional[Sequence[int]] = None,
           method: Union[str, Any] = "ode", steps: Optional[int] = None, t_min: Optional[float] = None,
           schedule: Union[str, torch.Tensor, None] = None, seed: Seed = None, noise: str = "per_example",
           denoise: bool = False,
           progress: bool = False, return_trajectory: bool = False, return_info: bool = False,
           dtype: torch.dtype = torch.float32, device=None, **options):
    """Draw samples x_0 ~ p_0 by running the reverse process of ``sde`` with ``score`` from x_T to t_min.

    Args:
        sde: the forward SDE.
        score: a callable ``score(x, t)`` (t of shape (B,)), a :class:`sdegen.ScoreModel`, or an oracle with
            ``score_fn(sde)`` such as :class:`sdegen.analytic.GaussianMixture`.
        x_T: the starting state (B, ...); drawn from the prior with ``shape`` (and ``dtype``/``device``) if None.
            Never modified.
        method: a name from :data:`sdegen.samplers.SAMPLERS` ("euler_maruyama", "reverse_diffusion", "ancestral",
            "pc", "annealed_langevin", "euler", ...), "ode" (torchdiffeq) or "sde" (torchsde), or a sampler object.
        steps: number of steps (fixed-step samplers and fixed-grid back-end methods); the sampler's default if None.
        t_min: end time (default ``sde.t_min``).
        schedule: time grid for fixed-step samplers: "uniform", "log_snr", "edm", "quadratic" or explicit times.
        seed: int, one int per example as a (B,) tensor, or a torch.Generator. Example i's x_T and noise depend
            only on its own seed, so a sample does not depend on the batch it is drawn in. None: seeds are drawn
            from torch's global generator where a draw is needed (x_T from the prior, a stochastic sampler's
            noise); a deterministic sampler started from a given x_T draws nothing.
        noise: "per_example" (default: counter-based streams, batch-size invariant) or "generator" (one
            torch.Generator on x's device: faster for cheap scores, reproducible for a fixed seed and batch only).
        denoise: finish with Tweedie's step x_0 = (x + s^2 score) / m at t_min (one more NFE).
        progress: show a tqdm progress bar (off by default).
        return_trajectory: keep the state at every grid time (memory grows with steps only then).
        return_info: also return a :class:`SampleInfo`.
        **options: passed to the sampler's constructor (e.g. ``snr``, ``corrector_steps``, ``predictor`` for
            "pc"; ``solver``, ``rtol``, ``atol`` for "ode"/"sde").

    Returns:
        samples with x_T's shape, dtype and device; or (samples, SampleInfo) with ``return_info=True``.
    Wrap the call in ``torch.no_grad()`` unless gradients through sampling are wanted.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE; got {type(sde).__name__}.")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1 or None; got {steps!r}.")
    for name, flag in (("denoise", denoise), ("progress", progress), ("return_trajectory", return_trajectory),
                       ("return_info", return_info)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False; got {flag!r}.")
    sampler = get_sampler(method, **options)
    if not isinstance(noise, str) or noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {sorted(NOISE_KINDS)}; got {noise!r}.")
    model = as_model(score, sde)
    x, seeds = _initial_state(sde, x_T, shape, seed, dtype, device, needs_seeds=bool(sampler.stochastic))
    ctx = Context(sde, model, None if seeds is None else NOISE_KINDS[noise](seeds, key=1))  # draw 0 made x_T
    start = time.perf_counter()
    if isinstance(sampler, StepSampler):
        n = steps or sampler.default_steps
        ts = time_grid(sde, n, schedule if schedule is not None else sampler.default_schedule, t_min=t_min)
        x, traj, n_steps = _run_steps(sampler, ctx, x, ts, progress, return_trajectory)
    else:
        if schedule is not None and not isinstance(schedule, torch.Tensor):
            raise ValueError(f"schedule applies to fixed-step samplers; for {type(sampler).__name__} pass output "
                             "times as a tensor.")
        ts = schedule if isinstance(schedule, torch.Tensor) else time_grid(sde, 1, "uniform", t_min=t_min)
        traj, x, n_steps = sampler.solve(ctx, x, ts.to(torch.float64), steps)
        traj = traj if return_trajectory else None
    if denoise:
        x = ctx.denoise(x, ts[-1])
    info = SampleInfo(nfe=ctx.nfe, steps=n_steps, wall_time=time.perf_counter() - start, times=ts,
                      trajectory=traj, sampler=sampler, classifier_nfe=ctx.classifier_nfe)
    return (x, info) if return_info else x


STATE_DTYPES = (torch.float32, torch.float64)


def _check_state_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in STATE_DTYPES:
        hint = (" A network in low precision runs under a float32 state: ScoreModel casts its inputs to the "
                "network's parameter dtype and its outputs back." if dtype in (torch.float16, torch.bfloat16) else "")
        raise TypeError(f"{name} must be float32 or float64 (the solver state's precision); got {dtype}.{hint}")


def _initial_state(sde, x_T, shape, seed, dtype, device, needs_seeds: bool):
    """(x_T, per-example seeds or None): seeds are made only when a random draw needs them, so that a
    deterministic run from a given x_T leaves torch's global generator untouched."""
    if x_T is None:
        if shape is None:
            raise ValueError("give either x_T or shape=(B, ...) to draw x_T from the prior.")
        shape = tuple(shape)
        if len(shape) < 1 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise ValueError(f"shape must be (B, ...) of positive ints; got {shape}.")
        _check_state_dtype(dtype, "dtype")
        seeds = make_seeds(seed, shape[0], device)
        return sde.prior_std * normal_from_seeds(seeds, 0, shape[1:], dtype), seeds
    check_finite_tensor(x_T, "x_T")
    _check_state_dtype(x_T.dtype, "x_T's dtype")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must have shape (B, ...) with B >= 1; got {tuple(x_T.shape)}.")
    if x_T.device.type == "cpu" and not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains +-inf; the starting state must be finite.")
    if shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} disagrees with x_T's shape {tuple(x_T.shape)}; give one of them.")
    if not needs_seeds and seed is None:
        return x_T, None
    return x_T, make_seeds(seed, x_T.shape[0], x_T.device)


def _run_steps(sampler: StepSampler, ctx: Context, x: torch.Tensor, ts: torch.Tensor, progress: bool,
               return_trajectory: bool):
    traj = [x] if return_trajectory else None
    ctx.model.prepare(ts)
    state = sampler.start(ctx, x, ts)
    n = len(ts) - 1
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=type(sampler).__name__)
    times = ts.unbind()  # 0-d views made once: indexing a tensor on every step costs microseconds
    for i in range(n):
        x, state = sampler.step(ctx, x, times[i], times[i + 1], state)
        if traj is not None:
            traj.append(x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x, (torch.stack(traj) if traj is not None else None), n
