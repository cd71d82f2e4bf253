"""Failures of solves: one bad example is named, and with on_failure="mask" costs no other example.

The model: the exact score of the 2-D ring (sdegen.GaussianMixture) on the first two coordinates, plus a third
"marker" coordinate whose score keeps it where it started (exactly constant along the probability-flow ODE,
driftless under the reverse SDE, so it moves only by the Brownian noise, std <= sqrt(int g^2) ~ 3.2 for VP).
Example 3 starts with marker 100, the others with 0; the score is +inf for |marker| > 50 at t < |marker| / 200
(t < 0.5 for example 3). The first
model call (at t = T) is finite, so the failure happens inside the solve.

Adaptive step control shares its steps across the batch, so the good examples of a masked run are compared
with a clean run on those 15 examples alone (not with the 16-example run): they must agree exactly.
"""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.errors import SolverError

SDE = sdegen.VPSDE()
RING = GaussianMixture.ring()
BAD, B = 3, 16
GOOD = [i for i in range(B) if i != BAD]


def marked_score(probability_flow: bool = True, fill: float = math.inf):
    """Exact ring score, a marker coordinate that stays put, and ``fill`` (+inf, or NaN) for the marked example at
    t < 0.5."""
    ring = RING.score_fn(SDE)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        f, g2 = SDE.drift_coeff(t).to(x.dtype), SDE.diffusion(t).to(x.dtype) ** 2
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))  # a network propagates NaN; the oracle refuses it
        marker = x[:, 2]
        # probability flow: dm/dt = f m - g^2 s / 2 = 0; reverse SDE: drift f m - g^2 s = 0
        s_marker = (2.0 if probability_flow else 1.0) * f * marker / g2
        out = torch.cat([ring(x[:, :2], t), s_marker[:, None]], dim=1)
        # marker 100: infinite for t < 0.5; a marker m in (50, 100) fails later, for t < m / 200
        bad = ~finite | ((marker.abs() > 50) & (t < marker.abs() / 200))
        return torch.where(bad[:, None], torch.full_like(out, fill), out)

    return score


def _start(dtype=torch.float64):
    x = SDE.prior_sample((B, 3), seed=7, dtype=dtype)
    x[:, 2] = 0.0
    x[BAD, 2] = 100.0
    return x


SAMPLE_CASES = {
    "ode": dict(method="ode"),
    "adaptive": dict(method="adaptive", rtol=1e-4, atol=1e-4),
    "adaptive_rk23": dict(method="adaptive_rk23", rtol=1e-4, atol=1e-4),
    "sde_adaptive": dict(method="sde", adaptive=True, rtol=5e-2, atol=5e-2, dt_min=1e-3),
}
SEEDS = torch.arange(100, 100 + B)


def _sample(case, x_T, seeds, **extra):
    options = dict(SAMPLE_CASES[case], **extra)
    pf = case != "sde_adaptive"
    return sdegen.sample(SDE, marked_score(pf), x_T, seed=seeds if not pf else None, return_info=True, **options)


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_failure_names_the_example(case):
    """The error is a SolverError (a RuntimeError) naming example 3, the method, the time and the step."""
    with pytest.raises(SolverError) as info:
        _sample(case, _start(), SEEDS)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.examples == [BAD]
    # the time reached lies on the path; the failing step starts there (the score is finite for t >= 0.5)
    assert SDE.t_min <= err.t <= SDE.T
    name = SAMPLE_CASES[case]["method"]
    assert f"'{name}'" in str(err) or f"{name} " in str(err)
    assert "[3]" in str(err) and "on_failure='mask'" in str(err)
    # a step size is reported (torchdiffeq's initial-step selection proposes 0 when its probe meets the inf)
    assert math.isfinite(err.step) and err.step >= 0


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_mask_keeps_the_others(case):
    """on_failure='mask': row 3 is NaN, SampleInfo.extra['failed'] == [3], and the 15 others equal, bit for bit,
    a clean run on those 15 examples alone (with their own seeds for the SDE)."""
    x_T = _start()
    x, info = _sample(case, x_T, SEEDS, on_failure="mask")
    assert info.extra["failed"] == [BAD]
    assert bool(torch.isnan(x[BAD]).all())
    clean, clean_info = _sample(case, x_T[GOOD], SEEDS[GOOD])
    assert "failed" not in clean_info.extra or clean_info.extra["failed"] == []
    assert bool(torch.isfinite(x[GOOD]).all())
    assert torch.equal(x[GOOD], clean)


def _log_likelihood(x, **options):
    return sdegen.log_likelihood(SDE, marked_score(), x, divergence="exact", rtol=1e-5, atol=1e-5, t_min=1e-3,
                                 **options)


def _data():
    x = RING.sample(B, seed=11, dtype=torch.float64)
    return torch.cat([x, torch.zeros(B, 1, dtype=torch.float64)], dim=1).index_put_(
        (torch.tensor([BAD]), torch.tensor([2])), torch.tensor([100.0], dtype=torch.float64))


def test_log_likelihood_failure_names_the_example():
    """An infinite score for example 3 (from t_min on) raises a SolverError naming example 3 instead of
    torchdiffeq's bare 'underflow in dt' assertion."""
    with pytest.raises(SolverError, match=r"log_likelihood.*examples \[3\] \(1 of 16\)") as info:
        _log_likelihood(_data())
    assert info.value.examples == [BAD] and isinstance(info.value, RuntimeError)


def test_log_likelihood_mask_keeps_the_others():
    """on_failure='mask': entry 3 is NaN, result.failed == [3], and the other 15 log-densities and latents equal
    those of a solve of the 15 alone exactly (the batch shares its steps, so that is the clean comparison)."""
    x = _data()
    res = _log_likelihood(x, on_failure="mask")
    assert res.failed == [BAD]
    assert math.isnan(float(res.log_prob[BAD])) and bool(torch.isnan(res.latent[BAD]).all())
    clean = _log_likelihood(x[GOOD])
    assert clean.failed == []
    for name in ("log_prob", "bpd", "latent", "prior_log_prob", "delta_log_prob"):
        assert torch.equal(getattr(res, name)[GOOD], getattr(clean, name)), name
    assert res.nfe > clean.nfe  # the failed attempt is counted too


def test_log_likelihood_mask_with_probes_matches_per_example_probes():
    """Hutchinson probes are drawn per example from its seed, so the masked solve of 15 examples uses the same
    probes as a clean solve of those 15 given their seeds."""
    x, seeds = _data(), torch.arange(50, 50 + B)
    res = sdegen.log_likelihood(SDE, marked_score(), x, divergence="hutchinson", seed=seeds, t_min=1e-3,
                                on_failure="mask")
    clean = sdegen.log_likelihood(SDE, marked_score(), x[GOOD], divergence="hutchinson", seed=seeds[GOOD],
                                  t_min=1e-3)
    assert res.failed == [BAD]
    assert torch.equal(res.log_prob[GOOD], clean.log_prob)


def test_second_failure_after_restart_is_set_aside_too():
    """Example 9 (marker 60) fails only at t < 0.3, after example 3 (t < 0.5): the first attempt names 3, the
    restart names 9 (an index of the sub-batch, reported in the whole batch), and the 14 others equal a clean
    run on them alone."""
    x_T = _start()
    x_T[9, 2] = 60.0
    x, info = _sample("adaptive_rk23", x_T, SEEDS, on_failure="mask")
    assert info.extra["failed"] == [3, 9]
    assert bool(torch.isnan(x[[3, 9]]).all())
    good = [i for i in range(B) if i not in (3, 9)]
    clean, _ = _sample("adaptive_rk23", x_T[good], SEEDS[good])
    assert torch.equal(x[good], clean)


def test_every_example_failing_gives_all_nan():
    x_T = _start()
    x_T[:, 2] = 100.0
    x, info = _sample("adaptive", x_T, SEEDS, on_failure="mask")
    assert info.extra["failed"] == list(range(B))
    assert bool(torch.isnan(x).all()) and x.shape == x_T.shape


def test_failed_is_empty_for_a_clean_masked_run():
    x_T = _start()
    x_T[BAD, 2] = 0.0
    x, info = _sample("ode", x_T, SEEDS, on_failure="mask")
    assert info.extra["failed"] == [] and bool(torch.isfinite(x).all())


def test_step_limit_names_the_examples_and_agrees_with_its_numbers():
    """The step limit raises SolverError (a RuntimeError, as before) naming max_steps and the examples; when it
    says the ratios exceeded 1, the worst ratio it prints is above 1. It follows from the tolerance, not from
    one example, so it raises under on_failure='mask' too (dropping examples would cascade)."""
    import re

    ring = RING.score_fn(SDE)
    x_T = SDE.prior_sample((4, 2), seed=4, dtype=torch.float64)
    for method, on_failure in (("adaptive", "raise"), ("adaptive_rk23", "raise"), ("adaptive", "mask")):
        with pytest.raises(SolverError, match="max_steps=5") as info:
            sdegen.sample(SDE, ring, x_T, method=method, rtol=1e-9, atol=1e-9, max_steps=5, on_failure=on_failure)
        msg = str(info.value)
        assert info.value.examples and all(0 <= i < 4 for i in info.value.examples)
        worst = re.search(r"(?:worst|was) ([0-9.e+-]+)", msg)
        assert worst is not None, msg
        assert ("exceeded 1" in msg) == (float(worst.group(1)) > 1.0), msg


@pytest.mark.parametrize("method, options, name", [
    ("sde", dict(adaptive=True, rtol=-1), "rtol"),
    ("sde", dict(adaptive=True, atol=0.0), "atol"),
    ("sde", dict(adaptive=True, rtol=math.nan), "rtol"),
    ("sde", dict(adaptive=True, dt_min=0), "dt_min"),
    ("sde", dict(adaptive=True, dt_min=-1e-3), "dt_min"),
    ("ode", dict(max_steps=0), "max_steps"),
    ("ode", dict(max_steps=-5), "max_steps"),
    ("ode", dict(max_steps=2.5), "max_steps"),
    ("adaptive", dict(max_steps=0), "max_steps"),
    ("adaptive_rk23", dict(max_steps=-1), "max_steps"),
    ("adaptive", dict(on_failure="skip"), "on_failure"),
    ("ode", dict(on_failure="Mask"), "on_failure"),
    ("sde", dict(adaptive=True, on_failure="nan"), "on_failure"),
])
def test_bad_solver_options_raise_naming_them(method, options, name):
    """Options that used to hang (rtol < 0 under torchsde's adaptive stepping) or were accepted (dt_min = 0,
    max_steps <= 0) raise ValueError naming the parameter before any work."""
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    error = TypeError if any(isinstance(v, float) and name == "max_steps" for v in options.values()) else ValueError
    with pytest.raises(error, match=name):  # a float count is a wrong type, as everywhere
        sdegen.sample(SDE, score, shape=(2, 2), method=method, seed=0, **options)
    assert not calls


@pytest.mark.parametrize("options, name", [(dict(max_steps=0), "max_steps"), (dict(on_failure="drop"), "on_failure")])
def test_log_likelihood_bad_failure_options(options, name):
    with pytest.raises(ValueError, match=name):
        _log_likelihood(_data(), **options)


def test_log_likelihood_step_limit_raises_under_mask():
    x = _data()[GOOD][:4]
    with pytest.raises(SolverError, match=r"max_steps=3 .*examples \["):
        _log_likelihood(x, max_steps=3, on_failure="mask")


# ------------------------------------------------------------------ a NaN score, and a failure at the first call
@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "multistep"])
def test_log_likelihood_nan_score_is_named_and_masked_like_an_infinite_one(solver):
    """A score that is NaN (not inf) for example 3 fails like an infinite one: the adaptive solvers name example 3
    in a SolverError (dopri5's starting-step rule meets the NaN too, and must not turn it into a NaN time), and
    under "mask" the others equal a solve of them alone."""
    x = _data()

    def run(z, **kw):
        return sdegen.log_likelihood(SDE, marked_score(fill=math.nan), z, divergence="exact", solver=solver,
                                     rtol=1e-5, atol=1e-5, t_min=1e-3, **kw)

    with pytest.raises(SolverError) as info:
        run(x)
    assert info.value.examples == [BAD]
    res, clean = run(x, on_failure="mask"), run(x[GOOD])
    assert res.failed == [BAD] and math.isnan(float(res.log_prob[BAD]))
    assert torch.equal(res.log_prob[GOOD], clean.log_prob) and torch.equal(res.latent[GOOD], clean.latent)


def test_sample_ode_nan_score_is_named():
    with pytest.raises(SolverError) as info:
        sdegen.sample(SDE, marked_score(fill=math.nan), _start(), method="ode")
    assert info.value.examples == [BAD] and SDE.t_min <= info.value.t <= SDE.T


def _broken_from_the_start(x_T):
    """Example 3's marker 300 makes its score infinite for t < 1.5: at every call, the first included."""
    x_T = x_T.clone()
    x_T[BAD, 2] = 300.0
    return x_T


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_failure_at_the_first_call_is_a_solver_error_and_masked(case):
    """An example whose score is infinite already at the first model call is a failure of that example like any
    other: "raise" names it in a SolverError (not the model check's ValueError for the whole batch), "mask" sets
    it aside and the others equal a run on them alone."""
    x_T = _broken_from_the_start(_start())
    with pytest.raises(SolverError) as info:
        _sample(case, x_T, SEEDS)
    assert info.value.examples == [BAD]
    x, info = _sample(case, x_T, SEEDS, on_failure="mask")
    assert info.extra["failed"] == [BAD] and bool(torch.isnan(x[BAD]).all())
    clean, _ = _sample(case, x_T[GOOD], SEEDS[GOOD])
    assert torch.equal(x[GOOD], clean)


@pytest.mark.parametrize("method, options", [("euler", dict(steps=8)), ("dpmpp_2m", dict(steps=8)),
                                             ("euler_maruyama", dict(steps=8)),
                                             ("ode", dict(solver="rk4", steps=8)), ("sde", dict(steps=8))])
def test_fixed_step_samplers_return_every_example_when_one_fails_at_the_first_call(method, options):
    """README: a fixed-step sampler returns every example; one whose score is infinite comes back non-finite and
    the others are untouched, also when it is infinite at the very first call."""
    x_T = _broken_from_the_start(_start())
    pf = method in ("euler", "dpmpp_2m", "ode")

    def run(z, seeds):
        return sdegen.sample(SDE, marked_score(pf), z, method=method, seed=seeds, **options)

    x = run(x_T, SEEDS)
    assert not bool(torch.isfinite(x[BAD]).all())
    assert torch.equal(x[GOOD], run(x_T[GOOD], SEEDS[GOOD]))


@pytest.mark.parametrize("method, options", [("euler", dict(steps=4)), ("ode", dict(solver="rk4", steps=4))])
def test_a_model_non_finite_for_every_example_at_its_first_call_raises(method, options):
    """No example has a result to keep: that is a broken model, refused with a ValueError naming it."""
    with pytest.raises(ValueError, match=r"model \(function\) returned non-finite values .*every example"):
        sdegen.sample(SDE, lambda x, t: torch.full_like(x, math.nan), _start(), method=method, **options)


# ------------------------------------------------------------------ the Gaussian-mixture oracle inside a solve
def _readme_score():
    """The README's example: the ring's exact score, infinite for far-out inputs at low noise."""
    exact = RING.score_fn(SDE)

    def score(x, t):
        broken = (t.reshape(-1, 1) < 0.5) & (x[:, :1] > 100)
        return torch.where(broken, float("inf"), exact(x, t))

    return score


@pytest.mark.parametrize("method", ["adaptive", "adaptive_rk23", "ode"])
def test_readme_failure_example_with_the_oracle(method):
    """The README's "When a solve fails" example for every adaptive method: the solver evaluates the model again
    on the failed example's non-finite state, where the oracle gives a NaN row instead of refusing the batch."""
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    x_T[3] = torch.tensor([1e4, 0.0])
    with pytest.raises(SolverError) as info:
        sdegen.sample(SDE, _readme_score(), x_T, method=method)
    assert info.value.examples == [3]
    x, info = sdegen.sample(SDE, _readme_score(), x_T, method=method, on_failure="mask", return_info=True)
    assert info.extra["failed"] == [3] and int(torch.isfinite(x).all(dim=1).sum()) == 15
    assert torch.equal(x[GOOD], sdegen.sample(SDE, _readme_score(), x_T[GOOD], method=method))


@pytest.mark.parametrize("options", [dict(), dict(solver="multistep"), dict(solver="rk4", steps=10)])
def test_log_likelihood_with_the_oracle_keeps_the_others(options):
    """log_likelihood with the raw oracle inside a score that is infinite for example 3 at high noise."""
    exact = RING.score_fn(SDE)

    def score(x, t):
        return torch.where((t.reshape(-1, 1) > 0.5) & (x[:, :1] > 5), float("inf"), exact(x, t))

    x = RING.sample(8, seed=0)
    x[3] = torch.tensor([50.0, 0.0])
    keep = [i for i in range(8) if i != 3]
    seeds = sdegen.make_seeds(0, 8)
    with pytest.raises(SolverError) as info:
        sdegen.log_likelihood(SDE, score, x, seed=seeds, **options)
    assert info.value.examples == [3]
    res = sdegen.log_likelihood(SDE, score, x, seed=seeds, on_failure="mask", **options)
    alone = sdegen.log_likelihood(SDE, score, x[keep], seed=seeds[keep], **options)
    assert res.failed == [3] and math.isnan(float(res.log_prob[3])) and bool(torch.isnan(res.latent[3]).all())
    torch.testing.assert_close(res.log_prob[keep], alone.log_prob, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ log_likelihood on a fixed grid
def test_log_likelihood_fixed_grid_names_the_failed_example_and_where():
    """rk4: example 3's score is infinite from t_min on; the SolverError names it and that time, and the others'
    finite latents are not lost to the prior's refusal of a non-finite one."""
    with pytest.raises(SolverError, match=r"'rk4'.*examples \[3\] \(1 of 16\)") as info:
        _fixed_grid_log_likelihood(_data())
    assert info.value.examples == [BAD]
    assert info.value.t == pytest.approx(1e-3) and info.value.step == pytest.approx((SDE.T - 1e-3) / 12)


def _fixed_grid_log_likelihood(x, **options):
    return sdegen.log_likelihood(SDE, marked_score(), x, divergence="exact", solver="rk4", steps=12, t_min=1e-3,
                                 **options)


def test_log_likelihood_fixed_grid_mask_returns_the_others_without_a_restart():
    """Under "mask" the failed entries are NaN, their index in result.failed, and the others are those of a solve
    of them alone; a fixed grid shares no step size, so no second solve is needed: 4 evaluations a step."""
    x = _data()
    res = _fixed_grid_log_likelihood(x, on_failure="mask")
    clean = _fixed_grid_log_likelihood(x[GOOD])
    assert res.failed == [BAD] and res.nfe == 4 * 12 and res.steps == 12
    for name in ("log_prob", "bpd", "latent", "prior_log_prob", "delta_log_prob"):
        value = getattr(res, name)
        assert bool(torch.isnan(value[BAD]).all()), name
        torch.testing.assert_close(value[GOOD], getattr(clean, name), rtol=0, atol=1e-12)
    every = _data()
    every[:, 2] = 100.0
    res = _fixed_grid_log_likelihood(every, on_failure="mask")
    assert res.failed == list(range(B)) and bool(torch.isnan(res.log_prob).all())


# ------------------------------------------------------------------ masking with per-example labels
def _guided_models(y):
    """The README's breaking score, guided by the ring's exact classifier (classes: left and right half) and by a
    classifier-free pair whose conditional branch scales the score per label: both hold one label per example."""
    score = _readme_score()
    classifier = sdegen.MixtureClassifier(RING, [[0, 1, 2, 3], [4, 5, 6, 7]], SDE)

    def conditional(x, t, y=None):
        return score(x, t) if y is None else score(x, t) * (1.0 + 0.1 * y[:, None].to(x.dtype))

    return {"classifier": sdegen.classifier_guidance(score, classifier, y=y, scale=1.0),
            "free": sdegen.classifier_free_guidance(conditional, y=y, w=1.0)}


@pytest.mark.parametrize("kind", ["classifier", "free"])
@pytest.mark.parametrize("method", ["adaptive", "ode"])
def test_mask_restricts_per_example_labels_to_the_kept_examples(kind, method):
    """A masked restart runs the kept examples with their own labels (Model.rows): each equals a run of those
    examples alone, guided by their labels."""
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    x_T[3] = torch.tensor([1e4, 0.0])
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    keep = torch.tensor([0, 1, 2, 4, 5])
    x, info = sdegen.sample(SDE, _guided_models(y)[kind], x_T, method=method, on_failure="mask", return_info=True)
    alone = sdegen.sample(SDE, _guided_models(y[keep])[kind], x_T[keep], method=method)
    assert info.extra["failed"] == [3] and bool(torch.isnan(x[3]).all())
    assert torch.equal(x[keep], alone)


@pytest.mark.parametrize("solver", [None, "multistep"])
def test_log_likelihood_mask_restricts_per_example_labels(solver):
    """The same for log_likelihood, with the exact classifier returning NaN logits on the failed state (instead of
    refusing the batch)."""
    x = RING.sample(6, seed=1)
    x[3] = torch.tensor([1e4, 0.0])
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    keep = torch.tensor([0, 1, 2, 4, 5])
    res = sdegen.log_likelihood(SDE, _guided_models(y)["classifier"], x, divergence="exact", solver=solver,
                                on_failure="mask")
    alone = sdegen.log_likelihood(SDE, _guided_models(y[keep])["classifier"], x[keep], divergence="exact",
                                  solver=solver)
    assert res.failed == [3]
    torch.testing.assert_close(res.log_prob[keep], alone.log_prob, rtol=0, atol=0)


def test_mixture_classifier_gives_nan_logits_for_non_finite_rows_only():
    classifier = sdegen.MixtureClassifier(RING, [[0, 1, 2, 3], [4, 5, 6, 7]], SDE)
    x, t = RING.sample(4, seed=2), torch.full((4,), 0.3, dtype=torch.float64)
    bad = x.clone()
    bad[1, 0] = math.nan
    logits, clean = classifier(bad, t), classifier(x, t)
    assert bool(torch.isnan(logits[1]).all())
    torch.testing.assert_close(logits[[0, 2, 3]], clean[[0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(torch.softmax(clean, 1)[:, 1],
                               RING.responsibilities(SDE, x, t)[:, 4:].sum(1), rtol=1e-12, atol=1e-12)
