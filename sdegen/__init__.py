"""sdegen: score-based generative modelling through SDEs, in PyTorch.

Public names: the forward SDEs (:class:`SDE`, :class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`), the score-model
wrapper (:class:`ScoreModel`), the sampling entry point (:func:`sample`) and its samplers, time grids, and the
exact Gaussian-mixture oracle (:mod:`sdegen.analytic`).
"""

from . import analytic, backends, noise, samplers, schedules
from .analytic import GaussianMixture
from .backends import ODESolver, PerExampleBrownian, SDESolver
from .noise import Noise, make_seeds
from .samplers import (SAMPLERS, Ancestral, AnnealedLangevin, Context, Euler, EulerMaruyama, PredictorCorrector,
                       ReverseDiffusion, StepSampler, get_sampler, register_sampler)
from .sampling import SampleInfo, sample
from .schedules import time_grid
from .score import ScoreModel, output_to_score, score_to_x0
from .sde import SDE, VESDE, ProbabilityFlowODE, ReverseSDE, SubVPSDE, VPSDE

__version__ = "0.1.0"
