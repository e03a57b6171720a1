"""The metrics as pure functions of feature arrays: FID, KID, precision/recall, Inception Score, accuracy.

Everything here is float64 numpy or torch on CPU, with no Lightning and no networks, so each formula can be
checked against its definition. :mod:`diffusion_transfer.metrics.evaluation` feeds them features of
generated and reference images.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class MetricError(ValueError):
    """A metric cannot be computed from what it was given (too few images, mismatched statistics, ...)."""


def check_enough_images(num_images: int, num_features: int, what: str) -> None:
    """Refuse a Fréchet distance whose covariance would be rank-deficient (it is then biased, or NaN).

    FID needs more images than feature dimensions for a full-rank covariance; with fewer, the matrix square
    root is ill-posed and implementations return NaN or complex numbers.
    """
    if num_images <= num_features:
        raise MetricError(
            f"{what}: {num_images} images for {num_features}-dimensional features; a Fréchet distance needs at "
            f"least {num_features + 1} (the standard protocol uses 50,000 for Inception's 2048) - raise the "
            "number of images, or evaluate with a feature network of fewer dimensions"
        )


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, D]`` features -> mean ``[D]`` and unbiased covariance ``[D, D]`` (float64)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    The trace of ``(S1 S2)^(1/2)`` equals the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``S1^(1/2) S2 S1^(1/2)``, so it is computed with two symmetric eigendecompositions: always real,
    no complex round-off to discard (scipy's ``sqrtm`` route needs that), and equal to it where it is defined.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    if not math.isfinite(distance):
        raise MetricError("the Fréchet distance is not finite: the features contain NaN or Inf")
    return max(distance, 0.0)  # round-off can leave -1e-12 for identical statistics


def polynomial_mmd(real: np.ndarray, fake: np.ndarray, degree: int = 3, gamma: float | None = None,
                   coef: float = 1.0) -> float:
    """Unbiased MMD^2 of two equal-size sets with the kernel ``k(x, y) = (gamma x.y + coef)^degree``.

    ``gamma`` defaults to ``1 / D`` (KID's choice). The diagonal terms ``k(x_i, x_i)`` are left out of the
    within-set means, which is what makes the estimate unbiased (it can be slightly negative).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = real.shape[0]
    if m < 2 or fake.shape[0] != m:
        raise MetricError(f"KID needs two sets of equal size >= 2, got {real.shape[0]} and {fake.shape[0]}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    k_xx = (gamma * real @ real.T + coef) ** degree
    k_yy = (gamma * fake @ fake.T + coef) ** degree
    k_xy = (gamma * real @ fake.T + coef) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`polynomial_mmd` over random subsets (without replacement).

    ``subset_size`` is capped at the smaller set. The subsets come from ``numpy.random.default_rng(seed)``, so
    the value is reproducible; the inputs must be in a fixed order (the evaluation sorts them by seed).
    """
    size = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd(real[rng.choice(len(real), size, replace=False)],
                             fake[rng.choice(len(fake), size, replace=False)], degree) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radius(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row ``[N]`` (row i itself is the 0-th)."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start:start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each point, whether it lies within ``radii[j]`` of some ``centres[j]`` (bool ``[N]``)."""
    inside = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start:start + chunk], centres)
        inside.append((distances <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    The real manifold is the union of balls around each real feature with radius the distance to its k-th
    nearest real neighbour; precision is the share of fake features inside it. Recall swaps the roles.
    Distances are Euclidean, in float64, computed ``chunk`` rows at a time.
    """
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if min(len(real_t), len(fake_t)) <= k:
        raise MetricError(f"precision/recall with k={k} needs more than {k} images per side, "
                          f"got {len(real_t)} real and {len(fake_t)} generated")
    precision = _inside_any_ball(fake_t, real_t, _kth_neighbour_radius(real_t, k, chunk), chunk).double().mean()
    recall = _inside_any_ball(real_t, fake_t, _kth_neighbour_radius(fake_t, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal parts: mean and std.

    ``logits`` ``[N, K]`` are the classifier's unnormalised log-probabilities (Inception's
    ``logits_unbiased`` for the standard IS, or the :class:`FeatureClassifier` head for small datasets).
    """
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose classifier argmax equals the class they were generated for."""
    predicted = np.asarray(logits).argmax(axis=1)
    return float((predicted == np.asarray(labels)).mean())
