"""Samplers in EDM's view (Karras et al. 2022): the probability-flow ODE dy/dsigma = (y - D) / sigma = eps in
y = x / m and sigma = s / m, stepped with Runge-Kutta rules in sigma (Heun; Euler with ancestral noise) or, for
the single-step DPM-Solver, in u = -log sigma.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .._validate import check_number
from .base import (StepSampler, cache_grid as _cache_grid, check_unit,
                   point as _point, points_at_u as _points_at_u, time_at_u as _t_at)
from .exponential import exp_moments


class Heun(StepSampler):
    """EDM's second-order Heun sampler (Karras et al. 2022, algorithm 2) on dy/dsigma = eps, y = x/m.

    Each step is the trapezoidal (Heun) rule in sigma: an Euler point y_e = y + (sigma' - sigma) eps(y, sigma),
    then y' = y + (sigma' - sigma) (eps(y, sigma) + eps(y_e, sigma')) / 2 (two NFE).

    ``final_step`` sets the step that ends the grid. EDM's algorithm ends with a first-order step (its last
    step goes to sigma = 0, where the second evaluation does not exist): with ``final_step="euler"`` (default)
    the step that ends the grid is the Euler step y' = y_e (one NFE), so NFE = 2 * steps - 1 and odd budgets are
    reachable; the global order stays 2 (one step's local error is O(h^2)). ``final_step="heun"`` makes every step
    a Heun step (NFE = 2 * steps). EDM's algorithm 2 with N sigmas and t_N = 0 is ``final_step="heun"`` on
    those N sigmas followed by the driver's ``denoise=True`` (the Euler step from sigma_min to 0 is y - sigma_min
    eps = D, the denoiser): 2 N - 1 NFE.

    With ``s_churn > 0`` each step with s_tmin <= sigma <= s_tmax first raises sigma to sigma (1 + gamma),
    gamma = min(s_churn / steps, sqrt(2) - 1) (capped at sigma(T)), adding noise of std
    s_noise sqrt(sigma_hat^2 - sigma^2) in y. s_tmin, s_tmax and s_noise shape that churn only: with s_churn = 0 they
    are accepted and have no effect, as in EDM and k-diffusion, so that a sweep over s_churn can keep them fixed.
    """

    order = 2
    nfe_per_step = 2
    default_steps = 25
    default_schedule = "edm"

    final_steps = ("euler", "heun")

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 final_step: str = "euler"):
        if not (isinstance(final_step, str) and final_step in self.final_steps):
            raise ValueError(f"final_step must be 'euler' or 'heun'; got {final_step!r}.")
        self.final_step = final_step
        for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            check_number(v, name, lo=0.0)
        if isinstance(s_tmax, bool) or not (isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r}; got {s_tmax!r}.")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)
        self.stochastic = self.s_churn > 0

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)
        gamma = min(self.s_churn / (len(ts) - 1), math.sqrt(2.0) - 1.0)
        m, s, _ = _point(ctx, torch.tensor(ctx.sde.T, dtype=torch.float64))
        return gamma, s / m, float(ts[-1])

    def total_nfe(self, steps: int) -> int:
        return 2 * steps - int(self.final_step == "euler")

    def step(self, ctx, x, t, t_next, state):
        gamma, sigma_top, t_end = state
        euler = self.final_step == "euler" and float(t_next) == t_end
        return self.ode_step(ctx, self._churn(ctx, x, t, gamma, sigma_top), t_next, euler), state

    def _churn(self, ctx, x, t, gamma, sigma_top):
        """(x, t) raised to sigma (1 + gamma) with the matching noise when churn applies at t, else unchanged."""
        if gamma <= 0:
            return x, t
        m, s, _ = _point(ctx, t)
        sigma = s / m
        if not self.s_tmin <= sigma <= self.s_tmax:
            return x, t
        sigma_hat = min(sigma * (1.0 + gamma), sigma_top)
        t_hat = _t_at(ctx, -math.log(sigma_hat)).clamp(max=ctx.sde.T)  # round-off must not pass T
        m_hat = _point(ctx, t_hat)[0]
        y = torch.div(x, m).add_(ctx.randn_like(x), alpha=self.s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        return y.mul_(m_hat), t_hat

    @staticmethod
    def ode_step(ctx, xt, t_next, euler: bool = False) -> torch.Tensor:
        """One Heun step (or with ``euler`` its Euler point alone) of dy/dsigma = eps from (x, t) = ``xt`` to t_next."""
        x, t = xt
        m, s, _ = _point(ctx, t)
        m2, s2, _ = _point(ctx, t_next)
        dsig = s2 / m2 - s / m
        # dy/dsigma = eps = -s score in y = x/m, carried out on x = m y: the Euler point is
        # x_e = (m'/m) x - m' dsig s score, the trapezoid adds -m' dsig/2 (s score + s' score(x_e)) to (m'/m) x
        base = x * (m2 / m)
        score = ctx.score(x, t)  # score outputs are never modified in place
        if euler:
            return base.add_(score, alpha=-m2 * dsig * s)
        x_euler = torch.add(base, score, alpha=-m2 * dsig * s)
        x_next = base.add_(score, alpha=-0.5 * m2 * dsig * s)
        return x_next.add_(ctx.score(x_euler, t_next), alpha=-0.5 * m2 * dsig * s2)

    def __repr__(self) -> str:
        return (f"Heun(s_churn={self.s_churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise}, "
                f"final_step={self.final_step!r})")


class EulerAncestral(StepSampler):
    """Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``): each step sigma -> sigma' in y = x/m,
    sigma = s/m is split as in ancestral sampling (Ho et al. 2020, eq. 7) into an Euler step of EDM's ODE
    dy/dsigma = (y - D) / sigma (Karras et al. 2022, eqs. 1 and 3) down to sigma_down and fresh noise of std sigma_up:

        sigma_up = min(sigma', eta sigma' sqrt(sigma^2 - sigma'^2) / sigma),  sigma_down = sqrt(sigma'^2 - sigma_up^2),
        y' = y + (sigma_down - sigma) (y - D) / sigma + s_noise sigma_up z,   x' = m' y'.

    eta = 1 draws from DDPM's posterior q(y' | y, y_0 = D) (then sigma_down = sigma'^2 / sigma: the same update as
    "ancestral" and DDIM with eta = 1); eta = 0 is Euler's method in sigma, which is DDIM with eta = 0. s_noise
    scales the fresh noise (EDM's S_noise). First order, NFE = steps; x is (B, ...) of any dtype and device.
    """

    order = 1
    nfe_per_step = 1
    default_steps = 50
    default_schedule = "edm"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        for name, v in (("eta", eta), ("s_noise", s_noise)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}.")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0  # s_noise = 0 too: the step still makes room for the noise

    def start(self, ctx, x, ts):
        _cache_grid(ctx, ts)

    def step(self, ctx, x, t, t_next, state):
        m, s, _ = _point(ctx, t)
        m2, s2, _ = _point(ctx, t_next)
        sigma, sigma2 = s / m, s2 / m2
        sigma_up = min(sigma2, self.eta * sigma2 * math.sqrt(max(sigma * sigma - sigma2 * sigma2, 0.0)) / sigma)
        sigma_down = math.sqrt(max(sigma2 * sigma2 - sigma_up * sigma_up, 0.0))
        # the Euler point y + (sigma_down - sigma)(y - D)/sigma is D + r (y - D), r = sigma_down / sigma
        r = sigma_down / sigma
        x_next = torch.mul(x, m2 * r / m).add_(ctx.denoise(x, t), alpha=m2 * (1.0 - r))
        if self.stochastic and sigma_up > 0.0:
            x_next = x_next.add_(ctx.randn_like(x), alpha=m2 * self.s_noise * sigma_up)
        return x_next, state

    def __repr__(self) -> str:
        return f"EulerAncestral(eta={self.eta}, s_noise={self.s_noise})"


class DPMSolver(StepSampler):
    """Single-step DPM-Solver of order 1, 2 or 3 (stages at u + h/2, resp. u + h/3 and u + 2h/3):
    NFE = order * steps.

    ``prediction="data"`` (default): DPM-Solver++'s single-step form (Lu et al. 2022b, section 4 and appendix A),
    exponential integration of dy/du = D - y in y = x/m, u = -log sigma:
    y' = e^{-h} y + (1 - e^{-h}) D_0 + corrections through the stage values of D with the exact
    moments of e^{-(h - r)}. ``prediction="noise"``: DPM-Solver (Lu et al. 2022, algorithms 1 and 2;
    eqs. 3.7-3.8, appendix B), y' = y - sigma' (e^h - 1) eps - (corrections), which multiplies the model's error
    by e^h - 1: at large steps (a few steps over the whole log-SNR range, h ~ 3) that factor (about 20)
    sends trajectories into other modes; the data form's weights are at most h, so its error stays bounded.
    Both have global order ``order``.
    """

    exponential = True

    default_steps = 10
    default_schedule = "log_snr"
    predictions = ("data", "noise")

    def __init__(self, order: int = 3, prediction: str = "data"):
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
        if not (isinstance(prediction, str) and prediction in self.predictions):
            raise ValueError(f"prediction must be 'data' or 'noise'; got {prediction!r}.")
        self.order = self.nfe_per_step = order
        self.prediction = prediction

    def _fractions(self) -> Tuple[float, ...]:
        return {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}[self.order]

    def start(self, ctx, x, ts):
        """The stage points of every step (u + r h, r in the order's fractions, with their t, m and s), found in
        one vectorised call, and with prediction="data" every step's coefficients: a step then costs table
        look-ups on the host and no scalar tensor launches."""
        _cache_grid(ctx, ts)
        rs = self._fractions()
        grid = ts.tolist()
        us = [ctx.grid_points[t][2] for t in grid]
        mids = [u + r * (u2 - u) for u, u2 in zip(us[:-1], us[1:]) for r in rs]
        points = _points_at_u(ctx, mids) if mids else []
        if points:
            ctx.model.prepare(torch.stack([p[0] for p in points]))  # the model's table of (m, s) at the stages
        plan = {}
        for i, (t, t2) in enumerate(zip(grid[:-1], grid[1:])):
            stages = points[len(rs) * i:len(rs) * (i + 1)]
            (m, _, u), (m2, _, u2) = ctx.grid_points[t], ctx.grid_points[t2]
            coefficients = self._data_coefficients(m, u2 - u, m2, [p[1] for p in stages]) \
                if self.prediction == "data" else None
            plan[t] = (t2, stages, coefficients)
        return plan

    @staticmethod
    def _eps(ctx, y, point):
        """eps = -s score at the stage ``point`` = (t, m, s), from y = x/m there."""
        t, m, s = point
        return -s * ctx.score(y * m, t)

    def _data_coefficients(self, m: float, h: float, m2: float, stage_m: List[float]) -> List[Tuple[float, ...]]:
        """(a, w_0, w_prev) of each stage and of the step's end: x_r = a x + w_0 D_0 + w_prev D_prev in x at the
        stage u + r h (m_r its m), the DPM-Solver++ rule in y = x/m (see :meth:`_data_step`) carried out on
        x_r = m_r y_r. D_prev is D at the stage before (no term at the first stage)."""
        rows, r_prev = [], None
        for r, m_r in list(zip(self._fractions(), stage_m)) + [(1.0, m2)]:
            a0, a1 = exp_moments(r * h, 2)
            c = a1 / (r_prev * h) if r_prev is not None else 0.0  # the weight of D_prev - D_0 in y
            rows.append((m_r / m * math.exp(-r * h), m_r * (a0 - c), m_r * c))
            r_prev = r
        return rows

    def _data_step(self, ctx, x, t, coefficients, stages):
        """DPM-Solver++ single step in y = x/m: y' = e^{-h} y + M_0(h) D_0 + M_1(h) / (r h) (D_r - D_0), D_r at
        the last stage u + r h, itself reached by the same rule from the stage before (M_j: :func:`exp_moments`)."""
        d0 = prev = ctx.denoise(x, t)
        for (a, w0, w_prev), point in zip(coefficients, stages + [None]):
            x_r = torch.mul(x, a).add_(d0, alpha=w0)
            if prev is not d0:
                x_r = x_r.add_(prev, alpha=w_prev)
            if point is None:
                return x_r
            prev = ctx.denoise(x_r, point[0])

    def step(self, ctx, x, t, t_next, state):
        entry = state.get(float(t)) if state is not None else None
        if entry is None or entry[0] != float(t_next):  # a step off the grid given to start()
            m, _, u = _point(ctx, t)
            m2, _, u2 = _point(ctx, t_next)
            stages = [(tr,) + _point(ctx, tr)[:2] for tr in (_t_at(ctx, u + r * (u2 - u)) for r in self._fractions())]
            coefficients = self._data_coefficients(m, u2 - u, m2, [p[1] for p in stages])
        else:
            _, stages, coefficients = entry
        if self.prediction == "data":
            return self._data_step(ctx, x, t, coefficients, stages), state
        return self._noise_step(ctx, x, t, t_next, stages), state

    def _noise_step(self, ctx, x, t, t_next, mid):
        m, s, u = _point(ctx, t)
        m2, s2, u2 = _point(ctx, t_next)
        h, sig2 = u2 - u, s2 / m2
        y = x / m
        e0 = -s * ctx.score(x, t)
        y_next = torch.add(y, e0, alpha=-sig2 * math.expm1(h))
        if self.order == 2:
            r1 = 0.5
            sig1 = math.exp(-(u + r1 * h))
            e1 = self._eps(ctx, torch.add(y, e0, alpha=-sig1 * math.expm1(r1 * h)), mid[0])
            y_next = y_next.add_(e1 - e0, alpha=-sig2 * math.expm1(h) / (2.0 * r1))
        elif self.order == 3:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            sig1, sigm = math.exp(-(u + r1 * h)), math.exp(-(u + r2 * h))
            d1 = self._eps(ctx, torch.add(y, e0, alpha=-sig1 * math.expm1(r1 * h)), mid[0]).sub_(e0)
            y2 = (torch.add(y, e0, alpha=-sigm * math.expm1(r2 * h))
                  .add_(d1, alpha=-sigm * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1.0)))
            d2 = self._eps(ctx, y2, mid[1]).sub_(e0)
            y_next = y_next.add_(d2, alpha=-sig2 / r2 * (math.expm1(h) / h - 1.0))
        return y_next.mul_(m2)

    def __repr__(self) -> str:
        return f"DPMSolver(order={self.order}, prediction={self.prediction!r})"


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> Tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma' (k-diffusion's ``get_ancestral_step``):
    sigma_up = min(sigma', eta sigma' sqrt(sigma^2 - sigma'^2) / sigma), sigma_down = sqrt(sigma'^2 - sigma_up^2),
    so that a deterministic step to sigma_down plus fresh noise of std sigma_up lands at noise level sigma'.
    eta = 1 is DDPM's posterior q(y' | y, y_0 = D) (Ho et al. 2020, eq. 7), eta = 0 no noise (sigma_down = sigma').
    sigma_down is taken as sigma' sqrt(1 - eta^2 + eta^2 (sigma'/sigma)^2), the same number without the
    cancellation of sigma'^2 - sigma_up^2 (which gave 0, and a log of 0, for sigma'/sigma below 1e-8)."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma * sigma - sigma_next * sigma_next, 0.0)) / sigma)
    if sigma_next >= sigma:  # not a step down: no noise to split off
        return sigma_next, 0.0
    r = sigma_next / sigma
    kept = 1.0 - eta * eta + eta * eta * r * r  # (sigma_down / sigma')^2
    return (sigma_next * math.sqrt(kept) if kept > 0.0 else 0.0), sigma_up


class DPM2(StepSampler):
    """DPM-Solver-2 in EDM's sigma view (k-diffusion's ``sample_dpm_2``; Lu et al. 2022, algorithm 1 with the
    stage at the midpoint in log sigma, Karras et al. 2022 section 3): on dy/dsigma = (y - D) / sigma, y = x/m,
    a step sigma -> sigma' takes

        sigma_m = sqrt(sigma sigma')                         (the midpoint of log sigma),
        y_m = y + (sigma_m - sigma) (y - D(y, sigma)) / sigma,
        y' = y + (sigma' - sigma) (y_m - D(y_m, sigma_m)) / sigma_m,     x' = m' y'.

    In u = -log sigma this is DPM-Solver-2 with noise prediction (Lu et al. 2022, algorithm 1, r = 1/2):
    y_m = y - sigma_m (e^{h/2} - 1) eps and y' = y - sigma' (e^h - 1) eps(y_m), since sigma' e^h = sigma, i.e.
    ``DPMSolver(order=2, prediction="noise")``, written here in sigma as k-diffusion does.
    Second order, two NFE per step. k-diffusion's step to sigma' = 0 is an Euler step (it is D); here the grid ends
    at sigma_min > 0, and that last step is the driver's ``denoise=True``: k-diffusion's run on sigmas
    [sigma_0, ..., sigma_min, 0] equals this sampler on the grid down to sigma_min with ``denoise=True``.
    x is (B, ...) of any dtype and device and is not modified.
    """

    exponential = True  # DPM-Solver-2: exponential in log sigma

    order = 2
    nfe_per_step = 2
    default_steps = 25
    default_schedule = "edm"
    eta, s_noise = 0.0, 0.0

    def _split(self, sigma: float, sigma_next: float) -> Tuple[float, float]:
        return sigma_next, 0.0

    def start(self, ctx, x, ts):
        """Per step: (sigma_down, sigma_up) and the stage's (t, m, s) at sqrt(sigma sigma_down), the stage times
        found in one vectorised call."""
        _cache_grid(ctx, ts)
        grid = ts.tolist()
        sigmas = [ctx.grid_points[t][1] / ctx.grid_points[t][0] for t in grid]
        splits = [self._split(a, b) for a, b in zip(sigmas[:-1], sigmas[1:])]
        u_mid = [-0.5 * math.log(a * down) for a, (down, _) in zip(sigmas[:-1], splits)]
        return {t: (split, stage) for t, split, stage in zip(grid[:-1], splits, _points_at_u(ctx, u_mid))}

    def _plan(self, ctx, t, t_next, state):
        """(sigma_down, sigma_up, stage) of the step from t, from the table of :meth:`start` or computed."""
        planned = state.get(float(t)) if state is not None else None
        if planned is None:  # a step off the grid given to start()
            m, s, _ = _point(ctx, t)
            m2, s2, _ = _point(ctx, t_next)
            down, up = self._split(s / m, s2 / m2)
            t_mid = _t_at(ctx, -0.5 * math.log(s / m * down))
            planned = ((down, up), (t_mid,) + _point(ctx, t_mid)[:2])
        (down, up), stage = planned
        return down, up, stage

    def _finish(self, y, d0, y_mid, d_mid, sigma, sigma_mid, sigma_down):
        """y at sigma_down from the step's start (y, D(y)) and its stage (y_m, D(y_m)): the midpoint rule."""
        return y.add_(y_mid.sub_(d_mid), alpha=(sigma_down - sigma) / sigma_mid)

    def step(self, ctx, x, t, t_next, state):
        m, s, _ = _point(ctx, t)
        m2, s2, _ = _point(ctx, t_next)
        sigma = s / m
        down, up, (t_mid, m1, s1) = self._plan(ctx, t, t_next, state)
        sigma_mid = s1 / m1
        y = x / m
        d0 = ctx.denoise(x, t)
        r = sigma_mid / sigma  # the Euler point y + (sigma_m - sigma)(y - D)/sigma is D + r (y - D)
        y_mid = torch.mul(y, r).add_(d0, alpha=1.0 - r)
        d_mid = ctx.denoise(y_mid * m1, t_mid)
        y_next = self._finish(y, d0, y_mid, d_mid, sigma, sigma_mid, down)
        if self.stochastic and up > 0.0:
            y_next = y_next.add_(ctx.randn_like(x), alpha=self.s_noise * up)
        return y_next.mul_(m2), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DPM2Ancestral(DPM2):
    """DPM-Solver-2 with ancestral noise (k-diffusion's ``sample_dpm_2_ancestral``): each step sigma -> sigma' is
    split by :func:`ancestral_split` into the :class:`DPM2` step from sigma to sigma_down (stage at
    sqrt(sigma sigma_down)) and fresh noise: y' = y_down + s_noise sigma_up z, x' = m' y'.

    eta = 1 (default) draws DDPM's posterior noise; eta = 0 is :class:`DPM2`. The deterministic part has order 2
    (two NFE per step); with noise the method samples the data's marginals with weak order 1.

    Args:
        eta: the ancestral noise fraction, in [0, 1] (above 1 sigma_down can reach 0, where the midpoint stage
            does not exist).
        s_noise: scale of the fresh noise (EDM's S_noise), a finite number >= 0; 0 drops the fresh noise but not the
            step's sigma_down, so the samples are under-dispersed (the probability-flow ODE is eta = 0).
    """

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta = check_unit(eta, "eta")
        if isinstance(s_noise, bool) or not (isinstance(s_noise, (int, float)) and 0.0 <= s_noise < math.inf):
            raise ValueError(f"s_noise must be a finite number >= 0; got {s_noise!r}.")
        self.s_noise = float(s_noise)
        self.stochastic = self.eta > 0  # s_noise = 0 too: the step still makes room for the noise

    def _split(self, sigma: float, sigma_next: float) -> Tuple[float, float]:
        return ancestral_split(sigma, sigma_next, self.eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta}, s_noise={self.s_noise})"


class DPMPP2SAncestral(DPM2Ancestral):
    """DPM-Solver++(2S) with ancestral noise (k-diffusion's ``sample_dpmpp_2s_ancestral``; Lu et al. 2022b,
    "DPM-Solver++", algorithm 1 with r = 1/2, data prediction): each step sigma -> sigma' is split by
    :func:`ancestral_split`; in u = -log sigma with h = log(sigma / sigma_down) the step to sigma_down is

        y_m = e^{-h/2} y + (1 - e^{-h/2}) D(y, sigma),       (at sigma_m = sqrt(sigma sigma_down))
        y_down = e^{-h} y + (1 - e^{-h}) D(y_m, sigma_m),

    the exponential integrator of dy/du = D - y with D at the stage (the stage is the same point as DPM-2's);
    then y' = y_down + s_noise sigma_up z, x' = m' y'. eta = 0 is the deterministic second-order DPM-Solver++(2S)
    (``dpmpp_sde`` with eta = 0); eta = 1 (default) DDPM's posterior noise. Two NFE per step.

    Args:
        eta: the ancestral noise fraction, in [0, 1].
        s_noise: scale of the fresh noise, a finite number >= 0 (0 drops it but not the step's sigma_down: the
            samples are under-dispersed; the probability-flow ODE is eta = 0).
    """

    exponential = True

    default_schedule = "log_snr"

    def _finish(self, y, d0, y_mid, d_mid, sigma, sigma_mid, sigma_down):
        r = sigma_down / sigma  # e^{-h}
        return y.mul_(r).add_(d_mid, alpha=1.0 - r)
