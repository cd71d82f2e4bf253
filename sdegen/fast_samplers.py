"""Kept for ``from sdegen.fast_samplers import ...``: the exponential and EDM-style samplers live in
:mod:`sdegen.samplers.exponential` and :mod:`sdegen.samplers.karras`."""

from .samplers.exponential import (DDIM, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP3MSDE, ExponentialPC, SASolver,
                                   exp_moments, exp_poly_integral, exp_poly_weights)
from .samplers.karras import DPMSolver, Heun

__all__ = ["DDIM", "DPMSolverPP", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "ExponentialPC", "SASolver",
           "exp_moments", "exp_poly_integral", "exp_poly_weights", "DPMSolver", "Heun"]
