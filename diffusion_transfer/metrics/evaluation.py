"""Generated-sample features gathered across processes, and every metric computed from them at once.

:class:`GeneratedFeatures` is a torchmetrics ``Metric`` whose states are the features, logits, labels and
seed indices of generated images (concatenated across ranks at ``compute()``; sorted by index there, so the
result does not depend on how images were split over processes). :func:`score` turns them, with the
:class:`~diffusion_transfer.metrics.reference.ReferenceStats` of the real data, into a flat dict of metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .functional import (
    MetricError,
    check_enough_images,
    class_accuracy,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mean_and_covariance,
    precision_recall,
)
from .reference import ReferenceStats


class GeneratedFeatures(Metric):
    """Features ``[N, D]``, logits ``[N, K]``, labels ``[N]`` and seed indices ``[N]`` of generated images.

    ``compute()`` is a collective under DDP (every rank must call it) and returns the same arrays on every
    rank, ordered by index.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=True)
        for name in ("index", "labels", "features", "logits"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, labels: Tensor, features: Tensor, logits: Tensor | None) -> None:
        self.index.append(index.long().to(self.device))
        self.labels.append(labels.long().to(self.device))
        self.features.append(features.float().to(self.device))
        self.logits.append((logits if logits is not None else features[:, :0]).float().to(self.device))

    def compute(self) -> dict[str, np.ndarray]:
        arrays = {name: dim_zero_cat(getattr(self, name)).cpu() for name in ("index", "labels", "features", "logits")}
        order = arrays["index"].argsort()
        return {name: value[order].numpy() for name, value in arrays.items()}


@dataclass
class ScoreOptions:
    """What :func:`score` computes besides FID (see :class:`~diffusion_transfer.callbacks.GenerativeEvaluation`)."""

    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    precision_recall: bool = True
    nearest_k: int = 3
    inception_score: bool = True
    per_class: bool = True
    tail_fraction: float = 0.3
    seed: int = 0


def tail_classes(class_counts: Sequence[int], fraction: float) -> list[int]:
    """The rarest ``ceil(fraction * C)`` classes by training count (ties broken by class index)."""
    counts = np.asarray(class_counts)
    size = int(np.ceil(fraction * len(counts)))
    order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
    return sorted(order[:size])


def _fid_of(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, num_reference: int | None, what: str) -> float:
    check_enough_images(len(features), features.shape[1], f"{what} (generated)")
    if num_reference is not None:
        check_enough_images(num_reference, features.shape[1], f"{what} (reference)")
    return frechet_distance(*mean_and_covariance(features), mu, sigma)


def score(generated: dict[str, np.ndarray], reference: ReferenceStats, options: ScoreOptions | None = None,
          class_counts: Sequence[int] | None = None, num_classes: int = 0) -> dict[str, float | str]:
    """All metrics of generated features against a reference.

    Args:
        generated: :meth:`GeneratedFeatures.compute` output.
        reference: statistics of the real data (same feature network).
        options: which extra metrics to compute.
        class_counts: training images per class (for the tail); default: the reference's per-class counts.
        num_classes: classes of the generator (0 = unconditional: no accuracy or per-class FID).

    Returns:
        ``fid``; ``kid``/``kid_std`` and ``precision``/``recall`` when the reference keeps raw features;
        ``inception_score``/``inception_score_std`` when the network has logits; for class-conditional
        samples ``accuracy`` (when the network classifies the same classes), ``fid_class/<c>`` per class,
        ``fid_class_mean`` and ``fid_tail`` (the rarest ``tail_fraction`` of classes, pooled).
    """
    options = options or ScoreOptions()
    features, labels, logits = generated["features"], generated["labels"], generated["logits"]
    results: dict[str, float | str] = {"num_images": float(len(features))}
    results["fid"] = _fid_of(features, reference.mu, reference.sigma, reference.num_images, "FID")
    if options.kid and reference.features is not None:
        results["kid"], results["kid_std"] = kernel_inception_distance(
            reference.features, features, options.kid_subsets, options.kid_subset_size, seed=options.seed)
    if options.precision_recall and reference.features is not None:
        results["precision"], results["recall"] = precision_recall(reference.features, features, options.nearest_k)
    if options.inception_score and logits.shape[1] > 1:
        results["inception_score"], results["inception_score_std"] = inception_score(logits)
    conditional = num_classes > 0 and len(labels) and labels.min() >= 0
    if conditional and logits.shape[1] == num_classes:
        results["accuracy"] = class_accuracy(logits, labels)
    if conditional and options.per_class and reference.class_sum is not None:
        per_class = []
        for c in range(num_classes):
            mu, sigma, count = reference.class_moments([c])
            mine = features[labels == c]
            if len(mine) > features.shape[1] and count > features.shape[1]:
                per_class.append(frechet_distance(*mean_and_covariance(mine), mu, sigma))
                results[f"fid_class/{c}"] = per_class[-1]
        if per_class:
            results["fid_class_mean"] = float(np.mean(per_class))
        counts = class_counts if class_counts is not None else reference.class_counts
        tail = tail_classes(counts, options.tail_fraction)
        mu, sigma, count = reference.class_moments(tail)
        try:
            results["fid_tail"] = _fid_of(features[np.isin(labels, tail)], mu, sigma, count,
                                          f"tail FID (classes {tail})")
        except MetricError as err:
            results["fid_tail_error"] = str(err)  # reported, not raised: the other metrics stay valid
    return results


def split_for_rank(items: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Positions of ``items`` that process ``rank`` of ``world_size`` evaluates: every world_size-th one.

    Nothing is padded or repeated (unlike a DistributedSampler), so each image is counted exactly once.
    """
    return list(range(rank, len(items), world_size))

