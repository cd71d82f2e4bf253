"""sdegen: score-based generative modelling through SDEs, in PyTorch.

Public names: the forward SDEs (:class:`SDE`, :class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`), the score-model
wrapper (:class:`ScoreModel`), the sampling entry point (:func:`sample`) and its samplers, time grids, and the
exact Gaussian-mixture oracle (:mod:`sdegen.analytic`).
"""

from . import analytic, backends, noise, samplers, schedules
from .analytic import GaussianMixture
from .backends import ODESolver, PerExampleBrownian, SDESolver
from .noise import GeneratorNoise, Noise, make_seeds
from .samplers import (SAMPLERS, Ancestral, AnnealedLangevin, Context, Euler, EulerMaruyama, PredictorCorrector,
                       ReverseDiffusion, StepSampler, get_sampler, register_sampler)
from .sampling import SampleInfo, sample
from .schedules import time_grid
from .score import ScoreModel, output_to_score, score_to_x0
from .sde import SDE, VESDE, ProbabilityFlowODE, ReverseSDE, SubVPSDE, VPSDE

__version__ = "0.1.0"

# --- fast and adaptive samplers (issue 3: sdegen/fast_samplers.py, sdegen/adaptive.py) ---
from . import adaptive, fast_samplers
from .adaptive import AdaptiveExponential, AdaptiveMultistep
from .fast_samplers import DDIM, DPMSolver, DPMSolverPP, DPMSolverPP2MSDE, ExponentialPC, Heun

# --- issue 5: losses, nets, training, guidance ---
from . import guidance, losses, nets, training
from .guidance import (ClassifierFreeGuidedScore, ClassifierGuidedScore, Inpaint, MixtureClassifier,
                       classifier_free_guidance, classifier_guidance, inpaint)
from .losses import classifier_loss, ddpm_loss, drop_labels, dsm_loss, sample_time, sliced_score_matching_loss
from .nets import MLP, ConvClassifier, UNet
from .training import EMA, load_checkpoint, save_checkpoint, train

# --- likelihood (issue 4): sdegen/likelihood.py, sdegen/divergence.py ---
from . import divergence, likelihood
from .divergence import divergence_exact, divergence_hutchinson, make_probes
from .likelihood import LikelihoodResult, bits_per_dim, dequantize, log_likelihood

# --- distributed (issue 6): sdegen/distributed.py ---
from . import distributed
from .distributed import init_distributed, log_likelihood_sharded, sample_sharded, train_ddp

# --- step schedules fitted to a model (issue 3): sdegen/calibration.py ---
from . import calibration
from .calibration import ScheduleFit, optimize_schedule
from .schedules import refine_grid
