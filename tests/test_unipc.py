"""UniPC ("unipc"): its order against the Gaussian-mixture oracle, and step-for-step equivalence with diffusers'
UniPCMultistepScheduler driven by the same exact noise prediction on diffusers' own DDPM table."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture

from peers import diffusers_run

RING = GaussianMixture.ring()
MIX = GaussianMixture.random(dim=4, n_components=3, seed=0)
VE_FORM = sdegen.EDMSDE(sigma_min=1e-8, sigma_max=1e8)  # m = 1, s = sigma: the oracle at any noise level


def _observed_order(sde, method_opts, steps_list):
    """Least-squares slope of log RMS endpoint error against log steps (log-SNR grid), negated."""
    x_T = sde.prior_sample((64, 2), seed=3, dtype=torch.float64)
    ref = sdegen.sample(sde, RING, x_T, method="ode", rtol=1e-10, atol=1e-10)
    logs, errs = [], []
    for steps in steps_list:
        x, info = sdegen.sample(sde, RING, x_T, method="unipc", steps=steps, schedule="log_snr", return_info=True,
                                **method_opts)
        assert info.nfe == steps  # the corrector reuses the next step's evaluation
        logs.append(math.log(steps))
        errs.append(math.log(float((x - ref).pow(2).sum(1).mean().sqrt())))
    n, e = torch.tensor(logs, dtype=torch.float64), torch.tensor(errs, dtype=torch.float64)
    return float(-((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())


@pytest.mark.parametrize("opts,order", [
    ({"order": 1}, 2), ({"order": 2}, 3), ({"order": 2, "variant": "bh1"}, 3),
    ({"order": 2, "corrector": False}, 2), ({"order": 3, "corrector": False}, 3),
])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_unipc_convergence_order(sde_name, opts, order):
    """UniPC-p has global order p + 1 and UniP-p order p (Zhao et al. 2023, theorems 3.1-3.2): slope of log RMS
    error against log steps within 0.3 of it, at 80-320 steps, without the lower-order final steps."""
    sde = {"vp": sdegen.VPSDE(), "ve": sdegen.VESDE()}[sde_name]
    slope = _observed_order(sde, dict(opts, lower_order_final=False), (80, 160, 320))
    assert abs(slope - order) <= 0.3, f"unipc {opts} on {sde_name}: slope {slope:.2f}, order {order}"


# ------------------------------------------------------------------ against diffusers
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order,lower_order_final,steps", [(1, True, 6), (2, True, 6), (3, True, 8), (2, False, 6),
                                                            (3, False, 10)])
def test_unipc_matches_diffusers(diffusers, variant, order, lower_order_final, steps):
    """UniPCMultistepScheduler (data prediction, final_sigmas_type="sigma_min": its last step goes to timestep 0)
    and sdegen's "unipc" on the same timesteps (with timestep 0 appended) from the same x_T, with the exact eps
    of a 4-D mixture as the network: equal to 1e-6 of the largest entry (diffusers keeps its sigmas in float32,
    which leaves about 1e-7), the same number of network calls; UniPC without its corrector differs."""
    sched = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, predict_x0=True,
                                              lower_order_final=lower_order_final, final_sigmas_type="sigma_min",
                                              timestep_spacing="trailing")
    sched.set_timesteps(steps)
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x, model, grid = diffusers_run(sched, MIX, VE_FORM, x_T)
    with torch.no_grad():
        ours, info = sdegen.sample(model.sde, model, x_T, method="unipc", order=order, variant=variant,
                                   lower_order_final=lower_order_final, schedule=grid, return_info=True)
        plain = sdegen.sample(model.sde, model, x_T, method="unipc", order=order, variant=variant, corrector=False,
                              lower_order_final=lower_order_final, schedule=grid)
    scale = float(x.abs().max())
    assert info.nfe == len(sched.timesteps)
    assert float((ours - x).abs().max()) / scale < 1e-6
    assert float((plain - x).abs().max()) / scale > 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("order,steps", [(1, 6), (2, 6), (2, 20)])
def test_unipc_matches_diffusers_ending_at_zero(diffusers, order, steps):
    """UniPCMultistepScheduler with its default final_sigmas_type="zero" and solver_order <= 2 (bh2; bh1's B(h) = h
    is infinite on a step to sigma = 0) takes a first-order last step to sigma = 0, where the data prediction is the
    whole update: "unipc" with ``lower_order_final=False`` down to the scheduler's last timestep followed by
    Tweedie's denoiser (``denoise=True``) equals it to 1e-6 of the largest entry, with the same network calls.
    sdegen's ``lower_order_final`` counts the steps of its own grid (one fewer), so keeping it changes the run."""
    from sdegen.adapters import diffusers_time_grid

    sched = diffusers.UniPCMultistepScheduler(solver_order=order, final_sigmas_type="zero", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x, model, _ = diffusers_run(sched, MIX, VE_FORM, x_T)
    grid = diffusers_time_grid(model.sde, sched.timesteps)
    with torch.no_grad():
        ours, info = sdegen.sample(model.sde, model, x_T, method="unipc", order=order, lower_order_final=False,
                                   schedule=grid, denoise=True, return_info=True)
        lowered = sdegen.sample(model.sde, model, x_T, method="unipc", order=order, lower_order_final=True,
                                schedule=grid, denoise=True)
    scale = float(x.abs().max())
    assert info.nfe == len(sched.timesteps)
    assert float((ours - x).abs().max()) / scale < 1e-6
    if order > 1:
        assert float((lowered - x).abs().max()) / scale > 1e-3


def test_unipc_options_are_validated():
    for opts, err in (({"order": 4}, ValueError), ({"order": True}, ValueError), ({"variant": "bh3"}, ValueError),
                      ({"corrector": 1}, TypeError), ({"lower_order_final": "yes"}, TypeError)):
        with pytest.raises(err):
            sdegen.sample(sdegen.VPSDE(), RING, shape=(2, 2), method="unipc", steps=3, seed=0, **opts)


def test_unip2_bh2_is_dpmpp_2m_and_full_solves_are_exact():
    """With B(h) = 1 - e^{-h}, UniP-2 (rho = 1/2) is DPM-Solver++(2M)'s midpoint rule: equal runs on a warped grid.
    UniP-3's solved order conditions integrate the quadratic exactly: it is the exponential Adams predictor of
    order 3 with the midpoint rule on its two-value warm-up step."""
    sde = sdegen.VPSDE()
    x_T = sde.prior_sample((32, 2), seed=4, dtype=torch.float64)
    grid = sdegen.time_grid(sde, 9, "edm")
    unip = {order: sdegen.sample(sde, RING, x_T, method="unipc", order=order, corrector=False,
                                 lower_order_final=False, schedule=grid) for order in (2, 3)}
    b = sdegen.sample(sde, RING, x_T, method="dpmpp_2m", schedule=grid)
    torch.testing.assert_close(unip[2], b, rtol=1e-12, atol=1e-12)
    adams = sdegen.sample(sde, RING, x_T, method="exp_adams", predictor_order=3, midpoint=True, schedule=grid)
    torch.testing.assert_close(unip[3], adams, rtol=1e-12, atol=1e-12)
    bh1 = sdegen.sample(sde, RING, x_T, method="unipc", variant="bh1", corrector=False, lower_order_final=False,
                        schedule=grid)
    assert float((bh1 - b).abs().max()) > 1e-4  # B(h) = h is another rule
