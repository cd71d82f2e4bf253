"""A test matrix over every entry of the sampler registry ``sdegen.SAMPLERS``: shapes, dtypes and devices, batch
invariance of the stochastic samplers, the declared order against the observed one, and the declared NFE.

The matrix is built from the registry itself, so a sampler registered with one line is checked with no edit here.
"""

import math
import warnings

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.samplers import SAMPLERS as REGISTRY, Euler, Heun, Solver, StepSampler, get_sampler

# entries that cannot run from their defaults alone, with the reason
NEEDS_ARGUMENTS = {
    "inpaint": "needs the known values and the mask of an inpainting problem (tested in test_guidance.py)",
}
NAMES = sorted(name for name in sdegen.SAMPLERS if name not in NEEDS_ARGUMENTS)
SAMPLERS = {name: sdegen.get_sampler(name) for name in NAMES}
STEP = [name for name in NAMES if isinstance(SAMPLERS[name], StepSampler)]
SOLVERS = [name for name in NAMES if isinstance(SAMPLERS[name], Solver)]
STOCHASTIC = [name for name in NAMES if SAMPLERS[name].stochastic]
# fixed-step deterministic samplers: their error against the exact flow has a convergence order in the step count
DETERMINISTIC_STEP = [name for name in STEP if not SAMPLERS[name].stochastic]

SDE = sdegen.VPSDE()
# two overlapping anisotropic components: a non-Gaussian p_0 whose flow is smooth, so that 40-160 steps are in
# every sampler's asymptotic regime (a single Gaussian is degenerate for the third-order multistep rule: with
# equal steps in log-SNR its leading error term integrates to zero and the observed order is 4)
MIXTURE = GaussianMixture([0.6, 0.4], [[0.6, -0.2], [-0.5, 0.4]], [[0.15, 0.08], [0.1, 0.2]])
ORDER_STEPS = (40, 80, 160)
# a fourth-order rule is not yet asymptotic at 40 steps (LMS(4) on the "edm" grid: fitted slope 3.64 at 40-160
# steps, 3.82 at 80-320, 3.91 at 160-640): fitted one octave further
HIGH_ORDER_STEPS = (80, 160, 320)
_REFERENCE = {}


def _steps_for(sampler, steps):
    """``steps`` for fixed-step samplers and solvers with a step count; None for solvers that choose their own."""
    if isinstance(sampler, StepSampler) or getattr(sampler, "default_steps", None) is not None:
        return steps
    return None


def _mixture_for(shape):
    """A two-component mixture with one value per element of a (B, ...) state of ``shape``."""
    d = math.prod(shape[1:])
    g = torch.Generator().manual_seed(d)
    return GaussianMixture([0.5, 0.5], torch.randn(2, d, generator=g, dtype=torch.float64), [0.2, 0.3])


def test_registry_entries_are_samplers_declaring_their_properties():
    assert set(NEEDS_ARGUMENTS) <= set(sdegen.SAMPLERS), "a skipped entry is no longer registered"
    assert "euler_ancestral" in STEP
    for name in NAMES:
        sampler = SAMPLERS[name]
        assert isinstance(sampler, (StepSampler, Solver)), name
        assert isinstance(sampler.stochastic, bool), name
        if isinstance(sampler, StepSampler):
            for attr in ("order", "nfe_per_step", "default_steps"):
                value = getattr(sampler, attr)
                assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, attr, value)
            assert isinstance(sampler.total_nfe(7), int), name


@pytest.mark.parametrize("shape", [(3,), (3, 2), (2, 2, 3, 2)], ids=["B", "BD", "BCHW"])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device_kept_and_input_untouched(name, shape, dtype, device):
    mixture = _mixture_for(shape)
    x_T = SDE.prior_sample(shape, seed=0, dtype=dtype, device=device)
    before = x_T.clone()
    x = sdegen.sample(SDE, mixture, x_T, method=name, steps=_steps_for(SAMPLERS[name], 4), seed=1)
    assert x.shape == x_T.shape and x.dtype == dtype and x.device == x_T.device, name
    assert bool(torch.isfinite(x).all()), name
    assert torch.equal(x_T, before), f"{name} modified x_T"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sample_depends_only_on_its_own_seed(name):
    """Example i of a batch of 5 equals the example with the same seed drawn in a batch of 2."""
    seeds = torch.tensor([101, 102, 103, 104, 105])
    steps = _steps_for(SAMPLERS[name], 6)
    five = sdegen.sample(SDE, MIXTURE, shape=(5, 2), method=name, steps=steps, seed=seeds, dtype=torch.float64)
    two = sdegen.sample(SDE, MIXTURE, shape=(2, 2), method=name, steps=steps, seed=seeds[[1, 3]], dtype=torch.float64)
    torch.testing.assert_close(two, five[[1, 3]], rtol=1e-12, atol=1e-12)
    other = sdegen.sample(SDE, MIXTURE, shape=(2, 2), method=name, steps=steps, seed=seeds[[0, 2]],
                          dtype=torch.float64)
    assert float((other - two).abs().min()) > 0, f"{name} ignores the seed"


def _start_and_reference():
    """x_T from the prior and the float64 probability-flow endpoint at t_min (torchdiffeq, rtol = atol = 1e-11)."""
    if not _REFERENCE:
        x_T = SDE.prior_sample((8, 2), seed=3, dtype=torch.float64)
        _REFERENCE["x_T"] = x_T
        _REFERENCE["ref"] = sdegen.sample(SDE, MIXTURE, x_T, method="ode", rtol=1e-11, atol=1e-11)
    return _REFERENCE["x_T"], _REFERENCE["ref"]


@pytest.mark.parametrize("name", DETERMINISTIC_STEP)
def test_declared_order_is_the_observed_order(name):
    """Least-squares slope of log RMS endpoint error against log steps (40, 80, 160 steps, each sampler's default
    grid; 80, 160, 320 from order 4) equals the declared order within 0.3 (diffrax's tolerance)."""
    sampler = SAMPLERS[name]
    x_T, ref = _start_and_reference()
    log_n, log_err = [], []
    for steps in (HIGH_ORDER_STEPS if sampler.order >= 4 else ORDER_STEPS):
        x = sdegen.sample(SDE, MIXTURE, x_T, method=sampler, steps=steps)
        log_n.append(math.log(steps))
        log_err.append(math.log(float((x - ref).pow(2).sum(1).mean().sqrt())))
    n, e = torch.tensor(log_n), torch.tensor(log_err)
    slope = -float(((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())
    errors = [f"{math.exp(v):.2e}" for v in log_err]
    assert abs(slope - sampler.order) <= 0.3, f"{name}: observed order {slope:.2f}, declared {sampler.order}, " \
                                              f"errors {errors}"


@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoise"])
@pytest.mark.parametrize("name", STEP)
def test_step_sampler_nfe_is_as_declared(name, denoise):
    sampler = SAMPLERS[name]
    for steps in (1, 5):
        _, info = sdegen.sample(SDE, MIXTURE, shape=(3, 2), method=sampler, steps=steps, seed=0, denoise=denoise,
                                return_info=True)
        assert info.nfe == sampler.total_nfe(steps) + int(denoise), (name, steps, info.nfe)
        assert info.steps == steps and len(info.times) == steps + 1


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_runs_and_counts_nfe(name):
    x_T = SDE.prior_sample((3, 2), seed=2, dtype=torch.float64)
    x, info = sdegen.sample(SDE, MIXTURE, x_T, method=name, steps=_steps_for(SAMPLERS[name], 20), seed=4,
                            return_info=True)
    assert info.nfe > 0 and x.shape == x_T.shape and bool(torch.isfinite(x).all()), (name, info.nfe)


def test_euler_ancestral_limits_are_ancestral_sampling_and_ddim():
    """eta = 1: the DDPM posterior step, identical to "ancestral" and to DDIM with eta = 1 on the same noise;
    eta = 0: Euler in sigma on y = x/m, which is DDIM with eta = 0 (Karras et al. 2022, section 4)."""
    x_T = SDE.prior_sample((6, 2), seed=5, dtype=torch.float64)
    run = lambda method, **kw: sdegen.sample(SDE, MIXTURE, x_T, method=method, steps=12, seed=9,  # noqa: E731
                                             schedule="uniform", **kw)
    ancestral = run("euler_ancestral")
    torch.testing.assert_close(ancestral, run("ancestral"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ancestral, run("ddim", eta=1.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("euler_ancestral", eta=0.0), run("ddim"), rtol=1e-12, atol=1e-12)
    # s_noise scales the fresh noise of a step and nothing else
    one = lambda s_noise: sdegen.sample(SDE, MIXTURE, x_T, method="euler_ancestral", s_noise=s_noise,  # noqa: E731
                                        steps=1, seed=9)
    torch.testing.assert_close(one(0.5) - one(0.0), 0.5 * (one(1.0) - one(0.0)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(eta=-0.1), dict(eta=math.inf), dict(s_noise=-1.0), dict(eta="1")])
def test_euler_ancestral_bad_options(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        sdegen.get_sampler("euler_ancestral", **kw)


@pytest.mark.parametrize("method,grid", [("reverse_diffusion", "uniform"), ("euler_maruyama", "log_snr"),
                                         ("ancestral", "log_snr")])
def test_sde_view_samplers_run_on_their_declared_default_grid(method, grid):
    """Without a schedule, a sampler runs on its declared default grid (the paper's uniform grid for the reverse-
    diffusion predictor, log-SNR for Euler-Maruyama and ancestral sampling): the run equals the run with that
    schedule given, sample for sample, and differs from the other grid's."""
    sde, ring = sdegen.EDMSDE(), GaussianMixture.ring()
    other = {"uniform": "log_snr", "log_snr": "uniform"}[grid]
    default = sdegen.sample(sde, ring, shape=(8, 2), method=method, steps=12, seed=4)
    same = sdegen.sample(sde, ring, shape=(8, 2), method=method, steps=12, seed=4, schedule=grid)
    different = sdegen.sample(sde, ring, shape=(8, 2), method=method, steps=12, seed=4, schedule=other)
    assert torch.equal(default, same)
    assert not torch.allclose(default, different)


# ----------------------------------------------------------------- extending the library: the contract is enforced
def _ring():
    return sdegen.GaussianMixture.ring()


def test_a_model_view_of_the_wrong_shape_is_refused_before_tweedies_formula_broadcasts_it():
    """A score-only model returning (B, 1) for a (B, 2) state: the default denoise broadcast it and ddim ran to
    samples of order 1e2 without an error. Either view now names the model and the shapes."""
    sde = sdegen.VPSDE()

    class BadScore(sdegen.Model):
        def score(self, x, t):
            return -x[:, :1]

    class BadDenoise(sdegen.Model):
        def denoise(self, x, t):
            return x[:, :1]

    for model, method in ((BadScore(sde), "ddim"), (BadScore(sde), "dpmpp_2m"), (BadDenoise(sde), "euler_maruyama"),
                          (BadDenoise(sde), "ode")):
        with pytest.raises(ValueError, match=r"must return x's shape \(4, 2\); got \(4, 1\)"):
            sdegen.sample(sde, model, shape=(4, 2), method=method, seed=0)

    class Empty(sdegen.Model):
        pass

    with pytest.raises(TypeError, match="Empty must implement score"):
        Empty(sde)


def test_the_callers_x_T_is_never_modified_even_by_an_in_place_sampler():
    class Damp(StepSampler):
        def step(self, ctx, x, t, t_next, state):
            ctx.score(x, t)
            return x.mul_(0.9), state

    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    keep = x_T.clone()
    out = sdegen.sample(sdegen.VPSDE(), _ring(), x_T, method=Damp(), steps=3)
    assert torch.equal(x_T, keep)
    torch.testing.assert_close(out, keep * 0.9**3, rtol=1e-6, atol=0)


def test_built_in_names_are_not_replaced_without_saying_so():
    """A built-in name replaced without replace=True warns (an error in the next release); a name of the caller's own
    may be registered again, as a re-run notebook cell does."""
    original = REGISTRY["dpmpp_2m"]
    try:
        with pytest.warns(FutureWarning, match="'dpmpp_2m' is a built-in sampler"):
            sdegen.register_sampler("dpmpp_2m", Euler)
        assert isinstance(get_sampler("dpmpp_2m"), Euler)
    finally:
        REGISTRY["dpmpp_2m"] = original
    name = "test_registry_twice"
    sdegen.register_sampler(name, Euler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sdegen.register_sampler(name, Euler)
            sdegen.register_sampler(name, Heun)
            sdegen.register_sampler("dpmpp_2m", original)  # a built-in's own factory: nothing changes
        assert isinstance(get_sampler(name), Heun)
    finally:
        del REGISTRY[name]


def test_library_defaults_do_not_follow_a_replaced_built_in():
    """The sensitivity schedule's pilot is built-in DPM-Solver++(2M) even after dpmpp_2m is replaced on purpose."""
    sde, ring = sdegen.VPSDE(), _ring()
    reference = sdegen.sample(sde, ring, shape=(8, 2), method="ancestral", steps=6, schedule="sensitivity", seed=0)
    used = []

    class Spy(StepSampler):
        def step(self, ctx, x, t, t_next, state):
            used.append(1)
            return x, state

    original = REGISTRY["dpmpp_2m"]
    sdegen.register_sampler("dpmpp_2m", Spy, replace=True)
    try:
        again = sdegen.sample(sde, ring, shape=(8, 2), method="ancestral", steps=6, schedule="sensitivity", seed=0)
    finally:
        REGISTRY["dpmpp_2m"] = original
    assert not used and torch.equal(reference, again)


@pytest.mark.parametrize("attr, value", [("order", 0), ("order", "2"), ("order", -0.5), ("nfe_per_step", -2),
                                         ("stochastic", "yes"), ("default_steps", 0), ("default_steps", 2.5)])
def test_a_samplers_declarations_are_checked(attr, value):
    cls = type("Declared", (Euler,), {attr: value})
    with pytest.raises(ValueError, match=f"declares {attr}="):
        sdegen.sample(sdegen.VPSDE(), _ring(), shape=(4, 2), method=cls(), steps=3, seed=0)
    name = f"test_declared_{attr}"
    sdegen.register_sampler(name, cls)
    try:
        with pytest.raises(ValueError, match=f"method '{name}' declares {attr}="):
            get_sampler(name)
    finally:
        del REGISTRY[name]
    sdegen.register_sampler("test_factory_garbage", lambda: 42)
    try:
        with pytest.raises(TypeError, match="returned a int; it must return a StepSampler or Solver"):
            get_sampler("test_factory_garbage")
    finally:
        del REGISTRY["test_factory_garbage"]


def test_what_a_user_sampler_returns_is_checked():
    sde, ring = sdegen.VPSDE(), _ring()

    class ToF64(StepSampler):
        def step(self, ctx, x, t, t_next, state):
            return x.double(), state

    class NoTuple(StepSampler):
        def step(self, ctx, x, t, t_next, state):
            return x

    class Narrow(Solver):
        def solve(self, ctx, x, ts, steps):
            return torch.stack([x, x]), x[:, :1], 0

    with pytest.raises(ValueError, match=r"ToF64 returned a state of \(4, 2\) torch.float64 .* from its step 0"):
        sdegen.sample(sde, ring, shape=(4, 2), method=ToF64(), steps=3, seed=0)
    with pytest.raises(TypeError, match=r"NoTuple.step must return \(x_next, state\)"):
        sdegen.sample(sde, ring, shape=(4, 2), method=NoTuple(), steps=3, seed=0)
    with pytest.raises(ValueError, match=r"Narrow returned a state of \(4, 1\)"):
        sdegen.sample(sde, ring, shape=(4, 2), method=Narrow(), seed=0)


def test_a_step_may_ask_at_a_python_float_time():
    class FloatTime(StepSampler):
        def step(self, ctx, x, t, t_next, state):
            mid = 0.5 * (float(t) + float(t_next))
            return x + (float(t_next) - float(t)) * ctx.score(x, mid), state

    x = sdegen.sample(sdegen.VPSDE(), _ring(), shape=(4, 2), method=FloatTime(), steps=3, seed=0)
    assert x.shape == (4, 2) and bool(torch.isfinite(x).all())


def test_a_model_for_another_instance_of_a_parameterised_user_sde_is_refused():
    """A user SDE whose config() records nothing: its instances are told apart by their kernels."""

    class CoshA(sdegen.SDE):
        t_min = 1e-3

        def __init__(self, a=1.0):
            self.a, self.T = a, 4.0

        def log_mean_coeff(self, t):
            return -torch.log(torch.cosh(self.a * t))

        def std(self, t):
            return torch.tanh(self.a * t)

    model = sdegen.ScoreModel(lambda x, t: -x, CoshA(1.0), prediction="score")
    with pytest.raises(ValueError, match="built for"):
        sdegen.sample(CoshA(2.0), model, shape=(4, 2), method="dpmpp_2m", steps=3, seed=0)
    sdegen.sample(CoshA(1.0), model, shape=(4, 2), method="dpmpp_2m", steps=3, seed=0)  # an equal instance


def test_conversion_helpers_check_what_the_model_layer_checks():
    from sdegen.models import output_to_score, output_to_x0, score_to_x0
    sde = sdegen.VPSDE()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    for prediction in ("eps", "x0", "v"):
        with pytest.raises(ValueError, match="s\\(t\\) > 0"):
            output_to_score(sde, prediction, out, x, 0.0)
    with pytest.raises(ValueError, match="x's shape"):
        score_to_x0(sde, out[:, :1], x, 0.3)
    assert output_to_score(sde, "eps", out.float(), x, 0.3).dtype == torch.float64
    torch.testing.assert_close(output_to_x0(sde, "x0", out, x, 0.0), out)  # D = x0 needs no s(t)


def test_long_first_step_grids_warn_for_samplers_they_are_not_laid_out_for():
    """Euler in t with the pilot grid on VE stayed wrong as steps grew (RMS 1.3-4 where the uniform grid gives
    0.02); exponential integrators take that first step in their stride."""
    sde, ring = sdegen.VESDE(kernel="paper"), _ring()
    with pytest.warns(UserWarning, match="laid out for exponential integrators"):
        sdegen.sample(sde, ring, shape=(4, 2), method="euler", steps=4, schedule="few_step", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdegen.sample(sde, ring, shape=(4, 2), method="unipc", steps=4, schedule="few_step", seed=0)
        sdegen.sample(sde, ring, shape=(4, 2), method="ancestral", steps=4, schedule="few_step", seed=0)
