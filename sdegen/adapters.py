"""Adapters: networks trained with diffusers, k-diffusion / EDM or score_sde as sdegen models, evaluated at exactly
the inputs they were trained on.

- diffusers (Hugging Face): a ``UNet2DModel``-like network ``unet(sample, timestep)`` and a scheduler's
  ``alphas_cumprod`` (:func:`from_diffusers`) become a model on :class:`sdegen.DiscreteVPSDE` of that table, whose
  time t is the timestep t N - 1 (an integer at the table's own noise levels); :func:`diffusers_time_grid` turns a
  scheduler's timesteps into sdegen's times.
- k-diffusion (Crowson) and EDM (Karras et al. 2022): a denoiser D(x_sigma, sigma) of the sigma-scaled input
  x_sigma = x_0 + sigma eps (:func:`from_denoiser`) becomes a model under any SDE.
- score_sde (Song et al. 2021): the continuous VP convention (the network takes 999 t and returns -s(t) score) and
  the VE / NCSN++ convention (it takes the noise level sigma and returns the score) (:func:`from_score_sde`).

Each adapter returns a :class:`sdegen.ScoreModel`: the network runs in the dtype of its parameters under a float32
or float64 sampler state, and every conversion is the exact kernel formula of :mod:`sdegen.models`. Only duck
typing: nothing here imports diffusers or k-diffusion.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from ._util import append_dims
from .models import ScoreModel
from .sde import SDE, DiscreteVPSDE

# diffusers' prediction_type -> sdegen's prediction
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SCORE_SDE_CONVENTIONS = ("vp", "ve")


class DiffusersNet(torch.nn.Module):
    """``net(x, timestep)`` of a diffusers network as a plain tensor function.

    The output is ``.sample`` of a ``UNet2DOutput``-like object, the first entry of a tuple, or the tensor itself.
    ``learned_variance``: True for a network with a learned variance (2C output channels for C input channels,
    diffusers' ``variance_type="learned"`` / ``"learned_range"``), which keeps its first C channels, the mean
    prediction, as diffusers' schedulers do; False keeps the output whole (another shape is then refused by the
    model); None (a bare table, no scheduler to say) cuts a 2C-channel output of an image-like state (B, C, ...).
    Extra call arguments (``class_labels``, ``encoder_hidden_states``, ...) pass through; one positional integer
    tensor (the labels of :func:`sdegen.classifier_free_guidance` and :func:`sdegen.classifier_guidance`) goes to
    ``class_labels`` for a network whose third parameter is another one (``UNet2DConditionModel``'s is
    ``encoder_hidden_states``).
    """

    def __init__(self, unet: Callable, learned_variance: Optional[bool] = None):
        super().__init__()
        if hasattr(unet, "unet") and hasattr(unet, "scheduler"):
            raise TypeError(f"unet is a pipeline ({type(unet).__name__}); pass its network and scheduler: "
                            "from_diffusers(pipe.unet, pipe.scheduler).")
        if not callable(unet):
            raise TypeError(f"unet must be a callable network unet(sample, timestep); got {type(unet).__name__}.")
        if learned_variance is not None and not isinstance(learned_variance, bool):
            raise ValueError(f"learned_variance must be True, False or None; got {learned_variance!r}.")
        self.unet, self.learned_variance = unet, learned_variance
        self.labels_by_keyword = _third_parameter(unet) not in (None, "class_labels") and \
            _takes_keyword(unet, "class_labels")

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (self.labels_by_keyword and len(args) == 1 and isinstance(args[0], torch.Tensor)
                and not args[0].is_floating_point() and "class_labels" not in kwargs):
            args, kwargs = (), dict(kwargs, class_labels=args[0])  # labels, not an embedding of text
        out = self.unet(x, timestep, *args, **kwargs)
        out = getattr(out, "sample", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        cut = self.learned_variance if self.learned_variance is not None else x.ndim >= 3
        if (cut and isinstance(out, torch.Tensor) and out.ndim == x.ndim >= 2 and out.shape[1] == 2 * x.shape[1]
                and out.shape[2:] == x.shape[2:]):
            out = out[:, :x.shape[1]]
        return out


def _forward_parameters(net: Callable) -> Optional[list]:
    """The names of ``net``'s (or its forward's) parameters, None where Python cannot tell."""
    try:
        return list(inspect.signature(getattr(net, "forward", net)).parameters)
    except (TypeError, ValueError):
        return None


def _third_parameter(net: Callable) -> Optional[str]:
    names = _forward_parameters(net)
    return names[2] if names is not None and len(names) > 2 else None


def _takes_keyword(net: Callable, name: str) -> bool:
    names = _forward_parameters(net)
    return names is not None and name in names


class DiscreteTimestep:
    """t -> the timestep t N - 1 of a :class:`sdegen.DiscreteVPSDE`, rounded to the integer where t holds a table
    time (k + 1) / N to within its dtype's precision: a float32 time cannot represent (k + 1) / N exactly, and a
    network trained on integer timesteps is then fed exactly its integers. The same map as ScoreModel's
    ``time_input="timestep"`` (:meth:`sdegen.DiscreteVPSDE.timestep`); unlike ScoreModel, which refuses times
    before the table's first timestep, it maps them to negative timesteps."""

    def __init__(self, sde: DiscreteVPSDE):
        self.sde = sde

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        n = self.sde.num_timesteps
        k = self.sde.timestep(t)
        nearest = torch.round(k)
        # t N carries a relative round-off of a few eps(t.dtype): up to about 2 N eps in k
        return torch.where((k - nearest).abs() <= 4.0 * n * torch.finfo(k.dtype).eps, nearest, k)

    def __repr__(self) -> str:
        return f"DiscreteTimestep(num_timesteps={self.sde.num_timesteps})"


def _scheduler_setting(scheduler: Any, name: str) -> Any:
    """``scheduler.config[name]`` (diffusers' FrozenDict or an attribute-style config), None where absent."""
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def from_diffusers(unet: Callable, scheduler: Any, prediction_type: Optional[str] = None, *,
                   t_min: Optional[float] = None, terminal_alpha_bar: Optional[float] = None,
                   learned_variance: Optional[bool] = None) -> ScoreModel:
    """A diffusers network and its noise table as a model on :class:`sdegen.DiscreteVPSDE` (Ho et al. 2020's
    discrete DDPM, the convention of diffusers' ``UNet2DModel`` and its schedulers).

    Args:
        unet: ``unet(sample, timestep)`` returning a ``UNet2DOutput``-like object with ``.sample``, a tuple or a
            tensor (see :class:`DiffusersNet`); it receives the unscaled VP state x_t = sqrt(alpha_bar) x_0 +
            sqrt(1 - alpha_bar) eps and the (B,) timestep t N - 1, exact integers at the table's timesteps
            (diffusers' ``scale_model_input`` of its sigma-scaled schedulers gives the same x_t).
        scheduler: a diffusers scheduler (its ``alphas_cumprod`` and ``config.prediction_type`` are read) or the
            ``alphas_cumprod`` table itself (N values, decreasing inside (0, 1)).
        prediction_type: "epsilon", "v_prediction" or "sample" (diffusers' names; sdegen's "eps", "v" and "x0");
            default: the scheduler's ``config.prediction_type``, else "epsilon".
        t_min: the sde's end time, at least 1 / N (the default: timestep 0, the network's earliest).
        terminal_alpha_bar: a value 0 < v < alpha_bar_{N-2} that replaces the table's last entry. A zero-terminal-SNR
            table (``rescale_betas_zero_snr=True``) ends at alpha_bar = 0, where m(T) = 0 and the log-SNR is
            -infinity; every sdegen SDE needs m(T) > 0, so such a table is refused unless it is given (diffusers'
            sigma schedulers use 2^-24 where it is below the entry before). The network's input at timestep N - 1
            then differs from its training input by sqrt(v) x_0 in m.
        learned_variance: whether the network's output carries a learned variance in a second half of its channels
            (see :class:`DiffusersNet`); default: True for a scheduler whose ``variance_type`` is "learned" or
            "learned_range", False for another declared ``variance_type``, and otherwise (no ``variance_type``,
            as in DDIM's and Euler's schedulers, which DiT's pipeline uses) the image-like rule of DiffusersNet.

    Scheduler settings that belong to the sampler (``clip_sample``, ``thresholding``, the spacing) are not read:
    sdegen's samplers neither clip nor threshold (a UserWarning says so when the scheduler sets either). A v-prediction scheduler with ``timestep_type="continuous"``
    (its network takes 0.25 log sigma) is refused with the ScoreModel that fits it.

    Returns:
        ``ScoreModel(DiffusersNet(unet, learned_variance), DiscreteVPSDE(alphas_cumprod), prediction,
        time_input="timestep")``; sample with ``sdegen.sample(model.sde, model, ...)``. Outputs have x's shape and
        dtype; the network runs in its own dtype (a bfloat16 UNet under a float32 state, say). The model refuses
        times before 1 / N (negative timesteps, which the network has not seen).
    """
    table = getattr(scheduler, "alphas_cumprod", scheduler)
    if not isinstance(table, torch.Tensor):
        try:
            table = torch.as_tensor(table, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("scheduler must be a diffusers scheduler (with alphas_cumprod) or an alphas_cumprod "
                            f"table; got {type(scheduler).__name__}.") from None
    if terminal_alpha_bar is not None:
        if table.numel() < 2:
            raise ValueError(f"alphas_cumprod must hold at least 2 values; got {table.numel()}.")
        before = float(table[-2])
        if isinstance(terminal_alpha_bar, bool) or not (isinstance(terminal_alpha_bar, numbers.Real)
                                                         and 0 < terminal_alpha_bar < before):
            raise ValueError(f"terminal_alpha_bar must be a number in (0, {before:.3g}) (below the table's "
                             f"second-to-last entry); got {terminal_alpha_bar!r}.")
        table = torch.cat([table.detach().to(device="cpu", dtype=torch.float64).flatten()[:-1],
                           torch.tensor([float(terminal_alpha_bar)], dtype=torch.float64)])
    if t_min is not None and (isinstance(t_min, bool) or not (isinstance(t_min, numbers.Real)
                                                              and t_min >= 1.0 / table.numel())):
        raise ValueError(f"t_min must be >= 1/N = {1.0 / table.numel():g}, the time of timestep 0 (the network has "
                         f"not seen earlier noise levels); got {t_min!r}.")
    if prediction_type is None:
        prediction_type = _scheduler_setting(scheduler, "prediction_type") or "epsilon"
    if prediction_type == "v_prediction" and _scheduler_setting(scheduler, "timestep_type") == "continuous":
        raise ValueError("scheduler has timestep_type='continuous' with v_prediction (the network takes 0.25 log "
                         "sigma, not a timestep); build ScoreModel(DiffusersNet(unet), DiscreteVPSDE(scheduler.alphas_cumprod), "
                         "'v', time_input=lambda t: 0.25 * torch.log(sde.sigma(t))) instead.")
    if prediction_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {tuple(DIFFUSERS_PREDICTIONS)}; got {prediction_type!r}.")
    sde = DiscreteVPSDE(table, t_min=t_min)
    clipping = [name for name in ("clip_sample", "thresholding") if _scheduler_setting(scheduler, name) is True]
    if clipping:  # diffusers' DDPM and DDIM schedulers clip by default
        warnings.warn(f"from_diffusers: the scheduler sets {' and '.join(f'{n}=True' for n in clipping)}, which sdegen's "
                      "samplers do not apply: samples follow the ODE/SDE unclipped, as diffusers' with those settings "
                      "off.", UserWarning, stacklevel=2)
    if learned_variance is None:
        variance_type = _scheduler_setting(scheduler, "variance_type")
        if variance_type is not None:  # a scheduler that says; others leave it to the output's shape
            learned_variance = variance_type in ("learned", "learned_range")
    return ScoreModel(DiffusersNet(unet, learned_variance), sde, prediction=DIFFUSERS_PREDICTIONS[prediction_type],
                      time_input="timestep")


def diffusers_time_grid(sde: DiscreteVPSDE, timesteps, *, final_timestep: Optional[float] = None) -> torch.Tensor:
    """sdegen's times t_k = (k + 1) / N of a diffusers scheduler's ``timesteps`` (after ``set_timesteps``): a
    decreasing float64 grid for ``sdegen.sample(..., schedule=grid)``.

    Repeated consecutive timesteps (Heun's scheduler lists every inner timestep twice) count once. A diffusers run
    that ends at sigma = 0 (DDIM's ``set_alpha_to_one=True``, ``final_sigmas_type="zero"``) takes its last step
    to Tweedie's denoiser: sample with ``denoise=True``. One that ends at timestep 0 (``set_alpha_to_one=False``,
    ``final_sigmas_type="sigma_min"``) takes one more step: pass ``final_timestep=0``.

    At integer timesteps the noise levels are the table's own. At fractional ones sdegen interpolates the log-SNR
    linearly (diffusers' ``_sigma_to_t`` does the same, so Karras-sigma timesteps map exactly), whereas diffusers'
    ``timestep_spacing="linspace"`` interpolates sigma itself linearly between table entries: those runs see
    slightly different noise levels at the same timesteps.
    """
    if not isinstance(sde, DiscreteVPSDE):
        raise TypeError(f"sde must be an sdegen.DiscreteVPSDE (e.g. from_diffusers(...).sde); got {type(sde).__name__}.")
    try:
        ks = torch.as_tensor(timesteps).detach().to(device="cpu", dtype=torch.float64).flatten()
    except (TypeError, RuntimeError, ValueError):
        hint = " (the scheduler's .timesteps, after set_timesteps)" if hasattr(timesteps, "timesteps") else ""
        raise TypeError(f"timesteps must be a sequence or tensor of timesteps{hint}; got "
                        f"{type(timesteps).__name__}.") from None
    if ks.numel() == 0:
        raise ValueError("timesteps must hold at least one timestep.")
    if not bool(torch.isfinite(ks).all()):
        raise ValueError(f"timesteps must be finite; got {ks.tolist()[:8]}.")
    ks = torch.unique_consecutive(ks)
    if final_timestep is not None:
        if float(final_timestep) == float(ks[-1]):
            raise ValueError(f"final_timestep={final_timestep!r}: the timesteps already end there (DDIM's 'leading' "
                             "spacing lists timestep 0); leave final_timestep unset.")
        ks = torch.cat([ks, torch.tensor([float(final_timestep)], dtype=torch.float64)])
    if ks.numel() < 2 or bool((ks[1:] >= ks[:-1]).any()):
        bad = int((ks[1:] >= ks[:-1]).nonzero()[0]) if ks.numel() >= 2 else 0
        raise ValueError(f"timesteps must decrease strictly and give at least two times (with final_timestep); got "
                         f"{ks.numel()} timesteps, {ks[bad:bad + 2].tolist()} at positions {bad} and {bad + 1}.")
    return sde.time_of_timestep(ks)


def from_denoiser(denoiser: Callable, sde: SDE, *, cast_input: Any = "auto") -> ScoreModel:
    """A denoiser in k-diffusion's and EDM's convention as a model under any SDE.

    The denoiser D(x_sigma, sigma) takes the sigma-scaled input x_sigma = x_0 + sigma eps and the (B,) noise level
    sigma and returns its estimate of x_0 (Karras et al. 2022, eqs. 2-3 and 7; k-diffusion's ``Denoiser`` and
    ``external`` wrappers; EDM's ``EDMPrecond``). Under an SDE with kernel N(m x_0, s^2 I),
    x_t = m x_sigma with sigma = s / m, so

        D_sdegen(x, t) = D(x / m(t), sigma(t)).

    Returns ``ScoreModel(denoiser, sde, prediction="x0", time_input="edm_sigma", scale_input=True,
    cast_input=cast_input)``; extra call arguments (class labels, conditioning) pass through to the denoiser.
    The denoiser is called in the state's dtype first (``cast_input="auto"``): a wrapper that casts for its inner
    network itself (EDM's ``EDMPrecond``) computes its skip connection c_skip x in the state's precision. One that
    fails on the dtype mismatch is then called in its parameters' dtype from that call on; ``cast_input=True`` does
    so from the start, ``False`` never. A k-diffusion wrapper (``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser``,
    ``VDenoiser``) around a 16-bit network cannot be cast from outside: it scales its input by c_in(sigma) in
    sigma's dtype, which promotes a cast input back to float32. Cast inside it instead, e.g.
    ``DiscreteEpsDDPMDenoiser(lambda x, t: unet(x.bfloat16(), t).sample.float(), alphas_cumprod, quantize=False)``
    with ``cast_input=False``.
    """
    return ScoreModel(denoiser, sde, prediction="x0", time_input="edm_sigma", scale_input=True,
                      cast_input=cast_input)


class ScaledTime:
    """t -> scale * t: score_sde's continuous VP networks embed 999 t."""

    def __init__(self, scale: float):
        if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
            raise ValueError(f"time_scale must be a finite number > 0; got {scale!r}.")
        self.scale = float(scale)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale * t

    def __repr__(self) -> str:
        return f"ScaledTime({self.scale:g})"


class NoiseLevelScore(torch.nn.Module):
    """eps(y, sigma) = -sigma net(y, sigma) of a network that returns the score of p_sigma at the sigma-scaled
    input y = x_0 + sigma z (score_sde's VE / NCSN++ networks): the noise estimate, the same in every SDE's
    coordinates."""

    def __init__(self, net: Callable):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be a callable network net(x, sigma); got {type(net).__name__}.")
        self.net = net

    def forward(self, y: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.net(y, sigma, *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network must return a tensor; got {type(out).__name__}.")
        return -append_dims(sigma, out.ndim) * out


def _check_vp_family(sde: SDE) -> None:
    """score_sde's VP convention feeds the network 999 t and the state itself: only meaningful under a continuous
    VP or sub-VP process on [0, 1] (m^2 + s^2 = 1, or s = 1 - m^2)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE; got {type(sde).__name__}.")
    if hasattr(sde, "timestep"):
        raise ValueError("sde: convention='vp' is for score_sde's continuous-time networks; a network on a DDPM table's "
                         "integer timesteps goes through from_diffusers (or ScoreModel(..., time_input='timestep')).")
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) * sde.T
    m, s = sde.mean_coeff(t), sde.std(t)
    vp, sub_vp = torch.allclose(m**2 + s**2, torch.ones_like(m)), torch.allclose(s, 1.0 - m**2)
    if sde.T != 1.0 or not (vp or sub_vp):
        raise ValueError(f"sde: convention='vp' feeds the network 999 t and the unscaled state, which means what it was "
                         f"trained on only under a VP or sub-VP SDE on [0, 1] (sdegen.VPSDE, sdegen.SubVPSDE with its "
                         f"betas); got {sde!r}. A VE network takes convention='ve'.")


def from_score_sde(net: Callable, sde: SDE, convention: str = "vp", *, time_scale: float = 999.0) -> ScoreModel:
    """A network in the conventions of score_sde (Song et al. 2021; the ``get_score_fn`` of their code) as a model.

    - ``convention="vp"`` (continuous VP and sub-VP checkpoints, DDPM++ / NCSN++ "cont."): the network takes the
      state x_t and ``time_scale * t`` (999 t, their embedding's range) and returns -s(t) score, the noise
      estimate; sdegen divides by the sde's own s(t). Use the SDE it was trained with (:class:`sdegen.VPSDE`,
      :class:`sdegen.SubVPSDE` with the same betas).
    - ``convention="ve"`` (VE / NCSN++ checkpoints): the network takes x_sigma = x_0 + sigma z and its noise
      level sigma and returns the score of p_sigma at x_sigma. Under any SDE it is fed x / m(t) and
      sigma(t) = s / m, and its score maps back as score_x = score_sigma / m. With ``sdegen.VESDE(kernel="paper")``
      (m = 1, s(t) = sigma_min (sigma_max / sigma_min)^t) the noise levels are exactly those it was trained on.

    Shapes: x (B, ...), t (B,) or scalar; outputs have x's shape and dtype.
    """
    if convention not in SCORE_SDE_CONVENTIONS:
        raise ValueError(f"convention must be one of {SCORE_SDE_CONVENTIONS}; got {convention!r}.")
    if convention == "vp":
        _check_vp_family(sde)
        return ScoreModel(net, sde, prediction="eps", time_input=ScaledTime(time_scale))
    return ScoreModel(NoiseLevelScore(net), sde, prediction="eps", time_input="edm_sigma", scale_input=True)


__all__ = ["from_diffusers", "diffusers_time_grid", "from_denoiser", "from_score_sde", "DiffusersNet",
           "DiscreteTimestep", "NoiseLevelScore", "ScaledTime", "DIFFUSERS_PREDICTIONS", "SCORE_SDE_CONVENTIONS"]
