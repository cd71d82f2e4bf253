"""Linear multistep samplers in sigma ("lms", "deis", "ipndm"): exact weights, the identities between the rules,
their convergence orders against the Gaussian-mixture oracle, and step-for-step equivalence with k-diffusion's
``sample_lms`` and diffusers' DEISMultistepScheduler (each skipped when the package is absent)."""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.samplers import linear_multistep
from sdegen.samplers.linear_multistep import ADAMS_BASHFORTH, DEIS, IPNDM, LMS, lagrange_integrals

from peers import diffusers_run, k_diffusion_sampling

# diffusers 0.42 under numpy 2 warns inside its own set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MIX = GaussianMixture.random(dim=4, n_components=3, seed=0)
# two overlapping anisotropic components (test_registry's): a smooth flow, in the asymptotic regime at 40+ steps
SMOOTH = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
VE_FORM = sdegen.EDMSDE(sigma_min=1e-8, sigma_max=1e8)  # m = 1, s = sigma: the oracle at any noise level


def _rel(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------ the weights
def _gauss_legendre(f, a, b, n=40):
    import numpy as np

    z, w = np.polynomial.legendre.leggauss(n)
    return float(sum(wi * f(0.5 * (a + b) + 0.5 * (b - a) * zi) for zi, wi in zip(z, w)) * 0.5 * (b - a))


@pytest.mark.parametrize("seed", range(4))
def test_lagrange_integrals_are_exact(seed):
    """Against a 40-node Gauss-Legendre quadrature of the Lagrange basis itself (exact for degree <= 79), on
    decreasing noise levels of every scale (steps in sigma as on a Karras grid), for 1-4 nodes: the weights
    integrate every polynomial of degree < k exactly, and they sum to the step."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** float(torch.empty(()).uniform_(-2.0, 2.0, generator=g))
    sig = (scale * torch.rand(5, generator=g, dtype=torch.float64).add_(0.05).cumsum(0)).flip(0).tolist()
    for k in range(1, 5):
        nodes = sig[:k][::-1]  # the newest (smallest) noise level first
        a, b = nodes[0], nodes[0] - 0.7 * (sig[0] - sig[1])
        weights = lagrange_integrals(nodes, a, b)

        def basis(j, r):
            return math.prod((r - nodes[i]) / (nodes[j] - nodes[i]) for i in range(k) if i != j)

        for j in range(k):
            quad = _gauss_legendre(lambda r: basis(j, r), a, b)
            assert abs(weights[j] - quad) <= 1e-12 * max(abs(quad), abs(b - a)), (k, j, weights[j], quad)
        assert abs(sum(weights) - (b - a)) <= 1e-13 * abs(b - a)


def test_uniform_steps_give_the_adams_bashforth_coefficients():
    """Equal steps: the Lagrange integrals are the classical coefficients iPNDM uses (step 1, nodes 0, -1, ...)."""
    for k, coeffs in enumerate(ADAMS_BASHFORTH, start=1):
        weights = lagrange_integrals([0.0, -1.0, -2.0, -3.0][:k], 0.0, 1.0)
        assert weights == pytest.approx(coeffs, rel=1e-14, abs=1e-14)
        scaled = lagrange_integrals([5.0 - 0.25 * i for i in range(k)], 5.0, 5.25)  # any origin and scale
        assert scaled == pytest.approx([0.25 * c for c in coeffs], rel=1e-13, abs=1e-14)


@pytest.mark.parametrize("sde_name", ["vp", "ve", "cosine"])
def test_tab_quadrature_is_converged(sde_name, monkeypatch):
    """tAB-DEIS's weights with 64 Gauss-Legendre nodes per step agree with 256 nodes to 1e-12 of the step, on the
    default grid at 3-200 steps (the coarsest steps span the most log-SNR)."""
    sde = {"vp": sdegen.VPSDE(), "ve": sdegen.VESDE(), "cosine": sdegen.CosineVPSDE()}[sde_name]
    for steps in (3, 12, 200):
        ts = sdegen.time_grid(sde, steps, "edm")
        ctx = sdegen.samplers.Context(sde, SMOOTH, None)
        sdegen.samplers.base.cache_grid(ctx, ts)
        times = ts.tolist()
        coarse = DEIS(3).weights(ctx, times)
        monkeypatch.setattr(linear_multistep, "QUADRATURE_NODES", 256)
        fine = DEIS(3).weights(ctx, times)
        monkeypatch.undo()
        sig = DEIS.sigmas(ctx, times)
        for i, (a, b) in enumerate(zip(coarse, fine)):
            h = abs(sig[i + 1] - sig[i])
            assert max(abs(u - v) for u, v in zip(a, b)) <= 1e-12 * h, (steps, i, a, b)


# ------------------------------------------------------------------ identities between the rules
def _run(method, sde=None, grid="edm", steps=9, model=SMOOTH, x_T=None):
    sde = sde or sdegen.VPSDE()
    x_T = sde.prior_sample((16, 2), seed=4, dtype=torch.float64) if x_T is None else x_T
    ts = sdegen.time_grid(sde, steps, grid) if isinstance(grid, str) else grid
    return sdegen.sample(sde, model, x_T, method=method, schedule=ts)


def test_order_one_is_euler_in_sigma():
    """Every rule of order 1 is Euler in sigma on y = x/m, which is DDIM (eta = 0) and euler_ancestral with eta = 0."""
    reference = _run("ddim")
    torch.testing.assert_close(_run(sdegen.get_sampler("euler_ancestral", eta=0.0)), reference, rtol=1e-12,
                               atol=1e-12)
    for sampler in (LMS(1), IPNDM(1), DEIS(1, "tab"), DEIS(1, "rhoab"), DEIS(1, "logrho")):
        torch.testing.assert_close(_run(sampler), reference, rtol=1e-12, atol=1e-12, msg=repr(sampler))


@pytest.mark.parametrize("order", [2, 3])
def test_deis_variants_and_lms(order):
    """rhoAB-DEIS is LMS; tAB-DEIS is too under EDM's SDE, where t = sigma, and is the log-rho rule under VE with
    s = sigma_min r^t, where t is affine in log sigma (the Lagrange basis is invariant under affine maps; equal to
    the quadrature's round-off). Under VP, where t is neither, the three are distinct methods."""
    lms = _run(LMS(order))
    torch.testing.assert_close(_run(DEIS(order, "rhoab")), lms, rtol=1e-12, atol=1e-12)
    assert _rel(_run(DEIS(order, "tab")), lms) > 1e-4
    assert _rel(_run(DEIS(order, "logrho")), lms) > 1e-4
    edm = sdegen.EDMSDE()
    x_T = edm.prior_sample((16, 2), seed=4, dtype=torch.float64)
    torch.testing.assert_close(_run(DEIS(order, "tab"), edm, x_T=x_T), _run(LMS(order), edm, x_T=x_T),
                               rtol=1e-10, atol=1e-10)
    ve = sdegen.VESDE(kernel="paper")
    x_T = ve.prior_sample((16, 2), seed=4, dtype=torch.float64)
    torch.testing.assert_close(_run(DEIS(order, "tab"), ve, x_T=x_T), _run(DEIS(order, "logrho"), ve, x_T=x_T),
                               rtol=1e-10, atol=1e-10)
    assert _rel(_run(DEIS(order, "tab"), ve, x_T=x_T), _run(LMS(order), ve, x_T=x_T)) > 1e-4


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_is_lms_on_uniform_sigma_steps_only(order):
    """Equal steps in sigma (EDM's SDE, uniform grid in t = sigma): the fixed coefficients are the Lagrange
    integrals, so iPNDM equals LMS; on Karras' grid they differ."""
    edm = sdegen.EDMSDE()
    x_T = edm.prior_sample((16, 2), seed=4, dtype=torch.float64)
    torch.testing.assert_close(_run(IPNDM(order), edm, "uniform", x_T=x_T), _run(LMS(order), edm, "uniform", x_T=x_T),
                               rtol=1e-12, atol=1e-12)
    assert _rel(_run(IPNDM(order), edm, x_T=x_T), _run(LMS(order), edm, x_T=x_T)) > 1e-5


# ------------------------------------------------------------------ convergence orders
_REFERENCE = {}


def _start_and_reference(sde_name):
    """x_T and the float64 probability-flow endpoint (torchdiffeq, rtol = atol = 1e-11), once per SDE."""
    if sde_name not in _REFERENCE:
        sde = {"vp": sdegen.VPSDE(), "ve": sdegen.VESDE()}[sde_name]
        x_T = sde.prior_sample((16, 2), seed=3, dtype=torch.float64)
        _REFERENCE[sde_name] = sde, x_T, sdegen.sample(sde, SMOOTH, x_T, method="ode", rtol=1e-11, atol=1e-11)
    return _REFERENCE[sde_name]


def _slope(sde_name, sampler, steps_list, grid="edm"):
    """Least-squares slope of log RMS endpoint error against log steps, negated (float64, 16 points)."""
    sde, x_T, ref = _start_and_reference(sde_name)
    logs, errs = [], []
    for steps in steps_list:
        x, info = sdegen.sample(sde, SMOOTH, x_T, method=sampler, steps=steps, schedule=grid, return_info=True)
        assert info.nfe == steps
        logs.append(math.log(steps))
        errs.append(math.log(float((x - ref).pow(2).sum(1).mean().sqrt())))
    n, e = torch.tensor(logs, dtype=torch.float64), torch.tensor(errs, dtype=torch.float64)
    return float(-((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())


@pytest.mark.parametrize("sampler,order", [
    (LMS(2), 2), (LMS(3), 3), (LMS(4), 4), (DEIS(2), 2), (DEIS(3), 3), (DEIS(3, "logrho"), 3),
    (IPNDM(2), 2), (IPNDM(4), 2),
], ids=repr)
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_convergence_order(sde_name, sampler, order):
    """The fitted order at 80-320 steps of Karras' grid is within 0.3 of the rule's; iPNDM's fixed coefficients
    have order 2 on this non-uniform grid whatever their nominal order (see :class:`IPNDM`)."""
    slope = _slope(sde_name, sampler, (80, 160, 320))
    assert sampler.order == order
    assert abs(slope - order) <= 0.3, f"{sampler!r} on {sde_name}: slope {slope:.2f}, order {order}"


# ------------------------------------------------------------------ against k-diffusion
@pytest.fixture(scope="module")
def k_sampling():
    return k_diffusion_sampling()


def _sigma_denoiser(y, sigma):
    """The mixture's exact denoiser in k-diffusion's convention: y = x/m at noise level sigma (any SDE)."""
    return y + sigma.reshape(-1, 1) ** 2 * MIX.score(VE_FORM, y, sigma)


@pytest.mark.parametrize("sde_name", ["edm", "vp"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_matches_k_diffusion(k_sampling, sde_name, order):
    """sample_lms on the noise levels sigma(t_i) of sdegen's grid (no final zero) from y_0 = x_T / m_0, against
    "lms" on the same grid: equal to 1e-10 of the largest entry (k-diffusion's quad is exact for these polynomials
    up to its 21-point rule's round-off), under EDM's SDE and under VP, where sdegen steps x = m y."""
    sde = {"edm": sdegen.EDMSDE(), "vp": sdegen.VPSDE()}[sde_name]
    for steps in (5, 13):
        ts = sdegen.time_grid(sde, steps, "edm")
        x_T = sde.prior_sample((16, 4), seed=steps, dtype=torch.float64)
        m = sde.mean_coeff(ts)
        reference = k_sampling.sample_lms(_sigma_denoiser, x_T / m[0], sde.sigma(ts), disable=True, order=order)
        x, info = sdegen.sample(sde, MIX, x_T, method="lms", order=order, schedule=ts, return_info=True)
        assert info.nfe == steps
        assert _rel(x / m[-1], reference) < 1e-10, (steps, _rel(x / m[-1], reference))


# ------------------------------------------------------------------ against diffusers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("order,steps", [(1, 6), (2, 6), (3, 8), (3, 20)])
def test_deis_logrho_matches_diffusers(spacing, order, steps):
    """DEISMultistepScheduler (solver_type "logrho", lower_order_final) and "deis" with variant="logrho" and
    lower_order_final=True on the same timesteps (timestep 0 appended: diffusers' last step goes there) with the
    exact eps of a 4-D mixture as the network: equal to 1e-6 of the largest entry, the same network calls.
    diffusers evaluates its closed-form weights (``ind_fn``) in the dtype of its sigmas, float32, where the
    differences of antiderivatives cancel (up to 4e-5 at 20 steps); its sigmas are cast to float64 here, which
    leaves the float32 rounding of its sigma table (below 1e-6). tAB-DEIS is another method."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DEISMultistepScheduler(solver_order=order, lower_order_final=True, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x, model, grid = diffusers_run(sched, MIX, VE_FORM, x_T)
    with torch.no_grad():
        ours, info = sdegen.sample(model.sde, model, x_T, method="deis", order=order, variant="logrho",
                                   lower_order_final=True, schedule=grid, return_info=True)
        tab = sdegen.sample(model.sde, model, x_T, method="deis", order=order, variant="tab", lower_order_final=True,
                            schedule=grid)
        default = sdegen.sample(model.sde, model, x_T, method="deis", order=order, lower_order_final=True,
                                schedule=grid)
    torch.testing.assert_close(default, ours, rtol=0, atol=0)  # "logrho" is the default variant
    assert info.nfe == len(sched.timesteps)
    assert _rel(ours, x) < 1e-6
    if order > 1:
        assert _rel(tab, x) > 1e-4


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("method,opts,err", [
    ("lms", {"order": 0}, ValueError), ("lms", {"order": 5}, ValueError), ("lms", {"order": True}, TypeError),
    ("lms", {"order": 2.0}, TypeError), ("ipndm", {"order": 5}, ValueError), ("deis", {"order": 4}, ValueError),
    ("deis", {"variant": "rho"}, ValueError), ("deis", {"lower_order_final": "yes"}, TypeError),
    ("deis", {"eta": 1.0}, (TypeError, ValueError)),
])
def test_bad_options(method, opts, err):
    with pytest.raises(err, match=next(iter(opts))):
        sdegen.get_sampler(method, **opts)


def test_bad_nodes_and_off_grid_steps():
    with pytest.raises(ValueError, match="distinct"):
        lagrange_integrals([1.0, 1.0], 1.0, 0.5)
    with pytest.raises(ValueError, match="nodes"):
        lagrange_integrals([], 1.0, 0.5)
    sde = sdegen.VPSDE()
    ctx = sdegen.samplers.Context(sde, SMOOTH, None)
    x = torch.zeros(2, 2)
    sampler = LMS()
    state = sampler.start(ctx, x, sdegen.time_grid(sde, 4, "edm"))
    with pytest.raises(ValueError, match="grid"):
        sampler.step(ctx, x, torch.tensor(0.77, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), state)


def test_defaults_and_repr():
    for name, cls, order in (("lms", LMS, 4), ("deis", DEIS, 3), ("ipndm", IPNDM, 2)):
        sampler = sdegen.get_sampler(name)
        assert type(sampler) is cls and sampler.order == order and sampler.default_schedule == "edm"
        assert sampler.nfe_per_step == 1 and not sampler.stochastic
        assert repr(sampler).startswith(cls.__name__ + "(")


def test_default_deis_keeps_float32_round_off_on_a_ddpm_cosine_table():
    """On a DDPM cosine table (sigma(T) = 2e4) tAB's Lagrange weights in t reach thousands with alternating signs:
    float32 and float64 runs from the same x_T differed by up to 2.0 at 10 steps. The default (log sigma) stays
    within float32 round-off of float64 (relative to the samples' scale)."""
    t = torch.arange(1001, dtype=torch.float64) / 1000  # the squaredcos_cap_v2 betas of DDPM schedulers
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    sde = sdegen.DiscreteVPSDE.from_betas(betas)
    ring = sdegen.GaussianMixture.ring()
    x_T = sde.prior_sample((64, 2), seed=0, dtype=torch.float64)
    with torch.no_grad():
        a = sdegen.sample(sde, ring, x_T, method="deis", steps=10)
        b = sdegen.sample(sde, ring, x_T.float(), method="deis", steps=10)
    assert float((a - b.double()).abs().max()) < 1e-3
