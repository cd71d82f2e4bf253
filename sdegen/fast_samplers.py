"""Few-step samplers of the probability-flow ODE (and its SDE variants) for any linear SDE.

Every SDE here has the kernel N(m(t) x0, s(t)^2 I). With y = x / m, sigma = s / m and
u = log(m / s) = -log sigma (half the log-SNR), its probability-flow ODE dx = [f x - 1/2 g^2 score] dt
becomes, whatever f and g are (VP, sub-VP, VE alike),

    dy/dsigma = (y - D) / sigma = eps,      or      dy/du = D - y,

with D = (x + s^2 score) / m Tweedie's denoised estimate and eps = -s score. The first form is EDM's
ODE (Karras et al. 2022, eq. 1 with s(t) = m, sigma(t) = s/m); the second is linear in y apart from D,
so exponential integrators (DDIM, DPM-Solver, DPM-Solver++) integrate its linear part exactly:

    y(u + h) = e^{-h} y(u) + int_0^h e^{-(h - r)} D(u + r) dr.

The samplers only use the SDE's own m(t), s(t) and its inverse log-SNR map, never its type.
Times are scalar float64 CPU tensors; the per-step coefficients are Python floats (float64), which multiply
x on any device without a host-device sync. Score outputs and the caller's tensors are never modified.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .samplers import Context, StepSampler, register_sampler


def _point(ctx: Context, t: torch.Tensor) -> Tuple[float, float, float]:
    """(m, s, u = log(m/s)) at the scalar CPU time t, as Python floats (float64): per-step scalar arithmetic
    then costs no tensor launches, and a float multiplies a tensor on any device without a sync.
    Grid times come from the table :func:`_cache_grid` filled once per run."""
    cached = getattr(ctx, "_grid_points", None)
    if cached is not None and float(t) in cached:
        return cached[float(t)]
    log_m, s = float(ctx.sde._log_mean_coeff(t)), float(ctx.sde._std(t))
    return math.exp(log_m), s, log_m - math.log(s)


def _cache_grid(ctx: Context, ts: torch.Tensor) -> None:
    """(m, s, u) at every grid time in one vectorised call, kept on this run's context (the driver makes one
    context per run), so that a step's coefficients cost dictionary look-ups instead of tensor launches."""
    log_m, s = ctx.sde._log_mean_coeff(ts).tolist(), ctx.sde._std(ts).tolist()
    ctx._grid_points = {t: (math.exp(a), b, a - math.log(b)) for t, a, b in zip(ts.tolist(), log_m, s)}


def _t_at(ctx: Context, u: float) -> torch.Tensor:
    """The time whose u = log(m/s) is ``u`` (the log-SNR is 2u), a 0-d float64 tensor."""
    return ctx.sde._t_from_log_snr(torch.tensor(2.0 * u, dtype=torch.float64))


def _denoise(ctx: Context, x: torch.Tensor, t: torch.Tensor, m: float, s: float) -> torch.Tensor:
    """Tweedie's D = (x + s^2 score) / m (one NFE)."""
    return torch.add(x, ctx.score(x, t), alpha=s * s).div_(m)


def _check_unit(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}.")
    return float(value)


class DDIM(StepSampler):
    """DDIM (Song, Meng & Ermon 2021, eq. 12): x' = m' x0 + sqrt(s'^2 - c^2) eps + c z, with c = eta b s'/s.

    eta = 0 is the first-order exponential integrator of the probability-flow ODE (DPM-Solver-1);
    eta = 1 is ancestral sampling (b^2 is the forward transition variance from t' to t). NFE = steps.
    """

    default_steps = 50
    default_schedule = "log_snr"

    def __init__(self, eta: float = 0.0):
        self.eta = _check_unit(eta, "eta")
        self.stochastic = self.eta > 0

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)

    def step(self, ctx, x, t, t_next, state):
        m, s, _ = _point(ctx, t)
        m2, s2, _ = _point(ctx, t_next)
        score = ctx.score(x, t)
        # x' = m' x0 + k eps with x0 = (x + s^2 score)/m and eps = -s score
        c = self.eta * math.sqrt(float(ctx.sde._transition_var(t_next, t))) * s2 / s if self.eta else 0.0
        k = math.sqrt(max(s2 * s2 - c * c, 0.0))
        x_next = torch.add(x, score, alpha=s * s - k * s * m / m2).mul_(m2 / m)
        return (x_next.add_(ctx.randn_like(x), alpha=c) if c else x_next), None

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta})"


class Heun(StepSampler):
    """EDM's second-order Heun sampler (Karras et al. 2022, algorithm 2) on dy/dsigma = eps, y = x/m.

    Every step is a Heun step (the grid ends at t_min > 0), so NFE = 2 * steps. With ``s_churn > 0``
    each step with s_tmin <= sigma <= s_tmax first raises sigma to sigma (1 + gamma),
    gamma = min(s_churn / steps, sqrt(2) - 1) (capped at sigma(T)), adding noise of std
    s_noise sqrt(sigma_hat^2 - sigma^2) in y.
    """

    nfe_per_step = 2
    default_steps = 25
    default_schedule = "edm"

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
        for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            if not (isinstance(v, (int, float)) and 0.0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}.")
        if not (isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r}; got {s_tmax!r}.")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)
        self.stochastic = self.s_churn > 0

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)
        gamma = min(self.s_churn / (len(ts) - 1), math.sqrt(2.0) - 1.0)
        m, s, _ = _point(ctx, torch.tensor(ctx.sde.T, dtype=torch.float64))
        return gamma, s / m

    def step(self, ctx, x, t, t_next, state):
        gamma, sigma_top = state
        m, s, _ = _point(ctx, t)
        sigma = s / m
        y = x / m
        if gamma > 0 and self.s_tmin <= sigma <= self.s_tmax:
            sigma_hat = min(sigma * (1.0 + gamma), sigma_top)
            t = _t_at(ctx, -math.log(sigma_hat)).clamp(max=ctx.sde.T)  # round-off must not pass T
            y = y.add_(ctx.randn_like(x), alpha=self.s_noise * math.sqrt(sigma_hat**2 - sigma**2))
            m, s, _ = _point(ctx, t)
            sigma = s / m
        m2, s2, _ = _point(ctx, t_next)
        dsig = s2 / m2 - sigma
        d = -s * ctx.score(y * m, t)  # dy/dsigma = eps = -s score (score outputs are never modified in place)
        y_next = torch.add(y, d, alpha=dsig)
        d2 = -s2 * ctx.score(y_next.mul_(m2), t_next)
        return torch.add(y, d.add_(d2), alpha=0.5 * dsig).mul_(m2), state

    def __repr__(self) -> str:
        return f"Heun(s_churn={self.s_churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise})"


class DPMSolver(StepSampler):
    """Single-step DPM-Solver of order 1, 2 or 3 in the noise-prediction form (Lu et al. 2022, algorithms 1
    and 2 with r1 = 1/2, resp. r1 = 1/3, r2 = 2/3; eqs. 3.7-3.8 and appendix B): NFE = order * steps.

    In y = x/m with sigma' e^h = sigma: y' = y - sigma' (e^h - 1) eps - (higher-order corrections).
    """

    default_steps = 10
    default_schedule = "log_snr"

    def __init__(self, order: int = 3):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        self.order = self.nfe_per_step = order

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)

    def _eps(self, ctx, y, u):
        t = _t_at(ctx, u)
        m, s, _ = _point(ctx, t)
        return -s * ctx.score(y * m, t)

    def step(self, ctx, x, t, t_next, state):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        h, sig2 = u2 - u, s2 / m2
        y = x / m
        e0 = -s * ctx.score(x, t)
        y_next = torch.add(y, e0, alpha=-sig2 * math.expm1(h))
        if self.order == 2:
            r1 = 0.5
            sig1 = math.exp(-(u + r1 * h))
            e1 = self._eps(ctx, torch.add(y, e0, alpha=-sig1 * math.expm1(r1 * h)), u + r1 * h)
            y_next = y_next.add_(e1 - e0, alpha=-sig2 * math.expm1(h) / (2.0 * r1))
        elif self.order == 3:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            sig1, sigm = math.exp(-(u + r1 * h)), math.exp(-(u + r2 * h))
            d1 = self._eps(ctx, torch.add(y, e0, alpha=-sig1 * math.expm1(r1 * h)), u + r1 * h).sub_(e0)
            y2 = (torch.add(y, e0, alpha=-sigm * math.expm1(r2 * h))
                  .add_(d1, alpha=-sigm * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1.0)))
            d2 = self._eps(ctx, y2, u + r2 * h).sub_(e0)
            y_next = y_next.add_(d2, alpha=-sig2 / r2 * (math.expm1(h) / h - 1.0))
        return y_next.mul_(m2), None

    def __repr__(self) -> str:
        return f"DPMSolver(order={self.order})"


def exp_moments(h: float, k: int) -> List[float]:
    """M_j = int_0^h e^{-(h - r)} r^j dr = j! h^{j+1} sum_n (-h)^n / (j + 1 + n)!, j < k (Python floats: these
    are per-step scalars; the series avoids the cancellation of M_j = h^j - j M_{j-1} at small h)."""
    if h > 1.0:
        ms = [-math.expm1(-h)]
        for j in range(1, k):
            ms.append(h**j - j * ms[-1])
        return ms
    out = []
    for j in range(k):
        term, total, n = 1.0 / math.factorial(j + 1), 0.0, 0
        while abs(term) > 1e-18 * max(abs(total), 1e-300) and n < 60:
            total += term
            n += 1
            term *= -h / (j + 1 + n)
        out.append(math.factorial(j) * h ** (j + 1) * total)
    return out


def exp_poly_weights(nodes: List[float], h: float, midpoint: bool = False) -> List[float]:
    """Weights w_i with int_0^h e^{-(h - r)} P(r) dr = sum_i w_i P(nodes[i]) for every polynomial P of degree
    < len(nodes): the Lagrange basis integrated exactly against the exponential (nodes in u, measured from the
    step's start, distinct). This is the exponential Adams rule of DEIS (Zhang & Chen 2022) and of DPM-Solver++
    multistep; ``midpoint=True`` (two nodes) replaces M_1 by M_0 h / 2, DPM-Solver++(2M)'s rule
    (Lu et al. 2022b, algorithm 2)."""
    k = len(nodes)
    ms = exp_moments(h, k)
    if k == 2 and midpoint:
        ms[1] = 0.5 * h * ms[0]
    weights = []
    for i in range(k):
        poly, denom = [1.0], 1.0  # prod_{j != i} (r - nodes[j]) in powers of r
        for j in range(k):
            if j != i:
                poly = [(poly[p - 1] if p > 0 else 0.0) - nodes[j] * (poly[p] if p < len(poly) else 0.0)
                        for p in range(len(poly) + 1)]
                denom *= nodes[i] - nodes[j]
        weights.append(sum(c * m for c, m in zip(poly, ms)) / denom)
    return weights


def exp_poly_integral(nodes: List[float], values: List[torch.Tensor], h: float, midpoint: bool = False,
                      base: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """base + scale * int_0^h e^{-(h - r)} P(r) dr for P the polynomial through (nodes[i], values[i])
    (see :func:`exp_poly_weights`); ``base`` defaults to zero. A new tensor; inputs are not modified."""
    weights = exp_poly_weights(nodes, h, midpoint)
    out = values[0] * (scale * weights[0]) if base is None else torch.add(base, values[0], alpha=scale * weights[0])
    for w, v in zip(weights[1:], values[1:]):
        out = out.add_(v, alpha=scale * w)
    return out


class DPMSolverPP(StepSampler):
    """DPM-Solver++ multistep in the data-prediction form (Lu et al. 2022b, algorithm 2 for order 2; the order-3
    rule integrates the quadratic through the last three denoised values exactly, their appendix / DEIS, Zhang &
    Chen 2022): y' = e^{-h} y + int_0^h e^{-(h - r)} D(r) dr. One NFE per step (NFE = steps); the first steps
    use the lower orders the history allows, and with ``lower_order_final`` the last step is first order
    when steps < 15 (as in the paper's code, which stabilises very few steps).
    """

    default_steps = 20
    default_schedule = "log_snr"

    def __init__(self, order: int = 2, lower_order_final: bool = False):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        if not isinstance(lower_order_final, bool):
            raise TypeError(f"lower_order_final must be a bool; got {type(lower_order_final).__name__}.")
        self.order, self.lower_order_final = order, lower_order_final

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)
        return {"hist": [], "left": len(ts) - 1, "total": len(ts) - 1}

    def step(self, ctx, x, t, t_next, state):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        hist = (state["hist"] + [(u, _denoise(ctx, x, t, m, s))])[-self.order:]
        use = hist[-1:] if self.lower_order_final and state["left"] == 1 and state["total"] < 15 else hist
        nodes, values = [v - u for v, _ in reversed(use)], [d for _, d in reversed(use)]
        # x' = (s'/s) x + m' int_0^h e^{-(h-r)} D(r) dr
        x_next = exp_poly_integral(nodes, values, u2 - u, self.order == 2, base=x * (s2 / s), scale=m2)
        return x_next, {"hist": hist, "left": state["left"] - 1, "total": state["total"]}

    def __repr__(self) -> str:
        return f"DPMSolverPP(order={self.order}, lower_order_final={self.lower_order_final})"


class ExponentialPC(StepSampler):
    """Exponential multistep predictor-corrector in u (the UniPC scheme of Zhao et al. 2023, algorithm 1, with
    the exact exponential Adams weights of :func:`exp_poly_integral` instead of their B(h) approximation).

    Predictor: the exponential Adams rule through the last ``order`` denoised values (as DPM-Solver++ multistep).
    The denoised value at the predicted point, which the next step needs anyway, also enters a corrector one
    order higher (exponential Adams-Moulton); the last step has no corrector. NFE = steps: the first step
    evaluates at x_T and at its predicted point, the last evaluates nothing new.
    """

    default_steps = 20
    default_schedule = "log_snr"

    def __init__(self, order: int = 2):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        self.order = order

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)
        m, s, u = _point(ctx, ts[0])
        return {"hist": [(u, _denoise(ctx, x, ts[0], m, s))], "t_last": float(ts[-1])}

    def step(self, ctx, x, t, t_next, state):
        _, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        hist, h = state["hist"][-self.order:], u2 - u
        nodes, values = [v - u for v, _ in reversed(hist)], [d for _, d in reversed(hist)]
        base = x * (s2 / s)
        x_pred = exp_poly_integral(nodes, values, h, base=base, scale=m2)
        if float(t_next) == state["t_last"]:
            return x_pred, state
        d_new = _denoise(ctx, x_pred, t_next, m2, s2)
        x_next = exp_poly_integral([h] + nodes, [d_new] + values, h, base=base, scale=m2)
        return x_next, {"hist": (hist + [(u2, d_new)])[-self.order:], "t_last": state["t_last"]}

    def total_nfe(self, steps: int) -> int:
        return steps

    def __repr__(self) -> str:
        return f"ExponentialPC(order={self.order})"


class DPMSolverPP2MSDE(StepSampler):
    """Stochastic DPM-Solver++(2M) (Lu et al. 2022b, the SDE variant of section 4; the midpoint rule of their
    code): it integrates the reverse SDE in u, dy = 2 (D - y) du + noise, exactly in its linear part,

        y' = e^{-2h} y + (1 - e^{-2h}) (D + h/2 (D - D_prev)/h_prev) + sigma' sqrt(1 - e^{-2h}) z,

    with y = x/m, sigma' = s'/m'. Its first step (no history) is ancestral sampling. NFE = steps.
    """

    stochastic = True
    default_steps = 50
    default_schedule = "log_snr"

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)

    def step(self, ctx, x, t, t_next, state):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        h = u2 - u
        d = _denoise(ctx, x, t, m, s)
        w = -math.expm1(-2.0 * h)
        x_next = torch.add(x * (s2 / s * math.exp(-h)), d, alpha=m2 * w)
        if state is not None:  # the midpoint correction from the previous denoised value
            u_prev, d_prev = state
            x_next = x_next.add_(d - d_prev, alpha=m2 * w * 0.5 * h / (u - u_prev))
        return x_next.add_(ctx.randn_like(x), alpha=s2 * math.sqrt(w)), (u, d)

    def __repr__(self) -> str:
        return "DPMSolverPP2MSDE()"


register_sampler("ddim", DDIM)
register_sampler("heun", Heun)
register_sampler("dpm_solver", DPMSolver)
register_sampler("dpmpp_2m", lambda lower_order_final=False: DPMSolverPP(2, lower_order_final))
register_sampler("dpmpp_3m", lambda lower_order_final=False: DPMSolverPP(3, lower_order_final))
register_sampler("dpmpp_2m_sde", DPMSolverPP2MSDE)
register_sampler("exp_pc", ExponentialPC)
