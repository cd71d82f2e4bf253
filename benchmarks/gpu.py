"""Sampling, noise, likelihood and training at the speed of the network, on a GPU (or, without one, the CPU).

For three networks (a 3-layer 256-wide MLP on 16-D vectors, batch 1024; sdegen's UNet(1, 32) on 8x8, batch 256;
UNet(3, 64) on 32x32, batch 128) it times one network evaluation alone and the time per network evaluation
inside sampling loops: a hand-written DDIM loop (the floor: nothing but the update), diffusers'
DPMSolverMultistepScheduler loop (the peer, when diffusers is installed), and sdegen's samplers with per-example
noise, with one torch.Generator stream, and with the captured loop (``capture=True``, CUDA only). Then: the cost
of one per-example noise draw against ``torch.randn``; host synchronisations per step
(``torch.cuda.set_sync_debug_mode("warn")``, CUDA only); peak memory at 10 against 500 steps; exact against
Hutchinson ``log_likelihood``; one ``train`` step.

Times are wall-clock medians of repeated runs (after a warm-up; with ``torch.cuda.synchronize`` around each timed
region on CUDA). ``--quick`` shrinks batches and repeats (for a CPU run). Writes benchmarks/results/gpu.md
(gpu_quick.md with --quick, so that a smoke run never replaces the published report; an explicit --out wins).
This is also the GPU counterpart of benchmarks/overhead.py, which measures CPU thread time and so runs on the CPU only.

    python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import common
from common import cpu_model

import sdegen
from sdegen.nets import UNet
from sdegen.noise import Noise, make_seeds

RESULTS = Path(__file__).resolve().parent / "results"
DETERMINISTIC = ["ddim", "dpmpp_2m", "exp_pc", "heun"]
STOCHASTIC = ["euler_maruyama", "dpmpp_2m_sde", "sa_solver"]


class EpsMLP(torch.nn.Module):
    """eps(x, t) of a 3-layer MLP on [x, t]."""

    def __init__(self, dim=16, width=256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def networks(quick: bool):
    scale = 8 if quick else 1
    return [("3x256 MLP, 16-D", EpsMLP(), (1024 // scale, 16)),
            ("UNet(1, 32), 8x8", UNet(1, 32), (256 // scale, 1, 8, 8)),
            ("UNet(3, 64), 32x32", UNet(3, 64), (128 // scale, 3, 32, 32))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median wall time of fn() over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ddim_by_hand(net, sde, x_T, steps):
    """The floor: eta = 0 DDIM in x-space with precomputed Python-float coefficients."""
    ts = torch.linspace(sde.T, sde.t_min, steps + 1, dtype=torch.float64)
    m, s = sde.mean_coeff(ts).tolist(), sde.std(ts).tolist()
    x = x_T
    t_in = [torch.full((x_T.shape[0],), float(t), device=x_T.device) for t in ts]
    for i in range(steps):
        eps = net(x, t_in[i])
        x0 = (x - s[i] * eps) / m[i]
        x = m[i + 1] * x0 + s[i + 1] * eps
    return x


def diffusers_loop(net, x_T, steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in sched.timesteps:
        eps = net(x, (t.float() / 1000.0).expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return x


def sampling_table(device, quick, steps, repeats):
    rows = []
    sde = sdegen.VPSDE()
    for label, net, shape in networks(quick):
        net = net.to(device).eval()
        model = sdegen.ScoreModel(net, sde, prediction="eps")
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.full((shape[0],), 0.5, device=device)
        with torch.no_grad():
            alone = timed(lambda: [net(x_T, t) for _ in range(steps)], device, repeats) / steps
            row = {"network": label, "batch": shape[0], "alone_ms": 1e3 * alone, "runs": {}}

            def per_nfe(name, fn, nfe):
                row["runs"][name] = timed(fn, device, repeats) / nfe / alone - 1.0

            per_nfe("hand-written DDIM", lambda: ddim_by_hand(net, sde, x_T, steps), steps)
            try:
                per_nfe("diffusers DPMSolverMultistep", lambda: diffusers_loop(net, x_T, steps), steps)
            except ImportError:
                row["runs"]["diffusers DPMSolverMultistep"] = None
            for method in DETERMINISTIC + STOCHASTIC:
                nfe = sdegen.sample(sde, model, x_T, method=method, steps=steps, seed=0, return_info=True)[1].nfe
                per_nfe(method, lambda: sdegen.sample(sde, model, x_T, method=method, steps=steps, seed=0), nfe)
            per_nfe("dpmpp_2m_sde, noise=generator", lambda: sdegen.sample(
                sde, model, x_T, method="dpmpp_2m_sde", steps=steps, seed=0, noise="generator"), steps)
            if device.type == "cuda":
                for method in ("ddim", "dpmpp_2m", "dpmpp_2m_sde"):
                    per_nfe(f"{method}, capture=True", lambda: sdegen.sample(
                        sde, model, x_T, method=method, steps=steps, seed=0, capture=True), steps)
        rows.append(row)
        print(label, {k: (None if v is None else round(100 * v, 1)) for k, v in row["runs"].items()}, flush=True)
    return rows


def noise_table(device, repeats):
    rows = []
    for shape in ((128, 3, 32, 32), (256, 1, 8, 8), (1024, 16)):
        stream = Noise(make_seeds(0, shape[0], device), key=1)
        x = torch.empty(shape, device=device)
        gen = torch.Generator(device).manual_seed(0)
        loops = 20
        ours = timed(lambda: [stream.like(x) for _ in range(loops)], device, repeats) / loops
        ref = timed(lambda: [torch.randn(shape, generator=gen, device=device) for _ in range(loops)], device,
                    repeats) / loops
        rows.append((shape, 1e6 * ref, 1e6 * ours))
        print(shape, f"randn {1e6 * ref:.1f} us, per-example {1e6 * ours:.1f} us ({ours / ref:.2f}x)", flush=True)
    return rows


def syncs_per_step(device, steps):
    """Host synchronisations per step of each fixed-step sampler (CUDA's sync debug mode counts them)."""
    if device.type != "cuda":
        return None
    sde, model = sdegen.VPSDE(), sdegen.ScoreModel(EpsMLP().to(device), sdegen.VPSDE(), prediction="eps")
    x_T = torch.randn(64, 16, device=device)
    counts = {}
    for method in DETERMINISTIC + STOCHASTIC:
        sdegen.sample(sde, model, x_T, method=method, steps=steps, seed=0)  # warm-up
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sdegen.sample(sde, model, x_T, method=method, steps=steps, seed=0)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[method] = sum("synchroniz" in str(w.message) for w in seen) / steps
    return counts


def peak_memory(device):
    if device.type != "cuda":
        return None
    sde, model = sdegen.VPSDE(), sdegen.ScoreModel(UNet(1, 32).to(device), sdegen.VPSDE(), prediction="eps")
    x_T = torch.randn(64, 1, 8, 8, device=device)
    out = {}
    for method in ("ddim", "dpmpp_2m_sde"):
        for steps in (10, 500):
            with torch.no_grad():
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                sdegen.sample(sde, model, x_T, method=method, steps=steps, seed=0)
                out[(method, steps)] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def likelihood_times(device, quick):
    sde = sdegen.VPSDE()
    model = sdegen.ScoreModel(EpsMLP().to(device), sde, prediction="eps")
    x = torch.randn(128 if quick else 1024, 16, device=device)
    out = {}
    for divergence in ("exact", "hutchinson"):
        start = time.perf_counter()
        result = sdegen.log_likelihood(sde, model, x, divergence=divergence, seed=0)
        sync(device)
        out[divergence] = (time.perf_counter() - start, result.nfe)
    return out


def training_step(device, quick, repeats):
    net = UNet(1, 32).to(device)
    data = torch.randn(1024, 1, 8, 8, device=device)
    batch = 32 if quick else 256
    steps = 5 if quick else 50
    model = sdegen.ScoreModel(net, sdegen.VPSDE(), prediction="eps")

    def fn():
        sdegen.train(model, sdegen.dsm_loss, data, steps, batch_size=batch, progress=False)
    return timed(fn, device, max(1, repeats // 2)) / steps, batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own)")
    parser.add_argument("--out", default=None,
                        help="report path (default: results/gpu.md, or results/gpu_quick.md with --quick)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("gpu_quick.md" if args.quick else "gpu.md"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)  # network initialisation only
    steps, repeats = (10, 3) if args.quick else (50, 7)
    started = time.time()
    samp = sampling_table(device, args.quick, steps, repeats)
    noise = noise_table(device, repeats)
    syncs = syncs_per_step(device, steps)
    mem = peak_memory(device)
    like = likelihood_times(device, args.quick)
    train_s, train_batch = training_step(device, args.quick, repeats)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({cpu_model()}, {os.cpu_count()} logical CPUs, " \
        f"{torch.get_num_threads()} torch threads) - no CUDA device: these are CPU figures"
    lines = [f"# sdegen on {'a GPU' if device.type == 'cuda' else 'the CPU'}", "",
             f"- device: {name}; torch {torch.__version__}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
             f"wall time {time.time() - started:.0f} s",
             f"- command: `{common.command()}`",
             f"- {steps} steps per run, median of {repeats} timed runs after a warm-up", "",
             "## Time per network evaluation inside a sampling loop, over the network alone", ""]
    methods = list(samp[0]["runs"])
    lines += ["| network (batch) | net alone (ms) | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for r in samp:
        cells = ["n/a" if r["runs"][m] is None else f"{100 * r['runs'][m]:+.0f}%" for m in methods]
        lines.append(f"| {r['network']} ({r['batch']}) | {r['alone_ms']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## One per-example noise draw against torch.randn", "",
              "| shape | torch.randn (us) | per-example (us) | ratio |", "|---|---|---|---|"]
    lines += [f"| {s} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for s, a, b in noise]
    lines += ["", "## Host synchronisations per step", ""]
    lines += (["not measurable without CUDA (tests/test_sync_free.py checks every fixed-step sampler on the meta "
               "device: no host read and no host-to-device copy inside the loop)"] if syncs is None else
              ["| sampler | syncs/step |", "|---|---|"] + [f"| {k} | {v:g} |" for k, v in syncs.items()])
    lines += ["", "## Peak GPU memory (UNet(1, 32), batch 64)", ""]
    lines += (["CUDA only (benchmarks/overhead.py measures the resident set on the CPU)"] if mem is None else
              ["| sampler | 10 steps (MiB) | 500 steps (MiB) |", "|---|---|---|"] +
              [f"| {m} | {mem[(m, 10)]:.1f} | {mem[(m, 500)]:.1f} |" for m in ("ddim", "dpmpp_2m_sde")])
    lines += ["", "## log_likelihood (3x256 MLP, 16-D)", "", "| divergence | time (s) | NFE |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.2f} | {v[1]} |" for k, v in like.items()]
    lines += ["", f"## train: {1e3 * train_s:.1f} ms per step (UNet(1, 32), 8x8, batch {train_batch}, dsm_loss)", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
