"""Per-example noise: moments, independence, batch invariance, device-free determinism."""

import math
import re

import pytest
import torch

from sdegen.noise import Noise, check_seed, make_seeds, normal_from_seeds, torch_generator


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_standard_normal_moments(dt):
    z = normal_from_seeds(make_seeds(0, 50000), 0, (4,), dt).double().flatten()
    n = z.numel()
    # sample mean, variance, skewness, kurtosis within 5 standard errors of N(0, 1)'s
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # the normal CDF at a few points
    for q in (-1.5, 0.0, 0.7):
        p = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs(float((z < q).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_draws_examples_and_elements_are_uncorrelated():
    seeds = make_seeds(3, 20000)
    a = normal_from_seeds(seeds, 0, (3,), torch.float64)
    b = normal_from_seeds(seeds, 1, (3,), torch.float64)
    c = torch.corrcoef(torch.cat([a, b], 1).T)
    off = c - torch.eye(6, dtype=torch.float64)
    assert off.abs().max() < 5 / math.sqrt(20000)
    # neighbouring examples are uncorrelated too
    r = torch.corrcoef(torch.stack([a[:-1, 0], a[1:, 0]]))[0, 1]
    assert abs(float(r)) < 5 / math.sqrt(20000)


def test_example_noise_is_independent_of_the_batch():
    big = Noise.from_seed(11, 50)
    small = Noise.from_seed(11, 7)
    x_big, x_small = torch.zeros(50, 2, 3), torch.zeros(7, 2, 3)
    for _ in range(3):
        torch.testing.assert_close(small.like(x_small), big.like(x_big)[:7], rtol=0, atol=0)


def test_seed_forms():
    s = make_seeds(torch.tensor([5, 6, 7]), 3)
    assert s.tolist() == [5, 6, 7]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(make_seeds(g1, 4), make_seeds(g2, 4))
    assert not torch.equal(make_seeds(1, 4), make_seeds(2, 4))
    with pytest.raises(ValueError, match="seed"):
        make_seeds(torch.tensor([1, 2]), 3)
    with pytest.raises(TypeError, match="seed"):
        make_seeds(1.5, 3)
    with pytest.raises(ValueError, match="batch"):
        Noise.from_seed(0, 3).like(torch.zeros(4))


def test_int32_mixer_is_the_unsigned_lowbias32():
    # the tensor mixer works on int32 words with wrapping products; its words must be the textbook unsigned ones
    from sdegen.noise import _mix32, _mix32_
    words = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9] + torch.randint(0, 2**32, (200,), dtype=torch.int64,
                                                                            generator=torch.Generator().manual_seed(0)).tolist()
    signed = torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)
    got = (_mix32_(signed).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == [_mix32(w) for w in words]


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_stream_draws_are_normal_from_seeds_whatever_the_chunking(dt):
    seeds = make_seeds(4, 300)
    stream = Noise(seeds, key=5)
    x = torch.zeros(300, 3, 5, dtype=dt)
    first = stream.like(x)  # computed alone; the next draws come from chunks of several
    draws = [first.clone()] + [stream.like(x).clone() for _ in range(2 * Noise.max_chunk)]
    for k, z in enumerate(draws):
        assert z.shape == x.shape and z.dtype == dt
        torch.testing.assert_close(z, normal_from_seeds(seeds, 5 + k, (3, 5), dt), rtol=0, atol=0)
    # a handed-out draw is never handed out again, even if its holder modified it and the key is set back
    stream.key = 5 + len(draws)
    z = stream.like(x)
    z.mul_(0.0)
    stream.key -= 1
    torch.testing.assert_close(stream.like(x), normal_from_seeds(seeds, 4 + len(draws) + 1, (3, 5), dt),
                               rtol=0, atol=0)
    # another shape starts a new chunk
    torch.testing.assert_close(stream.like(torch.zeros(300, 7, dtype=dt)),
                               normal_from_seeds(seeds, 5 + len(draws) + 1, (7,), dt), rtol=0, atol=0)


# The reference: the streams' definition written one PyTorch operation after another (the implementation whose
# values seeds have produced so far), kept here so that any faster implementation is held to the same bits:
# example i's noise is part of what a seed promises.
def _reference_mix(x):
    """lowbias32 in place on int32 words, logical shifts as arithmetic shifts plus masks."""
    t = torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF)
    x.bitwise_xor_(t).mul_(0x7FEB352D)
    torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF)
    x.bitwise_xor_(t).mul_(0x846CA68B - 2**32)
    torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF)
    return x.bitwise_xor_(t)


def _reference_int32(words):
    return ((words ^ (1 << 31)) - (1 << 31)).to(torch.int32)


def _reference_key_term(key):
    def mix(x):
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    h = mix(mix((key & 0xFFFFFFFF) ^ 0x632BE5AB) ^ ((key >> 32) & 0xFFFFFFFF) ^ 0x27D4EB2F)
    return h - 2**32 if h >= 2**31 else h


def _reference_hash(seeds, keys, n):
    """Words (K, B, n) of keys for int64 seeds (B,) and elements 0..n-1."""
    lo, hi = _reference_int32(seeds & 0xFFFFFFFF), _reference_int32((seeds >> 32) & 0xFFFFFFFF)
    counter = _reference_mix(_reference_int32((torch.arange(n, device=seeds.device) + 0x9E3779B9) & 0xFFFFFFFF))
    k = torch.tensor([_reference_key_term(key) for key in keys], dtype=torch.int32, device=seeds.device)
    base = _reference_mix(_reference_mix(k[:, None] ^ lo).bitwise_xor_(hi))
    return _reference_mix(base[:, :, None] ^ counter)


def _reference_seeds(seed, batch):
    base = torch.tensor([seed & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64)
    lo, hi = _reference_hash(base, [1, 2], batch)[:, 0].to(torch.int64) & 0xFFFFFFFF
    return ((hi & 0x7FFFFFFF) << 32) | lo


def _reference_normal(seeds, key, event_shape, dtype):
    n, batch = math.prod(event_shape), seeds.shape[0]
    h = _reference_hash(seeds, [2 * key, 2 * key + 1], (n + 1) // 2)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if work == torch.float64:
        bits, v = 32, (h ^ -(1 << 31)).to(work).add_(2.0**31)
    else:
        bits, v = 24, torch.bitwise_right_shift(h, 8).bitwise_and_(0xFFFFFF).to(work)
    r = torch.log(v[0].add_(0.5).mul_(2.0**-bits)).mul_(-2.0).sqrt_()
    theta = v[1].mul_(2.0 * math.pi * 2.0**-bits)
    z = torch.cat([torch.cos(theta).mul_(r), theta.sin_().mul_(r)], dim=1)[:, :n]
    return z.to(dtype).reshape((batch,) + tuple(event_shape))


def _assert_same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    assert torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} values differ"


def test_keyed_draws_are_the_streams_draws_in_any_order():
    """draw(key, x) is the stream's draw number key without advancing it, in any order; the generator stream's
    keyed draws are reproducible and differ between keys."""
    from sdegen.noise import GeneratorNoise

    seeds = make_seeds(9, 6)
    stream, x = Noise(seeds, key=3), torch.zeros(6, 4, dtype=torch.float64)
    late = stream.draw(7, x)
    assert stream.key == 3
    draws = [stream.like(x).clone() for _ in range(5)]
    torch.testing.assert_close(late, draws[4], rtol=0, atol=0)
    torch.testing.assert_close(stream.draw(4, x), draws[1], rtol=0, atol=0)
    gen = GeneratorNoise(seeds).spawn(2)
    a, b = gen.draw(11, x), gen.draw(12, x)
    torch.testing.assert_close(GeneratorNoise(seeds).spawn(2).draw(11, x), a, rtol=0, atol=0)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="key"):
        gen.draw(-1, x)


def test_seeds_are_those_of_the_reference():
    for seed in (0, 1, 977, 2**40 + 3, 2**63 + 5, -7):
        for batch in (1, 6, 300):
            _assert_same_bits(make_seeds(seed, batch), _reference_seeds(seed, batch))


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16])
def test_draws_are_those_of_the_reference(dt, device):
    # odd and even sizes, sizes 1 and 2, more event sizes than the element terms' cache holds, keys of
    # spawned streams, of the Brownian nodes and probes, and near the largest key, 2^62 - 1 (keys past it wrapped:
    # draw 2^63 was draw 0; they are refused)
    shapes = [(), (2,), (3,), (2, 5), (1, 7, 5), (3, 8, 8), (4, 33)] + [(k,) for k in range(4, 40, 2)]
    keys = [0, 5, (1 << 40) + 3, (1 << 44) + 1, (1 << 50) + 9, (1 << 62) - 7]
    for batch in (1, 5, 40):
        seeds = _reference_seeds(batch, batch).to(device)
        for i, shape in enumerate(shapes):
            for key in keys[i % 3::3]:
                expected = _reference_normal(seeds, key, shape, dt)
                _assert_same_bits(normal_from_seeds(seeds, key, shape, dt), expected)
    # drawn again after all the others (cached terms and constants are only ever read)
    _assert_same_bits(normal_from_seeds(seeds, 5, (3, 8, 8), dt), _reference_normal(seeds, 5, (3, 8, 8), dt))


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_stream_draws_are_those_of_the_reference(dt, device):
    # long enough to cross several chunks and blocks of key bases, with a change of shape and a stream's spawn
    seeds = _reference_seeds(21, 12).to(device)
    stream = Noise(seeds, key=3)
    shapes = [(12, 3, 4, 4)] * 40 + [(12, 5)] * 3 + [(12, 3, 4, 4)] * 2 + [(12, 2, 32, 32)] * 3
    for k, shape in enumerate(shapes):
        _assert_same_bits(stream.like(torch.zeros(shape, dtype=dt, device=device)),
                          _reference_normal(seeds, 3 + k, shape[1:], dt))
    spawned = stream.spawn(4)
    for k in range(3):
        _assert_same_bits(spawned.like(torch.zeros(12, 7, dtype=dt, device=device)),
                          _reference_normal(seeds, (5 << 40) + k, (7,), dt))


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("expected", [1, 5, Noise.max_chunk + 3])
def test_expected_draws_leave_the_values_unchanged(dt, expected):
    # chunks sized for the announced draws (a full first chunk, a shorter last one in the front of the workspace,
    # key bases up to the last announced key), then draws past them, a new announcement and a change of shape
    seeds = _reference_seeds(8, 24)
    stream = Noise(seeds, key=7)
    stream.expect(expected)
    x = torch.zeros(24, 2, 3, dtype=dt)
    draws = [stream.like(x) for _ in range(expected + 2 * Noise.max_chunk)]
    stream.expect(3)
    draws += [stream.like(x) for _ in range(4)] + [stream.like(torch.zeros(24, 40, dtype=dt))]
    for k, z in enumerate(draws):
        _assert_same_bits(z, _reference_normal(seeds, 7 + k, z.shape[1:], dt))


def test_vectorised_key_terms_are_the_host_ones():
    from sdegen.noise import _key_term, _key_terms_numpy
    for first in (0, 5, (3 << 40) + 1, 2**63 - 4, 2**64 - 6, 2**70 + 9):
        got = _key_terms_numpy(first, 12).tolist()
        assert got == [_key_term(key) for key in range(first, first + 12)]


def test_handed_out_draws_are_never_overwritten():
    # refills reuse the stream's scratch memory; the draws it returned must not share it
    stream = Noise.from_seed(2, 6)
    x = torch.zeros(6, 5)
    held = [stream.like(x) for _ in range(3 * Noise.max_chunk)]
    copies = [z.clone() for z in held]
    for _ in range(2 * Noise.max_chunk):
        stream.like(x)
    stream.like(torch.zeros(6, 3, 3))
    for z, copy in zip(held, copies):
        _assert_same_bits(z, copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False], ids=["triton-if-installed", "torch"])
def test_cuda_draws_do_not_synchronise_with_the_host(monkeypatch, fused):
    from sdegen import noise
    monkeypatch.setattr(noise, "use_triton", fused)
    x = torch.zeros(8, 3, 4, 4, device="cuda")
    Noise.from_seed(0, 8, "cuda").like(x)  # compiles the kernels that need compiling
    torch.cuda.set_sync_debug_mode("error")
    try:
        stream = Noise.from_seed(5, 8, "cuda")
        for _ in range(2 * Noise.max_chunk + 3):
            stream.like(x)
        stream.like(torch.zeros(8, 7, dtype=torch.float64, device="cuda"))
        stream.spawn(1).like(x)
        normal_from_seeds(stream.seeds, 3, (5,))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fused_kernel_agrees_with_the_torch_implementation(monkeypatch):
    from sdegen import noise
    if not (torch.cuda.is_available() and noise._triton_kernel() is not None):
        pytest.skip("needs CUDA and Triton")
    seeds = make_seeds(8, 33, "cuda")
    for dt in (torch.float32, torch.float64):
        for shape in [(), (1,), (7,), (3, 32, 32), (1, 9, 9)]:
            for key in (0, 3, (1 << 40) + 5, 2**63 + 1):
                monkeypatch.setattr(noise, "use_triton", True)
                fused = normal_from_seeds(seeds, key, shape, dt)
                monkeypatch.setattr(noise, "use_triton", False)
                _assert_same_bits(fused, normal_from_seeds(seeds, key, shape, dt))


def test_fused_kernel_is_checked_against_the_reference_bits():
    """A fused implementation is used only if it reproduces the PyTorch implementation's bits on a probe: one that
    does passes, one that is off by a single ulp in one value fails (and the library then keeps the PyTorch
    implementation)."""
    from sdegen import noise as nz

    def exact(lo, hi, key, draws, n, dtype):
        seeds = (hi.to(torch.int64) << 32) | (lo.to(torch.int64) & 0xFFFFFFFF)
        return nz._draw(nz._key_bases(seeds, 2 * key, 2 * draws).view(draws, 2, lo.shape[0]),
                        nz._element_terms((n + 1) // 2, lo.device), n, dtype)

    def one_ulp_off(lo, hi, key, draws, n, dtype):
        z = exact(lo, hi, key, draws, n, dtype)
        z.view(-1)[-1] = torch.nextafter(z.view(-1)[-1], torch.tensor(math.inf, dtype=dtype))
        return z

    for dt in (torch.float32, torch.float64):
        assert nz._fused_matches_reference(exact, torch.device("cpu"), dt)
        assert not nz._fused_matches_reference(one_ulp_off, torch.device("cpu"), dt)


def test_make_seeds_refuses_bool_tensors_and_bad_batch_sizes():
    """A bool tensor holds 0/1 only: as per-example seeds it would give most examples the same stream."""
    with pytest.raises(ValueError, match=r"seed as a tensor must be an integer tensor \(not bool\) of shape \(4,\)"):
        make_seeds(torch.ones(4, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="seed as a tensor must be an integer tensor"):
        make_seeds(torch.zeros(4), 4)
    with pytest.raises(ValueError, match="batch must be an int >= 0; got -1"):
        make_seeds(0, -1)
    with pytest.raises(TypeError, match="batch must be an int >= 0; got float 2.0"):
        make_seeds(0, 2.0)
    assert make_seeds(0, 0).shape == (0,)
    assert torch.equal(make_seeds(torch.tensor([3, 4], dtype=torch.int32), 2), torch.tensor([3, 4]))


def test_int_seeds_of_any_size():
    """make_seeds keeps an int's low 63 bits, torch_generator its value modulo 2^64 (as torch.manual_seed reads
    the ints it takes), so no int overflows; a numpy int is an int."""
    np = pytest.importorskip("numpy")
    base = make_seeds(5, 6)
    assert torch.equal(make_seeds(2**64 + 5, 6), base) and torch.equal(make_seeds(2**63 + 5, 6), base)
    assert torch.equal(make_seeds(np.int64(5), 6), base)
    assert not torch.equal(make_seeds(6, 6), base)
    draw = lambda g: torch.rand(3, generator=g)  # noqa: E731
    assert torch.equal(draw(torch_generator(2**64 + 5)), draw(torch.Generator().manual_seed(5)))
    assert torch.equal(draw(torch_generator(-1)), draw(torch.Generator().manual_seed(2**64 - 1)))
    g = torch.Generator()
    assert torch_generator(g) is g and torch_generator(None) is None


@pytest.mark.parametrize("kinds, valid", [
    (("int", "generator", "none"), "an int, a torch.Generator or None (torch's global generator)"),
    (("int", "generator"), "an int or a torch.Generator"),
    (("int",), "an int"),
    (("int", "tensor", "generator", "none"),
     "an int, a (B,) integer tensor of per-example seeds, a torch.Generator or None (torch's global generator)")])
def test_one_seed_rule_and_one_message(kinds, valid):
    """check_seed is the rule behind every seed= of the library: the message names seed, lists the forms the
    function takes, and says what it got."""
    for bad, got in ((1.5, "float 1.5"), (True, "bool True"), ("3", "str '3'")):
        with pytest.raises(TypeError) as err:
            check_seed(bad, "seed", kinds)
        assert str(err.value) == f"seed must be {valid}; got {got}."
    assert check_seed(7, "seed", kinds) == 7 and type(check_seed(2**70, "seed", kinds)) is int
    for kind, value in (("generator", torch.Generator()), ("none", None), ("tensor", torch.arange(3))):
        if kind in kinds:
            assert check_seed(value, "seed", kinds) is value
        else:
            with pytest.raises(TypeError, match=re.escape(f"seed must be {valid}; got ")):
                check_seed(value, "seed", kinds)
    with pytest.raises(TypeError, match=r"seed must be an int \(the same on every rank\); got NoneType None\."):
        check_seed(None, "seed", ("int",), why=" (the same on every rank)")


def test_stream_arguments_are_named():
    """Float seeds were truncated, integer dtypes gave truncated normals, keys wrapped at 2^63 and a 0-d state raised
    IndexError."""
    from sdegen.noise import Noise, normal_from_seeds
    seeds = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="seeds must be an integer tensor"):
        normal_from_seeds(torch.tensor([1.7, 2.2]), 0, (3,))
    with pytest.raises(TypeError, match="seeds must be an integer tensor"):
        Noise(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        normal_from_seeds(seeds, 0, (3,), dtype=torch.int64)
    for key in (-1, 2**62, 1.5):
        with pytest.raises((TypeError, ValueError), match="key"):
            normal_from_seeds(seeds, key, (3,))
    with pytest.raises(ValueError, match="floating tensor"):
        Noise(seeds).like(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating tensor"):
        Noise(torch.tensor([1])).like(torch.tensor(0.0))


def test_the_element_term_cache_is_bounded_and_clearable():
    from sdegen import noise
    noise.clear_caches()
    seeds = torch.tensor([1, 2])
    for n in range(2, 60):
        noise.normal_from_seeds(seeds, 0, (n,))
    assert len(noise._ELEMENT_TERMS) <= noise._ELEMENT_TERMS_CACHED
    first = next(iter(noise._ELEMENT_TERMS))
    noise._element_terms(*first)  # a hit makes it the most recently used
    assert list(noise._ELEMENT_TERMS)[-1] == first
    noise.clear_caches()
    assert not noise._ELEMENT_TERMS


def test_spawned_streams_are_named_by_a_bounded_salt():
    from sdegen.noise import Noise
    stream = Noise(torch.tensor([1, 2]))
    assert stream.spawn(3).key == 4 << 40
    for salt in (-1, 1 << 22, 1.5):
        with pytest.raises((TypeError, ValueError), match="salt"):
            stream.spawn(salt)
