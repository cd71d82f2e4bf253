"""Per-example random streams.

Every example of a batch owns a 64-bit seed. A normal draw is a pure function of
(example seed, draw index, element index), computed with a counter-based integer hash
(Wellons' "lowbias32" mixer, applied in chained form) followed by the Box-Muller transform.
So example i gets the same noise whatever batch it is drawn in, on any device, with no host
round trip, which is what makes samples batch-size invariant (EDM draws one generator per
sample for the same reason; a hash does it in one vectorised call).

Word j of key k for an example with seed words (lo, hi) is

    base = mix(mix(key_term(k) ^ lo) ^ hi),   word = mix(base ^ mix(j + 0x9E3779B9)),

and draw d takes its uniforms from the words of keys 2d and 2d + 1. The mixer's first step,
x ^ (x >>> 16), is linear over XOR, so it is applied to the base and to the element counter
separately: a draw then costs one XOR and the mixer's four remaining steps per word, with the
counter's terms computed once per event size and cached.

Two implementations give the same bits:

- on CUDA with Triton installed, one fused kernel per call computes the key terms, the hashes
  and the Box-Muller transform with the CUDA math library's log, sin and cos (those PyTorch's
  own CUDA kernels call) and correctly rounded square roots;
- elsewhere, a sequence of in-place PyTorch operations. The hash runs on int32 tensors with
  wrapping multiplication (what every PyTorch back end does for 32-bit integers) and logical
  shifts written as an arithmetic shift plus a mask, so its 32-bit words are exactly those of
  the textbook unsigned mixer.

Limits of this stream version: a key's base is 32 bits, so among M (example, key) pairs about M^2 / 2^33 share a
base, and the two draws they feed share one of their uniform vectors; 0.1% of the draws of 1024 examples over 1000
steps. Where the shared vector is the angle (about a quarter of such pairs) the two draws correlate at about 0.8. Uniforms carry 24 bits in float32 and 32 in float64 (|z| <= 5.9 and 6.8).

Neither reads a device value back on the host. A :class:`Noise` stream computes the draws of
several upcoming steps in one call (a chunk of at most about 1 MiB of hash words) and hands them
out one by one: per-call overheads then stop dominating small states. The values do not depend
on the chunking.
"""

from __future__ import annotations

import math
import struct
import warnings
from numbers import Integral
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._validate import check_floating_dtype, check_int, is_integer_dtype

_MASK32 = 0xFFFFFFFF
_INT32_MIN = -(1 << 31)
Seed = Union[int, torch.Tensor, torch.Generator, None]

use_triton = True
"""Whether CUDA draws use the fused Triton kernel when Triton is installed (same values either way)."""


def _signed32(c: int) -> int:
    """The int32 whose two's-complement bits are the unsigned 32-bit c."""
    return c - (1 << 32) if c >= (1 << 31) else c


_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_COUNTER_OFFSET = 0x9E3779B9
_KEY_SALT_LO, _KEY_SALT_HI = 0x632BE5AB, 0x27D4EB2F
# Box-Muller scales: a uniform keeps the top 24 bits of its word in float32 and all 32 in float64
_ANGLE_32 = 2.0 * math.pi * 2.0**-32
_ANGLE_24 = float(torch.tensor(2.0 * math.pi * 2.0**-24, dtype=torch.float32))  # as float32 rounds it
# u1 = (word + 1/2) 2^-bits is computed as offset + 2^-bits * w, with w the float word (float32) or the word
# minus 2^31 (float64): the product is exact, so the one rounding of the sum is that of word + 1/2
_U1_OFFSET = {torch.float32: 2.0**-25, torch.float64: 0.5 + 2.0**-33}
_CONSTANTS: Dict[Tuple[Union[int, float], torch.dtype], torch.Tensor] = {}


def _c(value: Union[int, float], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """value as a 0-d CPU tensor of dtype, made once: an operand that every back end reads as a scalar, without
    the per-call conversion of a Python number (which dominates the cost of an operation on a small tensor)."""
    constant = _CONSTANTS.get((value, dtype))
    if constant is None:
        constant = _CONSTANTS[(value, dtype)] = torch.tensor(value, dtype=dtype)
    return constant


def _mix32(x: int) -> int:
    """lowbias32: a bijective 32-bit integer hash with low avalanche bias (on Python ints)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def _xorshift_(x: torch.Tensor, k: int, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x ^= x >>> k in place on int32 words (t: optional workspace of x's shape); returns x.

    ``>>`` on int32 shifts in sign bits, so the logical shift x >>> k is (x >> k) & (2^(32-k) - 1).
    """
    t = torch.bitwise_right_shift(x, _c(k)) if t is None else torch.bitwise_right_shift(x, _c(k), out=t)
    return x.bitwise_xor_(t.bitwise_and_(_c((1 << (32 - k)) - 1)))


def _mix32_rest_(x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lowbias32 after its first step x ^= x >>> 16, in place on int32 words (returns x)."""
    _xorshift_(x.mul_(_c(_signed32(_MUL1))), 15, t).mul_(_c(_signed32(_MUL2)))
    return _xorshift_(x, 16, t)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor holding 32-bit words (returns x)."""
    t = torch.empty_like(x)
    return _mix32_rest_(_xorshift_(x, 16, t), t)


def _key_term(key: int) -> int:
    """A mixed 32-bit term for a non-negative Python int key of any size (computed on the host, no tensor ops)."""
    h = _mix32((key & _MASK32) ^ _KEY_SALT_LO)
    return _mix32(h ^ ((key >> 32) & _MASK32) ^ _KEY_SALT_HI)


def _folded_base(lo: int, hi: int, key: int) -> int:
    """mix(mix(key term ^ lo) ^ hi) ^ its own >>> 16, for one seed held as Python ints."""
    base = _mix32(_mix32(_key_term(key) ^ lo) ^ hi)
    return base ^ (base >> 16)


def _seed_words(seeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of non-negative int64 seeds (B,), as int32 tensors.

    The int64 -> int32 conversion keeps the low 32 bits (a static_cast, modular on every PyTorch back end).
    """
    return seeds.to(torch.int32), torch.bitwise_right_shift(seeds, _c(32, torch.int64)).to(torch.int32)


_ELEMENT_TERMS: Dict[Tuple[int, torch.device], torch.Tensor] = {}  # least recently used first
_ELEMENT_TERMS_CACHED = 16  # event sizes kept per process
_ELEMENT_TERMS_MAX = 1 << 22  # larger ones (16 MiB of words) are recomputed: their draw dwarfs it
_ELEMENT_TERMS_BYTES = 1 << 26  # and at most 64 MiB of them in all


def clear_caches() -> None:
    """Drop the noise streams' cached element terms (up to 64 MiB per process; they are recomputed when needed)."""
    _ELEMENT_TERMS.clear()


def _element_terms(half: int, device: torch.device) -> torch.Tensor:
    """The counter's share of every element hash, (half,) int32: mix(j + 0x9E3779B9) ^ its own >>> 16.

    A function of the element index alone, shared by every seed and key; cached per (size, device).
    Callers only read it.
    """
    key = (half, device)
    terms = _ELEMENT_TERMS.pop(key, None)
    if terms is None:
        counter = torch.arange(half, dtype=torch.int64, device=device) + _COUNTER_OFFSET
        terms = _xorshift_(_mix32_(counter.to(torch.int32)), 16)  # the conversion keeps the low 32 bits
        if half > _ELEMENT_TERMS_MAX:
            return terms
        held = list(_ELEMENT_TERMS.items())  # a snapshot: another thread may draw meanwhile
        total = half + sum(t.numel() for _, t in held)
        for stale, terms_held in held:  # the least recently used first
            if len(_ELEMENT_TERMS) < _ELEMENT_TERMS_CACHED and 4 * total <= _ELEMENT_TERMS_BYTES:
                break
            _ELEMENT_TERMS.pop(stale, None)
            total -= terms_held.numel()
    _ELEMENT_TERMS[key] = terms  # (re)inserted last: the most recently used
    return terms


def _key_bases(seeds: torch.Tensor, first_key: int, count: int,
               words: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Folded bases mix(mix(key term ^ lo) ^ hi) ^ its own >>> 16 of keys first_key, ..., first_key + count - 1 for
    int64 seeds (B,) with 32-bit words (lo, hi) (:func:`_seed_words`, computed if not given): (count, B) int32.

    The key terms are Python ints. On the CPU the bases, a few operations on count x B words, are computed with
    NumPy's unsigned 32-bit arithmetic, whose per-call cost is a fraction of PyTorch's; elsewhere the key terms
    enter PyTorch operations as scalar operands, so there is no host-to-device copy.
    """
    if seeds.device.type == "cpu":
        s = seeds.numpy().astype(np.int64, copy=False)
        x = _key_terms_numpy(first_key, count)[:, None] ^ s.astype(np.uint32)
        _mix32_numpy_(x)
        x ^= (s >> 32).astype(np.uint32)
        _mix32_numpy_(x)
        x ^= x >> 16
        return torch.from_numpy(x.view(np.int32))
    key_terms = [_key_term(key) for key in range(first_key, first_key + count)]
    lo, hi = _seed_words(seeds) if words is None else words
    bases = torch.empty((count, lo.shape[0]), dtype=torch.int32, device=lo.device)
    for i, term in enumerate(key_terms):
        torch.bitwise_xor(lo, _signed32(term), out=bases[i])
    t = torch.empty_like(bases)
    _mix32_rest_(_xorshift_(bases, 16, t), t).bitwise_xor_(hi)
    return _xorshift_(_mix32_rest_(_xorshift_(bases, 16, t), t), 16, t)


def _key_terms_numpy(first_key: int, count: int) -> np.ndarray:
    """:func:`_key_term` of keys first_key, ..., first_key + count - 1 as a uint32 array (count,).

    A key term reads the key's low 64 bits only, so the keys are held modulo 2^64 in uint64 (whose sums wrap);
    a few keys are mixed on the host, where a NumPy call would cost more than the arithmetic."""
    if count <= 8:
        return np.array([_key_term(key) for key in range(first_key, first_key + count)], dtype=np.uint32)
    keys = np.arange(count, dtype=np.uint64) + np.uint64(first_key & ((1 << 64) - 1))
    h = _mix32_numpy_((keys & np.uint64(_MASK32)).astype(np.uint32) ^ np.uint32(_KEY_SALT_LO))
    h ^= (keys >> np.uint64(32)).astype(np.uint32)
    h ^= np.uint32(_KEY_SALT_HI)
    return _mix32_numpy_(h)


def _mix32_numpy_(x: np.ndarray) -> np.ndarray:
    """lowbias32 in place on a uint32 NumPy array (its shifts are logical and its products wrap)."""
    x ^= x >> 16
    return _mix32_rest_numpy_(x, np.empty_like(x))


def _mix32_rest_numpy_(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """lowbias32 after its first step, in place on a uint32 NumPy array (t: workspace of x's shape)."""
    x *= np.uint32(_MUL1)
    x ^= np.right_shift(x, 15, out=t)
    x *= np.uint32(_MUL2)
    x ^= np.right_shift(x, 16, out=t)
    return x


def _workspace(draws: int, batch: int, half: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Scratch memory for :func:`_draw`: (2, K, 2, B, H), int32 for float32 draws and float64 for float64 draws."""
    scratch = torch.float64 if dtype == torch.float64 else torch.int32
    return torch.empty((2, draws, 2, batch, half), dtype=scratch, device=device)


def _draw(bases: torch.Tensor, terms: torch.Tensor, n: int, dtype: torch.dtype,
          workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Standard normals (K, B, n) from the folded bases (K, 2, B) of each draw's two keys and the element terms
    (H,), H = ceil(n / 2).

    Element j < H is r cos(theta) and element H + j is r sin(theta), with r = sqrt(-2 log u1) and theta = 2 pi u2
    from words j of the draw's two keys: u1 = (word + 1/2) 2^-bits in (0, 1), u2 = word 2^-bits in [0, 1),
    24 bits per uniform in float32, 32 in float64 (Box and Muller 1958). Every intermediate lives in
    ``workspace`` (from :func:`_workspace`; allocated if None), so a draw allocates only its output.
    """
    k, _, batch = bases.shape
    half = terms.shape[0]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if workspace is None:
        workspace = _workspace(k, batch, half, dtype, bases.device)
    # float32: words and spare are the two int32 halves, and the float words go to the spare once it is spent;
    # float64: both int32 arrays fit in the first float64 half and the float words fill the second. Either way
    # u1 and cos(theta) then take the first half, whose words are spent.
    ints = workspace if work == torch.float32 else workspace[0].view(torch.int32).view(2, k, 2, batch, half)
    words, spare = ints[0], ints[1]
    _mix32_rest_(torch.bitwise_xor(bases.unsqueeze(-1), terms, out=words), spare)
    if work == torch.float64:
        v = workspace[1].copy_(words.bitwise_xor_(_c(_INT32_MIN)))  # the unsigned words minus 2^31, exactly
        scratch = workspace[0]
        u1, theta = torch.mul(v[:, 0], _c(2.0**-32, work), out=scratch[:, 0]).add_(_c(_U1_OFFSET[work], work)), v[:, 1]
        theta.add_(_c(2.0**31, work)).mul_(_c(_ANGLE_32, work))
    else:  # the words' top 24 bits
        v = spare.view(work).copy_(words.bitwise_right_shift_(_c(8)).bitwise_and_(_c(0xFFFFFF)))
        scratch = words.view(work)
        u1, theta = torch.mul(v[:, 0], _c(2.0**-24, work), out=scratch[:, 0]).add_(_c(_U1_OFFSET[work], work)), v[:, 1]
        theta.mul_(_c(_ANGLE_24, work))
    r = u1.log_().mul_(_c(-2.0, work)).sqrt_()
    z = torch.empty((k, batch, n), dtype=work, device=bases.device)
    torch.mul(torch.cos(theta, out=scratch[:, 1]), r, out=z[..., :half])
    sin = theta.sin_()
    if n < 2 * half:  # odd n: the last sine is not used
        sin, r = sin[..., :n - half], r[..., :n - half]
    torch.mul(sin, r, out=z[..., half:])
    return z if dtype == work else z.to(dtype)


def _fused_draw(device: torch.device, dtype: torch.dtype):
    """The fused kernel for draws in dtype on device, or None where the PyTorch operations run."""
    if device.type == "cuda" and use_triton and dtype in (torch.float32, torch.float64):
        return _triton_kernel()
    return None


def _normals(seeds: torch.Tensor, key: int, draws: int, n: int, dtype: torch.dtype,
             words: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, terms: Optional[torch.Tensor] = None,
             bases: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draws key, ..., key + draws - 1 of n standard normals per example of int64 seeds (B,): (draws, B, n).

    A caller may pass what it holds: the seeds' ``words`` (:func:`_seed_words`), ``terms``, the element terms of
    :func:`_element_terms` for ceil(n / 2) elements, ``bases``, the folded bases of keys 2 key, ...,
    2 (key + draws) - 1 (:func:`_key_bases`), and a ``workspace`` for :func:`_draw`.
    """
    fused = _fused_draw(seeds.device, dtype)
    if fused is not None and seeds.numel() and n:
        z = fused(*(_seed_words(seeds) if words is None else words), key, draws, n, dtype)
        if z is not None:
            return z
    if terms is None:
        terms = _element_terms((n + 1) // 2, seeds.device)
    if bases is None:
        bases = _key_bases(seeds, 2 * key, 2 * draws, words)
    return _draw(bases.view(draws, 2, seeds.shape[0]), terms, n, dtype, workspace)


_TRITON: Dict[str, object] = {}


def _triton_kernel():
    """The fused CUDA draw (a callable with :func:`_normals`' arguments that returns None if the kernel cannot be
    compiled for the device), or None without Triton."""
    if "draw" not in _TRITON:
        _TRITON["draw"] = None
        if torch.version.hip is None:  # the kernel calls NVIDIA's libdevice
            try:
                _TRITON["draw"] = _build_triton_draw()
            except ImportError:
                pass
    return _TRITON["draw"]


def _build_triton_draw():
    """Compile-on-first-call Triton kernel for :func:`_normals` on CUDA; its helpers become module globals,
    where Triton looks names up."""
    import triton
    import triton.language
    import triton.language.extra.libdevice

    global tl, libdevice, _triton_lowbias32, _triton_base
    tl, libdevice = triton.language, triton.language.extra.libdevice

    @triton.jit
    def lowbias32(x):  # on uint32 words: >> is the logical shift and products wrap
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def base(key, lo, hi):  # key: uint64 (its low 64 bits are those of the Python int)
        term = _triton_lowbias32(_triton_lowbias32((key & 0xFFFFFFFF).to(tl.uint32) ^ 0x632BE5AB)
                                 ^ (key >> 32).to(tl.uint32) ^ 0x27D4EB2F)
        return _triton_lowbias32(_triton_lowbias32(term ^ lo) ^ hi)

    _triton_lowbias32, _triton_base = lowbias32, base

    @triton.jit(do_not_specialize=["key_lo", "key_hi", "batch", "half", "n", "pairs"])
    def normal_kernel(out_ptr, lo_ptr, hi_ptr, key_lo, key_hi, batch, half, n, pairs,
                      BLOCK: tl.constexpr, FLOAT64: tl.constexpr, ANGLE: tl.constexpr):
        # one program handles BLOCK (draw, example, j) pairs: outputs j (cosine) and half + j (sine)
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < pairs
        j = idx % half
        row = idx // half  # draw * batch + example
        example = row % batch
        lo = tl.load(lo_ptr + example, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(hi_ptr + example, mask=mask, other=0).to(tl.uint32, bitcast=True)
        first = ((key_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
                 | key_lo.to(tl.uint32, bitcast=True).to(tl.uint64))
        key = first + 2 * (row // batch).to(tl.uint64)
        counter = _triton_lowbias32(j.to(tl.uint32) + 0x9E3779B9)
        w1 = _triton_lowbias32(_triton_base(key, lo, hi) ^ counter)
        w2 = _triton_lowbias32(_triton_base(key + 1, lo, hi) ^ counter)
        if FLOAT64:
            u1 = (w1.to(tl.float64) + 0.5) * tl.full([BLOCK], 2.0**-32, tl.float64)
            theta = w2.to(tl.float64) * tl.full([BLOCK], ANGLE, tl.float64)
        else:
            u1 = ((w1 >> 8).to(tl.float32) + 0.5) * tl.full([BLOCK], 2.0**-24, tl.float32)
            theta = (w2 >> 8).to(tl.float32) * tl.full([BLOCK], ANGLE, tl.float32)
        r = libdevice.sqrt_rn(-2.0 * libdevice.log(u1))
        out = out_ptr + row * n + j
        tl.store(out, libdevice.cos(theta) * r, mask=mask)
        tl.store(out + half, libdevice.sin(theta) * r, mask=mask & (half + j < n))

    block = 1024
    try:  # no fused multiply-adds and libdevice without flush-to-zero: PyTorch's nvcc-built kernels round so
        from triton.backends.nvidia.compiler import CUDAOptions
        fields = CUDAOptions.__dataclass_fields__
    except ImportError:
        fields = {}
    compile_options = {name: False for name in ("enable_fp_fusion", "enable_reflect_ftz") if name in fields}

    compiled = set()  # (device, dtype) the kernel was compiled for

    def draw(lo, hi, key, draws, n, dtype):
        if (lo.device, dtype) not in compiled:
            try:
                same = _fused_matches_reference(launch, lo.device, dtype)
            except Exception as error:  # the compiler's errors have no common type; Triton may not support the GPU
                same, why = False, f"the Triton kernel failed ({error})"
            else:
                why = "the Triton kernel's values differ from the reference implementation's"
            if not same:
                warnings.warn(f"sdegen.noise: on {lo.device}, {why}; the PyTorch implementation draws the "
                              "values instead.", RuntimeWarning)
                _TRITON["draw"] = None
                return None
            compiled.add((lo.device, dtype))
        return launch(lo, hi, key, draws, n, dtype)

    def launch(lo, hi, key, draws, n, dtype):
        batch, half = lo.shape[0], (n + 1) // 2
        pairs = draws * batch * half
        z = torch.empty((draws, batch, n), dtype=dtype, device=lo.device)
        first = (2 * key) & ((1 << 64) - 1)
        args = (z, lo, hi, _signed32(first & _MASK32), _signed32(first >> 32), batch, half, n, pairs)
        grid = (triton.cdiv(pairs, block),)
        f64 = dtype == torch.float64
        options = dict(BLOCK=block, FLOAT64=f64, ANGLE=_ANGLE_32 if f64 else _ANGLE_24)
        if lo.is_cuda:
            options.update(compile_options)
        if lo.is_cuda and lo.device.index != torch.cuda.current_device():  # Triton launches on the current one
            with torch.cuda.device(lo.device):
                normal_kernel[grid](*args, **options)
        else:
            normal_kernel[grid](*args, **options)
        return z

    return draw


def _fused_matches_reference(launch, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a fused draw gives the PyTorch implementation's bits on a probe (odd and even sizes, a key past 2^32,
    seeds past 2^32), checked once per device and dtype before the fused kernel is used. The one host read of the
    comparison is allowed even under ``torch.cuda.set_sync_debug_mode("error")``."""
    seeds = make_seeds(2024, 37, device)
    words = _seed_words(seeds)
    for key, draws, n in ((3, 2, 1), (5, 1, 2), (2**33 + 7, 3, 37), (11, 1, 1000)):
        fused = launch(*words, key, draws, n, dtype)
        reference = _draw(_key_bases(seeds, 2 * key, 2 * draws, words).view(draws, 2, 37),
                          _element_terms((n + 1) // 2, device), n, dtype)
        mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
        try:
            if mode:
                torch.cuda.set_sync_debug_mode(0)
            if not torch.equal(fused, reference):
                return False
        finally:
            if mode:
                torch.cuda.set_sync_debug_mode(mode)
    return True


SEED_KINDS = {"int": "an int", "tensor": "a (B,) integer tensor of per-example seeds",
              "generator": "a torch.Generator", "none": "None (torch's global generator)"}
"""The forms a random source can take, in the words every seed error uses."""


def check_seed(seed: Any, name: str = "seed", kinds: Sequence[str] = ("int", "generator", "none"),
               why: str = "") -> Seed:
    """The one rule for a ``seed`` argument: one of ``kinds`` (keys of :data:`SEED_KINDS`), else TypeError naming
    ``name`` and the valid forms (``why``: a reason appended to them, such as why an int is needed).

    An int may have any size and sign (not a bool, which is almost always a mistake): :func:`make_seeds` keeps its
    low 63 bits and :func:`torch_generator` its value modulo 2^64, so every int torch.manual_seed takes seeds a
    generator as it does. A per-example tensor is checked for dtype and shape by :func:`make_seeds`, which knows B.
    Returns the seed, an int as a Python int.
    """
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        kind = "int"
    elif isinstance(seed, torch.Generator):
        kind = "generator"
    elif seed is None:
        kind = "none"
    elif isinstance(seed, torch.Tensor):
        kind = "tensor"
    else:
        kind = None
    if kind not in kinds:
        forms = [SEED_KINDS[k] for k in kinds]
        valid = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]
        got = f"a {seed.dtype} tensor" if isinstance(seed, torch.Tensor) else f"{type(seed).__name__} {seed!r}"
        raise TypeError(f"{name} must be {valid}{why}; got {got}.")
    return int(seed) if kind == "int" else seed


def torch_generator(seed: Any, name: str = "seed", kinds: Sequence[str] = ("int", "generator", "none"),
                    device=None, why: str = "") -> Optional[torch.Generator]:
    """The torch.Generator a seed stands for (checked by :func:`check_seed`): an int seeds a fresh generator on
    ``device`` (default: the CPU) with the int modulo 2^64, a torch.Generator is used as it is, and None means
    torch's global generator (returned as None, which torch's random functions read that way)."""
    seed = check_seed(seed, name, kinds, why)
    if isinstance(seed, int):
        return torch.Generator(device=device if device is not None else "cpu").manual_seed(seed % (1 << 64))
    return seed


def make_seeds(seed: Seed, batch: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-example int64 seeds, shape (batch,).

    - int (any size; its low 63 bits are used): example i gets a seed that depends only on (seed, i), so a
      sub-batch of a larger run reproduces the same examples (computed on ``device`` without a host-to-device copy);
    - integer tensor of shape (batch,) (not bool): one seed per example, its low 63 bits used (as for an int);
    - torch.Generator: ``batch`` seeds drawn from it (on its own device, then moved to ``device``);
    - None: drawn from torch's global generator (reproducible under ``torch.manual_seed``).
    """
    check_int(batch, "batch", lo=0)
    seed = check_seed(seed, "seed", ("int", "tensor", "generator", "none"))
    if isinstance(seed, torch.Tensor):
        if seed.shape != (batch,) or not is_integer_dtype(seed.dtype):
            raise ValueError(f"seed as a tensor must be an integer tensor (not bool) of shape ({batch},), one seed "
                             f"per example; got dtype {seed.dtype} and shape {tuple(seed.shape)}.")
        return seed.to(device=device, dtype=torch.int64) & 0x7FFFFFFFFFFFFFFF
    if isinstance(seed, torch.Generator) or seed is None:
        where = seed.device if seed is not None else None
        drawn = torch.randint(0, 2**62, (batch,), generator=seed, dtype=torch.int64, device=where)
        return drawn.to(device if device is not None else "cpu")
    seed &= 0x7FFFFFFFFFFFFFFF
    terms = _element_terms(batch, torch.empty(0, device=device).device)  # example i is element i of keys 1, 2
    words = torch.empty((2, batch), dtype=torch.int32, device=terms.device)
    for i, key in enumerate((1, 2)):
        torch.bitwise_xor(terms, _signed32(_folded_base(seed & _MASK32, seed >> 32, key)), out=words[i])
    lo, hi = _mix32_rest_(words).to(torch.int64) & _MASK32
    return ((hi & 0x7FFFFFFF) << 32) | lo


_KEY_LIMIT = 1 << 62  # draw k takes keys 2k and 2k + 1, which must stay below 2^63


def _check_stream(seeds: Any, key: Any) -> None:
    """The seeds (B,) and draw index of a stream: an integer tensor (not bool) and an int in [0, 2^62)."""
    if not (isinstance(seeds, torch.Tensor) and seeds.ndim == 1 and is_integer_dtype(seeds.dtype)):
        got = f"{seeds.dtype} of shape {tuple(seeds.shape)}" if isinstance(seeds, torch.Tensor) else \
            type(seeds).__name__
        raise TypeError(f"seeds must be an integer tensor (not bool) of shape (B,), one seed per example (see "
                        f"make_seeds); got {got}.")
    check_int(key, "key", lo=0, hi=_KEY_LIMIT - 1, hint=" (the index of a draw)")


def normal_from_seeds(seeds: torch.Tensor, key: int, event_shape: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (B, *event_shape): a pure function of (seeds[i], key, element index).
    ``seeds``: an integer tensor (B,) (their low 63 bits are read); ``key``: an int in [0, 2^62); ``dtype``: a
    floating dtype."""
    _check_stream(seeds, key)
    check_floating_dtype(dtype, "dtype")
    n = math.prod(event_shape)
    return _normals(seeds, key, 1, n, dtype).view((seeds.shape[0],) + tuple(event_shape))


class Noise:
    """A per-example noise stream: each call of :meth:`like` returns fresh N(0, I) noise.

    Args:
        seeds: int64 tensor (B,), one seed per example (see :func:`make_seeds`).
        key: index of the next draw; draws 0, 1, 2, ... are independent.

    Draw k of the stream is ``normal_from_seeds(seeds, k, ...)``. After the first draw, the stream computes
    up to ``max_chunk`` draws at once (at most ``chunk_bytes`` of hash words) and returns them one per call,
    each a fresh, never re-used slice; the per-key part of the hash is computed for up to ``base_keys`` keys
    ahead, and on the CPU the draw keeps its scratch memory (up to ``workspace_limit`` bytes) between calls, so a
    call allocates only the noise it returns. A caller that knows how many draws follow says so with
    :meth:`expect`: chunks then start at the first draw and stop at the last one. No call reads a device value on
    the host.
    """

    batch_invariant = True
    max_chunk = 16
    chunk_bytes = 1 << 20
    base_keys = 64
    workspace_limit = 1 << 26

    def __init__(self, seeds: torch.Tensor, key: int = 0):
        _check_stream(seeds, key)
        self.seeds = seeds
        self.key = key
        self._seeds = None  # (seeds, their 32-bit words) on the state's device
        self._terms = None  # the element terms of the current event size
        self._bases = None  # (first key, folded bases (R, B)) of the keys ahead, on the state's device
        self._workspace = None  # scratch memory of the PyTorch draw
        self._chunk = None  # (shape, dtype, first key, draws (K, *shape)); keys below _next were handed out
        self._next = 0
        self._expected_end = 0  # the key after the last draw announced by :meth:`expect`

    def expect(self, draws: int) -> None:
        """Announce that about ``draws`` more draws (of one shape) follow, so that chunks and key bases are sized
        for them: no chunk runs past them, and the first draw starts a full chunk. A hint only: the values never
        depend on it, and draws past the announced ones are made as without it."""
        self._expected_end = self.key + max(int(draws), 0)

    @classmethod
    def from_seed(cls, seed: Seed, batch: int, device=None) -> "Noise":
        return cls(make_seeds(seed, batch, device))

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh noise with x's shape, dtype and device; the stream advances by one draw."""
        if x.ndim == 0 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor (B, ...) (the noise takes its shape and dtype); got "
                             f"{x.dtype} of shape {tuple(x.shape)}.")
        if x.shape[0] != self.seeds.shape[0]:
            raise ValueError(f"noise stream has {self.seeds.shape[0]} examples but x has batch {x.shape[0]}.")
        chunk = self._chunk
        if (chunk is None or chunk[0] != x.shape or chunk[1] != x.dtype or chunk[3].device != x.device
                or not self._next <= self.key < chunk[2] + chunk[3].shape[0]):
            expected = self._expected_end - self.key
            draws = 1 if chunk is None and expected <= 0 else self._chunk_draws(x)
            if expected > 0:
                draws = min(draws, expected)
            chunk = self._chunk = None  # let the spent chunk go before the next one is allocated
            shape, dtype, first, z = self._fill(x, draws)
            # the draws viewed in x's shape once per chunk: a call then selects one (a fresh view, no indexing)
            chunk = self._chunk = (shape, dtype, first, z.view((z.shape[0],) + tuple(shape)))
        key = self.key
        self.key = self._next = key + 1
        return chunk[3].select(0, key - chunk[2])

    def _chunk_draws(self, x: torch.Tensor) -> int:
        return max(1, min(self.max_chunk, self.chunk_bytes // max(4 * x.numel(), 1)))

    def _fill(self, x: torch.Tensor, draws: int):
        if self._seeds is None or self._seeds[0].device != x.device:
            seeds = self.seeds.to(x.device)
            self._seeds, self._bases = (seeds, _seed_words(seeds)), None
        seeds, words = self._seeds
        n = math.prod(x.shape[1:])
        self._next = self.key
        if _fused_draw(x.device, x.dtype) is not None:
            return x.shape, x.dtype, self.key, _normals(seeds, self.key, draws, n, x.dtype, words)
        half = (n + 1) // 2
        if self._terms is None or self._terms.shape[0] != half or self._terms.device != x.device:
            self._terms = _element_terms(half, x.device)
        bases = self._key_bases(2 * self.key, 2 * draws)
        z = _normals(seeds, self.key, draws, n, x.dtype, words, self._terms, bases, self._scratch(draws, half, x))
        return x.shape, x.dtype, self.key, z

    def _scratch(self, draws: int, half: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The stream's workspace for :func:`_draw` on the CPU (kept up to ``workspace_limit`` bytes, else None).

        On the CPU a fresh workspace would come from the system allocator, page faults and all; elsewhere the
        caching allocators hand memory back cheaply, and a workspace kept across calls could be shared by two
        device streams.
        """
        if x.device.type != "cpu":
            return None
        held = self._workspace
        if held is not None and held.shape[1] > draws and held.shape[2:] == (2, x.shape[0], half) \
                and (held.dtype == torch.float64) == (x.dtype == torch.float64):
            return held[:, :draws]  # a shorter chunk (the last of an expected run) uses the front of the workspace
        if held is None or held.shape != (2, draws, 2, x.shape[0], half) or held.device != x.device or (
                (held.dtype == torch.float64) != (x.dtype == torch.float64)):
            held = self._workspace = None  # let the last one go first
            if 2 * draws * 2 * x.shape[0] * half * (8 if x.dtype == torch.float64 else 4) <= self.workspace_limit:
                held = self._workspace = _workspace(draws, x.shape[0], half, x.dtype, x.device)
        return held

    def _key_bases(self, first: int, count: int) -> torch.Tensor:
        """Folded bases (count, B) of keys first, ..., first + count - 1, from the block of keys ahead."""
        held = self._bases
        if held is None or not held[0] <= first <= first + count <= held[0] + held[1].shape[0]:
            seeds, words = self._seeds
            ahead = max(count, min(self.base_keys, self.chunk_bytes // (4 * max(seeds.shape[0], 1))))
            if 2 * self._expected_end > first + count:  # not past the expected draws' keys
                ahead = min(ahead, 2 * self._expected_end - first)
            held = self._bases = (first, _key_bases(seeds, first, ahead, words))
        return held[1][first - held[0]:first - held[0] + count]

    def spawn(self, salt: int) -> "Noise":
        """An independent stream with the same per-example seeds (used for a Brownian motion, say); ``salt`` (an int
        in [0, 2^21]) tells spawned streams apart, each owning 2^40 draws."""
        check_int(salt, "salt", lo=0, hi=1 << 21)
        return Noise(self.seeds, key=(salt + 1) << 40)

    def draw(self, key: int, x: torch.Tensor) -> torch.Tensor:
        """Draw ``key`` of this stream with x's shape, dtype and device, in any order and without advancing the
        stream (``normal_from_seeds(seeds, key, ...)``: what :meth:`like` returns as that draw)."""
        if self._seeds is None or self._seeds[0].device != x.device:
            seeds = self.seeds.to(x.device)
            self._seeds, self._bases = (seeds, _seed_words(seeds)), None
        return normal_from_seeds(self._seeds[0], key, x.shape[1:], x.dtype)


class GeneratorNoise:
    """A faster noise stream: one ``torch.Generator`` on the state's device, seeded from the first example's seed.

    Reproducible for a fixed seed and batch, but example i's noise depends on the batch it is drawn in
    (use :class:`Noise` for batch-size invariance). Same interface as :class:`Noise`.
    """

    batch_invariant = False

    def __init__(self, seeds: torch.Tensor, key: int = 0):
        self.seeds, self.key = seeds, key
        self._entropy: Optional[int] = None
        self._generator: Optional[torch.Generator] = None

    @property
    def entropy(self) -> int:
        """The generator's seed, from the first example's seed and the key: read from the seeds' device once, at
        the first draw (a run that draws nothing never reads it)."""
        if self._entropy is None:
            first = int(self.seeds[0]) if self.seeds.numel() else 0
            self._entropy = (first + 0x9E3779B97F4A7C15 * self.key) % (1 << 63)
        return self._entropy

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh N(0, I) noise with x's shape, dtype and device."""
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.entropy)
        return torch.randn(x.shape, generator=self._generator, dtype=x.dtype, device=x.device)

    def expect(self, draws: int) -> None:
        """A hint of :class:`Noise`'s interface; a generator draws on demand."""

    def spawn(self, salt: int) -> "GeneratorNoise":
        return GeneratorNoise(self.seeds, key=(salt + 1) << 20)

    def draw(self, key: int, x: torch.Tensor) -> torch.Tensor:
        """Draw ``key`` with x's shape, dtype and device, in any order: from a generator seeded with the stream's
        entropy and the key (reproducible for a fixed seed and batch, as the stream)."""
        check_int(key, "key", lo=0, hi=_KEY_LIMIT - 1, hint=" (the index of a draw)")
        generator = torch.Generator(device=x.device).manual_seed((self.entropy + 0x9E3779B97F4A7C15 * (key + 1))
                                                                 % (1 << 63))
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


NOISE_KINDS = {"per_example": Noise, "generator": GeneratorNoise}


_TREE_DEPTH = 14  # levels of the path's dyadic tree: leaves 2^-14 of the SDE's span of u (about 6e-4 in log sigma)
_IN_LEAF_KEYS = 1 << 39  # keys of the draws at times between leaf ends (the tree's own keys are below 2^15)


def _mix64(k: int) -> int:
    """A 64-bit integer hash (splitmix64's finaliser): nearby or round floats' bit patterns spread over all bits."""
    k = ((k ^ (k >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    k = ((k ^ (k >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return k ^ (k >> 31)


class OUPath:
    """One stationary Ornstein-Uhlenbeck path per example, Z(u) with E Z = 0, Var Z = 1 and
    Cov(Z(u), Z(v)) = e^{-lam |u - v|}, evaluated at any u, and the same function of u whatever the queries.

    Z is the Brownian motion of the reverse SDE seen in its natural variables: with B a Brownian motion in the clock
    e^{2 lam u}, Z(u) = e^{-lam u} B(e^{2 lam u}), so the noise a linear step from u to v adds to y = x/m is
    sigma(v) (Z(v) - e^{-lam (v - u)} Z(u)); Z stays of unit size where B would span twenty orders of magnitude.

    Values on [lo, hi] come from a virtual tree (Li et al. 2020's Brownian tree, here of the OU process): Z at lo
    and hi, then at each dyadic midpoint the OU bridge between the ends of its interval, down to leaves of width
    (hi - lo) 2^-depth, each draw keyed by its node; a time inside a leaf is the bridge between the leaf's ends (or
    the last queried time in that leaf), outside [lo, hi] the OU transition from the nearest end (or the last
    query). Queries in increasing or decreasing order, as a sampler makes them, have exactly the law above; two
    runs that query different times share every node, so their noises agree up to the leaf width (what makes a
    stochastic sampler converge to one sample as its steps grow). ``noise`` is a stream with ``draw(key, x)``.
    Memory: the values on the last query's path down the tree, depth + 2 tensors of the state's size.
    """

    def __init__(self, noise, lam: float, lo: float, hi: float, depth: int = _TREE_DEPTH):
        if not (lam > 0.0 and lo < hi):
            raise ValueError(f"an OU path needs lam > 0 and lo < hi; got lam={lam!r}, lo={lo!r}, hi={hi!r}.")
        self.noise, self.lam, self.lo, self.hi, self.depth = noise, float(lam), float(lo), float(hi), int(depth)
        self._base = int(getattr(noise, "key", 0))  # the stream's own first key: its draws are base + node key
        self._nodes: dict = {}  # (level, odd index, or 0/1 at level 0) -> Z there, the last query's path
        self._last = None  # (u, Z(u)) of the last query

    def _point(self, level: int, i: int) -> float:
        if i == 1 << level:  # the right end exactly (lo + (hi - lo) may round away from hi)
            return self.hi
        return self.lo + (self.hi - self.lo) * i / (1 << level)

    def _bridge(self, u: float, a: float, za: torch.Tensor, b: float, zb: torch.Tensor, key: int, x: torch.Tensor):
        """Z(u) given Z(a) = za and Z(b) = zb, a <= u <= b, its fresh part drawn with ``key``."""
        if u == a:
            return za
        if u == b:
            return zb
        lam = self.lam
        e1, e2 = math.exp(-lam * (u - a)), math.exp(-lam * (b - u))
        q1, q2 = -math.expm1(-2.0 * lam * (u - a)), -math.expm1(-2.0 * lam * (b - u))
        q = -math.expm1(-2.0 * lam * (b - a))
        mean = torch.mul(za, e1 * q2 / q).add_(zb, alpha=e2 * q1 / q)
        return mean.add_(self.noise.draw(self._base + key, x), alpha=math.sqrt(q1 * q2 / q))

    def _step(self, u: float, v: float, zv: torch.Tensor, key: int, x: torch.Tensor) -> torch.Tensor:
        """Z(u) given Z(v) = zv alone (the Markov transition over |u - v|, either way in time)."""
        d = abs(u - v)
        return torch.mul(zv, math.exp(-self.lam * d)).add_(self.noise.draw(self._base + key, x),
                                                           alpha=math.sqrt(-math.expm1(-2.0 * self.lam * d)))

    def _node(self, level: int, i: int, x: torch.Tensor, kept: dict) -> torch.Tensor:
        level, i = self._reduced(level, i)
        z = self._nodes.get((level, i))
        if z is None:
            if level == 0:
                z = self.noise.draw(self._base, x) if i == 0 else \
                    self._step(self.hi, self.lo, self._node(0, 0, x, kept), 1, x)
            else:
                left, right = self._node(level, i - 1, x, kept), self._node(level, i + 1, x, kept)
                z = self._bridge(self._point(level, i), self._point(level, i - 1), left, self._point(level, i + 1),
                                 right, (1 << level) + i, x)
            self._nodes[(level, i)] = z
        kept[(level, i)] = z
        return z

    def at(self, u: float, x: torch.Tensor) -> torch.Tensor:
        """Z(u), a new tensor of x's shape, dtype and device (a read-only value: do not modify it in place)."""
        u = float(u)
        last = self._last
        if last is not None and last[0] == u:
            return last[1]
        key = _IN_LEAF_KEYS + _mix64(int.from_bytes(struct.pack("<d", u), "little")) % _IN_LEAF_KEYS
        if u > self.hi or u < self.lo:
            end = self.hi if u > self.hi else self.lo
            if last is not None and (last[0] - end) * (u - end) > 0:  # the last query lies beyond the same end
                if abs(u - end) > abs(last[0] - end):
                    z = self._step(u, last[0], last[1], key, x)
                else:
                    zend = self._node(0, 1 if end == self.hi else 0, x, {})
                    lo_, hi_ = sorted((end, last[0]))
                    z_lo, z_hi = (zend, last[1]) if lo_ == end else (last[1], zend)
                    z = self._bridge(u, lo_, z_lo, hi_, z_hi, key, x)
            else:
                z = self._step(u, end, self._node(0, 1 if end == self.hi else 0, x, {}), key, x)
        else:
            kept: dict = {}
            n = 1 << self.depth
            i = min(int((u - self.lo) / (self.hi - self.lo) * n), n - 1)
            i += (u >= self._point(self.depth, i + 1)) - (u < self._point(self.depth, i))  # round-off at an end
            i = max(0, min(i, n - 1))  # u = hi lies in the last leaf
            a, b = self._point(self.depth, i), self._point(self.depth, i + 1)
            for level in range(self.depth + 1):  # the path down the tree: both ends of every interval around u
                j = i >> (self.depth - level)
                self._node(level, j, x, kept)
                self._node(level, j + 1, x, kept)
            za, zb = kept[self._reduced(self.depth, i)], kept[self._reduced(self.depth, i + 1)]
            if last is not None and a <= last[0] <= b:  # the nearer end is the last query in this leaf
                if last[0] < u:
                    a, za = last
                else:
                    b, zb = last
            z = self._bridge(u, a, za, b, zb, key, x)
            self._nodes = kept  # only the path around the latest query is kept
        self._last = (u, z)
        return z

    @staticmethod
    def _reduced(level: int, i: int) -> tuple:
        """The node of dyadic point i / 2^level: at the coarsest level where it appears."""
        while level > 0 and i % 2 == 0:
            level, i = level - 1, i // 2
        return level, i
