"""``DiffusionDataModule``: a dataset zip or folder as a LightningDataModule for every method."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .archive import DatasetError
from .datasets import ImageDataset, LatentDataset, open_dataset
from .longtail import PROFILES, select_longtail
from .seeds import SeedLabelDataset, assign_labels, parse_seeds


class _TrainingView(Dataset):
    """Selected items as model inputs: images as floats in [-1, 1] (optionally x-flipped), or latents drawn
    from their stored posterior, ``scale * (mean + std * eps)``, afresh at every access."""

    def __init__(self, base: ImageDataset | LatentDataset, indices: np.ndarray, xflip: bool) -> None:
        self.base, self.indices, self.xflip = base, indices, xflip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, label = self.base[int(self.indices[index])]
        if isinstance(self.base, LatentDataset):
            mean, std = item.chunk(2)
            return (mean + std * torch.randn_like(std)) * self.base.scale, label
        x = item.float().div_(127.5).sub_(1.0)
        # torch's RNG is seeded per DataLoader worker, so flips differ across workers and epochs.
        if self.xflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` fixed by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so the data order of a resumed run equals that of an
    uninterrupted one (the default ``RandomSampler`` draws from the global RNG instead).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.skip = 0  # indices of this epoch already consumed before a resume
        self._epoch_was_set = False
        self._iterated = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_was_set = epoch, True

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # Under DDP Lightning wraps this sampler and calls set_epoch on the wrapper only: without a set_epoch
        # since the last pass, move to the next epoch ourselves so the order still changes every epoch.
        if self._iterated and not self._epoch_was_set:
            self.epoch += 1
        self._iterated, self._epoch_was_set = True, False
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` of loaders that have one and hands it back on resume, so a run resumed
    from a mid-epoch checkpoint continues with the batches an uninterrupted run would have seen. (Only with
    :class:`EpochShuffleSampler`; under DDP Lightning wraps the sampler and a resume restarts the epoch.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        if self._resume_at and isinstance(self.sampler, EpochShuffleSampler):
            self.sampler.skip = self._resume_at * self.batch_size
        self._batches_yielded, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        # A checkpoint taken after the last batch of an epoch holds a finished epoch: Lightning resumes with the next
        # epoch, which must start from its first batch (skipping a whole epoch's worth would skip that epoch).
        yielded = int(state_dict.get("batches_yielded", 0))
        self._resume_at = 0 if yielded >= len(self) else yielded


class DiffusionDataModule(L.LightningDataModule):
    """Images of a dataset zip or folder, as batches ``(x [B, C, R, R] float in [-1, 1], y [B] int64)``.

    A latent zip (``diffusion-transfer-data encode``) gives batches of scaled VAE latents ``[B, C, h, h]``
    instead, drawn from each image's stored posterior; ``resolution`` and ``channels`` are then the latent's.

    Args:
        path: dataset zip (StyleGAN/EDM format) or image folder.
        resolution: expected image side R; None reads it from the data.
        batch_size: images per batch and per device.
        num_workers: DataLoader worker processes (each opens its own zip handle).
        xflip: random horizontal flips for training.
        val_fraction: share of images held out for validation (seeded by ``seed``); 0 validates on
            the training images (unflipped), which is what sample-grid and FID validation want.
        val_max_images: cap on validation images (a seeded subset), so validation stays cheap on large data.
        longtail_imbalance: if set, train on the long-tailed subset with this tail/head ratio
            (``0.01`` = imbalance ratio 100), built as ``diffusion-transfer-data longtail`` does.
        longtail_profile: ``exp`` or ``step``.
        longtail_seed: seed of the long-tail selection (0 reproduces CIFAR-LT).
        seed: seed of the validation split and of the training data order (per epoch).
        drop_last: drop the last incomplete training batch.
        predict_seeds: seeds of the images ``predict`` generates, e.g. ``"0-63"`` or ``"1,5,9-11"``.
        predict_labels: their classes: None (0, 1, ..., C-1 in turn), one class ``"3"``, or ``"3,7"``
            (repeated in turn).

    Properties read from the data (``num_classes``, ``class_counts``, ``class_prior``,
    ``superclass_of``, ``class_names``, ``resolution``, ``channels``) are available right after
    construction, so the CLI can link them into the model; unlabelled data has ``num_classes == 0``
    and labels ``-1``.
    """

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        xflip: bool = False,
        val_fraction: float = 0.0,
        val_max_images: int | None = 256,
        longtail_imbalance: float | None = None,
        longtail_profile: str = "exp",
        longtail_seed: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        predict_seeds: str = "0-15",
        predict_labels: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if longtail_profile not in PROFILES:
            raise DatasetError(f"unknown longtail_profile '{longtail_profile}'; choose one of {', '.join(PROFILES)}")
        if batch_size < 1:
            raise DatasetError(f"batch_size must be positive, got {batch_size}")
        path = os.fspath(path)  # a str, so checkpoints load with torch.load(weights_only=True)
        # ``resolution`` is the model's hyper-parameter (linked from this module); saving it here too would make
        # Lightning refuse the run whenever it is left to None and read from the data.
        self.save_hyperparameters(ignore=["resolution"])
        self.expected_resolution = resolution
        self.path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.xflip = xflip
        self.drop_last = drop_last

    # The dataset is opened on first use (not in __init__) so that a datamodule can be built cheaply and
    # pickled to spawned processes; properties trigger it because the CLI links them before setup().
    @cached_property
    def dataset(self) -> ImageDataset | LatentDataset:
        """The full underlying dataset: :class:`ImageDataset`, or :class:`LatentDataset` for latent zips."""
        dataset = open_dataset(self.path, self.expected_resolution)
        if isinstance(dataset, LatentDataset) and self.xflip:
            raise DatasetError(f"{self.path}: xflip cannot flip VAE latents; set xflip false (DiT flips images "
                               "before encoding: encode a flipped copy of the data instead)")
        return dataset

    @cached_property
    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        hp = self.hparams
        indices = np.arange(len(self.dataset))
        if hp.longtail_imbalance is not None:
            if self.dataset.labels is None:
                raise DatasetError(f"{self.path}: has no labels; long-tail options need a labelled dataset")
            indices = select_longtail(self.dataset.labels, self.dataset.num_classes, hp.longtail_imbalance,
                                      hp.longtail_profile, hp.longtail_seed).indices
        order = np.random.RandomState(hp.seed).permutation(len(indices))
        if hp.val_fraction == 0.0:
            train, val = indices, indices[order]
        else:
            n_val = max(1, int(round(hp.val_fraction * len(indices))))
            train, val = np.sort(indices[order[n_val:]]), indices[order[:n_val]]
        return train, np.sort(val[: hp.val_max_images])

    @property
    def train_indices(self) -> np.ndarray:
        """int64 positions of the training images in the dataset."""
        return self._splits[0]

    @property
    def resolution(self) -> int:
        return self.dataset.resolution

    @property
    def channels(self) -> int:
        return self.dataset.channels

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def class_counts(self) -> list[int]:
        """Training images per class ``[num_classes]`` (after any long-tail selection)."""
        labels = self.dataset.labels
        if labels is None:
            return []
        return np.bincount(labels[self.train_indices], minlength=self.num_classes).tolist()

    @property
    def class_prior(self) -> torch.Tensor:
        """float32 ``[num_classes]`` training label frequencies (sums to 1)."""
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        return (counts / counts.sum()).float()

    @property
    def superclass_of(self) -> list[int] | None:
        """Superclass index of each class ``[num_classes]``, or None when the data has no hierarchy."""
        return self.dataset.collection.classes.superclasses

    @property
    def class_names(self) -> list[str] | None:
        return self.dataset.collection.classes.class_names

    def setup(self, stage: str | None = None) -> None:
        train, val = self._splits
        if stage in (None, "fit") and self.drop_last and len(train) < self.batch_size:
            raise DatasetError(f"{self.path}: {len(train)} training images is fewer than batch_size "
                               f"{self.batch_size}; lower batch_size or set drop_last false")
        self.train_set = _TrainingView(self.dataset, train, self.xflip)
        self.val_set = _TrainingView(self.dataset, val, xflip=False)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        sampler = EpochShuffleSampler(len(dataset), self.hparams.seed) if shuffle else None
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "train_set"):
            self.setup("fit")
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def predict_dataloader(self) -> DataLoader:
        """``(seed, label)`` items, ``batch_size`` per batch, loaded by ``num_workers`` workers; images depend on their
        seed only (see :mod:`~diffusion_transfer.data.seeds`)."""
        seeds = parse_seeds(self.hparams.predict_seeds)
        labels = assign_labels(len(seeds), self.num_classes, self.hparams.predict_labels)
        return DataLoader(SeedLabelDataset(seeds, labels), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if not hasattr(self, "val_set"):
            self.setup("validate")
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """The validation images (the held-out split): ``test`` reports losses and sample metrics on them."""
        return self.val_dataloader()
