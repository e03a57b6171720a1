"""``ReplayBank``: samples of a pre-trained model, drawn at random as replay rows (Diff-Tuning's knowledge bank).

A bank is an ordinary dataset: the image zip that ``diffusion-transfer predict --writer.zip_path`` writes
(``configs/difftuning/bank.yaml``), or that zip encoded with ``diffusion-transfer-data encode`` for latent models.
Its labels are never used: replay rows always train the null label.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from .archive import DatasetError
from .datamodule import _TrainingView
from .datasets import LatentDataset, open_dataset

_REBUILD = "or build the bank again with `diffusion-transfer predict --config configs/difftuning/bank.yaml`"


class ReplayBank:
    """Random replay inputs from a bank, in the model's space (images in [-1, 1], or scaled VAE latents).

    Args:
        path: bank zip or folder.
        resolution, channels: what the model takes; a bank of another size is refused.
        xflip: random horizontal flips, as the reference applies to both batches (images only: latents
            cannot be flipped, so encode a flipped copy instead).

    :meth:`draw` takes its indices, flips and latent noise from torch's global RNG, which the training step
    seeds by (seed, step, rank): every rank replays different samples and a resumed run replays the same ones.
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int, channels: int, xflip: bool = True) -> None:
        if not os.path.exists(path):
            raise DatasetError(f"replay bank {path}: no such file; build it with `diffusion-transfer predict "
                               "--config configs/difftuning/bank.yaml` (see its header)")
        try:
            dataset = open_dataset(path)
        except DatasetError as err:  # a truncated or corrupt bank: the data layer's message, plus how to rebuild it
            raise DatasetError(f"replay bank: {err}; {_REBUILD}") from None
        found = (dataset.channels, dataset.resolution)
        if found != (channels, resolution):
            raise DatasetError(f"replay bank {path}: holds {found[0]}x{found[1]}x{found[1]} samples but the model "
                               f"takes {channels}x{resolution}x{resolution}; build the bank with the pre-trained "
                               "model of this data (and encode it with the same VAE for latent models)")
        if xflip and isinstance(dataset, LatentDataset):
            raise DatasetError(f"replay bank {path}: holds VAE latents, which cannot be flipped; set "
                               "replay_xflip false (or encode a flipped copy of the bank images)")
        self.path = os.fspath(path)
        self.items = _TrainingView(dataset, np.arange(len(dataset)), xflip)

    def __len__(self) -> int:
        return len(self.items)

    def draw(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` samples drawn uniformly with replacement: float ``[n, C, R, R]`` on ``device``."""
        indices = torch.randint(len(self.items), (n,)).tolist()
        try:
            rows = [self.items[i][0] for i in indices]
        except DatasetError as err:  # a damaged entry (its CRC-32 is checked when it is read)
            raise DatasetError(f"replay bank: {err}; {_REBUILD}") from None
        return torch.stack(rows).to(device)
