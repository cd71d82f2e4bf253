"""Guidance against the Gaussian-mixture oracle, where p_t(y | x) and the class-conditional scores are exact."""

import math

import pytest
import torch

import sdegen

W = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.22, 0.28], dtype=torch.float64)
GROUPS = [[0, 3], [1, 4, 5], [2]]


def hexagon():
    ang = torch.arange(6, dtype=torch.float64) * math.pi / 3
    means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return sdegen.GaussianMixture(W, means, torch.full((6,), 0.25**2, dtype=torch.float64))


def test_classifier_guidance_scale_one_is_the_exact_conditional_score(dtype, device):
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    x = (torch.randn(64, 2, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 2).to(device)
    t = (torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01).to(device)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for c in range(3):
        guided = sdegen.classifier_guidance(gm, clf, c, 1.0).score_fn(sde)
        torch.testing.assert_close(guided(x, t), clf.conditional(c).score(x, t, sde), **tol)
        # scale lambda: s + lambda (s_c - s)
        s, s_c = gm.score(x, t, sde), clf.conditional(c).score(x, t, sde)
        g3 = sdegen.classifier_guidance(gm.score_fn(sde), clf, c, 3.0)
        torch.testing.assert_close(g3(x, t), s + 3.0 * (s_c - s), **tol)


def test_classifier_free_guidance_equals_classifier_guidance_with_scale_one_plus_w():
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)

    def model(x, t, y=None):  # the exact conditional / unconditional scores
        if y is None:
            return gm.score(x, t, sde)
        return torch.stack([clf.conditional(int(c)).score(x[i:i + 1], t[i:i + 1], sde)[0] for i, c in enumerate(y)])

    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 0.3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1] * 4)
    for w in (0.0, 0.5, 2.0):
        cfg = sdegen.classifier_free_guidance(model, y, w, num_classes=3)
        cg = sdegen.classifier_guidance(gm.score_fn(sde), clf, y, 1.0 + w)
        torch.testing.assert_close(cfg(x, t), cg(x, t), rtol=1e-9, atol=1e-9)


def component_frequencies(gm, x):
    k = gm.responsibilities(x.double()).argmax(1)
    return torch.bincount(k, minlength=gm.n_components).double() / x.shape[0]


@pytest.mark.parametrize("method,options", [("ode", dict(rtol=1e-4, atol=1e-4)),
                                            pytest.param("reverse_diffusion", dict(steps=300))])
def test_guided_samples_follow_the_class_conditional_mixture(method, options):
    """Scale 1 with the exact classifier: component frequencies = the conditional weights w_k / W_c within
    4.5 standard errors of the multinomial, and no mass on other classes' components."""
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    n = 1500
    for c in ((1,) if method == "ode" else (0, 1)):
        guided = sdegen.classifier_guidance(gm, clf, c, 1.0)
        with torch.no_grad():
            x = sdegen.sample(sde, guided, shape=(n, 2), method=method, seed=c, dtype=torch.float64, **options)
        freq = component_frequencies(gm, x)
        p = torch.zeros(6, dtype=torch.float64)
        p[GROUPS[c]] = W[GROUPS[c]] / W[GROUPS[c]].sum()
        se = (p * (1 - p) / n).sqrt().clamp_min(1.0 / n)
        assert bool(((freq - p).abs() < 4.5 * se).all()), f"class {c}: {freq.tolist()} vs {p.tolist()}"


def test_guidance_plugs_into_fixed_step_samplers_and_keeps_shape(device):
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    guided = sdegen.classifier_guidance(gm, clf, torch.tensor([0, 1, 2, 0], device=device), 2.0)
    for method in ("euler", "euler_maruyama", "ancestral", "pc", "dpmpp_2m"):
        x, info = sdegen.sample(sde, guided, shape=(4, 2), method=method, steps=5, seed=0, return_info=True,
                                device=device)
        assert x.shape == (4, 2) and x.dtype == torch.float32 and x.device.type == device.type
        assert torch.isfinite(x).all()
        assert info.classifier_nfe == info.nfe  # one classifier gradient per score call


def test_guidance_gradient_flows_when_x_requires_grad():
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    g = sdegen.classifier_guidance(gm.score_fn(sde), clf, 1, 1.0)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda z: g(z, t), (x,))


def test_guidance_errors():
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\]"):
        sdegen.classifier_guidance(gm, clf, 3, 1.0)
    with pytest.raises(ValueError, match="class labels"):
        sdegen.classifier_guidance(gm, clf, torch.tensor([0, -1]), 1.0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            sdegen.classifier_guidance(gm, clf, 0, bad)
        with pytest.raises(ValueError, match="w must be a finite number >= 0"):
            sdegen.classifier_free_guidance(lambda x, t, y=None: x, 0, bad)
    with pytest.raises(TypeError, match="integer"):
        sdegen.classifier_guidance(gm, clf, torch.tensor([0.5]), 1.0)
    # the number of classes learnt from the classifier's output on the first call
    anon = lambda x, t: clf(x, t)  # noqa: E731
    g = sdegen.classifier_guidance(gm.score_fn(sde), anon, 5, 1.0)
    with pytest.raises(ValueError, match="class labels"):
        g(torch.zeros(2, 2), torch.full((2,), 0.5))
    g = sdegen.classifier_guidance(gm.score_fn(sde), clf, torch.tensor([0, 1, 2]), 1.0)
    with pytest.raises(ValueError, match="batch size"):
        g(torch.zeros(2, 2), torch.full((2,), 0.5))


# ------------------------------------------------------------------------------------------------ inpainting
def gaussian(cov, mean):
    return sdegen.GaussianMixture([1.0], torch.as_tensor(mean, dtype=torch.float64)[None],
                                  torch.as_tensor(cov, dtype=torch.float64)[None])


def check_moments(u, mean, cov, k=4.5):
    """Sample mean and covariance of u (n, d) against (mean, cov): normal-theory standard errors."""
    n = u.shape[0]
    m_hat, c_hat = u.mean(0), torch.cov(u.T)
    se_m = (torch.diagonal(cov) / n).sqrt()
    se_c = ((cov**2 + torch.outer(torch.diagonal(cov), torch.diagonal(cov))) / n).sqrt()
    assert bool(((m_hat - mean).abs() < k * se_m).all()), f"mean {m_hat.tolist()} vs {mean.tolist()}"
    assert bool(((c_hat - cov).abs() < k * se_c).all()), f"cov {c_hat.tolist()} vs {cov.tolist()}"


def test_inpainting_with_exact_score_gives_exact_conditional_when_blocks_are_independent():
    """Known coordinates (0, 1) independent of the unknown (2, 3), which are correlated with each other and have a
    non-zero mean: the replacement method must reproduce N(mu_u, Sigma_uu) and return the known values exactly."""
    sde = sdegen.VPSDE()
    cov = torch.tensor([[1.0, 0.6, 0, 0], [0.6, 1.0, 0, 0], [0, 0, 0.5, -0.3], [0, 0, -0.3, 0.4]], dtype=torch.float64)
    mean = torch.tensor([0.3, -0.2, 1.0, -0.5], dtype=torch.float64)
    gm, n = gaussian(cov, mean), 1500
    known = torch.tensor([1.5, -1.0, 0.0, 0.0], dtype=torch.float64).expand(n, 4)
    mask = torch.tensor([True, True, False, False])
    with torch.no_grad():
        x = sdegen.inpaint(sde, gm, known, mask, steps=100, seed=0)
    assert torch.equal(x[:, :2], known[:, :2])
    check_moments(x[:, 2:], mean[2:], cov[2:, 2:])


def replacement_limit(sde, cov, mean, y, ku, steps=20000):
    """Mean and covariance at t_min of the continuous limit of the replacement method for Gaussian data: the unknown
    part u follows du = [-f u + g^2 s_u(u, m y)] dtau + g dW (tau = T - t) with the exact joint score, which is
    linear in u, from the prior N(0, I) at T (fresh known-part noise each step averages out of the drift)."""
    k, u = ku
    ts = torch.linspace(sde.T, sde.t_min, steps + 1, dtype=torch.float64)
    mu, V = torch.zeros(len(u), dtype=torch.float64), torch.eye(len(u), dtype=torch.float64)
    eye = torch.eye(cov.shape[0], dtype=torch.float64)

    def field(t, mu, V):
        m, s2 = torch.exp(sde.log_mean_coeff(t)), sde.std(t) ** 2
        P = torch.linalg.inv(m * m * cov + s2 * eye)
        A = -sde.drift_coeff(t) * torch.eye(len(u), dtype=torch.float64) - sde.diffusion(t) ** 2 * P[u][:, u]
        b = sde.diffusion(t) ** 2 * (P[u][:, u] @ (m * mean[u]) - P[u][:, k] @ (m * (y - mean[k])))
        return A @ mu + b, A @ V + V @ A.T + sde.diffusion(t) ** 2 * torch.eye(len(u), dtype=torch.float64)

    for i in range(steps):  # Heun in tau
        h = ts[i] - ts[i + 1]
        d1 = field(ts[i], mu, V)
        d2 = field(ts[i + 1], mu + h * d1[0], V + h * d1[1])
        mu, V = mu + 0.5 * h * (d1[0] + d2[0]), V + 0.5 * h * (d1[1] + d2[1])
    return mu, V


def test_inpainting_correlated_gaussian_matches_the_methods_limit_not_the_exact_conditional():
    """With correlated known/unknown parts the paper's replacement method (Song et al. 2021, app. I.2) is an
    approximation: p_t(u | x_known = m y + s z) replaces p_t(u | y). Samples match the method's own limit (computed
    above), and we record that this limit differs from the exact conditional N(rho y, 1 - rho^2)."""
    sde, rho, n = sdegen.VPSDE(), 0.8, 4000
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    mean = torch.zeros(2, dtype=torch.float64)
    y = torch.tensor([1.0], dtype=torch.float64)
    known = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(n, 2)
    with torch.no_grad():
        x = sdegen.inpaint(sde, gaussian(cov, mean), known, torch.tensor([True, False]), steps=1000, seed=1)
    mu, V = replacement_limit(sde, cov, mean, y, ([0], [1]), steps=4000)
    check_moments(x[:, 1:], mu, V)
    exact_mean, exact_var = rho * 1.0, 1 - rho**2
    assert abs(float(mu[0]) - exact_mean) > 0.2 and abs(float(V[0, 0]) - exact_var) > 0.1


def test_inpaint_works_through_sample_by_name_and_on_images(dtype):
    sde, gm = sdegen.VESDE(sigma_max=5.0), gaussian(torch.eye(16) * 0.25, torch.zeros(16))
    known = torch.randn(3, 1, 4, 4, dtype=dtype)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    x, info = sdegen.sample(sde, gm, shape=known.shape, method="inpaint", known=known, mask=mask, sampler="pc",
                            snr=0.1, steps=20, seed=0, dtype=dtype, return_info=True)
    assert x.dtype == dtype and x.shape == known.shape
    assert torch.equal(x[:, :, :2], known[:, :, :2]) and info.nfe == 40
    assert torch.isfinite(x).all()


def test_inpaint_errors():
    sde, gm = sdegen.VPSDE(), gaussian(torch.eye(4), torch.zeros(4))
    known = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="mask must have x's shape"):
        sdegen.inpaint(sde, gm, known, torch.ones(3, dtype=torch.bool), steps=2)
    with pytest.raises(ValueError, match="mask must have x's shape"):
        sdegen.inpaint(sde, gm, known, torch.ones(4, 4, dtype=torch.bool), steps=2)
    with pytest.raises(ValueError, match="0 and 1"):
        sdegen.inpaint(sde, gm, known, torch.full((4,), 0.5), steps=2)
    with pytest.raises(ValueError, match="NaN"):
        sdegen.inpaint(sde, gm, torch.full((5, 4), float("nan")), torch.ones(4, dtype=torch.bool), steps=2)
    with pytest.raises(TypeError, match="StepSampler"):
        sdegen.Inpaint(known, torch.ones(4, dtype=torch.bool), sampler=object())
    before = known.clone()
    sdegen.inpaint(sde, gm, known, torch.tensor([True, False, True, False]), steps=3, seed=0)
    assert torch.equal(known, before)


def test_mixture_classifier_errors():
    sde, gm = sdegen.VPSDE(), hexagon()
    with pytest.raises(ValueError, match="partition"):
        sdegen.MixtureClassifier(gm, [[0, 1], [2]], sde)


# ------------------------------------------------------------------------------- guidance as models: network counts
class OracleEpsNet:
    """A labelled network net(x, t, y) whose output is the exact noise prediction -s(t) s_c(x, t) of class c's
    mixture (y = c) or of the whole mixture (y = null_label = 3); it records the rows and labels of every call."""

    null_label = 3

    def __init__(self, gm, clf, sde):
        self.gm, self.clf, self.sde, self.calls = gm, clf, sde, []

    def __call__(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        y = torch.full((x.shape[0],), self.null_label) if y is None else y
        score = torch.empty_like(x)
        for c in range(4):
            rows = y == c
            if bool(rows.any()):
                dist = self.gm if c == self.null_label else self.clf.conditional(c)
                score[rows] = dist.score(self.sde, x[rows], t[rows])
        return -self.sde.std(t)[:, None] * score


@pytest.mark.parametrize("method", ["euler_maruyama", "dpmpp_2m"])
def test_classifier_free_guidance_runs_both_branches_in_one_network_call(method):
    """Through sdegen.sample with the oracle's eps network: the batched guidance costs one NFE (one network call on
    2B rows) per step and gives the two-call result to 1e-12 in float64; the two-call form costs two NFE a step."""
    sde, gm = sdegen.VPSDE(), hexagon()
    net = OracleEpsNet(gm, sdegen.MixtureClassifier(gm, GROUPS, sde), sde)
    model = sdegen.ScoreModel(net, sde, prediction="eps")
    y, steps, n = torch.tensor([0, 1, 2, 1, 0, 2]), 12, 6
    batched = sdegen.classifier_free_guidance(model, y, 2.0)
    two_calls = sdegen.classifier_free_guidance(lambda x, t, c=None: model(x, t, c), y, 2.0, num_classes=3)
    assert batched.null_label == 3 and batched.nfe_per_call == 1 and two_calls.nfe_per_call == 2
    opts = dict(shape=(n, 2), method=method, steps=steps, seed=3, dtype=torch.float64, return_info=True)
    x1, info1 = sdegen.sample(sde, batched, **opts)
    rows = [r for r, _ in net.calls]
    x2, info2 = sdegen.sample(sde, two_calls, **opts)
    assert info1.nfe == steps and rows == [2 * n] * steps
    assert info2.nfe == 2 * steps and len(net.calls) == 3 * steps
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-12)


def test_classifier_free_guidance_counts_the_calls_of_a_labelled_mlp():
    """A spy on sdegen.nets.MLP: the null label is read from the network, sample's info.nfe equals the network's
    calls for one- and two-evaluation samplers, each call has 2B rows with labels [y, null] (B rows for w = 0)."""
    calls = []

    class SpyMLP(sdegen.MLP):
        def forward(self, x, t, y=None):
            calls.append((x.shape[0], y))
            return super().forward(x, t, y)

    sde = sdegen.VPSDE()
    net = SpyMLP(2, hidden=16, depth=1, num_classes=3)
    y = torch.tensor([2, 0, 1, 1])
    for method, w in (("ddim", 1.5), ("heun", 1.5), ("ddim", 0.0)):
        calls.clear()
        cfg = sdegen.classifier_free_guidance(sdegen.ScoreModel(net, sde, prediction="eps"), y, w)
        with torch.no_grad():
            _, info = sdegen.sample(sde, cfg, shape=(4, 2), method=method, steps=5, seed=0, return_info=True)
        assert info.nfe == len(calls) >= 5
        for rows, labels in calls:
            if w == 0.0:
                assert rows == 4 and torch.equal(labels, y)
            else:
                assert rows == 8 and torch.equal(labels, torch.cat([y, torch.full((4,), 3)]))


@pytest.mark.parametrize("prediction", ["score", "eps", "x0", "v", "flow", "edm"])
def test_classifier_free_guidance_on_raw_outputs_is_exact_for_every_parameterisation(prediction):
    """Each parameterisation maps the network output affinely to score and denoiser at fixed (x, t), so guiding the
    raw outputs (one conversion) equals guiding the converted ones: to 1e-12 in float64, for several SDEs."""
    net = sdegen.MLP(3, hidden=32, depth=2, num_classes=4).double()
    gen = torch.Generator().manual_seed(0)
    y, w = torch.tensor([0, 3, 1, 2, 2]), 3.0
    for sde in (sdegen.VPSDE(), sdegen.VESDE(), sdegen.EDMSDE(), sdegen.FlowSDE()):
        model = sdegen.ScoreModel(net, sde, prediction=prediction)
        guided = sdegen.classifier_free_guidance(model, y, w).as_model(sde)
        assert isinstance(guided, sdegen.Model) and guided.nfe_per_call == 1
        x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
        t = sde.t_min + (sde.T - sde.t_min) * (0.05 + 0.9 * torch.rand(5, dtype=torch.float64, generator=gen))
        for view in ("score", "denoise"):
            cond, uncond = getattr(model, view)(x, t, y), getattr(model, view)(x, t)
            torch.testing.assert_close(getattr(guided, view)(x, t), (1 + w) * cond - w * uncond,
                                       rtol=1e-12, atol=1e-12)


def test_classifier_guidance_counts_classifier_gradients_apart_from_nfe():
    """The exact classifier at scale 1 reproduces the exact class-conditional sampler (same seed, float64, 1e-9);
    info.nfe counts the score evaluations and info.classifier_nfe the classifier gradients, one per step each."""
    sde, gm = sdegen.VPSDE(), hexagon()
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    steps = 9
    opts = dict(shape=(5, 2), method="euler_maruyama", steps=steps, seed=4, dtype=torch.float64, return_info=True)
    guided = sdegen.classifier_guidance(gm, clf, 1, 1.0)
    model = guided.as_model(sde)
    assert isinstance(model, sdegen.Model) and model.nfe_per_call == 1 and model.classifier_calls == 1
    x, info = sdegen.sample(sde, guided, **opts)
    exact, info_exact = sdegen.sample(sde, clf.conditional(1), **opts)
    assert info.nfe == steps and info.classifier_nfe == steps and info_exact.classifier_nfe == 0
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-9)
    _, info0 = sdegen.sample(sde, sdegen.classifier_guidance(gm, clf, 1, 0.0), **opts)
    assert info0.nfe == steps and info0.classifier_nfe == 0


def test_guided_models_errors():
    sde, gm = sdegen.VPSDE(), hexagon()
    net = sdegen.MLP(2, hidden=8, depth=1, num_classes=3)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="null_label must be an int >= 0"):
            sdegen.classifier_free_guidance(sdegen.ScoreModel(net, sde), 0, 1.0, null_label=bad)
    cfg = sdegen.classifier_free_guidance(sdegen.ScoreModel(net, sdegen.VESDE()), 0, 1.0)
    with pytest.raises(ValueError, match="built for"):
        cfg.as_model(sde)
    clf = sdegen.MixtureClassifier(gm, GROUPS, sde)
    cg = sdegen.classifier_guidance(sdegen.ScoreModel(net, sdegen.VESDE()), clf, 0, 1.0)
    with pytest.raises(ValueError, match="built for"):
        sdegen.sample(sde, cg, shape=(2, 2), method="ddim", steps=2)
    # a plain callable without a null label falls back to two calls; with one it batches
    plain = lambda x, t, y=None: -x  # noqa: E731
    assert sdegen.classifier_free_guidance(plain, 0, 1.0).as_model(sde).nfe_per_call == 2
    assert sdegen.classifier_free_guidance(plain, 0, 1.0, null_label=3).as_model(sde).nfe_per_call == 1


def test_classifier_calls_are_counted_when_its_classes_are_learned_from_its_output():
    """A classifier without num_classes has its labels checked against its first output: no uncounted extra call."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    exact = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    calls = [0]

    def classifier(x, t):
        calls[0] += 1
        return exact(x, t)

    _, info = sdegen.sample(sde, sdegen.classifier_guidance(ring, classifier, y=1), shape=(4, 2), method="ddim",
                            steps=5, seed=0, return_info=True)
    assert calls[0] == info.classifier_nfe == 5
    with pytest.raises(ValueError, match="labels must lie in"):
        sdegen.sample(sde, sdegen.classifier_guidance(ring, classifier, y=5), shape=(4, 2), method="ddim", steps=5,
                      seed=0)


def test_sample_with_the_inpaint_method_keeps_the_known_values_after_denoising():
    """The final denoising step moves every entry; the driver lets the sampler put the known values back, so
    sample(method=Inpaint(...), denoise=True) equals inpaint(..., denoise=True) and returns the known part exactly."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    known = ring.sample(8, seed=1)
    mask = torch.tensor([True, False]).expand(8, 2)
    a = sdegen.inpaint(sde, ring, known, mask, steps=50, seed=0, denoise=True)
    b = sdegen.sample(sde, ring, shape=(8, 2), method=sdegen.guidance.Inpaint(known, mask), steps=50, seed=0,
                      denoise=True, dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(b[:, 0], known[:, 0])


def test_classifier_guidance_works_under_inference_mode():
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    guided = sdegen.classifier_guidance(ring, clf, y=1, scale=2.0)
    with torch.no_grad():
        reference = sdegen.sample(sde, guided, shape=(6, 2), method="ddim", steps=8, seed=0, dtype=torch.float64)
    with torch.inference_mode():
        x = sdegen.sample(sde, guided, shape=(6, 2), method="ddim", steps=8, seed=0, dtype=torch.float64)
    assert torch.equal(x, reference)


def test_labels_masks_and_null_labels_that_cannot_be_meant_are_refused():
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    with pytest.raises(TypeError, match="not bool"):
        sdegen.classifier_guidance(ring, clf, y=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="empty"):
        sdegen.classifier_guidance(ring, clf, y=torch.zeros(0, dtype=torch.long))
    net = sdegen.MLP(2, hidden=8, num_classes=3)
    model = sdegen.ScoreModel(net, sde, prediction="eps")
    with pytest.raises(ValueError, match="null_label=1 is one of the model's 3 classes"):
        sdegen.classifier_free_guidance(model, y=0, w=1.0, null_label=1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        sdegen.guidance.Inpaint(torch.zeros(2), torch.tensor([2, 0]))


def test_a_class_of_zero_weight_is_refused_by_name():
    gm = sdegen.GaussianMixture([0.0, 0.0, 1.0], [[0, 0], [1, 1], [2, 2]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"classes \[0\] have zero total weight"):
        sdegen.MixtureClassifier(gm, [[0, 1], [2]], sdegen.VPSDE())


def test_model_dependent_grids_with_per_example_labels():
    """The pilot runs on its own 64 draws: a guided model with per-example labels serves them with its examples'
    labels in turn (it refused: 'y has 100 labels but x has batch size 64')."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    y = torch.arange(10) % 2
    guided = sdegen.classifier_guidance(ring, clf, y, 1.0)
    for schedule in ("pilot", "sensitivity"):
        x, info = sdegen.sample(sde, guided, shape=(10, 2), method="unipc", order=2, steps=6, schedule=schedule,
                                seed=0, return_info=True)
        assert x.shape == (10, 2) and info.pilot_nfe > 0 and info.pilot_classifier_nfe > 0


def test_a_classifier_for_another_sde_is_refused():
    ring = sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sdegen.VPSDE())
    guided = sdegen.classifier_guidance(ring, clf, 0, 1.0)
    with pytest.raises(ValueError, match="classifier was built for"):
        sdegen.sample(sdegen.FlowSDE(), guided, shape=(4, 2), method="unipc", steps=4, seed=0)


def test_gradients_reach_the_classifiers_parameters_from_every_step():
    """With grad mode on, the guidance term of the first step stays in the graph too (it was taken on a detached
    x_T: d/dT came out 9.0518 against 9.0557 by finite differences). Checked against central differences."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)

    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.T = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

        def forward(self, x, t):
            return clf(x, t) / self.T

    tempered = Tempered()
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss():
        guided = sdegen.classifier_guidance(ring, tempered, torch.tensor([0, 1, 0, 1]), 2.0)
        return sdegen.sample(sde, guided, x_T, method="ddim", steps=3).sum()

    (grad,) = torch.autograd.grad(loss(), tempered.T)
    with torch.no_grad():
        h = 1e-5
        tempered.T += h
        up = loss()
        tempered.T -= 2 * h
        down = loss()
        tempered.T += h
    torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)
    with torch.no_grad():  # the caller's no_grad: a plain tensor
        assert not loss().requires_grad


def test_guidance_reads_any_network_and_classifier():
    """A network whose .config is a dataclass (it crashed with AttributeError); a float32 classifier under a float64
    state (torch's raw dtype error); logits that do not depend on x, and a null label contradicting the network's,
    are named."""
    from dataclasses import dataclass

    @dataclass
    class Config:
        num_classes: int = 3

    class Net(torch.nn.Module):
        null_label = 3

        def __init__(self):
            super().__init__()
            self.config, self.emb, self.lin = Config(), torch.nn.Embedding(4, 2), torch.nn.Linear(3, 2)

        def forward(self, x, t, y=None):
            return self.lin(torch.cat([x, t[:, None]], 1)) + self.emb(y)

    sde = sdegen.VPSDE()
    model = sdegen.ScoreModel(Net(), sde, prediction="eps")
    guided = sdegen.classifier_free_guidance(model, torch.tensor([0, 2]), 2.0)
    assert guided.num_classes == 3 and guided.null_label == 3
    with pytest.raises(ValueError, match="declares .null_label = 3"):
        sdegen.classifier_free_guidance(model, torch.tensor([0, 2]), 2.0, null_label=4)

    ring = sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    class Lin32(torch.nn.Linear):
        def forward(self, z, s):
            return super().forward(z)

    lin32 = Lin32(2, 2)
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    g = sdegen.guidance.classifier_log_prob_grad(lin32, x, t, torch.tensor([0, 1, 0]))
    w = lin32.weight.double()
    expected = w[[0, 1, 0]] - (torch.softmax(x @ w.T + lin32.bias.double(), 1)[:, :, None] * w).sum(1)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits do not depend on x"):
        sdegen.guidance.classifier_log_prob_grad(lambda z, s: clf(z.detach(), s), x, t, torch.tensor([0, 1, 0]))


def test_inpainting_takes_broadcast_masks_and_the_wrapped_samplers_order():
    sde, gm = sdegen.VPSDE(), sdegen.GaussianMixture.random(dim=12, n_components=2, seed=0)
    known = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[..., 0, :] = True

    def score(x, t):
        return gm.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape)

    kw = dict(known=known, method="ddim", steps=4, seed=0)
    out = sdegen.inpaint(sde, score, mask=mask, **kw)
    full = sdegen.inpaint(sde, score, mask=mask.expand(3, 3, 2, 2), **kw)
    assert torch.equal(out, full) and torch.equal(out[:, :, 0, :], known[:, :, 0, :])
    with pytest.raises(ValueError, match="mask must have"):
        sdegen.inpaint(sde, score, mask=torch.ones(2, 1, 2, 2, dtype=torch.bool), **kw)
    wrapped = sdegen.guidance.Inpaint(known, mask, "unipc", order=3)
    inner = sdegen.samplers.get_sampler("unipc", order=3)
    assert (wrapped.order, wrapped.exponential) == (inner.order, True) and inner.order > 1


def test_a_frozen_classifier_on_a_detached_state_builds_no_graph():
    """Outside torch.no_grad, a classifier without trainable parameters on a state that does not require grad keeps
    no graph: every step's would stay alive (2171 graph nodes after 50 steps)."""
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    x = sdegen.sample(sde, sdegen.classifier_guidance(ring, clf, torch.tensor([0, 1]), 2.0), shape=(2, 2),
                      method="ddim", steps=5, seed=0)
    assert not x.requires_grad and x.grad_fn is None


def test_too_few_labels_for_a_pilot_grid_are_named():
    sde, ring = sdegen.VPSDE(), sdegen.GaussianMixture.ring()
    clf = sdegen.MixtureClassifier(ring, [[0, 1, 2, 3], [4, 5, 6, 7]], sde)
    guided = sdegen.classifier_guidance(ring, clf, torch.tensor([0, 1, 0]), 1.0)
    with pytest.raises(ValueError, match="y has 3 labels, fewer than the batch's examples"):
        sdegen.sample(sde, guided, shape=(4, 2), method="exp_pc", steps=4, schedule="pilot", seed=0)
