"""Bad inputs at every public entry point: each must raise ValueError / TypeError (or a documented sdegen exception)
whose message names the parameter at fault, within a time limit, and never return NaN or be silently accepted.

The battery is one table of cases (entry point, what is wrong, a thunk, the parameter names of which the message
must contain one). :func:`outcome` classifies what a thunk did (clear error / obscure error / NaN / silently
accepted / hang), so ``python tests/test_bad_inputs.py`` prints the tally per entry point.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import pytest
import torch

import sdegen
from sdegen.analytic import GaussianMixture
from sdegen.errors import SolverError

TIME_LIMIT_S = 5  # per case; the slowest clear failure here takes well under a second
CLEAR = (ValueError, TypeError, SolverError)

VP = sdegen.VPSDE()
VE = sdegen.VESDE()
RING = GaussianMixture.ring()
NAN, INF = float("nan"), float("inf")


def x4(dtype=torch.float32):
    return torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


class Linear(torch.nn.Module):
    """A tiny float32 network net(x, t) -> (B, D)."""

    def __init__(self, d: int = 2, out=None):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.out = out

    def forward(self, x, t, *args):
        y = self.lin(x) + t[:, None].to(x.dtype)
        return self.out(y) if self.out is not None else y


def net_model(**kw):
    return sdegen.ScoreModel(Linear(), VP, **kw)


def oracle(x, t):
    return RING.score_fn(VP)(x, t)


def score_of_shape(shape_fn):
    return lambda x, t: torch.zeros(shape_fn(x), dtype=x.dtype)


F32_NET = Linear().float()


def float32_closure(x, t):  # a plain function closing over a float32 network
    return F32_NET(x, t)


class Classifier(torch.nn.Module):
    num_classes = 3

    def __init__(self, flat: bool = False):
        super().__init__()
        self.lin, self.flat = torch.nn.Linear(2, 3), flat

    def forward(self, x, t):
        out = self.lin(x.float()).to(x.dtype)
        return out[:, 0] if self.flat else out


def cond_model(x, t, y=None):
    return -x


TMP = tempfile.mkdtemp(prefix="sdegen-bad-inputs-")
atexit.register(shutil.rmtree, TMP, True)


def ckpt_file(obj) -> str:
    fd, path = tempfile.mkstemp(suffix=".pt", dir=TMP)
    os.close(fd)
    torch.save(obj, path)
    return path


def text_file() -> str:
    fd, path = tempfile.mkstemp(suffix=".pt", dir=TMP)
    with os.fdopen(fd, "w") as f:
        f.write("not a checkpoint")
    return path


@dataclass
class Case:
    entry: str
    what: str
    call: Callable[[], object]
    names: Union[str, Tuple[str, ...]]
    errors: Tuple[type, ...] = CLEAR  # the exception types that count as a clear answer


def S(**kw):
    """sample() on the ring oracle from a fixed x_T with a few steps, plus the keywords of a case."""
    args = dict(method="euler", steps=4)
    args.update(kw)
    x_T = args.pop("x_T", x4())
    score = args.pop("score", RING)
    sde = args.pop("sde", VP)
    return lambda: sdegen.sample(sde, score, x_T, **args)


def LL(**kw):
    x = kw.pop("x", x4())
    score = kw.pop("score", RING)
    sde = kw.pop("sde", VP)
    args = dict(divergence="exact", rtol=1e-3, atol=1e-3, t_min=1e-3)
    args.update(kw)
    return lambda: sdegen.log_likelihood(sde, score, x, **args)


def DSM(**kw):
    x0 = kw.pop("x0", x4())
    model = kw.pop("model", net_model())
    return lambda: sdegen.dsm_loss(model, x0, seed=0, **kw)


def OPT(**kw):
    x_T = kw.pop("x_T", x4())
    args = dict(method="euler", steps=3, max_evals=4, init="log_snr")
    args.update(kw)
    return lambda: sdegen.optimize_schedule(VP, RING, x_T, **args)


def INP(**kw):
    known = kw.pop("known", x4())
    mask = kw.pop("mask", torch.tensor([True, False]))
    args = dict(steps=4, seed=0)
    args.update(kw)
    return lambda: sdegen.inpaint(VP, RING, known, mask, **args)


def SH(**kw):
    args = dict(shape=(4, 2), method="euler", steps=3, batch_size=2)
    args.update(kw)
    return lambda: sdegen.sample_sharded(VP, RING, **args)


CASES = [
    # --- SDE constructors and their time-dependent methods
    Case("sde", "beta_min < 0", lambda: sdegen.VPSDE(beta_min=-1.0), "beta_min"),
    Case("sde", "beta_min NaN", lambda: sdegen.VPSDE(beta_min=NAN), "beta_min"),
    Case("sde", "beta_max inf", lambda: sdegen.VPSDE(beta_max=INF), "beta_max"),
    Case("sde", "beta_max < beta_min", lambda: sdegen.VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
    Case("sde", "beta_min a string", lambda: sdegen.VPSDE(beta_min="0.1"), "beta_min"),
    Case("sde", "beta_min a bool", lambda: sdegen.VPSDE(beta_min=True), "beta_min"),
    Case("sde", "VP schedule unknown", lambda: sdegen.VPSDE(schedule="cos"), "schedule"),
    Case("sde", "VP T = 0", lambda: sdegen.VPSDE(T=0.0), "T"),
    Case("sde", "VP t_min = 0", lambda: sdegen.VPSDE(t_min=0.0), "t_min"),
    Case("sde", "VP t_min > T", lambda: sdegen.VPSDE(t_min=2.0), "t_min"),
    Case("sde", "VP t_min NaN", lambda: sdegen.VPSDE(t_min=NAN), "t_min"),
    Case("sde", "subVP beta_min < 0", lambda: sdegen.SubVPSDE(beta_min=-1.0), "beta_min"),
    Case("sde", "cosine schedule linear", lambda: sdegen.CosineVPSDE(schedule="linear"), "schedule"),
    Case("sde", "VE sigma_min = 0", lambda: sdegen.VESDE(sigma_min=0.0), "sigma_min"),
    Case("sde", "VE sigma_min < 0", lambda: sdegen.VESDE(sigma_min=-1.0), "sigma_min"),
    Case("sde", "VE sigma_max NaN", lambda: sdegen.VESDE(sigma_max=NAN), "sigma_max"),
    Case("sde", "VE sigma_max < sigma_min", lambda: sdegen.VESDE(sigma_min=10.0, sigma_max=1.0), "sigma_max"),
    Case("sde", "VE kernel unknown", lambda: sdegen.VESDE(kernel="x"), "kernel"),
    Case("sde", "VE T < 0", lambda: sdegen.VESDE(T=-1.0), "T"),
    Case("sde", "EDM sigma_min = 0", lambda: sdegen.EDMSDE(sigma_min=0.0), "sigma_min"),
    Case("sde", "EDM sigma_min a string", lambda: sdegen.EDMSDE(sigma_min="a"), "sigma_min"),
    Case("sde", "flow T > 1", lambda: sdegen.FlowSDE(T=1.5), "T"),
    Case("sde", "flow t_min = 0", lambda: sdegen.FlowSDE(t_min=0.0), "t_min"),
    Case("sde", "discrete table of one", lambda: sdegen.DiscreteVPSDE([0.5]), "alphas_cumprod"),
    Case("sde", "discrete table increasing", lambda: sdegen.DiscreteVPSDE([0.5, 0.9]), "alphas_cumprod"),
    Case("sde", "discrete table NaN", lambda: sdegen.DiscreteVPSDE(torch.tensor([0.9, NAN])), "alphas_cumprod"),
    Case("sde", "marginal at t > T", lambda: VP.marginal_prob(x4(), 2.0), "t"),
    Case("sde", "marginal at t NaN", lambda: VP.marginal_prob(x4(), NAN), "t"),
    Case("sde", "std at t a string", lambda: VP.std("0.5"), "t"),
    Case("sde", "prior_sample B = 0", lambda: VP.prior_sample((0, 2)), "shape"),
    # --- ScoreModel and as_model
    Case("model", "sde a string", lambda: sdegen.ScoreModel(Linear(), "VP"), "sde"),
    Case("model", "net not callable", lambda: sdegen.ScoreModel(42, VP), "net"),
    Case("model", "prediction unknown", lambda: net_model(prediction="noise"), "prediction"),
    Case("model", "time_input unknown", lambda: net_model(time_input="steps"), "time_input"),
    Case("model", "num_steps 1", lambda: net_model(time_input="index", num_steps=1), "num_steps"),
    Case("model", "num_steps 2.5", lambda: net_model(time_input="index", num_steps=2.5), "num_steps"),
    Case("model", "timestep without a discrete SDE", lambda: net_model(time_input="timestep"), "time_input"),
    Case("model", "scale_input a string", lambda: net_model(scale_input="yes"), "scale_input"),
    Case("model", "sigma_data 0", lambda: net_model(prediction="edm", sigma_data=0.0), "sigma_data"),
    Case("model", "sigma_data NaN", lambda: net_model(prediction="edm", sigma_data=NAN), "sigma_data"),
    Case("model", "preconditioning unknown", lambda: net_model(prediction="edm", preconditioning="x"),
         "preconditioning"),
    Case("model", "M 0", lambda: net_model(prediction="edm", preconditioning="vp", M=0), "M"),
    Case("model", "M 2.5", lambda: net_model(prediction="edm", preconditioning="vp", M=2.5), "M"),
    Case("model", "as_model of an int", lambda: sdegen.as_model(42, VP), ("score", "model")),
    Case("model", "as_model sde a string", lambda: sdegen.as_model(oracle, "VP"), "sde"),
    Case("model", "as_model under another SDE", lambda: sdegen.as_model(net_model(), VE), "sde"),
    Case("model", "score at t > T", lambda: net_model().score(x4(), 2.0), "t"),
    Case("model", "score with a (3,) time for B = 4", lambda: net_model().score(x4(), torch.full((3,), 0.5)), "t"),
    Case("model", "network output of the wrong shape",
         lambda: sdegen.ScoreModel(Linear(out=lambda y: y[:, :1]), VP).score(x4(), 0.5), "net"),
    Case("model", "network returns a tuple",
         lambda: sdegen.ScoreModel(Linear(out=lambda y: (y,)), VP).score(x4(), 0.5), "net"),
    Case("model", "score of an int state", lambda: net_model().score(torch.ones(4, 2, dtype=torch.int64), 0.5), "x"),
    # --- sample: arguments
    Case("sample", "sde a string", S(sde="VP"), "sde"),
    Case("sample", "score an int", S(score=42), ("score", "model")),
    Case("sample", "method unknown", S(method="foo"), "method"),
    Case("sample", "method an int", S(method=3), "method"),
    Case("sample", "steps 0", S(steps=0), "steps"),
    Case("sample", "steps 2.5", S(steps=2.5), "steps"),
    Case("sample", "steps True", S(steps=True), "steps"),
    Case("sample", "t_min 0", S(t_min=0.0), "t_min"),
    Case("sample", "t_min > T", S(t_min=2.0), "t_min"),
    Case("sample", "t_min NaN", S(t_min=NAN), "t_min"),
    Case("sample", "t_min a string", S(t_min="0.01"), "t_min"),
    Case("sample", "schedule unknown", S(schedule="cosine"), "schedule"),
    Case("sample", "schedule with NaN", S(schedule=torch.tensor([1.0, NAN, 0.01], dtype=torch.float64)), "schedule"),
    Case("sample", "schedule increasing", S(schedule=torch.tensor([0.01, 0.5, 1.0])), "schedule"),
    Case("sample", "schedule 2-D", S(schedule=torch.ones(2, 2)), "schedule"),
    Case("sample", "schedule past T", S(schedule=torch.tensor([2.0, 0.5, 0.01])), "schedule"),
    Case("sample", "schedule tensor with t_min", S(schedule=torch.tensor([1.0, 0.5, 0.01]), t_min=0.1), "t_min"),
    Case("sample", "schedule tensor with steps", S(schedule=torch.tensor([1.0, 0.5, 0.01]), steps=10), "steps"),
    Case("sample", "schedule a list", S(schedule=[1.0, 0.5, 0.01]), "schedule"),
    Case("sample", "seed a string", S(method="euler_maruyama", seed="a"), "seed"),
    Case("sample", "seed a float", S(method="euler_maruyama", seed=1.5), "seed"),
    Case("sample", "seed tensor of the wrong length", S(method="euler_maruyama", seed=torch.arange(3)), "seed"),
    Case("sample", "noise unknown", S(noise="white"), "noise"),
    Case("sample", "denoise 'no'", S(denoise="no"), "denoise"),
    Case("sample", "progress 'yes'", S(progress="yes"), "progress"),
    Case("sample", "return_info 1", S(return_info=1), "return_info"),
    Case("sample", "return_trajectory None", S(return_trajectory=None), "return_trajectory"),
    Case("sample", "dtype int32 with shape", S(x_T=None, shape=(4, 2), dtype=torch.int32), "dtype"),
    Case("sample", "dtype float16 with shape", S(x_T=None, shape=(4, 2), dtype=torch.float16), "dtype"),
    Case("sample", "dtype int32 with x_T", S(dtype=torch.int32), "dtype"),
    Case("sample", "dtype float64 with a float32 x_T", S(dtype=torch.float64), "dtype"),
    Case("sample", "dtype a string", S(x_T=None, shape=(4, 2), dtype="float32"), "dtype"),
    Case("sample", "x_T float16", S(x_T=x4(torch.float16)), "x_T"),
    Case("sample", "x_T bfloat16", S(x_T=x4(torch.bfloat16)), "x_T"),
    Case("sample", "x_T int", S(x_T=torch.ones(4, 2, dtype=torch.int64)), "x_T"),
    Case("sample", "x_T with inf", S(x_T=torch.tensor([[0.0, INF], [0.0, 0.0]])), "x_T"),
    Case("sample", "x_T with -inf", S(x_T=torch.tensor([[0.0, -INF], [0.0, 0.0]])), "x_T"),
    Case("sample", "x_T with NaN", S(x_T=torch.tensor([[0.0, NAN], [0.0, 0.0]])), "x_T"),
    Case("sample", "x_T a list", S(x_T=[[0.0, 1.0]]), "x_T"),
    Case("sample", "x_T 0-d", S(x_T=torch.tensor(1.0)), "x_T"),
    Case("sample", "x_T empty batch", S(x_T=torch.zeros(0, 2)), "x_T"),
    Case("sample", "no x_T and no shape", S(x_T=None), "shape"),
    Case("sample", "shape with 0", S(x_T=None, shape=(0, 2)), "shape"),
    Case("sample", "shape with -1", S(x_T=None, shape=(4, -1)), "shape"),
    Case("sample", "shape with a float", S(x_T=None, shape=(2.5, 2)), "shape"),
    Case("sample", "shape an int", S(x_T=None, shape=4), "shape"),
    Case("sample", "shape disagrees with x_T", S(shape=(3, 2)), "shape"),
    Case("sample", "unknown option for euler", S(snr=0.1), "snr"),
    Case("sample", "option with a sampler object", S(method=sdegen.Euler(), snr=0.1), "snr"),
    # --- sample: the model's output, checked at its first call
    Case("sample", "score (B, 1) under euler", S(score=score_of_shape(lambda x: (x.shape[0], 1))), "model"),
    Case("sample", "score (1, D) under euler", S(score=score_of_shape(lambda x: (1,) + x.shape[1:])), "model"),
    Case("sample", "score (B, 1) under euler_maruyama",
         S(method="euler_maruyama", seed=0, score=score_of_shape(lambda x: (x.shape[0], 1))), "model"),
    Case("sample", "score (1, D) under euler_maruyama",
         S(method="euler_maruyama", seed=0, score=score_of_shape(lambda x: (1,) + x.shape[1:])), "model"),
    Case("sample", "score (B, 1) under ode", S(method="ode", steps=None, score=score_of_shape(lambda x: (x.shape[0], 1))),
         "model"),
    Case("sample", "score (1, D) under ode", S(method="ode", steps=None,
                                               score=score_of_shape(lambda x: (1,) + x.shape[1:])), "model"),
    Case("sample", "score (B, 1) under dpmpp_2m", S(method="dpmpp_2m", score=score_of_shape(lambda x: (x.shape[0], 1))),
         "model"),
    Case("sample", "score (B, 1) under sde", S(method="sde", seed=0, score=score_of_shape(lambda x: (x.shape[0], 1))),
         "model"),
    Case("sample", "score (B, 1) under adaptive", S(method="adaptive", steps=None,
                                                    score=score_of_shape(lambda x: (x.shape[0], 1))), "model"),
    Case("sample", "score returns NaN", S(score=lambda x, t: torch.full_like(x, NAN)), "model"),
    Case("sample", "score returns a list", S(score=lambda x, t: [0.0]), "model"),
    Case("sample", "score returns an int tensor", S(score=lambda x, t: torch.zeros(x.shape, dtype=torch.int64)),
         "model"),
    Case("sample", "float64 state with a float32 network in a closure", S(x_T=x4(torch.float64), score=float32_closure),
         "model"),
    # --- sample: solver options
    Case("sample", "ode rtol -1", S(method="ode", steps=None, rtol=-1.0), "rtol"),
    Case("sample", "ode atol 0", S(method="ode", steps=None, atol=0.0), "atol"),
    Case("sample", "ode max_steps 0", S(method="ode", steps=None, max_steps=0), "max_steps"),
    Case("sample", "ode max_steps -5", S(method="ode", steps=None, max_steps=-5), "max_steps"),
    Case("sample", "ode solver unknown", S(method="ode", steps=None, solver="rk45"), "solver"),
    Case("sample", "ode (adaptive) with steps", S(method="ode", steps=10), "steps"),
    Case("sample", "ode on_failure unknown", S(method="ode", steps=None, on_failure="skip"), "on_failure"),
    Case("sample", "ode options not a dict", S(method="ode", steps=None, options=3), "options"),
    Case("sample", "sde adaptive rtol -1", S(method="sde", steps=None, seed=0, adaptive=True, rtol=-1.0), "rtol"),
    Case("sample", "sde adaptive dt_min 0", S(method="sde", steps=None, seed=0, adaptive=True, dt_min=0.0), "dt_min"),
    Case("sample", "sde adaptive 'yes'", S(method="sde", steps=None, seed=0, adaptive="yes"), "adaptive"),
    Case("sample", "sde solver unknown", S(method="sde", steps=None, seed=0, solver="rk4"), "solver"),
    Case("sample", "sde adaptive with steps", S(method="sde", steps=10, seed=0, adaptive=True), "steps"),
    Case("sample", "adaptive rtol -1", S(method="adaptive", steps=None, rtol=-1.0), "rtol"),
    Case("sample", "adaptive max_steps 0", S(method="adaptive", steps=None, max_steps=0), "max_steps"),
    Case("sample", "adaptive safety 2", S(method="adaptive", steps=None, safety=2.0), "safety"),
    Case("sample", "adaptive h_init -1", S(method="adaptive", steps=None, h_init=-1.0), "h_init"),
    Case("sample", "adaptive with steps", S(method="adaptive", steps=10), "steps"),
    Case("sample", "adaptive_rk23 order 2.0", S(method="adaptive_rk23", steps=None, order=2.0), "order"),
    Case("sample", "adaptive_rk23 order 4", S(method="adaptive_rk23", steps=None, order=4), "order"),
    Case("sample", "adaptive_rk23 max_factor 1", S(method="adaptive_rk23", steps=None, max_factor=1.0), "max_factor"),
    Case("sample", "pc snr -1", S(method="pc", seed=0, snr=-1.0), "snr"),
    Case("sample", "pc snr NaN", S(method="pc", seed=0, snr=NAN), "snr"),
    Case("sample", "pc snr True", S(method="pc", seed=0, snr=True), "snr"),
    Case("sample", "pc snr 2 (diverges)", S(method="pc", seed=0, snr=2.0), "snr"),
    Case("sample", "pc corrector_steps -1", S(method="pc", seed=0, corrector_steps=-1), "corrector_steps"),
    Case("sample", "pc corrector_steps 1.5", S(method="pc", seed=0, corrector_steps=1.5), "corrector_steps"),
    Case("sample", "pc corrector_steps True", S(method="pc", seed=0, corrector_steps=True), "corrector_steps"),
    Case("sample", "pc predictor unknown", S(method="pc", seed=0, predictor="foo"), "predictor"),
    Case("sample", "annealed_langevin steps_each 0", S(method="annealed_langevin", seed=0, steps_each=0), "steps_each"),
    Case("sample", "annealed_langevin step_lr -1", S(method="annealed_langevin", seed=0, step_lr=-1.0), "step_lr"),
    Case("sample", "ddim eta -1", S(method="ddim", eta=-1.0), "eta"),
    Case("sample", "ddim eta NaN", S(method="ddim", eta=NAN), "eta"),
    Case("sample", "dpm_solver order 2.0", S(method="dpm_solver", order=2.0), "order"),
    Case("sample", "dpm_solver order 5", S(method="dpm_solver", order=5), "order"),
    Case("sample", "exp_pc order 2.0", S(method="exp_pc", order=2.0), "order"),
    Case("sample", "exp_adams predictor_order 2.0", S(method="exp_adams", predictor_order=2.0), "predictor_order"),
    Case("sample", "heun s_churn -1", S(method="heun", s_churn=-1.0), "s_churn"),
    Case("sample", "heun s_churn NaN", S(method="heun", s_churn=NAN), "s_churn"),
    Case("sample", "euler_ancestral eta -1", S(method="euler_ancestral", seed=0, eta=-1.0), "eta"),
    Case("sample", "dpmpp_2m lower_order_final 'no'", S(method="dpmpp_2m", lower_order_final="no"),
         "lower_order_final"),
    # --- schedules and grids
    Case("schedules", "time_grid steps 0", lambda: sdegen.time_grid(VP, 0), "steps"),
    Case("schedules", "time_grid steps 2.0", lambda: sdegen.time_grid(VP, 2.0), "steps"),
    Case("schedules", "time_grid rho 0", lambda: sdegen.time_grid(VP, 5, "edm", rho=0), "rho"),
    Case("schedules", "time_grid rho NaN", lambda: sdegen.time_grid(VP, 5, "edm", rho=NAN), "rho"),
    Case("schedules", "time_grid schedule unknown", lambda: sdegen.time_grid(VP, 5, "cosine"), "schedule"),
    Case("schedules", "time_grid t_min NaN", lambda: sdegen.time_grid(VP, 5, t_min=NAN), "t_min"),
    Case("schedules", "time_grid t_max > T", lambda: sdegen.time_grid(VP, 5, t_max=2.0), "t_max"),
    Case("schedules", "time_grid t_min a string", lambda: sdegen.time_grid(VP, 5, t_min="0.1"), "t_min"),
    Case("schedules", "time_grid sde a string", lambda: sdegen.time_grid("VP", 5), "sde"),
    Case("schedules", "explicit grid with NaN", lambda: sdegen.time_grid(VP, 2, torch.tensor([1.0, NAN, 0.1])),
         "schedule"),
    Case("schedules", "explicit grid not decreasing", lambda: sdegen.time_grid(VP, 2, torch.tensor([0.1, 0.5])),
         "schedule"),
    Case("schedules", "refine_grid factor 0", lambda: sdegen.refine_grid(VP, torch.tensor([1.0, 0.1]), 0), "factor"),
    Case("schedules", "refine_grid factor 2.0", lambda: sdegen.refine_grid(VP, torch.tensor([1.0, 0.1]), 2.0),
         "factor"),
    Case("schedules", "refine_grid of a NaN grid", lambda: sdegen.refine_grid(VP, torch.tensor([1.0, NAN])), "ts"),
    # --- log_likelihood
    Case("likelihood", "x with inf", LL(x=torch.tensor([[0.0, INF]])), "x"),
    Case("likelihood", "x with NaN", LL(x=torch.tensor([[0.0, NAN]])), "x"),
    Case("likelihood", "x int", LL(x=torch.ones(2, 2, dtype=torch.int64)), "x"),
    Case("likelihood", "x float16", LL(x=x4(torch.float16)), "x"),
    Case("likelihood", "sde a string", LL(sde="VP"), "sde"),
    Case("likelihood", "score an int", LL(score=42), ("score", "model")),
    Case("likelihood", "rtol -1", LL(rtol=-1.0), "rtol"),
    Case("likelihood", "atol NaN", LL(atol=NAN), "atol"),
    Case("likelihood", "max_steps 0", LL(max_steps=0), "max_steps"),
    Case("likelihood", "max_steps True", LL(max_steps=True), "max_steps"),
    Case("likelihood", "divergence unknown", LL(divergence="trace"), "divergence"),
    Case("likelihood", "probes 0", LL(divergence="hutchinson", probes=0), "probes"),
    Case("likelihood", "probe unknown", LL(divergence="hutchinson", probe="uniform"), "probe"),
    Case("likelihood", "solver unknown", LL(solver="rk45"), "solver"),
    Case("likelihood", "t_min 0", LL(t_min=0.0), "t_min"),
    Case("likelihood", "t_min NaN", LL(t_min=NAN), "t_min"),
    Case("likelihood", "steps 0 for rk4", LL(solver="rk4", steps=0), "steps"),
    Case("likelihood", "steps with dopri5", LL(steps=10), "steps"),
    Case("likelihood", "on_failure unknown", LL(on_failure="skip"), "on_failure"),
    Case("likelihood", "levels 1", LL(levels=1), "levels"),
    Case("likelihood", "data_range reversed", LL(levels=256, data_range=(1.0, -1.0)), "data_range"),
    Case("likelihood", "chunk_size 0", LL(chunk_size=0), "chunk_size"),
    Case("likelihood", "adjoint 'yes'", LL(adjoint="yes"), "adjoint"),
    Case("likelihood", "prior of the wrong shape", LL(prior=lambda z: z.sum()), "prior"),
    Case("likelihood", "score (B, 1)", LL(score=lambda x, t: x[:, :1] * 0), ("score", "model")),
    Case("likelihood", "seed a string", LL(seed="a"), "seed"),
    # --- losses
    Case("losses", "dsm t = 0", DSM(t=0.0), "t"),
    Case("losses", "dsm t > T", DSM(t=2.0), "t"),
    Case("losses", "dsm t NaN", DSM(t=NAN), "t"),
    Case("losses", "dsm x0 with inf", DSM(x0=torch.tensor([[0.0, INF]])), "x0"),
    Case("losses", "dsm x0 int", DSM(x0=torch.ones(2, 2, dtype=torch.int64)), "x0"),
    Case("losses", "dsm weighting unknown", DSM(weighting="snr"), "weighting"),
    Case("losses", "dsm reduce unknown", DSM(reduce="max"), "reduce"),
    Case("losses", "dsm t_min 0", DSM(t_min=0.0), "t_min"),
    Case("losses", "dsm importance_sampling 'yes'", DSM(importance_sampling="yes"), "importance_sampling"),
    Case("losses", "dsm seed a float", lambda: sdegen.dsm_loss(net_model(), x4(), seed=1.5), "seed"),
    Case("losses", "dsm plain callable without sde", DSM(model=oracle), "sde"),
    Case("losses", "dsm model output (B, 1)",
         DSM(model=sdegen.ScoreModel(lambda x, t: x[:, :1], VP, prediction="score")), ("net", "model")),
    Case("losses", "ddpm num_steps 1", lambda: sdegen.ddpm_loss(net_model(), x4(), num_steps=1, seed=0), "num_steps"),
    Case("losses", "ssm projection unknown",
         lambda: sdegen.sliced_score_matching_loss(net_model(), x4(), projection="uniform", seed=0), "projection"),
    Case("losses", "ssm n_projections 0",
         lambda: sdegen.sliced_score_matching_loss(net_model(), x4(), n_projections=0, seed=0), "n_projections"),
    Case("losses", "ssm t = 0", lambda: sdegen.sliced_score_matching_loss(net_model(), x4(), t=0.0, seed=0), "t"),
    Case("losses", "classifier_loss labels float",
         lambda: sdegen.classifier_loss(Classifier(), VP, x4(), torch.zeros(4), seed=0), "y"),
    Case("losses", "classifier_loss label_smoothing 1",
         lambda: sdegen.classifier_loss(Classifier(), VP, x4(), torch.zeros(4, dtype=torch.long), label_smoothing=1.0,
                                        seed=0), "label_smoothing"),
    Case("losses", "classifier_loss (B,) logits",
         lambda: sdegen.classifier_loss(Classifier(flat=True), VP, x4(), torch.zeros(4, dtype=torch.long), seed=0),
         "classifier"),
    Case("losses", "drop_labels p 2", lambda: sdegen.drop_labels(torch.zeros(4, dtype=torch.long), 2.0, 3, seed=0),
         "p"),
    Case("losses", "drop_labels p NaN", lambda: sdegen.drop_labels(torch.zeros(4, dtype=torch.long), NAN, 3, seed=0),
         "p"),
    Case("losses", "sample_time n 0", lambda: sdegen.sample_time(VP, 0, seed=0), "n"),
    # --- guidance
    Case("guidance", "classifier not callable", lambda: sdegen.classifier_guidance(RING, 3, 0), "classifier"),
    Case("guidance", "scale -1", lambda: sdegen.classifier_guidance(RING, Classifier(), 0, scale=-1.0), "scale"),
    Case("guidance", "scale NaN", lambda: sdegen.classifier_guidance(RING, Classifier(), 0, scale=NAN), "scale"),
    Case("guidance", "label out of range", lambda: sdegen.classifier_guidance(RING, Classifier(), 5), "y"),
    Case("guidance", "label float", lambda: sdegen.classifier_guidance(RING, Classifier(), 0.5), "y"),
    Case("guidance", "(B,) logits",
         lambda: sdegen.sample(VP, sdegen.classifier_guidance(RING, Classifier(flat=True), 0), x4(), method="euler",
                               steps=3), "classifier"),
    Case("guidance", "label batch mismatch",
         lambda: sdegen.sample(VP, sdegen.classifier_guidance(RING, Classifier(), torch.zeros(3, dtype=torch.long)),
                               x4(), method="euler", steps=3), "y"),
    Case("guidance", "cfg model not callable", lambda: sdegen.classifier_free_guidance(3, 0), "model"),
    Case("guidance", "cfg w -1", lambda: sdegen.classifier_free_guidance(cond_model, 0, w=-1.0, num_classes=3), "w"),
    Case("guidance", "cfg w inf", lambda: sdegen.classifier_free_guidance(cond_model, 0, w=INF, num_classes=3), "w"),
    Case("guidance", "cfg label out of range", lambda: sdegen.classifier_free_guidance(cond_model, 7, num_classes=3),
         "y"),
    Case("guidance", "cfg null_label -1", lambda: sdegen.classifier_free_guidance(cond_model, 0, null_label=-1),
         "null_label"),
    Case("guidance", "cfg num_classes 0", lambda: sdegen.classifier_free_guidance(cond_model, 0, num_classes=0),
         "num_classes"),
    Case("guidance", "MixtureClassifier groups not a partition",
         lambda: sdegen.MixtureClassifier(RING, [[0, 1], [1, 2]], VP), "groups"),
    # --- inpaint
    Case("inpaint", "mask a list", INP(mask=[True, False]), "mask"),
    Case("inpaint", "mask float 0.5", INP(mask=torch.tensor([0.5, 1.0])), "mask"),
    Case("inpaint", "mask of the wrong shape", INP(mask=torch.tensor([True, False, True])), "mask"),
    Case("inpaint", "known with NaN", INP(known=torch.tensor([[NAN, 0.0]])), "known"),
    Case("inpaint", "known with inf", INP(known=torch.tensor([[INF, 0.0]])), "known"),
    Case("inpaint", "known 0-d", INP(known=torch.tensor(1.0)), "known"),
    Case("inpaint", "sampler adaptive", INP(sampler="adaptive"), "sampler"),
    Case("inpaint", "steps 0", INP(steps=0), "steps"),
    Case("inpaint", "t_min NaN", INP(t_min=NAN), "t_min"),
    Case("inpaint", "denoise 'no'", INP(denoise="no"), "denoise"),
    Case("inpaint", "progress 'yes'", INP(progress="yes"), "progress"),
    Case("inpaint", "schedule unknown", INP(schedule="cosine"), "schedule"),
    Case("inpaint", "sampler option unknown", INP(snr=0.1), "snr"),
    # --- optimize_schedule
    Case("optimize_schedule", "steps 0", OPT(steps=0), "steps"),
    Case("optimize_schedule", "max_evals 0", OPT(max_evals=0), "max_evals"),
    Case("optimize_schedule", "step_size -1", OPT(step_size=-1.0), "step_size"),
    Case("optimize_schedule", "min_step_size > step_size", OPT(min_step_size=1.0), "min_step_size"),
    Case("optimize_schedule", "objective unknown", OPT(objective="max"), "objective"),
    Case("optimize_schedule", "init unknown", OPT(init="cosine"), "init"),
    Case("optimize_schedule", "init empty", OPT(init=()), "init"),
    Case("optimize_schedule", "stochastic method", OPT(method="euler_maruyama"), "method"),
    Case("optimize_schedule", "x_T with inf", OPT(x_T=torch.tensor([[0.0, INF], [1.0, 0.0]])), "x_T"),
    Case("optimize_schedule", "reference of the wrong shape", OPT(reference=torch.zeros(3, 2)), "reference"),
    Case("optimize_schedule", "subset 0", OPT(subset=0), "subset"),
    Case("optimize_schedule", "t_min NaN", OPT(t_min=NAN), "t_min"),
    Case("optimize_schedule", "unknown sampler option", OPT(snr=0.1), "snr"),
    # --- checkpoints
    Case("checkpoint", "a text file", lambda: sdegen.load_checkpoint(text_file()), "path"),
    Case("checkpoint", "a tensor file", lambda: sdegen.load_checkpoint(ckpt_file(torch.zeros(3))), "path"),
    Case("checkpoint", "a dict without config", lambda: sdegen.load_checkpoint(ckpt_file({"model": {}})), "path"),
    Case("checkpoint", "a dict with a bad config",
         lambda: sdegen.load_checkpoint(ckpt_file({"config": {"kind": "x"}, "model": {}})), "config"),
    Case("checkpoint", "a missing file", lambda: sdegen.load_checkpoint("/nonexistent/dir/model.pt"), "path",
         CLEAR + (FileNotFoundError,)),
    Case("checkpoint", "use_ema 'no'", lambda: sdegen.load_checkpoint(ckpt_file({}), use_ema="no"), "use_ema"),
    Case("checkpoint", "save a plain function", lambda: sdegen.save_checkpoint(text_file(), oracle), "model"),
    Case("checkpoint", "save a module without config", lambda: sdegen.save_checkpoint(text_file(), Linear()),
         "config"),
    Case("checkpoint", "save ema not an EMA", lambda: sdegen.save_checkpoint(text_file(), sdegen.MLP(2), ema=3),
         "ema"),
    Case("checkpoint", "save path not a str", lambda: sdegen.save_checkpoint(3.5, sdegen.MLP(2)), "path"),
    # --- sample_sharded (argument checks, single process)
    Case("sample_sharded", "no shape", SH(shape=None), "shape"),
    Case("sample_sharded", "shape with 0", SH(shape=(0, 2)), "shape"),
    Case("sample_sharded", "seed a float", SH(seed=1.5), "seed"),
    Case("sample_sharded", "batch_size 0", SH(batch_size=0), "batch_size"),
    Case("sample_sharded", "gather unknown", SH(gather="rank0"), "gather"),
    Case("sample_sharded", "x_T given", SH(x_T=x4()), "x_T"),
    Case("sample_sharded", "dtype int32", SH(dtype=torch.int32), "dtype"),
    Case("sample_sharded", "score and score_for", SH(score_for=lambda idx: RING), "score_for"),
    Case("sample_sharded", "method unknown", SH(method="foo"), "method"),
    # --- GaussianMixture
    Case("mixture", "means 1-D", lambda: GaussianMixture([1.0], [0.0], [1.0]), "means"),
    Case("mixture", "weights negative", lambda: GaussianMixture([-1.0, 2.0], [[0.0], [1.0]], [1.0, 1.0]), "weights"),
    Case("mixture", "weights NaN", lambda: GaussianMixture([NAN, 1.0], [[0.0], [1.0]], [1.0, 1.0]), "weights"),
    Case("mixture", "means with inf", lambda: GaussianMixture([1.0, 1.0], [[0.0], [INF]], [1.0, 1.0]), "means"),
    Case("mixture", "covs negative", lambda: GaussianMixture([1.0], [[0.0]], [-1.0]), "covs"),
    Case("mixture", "covs NaN", lambda: GaussianMixture([1.0], [[0.0]], [NAN]), "covs"),
    Case("mixture", "covs of the wrong shape", lambda: GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 0.0, 0.0]]),
         "covs"),
    Case("mixture", "ring n_modes 0", lambda: GaussianMixture.ring(n_modes=0), "n_modes"),
    Case("mixture", "ring radial_std -1", lambda: GaussianMixture.ring(radial_std=-1.0), "radial_std"),
    Case("mixture", "random dim 0", lambda: GaussianMixture.random(dim=0), "dim"),
    Case("mixture", "sample n 0", lambda: RING.sample(0, seed=0), "n"),
    Case("mixture", "sample t without sde", lambda: RING.sample(3, t=0.5, seed=0), "sde"),
    Case("mixture", "log_prob of the wrong dim", lambda: RING.log_prob(None, torch.zeros(3, 5)), "x"),
    Case("mixture", "score at t NaN", lambda: RING.score(VP, x4(), NAN), "t"),
    Case("mixture", "complex means", lambda: GaussianMixture([1.0], torch.tensor([[1.0 + 2.0j]]), [1.0]), "means"),
    Case("mixture", "complex covs", lambda: GaussianMixture([1.0], [[0.0]], torch.tensor([1.0 + 0.5j])), "covs"),
    Case("mixture", "bool weights", lambda: GaussianMixture([True, False], [[0.0], [1.0]], [1.0, 1.0]),
         "weights"),
    Case("mixture", "score at a complex time", lambda: RING.score(VP, x4(), torch.full((4,), 0.5 + 0.7j)), "t"),
    # --- sizes beyond any tensor, the reference networks' sizes, booleans as numbers
    Case("sample", "steps 10**30", S(steps=10**30), "steps"),
    Case("sample", "pc corrector_steps 10**30", S(method="pc", seed=0, corrector_steps=10**30), "corrector_steps"),
    Case("sample", "annealed_langevin step_lr 10**30", S(method="annealed_langevin", seed=0, steps=3,
                                                         step_lr=10**30), "step_lr"),
    Case("likelihood", "levels 10**30", LL(levels=10**30), "levels"),
    Case("likelihood", "a prior returning NaN", LL(prior=lambda z: torch.full(z.shape[:1], NAN)), "prior"),
    Case("model", "time a bool tensor", lambda: net_model().score(x4(), torch.tensor(True)), "t"),
    Case("model", "MLP hidden 0", lambda: sdegen.MLP(2, hidden=0), "hidden"),
    Case("model", "MLP hidden True", lambda: sdegen.MLP(2, hidden=True), "hidden"),
    Case("model", "MLP dim 0", lambda: sdegen.MLP(0), "dim"),
    Case("model", "UNet dropout 1", lambda: sdegen.UNet(dropout=1.0), "dropout"),
    Case("sde", "VESDE sigma_min True", lambda: sdegen.VESDE(sigma_min=True), "sigma_min"),
    Case("sde", "EDMSDE sigma_max True", lambda: sdegen.EDMSDE(sigma_max=True), "sigma_max"),
]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _has_nan(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_floating_point() and not bool(torch.isfinite(out).all())
    if isinstance(out, (tuple, list)):
        return any(_has_nan(o) for o in out)
    for name in ("log_prob", "times", "loss"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return _has_nan(v)
    return False


def outcome(case: Case, limit_s: float = TIME_LIMIT_S) -> Tuple[str, str]:
    """(kind, detail): kind is "clear", "obscure", "nan", "accepted" or "hang"."""
    names = (case.names,) if isinstance(case.names, str) else case.names
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        out = case.call()
    except _Timeout:
        return "hang", f"no result after {limit_s} s"
    except case.errors as err:
        msg = str(err)
        if any(name in msg for name in names):
            return "clear", f"{type(err).__name__}: {msg}"
        return "obscure", f"{type(err).__name__} not naming {names}: {msg}"
    except Exception as err:  # noqa: BLE001 - classified, not hidden
        return "obscure", f"{type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return ("nan", "returned NaN/inf") if _has_nan(out) else ("accepted", f"returned {type(out).__name__}")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}: {c.what}" for c in CASES])
def test_bad_input_is_named(case: Case):
    kind, detail = outcome(case)
    assert kind == "clear", detail


def test_battery_size_and_coverage():
    per_entry = Counter(c.entry for c in CASES)
    assert len(CASES) >= 120
    for entry in ("sde", "model", "sample", "likelihood", "losses", "guidance", "schedules", "optimize_schedule",
                  "checkpoint", "inpaint", "sample_sharded", "mixture"):
        assert per_entry[entry] >= 5, entry


if __name__ == "__main__":  # the tally: python tests/test_bad_inputs.py [-v]
    table = defaultdict(Counter)
    for c in CASES:
        kind, detail = outcome(c)
        table[c.entry][kind] += 1
        if kind != "clear" and "-v" in sys.argv:
            print(f"[{kind}] {c.entry}: {c.what} -> {detail[:200]}")
    kinds = ("clear", "obscure", "nan", "accepted", "hang")
    print(f"{'entry':20s} {'cases':>5s} " + " ".join(f"{k:>8s}" for k in kinds))
    for entry, counts in table.items():
        print(f"{entry:20s} {sum(counts.values()):5d} " + " ".join(f"{counts[k]:8d}" for k in kinds))
    total = sum(table.values(), Counter())
    print(f"{'total':20s} {sum(total.values()):5d} " + " ".join(f"{total[k]:8d}" for k in kinds))


# --- options honoured, no hidden state ------------------------------------------------------------------------------
def test_float64_score_keeps_a_float32_run_in_float32():
    out = sdegen.sample(VP, lambda x, t: -x.double(), x4(), method="euler", steps=3)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("method, kw", [("euler", {}), ("dpmpp_2m", {}), ("ode", {}), ("adaptive", {}),
                                        ("adaptive_rk23", {})])
def test_deterministic_run_without_seed_leaves_the_global_generator_alone(method, kw):
    state = torch.random.get_rng_state()
    sdegen.sample(VP, RING, x4(), method=method, steps=4 if method in ("euler", "dpmpp_2m") else None, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_exact_likelihood_and_schedule_fit_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    sdegen.log_likelihood(VP, RING, x4(torch.float64), divergence="exact", rtol=1e-3, atol=1e-3, t_min=1e-3)
    sdegen.optimize_schedule(VP, RING, x4(), method="euler", steps=3, max_evals=6, init="log_snr")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_stochastic_run_without_seed_draws_its_seeds_once_from_the_global_generator():
    torch.manual_seed(7)
    a = sdegen.sample(VP, RING, x4(), method="euler_maruyama", steps=5)
    after = torch.random.get_rng_state()
    torch.manual_seed(7)
    seeds = sdegen.make_seeds(None, 4)  # B seeds: the only draw a run makes from torch's generator
    assert torch.equal(torch.random.get_rng_state(), after)
    assert torch.equal(sdegen.sample(VP, RING, x4(), method="euler_maruyama", steps=5, seed=seeds), a)


LOOSE = {"rtol": 1e-2, "atol": 1e-2}


@pytest.mark.parametrize("method, kw", [
    ("euler", {"steps": 3}), ("ode", LOOSE), ("ode", {"solver": "rk4", "steps": 3}), ("adaptive", LOOSE),
    ("adaptive_rk23", LOOSE), ("sde", {"steps": 3, "seed": 0})])
def test_progress_bar_for_every_method(method, kw, capsys):
    """The bar runs to 100% (steps, or the time span from T to t_min for whole-span solvers)."""
    sdegen.sample(VP, RING, x4(), method=method, progress=True, **kw)
    err = capsys.readouterr().err
    assert "100%" in err, err[-300:]


def test_progress_bar_for_log_likelihood(capsys):
    sdegen.log_likelihood(VP, RING, x4(torch.float64), divergence="exact", rtol=1e-3, atol=1e-3, t_min=1e-3,
                          progress=True)
    err = capsys.readouterr().err
    assert "log_likelihood" in err and "100%" in err, err[-300:]


def test_ode_steps_are_honoured_by_a_fixed_grid_solver():
    _, info = sdegen.sample(VP, RING, x4(), method="ode", solver="rk4", steps=7, return_info=True)
    assert info.nfe == 4 * 7  # four stages per step


def test_inpaint_takes_the_options_of_sample():
    known, mask = x4(), torch.tensor([True, False])
    out, info = sdegen.inpaint(VP, RING, known, mask, steps=6, seed=0, schedule="log_snr", t_min=1e-2,
                               denoise=True, return_info=True)
    assert info.times.numel() == 7 and float(info.times[-1]) == pytest.approx(1e-2)
    assert torch.equal(out[:, 0], known[:, 0]) and bool(torch.isfinite(out).all())


def test_step_limit_messages_agree_with_their_numbers():
    """A step limit never claims a tolerance was missed while it prints a ratio below 1."""
    import re

    runs = [lambda m=m: sdegen.sample(VP, RING, x4(), method=m, rtol=1e-9, atol=1e-9, max_steps=3)
            for m in ("adaptive", "adaptive_rk23", "ode")]
    runs.append(lambda: sdegen.log_likelihood(VP, RING, x4(torch.float64), divergence="exact", rtol=1e-9,
                                              atol=1e-9, t_min=1e-3, max_steps=3))
    for run in runs:
        with pytest.raises(SolverError) as info:
            run()
        msg = str(info.value)
        assert "max_steps=3" in msg and "did not meet" not in msg
        for claim in re.finditer(r"exceeded 1[^(]*\(worst ([0-9.e+-]+)\)", msg):
            assert float(claim.group(1)) > 1.0, msg


def test_reference_networks_refuse_inputs_of_the_wrong_shape_and_labels_out_of_range():
    """MLP(dim) needs d values per example; labels must be integers of shape (B,) in [0, num_classes] (the last one
    is the null label, which is accepted)."""
    net = sdegen.MLP(4, hidden=8, depth=1, num_classes=3)
    x, t = torch.randn(2, 4), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"MLP\(dim=4\).*\(2, 5\)"):
        net(torch.randn(2, 5), t)
    for y, err, match in ((torch.tensor([0, 1, 2]), ValueError, "shape"), (torch.tensor([0, 4]), ValueError, r"\[0, 3\]"),
                          (torch.tensor([-1, 0]), ValueError, r"\[0, 3\]"), (torch.tensor([0.0, 1.0]), TypeError, "integer")):
        with pytest.raises(err, match=match):
            net(x, t, y)
    assert net(x, t, torch.tensor([3, 0])).shape == (2, 4)


def test_sampler_option_errors_name_the_value_and_the_method():
    """A constructor's complaint about an option's value is passed on as it is (not as an unknown option); a
    predictor that chooses its own steps is named as such."""
    ring = GaussianMixture.ring()
    with pytest.raises(TypeError, match=r"method 'lms' with options order: order must be an int"):
        sdegen.sample(sdegen.VPSDE(), ring, shape=(2, 2), method="lms", order=2.0, steps=3, seed=0)
    with pytest.raises(TypeError, match=r"fixed-step sampler.*'adaptive' \(AdaptiveMultistep, which chooses its own"):
        sdegen.sample(sdegen.VPSDE(), ring, shape=(2, 2), method="pc", predictor="adaptive", steps=3, seed=0)


def test_sample_device_is_parsed_and_must_agree_with_x_T():
    """``device`` places a prior draw; with x_T given the samples stay where x_T is, so another device raises (as
    another dtype does) and the same one is accepted; an unparsable device names the parameter."""
    ring, sde = GaussianMixture.ring(), sdegen.VPSDE()
    with pytest.raises(ValueError, match="device: x_T is on cpu"):
        sdegen.sample(sde, ring, torch.zeros(3, 2), method="ddim", steps=2, device="meta")
    with pytest.raises(ValueError, match="device must be"):
        sdegen.sample(sde, ring, shape=(3, 2), method="ddim", steps=2, device="no-such-device")
    assert sdegen.sample(sde, ring, torch.zeros(3, 2), method="ddim", steps=2, device="cpu").device.type == "cpu"


def test_sampler_settings_that_cannot_work_are_named():
    """annealed_langevin diverges for step_lr >= 4 s(t_min)^2 (NCSN's 2e-5 under VESDE(), whose s(t_min) is 1.3e-4,
    returned all-NaN samples); Restart on a grid that ends above its interval blamed the step count; torchdiffeq
    options that sdegen sets, or that the solver does not read, are refused instead of misreporting or warning."""
    ring = sdegen.GaussianMixture.ring()
    with pytest.raises(ValueError, match=r"step_lr=2e-05 is .* diverges for step_lr >= 4 s\(t_min\)\^2"):
        sdegen.sample(sdegen.VESDE(), ring, shape=(4, 2), method="annealed_langevin", step_lr=2e-5, steps=3, seed=0)
    x = sdegen.sample(sdegen.VESDE(kernel="paper"), ring, shape=(4, 2), method="annealed_langevin", step_lr=2e-5,
                      steps=3, seed=0)  # 0.2 s(t_min)^2 there: NCSN's own setting
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"restart_sigmas: the grid ends at sigma\(t_min\) = 4.*raise restart_sigmas"):
        sdegen.sample(sdegen.EDMSDE(), ring, shape=(4, 2), method="restart", steps=20, t_min=4.0, seed=0)
    x_T = sdegen.VPSDE().prior_sample((4, 2), seed=0)
    for options, match in (({"max_num_steps": 3}, "sdegen sets these itself .*max_steps="),
                           ({"norm": lambda v: v.abs().max()}, "sdegen sets these itself"),
                           ({"frist_step": 0.1}, "not options of torchdiffeq's 'dopri5'")):
        with pytest.raises(ValueError, match=match):
            sdegen.sample(sdegen.VPSDE(), ring, x_T, method="ode", options=options)
    with pytest.raises(ValueError, match="step_size: steps="):
        sdegen.sample(sdegen.VPSDE(), ring, x_T, method="ode", solver="rk4", steps=4, options={"step_size": 0.1})
    sdegen.sample(sdegen.VPSDE(), ring, x_T, method="ode", options={"first_step": 0.01})  # one it reads


def test_int64_sized_counts_are_accepted_where_they_mean_no_limit():
    """max_steps=sys.maxsize (int64's largest value, the usual 'no limit') stays accepted; only counts outside int64
    are refused."""
    x, info = sdegen.sample(VP, RING, x4(), method="adaptive", max_steps=sys.maxsize, return_info=True)
    assert torch.isfinite(x).all() and info.nfe > 0
