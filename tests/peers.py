"""Other libraries' samplers for equivalence tests: k-diffusion's sampling module and an exact eps network in
diffusers' calling convention. Tests import what they need; a missing library skips the test."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch


def k_diffusion_sampling():
    """k-diffusion's sampling module without its package __init__ (which needs torchvision and more), loaded from
    its file with a stub ``k_diffusion.utils`` providing append_dims; skips if the package or the modules
    sampling.py imports (scipy, torchdiffeq, torchsde, tqdm) are absent. sys.modules is left as it was."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    for name in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(name)
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package = types.ModuleType("k_diffusion")
    package.__path__, package.utils = [], utils
    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, utils  # for its "from . import utils"
    try:
        module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    return module


class _Output:
    def __init__(self, sample):
        self.sample = sample


class OracleEps(torch.nn.Module):
    """Exact eps of a mixture's marginal at diffusers' integer timesteps k, x_k = sqrt(ab_k) x0 + sqrt(1 - ab_k)
    eps, with ab the scheduler's ``alphas_cumprod`` table; ``sigma_view`` is an SDE with m = 1 and s = sigma
    (the oracle at any noise level). Called as diffusers calls a UNet: ``net(sample, timestep).sample``."""

    def __init__(self, mixture, table, sigma_view):
        super().__init__()
        self.mixture, self.sigma_view = mixture, sigma_view
        self.table = table.to(torch.float64)

    def forward(self, sample, timestep):
        k = torch.as_tensor(timestep).to(torch.float64).reshape(-1).expand(sample.shape[0])
        assert torch.equal(k, k.round())
        ab = self.table[k.long()]
        m, s = ab.sqrt(), (1.0 - ab).sqrt()
        x = sample.to(torch.float64).reshape(sample.shape[0], -1)
        score = self.mixture.score(self.sigma_view, x / m[:, None], s / m) / m[:, None]
        return _Output((-s[:, None] * score).reshape(sample.shape).to(sample.dtype))


def diffusers_run(sched, mixture, sigma_view, x_T):
    """A diffusers scheduler (``set_timesteps`` already called) driven by the mixture's exact eps from x_T, and the
    same network as an sdegen model on the scheduler's table with the scheduler's timesteps as sdegen times
    (ending at t = 0's timestep): (diffusers' samples, model, grid)."""
    from sdegen.adapters import diffusers_time_grid, from_diffusers

    net = OracleEps(mixture, sched.alphas_cumprod, sigma_view)
    model = from_diffusers(net, sched)
    grid = diffusers_time_grid(model.sde, sched.timesteps, final_timestep=0)
    with torch.no_grad():
        x = x_T.clone()
        for k in sched.timesteps:
            x = sched.step(net(x, k).sample, k, x).prev_sample
    return x, model, grid
