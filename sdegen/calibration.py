"""Step schedules fitted to a model: choose the N grid times that make a fixed-step sampler's endpoints closest
to an accurate solution of the same probability-flow ODE from the same starting points.

A sampler's error at a small NFE is decided in a narrow band of noise levels (for data with separated modes,
near sigma ~ half the distance between modes, where trajectories commit to a mode). Where the band lies is a
property of the data, so no fixed formula puts the steps there for every model; a short fit on a calibration
batch does. This is the idea of learned or optimized time discretizations (Tong et al. 2024, "Learning to
Discretize Denoising Diffusion ODEs"; Sabour et al. 2024, "Align Your Steps"), done here derivative-free so that
it works with any deterministic sampler object, including a user's own.

The fit costs score evaluations on the calibration batch: one accurate reference solve, then ``steps`` NFE per
objective evaluation (:attr:`ScheduleFit.nfe` counts them all). The result is a plain float64 grid to pass as
``sdegen.sample(..., schedule=fit.times)``; fit it on starting points other than the ones you evaluate on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ._validate import check_choice, check_int, check_number, check_tensor, reject_sample_options
from .backends import ODE_METHODS, is_adaptive_ode_method
from .models import as_model
from .noise import check_seed, torch_generator
from .samplers import SAMPLERS, StepSampler, get_sampler
from .sampling import sample
from .schedules import SCHEDULES, check_grid, load_grid, save_grid, time_grid
from .sde import SDE

OBJECTIVES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # per-example endpoint errors e (B,) and weights w (B,) summing to 1 -> one number to minimise
    "mse": lambda e, w: (w * e.pow(2)).sum(),  # the RMS error squared: dominated by the few examples that change mode
    "mean": lambda e, w: (w * e).sum(),  # mean error: weighs every example alike
    "log": lambda e, w: (w * torch.log(e + 1e-12)).sum(),  # geometric mean: the typical (median-like) error
}


class _CalibrationRuns:
    """:func:`sdegen.sample` of one model under one SDE, adding up the NFE that every run reports."""

    def __init__(self, sde: SDE, score):
        self.sde, self.model, self.nfe = sde, as_model(score, sde), 0

    def __call__(self, x_T: torch.Tensor, **kwargs) -> torch.Tensor:
        x, info = sample(self.sde, self.model, x_T, return_info=True, **kwargs)
        self.nfe += info.nfe
        return x


@dataclass
class ScheduleFit:
    """The result of :func:`optimize_schedule`.

    times: the fitted decreasing float64 grid of steps + 1 times (T ... t_min).
    loss / initial_loss: the objective on the calibration batch at the fitted and the initial grid.
    evaluations: objective evaluations (sampler runs on the calibration batch), over all starts.
    nfe: network evaluations spent in all (reference solve included), each on the whole calibration batch, as
        :func:`sdegen.sample` counts them (the sum of its ``SampleInfo.nfe``).
    history: the objective after each accepted move.
    sde, method: the SDE and the sampler (its name, or its repr for a sampler object) the grid was fitted for (set
        by :func:`optimize_schedule`; :meth:`save` writes them beside the times).
    steps (read-only): the number of steps of the grid, len(times) - 1.
    """

    times: torch.Tensor
    loss: float
    initial_loss: float
    evaluations: int
    nfe: int
    history: List[float] = field(default_factory=list)
    sde: Optional[SDE] = None
    method: Optional[str] = None

    @property
    def steps(self) -> int:
        """The number of steps of the fitted grid: len(times) - 1."""
        return len(self.times) - 1

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the fitted grid as a small JSON file (next to the model's checkpoint, say) with its SDE's
        description, the sampler it was fitted for and the fit's losses and cost (:func:`sdegen.schedules.save_grid`);
        :meth:`load` reads it back and validates it."""
        if self.sde is None:
            raise ValueError("ScheduleFit.save needs the fit's sde (fits from optimize_schedule carry it); set "
                             "fit.sde to the SDE the grid was fitted for.")
        save_grid(path, self.times, self.sde, kind="ScheduleFit", method=self.method, loss=self.loss,
                  initial_loss=self.initial_loss, evaluations=self.evaluations, nfe=self.nfe,
                  history=list(self.history))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], sde: Optional[SDE] = None) -> "ScheduleFit":
        """Read a fit written by :meth:`save`; with ``sde``, the file's SDE must describe the same process
        (ValueError otherwise)."""
        times, sde, meta = load_grid(path, sde, kind="ScheduleFit")
        try:
            return cls(times=times, loss=float(meta["loss"]), initial_loss=float(meta["initial_loss"]),
                       evaluations=int(meta["evaluations"]), nfe=int(meta["nfe"]),
                       history=[float(v) for v in meta["history"]], sde=sde, method=meta["method"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path {os.fspath(path)!r} is not a complete ScheduleFit file (missing or malformed "
                             f"{err}).") from None


def optimize_schedule(sde: SDE, score, x_T: torch.Tensor, *, method: Union[str, StepSampler] = "exp_pc",
                      steps: int = 10, reference: Optional[torch.Tensor] = None,
                      init: Union[str, torch.Tensor, Sequence[Union[str, torch.Tensor]]] = (
                          "few_step", "log_snr", "edm"),
                      objective: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "mse",
                      t_min: Optional[float] = None, max_evals: int = 2000, step_size: float = 0.5,
                      min_step_size: float = 0.02, reference_options: Optional[Dict[str, Any]] = None,
                      subset: Optional[int] = None, seed: Union[int, torch.Generator] = 0, **options) -> ScheduleFit:
    """Fit the time grid of a deterministic fixed-step sampler to ``score`` on a calibration batch.

    The grid is parametrised by the shares of the log-SNR span taken by each step,
    lambda_i = lambda(T) + (lambda(t_min) - lambda(T)) sum_{j < i} softmax(theta)_j, so every candidate is a
    valid grid with fixed end points. theta is fitted by a pattern search (Hooke & Jeeves 1961): moves of
    +-step_size in one coordinate (a step's share) or in a neighbouring pair in opposite directions (one grid
    time shifted), each kept if it lowers the objective, step_size halved when none does. It needs no gradient
    of the sampler. Deterministic: the same inputs give the same grid.

    Args:
        sde, score: as in :func:`sdegen.sample`.
        x_T: calibration starting points (B, ...) drawn from the prior; use others for evaluation.
        method: a deterministic sampler name or object; ``options`` go to its constructor.
        steps: number of steps of the fitted grid.
        reference: the accurate endpoints from x_T (B, ...); if None, solved with ``reference_options``
            (default: torchdiffeq dopri5 at rtol = atol = 1e-6 for float32 x_T, 1e-9 for float64).
        init: starting grid(s): a schedule name of :func:`sdegen.time_grid`, explicit times, or a sequence of
            them; with several, each is fitted (a multi-start search: the objective has local minima) and the
            fit with the lowest objective is returned, its ``nfe`` counting all of them. Explicit times (an
            earlier fit refined by :func:`sdegen.refine_grid`, say) have steps + 1 entries, start at T and end at
            t_min: the fit keeps both ends. Without ``t_min`` the explicit grids set it (their common last time).
        t_min: the last time of the fitted grid (default: that of the explicit initial grids, else sde.t_min).
        objective: "mse" (mean squared per-example error, the default), "mean", "log", or a function of the
            (B,) per-example errors and their (B,) weights (which sum to 1).
        subset: fit on this many of the B points, chosen by screening (see below); None fits on all of them.
            The MSE at a small NFE is decided by the rare points that change mode, so a plain random batch
            gives a noisy objective. Screening runs the sampler on all B points with the first initial grid at
            ``steps`` and ``2 steps`` (3 steps NFE per point; an explicit first grid is screened on the log-SNR
            grids instead, which only has to rank the points) and takes the subset // 2 points on which they
            disagree most, plus subset - subset // 2 of the others drawn at random (``seed``: an int or a
            torch.Generator; the only randomness of the fit) and weighted up to
            stand for all of them: the weighted objective estimates the objective of all B points, with less
            variance where it matters. Only the subset needs a reference solve.
        max_evals: limit on objective evaluations per start.
        step_size, min_step_size: the search's initial and final move in theta (a move of 0.5 changes a step's
            share of the span by a factor e^0.5 before normalisation).
    Returns:
        a :class:`ScheduleFit`; pass ``fit.times`` as ``schedule=`` to :func:`sdegen.sample`.
    """
    reject_sample_options(options, "optimize_schedule")
    _check_args(sde, x_T, steps, t_min, reference, max_evals, step_size, min_step_size, subset, seed)
    loss_fn = _objective(objective)
    starts, t_end = _starts(sde, init, steps, t_min)
    sampler = get_sampler(method, **options)
    if not isinstance(sampler, StepSampler):
        steppers = [k for k in sorted(SAMPLERS) if _is_deterministic_stepper(k)]
        if isinstance(method, str):
            raise ValueError(f"method {method!r} integrates a whole span with its own steps; a fitted grid is for a "
                             f"deterministic fixed-step sampler, one of {steppers}.")
        raise TypeError(f"method must be a deterministic fixed-step sampler (one of {steppers} or a StepSampler); "
                        f"got {type(sampler).__name__}, which integrates a whole span with its own steps.")
    if sampler.stochastic:
        raise ValueError(f"method {sampler!r} is stochastic: a schedule is fitted to the endpoints of a "
                         "deterministic sampler (its ODE trajectories).")
    runs = _CalibrationRuns(sde, score)
    with torch.no_grad():
        weights = torch.full((x_T.shape[0],), 1.0 / x_T.shape[0], dtype=torch.float64, device=x_T.device)
        if subset is not None and subset < x_T.shape[0]:
            index, weights = _screen(sde, runs, x_T, sampler, steps, starts[0], t_end, subset, seed)
            x_T, reference = x_T[index], None if reference is None else reference[index]
        ref = reference if reference is not None else _reference(runs, x_T, t_end, reference_options)
        fits = [_pattern_search(sde, runs, x_T, ref, weights, sampler, steps, start, t_end, loss_fn, max_evals,
                                step_size, min_step_size) for start in starts]
    best = min(fits, key=lambda f: f.loss)
    best.nfe, best.evaluations = runs.nfe, sum(f.evaluations for f in fits)
    # the sampler the grid was fitted for, its options included (a grid fitted for order 1 is not order 3's)
    best.sde, best.method = sde, method if isinstance(method, str) and not options else repr(sampler)
    return best


def _is_deterministic_stepper(name: str) -> bool:
    """Whether the registry's ``name`` with its defaults is a deterministic fixed-step sampler."""
    try:
        sampler = get_sampler(name)
    except (TypeError, ValueError):  # needs arguments of its own (inpainting)
        return False
    return isinstance(sampler, StepSampler) and not sampler.stochastic


def _check_args(sde, x_T, steps, t_min, reference, max_evals, step_size, min_step_size, subset, seed):
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE; got {type(sde).__name__}.")
    sde.check_contract()
    check_tensor(x_T, "x_T", batch=True)
    check_int(steps, "steps", lo=2, hint=" (one step has no interior time to fit)")
    check_number(t_min, "t_min", lo=0.0, hi=sde.T, lo_open=True, hi_open=True, none_ok=True)
    if reference is not None:
        check_tensor(reference, "reference")
        if reference.shape != x_T.shape:
            raise ValueError(f"reference must have x_T's shape {tuple(x_T.shape)}; got {tuple(reference.shape)}.")
    check_int(max_evals, "max_evals", lo=1)
    check_number(step_size, "step_size", lo=0.0, lo_open=True)
    check_number(min_step_size, "min_step_size", lo=0.0, hi=step_size, lo_open=True,
                 hint=" (the search's final move, at most step_size)")
    check_int(subset, "subset", lo=2, none_ok=True)
    check_seed(seed, "seed", ("int", "generator"))


def _starts(sde, init, steps, t_min):
    """The starting grids (names, and explicit times as float64 grids) and the end time t_end of every fitted grid.

    A fitted grid runs from T to t_end, so an explicit start must too, with ``steps`` steps: t_end is ``t_min``, else
    the last time of the explicit starts (which must agree), else sde.t_min."""
    starts = [init] if isinstance(init, (str, torch.Tensor)) else list(init)
    if not starts:
        raise ValueError("init must name at least one starting grid; got an empty sequence.")
    for k, start in enumerate(starts):
        if isinstance(start, torch.Tensor):
            starts[k] = check_grid(sde, start, "init")
        else:
            check_choice(start, "init", SCHEDULES, hint=" (or explicit times, or a sequence of them)")
    grids = [start for start in starts if isinstance(start, torch.Tensor)]
    ends = sorted({float(g[-1]) for g in grids})
    if t_min is None and len(ends) > 1:
        raise ValueError(f"init: the explicit starting grids end at different times {ends}, but a fit has one "
                         "t_min; pass t_min= and grids that end there.")
    t_end = float(t_min) if t_min is not None else ends[0] if ends else sde.t_min
    for g in grids:
        if len(g) != steps + 1:
            raise ValueError(f"init: an explicit starting grid of {len(g)} times has {len(g) - 1} steps, but "
                             f"steps={steps}; pass steps={len(g) - 1} or a grid of {steps + 1} times.")
        if float(g[0]) != sde.T:
            raise ValueError(f"init: an explicit starting grid must start at T={sde.T!r}, where every fitted grid "
                             f"starts; got one starting at {float(g[0])!r}.")
        if float(g[-1]) != t_end:
            raise ValueError(f"init: an explicit starting grid must end at t_min={t_end!r}, where the fitted grid "
                             f"ends; got one ending at {float(g[-1])!r}: leave t_min unset or end the grid there.")
    return starts, t_end


def _objective(objective):
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or a callable; got {objective!r}.")
    return OBJECTIVES[objective]


def _screen(sde, runs, x_T, sampler, steps, init, t_min, subset, seed):
    """Indices of the calibration subset and their weights (summing to 1): the subset // 2 points where the
    sampler at ``steps`` and ``2 steps`` disagree most (weight 1/B each), and a seeded random draw of the rest
    (each standing for (B - k) / (subset - k) points)."""
    n = x_T.shape[0]
    coarse = runs(x_T, method=sampler, steps=steps, schedule=_init_schedule(init), t_min=t_min)
    fine = runs(x_T, method=sampler, steps=2 * steps, schedule=_init_schedule(init), t_min=t_min)
    gap = (coarse - fine).reshape(n, -1).double().norm(dim=1).cpu()
    k = subset // 2
    order = torch.argsort(gap, descending=True)
    rest = order[k:]
    g = torch_generator(seed, "seed", ("int", "generator"))
    drawn = rest[torch.randperm(len(rest), generator=g)[:subset - k]]
    index = torch.cat([order[:k], drawn])
    weights = torch.cat([torch.full((k,), 1.0 / n, dtype=torch.float64),
                         torch.full((len(drawn),), len(rest) / (len(drawn) * n), dtype=torch.float64)])
    return index.to(x_T.device), weights.to(x_T.device)


def _init_schedule(init):
    # screening only ranks the points: an explicit initial grid is screened on the log-SNR grids of N and 2N steps
    return init if isinstance(init, str) else "log_snr"


def _reference(runs, x_T, t_min, reference_options):
    """The reference samples: by default an adaptive ODE solve at tight tolerances (which the options may set); a
    fixed-grid reference (``{"solver": "rk4", "steps": N}``, a fixed-step sampler) takes no tolerances."""
    tol = 1e-9 if x_T.dtype == torch.float64 else 1e-6
    opts = {"method": "ode", **(reference_options or {})}
    method, solver = opts["method"], opts.get("solver", "dopri5")
    adaptive_ode = method == "ode" and solver in ODE_METHODS and is_adaptive_ode_method(solver)
    if adaptive_ode or method in ("adaptive", "adaptive_rk23"):
        opts = {"rtol": tol, "atol": tol, **opts}
    return runs(x_T, t_min=t_min, **opts)


def _pattern_search(sde, runs, x_T, ref, weights, sampler, steps, init, t_end, loss_fn, max_evals, step, min_step):
    lam_ends = sde.log_snr(torch.tensor([sde.T, t_end], dtype=torch.float64))
    lam0 = sde.log_snr(init if isinstance(init, torch.Tensor) else time_grid(sde, steps, init, t_min=t_end))
    theta = torch.log((lam0[1:] - lam0[:-1]) / (lam_ends[1] - lam_ends[0]))

    def grid(th):
        shares = torch.cat([th.new_zeros(1), torch.softmax(th, 0).cumsum(0)])
        ts = sde.t_from_log_snr(lam_ends[0] + shares * (lam_ends[1] - lam_ends[0]))
        ts[0], ts[-1] = sde.T, t_end
        return ts

    def loss(th, first=False):
        ts = grid(th)
        if bool((ts[1:] >= ts[:-1]).any()):  # steps below float64 resolution: not a usable grid
            return math.inf
        x = runs(x_T, method=sampler, schedule=ts)
        e = (x - ref).reshape(x.shape[0], -1).double().norm(dim=1)
        bad = ~torch.isfinite(e)
        if first and bool(bad.any()):  # every later value would be NaN too, and no move ever accepted
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"x_T: the endpoint errors (samples minus reference) are not finite for calibration "
                             f"examples {rows[:10]}{' ...' if len(rows) > 10 else ''} on the starting grid (the "
                             "model's output, or the reference, is not finite there); check the model on those "
                             "starting points, or leave them out of x_T.")
        value = float(loss_fn(e, weights))
        if first and not math.isfinite(value):
            raise ValueError(f"objective returned {value} for finite endpoint errors; it must return a finite "
                             "number.")
        return value if math.isfinite(value) else math.inf  # a trial grid that fails is never accepted

    best = initial = loss(theta, first=True)
    evals, history = 1, [best]
    # moves: one step's share up or down (the others rescale), or one grid time moved between its neighbours
    moves = [(i, None) for i in range(steps)] + [(i, i + 1) for i in range(steps - 1)]
    while step >= min_step and evals < max_evals:
        improved = False
        for i, j in moves:
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                trial = theta.clone()
                trial[i] += sign * step
                if j is not None:
                    trial[j] -= sign * step
                value = loss(trial)
                evals += 1
                if value < best:
                    best, theta, improved = value, trial, True
                    history.append(best)
                    break
        if not improved:
            step *= 0.5
    return ScheduleFit(times=grid(theta), loss=best, initial_loss=initial, evaluations=evals, nfe=runs.nfe,
                       history=history)
