"""One seed vocabulary across the random functions of the library (sdegen.noise.check_seed is the rule).

Every ``seed=`` takes an int of any size and sign (not a bool), and the functions that document them a
torch.Generator and None (torch's global generator). An int too large for torch.manual_seed is reduced, never an
overflow: make_seeds keeps its low 63 bits and a generator is seeded with it modulo 2^64, so 2^64 + 5 draws as 5
everywhere. Anything else is a TypeError whose message names ``seed``, lists the valid forms and says what it got.
"""

import pytest
import torch

import sdegen
from sdegen import distributed, losses, training
from sdegen.analytic import GaussianMixture
from sdegen.schedules import pilot_grid
from sdegen.sensitivity_grid import sensitivity_grid

SDE = sdegen.VPSDE()
RING = GaussianMixture.ring()
X = RING.sample(8, seed=0)
LABELS = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
SCORE = RING.score_fn(SDE)
GENERAL = ("int", "generator", "none")


def _tiny_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), SDE, prediction="eps")


def _clf(x, t):
    return torch.log(RING.responsibilities(SDE, x, t))


# name -> (seed -> a tensor the seed determines, the forms of seed the function takes)
CASES = {
    "sample": (lambda seed: sdegen.sample(SDE, RING, shape=(4, 2), method="euler_maruyama", steps=3, seed=seed),
               ("int", "tensor", "generator", "none")),
    "log_likelihood": (lambda seed: sdegen.log_likelihood(SDE, RING, X[:4], solver="rk4", steps=2, probes=1,
                                                          probe="gaussian", divergence="hutchinson",
                                                          seed=seed).log_prob,
                       ("int", "tensor", "generator", "none")),
    "inpaint": (lambda seed: sdegen.inpaint(SDE, RING, X[:4], torch.tensor([True, False]), steps=3, seed=seed),
                ("int", "tensor", "generator", "none")),
    "prior_sample": (lambda seed: SDE.prior_sample((4, 2), seed=seed), ("int", "tensor", "generator", "none")),
    "make_seeds": (lambda seed: sdegen.make_seeds(seed, 4), ("int", "tensor", "generator", "none")),
    "dsm_loss": (lambda seed: sdegen.dsm_loss(SCORE, X, sde=SDE, seed=seed, return_per_example=True), GENERAL),
    "ddpm_loss": (lambda seed: sdegen.ddpm_loss(SCORE, X, sde=SDE, seed=seed, return_per_example=True), GENERAL),
    "sliced_score_matching_loss": (lambda seed: sdegen.sliced_score_matching_loss(
        SCORE, X, sde=SDE, seed=seed, return_per_example=True).detach(), GENERAL),
    "classifier_loss": (lambda seed: sdegen.classifier_loss(_clf, SDE, X, LABELS, seed=seed,
                                                            return_per_example=True), GENERAL),
    "sample_time": (lambda seed: torch.stack(losses.sample_time(SDE, 8, seed=seed)), GENERAL),
    "drop_labels": (lambda seed: sdegen.drop_labels(LABELS, 0.5, 2, seed=seed), GENERAL),
    "GaussianMixture.sample": (lambda seed: RING.sample(4, seed=seed), GENERAL),
    "pilot_grid": (lambda seed: pilot_grid(SDE, RING, 4, (2,), batch=8, error="local", seed=seed).times, GENERAL),
    "sensitivity_grid": (lambda seed: sensitivity_grid(SDE, RING, 4, (2,), points=6, batch=8, seed=seed)[0],
                         GENERAL),
    "optimize_schedule": (lambda seed: torch.tensor(sdegen.optimize_schedule(
        SDE, RING, SDE.prior_sample((16, 2), seed=1, dtype=torch.float64), method="ddim", steps=2, subset=4,
        init="log_snr", reference=torch.zeros(16, 2, dtype=torch.float64), max_evals=1, seed=seed).loss),
        ("int", "generator")),
    "train": (lambda seed: torch.tensor(training.train(_tiny_model(), sdegen.dsm_loss, X, 2, batch_size=4,
                                                       progress=False, seed=seed).losses), ("int", "generator")),
    "sample_sharded": (lambda seed: distributed.sample_sharded(SDE, RING, shape=(4, 2), method="euler_maruyama",
                                                               steps=3, batch_size=2, seed=seed)["samples"],
                       ("int",)),
    "log_likelihood_sharded": (lambda seed: distributed.log_likelihood_sharded(
        SDE, RING, X[:4], solver="rk4", steps=2, probes=1, probe="gaussian", divergence="hutchinson",
        batch_size=2, seed=seed)["log_prob"], ("int",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_int_of_any_size_is_a_seed(name):
    """2^64 + 5 and 5 give the same draws; another int gives others (so the seed is used); no int overflows."""
    fn, _ = CASES[name]
    five = fn(5)
    torch.testing.assert_close(fn(2**64 + 5), five, rtol=0, atol=0)
    assert not torch.equal(fn(6), five)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_generator_and_none_where_the_function_takes_them(name):
    """A torch.Generator gives the draws of its state; None those of torch's global generator's state. Where a
    function does not take one (an int keeps the ranks of a sharded run together), TypeError naming seed."""
    fn, kinds = CASES[name]
    if "generator" in kinds:
        torch.testing.assert_close(fn(torch.Generator().manual_seed(3)), fn(torch.Generator().manual_seed(3)),
                                   rtol=0, atol=0)
    else:
        with pytest.raises(TypeError, match=r"^seed must be an int .*; got Generator "):
            fn(torch.Generator())
    if "none" in kinds:
        with torch.random.fork_rng():
            torch.manual_seed(3)
            first = fn(None)
            torch.manual_seed(3)
            torch.testing.assert_close(fn(None), first, rtol=0, atol=0)
    else:
        with pytest.raises(TypeError, match=r"^seed must be an int.*; got NoneType None\.$"):
            fn(None)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bad, got", [(1.5, "float 1.5"), (True, "bool True"), ("5", "str '5'")],
                         ids=["float", "bool", "str"])
def test_anything_else_is_a_type_error_naming_seed(name, bad, got):
    """Before anything is drawn: torch's global generator is left as it was."""
    fn, _ = CASES[name]
    state = torch.get_rng_state()
    with pytest.raises(TypeError, match=rf"^seed must be an int.*; got {got}\.$"):
        fn(bad)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_bool_tensor_is_not_per_example_seeds():
    """Its values are 0 and 1: as seeds, every example would share one of two streams."""
    with pytest.raises(ValueError, match=r"seed as a tensor must be an integer tensor \(not bool\)"):
        sdegen.sample(SDE, RING, shape=(4, 2), method="dpmpp_2m_sde", steps=4, seed=torch.ones(4, dtype=torch.bool))
    per_example = sdegen.sample(SDE, RING, shape=(4, 2), method="dpmpp_2m_sde", steps=4, seed=torch.arange(4))
    assert len(torch.unique(per_example, dim=0)) == 4
