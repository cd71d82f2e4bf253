"""Fixed-step samplers: each is a small object whose ``step`` advances the state from t to t_next < t.

The driver (:func:`sdegen.sample`) owns the loop, the time grid, the per-example noise stream,
NFE counting, progress bars and trajectories, so a new sampler is one class and one line in
:data:`SAMPLERS`. A step receives a :class:`Context` (the SDE, the counted score, the noise
stream) and scalar float64 times; it returns the new state and its own carried state
(a history for multistep methods, None otherwise).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._util import bcast, flat_norm
from .._validate import check_int, check_number
from .base import Context, Solver, StepSampler


class Euler(StepSampler):
    """Euler's method on the probability-flow ODE dx = [f - 1/2 g^2 s] dt (first order):
    x' = (1 + f dt) x - 1/2 g^2 dt s with dt = t' - t < 0."""

    order = 1

    def start(self, ctx, x, ts):
        # f(t) and g(t)^2 at every grid time in one vectorised call: a step then costs two tensor operations
        f, g = ctx.sde.drift_coeff(ts).tolist(), ctx.sde.diffusion(ts).tolist()
        return {t: (a, b * b) for t, a, b in zip(ts.tolist(), f, g)}

    def step(self, ctx, x, t, t_next, state):
        coeffs = state.get(float(t)) if state is not None else None
        if coeffs is None:  # a time off the grid given to start()
            return x + bcast(t_next - t, x) * ctx.sde.reverse_drift(x, t, ctx.score(x, t), True), state
        f, g2 = coeffs
        dt = float(t_next) - float(t)
        return torch.mul(x, 1.0 + f * dt).add_(ctx.score(x, t), alpha=-0.5 * g2 * dt), state


class EulerMaruyama(StepSampler):
    """Euler-Maruyama on the reverse-time SDE dx = [f - g^2 s] dt + g dw-bar (Song et al. 2021, eq. 6): weak order 1.

    Every step but the last is x' = x + [f - g^2 s] dt + g sqrt(-dt) z; the last returns the mean
    x + [f - g^2 s] dt without noise, as the paper's reference sampler does (its ``x_mean`` at the final step):
    noise of variance g^2 |dt| added at t_min is not removed by any later step and would widen every mode by it.
    Its default grid is uniform in log-SNR: uniform in t, the steps near t_min span most of the log-SNR range
    below the data's scale, and the last one is stiff for narrow modes (benchmarks/results/stochastic.md).
    """

    order = 1
    stochastic = True
    default_schedule = "log_snr"

    def start(self, ctx, x, ts):
        return len(ts) - 1  # steps left

    def step(self, ctx, x, t, t_next, state):
        g = ctx.sde.diffusion(t)
        drift = ctx.sde.reverse_drift(x, t, ctx.score(x, t), False)
        dt = t_next - t
        mean = x + bcast(dt, x) * drift
        if state == 1:  # the last step of the grid given to start()
            return mean, 0
        return mean + bcast(g * torch.sqrt(-dt), x) * ctx.randn_like(x), (None if state is None else state - 1)


class ReverseDiffusion(StepSampler):
    """Reverse-diffusion predictor x' = x - F + G^2 s + G z from the forward discretisation (F, G)
    of :meth:`SDE.discretize` (Song et al. 2021, eq. 46; DDPM/SMLD updates for VP/VE).

    The last step of the grid given to ``start`` returns its mean x - F + G^2 s, as the paper's reference
    sampler does (``x_mean`` at the final step): G^2 is the forward step's variance, not the spread of
    p_{t_min} about the mean, and noise added at t_min is never removed (with it the within-mode variance of
    the 2-D ring at 20 log-SNR steps is 1.78x the truth, without it 1.59x: the rest is the first-order bias of
    the step, benchmarks/stochastic.py).

    Its default grid is the paper's, uniform in t (the N training steps). Under SDEs whose time is their noise
    level, such as EDM's (s = t), that grid puts few steps where the data's scales are: there pass
    ``schedule="log_snr"`` (sampling a 1-D mixture's weights under EDMSDE at 400 steps is off by 5-9 standard
    errors on the uniform grid, within 2 on the log-SNR grid). Under VP, sub-VP, cosine VP and flow SDEs the
    uniform grid is the better default for this first-order sampler (mixture weights closer to exact draws on 9 of
    the 10 hold-out problems where the grids differ at 20 steps, 7 at 100;
    benchmarks/results/stochastic_reverse_diffusion.md); under VE the two coincide.
    """

    order = 1
    stochastic = True

    def start(self, ctx, x, ts):
        return len(ts) - 1  # steps left

    def step(self, ctx, x, t, t_next, state):
        F, G = ctx.sde.discretize(x, t, t_next)
        x_mean = x - F + bcast(G**2, x) * ctx.score(x, t)
        if state == 1:  # the last step of the grid given to start()
            return x_mean, 0
        return x_mean + bcast(G, x) * ctx.randn_like(x), (None if state is None else state - 1)


class Ancestral(StepSampler):
    """Ancestral sampling: x_{t'} ~ q(x_{t'} | x_t, x0_hat) with Tweedie's x0_hat (Ho et al. 2020, eq. 7;
    SMLD's ancestral rule for VE, Song et al. 2021, eq. 47).

    With the exact transition x_t = a x_{t'} + b z: mean (x + b^2 s) / a, variance b^2 s(t')^2 / s(t)^2.
    On a log-SNR grid this is DDIM with eta = 1 (see :class:`sdegen.samplers.DDIM`): Tweedie's mean stands in
    for a draw of x0, so each step misses the posterior spread of x0 and the samples are under-dispersed at
    first order in the step (and badly so on the uniform grid in t at few steps, whose last step spans most of
    the log-SNR range below the data's scale, which is why its default grid is uniform in log-SNR).
    """

    order = 1
    stochastic = True
    default_schedule = "log_snr"

    def step(self, ctx, x, t, t_next, state):
        a, b = ctx.sde.transition(t_next, t)
        var = b**2 * ctx.sde.std(t_next) ** 2 / ctx.sde.std(t) ** 2
        x_mean = (x + bcast(b**2, x) * ctx.score(x, t)) / bcast(a, x)
        return x_mean + bcast(torch.sqrt(var), x) * ctx.randn_like(x), None


def langevin_step(ctx: Context, x: torch.Tensor, t: torch.Tensor, snr: float, alpha: torch.Tensor,
                  step_rule: str = "noise_level") -> torch.Tensor:
    """One Langevin corrector step x' = x + eps s(x, t) + sqrt(2 eps) z (Song et al. 2021, algorithms 4-5).

    x is (B, ...); t a 0-d or (B,) time; alpha (0-d or (B,)) is 1 - beta_i for VP and 1 for VE. The step size:

    - ``"noise_level"``: eps = 2 alpha snr^2 s(t)^2, the same for every example. It is the paper's rule
      eps = 2 alpha (snr ||z|| / ||s||)^2 with both norms replaced by their expectations, E||z||^2 = d and
      E||s||^2 = J(p_t), the Fisher information of p_t, taken at its bound J(p_t) <= d / s(t)^2 (adding
      independent Gaussian noise of variance s^2 cannot leave more information than the noise alone has;
      equality when the data are small against s(t)). A step that does not depend on the state adds no bias
      of its own: the only error left is unadjusted Langevin's, at most a relative variance excess of
      eps / (2 v) <= alpha snr^2 in a direction of variance v >= s(t)^2.
    - ``"snr"``: the paper's rule with each example's own norms, so that examples do not couple. The step then
      grows where ||s(x)|| happens to be small, which pushes the state outwards: about +8 snr^2 / d relative
      variance per corrector step, without bound in low dimension (the ratio ||z||^2 / ||s||^2 has an
      infinite mean in 2-D).
    """
    grad = ctx.score(x, t)
    z = ctx.randn_like(x)
    if step_rule == "noise_level":
        eps = 2.0 * alpha * snr**2 * ctx.sde.std(t) ** 2
    elif step_rule == "snr":
        ratio = flat_norm(z) / flat_norm(grad).clamp_min(torch.finfo(x.dtype).tiny)
        eps = 2.0 * alpha.to(x.dtype) * (snr * ratio) ** 2
    else:
        raise ValueError(f"step_rule must be 'noise_level' or 'snr'; got {step_rule!r}.")
    return x + bcast(eps, x) * grad + bcast(torch.sqrt(2.0 * eps), x) * z


class PredictorCorrector(StepSampler):
    """Predictor-corrector sampling (Song et al. 2021, algorithm 1): ``corrector_steps`` Langevin steps at t,
    then one predictor step to t_next.

    Args:
        predictor: a sampler name (see :data:`SAMPLERS`) or a :class:`StepSampler`.
        corrector_steps: Langevin steps per time step (>= 0).
        snr: the signal-to-noise ratio r of the step rule, in (0, 1) (0.16 in the paper's CIFAR-10 VE runs): at high
            noise levels, where p_t is about Gaussian of variance s(t)^2, the step diverges from snr = 1 / sqrt(alpha)
            on (alpha <= 1, near 1 on fine grids); below 1 it contracts at every level and on every grid.
        step_rule: ``"noise_level"`` (default), eps = 2 alpha snr^2 s(t)^2 for every example, or ``"snr"``,
            the paper's eps = 2 alpha (snr ||z|| / ||s(x)||)^2 with each example's own norms
            (see :func:`langevin_step`).

    The default rule was chosen by measuring both at 1000 steps with the exact score of Gaussian mixtures
    against exact draws from p_{t_min} (benchmarks/langevin.py; the table is in benchmarks/results/langevin.md):
    on the 2-D ring the "snr" rule inflates the within-mode variance 29x (VE) and 78x (VP), the "noise_level"
    rule stays within 5%; on the 64-D mixture the "noise_level" rule is within 0.1% and the "snr" rule 9% over.
    The paper's own code averages the norms over the batch, which removes the bias but makes a sample depend on
    its batch; here example i's sample depends only on its seed.
    """

    stochastic = True
    default_schedule = "log_snr"
    step_rules = ("noise_level", "snr")

    def __init__(self, predictor: Union[str, StepSampler] = "reverse_diffusion", corrector_steps: int = 1,
                 snr: float = 0.16, step_rule: str = "noise_level"):
        from . import SAMPLERS, get_sampler

        if isinstance(predictor, str) and predictor not in SAMPLERS:
            raise ValueError(f"predictor must be a sampler name ({', '.join(sorted(SAMPLERS))}) or a StepSampler; "
                             f"got {predictor!r}.")
        self.predictor = get_sampler(predictor) if isinstance(predictor, str) else predictor
        if not isinstance(self.predictor, StepSampler):
            why = "" if not isinstance(self.predictor, Solver) else ", which chooses its own steps"
            raise TypeError(f"predictor must be a fixed-step sampler (a StepSampler or its name); got {predictor!r} "
                            f"({type(self.predictor).__name__}{why}).")
        check_int(corrector_steps, "corrector_steps", lo=0)
        if isinstance(snr, bool) or not (isinstance(snr, (int, float)) and 0 < snr < 1):
            raise ValueError(f"snr must be a number in (0, 1); got {snr!r}. A corrector step of size eps multiplies "
                             "deviations from the mean of a level where p_t is about Gaussian of variance s(t)^2 (every "
                             "high noise level) by 1 - eps / s(t)^2, with eps = 2 alpha snr^2 s(t)^2: it diverges from "
                             "snr = 1 / sqrt(alpha) on, and alpha <= 1 tends to 1 on fine grids; snr < 1 contracts at "
                             "every level and grid.")
        if not (isinstance(step_rule, str) and step_rule in self.step_rules):
            raise ValueError(f"step_rule must be one of {', '.join(map(repr, self.step_rules))}; got {step_rule!r}.")
        self.corrector_steps, self.snr, self.step_rule = corrector_steps, float(snr), step_rule
        self.nfe_per_step = self.predictor.nfe_per_step + corrector_steps
        self.order = self.predictor.order  # the corrector leaves the time discretisation to the predictor

    def start(self, ctx, x, ts):
        return self.predictor.start(ctx, x, ts)

    def total_nfe(self, steps: int) -> int:
        return self.predictor.total_nfe(steps) + steps * self.corrector_steps

    def step(self, ctx, x, t, t_next, state):
        # alpha_i = 1 - beta_i for VP (the squared transition coefficient), 1 for VE
        alpha = torch.exp(2.0 * (ctx.sde.log_mean_coeff(t) - ctx.sde.log_mean_coeff(t_next)))
        for _ in range(self.corrector_steps):
            x = langevin_step(ctx, x, t, self.snr, alpha, self.step_rule)
        return self.predictor.step(ctx, x, t, t_next, state)

    def __repr__(self) -> str:
        return (f"PredictorCorrector({self.predictor!r}, corrector_steps={self.corrector_steps}, snr={self.snr}, "
                f"step_rule={self.step_rule!r})")


class AnnealedLangevin(StepSampler):
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, algorithm 1).

    Each step runs ``steps_each`` Langevin iterations x += alpha/2 s + sqrt(alpha) z at the noise level of
    t_next, with alpha = step_lr * s(t_next)^2 / s_L^2 and s_L = s(t_min) the last level. NCSN used
    step_lr = 2e-5 with s_L = 0.01 (0.2 s_L^2); the default step_lr = 0.1 s_L^2 keeps alpha / s(t)^2 = 0.1 at
    every level, whatever t_min is. On a level where p_t is close to a Gaussian of variance s(t)^2 (every high
    noise level) an iteration multiplies deviations by 1 - step_lr / (2 s_L^2), so step_lr >= 4 s_L^2 diverges
    and is refused. NFE = steps * steps_each. It has no order in the step count: its bias is set by step_lr and
    steps_each, not by the grid.
    """

    order = 1
    stochastic = True
    default_steps = 100

    def __init__(self, steps_each: int = 10, step_lr: Optional[float] = None):
        check_int(steps_each, "steps_each", lo=1)
        step_lr = check_number(step_lr, "step_lr", lo=0.0, lo_open=True, none_ok=True)
        self.steps_each, self.step_lr, self.nfe_per_step = steps_each, step_lr, steps_each

    def start(self, ctx, x, ts):
        s_last = ctx.sde.std(ts[-1])
        lr = 0.1 * s_last**2 if self.step_lr is None else self.step_lr
        rel = lr / s_last**2  # alpha = rel * s(t)^2
        if float(rel) >= 4.0:  # host times: no device read
            raise ValueError(f"step_lr={lr:g} is {float(rel):.3g} s(t_min)^2: annealed Langevin diverges for step_lr "
                             f">= 4 s(t_min)^2 = {4.0 * float(s_last) ** 2:.3g} (s(t_min) = {float(s_last):.3g} for "
                             "this SDE and t_min); the default is 0.1 s(t_min)^2.")
        return rel

    def step(self, ctx, x, t, t_next, rel):
        alpha = rel * ctx.sde.std(t_next) ** 2
        for _ in range(self.steps_each):
            x = x + bcast(0.5 * alpha, x) * ctx.score(x, t_next) + bcast(torch.sqrt(alpha), x) * ctx.randn_like(x)
        return x, rel

    def __repr__(self) -> str:
        return f"AnnealedLangevin(steps_each={self.steps_each}, step_lr={self.step_lr})"
