"""Time-step schedules: the grid T = t_0 > t_1 > ... > t_N = t_min a fixed-step sampler walks.

Grids are float64 CPU tensors (a float32 linspace is too coarse near t_min, and CPU scalars
multiply device tensors without a host-device sync).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ._deprecation import renamed
from ._validate import check_int, check_number, check_state_dtype
from .noise import check_seed, torch_generator
from .sde import SDE

SCHEDULES = ("uniform", "log_snr", "edm", "quadratic", "few_step")
PILOT = "pilot"  # the model-dependent grid of :func:`pilot_grid` (error="global"), resolved by :func:`sdegen.sample`
PILOT_LOCAL = "pilot_local"  # :func:`pilot_grid` with error="local": for models without autograd, at the pilot's cost
PILOT_SCHEDULES = {PILOT: "global", PILOT_LOCAL: "local"}  # schedule name -> pilot_grid's ``error``
SENSITIVITY = "sensitivity"  # the model-dependent grid of :func:`sdegen.sensitivity_grid.sensitivity_grid`
# grids whose first step spans much of the noise range: laid out for exponential integrators
LONG_FIRST_STEP = (PILOT, PILOT_LOCAL, SENSITIVITY, "few_step")


def time_grid(sde: SDE, steps: Optional[int], schedule: Union[str, torch.Tensor] = "uniform", *,
              t_min: Optional[float] = None, t_max: Optional[float] = None, rho: float = 7.0) -> torch.Tensor:
    """Decreasing grid of ``steps + 1`` times from t_max (default T) to t_min (default sde.t_min).

    schedule:
      - "uniform": equal steps in t (Song et al. 2021);
      - "log_snr": equal steps in lambda(t) = log(m^2/s^2) (Lu et al. 2022, DPM-Solver section 3.3);
      - "edm": sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
        sigma = s/m (Karras et al. 2022, eq. 5), rho = 7 by default;
      - "quadratic": equal steps in sqrt(t) (DDIM's quadratic spacing, Song et al. 2021a);
      - "few_step": a log-SNR grid that reaches sigma = 10 in max(1, round(steps / 20)) steps, tuned on unit-scale data (mixtures whose means
        are a few units apart) for 5-50 steps of exponential integrators; it does not carry over to data of other
        scales (see :func:`few_step_log_snr`), where "log_snr" or the model-dependent "pilot" grid of
        :func:`pilot_grid` (``sdegen.sample(..., schedule="pilot")``) are the choices;
      - a 1-D tensor of explicit times: validated (strictly decreasing, inside [0, T]) and returned as float64;
        ``steps`` is then None or the tensor's number of steps (ValueError otherwise).
    """
    if isinstance(schedule, torch.Tensor):
        if t_min is not None or t_max is not None:
            raise ValueError("t_min / t_max apply to named schedules; an explicit grid of times runs from its first "
                             "to its last entry: leave t_min and t_max unset.")
        grid = check_grid(sde, schedule)
        if steps is not None and (check_int(steps, "steps", lo=1) != grid.numel() - 1):
            raise ValueError(f"steps: an explicit schedule of {grid.numel()} times takes {grid.numel() - 1} steps; "
                             f"leave steps unset (None) or give that number; got steps={steps!r}.")
        return grid
    if not isinstance(schedule, str):  # compared with names below, an array would be ambiguous
        raise TypeError(f"schedule must be a schedule name ({', '.join(SCHEDULES)}, {PILOT!r}, {PILOT_LOCAL!r}, "
                        f"{SENSITIVITY!r}) or a 1-D torch tensor of times; got {type(schedule).__name__} (pass "
                        "torch.as_tensor(times, dtype=torch.float64) for explicit times).")
    check_sde(sde)
    check_int(steps, "steps", lo=1)
    check_number(rho, "rho", lo=0.0, lo_open=True)
    t_max = sde.T if t_max is None else check_number(t_max, "t_max", lo=0.0, hi=sde.T, lo_open=True)
    t_min = sde.t_min if t_min is None else check_number(t_min, "t_min", lo=0.0, hi=t_max, lo_open=True,
                                                         hi_open=True)
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
        # eq. 5 divided through by sigma_max^(1/rho), which overflows for small rho (80^1000 at rho = 1e-3)
        sig = sde.sigma(ends)
        ts = sde.t_from_sigma(sig[0] * (1.0 + u * ((sig[1] / sig[0]) ** (1.0 / rho) - 1.0)) ** rho)
    elif schedule == "few_step":
        ts = sde.t_from_log_snr(few_step_log_snr(sde.log_snr(ends), steps))
    elif schedule == "quadratic":
        r = ends.sqrt()
        ts = (r[0] + u * (r[1] - r[0])) ** 2
    elif isinstance(schedule, str) and schedule in PILOT_SCHEDULES:
        raise ValueError(f"the {schedule!r} schedule depends on the model: pass schedule={schedule!r} to "
                         "sdegen.sample, or compute it with sdegen.schedules.pilot_grid(sde, model, steps, shape, "
                         f"error={PILOT_SCHEDULES[schedule]!r}).times.")
    elif schedule == SENSITIVITY:
        raise ValueError(f"the {schedule!r} schedule depends on the model: pass schedule={schedule!r} to "
                         "sdegen.sample, or compute it with sdegen.sensitivity_grid.sensitivity_grid(sde, model, steps, "
                         "shape, order=...)[0].")
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, {PILOT!r}, {PILOT_LOCAL!r} or {SENSITIVITY!r} (with "
                         f"a model) or a tensor of times; got {schedule!r}.")
    ts[0], ts[-1] = t_max, t_min  # exact end points despite round-off in the inverse maps
    if not bool((ts[1:] < ts[:-1]).all()):  # steps finer than float64 resolves near an end of a narrow span
        raise ValueError(f"steps={steps}: the {schedule!r} grid of [{t_min:.17g}, {t_max:.17g}] has steps below "
                         f"float64's resolution of these times (its times are not strictly decreasing); use fewer "
                         f"steps or a wider span.")
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
    ``nfe`` (its batched model calls, each on ``batch`` examples, the adjoint's included) and its accepted times
    ``pilot_times``. With ``error="global"``: ``adjoint_nfe`` of those calls were vector-Jacobian products (a
    forward and a backward pass each) and ``weights`` (one per pilot step, largest 1) are the amplified local
    errors that reshaped the density. ``sde``, ``order`` and ``error`` say what the grid was made for, and
    ``steps`` (read-only) is len(times) - 1; a grid is saved and read back with :meth:`save` / :meth:`load`."""

    times: torch.Tensor
    nfe: int
    batch: int
    pilot_times: torch.Tensor
    sde: Optional[SDE] = None
    order: Optional[int] = None
    error: str = "local"
    adjoint_nfe: int = 0
    weights: Optional[torch.Tensor] = None
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """The number of steps of the grid: len(times) - 1."""
        return len(self.times) - 1

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the grid as a small JSON file (next to the model's checkpoint, say): the SDE's description
        (:meth:`sdegen.SDE.describe`), the sampler order and pilot settings it was made for, and the times
        (float64 values written with full precision). :meth:`load` reads it back and validates it."""
        if self.sde is None:
            raise ValueError("PilotGrid.save needs the grid's sde (grids from pilot_grid carry it); build one with "
                             "PilotGrid(..., sde=sde) to save it.")
        save_grid(path, self.times, self.sde, kind="PilotGrid", order=self.order, error=self.error, nfe=self.nfe,
                  batch=self.batch, adjoint_nfe=self.adjoint_nfe, pilot_times=self.pilot_times.tolist(),
                  weights=None if self.weights is None else self.weights.tolist(), settings=dict(self.settings))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], sde: Optional[SDE] = None) -> "PilotGrid":
        """Read a grid written by :meth:`save`. With ``sde``, the file's SDE must describe the same process
        (ValueError otherwise: a grid made for another SDE's times is not this one's grid)."""
        times, sde, meta = load_grid(path, sde, kind="PilotGrid")
        name = os.fspath(path)
        try:
            pilot = check_grid(sde, torch.tensor(meta["pilot_times"], dtype=torch.float64), "pilot_times")
            counts = {key: meta[key] for key in ("nfe", "batch", "adjoint_nfe")}
            for key, value in counts.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch" else 0):
                    raise ValueError(f"{key} must be a count; got {value!r}")
            order, error, weights = meta["order"], meta["error"], meta["weights"]
            if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
                raise ValueError(f"order must be an int >= 1 or null; got {order!r}")
            if error not in PILOT_ERRORS:
                raise ValueError(f"error must be one of {PILOT_ERRORS}; got {error!r}")
            if weights is not None:
                weights = torch.tensor(weights, dtype=torch.float64)
                if weights.shape != (len(pilot) - 1,) or not bool(((weights >= 0) & (weights <= 1)).all()):
                    raise ValueError(f"weights must be {len(pilot) - 1} numbers in [0, 1], one per pilot step")
            return cls(times=times, nfe=counts["nfe"], batch=counts["batch"], pilot_times=pilot, sde=sde,
                       order=order, error=error, adjoint_nfe=counts["adjoint_nfe"], weights=weights,
                       settings=dict(meta["settings"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path {name!r} is not a valid PilotGrid file (missing or malformed entry: {err}).") \
                from None


GRID_FORMAT = "sdegen.grid"  # the "format" entry of a saved grid file
GRID_VERSION = 1


def save_grid(path: Union[str, os.PathLike], times: torch.Tensor, sde: SDE, *, kind: str = "grid",
              **meta: Any) -> None:
    """Write a time grid for ``sde`` as JSON: {"format", "version", "kind", "sde": sde.describe(), "times",
    **meta}. The file appears atomically (written to a temporary name, then renamed); ``meta`` must be plain
    JSON data. ValueError when ``sde.config()`` does not rebuild ``sde`` (see :meth:`sdegen.SDE.check_description`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike file name; got {type(path).__name__} {path!r}.")
    times = check_grid(sde, times, "times")
    record = {"format": GRID_FORMAT, "version": GRID_VERSION, "kind": kind, "sde": sde.check_description(),
              "times": times.tolist(), **meta}
    text = json.dumps(record, indent=1)  # Python's float repr round-trips float64 exactly
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_grid(path: Union[str, os.PathLike], sde: Optional[SDE] = None, *, kind: Optional[str] = None
              ) -> Tuple[torch.Tensor, SDE, Dict[str, Any]]:
    """Read a file of :func:`save_grid`: (times as a validated float64 grid, the SDE (``sde`` if given, after
    checking that it describes the same process as the file's), the remaining entries). ``kind`` (if given)
    must match the file's. Raises FileNotFoundError for a missing file and ValueError naming the path for a
    file that is not a grid, is of another kind, another SDE, or holds an invalid grid."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike file name; got {type(path).__name__} {path!r}.")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"path {name!r}: no such grid file.")
    try:
        with open(name) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"path {name!r} is not a grid file of sdegen (not JSON: {err}).") from None
    if not isinstance(record, dict) or record.get("format") != GRID_FORMAT:
        raise ValueError(f"path {name!r} is not a grid file of sdegen (format {GRID_FORMAT!r} expected).")
    if record.get("version") != GRID_VERSION:
        raise ValueError(f"path {name!r}: grid file version {record.get('version')!r}; this sdegen reads version "
                         f"{GRID_VERSION}.")
    if kind is not None and record.get("kind") != kind:
        raise ValueError(f"path {name!r} holds a {record.get('kind')!r}, not a {kind!r}.")
    if sde is not None:  # compared as data: the file's SDE class is looked up only when no sde is given
        check_sde(sde)
        if sde.describe() != record.get("sde"):
            raise ValueError(f"sde: the grid in {name!r} was made for {record.get('sde')!r}, not for "
                             f"{sde.describe()!r}.")
    else:
        sde = SDE.from_description(record.get("sde"))
    times = record.get("times")
    if not (isinstance(times, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in times)):
        raise ValueError(f"path {name!r}: 'times' must be a list of numbers; got {str(times)[:60]}.")
    times = check_grid(sde, torch.tensor(times, dtype=torch.float64), f"times in {name!r}")
    meta = {k: v for k, v in record.items() if k not in ("format", "version", "kind", "sde", "times")}
    return times, sde, meta


PILOT_ORDER = 3  # the pilot's predictor order: the local error it controls (the predictor's) is O(h^4)
PILOT_ERRORS = ("local", "global")


def pilot_grid(sde: SDE, score: Any = None, steps: Optional[int] = None, shape: Optional[Sequence[int]] = None, *,
               order: int = 3, batch: int = 64, rtol: float = 1e-3, atol: float = 1e-3,
               seed: Union[int, torch.Generator, None] = 0, t_min: Optional[float] = None,
               t_max: Optional[float] = None, dtype: torch.dtype = torch.float64, device=None, error: str = "global",
               model: Any = None) -> PilotGrid:
    """A grid of ``steps`` steps for a fixed-step sampler of global ``order``, laid out as the adaptive solver lays
    out its own steps on this model: no constant of the data or of the SDE enters.

    A pilot run of the adaptive exponential multistep solver (``method="adaptive"``, order 3, controlling the
    predictor's local error: :class:`sdegen.samplers.AdaptiveMultistep` with ``error="predictor"``) takes ``batch``
    draws of shape (batch, *shape) from the prior (placed at ``t_max`` when it is below T: the grid is then laid out
    for states at t_max of the prior's spread, which suits a run started there from the prior)
    (``seed``: an int, a torch.Generator, or None for torch's global generator; the adjoint's random cotangents
    come from it too) from t_max to t_min at tolerances ``rtol``/``atol``. Its controller keeps the local error
    of each accepted step u_k -> u_k + h_k (u = log(m/s)) at the tolerance, C(u) h^{p+1} = tol with p = 3, so
    1/h(u) = (C(u)/tol)^{1/(p+1)} is a step density. A fixed-step method of order q with N steps has the smallest
    global error when its local errors C h^{q+1} are equal (equidistribution, Hairer, Norsett & Wanner, "Solving
    ODEs I", section II.4), i.e. at density proportional to C^{1/(q+1)} = (1/h)^{(p+1)/(q+1)}. The density is
    taken constant on each pilot step, integrated in u, and its integral divided into ``steps`` equal parts.

    error="global" (the default, and ``schedule="pilot"`` in :func:`sdegen.sample`; error="local" is
    ``"pilot_local"``, the density above) equidistributes the local errors' share of the global error instead (goal-oriented, dual-weighted step
    selection: Estep, Larson & Williams 2000, "Estimating the error of numerical solutions of systems of
    reaction-diffusion equations", section 3; Cao & Petzold 2004, "A posteriori error estimation and global error
    control for ODEs by the adjoint method"). The endpoint error is the sum over steps of Phi'(t_N <- t_k) le_k, the
    local error le_k carried to the end by the linearised flow. The adjoint of the probability-flow ODE
    (:func:`flow_adjoint`), run backwards over the pilot's accepted states from a random cotangent lambda ~ N(0, I)
    per draw, gives w_k = lambda_k . le_k with E[w_k^2] = |Phi'(t_N <- t_k) le_k|^2, le_k the pilot's own error
    estimate (corrector minus predictor) of step k. The step weight W_k = RMS over the draws of w_k (scaled to a
    largest value of 1) multiplies the local error rate: the density is (W C)^{1/(q+1)}. Errors made where the flow
    contracts (inside a mode) count less, and errors made where it separates trajectories (while they choose a mode)
    count more. Where the weights fall by orders of magnitude the density would allow steps far beyond the pilot's,
    outside the range where its local error model was measured and where a multistep sampler keeps its stability:
    the grid's steps grow by at most the pilot controller's own limit (``max_factor`` = 2) per step (``growth`` of
    :func:`grid_from_step_sizes`). No tolerance enters beyond the pilot's. Cost: one vector-Jacobian product of the
    model per accepted pilot step (``PilotGrid.adjoint_nfe``, counted in ``nfe``); the model must be differentiable
    in x (torch autograd).

    Cost: the pilot's model calls (``PilotGrid.nfe``, 70-180 at the default settings on the problems of benchmarks/suite_solvers.py, 100 on
    average), each on ``batch``
    examples; :func:`sdegen.sample` with ``schedule="pilot"`` or ``"pilot_local"`` reports them as
    ``SampleInfo.pilot_nfe`` and runs the pilot on every call: to reuse a grid, compute it once and pass
    ``PilotGrid.times`` as the schedule (or :meth:`PilotGrid.save` it next to the model and :meth:`PilotGrid.load`
    it).
    """
    from .models import as_model
    from .sampling import sample  # the driver imports this module

    score, _ = renamed("pilot_grid", "score", score, "model", model)
    _require_model_steps_shape("pilot_grid", score, steps, shape)
    steps = check_int(steps, "steps", lo=1)
    order = check_int(order, "order", lo=1, hint=" (the global order of the sampler the grid is for)")
    batch = check_int(batch, "batch", lo=1)
    if error not in PILOT_ERRORS:
        raise ValueError(f"error must be one of {PILOT_ERRORS} (the error the grid equidistributes); got {error!r}.")
    seed = check_seed(seed)
    ends = time_grid(sde, 1, "uniform", t_min=t_min, t_max=t_max)
    model = as_model(score, sde)
    check_state_dtype(dtype, "dtype")
    x = sde.prior_sample((batch,) + tuple(shape), seed=seed, dtype=dtype, device=device)
    pilot = _recording_pilot(rtol, atol)
    with torch.no_grad():
        _, info = sample(sde, model, x, method=pilot, schedule=ends, return_info=True)
    accepted = torch.tensor(pilot.stats["times"], dtype=torch.float64)
    if len(pilot.record) != len(accepted) - 1:
        raise RuntimeError(f"the pilot recorded {len(pilot.record)} states for {len(accepted) - 1} accepted steps.")
    if len(accepted) < 3:  # one step (or none) spans it: no density of steps to lay a grid out from
        taken = len(accepted) - 1
        raise ValueError(f"t_min, t_max: the span [{float(ends[-1])!r}, {float(ends[0])!r}] is too narrow for a "
                         f"pilot (its solver took {taken} step{'' if taken == 1 else 's'} there); use a named "
                         "schedule such as 'log_snr'.")
    u = 0.5 * sde.log_snr(accepted)
    sizes = u[1:] - u[:-1]
    if len(sizes) > 1:  # the last step is cut to land on t_min, not chosen by the controller: its density is the
        sizes[-1] = torch.maximum(sizes[-1], sizes[-2])  # previous step's (a cut step would count as a whole one)
    weights, adjoint_nfe = None, 0
    if error == "global":
        states = torch.stack([state for state, _ in pilot.record])
        local = torch.stack([le for _, le in pilot.record])
        g = torch_generator(seed)
        cot = torch.randn((2,) + tuple(x.shape), generator=g, dtype=torch.float64,
                          device=g.device if g is not None else "cpu")[1].to(device=x.device, dtype=x.dtype)
        lam, adjoint_calls = flow_adjoint(sde, model, accepted[1:], states, cot, return_nfe=True)
        adjoint_nfe = adjoint_calls * model.nfe_per_call  # network evaluations, the unit of info.nfe
        w = (lam * local).reshape(len(local), batch, -1).sum(2).double().pow(2).mean(1).sqrt().cpu()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"error='global': the adjoint weights are not finite ({w.tolist()[:6]}); the model's "
                             "vector-Jacobian products are not usable: use error='local' (schedule='pilot_local').")
        if float(w.max()) > 0.0:  # all 0: the local errors vanish (the integrator is exact there): local density
            weights = w / w.max()
            # a step whose weight is 0 to float precision gets the smallest positive one: its error still counts
            floor = weights[weights > 0].min()
            sizes = sizes * weights.clamp_min(float(floor)).pow(-1.0 / (PILOT_ORDER + 1))
    # the globally weighted density can drop by orders of magnitude where the flow contracts; its grid grows its
    # steps no faster than the pilot's controller was allowed to (max_factor), over which its weights were measured
    times = grid_from_step_sizes(sde, accepted, steps, power=(PILOT_ORDER + 1) / (order + 1), sizes=sizes,
                                 growth=pilot.max_factor if error == "global" else None)
    # an int seed is recorded; a Generator or torch's global generator cannot be, and are written as None
    settings = {"steps": steps, "shape": list(shape), "rtol": rtol, "atol": atol,
                "seed": seed if isinstance(seed, int) else None,
                "dtype": str(dtype).replace("torch.", "")}
    return PilotGrid(times=times, nfe=info.nfe + adjoint_nfe, batch=batch, pilot_times=accepted, sde=sde,
                     order=order, error=error, adjoint_nfe=adjoint_nfe, weights=weights, settings=settings)


def _recording_pilot(rtol: float, atol: float):
    """The pilot solver (AdaptiveMultistep of order PILOT_ORDER) keeping, for each accepted step, the state it
    reached and its local error estimate (corrector minus predictor, in x). The accept test of AdaptiveMultistep
    is ``_error(...) <= 1``; the record follows it.

    The controller holds the predictor's local error (``error="predictor"``, of order PILOT_ORDER + 1 in h) to the
    tolerance: the error model C(u) h^{p+1}, p = PILOT_ORDER, that :func:`pilot_grid` turns into a step density."""
    from .samplers.adaptive import AdaptiveMultistep

    class RecordingPilot(AdaptiveMultistep):
        def _reset(self, ts):
            super()._reset(ts)
            self.record = []

        def _error(self, diff, x, x_new, t, h):
            e = super()._error(diff, x, x_new, t, h)
            if e <= 1.0:
                self.record.append((x_new, diff))
            return e

    return RecordingPilot(rtol=rtol, atol=atol, order=PILOT_ORDER, error="predictor")


def flow_adjoint(sde: SDE, model: Any, times: torch.Tensor, states: torch.Tensor, cotangent: torch.Tensor, *,
                 return_nfe: bool = False):
    """Cotangents lambda_k = Phi'(t_K <- t_k)^T lambda of the probability-flow ODE at the states of a trajectory:
    lambda_k . delta is, to first order, the change of lambda . x(t_K) made by perturbing x(t_k) by delta.

    times: (K,) decreasing float64 times t_1 > ... > t_K of the trajectory's states (the last is the end);
    states: (K, B, ...) the states x(t_k) (a solver's accepted states); cotangent: (B, ...) lambda at t_K.
    Returns lambda_k (K, B, ...) (and the vector-Jacobian products spent, K - 1, with ``return_nfe``).

    In xbar = x/m and u = log(m/s) the flow is dxbar/du = D(xbar) - xbar (D the denoiser, Lu et al. 2022b,
    DPM-Solver++ eq. 9) and its adjoint d mu/du = mu - J_D^T mu (mu = m lambda). Each step back, u_{k+1} -> u_k
    with h = u_{k+1} - u_k, integrates the linear part exactly and freezes J_D^T mu at the later point
    (exponential Euler): mu_k = e^{-h} mu_{k+1} + (1 - e^{-h}) J_D(x_{k+1})^T mu_{k+1}, first order in h; one
    vector-Jacobian product of the model (torch autograd) per step.
    """
    from .models import as_model

    model = as_model(model, sde)
    times = check_grid(sde, times, "times") if len(times) > 1 else torch.as_tensor(times, dtype=torch.float64)
    if states.shape[0] != len(times) or states.shape[1:] != cotangent.shape:
        raise ValueError(f"states must have shape (len(times), *cotangent.shape) = ({len(times)}, "
                         f"{', '.join(map(str, cotangent.shape))}); got {tuple(states.shape)}.")
    m = torch.exp(sde.log_mean_coeff(times))
    std = sde.std(times)
    u = 0.5 * sde.log_snr(times)
    B = cotangent.shape[0]
    mu = float(m[-1]) * cotangent
    out = [mu / float(m[-1])]
    for k in range(len(times) - 2, -1, -1):
        h = float(u[k + 1] - u[k])
        t = times[k + 1].to(device=states.device, dtype=states.dtype).expand(B)
        # autograd also inside a caller's torch.no_grad() or torch.inference_mode() (clones are ordinary tensors)
        with torch.inference_mode(False), torch.enable_grad():
            x = states[k + 1].detach().clone().requires_grad_(True)
            score = model.score(x, t.clone())
            if not score.requires_grad:  # checked on the score: D = (x + s^2 score) / m would carry x's own gradient
                raise TypeError("model: the adjoint needs a model differentiable in x (torch autograd); its score "
                                "has no gradient. Use the pilot's error='local' (schedule='pilot_local').")
            d = torch.add(x, score, alpha=float(std[k + 1]) ** 2) / float(m[k + 1])  # Tweedie's denoiser
            (vjp,) = torch.autograd.grad(d, x, mu.clone())
        mu = math.exp(-h) * mu - math.expm1(-h) * float(m[k + 1]) * vjp
        out.append(mu / float(m[k]))
    lam = torch.stack(out[::-1])
    return (lam, len(times) - 1) if return_nfe else lam


def grid_from_step_sizes(sde: SDE, ts: torch.Tensor, steps: int, power: float = 1.0,
                         sizes: Optional[torch.Tensor] = None, growth: Optional[float] = None) -> torch.Tensor:
    """``steps`` steps placed with density (1/h)^power in u = log(m/s), h the local step sizes of the grid ``ts``
    (constant on each of its steps; ``sizes`` (len(ts) - 1 positive values) replaces them where a step's length is
    not the local step size): the points where the integral of the density reaches k/steps of its total.
    power = 1 without ``sizes`` re-spaces ``ts`` itself to ``steps`` steps (piecewise linearly in u).

    growth (> 1, optional): no step is longer than ``growth`` times the step before it (in the order the grid is
    walked). The local step H(u) = 1/(c rho(u)) of the density rho is replaced by its largest minorant of slope at
    most log(growth), min over v <= u of H(v) + log(growth)(u - v) (a step placed where H rises with slope L is e^L
    times the one before it), and c is chosen (bisection) so that it makes ``steps`` steps: steps shrink freely, but
    grow only as fast as a step-size controller with that limit lets them (variable-step multistep methods are
    stable and keep their error constants for bounded step ratios: Hairer, Norsett & Wanner, "Solving ODEs I",
    section III.5)."""
    ts = check_grid(sde, ts, "ts")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0; got {power!r}.")
    if growth is not None and not (isinstance(growth, (int, float)) and 1.0 < growth < math.inf):
        raise ValueError(f"growth must be None or a finite number > 1 (the largest ratio of a step to the one "
                         f"before it); got {growth!r}.")
    u = 0.5 * sde.log_snr(ts)
    h = u[1:] - u[:-1]
    if sizes is None:
        sizes = h
    elif not (isinstance(sizes, torch.Tensor) and sizes.shape == h.shape and bool((sizes > 0).all())):
        raise ValueError(f"sizes must be a tensor of {len(h)} positive step sizes; got {sizes!r}.")
    density = sizes.to(h).pow(-power)
    if growth is not None:
        u, h, density = _limit_growth(u, density, steps, growth)
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(h * density, 0)])
    target = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) * mass[-1]
    k = torch.searchsorted(mass, target, right=True).clamp(1, len(mass) - 1)
    frac = ((target - mass[k - 1]) / (mass[k] - mass[k - 1])).clamp(0.0, 1.0)
    out = sde.t_from_log_snr(2.0 * (u[k - 1] + frac * h[k - 1]))
    out[0], out[-1] = ts[0], ts[-1]  # exact end points despite round-off in the inverse map
    return out


def _limit_growth(u: torch.Tensor, density: torch.Tensor, steps: int, growth: float, cells: int = 4096):
    """(nodes, cell lengths, density) of the growth-limited density of :func:`grid_from_step_sizes` on ``cells``
    equal cells of u (fine against any grid of ``steps`` << cells steps)."""
    fine = torch.linspace(float(u[0]), float(u[-1]), cells + 1, dtype=torch.float64)
    du = fine[1:] - fine[:-1]
    k = torch.searchsorted(u, 0.5 * (fine[1:] + fine[:-1]), right=True).clamp(1, len(u) - 1) - 1
    rho = density[k]
    ramp = math.log(growth) * (fine[:-1] - fine[0])

    def minorant(c):  # min over v <= u of H(v) + log(growth)(u - v), with H = 1/(c rho)
        return torch.cummin(1.0 / (c * rho) - ramp, 0).values + ramp

    total = float((du * rho).sum())
    lo, hi = math.log(steps / total) - 60.0, math.log(steps / total)  # n(c) <= c * total; n -> 0 as c -> 0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float((du / minorant(math.exp(mid))).sum()) > steps:
            hi = mid
        else:
            lo = mid
    return fine, du, 1.0 / minorant(math.exp(hi))


def resolve_grid(sde: SDE, steps: int, schedule: Union[str, torch.Tensor], *, t_min: Optional[float], model: Any,
                 x: torch.Tensor, order: int) -> Tuple[torch.Tensor, int, int]:
    """The driver's grid: (times, network evaluations and classifier gradients spent finding them, counted at the
    model). "pilot" ("pilot_local") runs :func:`pilot_grid`
    with error="global" ("local") for a sampler of ``order`` on draws shaped like ``x``; "sensitivity" runs
    :func:`sdegen.sensitivity_grid.sensitivity_grid` for it; every other schedule is :func:`time_grid`'s and costs
    no call."""
    if isinstance(schedule, str) and (schedule in PILOT_SCHEDULES or schedule == SENSITIVITY):
        from .models import CountingModel, as_model
        from .sensitivity_grid import sensitivity_grid  # it builds on time_grid: imported here, not at the top
        # the pilot's own batch of prior draws: a model holding per-example data (a guided model's labels) serves
        # it with its examples' data in turn
        batch = 64
        rows = torch.arange(batch, device=x.device) % x.shape[0]
        counted = CountingModel(as_model(model, sde).rows(rows))
        if schedule == SENSITIVITY:
            times = sensitivity_grid(sde, counted, steps, tuple(x.shape[1:]), order=order, batch=batch, t_min=t_min,
                                     dtype=x.dtype, device=x.device)[0]
        else:
            times = pilot_grid(sde, counted, steps, tuple(x.shape[1:]), order=order, batch=batch, t_min=t_min,
                               dtype=x.dtype, device=x.device, error=PILOT_SCHEDULES[schedule]).times
        return times, counted.nfe, counted.classifier_nfe
    if isinstance(schedule, torch.Tensor):  # explicit times fix the steps (the driver checked a given count)
        return time_grid(sde, None, schedule), 0, 0
    return time_grid(sde, steps, schedule, t_min=t_min), 0, 0


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
    if not 0.0 < float(ts[-1]):
        raise ValueError(f"{name}: grid times must lie in (0, T={sde.T:g}]; got [{float(ts[-1]):g}, "
                         f"{float(ts[0]):g}].")
    if float(ts[0]) != sde.T and float(ts[0]) == float(torch.tensor(sde.T, dtype=torch.float32)):
        ts = ts.clone()  # T written in float32 (0.999 rounds up by 1.3e-8) is T
        ts[0] = sde.T
        if float(ts[1]) >= sde.T:
            raise ValueError(f"{name}: an explicit time grid must be strictly decreasing; its first two times round "
                             f"to T={sde.T!r}.")
    if float(ts[0]) > sde.T:
        raise ValueError(f"{name}: grid times must lie in (0, T={sde.T!r}]; got [{float(ts[-1]):g}, "
                         f"{float(ts[0])!r}].")
    return ts


def _require_model_steps_shape(where: str, score: Any, steps: Any, shape: Any) -> None:
    missing = [name for name, value in (("score", score), ("steps", steps), ("shape", shape)) if value is None]
    if missing:
        raise TypeError(f"{where} needs {', '.join(missing)}: {where}(sde, score, steps, shape).")


def check_sde(sde: SDE) -> SDE:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE (e.g. sdegen.VPSDE()); got {type(sde).__name__}.")
    return sde.check_contract()
