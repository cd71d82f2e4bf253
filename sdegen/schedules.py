"""Time-step schedules: the grid T = t_0 > t_1 > ... > t_N = t_min a fixed-step sampler walks.

Grids are float64 CPU tensors (a float32 linspace is too coarse near t_min, and CPU scalars
multiply device tensors without a host-device sync).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .sde import SDE

SCHEDULES = ("uniform", "log_snr", "edm", "quadratic")


def time_grid(sde: SDE, steps: int, schedule: Union[str, torch.Tensor] = "uniform", *,
              t_min: Optional[float] = None, t_max: Optional[float] = None, rho: float = 7.0) -> torch.Tensor:
    """Decreasing grid of ``steps + 1`` times from t_max (default T) to t_min (default sde.t_min).

    schedule:
      - "uniform": equal steps in t (Song et al. 2021);
      - "log_snr": equal steps in lambda(t) = log(m^2/s^2) (Lu et al. 2022, DPM-Solver section 3.3);
      - "edm": sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
        sigma = s/m (Karras et al. 2022, eq. 5), rho = 7 by default;
      - "quadratic": equal steps in sqrt(t) (DDIM's quadratic spacing, Song et al. 2021a);
      - a 1-D tensor of explicit times: validated (strictly decreasing, inside [0, T]) and returned as float64.
    """
    if isinstance(schedule, torch.Tensor):
        return check_grid(sde, schedule)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
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
    elif schedule == "quadratic":
        r = ends.sqrt()
        ts = (r[0] + u * (r[1] - r[0])) ** 2
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a tensor of times; got {schedule!r}.")
    ts[0], ts[-1] = t_max, t_min  # exact end points despite round-off in the inverse maps
    return ts


def check_grid(sde: SDE, ts: torch.Tensor) -> torch.Tensor:
    """Validate an explicit time grid: 1-D, at least two times, strictly decreasing, inside (0, T]."""
    ts = torch.as_tensor(ts).detach().to(device="cpu", dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"an explicit time grid must be 1-D with at least 2 times; got shape {tuple(ts.shape)}.")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("an explicit time grid must be strictly decreasing (from near T down to t_min).")
    if not (0.0 < float(ts[-1]) and float(ts[0]) <= sde.T):
        raise ValueError(f"grid times must lie in (0, T={sde.T:g}]; got [{float(ts[-1]):g}, {float(ts[0]):g}].")
    return ts
