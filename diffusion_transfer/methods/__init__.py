"""Methods: one LightningModule per paper on one :class:`DiffusionLightningBase`."""

from .base import DiffusionLightningBase
from .diff_instruct import DiffInstruct, OneStepGenerator, ikl_surrogate_loss
from .difftuning import DiffTuning, difftuning_loss, timestep_law
from .diffusion import Diffusion, dit_loss
from .dmp import DMP, dmp_loss
from .edm import EDMDiffusion, edm_loss, load_edm_network
from .finediffusion import FineDiffusion
from .longtail import CBDM, T2H, LongTailDDPM, cbdm_loss, t2h_loss

__all__ = ["DMP", "DiffInstruct", "DiffTuning", "Diffusion", "DiffusionLightningBase", "EDMDiffusion", "FineDiffusion",
           "difftuning_loss", "dit_loss", "dmp_loss", "edm_loss", "load_edm_network", "timestep_law", "CBDM", "T2H",
           "LongTailDDPM", "cbdm_loss", "t2h_loss", "ikl_surrogate_loss", "OneStepGenerator"]
