"""What the benchmark scripts share: the provenance lines of a report, and the mixture metrics against exact draws.

The scripts run as ``python benchmarks/<name>.py``, so this module is importable as ``common``.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import shlex
import sys
import time
import types
from pathlib import Path
from typing import List, Optional, Tuple

import torch

F64 = torch.float64


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; float32 results can differ between CPUs), else the
    platform's processor or machine string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(started: Optional[float] = None, device=None) -> List[str]:
    """The machine, the date (and wall time since ``started``, a time.time()) and the command (shell-quoted, so that
    it can be re-run as written), as report lines."""
    machine = (f"- machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, "
               f"{platform.system()} {platform.release()}; torch {torch.__version__}")
    date = f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
    return [machine + (f"; device {device}" if device is not None else ""),
            date + (f"; wall time {time.time() - started:.0f} s" if started is not None else ""),
            f"- command: `{command()}`"]


def command() -> str:
    """The command line that ran this process, quoted with shlex.join so that it can be re-run as written."""
    return shlex.join(["python", *sys.argv])


def within_mode(gm_t, x: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """(mean squared Mahalanobis distance per dimension to the most responsible component of the mixture ``gm_t``,
    the fraction of x (N, D) assigned to each component)."""
    k = gm_t.responsibilities(x).argmax(1)
    diff = x.to(F64) - gm_t.means[k]
    q = (diff * torch.linalg.solve(gm_t.covs[k], diff.unsqueeze(-1)).squeeze(-1)).sum(1) / x.shape[1]
    return float(q.mean()), torch.bincount(k, minlength=gm_t.n_components).to(F64) / x.shape[0]


def exact_floor(gm, sde, n: int, reps: int) -> Tuple[float, float]:
    """Over ``reps`` sets of n exact draws of p_{t_min}: (mean within-mode statistic, RMS L1 weight error)."""
    gm_t = gm.marginal(sde, sde.t_min)
    qs, errs = [], []
    for rep in range(reps):
        q, w = within_mode(gm_t, gm.sample(n, sde=sde, t=sde.t_min, seed=1000 + rep))
        qs.append(q)
        errs.append(float((w - gm.weights).abs().sum()) ** 2)
    return sum(qs) / reps, math.sqrt(sum(errs) / reps)


def load_k_diffusion():
    """k_diffusion.sampling alone (the package's __init__ needs torchvision and more), loaded from its file with a
    stub ``k_diffusion.utils`` providing append_dims; None when k-diffusion or a module it imports is missing."""
    loaded = sys.modules.get("k_diffusion.sampling")
    if loaded is not None:  # loaded before in this process (find_spec fails on the stub package then)
        return loaded
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    if not path.exists():
        return None
    if "k_diffusion.utils" not in sys.modules:
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        pkg = sys.modules.setdefault("k_diffusion", types.ModuleType("k_diffusion"))
        pkg.__path__, pkg.utils = getattr(pkg, "__path__", []), utils
        sys.modules["k_diffusion.utils"] = utils
    mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ImportError:
        return None
    sys.modules["k_diffusion.sampling"] = module
    return module
