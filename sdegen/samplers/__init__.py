"""Samplers: small objects that the driver :func:`sdegen.sample` runs, selected by name through :data:`SAMPLERS`.

Families, one module each:

- :mod:`.sde_view`: discretisations of the reverse SDE / probability-flow ODE in x and t (Euler, Euler-Maruyama,
  reverse diffusion, ancestral, predictor-corrector, annealed Langevin);
- :mod:`.exponential`: exponential integrators in y = x/m and u = -log sigma (DDIM, DPM-Solver++ 2M/3M and their
  SDE variants, the exponential predictor-corrector, SA-Solver, UniPC);
- :mod:`.karras`: EDM's sigma-view samplers (Heun, Euler ancestral, DPM-2 and DPM-2 ancestral,
  DPM-Solver++(2S) ancestral) and the single-step DPM-Solver;
- :mod:`.restart`: Restart sampling (ODE steps with restarts of one noise interval);
- :mod:`.linear_multistep`: Adams-Bashforth rules on eps in sigma (LMS, DEIS, iPNDM);
- :mod:`.adaptive`: adaptive step-size control in u;
- :mod:`sdegen.backends`: torchdiffeq ("ode") and torchsde ("sde").

A new sampler is one class (see :class:`StepSampler`) and one line in :data:`SAMPLERS` (or a call of
:func:`register_sampler` from user code).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Union

from .._validate import accepted_keywords, check_options
from .base import Context, Solver, StepSampler
from .sde_view import (Ancestral, AnnealedLangevin, Euler, EulerMaruyama, PredictorCorrector, ReverseDiffusion,
                       langevin_step)
from .exponential import (DDIM, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP3MSDE, ExponentialAdams, ExponentialPC,
                          SASolver, UniPC, exp_moments, exp_poly_integral, exp_poly_weights)
from .karras import DPM2, DPM2Ancestral, DPMPP2SAncestral, DPMSolver, EulerAncestral, Heun
from .restart import Restart
from .stochastic import DPMSolverPPSDE
from .linear_multistep import DEIS, IPNDM, LMS, lagrange_integrals
from .adaptive import AdaptiveExponential, AdaptiveMultistep
from ..backends import ODESolver, SDESolver

# name -> factory; sdegen.sample(method=name, **options) calls factory(**options)
SAMPLERS: Dict[str, Callable[..., Any]] = {
    "euler": Euler,
    "euler_maruyama": EulerMaruyama,
    "reverse_diffusion": ReverseDiffusion,
    "ancestral": Ancestral,
    "pc": PredictorCorrector,
    "annealed_langevin": AnnealedLangevin,
    "ddim": DDIM,
    "heun": Heun,
    "euler_ancestral": EulerAncestral,
    "dpm_2": DPM2,
    "dpm_2_ancestral": DPM2Ancestral,
    "dpmpp_2s_ancestral": DPMPP2SAncestral,
    "restart": Restart,
    "dpm_solver": DPMSolver,
    "dpmpp_2m": lambda lower_order_final=False: DPMSolverPP(2, lower_order_final),
    "dpmpp_3m": lambda lower_order_final=False: DPMSolverPP(3, lower_order_final),
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "dpmpp_3m_sde": DPMSolverPP3MSDE,
    "dpmpp_sde": DPMSolverPPSDE,
    "exp_pc": ExponentialPC,
    "exp_adams": ExponentialAdams,
    "sa_solver": SASolver,
    "unipc": UniPC,
    "lms": LMS,
    "deis": DEIS,
    "ipndm": IPNDM,
    "adaptive": AdaptiveMultistep,
    "adaptive_rk23": AdaptiveExponential,
    "ode": ODESolver,
    "sde": SDESolver,
}


BUILTIN_SAMPLERS = frozenset(SAMPLERS)


def register_sampler(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Make ``factory`` available as ``sdegen.sample(..., method=name)``. A name of the caller's own may be
    registered again (a re-run notebook cell); replacing a built-in sampler takes ``replace=True`` (without it,
    a FutureWarning now, shown whatever module calls it, and an error in the next release). The library's own defaults (the sensitivity
    schedule's pilot, inpainting's default sampler) use the built-in classes whatever the registry holds."""
    if not (isinstance(name, str) and name):
        raise ValueError(f"name must be a non-empty string; got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be a sampler class or a callable returning a sampler; got {factory!r}.")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False; got {replace!r}.")
    if name in BUILTIN_SAMPLERS and not replace and SAMPLERS.get(name) is not factory:
        warnings.warn(f"register_sampler: {name!r} is a built-in sampler; replacing it for every later "
                      "sample(method=...) call will need replace=True in the next release (or choose another name).",
                      FutureWarning, stacklevel=2)
    SAMPLERS[name] = factory


def check_declared(sampler: Any, where: str) -> None:
    """The declarations the driver relies on, checked once per run: ``order``, ``nfe_per_step`` and (for a
    fixed-step sampler) ``default_steps`` positive ints, ``stochastic`` a bool."""
    # order: a positive number (a stochastic sampler's strong order may be 0.5 or 1.5); the counts: at least 1
    fields = [("order", 0), ("nfe_per_step", 1)] + ([("default_steps", 1)] if isinstance(sampler, StepSampler) else [])
    for attr, lo in fields:
        value = getattr(sampler, attr, None)
        if value is None and attr != "default_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > lo if attr == "order"
                                                                                  else value >= lo) or (
                attr == "default_steps" and value != int(value)):
            valid = {"order": "a number > 0", "nfe_per_step": "a number >= 1", "default_steps": "an int >= 1"}[attr]
            raise ValueError(f"{where} declares {attr}={value!r}; it must be {valid}.")
    if not isinstance(getattr(sampler, "stochastic", False), bool):
        raise ValueError(f"{where} declares stochastic={sampler.stochastic!r}; it must be True or False.")


def get_sampler(method: Union[str, Any], **kwargs):
    """Resolve a sampler name (with its options) or pass a sampler object through."""
    if not isinstance(method, str):
        if kwargs:
            raise ValueError(f"sampler options {sorted(kwargs)} were given with a sampler object; "
                             "set them on the object instead.")
        if not isinstance(method, (StepSampler, Solver)):
            raise TypeError(f"method must be a sampler name or a StepSampler / Solver object; "
                            f"got {type(method).__name__}.")
        check_declared(method, type(method).__name__)
        return method
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(sorted(SAMPLERS))}.")
    check_options(kwargs, accepted_keywords(SAMPLERS[method]), f"method {method!r}")
    try:
        sampler = SAMPLERS[method](**kwargs)
    except TypeError as err:  # the option names are checked above: this is about their values
        given = f" with options {', '.join(sorted(kwargs))}" if kwargs else ""
        raise TypeError(f"method {method!r}{given}: {err}") from None
    if not isinstance(sampler, (StepSampler, Solver)):
        raise TypeError(f"the factory registered as {method!r} returned a {type(sampler).__name__}; it must return a "
                        "StepSampler or Solver object.")
    check_declared(sampler, f"method {method!r}")
    return sampler


__all__ = ["SAMPLERS", "BUILTIN_SAMPLERS", "check_declared", "Context", "Solver", "StepSampler", "get_sampler", "register_sampler", "Ancestral",
           "AnnealedLangevin", "Euler", "EulerMaruyama", "PredictorCorrector", "ReverseDiffusion", "langevin_step",
           "DDIM", "ExponentialAdams", "DPMSolverPP", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "ExponentialPC",
           "SASolver", "UniPC", "DPMSolverPPSDE", "DPMSolver", "DPM2", "DPM2Ancestral", "DPMPP2SAncestral", "Restart",
           "EulerAncestral", "Heun", "AdaptiveExponential", "AdaptiveMultistep", "ODESolver", "SDESolver",
           "exp_moments", "exp_poly_integral", "exp_poly_weights", "LMS", "DEIS", "IPNDM", "lagrange_integrals"]
