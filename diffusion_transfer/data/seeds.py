"""Predict inputs: one ``(seed, label)`` item per image, EDM-style.

Every image draws its noise from its own ``torch.Generator().manual_seed(seed)`` and its file is named
after the seed, so the output is identical whatever the batch size or the number of devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .archive import UNLABELLED, DatasetError


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Seeds from ``"0-63"``, ``"1,5,9-11"``, an int N (meaning ``0..N-1``) or a list."""
    if isinstance(spec, int):
        return list(range(spec))
    if not isinstance(spec, str):
        return _checked_seeds([int(s) for s in spec], spec)
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise ValueError
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise DatasetError(f"cannot read seeds '{spec}'; write e.g. 0-63 or 1,5,9-11 (ranges go up)") from None
    return _checked_seeds(seeds, spec)


def _checked_seeds(seeds: list[int], spec: object) -> list[int]:
    if not seeds:
        raise DatasetError(f"seeds '{spec}' select no images")
    if len(set(seeds)) != len(seeds):
        # Files are named after their seed: a repeated seed would overwrite its own image.
        raise DatasetError(f"seeds '{spec}' repeat a seed; each image needs its own seed")
    return seeds


def assign_labels(num_images: int, num_classes: int, labels: str | int | Sequence[int] | None) -> list[int]:
    """Class label of each image: ``None``/``"cyclic"`` (0, 1, ..., C-1, 0, ...), one class, or a list.

    Unconditional models (``num_classes == 0``) get the unlabelled marker -1.
    """
    if num_classes == 0:
        return [UNLABELLED] * num_images
    if labels is None or labels == "cyclic":
        return [i % num_classes for i in range(num_images)]
    if isinstance(labels, str):
        try:
            labels = [int(v) for v in labels.split(",")]
        except ValueError:
            raise DatasetError(f"cannot read labels '{labels}'; write class indices, e.g. 3 or 3,7") from None
    elif isinstance(labels, int):
        labels = [labels]
    labels = list(labels)
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise DatasetError(f"label {bad[0]} is outside the model's classes 0..{num_classes - 1}")
    return [labels[i % len(labels)] for i in range(num_images)]


class SeedLabelDataset(Dataset):
    """Items ``(seed, label)`` as int64 scalars."""

    def __init__(self, seeds: Sequence[int], labels: Sequence[int]) -> None:
        if len(seeds) != len(labels):
            raise DatasetError(f"{len(seeds)} seeds but {len(labels)} labels")
        self.seeds, self.labels = list(seeds), list(labels)

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.seeds[index]), torch.tensor(self.labels[index])
