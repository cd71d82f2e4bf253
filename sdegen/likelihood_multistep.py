"""Log-likelihoods by an adaptive exponential multistep method: one evaluation of the augmented field per step.

In y = x/m against tau = log sigma = log(s/m) (increasing from data to noise) the probability-flow ODE of any
linear SDE reads (Karras et al. 2022, eq. 4, with sigma = e^tau)

    dy/dtau = y - D(y, tau),

D the denoiser E[x_0 | x_t = m y], so its linear part integrates exactly (variation of constants):

    y(tau + h) = e^h y(tau) - int_0^h e^{h - r} D(tau + r) dr.

The density follows from the instantaneous change of variables in y (Chen et al. 2018, theorem 1),
log p^y_{tau_0}(y_0) = log p^y_{tau_1}(y_1) + int div_y (y - D) dtau, and from x = m y, log p^x = log p^y - d log m
(d values per example). Collecting the terms (tau_1 - tau_0 + log(m_1/m_0) = log(s_1/s_0)):

    log p_{t_min}(x) = log p_T(x_T) + d log(s(T) / s(t_min)) - int_{tau_0}^{tau_1} div_y D(y_tau, tau) dtau,

with div_y D = m div_x D. The bracket d log(s_T/s_min) - int div_y D equals the integral of div f~ over t that the
Runge-Kutta solvers accumulate, at every time.

One step from tau to tau + h (the method of :class:`sdegen.samplers.AdaptiveMultistep`, run forward):

- predictor: the exponential Adams rule through the last k step points' denoised values (the Lagrange
  polynomial in tau integrated against e^{h - r} exactly; DPM-Solver++ multistep / DEIS on a variable grid),
  and the same polynomial through their divergences integrated plainly (an Adams-Bashforth quadrature);
- one evaluation at the predicted point: D and its divergence (a forward pass and the backward pass(es) of the
  exact divergence, or of Hutchinson probes held fixed along the solve);
- corrector: both rules again with that point added (order k + 1, the UniC idea of Zhao et al. 2023, eq. 8, and
  an Adams-Moulton quadrature), kept together with the new values (PEC mode).

The error held to rtol/atol per example is that of the augmented state (x, int div f~) as in
:func:`sdegen.log_likelihood`'s Runge-Kutta solvers: the RMS of its d + 1 error ratios, the worst example deciding
acceptance. The corrector-minus-predictor difference delta is the predictor's local error (order k + 1); the kept
corrector is one order higher, and its local error is the new point's weight in the step's rules times the error
of the values evaluated there, which the predictor's delta makes: at most (e^h - 1) delta for the state (the
newest Lagrange basis lies in [0, 1] over the step, and dD/dy -> I as the noise vanishes) and h delta for the
log-density term (``error="corrector"``, controller exponent 1/(k + 2)); ``error="predictor"`` holds delta itself.
Steps: the standard (I) controller of Runge-Kutta codes, exponent 1/(k + 2) (resp. 1/(k + 1)).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ._util import batch_time
from ._validate import check_int, check_number
from .divergence import check_differentiable_output, divergence_exact, divergence_hutchinson
from .errors import STEP_LIMIT_HINT, SolverError
from .models import Model
from .samplers.exponential import _moment_weights, exp_moments as _decay_moments
from .sde import SDE

ERRORS = ("corrector", "predictor")
_NAME = "log_likelihood (solver='multistep')"


def exp_moments(h: float, n: int) -> List[float]:
    """M_k = int_0^1 e^{h (1 - rho)} rho^k drho for k < n: the growing kernel of a step forward in tau. It is the
    decaying kernel of the samplers' exponential integrators (:func:`sdegen.samplers.exponential.exp_moments`, a
    step in u = -tau) taken over a step of -h: int_0^h e^{h - r} r^k dr = (-1)^{k+1} M^u_k(-h), and rho = r / h."""
    return [(-1) ** (k + 1) * m / h ** (k + 1) for k, m in enumerate(_decay_moments(-h, n))]


def step_weights(nodes: Sequence[float], h: float) -> Tuple[List[float], List[float]]:
    """Weights of the values at ``nodes`` (offsets from the step's start in units of h: 1 for its end, <= 0 for
    earlier points) in int_0^h e^{h - r} P(r) dr and in int_0^h P(r) dr, P their Lagrange interpolant: the
    moment equations sum_j w_j rho_j^k = h M_k (resp. h / (k + 1)), k < len(nodes)."""
    n, nodes = len(nodes), [float(rho) for rho in nodes]
    return (_moment_weights(nodes, [h * m for m in exp_moments(h, n)]),
            _moment_weights(nodes, [h / (k + 1) for k in range(n)]))


class _DenoiserDivergence:
    """(D(m y, t), div_y D) of a batch of y (B, ...): one augmented-field evaluation.

    By Tweedie's formula D(m y) = y + (s^2 / m) score(m y), so div_y D = d + (s^2 / m) div_y score(m y), d the
    dimension: the divergence is taken of the score, whose dependence on x is the network's alone. (Taken of D, a
    network run without autograd would still pass for differentiable through the term y, and its divergence
    would silently be d.) With probes v the identity's share is estimated by the same probes, (1/K) sum_k |v_k|^2,
    as the Runge-Kutta path does: at high noise the identity and the score's share nearly cancel probe by probe,
    and taking the first as exactly d while estimating the second broke that cancellation (10x the variance with
    Gaussian probes; Rademacher probes have |v|^2 = d)."""

    def __init__(self, model: Model, probes: Optional[torch.Tensor], chunk_size: Optional[int]):
        self.model, self.probes, self.chunk_size, self.nfe = model, probes, chunk_size, 0
        self.identity: Union[float, torch.Tensor, None] = None  # the identity's share of div_y D, per example

    def identity_share(self, y: torch.Tensor) -> Union[float, torch.Tensor]:
        """d for the exact divergence; the probes' mean |v_k|^2 (B,) for Hutchinson's."""
        if self.identity is None:
            self.identity = float(y[0].numel()) if self.probes is None else \
                self.probes.to(y.dtype).reshape(self.probes.shape[0], y.shape[0], -1).pow(2).sum(2).mean(0)
        return self.identity

    def __call__(self, y: torch.Tensor, t: torch.Tensor, m: float, s: float) -> Tuple[torch.Tensor, torch.Tensor]:
        self.nfe += 1

        def field(z: torch.Tensor) -> torch.Tensor:
            out = self.model.score(z * m, batch_time(t, z).to(z.dtype))
            return check_differentiable_output(out, z, "score(x, t)")

        if self.probes is None:
            score, div = divergence_exact(field, y, chunk_size=self.chunk_size, create_graph=False)
        else:
            score, div = divergence_hutchinson(field, y, self.probes, create_graph=False)
        c = s * s / m
        return y + c * score, (self.identity_share(y) + c * div).to(y.dtype)


class _Point:
    """(t, m, s, tau) at a time, as a 0-d float64 CPU tensor and Python floats."""

    def __init__(self, sde: SDE, t: torch.Tensor):
        self.t = t
        log_m, self.s = float(sde.log_mean_coeff(t)), float(sde.std(t))
        self.m, self.tau = math.exp(log_m), math.log(self.s) - log_m


def _point_at_tau(sde: SDE, tau: float) -> _Point:
    return _Point(sde, sde.t_from_log_snr(torch.tensor(-2.0 * tau, dtype=torch.float64)))


class MultistepLikelihood:
    """Adaptive exponential multistep predictor-corrector for the augmented probability-flow ODE (module docstring).

    Args:
        rtol, atol: tolerances of the augmented state (x, int div f~), per example.
        order: the predictor's largest order (1-4; the corrector's is one higher); error: "corrector" or
            "predictor", the local error held to the tolerances.
        max_steps: limit on attempted steps; h_init: the first step in tau = log sigma (default: from the
            first evaluation, Hairer, Norsett & Wanner, "Solving ODEs I", section II.4); safety, max_factor:
            the controller's safety factor and largest growth of a step (1: the steps never grow, so that with
            tolerances no step can fail they are h_init throughout, a fixed grid in log sigma).
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, order: int = 4, error: str = "corrector",
                 max_steps: int = 10_000, h_init: Optional[float] = None, safety: float = 0.9,
                 max_factor: float = 2.0):
        if isinstance(order, bool) or order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4 (the predictor's order); got {order!r}.")
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS} (the local error held to rtol/atol); got {error!r}.")
        for name, v in (("rtol", rtol), ("atol", atol)):
            check_number(v, name, lo=0.0, lo_open=True)
        check_int(max_steps, "max_steps", lo=1)
        if h_init is not None:
            check_number(h_init, "h_init", lo=0.0, lo_open=True, hint=" (a step in log sigma)")
        check_number(safety, "safety", lo=0.0, hi=1.0, lo_open=True)
        check_number(max_factor, "max_factor", lo=1.0, hint=" (the largest growth of a step; 1: steps never grow)")
        self.rtol, self.atol, self.order, self.error = float(rtol), float(atol), order, error
        self.max_steps, self.h_init, self.safety, self.max_factor = max_steps, h_init, safety, max_factor
        self.stats = {"accepted": 0, "rejected": 0, "nfe": 0}

    def solve(self, sde: SDE, model: Model, x: torch.Tensor, t_lo: float, t_hi: float,
              probes: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
              on_time: Optional[Callable[[torch.Tensor], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Integrate from t_lo to t_hi; returns (x_T of x's shape, int_{t_lo}^{t_hi} div f~ dt of shape (B,)).
        Raises :class:`SolverError` naming the examples at a non-finite value, an underflowing step or the step
        limit. ``stats`` holds the accepted and rejected steps and the evaluations."""
        field = _DenoiserDivergence(model, probes, chunk_size)
        self.stats = {"accepted": 0, "rejected": 0, "nfe": 0}
        try:
            return self._integrate(sde, field, x, t_lo, t_hi, on_time)
        finally:
            self.stats["nfe"] = field.nfe

    def _integrate(self, sde, field, x, t_lo, t_hi, on_time):
        B, d = x.shape[0], x[0].numel()
        start, end = _Point(sde, torch.tensor(t_lo, dtype=torch.float64)), _Point(sde, torch.tensor(t_hi,
                                                                                                   dtype=torch.float64))
        here, y = start, x / start.m
        big_l = x.new_zeros(B)  # int div_y D dtau so far
        d_now, div_now = field(y, here.t, here.m, here.s)
        bad = ~torch.isfinite(d_now.reshape(B, -1)).all(1) | ~torch.isfinite(div_now)
        if bool(bad.any()):
            raise self._nonfinite(bad, here, 0.0, B)
        hist = [(here.tau, d_now, div_now)]
        identity = field.identity_share(y)  # d, or the probes' estimate of it
        h = self.h_init if self.h_init is not None else self._first_step(y, d_now, here, end)
        rejected, ratios = False, None
        while end.tau - here.tau > 1e-12 * max(1.0, abs(end.tau)):
            if self.stats["accepted"] + self.stats["rejected"] >= self.max_steps:
                raise self._limit_error(ratios, here, h, B, f"max_steps={self.max_steps} steps did not reach "
                                        f"t={t_hi:g}", STEP_LIMIT_HINT, maskable=False)
            if h <= 1e-12 * max(1.0, abs(here.tau)):
                raise self._limit_error(ratios, here, h, B, "the step size underflowed")
            last = h >= end.tau - here.tau
            h = end.tau - here.tau if last else h
            nxt = end if last else _point_at_tau(sde, here.tau + h)
            y_new, l_new, delta_y, delta_l, new_point = self._step(field, y, big_l, hist, here, nxt, h)
            per = self._ratios(x_old=y * here.m, x_new=y_new * nxt.m, dx=delta_y * nxt.m,
                               l_old=identity * math.log(here.s / start.s) - big_l,
                               l_new=identity * math.log(nxt.s / start.s) - l_new, dl=delta_l, d=d)
            e = float(per.max())  # the step's one host read
            if not math.isfinite(e):
                raise self._nonfinite(~torch.isfinite(per), here, h, B)
            ratios, e = per, max(e, 1e-10)
            k = len(hist[-self.order:]) + (2 if self.error == "corrector" else 1)
            if e <= 1.0:
                self.stats["accepted"] += 1
                y, big_l, here = y_new, l_new, nxt
                hist = (hist + [new_point])[-self.order:]
                if on_time is not None:
                    on_time(here.t)
            else:
                self.stats["rejected"] += 1
            h, rejected = self._next_h(h, e, k, rejected), e > 1.0
        delta_log_prob = identity * math.log(end.s / start.s) - big_l
        return y * end.m, delta_log_prob

    def _step(self, field, y, big_l, hist, here, nxt, h):
        """Predictor, one evaluation, corrector: (y', L', corrector - predictor in y and in L, each weighted by
        the error model, and the new point's (tau, D, div), kept for an accepted step)."""
        hist = hist[-self.order:]
        nodes = [(tau - here.tau) / h for tau, _, _ in hist]
        grow = math.exp(h)
        wp, qp = step_weights(nodes, h)
        y_pred = y * grow
        for w, (_, dv, _) in zip(wp, hist):
            y_pred = y_pred - w * dv
        d_new, div_new = field(y_pred, nxt.t, nxt.m, nxt.s)
        wc, qc = step_weights([1.0] + nodes, h)
        y_corr = y * grow - wc[0] * d_new
        l_pred, l_corr = big_l.clone(), big_l + qc[0] * div_new
        for b, c, q, (_, dv, div) in zip(wc[1:], qp, qc[1:], hist):
            y_corr = y_corr - b * dv
            l_pred = l_pred + c * div
            l_corr = l_corr + q * div
        wy, wl = (math.expm1(h), h) if self.error == "corrector" else (1.0, 1.0)
        return y_corr, l_corr, (y_corr - y_pred) * wy, (l_corr - l_pred) * wl, (nxt.tau, d_new, div_new)

    def _ratios(self, x_old, x_new, dx, l_old, l_new, dl, d):
        """Per example: the RMS of the d + 1 error ratios err / (atol + rtol max(|old|, |new|)) of (x, l)."""
        sx = torch.maximum(x_old.abs(), x_new.abs()).mul_(self.rtol).add_(self.atol)
        sl = torch.maximum(l_old.abs(), l_new.abs()).mul_(self.rtol).add_(self.atol)
        sq = (dx / sx).reshape(dx.shape[0], -1).pow(2).sum(1) + (dl / sl).pow(2)
        return (sq / (d + 1)).sqrt()

    def _first_step(self, y, d0, here, end) -> float:
        """Hairer's starting step 0.01 ||x|| / ||dx/dtau|| in the error norm, per example (the smallest decides),
        at most a tenth of the span. An example whose state or field vanishes in that norm sets no bound (Hairer's
        rule then starts at 1e-6 and, growing at most 2x a step, would spend some 20 steps reaching a step the
        field allows, e.g. for a network whose output layer starts at zero): the controller rejects a step that
        is too long at the cost of one evaluation."""
        B = y.shape[0]
        scale = y.abs().mul(here.m * self.rtol).add_(self.atol)
        n0 = (y * here.m / scale).reshape(B, -1).pow(2).mean(1).sqrt()
        n1 = ((y - d0) * here.m / scale).reshape(B, -1).pow(2).mean(1).sqrt()
        h = torch.where((n0 < 1e-5) | (n1 < 1e-5), torch.full_like(n0, math.inf), 0.01 * n0 / n1.clamp_min(1e-5))
        return min(float(h.min()), 0.1 * (end.tau - here.tau))

    def _next_h(self, h: float, e: float, k: int, rejected: bool) -> float:
        """The standard controller h' = h min(max_factor, max(0.2, safety e^{-1/k})), held at h' <= h on the step
        after a rejection (Hairer, Norsett & Wanner, "Solving ODEs I", section II.4, eq. 4.13). A PI controller
        with Gustafsson's predictive cap (the adaptive sampler's) kept the error ratios at 0.1-0.4 and took
        10-25% more evaluations here (benchmarks/results/likelihood_nfe_multistep.md)."""
        factor = min(self.max_factor, max(0.2, self.safety * e ** (-1.0 / k)))
        return h * (min(factor, 1.0) if rejected and e <= 1.0 else factor)

    def _nonfinite(self, bad: torch.Tensor, at: _Point, h: float, B: int) -> SolverError:
        return SolverError(_NAME, torch.nonzero(bad.cpu()).flatten().tolist(), float(at.t), h,
                           "the state, the log-density term or the denoiser became non-finite (NaN or inf) in the "
                           "step from there", detail="the step size is in tau = log sigma", batch=B)

    def _limit_error(self, ratios, here, h, B, reason, hint=None, maskable=True):
        if ratios is None:
            bad, why = [], "no step had been attempted"
        else:
            per = ratios.detach().cpu()
            bad = torch.nonzero(per > 1.0).flatten().tolist() or [int(per.argmax())]
            why = f"their error ratios exceeded 1 in the last step attempted (worst {float(per.max()):.3g})"
        kwargs = {} if hint is None else {"hint": hint}
        return SolverError(_NAME, bad, float(here.t), h, reason, detail=f"{why}; the step size is in tau = log "
                           "sigma", batch=B, maskable=maskable, **kwargs)


__all__ = ["MultistepLikelihood", "step_weights", "exp_moments", "ERRORS"]
