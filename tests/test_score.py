"""ScoreModel: exact conversions from eps / x0 / v / score predictions, time inputs, pass-through arguments."""

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture

SDES = [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()]


def _exact_net(gm, sde, prediction):
    """A 'network' that outputs the exact target of its kind, built from the oracle's exact score."""
    def net(x, t):
        score = gm.score(x, t, sde)
        m, s = sde.mean_coeff(t)[:, None].to(x.dtype), sde.std(t)[:, None].to(x.dtype)
        eps = -s * score
        x0 = (x + s**2 * score) / m
        return {"score": score, "eps": eps, "x0": x0, "v": m * eps - s * x0}[prediction]
    return net


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("prediction", ["score", "eps", "x0", "v"])
def test_every_prediction_converts_to_the_exact_score(sde, prediction):
    gm = GaussianMixture.random(dim=3, n_components=2, seed=1)
    model = sdegen.ScoreModel(_exact_net(gm, sde, prediction), sde, prediction=prediction)
    x = torch.randn(8, 3, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x, t), gm.score(x, t, sde), rtol=1e-9, atol=1e-9)
    # Tweedie denoiser and implied eps agree with the oracle's
    s = sde.std(t)[:, None]
    torch.testing.assert_close(model.eps(x, t), -s * gm.score(x, t, sde), rtol=1e-9, atol=1e-9)
    x0 = (x + s**2 * gm.score(x, t, sde)) / sde.mean_coeff(t)[:, None]
    torch.testing.assert_close(model.denoise(x, t), x0, rtol=1e-9, atol=1e-9)


def test_eps_conversion_is_minus_eps_over_std_for_images():
    sde = sdegen.VPSDE()
    x = torch.randn(4, 3, 5, 5)
    model = sdegen.ScoreModel(lambda x, t: torch.ones_like(x), sde, prediction="eps")
    t = torch.full((4,), 0.5)
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, -torch.ones_like(x) / sde.std(0.5).float())


def test_time_inputs():
    sde = sdegen.VPSDE()
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    seen = {}

    def net(x, tin):
        seen["t"] = tin
        return torch.zeros_like(x)

    x = torch.zeros(3, 2, dtype=torch.float64)
    expected = {"t": t, "sigma": sde.std(t), "log_sigma": sde.std(t).log(), "edm_sigma": sde.sigma(t),
                "index": torch.tensor([1, 500, 999])}
    for kind, value in expected.items():
        sdegen.ScoreModel(net, sde, time_input=kind)(x, t)
        torch.testing.assert_close(seen["t"], value, check_dtype=False)
    sdegen.ScoreModel(net, sde, time_input=lambda t: 2 * t)(x, t)
    torch.testing.assert_close(seen["t"], 2 * t)


def test_extra_arguments_pass_through_and_errors():
    sde = sdegen.VESDE()
    model = sdegen.ScoreModel(lambda x, t, y: x * y[:, None], sde, prediction="score")
    x = torch.ones(2, 3)
    torch.testing.assert_close(model(x, 0.5, torch.tensor([2.0, 3.0])), torch.tensor([[2.0] * 3, [3.0] * 3]))
    with pytest.raises(ValueError, match="prediction"):
        sdegen.ScoreModel(lambda x, t: x, sde, prediction="noise")
    with pytest.raises(ValueError, match="time_input"):
        sdegen.ScoreModel(lambda x, t: x, sde, time_input="step")
    with pytest.raises(ValueError, match="shape"):
        sdegen.ScoreModel(lambda x, t: x[:, :1], sde)(x, 0.5)
    with pytest.raises(ValueError, match="t must lie"):
        sdegen.ScoreModel(lambda x, t: x, sde)(x, 2.0)
