"""Time-step schedules: the grid T = t_0 > t_1 > ... > t_N = t_min a fixed-step sampler walks.

Grids are float64 CPU tensors (a float32 linspace is too coarse near t_min, and CPU scalars
multiply device tensors without a host-device sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ._validate import check_int, check_number
from .sde import SDE

SCHEDULES = ("uniform", "log_snr", "edm", "quadratic", "few_step")
PILOT = "pilot"  # the model-dependent schedule of :func:`pilot_grid`, resolved by :func:`sdegen.sample`


def time_grid(sde: SDE, steps: int, schedule: Union[str, torch.Tensor] = "uniform", *,
              t_min: Optional[float] = None, t_max: Optional[float] = None, rho: float = 7.0) -> torch.Tensor:
    """Decreasing grid of ``steps + 1`` times from t_max (default T) to t_min (default sde.t_min).

    schedule:
      - "uniform": equal steps in t (Song et al. 2021);
      - "log_snr": equal steps in lambda(t) = log(m^2/s^2) (Lu et al. 2022, DPM-Solver section 3.3);
      - "edm": sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
        sigma = s/m (Karras et al. 2022, eq. 5), rho = 7 by default;
      - "quadratic": equal steps in sqrt(t) (DDIM's quadratic spacing, Song et al. 2021a);
      - "few_step": a log-SNR grid with one jump to sigma = 10, tuned on unit-scale data (mixtures whose means
        are a few units apart) for 5-50 steps of exponential integrators; it does not carry over to data of other
        scales (see :func:`few_step_log_snr`), where "log_snr" or the model-dependent "pilot" grid of
        :func:`pilot_grid` (``sdegen.sample(..., schedule="pilot")``) are the choices;
      - a 1-D tensor of explicit times: validated (strictly decreasing, inside [0, T]) and returned as float64.
    """
    if isinstance(schedule, torch.Tensor):
        if t_min is not None or t_max is not None:
            raise ValueError("t_min / t_max apply to named schedules; an explicit grid of times runs from its first "
                             "to its last entry: leave t_min and t_max unset.")
        return check_grid(sde, schedule)
    check_sde(sde)
    check_int(steps, "steps", lo=1)
    check_number(rho, "rho", lo=0.0, lo_open=True)
    t_min = sde.t_min if t_min is None else check_number(t_min, "t_min", lo=0.0, hi=sde.T, lo_open=True)
    t_max = sde.T if t_max is None else check_number(t_max, "t_max", lo=0.0, hi=sde.T, lo_open=True)
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
    elif schedule == PILOT:
        raise ValueError("the 'pilot' schedule depends on the model: pass schedule='pilot' to sdegen.sample, or "
                         "compute it with sdegen.schedules.pilot_grid(sde, model, steps, shape).times.")
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, {PILOT!r} (with a model) or a tensor of times; "
                         f"got {schedule!r}.")
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

    The constants were tuned on unit-scale data (the ring and a 16-D mixture with means a few units apart). On data
    of larger scale the denoiser still changes above sigma = 10, and the jump sends trajectories into the wrong
    component: on a 64-D mixture with means 29-38 apart, exp_pc-2 at NFE 20 ends 3.1% of the points in another
    component against 0.3% on the log-SNR grid and 0.15% on the pilot grid (benchmarks/results/solver_steps_quick.md).
    It is kept for those problems; the scale-free choices are "log_snr" and the model's own "pilot" grid
    (:func:`pilot_grid`).
    """
    lam_jump = -2.0 * math.log(sigma_jump)
    n_jump = max(1, round(jump_share * steps))
    if not (steps - n_jump >= 2 and float(lam_ends[0]) < lam_jump < float(lam_ends[1])):
        return lam_ends[0] + torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** power * (lam_ends[1] - lam_ends[0])
    head = torch.linspace(float(lam_ends[0]), lam_jump, n_jump + 1, dtype=torch.float64)
    f = torch.linspace(0.0, 1.0, steps - n_jump + 1, dtype=torch.float64) ** power
    return torch.cat([head[:-1], lam_jump + f * (lam_ends[1] - lam_jump)])


@dataclass
class PilotGrid:
    """A grid from :func:`pilot_grid`: ``times`` (steps + 1 float64 times from t_max to t_min), the pilot's cost
    ``nfe`` (its batched model calls, each on ``batch`` examples) and its accepted times ``pilot_times``."""

    times: torch.Tensor
    nfe: int
    batch: int
    pilot_times: torch.Tensor


PILOT_ORDER = 3  # the pilot's predictor order: its corrected steps have local error O(h^4)


def pilot_grid(sde: SDE, model: Any, steps: int, shape: Sequence[int], *, order: int = 3, batch: int = 64,
               rtol: float = 1e-3, atol: float = 1e-3, seed: int = 0, t_min: Optional[float] = None,
               t_max: Optional[float] = None, dtype: torch.dtype = torch.float64, device=None) -> PilotGrid:
    """A grid of ``steps`` steps for a fixed-step sampler of global ``order``, laid out as the adaptive solver lays
    out its own steps on this model: no constant of the data or of the SDE enters.

    A pilot run of the adaptive exponential multistep solver (``method="adaptive"``, order 3, error control as in
    :class:`sdegen.samplers.AdaptiveMultistep`) takes ``batch`` draws of shape (batch, *shape) from the prior
    (seeded by ``seed``) from t_max to t_min at tolerances ``rtol``/``atol``. Its controller keeps the local error
    of each accepted step u_k -> u_k + h_k (u = log(m/s)) at the tolerance, C(u) h^{p+1} = tol with p = 3, so
    1/h(u) = (C(u)/tol)^{1/(p+1)} is a step density. A fixed-step method of order q with N steps has the smallest
    global error when its local errors C h^{q+1} are equal (equidistribution, Hairer, Norsett & Wanner, "Solving
    ODEs I", section II.4), i.e. at density proportional to C^{1/(q+1)} = (1/h)^{(p+1)/(q+1)}. The density is
    taken constant on each pilot step, integrated in u, and its integral divided into ``steps`` equal parts.

    Cost: the pilot's model calls (``PilotGrid.nfe``, typically 30-60 at the default tolerance), each on ``batch``
    examples; :func:`sdegen.sample` with ``schedule="pilot"`` reports them as ``SampleInfo.pilot_nfe`` and runs
    the pilot on every call: to reuse a grid, compute it once and pass ``PilotGrid.times`` as the schedule.
    """
    from .sampling import sample  # the driver imports this module

    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    if not (isinstance(order, int) and not isinstance(order, bool) and order >= 1):
        raise ValueError(f"order must be an int >= 1 (the global order of the sampler the grid is for); got {order!r}.")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise ValueError(f"batch must be an int >= 1; got {batch!r}.")
    ends = time_grid(sde, 1, "uniform", t_min=t_min, t_max=t_max)
    x = sde.prior_sample((batch,) + tuple(shape), seed=seed, dtype=dtype, device=device)
    _, info = sample(sde, model, x, method="adaptive", order=PILOT_ORDER, rtol=rtol, atol=atol, schedule=ends,
                     return_info=True)
    accepted = torch.tensor(info.sampler.stats["times"], dtype=torch.float64)
    u = 0.5 * sde.log_snr(accepted)
    sizes = u[1:] - u[:-1]
    if len(sizes) > 1:  # the last step is cut to land on t_min, not chosen by the controller: its density is the
        sizes[-1] = torch.maximum(sizes[-1], sizes[-2])  # previous step's (a cut step would count as a whole one)
    times = grid_from_step_sizes(sde, accepted, steps, power=(PILOT_ORDER + 1) / (order + 1), sizes=sizes)
    return PilotGrid(times=times, nfe=info.nfe, batch=batch, pilot_times=accepted)


def grid_from_step_sizes(sde: SDE, ts: torch.Tensor, steps: int, power: float = 1.0,
                         sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``steps`` steps placed with density (1/h)^power in u = log(m/s), h the local step sizes of the grid ``ts``
    (constant on each of its steps; ``sizes`` (len(ts) - 1 positive values) replaces them where a step's length is
    not the local step size): the points where the integral of the density reaches k/steps of its total.
    power = 1 without ``sizes`` re-spaces ``ts`` itself to ``steps`` steps (piecewise linearly in u)."""
    ts = check_grid(sde, ts, "ts")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0; got {power!r}.")
    u = 0.5 * sde.log_snr(ts)
    h = u[1:] - u[:-1]
    if sizes is None:
        sizes = h
    elif not (isinstance(sizes, torch.Tensor) and sizes.shape == h.shape and bool((sizes > 0).all())):
        raise ValueError(f"sizes must be a tensor of {len(h)} positive step sizes; got {sizes!r}.")
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(h * sizes.to(h).pow(-power), 0)])
    target = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) * mass[-1]
    k = torch.searchsorted(mass, target, right=True).clamp(1, len(mass) - 1)
    frac = ((target - mass[k - 1]) / (mass[k] - mass[k - 1])).clamp(0.0, 1.0)
    out = sde.t_from_log_snr(2.0 * (u[k - 1] + frac * h[k - 1]))
    out[0], out[-1] = ts[0], ts[-1]  # exact end points despite round-off in the inverse map
    return out


def resolve_grid(sde: SDE, steps: int, schedule: Union[str, torch.Tensor], *, t_min: Optional[float], model: Any,
                 x: torch.Tensor, order: int) -> Tuple[torch.Tensor, int]:
    """The driver's grid: (times, model calls spent finding them). "pilot" runs :func:`pilot_grid` for a sampler of
    ``order`` on draws shaped like ``x``; every other schedule is :func:`time_grid`'s and costs no call."""
    if isinstance(schedule, str) and schedule == PILOT:
        grid = pilot_grid(sde, model, steps, tuple(x.shape[1:]), order=order, t_min=t_min, dtype=x.dtype,
                          device=x.device)
        return grid.times, grid.nfe
    return time_grid(sde, steps, schedule, t_min=t_min), 0


def refine_grid(sde: SDE, ts: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Split every step of the grid ``ts`` into ``factor`` equal steps in log-SNR: a grid of
    factor * (len(ts) - 1) steps through all of the old times (a warm start for fitting a finer grid with
    :func:`sdegen.optimize_schedule`, coarse to fine)."""
    ts = check_grid(sde, ts, "ts")
    check_int(factor, "factor", lo=1)
    lam = sde.log_snr(ts)
    frac = torch.arange(factor, dtype=torch.float64) / factor
    fine = (lam[:-1, None] + frac * (lam[1:] - lam[:-1])[:, None]).reshape(-1)
    out = sde.t_from_log_snr(fine)
    out[::factor] = ts[:-1]  # the old times exactly, despite round-off in the inverse map
    return torch.cat([out, ts[-1:]])


def check_grid(sde: SDE, ts: torch.Tensor, name: str = "schedule") -> torch.Tensor:
    """Validate an explicit time grid (the argument ``name``): 1-D, at least two times, finite, strictly
    decreasing, inside (0, T]; returns it as a float64 CPU tensor."""
    check_sde(sde)
    if isinstance(ts, (list, tuple)):
        ts = torch.as_tensor(ts, dtype=torch.float64)
    if not isinstance(ts, torch.Tensor) or ts.is_complex():
        raise TypeError(f"{name} must be a 1-D real tensor of times; got {type(ts).__name__}.")
    ts = ts.detach().to(device="cpu", dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"{name}: an explicit time grid must be 1-D with at least 2 times; got shape "
                         f"{tuple(ts.shape)}.")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"{name}: an explicit time grid must hold finite times; got {ts.tolist()[:8]}.")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"{name}: an explicit time grid must be strictly decreasing (from near T down to t_min); "
                         f"got {ts.tolist()[:8]}.")
    if not (0.0 < float(ts[-1]) and float(ts[0]) <= sde.T):
        raise ValueError(f"{name}: grid times must lie in (0, T={sde.T:g}]; got [{float(ts[-1]):g}, "
                         f"{float(ts[0]):g}].")
    return ts


def check_sde(sde: SDE) -> SDE:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE (e.g. sdegen.VPSDE()); got {type(sde).__name__}.")
    return sde
