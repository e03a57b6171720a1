"""Reference statistics of a dataset: computed once per (dataset, feature network), cached as ``.npz``.

The file uses the key names of the ADM and EDM reference files (``mu``, ``sigma``), so their published
``.npz`` files load too. Ours add:

- ``num_images``, ``feature_network`` (an id of the network that made the features) and ``resolution``
  (side of the images), used to refuse statistics of another network or resolution;
- ``class_counts``, ``class_sum`` ``[C, D]`` and ``class_outer`` ``[C, D, D]``: exact per-class moments, so
  the statistics of any set of classes (one class, the tail) follow without the images (skipped when
  ``C * D * D`` would exceed :data:`MAX_CLASS_MOMENT_ENTRIES`);
- ``features`` ``[M, D]`` and ``labels`` ``[M]``: a seeded subset of raw features for KID and
  precision/recall, which need samples rather than moments.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io.checkpoint import one_line_reason
from .functional import MetricError

MAX_CLASS_MOMENT_ENTRIES = 1 << 26  # 512 MiB of float64 per-class second moments at most


@dataclass
class ReferenceStats:
    """Feature statistics of a reference image set (see the module docstring for the fields)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    feature_network: str | None = None
    resolution: int | None = None
    class_counts: np.ndarray | None = None
    class_sum: np.ndarray | None = None
    class_outer: np.ndarray | None = None
    features: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceStats:
        """Read ours or an ADM/EDM reference ``.npz`` (only ``mu`` and ``sigma`` are required)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: reference statistics not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {key: data[key] for key in data.files}
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise MetricError(f"{path}: not a readable .npz of reference statistics ({one_line_reason(err)}); delete "
                              "it so it is computed again, or point to another file") from None
        if "mu" not in fields or "sigma" not in fields:
            raise MetricError(f"{path}: reference statistics need arrays 'mu' and 'sigma', found {sorted(fields)}")

        def scalar(key: str, kind: type) -> object:
            return kind(fields[key].item()) if key in fields else None

        return cls(
            mu=fields["mu"].astype(np.float64), sigma=fields["sigma"].astype(np.float64),
            num_images=scalar("num_images", int), feature_network=scalar("feature_network", str),
            resolution=scalar("resolution", int), class_counts=fields.get("class_counts"),
            class_sum=fields.get("class_sum"), class_outer=fields.get("class_outer"),
            features=fields.get("features"), labels=fields.get("labels"),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temporary file renamed into place), so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {key: value for key, value in vars(self).items() if value is not None}
        arrays = {key: np.asarray(value) for key, value in arrays.items()}
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def check_compatible(self, feature_network: str, num_features: int, resolution: int | None, where: str) -> None:
        """Refuse statistics made by another feature network or from images of another resolution."""
        if self.num_features != num_features:
            raise MetricError(f"{where}: reference features are {self.num_features}-dimensional but the feature "
                              f"network gives {num_features}; compute the statistics with the same network")
        if self.feature_network is not None and self.feature_network != feature_network:
            raise MetricError(f"{where}: reference statistics were made with feature network "
                              f"'{self.feature_network}', not '{feature_network}'; delete the file to recompute it "
                              "or point to the right one")
        if None not in (self.resolution, resolution) and self.resolution != resolution:
            raise MetricError(f"{where}: reference statistics are of {self.resolution}x{self.resolution} images "
                              f"but the generated images are {resolution}x{resolution}")

    def class_moments(self, classes: Sequence[int], where: str = "reference") -> tuple[np.ndarray, np.ndarray, int]:
        """Mean ``[D]``, covariance ``[D, D]`` and count of the reference images of ``classes`` (pooled)."""
        if self.class_sum is None or self.class_outer is None or self.class_counts is None:
            raise MetricError(f"{where}: has no per-class statistics (unlabelled data, a foreign reference file, or "
                              f"more than {MAX_CLASS_MOMENT_ENTRIES} per-class moment entries), so per-class and "
                              "tail FID are not available")
        index = np.asarray(list(classes), dtype=np.int64)
        count = int(self.class_counts[index].sum())
        return _moments(self.class_sum[index].sum(0), self.class_outer[index].sum(0), count)


def _moments(total: np.ndarray, outer: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and unbiased covariance from a sum and a sum of outer products over ``count`` vectors."""
    if count < 2:
        return total / max(count, 1), np.zeros_like(outer), count
    mu = total / count
    return mu, (outer - count * np.outer(mu, mu)) / (count - 1), count


class FeatureMoments:
    """Running float64 sums of features (overall and per class), reducible across processes by summing."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        self.total = torch.zeros(num_features, dtype=torch.float64)
        self.outer = torch.zeros(num_features, num_features, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        per_class = 0 < num_classes and num_classes * num_features ** 2 <= MAX_CLASS_MOMENT_ENTRIES
        self.class_count = torch.zeros(num_classes if per_class else 0, dtype=torch.float64)
        self.class_total = torch.zeros(len(self.class_count), num_features, dtype=torch.float64)
        self.class_outer = torch.zeros(len(self.class_count), num_features, num_features, dtype=torch.float64)

    def update(self, features: Tensor, labels: Tensor) -> None:
        features = features.detach().double().cpu()
        self.total += features.sum(0)
        self.outer += features.T @ features
        self.count += len(features)
        for label in labels.unique().tolist() if len(self.class_count) else []:
            part = features[labels.cpu() == label]
            self.class_count[label] += len(part)
            self.class_total[label] += part.sum(0)
            self.class_outer[label] += part.T @ part

    def tensors(self) -> list[Tensor]:
        return [self.total, self.outer, self.count, self.class_count, self.class_total, self.class_outer]

    def to_stats(self, **metadata: object) -> ReferenceStats:
        count = int(self.count)
        mu, sigma, _ = _moments(self.total.numpy(), self.outer.numpy(), count)
        per_class = len(self.class_count) > 0
        return ReferenceStats(
            mu=mu, sigma=sigma, num_images=count,
            class_counts=self.class_count.numpy().astype(np.int64) if per_class else None,
            class_sum=self.class_total.numpy() if per_class else None,
            class_outer=self.class_outer.numpy() if per_class else None,
            **metadata,  # type: ignore[arg-type]
        )


def compute_reference_stats(
    dataset: torch.utils.data.Dataset,
    extract: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    num_features: int,
    num_classes: int,
    feature_network: str,
    resolution: int,
    batch_size: int = 256,
    max_features: int = 10_000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> ReferenceStats:
    """Statistics of every image of ``dataset`` (items ``(uint8 [C, R, R], label)``) under ``extract``.

    Under DDP each of the ``world_size`` processes takes every ``world_size``-th image and the sums are
    all-reduced, so every rank returns the same statistics. ``max_features`` raw features (a subset chosen by
    ``seed``) are kept for KID and precision/recall.
    """
    from tqdm.auto import tqdm

    n = len(dataset)
    kept = np.sort(np.random.default_rng(seed).permutation(n)[:max_features])
    mine = np.arange(rank, n, world_size)
    moments = FeatureMoments(num_features, num_classes)
    kept_features, kept_index, kept_labels = [], [], []
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine.tolist()), batch_size=batch_size)
    offset = 0
    for images, labels in tqdm(loader, desc="reference statistics", disable=not progress or rank != 0):
        features, _ = extract(images)
        features = features.detach().double().cpu()
        moments.update(features, labels)
        index = mine[offset:offset + len(images)]
        keep = np.isin(index, kept)
        kept_features.append(features[torch.from_numpy(keep)])
        kept_index.append(torch.from_numpy(index[keep]))
        kept_labels.append(labels[torch.from_numpy(keep)])
        offset += len(images)
    index, features, labels = (torch.cat(kept_index), torch.cat(kept_features), torch.cat(kept_labels))
    if world_size > 1:
        for tensor in moments.tensors():
            _all_reduce_sum(tensor)
        index, features, labels = (_gather_rows(t) for t in (index, features, labels))
    order = index.argsort()
    return moments.to_stats(feature_network=feature_network, resolution=resolution,
                            features=features[order].float().numpy(), labels=labels[order].numpy())


def _all_reduce_sum(tensor: Tensor) -> None:
    """Sum a CPU tensor over processes in place (NCCL only reduces GPU tensors, so it travels there)."""
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else tensor.device
    reduced = tensor.to(device)
    torch.distributed.all_reduce(reduced)
    tensor.copy_(reduced.cpu())


def _gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate a tensor of rank-dependent length from every process (rank order)."""
    gathered: list[Tensor | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, tensor)
    return torch.cat([t for t in gathered if t is not None])
