"""Metrics against math: FID, KID, precision/recall, IS, per-class and tail FID, reference statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffusion_transfer.metrics import (
    FeatureMoments,
    GeneratedFeatures,
    MetricError,
    ReferenceStats,
    ScoreOptions,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mean_and_covariance,
    polynomial_mmd,
    precision_recall,
    quantize,
    score,
    tail_classes,
)


def gaussian_features(n: int, mu: np.ndarray, sigma: np.ndarray, seed: int) -> np.ndarray:
    """``n`` vectors whose sample mean and (unbiased) covariance are exactly ``mu`` and ``sigma``."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return z @ np.linalg.cholesky(sigma).T + mu


def random_covariance(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).standard_normal((200, 16)) * 3 + 1
    stats = mean_and_covariance(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_two_gaussian_feature_sets_equals_the_closed_form() -> None:
    # Covariances sharing eigenvectors Q: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 8
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))
    a, b = np.linspace(0.5, 4.0, d), np.linspace(3.0, 0.2, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = gaussian_features(500, mu1, q @ np.diag(a) @ q.T, seed=2)
    y = gaussian_features(700, mu2, q @ np.diag(b) @ q.T, seed=3)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(*mean_and_covariance(x), *mean_and_covariance(y)) == pytest.approx(closed_form, rel=1e-9)


def test_fid_equals_a_direct_scipy_computation() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    y = rng.standard_normal((250, 12)) @ rng.standard_normal((12, 12)) + 0.3
    (mu1, s1), (mu2, s2) = mean_and_covariance(x), mean_and_covariance(y)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


class _Identity(nn.Module):
    """A 'feature network' that returns its input: torchmetrics then measures raw feature vectors."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fid_and_kid_agree_with_torchmetrics() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(5)
    real = rng.standard_normal((120, 6))
    fake = rng.standard_normal((120, 6)) * 1.3 + 0.2
    fid = FrechetInceptionDistance(feature=_Identity(6))
    fid.update(torch.from_numpy(real).float(), real=True)
    fid.update(torch.from_numpy(fake).float(), real=False)
    real, fake = real.astype(np.float32), fake.astype(np.float32)
    ours = frechet_distance(*mean_and_covariance(real), *mean_and_covariance(fake))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-5)
    # One subset holding every vector: no randomness left, the unbiased MMD of the whole sets.
    kid = KernelInceptionDistance(feature=_Identity(6), subsets=1, subset_size=120)
    kid.update(torch.from_numpy(real).float(), real=True)
    kid.update(torch.from_numpy(fake).float(), real=False)
    assert polynomial_mmd(real, fake) == pytest.approx(
        float(kid.compute()[0]), rel=1e-4)


def test_too_few_images_for_the_feature_size_is_a_clear_error() -> None:
    rng = np.random.default_rng(6)
    generated = {"features": rng.standard_normal((10, 16)).astype(np.float32), "labels": np.full(10, -1),
                 "logits": np.zeros((10, 0), np.float32), "index": np.arange(10)}
    reference = ReferenceStats(*mean_and_covariance(rng.standard_normal((100, 16))), num_images=100)
    with pytest.raises(MetricError, match="10 images for 16-dimensional features.*at least 17"):
        score(generated, reference)


def test_kid_is_unbiased() -> None:
    # Linear kernel k(x, y) = x.y: the population MMD^2 is |mu_x - mu_y|^2 exactly. The unbiased estimate must
    # average to it; the biased one (with the diagonal) would sit higher by (tr S_x + tr S_y) / m = 0.6 here.
    rng = np.random.default_rng(7)
    mu_x, mu_y, m = np.array([0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0]), 10
    estimates = [polynomial_mmd(rng.standard_normal((m, 3)) + mu_x, rng.standard_normal((m, 3)) + mu_y,
                                degree=1, gamma=1.0, coef=0.0) for _ in range(4000)]
    standard_error = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - 2.0) < 4 * standard_error
    # Same distribution: KID centres on 0 (and can be negative).
    same = [kernel_inception_distance(rng.standard_normal((40, 4)), rng.standard_normal((40, 4)), subsets=1,
                                      subset_size=40)[0] for _ in range(400)]
    assert abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(len(same)) and min(same) < 0


def test_precision_recall() -> None:
    rng = np.random.default_rng(8)
    real = rng.standard_normal((200, 5))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # Half the generated set on the real manifold, half far away: precision 1/2; recall stays 1 because the
    # on-manifold half covers each real point within the generated k-NN radius.
    half = np.concatenate([real[:100], far[:100]])
    precision, _ = precision_recall(real, half)
    assert precision == 0.5


def test_inception_score_bounds() -> None:
    assert inception_score(np.zeros((100, 7)), splits=2)[0] == pytest.approx(1.0)
    confident = np.full((100, 5), -1e4)
    confident[np.arange(100), np.arange(100) % 5] = 0.0  # certain and balanced over 5 classes: IS = 5
    assert inception_score(confident, splits=4)[0] == pytest.approx(5.0, rel=1e-6)


def _reference_of(features: np.ndarray, labels: np.ndarray, num_classes: int) -> ReferenceStats:
    moments = FeatureMoments(features.shape[1], num_classes)
    moments.update(torch.from_numpy(features), torch.from_numpy(labels))
    return moments.to_stats(features=features.astype(np.float32), labels=labels)


def test_per_class_and_tail_fid_equal_fid_restricted_to_those_classes() -> None:
    rng = np.random.default_rng(9)
    num_classes, d = 4, 3
    real_labels = np.repeat(np.arange(num_classes), 50)
    real = rng.standard_normal((200, d)) + real_labels[:, None]
    fake_labels = np.repeat(np.arange(num_classes), 30)
    fake = rng.standard_normal((120, d)) * 1.2 + fake_labels[:, None] * 0.8
    logits = np.eye(num_classes)[fake_labels] * 5
    logits[:30] = np.eye(num_classes)[1] * 5  # class 0 is always predicted as 1: accuracy 3/4
    generated = {"features": fake, "labels": fake_labels, "logits": logits, "index": np.arange(120)}
    reference = _reference_of(real, real_labels, num_classes)
    assert reference.num_images == 200
    np.testing.assert_allclose(reference.mu, real.mean(0), rtol=1e-12)
    np.testing.assert_allclose(reference.sigma, np.cov(real, rowvar=False), rtol=1e-10)
    counts = [100, 50, 10, 40]  # training counts: the rarest 50% are classes 2 and 3
    results = score(generated, reference, ScoreOptions(tail_fraction=0.5), class_counts=counts, num_classes=4)
    for c in range(num_classes):
        expected = frechet_distance(*mean_and_covariance(fake[fake_labels == c]),
                                    *mean_and_covariance(real[real_labels == c]))
        assert results[f"fid_class/{c}"] == pytest.approx(expected, rel=1e-9)
    tail = np.isin(fake_labels, [2, 3]), np.isin(real_labels, [2, 3])
    expected_tail = frechet_distance(*mean_and_covariance(fake[tail[0]]), *mean_and_covariance(real[tail[1]]))
    assert results["fid_tail"] == pytest.approx(expected_tail, rel=1e-9)
    assert results["accuracy"] == 0.75
    assert results["fid"] == pytest.approx(frechet_distance(*mean_and_covariance(fake), *mean_and_covariance(real)))


def test_tail_classes_are_the_rarest() -> None:
    assert tail_classes([5, 1, 9, 1, 3], 0.4) == [1, 3]
    assert tail_classes([5, 1, 9, 1, 3], 0.5) == [1, 3, 4]


def test_reference_file_roundtrip_and_foreign_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    features, labels = rng.standard_normal((50, 4)), np.arange(50) % 2
    stats = _reference_of(features, labels, 2)
    stats.feature_network, stats.resolution = "classifier-abc", 16
    loaded = ReferenceStats.load(stats.save(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.class_outer, stats.class_outer)
    assert (loaded.num_images, loaded.feature_network, loaded.resolution) == (50, "classifier-abc", 16)
    loaded.check_compatible("classifier-abc", 4, 16, "ref.npz")
    with pytest.raises(MetricError, match="made with feature network 'classifier-abc', not 'inception"):
        loaded.check_compatible("inception-v3-tf-2015-12-05", 4, 16, "ref.npz")
    with pytest.raises(MetricError, match="4-dimensional but the feature network gives 2048"):
        loaded.check_compatible("classifier-abc", 2048, 16, "ref.npz")
    with pytest.raises(MetricError, match="16x16 images but the generated images are 32x32"):
        loaded.check_compatible("classifier-abc", 4, 32, "ref.npz")
    # An ADM/EDM reference file: mu and sigma only.
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)
    foreign = ReferenceStats.load(tmp_path / "adm.npz")
    assert foreign.feature_network is None and foreign.features is None
    with pytest.raises(MetricError, match="no per-class statistics"):
        foreign.class_moments([0])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MetricError, match="bad.npz: not a readable .npz"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_generated_features_are_ordered_by_seed_index() -> None:
    metric = GeneratedFeatures()
    features = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    metric.update(torch.tensor([4, 5, 0]), torch.tensor([1, 1, 0]), features[[4, 5, 0]], None)
    metric.update(torch.tensor([2, 1, 3]), torch.tensor([0, 0, 1]), features[[2, 1, 3]], None)
    out = metric.compute()
    np.testing.assert_array_equal(out["index"], np.arange(6))
    np.testing.assert_array_equal(out["features"], features.numpy())


def test_quantize_follows_the_evaluation_rule() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(quantize(pixels.float() / 127.5 - 1.0), pixels)  # dataset float -> same uint8
    assert quantize(torch.tensor([-2.0, 2.0, 0.0])).tolist() == [0, 255, 128]
    assert quantize(pixels) is pixels


def test_inception_features_from_a_local_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from diffusion_transfer.metrics import InceptionFeatures, load_feature_network

    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        InceptionFeatures(tmp_path / "missing.pth")
    # A weights file of the right layout with random values (the real one cannot be downloaded here).
    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        random_network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(random_network.state_dict(), tmp_path / "weights.pth")
    network = load_feature_network(f"inception:{tmp_path / 'weights.pth'}")
    assert network.network_id == "inception-v3-tf-2015-12-05" and network.resolution is None
    assert not any(p.requires_grad for p in network.parameters()) and not network.train().training
    features, logits = network(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))  # gray, any size
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
