"""Exact oracles: distributions whose perturbed marginals, scores and log-densities are known in closed form.

Under a linear SDE with kernel N(m(t) x_0, s(t)^2 I), a Gaussian mixture sum_k w_k N(mu_k, Sigma_k)
has the marginal p_t = sum_k w_k N(m mu_k, m^2 Sigma_k + s^2 I), so its score and log-density are
exact at every t. Tests and benchmarks use it as ground truth.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._util import Time, as_time, check_batch, check_finite_tensor
from .sde import SDE

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """A mixture sum_k w_k N(mu_k, Sigma_k) in R^d with exact p_t under any :class:`sdegen.SDE`.

    Args:
        weights: (K,) non-negative, normalised here.
        means: (K, d).
        covs: (K, d, d) symmetric positive semi-definite, or (K, d) diagonals, or (K,) isotropic variances.

    States may have any shape (B, ...) whose trailing size is d; computations run in float64 and
    results come back in x's dtype and device. Pass the mixture wherever a score is expected:
    ``sdegen.sample(sde, mixture, ...)`` uses its exact score under that sde.
    """

    def __init__(self, weights, means, covs):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}.")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or bool((weights < 0).any()) or not bool(weights.sum() > 0):
            raise ValueError(f"weights must be ({K},) non-negative with a positive sum; got {weights.tolist()}.")
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape == (K,):
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covs.shape == (K, d):
            covs = torch.diag_embed(covs)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), ({K}, {d}) or ({K},); got {tuple(covs.shape)}.")
        if not torch.allclose(covs, covs.transpose(-1, -2), atol=1e-10):
            raise ValueError("covs must be symmetric.")
        evals, evecs = torch.linalg.eigh(covs)
        if bool((evals < -1e-10).any()):
            raise ValueError(f"covs must be positive semi-definite; smallest eigenvalue {evals.min().item():.3g}.")
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        self._evals, self._evecs = evals.clamp_min(0.0), evecs
        self.dim, self.n_components = d, K

    # ---------------------------------------------------------------- constructors
    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 1.0, radial_std: float = 0.05, tangential_std: float = 0.02
             ) -> "GaussianMixture":
        """2-D ring of ``n_modes`` equal-weight anisotropic Gaussians (narrow along the ring's tangent)."""
        ang = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        u = torch.stack([torch.cos(ang), torch.sin(ang)], 1)  # radial directions
        v = torch.stack([-torch.sin(ang), torch.cos(ang)], 1)
        covs = radial_std**2 * u[:, :, None] * u[:, None, :] + tangential_std**2 * v[:, :, None] * v[:, None, :]
        return cls(torch.full((n_modes,), 1.0 / n_modes), radius * u, covs)

    @classmethod
    def random(cls, dim: int = 16, n_components: int = 6, *, seed: int = 0, mean_scale: float = 1.0,
               cov_scale: float = 0.1) -> "GaussianMixture":
        """Random weights, means N(0, mean_scale^2 I) and full covariances cov_scale^2 A A^T / d + small ridge."""
        g = torch.Generator().manual_seed(seed)
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
        t = t.to(torch.float64).reshape(-1)
        return torch.exp(sde.log_mean_coeff(t)), sde.std(t) ** 2

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        check_finite_tensor(x)
        if x.ndim < 1 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, ...) with {self.dim} values per example; got {tuple(x.shape)}.")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _component_terms(self, x: torch.Tensor, sde, t):
        """Per-component log(w_k N(x; m mu_k, C_k)) (B, K), and C_k^{-1}(x - m mu_k) (B, K, d)."""
        xf = self._flat(x)
        m, s2 = self._coeffs(sde, t, x)
        m, s2 = m.to(xf.device), s2.to(xf.device)
        evals, evecs, means = self._evals.to(xf.device), self._evecs.to(xf.device), self.means.to(xf.device)
        lam = m[:, None, None] ** 2 * evals[None] + s2[:, None, None]  # (B|1, K, d)
        diff = xf[:, None, :] - m[:, None, None] * means[None]  # (B, K, d)
        y = torch.einsum("kdj,bkd->bkj", evecs, diff)  # eigenbasis coordinates
        logn = -0.5 * ((y**2 / lam).sum(-1) + torch.log(lam).sum(-1) + self.dim * _LOG_2PI)
        prec_diff = torch.einsum("kdj,bkj->bkd", evecs, y / lam)
        return torch.log(self.weights.to(xf.device))[None] + logn, prec_diff

    def log_prob(self, x: torch.Tensor, t: Optional[Time] = None, sde: Optional[SDE] = None) -> torch.Tensor:
        """Exact log p_t(x), shape (B,); t=None gives the data density p_0 = the mixture itself."""
        logc, _ = self._component_terms(x, sde, t)
        return torch.logsumexp(logc, dim=1).to(x.dtype)

    def responsibilities(self, x: torch.Tensor, t: Optional[Time] = None, sde: Optional[SDE] = None) -> torch.Tensor:
        """Posterior component probabilities p_t(k | x), shape (B, K)."""
        logc, _ = self._component_terms(x, sde, t)
        return torch.softmax(logc, dim=1).to(x.dtype)

    def score(self, x: torch.Tensor, t: Optional[Time] = None, sde: Optional[SDE] = None) -> torch.Tensor:
        """Exact grad_x log p_t(x), same shape as x."""
        logc, prec_diff = self._component_terms(x, sde, t)
        r = torch.softmax(logc, dim=1)
        return -(r[:, :, None] * prec_diff).sum(1).reshape(x.shape).to(x.dtype)

    def score_fn(self, sde: SDE):
        """The exact score under ``sde`` as a callable ``score(x, t)``: the form every sampler accepts."""
        def exact_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.score(x, t, sde)
        return exact_score

    def marginal(self, t: Time, sde: SDE) -> "GaussianMixture":
        """The mixture p_t at a single time t (a float or 0-d tensor) as a new GaussianMixture."""
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

    def sample(self, n: int, *, t: Optional[Time] = None, sde: Optional[SDE] = None,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               dtype: torch.dtype = torch.float64, device=None, return_components: bool = False):
        """n exact draws from p_t (from the mixture itself when t is None), shape (n, d).

        With ``return_components=True`` also returns the (n,) component index of each draw.
        """
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be a positive int; got {n!r}.")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        src = self if t is None else self.marginal(t, sde)
        k = torch.multinomial(src.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = src._evecs * src._evals.sqrt()[:, None, :]  # C^{1/2} = U diag(sqrt(lam))
        x = src.means[k] + torch.einsum("ndj,nj->nd", root[k], z)
        x = x.to(dtype=dtype, device=device)
        return (x, k.to(device)) if return_components else x
