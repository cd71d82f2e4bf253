"""Time-step schedules: the grid T = t_0 > t_1 > ... > t_N = t_min a fixed-step sampler walks.

Grids are float64 CPU tensors (a float32 linspace is too coarse near t_min, and CPU scalars
multiply device tensors without a host-device sync).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .sde import SDE

SCHEDULES = ("uniform", "log_snr", "edm", "quadratic", "few_step")


def time_grid(sde: SDE, steps: int, schedule: Union[str, torch.Tensor] = "uniform", *,
              t_min: Optional[float] = None, t_max: Optional[float] = None, rho: float = 7.0) -> torch.Tensor:
    """Decreasing grid of ``steps + 1`` times from t_max (default T) to t_min (default sde.t_min).

    schedule:
      - "uniform": equal steps in t (Song et al. 2021);
      - "log_snr": equal steps in lambda(t) = log(m^2/s^2) (Lu et al. 2022, DPM-Solver section 3.3);
      - "edm": sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
        sigma = s/m (Karras et al. 2022, eq. 5), rho = 7 by default;
      - "quadratic": equal steps in sqrt(t) (DDIM's quadratic spacing, Song et al. 2021a);
      - "few_step": tuned for 5-50 steps of exponential integrators (see :func:`few_step_log_snr`);
      - a 1-D tensor of explicit times: validated (strictly decreasing, inside [0, T]) and returned as float64.
    """
    if isinstance(schedule, torch.Tensor):
        if t_min is not None or t_max is not None:
            raise ValueError("t_min / t_max apply to named schedules; an explicit grid of times runs from its first "
                             "to its last entry: leave t_min and t_max unset.")
        return check_grid(sde, schedule)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0; got {rho!r}.")
    t_min = sde.t_min if t_min is None else float(t_min)
    t_max = sde.T if t_max is None else float(t_max)
    if not (0.0 < t_min < t_max <= sde.T):
        raise ValueError(f"need 0 < t_min < t_max <= T={sde.T:g}; got t_min={t_min!r}, t_max={t_max!r}.")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_max, t_min], dtype=torch.float64)
    if schedule == "uniform":
        ts = t_max + u * (t_min - t_max)
    elif schedule == "log_snr":
        lam = sde.log_snr(ends)
        ts = sde.t_from_log_snr(lam[0] + u * (lam[1] - lam[0]))
    elif schedule == "edm":
        sig = sde.sigma(ends) ** (1.0 / rho)
        ts = sde.t_from_sigma((sig[0] + u * (sig[1] - sig[0])) ** rho)
    elif schedule == "few_step":
        ts = sde.t_from_log_snr(few_step_log_snr(sde.log_snr(ends), steps))
    elif schedule == "quadratic":
        r = ends.sqrt()
        ts = (r[0] + u * (r[1] - r[0])) ** 2
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a tensor of times; got {schedule!r}.")
    ts[0], ts[-1] = t_max, t_min  # exact end points despite round-off in the inverse maps
    return ts


def few_step_log_snr(lam_ends: torch.Tensor, steps: int, sigma_jump: float = 10.0, power: float = 0.8,
                     jump_share: float = 0.05) -> torch.Tensor:
    """Log-SNR grid of the "few_step" schedule (found by the sweeps of benchmarks/solver_steps.py).

    max(1, round(jump_share * steps)) equal log-SNR steps from the start down to sigma = s/m = ``sigma_jump``
    (for data of unit scale the denoiser is nearly constant above it, and exponential integrators are exact
    for a constant denoiser: one step suffices at small step counts, and the share keeps the grid convergent),
    then points lambda_a + f_i^power (lambda_end - lambda_a), f_i uniform in [0, 1]: power < 1 makes the steps
    shrink towards t_min, where the narrow modes are resolved. Without room for the jump it is the warped grid.
    """
    lam_jump = -2.0 * math.log(sigma_jump)
    n_jump = max(1, round(jump_share * steps))
    if not (steps - n_jump >= 2 and float(lam_ends[0]) < lam_jump < float(lam_ends[1])):
        return lam_ends[0] + torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** power * (lam_ends[1] - lam_ends[0])
    head = torch.linspace(float(lam_ends[0]), lam_jump, n_jump + 1, dtype=torch.float64)
    f = torch.linspace(0.0, 1.0, steps - n_jump + 1, dtype=torch.float64) ** power
    return torch.cat([head[:-1], lam_jump + f * (lam_ends[1] - lam_jump)])


def refine_grid(sde: SDE, ts: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Split every step of the grid ``ts`` into ``factor`` equal steps in log-SNR: a grid of
    factor * (len(ts) - 1) steps through all of the old times (a warm start for fitting a finer grid with
    :func:`sdegen.optimize_schedule`, coarse to fine)."""
    ts = check_grid(sde, ts)
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"factor must be an int >= 1; got {factor!r}.")
    lam = sde.log_snr(ts)
    frac = torch.arange(factor, dtype=torch.float64) / factor
    fine = (lam[:-1, None] + frac * (lam[1:] - lam[:-1])[:, None]).reshape(-1)
    out = sde.t_from_log_snr(fine)
    out[::factor] = ts[:-1]  # the old times exactly, despite round-off in the inverse map
    return torch.cat([out, ts[-1:]])


def check_grid(sde: SDE, ts: torch.Tensor) -> torch.Tensor:
    """Validate an explicit time grid: 1-D, at least two times, strictly decreasing, inside (0, T]."""
    ts = torch.as_tensor(ts).detach().to(device="cpu", dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"an explicit time grid must be 1-D with at least 2 times; got shape {tuple(ts.shape)}.")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"an explicit time grid must hold finite times; got {ts.tolist()[:8]}.")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("an explicit time grid must be strictly decreasing (from near T down to t_min).")
    if not (0.0 < float(ts[-1]) and float(ts[0]) <= sde.T):
        raise ValueError(f"grid times must lie in (0, T={sde.T:g}]; got [{float(ts[-1]):g}, {float(ts[0]):g}].")
    return ts
