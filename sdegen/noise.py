"""Per-example random streams.

Every example of a batch owns a 64-bit seed. A normal draw is a pure function of
(example seed, draw index, element index), computed with a counter-based integer hash
(Wellons' "lowbias32" mixer, applied in chained form) followed by the Box-Muller transform.
So example i gets the same noise whatever batch it is drawn in, on any device, with no host
round trip, which is what makes samples batch-size invariant (EDM draws one generator per
sample for the same reason; a hash does it in one vectorised call).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

_MASK32 = 0xFFFFFFFF
Seed = Union[int, torch.Tensor, torch.Generator, None]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32: with c taken in (-2**31, 2**31] the int64 product cannot overflow,
    # and two's-complement masking keeps the right low 32 bits.
    c = c - (1 << 32) if c >= (1 << 31) else c
    return (x * c) & _MASK32


def _mix32(x):
    """lowbias32: a bijective 32-bit integer hash with low avalanche bias (on int64 tensors or Python ints)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D) if isinstance(x, torch.Tensor) else (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B) if isinstance(x, torch.Tensor) else (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _key_term(key: int) -> int:
    """A mixed 32-bit term for a non-negative Python int key of any size (computed on the host, no tensor ops)."""
    h = _mix32((key & _MASK32) ^ 0x632BE5AB)
    return _mix32(h ^ ((key >> 32) & _MASK32) ^ 0x27D4EB2F)


def _hash(seeds: torch.Tensor, keys, counter: torch.Tensor) -> torch.Tensor:
    """32-bit hashes of (seed, key, counter): seeds (B,) int64, keys a list of K ints, counter (N,) -> (B, K, N).

    A base per (seed, key) costs B*K hashes and the counter N; each element then costs one round of the
    mixer on base ^ counter-hash. Two elements coincide only when base_i ^ base_k = c_j ^ c_l, with
    probability 2^-32 per pair: the birthday rate of any 32-bit generator.
    """
    k = torch.tensor([_key_term(key) for key in keys], dtype=torch.int64, device=seeds.device)
    base = _mix32(_mix32((seeds & _MASK32)[:, None] ^ k) ^ ((seeds >> 32) & _MASK32)[:, None])[:, :, None]
    c = _mix32((counter + 0x9E3779B9) & _MASK32)
    return _mix32(base ^ c)


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
    idx = torch.arange(batch, dtype=torch.int64, device=device)
    base = torch.tensor([seed & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64, device=device)
    lo, hi = _hash(base, [1, 2], idx)[0]
    return ((hi & 0x7FFFFFFF) << 32) | lo


def normal_from_seeds(seeds: torch.Tensor, key: int, event_shape: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (B, *event_shape): a pure function of (seeds[i], key, element index)."""
    n = math.prod(event_shape)
    half = (n + 1) // 2
    counter = torch.arange(half, dtype=torch.int64, device=seeds.device)
    h1, h2 = _hash(seeds, [2 * key, 2 * key + 1], counter).unbind(1)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    bits = 32 if work == torch.float64 else 24
    shift = 32 - bits
    scale = 2.0 ** -bits
    u1 = ((h1 >> shift).to(work) + 0.5) * scale  # in (0, 1): log(u1) is finite
    u2 = (h2 >> shift).to(work) * scale
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]
    return z.to(dtype).reshape((seeds.shape[0],) + tuple(event_shape))


class Noise:
    """A per-example noise stream: each call of :meth:`like` returns fresh N(0, I) noise.

    Args:
        seeds: int64 tensor (B,), one seed per example (see :func:`make_seeds`).
        key: index of the next draw; draws 0, 1, 2, ... are independent.
    """

    batch_invariant = True

    def __init__(self, seeds: torch.Tensor, key: int = 0):
        self.seeds = seeds
        self.key = key

    @classmethod
    def from_seed(cls, seed: Seed, batch: int, device=None) -> "Noise":
        return cls(make_seeds(seed, batch, device))

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh noise with x's shape, dtype and device; the stream advances by one draw."""
        if x.shape[0] != self.seeds.shape[0]:
            raise ValueError(f"noise stream has {self.seeds.shape[0]} examples but x has batch {x.shape[0]}.")
        z = normal_from_seeds(self.seeds.to(x.device), self.key, x.shape[1:], x.dtype)
        self.key += 1
        return z

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
