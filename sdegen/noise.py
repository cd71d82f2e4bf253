"""Per-example random streams.

Every example of a batch owns a 64-bit seed. A normal draw is a pure function of
(example seed, draw index, element index), computed with a counter-based integer hash
(Wellons' "lowbias32" mixer, applied in chained form) followed by the Box-Muller transform.
So example i gets the same noise whatever batch it is drawn in, on any device, with no host
round trip, which is what makes samples batch-size invariant (EDM draws one generator per
sample for the same reason; a hash does it in one vectorised call).

The hash runs on int32 tensors with wrapping multiplication (what every PyTorch back end does for
32-bit integers) and logical shifts written as an arithmetic shift plus a mask, so its 32-bit words are
exactly those of the textbook unsigned mixer. A :class:`Noise` stream computes the draws of several
upcoming steps in one call (a chunk of at most about 1 MiB of hash words) and hands them out one by
one: per-call overheads then stop dominating small states. The values do not depend on the chunking.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_INT32_MIN = -(1 << 31)
Seed = Union[int, torch.Tensor, torch.Generator, None]


def _signed32(c: int) -> int:
    """The int32 whose two's-complement bits are the unsigned 32-bit c."""
    return c - (1 << 32) if c >= (1 << 31) else c


_MUL1, _MUL2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def _mix32(x: int) -> int:
    """lowbias32: a bijective 32-bit integer hash with low avalanche bias (on Python ints)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor holding 32-bit words (returns x).

    ``>>`` on int32 shifts in sign bits, so each logical shift x >>> k is (x >> k) & (2^(32-k) - 1).
    """
    t = torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF)
    x.bitwise_xor_(t).mul_(_MUL1)
    torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF)
    x.bitwise_xor_(t).mul_(_MUL2)
    torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF)
    return x.bitwise_xor_(t)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 tensor with the same 32 bits."""
    return ((words ^ (1 << 31)) - (1 << 31)).to(torch.int32)


def _key_term(key: int) -> int:
    """A mixed 32-bit term for a non-negative Python int key of any size (computed on the host, no tensor ops)."""
    h = _mix32((key & _MASK32) ^ 0x632BE5AB)
    return _mix32(h ^ ((key >> 32) & _MASK32) ^ 0x27D4EB2F)


def _seed_words(seeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of non-negative int64 seeds (B,), as int32 tensors."""
    return _to_int32(seeds & _MASK32), _to_int32((seeds >> 32) & _MASK32)


def _counter_hash(n: int, device) -> torch.Tensor:
    """The mixed element counter (n,) int32: a function of the element index alone, shared by every draw."""
    c = (torch.arange(n, dtype=torch.int64, device=device) + 0x9E3779B9) & _MASK32
    return _mix32_(_to_int32(c))


def _hash(lo: torch.Tensor, hi: torch.Tensor, keys, counter: torch.Tensor) -> torch.Tensor:
    """32-bit hashes of (seed, key, counter): seed words lo, hi (B,), keys a list of K ints, the mixed counter
    (N,) from :func:`_counter_hash` -> (K, B, N) int32.

    A base per (seed, key) costs B*K hashes and the counter N; each element then costs one round of the
    mixer on base ^ counter-hash. Two elements coincide only when base_i ^ base_k = c_j ^ c_l, with
    probability 2^-32 per pair: the birthday rate of any 32-bit generator.
    """
    k = torch.tensor([_signed32(_key_term(key)) for key in keys], dtype=torch.int32, device=lo.device)
    base = _mix32_(_mix32_(k[:, None] ^ lo).bitwise_xor_(hi))
    return _mix32_(base[:, :, None] ^ counter)


def make_seeds(seed: Seed, batch: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-example int64 seeds, shape (batch,).

    - int: example i gets a seed that depends only on (seed, i), so a sub-batch of a larger run
      reproduces the same examples;
    - tensor of shape (batch,): used as given, one seed per example;
    - torch.Generator: ``batch`` seeds drawn from it;
    - None: drawn from torch's global generator (reproducible under ``torch.manual_seed``).
    """
    if isinstance(seed, torch.Tensor):
        if seed.shape != (batch,) or seed.is_floating_point():
            raise ValueError(f"seed as a tensor must be an integer tensor of shape ({batch},) (one per example); "
                             f"got dtype {seed.dtype} and shape {tuple(seed.shape)}.")
        return seed.to(device=device, dtype=torch.int64) & 0x7FFFFFFFFFFFFFFF
    if isinstance(seed, torch.Generator) or seed is None:
        return torch.randint(0, 2**62, (batch,), generator=seed, dtype=torch.int64).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a (B,) integer tensor, a torch.Generator or None; got {type(seed).__name__}.")
    base = torch.tensor([seed & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64, device=device)
    lo, hi = (_hash(*_seed_words(base), [1, 2], _counter_hash(batch, device))[:, 0].to(torch.int64) & _MASK32)
    return ((hi & 0x7FFFFFFF) << 32) | lo


def _normals(lo: torch.Tensor, hi: torch.Tensor, key: int, draws: int, n: int, dtype: torch.dtype,
             counter: torch.Tensor) -> torch.Tensor:
    """Draws key, ..., key + draws - 1 of n standard normals per example: (draws, B, n).

    Box-Muller on the words of keys 2 key' and 2 key' + 1 for draw key': 24 bits per uniform in float32,
    32 in float64 (log's argument stays in (0, 1], so the radius is finite).
    """
    half, batch = counter.shape[0], lo.shape[0]
    keys = [2 * k + b for k in range(key, key + draws) for b in (0, 1)]
    h = _hash(lo, hi, keys, counter).view(draws, 2, batch, half)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if work == torch.float64:  # the unsigned words, exactly
        bits, v = 32, (h ^ _INT32_MIN).to(work).add_(2.0**31)
    else:  # their top 24 bits
        bits, v = 24, torch.bitwise_right_shift(h, 8).bitwise_and_(0xFFFFFF).to(work)
    del h
    r = torch.log(v[:, 0].add_(0.5).mul_(2.0**-bits)).mul_(-2.0).sqrt_()  # u1 = (word + 1/2) 2^-bits in (0, 1)
    theta = v[:, 1].mul_(2.0 * math.pi * 2.0**-bits)  # 2 pi u2, u2 = word 2^-bits in [0, 1)
    # contiguous products, one concatenation (products written into strided halves are several times slower)
    z = torch.cat([torch.cos(theta).mul_(r), theta.sin_().mul_(r)], dim=2)[..., :n]
    return z if dtype == work else z.to(dtype)


def normal_from_seeds(seeds: torch.Tensor, key: int, event_shape: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (B, *event_shape): a pure function of (seeds[i], key, element index)."""
    n = math.prod(event_shape)
    lo, hi = _seed_words(seeds)
    z = _normals(lo, hi, key, 1, n, dtype, _counter_hash((n + 1) // 2, seeds.device))[0]
    return z.reshape((seeds.shape[0],) + tuple(event_shape))


class Noise:
    """A per-example noise stream: each call of :meth:`like` returns fresh N(0, I) noise.

    Args:
        seeds: int64 tensor (B,), one seed per example (see :func:`make_seeds`).
        key: index of the next draw; draws 0, 1, 2, ... are independent.

    Draw k of the stream is ``normal_from_seeds(seeds, k, ...)``. After the first draw, the stream computes
    up to ``max_chunk`` draws at once (at most ``chunk_bytes`` of hash words) and returns them one per call,
    each a fresh, never re-used slice.
    """

    batch_invariant = True
    max_chunk = 16
    chunk_bytes = 1 << 20

    def __init__(self, seeds: torch.Tensor, key: int = 0):
        self.seeds = seeds
        self.key = key
        self._words = None  # (device, lo, hi) of the seeds on the state's device
        self._counter = None  # the mixed element counter, reused by every draw of one event size
        self._chunk = None  # (shape, dtype, first key, draws (K, B, n)); keys below _next were handed out
        self._next = 0

    @classmethod
    def from_seed(cls, seed: Seed, batch: int, device=None) -> "Noise":
        return cls(make_seeds(seed, batch, device))

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh noise with x's shape, dtype and device; the stream advances by one draw."""
        if x.shape[0] != self.seeds.shape[0]:
            raise ValueError(f"noise stream has {self.seeds.shape[0]} examples but x has batch {x.shape[0]}.")
        chunk = self._chunk
        if (chunk is None or chunk[0] != x.shape or chunk[1] != x.dtype or chunk[3].device != x.device
                or not self._next <= self.key < chunk[2] + chunk[3].shape[0]):
            chunk = self._chunk = self._fill(x, draws=1 if chunk is None else self._chunk_draws(x))
        z = chunk[3][self.key - chunk[2]]
        self.key += 1
        self._next = self.key
        return z.reshape(x.shape)

    def _chunk_draws(self, x: torch.Tensor) -> int:
        return max(1, min(self.max_chunk, self.chunk_bytes // max(4 * x.numel(), 1)))

    def _fill(self, x: torch.Tensor, draws: int):
        if self._words is None or self._words[0] != x.device:
            self._words = (x.device,) + _seed_words(self.seeds.to(x.device))
        n = math.prod(x.shape[1:])
        half = (n + 1) // 2
        if self._counter is None or self._counter.shape[0] != half or self._counter.device != x.device:
            self._counter = _counter_hash(half, x.device)
        _, lo, hi = self._words
        self._next = self.key
        return x.shape, x.dtype, self.key, _normals(lo, hi, self.key, draws, n, x.dtype, self._counter)

    def spawn(self, salt: int) -> "Noise":
        """An independent stream with the same per-example seeds (used for a Brownian motion, say)."""
        return Noise(self.seeds, key=(salt + 1) << 40)


class GeneratorNoise:
    """A faster noise stream: one ``torch.Generator`` on the state's device, seeded from the first example's seed.

    Reproducible for a fixed seed and batch, but example i's noise depends on the batch it is drawn in
    (use :class:`Noise` for batch-size invariance). Same interface as :class:`Noise`.
    """

    batch_invariant = False

    def __init__(self, seeds: torch.Tensor, key: int = 0):
        self.seeds = seeds
        first = int(seeds[0]) if seeds.numel() else 0  # read once, before any solver loop
        self.entropy = (first + 0x9E3779B97F4A7C15 * key) % (1 << 63)
        self._generator: Optional[torch.Generator] = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh N(0, I) noise with x's shape, dtype and device."""
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.entropy)
        return torch.randn(x.shape, generator=self._generator, dtype=x.dtype, device=x.device)

    def spawn(self, salt: int) -> "GeneratorNoise":
        return GeneratorNoise(self.seeds, key=(salt + 1) << 20)


NOISE_KINDS = {"per_example": Noise, "generator": GeneratorNoise}
