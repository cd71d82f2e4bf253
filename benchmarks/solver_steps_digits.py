"""Solver steps against endpoint error on a trained score network: the U-Net of examples/conditional_generation.py
(VP SDE, scikit-learn's 8x8 digits), sdegen's deterministic samplers against diffusers' multistep schedulers. The
row "[default]" is the recommended setting (benchmarks/suite_solvers.py's RECOMMENDED); the report's Target section
compares its RMS at NFE 10 and 20 with the best diffusers configuration's.

The oracle benchmark (benchmarks/solver_steps.py) measures against exact scores; here the score is a learned
network, so the probability-flow ODE is the network's own and its reference solution is sdegen's adaptive solver
at rtol = atol = 1e-5 (float32) from the same x_T, checked on a few images against the same at 1e-6 and against
torchdiffeq dopri5 at 1e-5 and 1e-7 (dopri5 at 1e-5 is 0.5-2e-3 off here: too coarse for NFE >= 20). For
each sampler and NFE: the per-image error is the per-pixel RMS of x - ref (pixels in [-1, 1]);
the table gives the RMS over images of that error, its median, and the fraction of images whose label under the
example's clean classifier differs from the reference's ("flips"). Rows "(calibrated)" use step schedules fitted
by sdegen.optimize_schedule on other starting points (seed 11) at NFE 10 and 20 with a capped search; their
fitting cost is listed. NFE 100 is run for a few samplers only (LONG), to keep the run near 25 minutes.

The score model and the clean classifier are the example's shipped checkpoints (examples/checkpoints, checked
against their SHA256SUMS; ``python examples/conditional_generation.py --train`` retrains them).

    python benchmarks/solver_steps_digits.py                  # 20-30 minutes on one core of a busy machine
    python benchmarks/solver_steps_digits.py --quick          # a smoke run: 32 images, NFE 10 and 20 (3-7 minutes)
    python benchmarks/solver_steps_digits.py --device cuda    # on a GPU (default: cuda when available)
    python benchmarks/solver_steps_digits.py --nfe 10,20 --no-calibration --name solver_steps_digits_default
                                                              # NFE 10 and 20 only, no fitted grids
Writes benchmarks/results/solver_steps_digits.{md,csv,json} and solver_steps_digits.png (--name changes the stem;
--quick writes solver_steps_digits_quick.* unless --name is given, so that a smoke run never replaces the published
report). --quick sets only the options not given explicitly: e.g. ``--quick --images 64`` runs 64 images.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import common  # noqa: E402
import conditional_generation as example  # noqa: E402
import solver_steps as oracle_bench  # noqa: E402
import suite_solvers as suite  # noqa: E402

import sdegen  # noqa: E402

# the oracle benchmark's deterministic samplers (exp_pc-2 on log-SNR among them) but Euler in t (far behind at
# these NFE)
SDEGEN = {name: spec for name, spec in oracle_bench.SDEGEN.items() if not spec[4] and spec[0] != "euler"}
# the recommended default (suite_solvers.RECOMMENDED, one constant for every benchmark) as a run_sdegen spec
DEFAULT_NAME = suite.sdegen_label(suite.RECOMMENDED)[len("sdegen "):] + " [default]"
DEFAULT = (suite.RECOMMENDED["method"], {k: v for k, v in suite.RECOMMENDED.items() if k not in ("method", "schedule")},
           suite.RECOMMENDED["schedule"], 1, False)
# diffusers' ODE solvers as in the oracle suite (DPM-Solver++ 2M/3M, UniPC bh1/bh2 order 2/3, DEIS 2/3 on trailing,
# Karras and AYS-style spacing), ending at sigma_min: the network's reference ends at t_min
DIFFUSERS = {name: spec for name, spec in suite.diffusers_configs().items() if spec[3] == "sigma_min"}
CAL_NFE = (10, 20)
# the calibration subset's reference: dopri5 at 1e-5 is 0.5-2e-3 (per-pixel RMS) off, a few percent of the
# NFE-10/20 errors being fitted, for a third of the adaptive solver's NFE
CAL_REFERENCE = {"method": "ode", "rtol": 1e-5, "atol": 1e-5}
# the only samplers also run at NFE > 50 (the run must stay near 25 minutes on one core)
LONG = ("exp_pc-3 (few_step)", "dpmpp_3m (log_snr)", "diffusers dpm++3m karras sigma_min",
        "diffusers unipc-3 bh2 karras sigma_min", DEFAULT_NAME)
REF_TOL = 1e-5


class NetworkScore:
    """The trained model behind the ``mix.score_fn(sde)`` interface that solver_steps' runners call."""

    def __init__(self, model):
        self.model = model

    def score_fn(self, sde):
        return self.model


# ------------------------------------------------------------------ the trained models
def load_models(args, log):
    """The example's shipped score model (and clean classifier, unless --no-flips) from --checkpoints, each checked
    against the folder's SHA256SUMS; returns (score model, classifier or None, a tag: the score model's SHA-256
    prefix and training steps)."""
    names = [example.NAMES["score"]] + ([] if args.no_flips else [example.NAMES["clean"]])
    example.verify_checkpoints(args.checkpoints, names)
    t0 = time.time()
    model, raw = sdegen.load_checkpoint(os.path.join(args.checkpoints, example.NAMES["score"]), map_location="cpu")
    clean = None
    if not args.no_flips:
        clean = sdegen.load_checkpoint(os.path.join(args.checkpoints, example.NAMES["clean"]), map_location="cpu")[0]
    extra = raw.get("extra") or {}
    tag = f"sha256 {example.sha256(os.path.join(args.checkpoints, example.NAMES['score']))[:12]}"
    log(f"models loaded from {args.checkpoints} ({time.time() - t0:.1f} s)")
    model.eval()
    return model, clean, tag, extra.get("train_steps")


# ------------------------------------------------------------------ metrics
def per_image_error(x, ref):
    """Per-pixel RMS of x - ref for each image (B,), float64; inf for an image with a non-finite pixel."""
    d = (x.double() - ref.double()).reshape(x.shape[0], -1)
    finite = torch.isfinite(d).all(1)
    return torch.where(finite, d.nan_to_num().pow(2).mean(1).sqrt(), math.inf)


def endpoint_errors(x, ref, ref_labels, clean):
    err = per_image_error(x, ref)
    out = {"rms": err.pow(2).mean().sqrt().item(), "median": err.median().item(), "max": err.max().item()}
    if clean is not None:
        labels = example.predict(clean, torch.nan_to_num(x))
        out["flips"] = ((labels != ref_labels) | ~torch.isfinite(err)).double().mean().item()
    return out


def reference(sde, model, x_T, check, log):
    """The reference endpoints: sdegen's "adaptive" solver at rtol = atol = REF_TOL on all of x_T. On the first
    ``check`` images it is compared with the same solver at a tenth of the tolerance and with the independent
    torchdiffeq dopri5 in t at 1e-5 and 1e-7 (dopri5 at 1e-5 is 0.5-2e-3 off on this network: too coarse)."""
    t0 = time.time()
    ref, info = sdegen.sample(sde, model, x_T, method="adaptive", rtol=REF_TOL, atol=REF_TOL, return_info=True)
    record = {"nfe": info.nfe, "seconds": time.time() - t0, "check_images": check, "checks": []}
    log(f"reference: adaptive {REF_TOL:g}, NFE {info.nfe} in {record['seconds']:.0f} s")
    for method, tol in (("adaptive", REF_TOL / 10), ("ode", 1e-5), ("ode", 1e-7)):
        x, info_c = sdegen.sample(sde, model, x_T[:check], method=method, rtol=tol, atol=tol, return_info=True)
        gap = per_image_error(ref[:check], x)
        solver = "sdegen adaptive" if method == "adaptive" else "torchdiffeq dopri5 (t)"
        record["checks"].append({"solver": solver, "tol": tol, "nfe": info_c.nfe,
                                 "rms": gap.pow(2).mean().sqrt().item(), "max": gap.max().item()})
        log(f"  check against {solver} at {tol:g} (NFE {info_c.nfe}): RMS {record['checks'][-1]['rms']:.2e}, "
            f"max {record['checks'][-1]['max']:.2e}")
    return ref, record


# ------------------------------------------------------------------ the run
def calibrate(sde, model, args, log):
    """Fit exp_pc-2/3 grids at CAL_NFE on calibration starting points of their own (seed 11)."""
    pool = sde.prior_sample((args.cal_pool, 1, 8, 8), seed=11)
    specs, fits = {}, []
    for name, (method, opts) in oracle_bench.CALIBRATED.items():
        grids = {}
        for nfe in [n for n in CAL_NFE if n in args.nfe]:
            t0 = time.time()
            fit = sdegen.optimize_schedule(sde, model, pool, method=method, steps=nfe, init="few_step",
                                           subset=args.cal_subset, max_evals=args.cal_max_evals,
                                           min_step_size=args.cal_min_step,
                                           reference_options=CAL_REFERENCE, **opts)
            grids[nfe] = fit.times
            fits.append({"sampler": name, "nfe": nfe, "initial_mse": fit.initial_loss, "mse": fit.loss,
                         "evaluations": fit.evaluations, "nfe_spent": fit.nfe, "seconds": time.time() - t0,
                         "sigmas": [round(v, 4) for v in sde.sigma(fit.times).tolist()]})
            log(f"  calibrated {name} NFE {nfe}: MSE {fit.initial_loss:.3g} -> {fit.loss:.3g}, "
                f"{fit.evaluations} runs, {fit.nfe} score calls, {fits[-1]['seconds']:.0f} s")
        specs[name] = (method, opts, grids, 1, False)
    return specs, fits


def run_all(sde, model, clean, x_T, ref, specs, args, log):
    ref_labels = example.predict(clean, ref) if clean is not None else None
    adapter = NetworkScore(model)
    configs = [(DEFAULT_NAME, DEFAULT, oracle_bench.run_sdegen, "default")]
    configs += [(n, s, oracle_bench.run_sdegen, "sdegen") for n, s in specs.items()]
    configs += [(n, s, suite.run_diffusers, "diffusers") for n, s in DIFFUSERS.items()]
    rows = []
    for name, spec, runner, family in configs:
        t0 = time.time()
        for nfe in args.nfe:
            if nfe > 50 and name not in LONG:
                continue
            t1 = time.time()
            try:
                out = runner(spec, sde, adapter, x_T, nfe)
            except Exception as exc:  # a baseline that fails is recorded as non-finite, not fatal
                log(f"{name} NFE {nfe} failed: {type(exc).__name__}: {exc}")
                out = (torch.full_like(x_T, math.nan), nfe)
            if out is not None:
                rows.append(dict(sampler=name, family=family, nfe=out[1], nfe_slot=nfe, seconds=time.time() - t1,
                                 pilot_nfe=out[2] if len(out) > 2 else 0,
                                 **endpoint_errors(out[0], ref, ref_labels, clean)))
        log(f"{name}: {time.time() - t0:.1f} s")
    return rows


# ------------------------------------------------------------------ reporting
def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def headline(rows):
    """Per NFE slot 10 and 20 and family: the row with the lowest RMS and the row with the lowest median."""
    out = []
    for nfe in CAL_NFE:
        for family in ("default", "sdegen", "sdegen calibrated", "diffusers"):
            sel = [r for r in rows if r["nfe_slot"] == nfe and r["family"] == family]
            if sel:
                best, low = min(sel, key=lambda r: r["rms"]), min(sel, key=lambda r: r["median"])
                out.append({"nfe": nfe, "family": family, "best_rms": best, "best_median": low})
    return out


def target_lines(rows):
    """The target: at NFE 10 and 20 the recommended default's RMS is at most 0.6 times the best diffusers row's."""
    out = []
    for nfe in CAL_NFE:
        sel = [r for r in rows if r["nfe_slot"] == nfe]
        ours = [r for r in sel if r["family"] == "default"]
        theirs = [r for r in sel if r["family"] == "diffusers" and math.isfinite(r["rms"])]
        if ours and theirs:
            d, b = ours[0], min(theirs, key=lambda r: r["rms"])
            ratio = d["rms"] / b["rms"]
            out.append(f"NFE {nfe}: default {d['sampler']} RMS {d['rms']:.3g} (median {d['median']:.3g}), best "
                       f"diffusers {b['sampler']} RMS {b['rms']:.3g} (median {b['median']:.3g}): ratio {ratio:.2f} "
                       f"(target <= 0.6) -> {'MET' if ratio <= 0.6 else 'NOT MET'}")
    return out


def calibration_lines(fits, settings):
    if not fits:
        return []
    lines = ["", "## Calibrated schedules (sdegen.optimize_schedule)", "",
             f"Fitted on {settings['cal_subset']} screened points of a pool of {settings['cal_pool']} starting points "
             "(seed 11, not the evaluation points) against dopri5 at 1e-5, MSE objective (weighted mean of the squared "
             "L2 norm of the whole-image error: 64 times the per-pixel MSE), pattern search from the few_step grid "
             f"capped at max_evals {settings['cal_max_evals']} sampler runs (min_step_size {settings['cal_min_step']}). "
             "Score calls: batched calls on the subset (the screening's on the pool), reference solve included.", "",
             "| sampler | NFE | calibration MSE (start -> fitted) | runs | score calls | seconds | sigma = s/m at the grid |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {f['sampler']} | {f['nfe']} | {f['initial_mse']:.3g} -> {f['mse']:.3g} | {f['evaluations']} | "
              f"{f['nfe_spent']} | {f['seconds']:.0f} | {', '.join(f'{v:.3g}' for v in f['sigmas'])} |" for f in fits]
    return lines


def markdown(rows, heads, ref_record, fits, settings):
    lines = ["# Solver steps against quality on the trained digits model", "",
             f"Score model: examples/conditional_generation.py's U-Net (VP SDE, {settings['train_steps']} training steps, "
             f"checkpoint {settings['tag']}). {settings['images']} starting points x_T (float32, seed 1); per-image error "
             "= per-pixel RMS of x - ref (pixels in [-1, 1]); columns: RMS over images, median, maximum, and the fraction "
             "of images whose clean-classifier label differs from the reference's (flips). A method of k NFE per step "
             f"runs nfe // k steps and shows the NFE it used. Threads: {settings['threads']}; "
             f"device {settings.get('device', 'cpu')}; "
             f"total run {settings['seconds'] / 60:.1f} min.", ""] + settings.get("provenance", []) + ["",
             f"Reference: sdegen's adaptive solver (exponential predictor-corrector with error control in log m/s), "
             f"rtol = atol = {REF_TOL:g}, NFE {ref_record['nfe']} ({ref_record['seconds']:.0f} s). Checked on the first "
             f"{ref_record['check_images']} images against (per-image error as above):", "",
             "| solver | rtol = atol | NFE | RMS difference | max difference |", "|---|---|---|---|---|"]
    lines += [f"| {c['solver']} | {c['tol']:g} | {c['nfe']} | {c['rms']:.2g} | {c['max']:.2g} |"
              for c in ref_record["checks"]]
    lines += ["", "## Headline (NFE 10 and 20)", "",
              "| NFE | family | lowest RMS: sampler | RMS | median | flips | lowest median: sampler | median | RMS |",
              "|---|---|---|---|---|---|---|---|---|"]
    for h in heads:
        b, m = h["best_rms"], h["best_median"]
        lines.append(f"| {h['nfe']} | {h['family']} | {b['sampler']} | {fmt(b['rms'])} | {fmt(b['median'])} | "
                     f"{fmt(b.get('flips'))} | {m['sampler']} | {fmt(m['median'])} | {fmt(m['rms'])} |")
    lines += ["", "## Target", ""] + [f"- {s}" for s in target_lines(rows)]
    lines += calibration_lines(fits, settings)
    if any(not math.isfinite(r["rms"]) for r in rows):
        lines += ["", "Rows with inf: the sampler returned non-finite images. For diffusers' 3M on Karras sigmas from NFE 15 "
                  "on (where it drops lower_order_final) the grid's last two sigmas are both sigma_min, and the "
                  "third-order update of that zero-length final step divides by its length (NaN; the same happens on "
                  "the oracle in solver_steps.md)."]
    keys = ["rms", "median", "max", "flips", "pilot_nfe"]  # pilot_nfe: schedule="pilot"'s calls on 64 examples
    for nfe in sorted({r["nfe_slot"] for r in rows}):
        sel = sorted([r for r in rows if r["nfe_slot"] == nfe], key=lambda r: r["rms"])
        lines += ["", f"## NFE {nfe}", "", "| sampler | NFE used | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines += [f"| {r['sampler']} | {r['nfe']} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in sel]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["sampler"] for r in rows))
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (metric, label) in zip(axes, (("rms", "RMS over images of per-image error"),
                                          ("median", "median per-image error"))):
        for name in names:
            sel = [r for r in rows if r["sampler"] == name and math.isfinite(r[metric])]
            if sel:
                style = "s--" if "diffusers" in name else ("D-" if "calibrated" in name else "o-")
                ax.loglog([r["nfe"] for r in sel], [max(r[metric], 1e-9) for r in sel], style, color=colors[name],
                          label=name, ms=4)
        ax.set(title=f"digits U-Net, VP: {label}", xlabel="NFE", ylabel=label)
        ax.set_ylim(top=3.0)  # the 1-2 step runs of Heun and DPM-Solver-3 at NFE 5 are far off the scale
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(rows, heads, ref_record, fits, settings, out, name="solver_steps_digits"):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(
        {"rows": rows, "reference": ref_record, "calibration": fits, "settings": settings}, indent=1))
    (out / f"{name}.md").write_text(markdown(rows, heads, ref_record, fits, settings))
    keys = ["sampler", "family", "nfe_slot", "nfe", "rms", "median", "max", "flips", "pilot_nfe", "seconds"]
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in keys if any(k in r for r in rows)])
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / f"{name}.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default=example.CHECKPOINTS,
                   help="folder of the example's checkpoints and their SHA256SUMS (default: the shipped ones)")
    # None: filled from the mode (the full run's value, or --quick's), so that an explicit value always wins
    p.add_argument("--images", type=int, default=None, help="evaluation starting points (default 256; 32 with --quick)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE budgets (default 5,10,20,50,100; 10,20 with --quick)")
    p.add_argument("--check", type=int, default=None,
                   help="images on which the reference is checked against 1e-6 (default 16; 4 with --quick)")
    p.add_argument("--cal-pool", type=int, default=None,
                   help="calibration starting points (screened; default 1024, 128 with --quick)")
    p.add_argument("--cal-subset", type=int, default=None,
                   help="screened calibration points the grid is fitted on (default 128; 32 with --quick)")
    p.add_argument("--cal-max-evals", type=int, default=None,
                   help="optimize_schedule's max_evals (sampler runs; default 60, 10 with --quick)")
    p.add_argument("--cal-min-step", type=float, default=0.02, help="optimize_schedule's min_step_size")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--no-flips", action="store_true",
                   help="skip the clean classifier (neither checked nor loaded; no flips column)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(oracle_bench.RESULTS))
    p.add_argument("--name", default=None, help="report file names (NAME.md, .csv, .json, .png; default "
                   "solver_steps_digits, or solver_steps_digits_quick with --quick)")
    p.add_argument("--report-only", action="store_true", help="re-render the tables and plot from the JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 images, NFE 10 and 20, a short calibration")
    args = p.parse_args(argv)
    mode = (dict(images=32, nfe="10,20", check=4, cal_pool=128, cal_subset=32, cal_max_evals=10) if args.quick else
            dict(images=256, nfe="5,10,20,50,100", check=16, cal_pool=1024, cal_subset=128, cal_max_evals=60))
    for key, value in mode.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.name is None:
        args.name = "solver_steps_digits_quick" if args.quick else "solver_steps_digits"
    args.nfe = tuple(int(n) for n in args.nfe.split(","))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        data = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        rows = data["rows"]
        write_reports(rows, headline(rows), data["reference"], data["calibration"], data["settings"], Path(args.out),
                      args.name)
        return
    torch.set_num_threads(args.threads)
    start = time.time()
    log = lambda msg: print(f"{time.time() - start:7.1f}s {msg}", flush=True)
    model, clean, tag, train_steps = load_models(args, log)
    model = model.to(args.device)
    clean = clean.to(args.device) if clean is not None else None
    sde = model.sde
    with torch.no_grad():
        x_T = sde.prior_sample((args.images, 1, 8, 8), seed=1).to(args.device)
        ref, ref_record = reference(sde, model, x_T, args.check, log)
        specs, fits = dict(SDEGEN), []
        if not args.no_calibration:
            extra, fits = calibrate(sde, model, args, log)
            specs.update(extra)
        rows = run_all(sde, model, clean, x_T, ref, specs, args, log)
    for r in rows:
        if "calibrated" in r["sampler"]:
            r["family"] = "sdegen calibrated"
    heads = headline(rows)
    settings = {"train_steps": train_steps, "tag": tag, "images": args.images, "threads": args.threads,
                "seconds": time.time() - start, "cal_pool": args.cal_pool, "cal_subset": args.cal_subset,
                "cal_max_evals": args.cal_max_evals, "cal_min_step": args.cal_min_step, "device": args.device,
                "provenance": common.provenance(start, device=args.device)}
    write_reports(rows, heads, ref_record, fits, settings, Path(args.out), args.name)
    for h in heads:
        b, m = h["best_rms"], h["best_median"]
        log(f"NFE {h['nfe']} {h['family']}: lowest RMS {b['sampler']} {b['rms']:.3g} (median {b['median']:.3g}); "
            f"lowest median {m['sampler']} {m['median']:.3g} (RMS {m['rms']:.3g})")
    for line in target_lines(rows):
        log(line)
    log(f"done: total runtime {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
