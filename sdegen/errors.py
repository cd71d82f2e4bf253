"""Failures of adaptive solves: :class:`SolverError`, and the retry that sets failing examples aside.

An adaptive solver shares its steps across the batch, so one example whose score is infinite or NaN, or whose
error never meets the tolerance, stops the whole batch. :class:`SolverError` names those examples, the time
reached and the last step size. With ``on_failure="mask"``, :func:`solve_without_failures` restarts the solve on
the other examples (their result is then that of a run on them alone) and returns the failed indices.
(:func:`sdegen.log_likelihood` on a fixed grid, where no example stops another, raises the same error for the
examples whose result is non-finite, or under "mask" returns them as NaN without a restart.)
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch

ON_FAILURE = ("raise", "mask")
_HINT = ("Check the model at these inputs and times, or pass on_failure='mask' to finish the other examples "
         "(the failed rows come back as NaN, their indices in the result).")
STEP_LIMIT_HINT = "Loosen rtol/atol, raise max_steps, or evaluate these examples separately."

R = TypeVar("R")


class SolverError(RuntimeError):
    """A solve could not go on (an adaptive one), or some examples' results are not finite (a fixed-grid
    likelihood).

    Attributes:
        method: the solver's name as the caller selects it (e.g. "adaptive_rk23", "ode (dopri5)").
        examples: indices (into the batch given to the solve) of the examples responsible.
        t: the time reached (the last accepted time, or where the failure was found); NaN when unknown.
        step: the last step size attempted (in the solver's own variable, stated in the message); NaN if unknown.
        reason: what went wrong (a non-finite state, a step size that underflowed, the step limit).
        maskable: whether ``on_failure="mask"`` sets the examples aside. The step limit is not: it follows from
            the tolerance and the budget rather than from one example, and dropping the examples that limited
            the last step would cascade through the batch, so it raises in either mode.
    """

    def __init__(self, method: str, examples: Sequence[int], t: float, step: float, reason: str,
                 detail: str = "", batch: Optional[int] = None, hint: str = _HINT, maskable: bool = True):
        self.method, self.examples, self.maskable = method, [int(i) for i in examples], maskable
        self.t, self.step, self.reason = float(t), float(step), reason
        shown = ", ".join(map(str, self.examples[:20])) + (", ..." if len(self.examples) > 20 else "")
        of = f" of {batch}" if batch is not None else ""
        who = (f"examples [{shown}] ({len(self.examples)}{of})" if self.examples
               else "no single example could be blamed")
        super().__init__(f"{method} failed at t={self.t:.6g} (last step size {self.step:.3g}): {reason}; {who}"
                         f"{': ' + detail if detail else ''}. {hint}")


def check_on_failure(on_failure: str) -> str:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE} ('mask' finishes the other examples and "
                         f"returns the failed ones as NaN); got {on_failure!r}.")
    return on_failure


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which examples of x (B, ...) hold a NaN or an infinity (stays on x's device)."""
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def rows_to_list(mask: Optional[torch.Tensor]) -> List[int]:
    return [] if mask is None else torch.nonzero(mask.detach().cpu()).flatten().tolist()


def check_finite_result(x: torch.Tensor, method: str, t: float, step: float = math.nan) -> None:
    """Raise :class:`SolverError` naming the examples of the solve's result x (B, ...) that are not finite."""
    bad = rows_to_list(nonfinite_rows(x))
    if bad:
        raise SolverError(method, bad, t, step, "the state became non-finite (NaN or inf)", batch=x.shape[0])


def solve_without_failures(solve: Callable[[Optional[torch.Tensor]], R], batch: int, on_failure: str,
                           device=None) -> Tuple[Optional[R], torch.Tensor, List[int]]:
    """Run ``solve(keep)`` on the examples ``keep`` (None: the whole batch) and set failing ones aside.

    ``solve`` raises :class:`SolverError` with indices into the examples it was given. With
    ``on_failure="raise"`` the error propagates; with "mask" the named examples of a maskable error are dropped
    and the solve starts again on the rest, until it succeeds or none are left. Returns (the last result or None when every
    example failed, the kept indices (long tensor on ``device``), the failed indices of the whole batch, sorted).
    """
    keep = torch.arange(batch, device=device)
    failed: List[int] = []
    while True:
        try:
            return solve(None if not failed else keep), keep, sorted(failed)
        except SolverError as err:
            if on_failure != "mask" or not err.examples or not err.maskable:
                if failed:  # a restart failed: name the examples of the caller's batch
                    err.examples = [int(keep[i]) for i in err.examples]
                    err.args = (f"{err.args[0]} (indices of the sub-batch left after setting aside {failed}; "
                                f"in the whole batch: {err.examples})",)
                raise
            drop = torch.zeros(keep.shape[0], dtype=torch.bool, device=keep.device)
            drop[torch.tensor(err.examples, device=keep.device)] = True
            failed += keep[drop].tolist()
            keep = keep[~drop]
            if keep.numel() == 0:
                return None, keep, sorted(failed)


def scatter_rows(part: Optional[torch.Tensor], keep: torch.Tensor, batch: int, like: torch.Tensor,
                 dim: int = 0) -> torch.Tensor:
    """Rows ``part`` placed at ``keep`` along ``dim`` of a NaN tensor with ``batch`` rows (``like``'s other dims)."""
    if part is not None and keep.numel() == batch:
        return part
    shape = list(like.shape)
    shape[dim] = batch
    out = torch.full(shape, math.nan, dtype=like.dtype, device=like.device)
    if part is not None:
        out.index_copy_(dim, keep.to(out.device), part)
    return out
