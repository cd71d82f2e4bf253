"""sdegen: score-based generative modelling through SDEs, in PyTorch.

The public namespace, by concept:

- forward SDEs, each the pair (m(t), s(t)) of its Gaussian kernel: :class:`SDE` (the contract a user SDE
  implements), :class:`VPSDE`, :class:`CosineVPSDE`, :class:`SubVPSDE`, :class:`VESDE`, :class:`EDMSDE`,
  :class:`FlowSDE`, :class:`DiscreteVPSDE`;
- models: :class:`Model` (the contract samplers see: score and denoiser), :class:`ScoreModel` (a network and what it
  predicts), and adapters for diffusers, k-diffusion/EDM and score_sde networks (:mod:`sdegen.adapters`);
- sampling: :func:`sample`, the samplers of :mod:`sdegen.samplers`, time grids (:func:`time_grid`) and grids fitted
  to a model (:func:`optimize_schedule`);
- likelihoods: :func:`log_likelihood`, :func:`bits_per_dim`, divergence estimators;
- training: losses, :func:`train`, checkpoints, reference networks (:mod:`sdegen.nets`);
- guidance: classifier and classifier-free guidance, inpainting;
- the exact Gaussian-mixture oracle (:class:`GaussianMixture`);
- runs over several processes (:mod:`sdegen.distributed`).
"""

from .sde import (SDE, VESDE, CosineVPSDE, DiscreteVPSDE, EDMSDE, FlowSDE, ProbabilityFlowODE, ReverseSDE, SubVPSDE,
                  VPSDE)
from .models import Model, ScoreModel, as_model, output_to_score, score_to_x0
from . import samplers
from .samplers import (SAMPLERS, DDIM, AdaptiveExponential, AdaptiveMultistep, Ancestral, AnnealedLangevin, DPMSolver,
                       DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP3MSDE, Euler, EulerAncestral, EulerMaruyama,
                       ExponentialAdams, ExponentialPC, Heun, PredictorCorrector, ReverseDiffusion, SASolver, Solver,
                       StepSampler, UniPC, DPMSolverPPSDE, DPM2, DPM2Ancestral, DPMPP2SAncestral, Restart, LMS,
                       DEIS, IPNDM, get_sampler, register_sampler)
from . import analytic, backends, noise, schedules
from .analytic import GaussianMixture
from .noise import make_seeds
from .sampling import SampleInfo, sample
from . import capture
from .errors import SolverError
from .schedules import PilotGrid, pilot_grid, refine_grid, time_grid
from . import adaptive, fast_samplers, score  # module paths kept for existing imports
from . import guidance, losses, nets, training
from .guidance import (ClassifierFreeGuidedScore, ClassifierGuidedScore, Inpaint, MixtureClassifier,
                       classifier_free_guidance, classifier_guidance, inpaint)
from .losses import classifier_loss, ddpm_loss, drop_labels, dsm_loss, sample_time, sliced_score_matching_loss
from .nets import MLP, ConvClassifier, UNet
from .training import EMA, load_checkpoint, save_checkpoint, train
from . import divergence, likelihood
from .divergence import divergence_exact, divergence_hutchinson, make_probes
from .likelihood import LikelihoodResult, bits_per_dim, dequantize, log_likelihood
from . import distributed
from .distributed import init_distributed, log_likelihood_sharded, sample_sharded, train_ddp
from . import calibration, sensitivity_grid
from .calibration import ScheduleFit, optimize_schedule
from . import adapters
from .adapters import diffusers_time_grid, from_denoiser, from_diffusers, from_score_sde

__version__ = "0.2.0"

__all__ = [
    # SDEs
    "SDE", "VPSDE", "CosineVPSDE", "SubVPSDE", "VESDE", "EDMSDE", "FlowSDE", "DiscreteVPSDE", "ReverseSDE",
    "ProbabilityFlowODE",
    # models
    "Model", "ScoreModel", "as_model", "output_to_score", "score_to_x0", "from_diffusers", "diffusers_time_grid",
    "from_denoiser", "from_score_sde",
    # sampling
    "sample", "SampleInfo", "time_grid", "refine_grid", "optimize_schedule", "ScheduleFit", "SAMPLERS",
    "get_sampler", "register_sampler", "StepSampler", "Solver", "Euler", "EulerMaruyama",
    "ReverseDiffusion", "Ancestral", "EulerAncestral", "PredictorCorrector", "AnnealedLangevin", "DDIM", "Heun",
    "DPMSolver",
    "DPMSolverPP", "ExponentialAdams", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "ExponentialPC", "SASolver",
    "UniPC", "DPMSolverPPSDE", "DPM2", "DPM2Ancestral", "DPMPP2SAncestral", "Restart", "LMS", "DEIS", "IPNDM",
    "pilot_grid", "PilotGrid",
    "AdaptiveExponential",
    "AdaptiveMultistep", "make_seeds", "SolverError",
    # likelihood
    "log_likelihood", "LikelihoodResult", "bits_per_dim", "dequantize", "divergence_exact", "divergence_hutchinson",
    "make_probes",
    # training
    "dsm_loss", "ddpm_loss", "sliced_score_matching_loss", "classifier_loss", "drop_labels", "sample_time", "train",
    "EMA", "save_checkpoint", "load_checkpoint", "MLP", "UNet", "ConvClassifier",
    # guidance
    "classifier_guidance", "classifier_free_guidance", "ClassifierGuidedScore", "ClassifierFreeGuidedScore",
    "Inpaint", "inpaint", "MixtureClassifier",
    # oracle
    "GaussianMixture",
    # distributed
    "init_distributed", "sample_sharded", "log_likelihood_sharded", "train_ddp",
    # modules
    "samplers", "analytic", "backends", "noise", "schedules", "guidance", "losses", "nets", "training", "divergence",
    "likelihood", "distributed", "calibration", "adapters", "capture",
]

# internals that were reachable from the top-level namespace: kept for a release, then only in their modules
_MOVED = {"Context": "sdegen.samplers", "ODESolver": "sdegen.backends", "SDESolver": "sdegen.backends",
          "PerExampleBrownian": "sdegen.backends", "Noise": "sdegen.noise", "GeneratorNoise": "sdegen.noise"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"sdegen.{name} is deprecated and leaves the top-level namespace in the next release; import it "
                      f"from {_MOVED[name]}.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'sdegen' has no attribute {name!r}")
