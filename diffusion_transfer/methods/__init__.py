"""Methods: one LightningModule per paper on one :class:`DiffusionLightningBase`."""

from .base import DiffusionLightningBase
from .diffusion import Diffusion, dit_loss
from .edm import EDMDiffusion, edm_loss, load_edm_network

__all__ = ["Diffusion", "DiffusionLightningBase", "EDMDiffusion", "dit_loss", "edm_loss", "load_edm_network"]
