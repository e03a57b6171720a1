"""``DCGANGenerator``: a small convolutional generator z -> image (Radford et al. 2016), for data-free distillation.

Diff-Instruct needs nothing of a student but differentiable samples, so a GAN-style generator can be instructed by a
diffusion teacher in place of the teacher-shaped one-step generator (``papers/diff_instruct.md`` 2.5):

    z [B, z_dim] (+ class embedding [B, z_dim])  --linear-->  [B, 2^k c, 4, 4]
    k x (nearest 2x upsample, 3x3 conv, GroupNorm, SiLU)  -->  [B, c, R, R],   R = 4 · 2^k
    3x3 conv, tanh  -->  [B, C, R, R] in (-1, 1)

GroupNorm instead of DCGAN's BatchNorm: an image then depends only on its own latent (and label), never on the
other samples of its batch, and train and eval modes compute the same function. Plain ``nn.Module``, no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DCGANGenerator"]


class DCGANGenerator(nn.Module):
    """Latent -> image generator; optionally class-conditional.

    Args:
        resolution: output side R; must be 4 · 2^k (8, 16, 32, 64, ...).
        channels: output channels C.
        num_classes: classes (0 = unconditional); the label embedding is added to z.
        z_dim: latent size.
        base_channels: channels c of the last (full-resolution) stage; stage i from the end has c · 2^i (at most
            ``max_channels``).
        max_channels: cap on the stage width.

    Attributes:
        latent_shape: ``(z_dim,)``, the shape of one latent z ~ N(0, I).
    """

    def __init__(self, resolution: int = 32, channels: int = 3, num_classes: int = 0, z_dim: int = 64,
                 base_channels: int = 32, max_channels: int = 256) -> None:
        super().__init__()
        stages = (resolution // 4).bit_length() - 1
        if resolution < 8 or 4 * 2**stages != resolution:
            raise ValueError(f"DCGANGenerator: resolution must be 4 · 2^k >= 8 (8, 16, 32, ...), got {resolution}")
        self.resolution, self.channels, self.num_classes, self.z_dim = resolution, channels, num_classes, z_dim
        self.latent_shape = (z_dim,)
        widths = [min(base_channels * 2 ** (stages - i), max_channels) for i in range(stages + 1)]
        self.label_embedding = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.stem = nn.Linear(z_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w_in, w_out, 3, padding=1),
                          nn.GroupNorm(min(8, w_out), w_out), nn.SiLU())
            for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.stem_norm = nn.GroupNorm(min(8, widths[0]), widths[0])
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images ``[B, C, R, R]`` in (-1, 1) from latents ``[B, z_dim]`` and int64 labels ``[B]`` (None / -1: none)."""
        if self.label_embedding is not None and labels is not None:
            # Label -1 ("none") adds nothing: the unconditional latent.
            keep = (labels >= 0).to(z.dtype).unsqueeze(1)
            z = z + keep * self.label_embedding(labels.clamp(min=0))
        h = self.stem(z).view(z.shape[0], -1, 4, 4)
        h = nn.functional.silu(self.stem_norm(h))
        for block in self.blocks:
            h = block(h)
        return torch.tanh(self.out(h))
