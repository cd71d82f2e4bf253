"""Forward SDEs with Gaussian perturbation kernels (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", section 3.4 and appendix B).

Every SDE here is linear with scalar coefficients, dx = f(t) x dt + g(t) dw, so its kernel is
p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I). An SDE is the pair (m(t), s(t)): a subclass implements the
public methods :meth:`SDE.log_mean_coeff` (log m) and :meth:`SDE.std` (s), and optionally, for speed or
precision, the closed forms of f = d log m / dt (:meth:`SDE.drift_coeff`), g (:meth:`SDE.diffusion`),
the transition variance and the inverse log-SNR map. Everything else (sigma = s/m, log-SNR, kernels,
prior, reverse-time SDE, probability-flow ODE, discretisations) is derived here, and every sampler
and likelihood solve in sdegen uses only these public methods.

Times may be a float, a 0-d tensor or a (B,) tensor; states are (B, ...) of any rank. Python floats
become float64 tensors, so scalar coefficients keep full precision. The methods a subclass implements
receive t already converted to a floating tensor and checked to lie in [0, T].
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
import numbers
import sys
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._deprecation import renamed
from ._validate import check_device, check_floating_dtype
from ._util import (Time, as_time, batch_time, bcast, check_batch, check_finite_tensor, check_positive,
                    check_range)
from .noise import Seed, make_seeds, normal_from_seeds

_LOG_2PI = math.log(2.0 * math.pi)
# methods of one time argument that subclasses implement: the base class converts and checks t before they run
_TIME_METHODS = ("log_mean_coeff", "std", "drift_coeff", "diffusion")
def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) to round-off for every x: torch's softplus returns x itself above its threshold, 20 by default
    (e^-20 = 2e-9 off); above 40 the gap e^-40 is below float64's resolution."""
    return torch.nn.functional.softplus(x, threshold=40.0)


# every SDE class defined in this process, by its description's name "module:QualName" (the newest definition wins)
_CLASSES: Dict[str, type] = {}


def _takes_checked_time(fn):
    """Wrap a method f(self, t) so that t arrives as a floating tensor inside [0, T] (see :meth:`SDE.check_time`)."""
    if getattr(fn, "_checks_time", False):
        return fn

    @functools.wraps(fn)
    def method(self, t, *args, **kwargs):
        return fn(self, self.check_time(t), *args, **kwargs)

    method._checks_time = True
    return method


def _derivative(fn, t: torch.Tensor) -> torch.Tensor:
    """d fn / dt elementwise by autograd in float64 (fn maps times to values of the same shape). A t that requires
    grad keeps its graph: the derivative is then itself differentiable in t (create_graph)."""
    with torch.enable_grad():
        tracked = t.requires_grad
        tt = t.to(torch.float64) if tracked else t.detach().to(torch.float64).requires_grad_(True)
        y = fn(tt)
        if not y.requires_grad:  # fn does not depend on t
            return torch.zeros_like(t)
        (d,) = torch.autograd.grad(y.sum(), tt, create_graph=tracked)
    return d.to(t.dtype)


def _check_order(t_from: torch.Tensor, t_to: torch.Tensor, what: str) -> None:
    """ValueError unless t_from <= t_to (times already checked): read on the host where both are there, asserted on
    the device otherwise (a host time moves to it), without waiting for the device."""
    if t_from.device.type == "cpu" and t_to.device.type == "cpu":
        a, b = t_from.detach(), t_to.detach()
        if float(a) > float(b) if a.ndim == 0 and b.ndim == 0 else bool((a > b).any()):
            raise ValueError(f"{what} needs t_from <= t_to (it is the forward process).")
    else:
        where = t_to.device if t_to.device.type != "cpu" else t_from.device
        torch._assert_async((t_from.to(where) <= t_to.to(where)).all(), f"{what} needs t_from <= t_to")


def _checks_order(fn):
    """Wrap transition_var(self, t_from, t_to) so that t_from > t_to raises, as transition does."""
    if getattr(fn, "_checks_order", False):
        return fn

    @functools.wraps(fn)
    def method(self, t_from, t_to):
        a, b = self.check_time(t_from, "t_from"), self.check_time(t_to, "t_to")
        _check_order(a, b, "transition_var")
        return fn(self, a, b)

    method._checks_order = True
    method._unchecked = fn  # for transition, which has checked the times and their order already
    return method


def _times_of(t: torch.Tensor, where: torch.Tensor) -> str:
    """The times where ``where`` holds, as a short range for an error message."""
    hits = t[where].tolist()
    return f"{hits[0]:.4g}" if len(hits) == 1 else f"{hits[0]:.4g} ... {hits[-1]:.4g} ({len(hits)} of {t.numel()} checked)"


class SDE(abc.ABC):
    """Abstract linear forward SDE dx = f(t) x dt + g(t) dw on [0, T], given by its kernel N(m(t) x_0, s(t)^2 I).

    A subclass implements two public methods of a time tensor t (0-d or (B,), floating, inside [0, T]):

    - ``log_mean_coeff(t)``: log m(t), with m(0) = 1;
    - ``std(t)``: s(t), increasing, with s(0) = 0 (or a small s(0) > 0 for kernels defined that way).

    Optional closed forms (the defaults are exact but slower): ``drift_coeff(t)`` = f = d log m / dt (default:
    autograd), ``diffusion(t)`` = g = sqrt(d s^2/dt - 2 f s^2) (default: autograd), ``transition_var(t_from,
    t_to)``, ``t_from_log_snr(lam)`` and ``t_from_sigma(sigma)`` (default: bisection in float64). Class or
    instance attributes: ``T`` (end time, default 1), ``t_min`` (default end of sampling, 1e-3),
    ``t_min_is_earliest`` (True where no model is defined before ``t_min``, as for a discrete timestep table: no
    default time then goes below it; default False), ``smooth_in_t`` (False where the kernel is only piecewise
    smooth in t, as a table interpolated linearly: torchdiffeq's solvers then integrate the flow in log sigma,
    where it is smooth; default True) and ``prior_std`` (default s(T)). ``config()`` returns the
    constructor's keyword arguments, so that checkpoints can rebuild the SDE with ``from_config`` (the default,
    ``{}``, suits an SDE without arguments).

    Example (EDM's SDE, Karras et al. 2022: m = 1, s(t) = t)::

        class MySDE(sdegen.SDE):
            T, t_min = 80.0, 0.002
            def log_mean_coeff(self, t):
                return torch.zeros_like(t)
            def std(self, t):
                return t
    """

    T: float = 1.0
    t_min: float = 1e-3
    t_min_is_earliest: bool = False
    smooth_in_t: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in _TIME_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _takes_checked_time(cls.__dict__[name]))
        if "transition_var" in cls.__dict__:
            cls.transition_var = _checks_order(cls.__dict__["transition_var"])
        _CLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls

    def __setattr__(self, name: str, value: Any) -> None:
        # quantities are cached per SDE object (models' tables of m and s, SDE comparisons, the checked contract):
        # a constructor parameter (a key of config()) changed in place once the SDE is in use would leave them
        # stale, so it is refused; other attributes (a user SDE's own caches, prior_std) stay free
        if (self.__dict__.get("_contract_checked") and not name.startswith("_") and name != "prior_std"
                and name in self.config()):
            raise AttributeError(f"{type(self).__name__}.{name}: an SDE's parameters are fixed once it is in use "
                                 "(sdegen caches quantities per SDE object); build a new one instead, e.g. "
                                 f"type(sde)(**dict(sde.config(), {name}=...)).")
        super().__setattr__(name, value)

    # --- the contract: log m(t) and s(t) ---
    @abc.abstractmethod
    def log_mean_coeff(self, t: Time) -> torch.Tensor:
        """log m(t), where the kernel mean is m(t) x_0 (t's shape)."""

    @abc.abstractmethod
    def std(self, t: Time) -> torch.Tensor:
        """s(t): the kernel's standard deviation (t's shape)."""

    # --- optional closed forms ---
    def drift_coeff(self, t: Time) -> torch.Tensor:
        """f(t) = d log m / dt in the drift f(t) x."""
        return _derivative(self.log_mean_coeff, t)

    def diffusion(self, t: Time) -> torch.Tensor:
        """g(t) = sqrt(d s^2 / dt - 2 f s^2) (the variance of a linear SDE obeys dv/dt = 2 f v + g^2).

        At t = 0 it is the limit from the right: s = sqrt(v) with v(0) = 0 has an infinite ds/dt there, which
        autograd cannot carry through ds^2/dt = 2 s ds/dt, so the default evaluates at 1e-12 T instead."""
        t = torch.where(t > 0, t, torch.full_like(t, 1e-12 * self.T))
        g2 = _derivative(lambda u: self.std(u) ** 2, t) - 2.0 * self.drift_coeff(t) * self.std(t) ** 2
        return g2.clamp_min(0.0).sqrt()  # round-off only: check_contract refuses kernels with g^2 < 0

    @_checks_order
    def transition_var(self, t_from: Time, t_to: Time) -> torch.Tensor:
        """b^2 of the forward transition x_{t_to} = a x_{t_from} + b z for t_from <= t_to:
        s(t_to)^2 - (m(t_to)/m(t_from))^2 s(t_from)^2."""
        a = torch.exp(self.log_mean_coeff(t_to) - self.log_mean_coeff(t_from))
        return (self.std(t_to) ** 2 - (a * self.std(t_from)) ** 2).clamp_min(0.0)

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        """Inverse of :meth:`log_snr` (clamped to [0, T]); by default a bisection in float64 to full precision."""
        lam = self._check_lam(lam)
        lam64 = lam.to(torch.float64)
        lo, hi = torch.zeros_like(lam64), torch.full_like(lam64, self.T)
        for _ in range(64):  # the bracket halves each time: 2^-64 T is below float64 resolution
            mid = 0.5 * (lo + hi)
            right = self.log_snr(mid) > lam64  # log-SNR decreases: the root lies right of mid
            lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
        t = 0.5 * (lo + hi)
        # beyond the range of the log-SNR the bracket ends 2^-64 T inside [0, T]: clamp to its ends
        t = torch.where(lam64 >= self.log_snr(lo.new_zeros(())), torch.zeros_like(t), t)
        t = torch.where(lam64 <= self.log_snr(lo.new_full((), self.T)), torch.full_like(t, self.T), t)
        return t.to(lam.dtype)

    def t_from_sigma(self, sigma: Time) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""
        sigma = as_time(sigma, "sigma")
        check_range(sigma, 0.0, math.inf, "sigma")
        return self.t_from_log_snr(-2.0 * torch.log(sigma))

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) that sampling starts from (default s(T))."""
        value = getattr(self, "_prior_std", None)
        return float(self.std(self.T)) if value is None else value

    @prior_std.setter
    def prior_std(self, value: float) -> None:
        self._prior_std = check_positive(value, "prior_std")

    # --- description for checkpoints ---
    def config(self) -> Dict[str, Any]:
        """The constructor's keyword arguments as plain data (``type(self).from_config(sde.config())`` rebuilds it)."""
        return {}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SDE":
        """Rebuild an SDE from :meth:`config`'s output."""
        try:
            return cls(**config)
        except TypeError as err:
            fix = ("the description was written by another version of sdegen, or edited" if
                   cls.__module__.split(".")[0] == "sdegen" else
                   f"implement {cls.__name__}.config() to return its constructor's keyword arguments")
            raise TypeError(f"{cls.__name__} cannot be rebuilt from config {config!r} ({err}); {fix}.") from None

    def describe(self) -> Dict[str, Any]:
        """{"class": "module:QualName", "config": config()}: what :func:`sdegen.load_checkpoint` needs to rebuild it
        (with "prior_std" when it was set on this instance)."""
        cls = type(self)
        description = {"class": f"{cls.__module__}:{cls.__qualname__}", "config": self.config()}
        own = self.__dict__.get("_prior_std", self.__dict__.get("prior_std"))
        if own is not None and "prior_std" not in description["config"]:
            try:
                rebuilt = type(self).from_config(description["config"]).prior_std
            except TypeError:  # a user SDE whose config() cannot rebuild it: from_description will say so
                rebuilt = None
            if rebuilt != own:  # set on this instance after construction
                description["prior_std"] = float(own)
        return description

    def check_description(self, description: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """``description`` (default: :meth:`describe`'s) after checking that it rebuilds this process: the rebuilt
        SDE has the same T, t_min, prior_std, log m(t) and s(t) at nine times from t_min to T. ValueError
        otherwise, which is what a ``config()`` that misses a constructor argument gives (the file would load as
        another process). Checkpoints and grid files call it before they write."""
        description = self.describe() if description is None else description
        try:
            rebuilt = SDE.from_description(description)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{type(self).__name__}: its description {description!r} does not rebuild it ({err})."
                             ) from None
        t = torch.linspace(self.t_min, self.T, 9, dtype=torch.float64)
        same = ((rebuilt.T, rebuilt.t_min, rebuilt.prior_std) == (self.T, self.t_min, self.prior_std)
                and all(torch.allclose(getattr(rebuilt, f)(t), getattr(self, f)(t), rtol=1e-12, atol=0.0)
                        for f in ("log_mean_coeff", "std")))
        if not same:
            raise ValueError(f"{type(self).__name__}: config() returns {description.get('config')!r}, which rebuilds "
                             "another process (its m(t), s(t), T, t_min or prior_std differ); implement "
                             f"{type(self).__name__}.config() to return every constructor argument.")
        return description

    @staticmethod
    def from_description(description: Dict[str, Any]) -> "SDE":
        """Inverse of :meth:`describe`: finds the class by name among the SDE classes defined in this process and
        calls its ``from_config``. A description never makes sdegen import a module: import the one that defines a
        user SDE before loading a file that names it."""
        path = description.get("class") if isinstance(description, dict) else None
        if not isinstance(path, str) or ":" not in path:
            raise ValueError(f"an SDE description needs 'class': 'module:QualName'; got {description!r}.")
        obj = _CLASSES.get(path)
        if obj is None:  # a class registered under another qualified name, reached from its (imported) module
            module, qualname = path.split(":", 1)
            obj = sys.modules.get(module)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
        if not (isinstance(obj, type) and issubclass(obj, SDE)):
            module = path.split(":", 1)[0]
            raise ValueError(f"{path!r} names no sdegen.SDE subclass defined in this process; import the module "
                             f"that defines it (import {module}) before loading: a description never makes sdegen "
                             "import a module.")
        sde = obj.from_config(dict(description.get("config", {})))
        if description.get("prior_std") is not None:
            sde.prior_std = description["prior_std"]
        return sde

    # --- validation ---
    def check_time(self, t: Time, name: str = "t") -> torch.Tensor:
        """t as a floating tensor (a float becomes a float64 0-d tensor); ValueError unless it lies in [0, T].

        A time in a dtype coarser than float64 may exceed T by its round-off (T = 0.999 rounds up in float32)."""
        if isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" and t.is_floating_point() \
                and not t.requires_grad:
            v = float(t)  # the common case of a host scalar: one comparison instead of tensor ops
            if not (0.0 <= v <= self._t_max(t.dtype)):
                raise ValueError(f"{name} must lie in [0, {self.T:g}]; got values {[v]} outside it.")
            return t
        t = as_time(t, name)
        check_range(t, 0.0, self._t_max(t.dtype), name)
        return t

    def _t_max(self, dtype: torch.dtype) -> float:
        if dtype is torch.float64:
            return self.T
        return self.T * (1.0 + 4.0 * torch.finfo(dtype).eps)

    def check_time_for(self, x: torch.Tensor, t: Time, name: str = "t") -> torch.Tensor:
        """:meth:`check_time`, and a (B,) time must match x's batch size."""
        t = self.check_time(t, name)
        check_batch(t, x, name)
        return t

    def check_contract(self) -> "SDE":
        """Check the kernel once per instance (on 1025 times in [0, T], float64), raising ValueError naming what fails:
        log m and s finite, m(0) = 1, s > 0 after t = 0, and a log-SNR log(m^2 / s^2) that decreases strictly,
        which is the same as g(t)^2 = ds^2/dt - 2 f s^2 > 0: a kernel that breaks it is no diffusion, and its
        samplers and likelihoods would come out wrong without an error. The sampling, likelihood, schedule and
        model entry points call it; returns the SDE."""
        if self.__dict__.get("_contract_checked"):
            return self
        name = type(self).__name__
        t = torch.linspace(0.0, self.T, 1025, dtype=torch.float64)
        log_m, s = self.log_mean_coeff(t), self.std(t)
        if not (isinstance(log_m, torch.Tensor) and isinstance(s, torch.Tensor) and log_m.shape == t.shape
                and s.shape == t.shape):
            raise ValueError(f"{name}.log_mean_coeff(t) and .std(t) must return tensors of t's shape.")
        bad = ~(torch.isfinite(log_m) & torch.isfinite(s) & (s >= 0))
        bad[1:] |= s[1:] <= 0
        if bool(bad.any()):
            raise ValueError(f"{name}: log m(t) must be finite and s(t) finite and > 0 on (0, T]; they are not at "
                             f"t = {_times_of(t, bad)}.")
        if abs(float(log_m[0])) > 1e-6:
            raise ValueError(f"{name}: m(0) must be 1 (log_mean_coeff(0) = 0, so that x_0 is the data); got log m(0) "
                             f"= {float(log_m[0]):.6g}.")
        lam = 2.0 * (log_m - torch.log(s))
        rising = torch.zeros_like(bad)
        rising[1:] = lam[1:] >= lam[:-1]
        if bool(rising.any()):
            raise ValueError(f"{name}: the log-SNR log(m(t)^2 / s(t)^2) must decrease strictly on [0, T] (equivalently "
                             f"g(t)^2 = ds^2/dt - 2 f s^2 > 0: noise is added at every time), but it does not decrease "
                             f"at t = {_times_of(t, rising)}; check std() and log_mean_coeff().")
        self.__dict__["_contract_checked"] = True
        return self

    def _check_lam(self, lam: Time) -> torch.Tensor:
        lam = as_time(lam, "lam")
        if lam.device.type == "cpu" and bool(torch.isnan(lam).any()):
            raise ValueError("lam (a log-SNR) contains NaN.")
        return lam

    # --- derived scalar functions of t: outputs have t's shape ---
    def mean_coeff(self, t: Time) -> torch.Tensor:
        """m(t) = exp(int_0^t f)."""
        return torch.exp(self.log_mean_coeff(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        """lambda(t) = log(m(t)^2 / s(t)^2), strictly decreasing in t."""
        t = self.check_time(t)
        return 2.0 * (self.log_mean_coeff(t) - torch.log(self.std(t)))

    def sigma(self, t: Time) -> torch.Tensor:
        """EDM's noise level sigma(t) = s(t) / m(t) = exp(-lambda(t) / 2)."""
        t = self.check_time(t)
        return self.std(t) * torch.exp(-self.log_mean_coeff(t))

    def d_mean_coeff(self, t: Time) -> torch.Tensor:
        """dm/dt = f m."""
        t = self.check_time(t)
        return self.drift_coeff(t) * self.mean_coeff(t)

    def d_std(self, t: Time) -> torch.Tensor:
        """ds/dt = (g^2 + 2 f s^2) / (2 s)."""
        t = self.check_time(t)
        s = self.std(t)
        ds = (self.diffusion(t) ** 2 + 2.0 * self.drift_coeff(t) * s**2) / (2.0 * s)
        if t.device.type == "cpu" and bool((s == 0).any()):  # 0/0 where s = 0 (t = 0): ds/dt itself, by autograd
            d0 = _derivative(self.std, t)
            # a square root at 0 (s = sqrt(v), v(0) = 0) gives autograd's 0 * inf: the derivative there is +inf
            ds = torch.where(s == 0, torch.where(torch.isnan(d0), torch.full_like(d0, math.inf), d0), ds)
        return ds

    def transition(self, t_from: Time, t_to: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact forward transition x_{t_to} = a x_{t_from} + b z for t_from <= t_to; returns (a, b)."""
        t_from, t_to = self.check_time(t_from, "t_from"), self.check_time(t_to, "t_to")
        _check_order(t_from, t_to, "transition")
        a = torch.exp(self.log_mean_coeff(t_to) - self.log_mean_coeff(t_from))
        var = type(self).transition_var
        return a, torch.sqrt(getattr(var, "_unchecked", var)(self, t_from, t_to))

    # --- functions of x ---
    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """Forward drift f(x, t) = f(t) x, same shape as x."""
        t = self.check_time_for(x, t)
        return bcast(self.drift_coeff(t), x) * x

    def reverse_drift(self, x: torch.Tensor, t: Time, score: torch.Tensor, probability_flow: bool = False
                      ) -> torch.Tensor:
        """f(t) x - c g(t)^2 score: the reverse-SDE drift (c = 1, Song et al. 2021, eq. 6) or the probability-flow
        drift (c = 1/2, eq. 13), given the score's value at (x, t)."""
        t = self.check_time_for(x, t)
        c = 0.5 if probability_flow else 1.0
        return bcast(self.drift_coeff(t), x) * x - bcast(c * self.diffusion(t) ** 2, x) * score

    def marginal_prob(self, x0: torch.Tensor, t: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel p_0t(x_t | x_0) = N(mean, std^2 I): returns (m(t) x_0, s(t)) with std of t's shape."""
        t = self.check_time_for(x0, t)
        return bcast(self.mean_coeff(t), x0) * x0, self.std(t)

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

    def prior_sample(self, shape: Sequence[int], *, seed: Seed = None, dtype: torch.dtype = torch.float32,
                     device=None, generator: Seed = None) -> torch.Tensor:
        """Draws from the prior N(0, prior_std^2 I), shape (B, ...); example i depends only on its seed.

        ``seed``: as in :func:`sdegen.sample` (an int, a (B,) integer tensor, a torch.Generator, or None for torch's
        global generator); ``generator`` is its deprecated name (DeprecationWarning; both: ValueError).
        """
        seed, _ = renamed("SDE.prior_sample", "seed", seed, "generator", generator)
        shape = tuple(shape)
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"shape must be (B, ...) with B >= 1; got {shape}.")
        check_floating_dtype(dtype, "dtype", "the prior is continuous")
        seeds = make_seeds(seed, shape[0], None if device is None else check_device(device))
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
    def reverse(self, score, probability_flow: bool = False, event_shape: Optional[Sequence[int]] = None,
                sde_type: str = "ito"):
        """Reverse-time SDE dx = [f - g^2 s] dt + g dw-bar (Song et al. 2021, eq. 6); see :class:`ReverseSDE`.
        ``sde_type``: what torchsde reads ("ito", or "stratonovich" for its heun, midpoint and euler_heun); the
        noise is additive, so both readings are the same equation."""
        from .models import resolve_score  # models build on SDEs: imported when first needed

        return ReverseSDE(self, resolve_score(score, self), probability_flow=probability_flow,
                          event_shape=event_shape, sde_type=sde_type)

    def probability_flow(self, score, t_clamp: Optional[Tuple[float, float]] = None):
        """Probability-flow ODE dx = [f - 1/2 g^2 s] dt (Song et al. 2021, eq. 13); see :class:`ProbabilityFlowODE`."""
        from .models import resolve_score

        return ProbabilityFlowODE(self, resolve_score(score, self), t_clamp=t_clamp)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if not isinstance(v, (list, tuple)))
        return f"{type(self).__name__}({fields})"


SDE.drift_coeff = _takes_checked_time(SDE.drift_coeff)
SDE.diffusion = _takes_checked_time(SDE.diffusion)


def _check_span(T: float, t_min: float, T_max: float = math.inf, T_open: bool = False) -> Tuple[float, float]:
    """Validate the time span: 0 < T <= T_max (< T_max when T_open) and 0 < t_min < T."""
    ok = _is_real(T) and math.isfinite(T) and 0 < T and (T < T_max if T_open else T <= T_max)
    if not ok:
        raise ValueError(f"T must be a number in (0, {T_max:g}{')' if T_open else ']'}; got {T!r}.")
    if not (_is_real(t_min) and 0.0 < t_min < T):
        raise ValueError(f"t_min must be a number in (0, T={float(T):g}); got {t_min!r}.")
    return float(T), float(t_min)


def _is_real(v: Any) -> bool:
    """A real number (Python, NumPy or a 0-d tensor's item), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integral_linear(t: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    # int_0^t beta(u) du for beta(u) = b0 + u (b1 - b0)
    return t * (b0 + 0.5 * t * (b1 - b0))


def _inverse_integral_linear(B: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    # the t >= 0 solving b0 t + (b1 - b0) t^2 / 2 = B, in the cancellation-free form
    return 2.0 * B / (b0 + torch.sqrt(b0 * b0 + 2.0 * (b1 - b0) * B))


class VPSDE(SDE):
    """Variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11), with the
    linear schedule beta(t) = beta_min + t (beta_max - beta_min) (the continuous DDPM).

    Kernel: m(t) = exp(-1/2 B(t)), s(t) = sqrt(-expm1(-B(t))), B(t) = int_0^t beta. ``VPSDE(schedule="cosine",
    cosine_s=..., T=...)`` builds a :class:`CosineVPSDE`. The VP family shares :meth:`integral_beta`, :meth:`beta`
    and the inverse of B; a new beta schedule subclasses VPSDE and implements ``integral_beta``, ``beta`` and
    ``t_from_integral_beta``.
    """

    prior_std = 1.0

    def __new__(cls, *args, schedule: str = "linear", **kwargs):
        if cls is VPSDE and schedule == "cosine":
            return super().__new__(CosineVPSDE)
        return super().__new__(cls)

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, schedule: str = "linear",
                 T: Optional[float] = None, t_min: float = 1e-3):
        if schedule != "linear":
            valid = "'linear' or 'cosine'" if type(self) is VPSDE else "'linear'"
            raise ValueError(f"schedule of {type(self).__name__} must be {valid}; got {schedule!r}.")
        if not (_is_real(beta_min) and math.isfinite(beta_min) and beta_min >= 0):
            raise ValueError(f"beta_min must be a finite number >= 0; got {beta_min!r}.")
        if not (_is_real(beta_max) and math.isfinite(beta_max) and beta_max > beta_min):
            raise ValueError(f"beta_min must be < beta_max (both finite); got beta_min={beta_min!r}, "
                             f"beta_max={beta_max!r}.")
        self.T, self.t_min = _check_span(1.0 if T is None else T, t_min, 1.0)
        self.beta_min, self.beta_max, self.schedule = float(beta_min), float(beta_max), "linear"

    def config(self) -> Dict[str, Any]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T, "t_min": self.t_min}

    def integral_beta(self, t: Time) -> torch.Tensor:
        """B(t) = int_0^t beta(u) du = -2 log m(t)."""
        return _integral_linear(self.check_time(t), self.beta_min, self.beta_max)

    def beta(self, t: Time) -> torch.Tensor:
        """beta(t) = -2 d log m / dt."""
        return self.beta_min + self.check_time(t) * (self.beta_max - self.beta_min)

    def t_from_integral_beta(self, B: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`integral_beta`."""
        return _inverse_integral_linear(B, self.beta_min, self.beta_max)

    def log_mean_coeff(self, t):
        return -0.5 * self.integral_beta(t)

    def std(self, t):
        return torch.sqrt(-torch.expm1(-self.integral_beta(t)))

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def transition_var(self, t_from, t_to):
        # b^2 = 1 - a^2 for a variance-preserving process
        return -torch.expm1(-(self.integral_beta(t_to) - self.integral_beta(t_from)))

    def t_from_log_snr(self, lam):
        # m^2 = sigmoid(lam) for VP, so B = -log m^2 = softplus(-lam); lam = -inf (sigma = inf) is T
        B = _softplus(-self._check_lam(lam))
        return torch.where(torch.isinf(B), torch.full_like(B, self.T), self.t_from_integral_beta(B)).clamp(0.0, self.T)


class CosineVPSDE(VPSDE):
    """The VP SDE of the cosine schedule alpha_bar(t) = cos^2(phi(t)) / cos^2(phi(0)), phi(t) = pi/2 (t + s)/(1 + s)
    (Nichol & Dhariwal 2021, eq. 17), with m(t) = sqrt(alpha_bar(t)). beta blows up at t = 1, so T defaults to
    0.9946 as in DPM-Solver (Lu et al. 2022, appendix). Also built by ``VPSDE(schedule="cosine")``.
    """

    def __init__(self, beta_min: Optional[float] = None, beta_max: Optional[float] = None, *, schedule: str = "cosine",
                 cosine_s: float = 0.008, T: Optional[float] = None, t_min: float = 1e-3):
        if schedule != "cosine":
            raise ValueError(f"CosineVPSDE has schedule 'cosine'; got {schedule!r}.")
        if beta_min is not None or beta_max is not None:
            raise ValueError(f"the cosine schedule has no beta_min or beta_max (its beta follows from cosine_s); got "
                             f"beta_min={beta_min!r}, beta_max={beta_max!r}: leave them unset.")
        check_positive(cosine_s, "cosine_s")
        self.T, self.t_min = _check_span(0.9946 if T is None else T, t_min, 1.0, T_open=True)
        self.cosine_s, self.schedule = float(cosine_s), "cosine"
        self._phi0 = 0.5 * math.pi * self.cosine_s / (1.0 + self.cosine_s)

    def config(self) -> Dict[str, Any]:
        return {"cosine_s": self.cosine_s, "T": self.T, "t_min": self.t_min}

    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi * (t + self.cosine_s) / (1.0 + self.cosine_s)

    def integral_beta(self, t: Time) -> torch.Tensor:
        t = self.check_time(t)
        return -2.0 * (torch.log(torch.cos(self._phi(t))) - math.log(math.cos(self._phi0)))

    def beta(self, t: Time) -> torch.Tensor:
        return 2.0 * torch.tan(self._phi(self.check_time(t))) * (0.5 * math.pi / (1.0 + self.cosine_s))

    def std(self, t):
        # s^2 = 1 - cos^2(phi)/cos^2(phi0) = sin(phi - phi0) sin(phi + phi0) / cos^2(phi0), with phi - phi0 =
        # pi/2 t/(1 + s) formed directly: no cancellation at t -> 0, and s(0) = 0 in every dtype
        rise = torch.sin(0.5 * math.pi * t / (1.0 + self.cosine_s))
        return torch.sqrt(rise * torch.sin(self._phi(t) + self._phi0)) / math.cos(self._phi0)

    def t_from_integral_beta(self, B: torch.Tensor) -> torch.Tensor:
        # cos(phi) = e^{-B/2} cos(phi0); atan2 with sin^2(phi) = sin^2(phi0) - cos^2(phi0) expm1(-B) keeps
        # precision near t = 0
        c0 = math.cos(self._phi0)
        sin_phi = torch.sqrt((1.0 - c0 * c0) - c0 * c0 * torch.expm1(-B))
        phi = torch.atan2(sin_phi, torch.exp(-0.5 * B) * c0)
        return phi * (1.0 + self.cosine_s) / (0.5 * math.pi) - self.cosine_s


class SubVPSDE(VPSDE):
    """Sub-VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021, eq. 12),
    linear beta schedule.

    Kernel: m(t) = exp(-B/2) and standard deviation s(t) = 1 - exp(-B) (not its square), B = int_0^t beta.
    """

    def std(self, t):
        return -torch.expm1(-self.integral_beta(t))

    def diffusion(self, t):
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.integral_beta(t)))

    def transition_var(self, t_from, t_to):
        return SDE.transition_var(self, t_from, t_to)

    def t_from_log_snr(self, lam):
        # sigma = s/m = 1/m - m, so 1/m = sigma/2 + sqrt(sigma^2/4 + 1) and B = -2 log m = 2 asinh(sigma / 2):
        # no cancellation at small t, and sigma = 0 or inf (lam = +-inf) give B = 0 or inf
        B = 2.0 * torch.asinh(0.5 * torch.exp(-0.5 * self._check_lam(lam)))
        return torch.where(torch.isinf(B), torch.full_like(B, self.T), self.t_from_integral_beta(B)).clamp(0.0, self.T)


class VESDE(SDE):
    """Variance-exploding SDE dx = sqrt(d[sigma(t)^2]/dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t
    (Song et al. 2021, eq. 9 / 30). Prior N(0, sigma(T)^2 I). Two kernels, the same diffusion:

    - ``kernel="exact"`` (default): the SDE started at x_0 at t = 0, m(t) = 1 and
      s(t)^2 = sigma(t)^2 - sigma_min^2 = sigma_min^2 expm1(2 t log(sigma_max/sigma_min)), so s(0) = 0;
    - ``kernel="paper"``: s(t) = sigma(t), the noise levels the score-SDE paper's VE (NCSN++) checkpoints were
      trained on (its code perturbs with std sigma(t)); s(0) = sigma_min > 0. Use it to drive those networks
      at exactly their training noise levels (at t = 0.1 the two differ by 10% with the default sigmas).
    """

    KERNELS = ("exact", "paper")

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, *, T: float = 1.0, t_min: float = 1e-5,
                 kernel: str = "exact"):
        check_positive(sigma_min, "sigma_min")
        check_positive(sigma_max, "sigma_max")
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}; got {kernel!r}.")
        self.T, self.t_min = _check_span(T, t_min)
        self.sigma_min, self.sigma_max, self.kernel = float(sigma_min), float(sigma_max), kernel
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.prior_std = self.sigma_min * math.exp(self._log_ratio * self.T)

    def config(self) -> Dict[str, Any]:
        cfg = {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T, "t_min": self.t_min}
        return cfg if self.kernel == "exact" else {**cfg, "kernel": self.kernel}

    def noise_level(self, t: Time) -> torch.Tensor:
        """The SMLD noise level sigma_min (sigma_max/sigma_min)^t (the "paper" kernel's std)."""
        return self.sigma_min * torch.exp(self._log_ratio * self.check_time(t))

    def log_mean_coeff(self, t):
        return torch.zeros_like(t)

    def std(self, t):
        if self.kernel == "paper":
            return self.sigma_min * torch.exp(self._log_ratio * t)
        return self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._log_ratio * t))

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * t) * math.sqrt(2.0 * self._log_ratio)

    def transition_var(self, t_from, t_to):
        t_from, t_to = self.check_time(t_from, "t_from"), self.check_time(t_to, "t_to")
        return self.sigma_min**2 * torch.exp(2.0 * self._log_ratio * t_from) * torch.expm1(
            2.0 * self._log_ratio * (t_to - t_from))

    def t_from_log_snr(self, lam):
        lam = self._check_lam(lam)
        if self.kernel == "paper":  # s = e^{-lam/2} = sigma_min r^t; levels below sigma_min map to t = 0
            return ((-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio).clamp(0.0, self.T)
        # s^2 = e^{-lam} = sigma_min^2 expm1(2 t log r)
        return (torch.log1p(torch.exp(-lam) / self.sigma_min**2) / (2.0 * self._log_ratio)).clamp(0.0, self.T)


class EDMSDE(SDE):
    """The SDE of EDM (Karras et al. 2022, table 1): m(t) = 1, s(t) = sigma(t) = t, so dx = sqrt(2 t) dw and the
    time is the noise level itself, from T = sigma_max down to t_min = sigma_min. Prior N(0, sigma_max^2 I)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        check_positive(sigma_min, "sigma_min")
        check_positive(sigma_max, "sigma_max")
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.T, self.t_min, self.prior_std = self.sigma_max, self.sigma_min, self.sigma_max

    def config(self) -> Dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def log_mean_coeff(self, t):
        return torch.zeros_like(t)

    def std(self, t):
        return t.clone()

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return torch.sqrt(2.0 * t)

    def transition_var(self, t_from, t_to):
        return self.check_time(t_to, "t_to") ** 2 - self.check_time(t_from, "t_from") ** 2

    def t_from_log_snr(self, lam):
        return torch.exp(-0.5 * self._check_lam(lam)).clamp(max=self.T)

    def t_from_sigma(self, sigma):
        sigma = as_time(sigma, "sigma")
        check_range(sigma, 0.0, math.inf, "sigma")
        return sigma.clamp(max=self.T)


class FlowSDE(SDE):
    """The rectified-flow / flow-matching interpolation x_t = (1 - t) x_0 + t eps (Liu et al. 2022; Lipman et al.
    2023; the convention of Stable Diffusion 3): m(t) = 1 - t, s(t) = t, f = -1/(1 - t), g^2 = 2 t / (1 - t).
    A flow-matching network predicts the velocity v = eps - x_0 (``ScoreModel(net, FlowSDE(), prediction="flow")``),
    and every ODE sampler of sdegen applies. m(1) = 0 makes t = 1 singular for samplers that work in the
    log-SNR, so T = 0.999 by default (the prior N(0, T^2 I) then ignores a (1 - T) x_0 of the data).
    """

    def __init__(self, *, T: float = 0.999, t_min: float = 1e-3):
        self.T, self.t_min = _check_span(T, t_min, 1.0, T_open=True)
        self.prior_std = self.T

    def config(self) -> Dict[str, Any]:
        return {"T": self.T, "t_min": self.t_min}

    def log_mean_coeff(self, t):
        return torch.log1p(-t)

    def std(self, t):
        return t.clone()

    def drift_coeff(self, t):
        return -1.0 / (1.0 - t)

    def diffusion(self, t):
        return torch.sqrt(2.0 * t / (1.0 - t))

    def t_from_log_snr(self, lam):
        # lam = 2 log((1 - t) / t)  =>  t = sigmoid(-lam / 2)
        return torch.sigmoid(-0.5 * self._check_lam(lam)).clamp(max=self.T)

    def t_from_sigma(self, sigma):
        sigma = as_time(sigma, "sigma")
        check_range(sigma, 0.0, math.inf, "sigma")
        t = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1.0 + sigma))
        return t.clamp(max=self.T)

    def _t_max(self, dtype: torch.dtype) -> float:
        # a coarse dtype's allowance above T must stay below t = 1, where m = 1 - t vanishes
        return min(super()._t_max(dtype), 0.5 * (self.T + 1.0))


class DiscreteVPSDE(SDE):
    """A VP SDE through the noise levels of a discrete DDPM table alpha_bar_0 > ... > alpha_bar_{N-1}
    (``alphas_cumprod`` of diffusers' schedulers), so that a network trained on timesteps 0..N-1 is evaluated
    at exactly its training noise levels.

    Timestep i sits at t_i = (i + 1) / N (t = 0 is the clean data, T = 1 the last timestep; t_min = t_0); see
    :meth:`timestep` and :meth:`time_of_timestep`. Between t_i and t_{i+1} the log-SNR log(alpha_bar/(1 - alpha_bar))
    is linear in t, which is linear in log sigma, sigma = sqrt((1 - alpha_bar)/alpha_bar), as diffusers
    interpolates between timesteps; on [0, t_0] beta is constant (B = -log alpha_bar linear, from 0).
    m = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), and g^2 = beta = -2 f, as for every VP process.
    beta is therefore a step function of t, jumping at every timestep: in t the probability flow has N
    discontinuities that an adaptive Runge-Kutta error estimate does not see, so torchdiffeq's solvers integrate it
    in log sigma, where it is smooth (``smooth_in_t = False``).
    """

    prior_std = 1.0
    t_min_is_earliest = True  # timestep 0 of the table: its networks have seen no earlier time
    smooth_in_t = False

    def __init__(self, alphas_cumprod, *, t_min: Optional[float] = None):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 values (one per timestep); got shape "
                             f"{tuple(ab.shape)}.")
        if not bool(torch.isfinite(ab).all()):
            raise ValueError("alphas_cumprod must be finite; it holds NaN or inf at timesteps "
                             f"{torch.nonzero(~torch.isfinite(ab)).flatten().tolist()[:8]}.")
        if not (bool((ab > 0).all()) and bool((ab < 1).all()) and bool((ab[1:] < ab[:-1]).all())):
            head = ab[:-1]
            if (bool((head > 0).all()) and bool((head < 1).all()) and bool((head[1:] < head[:-1]).all())
                    and not 0 < ab[-1] < ab[-2]):
                raise ValueError(
                    f"alphas_cumprod ends at {float(ab[-1]):.3g}, after {float(ab[-2]):.3g}: a zero-terminal-SNR "
                    "table (diffusers' rescale_betas_zero_snr=True; its sigma schedulers store 2^-24 instead of 0). "
                    "A diffusion here has m(T) > 0 and a finite log-SNR: give the last timestep a small positive "
                    f"alpha_bar below {float(ab[-2]):.3g} (from_diffusers(..., terminal_alpha_bar=v) does it), which "
                    "changes m at T by sqrt(v).")
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1) (a DDPM alpha_bar table).")
        self.alphas_cumprod, self.num_timesteps = ab, ab.numel()
        if float(ab[-1]) > 0.01:  # m(T) > 0.1: p_T keeps a visible share of the data
            warnings.warn(f"alphas_cumprod ends at {float(ab[-1]):.3g} (m(T) = {float(ab[-1]) ** 0.5:.2f}): the prior "
                          "N(0, I) that sampling and log_likelihood start from is not p_T, and samples, guidance and "
                          "likelihoods inherit the gap (betas tuned for 1000 timesteps give this on short tables); "
                          "use a table that ends near zero SNR, or start sampling from draws of p_T.", UserWarning,
                          stacklevel=2)
        self._lam = torch.log(ab) - torch.log1p(-ab)  # the log-SNR of every timestep, decreasing
        # each segment's rise lam_{i+1} - lam_i, taken in float64: the difference of two log-SNRs already rounded
        # to float32 lost up to 300 eps of the slope
        self._rise = torch.cat([torch.diff(self._lam), torch.zeros(1, dtype=torch.float64)])
        self._b0 = float(-torch.log(ab[0]))  # B = -log alpha_bar at t_0
        self.T = 1.0
        self.t_min = _check_span(1.0, 1.0 / self.num_timesteps if t_min is None else t_min)[1]
        self._on_device: Dict[Any, torch.Tensor] = {}

    @classmethod
    def from_betas(cls, betas, **kwargs) -> "DiscreteVPSDE":
        """From a DDPM beta table: alpha_bar_i = prod_{j <= i} (1 - beta_j)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0), **kwargs)

    def config(self) -> Dict[str, Any]:
        cfg = {"alphas_cumprod": self.alphas_cumprod.tolist()}
        return cfg if self.t_min == 1.0 / self.num_timesteps else {**cfg, "t_min": self.t_min}

    def __repr__(self) -> str:
        return f"DiscreteVPSDE(num_timesteps={self.num_timesteps}, t_min={self.t_min:g})"

    def timestep(self, t: Time) -> torch.Tensor:
        """The (fractional) timestep index t N - 1 of time t; exactly the integer k at the table's own times
        t = (k + 1) / N, also in float32 (which cannot represent them: t N carries a round-off of a few eps)."""
        k = self.check_time(t) * self.num_timesteps - 1.0
        nearest = torch.round(k)
        return torch.where((k - nearest).abs() <= 4.0 * self.num_timesteps * torch.finfo(k.dtype).eps, nearest, k)

    def time_of_timestep(self, i) -> torch.Tensor:
        """t_i = (i + 1) / N for timesteps i (an int, a sequence or a tensor), as float64."""
        i = torch.as_tensor(i, dtype=torch.float64)
        if bool(((i < 0) | (i > self.num_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]; got {i.tolist()}.")
        return (i + 1.0) / self.num_timesteps

    def _table(self, like: torch.Tensor, rise: bool = False) -> torch.Tensor:
        """The timesteps' log-SNRs (or, with ``rise``, each segment's rise) in like's dtype, on its device."""
        key = (like.device, like.dtype, rise)
        if key not in self._on_device:
            self._on_device[key] = (self._rise if rise else self._lam).to(device=like.device, dtype=like.dtype)
        return self._on_device[key]

    def _segment(self, t: torch.Tensor):
        """(lam, dlam/dt, first) at t: the interpolated log-SNR, its slope, and whether t lies in [0, t_0]."""
        lam_k, rise_k = self._table(t), self._table(t, rise=True)
        n = self.num_timesteps
        pos = t * n - 1.0
        i = pos.floor().clamp(0, n - 2).long()
        rise = rise_k[i]
        lam = lam_k[i] + (pos - i.to(t.dtype)) * rise
        return lam, rise * n, pos < 0

    def integral_beta(self, t: Time) -> torch.Tensor:
        """B(t) = -log alpha_bar(t) = -2 log m(t)."""
        t = self.check_time(t)
        lam, _, first = self._segment(t)
        return torch.where(first, t * (self.num_timesteps * self._b0), _softplus(-lam))

    def log_mean_coeff(self, t):
        return -0.5 * self.integral_beta(t)

    def std(self, t):
        return torch.sqrt(-torch.expm1(-self.integral_beta(t)))

    def drift_coeff(self, t):
        lam, slope, first = self._segment(t)
        # log m = 1/2 log sigmoid(lam): d/dt = 1/2 sigmoid(-lam) dlam/dt
        return torch.where(first, torch.full_like(t, -0.5 * self.num_timesteps * self._b0),
                           0.5 * torch.sigmoid(-lam) * slope)

    def diffusion(self, t):
        return torch.sqrt(-2.0 * self.drift_coeff(t))

    def transition_var(self, t_from, t_to):
        return -torch.expm1(-(self.integral_beta(t_to) - self.integral_beta(t_from)))

    def t_from_log_snr(self, lam):
        lam = self._check_lam(lam)
        lam_k, n = self._table(lam), self.num_timesteps
        # lam_k decreases: the segment [i, i + 1] with lam_k[i] >= lam > lam_k[i + 1]
        i = (torch.searchsorted(-lam_k, -lam.contiguous(), right=False) - 1).clamp(0, n - 2)
        lo, hi = lam_k[i], lam_k[i + 1]
        t_seg = (i.to(lam.dtype) + 1.0 + (lam - lo) / (hi - lo)) / n
        t_first = _softplus(-lam) / (n * self._b0)
        return torch.where(lam > lam_k[0], t_first, t_seg).clamp(0.0, self.T)


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
        t = self.sde.check_time_for(x, t)
        s = self.score(x, batch_time(t, x).to(x.dtype))
        return self.sde.reverse_drift(x, t, s, self.probability_flow)

    def diffusion(self, t: Time) -> torch.Tensor:
        t = self.sde.check_time(t)
        return torch.zeros_like(t) if self.probability_flow else self.sde.diffusion(t)

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
        g = self.diffusion(t)
        if g.device != y.device:
            if g.numel() == 1 and g.device.type == "cpu":  # a host clock: its value, broadcast on y's device
                return y.new_full((1,) * y.ndim, float(g)).expand(y.shape)
            g = g.to(y.device)
        return (g if g.ndim == 0 else g.reshape((-1,) + (1,) * (y.ndim - 1))).to(y.dtype).expand(y.shape)


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
        t = self.sde.check_time_for(x, t)
        return self.sde.reverse_drift(x, t, self.score(x, batch_time(t, x).to(x.dtype)), True)


def _constructor_signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.__init__`` without ``self``: what ``inspect.signature`` and ``help`` show for the VP
    classes, whose ``__new__`` (which turns ``VPSDE(schedule="cosine")`` into a CosineVPSDE) would hide it."""
    sig = inspect.signature(cls.__init__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


for _cls in (VPSDE, CosineVPSDE, SubVPSDE):
    _cls.__signature__ = _constructor_signature(_cls)
