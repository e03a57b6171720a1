"""Methods: one LightningModule per paper on one :class:`DiffusionLightningBase`."""

from .base import DiffusionLightningBase
from .diffusion import Diffusion, dit_loss

__all__ = ["Diffusion", "DiffusionLightningBase", "dit_loss"]
