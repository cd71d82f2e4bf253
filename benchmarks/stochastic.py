"""Stochastic samplers against exact draws of p_{t_min}: within-mode variance and mixture weights over the noise floor.

Every stochastic sampler of the registry runs with the oracle's exact score (GaussianMixture) to the SDE's t_min on
its default schedule and on the log-SNR grid, at NFE 20, 50 and 100 (or ``--nfe``; a sampler takes the most
steps whose declared NFE is within the budget: NFE // k for k NFE per step, one step more for Heun's final Euler
step and Restart's re-solves counted), and is compared with exact draws of p_{t_min}:

- variance ratio: the mean squared Mahalanobis distance per dimension to the most responsible component of
  p_{t_min}, over the same statistic of exact draws (1.000 is exact; "at the floor" is within 5%);
- weight error / floor: the RMS over ``--sets`` independent sample sets of the L1 error of the assignment fractions,
  over the same RMS for sets of exact draws of the same size (1.0 is as good as exact sampling; "at the floor" is
  at most 1.5).

Problems: the 2-D ring, the 16-D mixture of six components (both designed on elsewhere), and mixtures drawn fresh
for this benchmark (8-D and 32-D, seeds no sampler was tuned on); ``--holdout SEED [SEED ...]`` adds a 4-D and a
64-D mixture drawn from each SEED (``--no-ref`` runs only those); ``--suite-holdout SEED [SEED ...]`` adds three
problems per SEED from benchmarks/suite_solvers.py's hold-out draws (dimension 2-256, means 0.5-40 apart, component
standard deviations 0.01-1, each under its own SDE: VP, cosine, sub-VP, VE, EDM or flow).
Each problem's "prior gap" (:func:`prior_gap`) says how much of a weight error the SDE's prior alone causes (a VP SDE
whose m(T) times the means' spread is not small leaves p_T off the prior); ``--start exact`` starts every sampler
from exact draws of p_T instead, to measure the sampler's own error there.

``--schedules`` picks the grids of the step samplers: ``default`` (the sampler's own), any of time_grid's names, or
``pilot`` / ``pilot_local`` (sdegen.schedules.pilot_grid, laid out for the probability-flow ODE's error; its pilot
model calls are not counted in the NFE), ``sensitivity`` (sdegen.sensitivity_grid.sensitivity_grid for the
sampler's order: equal step errors of the denoiser's sensitivity J (I - J) measured by a pilot, whose calls are not
counted either), or ``data_jump`` / ``data_jump_log_snr`` (:func:`data_jump_grid`: "few_step"
with its jump set by the data's scale, warped or in equal log-SNR steps after it). The weight ratio is an RMS over ``--sets`` sets: for sets of exact draws
(n = 4000, 3 sets) it reads 1.0 with a standard deviation of 0.16-0.22 and a 95th percentile of 1.25 (ring, 16-D and
4-D problems, 40 groups of 3 sets), so a single reading near 1.5 does not separate a sampler from the floor; use
more sets to decide such cases.

Writes benchmarks/results/stochastic.md (stochastic_quick.md with --quick, so that a smoke run never replaces the
published table; an explicit --out wins). --quick sets NFE 50 and two sets only where --nfe and --sets are not
given. Usage:
    python benchmarks/stochastic.py [--quick] [--n 4000] [--sets 4] [--holdout SEED ...] [--no-ref]
        [--only NAME ...] [--schedules default log_snr pilot ...] [--device D] [--threads N] [--out PATH]
"""

import argparse
import math
import os
import time

import torch

import sdegen
from common import exact_floor, provenance, within_mode
from sdegen.analytic import GaussianMixture
from sdegen.sensitivity_grid import sensitivity_grid

F64 = torch.float64

# name -> (method, options, NFE per step); every stochastic entry of sdegen's registry (the torchsde back end in
# its fixed-step Euler-Maruyama setting)
SAMPLERS = {
    "euler_maruyama": ("euler_maruyama", {}, 1),
    "reverse_diffusion": ("reverse_diffusion", {}, 1),
    "ancestral": ("ancestral", {}, 1),
    "pc (1 corrector)": ("pc", {}, 2),
    "ddim eta=1": ("ddim", {"eta": 1.0}, 1),
    "euler_ancestral": ("euler_ancestral", {}, 1),
    "heun churn=10": ("heun", {"s_churn": 10.0}, 2),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}, 2),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, 2),
    "restart": ("restart", {}, 2),
    "restart solver=heun": ("restart", {"solver": "heun"}, 2),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, 1),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, 1),
    "dpmpp_sde": ("dpmpp_sde", {}, 2),
    "dpmpp_sde sigma clock": ("dpmpp_sde", {"brownian": "sigma"}, 2),
    "sa_solver tau=1": ("sa_solver", {}, 1),
    "sa_solver tau=0.7": ("sa_solver", {"tau": 0.7}, 1),
    "sa_solver tau=1 p2c3": ("sa_solver", {"predictor_order": 2, "corrector_order": 3}, 1),
    "sa_solver tau=1 p1c2": ("sa_solver", {"predictor_order": 1, "corrector_order": 2}, 1),
    "sa_solver tau=1 sigma>=0.3": ("sa_solver", {"s_tmin": 0.3}, 1),
    "sa_solver tau=1 sigma>=1": ("sa_solver", {"s_tmin": 1.0}, 1),
    "exp_adams-2 eta=1": ("exp_adams", {"predictor_order": 2, "eta": 1.0}, 1),
    "torchsde euler": ("sde", {}, 1),
}


def method_is_solver(method):
    """Whether a registry entry integrates a whole span itself (a named schedule does not apply to it)."""
    return isinstance(sdegen.samplers.get_sampler(method), sdegen.samplers.Solver)


def steps_for(spec, nfe):
    """The most steps whose declared NFE (the sampler's ``total_nfe``) is at most ``nfe`` (at least one step); for
    a whole-span solver, nfe // NFE per step."""
    method, opts, per_step = spec
    sampler = sdegen.samplers.get_sampler(method, **opts)
    if not hasattr(sampler, "total_nfe"):
        start = 1 if method == "sde" else 0  # torchsde evaluates the drift once at the start to check its shapes
        return max((nfe - start) // per_step, 1)
    steps = 1
    while sampler.total_nfe(steps + 1) <= nfe:
        steps += 1
    return steps


def problems(holdout=()):
    out = {"2-D ring": GaussianMixture.ring(),
           "16-D mixture": GaussianMixture.random(dim=16, n_components=6, seed=0),
           "8-D fresh (seed 23)": GaussianMixture.random(dim=8, n_components=5, seed=23, mean_scale=1.5),
           "32-D fresh (seed 5)": GaussianMixture.random(dim=32, n_components=4, seed=5, mean_scale=0.7,
                                                         cov_scale=0.3)}
    for seed in holdout:
        out[f"4-D holdout {seed}"] = GaussianMixture.random(dim=4, n_components=3, seed=seed, mean_scale=2.0)
        out[f"64-D holdout {seed}"] = GaussianMixture.random(dim=64, n_components=6, seed=seed + 1,
                                                             mean_scale=0.5, cov_scale=0.2)
    return out


SENSITIVITY = "sensitivity"  # sdegen.sensitivity_grid for the sampler's order (its pilot calls are not counted)
DATA_JUMP = {"data_jump": 0.8, "data_jump_log_snr": 1.0}  # schedule name -> warp power after the jump
DATA_JUMP_TOL = 0.01  # the largest sensitivity |dD/dy| of the denoiser left to the jump


def data_jump_grid(gm, sde, steps, power=0.8, n=4000, seed=999):
    """The "few_step" log-SNR grid (sdegen.schedules.few_step_log_snr) with its jump ending at a sigma set by the
    data instead of sigma = 10: for data of covariance C the denoiser in y = x/m is nearly D(y) = mu + C (C +
    sigma^2 I)^{-1} (y - mu), whose sensitivity is at most s^2 / (s^2 + sigma^2), s^2 the largest eigenvalue of C;
    the jump ends where that is DATA_JUMP_TOL, sigma = s sqrt(1/tol - 1). s is taken from n exact draws of p_t_min
    (what a pilot run's final states would estimate). ``power`` warps the remaining steps as few_step does (0.8 is
    few_step's, tuned on the ring and the 16-D mixture; 1.0, "data_jump_log_snr", is equal log-SNR steps after the
    jump)."""
    from sdegen.schedules import few_step_log_snr, time_grid
    x0 = gm.sample(n, sde=sde, t=sde.t_min, seed=seed).to(F64)
    cov = torch.atleast_2d(torch.cov(x0.T))
    s = float(torch.linalg.eigvalsh(cov)[-1].sqrt())
    lam_ends = sde.log_snr(time_grid(sde, 1, "uniform"))
    return sde.t_from_log_snr(few_step_log_snr(lam_ends, steps, sigma_jump=s * math.sqrt(1.0 / DATA_JUMP_TOL - 1.0),
                                               power=power))


def prior_gap(gm, sde, floor, n=20000, seed=4242):
    """How far the prior is from p_T in the weight metric: the L1 error of the mean component responsibilities at T
    of n prior draws, over the weight floor. A reverse process started from the prior carries about this error into
    its weights (the probability flow keeps the component a trajectory is attributed to at T), whatever the sampler;
    well above 1.5 the problem's SDE, not the sampler, sets the weight error (``--start exact`` removes it)."""
    g = torch.Generator().manual_seed(seed)
    z = sde.prior_std * torch.randn(n, gm.dim, generator=g, dtype=F64)
    r = gm.responsibilities(sde, z, torch.tensor(sde.T, dtype=F64)).mean(0)
    return float((r - gm.weights).abs().sum()) / floor


def measure(gm, sde, spec, schedule, nfe, n, sets, ref, device, start="prior"):
    method, opts, per_step = spec
    gm_t = gm.marginal(sde, sde.t_min)
    qs, errs = [], []
    steps = steps_for(spec, nfe)
    if schedule in DATA_JUMP:
        schedule = data_jump_grid(gm, sde, steps, power=DATA_JUMP[schedule])
    elif schedule == SENSITIVITY:
        order = sdegen.samplers.get_sampler(method, **opts).order
        schedule, _ = sensitivity_grid(sde, gm, steps, (gm.dim,), order=order, device=device)
    for rep in range(sets):
        x_T = None
        if start == "exact":  # exact draws of p_T: the sampler's error alone, without the prior's mismatch
            x_T = gm.sample(n, sde=sde, t=sde.T, seed=10 * rep + 2, device=device)
        x = sdegen.sample(sde, gm, x_T, shape=None if start == "exact" else (n, gm.dim), method=method,
                          steps=steps, schedule=schedule, seed=10 * rep + 1, device=device,
                          dtype=None if start == "exact" else F64, **opts).cpu()
        if not torch.isfinite(x).all():
            return math.nan, math.nan
        q, w = within_mode(gm_t, x)
        qs.append(q)
        errs.append(float((w - gm.weights).abs().sum()) ** 2)
    q_ref, w_floor = ref
    return sum(qs) / sets / q_ref, math.sqrt(sum(errs) / sets) / w_floor


def summarize(results, names, nfes, schedules):
    """Per sampler and schedule: at the floor on every problem at each NFE, with the range of the variance ratio
    and the range of the weight ratio over the problems."""
    out = []
    for name in names:
        for schedule in schedules:
            cells = []
            for nfe in nfes:
                got = [r for (p, n, sc, k), r in results.items() if n == name and sc == schedule and k == nfe]
                if not got:
                    break
                vs, ws = [g[0] for g in got], [g[1] for g in got]
                verdict = "yes" if all(g[2] for g in got) else "no"
                cells.append(f"{verdict} (var {min(vs):.3f}-{max(vs):.3f}, weights {min(ws):.2f}-{max(ws):.2f})")
            if cells:
                out.append(f"| {name} | {schedule} | " + " | ".join(cells) + " |")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="NFE 50 only, two sets (where --nfe and --sets are not given); writes stochastic_quick.md")
    parser.add_argument("--n", type=int, default=4000, help="samples per set")
    parser.add_argument("--sets", type=int, default=None,
                        help="independent sample sets per configuration (default 4; 2 with --quick)")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 20 50 100; 50 with --quick)")
    parser.add_argument("--only", nargs="+", default=None, help="sampler names to run (default: all)")
    parser.add_argument("--holdout", type=int, nargs="+", default=[],
                        help="seeds of extra problems (a 4-D and a 64-D mixture per seed)")
    parser.add_argument("--schedules", nargs="+", default=["default", "log_snr"],
                        help="grids to run each step sampler on: default (its own), or names of time_grid / "
                             "'pilot' / 'pilot_local' / 'sensitivity' / 'data_jump' (a pilot's model calls are "
                             "not counted in the NFE)")
    parser.add_argument("--suite-holdout", type=int, nargs="+", default=[],
                        help="seeds of suite_solvers.holdout_problems (3 per seed: dimension, separation and SDE "
                             "drawn at random; each problem under its own SDE)")
    parser.add_argument("--no-ref", action="store_true",
                        help="only the named problems: skip the ring and the 16-D mixture (hold-out runs)")
    parser.add_argument("--start", choices=("prior", "exact"), default="prior",
                        help="x_T from the SDE's prior (what a user gets) or exact draws of p_T (the sampler's own "
                             "error; the prior gap column says where the two differ)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own)")
    parser.add_argument("--out", default=None,
                        help="report path (default: results/stochastic.md, or results/stochastic_quick.md with --quick)")
    args = parser.parse_args()
    if args.nfe is None:
        args.nfe = [50] if args.quick else [20, 50, 100]
    if args.sets is None:
        args.sets = 2 if args.quick else 4
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                "stochastic_quick.md" if args.quick else "stochastic.md")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    start = time.time()
    rows, results, gaps = [], {}, {}
    names = args.only or list(SAMPLERS)
    probs = {k: (gm, sdegen.VPSDE()) for k, gm in problems(args.holdout).items()}
    if args.no_ref:
        probs = {k: v for k, v in probs.items() if "holdout" in k}
    if args.suite_holdout:
        from suite_solvers import holdout_problems
        for seed in args.suite_holdout:
            probs.update({k: (gm, sde) for k, (gm, sde, _, _) in holdout_problems(seed, 3).items()})
    for pname, (gm, sde) in probs.items():
        ref = exact_floor(gm, sde, args.n, 40)
        gaps[pname] = prior_gap(gm, sde, ref[1])
        for name in names:
            spec = SAMPLERS[name]
            scheds = [None if sc == "default" else sc for sc in args.schedules]
            for schedule in ((None,) if method_is_solver(spec[0]) else scheds):
                cells = []
                for nfe in args.nfe:
                    v, w = measure(gm, sde, spec, schedule, nfe, args.n, args.sets, ref, args.device, args.start)
                    ok = abs(v - 1.0) <= 0.05 and w <= 1.5
                    results[(pname, name, schedule or "default", nfe)] = (v, w, ok)
                    cells.append(f"{v:.3f} | {w:.2f}{' *' if ok else ''}")
                rows.append(f"| {pname} | {name} | {schedule or 'default'} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    head = " | ".join(f"var NFE {k} | weights NFE {k}" for k in args.nfe)
    summary = summarize(results, names, args.nfe, args.schedules)
    lines = ["# Stochastic samplers against exact draws of p_t_min", "",
             *provenance(start, f"{args.device}, {torch.get_num_threads()} CPU thread(s)"),
             f"- VP SDE (suite hold-out problems: their own SDE), exact score of the oracle, float64, {args.sets} sets of {args.n} samples per configuration "
             "(seeds 1, 11, ...); floor from 40 sets of exact draws of p_t_min",
             "- var: within-mode variance ratio (mean squared Mahalanobis distance per dimension to the most "
             "responsible component of p_t_min, samples over exact draws; 1.000 is exact)",
             "- weights: RMS L1 error of the assignment fractions over the same RMS for exact draws (1.0 is the "
             "floor); `*` marks a configuration at the floor (variance within 5%, weights within 1.5x)",
             "- schedule: `default` is the sampler's own default grid",
             "- NFE k: each sampler takes the most steps whose declared NFE (`total_nfe`) is at most k",
             f"- start: x_T {'from the prior' if args.start == 'prior' else 'drawn exactly from p_T'}; prior gap: the "
             "L1 error of the mean responsibilities at T of prior draws over the weight floor (what starting from "
             "the prior alone costs the weights; above 1.5 no sampler started there reaches the floor)", "",
             "| problem | prior gap |", "|---|---|", *(f"| {k} | {v:.2f} |" for k, v in gaps.items()), "",
             "## At the floor on every problem (variance within 5%, weights within 1.5x the floor)", "",
             "| sampler | schedule | " + " | ".join(f"NFE {k}" for k in args.nfe) + " |",
             "|---|---|" + "---|" * len(args.nfe), *summary, "", "## Per problem", "",
             f"| problem | sampler | schedule | {head} |", "|---|---|---|" + "---|---|" * len(args.nfe),
             *rows, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
