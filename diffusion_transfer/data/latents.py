"""Pre-encode an image dataset to VAE latents, so latent DiTs train without running the encoder every step.

The zip stores, per image, the VAE posterior's mean and std (float32 ``[2C, h, w]``, unscaled) as ``.npy``
entries, plus a ``latents`` record in ``dataset.json`` (scale, channels, resolution, image resolution, VAE
folder name). Training draws ``scale * (mean + std * eps)`` afresh each time, which is what DiT's
``latent_dist.sample() * 0.18215`` does on the fly (EDM2 stores latents the same way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nets.vae import LatentCodec
from .archive import UNLABELLED, DatasetError, write_dataset_zip
from .datasets import ImageDataset


def encode_latents(src: str | Path, dest: str | Path, vae: str | Path, batch_size: int = 16,
                   device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Encode the images of ``src`` with the VAE in the local folder ``vae``; write a latent zip to ``dest``.

    Returns the ``dataset.json`` written. The write is atomic (nothing is left behind on error).
    """
    from tqdm.auto import tqdm

    dataset = ImageDataset(src)
    if dataset.channels != 3:
        raise DatasetError(f"{src}: the VAE encodes RGB images, these have {dataset.channels} channel(s); "
                           "convert with `diffusion-transfer-data convert --channels 3`")
    codec = LatentCodec.from_folder(vae).to(device)
    factor = codec.downsampling
    if dataset.resolution % factor:
        raise DatasetError(f"{src}: resolution {dataset.resolution} is not a multiple of the VAE's downsampling "
                           f"{factor}; convert with --resolution {dataset.resolution // factor * factor}")

    def items() -> Iterator[tuple[np.ndarray, int | None]]:
        for start in tqdm(range(0, len(dataset), batch_size), desc="encode", unit="batch", disable=not progress):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = torch.stack([image for image, _ in batch]).to(device).float().div(127.5).sub(1.0)
            mean, std = codec.moments(images)
            moments = torch.cat([mean, std], dim=1).float().cpu().numpy()
            for array, (_, label) in zip(moments, batch, strict=True):
                yield array, None if label == UNLABELLED else label

    record = {"scale": codec.scale, "channels": codec.latent_channels,
              "resolution": dataset.resolution // codec.downsampling, "image_resolution": dataset.resolution,
              "vae": Path(vae).name, "format": "mean_std"}
    return write_dataset_zip(dest, items(), dataset.collection.classes, {"latents": record}, latents=True)
