"""Noise processes and samplers, no weights and no Lightning imports."""

from .gaussian import GaussianDiffusion
from .guidance import apply_guidance

__all__ = ["GaussianDiffusion", "apply_guidance"]
