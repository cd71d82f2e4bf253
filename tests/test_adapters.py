"""Adapters (sdegen.adapters): exact interop with diffusers, k-diffusion / EDM and score_sde.

Two kinds of checks:
- the converted model against closed forms from the Gaussian-mixture oracle (exact networks built from it, for
  every parameterisation and time convention);
- whole sampling runs against diffusers' schedulers, driven by hand on a tiny random-initialised UNet2DModel in
  float64, and against EDM's algorithm 2 written out from the paper.

Tolerances against diffusers are relative to the largest entry of diffusers' result (an untrained eps-network
drives x to a few hundred): 1e-5, the bar of interop; the residual (about 1e-7) is diffusers' float32
(alphas_cumprod and sigmas are float32 tensors, and its Euler and DPM-Solver steps cast the state to float32).
DDIM with diffusers' table in float64 agrees to 1e-12.
"""

import copy

import pytest
import torch

import sdegen
from sdegen.adapters import DiffusersNet, diffusers_time_grid, from_denoiser, from_diffusers, from_score_sde
from sdegen.analytic import GaussianMixture

# diffusers 0.42 under numpy 2 warns inside its own set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MIX = GaussianMixture.random(dim=4, n_components=3, seed=0)
# m = 1, s = sigma: the oracle at any noise level, in the sigma-scaled (VE) coordinates of k-diffusion and EDM
VE_FORM = sdegen.EDMSDE(sigma_min=1e-8, sigma_max=1e8)
TABLE = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)  # DDPM's, as diffusers stores it


def _bc(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def oracle_score(x, m, s):
    """Exact score of the mixture's marginal N(m x0, s^2 I) * p0 at x, from the sigma-scaled oracle."""
    return MIX.score(VE_FORM, x / _bc(m, x), s / m) / _bc(m, x)


def rel_err(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------- exact networks from the oracle
class OracleOutput:
    """Stands in for diffusers' UNet2DOutput."""

    def __init__(self, sample):
        self.sample = sample


class OracleUNet(torch.nn.Module):
    """A diffusers-like network at integer timesteps k: the exact eps, v = sqrt(ab) eps - sqrt(1 - ab) x0
    (diffusers' get_velocity) or x0 = E[x0 | x_k] of the mixture, with ab = alphas_cumprod[k]; ``form`` chooses
    how it returns (an output object, a tuple, a tensor, or a tensor with learned-variance channels appended)."""

    def __init__(self, kind, form="object"):
        super().__init__()
        self.kind, self.form, self.seen = kind, form, []

    def forward(self, sample, timestep):
        self.seen.append(timestep.detach().clone())
        k = timestep.to(torch.float64)
        assert torch.equal(k, k.round()), f"timesteps must be integers here; got {k.tolist()}"
        ab = TABLE.to(torch.float64)[k.long()]
        m, s = ab.sqrt(), (1.0 - ab).sqrt()
        x = sample.to(torch.float64)
        score = oracle_score(x, m, s)
        eps = -_bc(s, x) * score
        x0 = (x + _bc(s**2, x) * score) / _bc(m, x)
        out = {"epsilon": eps, "v_prediction": _bc(m, x) * eps - _bc(s, x) * x0, "sample": x0}[self.kind]
        out = out.to(sample.dtype)
        if self.form == "tuple":
            return (out,)
        if self.form == "tensor":
            return out
        if self.form == "learned_variance":
            return torch.cat([out, torch.full_like(out, 7.0)], 1)
        return OracleOutput(out)


def _table_times(ks):
    return (torch.as_tensor(ks, dtype=torch.float64) + 1.0) / len(TABLE)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_from_diffusers_matches_oracle_for_each_prediction_type(kind, dtype):
    net = OracleUNet(kind)
    model = from_diffusers(net, TABLE, kind)
    ks = torch.tensor([0, 17, 500, 999])
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    t = _table_times(ks).to(dtype)
    ab = TABLE.to(torch.float64)[ks]
    expected = oracle_score(x.to(torch.float64), ab.sqrt(), (1.0 - ab).sqrt())
    got = model.score(x, t)
    assert got.dtype == dtype and got.shape == x.shape
    # the network saw exactly its integer timesteps, in float32 too (where t cannot hold (k + 1) / N exactly)
    assert torch.equal(net.seen[-1].to(torch.float64), ks.to(torch.float64))
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        m, s = ab.sqrt()[:, None, None, None], (1.0 - ab).sqrt()[:, None, None, None]
        torch.testing.assert_close(model.denoise(x, t), (x + s**2 * expected) / m, rtol=1e-10, atol=1e-10)
    else:  # float32 state: the table's m, s and the oracle's cancellation cost about 1e-6 relative
        assert rel_err(got.to(torch.float64), expected) < 1e-4


@pytest.mark.parametrize("form", ["object", "tuple", "tensor", "learned_variance"])
def test_diffusers_output_forms(form):
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = _table_times([3, 250, 900])
    reference = from_diffusers(OracleUNet("epsilon"), TABLE).score(x, t)
    torch.testing.assert_close(from_diffusers(OracleUNet("epsilon", form), TABLE).score(x, t), reference,
                               rtol=0, atol=0)


def test_from_diffusers_reads_the_scheduler():
    """The table and prediction type come from any object with alphas_cumprod and config.prediction_type."""

    class Config(dict):
        __getattr__ = dict.get

    class Scheduler:
        alphas_cumprod = TABLE
        config = Config(prediction_type="v_prediction")

    model = from_diffusers(OracleUNet("v_prediction"), Scheduler())
    assert model.prediction == "v"
    assert torch.equal(model.sde.alphas_cumprod, TABLE.to(torch.float64))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = _table_times([10, 600])
    ab = TABLE.to(torch.float64)[[10, 600]]
    torch.testing.assert_close(model.score(x, t), oracle_score(x, ab.sqrt(), (1 - ab).sqrt()), rtol=1e-10,
                               atol=1e-10)


def test_fractional_timesteps_reach_the_network():
    """Between table times the network gets t N - 1 unrounded, and the model is that of the SDE's interpolation."""
    sde = sdegen.DiscreteVPSDE(TABLE)
    seen = []

    def net(x, k):
        seen.append(k)
        t = (k + 1.0) / len(TABLE)
        return -_bc(sde.std(t), x) * MIX.score(sde, x, t)

    model = from_diffusers(net, TABLE)
    t = torch.tensor([0.12345, 0.5000004, 0.98765], dtype=torch.float64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(model.score(x, t), MIX.score(sde, x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(seen[-1], t * 1000 - 1, rtol=0, atol=1e-12)


SDES = {"vp": sdegen.VPSDE(), "subvp": sdegen.SubVPSDE(), "ve": sdegen.VESDE(), "edm": sdegen.EDMSDE(),
        "flow": sdegen.FlowSDE(), "discrete": sdegen.DiscreteVPSDE(TABLE)}


@pytest.mark.parametrize("name", list(SDES))
def test_from_denoiser_is_exact_under_any_sde(name):
    """k-diffusion's D(x0 + sigma eps, sigma) becomes D_sdegen(x, t) = D(x / m, s / m) under every SDE."""
    sde = SDES[name]
    seen = []

    def denoiser(y, sigma):  # exact: Tweedie in sigma-scaled coordinates
        seen.append((y, sigma))
        return y + _bc(sigma, y) ** 2 * MIX.score(VE_FORM, y, sigma)

    model = from_denoiser(denoiser, sde)
    g = torch.Generator().manual_seed(4)
    t = sde.t_min + (sde.T - sde.t_min) * torch.rand(5, generator=g, dtype=torch.float64)
    x = MIX.sample(5, sde=sde, t=0.5 * sde.T, seed=g)
    m, s = sde.mean_coeff(t)[:, None], sde.std(t)[:, None]
    score = MIX.score(sde, x, t)
    torch.testing.assert_close(model.denoise(x, t), (x + s**2 * score) / m, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.score(x, t), score, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(seen[-1][1], sde.sigma(t), rtol=1e-15, atol=0)
    torch.testing.assert_close(seen[-1][0], x / m, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_from_score_sde_vp_convention(name):
    """score_sde's continuous VP networks take 999 t and return -s(t) score."""
    sde = SDES[name]
    seen = []

    def net(x, labels):
        seen.append(labels)
        t = labels / 999.0
        return -_bc(sde.std(t), x) * MIX.score(sde, x, t)

    model = from_score_sde(net, sde, "vp")
    t = torch.tensor([1e-3, 0.3, 0.77, 1.0], dtype=torch.float64)
    x = MIX.sample(4, sde=sde, t=0.5, seed=5).reshape(4, 1, 2, 2)
    torch.testing.assert_close(model.score(x, t), MIX.score(sde, x, t), rtol=1e-10, atol=1e-10)
    assert torch.equal(seen[-1], 999.0 * t)


def test_from_score_sde_ve_convention_at_training_noise_levels():
    """NCSN++'s net(x, sigma) is the score of p_sigma; under VESDE(kernel="paper") it is fed exactly its
    training levels sigma_min (sigma_max / sigma_min)^t, and under any other SDE the scaled input x/m, sigma = s/m."""
    seen = []

    def net(y, sigma):
        seen.append(sigma)
        return MIX.score(VE_FORM, y, sigma)

    t = torch.tensor([1e-5, 0.1, 0.6, 1.0], dtype=torch.float64)
    for sde in (sdegen.VESDE(kernel="paper"), sdegen.VESDE(), sdegen.VPSDE(t_min=1e-5)):
        model = from_score_sde(net, sde, "ve")
        x = MIX.sample(4, sde=sde, t=0.5, seed=6)
        torch.testing.assert_close(model.score(x, t), MIX.score(sde, x, t), rtol=1e-10, atol=1e-10)
        if sde.config().get("kernel") == "paper":
            torch.testing.assert_close(seen[-1], sde.noise_level(t), rtol=1e-15, atol=0)


# ----------------------------------------------------------------- EDM, algorithm 2
def edm_sigma_steps(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t_N = 0."""
    i = torch.arange(n, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def edm_algorithm2(denoiser, x, ts):
    """Karras et al. 2022, algorithm 2 with S_churn = 0: Heun steps in sigma, an Euler step to t_N = 0."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        d = (x - denoiser(x, t)) / t
        x_next = x + (t_next - t) * d
        if t_next != 0:
            d_next = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def test_heun_reproduces_edm_algorithm2():
    """sdegen's "heun" on EDMSDE with the "edm" schedule takes the same Heun steps from sigma_max to sigma_min
    (final_step="heun": the step that ends sdegen's grid is one of EDM's Heun steps); EDM's last step, Euler from
    sigma_min to 0, is x - sigma_min (x - D)/sigma_min = D: sdegen's denoise=True. The default final Euler step
    would replace EDM's last Heun step to sigma_min and is off by more than the tolerance."""
    sde = sdegen.EDMSDE()

    def denoiser(y, sigma):  # sigma: a float (the reference) or (B,) (sdegen)
        return y + _bc(torch.as_tensor(sigma, dtype=y.dtype), y) ** 2 * MIX.score(sde, y, sigma)

    n = 18  # EDM's CIFAR-10 setting: 35 NFE
    x_T = 80.0 * torch.randn(6, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = edm_algorithm2(denoiser, x_T, edm_sigma_steps(n))
    for model in (MIX, from_denoiser(denoiser, sde)):
        x, info = sdegen.sample(sde, model, x_T, method="heun", steps=n - 1, schedule="edm", denoise=True,
                                final_step="heun", return_info=True)
        assert info.nfe == 2 * n - 1
        torch.testing.assert_close(x, reference, rtol=0, atol=1e-10)
    euler_last = sdegen.sample(sde, MIX, x_T, method="heun", steps=n - 1, schedule="edm", denoise=True)
    assert float((euler_last - reference).abs().max()) > 1e-6
    torch.testing.assert_close(info.times, edm_sigma_steps(n)[:-1], rtol=1e-14, atol=0)


# ----------------------------------------------------------------- diffusers' schedulers on a tiny UNet
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _tiny_unet(diffusers):
    with torch.random.fork_rng():  # the initialisation draws from the global generator: restore it afterwards
        torch.manual_seed(0)
        return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def unet32(diffusers):
    return _tiny_unet(diffusers)


@pytest.fixture(scope="module")
def unet(unet32):
    return copy.deepcopy(unet32).double()


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


def run_diffusers(unet, scheduler, x, scale_input):
    """diffusers' denoising loop, by hand."""
    for k in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, k) if scale_input else x
        x = scheduler.step(unet(inp, k).sample, k, x).prev_sample
    return x


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers_ddim(diffusers, unet, noise, kind, spacing):
    """DDIMScheduler (eta = 0; clip_sample=False, its default clamps x0 to [-1, 1]; set_alpha_to_one=True, so
    the last step lands on the predicted x0) against sdegen's "ddim" on the same timesteps with denoise=True.
    5 steps divide N = 1000: diffusers' previous timestep k - N // steps is then the next listed timestep."""
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                                    prediction_type=kind)
    sched.set_timesteps(5)
    model = from_diffusers(unet, sched)
    grid = diffusers_time_grid(model.sde, sched.timesteps)
    with torch.no_grad():
        x, info = sdegen.sample(model.sde, model, noise, method="ddim", schedule=grid, denoise=True,
                                return_info=True)
        reference = run_diffusers(unet, sched, noise, scale_input=False)
        assert info.nfe == len(sched.timesteps)
        assert rel_err(x, reference) < 1e-5
        # the residual is diffusers' float32 table: in float64 the two agree to round-off
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
        assert rel_err(x, run_diffusers(unet, sched, noise, scale_input=False)) < 1e-12


def _sigma_scaled_start(scheduler, noise, model, grid):
    """diffusers' sigma-scaled schedulers start from y = noise * init_noise_sigma in y = x / m (sqrt(1 + sigma^2)
    for "leading" spacing, sigma_max for "trailing"); sdegen's state is x = m(t_0) y."""
    return noise * scheduler.init_noise_sigma * model.sde.mean_coeff(grid[0])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_euler_discrete_is_ddim_in_sigma(diffusers, unet, noise, spacing):
    """EulerDiscreteScheduler is Euler in sigma on y = x / m: y' = y + (sigma' - sigma)(y - D)/sigma
    = D + (sigma'/sigma)(y - D), which is DDIM (eta = 0) in y; its last step to sigma = 0 lands on D (denoise=True).
    "karras" has fractional timesteps from diffusers' log-sigma interpolation, which is DiscreteVPSDE's.
    sdegen's "euler" is another method (Euler in t on x), and visibly so."""
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing}
    sched = diffusers.EulerDiscreteScheduler(**kw)
    sched.set_timesteps(5)
    model = from_diffusers(unet, sched)
    grid = diffusers_time_grid(model.sde, sched.timesteps)
    torch.testing.assert_close(model.sde.sigma(grid), sched.sigmas[:-1].double(), rtol=1e-6, atol=0)
    x_T = _sigma_scaled_start(sched, noise, model, grid)
    with torch.no_grad():
        reference = run_diffusers(unet, sched, noise * sched.init_noise_sigma, scale_input=True)
        x = sdegen.sample(model.sde, model, x_T, method="ddim", schedule=grid, denoise=True)
        assert rel_err(x, reference) < 1e-5
        x_euler = sdegen.sample(model.sde, model, x_T, method="euler", schedule=grid, denoise=True)
        assert rel_err(x_euler, reference) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_heun_discrete_matches_heun(diffusers, unet, noise, spacing):
    """HeunDiscreteScheduler: Heun steps in sigma, then a first-order step to sigma = 0, which is the denoiser:
    sdegen's "heun" with final_step="heun" (every step of the grid down to sigma_min is a Heun step) and
    denoise=True, the same 2 (n - 1) + 1 network calls."""
    sched = diffusers.HeunDiscreteScheduler(timestep_spacing=spacing)
    sched.set_timesteps(4)
    model = from_diffusers(unet, sched)
    grid = diffusers_time_grid(model.sde, sched.timesteps)
    with torch.no_grad():
        reference = run_diffusers(unet, sched, noise * sched.init_noise_sigma, scale_input=True)
        x, info = sdegen.sample(model.sde, model, _sigma_scaled_start(sched, noise, model, grid), method="heun",
                                schedule=grid, denoise=True, final_step="heun", return_info=True)
    assert info.nfe == len(sched.timesteps)
    assert rel_err(x, reference) < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpm_solver_multistep_matches_dpmpp_2m(diffusers, unet, noise, spacing, final):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final) against "dpmpp_2m".

    final_sigmas_type="zero": diffusers' last step goes to sigma = 0, where the first-order update is exactly the
    denoiser, so sdegen runs 2M on the listed timesteps and finishes with denoise=True (no lower-order step: for
    order 2, diffusers' lower_order_final changes only that last step). "sigma_min": the last step goes to
    timestep 0 and is first order (fewer than 15 steps): sdegen appends timestep 0 and sets lower_order_final.
    Mixing the two set-ups is off by more than the tolerance, so the pairing is checked."""
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                  solver_type="midpoint", lower_order_final=True,
                                                  final_sigmas_type=final, timestep_spacing=spacing)
    sched.set_timesteps(6)
    model = from_diffusers(unet, sched)
    zero = final == "zero"
    grid = diffusers_time_grid(model.sde, sched.timesteps, final_timestep=None if zero else 0)
    with torch.no_grad():
        reference = run_diffusers(unet, sched, noise, scale_input=False)
        x, info = sdegen.sample(model.sde, model, noise, method="dpmpp_2m", schedule=grid, denoise=zero,
                                lower_order_final=not zero, return_info=True)
        assert info.nfe == len(sched.timesteps)
        assert rel_err(x, reference) < 1e-5
        swapped = sdegen.sample(model.sde, model, noise, method="dpmpp_2m", schedule=grid, denoise=zero,
                                lower_order_final=zero)
        assert rel_err(swapped, reference) > 1e-4


def test_timestep_interpolation_differs_by_design(diffusers):
    """Between table entries sdegen interpolates the log-SNR linearly (log sigma, geometric in sigma);
    diffusers' "linspace" spacing interpolates sigma linearly. Both formulas are checked at the fractional
    timesteps diffusers lists; at integer timesteps they coincide."""
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace")
    sched.set_timesteps(7)
    sde = sdegen.DiscreteVPSDE(sched.alphas_cumprod)
    ks = sched.timesteps.double()
    table = ((1 - sde.alphas_cumprod) / sde.alphas_cumprod).sqrt()
    lo = ks.floor().long().clamp(max=998)
    w = ks - lo
    ours = sde.sigma(diffusers_time_grid(sde, ks))
    torch.testing.assert_close(ours, table[lo] ** (1 - w) * table[lo + 1] ** w, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigmas[:-1].double(), (1 - w) * table[lo] + w * table[lo + 1], rtol=1e-6,
                               atol=0)
    assert bool((w != 0).any()) and bool((w == 0).any())


def test_diffusers_time_grid(diffusers):
    sched = diffusers.HeunDiscreteScheduler(timestep_spacing="trailing")
    sched.set_timesteps(4)
    sde = sdegen.DiscreteVPSDE(sched.alphas_cumprod)
    assert torch.equal(diffusers_time_grid(sde, sched.timesteps),
                       torch.tensor([1000.0, 750.0, 500.0, 250.0], dtype=torch.float64) / 1000)
    grid = diffusers_time_grid(sde, torch.tensor([999, 499]), final_timestep=0)
    assert grid.dtype == torch.float64 and torch.equal(grid, torch.tensor([1.0, 0.5, 0.001], dtype=torch.float64))
    with pytest.raises(ValueError, match="decrease"):
        diffusers_time_grid(sde, torch.tensor([10, 500]))
    with pytest.raises(ValueError, match="timesteps"):
        diffusers_time_grid(sde, torch.tensor([1000, 500]))
    with pytest.raises(TypeError, match="DiscreteVPSDE"):
        diffusers_time_grid(sdegen.VPSDE(), torch.tensor([999, 500]))


def test_network_dtypes(unet32, unet):
    """The UNet runs in its own dtype: float32 under a float64 state (results in float64, equal to the float64
    UNet's to float32 precision) and bfloat16 under a float32 state (finite, float32)."""
    table = TABLE
    with torch.no_grad():
        x64, x32 = (sdegen.sample(model.sde, model, shape=(2, 1, 8, 8), method="dpmpp_2m", steps=4, seed=0,
                                  dtype=torch.float64, denoise=True)
                    for model in (from_diffusers(unet, table), from_diffusers(unet32, table)))
        assert x32.dtype == torch.float64 and rel_err(x32, x64) < 1e-4
        bf16 = copy.deepcopy(unet32).to(torch.bfloat16)
        model = from_diffusers(bf16, table)
        x = sdegen.sample(model.sde, model, shape=(2, 1, 8, 8), method="dpmpp_2m", steps=4, seed=0,
                          dtype=torch.float32, denoise=True)
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert rel_err(x.double(), x64) < 0.1  # bfloat16 keeps about 3 digits


def test_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(OracleUNet("epsilon"), TABLE, "flow_prediction")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        from_diffusers(OracleUNet("epsilon"), object())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        from_diffusers(OracleUNet("epsilon"), TABLE.flip(0))
    with pytest.raises(TypeError, match="unet"):
        DiffusersNet(3)

    class ContinuousTime:
        alphas_cumprod = TABLE
        config = {"prediction_type": "v_prediction", "timestep_type": "continuous"}

    with pytest.raises(ValueError, match="timestep_type"):
        from_diffusers(OracleUNet("v_prediction"), ContinuousTime())
    with pytest.raises(ValueError, match="convention"):
        from_score_sde(lambda x, t: x, sdegen.VPSDE(), "ncsn")
    with pytest.raises(ValueError, match="time_scale"):
        from_score_sde(lambda x, t: x, sdegen.VPSDE(), time_scale=0.0)
    with pytest.raises(TypeError, match="net"):
        from_denoiser(None, sdegen.EDMSDE())


def test_zero_terminal_snr_table():
    """A table ending at alpha_bar = 0 (rescale_betas_zero_snr) is refused by name; terminal_alpha_bar replaces the
    last entry, and nothing else of the table changes."""
    zsnr = torch.cat([TABLE[:-1].to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        from_diffusers(OracleUNet("epsilon"), zsnr)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):  # diffusers' sigma schedulers' 2^-24 above ab[-2]
        sdegen.DiscreteVPSDE(torch.cat([zsnr[:-1], torch.tensor([float(zsnr[-2]) * 2])]))
    model = from_diffusers(OracleUNet("epsilon"), zsnr, terminal_alpha_bar=2.0**-40)
    assert float(model.sde.alphas_cumprod[-1]) == 2.0**-40
    assert torch.equal(model.sde.alphas_cumprod[:-1], zsnr[:-1])
    torch.testing.assert_close(model.sde.mean_coeff(torch.tensor(1.0, dtype=torch.float64)),
                               torch.tensor(2.0**-20, dtype=torch.float64), rtol=1e-12, atol=0)
    for bad in (0.0, float(zsnr[-2]), True, "small"):
        with pytest.raises(ValueError, match="terminal_alpha_bar"):
            from_diffusers(OracleUNet("epsilon"), zsnr, terminal_alpha_bar=bad)


def test_times_before_the_first_timestep_are_refused():
    """The network never receives a negative timestep, whatever the sde's t_min says."""
    n = len(TABLE)
    with pytest.raises(ValueError, match="t_min"):
        from_diffusers(OracleUNet("epsilon"), TABLE, t_min=1e-4)
    with pytest.raises(ValueError, match="before the table's first timestep"):  # refused before any sampling
        sdegen.ScoreModel(DiffusersNet(OracleUNet("epsilon")), sdegen.DiscreteVPSDE(TABLE, t_min=1e-4),
                          time_input="timestep")
    import numpy as np
    assert from_diffusers(OracleUNet("epsilon"), TABLE, t_min=np.float32(0.002)).sde.t_min == pytest.approx(0.002)
    net = OracleUNet("epsilon")
    model = sdegen.ScoreModel(DiffusersNet(net), sdegen.DiscreteVPSDE(TABLE), time_input="timestep")
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for t in (5e-4, torch.full((2,), 5e-4, dtype=torch.float64)):
        with pytest.raises(ValueError, match="first timestep"):
            model.score(x, t)
    assert not net.seen
    for dtype in (torch.float32, torch.float64):  # timestep 0 itself, at the dtype's rounding of 1/N
        model.score(x.to(dtype), torch.full((2,), 1.0 / n, dtype=dtype))
        assert torch.equal(net.seen[-1].to(torch.float64), torch.zeros(2, dtype=torch.float64))


class _PrecondLike(torch.nn.Module):
    """EDM's EDMPrecond pattern: the skip connection in float32 or better, only the inner network in its dtype."""

    def __init__(self, inner, sigma_data=0.5):
        super().__init__()
        self.inner, self.sigma_data = inner, sigma_data

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype).reshape(-1, 1)
        sd2 = self.sigma_data**2
        c_skip, c_out, c_in = sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(), \
            1 / (sigma**2 + sd2).sqrt()
        dtype = next(self.inner.parameters()).dtype
        return c_skip * x + c_out * self.inner((c_in * x).to(dtype)).to(x.dtype)


class _NoCastWrapper(torch.nn.Module):
    """k-diffusion's pattern: input + c_out * inner(c_in input), no dtype handling of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype).reshape(-1, 1)
        return x - sigma * self.inner(x / (1 + sigma**2).sqrt())


def test_from_denoiser_keeps_the_state_precision_of_a_casting_wrapper():
    torch.manual_seed(0)
    inner = torch.nn.Linear(4, 4).to(torch.bfloat16)
    sde = sdegen.EDMSDE()
    x = 3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.002, 0.05, 1.0, 10.0, 40.0, 80.0])
    wrapper = _PrecondLike(inner)
    for dtype in (torch.float32, torch.float64):
        xd, td = x.to(dtype), t.to(dtype)
        with torch.no_grad():
            got = from_denoiser(wrapper, sde).denoise(xd, td)
            assert got.dtype == dtype
            torch.testing.assert_close(got, wrapper(xd, td), rtol=0, atol=0)  # called in the state's dtype
    # the same wrapper called in bfloat16 (cast_input=True) loses the skip connection's precision at small sigma
    with torch.no_grad():
        cast = from_denoiser(wrapper, sde, cast_input=True).denoise(x, t)
        assert rel_err(cast[:1], wrapper(x, t)[:1]) > 1e-4


def test_from_denoiser_casts_for_a_wrapper_that_fails_on_the_dtype():
    torch.manual_seed(1)
    wrapper = _NoCastWrapper(torch.nn.Linear(4, 4).to(torch.bfloat16))
    sde = sdegen.EDMSDE()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.1, 1.0, 10.0])
    model = from_denoiser(wrapper, sde)
    with torch.no_grad():
        got = model.denoise(x, t)
        expected = wrapper(x.to(torch.bfloat16), t.to(torch.float32)).to(torch.float32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert model.cast_input is True  # remembered: the next call casts from the start
    with pytest.raises(TypeError, match="cast_input=True"):
        from_denoiser(wrapper, sde, cast_input=False).denoise(x, t)
    with pytest.raises(ValueError, match="cast_input"):
        from_denoiser(wrapper, sde, cast_input="yes")


def test_dtype_mismatch_advice_names_the_fix():
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    model = sdegen.ScoreModel(lambda x, t: bf16(x), sdegen.VPSDE())
    with pytest.raises(TypeError, match="nn.Module itself"):
        model.score(torch.randn(2, 4), 0.5)


def test_learned_variance_channels_follow_the_scheduler():
    """Only a scheduler with a learned variance (or, for a bare table, an image-like state) drops the second half
    of a 2C-channel output; elsewhere such an output is the network's mistake and is refused."""

    class Scheduler:
        alphas_cumprod = TABLE

        def __init__(self, variance_type):
            self.config = {"prediction_type": "epsilon", "variance_type": variance_type}

    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = _table_times([3, 250, 900])
    reference = from_diffusers(OracleUNet("epsilon"), TABLE).score(x, t)
    learned = from_diffusers(OracleUNet("epsilon", "learned_variance"), Scheduler("learned_range"))
    torch.testing.assert_close(learned.score(x, t), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        from_diffusers(OracleUNet("epsilon", "learned_variance"), Scheduler("fixed_small")).score(x, t)
    for silent in (None, "absent"):  # DDIM's and Euler's schedulers say nothing (DiT's pipeline): the shape decides
        scheduler = Scheduler(silent)
        if silent == "absent":
            del scheduler.config["variance_type"]
        torch.testing.assert_close(from_diffusers(OracleUNet("epsilon", "learned_variance"), scheduler).score(x, t),
                                   reference, rtol=0, atol=0)
    forced = from_diffusers(OracleUNet("epsilon", "learned_variance"), Scheduler("fixed_small"), learned_variance=True)
    torch.testing.assert_close(forced.score(x, t), reference, rtol=0, atol=0)
    flat = x.reshape(3, 4)  # a flat state: no channels to cut
    with pytest.raises(ValueError, match="shape"):
        from_diffusers(lambda a, k: torch.cat([a, a], 1), TABLE).score(flat, t)
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="learned_variance"):
            DiffusersNet(OracleUNet("epsilon"), learned_variance=bad)


def test_a_pipeline_is_refused_with_its_parts_named():
    class Pipeline:
        unet, scheduler = OracleUNet("epsilon"), object()

        def __call__(self, *args, **kwargs):
            raise AssertionError("a pipeline must not be run")

    with pytest.raises(TypeError, match="pipe.unet"):
        from_diffusers(Pipeline(), TABLE)


def test_labels_reach_class_labels_of_a_cross_attention_network():
    """UNet2DConditionModel's third parameter is encoder_hidden_states: guidance's labels, passed positionally, went
    there (diffusers then said "class_labels should be provided"). A network with that signature, standing in for it."""
    from sdegen.adapters import DiffusersNet

    class CrossAttentionNet(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
            assert encoder_hidden_states is None or encoder_hidden_states.is_floating_point()
            return sample * 0 + class_labels.to(sample.dtype)[:, None]

    net = DiffusersNet(CrossAttentionNet())
    x, labels = torch.zeros(3, 2), torch.tensor([0, 2, 1])
    assert torch.equal(net(x, torch.zeros(3), labels), labels[:, None].float().expand(3, 2))
    hidden = torch.ones(3, 1, 4)  # a float tensor is an embedding and stays where it was put
    assert torch.equal(net(x, torch.zeros(3), hidden, class_labels=labels), labels[:, None].float().expand(3, 2))


def test_adapter_inputs_that_cannot_mean_what_they_say():
    """A 4000-step table's m was 1e-9 off where alpha_bar < 2e-9 (torch's softplus is the identity above 20); the VP
    convention of score_sde under an EDM SDE fed the network 999 t up to 79920; a scheduler passed as timesteps, NaN
    timesteps and a final_timestep the list already ends at gave unrelated errors or none."""
    from sdegen.adapters import diffusers_time_grid, from_score_sde
    betas = torch.linspace(1e-4, 0.02, 4000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sde = sdegen.DiscreteVPSDE(alphas_cumprod)
    k = torch.arange(4000, dtype=torch.float64)
    m = sde.mean_coeff(sde.time_of_timestep(k))
    torch.testing.assert_close(m, alphas_cumprod.sqrt(), rtol=1e-13, atol=0)
    net = lambda x, t: x  # noqa: E731
    for bad in (sdegen.EDMSDE(), sdegen.VESDE(), sde):
        with pytest.raises(ValueError, match="sde: convention='vp'"):
            from_score_sde(net, bad, "vp")
    from_score_sde(net, sdegen.SubVPSDE(), "vp")  # the VP family on [0, 1]

    class Scheduler:
        timesteps = torch.tensor([999, 500, 0])

    with pytest.raises(TypeError, match=r"the scheduler's .timesteps"):
        diffusers_time_grid(sde, Scheduler())
    with pytest.raises(ValueError, match="finite"):
        diffusers_time_grid(sde, [999.0, float("nan")])
    with pytest.raises(ValueError, match="already end there"):
        diffusers_time_grid(sde, torch.tensor([900, 500, 0]), final_timestep=0)
    with pytest.raises(ValueError, match=r"\[500.0, 700.0\] at positions 1 and 2"):
        diffusers_time_grid(sde, torch.tensor([900, 500, 700]))


def test_auto_cast_that_fails_in_both_dtypes_is_named():
    """A denoiser that scales its input by a float32 sigma before a bfloat16 layer (a k-diffusion wrapper around a
    16-bit network) fails in both dtypes: named, with the fix, and cast_input stays 'auto' (it switched to True for
    good although the retry had failed)."""
    from sdegen.adapters import from_denoiser
    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, sigma):
            return self.layer(x * (1.0 / (1.0 + sigma.float()[:, None])))  # c_in in sigma's dtype: float32

    model = from_denoiser(Wrapper(), sdegen.EDMSDE())
    with pytest.raises(TypeError, match="must cast inside"):
        model.denoise(torch.randn(3, 2), torch.full((3,), 1.0))
    assert model.cast_input == "auto"


def test_a_clipping_scheduler_is_said_not_to_clip():
    from sdegen.adapters import from_diffusers

    class Config(dict):
        pass

    class Scheduler:
        alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        config = Config(prediction_type="epsilon", clip_sample=True)

    with pytest.warns(UserWarning, match="clip_sample=True, which sdegen's samplers do not apply"):
        from_diffusers(lambda x, t: x, Scheduler())
    Scheduler.config = Config(prediction_type="epsilon", clip_sample=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_diffusers(lambda x, t: x, Scheduler())
