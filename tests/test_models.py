"""The model layer (sdegen.models): every parameterisation converts exactly to the oracle's score and denoiser,
the network's inputs (scaled state, time input), the SDE and shape checks, and mixed precision (16-bit networks
under float32 / float64 states)."""

import copy
import math

import pytest
import torch

import sdegen
from sdegen.guidance import classifier_log_prob_grad

SDES = {"vp": sdegen.VPSDE(), "ve": sdegen.VESDE(), "edm": sdegen.EDMSDE(), "flow": sdegen.FlowSDE()}
# (prediction, EDM preconditioning)
KINDS = [("score", None), ("eps", None), ("x0", None), ("v", None), ("flow", None),
         ("edm", "edm"), ("edm", "vp"), ("edm", "ve")]
SIGMA_DATA, M_VP = 0.5, 1000


def seeded(build, seed):
    """build() under torch's global RNG seeded with ``seed`` (network initialisers draw from it), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def edm_table(preconditioning, sigma, t):
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, table 1 (VP: c_noise = (M - 1) t in the SDE's time)."""
    one = torch.ones_like(sigma)
    if preconditioning == "edm":
        root = torch.sqrt(sigma**2 + SIGMA_DATA**2)
        return SIGMA_DATA**2 / root**2, sigma * SIGMA_DATA / root, 1 / root, torch.log(sigma) / 4
    if preconditioning == "vp":
        return one, -sigma, 1 / torch.sqrt(sigma**2 + 1), (M_VP - 1) * t
    return one, sigma, one, torch.log(sigma / 2)


def derivative(fn, t):
    """d fn / dt at every entry of t by autograd (independent of the SDEs' closed-form derivatives)."""
    tt = t.detach().clone().requires_grad_(True)
    value = fn(tt)
    if not value.requires_grad:  # a constant (m = 1 of VE and EDM)
        return torch.zeros_like(t)
    (grad,) = torch.autograd.grad(value.sum(), tt)
    return grad


class OracleNet:
    """net(x_net, time_input) returning exactly what a network of kind ``prediction`` is trained to output for the
    mixture ``gm`` under ``sde``: E[target | x_t = x] for target = score, eps, x0, v = m eps - s x0,
    the kernel velocity m' x0 + s' eps, or EDM's F = (x0 - c_skip x/m) / c_out. It recovers t and x from its
    inputs (c_noise and c_in x/m for "edm", x/m when the input is scaled), so the test covers those as well."""

    def __init__(self, gm, sde, prediction, preconditioning=None, scale_input=False):
        self.gm, self.sde, self.prediction = gm, sde, prediction
        self.preconditioning, self.scale_input = preconditioning, scale_input

    def time_and_state(self, x_net, time_in):
        sde = self.sde
        if self.prediction != "edm":
            t = time_in
            return t, x_net * sde.mean_coeff(t)[:, None] if self.scale_input else x_net
        if self.preconditioning == "vp":
            t = time_in / (M_VP - 1)
        else:
            t = sde.t_from_sigma(torch.exp(4 * time_in) if self.preconditioning == "edm" else 2 * torch.exp(time_in))
        c_in = edm_table(self.preconditioning, sde.sigma(t), t)[2]
        return t, x_net / c_in[:, None] * sde.mean_coeff(t)[:, None]

    def __call__(self, x_net, time_in):
        t, x = self.time_and_state(x_net, time_in)
        sde = self.sde
        m, s = sde.mean_coeff(t)[:, None], sde.std(t)[:, None]
        score = self.gm.score(sde, x, t)
        eps, x0 = -s * score, (x + s**2 * score) / m
        if self.prediction == "score":
            return score
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            return m * eps - s * x0
        if self.prediction == "flow":
            return derivative(sde.mean_coeff, t)[:, None] * x0 + derivative(sde.std, t)[:, None] * eps
        c_skip, c_out, _, _ = edm_table(self.preconditioning, sde.sigma(t), t)
        return (x0 - c_skip[:, None] * x / m) / c_out[:, None]


def noisy_points(gm, sde, n, seed):
    """x_t = m x0 + s z at times spread over [t_min, T] (ends excluded), float64."""
    gen = torch.Generator().manual_seed(seed)
    u = 0.02 + 0.96 * torch.rand(n, dtype=torch.float64, generator=gen)
    t = sde.t_min + (sde.T - sde.t_min) * u
    z = torch.randn(n, gm.dim, dtype=torch.float64, generator=gen)
    x = sde.mean_coeff(t)[:, None] * gm.sample(n, seed=gen) + sde.std(t)[:, None] * z
    return x, t


@pytest.mark.parametrize("sde_name", list(SDES))
def test_every_parameterisation_converts_exactly_to_the_oracle_score_and_denoiser(sde_name):
    """score, eps, x0, v, flow and EDM's F (preconditionings edm, vp, ve), with and without scaled inputs: the
    ScoreModel of the exact network gives the mixture's exact score, the denoiser (x + s^2 score) / m and the
    noise -s score, to 1e-9 in float64, for (B,) and 0-d times."""
    sde, gm = SDES[sde_name], sdegen.GaussianMixture.random(dim=3, n_components=3, seed=1)
    x, t = noisy_points(gm, sde, 12, seed=2)
    m, s = sde.mean_coeff(t)[:, None], sde.std(t)[:, None]
    score = gm.score(sde, x, t)
    denoised = (x + s**2 * score) / m
    tol = dict(rtol=1e-9, atol=1e-9)
    for prediction, preconditioning in KINDS:
        for scale_input in ((True,) if prediction == "edm" else (False, True)):
            net = OracleNet(gm, sde, prediction, preconditioning, scale_input)
            edm = {} if prediction != "edm" else {"preconditioning": preconditioning,
                                                  **{"edm": {"sigma_data": SIGMA_DATA}, "vp": {"M": M_VP}}.get(
                                                      preconditioning, {})}
            model = sdegen.ScoreModel(net, sde, prediction, scale_input=scale_input, **edm)
            case = f"{sde_name}, {prediction}, {preconditioning}, scale_input={scale_input}"
            torch.testing.assert_close(model.score(x, t), score, **tol, msg=lambda e: f"{case}: score {e}")
            torch.testing.assert_close(model.denoise(x, t), denoised, **tol, msg=lambda e: f"{case}: denoise {e}")
            torch.testing.assert_close(model.eps(x, t), -s * score, **tol, msg=lambda e: f"{case}: eps {e}")
            t0 = t[3].clone()  # a 0-d host time, as fixed-step samplers pass grid times
            torch.testing.assert_close(model.denoise(x, t0), model.denoise(x, t0.expand(12)), rtol=1e-12, atol=1e-12)


def test_network_inputs_scaled_state_and_time_inputs():
    """A spy network: scale_input=True hands it x / m(t), False hands it x itself, prediction="edm" hands it
    c_in x / m; the time input is t, s(t), log s(t), s/m or the index round(t / T (N - 1)); x is never modified."""
    seen = {}

    def spy(x_net, time_in):
        seen["x"], seen["t"] = x_net, time_in
        return torch.zeros_like(x_net)

    gen = torch.Generator().manual_seed(0)
    for sde in (sdegen.VPSDE(), sdegen.FlowSDE()):
        x = torch.randn(5, 2, 3, dtype=torch.float64, generator=gen)
        t = 0.05 + 0.9 * torch.rand(5, dtype=torch.float64, generator=gen)
        before = x.clone()
        m = sde.mean_coeff(t)[:, None, None]
        sdegen.ScoreModel(spy, sde, "eps", scale_input=True).score(x, t)
        torch.testing.assert_close(seen["x"], x / m, rtol=1e-15, atol=0)
        assert torch.equal(seen["t"], t)
        sdegen.ScoreModel(spy, sde, "eps").score(x, t)
        assert torch.equal(seen["x"], x)
        sdegen.ScoreModel(spy, sde, "edm", sigma_data=SIGMA_DATA).denoise(x, t)
        c_in = edm_table("edm", sde.sigma(t), t)[2][:, None, None]
        torch.testing.assert_close(seen["x"], c_in * x / m, rtol=1e-14, atol=0)
        torch.testing.assert_close(seen["t"], torch.log(sde.sigma(t)) / 4, rtol=1e-14, atol=0)
        expected = {"sigma": sde.std(t), "log_sigma": torch.log(sde.std(t)), "edm_sigma": sde.std(t) / m[:, 0, 0],
                    "index": torch.round(t / sde.T * 99).long()}
        for kind, value in expected.items():
            steps = {"num_steps": 100} if kind == "index" else {}
            sdegen.ScoreModel(spy, sde, "eps", time_input=kind, **steps).score(x, t)
            torch.testing.assert_close(seen["t"], value, rtol=1e-14, atol=0)
        assert torch.equal(x, before)


def test_as_model_rejects_a_model_built_for_another_sde():
    model = sdegen.ScoreModel(lambda x, t: -x, sdegen.VPSDE())
    assert sdegen.as_model(model, sdegen.VPSDE()) is model  # an equal configuration is the same SDE
    for other in (sdegen.VESDE(), sdegen.VPSDE(beta_max=10.0), sdegen.FlowSDE()):
        with pytest.raises(ValueError, match="built for"):
            sdegen.as_model(model, other)
    with pytest.raises(ValueError, match="built for"):
        sdegen.sample(sdegen.EDMSDE(), model, shape=(2, 3), method="heun", steps=2)


def test_network_output_of_the_wrong_shape_raises_naming_it():
    x, t = torch.zeros(4, 3), torch.full((4,), 0.5)
    for prediction in ("score", "eps", "flow", "edm"):
        model = sdegen.ScoreModel(lambda x_net, t_in: x_net[:, :1], sdegen.VPSDE(), prediction)
        for view in (model.score, model.denoise):
            with pytest.raises(ValueError, match=r"x's shape \(4, 3\); got \(4, 1\)"):
                view(x, t)
    with pytest.raises(ValueError, match=r"got \(4, 1\)"):
        sdegen.sample(sdegen.VPSDE(), sdegen.ScoreModel(lambda x_net, t_in: x_net[:, :1], sdegen.VPSDE()),
                      shape=(4, 3), method="ddim", steps=2)
    with pytest.raises(TypeError, match="must return a tensor"):
        sdegen.ScoreModel(lambda x_net, t_in: [x_net], sdegen.VPSDE()).score(x, t)


# ------------------------------------------------------------------------------------------ mixed precision
# Unit roundoff of the 16-bit formats (8 and 11 significant bits): every rounding is within a relative u.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# The reference networks round their input, the time embedding and each layer's output (at most 8 roundings on a
# path through the small networks below); with layer gains of order one the output's error stays below 8 u of
# its scale, and a factor 2 covers accumulation over a sampler's steps or a likelihood's integral: K = 16.
K = 16


def hexagon():
    ang = torch.arange(6, dtype=torch.float64) * math.pi / 3
    return sdegen.GaussianMixture(torch.full((6,), 1 / 6, dtype=torch.float64),
                                  1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1),
                                  torch.full((6,), 0.2**2, dtype=torch.float64))


@pytest.fixture(scope="module")
def trained_mlp():
    """An eps-prediction MLP trained for a few Adam steps on the hexagon mixture under VPSDE (float32)."""
    sde = sdegen.VPSDE()
    net = seeded(lambda: sdegen.MLP(2, hidden=32, depth=2), 0)
    model = sdegen.ScoreModel(net, sde, "eps")
    data = hexagon().sample(512, seed=0).float()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        batch = data[torch.randint(0, 512, (128,), generator=gen)]
        loss = sdegen.dsm_loss(model, batch, seed=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.requires_grad_(False)


def low_and_reference(net, dtype):
    """The network converted to ``dtype`` and the same (rounded) weights back in float32: their outputs differ by
    the 16-bit arithmetic only."""
    low = copy.deepcopy(net).to(dtype)
    return low, copy.deepcopy(low).float()


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_mlp_samples_and_computes_likelihoods_under_a_float64_state(trained_mlp, dtype):
    """A 16-bit MLP under float64 states: sdegen.sample (DPM-Solver++(2M)) and sdegen.log_likelihood (exact
    divergence, RK4) return float64 results within K u of the float32 network with the same weights (relative to
    the samples' scale; for log p relative to |log p_T(x_T)| + |integrated divergence| + 1). The errors are
    nonzero and far above float32's 2^-24: the network really ran in 16 bits."""
    sde, u = sdegen.VPSDE(), UNIT_ROUNDOFF[dtype]
    low, ref = low_and_reference(trained_mlp, dtype)
    low_model, ref_model = sdegen.ScoreModel(low, sde, "eps"), sdegen.ScoreModel(ref, sde, "eps")
    opts = dict(shape=(128, 2), method="dpmpp_2m", steps=16, seed=0, dtype=torch.float64)
    with torch.no_grad():
        x_low, x_ref = sdegen.sample(sde, low_model, **opts), sdegen.sample(sde, ref_model, **opts)
    assert x_low.dtype == torch.float64 and torch.isfinite(x_low).all()
    err = relative_error(x_low, x_ref)
    assert u / 64 < err < K * u, f"sample error {err / u:.2f} u"

    data = hexagon().sample(16, seed=1)
    opts = dict(divergence="exact", solver="rk4", steps=10)
    lp_low = sdegen.log_likelihood(sde, low_model, data, **opts)
    lp_ref = sdegen.log_likelihood(sde, ref_model, data, **opts)
    assert lp_low.log_prob.dtype == torch.float64 and lp_low.nfe == lp_ref.nfe
    scale = lp_ref.prior_log_prob.abs() + lp_ref.delta_log_prob.abs() + 1
    ratio = float(((lp_low.log_prob - lp_ref.log_prob).abs() / scale).max())
    assert u / 64 < ratio < K * u, f"log-likelihood error {ratio / u:.2f} u"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_reference_networks_take_float32_and_float64_inputs(dtype):
    """MLP (with labels), UNet and ConvClassifier converted to 16 bits, called directly with float32 or float64
    inputs: outputs in the input's dtype, within K u of the float32 network with the same weights; a classifier
    gradient (classifier guidance) through the 16-bit classifier is float64 and within K u as well."""
    u = UNIT_ROUNDOFF[dtype]
    gen = torch.Generator().manual_seed(0)

    def unet():
        net = sdegen.UNet(1, base=8, num_classes=3)
        torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # zero-initialised: the output would be exactly 0
        return net

    nets = {"mlp": seeded(lambda: sdegen.MLP(4, hidden=16, depth=2, num_classes=3), 1), "unet": seeded(unet, 2),
            "classifier": seeded(lambda: sdegen.ConvClassifier(1, num_classes=3, base=8), 3)}
    t = 0.05 + 0.9 * torch.rand(3, generator=gen)
    y = torch.tensor([0, 2, 1])
    for name, net in nets.items():
        low, ref = low_and_reference(net, dtype)
        for in_dtype in (torch.float32, torch.float64):
            x = torch.randn(3, 4, dtype=in_dtype, generator=gen) if name == "mlp" else \
                torch.randn(3, 1, 8, 8, dtype=in_dtype, generator=gen)
            args = (x, t.to(in_dtype)) if name == "classifier" else (x, t.to(in_dtype), y)
            with torch.no_grad():
                out_low, out_ref = low(*args), ref(*args)
            assert out_low.dtype == in_dtype, name
            err = relative_error(out_low, out_ref)
            assert u / 64 < err < K * u, f"{name}, {in_dtype}: error {err / u:.2f} u"
    low, ref = low_and_reference(nets["classifier"], dtype)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=gen)
    t64 = t.double()
    grad_low, grad_ref = classifier_log_prob_grad(low, x, t64, y), classifier_log_prob_grad(ref, x, t64, y)
    assert grad_low.dtype == torch.float64
    err = relative_error(grad_low, grad_ref)
    assert u / 64 < err < K * u, f"classifier gradient error {err / u:.2f} u"


@pytest.mark.parametrize("prediction,options,unused", [
    ("eps", {"num_steps": 100}, "num_steps"), ("eps", {"sigma_data": 1.0}, "sigma_data"),
    ("v", {"preconditioning": "edm"}, "preconditioning"), ("x0", {"M": 10}, "M"),
    ("edm", {"preconditioning": "vp", "sigma_data": 1.0}, "sigma_data"), ("edm", {"M": 10}, "M"),
    ("edm", {"preconditioning": "ve", "M": 10}, "M"),
])
def test_an_option_without_effect_is_refused_by_name(prediction, options, unused):
    """Options of another setting (EDM's preconditioning constants, the index time's N) raise instead of being
    ignored, naming the option and the setting it belongs to; in their own setting they are taken."""
    with pytest.raises(ValueError, match=f"^{unused}: it applies to"):
        sdegen.ScoreModel(lambda x, t: x, sdegen.VPSDE(), prediction, **options)
    assert sdegen.ScoreModel(lambda x, t: x, sdegen.VPSDE(), "eps", time_input="index", num_steps=100).num_steps == 100
    assert sdegen.ScoreModel(lambda x, t: x, sdegen.VPSDE(), "edm", preconditioning="vp", M=10).M == 10
    assert sdegen.ScoreModel(lambda x, t: x, sdegen.VPSDE(), "edm", sigma_data=1.0).sigma_data == 1.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "edm"])
def test_a_network_is_not_asked_where_the_kernel_std_vanishes(prediction):
    """At t = 0, where s(t) = 0, every conversion but the score's own divides by s: a host time, a CPU batch of
    times holding a 0 and the denoiser all raise a ValueError naming t, instead of returning inf or NaN; the
    smallest positive time gives finite values. A network that predicts the score itself may be asked at t = 0."""
    sde = sdegen.FlowSDE() if prediction == "flow" else sdegen.VPSDE()
    model = sdegen.ScoreModel(lambda x, t: torch.tanh(x), sde, prediction)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0.0, torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64)):
        for call in (model.score, model.denoise, model.eps):
            with pytest.raises(ValueError, match=r"s\(t\) > 0"):
                call(x, t)
    assert torch.isfinite(model.score(x, torch.tensor([0.5, 1e-4, 0.2], dtype=torch.float64))).all()
    score_net = sdegen.ScoreModel(lambda x, t: -x, sde, "score")
    torch.testing.assert_close(score_net.score(x, 0.0), -x)


@pytest.mark.parametrize("prediction", ["score", "eps", "x0", "v", "flow", "edm"])
def test_prepared_grid_times_are_checked_and_converted_as_any_other_time(prediction):
    """Grid times the driver has prepared are checked by comparing the table's floats: the same times given as a
    (B,) batch (checked and converted by tensor operations) give the same outputs to round-off, and a prepared grid
    that holds a time where the network may not be asked (t = 0, where s = 0) still raises there."""
    sde = sdegen.FlowSDE() if prediction == "flow" else sdegen.VPSDE()
    net = lambda x, t: torch.tanh(x) * (1.0 + t[:, None])
    grid = torch.tensor([sde.T, 0.5, 1e-3, 0.0], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prepared, plain = sdegen.ScoreModel(net, sde, prediction), sdegen.ScoreModel(net, sde, prediction)
    prepared.prepare(grid)
    for t in grid[:3].unbind():
        for call in ("score", "denoise", "eps", "raw"):
            torch.testing.assert_close(getattr(prepared, call)(x, t), getattr(plain, call)(x, t.expand(3)),
                                       rtol=1e-12, atol=1e-12)
    if prediction != "score":  # a network predicting the score itself may be asked at t = 0
        with pytest.raises(ValueError, match=r"s\(t\) > 0"):
            prepared.denoise(x, grid[3])


def test_a_prepared_timestep_before_the_first_one_is_refused():
    """For a network on discrete timesteps, a prepared time before the table's first timestep (t < 1/N) raises as
    an unprepared one does; the first timestep itself is asked."""
    from sdegen.adapters import from_diffusers

    model = from_diffusers(lambda x, k: torch.tanh(x), torch.linspace(0.999, 0.01, 50, dtype=torch.float64))
    grid = torch.tensor([0.5, 1.0 / 50, 0.5 / 50], dtype=torch.float64)
    model.prepare(grid)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model.denoise(x, grid[1])).all()
    with pytest.raises(ValueError, match="t_min"):
        model.denoise(x, grid[2])


def test_a_diffusers_network_is_never_fed_a_negative_timestep():
    """from_diffusers' model maps t to the timestep t N - 1: times before the table's first timestep (t < 1/N)
    raise a ValueError naming sde.t_min, through the model and through sample(t_min=...); at t_min the network
    sees timestep 0 exactly."""
    from sdegen.adapters import from_diffusers

    seen = []

    def net(x, k):
        seen.append(k.detach().clone())
        return torch.tanh(x)

    table = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    model = from_diffusers(net, table)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="t_min"):
        model.score(x, 0.5 / 50)
    with pytest.raises(ValueError, match="t_min"):
        sdegen.sample(model.sde, model, x, method="dpmpp_2m", steps=4, t_min=1e-4)
    seen.clear()
    sdegen.sample(model.sde, model, x, method="dpmpp_2m", steps=4, denoise=True)  # the last call at t_min
    assert min(float(k.min()) for k in seen) == 0.0
    seen.clear()  # log_likelihood's default start is the table's first timestep too
    result = sdegen.log_likelihood(model.sde, model, x, divergence="exact", solver="rk4", steps=4)
    assert result.t_min == model.sde.t_min and min(float(k.min()) for k in seen) == 0.0


def test_a_plain_function_over_a_conv_network_of_another_dtype_gets_the_mixed_precision_hint():
    """A plain function closing over a float32 Conv2d, called in a float64 state: a TypeError that says to pass the
    network module itself (whose inputs are cast to its parameters' dtype), not the convolution's bare RuntimeError."""
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="pass the nn.Module itself"):
        sdegen.sample(sdegen.VPSDE(), lambda x, t: conv(x), x, method="ddim", steps=2)


@pytest.mark.parametrize("prediction, sde, t", [("flow", sdegen.VPSDE(), 1e-7), ("edm", sdegen.VPSDE(), 1e-7),
                                                ("edm", sdegen.VESDE(sigma_max=380.0), 1e-5),
                                                ("flow", sdegen.FlowSDE(), 1e-3)])
def test_float32_scores_of_flow_and_edm_outputs_keep_the_outputs_precision(prediction, sde, t):
    """The score from a float32 flow or EDM output, taken as (m D - x) / s^2 through D, cancelled at small s: with
    means 40 apart its relative error was up to 0.97. Written without D it keeps the output's own rounding: the
    float32 conversion agrees with the float64 conversion of the same float32 output to 1e-5."""
    gm = sdegen.GaussianMixture.random(dim=4, n_components=3, seed=1, mean_scale=20.0, cov_scale=0.01)
    exact = sdegen.ScoreModel(lambda x, tt: x, sde, prediction=prediction)  # converts a given raw output
    tt = torch.full((16,), t, dtype=torch.float64)
    x = gm.sample(16, sde=sde, t=t, seed=0)
    score = gm.score(sde, x, tt)
    # the exact raw output: invert the conversion, affine in the output (score = a + b F)
    zero = torch.zeros_like(x)
    a = exact.output_to_score(zero, x, tt)
    b = exact.output_to_score(torch.ones_like(x), x, tt) - a
    out32 = ((score - a) / b).float()
    got = exact.output_to_score(out32, x.float(), tt.float()).double()
    ref = exact.output_to_score(out32.double(), x.float().double(), tt)
    assert float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-5


def test_model_layer_edge_cases_are_named_or_exact():
    """time_input='index' on a DDPM table was one step off (21% score error at the first timestep): refused for
    'timestep'; the coefficient table keeps float64 values whatever dtype asked first (a float32 call left 1e-7 for
    later float64 calls); a Model's Tweedie default and a score network on log sigma are refused at s(t) = 0 (NaN,
    -inf input); an empty batch of times is no error; a compiled or DataParallel Model is unwrapped with a warning
    (it ran the model's conversions in the wrapper's parameter dtype)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    table = sdegen.DiscreteVPSDE.from_betas(betas)
    with pytest.raises(ValueError, match="time_input='timestep'"):
        sdegen.ScoreModel(lambda x, k: x, table, "eps", time_input="index", num_steps=1000)

    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    eps_net = lambda x, t: -sde.std(t).to(x.dtype)[:, None] * gm.score(sde, x, t.to(x.dtype))  # noqa: E731
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.5, dtype=torch.float64)
    exact = (x + sde.std(t)[:, None] ** 2 * gm.score(sde, x, t)) / sde.mean_coeff(t)[:, None]
    model = sdegen.ScoreModel(eps_net, sde, "eps")
    model.denoise(x.float(), torch.tensor(0.5))  # a float32 call first
    torch.testing.assert_close(model.denoise(x, torch.tensor(0.5, dtype=torch.float64)), exact, rtol=1e-13, atol=0)

    class ExactDenoiser(sdegen.Model):  # a denoiser that returns its input
        def denoise(self, x, t):
            return x

    with pytest.raises(ValueError, match=r"s\(t\) > 0"):
        ExactDenoiser(sde).score(x, torch.tensor(0.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"s\(t\) > 0.*'log_sigma'"):
        sdegen.ScoreModel(lambda z, u: -z, sde, "score", time_input="log_sigma").score(x, torch.zeros(4, dtype=torch.float64))
    empty = sdegen.ScoreModel(lambda z, u: -z, sde, "eps").score(torch.empty(0, 2), torch.empty(0))
    assert empty.shape == (0, 2)
    with pytest.warns(UserWarning, match="wrap the network inside the model"):
        wrapped = sdegen.sample(sde, torch.nn.DataParallel(model), shape=(4, 2), method="ddim", steps=2, seed=0,
                                dtype=torch.float64)
    assert torch.equal(wrapped, sdegen.sample(sde, model, shape=(4, 2), method="ddim", steps=2, seed=0,
                                              dtype=torch.float64))  # the model's own float64 conversions


def test_a_module_failing_on_its_own_dtype_keeps_its_error():
    """A float32 module under a float32 state that fails for another reason (float labels to an Embedding) keeps
    torch's message: the mixed-precision advice ('pass the nn.Module itself') did not apply."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(3, 2)

        def forward(self, x, t, y):
            return x + self.emb(y)

    model = sdegen.ScoreModel(Net(), sdegen.VPSDE(), "eps")
    with pytest.raises(RuntimeError, match="indices") as err:
        model.score(torch.randn(3, 2), torch.full((3,), 0.5), torch.tensor([0.0, 1.0, 2.0]))
    assert "pass the nn.Module itself" not in str(err.value)


def test_a_models_tables_stay_bounded_and_follow_its_sde(monkeypatch):
    """Every run appended its grid to the model and a change of batch size rebuilt the rows from that whole history
    (16 ms a call became 150 ms after 3000 calls); the (m, s) table was keyed by id(sde), which a new SDE can reuse
    once the old one is freed (a denoised value 52 off)."""
    from sdegen import models
    monkeypatch.setattr(models, "_TABLE_LIMIT", 64)  # the bound, small enough to reach in a few runs
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    model = sdegen.ScoreModel(lambda x, t: gm.score(sde, x, t), sde, "score")
    for i in range(20):
        sdegen.sample(sde, model, shape=(16 if i % 2 else 64, 2), method="ddim", steps=10, seed=i)
    assert len(model._coeff_table()) == 11 and len(model.__dict__["_grids"]) == 1  # the same grid adds nothing
    for i in range(20):
        sdegen.sample(sde, model, shape=(8, 2), method="ddim", steps=30, seed=i, t_min=1e-3 * (1 + i / 10))
    assert len(model._coeff_table()) <= 64
    assert all(len(rows) <= 64 for rows in model.__dict__["_time_rows"].values())
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    for beta_max in (10.0, 5.0, 15.0, 8.0, 12.0, 6.0):  # freed SDEs' addresses get reused by the next ones
        model.sde = sdegen.VPSDE(beta_max=beta_max)
        model.denoise(x, t)
        s = float(model.sde.std(t))
        assert model._coeff_table()[0.5][1] == s  # this SDE's own s(t), not a freed one's


def test_solves_leave_no_reference_cycle():
    """torchdiffeq's step callbacks were bound methods of the field they belong to: a cycle that kept the model (and
    its device memory) alive until the cyclic collector ran."""
    import gc
    import weakref
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.ring()

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return gm.score(sde, x, t)

    net = Net()
    alive = weakref.ref(net)
    gc.disable()
    try:
        model = sdegen.ScoreModel(net, sde, "score")
        sdegen.sample(sde, model, shape=(4, 2), method="ode", seed=0)
        sdegen.log_likelihood(sde, model, torch.randn(4, 2))
        del model, net
        assert alive() is None
    finally:
        gc.enable()
