"""A solver benchmark suite whose headline figures are geometric means over many problems, not one problem.

Every problem is a Gaussian mixture (exact scores at every noise level, sdegen.analytic.GaussianMixture) under one
forward SDE. The problems span the factors a step schedule could be fitted to: dimension (2, 16, 64, 256),
distance between component means (about 0.5, 5 and 40), component standard deviations from 0.01 to 1 within one
mixture, unequal weights, and seven SDEs (VP, cosine VP, sub-VP, VE with sigma_max 50 and 380, EDM, flow). Every
SDE ends at a noise level sigma(t_min) = s/m between 1e-3 and 1e-2 (VE on its SMLD levels, kernel="paper"; sub-VP at
t_min = 1e-2): lower levels round to alpha_bar = 1 in the float32 table diffusers keeps.
``--holdout-seeds`` draws fresh problems and fresh SDE parameters that no schedule was designed on.

Each deterministic sampler starts from the same x_T as a float64 torchdiffeq dopri5 solve (rtol = atol = 1e-10)
of the same probability-flow ODE, the reference; the error of a point is the Euclidean distance of its endpoint to
the reference's; a row gives the RMS and median over points, and the fraction of points whose most responsible
mixture component differs from the reference's ("flips"). Peers are driven with the same exact score, and every
model call is counted by one wrapper (NFE: calls on the benchmark batch; a pilot run's calls on its own batch are
the column pilot_nfe):

- sdegen: the recommended default (RECOMMENDED, one constant) and a few other configurations (SDEGEN_ROWS);
- diffusers: DPMSolverMultistep (2M, 3M), UniPC (bh1, bh2; order 2, 3) and DEIS (order 2, 3) on trailing,
  Karras and AYS-style spacing, each ending at sigma_min or at sigma = 0 (final_sigmas_type);
- k-diffusion (when installed; its sampling module is loaded without the package's __init__): dpmpp_2m, lms,
  heun on Karras sigmas (ending at sigma_min or 0) and dpm_adaptive at a few tolerances.

Peers solve in the sigma view of the SDE: with m = mean coefficient, s = std, y = x / m follows the variance-
exploding ODE of sigma = s / m, which every linear SDE shares with a VP SDE of the same sigma (diffusers) or with
k-diffusion's sigma parametrisation; a run ending at sigma = 0 is measured against the reference continued in the
sigma view from sigma(t_min) to 0 (dopri5, float64, rtol = atol = 1e-10). Stochastic samplers are not in this
suite: their endpoints do not follow the ODE (benchmarks/solver_steps.py measures them by distribution metrics).

    python benchmarks/suite_solvers.py --threads 1     # the suite (about 5 minutes on a 2-core machine: the
                                                       # 2026-12-02 run recorded 314 s in solver_steps_suite.md)
    python benchmarks/suite_solvers.py --quick         # a smoke run: 3 small problems (under 2 minutes)
    python benchmarks/suite_solvers.py --holdout-seeds 101,102,103,104,105   # fresh problems per seed
Writes benchmarks/results/solver_steps_suite{,_quick,_holdout}.{md,csv,json} and solver_steps_suite*.png.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import solver_steps  # noqa: E402

import sdegen  # noqa: E402
from sdegen.analytic import GaussianMixture  # noqa: E402

F64 = torch.float64
RESULTS = HERE / "results"

# The recommended default setting of sdegen: the headline rows are computed from this one constant.
RECOMMENDED = dict(method="unipc", order=2, schedule="pilot")
# further sdegen rows: label -> sdegen.sample options
SDEGEN_ROWS = {
    "sdegen dpmpp_2m (log_snr)": dict(method="dpmpp_2m", schedule="log_snr"),
    "sdegen unipc-3 (pilot)": dict(method="unipc", order=3, schedule="pilot"),
    "sdegen exp_pc-2 (pilot)": dict(method="exp_pc", order=2, schedule="pilot"),
    "sdegen exp_pc-2 (log_snr)": dict(method="exp_pc", order=2, schedule="log_snr"),
}
NFES = (10, 20)

# ---------------------------------------------------------------- the problems
# (dimension, distance between component means, SDE, endpoint points): every dimension, separation and SDE at
# least twice; a factorial design would be 84 problems
DESIGN = [
    (2, 0.5, "vp", 2000), (2, 5.0, "ve380", 2000), (2, 40.0, "edm", 2000), (2, 40.0, "subvp", 2000),
    (16, 0.5, "cosine", 2000), (16, 5.0, "flow", 2000), (16, 40.0, "ve50", 2000), (16, 5.0, "subvp", 2000),
    (64, 0.5, "edm", 1000), (64, 5.0, "vp", 1000), (64, 40.0, "flow", 1000),
    (256, 0.5, "ve50", 500), (256, 5.0, "cosine", 500), (256, 40.0, "ve380", 500),
]
QUICK = [(2, 40.0, "edm", 300), (16, 5.0, "vp", 300), (64, 0.5, "ve380", 300)]
DIMS, SEPARATIONS = (2, 16, 64, 256), (0.5, 5.0, 40.0)
SDE_KINDS = ("vp", "cosine", "subvp", "ve50", "ve380", "edm", "flow")
POINTS = {2: 2000, 16: 2000, 64: 1000, 256: 500}


class DiagonalMixture(GaussianMixture):
    """A Gaussian mixture with diagonal covariances whose component terms cost O(K d) per point instead of the
    eigenbasis rotation's O(K d^2) (the same exact density; checked against the general form on construction).
    Diagonal covariances lose nothing here: every sampler in the suite is equivariant under rotations of x."""

    def __init__(self, weights, means, variances):
        super().__init__(weights, means, variances)
        self.variances = torch.as_tensor(variances, dtype=F64)
        x = self.sample(8, seed=0)
        ref = super()._component_terms(x, None, None)
        got = self._component_terms(x, None, None)
        if not all(torch.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(ref, got)):
            raise RuntimeError("diagonal component terms disagree with the general form")

    def _component_terms(self, x, sde, t):
        xf = self._flat(x)
        m, s2 = self._coeffs(sde, t, x)
        m, s2 = m.to(xf.device), s2.to(xf.device)
        var, means = self.variances.to(xf.device), self.means.to(xf.device)
        lam = m[:, None, None] ** 2 * var[None] + s2[:, None, None]  # (B|1, K, d)
        diff = xf[:, None, :] - m[:, None, None] * means[None]
        logn = -0.5 * ((diff**2 / lam).sum(-1) + torch.log(lam).sum(-1) + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights.to(xf.device))[None] + logn, diff / lam


def suite_mixture(dim, separation, seed):
    """A mixture of 3-7 components in ``dim`` dimensions: means N(0, (separation^2 / (2 dim)) I), so two means are
    about ``separation`` apart; per-component standard deviations log-uniform in [0.01, 1] (one at 0.01 and one
    at 1), each axis scaled by a factor log-uniform in [1/2, 2] and kept in [0.01, 1]; weights proportional to
    exp(N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(3, 8, (1,), generator=g))
    w = torch.exp(torch.randn(k, generator=g, dtype=F64))
    means = separation / math.sqrt(2 * dim) * torch.randn(k, dim, generator=g, dtype=F64)
    std = torch.exp(math.log(0.01) + math.log(100.0) * torch.rand(k, generator=g, dtype=F64))
    std[0], std[1] = 0.01, 1.0
    axis = torch.exp(math.log(2.0) * (2 * torch.rand(k, dim, generator=g, dtype=F64) - 1))
    return DiagonalMixture(w, means, (std[:, None] * axis).clamp(0.01, 1.0) ** 2)


def make_sde(kind, g=None):
    """The SDE ``kind`` at its usual parameters, or (with a torch.Generator g) at parameters drawn around them."""
    u = (lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=F64))) if g is not None else None
    logu = (lambda lo, hi: math.exp(u(math.log(lo), math.log(hi)))) if g is not None else None
    if kind == "vp":
        return sdegen.VPSDE(beta_min=u(0.05, 0.2), beta_max=u(10.0, 25.0)) if g else sdegen.VPSDE()
    if kind == "cosine":
        return sdegen.CosineVPSDE(cosine_s=logu(0.004, 0.02)) if g else sdegen.CosineVPSDE()
    if kind == "subvp":  # t_min = 1e-2: sigma(t_min) ~ 2e-3 (at 1e-3 it is 1e-4, below a float32 table's reach)
        return sdegen.SubVPSDE(beta_min=u(0.05, 0.2), beta_max=u(10.0, 25.0), t_min=1e-2) if g \
            else sdegen.SubVPSDE(t_min=1e-2)
    if kind in ("ve50", "ve380"):
        smax = 50.0 if kind == "ve50" else 380.0
        # the SMLD noise levels (kernel "paper"): sampling ends at sigma_min, not at the exact kernel's
        # s(t_min) ~ 1e-4, below what a float32 diffusers table resolves (its alpha_bar rounds to 1)
        return sdegen.VESDE(sigma_min=logu(0.005, 0.02), sigma_max=smax * logu(0.7, 1.4), kernel="paper") if g \
            else sdegen.VESDE(sigma_max=smax, kernel="paper")
    if kind == "edm":
        return sdegen.EDMSDE(sigma_min=logu(0.001, 0.005), sigma_max=u(40.0, 120.0)) if g else sdegen.EDMSDE()
    if kind == "flow":
        return sdegen.FlowSDE(t_min=logu(5e-4, 3e-3)) if g else sdegen.FlowSDE()
    raise ValueError(f"unknown SDE kind {kind!r}")


def suite_problems(quick=False):
    """The fixed suite: name -> (mixture, SDE, endpoint points, description)."""
    out = {}
    for i, (dim, sep, kind, n) in enumerate(QUICK if quick else DESIGN):
        out[f"d{dim}-s{sep:g}-{kind}"] = (suite_mixture(dim, sep, seed=100 + i + (50 if quick else 0)),
                                          make_sde(kind), n, {"dim": dim, "separation": sep, "sde": kind})
    return out


def holdout_problems(seed, count):
    """``count`` fresh problems for one hold-out seed: dimension, separation and SDE kind drawn uniformly, the
    SDE's parameters drawn around their usual values (make_sde), the mixture from seed-derived seeds."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        dim = DIMS[int(torch.randint(len(DIMS), (1,), generator=g))]
        sep = SEPARATIONS[int(torch.randint(len(SEPARATIONS), (1,), generator=g))]
        kind = SDE_KINDS[int(torch.randint(len(SDE_KINDS), (1,), generator=g))]
        sde = make_sde(kind, g)
        out[f"h{seed}.{i}-d{dim}-s{sep:g}-{kind}"] = (suite_mixture(dim, sep, seed=10_000 * seed + i), sde,
                                                      POINTS[dim] // 2, {"dim": dim, "separation": sep, "sde": kind,
                                                                         "seed": seed})
    return out


# ---------------------------------------------------------------- counting and the sigma view
class Counted:
    """score(x, t) that counts its calls: on the benchmark batch (NFE) and on any other batch (a pilot run)."""

    def __init__(self, fn, batch):
        self.fn, self.batch, self.nfe, self.other = fn, batch, 0, 0

    def __call__(self, x, t, *args, **kwargs):
        if x.shape[0] == self.batch:
            self.nfe += 1
        else:
            self.other += 1
        return self.fn(x, t, *args, **kwargs)


class SigmaView:
    """The SDE's probability-flow ODE in y = x / m, sigma = s / m (the variance-exploding form every peer solves).

    denoised(y, sigma) = y + sigma^2 grad_y log p(y) = y + sigma^2 m score(m y, t(sigma)); at sigma = 0 (beyond
    t_min, where only a final step to zero evaluates nothing) the view is the data space itself."""

    def __init__(self, sde, counted):
        self.sde, self.score = sde, counted
        self.sigma_min = float(sde.sigma(torch.tensor(sde.t_min, dtype=F64)))
        self.sigma_max = float(sde.sigma(torch.tensor(sde.T, dtype=F64)))

    def t_and_m(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=F64)
        t = self.sde.t_from_sigma(sigma).clamp(0.0, self.sde.T)
        return t, self.sde.mean_coeff(t)

    def denoised(self, y, sigma):
        sigma = torch.as_tensor(sigma, dtype=F64, device="cpu").reshape(-1)[:1].reshape(())
        t, m = self.t_and_m(sigma)
        return y + sigma**2 * m * self.score(m * y, t.expand(y.shape[0]))

    def eps(self, y, sigma):
        """The noise prediction diffusers asks for: -s score = (y - denoised) / sigma."""
        t, m = self.t_and_m(sigma)
        return -self.sde.std(t) * self.score(m * y, t.expand(y.shape[0]))

    def to_y(self, x):
        return x / self.t_and_m(self.sigma_max)[1]

    def to_x(self, y, sigma_end):
        """Endpoint in the reference's space: x = m y at sigma_min; at sigma = 0 the data space, y itself."""
        return y if sigma_end == 0 else self.t_and_m(sigma_end)[1] * y


class ReferenceAt:
    """The reference continued in the sigma view from sigma(t_min) to another end level (0, or a peer's own
    sigma_min as diffusers' float32 table rounds it): dy/dsigma = -sigma grad log p_sigma(y), p_sigma = the data
    mixture convolved with N(0, sigma^2 I); dopri5 at rtol = atol = 1e-10 in float64. Returned in x = m y."""

    def __init__(self, mix, sde, ref):
        self.mix, self.sde, self.cache = mix, sde, {}
        self.view = SigmaView(sde, None)
        self.y_min = ref / self.view.t_and_m(self.view.sigma_min)[1]
        # a wide time range: dopri5's first-step probe may look past the interval's end
        self.edm = sdegen.EDMSDE(sigma_min=1e-9, sigma_max=1e4)

    def __call__(self, sigma_end):
        from torchdiffeq import odeint

        if sigma_end not in self.cache:
            rhs = lambda sig, y: -sig * self.mix.score(self.edm, y, sig.to(F64).expand(y.shape[0]).clamp_min(0.0))
            span = torch.tensor([self.view.sigma_min, sigma_end], dtype=F64, device=self.y_min.device)
            y = odeint(rhs, self.y_min, span, rtol=1e-10, atol=1e-10, method="dopri5")[-1]
            self.cache[sigma_end] = self.view.to_x(y, sigma_end)
        return self.cache[sigma_end]


# ---------------------------------------------------------------- sdegen
def sdegen_label(opts):
    name = opts["method"] + (f"-{opts['order']}" if "order" in opts else "")
    return f"sdegen {name} ({opts['schedule']})"


def run_sdegen(opts, sde, mix, x_T, nfe):
    counted = Counted(mix.score_fn(sde), x_T.shape[0])
    opts = dict(opts)
    x, info = sdegen.sample(sde, counted, x_T, steps=nfe, return_info=True, **opts)
    if counted.nfe != info.nfe or counted.other != info.pilot_nfe:
        raise RuntimeError(f"{opts}: counted {counted.nfe} + {counted.other} calls, SampleInfo says "
                           f"{info.nfe} + {info.pilot_nfe}")
    return x, counted.nfe, counted.other, None


# ---------------------------------------------------------------- diffusers
DIFFUSERS_SOLVERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc-2 bh1": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh1"}),
    "unipc-2 bh2": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "unipc-3 bh1": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),
    "unipc-3 bh2": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}),
    "deis-2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis-3": ("DEISMultistepScheduler", {"solver_order": 3}),
}
SPACINGS = {"trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}, "ays": {}}
FINALS = ("sigma_min", "zero")
# Align-Your-Steps' 10-step noise levels for Stable Diffusion 1.5 (Sabour et al. 2024); "AYS-style" spacing keeps
# their relative positions in log sigma between the SDE's sigma_max and sigma_min, log-linearly interpolated to n
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def ays_sigmas(n, sigma_min, sigma_max):
    """n + 1 decreasing noise levels from sigma_max to sigma_min on the AYS-SD1.5 shape (log-linear interpolation
    in the step index, as the AYS paper extends its 10-step schedules)."""
    ref = torch.tensor(AYS_SD15, dtype=F64).log()
    u = (ref - ref[-1]) / (ref[0] - ref[-1])  # 1 .. 0
    pos = torch.linspace(0, len(AYS_SD15) - 1, n + 1, dtype=F64)
    lo = pos.floor().long().clamp(max=len(AYS_SD15) - 2)
    frac = pos - lo
    v = u[lo] * (1 - frac) + u[lo + 1] * frac
    return torch.exp(math.log(sigma_min) + v * (math.log(sigma_max) - math.log(sigma_min)))


def diffusers_configs():
    out = {}
    for solver, (cls, opts) in DIFFUSERS_SOLVERS.items():
        for spacing in SPACINGS:
            for final in FINALS:
                if cls == "DEISMultistepScheduler" and final == "zero":
                    continue  # DEIS has no final_sigmas_type: it ends at the table's sigma_min
                out[f"diffusers {solver} {spacing} {final}"] = (cls, opts, spacing, final)
    return out


def run_diffusers(spec, sde, mix, x_T, nfe):
    cls, opts, spacing, final = spec
    import diffusers

    over = dict(opts, **SPACINGS[spacing])
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    if "final_sigmas_type" in params:
        over["final_sigmas_type"] = final
    sched = solver_steps.diffusers_scheduler(cls, over, sde, nfe)
    if spacing == "ays":  # replace the noise levels (and the timesteps that index them) after set_timesteps
        log_table = torch.log(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).to(F64)
        smin, smax = math.exp(float(log_table[0])), math.exp(float(log_table[-1]))
        sig = ays_sigmas(nfe, smin, smax)
        steps = torch.from_numpy(__import__("numpy").interp(sig[:-1].log().numpy(), log_table.numpy(),
                                                            torch.arange(len(log_table), dtype=F64).numpy()))
        end = sig[-1:] if final == "sigma_min" else torch.zeros(1, dtype=F64)
        sched.sigmas = torch.cat([sig[:-1], end]).to(sched.sigmas.dtype)
        sched.timesteps = steps.to(torch.float64)
        sched.num_inference_steps = nfe
    counted = Counted(mix.score_fn(sde), x_T.shape[0])
    view = SigmaView(sde, counted)
    sig0 = float(sched.sigmas[0])
    y = x_T / view.t_and_m(sig0)[1]
    # diffusers' VP state is y / sqrt(1 + sigma^2)
    x = y / math.sqrt(1 + sig0**2)
    for i, timestep in enumerate(sched.timesteps):
        s = float(sched.sigmas[i])
        eps = view.eps(x * math.sqrt(1 + s**2), s)
        x = sched.step(eps, timestep, x).prev_sample
    s_end = float(sched.sigmas[-1])
    if s_end != 0 and not 0.5 < s_end / view.sigma_min < 2.0:  # float32 rounding of the table: a few percent
        raise RuntimeError(f"{cls} ended at sigma {s_end} instead of sigma_min {view.sigma_min}")
    y = x * math.sqrt(1 + s_end**2)
    return view.to_x(y, s_end), counted.nfe, 0, s_end


# ---------------------------------------------------------------- k-diffusion
def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Karras et al. (2022) eq. 5: n levels from sigma_max to sigma_min, float64."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def kdiffusion_configs(kd):
    if kd is None:
        return {}
    out = {}
    for name in ("dpmpp_2m", "lms", "heun"):
        for final in FINALS:
            out[f"k-diffusion {name} karras {final}"] = (name, final, None)
    for tol in (0.1, 0.03, 0.01):
        out[f"k-diffusion dpm_adaptive tol={tol:g}"] = ("dpm_adaptive", "sigma_min", tol)
    return out


def run_kdiffusion(spec, sde, mix, x_T, nfe, kd):
    name, final, tol = spec
    counted = Counted(mix.score_fn(sde), x_T.shape[0])
    view = SigmaView(sde, counted)
    model = lambda y, sigma: view.denoised(y, sigma)
    y = view.to_y(x_T)
    if name == "dpm_adaptive":
        y = kd.sample_dpm_adaptive(model, y, view.sigma_min, view.sigma_max, rtol=tol, atol=tol, disable=True)
        return view.to_x(y, view.sigma_min), counted.nfe, 0, None
    if name == "heun":  # 2 calls a step; a final step to zero is Euler (1 call)
        steps = nfe // 2 if final == "sigma_min" else (nfe + 1) // 2
    else:
        steps = nfe
    n_levels = steps + 1 if final == "sigma_min" else steps
    sig = karras_sigmas(n_levels, view.sigma_min, view.sigma_max)
    if final == "zero":
        sig = torch.cat([sig, torch.zeros(1, dtype=F64)])
    y = getattr(kd, f"sample_{name}")(model, y, sig.to(y.device), disable=True)
    return view.to_x(y, float(sig[-1])), counted.nfe, 0, None if float(sig[-1]) else 0.0


# ---------------------------------------------------------------- one problem
def bench_problem(pname, mix, sde, n, desc, nfes, kd, device, log):
    t0 = time.time()
    x_T = sde.prior_sample((n, mix.dim), seed=1, dtype=F64).to(device)
    ref = solver_steps.reference(sde, mix, x_T)
    ref_at = ReferenceAt(mix, sde, ref)
    ref_at(0.0)
    log(f"[{pname}] {mix.n_components} components, references in {time.time() - t0:.1f} s")
    configs = [(sdegen_label(RECOMMENDED) + " [default]", "default", dict(RECOMMENDED), run_sdegen)]
    configs += [(k, "sdegen", v, run_sdegen) for k, v in SDEGEN_ROWS.items() if v != RECOMMENDED]
    configs += [(k, "diffusers", v, run_diffusers) for k, v in diffusers_configs().items()]
    configs += [(k, "k-diffusion", v, lambda *a, _kd=kd: run_kdiffusion(*a, _kd)) for k, v in
                kdiffusion_configs(kd).items()]
    rows, mix_end = [], mix.marginal(sde, sde.t_min)
    for name, family, spec, runner in configs:
        t1 = time.time()
        adaptive = "dpm_adaptive" in name
        for nfe in ((0,) if adaptive else nfes):
            row = dict(problem=pname, sampler=name, family=family, nfe_budget=nfe, **desc)
            try:
                x, used, pilot, s_end = runner(spec, sde, mix, x_T, nfe)
                # s_end None: the run ends at t_min; else at that noise level (0, or diffusers' rounded sigma_min)
                target = ref if s_end is None else ref_at(s_end)
            except Exception as exc:  # a peer that fails on a problem is recorded, not fatal
                row.update(error=f"{type(exc).__name__}: {exc}"[:200], rms=math.inf, median=math.inf, flips=1.0)
                rows.append(row)
                continue
            row.update(solver_steps.endpoint_errors(x, target, mix if s_end == 0 else mix_end),
                       nfe=used, pilot_nfe=pilot, end="t_min" if s_end is None else f"sigma={s_end:.4g}")
            if not adaptive and used > nfe:
                raise RuntimeError(f"{name} used {used} NFE in the {nfe} slot")
            rows.append(row)
        if time.time() - t1 > 5:
            log(f"[{pname}] {name}: {time.time() - t1:.1f} s")
    log(f"[{pname}] done in {time.time() - t0:.1f} s")
    return rows


# ---------------------------------------------------------------- headlines
def geomean(v):
    v = list(v)
    return math.exp(sum(math.log(max(x, 1e-300)) for x in v) / len(v)) if v and all(math.isfinite(x) for x in v) \
        else math.inf


def slot_rows(rows, nfe):
    """Rows that compete in the NFE slot: fixed-step runs of that budget, and adaptive runs that used <= nfe."""
    return [r for r in rows if (r["nfe_budget"] == nfe) or (r["nfe_budget"] == 0 and r.get("nfe", 10**9) <= nfe)]


def headline(rows, nfe, slack=1.0):
    """The default against the peers at one NFE: per-problem best peer (by RMS), the best single peer configuration
    (by geometric-mean RMS over the problems), and the counts the targets ask for (``slack``: hold-out tolerance)."""
    sel = slot_rows(rows, nfe)
    problems = list(dict.fromkeys(r["problem"] for r in sel))
    default = {r["problem"]: r for r in sel if r["family"] == "default"}
    peers = [r for r in sel if r["family"] in ("diffusers", "k-diffusion")]
    best = {p: min((r for r in peers if r["problem"] == p), key=lambda r: r["rms"]) for p in problems}
    lowest_median = {p: min(r["median"] for r in peers if r["problem"] == p) for p in problems}
    by_config = {}
    for r in peers:
        if r["nfe_budget"] == nfe:
            by_config.setdefault(r["sampler"], {})[r["problem"]] = r
    complete = {k: v for k, v in by_config.items() if len(v) == len(problems)}
    single = min(complete, key=lambda k: geomean(v["rms"] for v in complete[k].values())) if complete else None
    gd = geomean(default[p]["rms"] for p in problems)
    gb = geomean(best[p]["rms"] for p in problems)
    gs = geomean(complete[single][p]["rms"] for p in problems) if single else math.inf
    return {
        "nfe": nfe, "problems": len(problems), "default_geomean": gd, "best_peer_geomean": gb,
        "best_single": single, "best_single_geomean": gs, "ratio_best": gd / gb, "ratio_single": gd / gs,
        "rms_wins": sum(default[p]["rms"] <= slack * best[p]["rms"] for p in problems),
        "median_wins": sum(default[p]["median"] <= slack * best[p]["median"] for p in problems),
        "median_wins_lowest": sum(default[p]["median"] <= slack * lowest_median[p] for p in problems),
        "rms_wins_single": sum(default[p]["rms"] <= slack * complete[single][p]["rms"] for p in problems) if single
        else 0,
        "median_wins_single": sum(default[p]["median"] <= slack * complete[single][p]["median"] for p in problems)
        if single else 0,
        "per_problem": [{"problem": p, "default": default[p], "best": best[p], "lowest_median": lowest_median[p]}
                        for p in problems],
        "ranking": sorted(((geomean(v[p]["rms"] for p in problems), k) for k, v in complete.items())),
    }


def sdegen_geomeans(rows, nfe):
    sel = [r for r in slot_rows(rows, nfe) if r["family"] in ("default", "sdegen")]
    problems = list(dict.fromkeys(r["problem"] for r in slot_rows(rows, nfe)))
    out = {}
    for name in dict.fromkeys(r["sampler"] for r in sel):
        v = {r["problem"]: r for r in sel if r["sampler"] == name}
        if len(v) == len(problems):
            out[name] = (geomean(x["rms"] for x in v.values()), geomean(x["median"] for x in v.values()),
                         sum(x.get("pilot_nfe", 0) for x in v.values()) / len(v))
    return out


def target_lines(h, slack=1.0):
    n = h["problems"]
    tag = "" if slack == 1.0 else f" (within {slack:g}x)"
    return [f"NFE {h['nfe']}: default RMS <= best peer RMS on every problem{tag}: {h['rms_wins']}/{n} -> "
            f"{'MET' if h['rms_wins'] == n else 'NOT MET'}",
            f"NFE {h['nfe']}: geomean RMS default / best peer (per problem) = {h['ratio_best']:.2f} "
            f"(target <= {0.5 * slack:.2g}) -> {'MET' if h['ratio_best'] <= 0.5 * slack else 'NOT MET'}; against the "
            f"best single configuration ({h['best_single']}): {h['ratio_single']:.2f}, default RMS <= its RMS on "
            f"{h['rms_wins_single']}/{n}, median <= its median on {h['median_wins_single']}/{n}",
            f"NFE {h['nfe']}: default median <= best peer's median on every problem{tag}: {h['median_wins']}/{n} -> "
            f"{'MET' if h['median_wins'] == n else 'NOT MET'} (<= the lowest peer median: "
            f"{h['median_wins_lowest']}/{n})"]


def fmt(v):
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def markdown(rows, problems, meta_lines, seconds, title, slack, groups=None):
    lines = [f"# {title}", ""] + meta_lines + [f"- total runtime: {seconds:.0f} s", "",
             f"Recommended default (RECOMMENDED in benchmarks/suite_solvers.py): `{RECOMMENDED}`. Endpoint error "
             "against a float64 dopri5 solve (rtol = atol = 1e-10) of the same probability-flow ODE from the same "
             "x_T; peers driven by the same exact score, NFE counted by one wrapper. pilot_nfe: the pilot run's "
             "calls on its own 64-example batch, not in NFE. diffusers' training table: 1000 noise levels uniform in "
             "the SDE's time from t_min to T (alpha_bar = 1 / (1 + sigma^2)); a peer run that raises or returns "
             "non-finite points counts as RMS = inf (listed under Failed runs, or inf in the CSV) and is never the best "
             "peer. Runs ending at sigma = 0 (\"zero\") are measured against the reference continued to sigma = 0.",
             "", "## Problems", "",
             "| problem | dim | components | mean separation | component std (min-max) | weights (min-max) | SDE | "
             "points |", "|---|---|---|---|---|---|---|---|"]
    for name, (mix, sde, n, desc) in problems.items():
        std = mix.variances.sqrt()
        lines.append(f"| {name} | {mix.dim} | {mix.n_components} | {desc['separation']:g} (measured median "
                     f"{float(torch.pdist(mix.means).median()):.3g}) | {float(std.min()):.3g}-{float(std.max()):.3g} | "
                     f"{float(mix.weights.min()):.2f}-{float(mix.weights.max()):.2f} | {sde!r} | {n} |")
    for label, group in (groups or [("", rows)]):
        if label:
            lines += ["", f"# {label}"]
        for nfe in NFES:
            h = headline(group, nfe, slack)
            lines += ["", f"## Headline at NFE {nfe} ({h['problems']} problems)", "",
                      "| | geomean RMS | ratio default / it |", "|---|---|---|",
                      f"| default {sdegen_label(RECOMMENDED)} | {h['default_geomean']:.3g} | 1 |",
                      f"| best peer per problem | {h['best_peer_geomean']:.3g} | {h['ratio_best']:.2f} |",
                      f"| best single peer configuration: {h['best_single']} | {h['best_single_geomean']:.3g} | "
                      f"{h['ratio_single']:.2f} |", ""]
            lines += [f"- {s}" for s in target_lines(h, slack)]
            lines += ["", "| problem | default RMS | median | flips | pilot_nfe | best peer | its RMS | median | flips "
                      "| RMS ratio | lowest peer median |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for pp in h["per_problem"]:
                d, b = pp["default"], pp["best"]
                lines.append(f"| {pp['problem']} | {d['rms']:.3g} | {d['median']:.3g} | {d['flips']:.3g} | "
                             f"{d.get('pilot_nfe', 0)} | {b['sampler']} (NFE {b.get('nfe')}) | {b['rms']:.3g} | "
                             f"{b['median']:.3g} | {b['flips']:.3g} | {d['rms'] / b['rms']:.2f} | "
                             f"{pp['lowest_median']:.3g} |")
            lines += ["", f"sdegen rows at NFE {nfe} (geomean RMS, geomean median, mean pilot_nfe):", "",
                      "| sampler | geomean RMS | geomean median | pilot_nfe |", "|---|---|---|---|"]
            lines += [f"| {k} | {a:.3g} | {b:.3g} | {c:.0f} |" for k, (a, b, c) in sdegen_geomeans(group, nfe).items()]
            lines += ["", f"Peer configurations at NFE {nfe} by geomean RMS (best 12):", "",
                      "| configuration | geomean RMS |", "|---|---|"]
            lines += [f"| {k} | {g:.3g} |" for g, k in h["ranking"][:12]]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r['problem']} {r['sampler']} NFE {r['nfe_budget']}: {r['error']}"
                                               for r in failed]
    lines += ["", "All rows are in the CSV/JSON beside this file."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NFES), figsize=(7 * len(NFES), 5), squeeze=False)
    for ax, nfe in zip(axes[0], NFES):
        h = headline(rows, nfe)
        names = [pp["problem"] for pp in h["per_problem"]]
        ratio = [pp["default"]["rms"] / pp["best"]["rms"] for pp in h["per_problem"]]
        ax.barh(range(len(names)), ratio, color=["tab:green" if r <= 1 else "tab:red" for r in ratio])
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(0.5, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(title=f"NFE {nfe}: default RMS / best peer RMS (geomean {h['ratio_best']:.2f})", xlabel="ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 small problems, 300 points (a smoke run)")
    parser.add_argument("--holdout-seeds", default=None, metavar="S1,S2,...",
                        help="fresh problems (and SDE parameters) drawn per seed instead of the suite")
    parser.add_argument("--holdout", type=int, default=None, metavar="SEED", help="one hold-out seed")
    parser.add_argument("--holdout-count", type=int, default=3, help="problems drawn per hold-out seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-kdiffusion", action="store_true")
    parser.add_argument("--only", default=None, metavar="NAME,...", help="run only these problems (report: solver_steps_suite_only.*)")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from the JSON")
    args = parser.parse_args()
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [args.holdout] if args.holdout is not None else (
        [int(s) for s in args.holdout_seeds.split(",")] if args.holdout_seeds else [])
    if seeds:
        problems = {}
        for s in seeds:
            problems.update(holdout_problems(s, args.holdout_count))
        suffix, slack = "_holdout", 1.2
        title = f"Solver suite, hold-out draws (seeds {', '.join(map(str, seeds))})"
    else:
        problems = suite_problems(args.quick)
        suffix, slack = ("_quick" if args.quick else ""), 1.0
        title = "Solver suite" + (" (quick)" if args.quick else "")
    if args.only:
        problems = {k: v for k, v in problems.items() if k in args.only.split(",")}
        suffix += "_only"
    out = RESULTS / f"solver_steps_suite{suffix}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads(out.with_suffix(".json").read_text())
        rows, meta, seconds = data["rows"], data["meta"], data["seconds"]
    else:
        kd = None if args.no_kdiffusion else common.load_k_diffusion()
        log = lambda msg: print(f"{time.time() - start:7.1f}s {msg}", flush=True)
        log(f"{len(problems)} problems on {args.device}; k-diffusion {'loaded' if kd else 'not available'}")
        rows = []
        for name, (mix, sde, n, desc) in problems.items():
            rows += bench_problem(name, mix, sde, n, desc, NFES, kd, args.device, log)
        seconds = time.time() - start
        meta = common.provenance(start, device=args.device)
    groups = None
    if seeds and len(seeds) > 1:
        groups = [("All hold-out problems", rows)] + [
            (f"Hold-out seed {s}", [r for r in rows if r.get("seed") == s]) for s in seeds]
    out.with_suffix(".md").write_text(markdown(rows, problems, meta, seconds, title, slack, groups))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "meta": meta, "seconds": seconds,
                                                    "recommended": RECOMMENDED}, indent=1))
    plot(rows, RESULTS / f"solver_steps_suite{suffix}.png")
    for nfe in NFES:
        for s in target_lines(headline(rows, nfe, slack), slack):
            print(s)
    print(f"total runtime {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
