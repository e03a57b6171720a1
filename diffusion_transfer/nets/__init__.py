"""Plain ``nn.Module`` denoisers (no Lightning imports)."""

from .adm_unet import DhariwalUNet
from .dit import DiT, DiT_CONFIGS, build_dit
from .unet import UNET_CONFIGS, DDPMUNet, SongUNet, UNet, build_unet

__all__ = ["UNET_CONFIGS", "DDPMUNet", "DhariwalUNet", "DiT", "DiT_CONFIGS", "SongUNet", "UNet", "build_dit",
           "build_unet"]
