"""Library overhead per step and peak memory against the number of steps, for the fast samplers.

Overhead: the time :func:`sdegen.sample` spends per step outside the score call, as a fraction of one
evaluation of a 3-layer, 256-wide MLP at batch 1024 on CPU (the score network of a small model). Times are
the CPU time of the sampling thread (``time.thread_time``; torch runs on 1 thread), so that other processes
on a shared machine do not count while they hold the core; repeats run round-robin over the samplers, with
MLP evaluations timed between them, and the table gives medians and the spread. Target: <= 10%.
Peak memory: the peak resident-set increase of a sampling run at 1000 steps against 10 steps, on a
(16, 3, 64, 64) state with an exact Gaussian score, each run in a fresh process with glibc's mmap threshold
fixed at 64 KiB (so the resident set follows the live tensors). Target: within 10%.
Overhead is reported per step and per NFE (Heun and DPM-Solver-3 make 2 and 3 evaluations per step).
Allocator: the MLP's activations (1 MiB each at batch 1024) sit at glibc's adaptive mmap threshold, so whether they
come from the heap or from fresh pages depends on the process's history of allocations; on this machine that moved
the minor page faults of a sampling step between 0 and 300 for one and the same sampler (up to a third of an MLP
evaluation), run to run. By default (``--malloc fixed``) the script re-executes itself with the thresholds fixed
(``MALLOC_MMAP_THRESHOLD_`` 64 MiB, ``MALLOC_TRIM_THRESHOLD_`` 256 MiB: tensors up to 64 MiB come from the heap and
stay mapped), so that the figures measure the library's work; ``--malloc adaptive`` keeps glibc's defaults. The
tables give the minor page faults per step either way. (The same setting, or a caching allocator such as jemalloc
or tcmalloc, speeds up any PyTorch CPU loop over small networks.)
With ``--baseline DIR``, another copy of the package (an earlier commit, say), importable under the name of DIR's
last component, runs alternately with this one in the same process (its runs interleaved with ours, in alternating
order), so that both see the same machine: a before/after comparison on a shared machine.

    python benchmarks/overhead.py [--quick] [--repeats N] [--baseline DIR] [--malloc fixed|adaptive] [--out DIR]
    (a baseline: git archive COMMIT sdegen | tar -x -C /tmp/b && mv /tmp/b/sdegen /tmp/b/sdegen_before)
Writes benchmarks/results/overhead.{md,json} (overhead_baseline.{md,json} with --baseline, no memory table) into
--out (default benchmarks/results); --quick adds a ``_quick`` suffix (overhead_quick.md, ...), so that a smoke run
never replaces the published figures.

Device: CPU only, by design. The overhead is CPU thread time (``time.thread_time``) and the memory figure the
process's resident set, and neither sees work queued on a GPU. ``--device`` defaults to ``cpu``; any other device
is refused with a pointer to benchmarks/gpu.py, which times the same sampling loops against the network alone on a
GPU (wall clock with ``torch.cuda.synchronize``, per-example noise, host synchronisations per step, peak GPU memory):
    python benchmarks/gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import common
from common import cpu_model

import sdegen

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLERS = {
    "ddim": {}, "ddim eta=1": {"eta": 1.0}, "heun": {}, "dpm_solver-3": {"order": 3}, "dpmpp_2m": {},
    "dpmpp_3m": {}, "dpmpp_2m_sde": {}, "exp_pc-3": {"order": 3}, "euler": {},
    # the stochastic ones again with one torch.Generator stream instead of per-example counter-based noise
    "ddim eta=1, noise=generator": {"eta": 1.0, "noise": "generator"},
    "dpmpp_2m_sde, noise=generator": {"noise": "generator"},
}
METHOD = {"ddim eta=1": "ddim", "dpm_solver-3": "dpm_solver", "exp_pc-3": "exp_pc",
          "ddim eta=1, noise=generator": "ddim", "dpmpp_2m_sde, noise=generator": "dpmpp_2m_sde"}


def mlp(dim: int = 16, width: int = 256) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                               torch.nn.SiLU(), torch.nn.Linear(width, dim))


clock = time.thread_time  # CPU time of this thread: time while another process holds the core does not count


class TimedScore:
    """score(x, t) = net([x, t]) that adds up the time spent inside it."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, x, t):
        start = clock()
        out = self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))
        self.seconds += clock() - start
        return out


def overhead(repeats: int, steps: int, libraries: dict) -> dict:
    """Rows per library ({label: module}) of the overhead table; every library's run of a sampler follows the
    same MLP evaluations, in an order that alternates between repeats."""
    torch.manual_seed(0)
    net = mlp().eval()
    x_T = torch.randn(1024, 16)
    t = torch.full((1024,), 0.5)
    evals, per_step, nfe = [], {(lib, name): [] for lib in libraries for name in SAMPLERS}, {}
    faults = {key: [] for key in per_step}
    with torch.no_grad():
        for _ in range(5):
            net(torch.cat([x_T, t[:, None]], 1))
        for repeat in range(repeats):  # round-robin, so that a busy spell of the machine hits every sampler alike
            for name, opts in SAMPLERS.items():
                for _ in range(10):
                    start = clock()
                    net(torch.cat([x_T, t[:, None]], 1))
                    evals.append(clock() - start)
                for lib in list(libraries)[::1 if repeat % 2 == 0 else -1]:
                    score = TimedScore(net)
                    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = clock()
                    _, info = libraries[lib].sample(libraries[lib].VPSDE(), score, x_T, method=METHOD.get(name, name),
                                                    steps=steps, seed=0, return_info=True, **opts)
                    per_step[(lib, name)].append((clock() - start - score.seconds) / info.steps)
                    faults[(lib, name)].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
                                               / info.steps)
                    nfe[name] = info.nfe / info.steps
    t_eval = statistics.median(evals)
    print(f"MLP eval: median {1e3 * t_eval:.3f} ms (quartiles {1e3 * _quantile(evals, 0.25):.3f}-"
          f"{1e3 * _quantile(evals, 0.75):.3f} ms)")
    rows = {lib: [] for lib in libraries}
    for (lib, name), runs in per_step.items():
        o = statistics.median(runs)
        rows[lib].append({"sampler": name, "mlp_eval_ms": 1e3 * t_eval, "overhead_per_step_ms": 1e3 * o,
                          "overhead_min_ms": 1e3 * min(runs), "overhead_max_ms": 1e3 * max(runs),
                          "ratio": o / t_eval, "nfe_per_step": nfe[name], "ratio_per_nfe": o / nfe[name] / t_eval,
                          "faults_per_step": statistics.median(faults[(lib, name)])})
        print(f"{lib:8s} {name:30s} overhead/step {1e3 * o:.3f} ms (range {1e3 * min(runs):.3f}-"
              f"{1e3 * max(runs):.3f}) = {100 * o / t_eval:.1f}% of one MLP eval, "
              f"{100 * o / nfe[name] / t_eval:.1f}% per NFE", flush=True)
    return rows


def _quantile(values: list, q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def _peak_child(method: str, opts: str, steps: int) -> None:
    """Run one sampling job and print the peak RSS increase in MiB (executed in a fresh process)."""
    torch.set_num_threads(1)
    sde = sdegen.VPSDE()
    x_T = torch.randn(16, 3, 64, 64)

    def score(x, t):  # exact score of N(0, I) data: p_t = N(0, (m^2 + s^2) I)
        m, s = sde.mean_coeff(t), sde.std(t)
        return -x / (m**2 + s**2).to(x.dtype)[:, None, None, None]

    with torch.no_grad():
        sdegen.sample(sde, score, x_T, method=method, steps=2, seed=0, **json.loads(opts))  # warm-up
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
        sdegen.sample(sde, score, x_T, method=method, steps=steps, seed=0, **json.loads(opts))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"increase_mib": peak - before}))


def peak_memory() -> list:
    rows = []
    for name, opts in SAMPLERS.items():
        result = {}
        for steps in (10, 1000):
            # a fixed mmap threshold: glibc then returns every large freed block at once, so the resident
            # set follows the live tensors instead of the allocator's adaptive heap
            env = {k: v for k, v in os.environ.items() if k not in FIXED_MALLOC}
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            out = subprocess.run([sys.executable, __file__, "--child", METHOD.get(name, name), json.dumps(opts),
                                  str(steps)], capture_output=True, text=True, check=True, env=env)
            result[steps] = json.loads(out.stdout.strip().splitlines()[-1])["increase_mib"]
        rows.append({"sampler": name, "peak_10_mib": result[10], "peak_1000_mib": result[1000],
                     "ratio": result[1000] / result[10]})
        print(f"{name:14s} peak increase: 10 steps {result[10]:.1f} MiB, 1000 steps {result[1000]:.1f} MiB "
              f"(ratio {result[1000] / result[10]:.3f})", flush=True)
    return rows


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _peak_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats; writes overhead_quick.*")
    parser.add_argument("--device", default="cpu",
                        help="cpu only (the default): the figures are CPU thread time; for a GPU run "
                             "benchmarks/gpu.py --device cuda")
    parser.add_argument("--out", default=None, help="folder of the outputs (default benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default 5, 3 with --quick)")
    parser.add_argument("--baseline", default=None, help="directory of another copy of the package (see above)")
    parser.add_argument("--malloc", choices=("fixed", "adaptive"), default="fixed",
                        help="glibc's mmap/trim thresholds fixed (the default: the figures measure the library, not "
                             "the allocator's history) or adaptive (glibc's defaults); see the module docstring")
    args = parser.parse_args()
    if torch.device(args.device).type != "cpu":
        parser.exit(2, f"overhead.py measures CPU thread time (time.thread_time) and the process's resident set, "
                       f"which do not see work on device {args.device!r}; it runs on the CPU only. For the same "
                       f"sampling loops timed on a GPU run:\n    python benchmarks/gpu.py --device {args.device}\n")
    global RESULTS
    if args.out is not None:
        RESULTS = Path(args.out)
    suffix = "_quick" if args.quick else ""
    if args.malloc == "fixed" and any(os.environ.get(k) != v for k, v in FIXED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **FIXED_MALLOC))
    if args.malloc == "adaptive" and any(k in os.environ for k in FIXED_MALLOC):
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  {k: v for k, v in os.environ.items() if k not in FIXED_MALLOC})
    torch.set_num_threads(1)
    libraries = {"this": sdegen}
    if args.baseline:
        directory = Path(args.baseline).resolve()
        sys.path.insert(0, str(directory.parent))
        libraries = {"baseline": importlib.import_module(directory.name), "this": sdegen}
    load_before = os.getloadavg()[0]
    rows = overhead(args.repeats or (3 if args.quick else 5), 50 if args.quick else 100, libraries)
    if args.baseline:
        _write_comparison(rows, args.baseline, load_before, suffix)
        return
    over = rows["this"]
    mem = peak_memory()
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# Library overhead and peak memory", "",
             f"- machine: {_machine()}; load average at the start {load_before:.1f}, at the end "
             f"{os.getloadavg()[0]:.1f}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `{common.command()}`",
             "- CPU only: benchmarks/gpu.py measures the same loops on a GPU", f"- allocator: {_allocator()}", "",
             "Overhead per step outside the score call, relative to one 3-layer 256-wide MLP evaluation at batch 1024 "
             "(CPU time of the sampling thread, 1 thread, median of round-robin repeats, range in brackets); minor "
             "page faults per step of the whole loop (network included), median. Target <= 10% per NFE.", "",
             "| sampler | NFE/step | MLP eval (ms) | overhead/step (ms) [range] | ratio per step | ratio per NFE | "
             "page faults/step |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['nfe_per_step']:g} | {r['mlp_eval_ms']:.3f} | {r['overhead_per_step_ms']:.3f} "
              f"[{r['overhead_min_ms']:.3f}-{r['overhead_max_ms']:.3f}] | "
              f"{100 * r['ratio']:.1f}% | {100 * r['ratio_per_nfe']:.1f}% | {r['faults_per_step']:.0f} |" for r in over]
    lines += ["", "Peak resident memory increase of one run on a (16, 3, 64, 64) float32 state. Target: 1000 steps "
              "within 10% of 10 steps.", "", "| sampler | 10 steps (MiB) | 1000 steps (MiB) | ratio |",
              "|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['peak_10_mib']:.1f} | {r['peak_1000_mib']:.1f} | {r['ratio']:.3f} |" for r in mem]
    (RESULTS / f"overhead{suffix}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"overhead{suffix}.json").write_text(json.dumps({"overhead": over, "memory": mem}, indent=1))


FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def _allocator() -> str:
    set_here = {k: os.environ[k] for k in FIXED_MALLOC if k in os.environ}
    if not set_here:
        return "glibc malloc with its adaptive mmap and trim thresholds (--malloc adaptive)"
    return "glibc malloc with fixed thresholds (" + ", ".join(f"{k}={v}" for k, v in set_here.items()) + ")"


def _machine() -> str:
    return (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; "
            f"torch {torch.__version__}, 1 thread")


def _write_comparison(rows: dict, baseline: str, load_before: float, suffix: str = "") -> None:
    lines = ["# Library overhead: this tree against a baseline copy, interleaved", "",
             f"- machine: {_machine()}; load average at the start {load_before:.1f}, at the end "
             f"{os.getloadavg()[0]:.1f}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `{common.command()}`", f"- baseline: `{baseline}`", f"- allocator: {_allocator()}",
             "",
             "Overhead per NFE outside the score call, as a fraction of one 3-layer 256-wide MLP evaluation at batch "
             "1024 (CPU time of the sampling thread, median of round-robin repeats, range in brackets; both copies "
             "run between the same MLP evaluations). Target <= 10% per NFE.", "",
             "| sampler | MLP eval (ms) | baseline overhead/step (ms) [range] | baseline per NFE | "
             "this overhead/step (ms) [range] | this per NFE | page faults/step (baseline, this) |",
             "|---|---|---|---|---|---|---|"]
    for old, new in zip(rows["baseline"], rows["this"]):
        lines.append(f"| {new['sampler']} | {new['mlp_eval_ms']:.3f} | {old['overhead_per_step_ms']:.3f} "
                     f"[{old['overhead_min_ms']:.3f}-{old['overhead_max_ms']:.3f}] | "
                     f"{100 * old['ratio_per_nfe']:.1f}% | "
                     f"{new['overhead_per_step_ms']:.3f} [{new['overhead_min_ms']:.3f}-{new['overhead_max_ms']:.3f}] | "
                     f"{100 * new['ratio_per_nfe']:.1f}% | {old['faults_per_step']:.0f}, {new['faults_per_step']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"overhead_baseline{suffix}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"overhead_baseline{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
