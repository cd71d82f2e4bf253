"""A minimal training helper: one loop (:func:`train`), an exponential moving average of the weights (:class:`EMA`),
and checkpoints that store state dicts plus the plain-data config needed to rebuild the model.

Hooks for distributed training (kept here so a DistributedDataParallel wrapper needs no change to the loop):
``wrap_model`` turns the model into what the loss is computed through (e.g. ``lambda m: DDP(m)``), the EMA and
checkpoints always use the unwrapped model; ``data`` may be any iterable of batches (a DataLoader with a
DistributedSampler, say) instead of tensors; ``is_main`` says whether this process shows progress and saves;
``on_step`` is called after every optimizer step (for logging, or a barrier).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._validate import check_device, check_flag, check_int, check_number
from .nets import NETS, build_net
from .models import ScoreModel, settings_that_apply
from .noise import torch_generator
from .sde import SDE, VESDE, SubVPSDE, VPSDE

Batch = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
SDES = {"VPSDE": VPSDE, "SubVPSDE": SubVPSDE, "VESDE": VESDE}


_LOW_PRECISION = (torch.float16, torch.bfloat16)


class EMA:
    """Exponential moving average of a module's parameters: theta_ema <- decay theta_ema + (1 - decay) theta
    (the weights DDPM and Song et al. 2021 sample with). Buffers are copied as they are.

    ``warmup=True`` uses decay min(decay, (1 + n) / (10 + n)) at update n, so early averages are not dominated
    by the random initialisation. The average of a 16-bit parameter is kept in float32 and written to
    ``module`` in the parameter's dtype after each update: in bfloat16 an increment (1 - decay)(theta - theta_ema)
    below half a unit of the last place (2^-9 relative) would be lost, and a decay of 0.999 would freeze it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if isinstance(decay, bool) or not (isinstance(decay, numbers.Real) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must lie in [0, 1); got {decay!r}.")
        check_flag(warmup, "warmup")
        self.decay, self.warmup, self.num_updates = float(decay), warmup, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._shadow: Dict[int, torch.Tensor] = {}
        self._sync_shadow()

    def _sync_shadow(self) -> None:
        """float32 copies of the module's 16-bit parameters, taken from its current weights."""
        self._shadow = {i: p.detach().to(torch.float32) for i, p in enumerate(self.module.parameters())
                        if p.dtype in _LOW_PRECISION}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        d = min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay
        for i, (pe, p) in enumerate(zip(self.module.parameters(), model.parameters())):
            if pe.dtype not in _LOW_PRECISION:
                self._shadow.pop(i, None)
                pe.lerp_(p.detach(), 1.0 - d)
                continue
            held = self._shadow.get(i)
            held = pe.detach().to(torch.float32) if held is None else held.to(pe.device)
            # an entry of the module that is not the rounding of its float32 average was set outside update
            # (weights loaded into ema.module, say): it restarts the average there (elementwise, no host read)
            held = torch.where(pe == held.to(pe.dtype), held, pe.detach().to(torch.float32))
            pe.copy_(held.lerp_(p.detach().to(torch.float32), 1.0 - d))
            self._shadow[i] = held
        for be, b in zip(self.module.buffers(), model.buffers()):
            be.copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        state = {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                 "module": self.module.state_dict()}
        if self._shadow:  # an entry the module no longer rounds to is ignored at the next update
            state["float32_shadow"] = {i: v.clone() for i, v in self._shadow.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.warmup = bool(state.get("warmup", self.warmup))  # states saved before warmup was stored keep ours
        self.module.load_state_dict(state["module"])
        self._sync_shadow()
        for i, v in state.get("float32_shadow", {}).items():
            if int(i) in self._shadow:
                self._shadow[int(i)].copy_(v)


def iterate_batches(data: Union[torch.Tensor, Sequence[torch.Tensor], Iterable], batch_size: int,
                    generator: Optional[torch.Generator] = None) -> Iterator[Batch]:
    """Endless minibatches. Tensors (or a tuple of tensors sharing dim 0) are reshuffled every epoch with
    ``generator`` (the permutation is drawn on the generator's device, so data kept on a GPU is indexed there
    without a host round trip); any other iterable (a DataLoader, say) is cycled as it is."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and all(isinstance(d, torch.Tensor) for d in data):
        n = data[0].shape[0]
        if any(d.shape[0] != n for d in data):
            raise ValueError(f"tensors in data must share their first dimension; got {[d.shape[0] for d in data]}.")
        batch_size = check_int(batch_size, "batch_size", lo=1)
        device = generator.device if generator is not None else data[0].device
        while True:
            perm = torch.randperm(n, generator=generator, device=device)
            for i in range(0, n - min(batch_size, n) + 1, min(batch_size, n)):
                idx = perm[i:i + batch_size]
                out = tuple(d[idx.to(d.device)] for d in data)
                yield out[0] if len(out) == 1 else out
    else:
        yield from itertools.cycle(data)


def takes_seed(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` has a parameter named ``seed`` that can be passed by keyword (the sdegen losses do)."""
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # a callable without an introspectable signature: the positional form
        return False
    p = params.get("seed")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def batch_loss(loss_fn: Callable[..., torch.Tensor]) -> Callable[[Any, Batch, torch.Generator], torch.Tensor]:
    """``loss_fn`` as a function of (model, batch, generator), the form :func:`train` calls.

    A loss with a ``seed`` parameter (:func:`sdegen.dsm_loss` and the other sdegen losses) is called as
    ``loss_fn(model, x, seed=generator)`` for a tensor batch and ``loss_fn(model, x, y, ..., seed=generator)`` for
    a tuple or list batch (x, y, ...), so labels reach the loss as its extra arguments and the random source goes
    to its ``seed``. Any other loss is called as ``loss_fn(model, batch, generator)``, the batch as it is.
    The signature is inspected once, here.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}.")
    if getattr(loss_fn, "__name__", None) == "classifier_loss" and getattr(loss_fn, "__module__", "") == "sdegen.losses":
        raise TypeError("loss_fn: classifier_loss takes the SDE as its second argument (classifier, sde, x0, y), so "
                        "it cannot be called as loss_fn(model, x, y, seed=...); pass "
                        "lambda m, batch, g: sdegen.classifier_loss(m, sde, *batch, seed=g).")
    if not takes_seed(loss_fn):
        return loss_fn

    def call(model, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        return loss_fn(model, *parts, seed=generator)

    return call


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, its EMA (or None), the per-step losses and the optimizer;
    with an ``evaluate`` callback also the evaluations [(steps done, value), ...], the best of them
    (``best_step``, ``best_value``) and whether the run stopped early. ``steps`` counts the optimizer steps taken
    in all (``start_step`` included; ``restore_best`` puts back the weights of ``best_step`` but not the optimizer
    state of that step), and ``generator`` is the random stream in its final state: pass both back
    (``start_step=result.steps``, ``seed=result.generator``, with ``optimizer`` and ``ema``) to continue the run."""

    model: nn.Module
    ema: Optional[EMA]
    losses: List[float] = field(default_factory=list)
    optimizer: Optional[torch.optim.Optimizer] = None
    evaluations: List[Tuple[int, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    stopped_early: bool = False
    steps: int = 0
    generator: Optional[torch.Generator] = None


def data_device(data, model: nn.Module) -> torch.device:
    """The device training draws its randomness on: that of the data tensors, else that of the model's weights."""
    first = data if isinstance(data, torch.Tensor) else (data[0] if isinstance(data, (tuple, list)) and data else None)
    if isinstance(first, torch.Tensor):
        return first.device
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    return param.device if param is not None else torch.device("cpu")


def _check_train_options(steps, lr, ema_decay, grad_clip, warmup_steps, evaluate, eval_every, patience, check_every,
                         **flags: Any) -> None:
    """The options of :func:`train`, checked before any work; ``flags`` are its True/False options by name."""
    check_int(steps, "steps", lo=0)
    check_number(lr, "lr", lo=0.0, lo_open=True)
    check_number(ema_decay, "ema_decay", lo=0.0, hi=1.0, hi_open=True, none_ok=True, hint=" None keeps no EMA.")
    check_number(grad_clip, "grad_clip", lo=0.0, lo_open=True, none_ok=True,
                 hint=" It is the largest global gradient norm; None turns clipping off.")
    check_int(warmup_steps, "warmup_steps", lo=0)
    for name, flag in flags.items():
        check_flag(flag, name)
    check_int(check_every, "check_every", lo=1, hint=" (steps between loss read-backs)")
    if evaluate is None:
        if patience is not None or flags["restore_best"] or eval_every is not None:
            raise ValueError("eval_every, patience and restore_best need an evaluate callback (a held-out metric to "
                             "watch).")
        return
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable evaluate(module) -> float; got {type(evaluate).__name__}.")
    if eval_every is None:
        raise ValueError("eval_every must be an int >= 1 when evaluate is given (steps between evaluations); got "
                         "None.")
    check_int(eval_every, "eval_every", lo=1, hint=" (steps between evaluations)")
    check_int(patience, "patience", lo=1, none_ok=True, hint=" (evaluations without improvement)")


class _LossLog:
    """Per-step losses kept on their device and read back every ``every`` steps in one transfer, so a training step
    waits on nothing; a NaN or infinite loss raises at the next read-back, naming the step it appeared at."""

    def __init__(self, every: int, immediate: bool):
        self.every, self.immediate = every, immediate
        self.values: List[float] = []
        self.pending: List[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> Optional[float]:
        self.pending.append(loss.detach())
        if self.immediate or len(self.pending) >= self.every:
            self.flush()
            return self.values[-1]
        return None

    def flush(self) -> None:
        if not self.pending:
            return
        first = len(self.values)
        read = torch.stack([v.reshape(()).to(torch.float64) for v in self.pending]).tolist()
        self.pending = []
        for k, value in enumerate(read):
            if value != value or abs(value) == float("inf"):
                raise FloatingPointError(f"the loss became {value} at step {first + k}; lower lr or check the data.")
        self.values.extend(read)


def _snapshot(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Watcher:
    """Calls ``evaluate`` on the weights being kept (the EMA's when there is one), remembers the best value and a
    copy of the weights that gave it, and says when ``patience`` evaluations in a row brought no improvement."""

    def __init__(self, evaluate, eval_every: int, patience: Optional[int], restore_best: bool):
        self.evaluate, self.every, self.patience, self.restore_best = evaluate, eval_every, patience, restore_best
        self.history: List[Tuple[int, float]] = []
        self.best: Optional[Tuple[int, float]] = None
        self.saved: Optional[Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]] = None
        self.stale = 0

    def __call__(self, done: int, model: nn.Module, ema: Optional[EMA]) -> bool:
        """Evaluate after ``done`` steps; returns True when training should stop."""
        module = ema.module if ema is not None else model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            value = float(self.evaluate(module))
        model.train(was_training)
        if value != value:
            raise FloatingPointError(f"evaluate returned NaN after {done} steps.")
        self.history.append((done, value))
        if self.best is None or value < self.best[1]:
            self.best, self.stale = (done, value), 0
            if self.restore_best:
                self.saved = (_snapshot(model), copy.deepcopy(ema.state_dict()) if ema is not None else None)
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def restore(self, model: nn.Module, ema: Optional[EMA]) -> None:
        if self.saved is None:
            return
        weights, ema_state = self.saved
        model.load_state_dict(weights)
        if ema is not None:
            ema.load_state_dict(ema_state)


DEFAULT_LR, DEFAULT_EMA_DECAY = 2e-4, 0.999  # the Adam rate made here and the EMA decay of a new EMA


class _DefaultDecay(float):
    """The default of ``train``'s ema_decay: equal to DEFAULT_EMA_DECAY, but told apart from a value passed."""

    def __repr__(self) -> str:
        return repr(float(self))


_EMA_DECAY_UNSET = _DefaultDecay(DEFAULT_EMA_DECAY)


def _check_trainable(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Refuse float16 parameters for the Adam made here: its eps (1e-8) and small squared gradients underflow to 0
    in float16, and the first step turns the weights into NaN."""
    if optimizer is None and any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        raise ValueError("model has float16 parameters: the Adam optimizer made by train keeps its state in the "
                         "parameters' dtype, where its eps (1e-8) and small squared gradients are 0, so the first "
                         "step makes the weights NaN. Train float32 weights (under torch.autocast for speed), "
                         "bfloat16 ones, or pass an optimizer of your own that suits float16.")


def _check_finite_weights(model: nn.Module, done: int) -> None:
    """FloatingPointError if a parameter is not finite after the run (one read-back for all of them)."""
    params = [p for p in model.parameters() if p.is_floating_point() and p.requires_grad]
    if params and not bool(torch.stack([torch.isfinite(p.detach()).all().to(params[0].device)
                                        for p in params]).all()):
        raise FloatingPointError(f"the model's weights are not finite after {done} steps although the losses were "
                                 "finite: an optimizer step overflowed (a learning rate too high for the weights' "
                                 "dtype, or an optimizer state that underflows in it).")


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _cuda_indices(model: nn.Module, gen: torch.Generator) -> List[int]:
    """The CUDA devices a training step draws on: the generator's and those of the model's parameters."""
    devices = {p.device for p in itertools.chain(model.parameters(), model.buffers())} | {gen.device}
    return sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})


def _process_rank() -> int:
    """This process's rank in torch.distributed (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


@contextlib.contextmanager
def _global_rng_of_step(base_seed: int, step: int, rank: int, cuda: List[int]):
    """torch's global generators of the CPU and of the CUDA devices ``cuda`` seeded from (base_seed, step, the
    process's rank) by a SplitMix64 hash on the host, their previous state restored on exit: the network's own
    draws (dropout) follow the run's seed and step, a resumed run makes the same ones, and the ranks of a
    distributed run make different ones."""
    seed = _splitmix64(_splitmix64(_splitmix64(base_seed) ^ step) ^ rank) >> 1
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def train(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data, steps: int, *, batch_size: int = 128,
          lr: Optional[float] = None, optimizer: Optional[torch.optim.Optimizer] = None,
          ema_decay: Optional[float] = _EMA_DECAY_UNSET, ema: Optional[EMA] = None, start_step: int = 0,
          grad_clip: Optional[float] = 1.0, warmup_steps: int = 0, seed: Union[int, torch.Generator] = 0,
          progress: bool = True,
          desc: str = "train", wrap_model: Optional[Callable[[nn.Module], nn.Module]] = None, is_main: bool = True,
          on_step: Optional[Callable[[int, float], None]] = None,
          evaluate: Optional[Callable[[nn.Module], float]] = None, eval_every: Optional[int] = None,
          patience: Optional[int] = None, restore_best: bool = False, check_every: int = 25) -> TrainResult:
    """Minimise a loss over ``steps`` Adam steps (Kingma & Ba 2015), e.g. ``train(model, sdegen.dsm_loss, x, 1000)``.

    Args:
        model: the module to train (in place).
        loss_fn: returns a scalar; it draws its own randomness (t and noise) from a torch.Generator seeded by
            ``seed``, so a run is reproducible. A loss with a ``seed`` parameter (dsm_loss, ddpm_loss,
            sliced_score_matching_loss) is called as ``loss_fn(wrapped_model, x, seed=generator)``, or ``loss_fn(wrapped_model, x, y, seed=generator)`` for
            tuple data (x, y): ``sdegen.dsm_loss`` then passes y to the model as its class label. Any other loss
            is called with three positional arguments, ``loss_fn(wrapped_model, batch, generator)`` (see
            :func:`batch_loss`). The generator lives on the data's device (the model's for a non-tensor
            ``data``), so the noise and times are drawn where the batch is, without a copy.
        data: a tensor (N, ...), a tuple of tensors (x, y, ...), or any iterable of batches.
        steps: optimizer steps (at most) in this call; batch_size: examples per step (a tensor or tuple ``data`` is
            shuffled into batches of this size; an iterable's own batches are used as they come).
        lr, warmup_steps: the learning rate (finite, > 0; default 2e-4 for the Adam optimizer made here; a given
            ``optimizer`` keeps its own unless ``lr`` is passed, which sets its groups' rate) with a linear warm-up
            over ``warmup_steps`` >= 0 steps (0: none), counted from step 0 of the whole run. Only the warm-up
            steps write the rate (base rate x (step + 1) / warmup_steps, the base being the groups'
            ``initial_lr``, where torch's LR schedulers keep it); after them the optimizer's rate is left alone,
            so a torch LR scheduler stepped in ``on_step`` or between calls takes effect.
        optimizer: a torch optimizer over ``model``'s parameters (default: Adam; float16 parameters need an
            optimizer of your own, see below); its state carries over between calls.
        ema_decay: keep an :class:`EMA` of the weights with this decay in [0, 1) (None: no EMA).
        ema: an existing :class:`EMA` of ``model`` to keep updating (a resumed run's), instead of a new one with
            ``ema_decay`` (which, set to another value than the EMA's own decay, raises ValueError).
        start_step: the optimizer steps already taken (a resumed run's ``TrainResult.steps``): the warm-up, the
            evaluation schedule and ``on_step`` continue from there.
        grad_clip: the largest global gradient norm, > 0 (None: no clipping).
        seed: the random source that shuffles the data and that the loss draws from: an int seeds a generator on
            the data's device, a torch.Generator is used as it is (on its own device). Randomness inside the
            network (dropout) draws from torch's global generators, which each step seeds from (the seed, the step)
            inside a fork of their state: it follows ``seed`` too, and the caller's global state is left as it was.
        progress: show a tqdm progress bar (True or False); desc: its label.
        wrap_model, is_main, on_step: hooks for distributed training (see the module docstring); ``on_step(step,
            loss)`` receives the loss as a float, so it reads the loss back at every step.
        evaluate: ``evaluate(module) -> float``, a held-out metric, lower is better, called under ``torch.no_grad``
            on the EMA weights (the model's without an EMA) before the first step, every ``eval_every`` steps and
            after the last step.
        patience: stop after this many evaluations in a row without a new best (None: run all ``steps``).
        restore_best: at the end, put back the weights (model and EMA) of the best evaluation. The best value and
            the count of evaluations without one are those of this call: a resumed call starts them afresh.
        check_every: steps between read-backs of the loss (for the progress bar and the finiteness check);
            between them a step never waits for the device.
    Returns: a :class:`TrainResult`. The loss must stay finite: a NaN or infinite loss raises at the next
    read-back, naming the step it appeared at, and weights that are not finite at the end raise too.
    """
    _check_train_options(steps, DEFAULT_LR if lr is None else lr, ema_decay, grad_clip, warmup_steps, evaluate, eval_every,
                         patience, check_every, restore_best=restore_best, progress=progress, is_main=is_main)
    check_int(start_step, "start_step", lo=0, hint=" (optimizer steps already taken by a resumed run)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None; got {type(optimizer).__name__}.")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be an sdegen.EMA (a resumed run's) or None; got {type(ema).__name__}.")
    if ema is not None and ema_decay is not _EMA_DECAY_UNSET and ema_decay != ema.decay:
        raise ValueError(f"ema_decay: the given ema keeps its own decay {ema.decay:g}; leave ema_decay unset (or "
                         f"equal to it) when passing ema; got ema_decay={ema_decay!r}.")
    _check_trainable(model, optimizer)
    call_loss = batch_loss(loss_fn)
    gen = torch_generator(seed, "seed", ("int", "generator"), device=data_device(data, model))
    batches = iterate_batches(data, batch_size, gen)
    net = wrap_model(model) if wrap_model is not None else model
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=DEFAULT_LR if lr is None else lr)
    for group in opt.param_groups:  # the rate before warm-up, kept where torch's LR schedulers keep it
        group["initial_lr"] = group.get("initial_lr", group["lr"]) if lr is None else lr
        if lr is not None:
            group["lr"] = lr
    base_lrs = [group["initial_lr"] for group in opt.param_groups]
    if ema is None and ema_decay is not None:
        ema = EMA(model, ema_decay)
    watch = _Watcher(evaluate, eval_every, patience, restore_best) if evaluate is not None else None
    log = _LossLog(check_every, immediate=on_step is not None)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc)
    model.train()
    stopped, done = False, start_step
    if watch is not None and steps > 0:
        watch(start_step, model, ema)  # the starting weights compete too: training never returns worse than its start
    base_seed, rank, cuda = gen.initial_seed(), _process_rank(), _cuda_indices(model, gen)
    for step in range(start_step, start_step + steps):
        if step < warmup_steps:
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * (step + 1) / warmup_steps
        with _global_rng_of_step(base_seed, step, rank, cuda):
            loss = call_loss(net, next(batches), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        value, done = log.add(loss), step + 1
        if bar is not None:
            bar.update(1)
            if value is not None:
                recent = log.values[-100:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if on_step is not None:
            on_step(step, value)
        if watch is not None and done % eval_every == 0:
            log.flush()
            if watch(done, model, ema):
                stopped = True
                break
    log.flush()
    if done > start_step:
        _check_finite_weights(model, done)
    if watch is not None and done > start_step and (not watch.history or watch.history[-1][0] != done):
        watch(done, model, ema)
    if bar is not None:
        bar.close()
    model.eval()
    result = TrainResult(model, ema, log.values, opt, stopped_early=stopped, steps=done, generator=gen)
    if watch is not None:
        watch.restore(model, ema)
        result.evaluations = watch.history
        if watch.best is not None:
            result.best_step, result.best_value = watch.best
    return result


# ---------------------------------------------------------------------------------------------- checkpoints
def sde_config(sde: SDE) -> Dict[str, Any]:
    """Plain-data description of an SDE that :func:`build_sde` turns back into it: {"class": "module:QualName",
    "config": sde.config()} (see :meth:`sdegen.SDE.describe`); any SDE whose ``config()`` returns its constructor's
    keyword arguments and whose class is importable qualifies, user SDEs included."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE; got {type(sde).__name__}.")
    return sde.check_description()


def build_sde(config: Dict[str, Any]) -> SDE:
    """Rebuild an SDE from :func:`sde_config`'s output (or the older {"name": "VPSDE", **kwargs} form)."""
    if not isinstance(config, dict):
        raise ValueError(f"an SDE config must be a dict from sde_config; got {type(config).__name__}.")
    if "class" in config:
        return SDE.from_description(config)
    config = dict(config)
    name = config.pop("name", None)
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; valid names are: {', '.join(SDES)}.")
    return SDES[name](**config)


def model_config(model: nn.Module) -> Dict[str, Any]:
    """Plain-data config of a network from :mod:`sdegen.nets` or a :class:`ScoreModel` around one (its SDE, what it
    predicts, its time input and input scaling, and EDM's preconditioning settings). Settings that do not apply to
    the model (``num_steps`` without time_input="index", EDM's without prediction="edm") are recorded as None."""
    if isinstance(model, ScoreModel):
        if callable(model.time_input):
            raise ValueError("a ScoreModel with a callable time_input cannot be described by plain data.")
        # c_noise is the time input prediction="edm" chooses itself when none is given
        time_input = None if model.time_input == "c_noise" else model.time_input
        used = settings_that_apply(model.prediction, time_input, model.preconditioning)
        settings = {name: getattr(model, name) if name in used else None
                    for name in ("num_steps", "sigma_data", "preconditioning", "M")}
        return {"kind": "ScoreModel", "net": model_config(model.net), "sde": sde_config(model.sde),
                "prediction": model.prediction, "time_input": time_input, "scale_input": model.scale_input,
                "cast_input": model.cast_input,
                **settings}
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd network describes the module it compiled
    if not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no .config; give save_checkpoint a config=... explicitly.")
    if NETS.get(type(model).__name__) is not type(model):  # a class of the same name elsewhere is not sdegen's
        raise ValueError(f"{type(model).__name__}: load_checkpoint rebuilds the networks of sdegen.nets only "
                         f"({', '.join(sorted(NETS))}); give save_checkpoint a config=... explicitly to save it anyway "
                         "and rebuild the network yourself from the checkpoint's 'model' weights.")
    return {"kind": "net", "name": type(model).__name__, "config": dict(model.config)}


def build_model(config: Dict[str, Any]) -> nn.Module:
    """Rebuild a model (untrained) from :func:`model_config`'s output. Configs written before a ScoreModel had
    ``scale_input``, ``sigma_data``, ``preconditioning`` and ``M`` get their defaults; older configs also recorded
    these settings (and ``num_steps``) for models they do not apply to, where they had no effect: they are left
    out."""
    if config.get("kind") == "ScoreModel":
        prediction, time_input = config["prediction"], config["time_input"]
        used = settings_that_apply(prediction, time_input, config.get("preconditioning"))
        options = {name: config[name] for name in ("scale_input", "cast_input") + used
                   if config.get(name) is not None}
        return ScoreModel(build_model(config["net"]), build_sde(config["sde"]), prediction=prediction,
                          time_input=time_input, **options)
    if config.get("kind") == "net":
        return build_net(config["name"], config["config"])
    raise ValueError(f"config must come from model_config (kind 'ScoreModel' or 'net'); got kind {config.get('kind')!r}.")


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike file name; got {type(path).__name__} {path!r}.")


CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "sdegen.checkpoint", 1


def _plain(value: Any, where: str) -> Any:
    """``value`` as the plain data that ``torch.load(weights_only=True)`` reads back: NumPy scalars and subclasses of
    the Python number types become Python numbers; TypeError naming ``where`` for any other object."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if type(value) in (list, tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot "
                    "store (load_checkpoint reads plain data and tensors only, with torch.load(weights_only=True)): "
                    "convert it first (str(path), float(value), sde.describe(), ...).")


def _unwrapped_keys(state: Dict[str, Any]) -> Dict[str, Any]:
    """A state dict without torch.compile's "_orig_mod." prefixes, so that the uncompiled module loads it."""
    return type(state)((".".join(part for part in k.split(".") if part != "_orig_mod"), v) for k, v in state.items())


def save_checkpoint(path: str, model: nn.Module, *, ema: Optional[EMA] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, config: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None, is_main: bool = True) -> None:
    """Write {config, model state, EMA state, optimizer state, extra} to ``path`` (plain data and tensors only,
    so :func:`load_checkpoint` can read it with ``weights_only=True``). Only the main process writes; the file
    appears atomically (written to a temporary name, then renamed).

    Raises TypeError for a ``path`` that is not a str or os.PathLike, a ``model`` that is not a torch.nn.Module, an
    ``ema`` that is not an :class:`EMA`, an ``optimizer`` that is not a torch optimizer, or ``config``/``extra``
    that are not dicts or hold objects other than plain data and tensors (NumPy scalars are stored as Python
    numbers); ValueError (from :func:`model_config`) for a model that cannot describe itself. A torch.compile'd
    network is saved as the module it compiled."""
    check_flag(is_main, "is_main")
    _check_path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a ScoreModel or a network of sdegen.nets); got "
                        f"{type(model).__name__}.")
    for name, value, kind in (("ema", ema, EMA), ("optimizer", optimizer, torch.optim.Optimizer),
                              ("config", config, dict), ("extra", extra, dict)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__} or None; got {type(value).__name__}.")
    if not is_main:
        return
    weights = _unwrapped_keys(model.state_dict())
    ema_state = ema.state_dict() if ema is not None else None
    if isinstance(ema_state, dict) and isinstance(ema_state.get("module"), dict):
        ema_state = dict(ema_state, module=_unwrapped_keys(ema_state["module"]))
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
             "config": _plain(config if config is not None else model_config(model), "config"), "model": weights,
             "dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in weights.items()
                        if t.is_floating_point()},
             "ema": ema_state, "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "extra": _plain(extra or {}, "extra")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cast_like_saved(model: nn.Module, dtypes: Optional[Dict[str, str]]) -> None:
    """Give the rebuilt model's floating parameters and buffers the dtypes they were saved in (a float64 or bfloat16
    network comes back as it was, not as float32). Older checkpoints record none and keep the built dtypes."""
    if not isinstance(dtypes, dict):
        return
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        saved = getattr(torch, str(dtypes.get(name, "")), None)
        if isinstance(saved, torch.dtype) and tensor.is_floating_point() and tensor.dtype != saved:
            tensor.data = tensor.data.to(saved)


def load_checkpoint(path: str, *, map_location=None, use_ema: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint` and load its weights (the EMA weights when present and
    ``use_ema``). Reads with ``torch.load(weights_only=True)``, so a checkpoint cannot run code.
    Returns (model in eval mode, the raw checkpoint dict).

    Raises FileNotFoundError naming ``path`` when there is no such file, and ValueError naming it when the file is
    not a checkpoint written by :func:`save_checkpoint` (not a torch file, or not a dict with its "config" and
    "model" entries); TypeError for a ``use_ema`` that is not a bool."""
    _check_path(path)
    check_flag(use_ema, "use_ema")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r}: no such checkpoint file.")
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        check_device(map_location, "map_location")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike mean "not a checkpoint"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch's message carries terminal colour codes
        refused = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
        if refused:
            raise ValueError(f"path {os.fspath(path)!r}: torch.load(weights_only=True) refused an object in it "
                             f"({refused[0]}); save_checkpoint stores plain data and tensors only, so this file was "
                             "written by other code (load it with torch.load(path, weights_only=False) only if "
                             "you trust its source).") from err
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise ValueError(f"path {os.fspath(path)!r} is not an sdegen checkpoint (torch.load failed: "
                         f"{type(err).__name__}: {first}).") from err
    missing = [k for k in ("config", "model") if not (isinstance(state, dict) and k in state)]
    if missing:
        got = f"a dict with keys {sorted(state)[:8]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"path {os.fspath(path)!r} is not an sdegen checkpoint: it holds {got}, without "
                         f"{missing} (write checkpoints with sdegen.save_checkpoint).")
    if not isinstance(state["config"], dict):
        raise ValueError(f"config: the checkpoint's config must be a dict from model_config; got "
                         f"{type(state['config']).__name__}.")
    version = state.get("version", CHECKPOINT_VERSION)
    newer = (f" It was written by a newer sdegen (checkpoint version {version}; this one reads up to "
             f"{CHECKPOINT_VERSION})." if isinstance(version, int) and version > CHECKPOINT_VERSION else "")
    try:
        with torch.random.fork_rng(devices=[]):  # the network's random initialisation, overwritten below
            model = build_model(state["config"])
    except (KeyError, TypeError, ImportError) as err:
        raise ValueError(f"path {os.fspath(path)!r}: its config cannot rebuild the model ({type(err).__name__}: "
                         f"{err}).{newer}") from err
    _cast_like_saved(model, state.get("dtypes"))
    ema = state.get("ema")
    weights = ema["module"] if (use_ema and isinstance(ema, dict) and "module" in ema) else state["model"]
    model.load_state_dict(weights)
    if isinstance(map_location, dict) or callable(map_location):  # the weights' device after torch.load's mapping
        device = next((t.device for t in weights.values() if isinstance(t, torch.Tensor)), None)
        if device is not None:
            model.to(device)
    elif map_location is not None:
        model.to(map_location)
    return model.eval(), state
