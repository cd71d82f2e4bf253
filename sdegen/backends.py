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

from ._util import bcast
from .noise import Noise, normal_from_seeds
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


class ODESolver:
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

    def solve(self, sde, score, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int], noise: Optional[Noise]
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Integrate from ts[0] to ts[-1]; returns (states at every ts (len(ts), B, ...), final state, steps)."""
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

    A virtual Brownian tree (Li et al. 2020): W(t0) = 0, W(t1) ~ N(0, (t1 - t0) I), and each
    dyadic midpoint is drawn from its Brownian bridge with noise keyed by the node, down to
    intervals of length ``tol``; inside such a leaf the bridge is sampled at the query time.
    """

    def __init__(self, seeds: torch.Tensor, t0: float, t1: float, shape, dtype, device, tol: float = 1e-6):
        self._seeds, self.t0, self.t1 = seeds.to(device), float(t0), float(t1)
        self._shape, self._dtype, self._device, self.tol = tuple(shape), dtype, torch.device(device), float(tol)
        self._w1 = math.sqrt(self.t1 - self.t0) * self._normal(1)
        self._cache: Dict[float, torch.Tensor] = {}

    def _normal(self, node: int) -> torch.Tensor:
        return normal_from_seeds(self._seeds, (1 << 50) + node, self._shape[1:], self._dtype)

    def _w(self, t: float) -> torch.Tensor:
        if t in self._cache:
            return self._cache[t]
        a, b, node = self.t0, self.t1, 1
        wa, wb = torch.zeros(self._shape, dtype=self._dtype, device=self._device), self._w1
        while t not in (a, b):
            mid = 0.5 * (a + b)
            if b - a <= self.tol:  # leaf: the bridge at t itself
                frac = (t - a) / (b - a)
                w = wa + frac * (wb - wa) + math.sqrt((t - a) * (b - t) / (b - a)) * self._normal(2 * node)
                break
            wm = 0.5 * (wa + wb) + math.sqrt(0.25 * (b - a)) * self._normal(2 * node)
            if t == mid:
                w = wm
                break
            node = 2 * node + (t > mid)
            a, b, wa, wb = (a, mid, wa, wm) if t < mid else (mid, b, wm, wb)
        else:
            w = wa if t == a else wb
        if len(self._cache) > 64:
            self._cache.clear()
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


class SDESolver:
    """Reverse-time SDE through ``torchsde.sdeint`` (Euler-Maruyama by default).

    Args:
        solver: a torchsde method valid for diagonal (here additive) noise: euler, milstein, srk, midpoint,
            heun, euler_heun, reversible_heun.
        adaptive: torchsde's adaptive stepping (error estimated by step doubling), with rtol, atol, dt_min.
    Every method but "srk" uses :class:`PerExampleBrownian`, so example i's sample depends only on its seed;
    "srk" needs space-time Levy area and uses torchsde's BrownianInterval seeded from the first example's seed
    (reproducible, but not batch-size invariant).
    """

    stochastic = True

    def __init__(self, solver: str = "euler", adaptive: bool = False, rtol: float = 1e-3, atol: float = 1e-3,
                 dt_min: float = 1e-5, options: Optional[Dict[str, Any]] = None):
        if solver not in SDE_METHODS:
            raise ValueError(f"unknown torchsde solver {solver!r}; valid: {', '.join(sorted(SDE_METHODS))}.")
        self.solver, self.adaptive, self.rtol, self.atol, self.dt_min = solver, bool(adaptive), rtol, atol, dt_min
        self.options = dict(options or {})
        self.default_steps = 1000

    def solve(self, sde, score, x, ts, steps, noise):
        B = x.shape[0]
        event_shape = x.shape[1:]
        rsde = sde.reverse(score, event_shape=event_shape)
        rsde.sde_type = SDE_METHODS[self.solver]
        taus = (sde.T - ts).to(device=x.device)  # increasing clock
        y0 = x.reshape(B, -1)
        t0, t1 = float(taus[0]), float(taus[-1])
        n = steps or self.default_steps
        dt = (t1 - t0) / n
        if self.solver == "srk":
            entropy = int(noise.seeds[0]) if noise is not None else None
            bm = torchsde.BrownianInterval(t0, t1, size=y0.shape, dtype=y0.dtype, device=y0.device,
                                           levy_area_approximation="space-time", entropy=entropy)
        else:
            bm = PerExampleBrownian(noise.spawn(7).seeds, t0, t1, y0.shape, y0.dtype, y0.device,
                                    tol=min(1e-6, dt / 64))
        options = dict(self.options)
        if self.solver == "milstein":
            options.setdefault("grad_free", True)  # g does not depend on x: no derivative needed
        ys = torchsde.sdeint(rsde, y0, taus, bm=bm, method=self.solver, dt=dt, adaptive=self.adaptive,
                             rtol=self.rtol, atol=self.atol, dt_min=self.dt_min, options=options)
        out = ys.reshape((len(ts),) + tuple(x.shape))
        return out, out[-1], n if not self.adaptive else -1

    def __repr__(self) -> str:
        return f"SDESolver(solver={self.solver!r}, adaptive={self.adaptive})"
