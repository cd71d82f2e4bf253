"""A time grid for stochastic samplers from the denoiser's sensitivity J = dD/dy, measured by a short pilot run.

Variables as in :mod:`sdegen.samplers.exponential`: y = x / m, sigma = s / m, u = log(m / s) = -log sigma, and
Tweedie's denoiser D(y, sigma) = E[x0 | y], whose Jacobian J = dD/dy = Cov[x0 | y] / sigma^2 (Tweedie's second-order
formula) is the posterior spread of x0 in units of the noise.

Why J (I - J): the exact transition of the reverse SDE from sigma to sigma' = sigma e^{-h} draws x0 from its
posterior, y' = a y + (1 - a) x0 + sigma' sqrt(1 - a) z with a = e^{-2h}; a step that puts D in place of x0 misses
(1 - a)^2 Cov[x0 | y] of variance. On a Gaussian N(mu, v) this is a relative variance error of about
(1 - a)^2 J (1 - J) ~ 4 h^2 J (1 - J) per step, J = v / (v + sigma^2): zero where D is constant (J = 0, sigma far
above the data's scales, where exponential integrators are exact) and where D is the identity (J = I, sigma far
below them), largest where sigma crosses a scale of the data. For general data the per-step error is taken as
C(u) h^{q+1} with C(u) the root-mean-square eigenvalue of J (I - J), read no higher than the Gaussian model's
largest value 1/4 (at J = 1/2): between modes, while trajectories choose their component, J has eigenvalues above 1
and J (I - J) grows as their square, but there the model does not apply (the variance a step misses,
(1 - a)^2 Cov[x0 | y], stays below (1 - a)^2 times the marginal variance), and without the bound those noise levels
would take the steps that set the modes' own spread.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ._validate import check_int, check_state_dtype
from .noise import check_seed, torch_generator
from ._deprecation import renamed
from .schedules import _require_model_steps_shape, time_grid
from .sde import SDE

F64 = torch.float64
CAP = 0.25  # the largest J (1 - J) of the Gaussian error model (at J = 1/2)


def _jvp(model, x: torch.Tensor, t: torch.Tensor, d0: torch.Tensor, v: torch.Tensor, m: float, sigma: float
         ) -> torch.Tensor:
    """J v, J = dD/dy at y = x/m, by a forward difference along v scaled to unit RMS per example (one model call).

    The step is sqrt(eps) sigma in y: D varies on the scale of sigma or wider, so the truncation error is
    O(sqrt(eps)) relative and the round-off eps |D| / step is small against |J v| for sigma above eps |D|."""
    flat = v.reshape(v.shape[0], -1)
    rms = flat.pow(2).mean(1).sqrt().clamp_min(torch.finfo(v.dtype).tiny)
    unit = (flat / rms[:, None]).reshape(v.shape)
    step = math.sqrt(torch.finfo(x.dtype).eps) * sigma
    diff = model.denoise(x + (step * m) * unit, t) - d0
    return diff * (rms / step).reshape((-1,) + (1,) * (v.ndim - 1))


def sensitivity_profile(sde: SDE, model: Any, shape: Sequence[int], *, points: int = 48, batch: int = 64,
                        seed: Union[int, torch.Generator, None] = 0, t_min: Optional[float] = None,
                        t_max: Optional[float] = None, dtype: torch.dtype = F64,
                        device=None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(times, C, model calls): C(t) = sqrt(E ||(J - J^2) xi||^2 / d), the RMS eigenvalue of J (I - J) over the
    marginal p_t, at the ``points`` + 1 times of the log-SNR grid from t_max to t_min.

    The states are those of one pilot run of DPM-Solver++(2M) (the probability-flow ODE, whose states are draws of
    the marginals) from ``batch`` prior draws of shape (batch, *shape); ``seed`` (an int, a torch.Generator, or
    None for torch's global generator) draws them and the probes xi. At each state, J xi and J (J xi) for
    xi ~ N(0, I) (Hutchinson's estimator: E ||M xi||^2 = tr(M^T M)) by forward differences.
    Cost: 4 ``points`` + 3 model calls on ``batch`` examples."""
    from .models import as_model
    from .samplers import DPMSolverPP
    from .sampling import sample  # the driver imports the schedules

    check_int(points, "points", lo=2)
    check_int(batch, "batch", lo=1)
    seed = check_seed(seed)
    model = as_model(model, sde)
    ts = time_grid(sde, points, "log_snr", t_min=t_min, t_max=t_max)
    check_state_dtype(dtype, "dtype")
    x = sde.prior_sample((batch,) + tuple(shape), seed=seed, dtype=dtype, device=device)
    gen = torch_generator(seed + 1 if isinstance(seed, int) else seed)
    with torch.no_grad():
        _, info = sample(sde, model, x, method=DPMSolverPP(2), schedule=ts, return_trajectory=True, return_info=True)
        log_m, s = sde.log_mean_coeff(ts).tolist(), sde.std(ts).tolist()
        values = []
        for k, t in enumerate(ts.unbind()):
            xt = info.trajectory[k]
            m = math.exp(log_m[k])
            d0 = model.denoise(xt, t)
            xi = torch.randn(xt.shape, generator=gen, dtype=F64, device=gen.device if gen is not None else "cpu")
            xi = xi.to(device=xt.device, dtype=xt.dtype)
            a = _jvp(model, xt, t, d0, xi, m, s[k] / m)
            b = _jvp(model, xt, t, d0, a, m, s[k] / m)
            values.append((a - b).pow(2).mean().sqrt())
    return ts, torch.stack(values).to(device="cpu", dtype=F64), info.nfe + 3 * len(values) * model.nfe_per_call


def _march(c: list, u: list, steps: int, order: int, eps: float) -> list:
    """Cell indices of the grid whose every step, from cell p to cell j, is the longest with
    max(c[p..j]) (1 - e^{-2 (u_j - u_p)})^{order + 1} <= eps (at least one cell); at most ``steps`` steps."""
    pos, out, cells = 0, [0], len(u) - 1
    while pos < cells and len(out) <= steps:
        j, cmax = pos + 1, c[pos + 1]
        while j < cells:
            cm = max(cmax, c[j + 1])
            if cm * (-math.expm1(-2.0 * (u[j + 1] - u[pos]))) ** (order + 1) > eps:
                break
            j, cmax = j + 1, cm
        pos = j
        out.append(pos)
    return out


def _equidistribute(u: torch.Tensor, c: torch.Tensor, steps: int, order: int, cells: int = 2048) -> torch.Tensor:
    """``steps`` + 1 points in u from u[0] to u[-1] with equal step errors max C (1 - e^{-2h})^{order + 1}, C
    interpolated log-linearly between the profile's points on ``cells`` equal cells (the error level is found by
    bisection; a march that ends in fewer steps has its longest steps halved)."""
    fine = torch.linspace(float(u[0]), float(u[-1]), cells + 1, dtype=F64)
    k = torch.searchsorted(u, fine, right=True).clamp(1, len(u) - 1)
    w = (fine - u[k - 1]) / (u[k] - u[k - 1])
    log_c = c.log()
    cf, uf = torch.exp(log_c[k - 1] + w * (log_c[k] - log_c[k - 1])).tolist(), fine.tolist()
    lo, hi = math.log(min(cf)) - 200.0, math.log(max(cf))  # at hi one step does; at lo none reaches the end
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _march(cf, uf, steps, order, math.exp(mid))[-1] == cells:
            hi = mid
        else:
            lo = mid
    points = [uf[i] for i in _march(cf, uf, steps, order, math.exp(hi))]
    while len(points) < steps + 1:
        i = max(range(len(points) - 1), key=lambda j: points[j + 1] - points[j])
        points.insert(i + 1, 0.5 * (points[i] + points[i + 1]))
    return torch.tensor(points, dtype=F64)


MAX_GROWTH = 2.0  # the adaptive controllers' own limit on step growth (the pilot grid's too)


def _limit_growth(u: torch.Tensor, growth: float = MAX_GROWTH) -> torch.Tensor:
    """The grid ``u`` (increasing) with no step longer than ``growth`` times the one before it: each step is capped
    by its predecessors' (h_i <= growth^(i - j) h_j), then all are scaled to span u again. Below the data's scale
    the sensitivity vanishes and the equidistributed grid ended in one step 10-25x the one before, over which a
    multistep sampler's extrapolation blew up (variance 100-2800x on VE with sigma_max 1000); grids without such
    a jump are unchanged."""
    h = u[1:] - u[:-1]
    capped = h.clone()
    for i in range(1, len(h)):
        capped[i] = min(float(h[i]), growth * float(capped[i - 1]))
    if bool(torch.equal(capped, h)):
        return u
    capped = capped * (float(u[-1] - u[0]) / float(capped.sum()))
    out = torch.cat([u[:1], u[0] + torch.cumsum(capped, 0)])
    out[-1] = u[-1]
    return out


def sensitivity_grid(sde: SDE, score: Any = None, steps: Optional[int] = None, shape: Optional[Sequence[int]] = None,
                     *, order: int = 1, points: int = 48, batch: int = 64, seed: Union[int, torch.Generator, None] = 0,
                     t_min: Optional[float] = None, t_max: Optional[float] = None, dtype: torch.dtype = F64,
                     device=None, model: Any = None) -> Tuple[torch.Tensor, int]:
    """(times, pilot model calls): a grid of ``steps`` steps for a stochastic sampler of global ``order`` q whose
    steps have equal error estimates max C(u) (1 - e^{-2h})^{q+1} over each step u -> u + h, u = log(m/s), C from
    :func:`sensitivity_profile` (see the module docstring), then rescaled so that no step is longer than twice the
    one before it (:func:`_limit_growth`). Where that rescaling acts (a grid ending in a long step below the data's
    scale) every step grows by the same factor, the first included, and the step errors are no longer equal: on VE
    with sigma_max 100 and unit-scale data the first step then reaches sigma 0.27. Enforcing the limit inside the
    equidistribution instead keeps them equal but leaves steps of h = 3-7 below the data's scale, over which
    sa_solver's extrapolation diverged (variance 400x the truth); the rescaled grid is the one kept.

    For small steps this is the step density C^{1/(q+1)} that spreads local errors C h^{q+1} evenly (equidistribution,
    Hairer, Norsett & Wanner, "Solving ODEs I", section II.4; the rule of :func:`sdegen.schedules.pilot_grid`, with
    the denoiser's sensitivity in place of the probability-flow ODE's local error estimate: near the data the ODE is
    nearly straight and its error small, while the SDE's noise keeps sampling D's response to the posterior spread).
    The factor 1 - e^{-2h} (the weight of x0 in the reverse SDE's transition over a step, 2h for small steps) makes
    the error of a long step saturate instead of growing as h^{q+1}: above the data's largest scale, where C falls
    as sigma^{-2}, one long step costs no more than a short one, and the grid takes one (an exponential integrator is
    exact for a constant D). No constant of the data enters: the data's scales are where C is large. C is read no
    finer than the forward differences resolve it, sqrt(eps) of ``dtype``; where it is below that everywhere (D
    constant or the identity), the grid is the log-SNR grid.
    """
    model, _ = renamed("sensitivity_grid", "score", score, "model", model)
    _require_model_steps_shape("sensitivity_grid", model, steps, shape)
    check_int(steps, "steps", lo=1)
    check_int(order, "order", lo=1)
    ts, c, nfe = sensitivity_profile(sde, model, shape, points=points, batch=batch, seed=seed, t_min=t_min,
                                     t_max=t_max, dtype=dtype, device=device)
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"the model's denoiser gave non-finite sensitivities ({c.tolist()[:6]}); check the model.")
    resolution = math.sqrt(torch.finfo(dtype).eps)  # the forward differences' relative accuracy
    if not bool((c > resolution).any()):
        return time_grid(sde, steps, "log_snr", t_min=t_min, t_max=t_max), nfe
    u = _limit_growth(_equidistribute(0.5 * sde.log_snr(ts), c.clamp(resolution, CAP), steps, order))
    grid = sde.t_from_log_snr(2.0 * u)
    grid[0], grid[-1] = ts[0], ts[-1]  # exact end points despite round-off in the inverse map
    return grid, nfe
