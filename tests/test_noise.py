"""Per-example noise: moments, independence, batch invariance, device-free determinism."""

import math

import pytest
import torch

from sdegen.noise import Noise, make_seeds, normal_from_seeds


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
