"""Score models: turn a user's network into s(x, t) ~ grad_x log p_t(x), whatever it predicts.

With the kernel x_t = m x_0 + s eps (m = m(t), s = s(t)) the exact conversions are
    score = -eps / s,                      (eps-prediction, Ho et al. 2020)
    score = (m x0_hat - x) / s^2,          (data prediction; Tweedie's formula read backwards)
    eps   = (s x + m v) / (m^2 + s^2),     (v = m eps - s x0, Salimans & Ho 2022)
Time inputs the network may expect: t, the kernel std s(t) ("sigma"), log s(t) ("log_sigma"),
EDM's sigma(t) = s/m ("edm_sigma"), a DDPM step index ("index"), or any callable of t.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from ._util import Time, batch_time, bcast
from .sde import SDE

PREDICTIONS = ("score", "eps", "x0", "v")
TIME_INPUTS = ("t", "sigma", "log_sigma", "edm_sigma", "index")


class ScoreModel(torch.nn.Module):
    """Wraps ``net(x, time_input, *args, **kwargs)`` as a score function ``model(x, t, *args, **kwargs)``.

    Args:
        net: the network; extra call arguments (a class label, say) are passed through.
        sde: the forward SDE whose kernel defines the conversions.
        prediction: what the network outputs: "score", "eps", "x0" or "v".
        time_input: what the network takes as its second argument (see module docstring) or a callable t -> input.
        num_steps: N for time_input="index": the index is round(t / T * (N - 1)).

    Shapes: x is (B, ...), t a float, 0-d or (B,) tensor; the score has x's shape and dtype.
    """

    def __init__(self, net: Callable, sde: SDE, prediction: str = "eps",
                 time_input: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "t", num_steps: int = 1000):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}.")
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS} or a callable; got {time_input!r}.")
        if time_input == "index" and not (isinstance(num_steps, int) and num_steps >= 2):
            raise ValueError(f"num_steps must be an int >= 2; got {num_steps!r}.")
        self.net, self.sde, self.prediction, self.time_input, self.num_steps = net, sde, prediction, time_input, num_steps

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network receives for times t."""
        if callable(self.time_input):
            return self.time_input(t)
        if self.time_input == "t":
            return t
        if self.time_input == "sigma":
            return self.sde._std(t)
        if self.time_input == "log_sigma":
            return torch.log(self.sde._std(t))
        if self.time_input == "edm_sigma":
            return self.sde._std(t) * torch.exp(-self.sde._log_mean_coeff(t))
        return torch.round(t / self.sde.T * (self.num_steps - 1)).long()

    def raw(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """The network's own output at (x, t)."""
        t = self.sde._time_x(x, t)
        tb = batch_time(t, x).to(x.dtype)
        return self.net(x, self.net_time(tb), *args, **kwargs)

    def forward(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        t = self.sde._time_x(x, t)
        out = self.raw(x, t, *args, **kwargs)
        return output_to_score(self.sde, self.prediction, out, x, t)

    def denoise(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """Posterior-mean estimate of x_0 (Tweedie): (x + s^2 score) / m."""
        return score_to_x0(self.sde, self(x, t, *args, **kwargs), x, t)

    def eps(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """The implied noise estimate -s(t) score."""
        t = self.sde._time_x(x, t)
        return -bcast(self.sde._std(t), x) * self(x, t, *args, **kwargs)


def output_to_score(sde: SDE, prediction: str, out: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
    """Convert a network output of kind ``prediction`` at (x, t) into the score (exact kernel formulas)."""
    t = sde._time_x(x, t)
    if out.shape != x.shape:
        raise ValueError(f"the network output must have x's shape {tuple(x.shape)}; got {tuple(out.shape)}.")
    m, s = bcast(torch.exp(sde._log_mean_coeff(t)), x), bcast(sde._std(t), x)
    if prediction == "score":
        return out
    if prediction == "eps":
        return -out / s
    if prediction == "x0":
        return (m * out - x) / s**2
    if prediction == "v":
        eps = (s * x + m * out) / (m**2 + s**2)
        return -eps / s
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}.")


def score_to_x0(sde: SDE, score: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
    """Tweedie's formula E[x_0 | x_t = x] = (x + s(t)^2 score) / m(t)."""
    t = sde._time_x(x, t)
    return (x + bcast(sde._std(t) ** 2, x) * score) / bcast(torch.exp(sde._log_mean_coeff(t)), x)
