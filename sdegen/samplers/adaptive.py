"""An adaptive probability-flow solver that steps in u = log(m/s) = -log sigma, where the ODE is nearly linear.

In y = x/m the probability-flow ODE of any linear SDE reads dy/du = D(y, u) - y (see
:mod:`sdegen.fast_samplers`). The solver is the embedded pair of single-step exponential integrators of
DPM-Solver's adaptive algorithm (Lu et al. 2022, section 3.3 and algorithm 5, "DPM-Solver-23"), here in the
data-prediction form of DPM-Solver++ (Lu et al. 2022b): stages at u + h/3 and u + 2h/3 give a third-order
solution and, from the first stage alone, an embedded second-order one. Their difference drives a standard
step-size controller (Hairer, Norsett & Wanner, "Solving ODEs I", section II.4).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._validate import check_int, check_number
from ..errors import STEP_LIMIT_HINT, SolverError, check_on_failure, scatter_rows, solve_without_failures
from .base import Context, Solver, point as _point, time_at_u as _t_at
from .exponential import exp_moments, exp_poly_integral


def solve_isolating_failures(run, ctx: Context, x: torch.Tensor, n_times: int, on_failure: str):
    """``run(ctx, x) -> (states (n_times, B, ...), final state, steps)`` with failing examples set aside.

    With ``on_failure="mask"``, a :class:`SolverError` naming examples restarts ``run`` on the others with a
    context of their own (their noise streams start where the run's did, so the result equals a run on those
    examples alone, with the model's :meth:`~sdegen.Model.rows` for them); the failed rows of the states come back
    as NaN. The model must treat examples independently (example i's output depends only on x[i]). Returns (states, final state, steps of the last
    attempt, failed indices); NFE counts every attempt. A non-finite model output, the first one included, is the
    solve's to report (:attr:`Context.check_finite` is turned off), so that it names or sets aside the examples.
    """
    noise, B = ctx.noise, x.shape[0]
    key0 = getattr(noise, "key", 0)
    ctx.check_finite = False

    def attempt(keep):
        if keep is None:
            return run(ctx, x)
        sub_noise = None if noise is None else type(noise)(noise.seeds[keep.to(noise.seeds.device)], key=key0)
        sub = Context(ctx.sde, ctx.model.rows(keep), sub_noise)
        sub.grid_points, sub.check_finite = ctx.grid_points, False
        try:
            return run(sub, x[keep])
        finally:
            ctx.nfe += sub.nfe
            ctx.classifier_nfe += sub.classifier_nfe

    result, keep, failed = solve_without_failures(attempt, B, on_failure, x.device)
    if not failed:
        return result + (failed,)
    traj = scatter_rows(None if result is None else result[0], keep, B, x.expand((n_times,) + x.shape), dim=1)
    final = scatter_rows(None if result is None else result[1], keep, B, x)
    return traj, final, 0 if result is None else result[2], failed


class AdaptiveExponential(Solver):
    """Adaptive DPM-Solver-2(3) in the data-prediction form with error control in x, like torchdiffeq's.

    A step from u to u + h costs 3 NFE (2 when it retries after a rejection: the denoised value at u is
    kept). It is accepted when max over examples of the RMS of err / (atol + rtol max(|x|, |x'|)) is <= 1,
    err being the difference of the orders-3 and -2 solutions in x; the third-order one is kept (local
    extrapolation). NFE = 3 accepted + 2 rejected steps (:attr:`stats` holds both after a run).

    Args:
        rtol, atol: relative and absolute tolerances (as in torchdiffeq).
        h_init: first step in u (default: a tenth of the span of u).
        safety: the controller's safety factor; max_steps: limit on attempted steps (:class:`sdegen.SolverError`
            beyond it, naming the examples whose error exceeded the tolerance); max_factor: the largest growth of
            the step from one step to the next, > 1 (default 2).
        on_failure: "raise" (default): a non-finite state or a step size that underflows raise
            :class:`sdegen.SolverError` naming the examples responsible, the time reached and the last step
            (in u); "mask": those examples are set aside and the solve restarts on the others, so their result
            equals a run on them alone (the batch shares its steps); failed rows are NaN and their indices are
            kept in :attr:`failed` (``SampleInfo.extra["failed"]`` in :func:`sdegen.sample`).

    ``solve`` returns (states at every time in ts (len(ts), B, ...), final state, accepted steps); the accept
    test needs one host read of the error norm per step, as in any adaptive solver.
    """

    stochastic = False
    name = "adaptive_rk23"

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-3, h_init: Optional[float] = None,
                 safety: float = 0.9, max_steps: int = 10_000, max_factor: float = 2.0, on_failure: str = "raise"):
        rtol, atol = (check_number(v, name, lo=0.0, lo_open=True) for name, v in (("rtol", rtol), ("atol", atol)))
        h_init = check_number(h_init, "h_init", lo=0.0, lo_open=True, none_ok=True, hint=" (a step in log(m/s))")
        safety = check_number(safety, "safety", lo=0.0, hi=1.0, lo_open=True)
        max_steps = check_int(max_steps, "max_steps", lo=1)
        self.rtol, self.atol, self.h_init, self.safety, self.max_steps = float(rtol), float(atol), h_init, safety, max_steps
        self.max_factor = float(check_number(max_factor, "max_factor", lo=1.0, lo_open=True,
                                             hint=" (the largest step growth)"))
        self.on_failure = check_on_failure(on_failure)
        self.stats = {"accepted": 0, "rejected": 0}
        self.failed: list = []
        self._ratios: Optional[torch.Tensor] = None

    def solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor, steps: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        if steps is not None:
            raise ValueError(f"method {self.name!r} chooses its own steps: leave steps=None and set rtol/atol "
                             "instead.")
        traj, x, n, self.failed = solve_isolating_failures(lambda c, z: self._solve(c, z, ts), ctx, x, len(ts),
                                                           self.on_failure)
        return traj, x, n

    def _solve(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        self._reset(ts)
        self._ratios = None
        out = [x]
        for k in range(len(ts) - 1):
            x = self._integrate(ctx, x, ts[k], ts[k + 1])
            out.append(x)
        return torch.stack(out), x, self.stats["accepted"]

    def _reset(self, ts: torch.Tensor) -> None:
        self.stats = {"accepted": 0, "rejected": 0}

    def _error(self, diff: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, t: torch.Tensor, h: float) -> float:
        """max over examples of RMS(diff / (atol + rtol max(|x|, |x'|))): the one host read of a step."""
        scale = torch.maximum(x.abs(), x_new.abs()).mul_(self.rtol).add_(self.atol)
        per = (diff / scale).reshape(x.shape[0], -1).pow(2).mean(1).sqrt()
        e = float(per.max())  # NaN propagates through max
        if not math.isfinite(e):
            bad = torch.nonzero(~torch.isfinite(per)).flatten().tolist()
            raise SolverError(repr(self.name), bad, float(t), h, "the state became non-finite (NaN or inf) in "
                              "the step from there", detail="the model's output is not finite for these "
                              "examples; the step size is in u = log(m/s)", batch=x.shape[0])
        self._ratios = per
        return max(e, 1e-10)

    def _limiting_examples(self) -> Tuple[list, str]:
        """Examples whose error ratio exceeded 1 in the last step (the worst one if none), and what that says."""
        if self._ratios is None:
            return [], "no step had been attempted"
        per = self._ratios.detach().cpu()
        above = torch.nonzero(per > 1.0).flatten().tolist()
        worst = float(per.max())
        if above:
            return above, f"their error ratios exceeded 1 in the last step attempted (worst {worst:.3g})"
        return [int(per.argmax())], f"the last step was accepted; the largest error ratio in it was {worst:.3g}"

    def _check_underflow(self, h: float, u: float, t: torch.Tensor, B: int) -> None:
        if h <= 1e-12 * max(1.0, abs(u)):
            bad, why = self._limiting_examples()
            raise SolverError(repr(self.name), bad, float(t), h, "the step size underflowed",
                              detail=f"{why}; the step size is in u = log(m/s)", batch=B)

    def _next_h(self, h: float, e: float, e_prev: float, k: int) -> float:
        """PI step control (Gustafsson 1991) on accepted steps, plain control after a rejection; k = order + 1."""
        factor = self.safety * e ** (-0.7 / k) * e_prev ** (0.4 / k) if e <= 1.0 else self.safety * e ** (-1.0 / k)
        return h * min(self.max_factor, max(0.2, factor))

    def _check_budget(self, t: torch.Tensor, t1: torch.Tensor, h: float, B: int) -> None:
        if self.stats["accepted"] + self.stats["rejected"] >= self.max_steps:
            bad, why = self._limiting_examples()
            raise SolverError(repr(self.name), bad, float(t), h, f"max_steps={self.max_steps} steps did not reach "
                              f"t={float(t1):g}", detail=f"{why}; the step size is in u = log(m/s)", batch=B,
                              hint=STEP_LIMIT_HINT, maskable=False)

    def _integrate(self, ctx: Context, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        m, s, u = _point(ctx, t0)
        u_end = _point(ctx, t1)[2]
        h = self.h_init if self.h_init is not None else 0.1 * (u_end - u)
        d0, t, e_prev = None, t0, 1.0
        while u_end - u > 1e-12 * max(1.0, abs(u_end)):
            self._check_budget(t, t1, h, x.shape[0])
            self._check_underflow(h, u, t, x.shape[0])
            last = h >= u_end - u
            h = min(h, u_end - u)
            if d0 is None:
                d0 = ctx.denoise(x, t)
            t_new = t1 if last else _t_at(ctx, u + h)
            x_new, diff = self._pair(ctx, x, m, u, d0, h, t_new)
            e = self._error(diff, x, x_new, t, h)
            if e <= 1.0:
                self.stats["accepted"] += 1
                x, t, u, d0 = x_new, t_new, u + h, None
                m, s, _ = _point(ctx, t)
            else:
                self.stats["rejected"] += 1
            h, e_prev = self._next_h(h, e, e_prev, 3), (e if e <= 1.0 else e_prev)
        return x

    def _pair(self, ctx, x, m, u, d0, h, t_new):
        """Third-order step and (third - second)-order difference, both in x (DPM-Solver-23 stages, y = x/m)."""
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        y = x / m
        t1 = _t_at(ctx, u + r1 * h)
        m1, s1, _ = _point(ctx, t1)
        y1 = torch.add(y * math.exp(-r1 * h), d0, alpha=exp_moments(r1 * h, 1)[0])
        d1 = ctx.denoise(y1.mul_(m1), t1)
        t2 = _t_at(ctx, u + r2 * h)
        m2, s2, _ = _point(ctx, t2)
        a0, a1 = exp_moments(r2 * h, 2)
        y2 = torch.add(y * math.exp(-r2 * h), d0, alpha=a0).add_(d1 - d0, alpha=a1 / (r1 * h))
        d2 = ctx.denoise(y2.mul_(m2), t2)
        b0, b1 = exp_moments(h, 2)
        m_new = _point(ctx, t_new)[0]
        hi = torch.add(y * math.exp(-h), d0, alpha=b0).add_(d2 - d0, alpha=b1 / (r2 * h)).mul_(m_new)
        diff = ((d2 - d0) / r2 - (d1 - d0) / r1).mul_(m_new * b1 / h)
        return hi, diff

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rtol={self.rtol:g}, atol={self.atol:g})"


class AdaptiveMultistep(AdaptiveExponential):
    """Adaptive exponential multistep predictor-corrector in u: one NFE per attempted step.

    Predictor: the exponential Adams rule through the last k denoised values (k <= order, DPM-Solver++ multistep
    / DEIS on a variable grid). The denoised value at the predicted point is the step's one NFE; the corrector
    adds it to the interpolation (one order higher, the UniC idea of Zhao et al. 2023, eq. 8, in the
    data-prediction form). Accepted steps keep the corrected state and the new denoised value; rejected ones cost
    one NFE. Step sizes: PI control capped by Gustafsson's predictive controller (see :meth:`_next_h`). NFE = 1 + attempted steps. After a run, ``stats["times"]`` lists the accepted times (an explicit grid
    for the fixed-step samplers).

    The error controlled (``error``): the corrector evaluates the denoiser at the predicted point, not at the state
    it keeps (PEC mode), so the kept state's local error is dominated by that denoised value's own error,
    J (x_pred - x), weighted by the corrector's weight on it, J = dD/dy the denoiser's Jacobian (-> I as the noise
    vanishes). With x_pred - x ~ corrector - predictor = delta and that weight at most 1 - e^{-h} (the Lagrange
    basis of the newest node lies in [0, 1] over the step), ``error="corrector"`` (default) controls
    (1 - e^{-h}) delta, a quantity of order k + 2 in h (controller exponent 1/(k + 2)); ``error="predictor"``
    controls delta itself, the predictor's local error (order k + 1; local extrapolation as in dopri5).

    Args as :class:`AdaptiveExponential`, plus order (1-4): the predictor's order; error: "corrector" or
    "predictor", the local error controlled.
    """

    name = "adaptive"
    ERRORS = ("corrector", "predictor")

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-3, h_init: Optional[float] = None, order: int = 4,
                 safety: float = 0.9, max_steps: int = 10_000, max_factor: float = 2.0, on_failure: str = "raise",
                 error: str = "corrector"):
        super().__init__(rtol, atol, h_init, safety, max_steps, max_factor, on_failure)
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4; got {order!r}.")
        if error not in self.ERRORS:
            raise ValueError(f"error must be one of {self.ERRORS} (the local error the step control holds to "
                             f"rtol/atol); got {error!r}.")
        self.order, self.error = order, error

    def _reset(self, ts):
        self._hist = []
        self.stats = {"accepted": 0, "rejected": 0, "times": [float(ts[0])]}

    def _next_h(self, h: float, e: float, e_prev: float, k: int) -> float:
        """The PI proposal, capped on accepted steps by Gustafsson's predictive one (Gustafsson 1994, "Control-theoretic
        techniques for stepsize selection in implicit Runge-Kutta methods", ACM TOMS 20; Hairer & Wanner, "Solving
        ODEs II", section IV.8, as in RADAU5): safety h (h / h_acc) (e_acc / e^2)^{1/k}, with (h_acc, e_acc) the
        previous accepted step. Where the error constant keeps growing (trajectories choosing a mode) it extrapolates
        that growth, instead of alternating accepted and rejected steps."""
        h_new = super()._next_h(h, e, e_prev, k)
        if e > 1.0:
            return h_new
        if self._accepted is not None:
            h_acc, e_acc = self._accepted
            predictive = self.safety * (h / h_acc) * (e_acc / e**2) ** (1.0 / k)
            h_new = min(h_new, h * min(self.max_factor, max(0.2, predictive)))
        self._accepted = (h, max(e, 1e-2))  # RADAU5's floor on the remembered error
        return h_new

    def _integrate(self, ctx, x, t0, t1):
        m, s, u = _point(ctx, t0)
        u_end = _point(ctx, t1)[2]
        if not self._hist:
            self._hist = [(u, ctx.denoise(x, t0))]
        h = self.h_init if self.h_init is not None else 0.1 * (u_end - u)
        e_prev, t, self._accepted = 1.0, t0, None
        while u_end - u > 1e-12 * max(1.0, abs(u_end)):
            self._check_budget(t, t1, h, x.shape[0])
            self._check_underflow(h, u, t, x.shape[0])
            t_new = t1 if h >= u_end - u else _t_at(ctx, u + h)
            h = min(h, u_end - u)
            m2, s2, _ = _point(ctx, t_new)
            hist = self._hist[-self.order:]
            nodes, values = [v - u for v, _ in reversed(hist)], [d for _, d in reversed(hist)]
            base = x * (s2 / s)
            x_pred = exp_poly_integral(nodes, values, h, base=base, scale=m2)
            d_new = ctx.denoise(x_pred, t_new)
            x_corr = exp_poly_integral([h] + nodes, [d_new] + values, h, base=base, scale=m2)
            weight = -math.expm1(-h) if self.error == "corrector" else 1.0  # see the class docstring
            e = self._error((x_corr - x_pred).mul_(weight), x, x_corr, t, h)
            if e <= 1.0:
                self.stats["accepted"] += 1
                x, t, u, s = x_corr, t_new, u + h, s2
                self._hist = (self._hist + [(u, d_new)])[-self.order:]
                self.stats["times"].append(float(t))
            else:
                self.stats["rejected"] += 1
            k = len(hist) + (2 if self.error == "corrector" else 1)
            h, e_prev = self._next_h(h, e, e_prev, k), (e if e <= 1.0 else e_prev)
        return x


