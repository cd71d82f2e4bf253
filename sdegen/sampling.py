"""The sampling driver: one entry point over every sampler."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._validate import (check_choice, check_device, check_flag, check_int, check_number, check_shape,
                        check_state_dtype, check_tensor)
from .models import as_model
from .noise import NOISE_KINDS, Seed, make_seeds, normal_from_seeds
from .capture import captured, check_capture
from .samplers import SAMPLERS, Context, StepSampler, get_sampler  # SAMPLERS: kept importable from here
from .schedules import LONG_FIRST_STEP, check_grid, resolve_grid, time_grid
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
    extra: method-specific results; ``extra["failed"]``: indices of the examples an adaptive solve set aside
        under ``on_failure="mask"`` (their rows of the samples are NaN).
    """

    nfe: int
    steps: Optional[int]
    wall_time: float
    times: torch.Tensor
    trajectory: Optional[torch.Tensor] = None
    sampler: Any = None
    extra: dict = field(default_factory=dict)
    classifier_nfe: int = 0  # classifier-gradient evaluations (classifier guidance), not counted in nfe
    pilot_nfe: int = 0  # network evaluations (each on the pilot batch) of a model-dependent schedule's pilot, not in nfe
    pilot_classifier_nfe: int = 0  # classifier gradients of that pilot (classifier guidance), not in classifier_nfe


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
           dtype: Optional[torch.dtype] = None, device=None, capture: bool = False, **options):
    """Draw samples x_0 ~ p_0 by running the reverse process of ``sde`` with ``score`` from x_T to t_min.

    Args:
        sde: the forward SDE.
        score: a callable ``score(x, t)`` (t of shape (B,)), a :class:`sdegen.ScoreModel`, or an oracle with
            ``score_fn(sde)`` such as :class:`sdegen.analytic.GaussianMixture`.
        x_T: the starting state (B, ...); drawn from the prior with ``shape`` (and ``dtype``/``device``) if None.
            Never modified.
        shape: (B, ...), the number of samples and the shape of one, when ``x_T`` is None (then required).
        method: a name from :data:`sdegen.samplers.SAMPLERS` ("euler_maruyama", "reverse_diffusion", "ancestral",
            "pc", "annealed_langevin", "euler", ...), "ode" (torchdiffeq) or "sde" (torchsde), or a sampler object.
        steps: number of steps (fixed-step samplers and fixed-grid back-end methods); the sampler's default if None.
            Adaptive methods choose their own steps and raise ValueError when given one; an explicit schedule
            fixes the steps of a fixed-step sampler (len(schedule) - 1), while for "ode"/"sde" it gives the
            output times and ``steps`` the steps of a fixed-step back-end solver.
        t_min: end time (default ``sde.t_min``), in (0, T); an explicit schedule ends at its own last time.
        schedule: time grid for fixed-step samplers: "uniform", "log_snr", "edm", "quadratic", "few_step",
            "pilot" (laid out by a pilot run of the adaptive solver on 64 draws, see
            :func:`sdegen.schedules.pilot_grid`; its calls are ``SampleInfo.pilot_nfe``), "sensitivity" (for
            stochastic samplers: equal steps of the denoiser's sensitivity measured by a pilot, see
            :func:`sdegen.sensitivity_grid.sensitivity_grid`; its calls are ``pilot_nfe`` too) or explicit times.
        seed: int, one int per example as a (B,) tensor, or a torch.Generator. Example i's x_T and noise depend
            only on its own seed, so a sample does not depend on the batch it is drawn in. None: seeds are drawn
            from torch's global generator where a draw is needed (x_T from the prior, a stochastic sampler's
            noise), once per call, B of them, before the first step; a deterministic sampler started from a given
            x_T draws nothing and leaves the global generator's state unchanged.
        noise: "per_example" (default: counter-based streams, batch-size invariant) or "generator" (one
            torch.Generator on x's device: faster for cheap scores, reproducible for a fixed seed and batch only).
        denoise: finish with Tweedie's step x_0 = (x + s^2 score) / m at t_min (one more NFE).
        progress: show a tqdm progress bar (off by default): steps for fixed-step samplers, the time reached
            (from T down to t_min) for adaptive and back-end methods.
        return_trajectory: keep the state at every grid time (memory grows with steps only then).
        return_info: also return a :class:`SampleInfo`.
        dtype, device: of the state drawn from the prior when x_T is None (dtype float32 or float64, default
            float32; float16/bfloat16 states raise TypeError: run a low-precision network under a float32 state
            instead). With x_T given the samples keep x_T's dtype, and a different ``dtype`` raises ValueError.
            A ScoreModel (or a plain score function) casts the network's output to the state's dtype.
        capture: record the whole run of a fixed-step sampler as a CUDA graph once and replay it at later calls
            with the same settings and shapes (one launch per run: for small networks that are launch-bound).
            The samples are those of the eager run. CUDA only, without gradients, progress or trajectory; see
            :mod:`sdegen.capture` for its limits.
        **options: passed to the sampler's constructor (e.g. ``snr``, ``corrector_steps``, ``predictor`` for
            "pc"; ``solver``, ``rtol``, ``atol`` for "ode"/"sde"); a keyword the sampler does not take raises
            TypeError naming it.

    Returns:
        samples with x_T's shape, dtype and device; or (samples, SampleInfo) with ``return_info=True``.
    Wrap the call in ``torch.no_grad()`` unless gradients through sampling are wanted.
    """
    _check_args(sde, steps, t_min, schedule, noise, dtype, denoise=denoise, progress=progress,
                return_trajectory=return_trajectory, return_info=return_info, capture=capture)
    sampler = get_sampler(method, **options)
    if isinstance(sampler, StepSampler) and isinstance(schedule, torch.Tensor) and steps is not None \
            and steps != schedule.numel() - 1:
        raise ValueError(f"steps: an explicit schedule of {schedule.numel()} times takes {schedule.numel() - 1} "
                         f"steps of a fixed-step sampler; leave steps unset; got steps={steps!r}.")
    model = as_model(score, sde)
    if capture:  # before any seed is drawn: a refused call leaves torch's global generator as it was
        where = x_T.device if isinstance(x_T, torch.Tensor) else \
            check_device(device, "device") if device is not None else torch.device("cpu")
        check_capture(where, sampler, noise, bool(sampler.stochastic), progress, return_trajectory,
                      isinstance(x_T, torch.Tensor) and x_T.requires_grad)
    x, seeds = _initial_state(sde, x_T, shape, seed, dtype, device, needs_seeds=bool(sampler.stochastic))
    if x is x_T and not type(sampler).__module__.startswith("sdegen."):
        x = x.clone()  # a sampler of the caller's own may work in place; the built-in ones never do
    start_like = (tuple(x.shape), x.dtype, x.device)
    ctx = Context(sde, model, None if seeds is None else NOISE_KINDS[noise](seeds, key=1))  # draw 0 made x_T
    start = time.perf_counter()
    if isinstance(sampler, StepSampler):
        n = steps or sampler.default_steps
        if (isinstance(schedule, str) and schedule in LONG_FIRST_STEP and not sampler.exponential
                and not sampler.stochastic):
            warnings.warn(f"schedule={schedule!r} is laid out for exponential integrators (ddim, dpmpp_2m, unipc, "
                          f"exp_pc, deis, ...), which integrate the flow's linear part exactly in log sigma: its "
                          f"first step spans much of the noise range, where {type(sampler).__name__} can go far "
                          "wrong (Euler on VE did not converge with steps); use one of those samplers, or another "
                          "schedule.", UserWarning, stacklevel=2)
        ts, pilot_nfe, pilot_classifier_nfe = resolve_grid(
            sde, n, schedule if schedule is not None else sampler.default_schedule, t_min=t_min, model=model, x=x,
            order=sampler.order)
        if capture:
            x = _run_captured(ctx, sampler, (score, method, options), x, seeds, ts, noise, denoise)
            traj, n_steps = None, len(ts) - 1
        else:
            x, traj, n_steps = _run_steps(sampler, ctx, x, ts, progress, return_trajectory)
    else:
        if schedule is not None and not isinstance(schedule, torch.Tensor):
            raise ValueError(f"schedule: a named schedule applies to fixed-step samplers; for "
                             f"{type(sampler).__name__} pass the output times as a tensor; got {schedule!r}.")
        ts = check_grid(sde, schedule, "schedule") if isinstance(schedule, torch.Tensor) else \
            time_grid(sde, 1, "uniform", t_min=t_min)
        with _time_progress(ctx, sampler, ts, progress):
            out = sampler.solve(ctx, x, ts, steps)
        try:
            traj, x, n_steps = out
        except (TypeError, ValueError):
            raise TypeError(f"{type(sampler).__name__}.solve must return (states at the output times, final state, "
                            f"steps taken); got {type(out).__name__}.") from None
        traj = traj if return_trajectory else None
    if denoise and not capture:
        x = ctx.denoise(x, ts[-1])
        if isinstance(sampler, StepSampler):
            x = sampler.finish_denoised(x)
    ctx.check_first_output()
    _check_returned(sampler, x, start_like, "run")
    info = SampleInfo(nfe=ctx.nfe, steps=n_steps, wall_time=time.perf_counter() - start, times=ts,
                      trajectory=traj, sampler=sampler, classifier_nfe=ctx.classifier_nfe,
                      pilot_nfe=pilot_nfe if isinstance(sampler, StepSampler) else 0,
                      pilot_classifier_nfe=pilot_classifier_nfe if isinstance(sampler, StepSampler) else 0)
    if getattr(sampler, "on_failure", None) == "mask":  # examples an adaptive solve set aside
        info.extra["failed"] = list(getattr(sampler, "failed", []))
    return (x, info) if return_info else x


def _check_returned(sampler, x: Any, like: tuple, where: str) -> None:
    """A sampler's result must keep the state's shape, dtype and device (the driver's promise to the caller)."""
    if not isinstance(x, torch.Tensor) or (tuple(x.shape), x.dtype, x.device) != like:
        got = f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(sampler).__name__} returned a state of {got} from its {where}; a sampler keeps the "
                         f"state's shape, dtype and device, {like[0]} {like[1]} on {like[2]}.")


def _check_args(sde, steps, t_min, schedule, noise, dtype, **flags) -> None:
    """The arguments of :func:`sample` that do not depend on the sampler, checked before any work."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE (e.g. sdegen.VPSDE()); got {type(sde).__name__}.")
    sde.check_contract()
    check_int(steps, "steps", lo=1, none_ok=True)
    check_number(t_min, "t_min", lo=0.0, hi=sde.T, lo_open=True, hi_open=True, none_ok=True)
    for name, flag in flags.items():
        check_flag(flag, name)
    check_choice(noise, "noise", sorted(NOISE_KINDS),
                 hint=" It is the kind of random stream; the noise rule of method='exp_adams' is noise_rule=.")
    if dtype is not None:
        check_state_dtype(dtype, "dtype")
    if isinstance(schedule, torch.Tensor):
        if t_min is not None:
            raise ValueError("t_min: an explicit schedule (a tensor of times) ends at its last time; leave t_min "
                             f"unset or end the schedule there; got t_min={t_min!r}.")


def _same_device(device: torch.device, actual: torch.device) -> bool:
    """Whether ``device`` names ``actual`` ("cuda" names the current CUDA device)."""
    if device.type != actual.type:
        return False
    if device.index is None and device.type == "cuda":
        return actual.index == torch.cuda.current_device()
    return device.index is None or device.index == actual.index


def _initial_state(sde, x_T, shape, seed, dtype, device, needs_seeds: bool):
    """(x_T, per-example seeds or None): seeds are made only when a random draw needs them, so that a
    deterministic run from a given x_T leaves torch's global generator untouched."""
    if device is not None:
        device = check_device(device)
    if x_T is None:
        if shape is None:
            raise ValueError("shape: give either x_T or shape=(B, ...) to draw x_T from the prior.")
        shape = check_shape(shape, "shape")
        dtype = torch.float32 if dtype is None else dtype
        seeds = make_seeds(seed, shape[0], device)
        return sde.prior_std * normal_from_seeds(seeds, 0, shape[1:], dtype), seeds
    check_tensor(x_T, "x_T", batch=True)
    if dtype is not None and dtype != x_T.dtype:
        raise ValueError(f"dtype: x_T is {x_T.dtype} and the samples keep x_T's dtype; leave dtype unset or pass "
                         f"x_T.to({dtype}); got dtype={dtype}.")
    if device is not None and not _same_device(device, x_T.device):
        raise ValueError(f"device: x_T is on {x_T.device} and the samples stay on x_T's device; leave device unset "
                         f"or pass x_T.to({str(device)!r}); got device={str(device)!r}.")
    if shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} disagrees with x_T's shape {tuple(x_T.shape)}; give one of them.")
    if not needs_seeds and seed is None:
        return x_T, None
    return x_T, make_seeds(seed, x_T.shape[0], x_T.device)


def _run_captured(ctx: Context, sampler: StepSampler, settings: tuple, x: torch.Tensor,
                  seeds: Optional[torch.Tensor], ts: torch.Tensor, noise: str, denoise: bool) -> torch.Tensor:
    """The run of :func:`_run_steps` (and the final denoising step) through a captured graph: captured at the first
    call with these settings, replayed after. ``ctx`` receives the run's counts and its first model output."""
    score, method, options = settings
    alive = [ctx.sde, score, method, sampler, ctx.model]  # what the graph reads lives as long as it does
    key = (id(ctx.sde), id(score), method if isinstance(method, str) else id(method),
           _settings_key(options, alive), ts.numpy().tobytes(), tuple(x.shape), x.dtype, x.device, noise, denoise,
           seeds is None)

    def body(x_T, run_seeds):
        run = Context(ctx.sde, ctx.model, None if run_seeds is None else NOISE_KINDS[noise](run_seeds, key=1))
        out = _run_steps(sampler, run, x_T, ts, False, False)[0]
        if denoise:
            out = sampler.finish_denoised(run.denoise(out, ts[-1]))
        return out, {"nfe": run.nfe, "classifier_nfe": run.classifier_nfe, "first_output": run._first_output,
                     "alive": alive}  # the key's objects live as long as the graph

    x, counts = captured(key, body, x, seeds)
    ctx.nfe, ctx.classifier_nfe, ctx._first_output = counts["nfe"], counts["classifier_nfe"], counts["first_output"]
    return x


def _settings_key(value: Any, alive: list) -> Any:
    """A captured run's key for the sampler's options: plain values by value; tensors and other objects (an
    inpainting image, a predictor) by identity and version, kept alive in ``alive`` so that no other object takes
    their identity while the run is cached (their printed form does not tell two of them apart)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_settings_key(v, alive) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((repr(k), _settings_key(v, alive)) for k, v in value.items()))
    alive.append(value)
    if isinstance(value, torch.Tensor):  # an inference tensor keeps no version (nor is it changed outside one)
        return ("tensor", id(value), None if value.is_inference() else value._version)
    return ("object", id(value))


def _run_steps(sampler: StepSampler, ctx: Context, x: torch.Tensor, ts: torch.Tensor, progress: bool,
               return_trajectory: bool):
    traj = [x] if return_trajectory else None
    ctx.model.prepare(ts)
    state = sampler.start(ctx, x, ts)
    n = len(ts) - 1
    expect = getattr(ctx.noise, "expect", None)
    if expect is not None and sampler.stochastic:  # about one draw a step: the stream sizes its chunks for the run
        expect(n)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=type(sampler).__name__)
    times = ts.unbind()  # 0-d views made once: indexing a tensor on every step costs microseconds
    like = (x.shape, x.dtype)
    for i in range(n):
        out = sampler.step(ctx, x, times[i], times[i + 1], state)
        try:
            x, state = out
        except (TypeError, ValueError):
            raise TypeError(f"{type(sampler).__name__}.step must return (x_next, state); got "
                            f"{type(out).__name__}.") from None
        if not isinstance(x, torch.Tensor) or x.shape != like[0] or x.dtype != like[1]:
            _check_returned(sampler, x, (tuple(like[0]), like[1], getattr(x, "device", None)), f"step {i}")
        if traj is not None:
            traj.append(x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x, (torch.stack(traj) if traj is not None else None), n


class _time_progress:
    """A tqdm bar over the time span of a whole-span solver (adaptive, torchdiffeq, torchsde): it advances to
    the earliest time (from T down to t_min) at which the solver has evaluated the model, so it moves with the
    solve whatever the solver's steps. Shown only with ``progress=True``; reading the time of a (B,) tensor then
    costs one host read per model call."""

    def __init__(self, ctx: Context, sampler, ts: torch.Tensor, progress: bool):
        self.ctx, self.progress = ctx, progress
        self.t0, self.t1, self.name = float(ts[0]), float(ts[-1]), type(sampler).__name__

    def __enter__(self):
        if not self.progress:
            return self
        from tqdm.auto import tqdm

        span = abs(self.t0 - self.t1)
        self.bar = tqdm(total=span, desc=self.name, bar_format="{l_bar}{bar}| {postfix}")
        self.bar.set_postfix_str(f"t={self.t0:.4g}", refresh=False)
        self.done = 0.0
        score, denoise = self.ctx.score, self.ctx.denoise

        def watch(fn):
            def call(x, t):
                self._advance(t)
                return fn(x, t)
            return call

        self.ctx.score, self.ctx.denoise = watch(score), watch(denoise)  # instance attributes shadow the methods
        return self

    def _advance(self, t: torch.Tensor) -> None:
        t = float(t if t.ndim == 0 else t.reshape(-1)[0])
        done = min(abs(self.t0 - t), abs(self.t0 - self.t1))
        if done > self.done:
            self.bar.set_postfix_str(f"t={t:.4g}", refresh=False)
            self.bar.update(done - self.done)
            self.done = done

    def __exit__(self, exc_type, *exc):
        if self.progress:
            del self.ctx.score, self.ctx.denoise
            if exc_type is None:  # the solve reached t_min (a stochastic solver's last call is one step before)
                self.bar.set_postfix_str(f"t={self.t1:.4g}", refresh=False)
                self.bar.update(abs(self.t0 - self.t1) - self.done)
            self.bar.close()
        return False
