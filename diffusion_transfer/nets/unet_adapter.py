"""``DiTCallUNet``: a U-Net of :mod:`nets.unet` called like a DiT, so Gaussian-diffusion methods run on either.

The methods built on ``Diffusion`` call their net as ``net(x_t, t, y, force_drop_ids=...)`` with int64 timesteps
0..T-1 and int64 labels where -1 is the null label (classifier-free guidance). The U-Nets take
``unet(x, noise_labels, class_labels)``; this wrapper only translates:

* ``t`` -> float noise labels (the DDPM U-Net's sinusoid of the timestep, longtail.md 2.2);
* the null label -> label -1, a zero one-hot: the label embedding is *skipped*, exactly pytorch-ddpm's ``y=None``
  (there is no learned null row, longtail.md pitfall 7, so CBDM / T2H checkpoints load unchanged);
* label dropout as DiT does it: ``force_drop_ids`` nulls exactly those samples and nothing else; without it, in
  training mode, each label is nulled with probability ``class_dropout_prob``.

It owns no parameters: its state dict is the U-Net's under ``unet.``. Nothing here imports Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet import UNet

__all__ = ["DiTCallUNet"]


class DiTCallUNet(nn.Module):
    """A :class:`~diffusion_transfer.nets.unet.UNet` with DiT's call ``(x, t, y, force_drop_ids=None)``.

    Args:
        unet: the wrapped net (its own ``label_dropout`` must be 0: dropout happens here, once).
        class_dropout_prob: per-sample label dropout in training mode when no ``force_drop_ids`` is given.
    """

    def __init__(self, unet: UNet, class_dropout_prob: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if unet.label_dropout:
            raise ValueError(f"label_dropout={unet.label_dropout}: build the U-Net with label_dropout 0 and set "
                             "class_dropout_prob instead (DiTCallUNet drops labels itself)")
        self.unet = unet
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = unet.label_dim
        self.in_channels = unet.in_channels
        self.out_channels = unet.out_channels

    @property
    def null_label(self) -> int:
        """-1: a zero one-hot, i.e. the label embedding is left out (the U-Net has no null row)."""
        return -1

    def drop_labels(self, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Labels ``[B]`` after dropout: dropped samples become -1 (see the module docstring)."""
        y = y.long()
        if force_drop_ids is not None:
            if force_drop_ids.shape != y.shape:
                raise ValueError(f"force_drop_ids must have the labels' shape {tuple(y.shape)}, got "
                                 f"{tuple(force_drop_ids.shape)}")
            return torch.where(force_drop_ids.to(y.device).bool(), -1, y)
        if self.training and self.class_dropout_prob > 0:
            return torch.where(torch.rand(y.shape, device=y.device) < self.class_dropout_prob, -1, y)
        return y

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, *,
                force_drop_ids: Tensor | None = None) -> Tensor:
        """x [B, C, R, R], t [B] timesteps 0..T-1 (or a 0-dim tensor), y [B] int (-1 = null) -> [B, C_out, R, R]."""
        t = t.reshape(-1).expand(x.shape[0]).float()  # float32 even under bf16: 999 is not a bf16 number
        labels = None if y is None or not self.num_classes else self.drop_labels(y, force_drop_ids)
        return self.unet(x, t, labels)
