"""Where log_likelihood should start: the error of log p_{t_min}(x) against the exact log p_0(x) as t_min varies.

log_likelihood integrates the probability-flow ODE from t_min, so it returns log p_{t_min}, the density of the data
blurred by the forward kernel (std sigma(t_min) = s/m), not log p_0. On exact draws x ~ p_0 of Gaussian mixtures
(sdegen.GaussianMixture, whose log p_0 is exact), with the oracle's exact score, the exact divergence and tight
tolerances (so that the solver's own error is far below the gap), this prints per SDE and t_min the mean of
(log_likelihood - log p_0) / D in nats per dimension and the NFE, including the t_min that
``log_likelihood`` picks by default.

    python benchmarks/likelihood_t_min.py [--quick] [--device DEVICE] [--threads N] [--out PATH]
Writes benchmarks/results/likelihood_t_min.md (likelihood_t_min_quick.md with --quick, so that a smoke run never
replaces the published table; an explicit --out wins).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.likelihood import default_t_min

RESULTS = Path(__file__).resolve().parent / "results"


def problems(quick: bool):
    out = {"ring (2-D)": GaussianMixture.ring(),
           "random 8-D (seed 1)": GaussianMixture.random(dim=8, n_components=5, seed=1),
           "wide ring x4 (2-D)": GaussianMixture.ring(radius=4.0, radial_std=0.2, tangential_std=0.08)}
    if quick:
        out.pop("wide ring x4 (2-D)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and problems")
    ap.add_argument("--out", default=None,
                    help="report path (default: results/likelihood_t_min.md, or likelihood_t_min_quick.md with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the draws, the oracle's score and the solve run (default: CUDA when available)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("likelihood_t_min_quick.md" if args.quick else "likelihood_t_min.md"))
    started = time.time()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n = 64 if args.quick else 256
    sdes = {"VP": sdegen.VPSDE(), "sub-VP": sdegen.SubVPSDE(), "cosine VP": sdegen.CosineVPSDE(),
            "VE": sdegen.VESDE()}
    rows = []
    for pname, gm in problems(args.quick).items():
        x = gm.sample(n, seed=123, device=device)
        exact = gm.log_prob(None, x)
        for sname, sde in sdes.items():
            chosen = default_t_min(sde)
            for t_min in sorted({1e-3, 1e-4, 1e-5, chosen}, reverse=True):
                if not t_min < sde.T:
                    continue
                r = sdegen.log_likelihood(sde, gm, x, divergence="exact", rtol=1e-7, atol=1e-7, t_min=t_min)
                err = (r.log_prob - exact) / gm.dim
                rows.append((pname, sname, t_min, t_min == chosen, float(sde.sigma(t_min)), float(err.mean()),
                             float(err.abs().mean()), r.nfe))
                print(rows[-1], flush=True)
    lines = [
        "# log_likelihood: error of log p_{t_min} against log p_0 (nats/dim)", "",
        *common.provenance(started, f"{device}, {torch.get_num_threads()} CPU thread(s)"),
        "",
        f"{n} exact draws per mixture, the oracle's exact score, exact divergence, dopri5 at rtol = atol = 1e-7. "
        "err = (log_likelihood - exact log p_0) / D per example, its mean and its mean absolute value; * marks log_likelihood's default t_min for that SDE "
        "(sigma(t_min) = 1/1024, an eighth of one 8-bit bin of [-1, 1], or the SDE's t_min if smaller).", "",
        "| problem | SDE | t_min | sigma(t_min) | mean err (nats/dim) | mean abs err (nats/dim) | NFE |",
        "|---|---|---|---|---|---|---|"]
    for pname, sname, t_min, chosen, sig, err, abs_err, nfe in rows:
        lines.append(f"| {pname} | {sname} | {t_min:.3g}{' *' if chosen else ''} | {sig:.3g} | {err:+.5f} | "
                     f"{abs_err:.5f} | {nfe} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
