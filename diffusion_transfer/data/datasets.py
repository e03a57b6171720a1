"""Torch datasets over dataset zips and image folders: ``(uint8 [C, H, W], int64 label)`` items."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .archive import UNLABELLED, DatasetError, ImageCollection, to_mode

_CHANNELS_OF_MODE = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1}
#: A dataset whose decoded pixels fit in this many bytes keeps each image in memory after its first read. On small
#: images, decoding one PNG per item is most of the loader's time (a 16-px shapes zip: 3 MB decoded, and 4 of the
#: 85 ms of a demo training step went to decoding); a DataLoader worker keeps its own copy.
MAX_CACHED_BYTES = 256 * 2**20


class _CollectionDataset(Dataset):
    """What image and latent datasets share: an :class:`ImageCollection` with its labels and classes."""

    collection: ImageCollection

    @property
    def path(self) -> Path:
        return self.collection.source

    @property
    def labels(self) -> np.ndarray | None:
        """int64 ``[N]`` class labels, or None when unlabelled."""
        return self.collection.labels

    @property
    def num_classes(self) -> int:
        return self.collection.num_classes

    @property
    def class_counts(self) -> list[int]:
        return self.collection.class_counts

    def __len__(self) -> int:
        return len(self.collection)

    def _label(self, index: int) -> int:
        labels = self.collection.labels
        return UNLABELLED if labels is None else int(labels[index])


class ImageDataset(_CollectionDataset):
    """Images of a dataset zip or folder as uint8 ``[C, R, R]`` tensors with int64 labels.

    Args:
        path: dataset zip or image folder (see :mod:`diffusion_transfer.data.archive` for layouts).
        resolution: expected side R in pixels; None takes it from the first image. Every image is
            checked against it when loaded.
        channels: 1 or 3; None takes it from the first image (grayscale -> 1, anything else -> 3).
            Images of another mode (RGBA, palette, ...) are converted.

    Items are ``(image, label)``; ``label`` is ``-1`` (:data:`UNLABELLED`) for unlabelled datasets.
    The zip handle is opened lazily in each DataLoader worker, so the dataset is fork- and pickle-safe. A dataset of
    at most :data:`MAX_CACHED_BYTES` decoded pixels keeps each image after its first read (checked once, like any).
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int | None = None, channels: int | None = None):
        self.collection = ImageCollection.open(path)
        if self.collection.latents:
            raise DatasetError(f"{path}: holds VAE latents, not images; read it with LatentDataset (or "
                               "DiffusionDataModule, which picks the right one)")
        first = self.collection.load(0)
        found = 1 if first.mode in _CHANNELS_OF_MODE else 3
        if channels not in (None, 1, 3):
            raise DatasetError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels or found
        self.resolution = resolution or first.size[0]
        self._mode = "L" if self.channels == 1 else "RGB"
        self._check_size(0, first.size)
        fits = len(self) * self.channels * self.resolution ** 2 <= MAX_CACHED_BYTES
        self._cache: list[torch.Tensor | None] | None = [None] * len(self) if fits else None

    def _check_size(self, index: int, size: tuple[int, int]) -> None:
        if size != (self.resolution, self.resolution):
            raise DatasetError(
                f"{self.collection.where(index)}: image is {size[0]}x{size[1]}, expected "
                f"{self.resolution}x{self.resolution}; convert the dataset with `diffusion-transfer-data convert "
                f"SRC DEST.zip --resolution {self.resolution}` (add --transform center-crop for non-square images)"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        cached = self._cache[index] if self._cache is not None else None
        if cached is not None:
            return cached.clone(), self._label(index)  # the caller may write into its item; the cache stays intact
        image = self.collection.load(index)
        self._check_size(index, image.size)
        array = np.asarray(to_mode(image, self._mode), dtype=np.uint8)  # read-only: it shares PIL's buffer
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        item = torch.from_numpy(array.copy())  # a writable, contiguous copy
        if self._cache is None:
            return item, self._label(index)
        self._cache[index] = item
        return item.clone(), self._label(index)


class ZipImageDataset(ImageDataset):
    """:class:`ImageDataset` over a StyleGAN/EDM dataset zip (labels from its ``dataset.json``)."""

    def __init__(self, path: str | os.PathLike[str], resolution: int | None = None, channels: int | None = None):
        if Path(path).is_dir():
            raise DatasetError(f"{path}: is a folder; use ImageFolderDataset, or pack it with "
                               "`diffusion-transfer-data convert`")
        super().__init__(path, resolution, channels)


class ImageFolderDataset(ImageDataset):
    """:class:`ImageDataset` over a folder: ``class/img``, ``superclass/class/img``, flat, or with a dataset.json."""

    def __init__(self, path: str | os.PathLike[str], resolution: int | None = None, channels: int | None = None):
        if Path(path).exists() and not Path(path).is_dir():
            raise DatasetError(f"{path}: is a file, not a folder; use ZipImageDataset for dataset zips")
        super().__init__(path, resolution, channels)


class LatentDataset(_CollectionDataset):
    """A latent zip written by ``diffusion-transfer-data encode``: VAE posterior moments per image.

    Items are ``(moments, label)`` with ``moments`` float32 ``[2C, h, w]``: the posterior mean in the first C
    channels and its std in the last C (unscaled). Draw ``scale * (mean + std * eps)`` per use, as DiT draws
    ``latent_dist.sample()`` at every step; :class:`~diffusion_transfer.data.DiffusionDataModule` does this.

    Attributes:
        channels: C; resolution: h (= w); scale: the latent scale (SD VAE: 0.18215).
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int | None = None) -> None:
        self.collection = ImageCollection.open(path)
        record = self.collection.latents
        if not record:
            raise DatasetError(f"{path}: holds images, not latents; encode it with `diffusion-transfer-data encode`")
        try:
            self.channels, self.resolution = int(record["channels"]), int(record["resolution"])
            self.scale = float(record["scale"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: dataset.json 'latents' needs channels, resolution and scale; re-create "
                               "it with `diffusion-transfer-data encode`") from None
        if resolution is not None and resolution != self.resolution:
            raise DatasetError(f"{path}: latents are {self.resolution}x{self.resolution}, expected {resolution}; "
                               "encode images of the matching size")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        moments = self.collection.load_array(index)
        expected = (2 * self.channels, self.resolution, self.resolution)
        if moments.shape != expected:
            raise DatasetError(f"{self.collection.where(index)}: latent moments have shape {moments.shape}, expected "
                               f"{expected}; re-create the zip with `diffusion-transfer-data encode`")
        return torch.from_numpy(moments.astype(np.float32, copy=False)), self._label(index)


def open_dataset(path: str | os.PathLike[str], resolution: int | None = None) -> ImageDataset | LatentDataset:
    """:class:`LatentDataset` for latent zips, :class:`ImageDataset` for images."""
    collection = ImageCollection.open(path)
    return LatentDataset(path, resolution) if collection.latents else ImageDataset(path, resolution)
