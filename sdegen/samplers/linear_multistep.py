"""Linear multistep samplers in sigma: Adams-Bashforth rules on the noise prediction eps.

In y = x / m and sigma = s / m (DEIS's rho) the probability-flow ODE of every linear SDE is exactly

    dy/dsigma = eps = (y - D) / sigma = -s score(x, t)

(Karras et al. 2022, eq. 1 with sigma as the time; Zhang & Chen 2022, section 4). A step from sigma_i to
sigma_{i+1} here is

    y_{i+1} = y_i + sum_j w_ij eps_{i-j},        x_{i+1} = m_{i+1} y_{i+1},

with eps_{i-j} the k most recent model evaluations (one NFE per step) and weights w_ij fixed by the grid alone:
they are computed once per run in ``start()`` and the step only forms the linear combination (Python floats, no
host-device synchronisation). The rules differ in the variable in which eps is interpolated:

- :class:`LMS` ("lms"): a polynomial in sigma, integrated exactly (variable-step Adams-Bashforth; k-diffusion's
  ``sample_lms``);
- :class:`DEIS` ("deis"): a polynomial in t ("tab"), in sigma ("rhoab", the same method as "lms") or in log sigma
  ("logrho", diffusers' DEISMultistepScheduler);
- :class:`IPNDM` ("ipndm"): the fixed Adams-Bashforth coefficients of a uniform grid.

All rules of order 1 are Euler in sigma, which is DDIM (eta = 0). Beyond order 1 none of them is a setting of the
exponential family (:mod:`.exponential`, :class:`ExponentialAdams`): that family interpolates the data prediction
D as a polynomial in u = -log sigma and integrates the linear part exactly; these interpolate eps.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch

from .._validate import check_choice, check_flag, check_int
from .base import Context, StepSampler, cache_grid, point
from .exponential import _moment_weights, exp_poly_weights

# fixed Adams-Bashforth coefficients of orders 1-4 on a uniform grid, newest value first
ADAMS_BASHFORTH = ((1.0,), (3.0 / 2.0, -1.0 / 2.0), (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
                   (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0))
# Gauss-Legendre nodes per step of the quadrature of tAB-DEIS's weights: the integrand is analytic in u = -log sigma
# for the SDEs of this library, and 64 nodes integrate it to float64 round-off on every step of the grids used here
QUADRATURE_NODES = 64
DEIS_VARIANTS = ("tab", "rhoab", "logrho")


def lagrange_integrals(nodes: Sequence[float], a: float, b: float) -> List[float]:
    """int_a^b L_j(r) dr for the Lagrange basis L_j of ``nodes`` (distinct Python floats), j = 0..len(nodes)-1.

    Exact: L_j is a polynomial of degree len(nodes) - 1; it is expanded in powers of r - a and its monomials
    integrated in closed form, int_a^b (r - a)^p dr = (b - a)^{p+1} / (p + 1), in float64 (the variable-step
    Adams-Bashforth weights; k-diffusion's ``linear_multistep_coeff`` evaluates the same integrals with
    scipy.integrate.quad). Returns Python floats.
    """
    nodes = [float(v) for v in nodes]
    if not nodes:
        raise ValueError("nodes must hold at least one node; got none.")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"nodes must be distinct; got {nodes}.")
    h = float(b) - float(a)
    return _moment_weights([v - a for v in nodes], [h ** (p + 1) / (p + 1) for p in range(len(nodes))])


def step_orders(order: int, steps: int, lower_order_final: bool = False) -> List[int]:
    """The order of each step of a multistep rule of order ``order``: the values available (i + 1 at step i);
    with ``lower_order_final`` and fewer than 15 steps also at most the steps left (DPM-Solver's and diffusers'
    rule for few steps)."""
    orders = [min(order, i + 1) for i in range(steps)]
    if lower_order_final and steps < 15:
        orders = [min(k, steps - i) for i, k in enumerate(orders)]
    return orders


class SigmaMultistep(StepSampler):
    """A linear multistep rule y' = y + sum_j w_j eps_j on dy/dsigma = eps (see the module docstring): subclasses
    give the weights of every step of a grid (:meth:`weights`, newest value first); the step is shared.

    One NFE per step; x is (B, ...) of any dtype and device and is never modified; the weights are Python floats.
    """

    exponential = True  # Adams rules on dy/dsigma = eps: their first (order 1) step is DDIM's

    default_steps = 20
    default_schedule = "edm"
    lower_order_final = False

    def __init__(self, order: int, max_order: int):
        self.order = check_int(order, "order", lo=1, hi=max_order)
        self.nfe_per_step = 1
        self._keep = self.order  # model values a step may need

    def weights(self, ctx: Context, times: List[float]) -> List[List[float]]:
        """The weights of every step of the grid ``times`` (decreasing Python floats), newest value first."""
        raise NotImplementedError(f"{type(self).__name__} must implement weights()")

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> dict:
        cache_grid(ctx, ts)
        times = ts.tolist()
        return {"weights": dict(zip(times[:-1], self.weights(ctx, times))), "hist": []}

    def step(self, ctx, x, t, t_next, state):
        m, s, _ = point(ctx, t)
        m2 = point(ctx, t_next)[0]
        weights = state["weights"].get(float(t))
        if weights is None:
            raise ValueError(f"t={float(t)!r} is not a time of the grid given to start(); a multistep sampler steps "
                             "along the grid its weights were computed for.")
        hist = (state["hist"] + [(s, ctx.score(x, t))])[-self._keep:]  # (s_j, score_j), newest last
        # x' = m' (y + sum_j w_j eps_j) with y = x/m and eps_j = -s_j score_j; model outputs are not modified
        x_next = torch.mul(x, m2 / m)
        for w, (s_j, score_j) in zip(weights, reversed(hist)):
            x_next = x_next.add_(score_j, alpha=-m2 * w * s_j)
        state["hist"] = hist
        return x_next, state

    @staticmethod
    def sigmas(ctx: Context, times: List[float]) -> List[float]:
        """sigma = s/m at the grid times (after :func:`cache_grid`)."""
        return [ctx.grid_points[t][1] / ctx.grid_points[t][0] for t in times]

    def _orders(self, times: List[float]) -> List[int]:
        return step_orders(self.order, len(times) - 1, self.lower_order_final)

    def _sigma_adams(self, ctx: Context, times: List[float]) -> List[List[float]]:
        """Variable-step Adams-Bashforth in sigma: the Lagrange basis through the last k sigmas over the step."""
        sig = self.sigmas(ctx, times)
        return [lagrange_integrals(sig[i - k + 1:i + 1][::-1], sig[i], sig[i + 1])
                for i, k in enumerate(self._orders(times))]


class LMS(SigmaMultistep):
    """Linear multistep in sigma (k-diffusion's ``sample_lms``): variable-step Adams-Bashforth of order ``order``
    (1-4) on dy/dsigma = eps in y = x/m,

        y_{i+1} = y_i + sum_{j<k} eps_{i-j} int_{sigma_i}^{sigma_{i+1}} L_j(sigma) dsigma,

    L_j the Lagrange basis through sigma_i, ..., sigma_{i-k+1}, k = min(order, i + 1) (lower orders while the history
    fills). The integrals are exact (:func:`lagrange_integrals`; k-diffusion calls scipy's quad at every step).
    Global order ``order``; one NFE per step. This is DEIS's rhoAB (Zhang & Chen 2022, section 4) and the
    variable-step iPNDM ("iPNDM_v"); order 1 is Euler in sigma, i.e. DDIM with eta = 0. Not a setting of
    :class:`ExponentialAdams` beyond order 1 (that family interpolates D in u = -log sigma). Default grid:
    Karras et al.'s sigma schedule ("edm"), the one k-diffusion pairs it with.
    """

    def __init__(self, order: int = 4):
        super().__init__(order, 4)

    def weights(self, ctx, times):
        return self._sigma_adams(ctx, times)

    def __repr__(self) -> str:
        return f"LMS(order={self.order})"


class DEIS(SigmaMultistep):
    """DEIS, the diffusion exponential integrator sampler (Zhang & Chen 2022, "Fast Sampling of Diffusion Models
    with Exponential Integrator", section 4): Adams-Bashforth on the probability-flow ODE with
    the linear part integrated exactly. In y = x/m and rho = sigma = s/m that linear part is gone and the ODE is
    exactly dy/drho = eps, so every variant is y_{i+1} = y_i + sum_j w_ij eps_{i-j} with

        w_ij = int_{rho_i}^{rho_{i+1}} L_j(v(rho)) drho,

    L_j the Lagrange basis through the last k = min(order, i + 1) nodes in the extrapolation variable v:

    - ``variant="tab"`` (tAB-DEIS): v = t, the SDE's own time; the weights (with drho = -e^{-u} du,
      u = -log rho) are integrated by Gauss-Legendre quadrature in u with 64 nodes per step, at start(). Where t
      is nearly flat in sigma near T (a DDPM cosine table, sigma(T) = 2e4; FlowSDE near T = 1) its Lagrange weights
      reach thousands with alternating signs, and float32 round-off grows 10-50x per step;
    - ``"rhoab"`` (rhoAB-DEIS): v = rho; the Adams method in rho, the same method as :class:`LMS` of the same order
      (exact closed-form weights);
    - ``"logrho"`` (the default): v = log rho = -u; diffusers' DEISMultistepScheduler (solver_type "logrho", whose ``ind_fn``
      integrates this basis over rho in closed form). Here w_ij = -rho_i int_0^h e^{-(h - q)} L_j dq in
      q = u_{i+1} - u (:func:`exp_poly_weights`): the exponential Adams rule in u on the noise prediction, whose
      data-prediction counterpart is :class:`ExponentialAdams` (DPM-Solver++ multistep). With
      ``lower_order_final=True`` it reproduces diffusers' scheduler step for step.

    The Lagrange basis is invariant under affine changes of the variable, so "tab" is "rhoab" under EDM's SDE
    (t = sigma) and "logrho" under VE with s = sigma_min r^t (t affine in log sigma); under VP the three differ.
    Order 1 of every variant is Euler in rho, DDIM (eta = 0). Global order ``order`` (1-3); one NFE per step.
    ``lower_order_final``: in runs of fewer than 15 steps the last steps use at most the steps left (diffusers'
    default, off here as in the paper). Default grid: Karras et al.'s sigma schedule ("edm").
    """

    def __init__(self, order: int = 3, variant: str = "logrho", lower_order_final: bool = False):
        super().__init__(order, 3)
        self.variant = check_choice(variant, "variant", DEIS_VARIANTS)
        self.lower_order_final = check_flag(lower_order_final, "lower_order_final")

    def weights(self, ctx, times):
        if self.variant == "rhoab":
            return self._sigma_adams(ctx, times)
        if self.variant == "logrho":
            return self._log_rho_weights(ctx, times)
        return self._time_weights(ctx, times)

    def _log_rho_weights(self, ctx, times):
        us = [ctx.grid_points[t][2] for t in times]
        out = []
        for i, k in enumerate(self._orders(times)):
            h, rho = us[i + 1] - us[i], math.exp(-us[i])
            q = [us[i + 1] - us[i - j] for j in range(k)]  # nodes, newest first, measured back from u_{i+1}
            out.append([-rho * w for w in exp_poly_weights(q, h)])
        return out

    def _time_weights(self, ctx, times):
        z, gw = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(QUADRATURE_NODES))
        us = torch.tensor([ctx.grid_points[t][2] for t in times], dtype=torch.float64)
        mid, half = 0.5 * (us[1:] + us[:-1]), 0.5 * (us[1:] - us[:-1])
        uq = mid[:, None] + half[:, None] * z  # (steps, nodes)
        tq = ctx.sde.t_from_log_snr(2.0 * uq.flatten()).to(torch.float64).reshape(uq.shape).numpy()
        dens = (-torch.exp(-uq) * half[:, None] * gw).numpy()  # drho = -e^{-u} du, times the quadrature weights
        out = []
        for i, k in enumerate(self._orders(times)):
            nodes = times[i - k + 1:i + 1][::-1]
            row = []
            for j, tj in enumerate(nodes):
                basis = np.ones(QUADRATURE_NODES)
                for l, tl in enumerate(nodes):
                    if l != j:
                        basis *= (tq[i] - tl) / (tj - tl)
                row.append(float((dens[i] * basis).sum()))
            out.append(row)
        return out

    def __repr__(self) -> str:
        return f"DEIS(order={self.order}, variant={self.variant!r}, lower_order_final={self.lower_order_final})"


class IPNDM(SigmaMultistep):
    """iPNDM (Zhang & Chen 2022, appendix; the improved pseudo-numerical method of Liu et al. 2022): the fixed
    Adams-Bashforth coefficients of a uniform grid applied to eps in sigma,

        y_{i+1} = y_i + (sigma_{i+1} - sigma_i) sum_j c_j eps_{i-j},

    c = (1), (3/2, -1/2), (23/12, -16/12, 5/12), (55/24, -59/24, 37/24, -9/24) for k = min(order, i + 1) (lower
    orders while the history fills). On a grid uniform in sigma this is :class:`LMS` of the same order (the
    Lagrange integrals of equal steps are these coefficients). On any other grid the fixed coefficients are
    consistent but lose the higher orders: expanding sigma(i) around a step, the error of the first neglected
    step-size variation cancels (the rules integrate linear functions exactly) and the next does not, so the
    global order is 2 for ``order`` >= 2 on smooth non-uniform grids such as the default "edm" (measured:
    tests/test_linear_multistep.py). The variable-step iPNDM ("iPNDM_v", Lagrange-based coefficients) is
    :class:`LMS`. Order 1 is Euler in sigma (DDIM); not a setting of :class:`ExponentialAdams` beyond it.
    One NFE per step; ``self.order`` is the global order on non-uniform grids, min(order, 2).
    """

    def __init__(self, order: int = 4):
        super().__init__(order, 4)
        self.rule_order = self.order
        self.order = min(self.rule_order, 2)

    def _orders(self, times):
        return step_orders(self.rule_order, len(times) - 1)

    def weights(self, ctx, times):
        sig = self.sigmas(ctx, times)
        return [[(sig[i + 1] - sig[i]) * c for c in ADAMS_BASHFORTH[k - 1]] for i, k in enumerate(self._orders(times))]

    def __repr__(self) -> str:
        return f"IPNDM(order={self.rule_order})"
