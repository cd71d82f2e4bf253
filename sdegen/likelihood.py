"""Exact log-likelihoods of score-based models through the probability-flow ODE.

The probability-flow ODE dx/dt = f~(x, t) = f(t) x - 1/2 g(t)^2 s(x, t) (Song et al. 2021, eq. 13) is a
continuous normalizing flow, so by the instantaneous change of variables (Chen et al. 2018, theorem 1;
Song et al. 2021, section 4.3 and appendix D.2)

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{T} div f~(x_t, t) dt,

where x_t solves the ODE from x_{t_min} = x. :func:`log_likelihood` integrates the augmented state
(x_t, int div f~) forward in time with torchdiffeq, the divergence exact or estimated by Hutchinson-Skilling
probes held fixed along the solve (:mod:`sdegen.divergence`); ``solver="multistep"`` integrates it instead in
y = x/m against log sigma with one evaluation per step (:mod:`sdegen.likelihood_multistep`). For discrete data, :func:`dequantize` and
:func:`bits_per_dim` give bits per dimension under uniform dequantization.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._deprecation import renamed
from ._util import batch_time, check_finite_tensor
from ._validate import (check_callable, check_choice, check_flag, check_int, check_number, check_tensor,
                        reject_inapplicable)
from .models import as_model
from .backends import ODE_METHODS, clock_for, is_adaptive_ode_method, solve_augmented
from .errors import SolverError, check_on_failure, nonfinite_rows, scatter_rows, solve_without_failures
from .divergence import (PROBE_KINDS, check_differentiable_output, divergence_exact, divergence_hutchinson,
                         make_probes)
from .noise import Seed, make_seeds, normal_from_seeds
from .sde import SDE
from .likelihood_multistep import MultistepLikelihood

DIVERGENCES = ("hutchinson", "exact")
_LN2 = math.log(2.0)
MULTISTEP = "multistep"
SOLVERS = (MULTISTEP,) + tuple(ODE_METHODS)


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` computed, per example.

    log_prob: (B,) log p_{t_min}(x) in nats (for ``levels=...``: the dequantized lower bound on log P(x) of
        the discrete data, in nats, with the density of the scaled data converted as in :func:`bits_per_dim`).
    bpd: (B,) bits per dimension, -log_prob / (D ln 2) (see :func:`bits_per_dim` for discrete data).
    latent: x_T, the end of the flow, x's shape.
    prior_log_prob: (B,) log p_T(x_T) under the prior used.
    delta_log_prob: (B,) the integral of the divergence from t_min to T.
    nfe: evaluations of the augmented field (each one score forward pass plus its backward pass(es)).
    steps: accepted solver steps (of the last attempt under ``on_failure="mask"``). wall_time: seconds.
    t_min, T: the integration interval.
    failed: indices of the examples set aside under ``on_failure="mask"`` (their entries are NaN).
    """

    log_prob: torch.Tensor
    bpd: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: int
    steps: int
    wall_time: float
    t_min: float
    T: float
    failed: List[int] = dataclass_field(default_factory=list)


class _AugmentedFlow(torch.nn.Module):
    """d/dt (x, l) = (f~(x, t), div f~(x, t)) on flattened states y = (x, l) of shape (B, D + 1)."""

    def __init__(self, sde: SDE, score: Callable, event_shape: Tuple[int, ...], t_lo: float, t_hi: float,
                 probes: Optional[torch.Tensor], chunk_size: Optional[int], on_time: Optional[Callable] = None):
        super().__init__()
        self.on_time = on_time
        # the model is a submodule, so that adjoint solves find its parameters
        self.sde, self.model, self.event_shape = sde, as_model(score, sde), event_shape
        self.t_lo, self.t_hi, self.probes, self.chunk_size = t_lo, t_hi, probes, chunk_size

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = check_differentiable_output(self.model.score(x, batch_time(t, x).to(x.dtype)), x, "score(x, t)")
        return self.sde.reverse_drift(x, t, s, True)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # solvers probe past the interval's end; the score is only asked for times inside [t_min, T]
        t = t.clamp(self.t_lo, self.t_hi)
        if self.on_time is not None:
            self.on_time(t)
        x = y[:, :-1].reshape((y.shape[0],) + self.event_shape)
        field = lambda z: self.drift(z, t)  # noqa: E731
        if self.probes is None:
            f, div = divergence_exact(field, x, chunk_size=self.chunk_size)
        else:
            f, div = divergence_hutchinson(field, x, self.probes)
        return torch.cat([f.reshape(y.shape[0], -1), div[:, None].to(f.dtype)], dim=1)


class _TimeBar:
    """A tqdm bar of the latest time (from t_min up to T) at which the augmented field was evaluated."""

    def __init__(self, t_lo: float, t_hi: float):
        from tqdm.auto import tqdm

        self.t_lo, self.done = t_lo, 0.0
        self.bar = tqdm(total=t_hi - t_lo, desc="log_likelihood", bar_format="{l_bar}{bar}| {postfix}")

    def __call__(self, t: torch.Tensor) -> None:
        done = min(float(t) - self.t_lo, self.bar.total)
        if done > self.done:
            self.bar.set_postfix_str(f"t={float(t):.4g}", refresh=False)
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        self.bar.close()


def _check_x(x: torch.Tensor) -> None:
    check_tensor(x, "x", batch=True)
    if x[0].numel() < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1 and at least one value per example; "
                         f"got {tuple(x.shape)}.")


@dataclass
class _Settings:
    """The options of :func:`log_likelihood` with the defaults of those left unset filled in."""

    solver: str
    adaptive: bool
    probes: int
    probe: str
    rtol: float
    atol: float
    max_steps: int
    data_range: Tuple[float, float]


def _resolve_options(divergence: str, probes: Optional[int], probe: Tuple[Optional[str], str],
                     solver: Tuple[Optional[str], str], rtol: Optional[float], atol: Optional[float],
                     steps: Optional[int], max_steps: Optional[int], chunk_size: Optional[int], adjoint: bool,
                     adjoint_params, levels: Optional[int], data_range, on_failure: str) -> _Settings:
    """Check the options and fill in the defaults; ``probe`` and ``solver`` are (value or None, the name the caller
    gave it under). An option passed explicitly that cannot apply to the chosen divergence or solver raises
    ValueError naming it, rather than being ignored."""
    (solver, solver_name), (probe, probe_name) = solver, probe
    check_choice(divergence, "divergence", DIVERGENCES)
    check_int(probes, "probes", lo=1, none_ok=True, hint=" (Hutchinson probes per example)")
    if probe is not None and probe not in PROBE_KINDS:
        raise ValueError(f"{probe_name} must be one of {PROBE_KINDS} (the law of the Hutchinson probes); "
                         f"got {probe!r}.")
    solver = "dopri5" if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"{solver_name} must be 'multistep' or a torchdiffeq method, one of {SOLVERS}; "
                         f"got {solver!r}.")
    for name, v in (("rtol", rtol), ("atol", atol)):
        check_number(v, name, lo=0.0, lo_open=True, none_ok=True)
    check_int(steps, "steps", lo=1, none_ok=True)
    check_int(max_steps, "max_steps", lo=1, none_ok=True)
    check_int(chunk_size, "chunk_size", lo=1, none_ok=True)
    check_flag(adjoint, "adjoint")
    check_on_failure(on_failure)
    if divergence == "exact":
        reject_inapplicable({"probes": probes, probe_name: probe}, "it applies to divergence='hutchinson' (the "
                            "probes of the estimate), while the exact divergence draws none")
    else:
        reject_inapplicable({"chunk_size": chunk_size}, "it applies to divergence='exact' (basis vectors per "
                            "vmapped backward pass), while the Hutchinson estimate takes one pass per probe")
    adaptive = solver == MULTISTEP or is_adaptive_ode_method(solver)
    if adaptive:
        reject_inapplicable({"steps": steps}, f"the adaptive solver {solver!r} chooses its own steps (set "
                            "rtol/atol); for a fixed number of steps pass solver='rk4' (or 'euler', 'midpoint') "
                            "with steps")
    else:
        reject_inapplicable({"rtol": rtol, "atol": atol, "max_steps": max_steps}, f"it applies to the adaptive "
                            f"solvers ('dopri5', 'multistep', ...), while {solver!r} takes a fixed grid of `steps` "
                            "equal steps")
    if not adjoint:
        reject_inapplicable({"adjoint_params": adjoint_params}, "it names the tensors that receive gradients under "
                            "adjoint=True")
    if levels is None:
        reject_inapplicable({"data_range": data_range}, "it is the range of discrete data given with levels=...")
    if adjoint and solver == MULTISTEP:
        raise ValueError(f"{solver_name}='multistep' does not support adjoint=True (its steps are not a "
                         "torchdiffeq solve); pass solver='dopri5' (the default under adjoint=True) for gradients.")
    return _Settings(solver, adaptive, 1 if probes is None else probes, "rademacher" if probe is None else probe,
                     1e-5 if rtol is None else float(rtol), 1e-5 if atol is None else float(atol),
                     10_000 if max_steps is None else max_steps,
                     (-1.0, 1.0) if data_range is None else tuple(data_range))


LIKELIHOOD_SIGMA = 1.0 / 1024.0  # an eighth of one 8-bit bin (2/256) of data in [-1, 1]


def default_t_min(sde: SDE) -> float:
    """The t_min :func:`log_likelihood` starts from by default: the time at which the kernel's std
    sigma(t) = s(t)/m(t) is :data:`LIKELIHOOD_SIGMA` = 1/1024, an eighth of one 8-bit bin of data scaled to [-1, 1]
    (the blur then changes log p by a small fraction of what the data's own resolution does), or ``sde.t_min``
    when that is earlier (an SDE whose kernel is that narrow sooner, or never: VE's "paper" kernel).
    VP (beta_min = 0.1): t ~ 9.5e-6; cosine VP: 2.5e-5; EDM and flow: about 1/1024; sub-VP (whose std grows like
    beta_min t near 0, against sqrt(beta_min t) for VP) and VE: ``sde.t_min``.
    An SDE whose ``t_min_is_earliest`` (a :class:`sdegen.DiscreteVPSDE`: the table's first timestep) starts at its
    ``t_min``."""
    if sde.t_min_is_earliest:
        return float(sde.t_min)
    t = float(sde.t_from_sigma(torch.tensor(LIKELIHOOD_SIGMA, dtype=torch.float64)))
    return t if 0.0 < t < sde.t_min else float(sde.t_min)


def _resolve_t_min(sde: SDE, t_min: Optional[float]) -> float:
    if t_min is None:
        return default_t_min(sde)
    return check_number(t_min, "t_min", lo=0.0, hi=sde.T, lo_open=True, hi_open=True)


def _prior_log_prob(prior: Optional[Callable], sde: SDE, x_T: torch.Tensor) -> torch.Tensor:
    lp = sde.prior_log_prob(x_T) if prior is None else prior(x_T)
    if not isinstance(lp, torch.Tensor) or lp.shape != (x_T.shape[0],):
        got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ValueError(f"prior(x_T) must return one log-density per example, shape (B,) for x_T of shape (B, ...): "
                         f"({x_T.shape[0]},) for the batch of {x_T.shape[0]} it was called with; got {got}.")
    return lp.to(x_T.dtype)


def log_likelihood(sde: SDE, score, x: torch.Tensor, *, divergence: str = "hutchinson", probes: Optional[int] = None,
                   probe: Optional[str] = None, solver: Optional[str] = None, rtol: Optional[float] = None,
                   atol: Optional[float] = None, steps: Optional[int] = None, t_min: Optional[float] = None,
                   prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, seed: Seed = None,
                   max_steps: Optional[int] = None, adjoint: bool = False,
                   adjoint_params: Optional[Sequence[torch.Tensor]] = None, chunk_size: Optional[int] = None,
                   levels: Optional[int] = None, data_range: Optional[Tuple[float, float]] = None,
                   method: Optional[str] = None, noise: Optional[str] = None,
                   on_failure: str = "raise", progress: bool = False) -> LikelihoodResult:
    """Per-example log p_{t_min}(x) through the probability-flow ODE (Song et al. 2021, appendix D.2).

    Args:
        sde: the forward SDE; score: a callable ``score(x, t)`` (t of shape (B,)), a :class:`sdegen.ScoreModel`,
            or an oracle with ``score_fn(sde)``. It must be differentiable in x and example i must depend only on x[i].
        x: data (B, ...), float32 or float64, any device; never modified.
        divergence: "exact" (trace of the Jacobian, D vmapped vector-Jacobian products) or "hutchinson".
        probes, probe: Hutchinson probes per example (default 1) and their law, "rademacher" (default) or
            "gaussian"; the probes are drawn once per example from ``seed`` and held fixed along the solve. K probes
            cost K vector-Jacobian products per evaluation, so for K >= D the exact divergence is as cheap and has
            no variance. With ``divergence="exact"`` they do not apply, and passing one raises ValueError.
        seed: an int, a (B,) integer tensor or a torch.Generator for the probes and the dequantization noise.
            None: B seeds are drawn once from torch's global generator, and only when something random needs them
            (Hutchinson probes, ``levels``); the exact divergence of continuous data leaves it untouched.
        solver, rtol, atol: the torchdiffeq method ("dopri5" by default; the ``solver`` of
            ``sdegen.sample(method="ode", solver=...)``) or "multistep", and the tolerances of the adaptive ones
            (default 1e-5 each; with a fixed-grid method they do not apply and raise ValueError); the error is
            controlled for every example (not for a batch average): the RMS of its state's and log-density term's
            error ratios. At the same rtol/atol dopri5 takes 1.0-1.55x the evaluations of dopri5 with
            torchdiffeq's batch-average norm, and the worst example's error is usually 2-20x smaller
            (benchmarks/results/likelihood_nfe.md). "multistep" (:mod:`sdegen.likelihood_multistep`): an adaptive
            exponential multistep predictor-corrector in y = x/m and log sigma, one evaluation per step, the same
            per-example norm; on 14 mixture problems under seven SDEs it took 0.56-1.43x the evaluations of that
            batch-norm dopri5 (median 0.9; the rows above 1 mostly at rtol = atol = 1e-3) with a worst error below
            dopri5's in every row, often 10-100x (benchmarks/results/likelihood_nfe_multistep.md);
            it has no adjoint (``adjoint=True`` raises ValueError: use dopri5).
            ``steps``: the step count of fixed-grid methods ("rk4", "euler", ...); adaptive methods choose their
            own and raise ValueError when given one.
        t_min: start of the integration; the result is log p_{t_min}, the density of the data blurred by the
            kernel of std sigma(t_min) = s/m, which tends to log p_0 as t_min -> 0. Default
            (:func:`default_t_min`): the time at which sigma = 1/1024, an eighth of one 8-bit bin of data in
            [-1, 1], or ``sde.t_min`` if smaller; for VP that is t ~ 1e-5 instead of the sampling default 1e-3,
            whose kernel (std 0.01, wider than a bin) costs ~0.06 nats/dim on the 2-D ring against ~0.001
            (benchmarks/results/likelihood_t_min.md). Pass ``t_min=sde.t_min`` for the sampling end time, e.g.
            for a network trained only on [sde.t_min, T]; ``LikelihoodResult.t_min`` says which was used.
        progress: show a tqdm bar of the time reached (from t_min up to T).
        prior: log-density of x_T, ``prior(x_T) -> (B,)``; default ``sde.prior_log_prob``.
        max_steps: adaptive step limit (default 10_000); running out raises :class:`sdegen.SolverError` (a
            RuntimeError) naming the examples that limited the step. A fixed grid takes exactly ``steps`` steps,
            and ``max_steps`` with a fixed-grid method raises ValueError.
        on_failure: "raise" (default): an adaptive solve that cannot go on (a non-finite state, log term or
            derivative, a step size that underflows) raises :class:`sdegen.SolverError` naming the
            examples responsible, the time reached and the last step size; "mask": those examples are set aside
            and the solve restarts on the others (the batch shares its steps, so their result equals a solve of
            them alone), the failed entries are NaN and their indices are in ``LikelihoodResult.failed``.
            A fixed-grid method moves every example on its own, so an example whose state or log term became
            non-finite costs the others nothing: "raise" raises SolverError naming it and the earliest time its
            field was non-finite, "mask" returns its entries as NaN, its index in ``failed``, with no restart.
        adjoint: gradients through the result (to x and the score's parameters) by the adjoint method
            (torchdiffeq.odeint_adjoint, memory constant in the steps), for maximum-likelihood fine-tuning.
            Without it the solve runs without a graph and the result carries no gradient.
        adjoint_params: the tensors to receive gradients under ``adjoint=True`` (without it: ValueError); default:
            the parameters of the score when it is a ``torch.nn.Module`` (pass them explicitly for a plain
            function closing over a net).
        chunk_size: basis vectors per vmapped backward pass of the exact divergence (with
            ``divergence="hutchinson"``, which takes one backward pass per probe: ValueError).
        levels, data_range: for discrete data with ``levels`` values per dimension scaled to ``data_range``
            (default (-1, 1); without ``levels``: ValueError), x is dequantized (:func:`dequantize`, seeded by
            ``seed``) and ``bpd`` is that of the discrete data (:func:`bits_per_dim`).
        method, noise: deprecated names of ``solver`` and ``probe`` (DeprecationWarning; both names: ValueError).
    Returns:
        :class:`LikelihoodResult` (log_prob and bpd of shape (B,), latent x_T, NFE, steps).
    """
    solver, solver_name = renamed("log_likelihood", "solver", solver, "method", method)
    probe, probe_name = renamed("log_likelihood", "probe", probe, "noise", noise)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE (e.g. sdegen.VPSDE()); got {type(sde).__name__}.")
    sde.check_contract()
    _check_x(x)
    opt = _resolve_options(divergence, probes, (probe, probe_name), (solver, solver_name), rtol, atol, steps,
                           max_steps, chunk_size, adjoint, adjoint_params, levels, data_range, on_failure)
    check_flag(progress, "progress")
    t_lo, t_hi = _resolve_t_min(sde, t_min), float(sde.T)
    start = time.perf_counter()
    B, event_shape, D = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    if prior is not None:  # its output shape is checked before the solve, on one example
        _prior_log_prob(check_callable(prior, "prior", "a callable prior(x_T) -> (B,) log-densities"), sde,
                        x.new_zeros((1,) + event_shape))
    # the exact divergence of continuous data draws nothing: no seeds are taken from torch's global generator
    random = divergence == "hutchinson" or levels is not None
    seeds = make_seeds(seed, B, x.device) if random or seed is not None else None
    data = dequantize(x, levels, data_range=opt.data_range, seed=seeds) if levels is not None else x
    probe_vs = None
    if divergence == "hutchinson":
        probe_vs = make_probes(x.shape, opt.probes, opt.probe, seed=seeds, dtype=x.dtype, device=x.device)
    nfe = [0]
    bar = _TimeBar(t_lo, t_hi) if progress else None
    model = as_model(score, sde)

    def solve(keep: Optional[torch.Tensor]):
        """(y1 = (x_T flattened, int div f~) of the examples ``keep``, steps, the fixed grid's failure times)."""
        sub, vs = (src, probe_vs) if keep is None else (src[keep], None if probe_vs is None else probe_vs[:, keep])
        sub_model = model if keep is None else model.rows(keep)
        if opt.solver == MULTISTEP:
            return _solve_multistep(sde, sub_model, sub, vs, t_lo, t_hi, opt, chunk_size, bar, nfe) + (None,)
        field = _AugmentedFlow(sde, sub_model, event_shape, t_lo, t_hi, vs, chunk_size, on_time=bar)
        y0 = torch.cat([sub.reshape(sub.shape[0], D), sub.new_zeros(sub.shape[0], 1)], dim=1)
        tolerances = dict(rtol=opt.rtol, atol=opt.atol, max_steps=opt.max_steps) if opt.adaptive else {}
        try:
            y1, info = solve_augmented(field, y0, t_lo, t_hi, method=opt.solver, steps=steps, adjoint=adjoint,
                                       adjoint_params=None if adjoint_params is None else tuple(adjoint_params),
                                       clock=clock_for(sde, opt.adaptive),
                                       **tolerances)
        except SolverError as err:
            nfe[0] += getattr(err, "nfe", 0)
            raise
        nfe[0] += info["nfe"]
        return y1, info["steps"], info["failed_at"]

    with torch.set_grad_enabled(adjoint and torch.is_grad_enabled()):
        src = data if adjoint else data.detach()
        try:
            result, keep, failed = solve_without_failures(solve, B, on_failure, x.device)
        finally:
            if bar is not None:
                bar.close()
        n_steps = 0 if result is None else result[1]
        if result is not None and result[2] is not None:  # a fixed grid: examples that failed on their own
            result, keep, lost = _set_aside_on_grid(result, keep, B, on_failure, opt.solver, t_lo, t_hi)
            failed = sorted(failed + lost)
        per_example = x.new_empty(0)
        if result is None:  # every example failed
            latent, prior_lp, delta = (scatter_rows(None, keep, B, like) for like in (x, per_example, per_example))
        else:
            y1 = result[0]
            latent_kept = y1[:, :-1].reshape((y1.shape[0],) + event_shape)
            latent = scatter_rows(latent_kept, keep, B, x)
            prior_kept = _prior_log_prob(prior, sde, latent_kept)
            wrong = torch.isnan(prior_kept) | (prior_kept == math.inf)  # -inf is a density of 0, a valid answer
            if prior is not None and bool(wrong.any()):  # one host read, after the solve
                raise ValueError(f"prior(x_T) returned NaN or +inf log-densities for examples "
                                 f"{keep[wrong].tolist()[:10]} (of {B}), at finite latents; check the prior.")
            prior_lp = scatter_rows(prior_kept, keep, B, per_example)
            delta = scatter_rows(y1[:, -1], keep, B, per_example)
        log_prob = prior_lp + delta
        if levels is not None:
            lo, hi = opt.data_range
            log_prob = log_prob + D * (math.log(hi - lo) - math.log(levels))
        bpd = -log_prob / (D * _LN2)
    return LikelihoodResult(log_prob, bpd, latent, prior_lp, delta, nfe[0], n_steps,
                            time.perf_counter() - start, t_lo, t_hi, failed)


def _set_aside_on_grid(result, keep: torch.Tensor, B: int, on_failure: str, solver: str, t_lo: float, t_hi: float):
    """The examples of a fixed-grid solve whose state or log term ended non-finite: under "raise" a
    :class:`SolverError` naming them and the earliest time their field was non-finite; under "mask" they join
    the failed examples. Returns (the result of the others or None, their indices, the indices set aside)."""
    y1, n_steps, failed_at = result
    lost = nonfinite_rows(y1)
    if not bool(lost.any()):  # one host read, after the solve
        return result, keep, []
    where = keep[lost].tolist()
    if on_failure == "raise":
        first = failed_at[lost]
        if bool(torch.isnan(first).all()):
            t, when = t_hi, "their field stayed finite and the state overflowed"
        else:
            t, when = float(first.nan_to_num(nan=math.inf).min()), "the time is the earliest at which their " \
                "field was non-finite"
        raise SolverError(f"log_likelihood (torchdiffeq {solver!r})", where, t, (t_hi - t_lo) / n_steps,
                          "the state or the log-density term became non-finite (NaN or inf)",
                          detail=f"a fixed grid moves each example on its own, so the others are unaffected; {when}",
                          batch=B)
    ok = ~lost
    if not bool(ok.any()):
        return None, keep[ok], where
    return (y1[ok], n_steps, failed_at[ok]), keep[ok], where


def _solve_multistep(sde, score, x, probes, t_lo, t_hi, opt: _Settings, chunk_size, bar, nfe):
    """The multistep solve in the form of the Runge-Kutta branch: (y1 = (x_T flattened, int div f~), steps)."""
    stepper = MultistepLikelihood(opt.rtol, opt.atol, max_steps=opt.max_steps)
    try:
        x_T, delta = stepper.solve(sde, as_model(score, sde), x, t_lo, t_hi, probes, chunk_size, on_time=bar)
    finally:
        nfe[0] += stepper.stats["nfe"]
    return torch.cat([x_T.reshape(x.shape[0], -1), delta[:, None].to(x_T.dtype)], dim=1), stepper.stats["accepted"]


def _check_discrete(levels: int, data_range: Sequence[float]) -> Tuple[float, float]:
    levels = check_int(levels, "levels", lo=2, hint=" (values per dimension, e.g. 256 for 8-bit images)")
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be (lo, hi), two numbers with lo < hi; got {data_range!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be (lo, hi) with lo < hi; got {tuple(data_range)!r}.")
    return lo, hi


def dequantize(x: torch.Tensor, levels: int, *, data_range: Tuple[float, float] = (-1.0, 1.0),
               seed: Seed = None) -> torch.Tensor:
    """Uniform dequantization of discrete data, shape (B, ...) -> (B, ...) (Theis et al. 2016; Ho et al. 2019).

    x holds the levels n in {0, ..., K - 1} scaled to data_range = [lo, hi] as x = lo + (hi - lo) n / (K - 1)
    (K = ``levels``; e.g. 8-bit images in [-1, 1]: K = 256). The result is
        z = lo + (hi - lo) (n + u) / K,  u ~ U[0, 1)^D,
    so each level owns a cell of side (hi - lo) / K. Noise is per example (``seed`` as in
    :func:`sdegen.noise.make_seeds`). Raises ValueError when x is not on the K-level grid.
    """
    check_finite_tensor(x, "x")
    lo, hi = _check_discrete(levels, data_range)
    n = (x.double() - lo) / (hi - lo) * (levels - 1)
    n_int = n.round()
    # a level is recognised within 1e-3 of its spacing, or within x's own rounding (16-bit levels in float32)
    slack = max(1e-3, 4.0 * torch.finfo(x.dtype).eps * max(abs(lo), abs(hi)) / (hi - lo) * (levels - 1))
    if bool(((n - n_int).abs() > slack).any()) or bool(((n_int < 0) | (n_int > levels - 1)).any()):
        raise ValueError(f"x must hold {levels} levels scaled to data_range=({lo:g}, {hi:g}), i.e. values "
                         f"lo + (hi - lo) n / {levels - 1}; got values off that grid.")
    seeds = make_seeds(seed, x.shape[0], x.device)
    z = normal_from_seeds(seeds, (1 << 43), x.shape[1:], torch.float64)
    u = torch.special.ndtr(z).clamp(0.0, 1.0 - 2.0**-52)  # U[0, 1) from the per-example normal stream
    return (lo + (hi - lo) * (n_int + u) / levels).to(x.dtype)


def bits_per_dim(log_prob: torch.Tensor, dim: int, *, levels: Optional[int] = None,
                 data_range: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """Bits per dimension from per-example log-densities (B,) of D-dimensional data.

    Continuous data (levels=None): bpd = -log p(x) / (D ln 2).
    Discrete data with K levels scaled to [lo, hi] and dequantized by :func:`dequantize`, where ``log_prob`` is the
    model's log-density of the dequantized z: the discrete probability is bounded as
        log P(n) >= E_u[log p(z)] + D log((hi - lo) / K),
    so bpd = -log p(z) / (D ln 2) + log2(K) - log2(hi - lo).
    For data mapped to [-1, 1] (hi - lo = 2) the offset is log2(K) - 1, i.e. 7 bits for 8-bit images;
    for [0, 1] it is log2(K), i.e. 8 bits. ``data_range`` (default (-1, 1)) applies to discrete data only: given
    without ``levels`` it raises ValueError (forgetting levels=256 for [0, 1] images would cost 8 bits/dim).
    """
    dim = check_int(dim, "dim", lo=1, hint=" (values per example)")
    if data_range is not None and levels is None:
        raise ValueError("data_range: it is the range of discrete data given with levels=...; pass levels (e.g. "
                         "256 for 8-bit images) or leave data_range unset for continuous data.")
    bpd = -log_prob / (dim * _LN2)
    if levels is not None:
        lo, hi = _check_discrete(levels, (-1.0, 1.0) if data_range is None else data_range)
        bpd = bpd + math.log2(levels) - math.log2(hi - lo)
    return bpd
