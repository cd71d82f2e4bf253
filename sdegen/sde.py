"""Forward SDEs with Gaussian perturbation kernels (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", section 3.4 and appendix B).

Every SDE here is linear with scalar coefficients, dx = f(t) x dt + g(t) dw, so its kernel is
p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I) with m(t) = exp(int_0^t f) and
s(t)^2 = int_0^t (m(t)/m(u))^2 g(u)^2 du, both in closed form below.

Times may be a float, a 0-d tensor or a (B,) tensor; states are (B, ...) of any rank.
Python floats become float64 tensors, so scalar coefficients keep full precision.
"""

from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Tuple

import torch

from ._util import (Time, as_time, batch_time, bcast, check_batch, check_finite_tensor, check_positive,
                    check_range, resolve_score)
from .noise import Seed, make_seeds, normal_from_seeds

_LOG_2PI = math.log(2.0 * math.pi)


class SDE(abc.ABC):
    """Abstract linear forward SDE dx = f(t) x dt + g(t) dw on [0, T].

    Subclasses give the closed forms of log m(t), s(t), f(t) = d log m / dt, g(t), the
    inverse of the log-SNR, and the prior's standard deviation. Everything else (kernel,
    perturbation, reverse-time SDE, probability-flow ODE, discretisations) is derived here.
    """

    T: float = 1.0
    t_min: float = 1e-3
    prior_std: float = 1.0

    # --- closed forms supplied by subclasses (t already a validated floating tensor) ---
    @abc.abstractmethod
    def _log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _std(self, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _drift_coeff(self, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _diffusion(self, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor: ...

    def _transition_var(self, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        a = torch.exp(self._log_mean_coeff(t_to) - self._log_mean_coeff(t_from))
        return (self._std(t_to) ** 2 - (a * self._std(t_from)) ** 2).clamp_min(0.0)

    # --- validation ---
    def _time(self, t: Time, name: str = "t") -> torch.Tensor:
        t = as_time(t, name)
        check_range(t, 0.0, self.T, name)
        return t

    def _time_x(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        t = self._time(t)
        check_batch(t, x)
        return t

    def _check_common(self, t_min: float, T: float) -> None:
        if not (0.0 < t_min < T):
            raise ValueError(f"t_min must lie in (0, T={T:g}); got {t_min!r}.")

    # --- public scalar functions of t: outputs have t's shape ---
    def log_mean_coeff(self, t: Time) -> torch.Tensor:
        """log m(t), where the kernel mean is m(t) x_0."""
        return self._log_mean_coeff(self._time(t))

    def mean_coeff(self, t: Time) -> torch.Tensor:
        """m(t) = exp(int_0^t f)."""
        return torch.exp(self.log_mean_coeff(t))

    def std(self, t: Time) -> torch.Tensor:
        """s(t): the kernel's standard deviation."""
        return self._std(self._time(t))

    def drift_coeff(self, t: Time) -> torch.Tensor:
        """f(t) in the drift f(t) x."""
        return self._drift_coeff(self._time(t))

    def diffusion(self, t: Time) -> torch.Tensor:
        """g(t)."""
        return self._diffusion(self._time(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        """lambda(t) = log(m(t)^2 / s(t)^2), strictly decreasing in t."""
        t = self._time(t)
        return 2.0 * (self._log_mean_coeff(t) - torch.log(self._std(t)))

    def sigma(self, t: Time) -> torch.Tensor:
        """EDM's noise level sigma(t) = s(t) / m(t) = exp(-lambda(t) / 2)."""
        t = self._time(t)
        return self._std(t) * torch.exp(-self._log_mean_coeff(t))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        """Inverse of :meth:`log_snr`."""
        lam = as_time(lam, "lam")
        if bool(torch.isnan(lam).any()):
            raise ValueError("lam contains NaN.")
        return self._t_from_log_snr(lam)

    def t_from_sigma(self, sigma: Time) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""
        sigma = as_time(sigma, "sigma")
        check_range(sigma, 0.0, math.inf, "sigma")
        return self._t_from_log_snr(-2.0 * torch.log(sigma))

    def transition(self, t_from: Time, t_to: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact forward transition x_{t_to} = a x_{t_from} + b z for t_from <= t_to; returns (a, b)."""
        t_from, t_to = self._time(t_from, "t_from"), self._time(t_to, "t_to")
        if bool((t_from > t_to).any()):
            raise ValueError("transition needs t_from <= t_to (it is the forward process).")
        a = torch.exp(self._log_mean_coeff(t_to) - self._log_mean_coeff(t_from))
        return a, torch.sqrt(self._transition_var(t_from, t_to))

    # --- functions of x ---
    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """Forward drift f(x, t) = f(t) x, same shape as x."""
        t = self._time_x(x, t)
        return bcast(self._drift_coeff(t), x) * x

    def reverse_drift(self, x: torch.Tensor, t: Time, score: torch.Tensor, probability_flow: bool = False
                      ) -> torch.Tensor:
        """f(t) x - c g(t)^2 score: the reverse-SDE drift (c = 1, Song et al. 2021, eq. 6) or the probability-flow
        drift (c = 1/2, eq. 13), given the score's value at (x, t)."""
        return self._reverse_drift(x, self._time_x(x, t), score, 0.5 if probability_flow else 1.0)

    def _reverse_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, c: float) -> torch.Tensor:
        return bcast(self._drift_coeff(t), x) * x - bcast(c * self._diffusion(t) ** 2, x) * score

    def marginal_prob(self, x0: torch.Tensor, t: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel p_0t(x_t | x_0) = N(mean, std^2 I): returns (m(t) x_0, s(t)) with std of t's shape."""
        t = self._time_x(x0, t)
        return bcast(torch.exp(self._log_mean_coeff(t)), x0) * x0, self._std(t)

    def perturb(self, x0: torch.Tensor, t: Time, noise: torch.Tensor) -> torch.Tensor:
        """x_t = m(t) x_0 + s(t) noise: a draw from the kernel for the given standard-normal noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}; got {tuple(noise.shape)}.")
        mean, std = self.marginal_prob(x0, t)
        return mean + bcast(std, x0) * noise

    def kernel_score(self, x: torch.Tensor, x0: torch.Tensor, t: Time) -> torch.Tensor:
        """grad_x log p_0t(x | x_0) = -(x - m(t) x_0) / s(t)^2."""
        mean, std = self.marginal_prob(x0, t)
        return -(x - mean) / bcast(std, x) ** 2

    def kernel_log_prob(self, x: torch.Tensor, x0: torch.Tensor, t: Time) -> torch.Tensor:
        """log p_0t(x | x_0), shape (B,)."""
        mean, std = self.marginal_prob(x0, t)
        d = x[0].numel()
        std = std.to(x.dtype).to(x.device).expand(x.shape[0])
        sq = ((x - mean) ** 2).reshape(x.shape[0], -1).sum(1)
        return -0.5 * sq / std**2 - d * torch.log(std) - 0.5 * d * _LOG_2PI

    def prior_sample(self, shape: Sequence[int], *, seed: Seed = None, generator: Optional[torch.Generator] = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Draws from the prior N(0, prior_std^2 I), shape (B, ...); example i depends only on its seed."""
        shape = tuple(shape)
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"shape must be (B, ...) with B >= 1; got {shape}.")
        seeds = make_seeds(generator if generator is not None else seed, shape[0], device)
        return self.prior_std * normal_from_seeds(seeds, 0, shape[1:], dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, prior_std^2 I), shape (B,)."""
        check_finite_tensor(x)
        d = x[0].numel()
        sq = x.reshape(x.shape[0], -1).pow(2).sum(1)
        return -0.5 * sq / self.prior_std**2 - d * math.log(self.prior_std) - 0.5 * d * _LOG_2PI

    def discretize(self, x: torch.Tensor, t: Time, t_next: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward update x_t = x_{t_next} + F + G z over [t_next, t] (t_next < t): returns (F, G).

        F = (a - 1) x and G = b from the exact transition, which is the DDPM update
        x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z for VP and the SMLD update
        x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z for VE (Song et al. 2021, eqs. 8 and 9).
        """
        a, b = self.transition(t_next, t)
        return (bcast(a, x) - 1.0) * x, b

    # --- reverse time ---
    def reverse(self, score, probability_flow: bool = False, event_shape: Optional[Sequence[int]] = None):
        """Reverse-time SDE dx = [f - g^2 s] dt + g dw-bar (Song et al. 2021, eq. 6); see :class:`ReverseSDE`."""
        return ReverseSDE(self, resolve_score(score, self), probability_flow=probability_flow,
                          event_shape=event_shape)

    def probability_flow(self, score, t_clamp: Optional[Tuple[float, float]] = None):
        """Probability-flow ODE dx = [f - 1/2 g^2 s] dt (Song et al. 2021, eq. 13); see :class:`ProbabilityFlowODE`."""
        return ProbabilityFlowODE(self, resolve_score(score, self), t_clamp=t_clamp)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict:
        return {"T": self.T, "t_min": self.t_min}


def _integral_linear(t: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    # int_0^t beta(u) du for beta(u) = b0 + u (b1 - b0)
    return t * (b0 + 0.5 * t * (b1 - b0))


def _inverse_integral_linear(B: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    # the t >= 0 solving b0 t + (b1 - b0) t^2 / 2 = B, in the cancellation-free form
    return 2.0 * B / (b0 + torch.sqrt(b0 * b0 + 2.0 * (b1 - b0) * B))


class VPSDE(SDE):
    """Variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11).

    schedule="linear": beta(t) = beta_min + t (beta_max - beta_min), the continuous DDPM.
    schedule="cosine": alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))
    (Nichol & Dhariwal 2021, eq. 17) with m(t) = sqrt(alpha_bar(t)); beta blows up at t = 1, so T
    defaults to 0.9946 as in DPM-Solver (Lu et al. 2022, appendix).
    Kernel: m(t) = exp(-1/2 int_0^t beta), s(t) = sqrt(-expm1(-int_0^t beta)).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, schedule: str = "linear",
                 cosine_s: float = 0.008, T: Optional[float] = None, t_min: float = 1e-3):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine'; got {schedule!r}.")
        if schedule == "linear":
            if not (isinstance(beta_min, (int, float)) and beta_min >= 0):
                raise ValueError(f"beta_min must be >= 0; got {beta_min!r}.")
            if not (isinstance(beta_max, (int, float)) and math.isfinite(beta_max) and beta_max > beta_min):
                raise ValueError(f"beta_min must be < beta_max; got beta_min={beta_min!r}, beta_max={beta_max!r}.")
            T = 1.0 if T is None else T
            if not (0 < T <= 1.0):
                raise ValueError(f"T must lie in (0, 1]; got {T!r}.")
        else:
            check_positive(cosine_s, "cosine_s")
            T = 0.9946 if T is None else T
            if not (0 < T < 1.0):
                raise ValueError(f"T must lie in (0, 1) for the cosine schedule (beta is infinite at 1); got {T!r}.")
        self._check_common(t_min, T)
        self.beta_min, self.beta_max, self.schedule, self.cosine_s = float(beta_min), float(beta_max), schedule, float(cosine_s)
        self.T, self.t_min = float(T), float(t_min)

    def _config(self) -> dict:
        if self.schedule == "cosine":
            return {"schedule": "cosine", "cosine_s": self.cosine_s, "T": self.T, "t_min": self.t_min}
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T, "t_min": self.t_min}

    # cosine schedule angle phi(t) = pi/2 (t + s)/(1 + s)
    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi * (t + self.cosine_s) / (1.0 + self.cosine_s)

    def integral_beta(self, t: Time) -> torch.Tensor:
        """B(t) = int_0^t beta(u) du = -2 log m(t)."""
        return self._integral_beta(self._time(t))

    def _integral_beta(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return _integral_linear(t, self.beta_min, self.beta_max)
        phi0 = self._phi(torch.zeros_like(t))
        return -2.0 * (torch.log(torch.cos(self._phi(t))) - torch.log(torch.cos(phi0)))

    def beta(self, t: Time) -> torch.Tensor:
        """beta(t) = -2 d log m / dt."""
        return self._beta(self._time(t))

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        return 2.0 * torch.tan(self._phi(t)) * (0.5 * math.pi / (1.0 + self.cosine_s))

    def _log_mean_coeff(self, t):
        return -0.5 * self._integral_beta(t)

    def _std(self, t):
        if self.schedule == "cosine":
            # s^2 = 1 - cos^2(phi)/cos^2(phi0) = sin(phi - phi0) sin(phi + phi0) / cos^2(phi0): no cancellation at t -> 0
            phi, phi0 = self._phi(t), self._phi(torch.zeros_like(t))
            return torch.sqrt(torch.sin(phi - phi0) * torch.sin(phi + phi0)) / torch.cos(phi0)
        return torch.sqrt(-torch.expm1(-self._integral_beta(t)))

    def _drift_coeff(self, t):
        return -0.5 * self._beta(t)

    def _diffusion(self, t):
        return torch.sqrt(self._beta(t))

    def _transition_var(self, t_from, t_to):
        # b^2 = 1 - a^2 for a variance-preserving process
        return -torch.expm1(-(self._integral_beta(t_to) - self._integral_beta(t_from)))

    def _t_from_B(self, B: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return _inverse_integral_linear(B, self.beta_min, self.beta_max)
        # cos(phi) = e^{-B/2} cos(phi0); atan2 with sin^2(phi) = sin^2(phi0) - cos^2(phi0) expm1(-B) keeps precision near t = 0
        c0 = math.cos(float(self._phi(torch.zeros((), dtype=torch.float64))))
        sin_phi = torch.sqrt((1.0 - c0 * c0) - c0 * c0 * torch.expm1(-B))
        phi = torch.atan2(sin_phi, torch.exp(-0.5 * B) * c0)
        return phi * (1.0 + self.cosine_s) / (0.5 * math.pi) - self.cosine_s

    def _t_from_log_snr(self, lam):
        # m^2 = sigmoid(lam) for VP, so B = -log m^2 = softplus(-lam)
        return self._t_from_B(torch.nn.functional.softplus(-lam))


class SubVPSDE(VPSDE):
    """Sub-VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021, eq. 12).

    Kernel: m(t) = exp(-B/2) and standard deviation s(t) = 1 - exp(-B) (not its square), B = int_0^t beta.
    """

    def _std(self, t):
        return -torch.expm1(-self._integral_beta(t))

    def _diffusion(self, t):
        return torch.sqrt(self._beta(t) * -torch.expm1(-2.0 * self._integral_beta(t)))

    def _transition_var(self, t_from, t_to):
        return SDE._transition_var(self, t_from, t_to)

    def _t_from_log_snr(self, lam):
        # lam = log m^2 - 2 log(1 - m^2)  =>  m = 2 e^{lam/2} / (1 + sqrt(1 + 4 e^lam))
        log_m = math.log(2.0) + 0.5 * lam - torch.log1p(torch.sqrt(1.0 + 4.0 * torch.exp(lam)))
        return self._t_from_B(-2.0 * log_m)


class VESDE(SDE):
    """Variance-exploding SDE dx = sqrt(d[sigma(t)^2]/dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t
    (Song et al. 2021, eq. 9 / 30).

    Kernel: m(t) = 1 and s(t)^2 = sigma(t)^2 - sigma_min^2 = sigma_min^2 expm1(2 t log(sigma_max/sigma_min)),
    the exact variance of the SDE started at x_0 at t = 0. Prior N(0, sigma_max^2 I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, *, T: float = 1.0, t_min: float = 1e-5):
        check_positive(sigma_min, "sigma_min")
        check_positive(sigma_max, "sigma_max")
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
        check_positive(T, "T")
        self._check_common(t_min, T)
        self.sigma_min, self.sigma_max, self.T, self.t_min = float(sigma_min), float(sigma_max), float(T), float(t_min)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.prior_std = self.sigma_min * math.exp(self._log_ratio * self.T)

    def _config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T, "t_min": self.t_min}

    def noise_level(self, t: Time) -> torch.Tensor:
        """The SMLD noise level sigma_min (sigma_max/sigma_min)^t (not the kernel std, which subtracts sigma_min^2)."""
        return self.sigma_min * torch.exp(self._log_ratio * self._time(t))

    def _log_mean_coeff(self, t):
        return torch.zeros_like(t)

    def _std(self, t):
        return self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._log_ratio * t))

    def _drift_coeff(self, t):
        return torch.zeros_like(t)

    def _diffusion(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * t) * math.sqrt(2.0 * self._log_ratio)

    def _transition_var(self, t_from, t_to):
        return self.sigma_min**2 * torch.exp(2.0 * self._log_ratio * t_from) * torch.expm1(
            2.0 * self._log_ratio * (t_to - t_from))

    def _t_from_log_snr(self, lam):
        # s^2 = e^{-lam} = sigma_min^2 expm1(2 t log r)
        return torch.log1p(torch.exp(-lam) / self.sigma_min**2) / (2.0 * self._log_ratio)


class ReverseSDE(torch.nn.Module):
    """The reverse-time SDE dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw-bar of a forward SDE.

    In its own time t (running from T down to 0): :meth:`drift` and :meth:`diffusion`.
    For torchsde (which integrates forward in time) :meth:`f` and :meth:`g` use the solver clock
    tau = T - t, increasing from 0; map times with :meth:`solver_time`. torchsde states are
    (B, D): with ``event_shape`` set, states are unflattened before the score is called.
    With ``probability_flow=True`` the diffusion is zero and the drift that of the ODE.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: SDE, score, probability_flow: bool = False, event_shape: Optional[Sequence[int]] = None,
                 sde_type: str = "ito"):
        super().__init__()
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich'; got {sde_type!r}.")
        self.sde, self.score, self.probability_flow = sde, score, probability_flow
        self.event_shape = None if event_shape is None else tuple(event_shape)
        # additive noise: the Ito and Stratonovich readings are the same equation
        self.sde_type = sde_type

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """f - g^2 s (or f - 1/2 g^2 s for the probability flow), in the forward clock t."""
        t = self.sde._time_x(x, t)
        s = self.score(x, batch_time(t, x).to(x.dtype))
        return self.sde._reverse_drift(x, t, s, 0.5 if self.probability_flow else 1.0)

    def diffusion(self, t: Time) -> torch.Tensor:
        t = self.sde._time(t)
        return torch.zeros_like(t) if self.probability_flow else self.sde._diffusion(t)

    def solver_time(self, t: Time) -> torch.Tensor:
        """tau = T - t: the increasing clock that torchsde integrates in."""
        return self.sde.T - as_time(t)

    def _unflat(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.event_shape is None else y.reshape((y.shape[0],) + self.event_shape)

    def f(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # dx/dtau = -(drift) since t = T - tau
        t = (self.sde.T - tau).clamp(0.0, self.sde.T)
        return -self.drift(self._unflat(y), t).reshape(y.shape)

    def g(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = (self.sde.T - tau).clamp(0.0, self.sde.T)
        return self.diffusion(t).to(y.dtype).expand(y.shape)


class ProbabilityFlowODE(torch.nn.Module):
    """dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t): ``forward(t, x)`` as torchdiffeq.odeint expects (t scalar).

    ``t_clamp=(lo, hi)`` evaluates the field at clamp(t, lo, hi): adaptive solvers probe times past the
    end of the interval, and the score must not be asked for times outside [t_min, T].
    """

    def __init__(self, sde: SDE, score, t_clamp: Optional[Tuple[float, float]] = None):
        super().__init__()
        self.sde, self.score = sde, score
        self.t_clamp = (0.0, sde.T) if t_clamp is None else (float(t_clamp[0]), float(t_clamp[1]))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = as_time(t).clamp(*self.t_clamp)
        return self.drift(x, t)

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        t = self.sde._time_x(x, t)
        return self.sde._reverse_drift(x, t, self.score(x, batch_time(t, x).to(x.dtype)), 0.5)
