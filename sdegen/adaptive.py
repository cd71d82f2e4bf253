"""Kept for ``from sdegen.adaptive import ...``: the adaptive samplers live in :mod:`sdegen.samplers.adaptive`."""

from .samplers.adaptive import AdaptiveExponential, AdaptiveMultistep

__all__ = ["AdaptiveExponential", "AdaptiveMultistep"]
