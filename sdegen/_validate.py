"""Argument checks shared by the public entry points (the bottom of the import graph: imports nothing of sdegen).

Every check raises ValueError or TypeError whose message starts with the parameter's name and says what was
received and what is valid, so a caller learns which argument to change and to what. Checks that read tensor
values do so once per call of a public function, never inside a step loop.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real
from typing import Any, Callable, Collection, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

STATE_DTYPES = (torch.float32, torch.float64)
_LOW_PRECISION_HINT = (" A network in low precision runs under a float32 state: ScoreModel casts its inputs to the "
                       "network's parameter dtype and its outputs back.")


def _interval(lo: Optional[float], hi: Optional[float], lo_open: bool = False, hi_open: bool = False) -> str:
    """The condition on a number in words: ">= 0", "< 1", "in (0, 1]" or "" (any value)."""
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_number(value: Any, name: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False, none_ok: bool = False, hint: str = "") -> Optional[float]:
    """A finite real number (not a bool) in the interval given by lo/hi (closed unless *_open); returns a float.

    A 0-d tensor holding a number is accepted. None passes when ``none_ok``.
    """
    if value is None and none_ok:
        return None
    what = f"a finite number {_interval(lo, hi, lo_open, hi_open)}".rstrip() + (" or None" if none_ok else "")
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__} {value!r}.{hint}")
    v = float(value)
    ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
        (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise ValueError(f"{name} must be {what}; got {value!r}.{hint}")
    return v


_INT_LIMIT = 1 << 63  # int64's range: what a tensor size, index or count can hold


def check_int(value: Any, name: str, *, lo: Optional[int] = None, hi: Optional[int] = None, none_ok: bool = False,
              hint: str = "") -> Optional[int]:
    """An int (not a bool, not a float such as 2.0) in [lo, hi]; returns it."""
    if value is None and none_ok:
        return None
    what = f"an int {_interval(lo, hi)}".rstrip() + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__} {value!r}.{hint}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {what}; got {value!r}.{hint}")
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise ValueError(f"{name} must be {what} within int64's range (|value| < 2^63); got {value!r}.{hint}")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """True or False only: a string such as "no" is truthy and would silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Collection, hint: str = "") -> Any:
    """One of ``choices`` (compared with ==; unhashable values are refused)."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{name} must be one of {valid}; got {value!r}.{hint}")
    return value


def check_callable(value: Any, name: str, what: str = "a callable") -> Any:
    if not callable(value):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}.")
    return value


def check_tensor(x: Any, name: str, *, dtypes: Optional[Sequence[torch.dtype]] = STATE_DTYPES, finite: bool = True,
                 min_ndim: int = 0, batch: bool = False) -> torch.Tensor:
    """A tensor of one of ``dtypes`` (None: any floating dtype), finite (NaN and +-inf refused) when ``finite``,
    of rank >= ``min_ndim``; ``batch`` asks for shape (B, ...) with B >= 1.

    The finiteness check reads the tensor once on the host on a CPU tensor; on an accelerator it is queued on the
    device (``torch._assert_async``) so that it never forces a host-device synchronisation.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    if dtypes is None:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}.")
    elif x.dtype not in dtypes:
        hint = _LOW_PRECISION_HINT if x.dtype in (torch.float16, torch.bfloat16) and \
            torch.float32 in dtypes else ""
        raise TypeError(f"{name} must have dtype {' or '.join(str(d).replace('torch.', '') for d in dtypes)}; "
                        f"got {x.dtype}.{hint}")
    need = max(min_ndim, 1 if batch else 0)
    if x.ndim < need or (batch and x.shape[0] < 1):
        form = "(B, ...) with B >= 1" if batch else f"at least {need} dimensions"
        raise ValueError(f"{name} must have shape {form}; got {tuple(x.shape)}.")
    if finite:
        check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse NaN and +-inf in x (see :func:`check_tensor` for the device rule)."""
    if x.device.type != "cpu":
        torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN or inf")
        return
    ok = torch.isfinite(x)
    if not bool(ok.all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        where = (~ok).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; got {kind} (first at index {tuple(where)}).")


def check_state_dtype(dtype: Any, name: str) -> torch.dtype:
    """The dtype of a solver's state: float32 or float64."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (torch.float32 or torch.float64); got {dtype!r}.")
    if dtype not in STATE_DTYPES:
        hint = _LOW_PRECISION_HINT if dtype in (torch.float16, torch.bfloat16) else ""
        raise TypeError(f"{name} must be float32 or float64 (the solver state's precision); got {dtype}.{hint}")
    return dtype


def check_shape(shape: Any, name: str) -> Tuple[int, ...]:
    """A shape (B, ...) of positive ints."""
    if isinstance(shape, (torch.Tensor, str)) or not isinstance(shape, Iterable):
        raise TypeError(f"{name} must be a sequence (B, ...) of positive ints; got {shape!r}.")
    shape = tuple(shape)
    if len(shape) < 1 or not all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ValueError(f"{name} must be (B, ...) of positive ints; got {shape}.")
    return tuple(int(n) for n in shape)


def check_same_shape(out: Any, like: torch.Tensor, name: str, what: str = "") -> None:
    """``out`` is a tensor of ``like``'s shape (no broadcasting: a (B, 1) or (1, D) output is an error)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor{what}; got {type(out).__name__}.")
    if out.shape != like.shape:
        raise ValueError(f"{name} must return a tensor of the state's shape {tuple(like.shape)}{what}; got "
                         f"{tuple(out.shape)} (outputs are not broadcast).")


def accepted_keywords(fn: Callable) -> Optional[Tuple[str, ...]]:
    """The keyword arguments ``fn`` accepts, or None when it takes **kwargs (or has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY))


def check_options(options: Mapping[str, Any], accepted: Optional[Iterable[str]], where: str) -> None:
    """Refuse keywords that ``where`` would not use, naming them and listing the ones it takes."""
    if accepted is None:
        return
    accepted = tuple(accepted)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise TypeError(f"{where} does not take {', '.join(map(repr, unknown))}; it takes: {takes}.")


def reject_inapplicable(given: Dict[str, Any], why: str) -> None:
    """Raise ValueError naming the first option in ``given`` (name -> value, None: not given) that was passed
    explicitly although it cannot apply; ``why`` says to what it applies and what to do instead."""
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{name}: {why}; leave {name} unset; got {name}={value!r}.")


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (labels, seeds): neither floating, complex nor bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a torch.device; ValueError naming ``name`` for something that is not one, or for CUDA where this
    torch build sees none."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0'; got "
                         f"{device!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={str(device)!r}, but this torch build sees no CUDA device (torch "
                         f"{torch.__version__}); pass {name}='cpu' or install a CUDA build of torch.")
    return device


SAMPLE_OPTIONS = ("x_T", "shape", "schedule", "noise", "denoise", "progress", "return_info", "return_trajectory",
                  "dtype", "device", "capture")
"""Keywords of :func:`sdegen.sample` that the entry points built on it may not have."""


def reject_sample_options(options: Mapping[str, Any], where: str, has: Collection[str] = ()) -> None:
    """TypeError for a keyword of :func:`sdegen.sample` that ``where`` does not take (``has``: those it does): its
    other keywords go to the sampler, which would otherwise be blamed for not taking it."""
    stray = sorted(set(options) & (set(SAMPLE_OPTIONS) - set(has)))
    if stray:
        raise TypeError(f"{where} has no option {stray[0]!r} (an option of sdegen.sample); its other keywords are "
                        "options of the sampler.")


def check_floating_dtype(dtype: Any, name: str = "dtype", why: str = "draws from a continuous distribution") -> torch.dtype:
    """A floating-point torch.dtype (16-bit ones included); TypeError naming ``name`` otherwise (an integer dtype
    would truncate every value)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating dtype (float16, bfloat16, float32 or float64): {why}; got "
                        f"{dtype!r}.")
    return dtype
