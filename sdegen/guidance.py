"""Controllable generation (Song et al. 2021, section 5): scores that plug into every sampler.

- :func:`classifier_guidance`: s(x, t) + scale * grad_x log p_t(y | x) from a noise-conditional classifier
  (Song et al. 2021, eq. 14 and appendix I.1; Dhariwal & Nichol 2021, "guidance scale");
- :func:`classifier_free_guidance`: (1 + w) s(x, t, y) - w s(x, t) (Ho & Salimans 2022, eq. 6);
- :class:`Inpaint` (sampler name "inpaint") and :func:`inpaint`: imputation of the unknown part of x given a known
  part and a mask (Song et al. 2021, appendix I.2);
- :class:`MixtureClassifier`: the exact classifier p_t(y | x) of a Gaussian mixture whose classes are groups of
  components, the oracle that tests guidance.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._util import bcast, check_finite_tensor
from .models import resolve_score
from .analytic import GaussianMixture
from .samplers import StepSampler, get_sampler, register_sampler
from .sde import SDE

Labels = Union[int, torch.Tensor]


def _check_scale(scale, name: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, Real) or math.isnan(scale) or not math.isfinite(scale) \
            or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {scale!r}.")
    return float(scale)


def _num_classes(obj) -> Optional[int]:
    n = getattr(obj, "num_classes", None)
    if n is None:
        n = getattr(getattr(obj, "net", None), "config", {}).get("num_classes") if hasattr(obj, "net") else None
    return int(n) if n is not None else None


def _check_labels(y: Labels, num_classes: Optional[int]) -> Labels:
    if isinstance(y, bool) or not isinstance(y, (int, torch.Tensor)):
        raise TypeError(f"y must be an int label or an integer tensor of labels (B,); got {type(y).__name__}.")
    if isinstance(y, torch.Tensor) and (y.is_floating_point() or y.ndim > 1):
        raise TypeError(f"y as a tensor must hold integer labels with shape (B,); got {y.dtype}, {tuple(y.shape)}.")
    if num_classes is not None:
        lo, hi = (y, y) if isinstance(y, int) else (int(y.min()), int(y.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class labels must lie in [0, {num_classes - 1}] (the model has {num_classes} classes); "
                             f"got labels from {lo} to {hi}.")
    return y


def _label_batch(y: Labels, x: torch.Tensor) -> torch.Tensor:
    if isinstance(y, int):
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
    if y.ndim == 0:
        return y.to(device=x.device, dtype=torch.long).expand(x.shape[0])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels but x has batch size {x.shape[0]}; give one label per example.")
    return y.to(device=x.device, dtype=torch.long)


def classifier_log_prob_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_t(y | x) = grad_x log_softmax(classifier(x, t))[y], shape of x. Differentiable itself (second
    order) when x requires grad, so gradients can flow through guided sampling."""
    keep_graph = x.requires_grad
    with torch.enable_grad():
        xi = x if keep_graph else x.detach().requires_grad_(True)
        logits = classifier(xi, t)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape (B, C); got {tuple(logits.shape)}.")
        logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, xi, create_graph=keep_graph)
    return grad


class ClassifierGuidedScore:
    """The score s(x, t) + scale * grad_x log p_t(y | x): see :func:`classifier_guidance`.

    Pass it wherever a score goes (``sdegen.sample(sde, guided, ...)``). It is called directly as ``guided(x, t)``
    when the base score is a callable; with an oracle such as a GaussianMixture it resolves through ``score_fn(sde)``.
    """

    def __init__(self, score, classifier: Callable, y: Labels, scale: float = 1.0,
                 num_classes: Optional[int] = None):
        if not callable(classifier):
            raise TypeError(f"classifier must be a callable classifier(x, t) -> logits; got {type(classifier).__name__}.")
        self.scale = _check_scale(scale, "scale")
        self.num_classes = num_classes if num_classes is not None else _num_classes(classifier)
        self.y = _check_labels(y, self.num_classes)
        self.base, self.classifier = score, classifier
        self._checked = self.num_classes is not None

    def _guided(self, base: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = base(x, t)
        if self.scale == 0.0:
            return s
        y = _label_batch(self.y, x)
        if not self._checked:  # classes unknown up front: check once against the classifier's output
            with torch.no_grad():
                n = self.classifier(x[:1].detach(), t[:1] if t.ndim else t).shape[1]
            _check_labels(self.y, n)
            self._checked = True
        return s + self.scale * classifier_log_prob_grad(self.classifier, x, t, y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not callable(self.base):
            raise TypeError("the base score is not callable (an oracle?): pass the guided score to sdegen.sample, "
                            "or call .score_fn(sde) first.")
        return self._guided(self.base, x, t)

    def score_fn(self, sde: SDE) -> Callable:
        """The guided score as a plain callable under ``sde`` (what :func:`sdegen.sample` uses)."""
        base = resolve_score(self.base, sde)
        return lambda x, t: self._guided(base, x, t)


def classifier_guidance(score, classifier: Callable, y: Labels, scale: float = 1.0, *,
                        num_classes: Optional[int] = None) -> ClassifierGuidedScore:
    """Classifier guidance: the score of p_t(x | y) ∝ p_t(x) p_t(y | x)^scale,

        s(x, t) + scale * grad_x log p_t(y | x)         (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021, alg. 1)

    Args:
        score: the unconditional score (callable score(x, t), ScoreModel, or an oracle with ``score_fn(sde)``).
        classifier: noise-conditional classifier ``classifier(x, t) -> logits (B, C)`` (t of shape (B,)).
        y: the requested class: an int for all examples or an integer tensor (B,).
        scale: >= 0; 1 samples p(x | y) exactly when score and classifier are exact; larger sharpens.
        num_classes: the number of classes (read from ``classifier.num_classes`` when present), used to reject
            labels outside [0, C) up front; otherwise labels are checked at the first call.
    Returns: a :class:`ClassifierGuidedScore`, accepted by every sampler and :func:`sdegen.sample`.
    """
    return ClassifierGuidedScore(score, classifier, y, scale, num_classes)


class ClassifierFreeGuidedScore:
    """(1 + w) s(x, t, y) - w s(x, t): see :func:`classifier_free_guidance`."""

    def __init__(self, model: Callable, y: Labels, w: float, num_classes: Optional[int] = None):
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t, y=None); got {type(model).__name__}.")
        self.w = _check_scale(w, "w")
        self.num_classes = num_classes if num_classes is not None else _num_classes(model)
        self.model, self.y = model, _check_labels(y, self.num_classes)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s_cond = self.model(x, t, _label_batch(self.y, x))
        if self.w == 0.0:
            return s_cond
        return (1.0 + self.w) * s_cond - self.w * self.model(x, t)


def classifier_free_guidance(model: Callable, y: Labels, w: float = 1.0, *,
                             num_classes: Optional[int] = None) -> ClassifierFreeGuidedScore:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), as a score:

        (1 + w) s(x, t, y) - w s(x, t)  =  s(x, t) + (1 + w) [s(x, t, y) - s(x, t)],

    i.e. classifier guidance with scale 1 + w and the implicit classifier grad log p_t(y | x) = s(x,t,y) - s(x,t).
    ``model(x, t, y)`` is the conditional score and ``model(x, t)`` the unconditional one (the nets of
    :mod:`sdegen.nets` with ``num_classes`` set use a null label for it; train with :func:`sdegen.losses.drop_labels`).
    w >= 0 (w = 0: the conditional score). Labels outside the model's classes raise ValueError.
    """
    return ClassifierFreeGuidedScore(model, y, w, num_classes)


class Inpaint(StepSampler):
    """Imputation by replacement (Song et al. 2021, appendix I.2): before every step from t, the known part of the
    state is replaced by a fresh draw of the forward kernel, m(t) y + s(t) z, then the wrapped sampler steps the
    whole state; the final state carries y itself in the known part. Registered as ``method="inpaint"``.

    The unknown part follows p_t(x_unknown | x_known = m y + s z) rather than p_t(x_unknown | y): the paper's
    approximation, exact when known and unknown parts are independent, biased otherwise (see the tests).

    Args:
        known: (B, ...) or (...) values; only entries where ``mask`` is true are used.
        mask: bool (or 0/1) tensor, True where x is known; shape (B, ...) or (...) matching x.
        sampler: the wrapped fixed-step sampler (a name from ``sdegen.SAMPLERS`` or a StepSampler); options for it.
    """

    stochastic = True

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, sampler: Union[str, StepSampler] = "reverse_diffusion",
                 **options: Any):
        check_finite_tensor(known, "known")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor; got {type(mask).__name__}.")
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("a floating-point mask must hold only 0 and 1.")
        self.known, self.mask = known, mask.bool()
        self.inner = get_sampler(sampler, **options) if isinstance(sampler, str) else sampler
        if options and not isinstance(sampler, str):
            raise ValueError("sampler options go with a sampler name; set them on a sampler object instead.")
        if not isinstance(self.inner, StepSampler):
            raise TypeError(f"Inpaint wraps a fixed-step sampler (a StepSampler); got {type(self.inner).__name__}.")
        self.nfe_per_step, self.default_steps = self.inner.nfe_per_step, self.inner.default_steps
        self.default_schedule = self.inner.default_schedule

    def _check(self, x: torch.Tensor) -> None:
        for name, v in (("mask", self.mask), ("known", self.known)):
            if tuple(v.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
                raise ValueError(f"{name} must have x's shape {tuple(x.shape)} or its per-example shape "
                                 f"{tuple(x.shape[1:])}; got {tuple(v.shape)}.")

    def start(self, ctx, x, ts):
        self._check(x)
        mask = self.mask.to(x.device).expand(x.shape)
        known = self.known.to(device=x.device, dtype=x.dtype).expand(x.shape)
        return {"mask": mask, "known": known, "t_end": ts[-1], "inner": self.inner.start(ctx, x, ts)}

    def step(self, ctx, x, t, t_next, state):
        m, s = ctx.coeffs(t)
        noisy_known = bcast(m, x) * state["known"] + bcast(s, x) * ctx.randn_like(x)
        x = torch.where(state["mask"], noisy_known, x)
        x_next, state["inner"] = self.inner.step(ctx, x, t, t_next, state["inner"])
        if bool(t_next <= state["t_end"]):  # 0-d CPU times: no device sync
            x_next = torch.where(state["mask"], state["known"], x_next)
        return x_next, state

    def total_nfe(self, steps: int) -> int:
        return self.inner.total_nfe(steps)

    def __repr__(self) -> str:
        return f"Inpaint({self.inner!r})"


register_sampler("inpaint", Inpaint)


def inpaint(sde: SDE, score, known: torch.Tensor, mask: torch.Tensor, *, sampler: Union[str, StepSampler] =
            "reverse_diffusion", steps: Optional[int] = None, seed=None, return_info: bool = False,
            **options: Any):
    """Fill in x where ``mask`` is False given ``known`` where it is True (Song et al. 2021, appendix I.2):
    :func:`sdegen.sample` with the :class:`Inpaint` sampler, starting from the prior. ``known`` is (B, ...);
    returns (B, ...) samples in known's dtype (or (samples, SampleInfo) with ``return_info=True``)."""
    from .sampling import sample

    check_finite_tensor(known, "known")
    if known.ndim < 1:
        raise ValueError("known must have shape (B, ...).")
    method = Inpaint(known, mask, sampler, **options)
    return sample(sde, score, shape=tuple(known.shape), method=method, steps=steps, seed=seed,
                  dtype=known.dtype, device=known.device, return_info=return_info)


class MixtureClassifier:
    """Exact noise-conditional classifier of a :class:`GaussianMixture` whose classes are groups of components:
    logits_c(x, t) = log(sum_{k in c} w_k N(x; m mu_k, m^2 Sigma_k + s^2 I)), so softmax(logits) = p_t(c | x).

    Args:
        mixture: the data distribution. groups: one list of component indices per class (a partition).
        sde: the forward SDE defining p_t.
    ``classifier(x, t)`` returns (B, C) logits (differentiable in x); :meth:`conditional` gives p_0(x | c).
    """

    def __init__(self, mixture: GaussianMixture, groups: Sequence[Sequence[int]], sde: SDE):
        flat = sorted(int(k) for g in groups for k in g)
        if flat != list(range(mixture.n_components)) or any(len(g) == 0 for g in groups):
            raise ValueError(f"groups must partition the {mixture.n_components} components into non-empty classes; "
                             f"got {groups!r}.")
        self.mixture, self.sde, self.groups = mixture, sde, [list(map(int, g)) for g in groups]
        self.num_classes = len(self.groups)
        self._conditionals = [self._build(c) for c in range(self.num_classes)]
        self._log_class_weights = torch.log(torch.stack([mixture.weights[g].sum() for g in self.groups]))

    def conditional(self, c: int) -> GaussianMixture:
        """The class-conditional data distribution p_0(x | c): the group's components, weights renormalised."""
        return self._conditionals[c]

    def _build(self, c: int) -> GaussianMixture:
        g = self.groups[c]
        return GaussianMixture(self.mixture.weights[g], self.mixture.means[g], self.mixture.covs[g])

    def class_weights(self) -> torch.Tensor:
        """p(c), (C,) float64."""
        return self._log_class_weights.exp()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logw = self._log_class_weights.to(x.device)
        cols = [self.conditional(c).log_prob(x, t, self.sde).to(torch.float64) + logw[c]
                for c in range(self.num_classes)]
        return torch.stack(cols, dim=1).to(x.dtype)
