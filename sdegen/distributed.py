"""Sampling, likelihood evaluation and training across processes with torch.distributed (launched by torchrun).

Work is cut into fixed chunks of global example indices, [c b, (c + 1) b) for chunk c and batch size b, and
rank r of W takes chunks r, r + W, r + 2W, ... Example i draws its randomness from the per-example seed
``make_seeds(seed, N)[i]`` (:mod:`sdegen.noise`), a function of (seed, i) only, and every chunk is computed
exactly as a single process would compute it. So the same seed and batch size give the same samples and
log-likelihoods, bit for bit, on 1 or on N processes, even with adaptive solvers whose steps are shared by a
batch; N need not divide the number of examples. Results are gathered on rank 0 in global order (or written
as per-rank shards, see :func:`load_shards`) and the NFE is summed over chunks and ranks.

Training (:func:`train_ddp`) runs :func:`sdegen.train` with the model wrapped in DistributedDataParallel
(Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"): every rank takes
its slice of the same global batch, the gradients of the per-rank mean losses are averaged, so one step on W
ranks with per-rank batch b is one step on the concatenated batch of W b examples. The EMA is updated
identically on every rank; only rank 0 shows progress and writes checkpoints.

Without torchrun (no ``WORLD_SIZE`` in the environment and no process group) everything runs in one process.
"""

from __future__ import annotations

import datetime
import glob
import inspect
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ._deprecation import renamed
from ._validate import check_device, check_flag, check_int
from .likelihood import log_likelihood
from .noise import check_seed, make_seeds
from .sampling import sample
from .sde import SDE
from .training import TrainResult, batch_loss, save_checkpoint, train

BACKENDS = ("gloo", "nccl", "mpi", "ucc")


# ------------------------------------------------------------------------------------------ process group
@dataclass
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine, the
    ``device`` it computes on and the ``backend`` of the process group (None in a single process).
    ``owns_group``: the group was created by :func:`init_distributed` and :meth:`close` destroys it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.backend is not None and self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> "DistributedContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun, which sets RANK, "
                             f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}.") from None


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def current_context() -> DistributedContext:
    """The context of an already initialised process group (or a single process), without creating anything.

    A launch that describes several processes (WORLD_SIZE > 1 in the environment, as torchrun sets it) without a
    process group raises ValueError: each process would otherwise run the whole job and write the same files."""
    if not (dist.is_available() and dist.is_initialized()):
        world = os.environ.get("WORLD_SIZE", "1")
        if world.strip().isdigit() and int(world) > 1:
            raise ValueError(f"WORLD_SIZE={world} is set (a torchrun launch?) but no process group is initialised: "
                             f"call sdegen.init_distributed() first, or unset WORLD_SIZE to run one process.")
        return DistributedContext()  # one process: CPU by default, like sdegen.sample
    backend = str(dist.get_backend())
    local_rank = _env_int("LOCAL_RANK", dist.get_rank())
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(backend, local_rank),
                              backend, owns_group=False)


def init_distributed(backend: Optional[str] = None, *, timeout: Optional[float] = None) -> DistributedContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) and return a :class:`DistributedContext`.

    backend: "nccl" on CUDA machines, "gloo" otherwise (default: chosen by ``torch.cuda.is_available()``).
    timeout: seconds a collective may wait before failing (torch's default if None).
    Without WORLD_SIZE in the environment this is a single process on the CPU and nothing is initialised; if a
    group already exists it is used as it is. With NCCL the process is pinned to ``cuda:LOCAL_RANK``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic); got {backend!r}.")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0 or None; got {timeout!r}.")
    if dist.is_available() and dist.is_initialized():
        return current_context()
    if "WORLD_SIZE" not in os.environ:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this PyTorch build has no torch.distributed support.")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE); got RANK={rank}, WORLD_SIZE={world}.")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    device = _device_for(backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: Dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(**kwargs)
    return DistributedContext(rank, world, local_rank, device, backend, owns_group=True)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the process that prints and writes files. Before the process
    group exists, the rank torchrun gave the process decides (:func:`launched_rank`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return launched_rank() == 0
    return current_context().is_main


def launched_rank() -> int:
    """The global rank torchrun gave this process (environment variable RANK; 0 without torchrun), read without
    any process group: lets a script that should run once (a timing benchmark) stop on the other ranks."""
    return _env_int("RANK", 0)


# ------------------------------------------------------------------------------------------ sharding
def _check_count(n: int, name: str, minimum: int) -> int:
    return check_int(n, name, lo=minimum)


def shard_chunks(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> List[Tuple[int, int]]:
    """The chunks [lo, hi) of global indices 0..n-1 that ``rank`` of ``world_size`` handles: chunk c covers
    [c b, min(n, (c + 1) b)) and goes to rank c mod world_size. The chunks of all ranks partition range(n)."""
    _check_count(n, "n", 0)
    _check_count(batch_size, "batch_size", 1)
    _check_count(world_size, "world_size", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}); got {rank!r}.")
    starts = range(rank * batch_size, n, world_size * batch_size)
    return [(lo, min(n, lo + batch_size)) for lo in starts]


def shard_indices(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Global indices (int64, CPU) of the examples ``rank`` handles, in the order of :func:`shard_chunks`."""
    chunks = shard_chunks(n, batch_size, rank, world_size)
    if not chunks:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in chunks])


def _comm_device(ctx: DistributedContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(value: float, ctx: Optional[DistributedContext] = None) -> float:
    """The sum of a Python number over all ranks (the number itself in a single process)."""
    ctx = ctx or current_context()
    if ctx.world_size == 1:
        return value
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    buf = torch.tensor([value], dtype=dtype, device=_comm_device(ctx))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return type(value)(buf.item())


def gather_rows(local: torch.Tensor, n: int, batch_size: int, *, ctx: Optional[DistributedContext] = None,
                dst: int = 0) -> Optional[torch.Tensor]:
    """Assemble per-rank rows into global order on rank ``dst``.

    Args:
        local: (n_r, ...) rows of this rank, row k belonging to global index ``shard_indices(n, batch_size,
            rank, world_size)[k]``; every rank passes the same trailing shape and dtype (an empty (0, ...) tensor
            when it has no chunk).
    Returns: (n, ...) on rank ``dst`` (on ``local``'s device), None on the other ranks; ``local`` itself in a
    single process. Rows are padded to the largest shard so one ``dist.gather`` serves gloo and NCCL alike.
    """
    ctx = ctx or current_context()
    if ctx.world_size == 1:
        return local
    counts = [len(shard_indices(n, batch_size, r, ctx.world_size)) for r in range(ctx.world_size)]
    if local.shape[0] != counts[ctx.rank]:
        raise ValueError(f"rank {ctx.rank} must pass {counts[ctx.rank]} rows (its shard of n={n} with "
                         f"batch_size={batch_size}); got {local.shape[0]}.")
    buf = torch.zeros((max(counts),) + tuple(local.shape[1:]), dtype=local.dtype, device=_comm_device(ctx))
    buf[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(buf) for _ in counts] if ctx.rank == dst else None
    dist.gather(buf, parts, dst=dst)
    if ctx.rank != dst:
        return None
    out = torch.empty((n,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[shard_indices(n, batch_size, r, ctx.world_size).to(local.device)] = part[: counts[r]].to(local.device)
    return out



# ------------------------------------------------------------------------------------------ sampling, likelihood
@dataclass
class ShardedResult:
    """What :func:`sample_sharded` and :func:`log_likelihood_sharded` return on each rank.

    values: name -> (N, ...) tensor in global order: on rank 0 with ``gather="main"`` (None on the other
        ranks), on every rank with ``gather="all"``, None with ``gather=None``. "samples" for sampling;
        "log_prob" and "bpd" for likelihoods.
    local: name -> (n_r, ...) rows computed by this rank, in the order of ``indices`` (the global indices).
    nfe: score (or augmented-field) evaluations on a batch, summed over every chunk of every rank.
    local_nfe: this rank's part of it. wall_time: seconds on this rank. shard_path: the file written, if any.
    """

    values: Optional[Dict[str, torch.Tensor]]
    local: Dict[str, torch.Tensor]
    indices: torch.Tensor
    nfe: int
    local_nfe: int
    wall_time: float
    shard_path: Optional[str] = None

    def __getitem__(self, name: str) -> Optional[torch.Tensor]:
        return None if self.values is None else self.values[name]


def _check_gather(gather: Optional[str]) -> None:
    if gather not in ("main", "all", None):
        raise ValueError(f"gather must be 'main' (rank 0), 'all' (every rank) or None; got {gather!r}.")


def _broadcast(value: Optional[torch.Tensor], shape: Tuple[int, ...], like: torch.Tensor,
               ctx: DistributedContext) -> torch.Tensor:
    device = _comm_device(ctx)
    buf = value.to(device) if ctx.is_main else torch.empty(shape, dtype=like.dtype, device=device)
    dist.broadcast(buf, src=0)
    return buf.to(like.device)


def _check_seed(seed: int) -> int:
    return check_seed(seed, "seed", ("int",), why=" (every rank must derive the same per-example seeds from it)")


def _run_chunks(n: int, batch_size: int, seed: int, ctx: DistributedContext, fn: Callable, progress: bool,
                desc: str) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, int]:
    """Call ``fn(indices, seeds) -> (rows dict, nfe)`` on every chunk of this rank; concatenate the rows."""
    chunks = shard_chunks(n, batch_size, ctx.rank, ctx.world_size)
    seeds = make_seeds(seed, n)  # (seed, i) -> seed of example i, the same on every rank
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(chunks), desc=f"{desc} (rank 0 of {ctx.world_size})")
    rows: Dict[str, List[torch.Tensor]] = {}
    nfe = 0
    for lo, hi in chunks:
        out, k = fn(torch.arange(lo, hi), seeds[lo:hi])
        nfe += k
        for name, v in out.items():
            rows.setdefault(name, []).append(v.detach())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    local = {name: torch.cat(vs) for name, vs in rows.items()}
    return local, shard_indices(n, batch_size, ctx.rank, ctx.world_size), nfe


def _finish(local: Dict[str, torch.Tensor], empty: Dict[str, torch.Tensor], indices: torch.Tensor, n: int,
            batch_size: int, nfe: int, start: float, ctx: DistributedContext, gather: Optional[str],
            shard_dir: Optional[str], prefix: str, meta: Dict[str, Any]) -> ShardedResult:
    local = local or empty  # a rank without chunks still takes part in the collectives
    path = None
    if shard_dir is not None:
        os.makedirs(shard_dir, exist_ok=True)
        path = os.path.join(shard_dir, f"{prefix}-{ctx.rank:05d}-of-{ctx.world_size:05d}.pt")
        state = {"indices": indices, "num_examples": n, "world_size": ctx.world_size, "rank": ctx.rank,
                 **meta, **{f"value/{k}": v.cpu() for k, v in local.items()}}
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    values = None
    if gather is not None:
        values = {k: gather_rows(v, n, batch_size, ctx=ctx) for k, v in sorted(local.items())}
        if gather == "all" and ctx.world_size > 1:
            values = {k: _broadcast(values[k], (n,) + tuple(v.shape[1:]), v, ctx) for k, v in sorted(local.items())}
        values = values if ctx.is_main or gather == "all" else None
    total = all_reduce_sum(int(nfe), ctx)
    ctx.barrier()  # shard files are complete once any rank returns
    return ShardedResult(values, local, indices, total, int(nfe), time.perf_counter() - start, path)


def sample_sharded(sde: SDE, score=None, num_samples: Optional[int] = None,
                   event_shape: Optional[Sequence[int]] = None, *, shape: Optional[Sequence[int]] = None,
                   seed: int = 0, batch_size: int = 256, score_for: Optional[Callable[[torch.Tensor], Any]] = None,
                   gather: Optional[str] = "main", shard_dir: Optional[str] = None, progress: bool = False,
                   dtype: torch.dtype = torch.float32, device=None, ctx: Optional[DistributedContext] = None,
                   **sample_kwargs) -> ShardedResult:
    """Draw N samples of shape ``shape = (N, ...)`` with :func:`sdegen.sample`, split over the ranks.

    Example i starts from and is driven by the per-example seed ``make_seeds(seed, N)[i]``, so the result
    (N, ...) equals ``sdegen.sample(sde, score, shape=shape, seed=seed, ...)`` for batch-size-invariant samplers
    (every fixed-step sampler; bit for bit for a score that treats examples alike in any batch, such as the
    oracles, and up to a network's batch-size-dependent round-off otherwise), and equals the same call on any
    number of processes with the same ``batch_size`` for every sampler (adaptive ones included, since each chunk
    of ``batch_size`` examples is solved as one batch whatever the world size). ``noise="generator"`` is refused.

    Args:
        score: as in :func:`sdegen.sample`; or None with ``score_for(indices) -> score`` building the score for
            the chunk of global example indices (b,) (for conditional sampling: the labels of those examples).
        shape: (N, ...), as in :func:`sdegen.sample`: the number of samples and the shape of one.
        batch_size: examples per chunk (the batch one sample call sees); seed: an int, the same on every rank.
        gather: "main" assembles the samples on rank 0 (``result["samples"]``), "all" on every rank (handy
            when every rank goes on with the same script), None not at all; shard_dir: also write this rank's
            samples and indices to ``shard_dir/samples-RRRRR-of-WWWWW.pt`` (read back with :func:`load_shards`).
        progress: a progress bar of the chunks on rank 0; dtype: the samples' dtype (float32 by default, as
            :func:`sdegen.sample`).
        device: where to sample (default: the rank's device); ctx: from :func:`init_distributed` (default:
            the current process group). Other keywords (method, steps, denoise, ...) go to :func:`sdegen.sample`.
        num_samples, event_shape: the deprecated form of ``shape = (num_samples, *event_shape)``
            (DeprecationWarning; giving it with ``shape``: ValueError).
    Returns: a :class:`ShardedResult` with values["samples"] (N, ...) on rank 0 and the summed NFE.
    """
    ctx = ctx or current_context()
    shape = _sample_shape(shape, num_samples, event_shape)
    num_samples, event_shape = shape[0], shape[1:]
    _check_seed(seed)
    check_flag(progress, "progress")
    _check_gather(gather)
    score_for = _score_source(score, score_for)
    why = {"x_T": "x_T is drawn from the prior with shape= and the per-example seeds",
           "return_info": "it returns a ShardedResult, whose info holds the counts of every shard",
           "return_trajectory": "shards return their samples only; call sdegen.sample for a trajectory"}
    for bad, reason in why.items():
        if bad in sample_kwargs:
            raise ValueError(f"sample_sharded sets {bad} itself ({reason}).")
    if sample_kwargs.get("noise", "per_example") != "per_example":
        raise ValueError(f"noise: sample_sharded draws every example's noise from its own seed (noise='per_example'), "
                         f"which is what makes shards equal one run; got noise={sample_kwargs['noise']!r}.")
    device = check_device(device) if device is not None else ctx.device
    start = time.perf_counter()

    def run(idx: torch.Tensor, seeds: torch.Tensor):
        x, info = sample(sde, score_for(idx), shape=(idx.numel(),) + event_shape, seed=seeds, dtype=dtype,
                         device=device, return_info=True, **sample_kwargs)
        return {"samples": x}, info.nfe

    local, indices, nfe = _run_chunks(num_samples, batch_size, seed, ctx, run, progress, "sampling")
    empty = {"samples": torch.zeros((0,) + event_shape, dtype=dtype, device=device)}
    return _finish(local, empty, indices, num_samples, batch_size, nfe, start, ctx, gather, shard_dir, "samples",
                   {"seed": seed, "batch_size": batch_size})


def _sample_shape(shape: Optional[Sequence[int]], num_samples: Optional[int],
                  event_shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """(N, ...) from ``shape``, or from the deprecated pair (num_samples, event_shape) with a DeprecationWarning."""
    if num_samples is None and event_shape is None:
        if shape is None:
            raise ValueError("sample_sharded needs shape=(N, ...): the number of samples and the shape of one.")
        if isinstance(shape, torch.Tensor) or len(shape) < 1:
            raise ValueError(f"shape must be a sequence (N, ...) of ints; got {shape!r}.")
        _check_count(shape[0], "shape[0] (the number of samples)", 1)
        return tuple(int(d) for d in shape)
    if shape is not None:
        raise ValueError("sample_sharded: got both shape= and its deprecated form num_samples/event_shape; pass "
                         "only shape=(N, ...).")
    warnings.warn("sample_sharded: num_samples and event_shape are deprecated and will be removed in the next "
                  "release; pass shape=(num_samples, *event_shape) as to sdegen.sample.", DeprecationWarning,
                  stacklevel=3)
    _check_count(num_samples, "num_samples", 1)
    return (num_samples,) + tuple(int(d) for d in (event_shape or ()))


def _score_source(score, score_for) -> Callable[[torch.Tensor], Any]:
    if (score is None) == (score_for is None):
        raise ValueError("give exactly one of score (the same for every example) and score_for(indices) -> score.")
    if score_for is not None:
        if not callable(score_for):
            raise TypeError(f"score_for must be callable (indices -> score); got {type(score_for).__name__}.")
        return score_for
    return lambda idx: score


def _take(data, idx: torch.Tensor, device) -> torch.Tensor:
    """Rows ``idx`` of a tensor, or the stacked items of a map-style dataset (items: tensors or tuples whose
    first element is the tensor)."""
    if isinstance(data, torch.Tensor):
        return data[idx.to(data.device)].to(device)
    items = [data[int(i)] for i in idx]
    items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack([torch.as_tensor(it) for it in items]).to(device)


def _num_examples(data) -> int:
    if isinstance(data, torch.Tensor):
        if data.ndim < 1:
            raise ValueError(f"data must have shape (N, ...); got a {data.ndim}-d tensor.")
        return data.shape[0]
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a tensor (N, ...) or a map-style dataset (with __len__ and __getitem__); "
                        f"got {type(data).__name__}.")
    return len(data)


def log_likelihood_sharded(sde: SDE, score=None, data=None, *, seed: int = 0, batch_size: int = 256,
                           score_for: Optional[Callable[[torch.Tensor], Any]] = None, gather: Optional[str] = "main",
                           shard_dir: Optional[str] = None, progress: bool = False, device=None,
                           ctx: Optional[DistributedContext] = None, **likelihood_kwargs) -> ShardedResult:
    """Per-example log-likelihoods (:func:`sdegen.log_likelihood`) of a dataset, split over the ranks.

    Example i uses the per-example seed ``make_seeds(seed, N)[i]`` for its Hutchinson probes (and its
    dequantization noise with ``levels=``), exactly as ``sdegen.log_likelihood(sde, score, data, seed=seed)``
    does in one process. With a fixed-grid solver (``solver="rk4", steps=...``) the result equals that call (up
    to a network's batch-size-dependent round-off);
    with an adaptive solver the batch shares its steps, so the result equals the same call chunk by chunk, and
    this function on any number of processes with the same ``batch_size``.

    Args:
        data: a tensor (N, ...) or a map-style dataset whose items are tensors or tuples (tensor, label, ...).
        score, score_for, seed, batch_size, gather, shard_dir, progress, device, ctx: as in
            :func:`sample_sharded` (shard files are ``shard_dir/likelihood-RRRRR-of-WWWWW.pt``).
        Other keywords (divergence, probes, probe, solver, rtol, atol, steps, levels, ...) go to
        :func:`sdegen.log_likelihood`; its deprecated ``method`` and ``noise`` are accepted with a DeprecationWarning.
    Returns: a :class:`ShardedResult` with values["log_prob"] and values["bpd"], each (N,), on rank 0. With
    ``on_failure="mask"`` the examples set aside come back as NaN rows: ``torch.isnan(result["log_prob"])`` marks
    them (a single call's ``LikelihoodResult.failed`` lists the same indices).
    """
    ctx = ctx or current_context()
    n = _num_examples(data)
    _check_count(n, "the number of examples in data", 1)
    _check_seed(seed)
    check_flag(progress, "progress")
    _check_gather(gather)
    score_for = _score_source(score, score_for)
    if "seed" in likelihood_kwargs:
        raise ValueError("pass seed once (as the int seed of sample_sharded's convention).")
    for name, deprecated in (("solver", "method"), ("probe", "noise")):
        value, _ = renamed("log_likelihood_sharded", name, likelihood_kwargs.pop(name, None), deprecated,
                           likelihood_kwargs.pop(deprecated, None))
        if value is not None:
            likelihood_kwargs[name] = value
    device = check_device(device) if device is not None else ctx.device
    start = time.perf_counter()

    def run(idx: torch.Tensor, seeds: torch.Tensor):
        x = _take(data, idx, device)
        res = log_likelihood(sde, score_for(idx), x, seed=seeds.to(device), **likelihood_kwargs)
        return {"log_prob": res.log_prob, "bpd": res.bpd}, res.nfe

    local, indices, nfe = _run_chunks(n, batch_size, seed, ctx, run, progress, "log-likelihood")
    dtype = _take(data, torch.zeros(1, dtype=torch.int64), device).dtype
    empty = {k: torch.zeros(0, dtype=dtype, device=device) for k in ("log_prob", "bpd")}
    return _finish(local, empty, indices, n, batch_size, nfe, start, ctx, gather, shard_dir, "likelihood",
                   {"seed": seed, "batch_size": batch_size})


def load_shards(shard_dir: str, prefix: str = "samples") -> Dict[str, torch.Tensor]:
    """Read the shard files a sharded run wrote to ``shard_dir`` and assemble them in global order.

    Returns name -> (N, ...) tensor ("samples", or "log_prob" and "bpd" with prefix="likelihood").
    Raises ValueError when the files do not come from one run (mixed world sizes, seeds or batch sizes) or miss
    examples.
    """
    paths = sorted(glob.glob(os.path.join(shard_dir, f"{prefix}-*-of-*.pt")))
    if not paths:
        raise ValueError(f"no shard files {prefix}-RRRRR-of-WWWWW.pt in {shard_dir!r}.")
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    worlds = {s["world_size"] for s in shards}
    sizes = {s["num_examples"] for s in shards}
    if len(worlds) != 1 or len(sizes) != 1 or len(shards) != next(iter(worlds)):
        raise ValueError(f"the shards in {shard_dir!r} do not come from one run: world sizes {sorted(worlds)}, "
                         f"example counts {sorted(sizes)}, {len(shards)} files; remove stale files.")
    for key in ("seed", "batch_size"):  # a stale file of another run agrees on the sizes but not on these
        values = {repr(s.get(key)) for s in shards}
        if len(values) != 1:
            raise ValueError(f"the shards in {shard_dir!r} do not come from one run: their {key}s differ "
                             f"({', '.join(sorted(values))}); remove stale files.")
    n = sizes.pop()
    indices = torch.cat([s["indices"] for s in shards])
    if indices.numel() != n or not torch.equal(indices.sort().values, torch.arange(n)):
        raise ValueError(f"the shards in {shard_dir!r} do not cover the {n} examples exactly once.")
    out = {}
    for key in (k for k in shards[0] if k.startswith("value/")):
        rows = torch.cat([s[key] for s in shards])
        full = torch.empty_like(rows)
        full[indices] = rows
        out[key[len("value/"):]] = full
    return out


# ------------------------------------------------------------------------------------------ training
class _Dispatch(nn.Module):
    """Routes calls of the model and of its methods (``eps``, ``denoise``, ...) through one forward, so that
    DistributedDataParallel sees every use of the parameters and averages their gradients."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: Optional[str], *args, **kwargs):
        return self.module(*args, **kwargs) if method is None else getattr(self.module, method)(*args, **kwargs)


class DDPModel:
    """What a loss function receives under :func:`train_ddp`: calling it or one of the model's methods runs
    through DistributedDataParallel; other attributes (``sde``, ``config``, ...) are the model's own.
    The underlying model is ``.module``; the DistributedDataParallel object is ``.ddp``."""

    def __init__(self, module: nn.Module, device_ids: Optional[List[int]] = None, **ddp_kwargs):
        from torch.nn.parallel import DistributedDataParallel

        self.module = module
        self.ddp = DistributedDataParallel(_Dispatch(module), device_ids=device_ids, **ddp_kwargs)

    def __call__(self, *args, **kwargs):
        return self.ddp(None, *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.__dict__["module"], name)
        if inspect.ismethod(attr) and not name.startswith("_"):
            return lambda *args, **kwargs: self.ddp(name, *args, **kwargs)
        return attr


def _rows(batch, lo: int, hi: int):
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    return type(batch)(b[lo:hi] for b in batch)


def _global_rows(data) -> Optional[int]:
    """First dimension of tensor data (a tensor or a tuple/list of tensors), None for other iterables."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, (tuple, list)) and data and all(isinstance(d, torch.Tensor) for d in data):
        return data[0].shape[0]
    return None


def _rank_loss(loss_fn: Callable, ctx: DistributedContext, batch_size: int, slice_batch: bool,
               seed: int) -> Callable:
    """Each rank's loss on its slice of the global batch, with its own generator for the loss's randomness.

    The shared generator (``gen``, the same on every rank) only shuffles, so the global batches agree across
    ranks; the rank's generator is seeded once from (seed, rank) on the host and lives on the data's device, so
    a step never reads a value back from the device."""
    lo, hi = ctx.rank * batch_size, (ctx.rank + 1) * batch_size
    call_loss = batch_loss(loss_fn)
    rank_seed = int(make_seeds(seed, ctx.world_size)[ctx.rank])  # a host tensor: no device involved
    own: Dict[torch.device, torch.Generator] = {}

    def loss(net, batch, gen: torch.Generator):
        if gen.device not in own:
            own[gen.device] = torch.Generator(gen.device).manual_seed(rank_seed)
        return call_loss(net, _rows(batch, lo, hi) if slice_batch else batch, own[gen.device])

    return loss


def _resumed_seed(seed: int, start_step: Any) -> int:
    """The seed of a call that starts at ``start_step``: ``seed`` itself for a run from step 0, else a seed
    derived from (seed, start_step), so that a resumed call draws fresh batches and noise instead of replaying
    the first call's (every rank derives the same one)."""
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step <= 0:
        return seed  # train checks start_step itself
    return int(make_seeds(seed, start_step + 1)[start_step])


def train_ddp(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data, steps: int, *, batch_size: int = 128,
              seed: int = 0, checkpoint: Optional[str] = None, checkpoint_config: Optional[Dict[str, Any]] = None,
              ddp_kwargs: Optional[Dict[str, Any]] = None, ctx: Optional[DistributedContext] = None,
              **train_kwargs) -> TrainResult:
    """:func:`sdegen.train` with DistributedDataParallel on every rank of the process group.

    Args:
        model: the module to train, already on ``ctx.device``; DDP broadcasts rank 0's initial weights.
        loss_fn: a loss as for :func:`sdegen.train` (``sdegen.dsm_loss``, called ``loss_fn(model, x, [y,]
            seed=generator)``, or any ``loss_fn(model, batch, generator)``); it must return the batch MEAN of
            per-example losses (then averaging gradients over ranks gives the gradient of the mean
            over the global batch). ``model`` is a :class:`DDPModel`: call it or its methods, read its attributes.
        data: tensors (N, ...) or a tuple of them: every rank draws the same global batch of ``batch_size *
            world_size`` rows (shuffled by ``seed``) and trains on its own ``batch_size`` rows of it. Any other
            iterable (a DataLoader with a DistributedSampler) is used as it is, its batches being the rank's.
        batch_size: examples per rank and step. seed: shuffling seed, an int, the same on every rank; the loss's own
            randomness (times, noise) comes from a generator that differs between ranks. A resumed call
            (``start_step`` > 0 in ``train_kwargs``) draws from streams derived from (seed, start_step): it does
            not replay the first call's batches and noise, though (unlike :func:`sdegen.train` given the returned
            generator) it is not the uninterrupted run's exact continuation.
        checkpoint: path that rank 0 writes at the end (:func:`sdegen.save_checkpoint`, with the EMA and the
            optimizer; ``extra`` holds the steps run, the best evaluated step and the world size);
            checkpoint_config: its ``config`` (default: the model's own).
        ddp_kwargs: extra arguments of DistributedDataParallel (``find_unused_parameters``, ...).
        train_kwargs: the other options of :func:`sdegen.train` (lr, ema_decay, grad_clip, optimizer, ...).
            ``evaluate`` runs on every rank, and its values are averaged over ranks before ``patience`` and
            ``restore_best`` use them, so that every rank stops at the same step and keeps the same weights (each
            rank may score its own share of held-out data).
    Returns: the :class:`TrainResult` (identical model and EMA on every rank), whose ``losses`` are the global-batch
    losses (the per-rank losses averaged over ranks). In a single process this is :func:`sdegen.train`.
    """
    ctx = ctx or current_context()
    for bad in ("wrap_model", "is_main"):
        if bad in train_kwargs:
            raise ValueError(f"train_ddp sets {bad} itself; call sdegen.train directly to choose it.")
    _check_count(batch_size, "batch_size", 1)
    _check_seed(seed)
    seed = _resumed_seed(seed, train_kwargs.get("start_step", 0))
    if ctx.world_size == 1:
        res = train(model, loss_fn, data, steps, batch_size=batch_size, seed=seed, **train_kwargs)
    else:
        n = _global_rows(data)
        if n is not None and n < batch_size * ctx.world_size:
            raise ValueError(f"data has {n} rows, fewer than one global batch of batch_size * world_size = "
                             f"{batch_size} * {ctx.world_size}; lower batch_size.")
        evaluate = train_kwargs.get("evaluate")
        if callable(evaluate):  # one decision for all ranks: a rank stopping alone would hang the others
            train_kwargs["evaluate"] = lambda m: all_reduce_sum(float(evaluate(m)), ctx) / ctx.world_size
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrap = lambda m: DDPModel(m, device_ids=device_ids, **(ddp_kwargs or {}))  # noqa: E731
        res = train(model, _rank_loss(loss_fn, ctx, batch_size, n is not None, seed), data, steps,
                    batch_size=batch_size * ctx.world_size if n is not None else batch_size, seed=seed,
                    wrap_model=wrap, is_main=ctx.is_main, **train_kwargs)
        res.losses = _mean_over_ranks(res.losses, ctx)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, ema=res.ema, optimizer=res.optimizer, config=checkpoint_config,
                        extra={"steps": res.steps, "best_step": res.best_step,
                               "world_size": ctx.world_size}, is_main=ctx.is_main)
        ctx.barrier()
    return res


def _mean_over_ranks(values: List[float], ctx: DistributedContext) -> List[float]:
    if not values:
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / ctx.world_size).tolist()


__all__ = ["DistributedContext", "init_distributed", "current_context", "is_main_process", "launched_rank",
           "shard_chunks", "shard_indices", "gather_rows", "all_reduce_sum", "ShardedResult", "sample_sharded",
           "log_likelihood_sharded", "load_shards", "DDPModel", "train_ddp"]
