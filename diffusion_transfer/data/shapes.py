"""The synthetic "shapes" dataset: the library's embedded default, since nothing can be downloaded.

Fine class = (shape kind, colour); superclass = shape kind. The default palette has 5 colours (20 classes); up
to 8 (``colours=8``: 32 fine classes in 4 superclasses, for fine-grained tasks such as FineDiffusion's) take
the first k colours of :data:`PALETTE`, so class c is shape ``c // k`` in colour ``c % k``.
Each image shows one shape at a random position, size and rotation. Domains change the style while
keeping the classes, so real transfer tasks exist (pre-train on one domain, adapt to another):

- ``filled``:   solid shapes on a dark, softly shaded ground;
- ``outline``:  outlined shapes on a light, striped ground.

Rendering is vectorised in NumPy over whole batches with signed distance functions and a one-pixel
anti-aliasing ramp, so thousands of 16x16 images take a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .archive import ClassInfo, DatasetError, write_dataset_zip

SHAPES = ("circle", "square", "triangle", "cross")
PALETTE = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 200),
    # Extra colours for the fine-grained variants; each is a near neighbour of one of the first five.
    "orange": (245, 130, 40),
    "cyan": (40, 190, 200),
    "pink": (245, 120, 185),
}
DEFAULT_COLOURS = 5
COLOURS = dict(list(PALETTE.items())[:DEFAULT_COLOURS])
DOMAINS = ("filled", "outline")
NUM_CLASSES = len(SHAPES) * len(COLOURS)


def _check_colours(colours: int) -> None:
    if not 1 <= colours <= len(PALETTE):
        raise DatasetError(f"shapes --colours must be in 1..{len(PALETTE)}, got {colours}")


def shapes_classes(colours: int = DEFAULT_COLOURS) -> ClassInfo:
    """Class names (``"red circle"`` ...) and the class -> shape-kind hierarchy, for ``colours`` colours."""
    _check_colours(colours)
    palette = list(PALETTE)[:colours]
    names = [f"{colour} {shape}" for shape in SHAPES for colour in palette]
    superclasses = [c // colours for c in range(len(SHAPES) * colours)]
    return ClassInfo(class_names=names, superclasses=superclasses, superclass_names=list(SHAPES))


def _signed_distance(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) in shape units of each shape kind ``[B]`` on grids ``[B, H, W]``."""
    circle = np.sqrt(u**2 + v**2) - 1.0
    square = np.maximum(np.abs(u), np.abs(v)) - 0.8
    # Equilateral triangle: the largest of three half-plane distances (normals 120 degrees apart).
    angles = np.deg2rad([90.0, 210.0, 330.0])
    triangle = np.max([np.cos(a) * u + np.sin(a) * v for a in angles], axis=0) - 0.56
    bar = 0.32
    cross = np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - bar), np.maximum(np.abs(u) - bar, np.abs(v) - 1.0))
    stacked = np.stack([circle, square, triangle, cross])  # [K, B, H, W]
    return np.take_along_axis(stacked, kind[None, :, None, None], axis=0)[0]


def render_shapes(labels: np.ndarray, resolution: int, domain: str, rng: np.random.Generator,
                  colours: int = DEFAULT_COLOURS) -> np.ndarray:
    """Render one image per label.

    Args:
        labels: int ``[B]`` fine classes in ``[0, 4 * colours)``.
        resolution: side in pixels.
        domain: one of :data:`DOMAINS`.
        rng: source of positions, sizes, rotations and backgrounds (the draws do not depend on ``colours``).
        colours: palette size k (class c = shape c // k, colour c % k).

    Returns:
        uint8 ``[B, resolution, resolution, 3]``.
    """
    if domain not in DOMAINS:
        raise DatasetError(f"unknown shapes domain '{domain}'; choose one of {', '.join(DOMAINS)}")
    _check_colours(colours)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(SHAPES) * colours
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"shapes labels must be in 0..{num_classes - 1}")
    batch, res = len(labels), resolution
    kind, colour = labels // colours, labels % colours
    size = rng.uniform(0.22, 0.34, batch) * res  # shape radius in pixels
    centre = rng.uniform(0.0, 1.0, (batch, 2)) * (res - 2.2 * size[:, None]) + 1.1 * size[:, None]
    theta = rng.uniform(0.0, 2.0 * np.pi, batch)
    pixel = np.arange(res) + 0.5
    dx = pixel[None, None, :] - centre[:, 0, None, None]
    dy = pixel[None, :, None] - centre[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    radius = size[:, None, None]
    u, v = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    distance = _signed_distance(kind, u, v) * radius  # in pixels
    rgb = np.asarray(list(PALETTE.values())[:colours], dtype=np.float32)[colour][:, None, None, :]  # [B, 1, 1, 3]
    if domain == "filled":
        coverage = np.clip(0.5 - distance, 0.0, 1.0)
        shade = rng.uniform(10.0, 45.0, (batch, 1, 1, 1)) + 12.0 * (dy / res)[..., None]
        ground = np.broadcast_to(shade, (batch, res, res, 3))
        ink = rgb
    else:
        line = max(1.0, res / 12.0)
        coverage = np.clip(0.5 - (np.abs(distance) - line / 2.0), 0.0, 1.0)
        phase = rng.uniform(0.0, 2.0 * np.pi, (batch, 1, 1))
        stripes = 0.5 + 0.5 * np.sin((dx + dy) * (2.0 * np.pi / 6.0) + phase)
        level = rng.uniform(200.0, 235.0, (batch, 1, 1))
        ground = np.repeat((level + 18.0 * stripes)[..., None], 3, axis=-1)
        ink = 0.8 * rgb  # darker ink keeps light colours visible on the light ground
    image = ground + coverage[..., None] * (ink - ground)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def iter_shapes(
    per_class: int, resolution: int = 16, seed: int = 0, domain: str = "filled", chunk: int = 1024,
    colours: int = DEFAULT_COLOURS,
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(image [R, R, 3] uint8, label)`` for ``per_class`` images of every class, class-major.

    Deterministic for a given ``(seed, domain)``; different domains draw different geometry.
    """
    if per_class < 1 or resolution < 4:
        raise DatasetError(f"shapes needs --per-class >= 1 and --resolution >= 4, got {per_class}, {resolution}")
    if domain not in DOMAINS:
        raise DatasetError(f"unknown shapes domain '{domain}'; choose one of {', '.join(DOMAINS)}")
    _check_colours(colours)
    rng = np.random.default_rng([seed, DOMAINS.index(domain)])
    labels = np.repeat(np.arange(len(SHAPES) * colours), per_class)
    for start in range(0, len(labels), chunk):
        part = labels[start:start + chunk]
        yield from zip(render_shapes(part, resolution, domain, rng, colours), part.tolist(), strict=True)


def make_shapes(
    dest: str | Path, resolution: int = 16, per_class: int = 100, seed: int = 0, domain: str = "filled",
    colours: int = DEFAULT_COLOURS,
) -> dict:
    """Write the shapes dataset (4 shapes x ``colours`` colours) as a dataset zip at ``dest`` (atomically).

    Returns its ``dataset.json``. The default (5 colours, 20 classes) writes the same bytes as before the
    ``colours`` option existed; other palettes record ``colours`` in the provenance.
    """
    _check_colours(colours)
    extra = {"shapes": {"domain": domain, "seed": seed, "per_class": per_class, "resolution": resolution,
                        **({"colours": colours} if colours != DEFAULT_COLOURS else {})}}
    return write_dataset_zip(dest, iter_shapes(per_class, resolution, seed, domain, colours=colours),
                             shapes_classes(colours), extra)
