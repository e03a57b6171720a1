"""Methods: one LightningModule per paper on one :class:`DiffusionLightningBase`."""

from .base import DiffusionLightningBase
from .difftuning import DiffTuning, difftuning_loss, timestep_law
from .diffusion import Diffusion, dit_loss
from .edm import EDMDiffusion, edm_loss, load_edm_network

__all__ = ["DiffTuning", "Diffusion", "DiffusionLightningBase", "EDMDiffusion", "difftuning_loss", "dit_loss",
           "edm_loss", "load_edm_network", "timestep_law"]
