"""Noise processes and samplers, no weights and no Lightning imports."""

from .edm import EDM, EDMPrecond, VEPrecond, VPPrecond
from .gaussian import GaussianDiffusion
from .guidance import apply_guidance

__all__ = ["EDM", "EDMPrecond", "GaussianDiffusion", "VEPrecond", "VPPrecond", "apply_guidance"]
