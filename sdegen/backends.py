"""Adapters to torchdiffeq and torchsde: the only modules that import them.

:class:`ODESolver` integrates the probability-flow ODE with ``torchdiffeq.odeint``;
:class:`SDESolver` integrates the reverse-time SDE with ``torchsde.sdeint`` in the increasing clock
tau = T - t, with a per-example Brownian motion (:class:`PerExampleBrownian`) so that example i's
path depends only on its own seed.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torchdiffeq
import torchsde
from torchdiffeq._impl.odeint import SOLVERS as _ODE_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from .noise import normal_from_seeds
from .samplers.base import Context, Solver
from .sde import ProbabilityFlowODE

ODE_METHODS = tuple(sorted(m for m in _ODE_SOLVERS if m != "scipy_solver"))
# additive noise: the Ito and Stratonovich readings coincide, so every diagonal-noise method applies
SDE_METHODS = {"euler": "ito", "milstein": "ito", "srk": "ito", "midpoint": "stratonovich",
               "heun": "stratonovich", "euler_heun": "stratonovich", "reversible_heun": "stratonovich"}


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """max over examples of the per-example RMS: every example, not the batch average, meets the tolerance."""
    return x.reshape(x.shape[0], -1).pow(2).mean(1).sqrt().max()


def is_adaptive_ode_method(method: str) -> bool:
    return issubclass(_ODE_SOLVERS[method], RKAdaptiveStepsizeODESolver)


class _ODEFunc(torch.nn.Module):
    """Probability-flow field plus torchdiffeq step callbacks that count accepted and rejected steps."""

    def __init__(self, ode: ProbabilityFlowODE, method: str):
        super().__init__()
        self.ode, self.accepted, self.rejected = ode, 0, 0
        valid = _ODE_SOLVERS[method].valid_callbacks()
        if "callback_accept_step" in valid:
            self.callback_accept_step = self._accept
            self.callback_reject_step = self._reject
        elif "callback_step" in valid:
            self.callback_step = self._accept

    def _accept(self, t0, y0, dt):
        self.accepted += 1

    def _reject(self, t0, y0, dt):
        self.rejected += 1

    def forward(self, t, x):
        return self.ode(t, x)


class ODESolver(Solver):
    """Probability-flow ODE through ``torchdiffeq.odeint`` (adaptive dopri5 by default).

    Args:
        solver: any torchdiffeq method name ("dopri5", "bosh3", "rk4", "euler", ...).
        rtol, atol: tolerances of adaptive methods, enforced per example (max over the batch of per-example RMS).
        max_steps: adaptive step limit; exceeding it raises RuntimeError.
        options: extra torchdiffeq options (override the defaults set here).
    Fixed-grid methods take ``steps`` equal steps. Adaptive methods are told to land exactly on the end
    time (option ``step_t``) and the field is evaluated at clamp(t, t_min, T), so the score is never
    asked for a time outside [t_min, T].
    """

    stochastic = False

    def __init__(self, solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 100_000,
                 options: Optional[Dict[str, Any]] = None):
        if solver not in _ODE_SOLVERS or solver == "scipy_solver":
            raise ValueError(f"unknown torchdiffeq solver {solver!r}; valid: {', '.join(ODE_METHODS)}.")
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}.")
        self.solver, self.rtol, self.atol, self.max_steps = solver, float(rtol), float(atol), int(max_steps)
        self.options = dict(options or {})
        self.adaptive = is_adaptive_ode_method(solver)
        self.default_steps = None if self.adaptive else 100

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Integrate from ts[0] to ts[-1]; returns (states at every ts (len(ts), B, ...), final state, steps)."""
        sde, score = ctx.sde, ctx.score
        lo, hi = float(ts.min()), float(ts.max())
        func = _ODEFunc(ProbabilityFlowODE(sde, score, t_clamp=(lo, hi)), self.solver)
        t = ts.to(device=x.device)
        options = {}
        if self.adaptive:
            options = {"norm": per_example_norm, "step_t": t[-1:], "max_num_steps": self.max_steps}
        else:
            n = steps or self.default_steps
            options = {"step_size": (hi - lo) / n}
        options.update(self.options)
        try:
            out = torchdiffeq.odeint(func, x, t, rtol=self.rtol, atol=self.atol, method=self.solver, options=options)
        except AssertionError as err:
            if "max_num_steps" in str(err):
                raise RuntimeError(f"the ODE solver {self.solver!r} did not reach t={float(ts[-1]):g} within "
                                   f"max_steps={self.max_steps} steps; loosen rtol/atol or raise max_steps.") from None
            raise
        return out, out[-1], func.accepted

    def __repr__(self) -> str:
        return f"ODESolver(solver={self.solver!r}, rtol={self.rtol:g}, atol={self.atol:g})"


class PerExampleBrownian(torchsde.BaseBrownian):
    """Brownian motion on [t0, t1] of shape (B, D) whose path i depends only on seeds[i].

    A virtual Brownian tree (Li et al. 2020, "Scalable gradients for SDEs", section 6): W(t0) = 0, the
    root's right end W(t0 + 2^L h) ~ N(0, 2^L h I), and each dyadic midpoint is drawn from its Brownian
    bridge with noise keyed by the node. With ``h`` the solver's fixed step, every grid time is a node at
    depth L, so fixed-step increments are exact; other times descend to intervals of length ``tol`` and
    sample the bridge at the query time.
    """

    def __init__(self, seeds: torch.Tensor, t0: float, t1: float, shape, dtype, device, h: Optional[float] = None,
                 tol: float = 1e-6):
        self._seeds, self.t0, self.t1 = seeds.to(device), float(t0), float(t1)
        self._shape, self._dtype, self._device = tuple(shape), dtype, torch.device(device)
        span = self.t1 - self.t0
        h = span if h is None else float(h)
        depth = max(0, math.ceil(math.log2(span / h - 1e-9))) if span > h else 0
        self._root_end = self.t0 + h * 2**depth
        self.tol = min(float(tol), h)
        self._eq = 1e-9 * span  # grid times computed by different additions may differ by round-off
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
            if b - a <= self.tol:  # leaf: sample the bridge at t itself
                frac = (t - a) / (b - a)
                w = wa + frac * (wb - wa) + math.sqrt((t - a) * (b - t) / (b - a)) * self._normal(2 * node)
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


class SDESolver(Solver):
    """Reverse-time SDE through ``torchsde.sdeint`` (Euler-Maruyama by default).

    Args:
        solver: a torchsde method valid for diagonal (here additive) noise: euler, milstein, srk, midpoint,
            heun, euler_heun, reversible_heun.
        adaptive: torchsde's adaptive stepping (error estimated by step doubling), with rtol, atol, dt_min.
    Every method but "srk" uses :class:`PerExampleBrownian`, so example i's sample depends only on its seed;
    "srk" needs space-time Levy area and uses torchsde's BrownianInterval seeded from the first example's seed
    (reproducible, but not batch-size invariant), as does ``noise="generator"`` in :func:`sdegen.sample`.
    """

    stochastic = True

    def __init__(self, solver: str = "euler", adaptive: bool = False, rtol: float = 1e-3, atol: float = 1e-3,
                 dt_min: float = 1e-5, options: Optional[Dict[str, Any]] = None):
        if solver not in SDE_METHODS:
            raise ValueError(f"unknown torchsde solver {solver!r}; valid: {', '.join(sorted(SDE_METHODS))}.")
        self.solver, self.adaptive, self.rtol, self.atol, self.dt_min = solver, bool(adaptive), rtol, atol, dt_min
        self.options = dict(options or {})
        self.default_steps = 1000

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        sde, score, noise = ctx.sde, ctx.score, ctx.noise
        B = x.shape[0]
        event_shape = x.shape[1:]
        rsde = sde.reverse(score, event_shape=event_shape)
        rsde.sde_type = SDE_METHODS[self.solver]
        taus = (sde.T - ts).to(device=x.device)  # increasing clock
        y0 = x.reshape(B, -1)
        t0, t1 = float(taus[0]), float(taus[-1])
        n = steps or self.default_steps
        dt = (t1 - t0) / n
        if self.solver == "srk" or not getattr(noise, "batch_invariant", False):
            entropy = int(noise.seeds[0]) if noise is not None else None
            levy = "space-time" if self.solver == "srk" else "none"
            bm = torchsde.BrownianInterval(t0, t1, size=y0.shape, dtype=y0.dtype, device=y0.device,
                                           levy_area_approximation=levy, entropy=entropy)
        else:
            bm = PerExampleBrownian(noise.seeds, t0, t1, y0.shape, y0.dtype, y0.device, h=dt, tol=dt / 1024)
        options = dict(self.options)
        if self.solver == "milstein":
            options.setdefault("grad_free", True)  # g does not depend on x: no derivative needed
        ys = torchsde.sdeint(rsde, y0, taus, bm=bm, method=self.solver, dt=dt, adaptive=self.adaptive,
                             rtol=self.rtol, atol=self.atol, dt_min=self.dt_min, options=options)
        out = ys.reshape((len(ts),) + tuple(x.shape))
        return out, out[-1], None if self.adaptive else n

    def __repr__(self) -> str:
        return f"SDESolver(solver={self.solver!r}, adaptive={self.adaptive})"


# --- augmented solves for likelihoods (sdegen.likelihood) ---------------------------------------------------

class _StepLimit(Exception):
    """Raised inside an augmented solve when its own step counter passes max_steps."""


class AugmentedNorm:
    """Error norm for an augmented state (B, D + 1) = (x flattened, log-density term).

    Per example: max(RMS of the D state errors, |error of the log term|); then the max over examples, so
    every example (and its log-density, not only its state) meets the tolerance. Keeps the last per-example
    ratios on the device (no host sync) so a failed solve can name the examples that limited the step.
    """

    def __init__(self):
        self.last: Optional[torch.Tensor] = None
        self.last_rejected: Optional[torch.Tensor] = None

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        per = torch.maximum(ratio[:, :-1].pow(2).mean(1).sqrt(), ratio[:, -1].abs())
        self.last = per
        return per.max()


class _CountingFunc(torch.nn.Module):
    """Wraps a field: counts evaluations and steps, and stops the solve after ``max_steps`` steps."""

    def __init__(self, field: torch.nn.Module, norm: AugmentedNorm, max_steps: int, adaptive: bool):
        super().__init__()
        self.field, self.norm, self.max_steps = field, norm, max_steps
        self.nfe, self.attempted, self.accepted, self.rejected, self.t_reached = 0, 0, 0, 0, None
        if adaptive:  # fixed-grid solvers warn about callbacks they never call
            self.callback_accept_step, self.callback_reject_step = self._accept, self._reject

    def forward(self, t, y):
        self.nfe += 1
        return self.field(t, y)

    def callback_step(self, t0, y0, dt):  # before every step, adaptive or fixed
        self.attempted += 1
        if self.attempted > self.max_steps:
            raise _StepLimit()

    def _accept(self, t0, y0, dt):
        self.accepted += 1
        self.t_reached = t0 + dt

    def _reject(self, t0, y0, dt):
        self.rejected += 1
        self.norm.last_rejected = self.norm.last


def solve_augmented(field: torch.nn.Module, y0: torch.Tensor, t0: float, t1: float, *, method: str = "dopri5",
                    rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 10_000, steps: Optional[int] = None,
                    adjoint: bool = False, adjoint_params=None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Integrate ``dy/dt = field(t, y)`` for an augmented state y (B, D + 1) from t0 to t1 with torchdiffeq.

    Adaptive methods control the error per example with :class:`AugmentedNorm` and land exactly on t1;
    fixed-grid methods take ``steps`` equal steps. ``adjoint=True`` uses ``torchdiffeq.odeint_adjoint``
    (memory O(1) in the number of steps) so gradients flow to y0 and to ``adjoint_params``.
    Returns (y(t1), info) with info = {"nfe", "steps", "rejected"}.
    Raises RuntimeError naming the examples whose error exceeded the tolerance when ``max_steps`` run out.
    """
    if method not in _ODE_SOLVERS or method == "scipy_solver":
        raise ValueError(f"unknown torchdiffeq method {method!r}; valid: {', '.join(ODE_METHODS)}.")
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int (steps of a fixed-grid method); got {steps!r}.")
    norm = AugmentedNorm()
    func = _CountingFunc(field, norm, max_steps, is_adaptive_ode_method(method))
    t = torch.tensor([t0, t1], dtype=torch.float64, device=y0.device)
    if is_adaptive_ode_method(method):
        options = {"norm": norm, "step_t": t[-1:], "max_num_steps": max_steps + 1}
    else:
        options = {"step_size": (t1 - t0) / (steps or 100)}
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
    try:
        if adjoint:
            adj_opts = {"max_num_steps": max_steps + 1} if is_adaptive_ode_method(method) else dict(options)
            out = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_options=adj_opts, adjoint_params=adjoint_params,
                                             **kwargs)
        else:
            out = torchdiffeq.odeint(func, y0, t, **kwargs)
    except (_StepLimit, AssertionError) as err:
        if isinstance(err, AssertionError) and "max_num_steps" not in str(err):
            raise
        raise RuntimeError(_step_limit_message(func, norm, method, t0, t1, max_steps)) from None
    steps_taken = func.accepted if is_adaptive_ode_method(method) else func.attempted
    return out[-1], {"nfe": func.nfe, "steps": steps_taken, "rejected": func.rejected}


def _step_limit_message(func: _CountingFunc, norm: AugmentedNorm, method: str, t0: float, t1: float,
                        max_steps: int) -> str:
    ratios = norm.last_rejected if norm.last_rejected is not None else norm.last
    where = "" if func.t_reached is None else f" and reached t={float(func.t_reached):.6g}"
    if ratios is None:
        bad, worst = [], float("nan")
    else:
        ratios = ratios.detach().cpu()
        bad = torch.nonzero(ratios > 1.0).flatten().tolist() or [int(ratios.argmax())]
        worst = float(ratios.max())
    shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
    return (f"the {method!r} solve from t={t0:g} to t={t1:g} used all max_steps={max_steps} steps{where} without "
            f"finishing; examples [{shown}] ({len(bad)} of the batch) did not meet the tolerance in the last "
            f"rejected step (worst error ratio {worst:.3g}). Loosen rtol/atol, raise max_steps, or evaluate "
            f"those examples separately.")
