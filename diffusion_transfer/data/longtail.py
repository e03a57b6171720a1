"""Long-tailed subsets as CBDM and T2H build CIFAR-10/100-LT (LDAM-DRW convention, longtail.md 2.1).

Class c (0-indexed, C classes, class 0 the head) keeps

- ``exp``:  n_c = int(n_max * r ** (c / (C - 1)))
- ``step``: n_c = int(n_max) for the first C // 2 classes, int(n_max * r) for the others

with r the tail/head ratio (``imbalance=0.01`` is "imbalance ratio 100") and n_max = N / C, the mean
class size (5000 on CIFAR-10). Which images are kept: for each class in ascending order, that class's
indices in dataset order are shuffled by one ``np.random.RandomState(seed)`` and the first n_c kept.
This reproduces the originals' ``np.random.seed(0)`` + ``np.random.shuffle`` subset exactly without
touching the global NumPy RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .archive import DatasetError, write_dataset_zip
from .datasets import ImageDataset

PROFILES = ("exp", "step")


def longtail_counts(num_classes: int, n_max: float, imbalance: float, profile: str = "exp") -> list[int]:
    """Images kept per class, ``[num_classes]`` (see module docstring for the formulas)."""
    if not 0.0 < imbalance <= 1.0:
        raise DatasetError(f"--imbalance is the tail/head ratio in (0, 1], e.g. 0.01 for ratio 100; got {imbalance}")
    if num_classes < 2:
        raise DatasetError(f"a long-tailed subset needs at least 2 classes, got {num_classes}")
    if profile == "exp":
        return [int(n_max * imbalance ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if profile == "step":
        # The original appends C // 2 entries twice, which drops the last class when C is odd; we give
        # every class past the first half the tail count instead.
        return [int(n_max) if c < num_classes // 2 else int(n_max * imbalance) for c in range(num_classes)]
    raise DatasetError(f"unknown long-tail profile '{profile}'; choose one of {', '.join(PROFILES)}")


@dataclass
class LongTailSelection:
    """Result of :func:`select_longtail`.

    Attributes:
        indices: int64 ``[sum(counts)]`` positions into the source labels, class-major (all kept
            images of class 0 first), each class in its shuffled order, as the originals store them.
        counts: images kept per class ``[C]``.
        requested: the formula's counts ``[C]`` (differs from ``counts`` only where a class had fewer
            images than requested).
        n_max: the head size used in the formula.
    """

    indices: np.ndarray
    counts: list[int]
    requested: list[int]
    n_max: float


def select_longtail(
    labels: np.ndarray, num_classes: int, imbalance: float, profile: str = "exp", seed: int = 0
) -> LongTailSelection:
    """Choose a long-tailed subset of a labelled dataset.

    Args:
        labels: int ``[N]`` class of each image, in dataset order.
        num_classes: C; classes absent from ``labels`` keep 0 images.
        imbalance: tail/head ratio r in (0, 1].
        profile: ``exp`` or ``step``.
        seed: seed of the local ``RandomState`` (0 reproduces the published CIFAR-LT subsets).
    """
    labels = np.asarray(labels)
    n_max = len(labels) / num_classes
    requested = longtail_counts(num_classes, n_max, imbalance, profile)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(requested):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        kept.append(members[:n_c])
    indices = np.concatenate(kept).astype(np.int64)
    return LongTailSelection(indices, [len(k) for k in kept], requested, n_max)


def make_longtail(
    src: str | Path, dest: str | Path, imbalance: float = 0.01, profile: str = "exp", seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the long-tailed subset of the labelled dataset ``src`` to ``dest`` (atomically).

    Class names and hierarchy are kept; ``dataset.json`` records the kept ``class_counts`` and a
    ``longtail`` entry with the source, ratio, profile, seed and n_max. Returns that ``dataset.json``.
    Images are copied as :class:`~diffusion_transfer.data.ImageDataset` serves them (the first image's size and
    RGB or grayscale mode), so an image of another size is an error and the subset is always a readable dataset.
    """
    from tqdm.auto import tqdm

    # Images are read as training reads them (ImageDataset): one size, one mode, each checked as it is copied.
    dataset = ImageDataset(src)
    collection = dataset.collection
    if collection.labels is None:
        raise DatasetError(f"{src}: has no labels; a long-tailed subset needs a labelled dataset")
    if collection.num_classes < 2:
        raise DatasetError(f"{src}: has {collection.num_classes} class(es); a long-tailed subset needs at least 2")
    selection = select_longtail(collection.labels, collection.num_classes, imbalance, profile, seed)
    if not len(selection.indices):
        raise DatasetError(f"{src}: the long-tailed subset is empty: {len(collection)} images over "
                           f"{collection.num_classes} classes (n_max = N / C = {selection.n_max:.2f}) keep no image "
                           "of any class; use a larger dataset or check its labels")

    def images() -> Iterator[tuple[np.ndarray, int]]:
        for i in tqdm(selection.indices.tolist(), desc="longtail", unit="img", disable=not progress):
            image, label = dataset[i]
            array = image.numpy()
            yield (array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)), label

    record = {"source": Path(src).name, "imbalance": imbalance, "profile": profile, "seed": seed,
              "n_max": selection.n_max, "requested_counts": selection.requested}
    return write_dataset_zip(dest, images(), collection.classes, {"longtail": record})
