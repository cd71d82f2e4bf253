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

import copy
import numbers
from collections.abc import Mapping
from numbers import Real
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._deprecation import renamed
from ._util import Time, batch_time, bcast
from ._validate import accepted_keywords, reject_sample_options, check_int, check_number, check_options, check_tensor, is_integer_dtype
from .models import Model, ScoreModel, _same_sde, as_model, network_dtype
from .analytic import GaussianMixture, nan_for_nonfinite_rows
from .samplers import ReverseDiffusion, StepSampler, get_sampler, register_sampler
from .sde import SDE

Labels = Union[int, torch.Tensor]


def _check_scale(scale, name: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, Real):  # a ValueError, as for a negative scale
        raise ValueError(f"{name} must be a finite number >= 0; got {type(scale).__name__} {scale!r}.")
    return check_number(scale, name, lo=0.0)


def _num_classes(obj) -> Optional[int]:
    """The class count a model (or the network it wraps, through a dict-like or attribute-style ``.config``)
    declares; None where it declares none."""
    n = getattr(obj, "num_classes", None)
    if n is None and hasattr(obj, "net"):
        config = getattr(obj.net, "config", None)
        n = config.get("num_classes") if isinstance(config, Mapping) else getattr(config, "num_classes", None)
    return int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else None


def _check_labels(y: Labels, num_classes: Optional[int]) -> Labels:
    if isinstance(y, bool) or not isinstance(y, (int, torch.Tensor)):
        raise TypeError(f"y must be an int label or an integer tensor of labels (B,); got {type(y).__name__}.")
    if isinstance(y, torch.Tensor) and not (is_integer_dtype(y.dtype) and y.ndim <= 1):
        raise TypeError(f"y as a tensor must hold integer labels with shape (B,) (not bool); got {y.dtype}, "
                        f"{tuple(y.shape)}.")
    if isinstance(y, torch.Tensor) and y.numel() == 0:
        raise ValueError("y: got an empty tensor of labels; give one label per example (or one int for all).")
    if num_classes is not None:
        if isinstance(y, torch.Tensor) and y.device.type != "cpu":
            # checked on the device, without waiting for it: an out-of-range label stops the run with a device-side
            # assertion (move the labels to the CPU to have them checked with a ValueError before any work)
            torch._assert_async(((y >= 0) & (y < num_classes)).all(),
                                f"y: class labels must lie in [0, {num_classes - 1}]")
            return y
        lo, hi = (y, y) if isinstance(y, int) else (int(y.min()), int(y.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"y: class labels must lie in [0, {num_classes - 1}] (the model has {num_classes} "
                             f"classes); got labels from {lo} to {hi}.")
    return y


def _label_batch(y: Labels, x: torch.Tensor) -> torch.Tensor:
    if isinstance(y, int):
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
    if y.ndim == 0:
        return y.to(device=x.device, dtype=torch.long).expand(x.shape[0])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels but x has batch size {x.shape[0]}; give one label per example.")
    return y.to(device=x.device, dtype=torch.long)


def classifier_log_prob_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                             check_classes: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """grad_x log p_t(y | x) = grad_x log_softmax(classifier(x, t))[y], shape and dtype of x. Differentiable itself
    (second order) when grad mode is on and x or a parameter of the classifier (an nn.Module) requires grad, so
    gradients flow through guided sampling to x_T and to the classifier's parameters; otherwise, and under
    ``torch.no_grad()``, it is a plain tensor. A classifier module whose parameters have another
    floating dtype than x sees x (and t) cast to it. ``check_classes``, if given, is called with the number of
    classes the logits have before the labels index them."""
    if torch.is_inference_mode_enabled():  # no autograd there: the gradient is taken on copies outside it
        with torch.inference_mode(False), torch.no_grad():
            return classifier_log_prob_grad(classifier, x.clone(), t.clone() if isinstance(t, torch.Tensor) else t,
                                            y.clone(), check_classes=check_classes)
    # a graph is kept where gradients can flow: grad mode on (read before enable_grad) and x or the classifier's
    # parameters requiring grad; a frozen classifier on a detached state builds none (every step's would stay alive)
    keep_graph = torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for p in (classifier.parameters() if isinstance(classifier, torch.nn.Module) else ())))
    with torch.enable_grad():
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        dtype = network_dtype(classifier)
        cast = dtype is not None and dtype != x.dtype
        logits = classifier(xi.to(dtype) if cast else xi,
                            t.to(dtype) if cast and isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the classifier must return logits of shape (B, C); got {got}.")
        if not logits.requires_grad:
            raise ValueError("the classifier's logits do not depend on x through autograd (a forward under "
                             "torch.no_grad, detached tensors or NumPy inside it): classifier guidance needs "
                             "grad_x log p_t(y | x).")
        if check_classes is not None:
            check_classes(logits.shape[1])
        logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, xi, create_graph=keep_graph)
    return grad


def _guide_rows(guide, index: torch.Tensor):
    """A shallow copy of a guide whose per-example labels (a (B,) tensor) are restricted to the rows ``index``."""
    if not (isinstance(guide.y, torch.Tensor) and guide.y.ndim == 1):
        return guide
    restricted = copy.copy(guide)
    try:
        restricted.y = guide.y[index.to(guide.y.device)]
    except IndexError:  # fewer labels than the batch a pilot grid serves in turn
        raise ValueError(f"y has {guide.y.shape[0]} labels, fewer than the batch's examples; give one label per "
                         "example.") from None
    return restricted


class ClassifierGuidedScore:
    """The score s(x, t) + scale * grad_x log p_t(y | x): see :func:`classifier_guidance`.

    Pass it wherever a model goes (``sdegen.sample(sde, guided, ...)``, which uses :meth:`as_model`). It is called
    directly as ``guided(x, t)`` when the base score is a callable; :meth:`score_fn` gives the guided score under an
    SDE, which an oracle such as a GaussianMixture needs.
    """

    def __init__(self, score, classifier: Callable, y: Labels, scale: float = 1.0,
                 num_classes: Optional[int] = None):
        if not callable(classifier):
            raise TypeError(f"classifier must be a callable classifier(x, t) -> logits; "
                            f"got {type(classifier).__name__}.")
        self.scale = _check_scale(scale, "scale")
        check_int(num_classes, "num_classes", lo=1, none_ok=True)
        self.num_classes = num_classes if num_classes is not None else _num_classes(classifier)
        self.y = _check_labels(y, self.num_classes)
        self.base, self.classifier = score, classifier
        self._checked = self.num_classes is not None

    def _guided(self, base: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = base(x, t)
        if self.scale == 0.0:
            return s
        y = _label_batch(self.y, x)
        check = None if self._checked else self._check_classes  # classes unknown up front: check the first output
        return s + self.scale * classifier_log_prob_grad(self.classifier, x, t, y, check_classes=check)

    def _check_classes(self, n: int) -> None:
        _check_labels(self.y, n)
        self._checked = True

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not callable(self.base):
            raise TypeError("the base score is not callable (an oracle?): pass the guided score to sdegen.sample, "
                            "or call .score_fn(sde) first.")
        return self._guided(self.base, x, t)

    def as_model(self, sde: SDE) -> "ClassifierGuidedModel":
        """The guided score as a :class:`sdegen.Model` under ``sde`` (what :func:`sdegen.sample` uses): it counts
        the base model's network evaluations in ``nfe`` and one classifier gradient per call in ``classifier_nfe``.
        A classifier that carries its SDE (:class:`MixtureClassifier`) must carry this one (ValueError otherwise)."""
        own = getattr(self.classifier, "sde", None)
        if isinstance(own, SDE) and not _same_sde(own, sde):
            raise ValueError(f"the classifier was built for {own!r} but sampling runs under {sde!r}: its "
                             "log p_t(y | x) is another SDE's; build the classifier for the sampling SDE.")
        return ClassifierGuidedModel(self, as_model(self.base, sde))

    def score_fn(self, sde: SDE) -> Callable:
        """The guided score as a plain callable ``score(x, t)`` under ``sde``."""
        return self.as_model(sde).score


class ClassifierGuidedModel(Model):
    """A :class:`ClassifierGuidedScore` under one SDE: score = base.score + scale grad_x log p_t(y | x); the
    denoiser follows by Tweedie's formula. ``nfe_per_call`` is the base model's, ``classifier_calls`` adds one
    classifier gradient (none at scale 0)."""

    def __init__(self, guide: ClassifierGuidedScore, base: Model):
        super().__init__(base.sde)
        self.guide, self.base = guide, base
        self.nfe_per_call = base.nfe_per_call
        self.classifier_calls = base.classifier_calls + (1 if guide.scale > 0 else 0)

    def rows(self, index: torch.Tensor) -> "ClassifierGuidedModel":
        """The guided model for examples ``index``: per-example labels and the base model restricted to them."""
        return ClassifierGuidedModel(_guide_rows(self.guide, index), self.base.rows(index))

    def score(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        t = self.sde.check_time_for(x, t)
        # the classifier receives a (B,) time in x's dtype, as a score network does
        return self.guide._guided(self.base.score, x, batch_time(t, x).to(x.dtype))


def classifier_guidance(score, classifier: Callable, y: Labels, scale: float = 1.0, *,
                        num_classes: Optional[int] = None) -> ClassifierGuidedScore:
    """Classifier guidance: the score of p_t(x | y) ∝ p_t(x) p_t(y | x)^scale,

        s(x, t) + scale * grad_x log p_t(y | x)         (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021, alg. 1)

    Args:
        score: the unconditional score (callable score(x, t), a :class:`sdegen.Model` such as a ScoreModel, or an
            oracle with ``score_fn(sde)``).
        classifier: noise-conditional classifier ``classifier(x, t) -> logits (B, C)`` (t of shape (B,)).
        y: the requested class: an int for all examples or an integer tensor (B,).
        scale: >= 0; 1 samples p(x | y) exactly when score and classifier are exact; larger sharpens.
        num_classes: the number of classes (read from ``classifier.num_classes`` when present), used to reject
            labels outside [0, C) up front; otherwise labels are checked at the first call.
    Returns: a :class:`ClassifierGuidedScore`, accepted by every sampler and :func:`sdegen.sample`, whose
    :class:`SampleInfo` reports the classifier gradients in ``classifier_nfe``, apart from ``nfe``.
    """
    return ClassifierGuidedScore(score, classifier, y, scale, num_classes)


def _check_null_label(null_label: Any) -> Optional[int]:
    if null_label is None:
        return None
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ValueError(f"null_label must be an int >= 0 (the label of the unconditional branch) or None; "
                         f"got {null_label!r}.")
    return null_label


def _default_null_label(model: Any) -> Optional[int]:
    """The null label a network declares (``.null_label``, as the nets of :mod:`sdegen.nets` do), else None."""
    holder = model.net if isinstance(model, ScoreModel) else model
    return getattr(holder, "null_label", None)


class ClassifierFreeGuidedScore:
    """(1 + w) s(x, t, y) - w s(x, t): see :func:`classifier_free_guidance`.

    With a known null label (``null_label``, read from the network's ``.null_label`` when not given) both branches
    run in one call on the doubled batch [x, x] with labels [y, null]; without one, ``model(x, t, y)`` and
    ``model(x, t)`` are two calls. ``nfe_per_call`` says which (1 or 2; 1 for w = 0, which needs the conditional
    branch only). Calling it directly gives the guided score; :meth:`as_model` gives the :class:`sdegen.Model`
    that :func:`sdegen.sample` uses.
    """

    def __init__(self, model: Callable, y: Labels, w: float, num_classes: Optional[int] = None, *,
                 null_label: Optional[int] = None):
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t, y=None); got {type(model).__name__}.")
        self.w = _check_scale(w, "w")
        check_int(num_classes, "num_classes", lo=1, none_ok=True)
        self.num_classes = num_classes if num_classes is not None else _num_classes(model)
        self.model, self.y = model, _check_labels(y, self.num_classes)
        given, declared = _check_null_label(null_label), _default_null_label(model)
        self.null_label = given if given is not None else _check_null_label(declared)
        if self.null_label is not None and self.num_classes is not None and self.null_label < self.num_classes:
            raise ValueError(f"null_label={self.null_label} is one of the model's {self.num_classes} classes "
                             f"(0-{self.num_classes - 1}): the unconditional branch would be that class's conditional. "
                             f"Pass the label the network was trained to read as 'no label' (e.g. {self.num_classes}).")
        if given is not None and isinstance(declared, int) and given != declared:
            raise ValueError(f"null_label={given}, but the network declares .null_label = {declared} (the label it "
                             "was trained to read as 'no label'); leave null_label unset or give that one.")
        self.batched = self.null_label is not None
        self.nfe_per_call = 1 if self.batched or self.w == 0.0 else 2

    def _pair(self, x: torch.Tensor, t: torch.Tensor):
        """The doubled batch: [x, x], [t, t] (a 0-d time stays 0-d) and the labels [y, null]."""
        y = _label_batch(self.y, x)
        t = torch.as_tensor(t)
        return (torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t,
                torch.cat([y, torch.full_like(y, self.null_label)]))

    def combine(self, out_cond: torch.Tensor, out_uncond: torch.Tensor) -> torch.Tensor:
        """(1 + w) out_cond - w out_uncond: Ho & Salimans' eq. 6 on any output affine in the score at fixed (x, t)
        (the weights sum to one, so an affine map commutes with the combination)."""
        return (1.0 + self.w) * out_cond - self.w * out_uncond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.w == 0.0:
            return self.model(x, t, _label_batch(self.y, x))
        if self.batched:
            return self.combine(*self.model(*self._pair(x, t)).chunk(2))
        return self.combine(self.model(x, t, _label_batch(self.y, x)), self.model(x, t))

    def as_model(self, sde: SDE) -> "ClassifierFreeGuidedModel":
        """The guided model under ``sde``; a model that is a :class:`sdegen.Model` must have been built for ``sde``
        (ValueError otherwise)."""
        return ClassifierFreeGuidedModel(self, sde)


class ClassifierFreeGuidedModel(Model):
    """A :class:`ClassifierFreeGuidedScore` under one SDE.

    For a :class:`sdegen.ScoreModel` with a null label the network runs once on 2B rows through
    :meth:`ScoreModel.raw` and the guidance combines its raw outputs, then converts once. This is exact for every
    parameterisation: at fixed (x, t) each maps the network output F affinely to the score and to the denoiser,
    S(F) = a + b F (score: b = 1; eps: -1/s; x0: m/s^2; v: -m/(s (m^2 + s^2)); flow: -s/(s' m - s m') on D;
    edm: c_out on D), and (1 + w) S(F_c) - w S(F_u) = S((1 + w) F_c - w F_u) because (1 + w) - w = 1.
    Other models combine their scores. ``nfe_per_call`` is the guide's times the base model's.
    """

    def __init__(self, guide: ClassifierFreeGuidedScore, sde: SDE):
        super().__init__(sde)
        model = guide.model
        self.guide = guide
        self.base = as_model(model, sde) if isinstance(model, Model) else None
        self.raw_pair = isinstance(self.base, ScoreModel) and (guide.batched or guide.w == 0.0)
        inner = self.base.nfe_per_call if self.base is not None else 1
        self.nfe_per_call = guide.nfe_per_call * inner
        self.classifier_calls = guide.nfe_per_call * self.base.classifier_calls if self.base is not None else 0

    def rows(self, index: torch.Tensor) -> "ClassifierFreeGuidedModel":
        """The guided model for examples ``index`` (per-example labels restricted to them)."""
        return ClassifierFreeGuidedModel(_guide_rows(self.guide, index), self.sde)

    def raw(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The guided raw network output (1 + w) F(x, t, y) - w F(x, t, null) of the base ScoreModel."""
        t = self.sde.check_time_for(x, t)
        guide = self.guide
        if guide.w == 0.0:
            return self.base.raw(x, t, _label_batch(guide.y, x))
        return guide.combine(*self.base.raw(*guide._pair(x, t)).chunk(2))

    def score(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        t = self.sde.check_time_for(x, t)
        if self.raw_pair:
            return self.base.output_to_score(self.raw(x, t), x, t)
        # a plain score callable receives a (B,) time in x's dtype, as through a ScoreModel
        return self.guide(x, t if self.base is not None else batch_time(t, x).to(x.dtype))

    def denoise(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        t = self.sde.check_time_for(x, t)
        if self.raw_pair:
            return self.base.output_to_denoised(self.raw(x, t), x, t)
        return super().denoise(x, t)


def classifier_free_guidance(score: Optional[Callable] = None, y: Optional[Labels] = None, w: float = 1.0, *,
                             num_classes: Optional[int] = None, null_label: Optional[int] = None,
                             model: Optional[Callable] = None) -> ClassifierFreeGuidedScore:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), as a score:

        (1 + w) s(x, t, y) - w s(x, t)  =  s(x, t) + (1 + w) [s(x, t, y) - s(x, t)],

    i.e. classifier guidance with scale 1 + w and the implicit classifier grad log p_t(y | x) = s(x,t,y) - s(x,t).
    ``score(x, t, y)`` is the conditional model and ``score(x, t)`` the unconditional one (a ScoreModel, or a
    callable; the nets of :mod:`sdegen.nets` with ``num_classes`` set use a null label for it; train with
    :func:`sdegen.losses.drop_labels`). ``model`` is the deprecated name of ``score`` (DeprecationWarning).
    y: the requested class, an int or an integer tensor (B,); required.
    w >= 0 (w = 0: the conditional score). Labels outside the model's classes raise ValueError.

    ``null_label``: the label that selects the unconditional branch (default: the network's ``.null_label``, e.g.
    ``num_classes`` for :class:`sdegen.MLP` and :class:`sdegen.UNet`). When known, one call on the doubled batch
    [x, x] with labels [y, null] replaces the two calls (1 NFE per evaluation instead of 2; for a
    :class:`sdegen.ScoreModel` the raw outputs are combined, see :class:`ClassifierFreeGuidedModel`).
    """
    score, name = renamed("classifier_free_guidance", "score", score, "model", model)
    if score is None or y is None:
        missing = " and ".join(n for n, v in (("score", score), ("y", y)) if v is None)
        raise TypeError(f"classifier_free_guidance needs {missing}: classifier_free_guidance(score, y, w).")
    if not callable(score):
        raise TypeError(f"{name} must be a callable conditional model, called as {name}(x, t, y) and {name}(x, t) "
                        f"(a ScoreModel, say); got {type(score).__name__}.")
    return ClassifierFreeGuidedScore(score, y, w, num_classes, null_label=null_label)


class Inpaint(StepSampler):
    """Imputation by replacement (Song et al. 2021, appendix I.2): before every step from t, the known part of the
    state is replaced by a fresh draw of the forward kernel, m(t) y + s(t) z, then the wrapped sampler steps the
    whole state; the final state carries y itself in the known part. Registered as ``method="inpaint"``.

    The unknown part follows p_t(x_unknown | x_known = m y + s z) rather than p_t(x_unknown | y): the paper's
    approximation, exact when known and unknown parts are independent, biased otherwise (see the tests).

    Args:
        known: (B, ...) or (...) values; only entries where ``mask`` is true are used.
        mask: bool (or 0/1) tensor, True where x is known, of any shape that broadcasts to x's (B, ...): x's
            own, the per-example (...), or with size-1 axes such as (B, 1, H, W) or (1, 1, H, W) for an image.
        known: likewise, of a shape that broadcasts to x's.
        sampler: the wrapped fixed-step sampler (a name from ``sdegen.SAMPLERS`` or a StepSampler); options for it.
            (Called ``sampler`` here, not ``method`` as in :func:`inpaint`: ``sample(method="inpaint", ...)`` takes
            ``method`` itself.)
    """

    stochastic = True

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, sampler: Union[str, StepSampler] = "reverse_diffusion",
                 **options: Any):
        if "method" in options:
            raise TypeError("Inpaint's wrapped sampler is its sampler= argument (method= is what sdegen.sample reads: "
                            "sample(method='inpaint', known=..., mask=..., sampler=...)); got method=.")
        check_tensor(known, "known", dtypes=None, finite=False)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool (or 0/1) tensor; got {type(mask).__name__}.")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: a mask that is not bool must hold only 0 and 1.")
        try:
            torch.broadcast_shapes(known.shape, mask.shape)
        except RuntimeError:
            raise ValueError(f"mask must have x's shape (that of known, {tuple(known.shape)}) or its per-example "
                             f"shape; got {tuple(mask.shape)}.") from None
        ok = (torch.isfinite(known) | ~mask.bool().to(known.device)).all()  # entries outside the mask are unused
        if known.device.type != "cpu":
            torch._assert_async(ok, "known must be finite where mask is True")
        elif not bool(ok):
            raise ValueError("known must be finite where mask is True (its other entries are not used); got NaN "
                             "or inf there.")
        self.known, self.mask = known, mask.bool()
        self.inner = get_sampler(sampler, **options) if isinstance(sampler, str) else sampler
        if options and not isinstance(sampler, str):
            raise ValueError("sampler options go with a sampler name; set them on a sampler object instead.")
        if not isinstance(self.inner, StepSampler):
            raise TypeError(f"Inpaint wraps a fixed-step sampler (a StepSampler); got {type(self.inner).__name__}.")
        self.nfe_per_step, self.default_steps = self.inner.nfe_per_step, self.inner.default_steps
        self.default_schedule = self.inner.default_schedule
        # the wrapped sampler's accuracy is what grids are laid out for (the pilot's and sensitivity's)
        self.order, self.exponential = self.inner.order, self.inner.exponential

    def _check(self, x: torch.Tensor) -> None:
        for name, v in (("mask", self.mask), ("known", self.known)):
            try:
                fits = torch.broadcast_shapes(v.shape, x.shape) == x.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"{name} must have a shape that broadcasts to x's {tuple(x.shape)} (x's own, the "
                                 f"per-example {tuple(x.shape[1:])}, or with size-1 axes); got {tuple(v.shape)}.")

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

    def finish_denoised(self, x: torch.Tensor) -> torch.Tensor:
        """The known values put back after the final denoising step, which moves every entry."""
        mask = self.mask.to(x.device).expand(x.shape)
        return torch.where(mask, self.known.to(device=x.device, dtype=x.dtype).expand(x.shape), x)

    def __repr__(self) -> str:
        return f"Inpaint({self.inner!r})"


register_sampler("inpaint", Inpaint)


def inpaint(sde: SDE, score, known: torch.Tensor, mask: torch.Tensor, *,
            method: Union[str, StepSampler, None] = None, steps: Optional[int] = None, seed=None, schedule=None,
            t_min: Optional[float] = None, denoise: bool = False, progress: bool = False,
            return_trajectory: bool = False, return_info: bool = False, noise: str = "per_example",
            sampler: Union[str, StepSampler, None] = None, **options: Any):
    """Fill in x where ``mask`` is False given ``known`` where it is True (Song et al. 2021, appendix I.2):
    :func:`sdegen.sample` with the :class:`Inpaint` sampler, starting from the prior. ``known`` is (B, ...),
    float32 or float64; returns (B, ...) samples in known's dtype (or (samples, SampleInfo) with
    ``return_info=True``). ``method`` is the fixed-step sampler that steps the whole state, a name or a
    StepSampler (default "reverse_diffusion"; ``sampler`` is its deprecated name); other keywords are its options.
    ``steps``, ``seed``, ``schedule``, ``t_min``, ``denoise``, ``progress``, ``return_trajectory`` and ``noise`` are
    those of :func:`sdegen.sample` (with ``denoise=True`` the known entries are put back after the denoising
    step). The default grid is the method's own (uniform in t for "reverse_diffusion"); under an SDE whose time is
    its noise level, such as :class:`sdegen.EDMSDE`, pass ``schedule="log_snr"`` (see
    :class:`sdegen.samplers.ReverseDiffusion`)."""
    from .sampling import sample

    reject_sample_options(options, "inpaint")
    check_tensor(known, "known", batch=True, finite=False)
    method, name = renamed("inpaint", "method", method, "sampler", sampler)
    if method is None:  # the built-in class, whatever the registry's "reverse_diffusion" has become
        check_options(options, accepted_keywords(ReverseDiffusion), "method 'reverse_diffusion'")
        inner = ReverseDiffusion(**options)
    else:
        inner = get_sampler(method, **options)
    if not isinstance(inner, StepSampler):
        raise TypeError(f"{name} must be a fixed-step sampler (a StepSampler, or the name of one), which inpainting "
                        f"steps between replacements; got {inner!r}.")
    method = Inpaint(known, mask, inner)
    return sample(sde, score, shape=tuple(known.shape), method=method, steps=steps, seed=seed, schedule=schedule,
                  t_min=t_min, denoise=denoise, progress=progress, return_trajectory=return_trajectory, noise=noise,
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
        empty = [c for c, g in enumerate(self.groups) if not bool(mixture.weights[g].sum() > 0)]
        if empty:
            raise ValueError(f"classes {empty} have zero total weight in the mixture: p(c) = 0 gives no class "
                             "posterior; drop them from groups or give their components weight.")
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
        """(B, C) logits. Like the mixture's ``score_fn``, it treats examples independently: a state with a NaN or
        an infinity (an example whose solve has failed) gets NaN logits, and the other rows are exact."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            return self.mixture.log_prob(self.sde, x, t)  # its message says what x must be
        return nan_for_nonfinite_rows(lambda z: self._logits(z, t), x)

    def _logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        held = self.__dict__.setdefault("_log_class_weights_on", {})
        if x.device not in held:  # copied to a device once, not at every call
            held[x.device] = self._log_class_weights.to(x.device)
        logw = held[x.device]
        cols = [self.conditional(c).log_prob(self.sde, x, t).to(torch.float64) + logw[c]
                for c in range(self.num_classes)]
        return torch.stack(cols, dim=1).to(x.dtype)
