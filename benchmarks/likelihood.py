"""Benchmark: probability-flow log-likelihoods, exact divergence and Hutchinson, against the paper's method.

Problems: the oracle's 2-D ring and 16-D random mixture (sdegen.GaussianMixture), 512 held-out exact
samples each, VP SDE (beta in [0.1, 20]) with the oracle's exact score, integrated from t_min = 1e-7 to T = 1
(the ODE gives log p_{t_min}; the second table reports its exact gap to log p_0, < 1e-4 nats/dim here).
Ground truth: the oracle's exact log p_0.

Methods:
- sdegen exact divergence (dopri5, per-example error control) at rtol = atol in {1e-3, 1e-4, 1e-5};
- sdegen Hutchinson, Rademacher and Gaussian probes, K = 1, 4, 16, at rtol = atol in {1e-3, 1e-5};
- baseline: the method of the original score_sde code (Song et al. 2021), reimplemented here:
  scipy.integrate.solve_ivp(RK45) over the flattened batch, numpy round trips at every evaluation, one
  Rademacher probe, the drift and the divergence computed by separate passes as in that code.
Every run takes the oracle's exact p_T as its prior; the standard-normal prior's own cost is reported in a
separate table (same ODE solve, only the prior differs).

Outputs in benchmarks/results/ (or --out DIR): likelihood.md, likelihood.csv, likelihood.json,
likelihood_accuracy.png, likelihood_nfe.png; --quick writes likelihood_quick.* instead (likelihood_quick.md, ...,
likelihood_quick_accuracy.png), so that a smoke run never replaces the published files.
Run:  python benchmarks/likelihood.py [--repeats 5] [--quick] [--device cuda] [--threads N] [--out DIR]
--device applies to every mode (the studies below included); the reports name the device and the CPU threads.

``--nfe-study`` (writes likelihood_nfe.md) measures instead what per-example error control costs: on mixtures drawn
for it under VP, VE, sub-VP, EDM, flow and cosine-VP SDEs, the NFE and per-example errors of log_likelihood against
torchdiffeq's dopri5 with its batch-average norm at the same rtol = atol (exact divergence and one probe), the
options for closing the gap (time variable sigma or log sigma in x or in y = x/m, dopri8, Tsitouras' 5(4) pair,
a PI step-size controller, the weight of the log-density term in the norm), and the NFE each needs at equal
worst-case accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import torch
import common
from common import cpu_model

import sdegen

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
T_MIN = 1e-7
N_TEST = 512

DEVICE = torch.device("cpu")  # set by --device


def problems():
    return {"ring2d": sdegen.GaussianMixture.ring(), "mix16d": sdegen.GaussianMixture.random(dim=16, seed=0)}


def baseline_log_likelihood(sde, gm, x, *, rtol, atol, prior, seed=0):
    """score_sde's likelihood recipe: solve_ivp RK45 on [x, logp] flattened, numpy in and out every call."""
    from scipy import integrate

    ode = sde.probability_flow(gm)
    shape, B = x.shape, x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randint(0, 2, shape, generator=gen).to(x.dtype) * 2 - 1  # one Rademacher probe, fixed
    nfe = [0]

    def drift(z, t):
        return ode.drift(z, torch.full((B,), t, dtype=torch.float64))

    def ode_func(t, y):
        nfe[0] += 1
        z = torch.from_numpy(y[:-B]).reshape(shape).to(x.dtype)
        with torch.no_grad():
            f = drift(z, t)
        with torch.enable_grad():  # a second forward pass for the divergence, as in the original code
            zg = z.detach().requires_grad_(True)
            g, = torch.autograd.grad((drift(zg, t) * eps).sum(), zg)
        div = (g * eps).reshape(B, -1).sum(1)
        return np.concatenate([f.detach().cpu().numpy().reshape(-1), div.detach().cpu().numpy().reshape(-1)])

    y0 = np.concatenate([x.cpu().numpy().reshape(-1), np.zeros(B)])
    sol = integrate.solve_ivp(ode_func, (T_MIN, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    zT = torch.from_numpy(sol.y[:-B, -1]).reshape(shape).to(x.dtype)
    delta = torch.from_numpy(sol.y[-B:, -1]).to(x.dtype)
    return prior(zT) + delta, nfe[0]


def errors(log_prob, exact, dim):
    e = (log_prob - exact).abs() / dim
    return {"err_max": float(e.max()), "err_median": float(e.median()), "err_mean": float(e.mean()),
            "bias_mean": float(((log_prob - exact) / dim).mean())}


def _sync():
    """Wait for queued GPU work, so that a wall time covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeats):
    walls, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        walls.append(time.perf_counter() - t0)
    return out, statistics.median(walls), walls


def run(repeats: int, quick: bool):
    sde = sdegen.VPSDE()
    rows, prior_rows = [], []
    exact_tols = [1e-3, 1e-4, 1e-5] if not quick else [1e-3]
    hutch_tols = [1e-3, 1e-5] if not quick else [1e-3]
    ks = [1, 4, 16] if not quick else [1]
    n = N_TEST if not quick else 64
    for pname, gm in problems().items():
        x = gm.sample(n, seed=2024, dtype=torch.float64, device=DEVICE)  # held out: seeds differ from anything used in fitting
        exact = gm.log_prob(x)
        pT = gm.marginal(sde, sde.T).log_prob
        tmin_gap = (gm.log_prob(sde, x, T_MIN) - exact).abs() / gm.dim
        print(f"[{pname}] log p_tmin - log p_0: max {float(tmin_gap.max()):.2e} nats/dim", flush=True)

        def record(method, tol, lp, nfe, wall, walls, probes=None, noise=None, steps=None):
            r = {"problem": pname, "dim": gm.dim, "batch": n, "method": method, "noise": noise, "probes": probes,
                 "rtol_atol": tol, "nfe": nfe, "steps": steps, "wall_s": wall, "wall_runs": walls,
                 **errors(lp, exact, gm.dim)}
            rows.append(r)
            print(f"  {method:10s} {str(noise):10s} K={str(probes):4s} tol={tol:.0e} nfe={nfe:5d} "
                  f"wall={wall:7.2f}s err_max={r['err_max']:.2e} err_median={r['err_median']:.2e}", flush=True)

        for tol in exact_tols:
            reps = repeats
            res, wall, walls = timed(lambda: sdegen.log_likelihood(sde, gm, x, divergence="exact", rtol=tol,
                                                                    atol=tol, t_min=T_MIN, prior=pT), reps)
            record("exact", tol, res.log_prob, res.nfe, wall, walls, steps=res.steps)
            if tol == min(exact_tols):  # the standard-normal prior on the same solve
                lp_std = res.delta_log_prob + sde.prior_log_prob(res.latent)
                gap = (lp_std - exact) / gm.dim
                ratio = (sde.prior_log_prob(res.latent) - pT(res.latent)) / gm.dim
                prior_rows.append({"problem": pname, "err_max_std_prior": float(gap.abs().max()),
                                   "err_mean_std_prior": float(gap.abs().mean()),
                                   "mean_log_ratio_per_dim": float(ratio.mean()),
                                   "err_max_exact_prior": float(((res.log_prob - exact) / gm.dim).abs().max()),
                                   "tmin_gap_max": float(tmin_gap.max())})
        for tol in hutch_tols:
            for noise in ("rademacher", "gaussian"):
                for k in ks:
                    reps = repeats
                    res, wall, walls = timed(lambda: sdegen.log_likelihood(
                        sde, gm, x, divergence="hutchinson", probe=noise, probes=k, seed=1, rtol=tol, atol=tol,
                        t_min=T_MIN, prior=pT), reps)
                    record("hutchinson", tol, res.log_prob, res.nfe, wall, walls, k, noise, res.steps)
        for tol in sorted(set(exact_tols + hutch_tols), reverse=True):
            reps = repeats
            (lp, nfe), wall, walls = timed(lambda: baseline_log_likelihood(sde, gm, x, rtol=tol, atol=tol, prior=pT),
                                           reps)
            record("baseline", tol, lp, nfe, wall, walls, 1, "rademacher")
    return rows, prior_rows


def headline(repeats: int, quick: bool):
    """The timing targets: exact, one-probe Hutchinson and the baseline at tol 1e-5, run interleaved round by
    round (so drifting load from other jobs hits all three alike); wall and process CPU time, medians."""
    sde, tol, n = sdegen.VPSDE(), 1e-5, N_TEST if not quick else 64
    out = []
    for pname, gm in problems().items():
        x = gm.sample(n, seed=2024, dtype=torch.float64, device=DEVICE)
        pT = gm.marginal(sde, sde.T).log_prob
        calls = {
            "exact": lambda: sdegen.log_likelihood(sde, gm, x, divergence="exact", rtol=tol, atol=tol,
                                                   t_min=T_MIN, prior=pT),
            "hutchinson": lambda: sdegen.log_likelihood(sde, gm, x, divergence="hutchinson", probe="rademacher",
                                                        probes=1, seed=1, rtol=tol, atol=tol, t_min=T_MIN, prior=pT),
            "baseline": lambda: baseline_log_likelihood(sde, gm, x, rtol=tol, atol=tol, prior=pT)}
        walls = {k: [] for k in calls}
        cpus = {k: [] for k in calls}
        for _ in range(repeats):
            for k, fn in calls.items():
                _sync()
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                _sync()
                walls[k].append(time.perf_counter() - w0)
                cpus[k].append(time.process_time() - c0)
        for k in calls:
            out.append({"problem": pname, "method": k, "batch": n, "rtol_atol": tol,
                        "wall_median": statistics.median(walls[k]), "cpu_median": statistics.median(cpus[k]),
                        "wall_runs": walls[k], "cpu_runs": cpus[k]})
            print(f"  headline {pname} {k:10s} wall {out[-1]['wall_median']:.2f}s cpu {out[-1]['cpu_median']:.2f}s "
                  f"runs {[round(w, 2) for w in walls[k]]}", flush=True)
    return out


def write(rows, prior_rows, heads, repeats, quick=False):
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, "likelihood_quick" if quick else "likelihood")
    with open(base + ".json", "w") as f:
        json.dump({"rows": rows, "prior": prior_rows, "headline": heads, "t_min": T_MIN, "repeats": repeats,
                   "torch": torch.__version__, "machine": platform.machine(), "device": str(DEVICE),
                   "threads": torch.get_num_threads()}, f, indent=1)
    keys = [k for k in rows[0] if k != "wall_runs"]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    import datetime

    lines = ["# Probability-flow log-likelihoods: accuracy, NFE, wall time", "",
             f"- machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, {platform.system()} "
             f"{platform.release()}; torch {torch.__version__}; device {DEVICE}, {torch.get_num_threads()} CPU "
             "thread(s)",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `{common.command()}`", "",
             f"VP SDE, exact oracle score, t_min = {T_MIN:g}, the oracle's exact p_T as prior; error = |log p - "
             f"log p_0| / D per example (nats/dim) over the held-out samples. Timing: device {DEVICE}, "
             f"{torch.get_num_threads()} CPU thread(s), wall time of the whole call, one run each, on a machine of "
             f"{os.cpu_count()} logical CPUs that may be shared with other jobs (the timing targets use the "
             "interleaved headline runs below).", "",
             "| problem | method | probes | K | rtol=atol | NFE | wall (s) | max err | median err | mean signed err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['method']} | {r['noise'] or '-'} | {r['probes'] or '-'} | "
                     f"{r['rtol_atol']:.0e} | {r['nfe']} | {r['wall_s']:.2f} | {r['err_max']:.2e} | "
                     f"{r['err_median']:.2e} | {r['bias_mean']:+.1e} |")
    lines += ["", "## The standard-normal prior's own cost (exact divergence, tol 1e-5)", "",
              "| problem | max err, N(0, I) prior | mean err, N(0, I) prior | mean log N(x_T)/p_T(x_T) per dim | "
              "max err, exact p_T prior | max (log p_tmin - log p_0)/D |", "|---|---|---|---|---|---|"]
    for p in prior_rows:
        lines.append(f"| {p['problem']} | {p['err_max_std_prior']:.2e} | {p['err_mean_std_prior']:.2e} | "
                     f"{p['mean_log_ratio_per_dim']:+.2e} | {p['err_max_exact_prior']:.2e} | {p['tmin_gap_max']:.2e} |")
    lines += ["", f"## Headline timing (tol 1e-5, batch {heads[0]['batch']}; the three methods run interleaved, "
              f"{repeats} rounds, medians of wall and process CPU time)", "",
              "| problem | method | wall median (s) | CPU median (s) | wall runs (s) |", "|---|---|---|---|---|"]
    for h in heads:
        lines.append(f"| {h['problem']} | {h['method']} | {h['wall_median']:.2f} | {h['cpu_median']:.2f} | "
                     f"{', '.join(f'{w:.2f}' for w in h['wall_runs'])} |")
    lines += ["", "## Targets", ""] + targets(rows, heads)
    lines += ["", "## Notes", "",
              "- One-probe rows (ours and the baseline alike) are limited by the probe's variance, not by the solver: "
              "their error does not fall with the tolerance; more probes per example cut it.",
              "- sdegen controls the error of every example and of its log-density term (max over the batch); the "
              "baseline's scipy RK45 controls the RMS over the whole flattened batch, which lets single examples "
              "miss the tolerance. At the same nominal tolerance the per-example control takes more steps (compare "
              "the NFE columns), which is where sdegen's Hutchinson path loses its per-evaluation advantage (one "
              "forward and one backward pass against the baseline's two forwards, one backward and numpy copies).",
              "- Exact divergence costs D vector-Jacobian products per evaluation; vmapping them removes the Python "
              "loop, but on one CPU thread the work still grows with D (no free parallelism as on a GPU)."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plots(rows, base)


def _find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def targets(rows, heads):
    out = []
    for p in ("ring2d", "mix16d"):
        e = _find(rows, problem=p, method="exact", rtol_atol=1e-5)
        if e:
            ok = e[0]["err_max"] <= 1e-3
            out.append(f"- exact, tol 1e-5, {p}: max per-example error {e[0]['err_max']:.2e} nats/dim "
                       f"(target <= 1e-3): {'met' if ok else 'NOT met'}")

    def ratio_line(p, method, limit, label):
        a, b = _find(heads, problem=p, method=method), _find(heads, problem=p, method="baseline")
        if not (a and b):
            return
        rw, rc = a[0]["wall_median"] / b[0]["wall_median"], a[0]["cpu_median"] / b[0]["cpu_median"]
        verdict = "met" if max(rw, rc) <= limit else ("NOT met" if min(rw, rc) > limit else "borderline")
        out.append(f"- {label}, {p}, batch {a[0]['batch']}, tol 1e-5: wall {a[0]['wall_median']:.2f} s vs "
                   f"{b[0]['wall_median']:.2f} s = {rw:.2f}x, CPU {rc:.2f}x (target <= {limit:g}x): {verdict}")

    ratio_line("mix16d", "exact", 3.0, "exact vs one-probe baseline")
    for p in ("ring2d", "mix16d"):
        ratio_line(p, "hutchinson", 1.0, "Hutchinson (Rademacher, K=1) vs baseline")
    return out


def plots(rows, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, p in zip(axes, ("ring2d", "mix16d")):
        for label, sel in [("exact", dict(method="exact")),
                           ("baseline (1 Rademacher, scipy)", dict(method="baseline"))] + [
                (f"Hutchinson {nz[:3]} K={k}", dict(method="hutchinson", noise=nz, probes=k))
                for nz in ("rademacher", "gaussian") for k in (1, 4, 16)]:
            rs = sorted(_find(rows, problem=p, **sel), key=lambda r: r["wall_s"])
            if rs:
                ax.plot([r["wall_s"] for r in rs], [r["err_max"] for r in rs], "o-", label=label, ms=4)
        ax.axhline(1e-3, color="k", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel="max per-example error (nats/dim)", title=p)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + "_accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, p in zip(axes, ("ring2d", "mix16d")):
        for label, sel in [("exact", dict(method="exact")), ("baseline", dict(method="baseline")),
                           ("Hutchinson rad K=1", dict(method="hutchinson", noise="rademacher", probes=1))]:
            rs = sorted(_find(rows, problem=p, **sel), key=lambda r: r["rtol_atol"])
            if rs:
                ax.plot([r["rtol_atol"] for r in rs], [r["nfe"] for r in rs], "o-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="NFE", title=p)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(base + "_nfe.png", dpi=110)
    plt.close(fig)


# --- cost of per-example error control across SDEs (--nfe-study) ------------------------------------------

def nfe_problems():
    """Mixtures drawn for this study only (seeds 101-107), one or two per SDE family."""
    rand = sdegen.GaussianMixture.random
    return {"VP 8-D (seed 101)": (rand(dim=8, n_components=4, seed=101), sdegen.VPSDE()),
            "VP 16-D (seed 107)": (rand(dim=16, n_components=5, seed=107, cov_scale=0.3), sdegen.VPSDE()),
            "VE 8-D (seed 102)": (rand(dim=8, n_components=3, seed=102, mean_scale=2.0, cov_scale=0.2),
                                  sdegen.VESDE()),
            "sub-VP 8-D (seed 103)": (rand(dim=8, n_components=4, seed=103), sdegen.SubVPSDE()),
            "EDM 16-D (seed 104)": (rand(dim=16, n_components=5, seed=104, mean_scale=0.8), sdegen.EDMSDE()),
            "flow 8-D (seed 105)": (rand(dim=8, n_components=4, seed=105), sdegen.FlowSDE()),
            "cosine VP 8-D (seed 106)": (rand(dim=8, n_components=4, seed=106), sdegen.CosineVPSDE())}


class _Counted(torch.nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field, self.nfe = field, 0

    def forward(self, t, y):
        self.nfe += 1
        return self.field(t, y)


class _Clocked(torch.nn.Module):
    """The augmented field in the clock v = sigma or log sigma, in x or in y = x / m. In y: dy/dt = (f~ - f x) / m and
    d l / dt = div f~ - D f (div_x f~ = D f + div_y dy/dt), so l gains D log(m(T) / m(t_min)) at the end; any clock
    multiplies the whole field by dt/dv, with dsigma/dt = s'/m - sigma f."""

    def __init__(self, flow, sde, clock, space, dim):
        super().__init__()
        self.flow, self.sde, self.clock, self.space, self.dim = flow, sde, clock, space, dim

    def v_of(self, t):
        sigma = self.sde.sigma(torch.tensor(t, dtype=torch.float64))
        return float(sigma if self.clock == "sigma" else torch.log(sigma))

    def forward(self, v, y):
        sigma = v.double() if self.clock == "sigma" else torch.exp(v.double())
        t = self.sde.t_from_sigma(sigma).clamp(self.flow.t_lo, self.flow.t_hi)
        m, f = self.sde.mean_coeff(t), self.sde.drift_coeff(t)
        if self.space == "y":
            out = self.flow(t, torch.cat([y[:, :-1] * m, y[:, -1:]], 1))
            out = torch.cat([(out[:, :-1] - f * m * y[:, :-1]) / m, out[:, -1:] - self.dim * f], 1)
        else:
            out = self.flow(t, y)
        sigma = self.sde.sigma(t)
        dsigma = self.sde.d_std(t) / m - sigma * f
        return out * (1.0 / dsigma if self.clock == "sigma" else sigma / dsigma)

    def solve(self, y0, t_lo, t_hi, tol):
        from sdegen.backends import solve_augmented

        m = lambda t: self.sde.mean_coeff(torch.tensor(t, dtype=torch.float64))  # noqa: E731
        if self.space == "y":
            y0 = torch.cat([y0[:, :-1] / m(t_lo), y0[:, -1:]], 1)
        y1, info = solve_augmented(self, y0, self.v_of(t_lo), self.v_of(t_hi), rtol=tol, atol=tol)
        if self.space == "y":
            y1 = torch.cat([y1[:, :-1] * m(t_hi), y1[:, -1:] + self.dim * torch.log(m(t_hi) / m(t_lo))], 1)
        return y1, info["nfe"]


# Tsitouras 2011 ("Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying assumption",
# table 1): nodes, stages, fifth-order weights and the difference to the embedded fourth-order ones.
TSIT5_C = (0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0)
TSIT5_A = ((0.161,), (-0.008480655492356989, 0.335480655492357),
           (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
           (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
           (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
           (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
            2.324710524099774))
TSIT5_E = (-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995, -0.1447110071732629,
           0.5823571654525552, -0.45808210592918697, 1.0 / 66.0)


def _tableau(name):
    if name == "tsit5":
        return TSIT5_C, TSIT5_A, TSIT5_A[-1] + (0.0,), TSIT5_E
    from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU as dp

    return (tuple(dp.alpha.tolist()), tuple(tuple(b.tolist()) for b in dp.beta), tuple(dp.c_sol.tolist()),
            tuple(dp.c_error.tolist()))


def rk45_per_example(field, y0, t0, t1, tol, tableau="dopri5", beta=0.0):
    """A 5(4) pair with the per-example norm (max over examples of the RMS of the error ratios), torchdiffeq's
    first step, and Gustafsson's PI controller h' = h 0.9 r^-(1/5 - 3 beta / 4) r_prev^beta (Hairer, Norsett &
    Wanner, "Solving ODEs I", section II.4; beta = 0: the I controller of torchdiffeq; 0.04: DOPRI5's code).
    Returns (y(t1), NFE)."""
    from torchdiffeq._impl.misc import _select_initial_step

    c, a, b, e = _tableau(tableau)
    nfe = [0]

    def f(t, y):
        nfe[0] += 1
        return field(torch.as_tensor(t, dtype=torch.float64, device=y.device), y)

    norm = lambda r: r.pow(2).mean(1).sqrt().max()  # noqa: E731
    t, y, k1 = t0, y0, f(t0, y0)
    h = float(_select_initial_step(f, torch.tensor(t0, dtype=torch.float64, device=y0.device), y0, 4, tol, tol, norm,
                                   k1))
    r_prev, rejected = 1e-4, False
    while t < t1:
        h = min(h, t1 - t)
        ks = [k1]
        for ci, row in zip(c, a):
            ks.append(f(t + ci * h, y + h * sum(w * k for w, k in zip(row, ks))))
        y_new = y + h * sum(w * k for w, k in zip(b, ks))
        r = float(norm(h * sum(w * k for w, k in zip(e, ks)) / (tol + tol * torch.maximum(y.abs(), y_new.abs()))))
        factor = 0.9 * max(r, 1e-10) ** -(0.2 - 0.75 * beta) * (r_prev ** beta if r <= 1 else 1.0)
        factor = min(10.0, max(0.2, factor))
        if r <= 1:
            t, y, k1, r_prev = t + h, y_new, ks[-1], max(r, 1e-4)
            factor = min(factor, 1.0) if rejected else factor
        rejected = r > 1
        h *= factor
    return y, nfe[0]


def _norm_scaling_log_term(weight):
    """Per-example RMS over the D + 1 ratios with the log term's divided by ``weight(D)``, max over examples."""
    def norm(r):
        d = r.shape[1] - 1
        return ((r[:, :-1].pow(2).sum(1) + (r[:, -1] / weight(d)) ** 2) / (d + 1)).sqrt().max()
    return norm


def _study_problem(gm, sde, n, seed):
    """n float64 draws of the mixture and what the NFE studies integrate: (t_min, x, augmented start (x, 0), time
    span, exact prior at T, log p from an augmented end state, dimension)."""
    from sdegen.likelihood import default_t_min

    t_lo = default_t_min(sde)
    x = gm.sample(n, seed=seed, dtype=torch.float64, device=DEVICE)
    prior = gm.marginal(sde, sde.T).log_prob
    y0 = torch.cat([x, x.new_zeros(n, 1)], 1)
    span = torch.tensor([t_lo, float(sde.T)], dtype=torch.float64, device=DEVICE)
    return t_lo, x, y0, span, prior, (lambda y1: prior(y1[:, :-1]) + y1[:, -1]), gm.dim


def _study_flows(gm, sde, x, y0, span, log_p):
    """For the exact divergence and one Rademacher probe: (name, the augmented field, per-example error per dimension
    of a log p). Truth: the oracle's exact log p_{t_min}, or for the probe the same estimator solved by dopri5 to
    rtol = atol = 1e-10 (so the error is the solver's)."""
    import torchdiffeq
    from sdegen.likelihood import _AugmentedFlow

    t_lo, t_hi = float(span[0]), float(span[1])
    n, D = x.shape
    for div in ("exact", "hutchinson"):
        probes = None if div == "exact" else sdegen.divergence.make_probes(
            x.shape, 1, seed=sdegen.noise.make_seeds(0, n, x.device), dtype=x.dtype, device=x.device)
        flow = _AugmentedFlow(sde, gm, (D,), t_lo, t_hi, probes, None)
        with torch.no_grad():
            truth = (gm.marginal(sde, t_lo).log_prob(x) if div == "exact" else
                     log_p(torchdiffeq.odeint(flow, y0, span, rtol=1e-10, atol=1e-10)[-1]))
        yield div, flow, (lambda lp, truth=truth: (lp - truth).abs() / D)


def _study_header(start):
    """The machine, date (with the wall time since ``start``) and command lines of a study's report."""
    import datetime

    return [f"- machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, {platform.system()} "
            f"{platform.release()}; torch {torch.__version__}; device {DEVICE}, {torch.get_num_threads()} CPU "
            "thread(s)",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; wall time "
            f"{time.time() - start:.0f} s", f"- command: `{common.command()}`", ""]


def nfe_study_rows(pname, gm, sde, n, tols):
    """sdegen's log_likelihood against dopri5 with torchdiffeq's default (batch RMS) norm, exact and one
    Rademacher probe, and the options at the tightest tolerance (exact divergence)."""
    import torchdiffeq

    t_lo, x, y0, span, prior, log_p, D = _study_problem(gm, sde, n, 2024)
    t_hi = float(sde.T)
    rows = []
    for div, flow, err in _study_flows(gm, sde, x, y0, span, log_p):
        for tol in tols:
            with torch.no_grad():
                r = sdegen.log_likelihood(sde, gm, x, divergence=div, rtol=tol, atol=tol, t_min=t_lo, prior=prior,
                                          seed=0)
                f = _Counted(flow)
                lp_d = log_p(torchdiffeq.odeint(f, y0, span, rtol=tol, atol=tol, method="dopri5")[-1])
            rows.append({"problem": pname, "divergence": div, "tol": tol, "variant": "sdegen log_likelihood",
                         "nfe": r.nfe, "ratio": r.nfe / f.nfe, "err_max": float(err(r.log_prob).max()),
                         "err_median": float(err(r.log_prob).median()), "dopri5_nfe": f.nfe,
                         "dopri5_err_max": float(err(lp_d).max()), "dopri5_err_median": float(err(lp_d).median())})
        if div != "exact":
            continue
        tol, base = tols[-1], rows[-1]["dopri5_nfe"]
        options = {f"clock {c}, state {s}": (lambda c=c, s=s: _Clocked(flow, sde, c, s, D).solve(y0, t_lo, t_hi, tol))
                   for c in ("sigma", "log sigma") for s in ("x", "y")}
        options["dopri8 (t)"] = lambda: _solve_with(flow, y0, t_lo, t_hi, tol, "dopri8")
        options["tsit5 (t)"] = lambda: rk45_per_example(flow, y0, t_lo, t_hi, tol, "tsit5")
        options["dopri5 (t), PI controller beta 0.04"] = lambda: rk45_per_example(flow, y0, t_lo, t_hi, tol, beta=0.04)
        for label, weight in (("log term / sqrt(D)", math.sqrt), ("log term / D", float)):
            options[f"norm: {label}"] = lambda w=weight: _solve_norm(flow, y0, span, tol, _norm_scaling_log_term(w))
        options["own step sizes per example (max NFE of each example alone)"] = lambda: _each_alone(flow, y0, t_lo,
                                                                                                  t_hi, tol)
        for label, run_option in options.items():
            with torch.no_grad():
                y1, nfe = run_option()
            e = err(log_p(y1))
            rows.append({"problem": pname, "divergence": div, "tol": tol, "variant": label, "nfe": nfe,
                         "ratio": nfe / base, "err_max": float(e.max()), "err_median": float(e.median())})
    return rows


def _solve_with(flow, y0, t_lo, t_hi, tol, method):
    from sdegen.backends import solve_augmented

    y1, info = solve_augmented(flow, y0, t_lo, t_hi, rtol=tol, atol=tol, method=method)
    return y1, info["nfe"]


def _each_alone(flow, y0, t_lo, t_hi, tol):
    """Every example solved by itself: what a solver stepping each example with its own step sizes (a batched
    call per stage) costs, the largest count of any example, and what it returns."""
    runs = [_solve_with(flow, y0[i:i + 1], t_lo, t_hi, tol, "dopri5") for i in range(y0.shape[0])]
    return torch.cat([y for y, _ in runs]), max(n for _, n in runs)


def _solve_norm(flow, y0, span, tol, norm):
    import torchdiffeq

    f = _Counted(flow)
    return torchdiffeq.odeint(f, y0, span, rtol=tol, atol=tol, options={"norm": norm})[-1], f.nfe


def work_precision_rows(pname, gm, sde, n, tols):
    """NFE and worst error per dimension (exact divergence) of dopri5 with the batch norm, sdegen's default and sdegen
    with dopri8, over a grid of tolerances; for each dopri5 tolerance, the fewest NFE at which each sdegen variant's
    worst error is no larger than dopri5's there."""
    import torchdiffeq
    from sdegen.likelihood import _AugmentedFlow, default_t_min

    t_lo, t_hi, D = default_t_min(sde), float(sde.T), gm.dim
    x = gm.sample(n, seed=2024, dtype=torch.float64, device=DEVICE)
    prior = gm.marginal(sde, sde.T).log_prob
    exact = gm.marginal(sde, t_lo).log_prob(x)
    flow = _AugmentedFlow(sde, gm, (D,), t_lo, t_hi, None, None)
    y0 = torch.cat([x, x.new_zeros(n, 1)], 1)
    span = torch.tensor([t_lo, t_hi], dtype=torch.float64, device=DEVICE)
    worst = lambda lp: float((lp - exact).abs().max()) / D  # noqa: E731
    runs = {"dopri5, batch norm": [], "sdegen (dopri5)": [], "sdegen, solver='dopri8'": []}
    with torch.no_grad():
        for tol in tols:
            f = _Counted(flow)
            y1 = torchdiffeq.odeint(f, y0, span, rtol=tol, atol=tol, method="dopri5")[-1]
            runs["dopri5, batch norm"].append((tol, f.nfe, worst(prior(y1[:, :-1]) + y1[:, -1])))
            for label, solver in (("sdegen (dopri5)", "dopri5"), ("sdegen, solver='dopri8'", "dopri8")):
                r = sdegen.log_likelihood(sde, gm, x, divergence="exact", solver=solver, rtol=tol, atol=tol,
                                          t_min=t_lo, prior=prior)
                runs[label].append((tol, r.nfe, worst(r.log_prob)))
    rows = []
    for tol, nfe, err in runs["dopri5, batch norm"]:
        cells = []
        for label in ("sdegen (dopri5)", "sdegen, solver='dopri8'"):
            ok = [(n_, t_) for t_, n_, e_ in runs[label] if e_ <= err]
            cells.append(f"{min(ok)[0]} (tol {min(ok)[1]:.0e}, {min(ok)[0] / nfe:.2f}x)" if ok else "none in the grid")
        rows.append(f"| {pname} | {tol:.0e} | {nfe} | {err:.1e} | {cells[0]} | {cells[1]} |")
    return rows


def nfe_study(quick: bool):
    start, rows = time.time(), []
    tols = (1e-3, 1e-4, 1e-5)
    probs = list(nfe_problems().items())[:3 if quick else None]
    for pname, (gm, sde) in probs:
        rows += nfe_study_rows(pname, gm, sde, 16 if quick else 64, tols)
        for r in rows[-len(tols) * 2 - 10:]:
            print(f"  {r['problem']:24s} {r['divergence']:10s} {r['tol']:.0e} {r['variant']:40s} nfe {r['nfe']:4d} "
                  f"ratio {r['ratio']:.2f} max {r['err_max']:.1e} med {r['err_median']:.1e}", flush=True)
    main_rows = [r for r in rows if r["variant"] == "sdegen log_likelihood"]
    lines = ["# log_likelihood: NFE against dopri5 (batch-average norm) across SDEs, and the options studied", "",
             *_study_header(start),
             f"Mixtures drawn for this study (seeds 101-107), {16 if quick else 64} exact draws each (seed 2024), "
             "oracle score, t_min = default_t_min(sde), exact prior at T. dopri5: torchdiffeq's dopri5 in t on the "
             "same augmented state with its default norm (RMS over the whole batch). Error per example: |log p - "
             "truth| / D, truth = the oracle's exact log p_{t_min} (exact divergence) or the same one-probe "
             "estimator solved to rtol = atol = 1e-10 (Hutchinson: the solver's error, not the probe's).", "",
             "## sdegen.log_likelihood against dopri5 at the same rtol = atol", "",
             "| problem | divergence | tol | NFE | dopri5 NFE | NFE ratio | max err | dopri5 max err | median err | "
             "dopri5 median err |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['problem']} | {r['divergence']} | {r['tol']:.0e} | {r['nfe']} | {r['dopri5_nfe']} | "
              f"{r['ratio']:.2f} | {r['err_max']:.1e} | {r['dopri5_err_max']:.1e} | {r['err_median']:.1e} | "
              f"{r['dopri5_err_median']:.1e} |" for r in main_rows]
    ratios = {d: [r["ratio"] for r in main_rows if r["divergence"] == d] for d in ("exact", "hutchinson")}
    lines += ["", "NFE ratio range: " + "; ".join(f"{d} {min(v):.2f}-{max(v):.2f}" for d, v in ratios.items()), "",
              f"## Options, exact divergence, tol {tols[-1]:g} (every row keeps sdegen's per-example norm unless it "
              "names another; ratio against dopri5's NFE)", "",
              "| problem | variant | NFE | NFE / dopri5 | max err | median err |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['problem']} | {r['variant']} | {r['nfe']} | {r['ratio']:.2f} | {r['err_max']:.1e} | "
              f"{r['err_median']:.1e} |" for r in rows if r["tol"] == tols[-1] and r["divergence"] == "exact"]
    wp_tols = (1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5, 5e-6, 2e-6, 1e-6)
    lines += ["", "## At equal worst-case accuracy (exact divergence)", "",
              "For each tolerance of dopri5 with the batch norm: its NFE and worst error per dimension, and the fewest "
              f"NFE at which sdegen reaches a worst error no larger, over rtol = atol in "
              f"{{{', '.join(f'{t:.0e}' for t in wp_tols)}}}.", "",
              "| problem | dopri5 tol | dopri5 NFE | dopri5 worst err | sdegen (dopri5) | sdegen, solver='dopri8' |",
              "|---|---|---|---|---|---|"]
    for pname, (gm, sde) in probs:
        lines += work_precision_rows(pname, gm, sde, 16 if quick else 64, wp_tols)
        print(*lines[-len(wp_tols):], sep="\n", flush=True)
    path = os.path.join(RESULTS, "likelihood_nfe_quick.md" if quick else "likelihood_nfe.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", path)


# --- the one-evaluation-per-step multistep solver against dopri5 (--multistep) ---------------------------------

def holdout_problems():
    """Mixtures not used while building the multistep solver: fresh seeds (201-206), other dims and scales."""
    rand = sdegen.GaussianMixture.random
    return {"VP 12-D (seed 201)": (rand(dim=12, n_components=3, seed=201, cov_scale=0.2), sdegen.VPSDE()),
            "VE 4-D (seed 202)": (rand(dim=4, n_components=5, seed=202, mean_scale=1.5, cov_scale=0.3),
                                  sdegen.VESDE()),
            "sub-VP 16-D (seed 203)": (rand(dim=16, n_components=4, seed=203, cov_scale=0.5), sdegen.SubVPSDE()),
            "EDM 8-D (seed 204)": (rand(dim=8, n_components=6, seed=204, mean_scale=1.2), sdegen.EDMSDE()),
            "flow 32-D (seed 205)": (rand(dim=32, n_components=3, seed=205, cov_scale=0.3), sdegen.FlowSDE()),
            "cosine VP 4-D (seed 206)": (rand(dim=4, n_components=2, seed=206), sdegen.CosineVPSDE()),
            "VP ring 2-D": (sdegen.GaussianMixture.ring(), sdegen.VPSDE())}


def multistep_rows(pname, gm, sde, n, tols, seed=2024):
    """log_likelihood(solver="multistep") and (solver="dopri5", per-example norm) against torchdiffeq's dopri5 with its
    batch-RMS norm at the same rtol = atol, exact divergence and one Rademacher probe."""
    import torchdiffeq

    t_lo, x, y0, span, prior, log_p, D = _study_problem(gm, sde, n, seed)
    rows = []
    for div, flow, err in _study_flows(gm, sde, x, y0, span, log_p):
        for tol in tols:
            with torch.no_grad():
                f = _Counted(flow)
                e_d = err(log_p(torchdiffeq.odeint(f, y0, span, rtol=tol, atol=tol, method="dopri5")[-1]))
                row = {"problem": pname, "divergence": div, "tol": tol, "dopri5_nfe": f.nfe,
                       "dopri5_err_max": float(e_d.max()), "dopri5_err_median": float(e_d.median())}
                for solver, key in (("multistep", "multistep"), ("dopri5", "sdegen_dopri5")):
                    r = sdegen.log_likelihood(sde, gm, x, divergence=div, solver=solver, rtol=tol, atol=tol,
                                              t_min=t_lo, prior=prior, seed=0)
                    e = err(r.log_prob)
                    row.update({f"{key}_nfe": r.nfe, f"{key}_err_max": float(e.max()),
                                f"{key}_err_median": float(e.median())})
            rows.append(row)
            print(f"  {pname:26s} {div:10s} {tol:.0e} multistep {row['multistep_nfe']:4d} dopri5 {f.nfe:4d} "
                  f"ratio {row['multistep_nfe'] / f.nfe:.2f} max {row['multistep_err_max']:.1e} vs "
                  f"{row['dopri5_err_max']:.1e} med {row['multistep_err_median']:.1e} vs "
                  f"{row['dopri5_err_median']:.1e}", flush=True)
    return rows


def multistep_variant_rows(pname, gm, sde, n, tol):
    """Orders 3 and 4 and the error controlled, with the standard (I) controller or with the adaptive sampler's
    (PI with Gustafsson's predictive cap), exact divergence: NFE and worst / median error per dimension."""
    from sdegen.likelihood import default_t_min
    from sdegen.likelihood_multistep import MultistepLikelihood

    class PredictivePI(MultistepLikelihood):
        def _next_h(self, h, e, k, rejected):
            if e > 1.0:
                return h * max(0.2, self.safety * e ** (-1.0 / k))
            factor = self.safety * e ** (-0.7 / k) * self._e_prev ** (0.4 / k)
            if getattr(self, "_acc", None) is not None:
                factor = min(factor, self.safety * (h / self._acc[0]) * (self._acc[1] / e**2) ** (1.0 / k))
            self._acc, self._e_prev = (h, max(e, 1e-2)), e
            return h * min(self.max_factor, max(0.2, factor))

    t_lo, t_hi, D = default_t_min(sde), float(sde.T), gm.dim
    x = gm.sample(n, seed=2024, dtype=torch.float64, device=DEVICE)
    prior = gm.marginal(sde, sde.T).log_prob
    exact = gm.marginal(sde, t_lo).log_prob(x)
    model = sdegen.models.as_model(gm, sde)
    rows = []
    for order in (3, 4):
        for error in ("corrector", "predictor"):
            for label, cls in (("I", MultistepLikelihood), ("PI + predictive", PredictivePI)):
                solver = cls(tol, tol, order=order, error=error)
                solver._e_prev, solver._acc = 1.0, None
                with torch.no_grad():
                    x_T, delta = solver.solve(sde, model, x, t_lo, t_hi)
                e = (prior(x_T) + delta - exact).abs() / D
                rows.append(f"| {pname} | {order} | {error} | {label} | {solver.stats['nfe']} | "
                            f"{solver.stats['rejected']} | {float(e.max()):.1e} | {float(e.median()):.1e} |")
    return rows


def _target_summary(rows):
    ratios = [r["multistep_nfe"] / r["dopri5_nfe"] for r in rows]
    own = [r["multistep_nfe"] / r["sdegen_dopri5_nfe"] for r in rows]
    n = len(rows)
    cheaper = sum(x <= 1.0 for x in ratios)
    worst_ok = sum(r["multistep_err_max"] <= r["dopri5_err_max"] for r in rows)
    med_ok = sum(r["multistep_err_median"] <= r["dopri5_err_median"] for r in rows)
    all_ok = sum(x <= 1.0 and r["multistep_err_max"] <= r["dopri5_err_max"] and
                 r["multistep_err_median"] <= r["dopri5_err_median"] for x, r in zip(ratios, rows))
    by_tol = "; ".join(f"tol {t:.0e}: {min(x for x, r in zip(ratios, rows) if r['tol'] == t):.2f}-"
                       f"{max(x for x, r in zip(ratios, rows) if r['tol'] == t):.2f}"
                       for t in sorted({r['tol'] for r in rows}, reverse=True))
    return [f"NFE ratio (multistep / dopri5 with the batch norm): {min(ratios):.2f}-{max(ratios):.2f}, median "
            f"{statistics.median(ratios):.2f} ({by_tol}). Rows with NFE <= dopri5's: {cheaper}/{n}; max error <= "
            f"dopri5's: {worst_ok}/{n}; median error <= dopri5's: {med_ok}/{n}; all three: {all_ok}/{n}.",
            "",
            f"Against log_likelihood's dopri5 (the same per-example norm): NFE ratio {min(own):.2f}-{max(own):.2f}, "
            f"median {statistics.median(own):.2f}; rows with NFE <= its: {sum(x <= 1.0 for x in own)}/{n}; max "
            f"error <= its: {sum(r['multistep_err_max'] <= r['sdegen_dopri5_err_max'] for r in rows)}/{n}; median "
            f"error <= its: {sum(r['multistep_err_median'] <= r['sdegen_dopri5_err_median'] for r in rows)}/{n}."]


def multistep_study(quick: bool):
    start = time.time()
    tols, n = (1e-3, 1e-4, 1e-5), 16 if quick else 64
    sets = {"the NFE study's problems (seeds 101-107, draws seed 2024)": nfe_problems(),
            "hold-out problems (seeds 201-206 and the ring, draws seed 2025)": holdout_problems()}
    tables = {}
    for title, probs in sets.items():
        rows = []
        for pname, (gm, sde) in list(probs.items())[:2 if quick else None]:
            rows += multistep_rows(pname, gm, sde, n, tols, seed=2024 if "101" in title else 2025)
        tables[title] = rows
    variants = []
    for pname, (gm, sde) in list(nfe_problems().items())[:2 if quick else None]:
        variants += multistep_variant_rows(pname, gm, sde, n, 1e-5)
        print(*variants[-8:], sep="\n", flush=True)
    lines = ["# log_likelihood(solver='multistep'): NFE and accuracy against dopri5 (batch-average norm)", "",
             *_study_header(start),
             f"{n} exact draws per problem, oracle score, t_min = default_t_min(sde), exact prior at T. multistep: "
             "sdegen.log_likelihood(solver='multistep') (sdegen/likelihood_multistep.py: exponential multistep "
             "predictor-corrector in y = x/m against log sigma, order 4, corrector error, the standard controller, "
             "per-example norm over (x, int div f~)); dopri5 (batch norm): torchdiffeq's dopri5 in t on the "
             "augmented state with its default RMS norm over the whole batch; sdegen dopri5: log_likelihood's "
             "dopri5 with the per-example norm. Error per example: |log p - truth| / D, truth = the oracle's exact "
             "log p_{t_min} (exact divergence) or the same one-probe estimator solved by dopri5 to rtol = atol = "
             "1e-10 (Hutchinson: the solver's error; with Rademacher probes both solvers integrate the same "
             "estimator). Target: NFE <= dopri5's at the same rtol = atol with max and median error no worse.", ""]
    for title, rows in tables.items():
        lines += [f"## {title}", "", "| problem | divergence | tol | multistep NFE | dopri5 NFE | ratio | max err | "
                  "dopri5 max err | median err | dopri5 median err | sdegen dopri5 NFE | sdegen dopri5 max err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['problem']} | {r['divergence']} | {r['tol']:.0e} | {r['multistep_nfe']} | {r['dopri5_nfe']} | "
                  f"{r['multistep_nfe'] / r['dopri5_nfe']:.2f} | {r['multistep_err_max']:.1e} | "
                  f"{r['dopri5_err_max']:.1e} | {r['multistep_err_median']:.1e} | {r['dopri5_err_median']:.1e} | "
                  f"{r['sdegen_dopri5_nfe']} | {r['sdegen_dopri5_err_max']:.1e} |" for r in rows]
        lines += [""] + _target_summary(rows) + [""]
    lines += ["## Variants, exact divergence, tol 1e-05 (the NFE study's problems)", "",
              "Predictor order (corrector one higher), the local error controlled, and the step-size controller: "
              "I = the standard one with no growth right after a rejection (the solver's); PI + predictive = the "
              "adaptive sampler's (Gustafsson's PI with the predictive cap).", "",
              "| problem | order | error | controller | NFE | rejected | max err | median err |",
              "|---|---|---|---|---|---|---|---|"] + variants
    _write_report("likelihood_nfe_multistep", quick, lines)


def _write_report(stem: str, quick: bool, lines) -> None:
    """Write a study's markdown lines to benchmarks/results/<stem>.md (<stem>_quick.md for a quick run)."""
    path = os.path.join(RESULTS, f"{stem}_quick.md" if quick else f"{stem}.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", path)


def float32_study(quick: bool):
    """log_likelihood's solvers on float32 states at the default tolerance: each one's worst error against the
    oracle's exact log p_{t_min} (the float64 oracle at the float32 points), next to the same solve in float64."""
    start = time.time()
    tight = sdegen.GaussianMixture.random(dim=4, n_components=3, seed=7, mean_scale=20.0, cov_scale=0.01)
    cases = {"2-D ring": sdegen.GaussianMixture.ring(), "4-D, means ~40 apart, stds 0.01": tight}
    rows = []
    for pname, gm in cases.items():
        x32 = gm.sample(16 if quick else 64, seed=3, device=DEVICE).float()
        for sname, sde in (("VP", sdegen.VPSDE()), ("EDM", sdegen.EDMSDE())):
            prior = gm.marginal(sde, sde.T).log_prob
            for solver in ("dopri5", "multistep"):
                errs = []
                for x in (x32, x32.double()):
                    r = sdegen.log_likelihood(sde, gm, x, divergence="exact", solver=solver, prior=prior)
                    exact = gm.log_prob(sde, x32.double(), torch.tensor(float(r.t_min), dtype=torch.float64))
                    errs.append((float((r.log_prob.double() - exact).abs().max()), r.nfe))
                rows.append(f"| {pname} | {sname} | {solver} | {errs[0][1]} | {errs[0][0]:.2e} | {errs[1][1]} | "
                            f"{errs[1][0]:.2e} |")
                print(rows[-1], flush=True)
    lines = ["# log_likelihood on float32 states: worst error per solver at the default tolerance", ""]
    lines += _study_header(start)
    lines += ["Exact divergence, rtol = atol = 1e-5 (the default), the oracle's exact p_T as prior; error: the worst "
              "|log p - exact log p_{t_min}| over the batch in nats, the same float32 points solved in float32 and "
              "in float64.", "",
              "| problem | SDE | solver | NFE (float32) | max err (float32) | NFE (float64) | max err (float64) |",
              "|---|---|---|---|---|---|---|"] + rows
    _write_report("likelihood_float32", quick, lines)


def main():
    global DEVICE, RESULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the interleaved headline timing")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (64 samples, one tolerance)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the draws, the oracle's score and the solves run, in every mode (default: CUDA when "
                    "available)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: timings robust to other processes)")
    ap.add_argument("--out", default=RESULTS, help="folder of the outputs (default benchmarks/results)")
    ap.add_argument("--nfe-study", action="store_true", help="only the cost of per-example error control against "
                    "dopri5 across SDEs and the options studied (writes likelihood_nfe.md)")
    ap.add_argument("--multistep", action="store_true", help="only log_likelihood(solver='multistep') against dopri5 "
                    "on the NFE study's problems and on hold-out ones (writes likelihood_nfe_multistep.md)")
    ap.add_argument("--float32", action="store_true", help="only the solvers' worst errors on float32 states "
                    "against float64 (writes likelihood_float32.md)")
    args = ap.parse_args()
    DEVICE = torch.device(args.device)
    RESULTS = args.out
    torch.set_num_threads(args.threads)
    if sdegen.distributed.launched_rank() != 0:
        return  # the timings are of one process: under torchrun only rank 0 runs and writes
    if args.nfe_study:
        return nfe_study(args.quick)
    if args.multistep:
        return multistep_study(args.quick)
    if args.float32:
        return float32_study(args.quick)
    rows, prior_rows = run(1, args.quick)
    heads = headline(args.repeats, args.quick)
    write(rows, prior_rows, heads, args.repeats, args.quick)
    print("\n".join(targets(rows, heads)))


if __name__ == "__main__":
    main()
