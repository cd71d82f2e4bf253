"""Training objectives for score models and noise-conditional classifiers.

All losses take the model and a batch x0 (B, ...), draw t in [t_min, T] and the kernel noise from ``seed`` (an int,
a torch.Generator, or None for torch's global generator), and return a scalar: the batch mean of a per-example
loss. Every loss estimates

    (1 / (T - t_min)) int_{t_min}^{T} w(t) E[ per-example loss at time t ] dt,

whether t is drawn uniformly or by importance sampling (the importance weights are folded in), so the
two estimators are unbiased for the same number and can be compared.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch

from ._deprecation import renamed
from ._util import batch_time, bcast
from ._validate import check_choice, check_flag, check_int, check_number, check_tensor, is_integer_dtype
from .models import as_model, model_inside
from .noise import torch_generator
from .sde import SDE

Gen = Union[int, torch.Generator, None]
WEIGHTINGS = ("s2", "likelihood", "none")


def _generator(where: str, seed: Gen, generator: Gen) -> Optional[torch.Generator]:
    """The torch.Generator a loss draws from: ``seed`` (or its deprecated name ``generator``) as an int seeds a
    fresh CPU generator, a torch.Generator is used as it is, None means torch's global generator
    (:func:`sdegen.noise.torch_generator`)."""
    seed, name = renamed(where, "seed", seed, "generator", generator, stacklevel=4)
    return torch_generator(seed, name)


def _randn(shape, gen: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    # draw on the generator's device, then move: a CPU generator then serves a CUDA batch too
    dev = gen.device if gen is not None else like.device
    return torch.randn(shape, generator=gen, device=dev, dtype=like.dtype).to(like.device)


def _rand(n: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    # kept on the generator's device: moving a GPU draw to the CPU would make every training step wait for it
    dev = gen.device if gen is not None else "cpu"
    return torch.rand(n, generator=gen, device=dev, dtype=torch.float64)


def _sde_of(model, sde: Optional[SDE]) -> SDE:
    """The SDE a loss perturbs with: ``sde``, or the model's own. A :class:`sdegen.Model` (or a wrapper of one with
    ``.module``, such as train_ddp's DDPModel) converts its output under its own SDE, so another ``sde`` is refused
    with the ValueError of :func:`sdegen.sample`."""
    if sde is None:
        sde = getattr(model, "sde", None)
        if not isinstance(sde, SDE):
            raise TypeError("sde: pass a ScoreModel (which carries its SDE) or give sde=... explicitly.")
        return sde
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE or None (the model's own); got {type(sde).__name__}.")
    sde.check_contract()
    own = model_inside(model)
    if own is not None:
        as_model(own, sde)
    return sde


def _loss_model(model, sde: SDE):
    """The model a score loss calls: a :class:`sdegen.Model` (or a wrapper of one with ``.module``, such as
    train_ddp's DDPModel) as it is; anything else as :func:`sdegen.models.as_model` makes it for the samplers (an
    oracle's exact score, a plain callable's output checked against x's shape, its time in x's dtype)."""
    if model_inside(model) is not None:
        return model  # a Model, or a wrapper of one (torch.compile, DataParallel, DDPModel): called as it is
    return as_model(model, sde)


# the options of the sdegen losses, by loss: a keyword of another loss's would otherwise reach the network
_LOSS_OPTIONS = {
    "dsm_loss": {"sde", "weighting", "importance_sampling", "reduce", "t", "seed", "t_min", "return_per_example",
                 "generator"},
    "ddpm_loss": {"sde", "num_steps", "reduce", "t", "seed", "t_min", "return_per_example", "generator"},
    "sliced_score_matching_loss": {"sde", "projection", "n_projections", "weighting", "t", "seed", "t_min",
                                   "return_per_example", "generator"},
    "classifier_loss": {"t", "seed", "t_min", "label_smoothing", "return_per_example", "generator"},
}
_ANY_LOSS_OPTION = set().union(*_LOSS_OPTIONS.values()) | {"importance", "tmin", "t_max", "weighting_fn"}


def _check_network_kwargs(where: str, kwargs: dict) -> None:
    """TypeError for a keyword that names a loss option this loss does not have: the losses pass their other
    keywords to the network (class labels, say), where such an option would be dropped or fail obscurely."""
    stray = sorted(set(kwargs) & _ANY_LOSS_OPTION)
    if stray:
        owners = {name: [loss for loss, opts in _LOSS_OPTIONS.items() if name in opts] for name in stray}
        said = "; ".join(f"{name!r} (an option of {', '.join(o)})" if o else repr(name) for name, o in owners.items())
        raise TypeError(f"{where} has no option {said}; its options are {', '.join(sorted(_LOSS_OPTIONS[where]))}, "
                        "and other keywords go to the model. Remove it or use the loss that has it.")


def _t_min(sde: SDE, t_min: Optional[float]) -> float:
    """The lower end of the training times: ``t_min`` in (0, T), by default the SDE's own."""
    if t_min is None:
        return sde.t_min
    return check_number(t_min, "t_min", lo=0.0, hi=sde.T, lo_open=True, hi_open=True)


def _check_batch(x0: torch.Tensor, **flags: bool) -> None:
    check_tensor(x0, "x0", dtypes=None, batch=True)
    for name, flag in flags.items():
        check_flag(flag, name)


def sample_time(sde: SDE, n: int, *, seed: Gen = None, importance_sampling: Optional[bool] = None,
                t_min: Optional[float] = None, generator: Gen = None,
                importance: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw n training times in [t_min, T] and their importance weights, both (n,) float64 on the generator's device
    (the CPU for an int seed or None).

    Uniform (default, ``importance_sampling=False``): weight 1. ``importance_sampling=True`` draws t with density
    p(t) proportional to g(t)^2 / s(t)^2, the proposal of Song et al. 2021 ("Maximum Likelihood Training of
    Score-Based Diffusion Models", section 5).
    For a linear SDE g^2 / s^2 = -d lambda / dt with lambda = log(m^2 / s^2) (since d s^2/dt = 2 f s^2 + g^2), so
    the proposal is uniform in log-SNR and exact: t = lambda^{-1}(lambda(t_min) - u (lambda(t_min) - lambda(T))).
    The weight 1 / (p(t) (T - t_min)) keeps every loss an unbiased estimate of its uniform-t value.
    ``seed``: an int, a torch.Generator or None (torch's global generator); ``generator`` is its deprecated name,
    and ``importance`` that of ``importance_sampling`` (the name :func:`dsm_loss` uses; DeprecationWarning).
    """
    check_int(n, "n", lo=1)
    importance_sampling, name = renamed("sample_time", "importance_sampling", importance_sampling, "importance",
                                        importance)
    importance_sampling = False if importance_sampling is None else check_flag(importance_sampling, name)
    t_min = _t_min(sde, t_min)
    u = _rand(n, _generator("sample_time", seed, generator))
    if not importance_sampling:
        return t_min + u * (sde.T - t_min), torch.ones(n, dtype=torch.float64, device=u.device)
    ends = torch.tensor([t_min, sde.T], dtype=torch.float64, device=u.device)
    lam = sde.log_snr(ends)
    Z = lam[0] - lam[1]  # int g^2 / s^2 dt over [t_min, T]
    t = sde.t_from_log_snr(lam[0] - u * Z).clamp(t_min, sde.T)
    density = sde.diffusion(t) ** 2 / sde.std(t) ** 2 / Z
    return t, 1.0 / (density * (sde.T - t_min))


def loss_weight(sde: SDE, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """lambda(t): "s2" -> s(t)^2 (Song et al. 2021, eq. 7 with lambda = s^2), "likelihood" -> g(t)^2 (the weighting
    that makes the loss bound the negative log-likelihood, Song et al. 2021b, theorem 1), "none" -> 1."""
    if weighting == "s2":
        return sde.std(t) ** 2
    if weighting == "likelihood":
        return sde.diffusion(t) ** 2
    if weighting == "none":
        return torch.ones_like(t)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}.")


def _times(sde, x0, t, gen, importance, t_min, **drawing):
    """(t, importance weights), both (B,) float64: drawn by :func:`sample_time`, or the fixed times ``t`` with
    weight 1, which leave nothing to the options that shape the draw (``importance``, ``t_min`` and the
    ``drawing`` options, such as ddpm_loss's num_steps): given with t, they raise ValueError."""
    B = x0.shape[0]
    if t is None:
        return sample_time(sde, B, seed=gen, importance_sampling=importance, t_min=t_min)
    drawing.update(importance_sampling=importance or None, t_min=t_min)
    given = [name for name, value in drawing.items() if value is not None]
    if given:
        names = " and ".join(given)
        raise ValueError(f"{names}: {'they shape' if len(given) > 1 else 'it shapes'} how t is drawn, while t= fixes "
                         f"the times; leave {names} unset with fixed t; got t and {given[0]}={drawing[given[0]]!r}.")
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    t = sde.check_time_for(x0, t)
    if bool((sde.std(t) <= 0).any()):  # the kernel is a point mass: its score -z/s is undefined
        raise ValueError(f"t must lie where the kernel std s(t) > 0 (for {type(sde).__name__}: t > 0); got "
                         f"t={t.flatten()[:4].tolist()}.")
    return batch_time(t, x0.new_empty(B, device="cpu")), torch.ones(B, dtype=torch.float64)


def _reduce(sq: torch.Tensor, reduce: str) -> torch.Tensor:
    flat = sq.reshape(sq.shape[0], -1)
    if reduce == "sum":
        return flat.sum(1)
    if reduce == "mean":
        return flat.mean(1)
    raise ValueError(f"reduce must be 'sum' or 'mean' (over the values of one example); got {reduce!r}.")


def dsm_loss(model: Callable, x0: torch.Tensor, *args, sde: Optional[SDE] = None, weighting: str = "s2",
             importance_sampling: bool = False, reduce: str = "sum", t=None, seed: Gen = None,
             t_min: Optional[float] = None, return_per_example: bool = False, generator: Gen = None,
             **kwargs) -> torch.Tensor:
    """Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7):

        E_t E_{x0} E_z [ lambda(t) || s_theta(x_t, t) - grad log p_0t(x_t | x0) ||^2 ],  x_t = m x0 + s z,

    with grad log p_0t = -z / s. ``weighting`` picks lambda (see :func:`loss_weight`); ``importance_sampling``
    draws t from :func:`sample_time`'s g^2 / s^2 proposal (meant for the likelihood weighting, where it removes
    most of the variance; the estimate stays unbiased for any weighting).

    Args:
        model: a :class:`sdegen.ScoreModel` (or a callable score(x, t, *args) with ``sde=`` given);
            extra ``*args``/``**kwargs`` (class labels, say) are passed to it.
        x0: data batch (B, ...). t: optional fixed times (float or (B,)) instead of drawing them.
        reduce: "sum" or "mean" over the values of one example.
        seed: the random source of t and the noise: an int, a torch.Generator, or None (torch's global generator).
            ``generator`` is its deprecated name (DeprecationWarning).
        t_min: the earliest time drawn (default: the SDE's ``t_min``); times are drawn in [t_min, T].
    Returns: a scalar (the batch mean), or the (B,) per-example losses with ``return_per_example=True``.
    """
    _check_network_kwargs("dsm_loss", kwargs)
    sde = _sde_of(model, sde)
    model = _loss_model(model, sde)
    _check_batch(x0, importance_sampling=importance_sampling, return_per_example=return_per_example)
    gen = _generator("dsm_loss", seed, generator)
    t, iw = _times(sde, x0, t, gen, importance_sampling, t_min)
    z = _randn(x0.shape, gen, x0)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + bcast(std, x0) * z
    score = model(x_t, t.to(x0.device), *args, **kwargs)
    # lambda ||s + z / s||^2, written as (lambda / s^2) ||s score + z||^2 so that s -> 0 does not amplify round-off
    per = _reduce((bcast(std, x0) * score + z) ** 2, reduce)
    w = (loss_weight(sde, t, weighting) / std**2 * iw).to(device=x0.device, dtype=x0.dtype)
    per = w * per
    return per if return_per_example else per.mean()


def ddpm_loss(model: Callable, x0: torch.Tensor, *args, sde: Optional[SDE] = None, num_steps: Optional[int] = None,
              reduce: str = "mean", t=None, seed: Gen = None, t_min: Optional[float] = None,
              return_per_example: bool = False, generator: Gen = None, **kwargs) -> torch.Tensor:
    """DDPM's simplified objective L_simple = E_t E || eps - eps_theta(x_t, t) ||^2 (Ho et al. 2020, eq. 14).

    t is uniform on [t_min, T] (``t_min``: default ``sde.t_min``, as in :func:`dsm_loss`), or, with
    ``num_steps=N``, uniform on the N grid times linspace(t_min, T, N) (the discrete DDPM indices). Fixed times
    ``t`` replace the draw, so ``t_min`` and ``num_steps`` are refused with them. eps_theta is ``model.eps`` (for
    an eps-predicting ScoreModel: the network output). In continuous time it equals :func:`dsm_loss` with
    weighting "s2" and reduce="mean". ``seed`` (``generator``: deprecated) and the other arguments as in
    :func:`dsm_loss`.
    """
    _check_network_kwargs("ddpm_loss", kwargs)
    sde = _sde_of(model, sde)
    model = _loss_model(model, sde)
    _check_batch(x0, return_per_example=return_per_example)
    check_int(num_steps, "num_steps", lo=2, none_ok=True, hint=" It is the number of discrete DDPM times.")
    gen = _generator("ddpm_loss", seed, generator)
    if t is None and num_steps is not None:
        u = _rand(x0.shape[0], gen)
        grid = torch.linspace(_t_min(sde, t_min), sde.T, num_steps, dtype=torch.float64, device=u.device)
        t = _times(sde, x0, grid[(u * num_steps).long().clamp_max(num_steps - 1)], gen, False, None)[0]
    else:
        t, _ = _times(sde, x0, t, gen, False, t_min, num_steps=num_steps)
    z = _randn(x0.shape, gen, x0)
    x_t = sde.perturb(x0, t, z)
    tt = t.to(x0.device)  # float64: the model casts it to x's dtype itself
    eps_view = getattr(model, "eps", None)  # a Model's (or DDPModel's, a compiled one's); DataParallel has none
    eps_hat = eps_view(x_t, tt, *args, **kwargs) if callable(eps_view) else \
        -bcast(sde.std(t), x0).to(x0.dtype) * model(x_t, tt, *args, **kwargs)
    per = _reduce((eps_hat - z) ** 2, reduce)
    return per if return_per_example else per.mean()


def sliced_score_matching_loss(model: Callable, x0: torch.Tensor, *args, sde: Optional[SDE] = None,
                               projection: str = "rademacher", n_projections: int = 1, weighting: str = "s2",
                               t=None, seed: Gen = None, t_min: Optional[float] = None,
                               return_per_example: bool = False, generator: Gen = None, **kwargs) -> torch.Tensor:
    """Sliced score matching on the perturbed marginal p_t (Song et al. 2019, eq. 5), weighted by lambda(t):

        E_t lambda(t) E_{x_t} E_v [ v^T grad_x(v^T s_theta(x_t, t)) + 1/2 (v^T s_theta(x_t, t))^2 ],

    with E[v v^T] = I (v Gaussian or Rademacher; Hutchinson's trace estimator). It needs no kernel score, only
    samples x_t (drawn here with the SDE's kernel). It equals 1/2 E||s_theta - grad log p_t||^2 minus the constant
    1/2 E||grad log p_t||^2, so at the exact score its value at time t is -1/2 E||grad log p_t||^2.
    One Jacobian-vector product per projection; the graph is kept so the loss can be backpropagated.
    ``seed`` (``generator``: deprecated) draws t, the noise and the projections, as in :func:`dsm_loss`.
    """
    _check_network_kwargs("sliced_score_matching_loss", kwargs)
    check_choice(projection, "projection", ("gaussian", "rademacher"))
    check_int(n_projections, "n_projections", lo=1)
    sde = _sde_of(model, sde)
    model = _loss_model(model, sde)
    _check_batch(x0, return_per_example=return_per_example)
    gen = _generator("sliced_score_matching_loss", seed, generator)
    t, iw = _times(sde, x0, t, gen, False, t_min)
    x_t = sde.perturb(x0, t, _randn(x0.shape, gen, x0))
    x_t = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        score = model(x_t, t.to(x0.device), *args, **kwargs)
        per = x0.new_zeros(x0.shape[0])
        for _ in range(n_projections):
            v = _randn(x0.shape, gen, x0)
            if projection == "rademacher":
                v = torch.sign(v)
            sv = (score * v).reshape(x0.shape[0], -1).sum(1)
            # a score that does not depend on x (a bias, a network at its zero start) has a zero Jacobian
            jvp = torch.autograd.grad(sv.sum(), x_t, create_graph=True, allow_unused=True)[0] \
                if sv.requires_grad else None
            per = per + 0.5 * sv**2
            if jvp is not None:
                per = per + (jvp * v).reshape(x0.shape[0], -1).sum(1)
    per = per / n_projections * (loss_weight(sde, t, weighting) * iw).to(device=x0.device, dtype=x0.dtype)
    return per if return_per_example else per.mean()


def classifier_loss(classifier: Callable, sde: SDE, x0: torch.Tensor, y: torch.Tensor, *, t=None,
                    seed: Gen = None, t_min: Optional[float] = None, label_smoothing: float = 0.0,
                    return_per_example: bool = False, generator: Gen = None) -> torch.Tensor:
    """Cross-entropy of a noise-conditional classifier on perturbed data: E_t E_{x0, y} [-log p_theta(y | x_t, t)]
    with x_t = m(t) x0 + s(t) z and t uniform on [t_min, T] (Song et al. 2021, appendix I.1; Dhariwal & Nichol 2021).

    Args: classifier(x_t, t) -> logits (B, C) with t (B,) in x0's dtype; x0 (B, ...); y (B,) integer labels in
    [0, C): labels on the CPU are checked (ValueError); labels on an accelerator are not read back (that would
    synchronise every step): an out-of-range label there gives that example a NaN loss;
    seed: an int, a torch.Generator or None (torch's global generator); ``generator`` is its deprecated name.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde (classifier_loss's second argument) must be an sdegen.SDE; got {type(sde).__name__}.")
    sde.check_contract()
    _check_batch(x0, return_per_example=return_per_example)
    if not isinstance(y, torch.Tensor) or y.shape != (x0.shape[0],) or not is_integer_dtype(y.dtype):
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of labels of shape ({x0.shape[0]},) (not bool); got {got}.")
    y = y.long()  # cross_entropy indexes with int64
    check_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0, hi_open=True)
    gen = _generator("classifier_loss", seed, generator)
    t, iw = _times(sde, x0, t, gen, False, t_min)
    x_t = sde.perturb(x0, t, _randn(x0.shape, gen, x0))
    logits = classifier(x_t, t.to(device=x0.device, dtype=x0.dtype))
    if logits.ndim != 2 or logits.shape[0] != x0.shape[0]:
        raise ValueError(f"the classifier must return logits of shape (B, C); got {tuple(logits.shape)}.")
    n_classes = logits.shape[1]
    if y.device.type == "cpu":  # labels on the host are checked without waiting for the device
        if bool(((y < 0) | (y >= n_classes)).any()):
            raise ValueError(f"labels y must lie in [0, {n_classes - 1}] (the classifier has {n_classes} classes); "
                             f"got min {int(y.min())}, max {int(y.max())}.")
        y = y.to(logits.device)
        return _cross_entropy(logits, y, label_smoothing, return_per_example)
    # Labels on an accelerator: reading them back would stall every training step, and an out-of-range label
    # inside cross_entropy is a device-side assert that ends the process. An example with such a label gets a
    # NaN loss instead, which sdegen.train's periodic check reports with its step.
    y = y.to(logits.device)
    valid = (y >= 0) & (y < n_classes)
    per = _cross_entropy(logits, torch.where(valid, y, torch.zeros_like(y)), label_smoothing, True)
    per = torch.where(valid, per, torch.full_like(per, math.nan))
    return per if return_per_example else per.mean()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float,
                   per_example: bool) -> torch.Tensor:
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    return per if per_example else per.mean()


def drop_labels(y: torch.Tensor, p: float, null_label: int, *, seed: Gen = None,
                generator: Gen = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability p: the label dropout that trains one network
    for both the conditional and unconditional score of classifier-free guidance (Ho & Salimans 2022, alg. 1).
    ``seed``: an int, a torch.Generator or None (torch's global generator); ``generator`` is its deprecated name.
    y: integer labels (B,) (not bool); null_label: an int >= 0, the label of the unconditional branch (for the nets
    of :mod:`sdegen.nets`, their ``num_classes``). Returns a new tensor; y is not modified."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or not is_integer_dtype(y.dtype):
        got = f"a {y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"y must be an integer tensor of class labels, shape (B,); got {got}.")
    check_number(p, "p", lo=0.0, hi=1.0)
    check_int(null_label, "null_label", lo=0, hint=" It is the label of the unconditional branch.")
    gen = _generator("drop_labels", seed, generator)
    drop = _rand(y.shape[0], gen).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)
