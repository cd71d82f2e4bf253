"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", algorithm 1): ODE steps
on the main grid, with K returns to a higher noise level by the exact forward transition and ODE solves back down.

Variables as in :mod:`.karras`: y = x / m, sigma = s / m, where the forward process from sigma_a to sigma_b > sigma_a
is y_b = y_a + sqrt(sigma_b^2 - sigma_a^2) z for every linear SDE.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .._validate import check_int, check_number
from ..schedules import time_grid
from .base import Context, StepSampler, point
from .karras import DPM2, DPMPP2SAncestral, Heun


SOLVERS = ("dpmpp_2s", "heun", "dpm_2")


class Restart(StepSampler):
    """Restart sampling (Xu et al. 2023, algorithm 1): a single-step second-order ODE solver on the main grid, with
    K restarts of one interval.

    The main run takes ODE steps of the probability flow on the grid. At the grid point t_j whose sigma_j is
    nearest (in log sigma) to ``restart_sigmas[0]``, it restarts ``restarts`` (K) times:

        y <- y + s_noise sqrt(sigma_max^2 - sigma_j^2) z          (the forward process from sigma_j to sigma_max,
                                                                    one exact draw per example),
        y <- ODE solve from sigma_max back to sigma_j in ``restart_steps`` steps,

    with sigma_max = ``restart_sigmas[1]`` (at most sigma(T)), then continues on the main grid. The forward draw
    contracts the error accumulated before t_j (the paper's theorem 2) at the cost of re-solving the interval; the
    ODE keeps the discretisation error small (its theorem 1). The errors it contracts are those of the model above
    the interval and of the coarse steps there; with an exact score and a fixed NFE, the NFE spent on re-solves
    is missed by the main grid, and the plain ODE solver is the more accurate (benchmarks/stochastic.py).

    ``solver`` is the ODE rule, on the main grid and in the re-solves (each re-solve on the solver's default
    grid over [sigma_j, sigma_max]):

    - "dpmpp_2s" (default): DPM-Solver++(2S), the exponential integrator of dy/du = D - y, u = -log sigma, with
      D at the midpoint (:class:`DPMPP2SAncestral` at eta = 0), log-SNR grids. Its weights on D are at most 1 at
      any step size, while a Runge-Kutta step in sigma multiplies the error of eps = (y - D) / sigma by the step
      in sigma: a re-solve spans sigma_max / sigma_j ~ 20 in a few steps, where the sigma-space rules overshoot.
    - "heun": EDM's Heun rule (Karras et al. 2022, algorithm 2; the paper's choice, with ``final_step`` for the
      main grid's last step, see :class:`Heun`), EDM's rho = 7 grids;
    - "dpm_2": the midpoint rule in log sigma (:class:`DPM2`), EDM's rho = 7 grids.

    The interval is given as noise-to-signal levels sigma = s/m, the same quantity for every SDE (VP, VE, sub-VP,
    EDM, flow), so one default applies to all of them. The default (0.1, 2.0) is the interval of the paper
    authors' k-diffusion sampler for latent-diffusion models, whose data have unit scale as the VP family
    assumes (for pixel data in [-1, 1], sigma_data = 0.5, the paper's CIFAR-10 runs used (0.06, 0.30)).
    ``restart_steps=None`` re-solves the interval at about the main grid's resolution: round(steps / 4) steps (at
    least one), the share of EDM's rho = 7 grid over sigma in [0.002, 80] that lies in [0.1, 2] (0.26). K = 1 is
    the authors' choice below 36 steps.

    NFE = the solver's NFE on the main grid (2 steps; 2 steps - 1 for "heun" with final_step="euler")
    + 2 K restart_steps. Deterministic order 2 between restarts; stochastic (weak order 1) when K > 0 and
    s_noise > 0.

    Args:
        restarts: K, an int >= 0 (0 is the plain ODE solver).
        restart_steps: ODE steps of each re-solve, an int >= 1, or None (round(steps / 4), at least 1).
        restart_sigmas: (sigma_min, sigma_max) of the restart interval, 0 < sigma_min < sigma_max.
        s_noise: scale of the forward draw (the paper's S_noise), a finite number >= 0.
        solver: "dpmpp_2s", "heun" or "dpm_2".
        final_step: "euler" (default) or "heun", the rule of the main grid's last step with solver="heun" (it
            does not apply to the other solvers, and passing it with them raises ValueError).

    x is (B, ...) of any dtype and device and is not modified; noise only through the per-example stream.
    """

    order = 2
    nfe_per_step = 2
    default_steps = 18

    def __init__(self, restarts: int = 1, restart_steps: Optional[int] = None,
                 restart_sigmas: Sequence[float] = (0.1, 2.0), s_noise: float = 1.0, solver: str = "dpmpp_2s",
                 final_step: Optional[str] = None):
        self.restarts = check_int(restarts, "restarts", lo=0)
        self.restart_steps = check_int(restart_steps, "restart_steps", lo=1, none_ok=True)
        if not (isinstance(restart_sigmas, (tuple, list)) and len(restart_sigmas) == 2):
            raise ValueError(f"restart_sigmas must be a pair (sigma_min, sigma_max) with 0 < sigma_min < sigma_max; "
                             f"got {restart_sigmas!r}.")
        lo = check_number(restart_sigmas[0], "restart_sigmas[0]", lo=0.0, lo_open=True)
        hi = check_number(restart_sigmas[1], "restart_sigmas[1]", lo=lo, lo_open=True,
                          hint="restart_sigmas must be (sigma_min, sigma_max) with sigma_min < sigma_max")
        self.restart_sigmas = (lo, hi)
        self.s_noise = check_number(s_noise, "s_noise", lo=0.0)
        if not (isinstance(solver, str) and solver in SOLVERS):
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        self.exponential = solver != "heun"  # its ODE steps: DPM-Solver++(2S) or DPM-Solver-2, or Heun in sigma
        if final_step is not None and solver != "heun":
            raise ValueError(f"final_step applies to solver='heun' (the other solvers' last step is their own); got "
                             f"final_step={final_step!r} with solver={solver!r}: leave final_step unset.")
        final_step = "euler" if final_step is None else final_step
        if not (isinstance(final_step, str) and final_step in Heun.final_steps):
            raise ValueError(f"final_step must be one of {Heun.final_steps}; got {final_step!r}.")
        self.main = {"heun": lambda: Heun(final_step=final_step), "dpm_2": DPM2,
                     "dpmpp_2s": lambda: DPMPP2SAncestral(eta=0.0)}[solver]()
        self.inner = Heun(final_step="heun") if solver == "heun" else self.main  # a re-solve ends at t_j, not t_min
        self.solver, self.final_step = solver, final_step
        self.default_schedule = self.main.default_schedule
        self.stochastic = self.restarts > 0  # s_noise = 0 too: a restart still jumps up in time

    def _n_restart(self, steps: int) -> int:
        return self.restart_steps if self.restart_steps is not None else max(1, round(steps / 4))

    def total_nfe(self, steps: int) -> int:
        return self.main.total_nfe(steps) + self.restarts * self.inner.total_nfe(self._n_restart(steps))

    def start(self, ctx: Context, x: torch.Tensor, ts: torch.Tensor) -> dict:
        """The solver's state on the main grid, the restart point t_j, the re-solve's grid, its solver state and
        the forward draw's std."""
        main = self.main.start(ctx, x, ts)
        if self.restarts == 0:  # the plain solver: no restart interval to place
            return {"main": main, "t_j": None}
        grid = ts.tolist()
        sigmas = [ctx.grid_points[t][1] / ctx.grid_points[t][0] for t in grid]
        lo, hi = self.restart_sigmas
        m_top, s_top, _ = point(ctx, torch.tensor(ctx.sde.T, dtype=torch.float64))
        hi = min(hi, s_top / m_top)
        below = [i for i in range(1, len(grid)) if sigmas[i] < hi]  # restart points under the interval's top
        if not below and sigmas[-1] >= hi:  # the whole grid stays above the interval: no step count helps
            raise ValueError(f"restart_sigmas: the grid ends at sigma(t_min) = {sigmas[-1]:.4g}, above the restart "
                             f"interval's top sigma = {hi:.4g}; raise restart_sigmas[1] above it, lower t_min, or "
                             "pass restarts=0.")
        if not below:
            raise ValueError(f"steps: no time of this {len(grid) - 1}-step grid after T lies below the restart "
                             f"interval's top sigma = {hi:.4g}; give more steps.")
        j = min(below, key=lambda i: abs(math.log(sigmas[i] / lo)))
        t_hi = min(float(ctx.sde.t_from_sigma(torch.tensor(hi, dtype=torch.float64))), ctx.sde.T)
        sub = time_grid(ctx.sde, self._n_restart(len(grid) - 1), self.inner.default_schedule, t_min=grid[j],
                        t_max=t_hi)
        inner = self.inner.start(ctx, x, sub)
        m_hi, s_hi, _ = ctx.grid_points[float(sub[0])]
        std = self.s_noise * math.sqrt(max((s_hi / m_hi) ** 2 - sigmas[j] ** 2, 0.0))
        return {"main": main, "t_j": grid[j], "sub": sub.unbind(), "inner": inner, "std": std, "m_hi": m_hi}

    def step(self, ctx: Context, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: dict
             ) -> Tuple[torch.Tensor, dict]:
        x, state["main"] = self.main.step(ctx, x, t, t_next, state["main"])
        if float(t_next) != state["t_j"]:
            return x, state
        m_j = point(ctx, t_next)[0]
        sub = state["sub"]
        for _ in range(self.restarts):
            y = x / m_j
            if self.stochastic:
                y = y.add_(ctx.randn_like(x), alpha=state["std"])
            x = y.mul_(state["m_hi"])
            for a, b in zip(sub[:-1], sub[1:]):
                x, state["inner"] = self.inner.step(ctx, x, a, b, state["inner"])
        return x, state

    def __repr__(self) -> str:
        return (f"Restart(restarts={self.restarts}, restart_steps={self.restart_steps}, "
                f"restart_sigmas={self.restart_sigmas}, s_noise={self.s_noise}, solver={self.solver!r}, "
                f"final_step={self.final_step!r})")
