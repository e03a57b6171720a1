"""EDM's DhariwalUNet: the ADM architecture (Dhariwal & Nichol 2021) of EDM's ImageNet-64 model.

Spec: ``papers/edm.md`` 2.4 and 4.3. It is the ``"dhariwal"`` style of the one U-Net in
:mod:`diffusion_transfer.nets.unet` (not a copy): FiLM (scale-shift) blocks, attention with 64 channels per head
at 32, 16 and 8 px in every block, a bias-free label Linear added after the embedding MLP (labels are not
scaled by √label_dim), positional noise features without SongUNet's sin/cos swap, ``out_norm`` / ``out_conv``.

ImageNet-64 (``build_unet("adm-imagenet64", img_resolution=64, label_dim=1000)``): model_channels 192,
channel_mult (1, 2, 3, 4), 3 blocks per level, embedding width 768, dropout 0.10; 295,899,267 parameters.
EDM's pickle of it sets ``use_fp16=True``, which its precond honours on CUDA only.
"""

from __future__ import annotations

from typing import Any

from .unet import UNet, family_kwargs

__all__ = ["DhariwalUNet"]


class DhariwalUNet(UNet):
    """ADM U-Net with EDM's argument names and class defaults (what its pickles' ``_init_kwargs`` omit).

    Defaults: model_channels 192, channel_mult (1, 2, 3, 4), channel_mult_emb 4, num_blocks 3,
    attn_resolutions (32, 16, 8), dropout 0.10, ``channels_per_head`` 64 (``num_heads=None``): a block has
    out_channels // 64 heads, so one narrower than 64 channels has no attention layers (as EDM's), and
    ``num_heads=0`` switches attention off everywhere. GroupNorm: min(32, C/4) groups.
    """

    defaults: dict[str, Any] = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                                    attn_resolutions=(32, 16, 8), dropout=0.10, num_heads=None, channels_per_head=64)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__(img_resolution, in_channels, out_channels,
                         **family_kwargs(self.defaults, "dhariwal", kwargs))
