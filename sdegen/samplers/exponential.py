"""Exponential integrators for any linear SDE: one exponential-Adams predictor-corrector (:class:`ExponentialAdams`)
and the named samplers that are its settings (DDIM, DPM-Solver++ 2M/3M and their SDE variants, the exponential PC,
SA-Solver).

Every SDE here has the kernel N(m(t) x0, s(t)^2 I). With y = x / m, sigma = s / m and u = log(m / s) = -log sigma
(half the log-SNR), the reverse-time processes with the data's marginals form one family in the extra rate lam >= 0,

    dy = (1 + lam) (D - y) du + sqrt(2 lam) sigma dw,

whatever f and g are (VP, sub-VP, VE alike): D = E[x0 | x] is Tweedie's denoised estimate, lam = 0 the
probability-flow ODE dy/du = D - y (Karras et al. 2022, eq. 1 in sigma), lam = 1 the reverse SDE. The samplers
integrate the linear part exactly and only use the SDE's m(t), s(t), never its type. Times are scalar float64 CPU
tensors; per-step coefficients are Python floats, which multiply x on any device without a host-device sync.
Model outputs and the caller's tensors are never modified.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch

from .._deprecation import renamed
from .base import Context, StepSampler, brownian_path, cache_grid, check_unit, point

NOISE_RULES = ("sde", "ddim")
_PLANS: "OrderedDict[tuple, list]" = OrderedDict()  # step coefficients per (settings, grid), see ExponentialAdams.start
_PLANS_KEPT = 16


def exp_moments(h: float, k: int, rate: float = 1.0) -> List[float]:
    """M_j = int_0^h e^{-(h - r)} r^j dr = j! h^{j+1} sum_n (-h)^n / (j + 1 + n)!, j < k (Python floats: these
    are per-step scalars; the series avoids the cancellation of M_j = h^j - j M_{j-1} at small h).

    With ``rate`` = c > 0 the kernel is e^{-c (h - r)} (the stochastic integrators' 1 + lam):
    int_0^h e^{-c (h - r)} r^j dr = M_j(c h) / c^{j+1} (substitute r = rho / c)."""
    if rate != 1.0:
        if not rate > 0.0:
            raise ValueError(f"rate must be > 0; got {rate!r}.")
        return [mj / rate ** (j + 1) for j, mj in enumerate(exp_moments(rate * h, k))]
    if h > 1.0 or k == 1:  # M_0 = 1 - e^{-h} is accurate at every h
        ms = [-math.expm1(-h)]
        for j in range(1, k):
            ms.append(h**j - j * ms[-1])
        return ms
    # M_j = j! h^{j+1} phi_{j+1}(-h) with phi_k(z) = sum_n z^n / (k + n)!: the series for the top phi only,
    # then phi_j = 1/j! - h phi_{j+1} downwards (stable for h <= 1: each step scales the error by h)
    term, phi, n = 1.0 / math.factorial(k), 0.0, 0
    while abs(term) > 1e-18 * max(abs(phi), 1e-300) and n < 60:
        phi += term
        n += 1
        term *= -h / (k + n)
    out = [0.0] * k
    for j in range(k - 1, -1, -1):
        out[j] = math.factorial(j) * h ** (j + 1) * phi
        phi = 1.0 / math.factorial(j) - h * phi
    return out


def exp_poly_weights(nodes: List[float], h: float, midpoint: bool = False, rate: float = 1.0) -> List[float]:
    """Weights w_i with int_0^h e^{-(h - r)} P(r) dr = sum_i w_i P(nodes[i]) for every polynomial P of degree
    < len(nodes): the Lagrange basis integrated exactly against the exponential (nodes in u, measured from the
    step's start, distinct). This is the exponential Adams rule of DEIS (Zhang & Chen 2022) and of DPM-Solver++
    multistep; ``midpoint=True`` (two nodes) replaces M_1 by M_0 h / 2, DPM-Solver++(2M)'s rule
    (Lu et al. 2022b, algorithm 2). ``rate`` = c integrates against e^{-c (h - r)} instead (see :func:`exp_moments`)."""
    ms = exp_moments(h, len(nodes), rate)
    if len(nodes) == 2 and midpoint:
        ms[1] = 0.5 * h * ms[0]
    return _moment_weights(nodes, ms)


def _moment_weights(nodes: List[float], ms: List[float]) -> List[float]:
    """Weights integrating the Lagrange basis of ``nodes`` against a kernel with moments ``ms`` (len(nodes) of them)."""
    if len(nodes) == 1:
        return ms[:1]
    if len(nodes) == 2:  # the common multistep case, in closed form
        (x0, x1), d = nodes, nodes[0] - nodes[1]
        return [(ms[1] - x1 * ms[0]) / d, (x0 * ms[0] - ms[1]) / d]
    weights = []
    for i, xi in enumerate(nodes):
        poly, denom = [1.0], 1.0  # prod_{j != i} (r - x_j) in powers of r, highest first
        for j, xj in enumerate(nodes):
            if j != i:
                poly = [a - xj * b for a, b in zip(poly + [0.0], [0.0] + poly)]
                denom *= xi - xj
        weights.append(sum(c * mp for c, mp in zip(poly, reversed(ms))) / denom)
    return weights


def exp_poly_integral(nodes: List[float], values: List[torch.Tensor], h: float, midpoint: bool = False,
                      base: Optional[torch.Tensor] = None, scale: float = 1.0, rate: float = 1.0) -> torch.Tensor:
    """base + scale * int_0^h e^{-rate (h - r)} P(r) dr for P the polynomial through (nodes[i], values[i])
    (see :func:`exp_poly_weights`); ``base`` defaults to zero. A new tensor; inputs are not modified."""
    weights = exp_poly_weights(nodes, h, midpoint, rate)
    out = values[0] * (scale * weights[0]) if base is None else torch.add(base, values[0], alpha=scale * weights[0])
    return _accumulate(out, values[1:], weights[1:], scale)


def _accumulate(out: torch.Tensor, values: List[torch.Tensor], weights: List[float], scale: float,
                fresh: bool = False) -> torch.Tensor:
    """out + scale sum_i w_i v_i, in place into ``out``; with ``fresh`` into a new tensor (``out`` is kept)."""
    for v, w in zip(values, weights):
        out = torch.add(out, v, alpha=scale * w) if fresh else out.add_(v, alpha=scale * w)
        fresh = False
    return out


def _check_flag(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}.")
    return value


def _check_brownian(brownian: Optional[str], noise_rule: str) -> Optional[str]:
    if brownian not in (None, "tree"):
        raise ValueError(f"brownian must be None (a fresh draw per step) or 'tree'; got {brownian!r}.")
    if brownian == "tree" and noise_rule != "sde":
        raise ValueError("brownian='tree' needs noise_rule='sde' (one rate lam for the whole run); the 'ddim' rule's "
                         "rate changes from step to step.")
    return brownian


def _brownian_repr(sampler) -> str:
    return "" if sampler.brownian is None else f", brownian={sampler.brownian!r}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ExponentialAdams(StepSampler):
    """The exponential-Adams predictor-corrector in y = x/m and u = -log sigma (see the module docstring); a step
from u to u' = u + h, with c = 1 + lam, is

        y' = e^{-c h} y + c int_0^h e^{-c (h - r)} P(r) dr + sigma' sqrt(1 - e^{-2 lam h}) z,      x' = m' y'.

    Predictor: P the polynomial through the last ``predictor_order`` denoised values, integrated exactly
    (exponential Adams-Bashforth: DEIS, Zhang & Chen 2022; DPM-Solver++ multistep, Lu et al. 2022b); ``midpoint``
    replaces the two-value rule by DPM-Solver++(2M)'s (Lu et al. 2022b, algorithm 2). Corrector (exponential
    Adams-Moulton: UniPC, Zhao et al. 2023, algorithm 1; SA-Solver, Xue et al. 2023, algorithm 1 and eqs. 14-15):
    P through the denoised value at the predicted point, which the next step needs anyway, and the last
    ``corrector_order - 1`` values, with the same z; the last step has none. One NFE per step; the first steps use
    the orders the history allows.

    Noise rules (lam = 0 and no draw on steps starting outside s_tmin <= sigma <= s_tmax):
      - "sde": lam = eta (SA-Solver's tau^2, k-diffusion's eta of the 2M/3M SDE samplers);
      - "ddim": DDIM's noise eta s' sqrt(1 - e^{-2h}) =: k and x coefficient sqrt(s'^2 - k^2) / s (Song et al. 2021,
        eqs. 12 and 16), i.e. lam with e^{-2 lam h} = 1 - eta^2 (1 - e^{-2h}); eta in [0, 1].

    Named settings: DDIM(eta) is order 1 with the "ddim" rule; DPMSolverPP(k) order k (midpoint for k = 2);
    ExponentialPC(k) predictor k, corrector k + 1; DPMSolverPP2MSDE(eta) order 2 with midpoint; SASolver(p, c, tau)
    has eta = tau^2; DPMSolverPP3MSDE(eta) order 3.

    With noise, the order is that of the deterministic part; the distribution's error is set by how the
    denoised values D along the noisy path enter the step. Order 1 leaves out the posterior spread of x0 and
    under-disperses (see :class:`DDIM`). Higher orders interpolate D through past points whose differences
    carry the earlier steps' noise, which over-disperses at large steps: on the oracle problems of
    benchmarks/stochastic.py (VP, log-SNR grid) the within-mode variance at 20 steps is 0.96-1.06x the truth for
    the 2M midpoint rule, 1.07-1.22x for order 3 with lam = 1 and 1.02-1.09x for SA-Solver's tau = 0.7; at 50
    steps every setting of order >= 2 is within 3% (within 0.5% at 100), with mixture-weight errors within 1.5x
    the exact-sampling floor. The noise term itself is the exact transition variance of the linear part.

    Args:
        predictor_order: values in the predictor's polynomial, 1-4.
        corrector_order: values in the corrector's, 0 (no corrector) to 4.
        eta: noise scale (see the rules); 0 is the probability-flow ODE.
        noise_rule: "sde" (default) or "ddim" (``noise`` is its deprecated name: sdegen.sample's ``noise`` chooses
            the random streams).
        midpoint: DPM-Solver++(2M)'s midpoint rule when the predictor uses two values.
        lower_order_final: a first-order last step in runs of fewer than 15 steps (DPM-Solver++'s code).
        s_tmin, s_tmax: the sigma window of the noisy steps (EDM's s_tmin / s_tmax).
        brownian: None (default: one fresh draw per noisy step) or "tree" (the "sde" rule only): each step's noise
            is the increment sigma' (Z(u') - e^{-lam h} Z(u)) of one path Z for the whole run
            (:class:`sdegen.noise.OUPath`, the same law), so that one seed at any step count converges to one sample,
            as k-diffusion's Brownian tree makes its 2M/3M SDE samplers do; about 16 - log2(steps) draws per step
            instead of one.

    ``order`` is the global order of the deterministic part: ``predictor_order`` without corrector, else
    min(``corrector_order``, ``predictor_order`` + 1). Steps take x of shape (B, ...) and keep its dtype and device.
    """

    exponential = True

    default_steps = 20
    default_schedule = "log_snr"

    def __init__(self, predictor_order: int = 2, corrector_order: int = 0, eta: float = 0.0,
                 noise_rule: Optional[str] = None, midpoint: bool = False, lower_order_final: bool = False,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, noise: Optional[str] = None,
                 brownian: Optional[str] = None):
        noise, _ = renamed(type(self).__name__, "noise_rule", noise_rule, "noise", noise)
        noise = "sde" if noise is None else noise
        if isinstance(predictor_order, bool) or not isinstance(predictor_order, int) or \
                predictor_order not in (1, 2, 3, 4):
            raise ValueError(f"predictor_order must be 1, 2, 3 or 4; got {predictor_order!r}.")
        if isinstance(corrector_order, bool) or not isinstance(corrector_order, int) or \
                corrector_order not in (0, 1, 2, 3, 4):
            raise ValueError(f"corrector_order must be 0 (no corrector), 1, 2, 3 or 4; got {corrector_order!r}.")
        if noise not in NOISE_RULES:
            raise ValueError(f"noise_rule must be one of {NOISE_RULES}; got {noise!r}.")
        if noise == "ddim":
            eta = check_unit(eta, "eta")
        elif not (_is_number(eta) and 0.0 <= eta < math.inf):
            raise ValueError(f"eta must be a finite number >= 0; got {eta!r}.")
        if not (_is_number(s_tmin) and 0.0 <= s_tmin < math.inf):
            raise ValueError(f"s_tmin must be a finite number >= 0; got {s_tmin!r}.")
        if not (_is_number(s_tmax) and s_tmax >= s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r}; got {s_tmax!r}.")
        self.predictor_order, self.corrector_order = predictor_order, corrector_order
        self.eta, self.noise_rule = float(eta), noise
        self.midpoint = _check_flag(midpoint, "midpoint")
        self.lower_order_final = _check_flag(lower_order_final, "lower_order_final")
        self.s_tmin, self.s_tmax = float(s_tmin), float(s_tmax)
        self.brownian = _check_brownian(brownian, noise)
        self.order = min(corrector_order, predictor_order + 1) if corrector_order else predictor_order
        self.stochastic = self.eta > 0
        self._keep = max(predictor_order, corrector_order - 1)  # denoised values a step may need

    def _extra_rate(self, sigma: float, h: float) -> Tuple[float, float]:
        """(lam, 1 - e^{-2 lam h}) of a step of size h starting at sigma."""
        if not (self.eta and h > 0.0 and self.s_tmin <= sigma <= self.s_tmax):
            return 0.0, 0.0
        if self.noise_rule == "sde":
            return self.eta, -math.expm1(-2.0 * self.eta * h)
        e2 = self.eta * self.eta
        var = e2 * -math.expm1(-2.0 * h)  # DDIM's noise variance over s'^2
        keep = 1.0 - e2 + e2 * math.exp(-2.0 * h)  # 1 - var = e^{-2 lam h}, summed without cancellation
        # keep underflows only at eta = 1 with h > 372, where lam = 1
        return (-0.5 * math.log(keep) / h if keep > 0.0 else 1.0), var

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> dict:
        cache_grid(ctx, ts)
        path = brownian_path(ctx, self.eta, ts) if self.brownian == "tree" and self.stochastic else None
        return {"hist": [], "left": len(ts) - 1, "few": len(ts) - 1 < 15, "plan": self._plan(ctx, ts),
                "path": path}

    def _plan(self, ctx: Context, ts: torch.Tensor) -> list:
        """Every step's host coefficients on the grid ts (see :meth:`_coefficients`), as (t, t', u, u', ...) tuples.

        They depend on the settings and the grid's (m, s, u) only, so a grid sampled again (the usual case: one
        grid, many batches) finds them computed; a step then costs table look-ups on the host."""
        times = ts.tolist()
        points = tuple(ctx.grid_points[t] for t in times)
        key = (type(self), self.predictor_order, self.corrector_order, self.eta, self.noise_rule, self.midpoint,
               self.lower_order_final, self.s_tmin, self.s_tmax, points)
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
        n, unbound, us, plan = len(times) - 1, ts.unbind(), [], []
        for i in range(n):  # the u's of the history as step() keeps it
            u, u2 = points[i][2], points[i + 1][2]
            if not (us and self.corrector_order):
                us = us + [u]
            coefficients = self._coefficients(ctx, us, unbound[i], unbound[i + 1], n - i, n < 15)
            plan.append((times[i], times[i + 1], u, u2) + coefficients)
            us = (us + [u2] if coefficients[3] is not None else us)[-self._keep:]
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
        return plan

    def _coefficients(self, ctx: Context, us: List[float], t: torch.Tensor, t_next: torch.Tensor, left: int,
                      few: bool) -> Tuple[float, float, List[float], Optional[List[float]]]:
        """(a, k, w, w_c) of the step from t to t_next, given the u's of the denoised values so far (oldest first,
        the one at t last) and the steps left: x' = a x + k z + sum_j w_j D_j over the newest len(w) values
        (newest first), and the corrector's weights w_c over D at the predicted point and the newest
        len(w_c) - 1 values (None: no corrector)."""
        m, s, u = point(ctx, t)
        m2, s2, u2 = point(ctx, t_next)
        h, last = u2 - u, left == 1
        lam, var = self._extra_rate(s / m, h)
        c = 1.0 + lam
        # x' = m' y' with m'/m = (s'/s) e^h: the coefficient e^{-c h} of y is (s'/s) e^{-lam h} on x
        a, k = s2 / s * math.exp(-lam * h), (s2 * math.sqrt(var) if var > 0.0 else 0.0)
        past = us[-1:] if self.lower_order_final and last and few else us[-self.predictor_order:]
        past = past[::-1]  # newest first
        correct = self.corrector_order > 0 and not last
        n_corr = min(self.corrector_order, len(us) + 1) if correct else 0
        midpoint = self.midpoint and len(past) == 2  # the midpoint rule needs M_0 only
        ms = exp_moments(h, max(1 if midpoint else len(past), n_corr), c)  # the corrector's start with the predictor's
        ms_pred = [ms[0], 0.5 * h * ms[0]] if midpoint else ms[:len(past)]
        weights = [m2 * c * w for w in _moment_weights([v - u for v in past], ms_pred)]
        if not correct:
            return a, k, weights, None
        older = us[::-1][:n_corr - 1]
        return a, k, weights, [m2 * c * w for w in _moment_weights([h] + [v - u for v in older], ms[:n_corr])]

    def step(self, ctx: Context, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: dict
             ) -> Tuple[torch.Tensor, dict]:
        hist, plan, left = state["hist"], state.get("plan"), state["left"]
        entry = plan[len(plan) - left] if plan is not None and 0 < left <= len(plan) else None
        if entry is None or entry[0] != float(t) or entry[1] != float(t_next):  # a step off the planned grid
            us = [v for v, _ in hist]
            u, u2 = point(ctx, t)[2], point(ctx, t_next)[2]
            entry = (None, None, u, u2) + self._coefficients(
                ctx, us if us and self.corrector_order else us + [u], t, t_next, left, state["few"])
        _, _, u, u2, a, k, weights, corrector = entry
        if not (hist and self.corrector_order):  # else the previous corrector evaluated D at this step's start
            hist = hist + [(u, ctx.denoise(x, t))]
        base = torch.mul(x, a)
        path = state.get("path")
        if k and path is not None:  # the path's increment over [u, u'], of std k
            s2 = point(ctx, t_next)[1]
            z0 = path.at(u, x)  # the start first: the path is queried in increasing u
            base = base.add_(path.at(u2, x), alpha=s2).add_(z0, alpha=-s2 * math.exp(-self.eta * (u2 - u)))
        elif k:
            base = base.add_(ctx.randn_like(x), alpha=k)
        newest = hist[::-1]
        x_pred = _accumulate(base, [d for _, d in newest[:len(weights)]], weights, 1.0, fresh=corrector is not None)
        state["left"] -= 1
        if corrector is None:
            state["hist"] = hist[-self._keep:]
            return x_pred, state
        d_new = ctx.denoise(x_pred, t_next)
        state["hist"] = (hist + [(u2, d_new)])[-self._keep:]
        return _accumulate(base, [d_new] + [d for _, d in newest[:len(corrector) - 1]], corrector, 1.0), state

    def __repr__(self) -> str:
        return (f"ExponentialAdams(predictor_order={self.predictor_order}, corrector_order={self.corrector_order}, "
                f"eta={self.eta}, noise_rule={self.noise_rule!r}, midpoint={self.midpoint}, "
                f"lower_order_final={self.lower_order_final}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}"
                f"{_brownian_repr(self)})")


class DDIM(ExponentialAdams):
    """DDIM (Song, Meng & Ermon 2021, eq. 12): x' = m' D + sqrt(s'^2 - c^2) eps + c z, c = eta s' sqrt(1 - e^{-2h})
    (= eta b s'/s, b^2 the forward transition variance from t' to t): first order with the "ddim" noise rule.
    eta = 0 is DPM-Solver-1, eta = 1 ancestral sampling.

    With eta = 1 a step is q(x' | x, x0 = D) with Tweedie's mean D in place of a draw of x0 ~ p(x0 | x): the
    exact transition's variance has the extra term m'^2 (1 - e^{-2h})^2 Cov[x0 | x], so every step loses the
    posterior spread of x0 and samples are under-dispersed at first order in h (within-mode variance 0.84-0.87x
    the truth at 50 log-SNR steps on the oracle problems of benchmarks/stochastic.py, 0.66-0.75x at 20). The
    second-order SDE samplers (``dpmpp_2m_sde``, ``sa_solver``) reach the floor at 50 steps."""

    default_steps = 50

    def __init__(self, eta: float = 0.0):
        super().__init__(predictor_order=1, eta=check_unit(eta, "eta"), noise_rule="ddim")

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta})"


class DPMSolverPP(ExponentialAdams):
    """DPM-Solver++ multistep, data prediction (Lu et al. 2022b, algorithm 2 with its midpoint rule for order 2;
    order 3 integrates the quadratic through the last three denoised values exactly, as DEIS)."""

    def __init__(self, order: int = 2, lower_order_final: bool = False):
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        super().__init__(predictor_order=order, midpoint=order == 2, lower_order_final=lower_order_final)

    def __repr__(self) -> str:
        return f"DPMSolverPP(order={self.order}, lower_order_final={self.lower_order_final})"


class ExponentialPC(ExponentialAdams):
    """UniPC's predictor-corrector (Zhao et al. 2023, algorithm 1) with exact exponential weights instead of their
    B(h): predictor through the last ``order`` denoised values, corrector one order higher; the global
    ``self.order`` is ``order`` + 1."""

    def __init__(self, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        super().__init__(predictor_order=order, corrector_order=order + 1)

    def __repr__(self) -> str:
        return f"ExponentialPC(order={self.predictor_order})"


class DPMSolverPP2MSDE(ExponentialAdams):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, with their code's midpoint rule), lam = eta in [0, 1] (k-diffusion's
    eta): 0 is the ODE's 2M, 1 (the default) the reverse SDE.

        y' = e^{-c h} y + (1 - e^{-c h}) (D + h/2 (D - D_prev)/h_prev) + sigma' sqrt(1 - e^{-2 eta h}) z."""

    default_steps = 50

    def __init__(self, eta: float = 1.0, brownian: Optional[str] = None):
        super().__init__(predictor_order=2, eta=check_unit(eta, "eta"), midpoint=True, brownian=brownian)

    def __repr__(self) -> str:
        return f"DPMSolverPP2MSDE(eta={self.eta}{_brownian_repr(self)})"


class SASolver(ExponentialAdams):
    """SA-Solver (Xue et al. 2023, algorithm 1, data prediction, eqs. 14-15): lam = tau^2 on the steps starting
    at s_tmin <= sigma <= s_tmax (their piecewise-constant tau(t)); tau = 0 with ``corrector_order =
    predictor_order + 1`` is "exp_pc", tau = 1 the reverse SDE.

    The grid matters more than tau at 10-20 steps: on the oracle problems of benchmarks/stochastic.py (VP, NFE 20)
    the log-SNR grid leaves the within-mode variance 1.05-1.17x the truth at tau = 1, and grids laid out for the
    probability-flow ODE's error (``schedule="pilot"``, ``"pilot_local"``) do no better; spending one step on
    sigma above the data's scale s (from the prior down to the sigma where the denoiser's sensitivity s^2 / (s^2 +
    sigma^2) is 1%, where it is nearly constant and the exponential step is nearly exact) and the rest below it
    brings tau = 1 within 3% (benchmarks/results/stochastic_data_jump*.md)."""

    def __init__(self, predictor_order: int = 3, corrector_order: int = 4, tau: float = 1.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, brownian: Optional[str] = None):
        if not (_is_number(tau) and 0.0 <= tau < math.inf):
            raise ValueError(f"tau must be a finite number >= 0; got {tau!r}.")
        super().__init__(predictor_order, corrector_order, eta=float(tau) ** 2, s_tmin=s_tmin, s_tmax=s_tmax,
                         brownian=brownian)
        self.tau = float(tau)

    def __repr__(self) -> str:
        return (f"SASolver(predictor_order={self.predictor_order}, corrector_order={self.corrector_order}, "
                f"tau={self.tau}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}{_brownian_repr(self)})")


class DPMSolverPP3MSDE(SASolver):
    """Stochastic DPM-Solver++(3M) (Lu et al. 2022b's SDE variant at third order; k-diffusion's sample_dpmpp_3m_sde):
    order 3 without corrector, lam = eta in [0, 1] (tau = sqrt(eta)); 0 is "dpmpp_3m", 1 (the default) the SDE."""

    default_steps = 50

    def __init__(self, eta: float = 1.0, brownian: Optional[str] = None):
        ExponentialAdams.__init__(self, predictor_order=3, eta=check_unit(eta, "eta"), brownian=brownian)
        self.tau = math.sqrt(self.eta)

    def __repr__(self) -> str:
        return f"DPMSolverPP3MSDE(eta={self.eta}{_brownian_repr(self)})"


B_FUNCTIONS = ("bh1", "bh2")


class UniPC(ExponentialAdams):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models", algorithms 2-3, data prediction): the predictor UniP-p and the corrector UniC, which reuses the model
    evaluation at the predicted point that the next step needs anyway: NFE = steps.

    A step from u to u' = u + h (u = log(m/s), y = x/m) of predictor order p_k = min(p, values so far, and with
    ``lower_order_final`` the steps left) is the exponential Adams step of :class:`ExponentialAdams` through the
    last p_k denoised values; UniC then adds D at the predicted point and repeats the step with p_k + 1 values.
    Where the paper solves its order conditions R rho = b (p_k >= 3 in UniP, p_k >= 2 in UniC) the result is the
    exact exponential integral of the interpolating polynomial, whatever B(h) is. Where it fixes rho = 1/2
    (UniP-2 and UniC after a first-order predictor, the paper's section 3.2 and its code), the linear term's moment
    int_0^h e^{-(h - r)} r dr is replaced by B(h) h / 2 with

      - ``"bh1"``: B(h) = h;
      - ``"bh2"``: B(h) = e^h - 1 in the paper's sign convention, i.e. 1 - e^{-h} here (the default; UniP-2 is then
        DPM-Solver++(2M)'s midpoint rule).

    Both rules keep the order: UniP-p has global order p and UniPC-p order p + 1 (the paper's theorems 3.1-3.2),
    which is the declared ``order``. ``lower_order_final`` (diffusers' default, applied as diffusers does at every
    step count) lowers the last steps' orders for stability at few steps; their local errors then cap the
    asymptotic order at 2, which shows only on fine grids (at order 2 the measured slope is still 3.0 at 1280 steps;
    at order 3 it falls from 2.4 at 160 steps to 2.0 at 1280). Pass ``lower_order_final=False`` for the full
    order on fine grids. The last step has no corrector. ``corrector=False`` is UniP alone.

    Args:
        order: the predictor's order p, 1-3.
        variant: "bh1" or "bh2".
        corrector: apply UniC (default True).
        lower_order_final: predictor order at most the number of steps left (diffusers' lower_order_final).

    Steps take x of shape (B, ...) of any dtype and device; times are scalar float64 CPU tensors.
    """

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True):
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        if variant not in B_FUNCTIONS:
            raise ValueError(f"variant must be one of {B_FUNCTIONS}; got {variant!r}.")
        corrector = _check_flag(corrector, "corrector")
        super().__init__(predictor_order=order, corrector_order=order + 1 if corrector else 0,
                         lower_order_final=lower_order_final)
        self.variant = variant
        self.order = order + 1 if corrector else order

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> dict:
        cache_grid(ctx, ts)
        return {"hist": [], "left": len(ts) - 1, "few": len(ts) - 1 < 15}

    def _linear_moment(self, h: float) -> float:
        """B(h) h / 2 (see the class docstring), the fixed-rho stand-in for int_0^h e^{-(h - r)} r dr."""
        return 0.5 * h * (h if self.variant == "bh1" else -math.expm1(-h))

    def step(self, ctx: Context, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: dict
             ) -> Tuple[torch.Tensor, dict]:
        m, s, u = point(ctx, t)
        m2, s2, u2 = point(ctx, t_next)
        h, hist, left = u2 - u, state["hist"], state["left"]
        if not (hist and self.corrector_order):  # else the previous corrector evaluated D at this step's start
            hist = hist + [(u, ctx.denoise(x, t))]
        p = min(self.predictor_order, len(hist), left if self.lower_order_final else self.predictor_order)
        past = hist[-p:][::-1]  # newest first
        nodes, values = [v - u for v, _ in past], [d for _, d in past]
        ms = exp_moments(h, p + 1)
        base = torch.mul(x, s2 / s)  # e^{-h} y in x = m' y'
        correct = self.corrector_order > 0 and left > 1
        weights = _moment_weights(nodes, [ms[0], self._linear_moment(h)] if p == 2 else ms[:p])
        x_pred = _accumulate(base, values, weights, m2, fresh=correct)
        state["left"] -= 1
        if not correct:
            state["hist"] = hist[-self._keep:]
            return x_pred, state
        d_new = ctx.denoise(x_pred, t_next)
        weights = _moment_weights([h] + nodes, [ms[0], self._linear_moment(h)] if p == 1 else ms[:p + 1])
        state["hist"] = (hist + [(u2, d_new)])[-self._keep:]
        return _accumulate(base, [d_new] + values, weights, m2), state

    def __repr__(self) -> str:
        return (f"UniPC(order={self.predictor_order}, variant={self.variant!r}, corrector={self.corrector_order > 0}, "
                f"lower_order_final={self.lower_order_final})")
