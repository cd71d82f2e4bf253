"""Cost of sdegen's per-example noise against ``torch.randn`` of the same shape and dtype.

For each shape and dtype, the time of one draw of

- ``torch.randn(shape, generator=g)``: the reference (one generator, not batch-invariant);
- ``Noise.like(x)``: a per-example stream in its steady state (the way samplers draw, one call per step);
- ``normal_from_seeds(seeds, key, shape[1:])``: a single draw (prior samples, Brownian nodes, probes);
- with ``--baseline PATH``, the same two calls of another copy of ``sdegen/noise.py`` (an earlier version, say,
  from ``git show REV:sdegen/noise.py > PATH``), so that a change can be measured on the same machine in one run.

Each timing is a loop of calls long enough to last about ``--target-ms``; the loops run round-robin over the
functions, repeated ``--repeats`` times, so that a busy spell of a shared machine hits every function alike, and
the table gives the median time per call and its ratio to the median ``torch.randn`` time. On CUDA each loop is
closed by a synchronisation (launch and kernel time both count). On CPU the measurement is made with torch's
default number of threads and with 1 thread. Target: a per-example draw costs at most 3x ``torch.randn`` on CPU
and at most 2x on CUDA.

    python benchmarks/noise.py [--device cpu|cuda] [--quick] [--baseline PATH]
Writes benchmarks/results/noise.md (noise_quick.md with --quick, so that a smoke run never replaces the published
table; an explicit ``--out`` wins).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from common import cpu_model

from sdegen import noise as sdegen_noise

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(128, 3, 32, 32), (256, 1, 8, 8), (1024, 16), (64, 3, 64, 64)]
DTYPES = [torch.float32, torch.float64]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("noise_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw_functions(module, shape, dtype, device) -> Dict[str, Callable[[], torch.Tensor]]:
    """The per-example draws of one copy of the noise module: a stream's next draw and a single keyed draw."""
    x = torch.zeros(shape, dtype=dtype, device=device)
    stream = module.Noise(module.make_seeds(0, shape[0], device))
    seeds = module.make_seeds(1, shape[0], device)
    key = [0]

    def single():
        key[0] += 1
        return module.normal_from_seeds(seeds, key[0], shape[1:], dtype)

    return {"like": lambda: stream.like(x), "single": single}


def time_loop(fn: Callable, calls: int, device: torch.device) -> Tuple[float, float]:
    """Wall-clock and process CPU seconds per call of ``calls`` calls (closed by a synchronisation on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def measure(fns: Dict[str, Callable], device: torch.device, repeats: int,
            target_s: float) -> Dict[str, Tuple[float, float]]:
    """Median wall-clock and CPU seconds per call of each function, timed round-robin."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up: first-call allocations, kernel compilation, chunk set-up
            fn()
        calls[name] = max(1, int(target_s / max(time_loop(fn, 3, device)[0], 1e-7)))
    samples: Dict[str, List[Tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(time_loop(fns[name], calls[name], device))
    return {name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for name, s in samples.items()}


def machine(device: torch.device) -> str:
    cpu = cpu_model()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter loops")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--target-ms", type=float, default=None, help="duration of one timed loop")
    parser.add_argument("--baseline", default=None, help="path of another copy of sdegen/noise.py to time alongside")
    parser.add_argument("--baseline-label", default=None, help="what the baseline is, for the table's notes")
    parser.add_argument("--out", default=None,
                        help="report path (default: results/noise.md, or results/noise_quick.md with --quick)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("noise_quick.md" if args.quick else "noise.md"))
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 21)
    target_s = (args.target_ms or (5.0 if args.quick else 20.0)) / 1000
    modules = {"sdegen": sdegen_noise}
    if args.baseline:
        modules["baseline"] = load_module(args.baseline)
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] + ([1] if device.type == "cpu" and default_threads != 1 else [])

    rows = []
    load_before = os.getloadavg()[0]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for dtype in DTYPES:
                g = torch.Generator(device=device).manual_seed(0)
                fns = {"randn": lambda: torch.randn(shape, generator=g, dtype=dtype, device=device)}
                for label, module in modules.items():
                    for kind, fn in draw_functions(module, shape, dtype, device).items():
                        fns[f"{label} {kind}"] = fn
                med = measure(fns, device, repeats, target_s)
                rows.append((threads, shape, dtype, med))
                line = ", ".join(f"{k} {v[0] * 1e6:.1f} us ({v[0] / med['randn'][0]:.2f}x, cpu "
                                 f"{v[1] / med['randn'][1]:.2f}x)" for k, v in med.items())
                print(f"threads={threads} {shape} {str(dtype)[6:]}: {line}", flush=True)
    torch.set_num_threads(default_threads)
    write_table(args, device, rows, modules, default_threads, repeats, target_s, (load_before, os.getloadavg()[0]))


def write_table(args, device, rows, modules, default_threads, repeats, target_s, load):
    columns = [f"{label} {kind}" for label in modules for kind in ("like", "single")]
    titles = {"sdegen like": "Noise.like", "sdegen single": "normal_from_seeds",
              "baseline like": "baseline Noise.like", "baseline single": "baseline normal_from_seeds"}
    lines = [
        "# Per-example noise against torch.randn",
        "",
        f"- machine: {machine(device)}; device {device}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; load average before and "
        f"after the run: {load[0]:.1f}, {load[1]:.1f}",
        f"- command: `{shlex.join(['python', 'benchmarks/noise.py', *sys.argv[1:]])}`",
        f"- torch {torch.__version__}; threads: torch's default {default_threads}"
        + (" and 1" if any(r[0] == 1 for r in rows) and default_threads != 1 else "")
        + "; " + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                                         "MKL_NUM_THREADS")),
        f"- median of {repeats} round-robin repeats of loops of about {target_s * 1e3:g} ms; times per draw in "
        "microseconds, ratio to torch.randn of the same shape and dtype in brackets",
        "- Noise.like: a per-example stream's next draw (what a stochastic sampler calls each step); "
        "normal_from_seeds: one keyed draw"
        + (f"; baseline: {args.baseline_label or 'another copy of sdegen/noise.py'} (`{args.baseline}`)"
           if args.baseline else ""),
        "- target: at most 3x torch.randn on CPU, at most 2x on CUDA",
    ]
    if device.type == "cuda":
        if sdegen_noise._fused_draw(device, torch.float32) is not None:
            import triton
            lines.append(f"- per-example draws on CUDA: one fused Triton kernel per call (triton {triton.__version__})")
        else:
            lines.append("- per-example draws on CUDA: PyTorch operations (Triton is not installed)")
    if device.type == "cpu" and default_threads > 1:
        lines.append("- with several threads every parallel region (an elementwise operation on more than 32768 "
                     "elements, and every vector-math call for log, sin, cos and sqrt) waits for all its threads: "
                     "on a machine whose cores other processes hold, that wait can dominate (compare the 1-thread "
                     "rows and the load average); torch.randn runs on one thread")
    clocks = [("Wall-clock time", 0)] + ([("Process CPU time (all threads; robust to other processes holding the "
                                           "cores, but counts OpenMP spin-waits)", 1)] if device.type == "cpu" else [])
    for title, index in clocks:
        lines += ["", f"{title}:", "",
                  "| threads | shape | dtype | torch.randn | " + " | ".join(titles[c] for c in columns) + " |",
                  "|---|---|---|---|" + "---|" * len(columns)]
        for threads, shape, dtype, med in rows:
            ref = med["randn"][index]
            cells = [f"{med[c][index] * 1e6:.1f} ({med[c][index] / ref:.2f}x)" for c in columns]
            lines.append(f"| {threads} | {tuple(shape)} | {str(dtype)[6:]} | {ref * 1e6:.1f} | "
                         + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
