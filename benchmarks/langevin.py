"""The Langevin corrector's step rules against exact draws of Gaussian mixtures.

For each rule of ``pc`` (the state-independent "noise_level" rule, the default, and the paper's per-example "snr"
rule), each SDE (VE, VP) and each problem (the 2-D ring; a 64-D mixture of six components), it samples with the
oracle's exact score and compares with exact draws of p_{t_min}:

- within-mode variance: the mean squared Mahalanobis distance per dimension to the assigned component, as a ratio
  to the same statistic of exact draws (1.00 is exact);
- mixture weights: the L1 error of the assignment fractions over its floor, the RMS L1 error of sets of exact draws
  of the same size (1.0 is as good as exact sampling).

Writes benchmarks/results/langevin.md. Usage: python benchmarks/langevin.py [--steps 1000] [--n 2000] [--device D]
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch

import sdegen
from sdegen.analytic import GaussianMixture

F64 = torch.float64


def within_mode(gm_t, x):
    k = gm_t.responsibilities(x).argmax(1)
    diff = x.to(F64) - gm_t.means[k]
    q = (diff * torch.linalg.solve(gm_t.covs[k], diff.unsqueeze(-1)).squeeze(-1)).sum(1) / x.shape[1]
    return float(q.mean()), torch.bincount(k, minlength=gm_t.n_components).to(F64) / x.shape[0]


def measure(gm, sde, rule, steps, n, device, floor_sets=20):
    gm_t = gm.marginal(sde, sde.t_min)
    x = sdegen.sample(sde, gm, shape=(n, gm.dim), method="pc", steps=steps, seed=0, step_rule=rule,
                      device=device).cpu()
    q, w = within_mode(gm_t, x)
    exact_q, floor = [], []
    for rep in range(floor_sets):
        qe, we = within_mode(gm_t, gm.sample(n, sde=sde, t=sde.t_min, seed=1000 + rep))
        exact_q.append(qe)
        floor.append(float((we - gm.weights).abs().sum()) ** 2)
    var_ratio = q / (sum(exact_q) / floor_sets)
    weight_ratio = float((w - gm.weights).abs().sum()) / math.sqrt(sum(floor) / floor_sets)
    return var_ratio, weight_ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "langevin.md"))
    args = parser.parse_args()
    problems = {"2-D ring": GaussianMixture.ring(), "64-D mixture (6 components)": GaussianMixture.random(
        dim=64, n_components=6, seed=0), "16-D mixture, fresh seed": GaussianMixture.random(
        dim=16, n_components=4, seed=11)}
    rows = []
    start = time.time()
    for name, gm in problems.items():
        for sde_name, sde in (("VE", sdegen.VESDE()), ("VP", sdegen.VPSDE())):
            for rule in ("noise_level", "snr"):
                v, w = measure(gm, sde, rule, args.steps, args.n, args.device)
                rows.append(f"| {name} | {sde_name} | {rule} | {v:.3f} | {w:.2f} |")
                print(rows[-1], flush=True)
    lines = ["# The Langevin corrector's step rules against exact draws", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"{platform.system()} {platform.release()}; device {args.device}; torch {torch.__version__}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
             f"wall time {time.time() - start:.0f} s",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- `pc` (reverse diffusion + 1 Langevin step, snr 0.16), {args.steps} steps, {args.n} samples, exact "
             "score of the oracle, seed 0; exact draws of p_t_min for the reference (20 sets)",
             "- variance ratio: within-mode variance (mean squared Mahalanobis distance per dimension to the "
             "assigned component) of the samples over that of exact draws; 1.000 is exact",
             "- weight error: L1 error of the assignment fractions over its floor (RMS over sets of exact draws "
             "of the same size); 1.0 is as good as exact sampling", "",
             "| problem | SDE | step rule | variance ratio | weight error / floor |", "|---|---|---|---|---|",
             *rows, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
