"""Exact oracles: distributions whose perturbed marginals, scores and log-densities are known in closed form.

Under a linear SDE with kernel N(m(t) x_0, s(t)^2 I), a Gaussian mixture sum_k w_k N(mu_k, Sigma_k)
has the marginal p_t = sum_k w_k N(m mu_k, m^2 Sigma_k + s^2 I), so its score and log-density are
exact at every t. Tests and benchmarks use it as ground truth.

Its time-dependent methods take the SDE first, as the rest of the library does (``sdegen.sample(sde, model, ...)``,
``sdegen.log_likelihood(sde, model, x)``): ``score(sde, x, t)``, ``log_prob(sde, x, t)``,
``responsibilities(sde, x, t)``, ``marginal(sde, t)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ._deprecation import renamed
from ._util import Time, as_time, check_batch, check_finite_tensor
from ._validate import check_device, check_finite, check_floating_dtype, check_int, check_number
from .noise import torch_generator
from .sde import SDE

_LOG_2PI = math.log(2.0 * math.pi)


def _sde_first(*old_order: str):
    """Let a method written as f(self, sde, ...) also take the argument order ``old_order`` (the SDE last), which
    it detects by a first positional argument that is not an SDE (nor None) and accepts with a DeprecationWarning.
    A call with the SDE and every time left out (``log_prob(x)``: the data density) involves no SDE to place and
    does not warn."""
    def decorate(method):
        name = method.__name__

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if not args or args[0] is None or isinstance(args[0], SDE):
                return method(self, *args, **kwargs)
            if len(args) > len(old_order):
                raise TypeError(f"GaussianMixture.{name}() takes at most {len(old_order)} positional arguments "
                                f"after self; got {len(args)}.")
            given = dict(zip(old_order, args))
            for key, value in kwargs.items():
                if key in given:
                    raise TypeError(f"GaussianMixture.{name}() got multiple values for argument {key!r}.")
                given[key] = value
            if any(given.get(key) is not None for key in old_order[1:]):
                sde_first = ", ".join(("sde",) + tuple(k for k in old_order if k != "sde"))
                warnings.warn(f"GaussianMixture.{name}({', '.join(old_order)}) is deprecated and will be removed "
                              f"in the next release; pass the SDE first: {name}({sde_first}).", DeprecationWarning,
                              stacklevel=2)
            return method(self, **{"sde": None, **given})

        return call

    return decorate


def nan_for_nonfinite_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a function of (B, ...) states whose rows are independent, with the rows of x that hold a NaN or an
    infinity (an example whose solve has failed) evaluated at 0 and returned as NaN: the other rows are exact, and
    a solve can finish or set the failed example aside instead of the oracle refusing the whole batch."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    out = fn(torch.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), torch.zeros_like(x), x))
    return torch.where(bad.reshape((-1,) + (1,) * (out.ndim - 1)), torch.full_like(out, math.nan), out)


def _real_parameter(value, name: str) -> torch.Tensor:
    """A mixture parameter as a float64 tensor; complex and bool values are refused (a cast would drop or invent)."""
    if isinstance(value, np.ndarray):
        bad = value.dtype.kind in "cb"
    else:  # a tensor, or a (nested) list of numbers or tensors: the dtype torch infers for it
        kind = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        bad = kind.is_complex() or kind.dtype == torch.bool
    if bad:
        raise TypeError(f"{name} must hold real numbers; got {getattr(value, 'dtype', None) or 'complex or bool'}.")
    return torch.as_tensor(value, dtype=torch.float64)


class GaussianMixture:
    """A mixture sum_k w_k N(mu_k, Sigma_k) in R^d with exact p_t under any :class:`sdegen.SDE`.

    Args:
        weights: (K,) non-negative, normalised here.
        means: (K, d).
        covs: (K, d, d) symmetric positive semi-definite, or (K, d) diagonals, or (K,) isotropic variances.

    States may have any shape (B, ...) whose trailing size is d; computations run in float64 and
    results come back in x's dtype and device. Pass the mixture wherever a score is expected:
    ``sdegen.sample(sde, mixture, ...)`` uses its exact score under that sde.

    Time-dependent methods take ``(sde, x, t)``: p_t is the marginal at time t under ``sde``; t=None (with or
    without an SDE) means the data distribution p_0, the mixture itself, and ``log_prob(x)``, ``score(x)`` and
    ``responsibilities(x)`` are shorthand for it. The order (x, t, sde) is deprecated (DeprecationWarning).
    """

    def __init__(self, weights, means, covs):
        means = _real_parameter(means, "means").clone()  # its own copy: the caller's stays theirs
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}.")
        check_finite(means, "means")
        K, d = means.shape
        weights = _real_parameter(weights, "weights")
        if weights.shape == (K,):
            check_finite(weights, "weights")
        if weights.shape != (K,) or bool((weights < 0).any()) or not bool(weights.sum() > 0):
            raise ValueError(f"weights must be ({K},) non-negative with a positive sum; got {weights.tolist()}.")
        covs = _real_parameter(covs, "covs").clone()
        if covs.shape == (K,):
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covs.shape == (K, d):
            covs = torch.diag_embed(covs)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), ({K}, {d}) or ({K},); got {tuple(covs.shape)}.")
        check_finite(covs, "covs")
        if not torch.allclose(covs, covs.transpose(-1, -2), atol=1e-10):
            raise ValueError("covs must be symmetric.")
        evals, evecs = torch.linalg.eigh(covs)
        if bool((evals < -1e-10).any()):
            raise ValueError(f"covs must be positive semi-definite; smallest eigenvalue {evals.min().item():.3g}.")
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        self._evals, self._evecs = evals.clamp_min(0.0), evecs
        self._singular = bool((self._evals <= 0).any())  # then p_0 itself has no density
        self.dim, self.n_components = d, K
        self._versions = self._parameter_versions()  # the parameters are fixed from here on

    _PARAMETERS = ("weights", "means", "covs", "dim", "n_components")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PARAMETERS and "_versions" in self.__dict__:
            raise AttributeError(f"GaussianMixture.{name}: a mixture's parameters are fixed once it is built (its "
                                 "eigendecompositions and device copies are made from them); build a new "
                                 "GaussianMixture instead.")
        object.__setattr__(self, name, value)

    def _parameter_versions(self) -> tuple:
        return tuple(getattr(self, n)._version for n in ("weights", "means", "covs"))

    def __setstate__(self, state: dict) -> None:
        # a copy (copy.deepcopy, pickle, torch.load) holds new tensors, whose version counters start afresh
        self.__dict__.update(state)
        self.__dict__["_versions"] = self._parameter_versions()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 1.0, radial_std: float = 0.05, tangential_std: float = 0.02
             ) -> "GaussianMixture":
        """2-D ring of ``n_modes`` equal-weight anisotropic Gaussians (narrow along the ring's tangent)."""
        check_int(n_modes, "n_modes", lo=1)
        check_number(radius, "radius", lo=0.0)
        check_number(radial_std, "radial_std", lo=0.0)
        check_number(tangential_std, "tangential_std", lo=0.0)
        ang = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        u = torch.stack([torch.cos(ang), torch.sin(ang)], 1)  # radial directions
        v = torch.stack([-torch.sin(ang), torch.cos(ang)], 1)
        covs = radial_std**2 * u[:, :, None] * u[:, None, :] + tangential_std**2 * v[:, :, None] * v[:, None, :]
        return cls(torch.full((n_modes,), 1.0 / n_modes), radius * u, covs)

    @classmethod
    def random(cls, dim: int = 16, n_components: int = 6, *, seed: int = 0, mean_scale: float = 1.0,
               cov_scale: float = 0.1) -> "GaussianMixture":
        """Random weights, means N(0, mean_scale^2 I) and full covariances cov_scale^2 A A^T / d + small ridge."""
        check_int(dim, "dim", lo=1)
        check_int(n_components, "n_components", lo=1)
        check_number(mean_scale, "mean_scale", lo=0.0)
        check_number(cov_scale, "cov_scale", lo=0.0, lo_open=True)
        g = torch_generator(seed, "seed")
        w = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.5
        mu = mean_scale * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        A = torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64)
        covs = cov_scale**2 * (A @ A.transpose(-1, -2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64))
        return cls(w, mu, covs)

    # ---------------------------------------------------------------- marginals
    def _coeffs(self, sde: Optional[SDE], t: Optional[Time], x: Optional[torch.Tensor] = None):
        """(m, s^2) as float64 tensors of shape (B or 1,), for the marginal at time t (t=None: the data)."""
        if t is None:
            one = torch.ones(1, dtype=torch.float64)
            return one, torch.zeros(1, dtype=torch.float64)
        if sde is None:
            raise ValueError("sde must be given with t (the marginal at time t depends on the SDE).")
        t = sde.check_time(t)
        if x is not None:
            check_batch(t, x)
        # a float32 time may exceed T by its round-off (check_time allows it); in float64 it would not pass again
        t = t.to(torch.float64).reshape(-1).clamp(0.0, sde.T)
        return torch.exp(sde.log_mean_coeff(t)), sde.std(t) ** 2

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, ...) with {self.dim} values per example; got {tuple(x.shape)}.")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _component_terms(self, x: torch.Tensor, sde, t):
        """Per-component log(w_k N(x; m mu_k, C_k)) (B, K), and C_k^{-1}(x - m mu_k) (B, K, d)."""
        xf = self._flat(x)
        m, s2 = self._coeffs(sde, t, x)
        if self._singular and s2.device.type == "cpu" and bool((s2 == 0).any()):
            raise ValueError("the mixture has a singular covariance (an eigenvalue 0), so the distribution at s(t) = 0 "
                             "(t=None or t = 0) has no density: its log_prob and score are undefined there; evaluate "
                             "at a t with s(t) > 0, or give every component a positive variance.")
        evals, evecs, means, log_w = self._on(xf.device)
        if m.numel() == 1 and m.device.type == "cpu" and not m.requires_grad:  # a host time: Python scalars
            m, s2 = float(m), float(s2)
        else:
            m, s2 = m.to(xf.device)[:, None, None], s2.to(xf.device)[:, None, None]
        lam = m**2 * evals[None] + s2  # (B|1, K, d)
        diff = xf[:, None, :] - m * means[None]  # (B, K, d)
        y = torch.einsum("kdj,bkd->bkj", evecs, diff)  # eigenbasis coordinates
        logn = -0.5 * ((y**2 / lam).sum(-1) + torch.log(lam).sum(-1) + self.dim * _LOG_2PI)
        prec_diff = torch.einsum("kdj,bkj->bkd", evecs, y / lam)
        return log_w[None] + logn, prec_diff

    def _on(self, device: torch.device):
        """(eigenvalues, eigenvectors, means, log weights) on ``device``, copied there once per device."""
        if self._parameter_versions() != self._versions:
            raise ValueError("the GaussianMixture's weights, means or covs were modified in place after it was built; "
                             "its eigendecompositions and device copies come from the values it was built with: "
                             "build a new GaussianMixture instead.")
        held = self.__dict__.setdefault("_device_copies", {})
        if device not in held:
            held[device] = tuple(v.to(device) for v in (self._evals, self._evecs, self.means,
                                                        torch.log(self.weights)))
        return held[device]

    @_sde_first("x", "t", "sde")
    def log_prob(self, sde: Optional[SDE], x: torch.Tensor, t: Optional[Time] = None) -> torch.Tensor:
        """Exact log p_t(x) under ``sde``, shape (B,); t=None gives the data density p_0 = the mixture itself."""
        check_finite_tensor(x)
        logc, _ = self._component_terms(x, sde, t)
        return torch.logsumexp(logc, dim=1).to(x.dtype)

    @_sde_first("x", "t", "sde")
    def responsibilities(self, sde: Optional[SDE], x: torch.Tensor, t: Optional[Time] = None) -> torch.Tensor:
        """Posterior component probabilities p_t(k | x) under ``sde``, shape (B, K) (t=None: at the data)."""
        check_finite_tensor(x)
        logc, _ = self._component_terms(x, sde, t)
        return torch.softmax(logc, dim=1).to(x.dtype)

    @_sde_first("x", "t", "sde")
    def score(self, sde: Optional[SDE], x: torch.Tensor, t: Optional[Time] = None) -> torch.Tensor:
        """Exact grad_x log p_t(x) under ``sde``, same shape as x (t=None: the score of the data density)."""
        check_finite_tensor(x)
        return self._score(sde, x, t)

    def _score(self, sde: Optional[SDE], x: torch.Tensor, t: Optional[Time]) -> torch.Tensor:
        logc, prec_diff = self._component_terms(x, sde, t)
        r = torch.softmax(logc, dim=1)
        return -(r[:, :, None] * prec_diff).sum(1).reshape(x.shape).to(x.dtype)

    def score_fn(self, sde: SDE):
        """The exact score under ``sde`` as a callable ``score(x, t)``: the form every sampler accepts.

        It is a model in the sense of the samplers: example i's output depends only on x[i], and a state with a NaN
        or an infinity has no score, so its row comes back NaN while the other rows are exact. A solve in which one
        example has failed can then finish, or set that example aside, without the oracle refusing the whole batch
        (:meth:`score` itself refuses NaN input)."""
        def exact_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
                return self.score(sde, x, t)  # its message says what x must be
            return nan_for_nonfinite_rows(lambda z: self._score(sde, z, t), x)
        return exact_score

    @_sde_first("t", "sde")
    def marginal(self, sde: SDE, t: Time) -> "GaussianMixture":
        """The mixture p_t under ``sde`` at a single time t (a float or 0-d tensor) as a new GaussianMixture."""
        t = as_time(t)
        if t.ndim != 0:
            raise ValueError("marginal needs a single time (float or 0-d tensor).")
        m, s2 = self._coeffs(sde, t)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, m * self.means, m**2 * self.covs + s2 * eye)

    def mean(self) -> torch.Tensor:
        """Mixture mean, (d,) float64."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Mixture covariance, (d, d) float64."""
        mu = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - mu[:, None] * mu[None, :]

    def sample(self, n: int, *, sde: Optional[SDE] = None, t: Optional[Time] = None,
               seed: Union[int, torch.Generator, None] = None, dtype: torch.dtype = torch.float64, device=None,
               return_components: bool = False, generator: Optional[torch.Generator] = None):
        """n exact draws from p_t under ``sde`` (from the mixture itself when t is None), shape (n, d).

        seed: an int (any size: taken modulo 2^64), a torch.Generator, or None (torch's global generator), as
            :func:`sdegen.noise.torch_generator` reads it; ``generator`` is its deprecated name.
        dtype: a floating dtype (an integer dtype raises TypeError: it would truncate every draw).
        With ``return_components=True`` also returns the (n,) component index of each draw.
        """
        if isinstance(n, bool) or not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be a positive int; got {n!r}.")
        check_floating_dtype(dtype)
        seed, name = renamed("GaussianMixture.sample", "seed", seed, "generator", generator)
        generator = torch_generator(seed, name)
        device = None if device is None else check_device(device)
        src = self if t is None else self.marginal(sde, t)
        k = torch.multinomial(src.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = src._evecs * src._evals.sqrt()[:, None, :]  # C^{1/2} = U diag(sqrt(lam))
        x = src.means[k] + torch.einsum("ndj,nj->nd", root[k], z)
        x = x.to(dtype=dtype, device=device)
        return (x, k.to(device)) if return_components else x
