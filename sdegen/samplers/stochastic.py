"""Single-step stochastic exponential integrators: DPM-Solver++(2S) on the reverse SDE (k-diffusion's
``sample_dpmpp_sde``), with both stages driven by one Brownian path.

Same variables as :mod:`.exponential`: y = x / m, sigma = s / m, u = log(m / s) = -log sigma, and the family of
reverse processes with the data's marginals dy = (1 + lam) (D - y) du + sqrt(2 lam) sigma dw.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from .base import Context, StepSampler, brownian_path, cache_grid, point, points_at_u, time_at_u

BROWNIAN_CLOCKS = ("snr", "sigma", "tree")


def _check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return float(value)


class DPMSolverPPSDE(StepSampler):
    """Stochastic single-step DPM-Solver++(2S) (Lu et al. 2022b, "DPM-Solver++", algorithm 1, data prediction, on
    the reverse SDE as in k-diffusion's ``sample_dpmpp_sde``): two NFE per step, global order 2 of the
    deterministic part.

    A step from u to u' = u + h, stage at u_r = u + r h (h_1 = r h), c = 1 + lam, lam = eta:

        y_r = e^{-c h_1} y + (1 - e^{-c h_1}) D(y) + s_noise sigma_r sqrt(1 - e^{-2 lam h_1}) z_1,
        y'  = e^{-c h} y + (1 - e^{-c h}) ((1 - 1/(2r)) D(y) + 1/(2r) D(y_r))
              + s_noise sigma' sqrt(1 - e^{-2 lam h}) z_2,

    each stage the exact solution of the linear SDE with D held at the stage's value (its noise is the exact
    transition variance of the linear part; at eta = 1 the step's x coefficient (s'/s) e^{-h} and noise
    sigma'^2 (1 - e^{-2h}) are DDPM's ancestral step, k-diffusion's ``get_ancestral_step``).

    One Brownian path per step: with D frozen, the noise a stage of length k adds to y is
    int_0^k e^{-c (k - v)} sqrt(2 lam) sigma e^{-v} dw_v = sigma_k e^{-lam k} M(k), with sigma_k = sigma e^{-k} and
    M(k) = int_0^k sqrt(2 lam) e^{lam v} dw_v, a Brownian motion in the clock tau = e^{2 lam k} - 1 (its variance;
    at lam = 1 the signal-to-noise ratio over its value at the step's start, minus 1). Hence the per-stage
    variances sigma_k^2 (1 - e^{-2 lam k}) above, and z_1 = M(h_1) / sd(M(h_1)), z_2 = M(h) / sd(M(h)) have correlation

        rho = sqrt((e^{2 lam h_1} - 1) / (e^{2 lam h} - 1))        (1/sqrt(1 + e^h) at lam = 1, r = 1/2),

    built from two independent per-example draws a, b as z_1 = a, z_2 = rho a + sqrt(1 - rho^2) b (the
    increments of M over [0, h_1] and [h_1, h]). ``brownian="sigma"`` instead takes k-diffusion's Brownian tree in
    sigma: rho = sqrt((sigma - sigma_r) / (sigma - sigma')), which equals the exact value only as h -> 0
    (both 1/sqrt(2) at r = 1/2) and differs at large steps (it tends to 1 where the exact one tends to 0).
    ``brownian="tree"`` draws the same exact law from one path for the whole run, the process Z of
    :class:`sdegen.noise.OUPath` (z_1 and z_2 are its increments e^{lam h_1} Z(u_r) - Z(u) and
    e^{lam h} Z(u') - Z(u), normalised), kept in a Brownian tree over the SDE's span of u (down to the grid's
    t_min if that is earlier): the path does not depend on the number of steps, so runs of one seed at different
    step counts converge to one sample, as k-diffusion's ``BrownianTreeNoiseSampler`` makes them (there in the
    sigma clock). It costs draws, about 2 (15 - log2(steps)) per step instead of 2 (19 at 50 steps), and holds
    16 state-sized tensors.

    Both correlations give a variance error of second order in the step; the exact one makes the first stage the
    true path's state but still evaluates D there and not at a draw of x0, so samples are under-dispersed at large
    steps, and the sigma clock's stronger correlation happens to offset part of that: on Gaussian data N(0, 0.25 I)
    (VP, log-SNR grid, closed form) the variance ratio is 0.75 vs 0.84 at 10 steps and 0.983 vs 0.994 at 50. On the
    oracle problems of benchmarks/stochastic.py the within-mode variance is 0.76-0.80x the truth ("snr") and
    0.85-0.89x ("sigma") at NFE 20, 0.94-0.95x and 0.97x at NFE 50; the multistep ``dpmpp_2m_sde`` is nearer at the
    same NFE (twice the steps).

    For 0 < eta < 1 this is lam = eta (the "sde" rule of :class:`ExponentialAdams`, as ``dpmpp_2m_sde``);
    k-diffusion's ancestral eta gives each stage its own rate, and agrees at eta = 0 and eta = 1.

    Args:
        eta: the extra rate lam >= 0; 0 is the deterministic DPM-Solver++(2S), 1 (default) the reverse SDE.
        s_noise: scale of the injected noise (k-diffusion's s_noise), >= 0.
        r: the stage's fraction of the step, in (0, 1] (1/2 default).
        brownian: "snr" (the exact correlation above, default), "sigma" (k-diffusion's) or "tree" (the exact
            correlation from one path for the whole run: the same sample at any step count, at more draws).

    Steps take x of shape (B, ...) and keep its dtype and device; inputs are not modified.
    """

    exponential = True

    order = 2
    nfe_per_step = 2
    default_steps = 25
    default_schedule = "log_snr"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, brownian: str = "snr"):
        self.eta = _check_nonneg(eta, "eta")
        self.s_noise = _check_nonneg(s_noise, "s_noise")
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0.0 < r <= 1.0):
            raise ValueError(f"r must be a number in (0, 1]; got {r!r}.")
        if brownian not in BROWNIAN_CLOCKS:
            raise ValueError(f"brownian must be one of {BROWNIAN_CLOCKS}; got {brownian!r}.")
        self.r, self.brownian = float(r), brownian
        self.stochastic = self.eta > 0.0  # s_noise = 0 too: the step still makes room for the noise

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> dict:
        """The stage times u + r h of every step and their (m, s), in one vectorised call (and, with
        brownian="tree", the run's path over the SDE's span of u, from T to its t_min)."""
        cache_grid(ctx, ts)
        grid = ts.tolist()
        us = [ctx.grid_points[t][2] for t in grid]
        mids = [u + self.r * (u2 - u) for u, u2 in zip(us[:-1], us[1:])]
        state = dict(zip(grid[:-1], points_at_u(ctx, mids)))
        if self.brownian == "tree" and self.stochastic:
            state["path"] = brownian_path(ctx, self.eta, ts)
        return state

    def _correlation(self, h1: float, h: float) -> float:
        """rho between the normalised noises of the stage (length h1) and of the full step (length h)."""
        if self.brownian == "sigma":
            return math.sqrt(math.expm1(-h1) / math.expm1(-h))
        a = 2.0 * self.eta
        # (e^{a h1} - 1) / (e^{a h} - 1) written with negative exponents only (no overflow at large steps)
        return math.sqrt(math.exp(a * (h1 - h)) * math.expm1(-a * h1) / math.expm1(-a * h))

    def step(self, ctx: Context, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: dict
             ) -> Tuple[torch.Tensor, dict]:
        m, s, u = point(ctx, t)
        m2, s2, u2 = point(ctx, t_next)
        h = u2 - u
        stage = state.get(float(t)) if state is not None else None
        if stage is None:  # a step off the grid given to start()
            t_mid = time_at_u(ctx, u + self.r * h)
            stage = (t_mid,) + point(ctx, t_mid)[:2]
        t_mid, m1, s1 = stage
        h1 = self.r * h
        lam = self.eta if h > 0.0 else 0.0
        c = 1.0 + lam
        noisy = self.stochastic and h > 0.0
        path = state.get("path") if noisy and state is not None else None
        d0 = ctx.denoise(x, t)
        x1 = torch.mul(x, s1 / s * math.exp(-lam * h1)).add_(d0, alpha=-m1 * math.expm1(-c * h1))
        if path is not None:  # y's noise sigma(v) (Z(v) - e^{-lam (v - u)} Z(u)) over [u, v], in x: s(v) (...)
            z0 = path.at(u, x)
            x1 = x1.add_(path.at(u + h1, x), alpha=self.s_noise * s1).add_(z0, alpha=-self.s_noise * s1
                                                                            * math.exp(-lam * h1))
        elif noisy:
            a = ctx.randn_like(x)
            x1 = x1.add_(a, alpha=self.s_noise * s1 * math.sqrt(-math.expm1(-2.0 * lam * h1)))
        d1 = ctx.denoise(x1, t_mid)
        w = 1.0 / (2.0 * self.r)
        weight = -m2 * math.expm1(-c * h)
        x_next = torch.mul(x, s2 / s * math.exp(-lam * h)).add_(d1, alpha=weight * w)
        if w != 1.0:
            x_next = x_next.add_(d0, alpha=weight * (1.0 - w))
        if path is not None:
            x_next = x_next.add_(path.at(u2, x), alpha=self.s_noise * s2).add_(z0, alpha=-self.s_noise * s2
                                                                                * math.exp(-lam * h))
        elif noisy:
            rho = self._correlation(h1, h)
            scale = self.s_noise * s2 * math.sqrt(-math.expm1(-2.0 * lam * h))
            x_next = x_next.add_(a, alpha=scale * rho).add_(ctx.randn_like(x), alpha=scale * math.sqrt(1.0 - rho * rho))
        return x_next, state

    def __repr__(self) -> str:
        return (f"DPMSolverPPSDE(eta={self.eta}, s_noise={self.s_noise}, r={self.r}, "
                f"brownian={self.brownian!r})")
