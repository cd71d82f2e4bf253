"""Solver steps against quality: every sdegen sampler (and diffusers' best schedulers) at NFE 5..1000 on the
Gaussian-mixture oracle under VP, sub-VP and VE.

A method of k NFE per step runs nfe // k steps and its row shows the NFE it used (e.g. 9 for DPM-Solver-3
in the NFE-10 slot). Deterministic samplers: endpoint error against the float64 torchdiffeq solution (rtol = atol = 1e-10) of the
same probability-flow ODE from the same x_T: RMS, median per-point error, fraction of points ending in
another mixture component than the reference. Every sampler: 20,000 samples against exact draws from the
oracle's marginal at the end time t_min (the distribution every sampler targets): sliced W2 (exact-vs-exact
floor beside it), mixture-weight L1 error, within-mode variance ratio, and the gap of mean exact log-density.

Rows "(calibrated)" use step schedules fitted by sdegen.optimize_schedule on separate calibration points
(seed 11) at NFE 10 and 20; the fitted grids and the fitting cost are in the report.

    python benchmarks/solver_steps.py            # full run (about 40 minutes on one busy core)
    python benchmarks/solver_steps.py --quick    # NFE 10 and 20 under VP, 2000 endpoint points
    python benchmarks/solver_steps.py --holdout 7   # the quick plan on fresh problems drawn with seed 7
    python benchmarks/solver_steps.py --only mix16/vp   # re-run one panel and merge it into the full run
    python benchmarks/solver_steps.py --only adaptive   # re-run the adaptive-vs-dopri5 sweep and merge it
    python benchmarks/solver_steps.py --samplers dpm_solver-3   # re-run one sampler on every panel and merge it
    python benchmarks/solver_steps.py --report-only     # re-render the full run's report from its JSON
Writes benchmarks/results/solver_steps.{md,csv,json} and solver_steps_*.png (solver_steps_quick.* with --quick,
solver_steps_holdout<SEED>.* with --holdout).

Provenance: each JSON keeps the machine, date and command of the run that made it ("meta") and of every --only
re-run merged into it since ("reruns"); --report-only and --only re-render them as recorded, never stamping the
current machine or date on old rows. Hand-written text in a report between the lines ``<!-- notes -->`` and
``<!-- end notes -->`` is kept when the script rewrites that report.

The headline comparison over many problems (dimensions 2-256, seven SDEs, separations 0.5-40, hold-out draws, the
recommended default against diffusers and k-diffusion) is benchmarks/suite_solvers.py, built on this module's
runners and metrics.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from common import cpu_model

import sdegen
from sdegen.analytic import GaussianMixture


RESULTS = Path(__file__).resolve().parent / "results"
NFE_GRID = (5, 10, 20, 50, 100, 200, 500, 1000)
PROBLEMS = {"ring": lambda: GaussianMixture.ring(), "mix16": lambda: GaussianMixture.random(dim=16, n_components=6, seed=0),
            # not designed on: 64-D, component means 29-38 apart (mean_scale 3), a seed no schedule was tuned on
            "mix64wide": lambda: GaussianMixture.random(dim=64, n_components=6, seed=1, mean_scale=3.0)}
SDES = {"vp": lambda: sdegen.VPSDE(), "subvp": lambda: sdegen.SubVPSDE(), "ve": lambda: sdegen.VESDE()}
DEVICE = torch.device("cpu")  # where the samplers run (--device); metrics are computed on the CPU
NOT_RECORDED = {"machine": "not recorded", "date": "not recorded", "command": "not recorded"}


def holdout_problems(seed):
    """Fresh mixtures for --holdout SEED: 6 components in 2, 16 and 64 dimensions whose means are about 4
    ("near") or 35 ("wide") units apart (mean_scale = distance / sqrt(2 d)), seeded by SEED; none of them was looked
    at while a schedule or sampler was designed."""
    out = {}
    for i, (dim, sep) in enumerate([(d, s) for d in (2, 16, 64) for s in ("near", "wide")]):
        dist = 4.0 if sep == "near" else 35.0
        out[f"h{seed}-d{dim}-{sep}"] = (lambda d=dim, ms=dist / math.sqrt(2 * dim), k=i:
                                        GaussianMixture.random(dim=d, n_components=6, seed=1000 * seed + k, mean_scale=ms))
    return out


# the grids compared as the recommended default (one sampler, schedules side by side) in the report's first table
DEFAULT_CANDIDATES = ("exp_pc-2 (log_snr)", "exp_pc-2 (few_step)", "exp_pc-2 (pilot)", "unipc-2 bh2 (log_snr)",
                      "unipc-2 bh2 (pilot)")

# name -> (method, options, schedule, NFE per step, stochastic)
SDEGEN = {
    "euler (uniform t)": ("euler", {}, "uniform", 1, False),
    "ddim": ("ddim", {}, "log_snr", 1, False),
    "heun (edm)": ("heun", {}, "edm", 2, False),
    "dpm_solver-3": ("dpm_solver", {"order": 3}, "log_snr", 3, False),
    "dpm_solver-3 noise form": ("dpm_solver", {"order": 3, "prediction": "noise"}, "log_snr", 3, False),
    "dpmpp_2m (log_snr)": ("dpmpp_2m", {}, "log_snr", 1, False),
    "dpmpp_3m (log_snr)": ("dpmpp_3m", {}, "log_snr", 1, False),
    "dpmpp_3m (few_step)": ("dpmpp_3m", {}, "few_step", 1, False),
    "exp_pc-2 (few_step)": ("exp_pc", {"order": 2}, "few_step", 1, False),
    "exp_pc-3 (few_step)": ("exp_pc", {"order": 3}, "few_step", 1, False),
    "exp_pc-3 (log_snr)": ("exp_pc", {"order": 3}, "log_snr", 1, False),
    "exp_pc-2 (log_snr)": ("exp_pc", {"order": 2}, "log_snr", 1, False),
    "exp_pc-2 (pilot)": ("exp_pc", {"order": 2}, "pilot", 1, False),
    "exp_pc-3 (pilot)": ("exp_pc", {"order": 3}, "pilot", 1, False),
    "unipc-2 bh2 (log_snr)": ("unipc", {"order": 2}, "log_snr", 1, False),
    "unipc-3 bh2 (log_snr)": ("unipc", {"order": 3}, "log_snr", 1, False),
    "unipc-2 bh2 (pilot)": ("unipc", {"order": 2}, "pilot", 1, False),
    "ddim eta=1 (ancestral)": ("ddim", {"eta": 1.0}, "log_snr", 1, True),
    "heun churn=10 (edm)": ("heun", {"s_churn": 10.0}, "edm", 2, True),
    "dpmpp_2m_sde (log_snr)": ("dpmpp_2m_sde", {}, "log_snr", 1, True),
    "dpmpp_2m_sde (few_step)": ("dpmpp_2m_sde", {}, "few_step", 1, True),
    "dpmpp_3m_sde (few_step)": ("dpmpp_3m_sde", {}, "few_step", 1, True),
    "sa_solver-3/4 tau=1 (few_step)": ("sa_solver", {}, "few_step", 1, True),
    "sa_solver-3/4 tau=0.7 (few_step)": ("sa_solver", {"tau": 0.7}, "few_step", 1, True),
}
# deterministic samplers on step schedules fitted by sdegen.optimize_schedule (MSE objective, search started from
# the few_step grid, or from the fitted grid of half the NFE refined) on CAL_SUBSET points screened from CAL_POOL calibration starting points of their own (seed 11),
# at the NFE in CAL_NFE
CALIBRATED = {
    "exp_pc-2 (calibrated)": ("exp_pc", {"order": 2}),
    "exp_pc-3 (calibrated)": ("exp_pc", {"order": 3}),
}
CAL_NFE, CAL_POOL, CAL_SUBSET = (10, 20), 16_000, 2000
# samplers also run at NFE 500 and 1000 (the convergence floor); the rest stop at 200 to keep the run short
LONG = ("exp_pc-3 (few_step)", "dpmpp_3m (log_snr)")
# diffusers baselines: name -> (scheduler class name, config overrides)
DIFFUSERS = {
    "diffusers dpm++2m trailing": ("DPMSolverMultistepScheduler", {"solver_order": 2, "timestep_spacing": "trailing"}),
    "diffusers dpm++2m karras": ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
    "diffusers dpm++3m trailing": ("DPMSolverMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}),
    "diffusers dpm++3m karras": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "diffusers unipc-2 trailing": ("UniPCMultistepScheduler", {"solver_order": 2, "timestep_spacing": "trailing"}),
    "diffusers unipc-2 karras": ("UniPCMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
    "diffusers unipc-3 trailing": ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}),
    "diffusers unipc-3 karras": ("UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "diffusers sde-dpm++2m karras": ("DPMSolverMultistepScheduler",
                                     {"solver_order": 2, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
}


# ------------------------------------------------------------------ running samplers
def run_sdegen(spec, sde, mix, x_T, nfe, seed=0):
    """(samples, NFE used, pilot calls) from one sdegen configuration with at most ``nfe`` evaluations (a method
    of k NFE per step takes nfe // k steps), or None where not even one step fits. The "pilot" schedule's own
    model calls (each on its 64-example pilot batch, SampleInfo.pilot_nfe) come back apart from the run's NFE."""
    method, opts, schedule, per_step, _ = spec
    steps = nfe // per_step
    if isinstance(schedule, dict):  # fitted grids, one per NFE
        schedule = schedule.get(nfe)
    if steps < 1 or schedule is None:
        return None
    x, info = sdegen.sample(sde, mix, x_T, method=method, steps=steps, schedule=schedule, seed=seed,
                            return_info=True, **opts)
    if info.nfe > steps * per_step:  # fewer is allowed: e.g. Heun's last step to t_min may be an Euler step
        raise RuntimeError(f"{method} promised at most {steps * per_step} NFE and used {info.nfe}")
    return x, info.nfe, info.pilot_nfe


def diffusers_scheduler(cls_name, overrides, sde, steps, n_train=1000):
    """A diffusers scheduler whose training table is our SDE: alpha_bar_k = 1 / (1 + sigma(t_k)^2) on a uniform
    grid t_0 = t_min .. t_999 = T. Any linear SDE is a VP SDE after x -> x / sqrt(m^2 + s^2) with the same
    sigma = s/m, so diffusers' VP schedulers solve exactly the same probability-flow ODE."""
    import diffusers

    t = torch.linspace(sde.t_min, sde.T, n_train, dtype=torch.float64)
    sigma = sde.sigma(t)
    alpha_bar = 1.0 / (1.0 + sigma**2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = (1.0 - alpha_bar / prev).numpy()
    config = dict(num_train_timesteps=n_train, trained_betas=betas, prediction_type="epsilon", thresholding=False)
    cls = getattr(diffusers, cls_name)
    if "final_sigmas_type" in inspect.signature(cls.__init__).parameters:  # DEIS has none
        config["final_sigmas_type"] = "sigma_min"
    config.update(overrides)
    sched = cls(**config)
    sched.set_timesteps(steps)
    # the loop hands its timesteps back to step(): where two of them round to the same integer (Karras sigmas at
    # the top of a flow table), diffusers would look the second one up as the start and run past its sigmas
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched


def run_diffusers(spec, sde, mix, x_T, nfe, seed=0):
    """Drive a diffusers multistep scheduler (NFE = steps) with the oracle's exact score."""
    sched = diffusers_scheduler(*spec, sde, nfe)
    score = mix.score_fn(sde)
    g = torch.Generator().manual_seed(seed)

    def scale(sig):  # x = c x_vp with c = sqrt(m^2 + s^2) = m sqrt(1 + sigma^2)
        # diffusers keeps sigmas in float32: clamp the round-off at the ends of [t_min, T]
        t = sde.t_from_sigma(sig.to(torch.float64)).clamp(sde.t_min, sde.T)
        return t, sde.mean_coeff(t) * torch.sqrt(1.0 + sig.to(torch.float64) ** 2)

    t0, c0 = scale(sched.sigmas[0])
    x = x_T / c0
    for i, timestep in enumerate(sched.timesteps):
        t, c = scale(sched.sigmas[i])
        eps = -sde.std(t) * score(c * x, t.expand(x.shape[0]).to(x.device))
        kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(eps, timestep, x, **kw).prev_sample
    t_end, c_end = scale(sched.sigmas[-1])
    if abs(float(t_end) - sde.t_min) > 1e-6:
        raise RuntimeError(f"diffusers ended at t={float(t_end)} instead of t_min={sde.t_min}")
    return c_end * x, len(sched.timesteps)


# ------------------------------------------------------------------ metrics
def endpoint_errors(x, ref, mix):
    """RMS and median per-point error against the reference, and the fraction of points in another component."""
    finite = torch.isfinite(x).reshape(x.shape[0], -1).all(1)  # a baseline may diverge: count it, do not crash
    err = torch.where(finite, (x - ref).reshape(x.shape[0], -1).norm(dim=1), math.inf)
    x = torch.where(finite[:, None], x, 0.0)
    flips = ((mix.responsibilities(x).argmax(1) != mix.responsibilities(ref).argmax(1)) | ~finite).double().mean()
    return {"rms": err.pow(2).mean().sqrt().item(), "median": err.median().item(), "flips": flips.item()}


def sliced_w2(a, b, projections=500, seed=0):
    """Sliced Wasserstein-2 between equal-size sample sets (mean over random directions of the sorted 1-D W2^2)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(0)
    pb, _ = (b.double() @ dirs).sort(0)
    return (pa - pb).pow(2).mean().sqrt().item()


def mode_stats(x, mix_t):
    """Fractions per most-responsible component, and the weighted mean of tr(cov within mode) / tr(Sigma_k)."""
    k = mix_t.responsibilities(x).argmax(1)
    frac = torch.bincount(k, minlength=mix_t.n_components).double() / x.shape[0]
    ratios = []
    for j in range(mix_t.n_components):
        xs = x[k == j].double()
        ratios.append(xs.T.cov().trace() / mix_t.covs[j].trace() if xs.shape[0] > 2 else torch.tensor(float("nan")))
    ratio = (mix_t.weights * torch.stack(ratios)).sum().item()
    return frac, ratio


def distribution_metrics(x, exact, mix_t):
    bad = (~torch.isfinite(x).reshape(x.shape[0], -1).all(1)).double().mean().item()
    if bad > 0:  # a diverged baseline: say so instead of crashing
        return {"sw2": math.nan, "weight_err": math.nan, "var_ratio": math.nan, "logp_gap": math.nan, "nonfinite": bad}
    frac, ratio = mode_stats(x, mix_t)
    return {"sw2": sliced_w2(x, exact), "weight_err": (frac - mix_t.weights).abs().sum().item(),
            "var_ratio": ratio, "logp_gap": (mix_t.log_prob(x.double()).mean() - mix_t.log_prob(exact).mean()).item()}


# ------------------------------------------------------------------ the run
def reference(sde, mix, x_T):
    return sdegen.sample(sde, mix, x_T, method="ode", rtol=1e-10, atol=1e-10)


def calibrate(mix, sde, nfes, log):
    """Fit a grid per CALIBRATED sampler and NFE on calibration points of their own; returns the run specs and
    a record of each fit (grid, calibration loss, evaluations, NFE spent)."""
    x_cal = sde.prior_sample((CAL_POOL, mix.dim), seed=11, dtype=torch.float64)
    specs, fits = {}, []
    for name, (method, opts) in CALIBRATED.items():
        grids = {}
        for nfe in sorted(nfes):
            t0 = time.time()
            # coarse to fine: a grid of twice the steps starts from the fitted coarse one, each step split in two
            init = sdegen.refine_grid(sde, grids[nfe // 2], 2) if nfe % 2 == 0 and nfe // 2 in grids else "few_step"
            fit = sdegen.optimize_schedule(sde, mix, x_cal, method=method, steps=nfe, init=init,
                                           subset=CAL_SUBSET, **opts)
            grids[nfe] = fit.times
            fits.append({"sampler": name, "nfe": nfe, "sigmas": [round(v, 4) for v in sde.sigma(fit.times).tolist()],
                         "initial_mse": fit.initial_loss, "mse": fit.loss, "evaluations": fit.evaluations,
                         "nfe_spent": fit.nfe, "calibration_points": f"{CAL_SUBSET} of {CAL_POOL}",
                         "seconds": time.time() - t0})
            log(f"  calibrated {name} NFE {nfe}: MSE {fit.initial_loss:.3g} -> {fit.loss:.3g}, {fit.evaluations} runs")
        specs[name] = (method, opts, grids, 1, False)
    return specs, fits


def merge_rows(old, new, key):
    """``old`` with the rows sharing a key with ``new`` replaced by those of ``new`` (in place of the first), and the
    rest of ``new`` appended."""
    by_key = {}
    for r in new:
        by_key.setdefault(key(r), []).append(r)
    out, done = [], set()
    for r in old:
        k = key(r)
        if k in by_key:
            if k not in done:
                out += by_key[k]
                done.add(k)
        else:
            out.append(r)
    return out + [r for k, rs in by_key.items() if k not in done for r in rs]


def bench_problem(pname, sname, nfes, dist_nfes, n_end, n_dist, with_diffusers, log, calibrated=False, only=None):
    """Rows (and calibration records) of every configuration on one panel; ``only``: just these sampler names (and
    no noise-floor row)."""
    mix, sde = PROBLEMS[pname](), SDES[sname]()
    mix_t = mix.marginal(sde, sde.t_min)
    rows = []
    x_T = sde.prior_sample((n_end, mix.dim), seed=1, dtype=torch.float64).to(DEVICE)
    t0 = time.time()
    ref = reference(sde, mix, x_T).cpu()
    log(f"[{pname}/{sname}] reference in {time.time() - t0:.1f}s")
    xd_T = sde.prior_sample((n_dist, mix.dim), seed=2, dtype=torch.float64).to(DEVICE)
    exact = mix_t.sample(n_dist, seed=3)
    floor = distribution_metrics(mix_t.sample(n_dist, seed=4), exact, mix_t)
    if only is None:
        rows.append(dict(problem=pname, sde=sname, sampler="exact samples (noise floor)", family="floor", nfe=0,
                         **floor))
    specs, fits = dict(SDEGEN), []
    if calibrated:
        extra, fits = calibrate(mix, sde, [n for n in CAL_NFE if n in nfes], log)
        specs.update(extra)
        for f in fits:
            f.update(problem=pname, sde=sname)
    configs = [(n, s, run_sdegen, "sdegen" + (" stochastic" if s[4] else "")) for n, s in specs.items()]
    if with_diffusers:
        configs += [(n, s, run_diffusers, "diffusers" + (" stochastic" if "sde" in n else "")) for n, s in DIFFUSERS.items()]
    if only is not None:
        configs = [c for c in configs if c[0] in only]
    for name, spec, runner, family in configs:
        t0 = time.time()
        for nfe in nfes:
            if nfe > 200 and name not in LONG:
                continue
            row = dict(problem=pname, sde=sname, sampler=name, family=family, nfe=nfe)
            out = None if "stochastic" in family else runner(spec, sde, mix, x_T, nfe)
            if out is not None:
                row.update(endpoint_errors(out[0].cpu(), ref, mix), nfe=out[1])
                if len(out) > 2 and out[2]:
                    row["pilot_nfe"] = out[2]
            if nfe in dist_nfes:
                out = runner(spec, sde, mix, xd_T, nfe, seed=5)
                if out is not None:
                    row.update(distribution_metrics(out[0].cpu(), exact, mix_t), nfe=out[1])
            if len(row) > 5:
                rows.append(row)
        log(f"[{pname}/{sname}] {name}: {time.time() - t0:.1f}s")
    return rows, fits


def adaptive_vs_dopri5(n, log):
    """NFE each solver needs for RMS endpoint error <= 1e-3 on the ring under VP (tolerance sweeps)."""
    mix, sde = GaussianMixture.ring(), SDES["vp"]()
    x_T = sde.prior_sample((n, 2), seed=1, dtype=torch.float64).to(DEVICE)
    ref = reference(sde, mix, x_T)
    rows = []
    for method in ("adaptive", "ode"):
        for tol in (1e-1, 5e-2, 3e-2, 2e-2, 1e-2, 5e-3, 3e-3, 1e-3, 3e-4, 1e-4):
            x, info = sdegen.sample(sde, mix, x_T, method=method, rtol=tol, atol=tol, return_info=True)
            rms = (x - ref).pow(2).sum(1).mean().sqrt().item()
            rows.append({"solver": "sdegen adaptive (u = log m/s)" if method == "adaptive" else "torchdiffeq dopri5 (t)",
                         "tol": tol, "nfe": info.nfe, "rms": rms})
            log(f"  {rows[-1]}")
    return rows


def best_nfe(rows, solver, target=1e-3):
    """Smallest NFE at which the solver's RMS is <= target (over the tolerance sweep)."""
    ok = [r["nfe"] for r in rows if r["solver"] == solver and r["rms"] <= target]
    return min(ok) if ok else None


# ------------------------------------------------------------------ reporting
def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def run_meta():
    """Machine, date and command of this run (kept in the JSON so that --report-only re-renders them)."""
    return {"machine": f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": shlex.join(["python", "benchmarks/solver_steps.py", *sys.argv[1:]]), "device": str(DEVICE)}


def provenance_line(meta):
    device = f"; device {meta['device']}" if meta.get("device") else ""
    return f"machine: {meta['machine']}{device}; date {meta['date']}; command: `{meta['command']}`"


def markdown(rows, adaptive_rows, summary, fits=(), meta=NOT_RECORDED, reruns=(), notes=None):
    lines = ["# Solver steps against quality", "",
             "Endpoint errors: deterministic samplers against torchdiffeq dopri5 at rtol = atol = 1e-10 (float64) "
             "from the same x_T. Distribution metrics: 20,000 samples against exact draws from p_{t_min} (4000 with "
             "--quick).", "",
             f"Run: {provenance_line(meta)}."]
    if reruns:
        lines += ["", "Re-run since with the then-current code and merged into the tables below (these rows and "
                  "their summary lines replace the run's):", ""]
        lines += [f"- {r['part']}: {provenance_line(r)}" for r in reruns]
    lines += ["", *([notes, ""] if notes else []),
             "Rows \"(pilot)\" use `schedule=\"pilot\"` (sdegen.schedules.pilot_grid): a pilot run of the adaptive "
             "solver on 64 prior draws at rtol = atol = 1e-3 lays out the grid; its model calls, each on the 64-example "
             "pilot batch, are the column pilot_nfe and are not in NFE (per example of a batch of B they cost "
             "pilot_nfe * 64 / B calls). mix64wide is a problem no schedule was designed on (64-D, means 29-38 apart).",
             ""]
    candidates = [c for c in DEFAULT_CANDIDATES if any(r["sampler"] == c for r in rows)]
    lines += ["## Default candidates: RMS / flips at NFE 10 and 20 (VP)", "",
              "| problem | NFE | " + " | ".join(candidates) + " | best diffusers |",
              "|---|---|" + "---|" * (len(candidates) + 1)]
    for pname in PROBLEMS:
        for nfe in (10, 20):
            sel = [r for r in rows if r["problem"] == pname and r["sde"] == "vp" and r["nfe"] == nfe and "rms" in r]
            if not sel:
                continue
            cells = []
            for name in candidates:
                r = next((r for r in sel if r["sampler"] == name), None)
                cells.append(f"{r['rms']:.3g} / {r['flips']:.3g}" if r else "")
            theirs = [r for r in sel if r["family"] == "diffusers"]
            best = min(theirs, key=lambda r: r["rms"]) if theirs else None
            cells.append(f"{best['rms']:.3g} / {best['flips']:.3g} ({best['sampler'][10:]})" if best else "")
            lines.append(f"| {pname} | {nfe} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + [f"- {s}" for s in summary] + [""]
    lines += ["## Adaptive solvers: NFE for RMS <= 1e-3 on the ring (VP)", "", "| solver | tol | NFE | RMS |",
              "|---|---|---|---|"]
    lines += [f"| {r['solver']} | {r['tol']:g} | {r['nfe']} | {r['rms']:.3g} |" for r in adaptive_rows]
    if fits:
        lines += ["", "## Calibrated schedules (sdegen.calibration.optimize_schedule)", "",
                  f"Fitted on {fits[0]['calibration_points']} calibration starting points (seed 11; screened: half "
                  "where the sampler at N and 2N steps disagree most, half at random, weighted), MSE objective, "
                  "pattern search from the few_step grid at NFE 10 and from the NFE-10 fit with every step halved in "
                  "log-SNR at NFE 20; the endpoint rows below are measured on other points. "
                  "Cost: score calls, each on the calibration batch (the screening's on the whole pool).", "",
                  "| problem | sde | sampler | NFE | calibration MSE (start -> fitted) | runs | score calls | seconds "
                  "| sigma = s/m at the grid |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {f['problem']} | {f['sde']} | {f['sampler']} | {f['nfe']} | {f['initial_mse']:.3g} -> {f['mse']:.3g} "
                  f"| {f['evaluations']} | {f['nfe_spent']} | {f['seconds']:.0f} | "
                  f"{', '.join(f'{v:.3g}' for v in f['sigmas'])} |" for f in fits]
    keys = ["rms", "median", "flips", "sw2", "weight_err", "var_ratio", "logp_gap", "pilot_nfe"]
    for pname in PROBLEMS:
        for sname in SDES:
            sel = [r for r in rows if r["problem"] == pname and r["sde"] == sname]
            if not sel:
                continue
            lines += ["", f"## {pname}, {sname}", "", "| sampler | NFE | " + " | ".join(keys) + " |",
                      "|---|---|" + "---|" * len(keys)]
            lines += [f"| {r['sampler']} | {r['nfe']} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in sel]
    return "\n".join(lines) + "\n"


def plots(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, sd) for p in PROBLEMS for sd in SDES if any(r["problem"] == p and r["sde"] == sd for r in rows)]
    names = sorted({r["sampler"] for r in rows if "rms" in r})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for metric, label in (("rms", "RMS endpoint error"), ("median", "median per-point error"),
                          ("flips", "fraction of mode flips")):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 3, 4.5), squeeze=False)
        for ax, (pname, sname) in zip(axes[0], panels):
            for name in names:
                sel = [r for r in rows if r["problem"] == pname and r["sde"] == sname and r["sampler"] == name
                       and metric in r and math.isfinite(r[metric])]
                if sel:
                    ax.loglog([r["nfe"] for r in sel], [max(r[metric], 1e-9) for r in sel],
                              "s--" if "diffusers" in name else "o-", color=colors[name], label=name, ms=3)
            ax.set(title=f"{pname}, {sname}", xlabel="NFE", ylabel=label)
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 1 - 3 / (5 * len(panels) + 3), 1))
        fig.savefig(out / f"solver_steps_{metric}.png", dpi=100)
        plt.close(fig)


def summarize(rows, adaptive_rows):
    """The accuracy targets, each with the measured figures (MET only if one sampler meets every condition)."""
    out = []
    for pname, med10, med20 in (("ring", 0.03, 0.006), ("mix16", 0.05, 0.007)):
        for nfe, med_target in ((10, med10), (20, med20)):
            sel = [r for r in rows if r["problem"] == pname and r["sde"] == "vp" and r["nfe"] == nfe and "rms" in r]
            ours = [r for r in sel if r["family"] == "sdegen"]
            theirs = [r for r in sel if r["family"] == "diffusers"]
            if not ours or not theirs:
                continue
            base = min(theirs, key=lambda r: r["rms"])
            ok = [r for r in ours if r["rms"] <= 0.5 * base["rms"] and r["flips"] <= base["flips"]
                  and r["median"] <= med_target]
            best = min(ok or ours, key=lambda r: r["rms"])
            out.append(f"{pname} VP NFE {nfe}: best sdegen {best['sampler']} RMS {best['rms']:.3g}, median "
                       f"{best['median']:.3g} (target <= {med_target}), flips {best['flips']:.3g}; best diffusers "
                       f"{base['sampler']} RMS {base['rms']:.3g}, flips {base['flips']:.3g}: ratio "
                       f"{best['rms'] / base['rms']:.2f} -> {'MET' if ok else 'NOT MET'}"
                       + (f" (its grid cost {best['pilot_nfe']} pilot calls on 64 examples, not in its NFE)"
                          if best.get("pilot_nfe") else ""))
            if not ok:
                low = min(ours, key=lambda r: r["median"])
                out.append(f"  (lowest median there: {low['sampler']} {low['median']:.3g} with RMS {low['rms']:.3g}, "
                           f"flips {low['flips']:.3g})")
    for pname in PROBLEMS:
        sel = [r for r in rows if r["problem"] == pname and r["sde"] == "vp" and r["nfe"] == 20 and "var_ratio" in r
               and "stochastic" in r["family"] and r["family"].startswith("sdegen")]
        floor = [r for r in rows if r["problem"] == pname and r["sde"] == "vp" and r["family"] == "floor"]
        if sel and floor:
            best = min(sel, key=lambda r: abs(r["var_ratio"] - 1.0) + r["weight_err"])
            # "at the noise floor": within 1.5 times the exact-vs-exact weight error
            ok = best["weight_err"] <= 1.5 * floor[0]["weight_err"] and abs(best["var_ratio"] - 1.0) <= 0.05
            out.append(f"{pname} VP NFE 20 best stochastic {best['sampler']}: weight error {best['weight_err']:.4f} "
                       f"(noise floor {floor[0]['weight_err']:.4f}), within-mode variance ratio {best['var_ratio']:.3f} "
                       f"-> {'MET' if ok else 'NOT MET'}")
    a, d = best_nfe(adaptive_rows, "sdegen adaptive (u = log m/s)"), best_nfe(adaptive_rows, "torchdiffeq dopri5 (t)")
    if a and d:
        out.append(f"adaptive: RMS <= 1e-3 on the ring at {a} NFE; dopri5 in t needs {d} NFE: ratio {a / d:.2f} "
                   f"-> {'MET' if 2 * a <= d else 'NOT MET'}")
    return out


NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- end notes -->"


def kept_notes(path):
    """The hand-written block (from NOTES_BEGIN to NOTES_END, markers included) of the report at ``path``, or None."""
    if not path.exists():
        return None
    text = path.read_text()
    i, j = text.find(NOTES_BEGIN), text.find(NOTES_END)
    return text[i:j + len(NOTES_END)] if 0 <= i < j else None


def write_reports(rows, adaptive_rows, suffix, seconds, with_plots, fits=(), meta=NOT_RECORDED, reruns=()):
    """Write the report, CSV, JSON (and plots). ``meta`` is the machine, date and command of the run that made the
    rows, ``reruns`` those of the --only re-runs merged into them; both are passed in (a re-render keeps the
    recorded ones) and kept in the JSON. A hand-written notes block in the existing report is kept."""
    summary = summarize(rows, adaptive_rows)
    for line in summary:
        print(line)
    md = RESULTS / f"solver_steps{suffix}.md"
    md.write_text(markdown(rows, adaptive_rows, summary, fits, meta, reruns, kept_notes(md)))
    head = ["problem", "sde", "sampler", "family", "nfe"]
    keys = head + sorted({k for r in rows for k in r} - set(head))
    with open(RESULTS / f"solver_steps{suffix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (RESULTS / f"solver_steps{suffix}.json").write_text(json.dumps(
        {"rows": rows, "adaptive": adaptive_rows, "summary": summary, "seconds": seconds, "calibration": list(fits),
         "meta": meta, **({"reruns": list(reruns)} if reruns else {})},
        indent=1))
    if with_plots:
        plots(rows, RESULTS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="NFE 10 and 20 on VP only, fewer points")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the samplers and the reference run (default: CUDA when available)")
    parser.add_argument("--holdout", type=int, default=None, metavar="SEED",
                        help="run the quick plan on fresh problems drawn with this seed (see holdout_problems)")
    parser.add_argument("--points", type=int, default=None, help="endpoint points per problem and for the adaptive "
                        "sweep, in every mode (default: 2000 per problem and 500 for the sweep with --quick; per panel "
                        "(2000, 8000 for mix16/vp, 1000 under sub-VP and VE) and 1000 for the sweep otherwise)")
    parser.add_argument("--samplers", default=None, metavar="NAME[,NAME...]",
                        help="re-run only these samplers (names as in the report) on every panel of the full run (or "
                        "on the --only panel), and replace their rows in the full run's JSON (its provenance is added "
                        "to the report): for rows that a change of the code made stale, where the full run is too long")
    parser.add_argument("--report-only", action="store_true", help="re-render the tables and plots from the JSON")
    parser.add_argument("--only", default=None, metavar="PROBLEM/SDE",
                        help="re-run one panel of the full run (e.g. mix16/vp), or 'adaptive' for the adaptive-vs-dopri5 "
                        "sweep, and replace its rows in the full run's JSON (its provenance is added to the report)")
    args = parser.parse_args()
    if sdegen.distributed.launched_rank() != 0:
        return  # the timings are of one process: under torchrun only rank 0 runs and writes
    suffix = f"_holdout{args.holdout}" if args.holdout is not None else ("_quick" if args.quick else "")
    if args.report_only:
        if args.holdout is not None:
            PROBLEMS.clear()
            PROBLEMS.update(holdout_problems(args.holdout))
        data = json.loads((RESULTS / f"solver_steps{suffix}.json").read_text())
        write_reports(data["rows"], data["adaptive"], suffix, data["seconds"], not suffix, data.get("calibration", ()),
                      data.get("meta") or NOT_RECORDED, data.get("reruns", ()))
        return
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    with_diffusers = not args.no_diffusers
    if with_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed (pip install 'sdegen[bench]'): running without the baselines")
            with_diffusers = False
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = lambda msg: print(f"{time.time() - start:7.1f}s {msg}", flush=True)
    rows, fits = [], []
    if args.holdout is not None:
        PROBLEMS.clear()
        PROBLEMS.update(holdout_problems(args.holdout))
        args.quick = True
    if args.quick:
        plan = [(p, "vp", (10, 20), (20,), args.points or 2000, 4000, True) for p in PROBLEMS]
    else:
        # the targets are stated under VP: sub-VP and VE get NFE 10-50 without diffusers or calibration.
        # 16-D VP uses 8000 endpoint points: mode flips there are rare events (0.1-0.5% at NFE 10), and with
        # 1000 points the flip counts of two samplers differ by Poisson noise alone
        plan = [("ring", "vp", NFE_GRID, (10, 20), args.points or 2000, 20_000, True),
                ("mix16", "vp", NFE_GRID[:5], (20,), args.points or 8000, 20_000, True)]
        plan += [(p, s, (10, 20, 50), (20,), args.points or 1000, 20_000, False)
                 for p in PROBLEMS for s in ("subvp", "ve")]
    n_adaptive = args.points or (500 if args.quick else 1000)
    if args.only:
        plan = [p for p in plan if f"{p[0]}/{p[1]}" == args.only]
        if (not plan and args.only != "adaptive") or args.quick:
            raise SystemExit(f"--only takes one PROBLEM/SDE panel of the full run, or 'adaptive'; got {args.only!r}")
    samplers = None
    if args.samplers:
        samplers = [n.strip() for n in args.samplers.split(",") if n.strip()]
        unknown = [n for n in samplers if n not in SDEGEN and n not in DIFFUSERS]
        if unknown or args.quick or args.only == "adaptive":
            raise SystemExit(f"--samplers takes names of SDEGEN or DIFFUSERS samplers (not calibrated ones) and "
                             f"works on the full run's panels; got {unknown or args.samplers!r}")
    if samplers:  # only the panels the full run has (a problem added to PROBLEMS since is not in its tables)
        done = {f"{r['problem']}/{r['sde']}" for r in json.loads((RESULTS / "solver_steps.json").read_text())["rows"]}
        plan = [p for p in plan if f"{p[0]}/{p[1]}" in done]
    for pname, sname, nfes, dist, n_end, n_dist, full in plan:
        new_rows, new_fits = bench_problem(pname, sname, nfes, dist, n_end, n_dist, with_diffusers and full, log,
                                           calibrated=full and not args.quick and samplers is None, only=samplers)
        rows, fits = rows + new_rows, fits + new_fits
    if args.only or samplers:  # merge into the last full run, keeping its provenance and adding this re-run's
        data = json.loads((RESULTS / "solver_steps.json").read_text())
        adaptive_rows = data["adaptive"]
        if args.only == "adaptive":
            adaptive_rows = adaptive_vs_dopri5(n_adaptive, log)
        panels = {f"{p[0]}/{p[1]}" for p in plan}
        if samplers:  # replace those samplers' rows in place
            rows = merge_rows(data["rows"], rows, lambda r: (r["problem"], r["sde"], r["sampler"]))
            fits = data.get("calibration", [])
            part = f"samplers {', '.join(samplers)} on {'panel ' + args.only if args.only else 'every panel of the run'}"
        else:
            keep = lambda r: f"{r['problem']}/{r['sde']}" not in panels
            rows = [r for r in data["rows"] if keep(r)] + rows
            fits = [f for f in data.get("calibration", []) if keep(f)] + fits
            part = "adaptive-vs-dopri5 sweep" if args.only == "adaptive" else f"panel {args.only}"
        rerun = dict(run_meta(), part=part, seconds=round(time.time() - start))
        reruns = [r for r in data.get("reruns", []) if r.get("part") != part] + [rerun]
        write_reports(rows, adaptive_rows, "", data["seconds"], True, fits, data.get("meta") or NOT_RECORDED, reruns)
        return
    adaptive_rows = [] if args.holdout is not None else adaptive_vs_dopri5(n_adaptive, log)
    write_reports(rows, adaptive_rows, suffix, time.time() - start, not args.quick, fits, run_meta())
    log("done")


if __name__ == "__main__":
    main()
