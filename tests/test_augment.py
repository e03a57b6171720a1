"""EDM's non-leaking augmentation: the filter, identity at p = 0, each op against its labels, the op rates, seeds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_transfer.diffusion.augment import AUGMENT_DIM, SYM6, AugmentParams, AugmentPipe, warp


def params(n: int = 1, **values) -> AugmentParams:
    """Parameters of n samples, zero (no op) except ``values`` (each given for all n samples)."""
    zero = {"xflip": torch.zeros(n, dtype=torch.int64), "yflip": torch.zeros(n, dtype=torch.int64),
            "scale": torch.zeros(n), "rotate": torch.zeros(n), "aniso": torch.zeros(n), "aniso_angle": torch.zeros(n),
            "translate": torch.zeros(n, 2)}
    for key, value in values.items():
        zero[key] = torch.as_tensor(value, dtype=zero[key].dtype).expand_as(zero[key]).clone()
    return AugmentParams(**zero)


def blob(size: int, cx: float, cy: float, covariance: Tensor) -> Tensor:
    """A Gaussian blob [1, 1, size, size] centred at (cx, cy) (pixels from the image centre, y down)."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    d = torch.stack([x - cx, y - cy], -1)
    return torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(covariance), d))[None, None]


def moments(image: Tensor) -> tuple[Tensor, Tensor]:
    """Centroid [2] (x, y) and covariance [2, 2] of a non-negative image [1, 1, S, S], centred coordinates."""
    size = image.shape[-1]
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    w = image[0, 0].double() / image.sum()
    mean = torch.stack([(w * x).sum(), (w * y).sum()])
    d = torch.stack([x - mean[0], y - mean[1]], -1)
    return mean, torch.einsum("hw,hwi,hwj->ij", w, d, d)


def rotation(angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_sym6_is_an_orthonormal_filter_with_six_vanishing_moments() -> None:
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert float(h.sum()) == pytest.approx(math.sqrt(2), abs=1e-12) and float(h @ h) == pytest.approx(1, abs=1e-11)
    assert all(abs(float(h[: -2 * m] @ h[2 * m:])) < 1e-11 for m in range(1, 6))  # -> up then down is the identity
    k = torch.arange(12, dtype=torch.float64)
    wavelet = h.flip(0) * (-1) ** k  # the high-pass filter annihilates polynomials of degree < 6
    assert all(abs(float(wavelet @ (k / 11) ** j)) < 1e-11 for j in range(6))


def test_p0_is_the_identity_with_zero_labels() -> None:
    x = torch.randn(8, 3, 8, 8)
    out, labels = AugmentPipe(0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and torch.equal(labels, torch.zeros(8, AUGMENT_DIM))
    # Identity resampling (no op) and an op-free row of a batch come back exactly.
    assert torch.allclose(warp(x.double(), torch.eye(2).expand(8, 2, 2), torch.zeros(8, 2)), x.double(), atol=1e-10)
    out, labels = AugmentPipe(0.12)(x, torch.Generator().manual_seed(1))
    for i in range(8):
        if not labels[i, 2:].any():
            flipped = x[i].flip(-1) if labels[i, 0] else x[i]
            assert torch.equal(out[i], flipped.flip(-2) if labels[i, 1] else flipped)


def test_flips_and_their_labels() -> None:
    x, pipe = torch.randn(2, 3, 8, 8), AugmentPipe(0.12)
    out, labels = pipe.apply(x, params(2, xflip=[1, 0], yflip=[0, 1]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1].flip(-2))
    assert labels[0].tolist() == [1] + [0] * 8 and labels[1].tolist() == [0, 1] + [0] * 7


def test_integer_translation_is_exact_and_its_label_is_the_shift() -> None:
    # translate_frac_std 0.125 of 8 pixels: a label of 1 is one pixel. Content moves right by 2 and up by 1.
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    out, labels = AugmentPipe(0.12).apply(x, params(translate=[2.0, -1.0]))
    padded = F.pad(x, [7, 7, 7, 7], mode="reflect")  # the content shifted in from outside is the reflection
    assert torch.allclose(out, padded[..., 7 + 1:7 + 1 + 8, 7 - 2:7 - 2 + 8], atol=1e-10)
    assert labels[0, 7:].tolist() == [2.0, -1.0] and not labels[0, :7].any()
    assert (labels[0, 7:] * 8 * 0.125).tolist() == [2.0, -1.0]  # pixels = label · size · translate_frac_std


def test_quarter_turn_is_a_rot90_of_a_smooth_image() -> None:
    image = blob(16, 3.0, 1.0, torch.eye(2, dtype=torch.float64) * 2.25)
    out, labels = AugmentPipe(0.12).apply(image, params(rotate=math.pi / 2))
    assert labels[0, 3:5].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)  # cos θ - 1, sin θ
    # Anticlockwise on screen (y down): the blob right of the centre goes above it, as torch.rot90(k=1) does.
    assert torch.allclose(out, torch.rot90(image, 1, (2, 3)), atol=0.03)


@pytest.mark.parametrize("values", [
    {"scale": 1.5},
    {"scale": -2.0},
    {"rotate": 0.7},
    {"rotate": -2.4},
    {"aniso": 1.5, "aniso_angle": 0.6},
    {"aniso": 2.0, "aniso_angle": -2.0},
    {"translate": [0.37, -0.8]},
    {"scale": 0.8, "rotate": 1.1, "aniso": 1.2, "aniso_angle": 2.5, "translate": [-0.3, 0.5]},
])
def test_each_transform_moves_a_blob_as_its_labels_say(values: dict) -> None:
    # The forward map rebuilt from the labels alone (scale, then rotation, aniso, translation; papers/edm.md 2.5):
    # a blob's centroid c goes to L c + t and its covariance Σ to L Σ Lᵀ, L = A R(-θ) s.
    size, centre, cov = 24, torch.tensor([2.0, -1.5], dtype=torch.float64), torch.tensor([[2.0, 0.5], [0.5, 1.5]],
                                                                                          dtype=torch.float64)
    out, labels = AugmentPipe(0.12).apply(blob(size, *centre.tolist(), cov), params(**values))
    lab = labels[0].double()
    zoom = 2 ** (0.2 * lab[2])
    theta = math.atan2(float(lab[4]), float(lab[3]) + 1)
    w, r = float(lab[5:7].norm()), math.atan2(float(lab[6]), float(lab[5]))  # w >= 0 in these cases
    stretch = torch.diag(torch.tensor([2 ** (0.2 * w), 2 ** (-0.2 * w)], dtype=torch.float64))
    linear = rotation(-r) @ stretch @ rotation(r) @ rotation(-theta) * zoom
    shift = lab[7:9] * size * 0.125
    mean, covariance = moments(out.clamp(min=0))
    assert torch.allclose(mean, linear @ centre + shift, atol=0.03), (mean, linear @ centre + shift)
    # Interpolation on the 2x grid blurs a little: up to ~0.1 px² more variance, never less.
    excess = covariance - linear @ cov @ linear.T
    assert float(excess.abs().max()) < 0.12 and float(torch.linalg.eigvalsh(excess).min()) > -0.03, excess
    # The labels are the parameters in EDM's layout.
    p = params(**values)
    expected = [0, 0, float(p.scale), math.cos(float(p.rotate)) - 1, math.sin(float(p.rotate)),
                float(p.aniso * p.aniso_angle.cos()), float(p.aniso * p.aniso_angle.sin()), *p.translate[0].tolist()]
    assert labels[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_ops_are_applied_with_their_probability() -> None:
    n, gen = 40_000, torch.Generator().manual_seed(0)
    drawn = AugmentPipe(0.3).draw(n, gen)
    tolerance = 4 * math.sqrt(0.25 / n)  # 4 standard errors
    for name in ("scale", "rotate", "aniso"):
        assert float((getattr(drawn, name) != 0).double().mean()) == pytest.approx(0.3, abs=tolerance)
    assert float((drawn.translate != 0).any(1).double().mean()) == pytest.approx(0.3, abs=tolerance)
    assert float((drawn.aniso_angle != 0).double().mean()) == pytest.approx(0.3, abs=tolerance)
    # Flips: the op picks a random flip; xflip's multiplier 1e8 makes it apply to every sample: half are mirrored.
    assert float(drawn.yflip.double().mean()) == pytest.approx(0.15, abs=tolerance)
    assert float(drawn.xflip.double().mean()) == pytest.approx(0.5, abs=tolerance)
    assert AugmentPipe(0.3).probability("xflip") == 1 and AugmentPipe(0.3, scale=0.5).probability("scale") == 0.15
    off = AugmentPipe(0.3, rotate_frac=0).draw(1000, gen)
    assert not off.rotate.any() and not off.labels()[:, 3:5].any()
    # Geometric parameters follow their laws: scale w ~ N(0, 1), θ ~ U(-π, π), shift w ~ N(0, 1).
    scale = drawn.scale[drawn.scale != 0]
    assert float(scale.mean()) == pytest.approx(0, abs=0.05) and float(scale.std()) == pytest.approx(1, abs=0.05)
    rotate = drawn.rotate[drawn.rotate != 0]
    assert float(rotate.abs().max()) <= math.pi and float(rotate.abs().mean()) == pytest.approx(math.pi / 2, abs=0.05)


def test_deterministic_per_seed_and_the_global_rng_untouched() -> None:
    x, pipe = torch.randn(6, 3, 8, 8), AugmentPipe(0.5)
    state = torch.get_rng_state()
    a_images, a_labels = pipe(x, torch.Generator().manual_seed(3))
    b_images, b_labels = pipe(x, torch.Generator().manual_seed(3))
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert torch.equal(torch.get_rng_state(), state)
    c_images, c_labels = pipe(x, torch.Generator().manual_seed(4))
    assert not torch.equal(a_labels, c_labels) and not torch.equal(a_images, c_images)
    # Without a generator: torch's global RNG, so a seed fixes it too.
    torch.manual_seed(9)
    d = pipe(x)
    torch.manual_seed(9)
    assert all(torch.equal(u, v) for u, v in zip(d, pipe(x)))
    # A bf16 autocast (mixed-precision training) leaves the resampling in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(pipe(x, torch.Generator().manual_seed(3))[0], a_images)
    # A sample's result does not depend on the others in its batch (the padding covers every sample's needs).
    alone, alone_labels = pipe.apply(x[:1], AugmentParams(**{k: v[:1] for k, v in vars(pipe.draw(
        6, torch.Generator().manual_seed(3))).items()}))
    assert torch.allclose(alone, a_images[:1], atol=1e-6) and torch.equal(alone_labels, a_labels[:1])
