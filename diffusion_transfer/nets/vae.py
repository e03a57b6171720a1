"""``LatentCodec``: the frozen Stable Diffusion VAE (diffusers' ``AutoencoderKL``) that maps images to DiT latents.

DiT trains on z = 0.18215 * latent_dist.sample() of 256x256 images (4 x 32 x 32) and decodes samples with
x = VAE.decode(z / 0.18215). diffusers is an optional dependency (``pip install diffusion-transfer[vae]``)
imported only here, and only when a codec is built; weights come from a local folder, never the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

SD_VAE_SCALE = 0.18215
"""Latent scale of the SD VAE (``stabilityai/sd-vae-ft-ema`` / ``-mse``), as DiT uses it."""

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _import_autoencoder() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(
            "latent diffusion needs diffusers' AutoencoderKL: pip install 'diffusion-transfer[vae]' "
            f"(import failed: {err})"
        ) from None
    return AutoencoderKL


class LatentCodec(nn.Module):
    """Frozen image <-> latent codec.

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` (or any module with its ``encode(x).latent_dist`` and
            ``decode(z).sample`` interface). It is frozen and put in eval mode.
        scale: latent scale factor (SD VAE: 0.18215).
    """

    def __init__(self, autoencoder: nn.Module, scale: float = SD_VAE_SCALE) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.scale = scale

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], scale: float = SD_VAE_SCALE) -> LatentCodec:
        """Load ``AutoencoderKL`` from a local folder holding ``config.json`` and its weights."""
        path = Path(folder).expanduser()
        missing = [] if (path / "config.json").is_file() else ["config.json"]
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            missing.append(_WEIGHT_FILES[0])
        if missing:
            raise FileNotFoundError(
                f"VAE folder {path} lacks {' and '.join(missing)}. diffusion_transfer never downloads weights: get "
                "the SD VAE (DiT uses stabilityai/sd-vae-ft-ema for training, -mse for pictures) by hand, e.g. "
                f"`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}`, on a machine with "
                "internet access, and copy the folder here."
            )
        autoencoder = _import_autoencoder().from_pretrained(path, local_files_only=True)
        return cls(autoencoder, scale)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsampling(self) -> int:
        """Image side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of q(latent | image), unscaled: images [B, 3, H, W] in [-1, 1] -> 2 x [B, C, H/f, W/f]."""
        posterior = self.autoencoder.encode(images).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Scaled latents ``scale * z`` with z drawn from the posterior (``sample=False``: its mean)."""
        mean, std = self.moments(images)
        if not sample:
            return mean * self.scale
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        return (mean + std * noise.to(mean.device, mean.dtype)) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images [B, 3, H, W] (about [-1, 1], not clamped) from scaled latents [B, C, H/f, W/f]."""
        return self.autoencoder.decode(latents / self.scale).sample
