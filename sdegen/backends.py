"""Adapters to torchdiffeq and torchsde: the only modules that import them.

:class:`ODESolver` integrates the probability-flow ODE with ``torchdiffeq.odeint``;
:class:`SDESolver` integrates the reverse-time SDE with ``torchsde.sdeint`` in the increasing clock
tau = T - t, with a per-example Brownian motion (:class:`PerExampleBrownian`) so that example i's
path depends only on its own seed.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torchdiffeq
import torchsde
from torchdiffeq._impl.odeint import SOLVERS as _ODE_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ._validate import check_floating_dtype, check_int, check_number, reject_inapplicable
from .errors import STEP_LIMIT_HINT, SolverError, check_finite_result, check_on_failure, nonfinite_rows, rows_to_list
from .noise import normal_from_seeds
from .samplers.adaptive import solve_isolating_failures
from .samplers.base import Context, Solver
from .sde import SDE, ProbabilityFlowODE

ODE_METHODS = tuple(sorted(m for m in _ODE_SOLVERS if m != "scipy_solver"))
# additive noise: the Ito and Stratonovich readings coincide, so every diagonal-noise method applies
SDE_METHODS = {"euler": "ito", "milstein": "ito", "srk": "ito", "midpoint": "stratonovich",
               "heun": "stratonovich", "euler_heun": "stratonovich"}
# torchsde methods refused for the reverse SDE, and why
_UNSTABLE_SDE_METHODS = {
    "reversible_heun": "its linear stability region is the imaginary axis, and the reverse SDE's drift contracts "
                       "samples onto the data (a VP mixture at 1000 steps: variance 0.80 for the exact 1.39)"}
_SDE_OPTIONS = {"milstein": {"grad_free"}}  # the torchsde method options sdeint reads, by method


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """max over examples of the per-example RMS: every example, not the batch average, meets the tolerance."""
    return x.reshape(x.shape[0], -1).pow(2).mean(1).sqrt().max()


def is_adaptive_ode_method(method: str) -> bool:
    return issubclass(_ODE_SOLVERS[method], RKAdaptiveStepsizeODESolver)


class FailureMonitor:
    """The per-example error norm of an adaptive torchdiffeq solve, watching for the examples that stop it.

    Called by torchdiffeq on scaled states, derivatives and error estimates (B, ...): returns the max over
    examples of the per-example RMS (NaN when any is NaN), and keeps, on the device (no host read), which
    examples gave a non-finite value since the last accepted step (``bad``) and the last per-example ratios.

    Before the first step torchdiffeq chooses its starting step from the norms of the state and the derivative
    (Hairer's rule h0 = 0.01 ||y|| / ||f||): there a non-finite norm is returned as +inf, so that a NaN
    derivative gives h0 = 0, as an infinite one does, and the solve stops at once with a step that underflows
    (a NaN norm would make h0 NaN and send the model a NaN time). Once stepping (:meth:`stepping`), a NaN
    error ratio stays NaN: torchdiffeq then rejects the step and proposes no step at all, which stops the solve
    without first shrinking the step through a run of rejections.
    """

    def __init__(self):
        self.bad: Optional[torch.Tensor] = None
        self.last: Optional[torch.Tensor] = None
        self.last_rejected: Optional[torch.Tensor] = None
        self.started = False

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        per = v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()
        self.bad = ~torch.isfinite(per) if self.bad is None else self.bad | ~torch.isfinite(per)
        self.last = per
        worst = per.max()
        return worst if self.started else torch.nan_to_num(worst, nan=math.inf, posinf=math.inf)

    def stepping(self) -> None:
        self.started = True

    def accepted(self) -> None:
        self.bad = None

    def rejected(self) -> None:
        self.last_rejected = self.last

    def culprits(self) -> Tuple[list, str]:
        """(examples responsible, why): the non-finite ones if any, else those whose last error ratio was > 1."""
        bad = rows_to_list(self.bad)
        if bad:
            return bad, "their state or derivative became non-finite (NaN or inf)"
        ratios = self.last_rejected if self.last_rejected is not None else self.last
        if ratios is None:
            return [], "no step had been attempted"
        ratios = ratios.detach().cpu()
        above, worst = torch.nonzero(ratios > 1.0).flatten().tolist(), float(ratios.max())
        if above:
            return above, f"their error ratios exceeded 1 in the last rejected step (worst {worst:.3g})"
        return [int(ratios.argmax())], f"the largest error ratio of the last step was {worst:.3g}"


class LogSigmaClock:
    """The clock tau = log sigma(t) = -lambda(t) / 2 for an SDE whose kernel is only piecewise smooth in t
    (``sde.smooth_in_t`` False, as a :class:`sdegen.DiscreteVPSDE`'s table). A field dy/dt = F(t, y) becomes

        dy/dtau = F(t(tau), y) dt/dtau,        dt/dtau = 2 s^2 / g^2        (since dlambda/dt = -g^2 / s^2),

    whose probability flow, (2 f s^2 / g^2) x - s^2 score, depends on t only through m and s: smooth in tau for
    a VP table, whose f / g^2 = -1/2 is constant, where f and g^2 jump at every timestep in t."""

    def __init__(self, sde: SDE):
        self.sde = sde
        self._known: dict = {}  # (tau, dtype) of a 0-d host tau -> (t, dt/dtau): a fixed grid's taus recur

    def tau(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.sde.log_snr(t)

    def t(self, tau: torch.Tensor) -> torch.Tensor:
        return self.sde.t_from_log_snr(-2.0 * tau)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """dt/dtau at t."""
        return 2.0 * self.sde.std(t) ** 2 / self.sde.diffusion(t) ** 2

    def time_and_rate(self, tau: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t(tau), dt/dtau there): remembered for a 0-d host tau."""
        if tau.ndim == 0 and tau.device.type == "cpu" and not tau.requires_grad:
            return self._at(tau)
        t = self.t(tau)
        return t, self.rate(t)

    def _at(self, tau: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (float(tau), tau.dtype)
        hit = self._known.get(key)
        if hit is None:
            if len(self._known) >= 16384:
                self._known.clear()
            t = self.t(tau)
            hit = self._known[key] = (t, self.rate(t))
        return hit

    def step_in_t(self, tau: float, dtau: float) -> float:
        """The length in t of a step from tau to tau + dtau (for messages)."""
        ends = self.t(torch.tensor([tau, tau + dtau], dtype=torch.float64))
        return abs(float(ends[1] - ends[0]))


def clock_for(sde: SDE, adaptive: bool = True) -> Optional[LogSigmaClock]:
    """The clock torchdiffeq integrates ``sde``'s flow in. A fixed grid takes equal steps in log sigma on every SDE
    (equal steps in t put EDM's first step from sigma 0.001 to 0.4 with 200 steps, and a likelihood 2.5 nats off);
    an adaptive solver places its own steps, so it runs in t itself (None) where the kernel is smooth in t. One
    clock per SDE object: it remembers the times of the taus it has converted (a fixed grid asks for the same ones
    at every solve, and a user SDE's inverse is a bisection)."""
    if adaptive and sde.smooth_in_t:
        return None
    clock = sde.__dict__.get("_log_sigma_clock")
    if clock is None:
        clock = sde.__dict__["_log_sigma_clock"] = LogSigmaClock(sde)
    return clock


class _InClock(torch.nn.Module):
    """field(t, y) as a field of the clock tau (see :class:`LogSigmaClock`)."""

    def __init__(self, field: Callable, clock: LogSigmaClock):
        super().__init__()
        self.field, self.clock = field, clock

    def forward(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, rate = self.clock.time_and_rate(tau)
        return self.field(t, y) * rate.to(y.dtype)


def _equal_steps(steps: int):
    """A torchdiffeq grid constructor of exactly ``steps`` equal steps over the span (its own ``step_size`` rule,
    ceil(span / step_size + 1) points, adds a step of round-off length for some step counts)."""
    def grid(func, y0, t: torch.Tensor) -> torch.Tensor:
        fractions = torch.arange(steps + 1, dtype=t.dtype, device=t.device) / steps
        points = t[0] + (t[-1] - t[0]) * fractions
        points[-1] = t[-1]
        return points
    return grid


class _WeakCall:
    """``getattr(owner, name)(*args)`` through a weak reference to ``owner``."""

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = weakref.ref(owner), name

    def __call__(self, *args):
        owner = self.owner()
        if owner is not None:
            getattr(owner, self.name)(*args)


class _StepRecorder:
    """torchdiffeq step callbacks: count accepted and rejected steps, remember the last (t, dt) tried."""

    def _setup_callbacks(self, method: str, monitor: Optional[FailureMonitor], direction: float = 1.0) -> None:
        # torchdiffeq integrates a decreasing span in the clock -t: the callbacks see t in the caller's clock but
        # a positive step dt, so a step from t0 reaches t0 + direction * dt
        self.accepted, self.rejected, self.attempted, self.monitor = 0, 0, 0, monitor
        self.direction, self.clock = direction, None  # clock: the solver's time is tau (LogSigmaClock), not t
        self.t_tried, self.dt_tried, self.dt_before, self.t_reached = None, None, None, None
        valid = _ODE_SOLVERS[method].valid_callbacks()
        if "callback_accept_step" in valid:  # through a weak reference: a bound method would make a reference
            self.callback_accept_step = _WeakCall(self, "_accept")  # cycle that keeps the field (and the model
            self.callback_reject_step = _WeakCall(self, "_reject")  # it holds) alive until the cyclic collector

    def callback_step(self, t0, y0, dt):  # before every step, adaptive or fixed
        self.attempted += 1
        self.t_tried, self.dt_tried, self.dt_before = t0, dt, self.dt_tried
        if self.monitor is not None:
            self.monitor.stepping()

    def _accept(self, t0, y0, dt):
        self.accepted += 1
        self.t_reached = t0 + self.direction * dt
        if self.monitor is not None:
            self.monitor.accepted()

    def _reject(self, t0, y0, dt):
        self.rejected += 1
        if self.monitor is not None:
            self.monitor.rejected()

    def where(self) -> Tuple[float, float]:
        """(time reached, last step size tried) as floats; NaN where unknown. torchdiffeq turns a non-finite step
        proposal into dt = 0, so a zero step reports the one tried before it."""
        t = self.t_reached if self.t_reached is not None else self.t_tried
        dt = math.nan if self.dt_tried is None else float(self.dt_tried)
        if dt == 0.0 and self.dt_before is not None:
            dt = float(self.dt_before)
        t = math.nan if t is None else float(t)
        if self.clock is not None and not math.isnan(t):
            if not math.isnan(dt):
                dt = self.clock.step_in_t(t, self.direction * dt)
            t = float(self.clock.t(torch.tensor(t, dtype=torch.float64)))
        return t, dt


class _ODEFunc(_StepRecorder, torch.nn.Module):
    """Probability-flow field plus torchdiffeq step callbacks that count accepted and rejected steps."""

    def __init__(self, ode: ProbabilityFlowODE, method: str, monitor: Optional[FailureMonitor], direction: float):
        torch.nn.Module.__init__(self)
        self.ode = ode
        self._setup_callbacks(method, monitor, direction)

    def forward(self, t, x):
        return self.ode(t, x)


def _solver_error(name: str, func: _StepRecorder, err: BaseException, batch: int, max_steps: int,
                  t_end: float) -> Optional[SolverError]:
    """The :class:`SolverError` for torchdiffeq's assertion ``err`` (None if it is not a failure of the solve)."""
    text = str(err)
    t, dt = func.where()
    if "max_num_steps" in text or isinstance(err, _StepLimit):
        bad, why = func.monitor.culprits()
        return SolverError(name, bad, t, dt, f"max_steps={max_steps} steps did not reach t={t_end:g}",
                           detail=why, batch=batch, hint=STEP_LIMIT_HINT, maskable=False)
    if "underflow in dt" in text or "non-finite values in state" in text:
        bad, why = func.monitor.culprits()
        return SolverError(name, bad, t, dt, "the step size underflowed", detail=why, batch=batch)
    return None


def _solve_isolated(solver, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int], no_steps: str):
    """``solver._solve`` over the batch; an adaptive solve (which refuses ``steps``, saying ``no_steps``) sets aside
    the examples that make it fail when ``solver.on_failure == "mask"`` (their indices in ``solver.failed``)."""
    if solver.adaptive and steps is not None:
        raise ValueError(f"steps: {no_steps}; got steps={steps!r}.")
    if not solver.adaptive:
        solver.failed = []
        return solver._solve(ctx, x, ts, steps)
    traj, x, n, solver.failed = solve_isolating_failures(lambda c, z: solver._solve(c, z, ts, steps), ctx, x,
                                                         len(ts), solver.on_failure)
    return traj, x, n


# torchdiffeq options that the solve sets itself, and the argument of sdegen's that sets them
_OWNED_ODE_OPTIONS = {"norm": "the per-example error norm that names failing examples",
                      "step_t": "the end time, which adaptive solves land on", "max_num_steps": "max_steps=",
                      "grid_constructor": "steps=", "step_size": "steps=", "rtol": "rtol=", "atol": "atol="}


def _check_ode_options(solver: str, adaptive: bool, options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``options`` for torchdiffeq's ``solver``: a dict of the keywords its constructor reads (ValueError for one it
    does not read, which torchdiffeq would only warn of, and for one that sdegen sets, naming what sets it)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict of torchdiffeq solver options; got {type(options).__name__}.")
    valid = set()
    for cls in _ODE_SOLVERS[solver].__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            valid |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    valid = (valid - {"self", "func", "y0", "rtol", "atol"}) | ({"norm"} if adaptive else set())
    owned = sorted(k for k in options if k in _OWNED_ODE_OPTIONS)
    if owned:
        raise ValueError(f"options {owned}: sdegen sets these itself ({'; '.join(f'{k}: {_OWNED_ODE_OPTIONS[k]}' for k in owned)}).")
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"options {unknown} are not options of torchdiffeq's {solver!r} (valid: "
                         f"{sorted(valid - set(_OWNED_ODE_OPTIONS)) or 'none'}); torchdiffeq would ignore them.")
    return dict(options)


class ODESolver(Solver):
    """Probability-flow ODE through ``torchdiffeq.odeint`` (adaptive dopri5 by default).

    Args:
        solver: any torchdiffeq method name: adaptive ("dopri5", "bosh3", ...) or fixed-grid ("rk4", "euler",
            "midpoint", ...).
        rtol, atol: tolerances of adaptive methods (default 1e-5 each), enforced per example (max over the batch
            of per-example RMS).
        max_steps: adaptive step limit (an int >= 1; default 100_000).
        on_failure: for adaptive methods, "raise" (default): a non-finite state or a step size that underflows
            raise :class:`sdegen.SolverError` naming the examples responsible, the time reached and the last
            step (as does the step limit, in either mode); "mask": those examples are set aside and the solve
            restarts on the others (their result equals a run on them alone, since the batch shares its steps),
            the failed rows are NaN and their indices are kept in :attr:`failed`.
        options: extra torchdiffeq options (override the defaults set here).
    Fixed-grid methods take ``steps`` equal steps (default 100) and, like the fixed-step samplers, return every
    example, one whose score is non-finite as a non-finite row; rtol, atol, max_steps and on_failure apply to
    adaptive methods only, and passing one with a fixed-grid method raises ValueError. Adaptive methods are told
    to land exactly on the end time (option ``step_t``) and the field is evaluated at clamp(t, t_min, T), so the
    score is never asked for a time outside [t_min, T].
    """

    stochastic = False

    def __init__(self, solver: str = "dopri5", rtol: Optional[float] = None, atol: Optional[float] = None,
                 max_steps: Optional[int] = None, options: Optional[Dict[str, Any]] = None,
                 on_failure: Optional[str] = None):
        if solver not in _ODE_SOLVERS or solver == "scipy_solver":
            raise ValueError(f"unknown torchdiffeq solver {solver!r}; valid: {', '.join(ODE_METHODS)}.")
        self.adaptive = is_adaptive_ode_method(solver)
        if not self.adaptive:
            reject_inapplicable({"rtol": rtol, "atol": atol, "max_steps": max_steps, "on_failure": on_failure},
                                f"it applies to adaptive torchdiffeq solvers (e.g. 'dopri5', 'bosh3'), while "
                                f"{solver!r} takes a fixed grid of `steps` equal steps")
        for name, v in (("rtol", rtol), ("atol", atol)):
            check_number(v, name, lo=0.0, lo_open=True, none_ok=True)
        max_steps = check_int(max_steps, "max_steps", lo=1, none_ok=True, hint=" (the adaptive step limit)")
        self.solver = solver
        self.rtol, self.atol = float(1e-5 if rtol is None else rtol), float(1e-5 if atol is None else atol)
        self.max_steps = 100_000 if max_steps is None else max_steps
        self.options = _check_ode_options(solver, self.adaptive, options)
        self.default_steps = None if self.adaptive else 100
        self.on_failure = check_on_failure("raise" if on_failure is None else on_failure)
        self.failed: list = []

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Integrate from ts[0] to ts[-1]; returns (states at every ts (len(ts), B, ...), final state, steps)."""
        return _solve_isolated(self, ctx, x, ts, steps, f"the adaptive torchdiffeq solver {self.solver!r} chooses "
                               "its own steps (set rtol/atol); for a fixed number of steps pass solver='rk4' (or "
                               "'euler', 'midpoint', 'heun3') with steps")

    def _solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
               ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        sde, score = ctx.sde, ctx.score
        lo, hi = float(ts.min()), float(ts.max())
        monitor = FailureMonitor() if self.adaptive else None
        direction = -1.0 if float(ts[-1]) < float(ts[0]) else 1.0
        flow, clock = ProbabilityFlowODE(sde, score, t_clamp=(lo, hi)), clock_for(sde, self.adaptive)
        func = _ODEFunc(flow if clock is None else _InClock(flow, clock), self.solver, monitor, direction)
        func.clock = clock
        t = (ts if clock is None else clock.tau(ts)).to(device=x.device)
        if self.adaptive:
            options = {"norm": monitor, "step_t": t[-1:], "max_num_steps": self.max_steps}
        else:
            options = {"grid_constructor": _equal_steps(steps or self.default_steps)}
        options.update(self.options)
        name = f"'ode' (torchdiffeq {self.solver!r})"
        try:
            out = torchdiffeq.odeint(func, x, t, rtol=self.rtol, atol=self.atol, method=self.solver, options=options)
        except AssertionError as err:
            failure = _solver_error(name, func, err, x.shape[0], self.max_steps, float(ts[-1])) if self.adaptive \
                else None
            if failure is None:
                raise
            raise failure from None
        if self.adaptive:
            check_finite_result(out[-1], name, float(ts[-1]), func.where()[1])
        return out, out[-1], func.accepted if self.adaptive else func.attempted

    def __repr__(self) -> str:
        if not self.adaptive:
            return f"ODESolver(solver={self.solver!r})"
        return f"ODESolver(solver={self.solver!r}, rtol={self.rtol:g}, atol={self.atol:g})"


class PerExampleBrownian(torchsde.BaseBrownian):
    """Brownian motion on [t0, t1] of shape (B, D) whose path i depends only on seeds[i].

    A virtual Brownian tree (Li et al. 2020, "Scalable gradients for SDEs", section 6): W(t0) = 0, the
    root's right end W(t0 + 2^L h) ~ N(0, 2^L h I), and each dyadic midpoint is drawn from its Brownian
    bridge with noise keyed by the node. With ``h`` the solver's fixed step, every grid time is a node at
    depth L, so fixed-step increments are exact; other times descend until they lie within ``tol`` of a node,
    whose value they take (so increments between any two query times further apart than ``tol`` have the right
    variance and disjoint ones are independent, to O(tol)). Default tol: 1e-9 of the span, the round-off that
    grid times computed by different additions may differ by.
    """

    def __init__(self, seeds: torch.Tensor, t0: float, t1: float, shape, dtype, device, h: Optional[float] = None,
                 tol: Optional[float] = None):
        check_number(t0, "t0")
        check_number(t1, "t1")
        if not float(t1) > float(t0):
            raise ValueError(f"t1 must be greater than t0; got t0={t0!r}, t1={t1!r}.")
        span = float(t1) - float(t0)
        check_number(h, "h", lo=0.0, lo_open=True, none_ok=True, hint=" (the solver's fixed step)")
        check_number(tol, "tol", lo=0.0, lo_open=True, none_ok=True, hint=" (the tree's resolution in time)")
        shape = tuple(shape)
        if not (isinstance(seeds, torch.Tensor) and seeds.ndim == 1 and len(shape) >= 1 and seeds.shape[0] == shape[0]):
            raise ValueError(f"seeds must be a (B,) tensor with B = shape[0]; got seeds of shape "
                             f"{tuple(getattr(seeds, 'shape', ()))} and shape {shape}.")
        check_floating_dtype(dtype, "dtype", "Brownian increments are continuous")
        self._seeds, self.t0, self.t1 = seeds.to(device), float(t0), float(t1)
        self._shape, self._dtype, self._device = shape, dtype, torch.device(device)
        h = span if h is None else float(h)
        depth = max(0, math.ceil(math.log2(span / h - 1e-9))) if span > h else 0
        self._root_end = self.t0 + h * 2**depth
        self.tol = 1e-9 * span if tol is None else float(tol)
        self._eq = self.tol
        self._w1 = math.sqrt(self._root_end - self.t0) * self._normal(1)
        self._cache: Dict[float, torch.Tensor] = {}

    def _normal(self, node: int) -> torch.Tensor:
        return normal_from_seeds(self._seeds, (1 << 50) + node, self._shape[1:], self._dtype)

    def _w(self, t: float) -> torch.Tensor:
        for tc, wc in self._cache.items():
            if abs(tc - t) <= self._eq:
                return wc
        a, b, node = self.t0, self._root_end, 1
        wa, wb = torch.zeros(self._shape, dtype=self._dtype, device=self._device), self._w1
        while True:
            if abs(t - a) <= self._eq:
                w = wa
                break
            if abs(t - b) <= self._eq:
                w = wb
                break
            mid = 0.5 * (a + b)
            wm = 0.5 * (wa + wb) + math.sqrt(0.25 * (b - a)) * self._normal(2 * node)
            node = 2 * node + (t > mid)
            a, b, wa, wb = (a, mid, wa, wm) if t <= mid else (mid, b, wm, wb)
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[t] = w
        return w

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("PerExampleBrownian has no Levy area; use a method that needs none (not 'srk').")
        if tb is None:
            ta, tb = self.t0, ta
        ta, tb = min(max(float(ta), self.t0), self.t1), min(max(float(tb), self.t0), self.t1)
        return self._w(tb) - self._w(ta)

    def __repr__(self):
        return f"PerExampleBrownian(t0={self.t0}, t1={self.t1}, shape={self._shape}, tol={self.tol})"

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return self._shape

    @property
    def levy_area_approximation(self):
        return "none"


class _SharedFirstDrift(torch.nn.Module):
    """A torchsde SDE whose first drift evaluation serves twice: ``sdeint`` checks the drift's shape at (t0, y0)
    before its solver evaluates the same point, which cost one network call per solve (N + 1 for N Euler steps)."""

    def __init__(self, rsde: torch.nn.Module):
        super().__init__()
        self.rsde, self.noise_type, self.sde_type = rsde, rsde.noise_type, rsde.sde_type
        self.first: Optional[tuple] = None  # (tau as a float, y, drift) of the first evaluation, until reused
        self.calls = 0

    def f(self, tau, y):
        self.calls += 1
        if self.first is not None and self.calls == 2:
            first_tau, first_y, out = self.first
            self.first = None
            if y is first_y and float(tau) == first_tau:  # host times: no device read
                return out
        out = self.rsde.f(tau, y)
        if self.calls == 1:
            self.first = (float(tau), y, out)
        return out

    def g(self, tau, y):
        return self.rsde.g(tau, y)


class _WatchedSDE(torch.nn.Module):
    """A torchsde SDE that watches its drift: which examples gave a non-finite value (kept on the device, no host
    read), and the solver times (tau) of the last drift evaluations, for the message of a failed solve."""

    def __init__(self, rsde: torch.nn.Module):
        super().__init__()
        self.rsde, self.noise_type, self.sde_type = rsde, rsde.noise_type, rsde.sde_type
        self.bad: Optional[torch.Tensor] = None
        self.taus: list = []

    def f(self, tau, y):
        out = self.rsde.f(tau, y)
        bad = nonfinite_rows(out)
        self.bad = bad if self.bad is None else self.bad | bad
        if not self.taus or self.taus[-1] is not tau:
            self.taus = self.taus[-1:] + [tau]
        return out

    def g(self, tau, y):
        return self.rsde.g(tau, y)

    def where(self, T: float) -> Tuple[float, float]:
        """(t = T - tau of the last drift evaluation, spacing of the last two evaluation times) as floats."""
        if not self.taus:
            return math.nan, math.nan
        taus = [float(v) for v in self.taus]
        return T - taus[-1], (abs(taus[-1] - taus[0]) if len(taus) > 1 else math.nan)


class SDESolver(Solver):
    """Reverse-time SDE through ``torchsde.sdeint`` (Euler-Maruyama by default).

    Args:
        solver: a torchsde method valid for diagonal (here additive) noise: euler, milstein, srk, midpoint,
            heun, euler_heun (reversible_heun is refused: it is unstable for the contracting drift of the reverse
            SDE). srk costs 10 evaluations per step (torchsde's general diagonal-noise scheme).
        options: torchsde method options (milstein's ``grad_free`` only; others raise ValueError).
        adaptive: torchsde's adaptive stepping (error estimated by step doubling), with rtol, atol (finite, > 0;
            default 1e-3 each) and dt_min (the smallest step, > 0, default 1e-5; steps that small are accepted
            whatever their error). Without it the solve takes ``steps`` equal steps (default 1000) and returns
            every example, one whose score is non-finite as a non-finite row, like the fixed-step samplers.
        on_failure: for adaptive solves, "raise" (default): NaN in the error estimate or a non-finite result raise
            :class:`sdegen.SolverError` naming the examples whose drift became non-finite; "mask": those examples
            are set aside and the solve restarts on the others with their own noise (their result equals a run on
            them alone), the failed rows are NaN and their indices are kept in :attr:`failed`.
        rtol, atol, dt_min and on_failure apply to ``adaptive=True`` only; passing one without it raises ValueError.
    Every method but "srk" uses :class:`PerExampleBrownian`, so example i's sample depends only on its seed;
    "srk" needs space-time Levy area and uses torchsde's BrownianInterval seeded from the first example's seed
    (reproducible, but not batch-size invariant), as does ``noise="generator"`` in :func:`sdegen.sample`.

    The result keeps the noise of torchsde's last step (variance g^2 |dt| for Euler-Maruyama): torchsde returns
    states, not the noise-free mean of its final step, and its uniform steps in t are widest, relative to the
    noise level, near t_min. Within-mode variances are therefore too large at small step counts (benchmarks/
    stochastic.py); :class:`sdegen.samplers.EulerMaruyama` ends with its mean, and the exponential SDE
    samplers ("dpmpp_2m_sde", "sa_solver") reach the noise floor at 50 steps.
    """

    stochastic = True

    def __init__(self, solver: str = "euler", adaptive: bool = False, rtol: Optional[float] = None,
                 atol: Optional[float] = None, dt_min: Optional[float] = None,
                 options: Optional[Dict[str, Any]] = None, on_failure: Optional[str] = None):
        if solver in _UNSTABLE_SDE_METHODS:
            raise ValueError(f"solver {solver!r} does not sample the reverse SDE: {_UNSTABLE_SDE_METHODS[solver]}; "
                             f"use 'heun' or 'midpoint' (valid: {', '.join(sorted(SDE_METHODS))}).")
        if solver not in SDE_METHODS:
            raise ValueError(f"unknown torchsde solver {solver!r}; valid: {', '.join(sorted(SDE_METHODS))}.")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False; got {adaptive!r}.")
        if not adaptive:
            reject_inapplicable({"rtol": rtol, "atol": atol, "dt_min": dt_min, "on_failure": on_failure},
                                "it applies to torchsde's adaptive stepping (pass adaptive=True), while "
                                "adaptive=False takes `steps` equal steps")
        for name, v in (("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
            check_number(v, name, lo=0.0, lo_open=True, none_ok=True)
        self.solver, self.adaptive = solver, adaptive
        self.rtol, self.atol, self.dt_min = (float(d if v is None else v)
                                             for v, d in ((rtol, 1e-3), (atol, 1e-3), (dt_min, 1e-5)))
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of torchsde method options or None; got {type(options).__name__}.")
        unknown = sorted(set(options or {}) - _SDE_OPTIONS.get(solver, set()))
        if unknown:
            valid = sorted(_SDE_OPTIONS.get(solver, set()))
            raise ValueError(f"options {unknown} are not options of torchsde's {solver!r} (valid: {valid or 'none'}); "
                             "torchsde would ignore them.")
        self.options = dict(options or {})
        self.default_steps = 1000
        self.on_failure = check_on_failure("raise" if on_failure is None else on_failure)
        self.failed: list = []

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        return _solve_isolated(self, ctx, x, ts, steps, "the adaptive torchsde solve chooses its own steps (set "
                               "rtol/atol/dt_min); leave steps unset or pass adaptive=False")

    def _solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        sde, score, noise = ctx.sde, ctx.score, ctx.noise
        B = x.shape[0]
        event_shape = x.shape[1:]
        rsde = sde.reverse(score, event_shape=event_shape)
        rsde.sde_type = SDE_METHODS[self.solver]
        rsde = _SharedFirstDrift(rsde)
        watched = _WatchedSDE(rsde) if self.adaptive else rsde
        # the increasing clock stays on the host: torchsde compares and steps its times in Python (min(t + dt, t1)),
        # which on device tensors would wait for the device at every step
        taus = sde.T - ts
        y0 = x.reshape(B, -1)
        t0, t1 = float(taus[0]), float(taus[-1])
        if self.adaptive and self.dt_min >= t1 - t0:
            raise ValueError(f"dt_min={self.dt_min:g} must be below the span {t1 - t0:g} it integrates (steps that "
                             "small are accepted whatever their error).")
        n = steps or self.default_steps
        # torchsde steps to min(t + dt, t1): with dt = span / n its sums fall short of t1 by round-off for about
        # half of all n, and a step of round-off length (a full step's evaluations) followed; a dt longer by
        # 8 n eps lands step n on t1 (the Brownian tree's nodes agree within its tolerance)
        dt = (t1 - t0) / n * (1.0 + 8.0 * n * torch.finfo(torch.float64).eps)
        if self.solver == "srk" or not getattr(noise, "batch_invariant", False):
            entropy = int(noise.seeds[0]) if noise is not None else None
            levy = "space-time" if self.solver == "srk" else "none"
            bm = torchsde.BrownianInterval(t0, t1, size=y0.shape, dtype=y0.dtype, device=y0.device,
                                           levy_area_approximation=levy, entropy=entropy)
        else:
            bm = PerExampleBrownian(noise.seeds, t0, t1, y0.shape, y0.dtype, y0.device, h=dt)
        options = dict(self.options)
        if self.solver == "milstein":
            options.setdefault("grad_free", True)  # g does not depend on x: no derivative needed
        name = f"'sde' (torchsde {self.solver!r}, adaptive)"
        try:
            with warnings.catch_warnings():  # torchsde warns of non-additive noise for a declared "diagonal" type
                warnings.filterwarnings("ignore", message=".*non-additive noise", category=UserWarning)
                ys = torchsde.sdeint(watched, y0, taus, bm=bm, method=self.solver, dt=dt, adaptive=self.adaptive,
                                     rtol=self.rtol, atol=self.atol, dt_min=self.dt_min, options=options)
        except AssertionError as err:
            if not (self.adaptive and "nan" in str(err).lower()):
                raise
            t, spacing = watched.where(sde.T)
            raise SolverError(name, rows_to_list(watched.bad), t, spacing, "NaN in the error estimate",
                              detail="the drift (the score) became non-finite for these examples; the step size "
                              "is the spacing of the last drift evaluations", batch=B) from None
        out = ys.reshape((len(ts),) + tuple(x.shape))
        if self.adaptive:
            check_finite_result(out[-1], name, float(ts[-1]), watched.where(sde.T)[1])
        return out, out[-1], None if self.adaptive else n

    def __repr__(self) -> str:
        return f"SDESolver(solver={self.solver!r}, adaptive={self.adaptive})"


# --- augmented solves for likelihoods (sdegen.likelihood) ---------------------------------------------------

class _StepLimit(Exception):
    """Raised inside an augmented solve when its own step counter passes max_steps."""


class AugmentedNorm(FailureMonitor):
    """Error norm for an augmented state (B, D + 1) = (x flattened, log-density term).

    Per example: the RMS of the D + 1 error ratios (the state's and the log term's), which is torchdiffeq's
    default norm applied to one example's augmented state; then the max over examples, so that every example
    meets the tolerance, not only the batch on average. The log term counts as one component of D + 1: holding
    it alone to the tolerance (a max of the two parts) cost 1.1-1.6x the NFE of dopri5 on the whole batch for
    no accuracy the oracle could see in the log-density per dimension (benchmarks/adaptive_nfe.py). Keeps the
    last per-example ratios and the non-finite examples on the device (no host sync) so a failed solve can
    name the examples that stopped it. (On a flat (B, D + 1) state this is :class:`FailureMonitor`'s norm.)
    """


class _CountingFunc(_StepRecorder, torch.nn.Module):
    """Wraps a field: counts evaluations and steps, and stops an adaptive solve after ``max_steps`` steps (None: a
    fixed grid, whose step count is its own). On a fixed grid it keeps, on the device, the earliest time at which
    each example's field was non-finite (``failed_at``, (B,) float64, NaN while finite)."""

    def __init__(self, field: torch.nn.Module, norm: AugmentedNorm, method: str, max_steps: Optional[int],
                 y0: torch.Tensor):
        torch.nn.Module.__init__(self)
        self.field, self.max_steps, self.nfe = field, max_steps, 0
        self.failed_at = None if max_steps is not None else torch.full(
            (y0.shape[0],), math.nan, dtype=torch.float64, device=y0.device)
        self._setup_callbacks(method, norm)  # fixed-grid solvers warn about callbacks they never call

    def forward(self, t, y):
        self.nfe += 1
        out = self.field(t, y)
        if self.failed_at is not None:
            first = nonfinite_rows(out) & torch.isnan(self.failed_at)
            self.failed_at = torch.where(first, t.detach().to(self.failed_at), self.failed_at)
        return out

    def callback_step(self, t0, y0, dt):  # before every step, adaptive or fixed
        super().callback_step(t0, y0, dt)
        if self.max_steps is not None and self.attempted > self.max_steps:
            raise _StepLimit()


def solve_augmented(field: torch.nn.Module, y0: torch.Tensor, t0: float, t1: float, *, method: str = "dopri5",
                    rtol: Optional[float] = None, atol: Optional[float] = None, max_steps: Optional[int] = None,
                    steps: Optional[int] = None, adjoint: bool = False, adjoint_params=None,
                    clock: Optional[LogSigmaClock] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Integrate ``dy/dt = field(t, y)`` for an augmented state y (B, D + 1) from t0 to t1 with torchdiffeq
    (in the clock tau of ``clock`` when given: see :class:`LogSigmaClock`; times reported are t).

    Adaptive methods control the error per example with :class:`AugmentedNorm` at ``rtol``, ``atol`` (default
    1e-5 each) within ``max_steps`` steps (default 10_000) and land exactly on t1; they raise
    :class:`sdegen.SolverError` naming the examples responsible when ``max_steps`` run out (those whose error
    ratio exceeded 1), when the step size underflows or when the result is not finite (those whose state, log
    term or derivative became non-finite). Fixed-grid methods take ``steps`` equal steps of the clock (default 100); there
    every example moves on its own, so one that fails costs the others nothing: its row of y(t1) comes back
    non-finite and ``info["failed_at"]`` ((B,) float64, NaN for the others) holds the earliest time at which its
    field was non-finite. An option of the other kind (``steps`` for an adaptive method; ``rtol``, ``atol`` or
    ``max_steps`` for a fixed grid) raises ValueError. ``adjoint=True`` uses ``torchdiffeq.odeint_adjoint``
    (memory O(1) in the number of steps) so gradients flow to y0 and to ``adjoint_params``.
    Returns (y(t1), info) with info = {"nfe", "steps", "rejected", "failed_at" (None for adaptive methods)}.
    """
    if method not in _ODE_SOLVERS or method == "scipy_solver":
        raise ValueError(f"unknown torchdiffeq method {method!r}; valid: {', '.join(ODE_METHODS)}.")
    check_int(steps, "steps", lo=1, none_ok=True)
    adaptive = is_adaptive_ode_method(method)
    if adaptive:
        reject_inapplicable({"steps": steps}, f"the adaptive method {method!r} chooses its own steps (set "
                            "rtol/atol); for a fixed number of steps pass a fixed-grid method such as 'rk4'")
        rtol, atol = (check_number(1e-5 if v is None else v, name, lo=0.0, lo_open=True)
                      for name, v in (("rtol", rtol), ("atol", atol)))
        max_steps = check_int(10_000 if max_steps is None else max_steps, "max_steps", lo=1)
    else:
        reject_inapplicable({"rtol": rtol, "atol": atol, "max_steps": max_steps},
                            f"it applies to adaptive methods (e.g. 'dopri5'), while {method!r} takes a fixed grid "
                            "of `steps` equal steps")
        rtol = atol = 1e-5  # not read by a fixed-grid method
    norm = AugmentedNorm()
    func = _CountingFunc(field if clock is None else _InClock(field, clock), norm, method, max_steps, y0)
    func.clock = clock
    t = torch.tensor([t0, t1], dtype=torch.float64)
    t = (t if clock is None else clock.tau(t)).to(y0.device)
    if adaptive:
        options = {"norm": norm, "step_t": t[-1:], "max_num_steps": max_steps + 1}
    else:
        options = {"grid_constructor": _equal_steps(steps or 100)}
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
    name = f"log_likelihood (torchdiffeq {method!r})"
    try:
        if adjoint:
            adj_opts = {"max_num_steps": max_steps + 1} if adaptive else dict(options)
            out = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_options=adj_opts, adjoint_params=adjoint_params,
                                             **kwargs)
        else:
            out = torchdiffeq.odeint(func, y0, t, **kwargs)
    except (_StepLimit, AssertionError) as err:
        failure = _solver_error(name, func, err, y0.shape[0], max_steps, t1) if adaptive else None
        if failure is None:
            raise
        failure.nfe = func.nfe  # the caller may count the evaluations of a failed attempt
        raise failure from None
    if adaptive:
        try:
            check_finite_result(out[-1], name, t1, func.where()[1])
        except SolverError as failure:
            failure.nfe = func.nfe
            raise
    steps_taken = func.accepted if adaptive else func.attempted
    failed_at = func.failed_at
    if failed_at is not None and clock is not None:
        failed_at = torch.where(torch.isnan(failed_at), failed_at, clock.t(failed_at.nan_to_num(0.0)))
    return out[-1], {"nfe": func.nfe, "steps": steps_taken, "rejected": func.rejected, "failed_at": failed_at}
