"""The sampler protocols and what a step may use.

A fixed-step sampler (:class:`StepSampler`) is a small object with ``start(ctx, x, ts)`` and
``step(ctx, x, t, t_next, state) -> (x_next, state)``; it declares its ``order``, whether it is ``stochastic``,
its ``nfe_per_step``, and its defaults. An adaptive sampler or an external solver (:class:`Solver`) instead
integrates a whole span with ``solve(ctx, x, ts, steps) -> (states at ts, final state, steps taken)``.
The driver (:func:`sdegen.sample`) owns the loop, the noise streams, progress, NFE counting and trajectories,
and tells the two protocols apart by their base class.

A step sees the model only through the :class:`Context`: ``ctx.score(x, t)`` and ``ctx.denoise(x, t)`` (each
call counts the model's network evaluations), the SDE's public methods, and the per-example noise stream.
Times are scalar (0-d) float64 CPU tensors from the grid.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch

from ..models import Model
from ..noise import Noise, OUPath
from ..sde import SDE


class Context:
    """What a step may use: the SDE, the model (each call counts its network evaluations) and the noise stream.

    ``model`` is a :class:`sdegen.Model` (the driver turns callables and oracles into one with
    :func:`sdegen.models.as_model`); ``noise`` a per-example stream (or None for deterministic runs).
    """

    def __init__(self, sde: SDE, model: Model, noise: Optional[Noise]):
        if not isinstance(model, Model):
            from ..models import as_model  # a plain score callable is accepted as well

            model = as_model(model, sde)
        self.sde, self.model, self.noise = sde, model, noise
        self.nfe = 0  # network evaluations
        self.classifier_nfe = 0  # classifier-gradient evaluations (classifier guidance)
        self.grid_points: dict = {}  # per-run table of (m, s, u) at grid times, see :func:`cache_grid`
        self._output_checked = False
        self._first_output = None  # (non-finite rows, model name, t) of the first output until it is checked
        # whole-span solvers that name non-finite examples themselves (SolverError, or set aside under
        # on_failure="mask") turn this off: a model output's finiteness is then theirs to judge
        self.check_finite = True

    def _time(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # a host scalar (a grid time) goes to the model as it is: the model turns its coefficients into Python
        # floats, which multiply x on any device without a host-device copy
        if not isinstance(t, torch.Tensor):  # a Python number from a user's step
            t = torch.tensor(float(t), dtype=torch.float64)
        if t.ndim == 0 and t.device.type == "cpu" and not t.requires_grad:
            return t
        return (t.to(device=x.device) if t.ndim else t.to(device=x.device).expand(x.shape[0])).to(x.dtype)

    def _count(self) -> None:
        self.nfe += self.model.nfe_per_call
        self.classifier_nfe += self.model.classifier_calls

    def _check_first(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, what: str) -> torch.Tensor:
        """The first output of a run is checked (shape, dtype, finiteness: one host read per run, not per step);
        see :meth:`check_first_output` for what a non-finite output means."""
        if self._output_checked:
            return out
        self._output_checked = True
        name = type(getattr(self.model, "net", self.model)).__name__
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__)
            raise ValueError(f"the model ({name}) must return its {what} with the state's shape and dtype "
                             f"{tuple(x.shape)} {x.dtype}; got {got}.")
        if not self.check_finite:
            return out
        self._first_output = (~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1), name, t)
        if out.device.type == "cpu":  # reading a CPU value costs nothing; elsewhere it waits for the end of the run
            self.check_first_output()
        return out

    def check_first_output(self) -> None:
        """Raise ValueError if the run's first model output was non-finite (NaN or inf) for every example.

        That is a broken model, not a failing example: no example has a result to keep. A model that fails for
        some examples only costs the others nothing: a fixed-step sampler returns those examples non-finite and
        the rest as they are, and an adaptive solver names them or sets them aside (``on_failure``).
        On the CPU this runs at the first call; on an accelerator the driver calls it after the step loop, so that
        the loop never waits for the device (a host read of the device's value would synchronise)."""
        first, self._first_output = self._first_output, None
        if first is None or first[0].device.type == "meta":  # meta tensors hold no values
            return
        bad, name, t = first
        if bool(bad.all()):
            raise ValueError(f"the model ({name}) returned non-finite values (NaN or inf) for every example at its "
                             f"first call (t = {t.flatten()[:1].tolist()}); check the network and its inputs.")

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s(x, t) for a scalar (0-d) or (B,) time; the model sees a (B,) time in x's dtype."""
        self._count()
        return self._check_first(self.model.score(x, self._time(x, t)), x, t, "score")

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D(x, t) = E[x_0 | x_t = x], the model's denoised estimate."""
        self._count()
        return self._check_first(self.model.denoise(x, self._time(x, t)), x, t, "denoised estimate")

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`denoise`."""
        return self.denoise(x, t)

    def coeffs(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(m(t), s(t))."""
        return self.sde.mean_coeff(t), self.sde.std(t)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn_stream().like(x)

    def randn_stream(self):
        """The run's per-example noise stream (:class:`sdegen.noise.Noise` or its generator form)."""
        if self.noise is None:
            raise ValueError("this sampler is stochastic and needs a noise stream (pass seed=...).")
        return self.noise


class StepSampler:
    """Base class of fixed-step samplers.

    Attributes:
        order: the global order of accuracy in the step size (of the deterministic part for stochastic samplers;
            weak order 1 for SDE discretisations).
        nfe_per_step: network evaluations one step costs (the driver counts the real number too).
        stochastic: whether steps draw noise.
        default_steps: steps used when the caller gives none.
        default_schedule: the time grid used when the caller gives none (see :func:`sdegen.time_grid`).
        exponential: whether a step integrates the linear part of the flow exactly in log sigma (exponential
            integrators in y = x/m): the "pilot", "pilot_local", "sensitivity" and "few_step" grids, whose first
            step spans much of the noise range, are laid out for them; a deterministic sampler of another kind
            (Euler in t, Heun in sigma) gets a warning there.
    """

    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = False
    default_steps: int = 1000
    default_schedule: str = "uniform"
    exponential: bool = False

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> Any:
        """Carried state before the first step (default: none)."""
        return None

    def step(self, ctx: Context, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: Any
             ) -> Tuple[torch.Tensor, Any]:
        """One step from time t to t_next (0-d float64 CPU tensors, t > t_next): returns (the state at t_next, of
        x's shape, dtype and device; the carried state for the next step). Ask the model through ``ctx.score`` or
        ``ctx.denoise`` (each call is counted) and draw noise with ``ctx.randn_like``; do not modify x in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def total_nfe(self, steps: int) -> int:
        """NFE of a run of ``steps`` steps (overridden by samplers whose first or last step differs)."""
        return steps * self.nfe_per_step

    def finish_denoised(self, x: torch.Tensor) -> torch.Tensor:
        """The result after the driver's final denoising step (``denoise=True``), given its output x: x itself by
        default; a sampler that holds part of the state fixed (inpainting's known values) restores it here."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Solver:
    """Base class of samplers that integrate a whole span themselves (adaptive step control, torchdiffeq,
    torchsde): ``solve(ctx, x, ts, steps)`` returns (states at every time of ``ts`` (len(ts), B, ...), final
    state, steps taken or None). ``steps`` is the caller's step count (None: the solver's own choice); a solver
    that cannot honour it raises ValueError. A solver that can set failed examples aside has an ``on_failure``
    attribute; with ``on_failure == "mask"`` it lists their indices in ``failed`` (read into
    ``SampleInfo.extra["failed"]``). A solver must not modify its input x in place (nor may a
    :class:`StepSampler`'s ``step``): the driver hands the caller's x_T to built-in samplers as it is, and copies it
    once for others."""

    stochastic: bool = False

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """Integrate from ts[0] to ts[-1] (decreasing float64 times): returns (the states at every time of ts,
        (len(ts), B, ...); the final state; the steps taken, or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve()")


# --- per-run coefficient tables shared by the samplers that work in y = x/m and u = log(m/s) = -log sigma ---
def point(ctx: Context, t: torch.Tensor) -> Tuple[float, float, float]:
    """(m, s, u = log(m/s)) at the scalar CPU time t, as Python floats (float64): per-step scalar arithmetic
    then costs no tensor launches, and a float multiplies a tensor on any device without a sync.
    Grid times come from the table :func:`cache_grid` filled once per run."""
    cached = ctx.grid_points.get(float(t))
    if cached is not None:
        return cached
    log_m, s = float(ctx.sde.log_mean_coeff(t)), float(ctx.sde.std(t))
    return math.exp(log_m), s, log_m - math.log(s)


def cache_grid(ctx: Context, ts: torch.Tensor) -> None:
    """(m, s, u) at every grid time in one vectorised call, kept on this run's context (the driver makes one
    context per run), so that a step's coefficients cost dictionary look-ups instead of tensor launches."""
    log_m, s = ctx.sde.log_mean_coeff(ts).tolist(), ctx.sde.std(ts).tolist()
    ctx.grid_points.update({t: (math.exp(a), b, a - math.log(b)) for t, a, b in zip(ts.tolist(), log_m, s)})


def points_at_u(ctx: Context, us: List[float]) -> List[Tuple[torch.Tensor, float, float]]:
    """(t, m, s) at the times whose u = log(m/s) are ``us`` (Python floats), found in one vectorised call: the
    stage points of single-step samplers, computed once per run so that a step makes no scalar tensor launches.
    Each t is a 0-d float64 tensor; m and s are Python floats."""
    t = ctx.sde.t_from_log_snr(torch.tensor([2.0 * u for u in us], dtype=torch.float64))
    log_m, s = ctx.sde.log_mean_coeff(t).tolist(), ctx.sde.std(t).tolist()
    return [(tk, math.exp(a), b) for tk, a, b in zip(t.unbind(), log_m, s)]


def time_at_u(ctx: Context, u: float) -> torch.Tensor:
    """The time whose u = log(m/s) is ``u`` (the log-SNR is 2u), a 0-d float64 tensor."""
    return ctx.sde.t_from_log_snr(torch.tensor(2.0 * u, dtype=torch.float64))


def scaled_denoise(ctx: Context, x: torch.Tensor, t: torch.Tensor, m: float) -> torch.Tensor:
    """m D = x + s^2 score (one NFE), a new tensor."""
    return ctx.denoise(x, t) * m


def check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}.")
    return float(value)


def brownian_path(ctx: Context, lam: float, ts: torch.Tensor) -> OUPath:
    """The run's Brownian path for a reverse SDE of extra rate ``lam`` (see :class:`sdegen.noise.OUPath`), held in
    a tree over the SDE's whole span of u = log(m/s), from T to its t_min (or to the grid's last time ``ts[-1]`` if
    that is earlier): the same path whatever the number of steps, drawn from a stream spawned from the run's noise
    (its own draws stay the sampler's)."""
    ends = torch.tensor([ctx.sde.T, min(ctx.sde.t_min, float(ts[-1]))], dtype=torch.float64)
    lo, hi = (ctx.sde.log_mean_coeff(ends) - torch.log(ctx.sde.std(ends))).tolist()
    return OUPath(ctx.randn_stream().spawn(1), lam, lo, hi)
