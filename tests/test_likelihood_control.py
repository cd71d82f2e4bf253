"""log_likelihood's error control: accuracy against the oracle's exact log p_{t_min} across SDEs as the tolerance
tightens, per-example (not batch-average) step control, and the evaluation count it reports."""

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.likelihood import log_likelihood

SDES = {"vp": sdegen.VPSDE, "cosine": sdegen.CosineVPSDE, "edm": sdegen.EDMSDE, "flow": sdegen.FlowSDE}


def _mixture():
    return GaussianMixture.random(dim=4, n_components=3, seed=11, cov_scale=0.3)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_worst_example_error_is_a_bounded_multiple_of_the_tolerance(sde_name):
    # against the exact log p_{t_min} (the default t_min, the oracle's exact prior at T): the worst example's error
    # per dimension stays within 20 tol at tol = 1e-6, and tightening the tolerance 100-fold cuts it at least
    # 10-fold (a fifth-order pair with tolerance-proportional local error gives about 100)
    sde, gm = SDES[sde_name](), _mixture()
    x = gm.sample(6, seed=2)
    prior = gm.marginal(sde, sde.T).log_prob
    worst = {}
    for tol in (1e-4, 1e-6):
        r = log_likelihood(sde, gm, x, divergence="exact", rtol=tol, atol=tol, prior=prior)
        exact = gm.marginal(sde, r.t_min).log_prob(x)
        worst[tol] = float((r.log_prob - exact).abs().max()) / gm.dim
    assert worst[1e-6] <= 20 * 1e-6, worst
    assert worst[1e-6] <= worst[1e-4] / 10, worst


def test_steps_are_set_by_each_example_not_the_batch_average():
    # with a per-example norm (max over examples) copies of an easy example cannot loosen the steps a hard one
    # needs: the solve of {hard, easy} and of {hard, easy x 15} take the same steps and give the same numbers.
    # A batch-average norm would not: 15 copies of a small error ratio dilute the hard example's.
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x = gm.sample(5, seed=3)
    alone = [log_likelihood(sde, gm, x[i:i + 1], divergence="exact", rtol=1e-4, atol=1e-4).nfe for i in range(5)]
    hard, easy = max(range(5), key=alone.__getitem__), min(range(5), key=alone.__getitem__)
    assert alone[hard] > alone[easy]
    pair = log_likelihood(sde, gm, x[[hard, easy]], divergence="exact", rtol=1e-4, atol=1e-4)
    padded = log_likelihood(sde, gm, x[[hard] + [easy] * 15], divergence="exact", rtol=1e-4, atol=1e-4)
    assert padded.nfe == pair.nfe and padded.steps == pair.steps
    torch.testing.assert_close(padded.log_prob[:2], pair.log_prob, rtol=0, atol=1e-10)
    # the batch needs at least the steps of its hardest example alone (up to the first step's heuristic)
    assert pair.nfe >= alone[hard] - 6


def test_hutchinson_steps_are_set_by_each_example_not_the_batch_average():
    # the same with one probe per example: with per-example seeds, an example's probe (and so its log-density
    # integrand) does not depend on the batch, so 15 copies of an easy example leave the steps and the hard
    # example's estimate unchanged; its log-density term is in the per-example norm too
    sde, gm = sdegen.VPSDE(), GaussianMixture.ring()
    x, seeds = gm.sample(5, seed=3), torch.arange(100, 105)
    alone = [log_likelihood(sde, gm, x[i:i + 1], rtol=1e-4, atol=1e-4, seed=seeds[i:i + 1]).nfe for i in range(5)]
    hard, easy = max(range(5), key=alone.__getitem__), min(range(5), key=alone.__getitem__)
    assert alone[hard] > alone[easy]
    pair = log_likelihood(sde, gm, x[[hard, easy]], rtol=1e-4, atol=1e-4, seed=seeds[[hard, easy]])
    rows = [hard] + [easy] * 15
    padded = log_likelihood(sde, gm, x[rows], rtol=1e-4, atol=1e-4, seed=seeds[rows])
    assert padded.nfe == pair.nfe and padded.steps == pair.steps
    torch.testing.assert_close(padded.log_prob[:2], pair.log_prob, rtol=0, atol=1e-10)
    assert pair.nfe >= alone[hard] - 6


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_nfe_counts_every_score_evaluation(divergence):
    sde, gm = sdegen.VPSDE(), _mixture()
    exact_score, calls = gm.score_fn(sde), [0]

    def score(x, t):
        calls[0] += 1
        return exact_score(x, t)

    r = log_likelihood(sde, score, gm.sample(5, seed=1), divergence=divergence, rtol=1e-4, atol=1e-4, seed=0)
    assert r.nfe == calls[0] and r.nfe > 0
