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

from .base import Context, StepSampler, cache_grid as _cache_grid, check_unit as _check_unit, point as _point
from .base import scaled_denoise, time_at_u as _t_at


def _add_weighted(out: torch.Tensor, weights: List[float], past: List[Tuple[float, torch.Tensor, float]],
                  m2: float) -> torch.Tensor:
    """out + m' sum_i w_i D_i, accumulated in place into ``out``, for history entries (u_i, m_i D_i, 1/m_i)."""
    for w, (_, md, inv_m) in zip(weights, past):
        out = out.add_(md, alpha=m2 * w * inv_m)
    return out


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
        if self.eta:  # b^2 of every step in one vectorised call
            return dict(zip(ts[:-1].tolist(), ctx.sde.transition_var(ts[1:], ts[:-1]).tolist()))
        return None

    def step(self, ctx, x, t, t_next, state):
        m, s, _ = _point(ctx, t)
        m2, s2, _ = _point(ctx, t_next)
        score = ctx.score(x, t)
        # x' = m' x0 + k eps with x0 = (x + s^2 score)/m and eps = -s score
        c = 0.0
        if self.eta:
            var = state.get(float(t)) if state is not None else None
            var = float(ctx.sde.transition_var(t_next, t)) if var is None else var
            c = self.eta * math.sqrt(var) * s2 / s
        k = math.sqrt(max(s2 * s2 - c * c, 0.0))
        x_next = torch.add(x, score, alpha=s * s - k * s * m / m2).mul_(m2 / m)
        return (x_next.add_(ctx.randn_like(x), alpha=c) if c else x_next), state

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta})"


def exp_moments(h: float, k: int, rate: float = 1.0) -> List[float]:
    """M_j = int_0^h e^{-(h - r)} r^j dr = j! h^{j+1} sum_n (-h)^n / (j + 1 + n)!, j < k (Python floats: these
    are per-step scalars; the series avoids the cancellation of M_j = h^j - j M_{j-1} at small h).

    With ``rate`` = c > 0 the kernel is e^{-c (h - r)} (the stochastic integrators' 1 + tau^2):
    int_0^h e^{-c (h - r)} r^j dr = M_j(c h) / c^{j+1} (substitute r = rho / c)."""
    if rate != 1.0:
        if not rate > 0.0:
            raise ValueError(f"rate must be > 0; got {rate!r}.")
        return [mj / rate ** (j + 1) for j, mj in enumerate(exp_moments(rate * h, k))]
    if h > 1.0:
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
    k = len(nodes)
    ms = exp_moments(h, k, rate)
    if k == 2 and midpoint:
        ms[1] = 0.5 * h * ms[0]
    return _moment_weights(nodes, ms)


def _moment_weights(nodes: List[float], ms: List[float]) -> List[float]:
    """Weights integrating the Lagrange basis of ``nodes`` against a kernel with moments ``ms`` (len(nodes) of them)."""
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
        hist = (state["hist"] + [(u, scaled_denoise(ctx, x, t, m), 1.0 / m)])[-self.order:]
        use = hist[-1:] if self.lower_order_final and state["left"] == 1 and state["total"] < 15 else hist
        weights = exp_poly_weights([v - u for v, _, _ in reversed(use)], u2 - u, self.order == 2)
        # x' = (s'/s) x + m' int_0^h e^{-(h-r)} D(r) dr
        x_next = _add_weighted(torch.mul(x, s2 / s), weights, list(reversed(use)), m2)
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
        return {"hist": [(u, scaled_denoise(ctx, x, ts[0], m), 1.0 / m)], "t_last": float(ts[-1])}

    def step(self, ctx, x, t, t_next, state):
        _, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        hist, h = state["hist"][-self.order:], u2 - u
        past = list(reversed(hist))
        nodes = [v - u for v, _, _ in past]
        ms = exp_moments(h, len(nodes) + 1)  # the predictor uses the first len(nodes) of the corrector's moments
        # x' = (s'/s) x + m' int_0^h e^{-(h-r)} P(r) dr, P through the denoised values (see exp_poly_integral)
        base = torch.mul(x, s2 / s)
        weights = _moment_weights(nodes, ms[:-1])
        first = torch.add(base, past[0][1], alpha=m2 * weights[0] * past[0][2])  # base is kept for the corrector
        x_pred = _add_weighted(first, weights[1:], past[1:], m2)
        if float(t_next) == state["t_last"]:
            return x_pred, state
        past = [(u2, scaled_denoise(ctx, x_pred, t_next, m2), 1.0 / m2)] + past
        # base is no longer needed by the predictor: the corrector accumulates into it in place
        x_next = _add_weighted(base, _moment_weights([h] + nodes, ms), past, m2)
        return x_next, {"hist": (hist + [past[0]])[-self.order:], "t_last": state["t_last"]}

    def total_nfe(self, steps: int) -> int:
        return steps

    def __repr__(self) -> str:
        return f"ExponentialPC(order={self.order})"


class DPMSolverPP2MSDE(StepSampler):
    """Stochastic DPM-Solver++(2M) (Lu et al. 2022b, the SDE variant of section 4; the midpoint rule of their
    code), with k-diffusion's ``eta`` between the ODE and the reverse SDE. In y = x/m, u = log(m/s), it integrates
    dy = (1 + eta) (D - y) du + sqrt(2 eta) sigma dw, which has the data's marginals for every eta >= 0,
    exactly in its linear part (c = 1 + eta, sigma' = s'/m'):

        y' = e^{-c h} y + (1 - e^{-c h}) (D + h/2 (D - D_prev)/h_prev) + sigma' sqrt(1 - e^{-2 eta h}) z.

    eta = 1 is the reverse SDE (the default), eta = 0 the ODE's DPM-Solver++(2M) (no noise drawn); eta in
    [0, 1]. Its first step (no history) is first order (ancestral sampling at eta = 1). NFE = steps.
    """

    default_steps = 50
    default_schedule = "log_snr"

    def __init__(self, eta: float = 1.0):
        self.eta = _check_unit(eta, "eta")
        self.stochastic = self.eta > 0

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)

    def step(self, ctx, x, t, t_next, state):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        h = u2 - u
        md = scaled_denoise(ctx, x, t, m)  # kept with 1/m, as in the multistep samplers' history
        w = -math.expm1(-(1.0 + self.eta) * h)
        # x' = m' y' with m'/m = (s'/s) e^h: the y coefficient e^{-c h} becomes (s'/s) e^{-eta h};
        # the midpoint correction adds r (D - D_prev), r = h / (2 h_prev), from the previous denoised value
        r = 0.0 if state is None else 0.5 * h / (u - state[0])
        x_next = torch.mul(x, s2 / s * math.exp(-self.eta * h)).add_(md, alpha=m2 * w * (1.0 + r) / m)
        if state is not None:
            x_next = x_next.add_(state[1], alpha=-m2 * w * r * state[2])
        if self.eta:
            x_next = x_next.add_(ctx.randn_like(x), alpha=s2 * math.sqrt(-math.expm1(-2.0 * self.eta * h)))
        return x_next, (u, md, 1.0 / m)

    def __repr__(self) -> str:
        return f"DPMSolverPP2MSDE(eta={self.eta})"




def _check_orders(predictor_order: int, corrector_order: int) -> None:
    if predictor_order not in (1, 2, 3, 4):
        raise ValueError(f"predictor_order must be 1, 2, 3 or 4; got {predictor_order!r}.")
    if corrector_order not in (0, 1, 2, 3, 4):
        raise ValueError(f"corrector_order must be 0 (no corrector), 1, 2, 3 or 4; got {corrector_order!r}.")


class SASolver(StepSampler):
    """SA-Solver, the stochastic Adams predictor-corrector of Xue et al. 2023 (algorithm 1; data prediction,
    eqs. 14-15), on dy = (1 + tau^2)(D - y) du + sqrt(2) tau sigma dw in y = x/m, u = log(m/s), sigma = s/m,
    whose marginals are the data's for every tau >= 0. With c = 1 + tau^2 and sigma' = s'/m' a step is

        y' = e^{-c h} y + c int_0^h e^{-c (h - r)} P(r) dr + sigma' sqrt(1 - e^{-2 tau^2 h}) z,

    P the polynomial through the last ``predictor_order`` denoised values (predictor) or through the value at the
    predicted point and the last ``corrector_order - 1`` values (corrector, with the same z), integrated with
    the exact exponential weights of :func:`exp_poly_integral`. The denoised value at the predicted point is the
    one the next predictor needs, so NFE = steps (the last step has no corrector, as in :class:`ExponentialPC`).

    tau = 0 is the deterministic exponential PC (``corrector_order = predictor_order + 1`` is "exp_pc"), tau = 1
    the reverse SDE. Noise is added only on steps that start at s_tmin <= sigma <= s_tmax (the paper's
    piecewise-constant tau(t); EDM's s_tmin/s_tmax): elsewhere tau is 0 on that step.
    """

    default_steps = 20
    default_schedule = "log_snr"

    def __init__(self, predictor_order: int = 3, corrector_order: int = 4, tau: float = 1.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf):
        _check_orders(predictor_order, corrector_order)
        if not (isinstance(tau, (int, float)) and 0.0 <= tau < math.inf):
            raise ValueError(f"tau must be a finite number >= 0; got {tau!r}.")
        if not (isinstance(s_tmin, (int, float)) and 0.0 <= s_tmin < math.inf):
            raise ValueError(f"s_tmin must be a finite number >= 0; got {s_tmin!r}.")
        if not (isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r}; got {s_tmax!r}.")
        self.predictor_order, self.corrector_order = predictor_order, corrector_order
        self.tau, self.s_tmin, self.s_tmax = float(tau), float(s_tmin), float(s_tmax)
        self.stochastic = self.tau > 0

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)
        m, s, u = _point(ctx, ts[0])
        return {"hist": [(u, ctx.denoise(x, ts[0]))], "t_last": float(ts[-1])}

    def step(self, ctx, x, t, t_next, state):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        h, hist = u2 - u, state["hist"]
        tau2 = self.tau**2 if self.s_tmin <= s / m <= self.s_tmax else 0.0
        c = 1.0 + tau2
        # x' = m' y' with m'/m = (s'/s) e^h: the y coefficient e^{-c h} becomes (s'/s) e^{-tau^2 h}
        base = x * (s2 / s * math.exp(-tau2 * h))
        if tau2 > 0.0:
            base = base.add_(ctx.randn_like(x), alpha=s2 * math.sqrt(-math.expm1(-2.0 * tau2 * h)))
        use = hist[-self.predictor_order:]
        nodes, values = [v - u for v, _ in reversed(use)], [d for _, d in reversed(use)]
        x_pred = exp_poly_integral(nodes, values, h, base=base, scale=m2 * c, rate=c)
        if float(t_next) == state["t_last"]:
            return x_pred, state
        d_new = ctx.denoise(x_pred, t_next)
        x_next = x_pred
        if self.corrector_order > 0:
            use = hist[-(self.corrector_order - 1):] if self.corrector_order > 1 else []
            nodes = [h] + [v - u for v, _ in reversed(use)]
            values = [d_new] + [d for _, d in reversed(use)]
            x_next = exp_poly_integral(nodes, values, h, base=base, scale=m2 * c, rate=c)
        keep = max(self.predictor_order, self.corrector_order - 1, 1)
        return x_next, {"hist": (hist + [(u2, d_new)])[-keep:], "t_last": state["t_last"]}

    def total_nfe(self, steps: int) -> int:
        return steps

    def __repr__(self) -> str:
        return (f"SASolver(predictor_order={self.predictor_order}, corrector_order={self.corrector_order}, "
                f"tau={self.tau}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax})")




class DPMSolverPP3MSDE(SASolver):
    """Stochastic DPM-Solver++(3M) (Lu et al. 2022b, the SDE variant of section 4 at third order, as in
    k-diffusion's sample_dpmpp_3m_sde): the exponential Adams step of :class:`SASolver` without corrector, P the
    quadratic through the last three denoised values, on dy = (1 + eta)(D - y) du + sqrt(2 eta) sigma dw:

        y' = e^{-(1 + eta) h} y + (1 + eta) int_0^h e^{-(1 + eta)(h - r)} P(r) dr + sigma' sqrt(1 - e^{-2 eta h}) z.

    eta = 1 is the reverse SDE (the default), eta = 0 the ODE's "dpmpp_3m"; eta in [0, 1]. The first two steps
    use the lower orders the history allows. NFE = steps.
    """

    default_steps = 50

    def __init__(self, eta: float = 1.0):
        self.eta = _check_unit(eta, "eta")
        super().__init__(predictor_order=3, corrector_order=0, tau=math.sqrt(self.eta))

    def __repr__(self) -> str:
        return f"DPMSolverPP3MSDE(eta={self.eta})"


