"""NFE of sdegen's adaptive solvers against torchdiffeq's dopri5 at equal accuracy, with the oracle's exact score.

- sampling: ``method="adaptive"`` (and "adaptive_rk23") over a sweep of rtol = atol, against torchdiffeq's dopri5
  on the probability-flow ODE in t with its own (batch RMS) error norm; endpoint RMS against a float64 dopri5
  reference at 1e-10; the table gives each solver's NFE and RMS per tolerance and the fewest NFE reaching
  RMS <= 1e-3;
- likelihood: ``log_likelihood(divergence="exact")`` (and one Hutchinson probe) at rtol = atol = tol against torchdiffeq's dopri5 on the same
  augmented state (x, log-density) with torchdiffeq's default norm; error: the worst |log p - exact log p_{t_min}|
  per dimension over the batch (the oracle's exact prior at T for both).

Problems: the 2-D ring, the 16-D mixture, and mixtures drawn fresh for this benchmark (8-D seed 23, 32-D seed 5).
Writes benchmarks/results/adaptive_nfe.md (or --out). Usage: python benchmarks/adaptive_nfe.py [--quick] [--n 256]
"""

import argparse
import math
import os
import time

import torch
import torchdiffeq

import sdegen
from common import provenance
from sdegen.analytic import GaussianMixture
from sdegen.divergence import make_probes
from sdegen.likelihood import _AugmentedFlow
from sdegen.noise import make_seeds

F64 = torch.float64
PROBLEMS = {"2-D ring": lambda: GaussianMixture.ring(),
            "16-D mixture": lambda: GaussianMixture.random(dim=16, n_components=6, seed=0),
            "8-D fresh (seed 23)": lambda: GaussianMixture.random(dim=8, n_components=5, seed=23, mean_scale=1.5),
            "32-D fresh (seed 5)": lambda: GaussianMixture.random(dim=32, n_components=4, seed=5, mean_scale=0.7,
                                                                  cov_scale=0.3)}


class Counted(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.nfe = f, 0

    def forward(self, t, y):
        self.nfe += 1
        return self.f(t, y)


def dopri5_sample(sde, gm, x_T, tol):
    score = gm.score_fn(sde)
    t_lo = sde.t_min

    def field(t, x):
        tt = t.clamp(t_lo, sde.T)
        return sde.reverse_drift(x, tt, score(x, tt.expand(x.shape[0])), True)

    f = Counted(field)
    t = torch.tensor([sde.T, t_lo], dtype=F64)
    return torchdiffeq.odeint(f, x_T, t, rtol=tol, atol=tol, method="dopri5")[-1], f.nfe


def sampling_rows(pname, gm, sde, n, tols):
    x_T = sde.prior_sample((n, gm.dim), seed=1, dtype=F64)
    ref = sdegen.sample(sde, gm, x_T, method="ode", rtol=1e-10, atol=1e-10)
    rms = lambda z: float((z - ref).pow(2).sum(1).mean().sqrt())  # noqa: E731
    rows, best = [], {}
    for name in ("adaptive", "adaptive_rk23", "torchdiffeq dopri5 (t)"):
        # dopri5 in t needs tighter tolerances than the adaptive solvers in u to reach the same RMS
        for tol in tols + ((1e-5, 3e-6, 1e-6) if name.startswith("torchdiffeq") else ()):
            if name.startswith("torchdiffeq"):
                x, nfe = dopri5_sample(sde, gm, x_T, tol)
            else:
                x, info = sdegen.sample(sde, gm, x_T, method=name, rtol=tol, atol=tol, return_info=True)
                nfe = info.nfe
            e = rms(x)
            rows.append(f"| {pname} | {name} | {tol:g} | {nfe} | {e:.3g} |")
            if e <= 1e-3:
                best[name] = min(best.get(name, math.inf), nfe)
    return rows, best


def likelihood_rows(pname, gm, sde, n, tols, t_min=1e-5):
    """Rows for the exact divergence at each tolerance and for one Hutchinson probe (seeded, the same probe for
    both solvers) at the last tolerance; the Hutchinson error is against the exact log-density (it includes the
    estimator's own noise, the same for both)."""
    x = gm.sample(n, seed=5)
    prior = gm.marginal(sde, sde.T).log_prob
    exact = gm.marginal(sde, t_min).log_prob(x)
    rows = []
    for tol, div in [(tol, "exact") for tol in tols] + [(tols[-1], "hutchinson")]:
        r = sdegen.log_likelihood(sde, gm, x, divergence=div, rtol=tol, atol=tol, t_min=t_min, prior=prior,
                                  seed=0)
        err_s = float((r.log_prob - exact).abs().max()) / gm.dim
        probes = None if div == "exact" else make_probes(x.shape, 1, seed=make_seeds(0, n, x.device), dtype=F64)
        f = Counted(_AugmentedFlow(sde, gm, (gm.dim,), t_min, float(sde.T), probes, None))
        y0 = torch.cat([x, x.new_zeros(n, 1)], 1)
        y1 = torchdiffeq.odeint(f, y0, torch.tensor([t_min, float(sde.T)], dtype=F64), rtol=tol, atol=tol,
                                method="dopri5")[-1]
        err_d = float((prior(y1[:, :-1].detach()) + y1[:, -1].detach() - exact).abs().max()) / gm.dim
        rows.append(f"| {pname} | {div} | {tol:g} | {r.nfe} | {err_s:.2e} | {f.nfe} | {err_d:.2e} | {r.nfe / f.nfe:.2f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ring and 16-D mixture only")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adaptive_nfe.md"))
    args = parser.parse_args()
    sde = sdegen.VPSDE()
    start = time.time()
    names = list(PROBLEMS)[:2] if args.quick else list(PROBLEMS)
    s_rows, l_rows, summary = [], [], []
    for pname in names:
        gm = PROBLEMS[pname]()
        rows, best = sampling_rows(pname, gm, sde, args.n, (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5))
        s_rows += rows
        ours, peer = best.get("adaptive", math.inf), best.get("torchdiffeq dopri5 (t)", math.inf)
        summary.append(f"| {pname} | {ours} | {best.get('adaptive_rk23', math.inf)} | {peer} | {ours / peer:.2f} |")
        print(summary[-1], flush=True)
        l_rows += likelihood_rows(pname, gm, sde, min(args.n, 64), (1e-3, 1e-4, 1e-5))
        print(l_rows[-1], flush=True)
    lines = ["# Adaptive solvers against torchdiffeq's dopri5", "",
             *provenance(start),
             f"- VP SDE, exact score of the oracle, float64; sampling: {args.n} starting points (seed 1), RMS of "
             "the endpoint error norm against dopri5 at 1e-10; likelihood: "
             f"{min(args.n, 64)} exact draws (seed 5), t_min 1e-5, exact divergence, exact prior", "",
             "## Fewest NFE with endpoint RMS <= 1e-3", "",
             "| problem | adaptive | adaptive_rk23 | torchdiffeq dopri5 (t) | adaptive / dopri5 |", "|---|---|---|---|---|",
             *summary, "", "## Sampling sweep", "", "| problem | solver | rtol = atol | NFE | RMS |",
             "|---|---|---|---|---|", *s_rows, "", "## log_likelihood against dopri5 on the augmented state", "",
             "error: max over the batch of |log p - exact| / dim", "",
             "| problem | divergence | rtol = atol | sdegen NFE | sdegen error | dopri5 NFE | dopri5 error | NFE ratio |",
             "|---|---|---|---|---|---|---|---|", *l_rows, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
