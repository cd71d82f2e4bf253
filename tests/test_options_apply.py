"""An option the caller passes explicitly either takes effect or raises ValueError naming it.

Tolerances, step limits and on_failure belong to adaptive solvers, ``steps`` to fixed grids, Hutchinson probes to
the Hutchinson estimate and ``chunk_size`` to the exact divergence. Each is refused, before any model call, where it
cannot apply; left unset, every documented default holds (checked bit for bit against the explicit default).
"""

import math

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.backends import ODESolver, SDESolver, solve_augmented

SDE = sdegen.VPSDE()
RING = GaussianMixture.ring()
X_T = SDE.prior_sample((4, 2), seed=1, dtype=torch.float64)
X0 = RING.sample(4, seed=0)


def counting_score():
    """The ring's exact score, counting its calls: a refused option must cost no model call."""
    exact = RING.score_fn(SDE)
    calls = []

    def score(x, t):
        calls.append(1)
        return exact(x, t)

    return score, calls


@pytest.mark.parametrize("method, base, option, value, applies", [
    ("ode", dict(solver="rk4", steps=5), "rtol", 1e-6, "adaptive torchdiffeq"),
    ("ode", dict(solver="rk4", steps=5), "atol", 1e-6, "adaptive torchdiffeq"),
    ("ode", dict(solver="euler", steps=5), "max_steps", 1, "adaptive torchdiffeq"),
    ("ode", dict(solver="midpoint", steps=5), "on_failure", "mask", "adaptive torchdiffeq"),
    ("ode", dict(solver="rk4", steps=5), "on_failure", "raise", "adaptive torchdiffeq"),
    ("sde", dict(steps=5, seed=0), "rtol", 1e-6, "adaptive=True"),
    ("sde", dict(steps=5, seed=0), "atol", 1e-6, "adaptive=True"),
    ("sde", dict(steps=5, seed=0), "dt_min", 0.5, "adaptive=True"),
    ("sde", dict(steps=5, seed=0), "on_failure", "mask", "adaptive=True"),
])
def test_sample_refuses_adaptive_options_on_a_fixed_grid(method, base, option, value, applies):
    score, calls = counting_score()
    with pytest.raises(ValueError, match=rf"^{option}: it applies to .*{applies}.*got {option}={value!r}"):
        sdegen.sample(SDE, score, X_T, method=method, **base, **{option: value})
    assert not calls


def test_sample_adaptive_defaults_are_unchanged():
    """Unset, the adaptive options take their documented defaults: the same samples as when passed explicitly."""
    ode = sdegen.sample(SDE, RING, X_T, method="ode")
    assert torch.equal(ode, sdegen.sample(SDE, RING, X_T, method="ode", rtol=1e-5, atol=1e-5, max_steps=100_000,
                                          on_failure="raise"))
    sde = sdegen.sample(SDE, RING, X_T, method="sde", adaptive=True, seed=3)
    assert torch.equal(sde, sdegen.sample(SDE, RING, X_T, method="sde", adaptive=True, seed=3, rtol=1e-3,
                                          atol=1e-3, dt_min=1e-5, on_failure="raise"))
    solver = ODESolver()
    assert (solver.rtol, solver.atol, solver.max_steps, solver.on_failure) == (1e-5, 1e-5, 100_000, "raise")
    solver = SDESolver(adaptive=True)
    assert (solver.rtol, solver.atol, solver.dt_min, solver.on_failure) == (1e-3, 1e-3, 1e-5, "raise")
    assert repr(ODESolver("rk4")) == "ODESolver(solver='rk4')"


def test_tolerances_take_effect_where_they_apply():
    """The options accepted are used: tighter tolerances change an adaptive solve."""
    loose = sdegen.sample(SDE, RING, X_T, method="ode", rtol=1e-3, atol=1e-3)
    assert not torch.equal(loose, sdegen.sample(SDE, RING, X_T, method="ode"))


@pytest.mark.parametrize("solver, steps, nfe_per_step", [("rk4", 50, 4), ("euler", 20, 1), ("midpoint", 7, 2)])
def test_sample_info_steps_of_a_fixed_grid(solver, steps, nfe_per_step):
    """SampleInfo.steps of a fixed grid is its step count (of an adaptive solve: its accepted steps)."""
    _, info = sdegen.sample(SDE, RING, X_T, method="ode", solver=solver, steps=steps, return_info=True)
    assert info.steps == steps and info.nfe == nfe_per_step * steps
    _, info = sdegen.sample(SDE, RING, X_T, method="ode", solver=solver, return_info=True)
    assert info.steps == 100  # the fixed grid's default


LIK = dict(divergence="exact", t_min=1e-3)


@pytest.mark.parametrize("options, name, applies", [
    (dict(solver="rk4", steps=5, rtol=1e-6), "rtol", "adaptive solvers"),
    (dict(solver="rk4", steps=5, atol=1e-6), "atol", "adaptive solvers"),
    (dict(solver="euler", steps=5, max_steps=1), "max_steps", "adaptive solvers"),
    (dict(divergence="exact", probes=16), "probes", "divergence='hutchinson'"),
    (dict(divergence="exact", probe="gaussian"), "probe", "divergence='hutchinson'"),
    (dict(divergence="hutchinson", chunk_size=1), "chunk_size", "divergence='exact'"),
    (dict(adjoint_params=[torch.zeros(1)]), "adjoint_params", "adjoint=True"),
    (dict(data_range=(0.0, 1.0)), "data_range", "levels="),
    (dict(steps=5), "steps", "chooses its own steps"),
    (dict(solver="multistep", steps=5), "steps", "chooses its own steps"),
])
def test_log_likelihood_refuses_options_that_cannot_apply(options, name, applies):
    score, calls = counting_score()
    with pytest.raises(ValueError, match=rf"^{name}: .*{applies}.*leave {name} unset"):
        sdegen.log_likelihood(SDE, score, X0, **{**LIK, **options})
    assert not calls


def test_log_likelihood_refuses_the_deprecated_probe_name_under_its_own_name():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^noise: .*divergence='hutchinson'"):
        sdegen.log_likelihood(SDE, RING, X0, divergence="exact", noise="gaussian")


@pytest.mark.parametrize("steps", [True, 2.0, "4"])
def test_log_likelihood_steps_must_be_an_int(steps):
    """A bool is not a step count (True would run one step)."""
    with pytest.raises(TypeError, match=r"steps must be an int >= 1 or None; got"):
        sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=steps)


def test_log_likelihood_defaults_are_unchanged():
    """Unset options take their documented defaults: the results equal those with the defaults passed."""
    base = sdegen.log_likelihood(SDE, RING, X0, seed=0, t_min=1e-3)
    same = sdegen.log_likelihood(SDE, RING, X0, seed=0, t_min=1e-3, probes=1, probe="rademacher", rtol=1e-5,
                                 atol=1e-5, max_steps=10_000, solver="dopri5", on_failure="raise")
    assert torch.equal(base.log_prob, same.log_prob) and base.nfe == same.nfe
    exact = sdegen.log_likelihood(SDE, RING, X0, solver="multistep", **LIK)
    assert torch.equal(exact.log_prob, sdegen.log_likelihood(SDE, RING, X0, solver="multistep", rtol=1e-5,
                                                             atol=1e-5, max_steps=10_000, **LIK).log_prob)
    k = 17
    codes = torch.round((X0.clamp(-1, 1) + 1) / 2 * (k - 1)) / (k - 1) * 2 - 1
    levels = sdegen.log_likelihood(SDE, RING, codes, levels=k, seed=2, **LIK)
    assert torch.equal(levels.bpd, sdegen.log_likelihood(SDE, RING, codes, levels=k, data_range=(-1.0, 1.0), seed=2,
                                                         **LIK).bpd)


def test_log_likelihood_options_that_apply_take_effect():
    """chunk_size with the exact divergence, probes with Hutchinson and on_failure with a fixed grid are accepted;
    probes and probe change the estimate, chunk_size only how it is computed."""
    exact = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, **LIK)
    chunked = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, chunk_size=1, **LIK)
    torch.testing.assert_close(chunked.log_prob, exact.log_prob, rtol=0, atol=1e-12)
    one = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, seed=0, t_min=1e-3)
    many = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, seed=0, t_min=1e-3, probes=8)
    gauss = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, seed=0, t_min=1e-3, probe="gaussian")
    assert not torch.equal(one.log_prob, many.log_prob) and not torch.equal(one.log_prob, gauss.log_prob)
    masked = sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=4, on_failure="mask", **LIK)
    assert torch.equal(masked.log_prob, exact.log_prob) and masked.failed == []


def test_max_steps_is_an_adaptive_limit_in_sample_and_log_likelihood_alike():
    """A fixed grid takes exactly `steps` steps: max_steps is refused there by both entry points, and enforced by
    both on an adaptive solve."""
    for run in (lambda: sdegen.sample(SDE, RING, X_T, method="ode", solver="rk4", steps=5, max_steps=1),
                lambda: sdegen.log_likelihood(SDE, RING, X0, solver="rk4", steps=5, max_steps=1, **LIK)):
        with pytest.raises(ValueError, match=r"^max_steps: it applies to .*adaptive"):
            run()
    for run in (lambda: sdegen.sample(SDE, RING, X_T, method="ode", max_steps=1),
                lambda: sdegen.log_likelihood(SDE, RING, X0, max_steps=1, rtol=1e-9, atol=1e-9, **LIK)):
        with pytest.raises(sdegen.SolverError, match="max_steps=1"):
            run()


def test_solve_augmented_takes_the_options_of_its_method():
    field = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2, 3, dtype=torch.float64)
    y1, info = solve_augmented(field, y0, 0.0, 1.0, method="rk4", steps=8)
    torch.testing.assert_close(y1, y0 * math.exp(-1.0), rtol=1e-5, atol=0)
    assert info["steps"] == 8 and info["nfe"] == 32 and bool(torch.isnan(info["failed_at"]).all())
    for kwargs, name in ((dict(method="rk4", steps=8, max_steps=3), "max_steps"),
                         (dict(method="rk4", rtol=1e-3), "rtol"), (dict(method="dopri5", steps=8), "steps")):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            solve_augmented(field, y0, 0.0, 1.0, **kwargs)
    y1, info = solve_augmented(field, y0, 0.0, 1.0)
    torch.testing.assert_close(y1, y0 * math.exp(-1.0), rtol=1e-4, atol=0)
    assert info["failed_at"] is None
