"""Metrics: FID, KID, precision/recall, IS, class accuracy, per-class and tail FID; feature networks.

- :mod:`.functional`: the formulas, on feature arrays;
- :mod:`.features`: feature networks (FID Inception-v3 from a local file, :class:`FeatureClassifier`);
- :mod:`.reference`: reference statistics of a dataset, cached as ``.npz`` (ADM/EDM key names);
- :mod:`.evaluation`: generated features gathered across processes, and :func:`score`.

The Lightning side is :class:`~diffusion_transfer.callbacks.GenerativeEvaluation`.
"""

from .evaluation import GeneratedFeatures, ScoreOptions, score, tail_classes
from .features import (
    FeatureClassifier,
    FeatureExtractor,
    InceptionFeatures,
    extract,
    load_feature_classifier,
    load_feature_network,
    quantize,
)
from .functional import (
    MetricError,
    class_accuracy,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mean_and_covariance,
    polynomial_mmd,
    precision_recall,
)
from .reference import FeatureMoments, ReferenceStats, compute_reference_stats

__all__ = [
    "FeatureClassifier", "FeatureExtractor", "FeatureMoments", "GeneratedFeatures", "InceptionFeatures",
    "MetricError", "ReferenceStats", "ScoreOptions", "class_accuracy", "compute_reference_stats", "extract",
    "frechet_distance", "inception_score", "kernel_inception_distance", "load_feature_classifier",
    "load_feature_network", "mean_and_covariance", "polynomial_mmd", "precision_recall", "quantize", "score",
    "tail_classes",
]
