"""Score models (kept for ``from sdegen.score import ...``): the model layer lives in :mod:`sdegen.models`."""

from .models import PREDICTIONS, TIME_INPUTS, ScoreModel, output_to_score, output_to_x0, score_to_x0

__all__ = ["PREDICTIONS", "TIME_INPUTS", "ScoreModel", "output_to_score", "output_to_x0", "score_to_x0"]
