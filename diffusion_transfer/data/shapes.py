"""The synthetic "shapes" dataset: the library's embedded default, since nothing can be downloaded.

Fine class = (shape kind, colour); superclass = shape kind. The default palette has 5 colours (20 classes); up
to 8 (``colours=8``: 32 fine classes in 4 superclasses, for fine-grained tasks such as FineDiffusion's) take
the first k colours of :data:`PALETTE`, so class c is shape ``c // k`` in colour ``c % k``.
Each image shows one shape at a random position, size and rotation. Domains change the style while
keeping the classes, so real transfer tasks exist (pre-train on one domain, adapt to another):

- ``filled``:   solid shapes on a dark, softly shaded ground;
- ``outline``:  outlined shapes on a light, striped ground;
- ``cutout``:   light, solid shapes cut out of a ground in the class colour (the colour is the ground's, not the
  shape's), shaded from top to bottom.

Several domains in one dataset (``domain="filled,cutout"``: ``per_class`` images of every class in each) make a
broad source for transfer to a domain it does not hold.

Kind sets (``kinds``) change the classes themselves, for transfer to new classes:

- ``base``:  circle, square, triangle, cross (the default; its datasets are unchanged by the option);
- ``novel``: star (5 points), hexagon, ring (a thick annulus, drawn as a double outline in ``outline``) and
  arrow: kinds that ``base`` never has, in the same colours and styles;
- ``all``:   the base kinds, then the novel ones (8 kinds: class c of k colours is kind ``c // k`` of
  circle, square, triangle, cross, star, hexagon, ring, arrow).

Rendering is vectorised in NumPy over whole batches with signed distance functions and a one-pixel
anti-aliasing ramp, so thousands of 16x16 images take a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .archive import ClassInfo, DatasetError, write_dataset_zip

SHAPES = ("circle", "square", "triangle", "cross")
NOVEL_SHAPES = ("star", "hexagon", "ring", "arrow")
KIND_SETS = {"base": SHAPES, "novel": NOVEL_SHAPES, "all": SHAPES + NOVEL_SHAPES}
"""Shape kinds of each ``kinds`` option; class c of a set with k colours is kind ``c // k`` of the set."""
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
DOMAINS = ("filled", "outline", "cutout")
NUM_CLASSES = len(SHAPES) * len(COLOURS)


def _check_colours(colours: int) -> None:
    if not 1 <= colours <= len(PALETTE):
        raise DatasetError(f"shapes --colours must be in 1..{len(PALETTE)}, got {colours}")


def _kind_set(kinds: str) -> tuple[str, ...]:
    if kinds not in KIND_SETS:
        raise DatasetError(f"unknown shapes kinds '{kinds}'; choose one of {', '.join(KIND_SETS)}")
    return KIND_SETS[kinds]


#: what a class's superclass is: its shape kind (the classes of a superclass differ in colour only), its colour
#: (they differ in shape), or its kind's family (:data:`KIND_FAMILIES`: with ``kinds="all"`` a superclass holds two
#: kinds in every colour, so its classes differ in shape and colour, as the species of one iNat supercategory do).
SUPERCLASS_BY = ("kind", "colour", "family")
#: each kind's family: the kinds of a family look alike (a ring is a circle with a hole; a star, a cross with 5 arms)
KIND_FAMILIES = {"circle": "round", "ring": "round", "square": "polygon", "hexagon": "polygon",
                 "triangle": "pointed", "arrow": "pointed", "cross": "spiky", "star": "spiky"}


def shapes_classes(colours: int = DEFAULT_COLOURS, kinds: str = "base", superclass: str = "kind") -> ClassInfo:
    """Class names (``"red circle"`` ...) and the class -> superclass hierarchy, for ``colours`` colours.

    Class ``c`` is kind ``c // colours`` in colour ``c % colours``; its superclass is the kind (default), or with
    ``superclass="colour"`` the colour, or with ``superclass="family"`` the kind's family (:data:`KIND_FAMILIES`;
    families are numbered in the order their first kind appears in the set, so ``all`` gives round, polygon,
    pointed, spiky, each of two kinds; ``base`` and ``novel`` hold one kind of each family).
    """
    _check_colours(colours)
    if superclass not in SUPERCLASS_BY:
        raise DatasetError(f"unknown shapes superclass '{superclass}'; choose one of {', '.join(SUPERCLASS_BY)}")
    shapes = _kind_set(kinds)
    palette = list(PALETTE)[:colours]
    names = [f"{colour} {shape}" for shape in shapes for colour in palette]
    if superclass == "colour":
        return ClassInfo(class_names=names, superclasses=[c % colours for c in range(len(names))],
                         superclass_names=palette)
    groups = [KIND_FAMILIES[shape] if superclass == "family" else shape for shape in shapes]
    group_names = list(dict.fromkeys(groups))  # first-appearance order
    return ClassInfo(class_names=names,
                     superclasses=[group_names.index(groups[c // colours]) for c in range(len(names))],
                     superclass_names=group_names)


def _base_distances(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Signed distances (negative inside, shape units) of circle, square, triangle and cross."""
    circle = np.sqrt(u**2 + v**2) - 1.0
    square = np.maximum(np.abs(u), np.abs(v)) - 0.8
    # Equilateral triangle: the largest of three half-plane distances (normals 120 degrees apart).
    angles = np.deg2rad([90.0, 210.0, 330.0])
    triangle = np.max([np.cos(a) * u + np.sin(a) * v for a in angles], axis=0) - 0.56
    bar = 0.32
    cross = np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - bar), np.maximum(np.abs(u) - bar, np.abs(v) - 1.0))
    return [circle, square, triangle, cross]


def _segment_distance(px: np.ndarray, py: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from points ``(px, py)`` to the segment ``a``-``b``."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    t = np.clip(((px - a[0]) * ex + (py - a[1]) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(px - a[0] - t * ex, py - a[1] - t * ey)


def _novel_distances(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Signed distances (negative inside, shape units) of star, hexagon, ring and arrow."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    # Star, 5 points of radius 1.05, inner corners at 0.5: fold the angle into the half-sector [0, 36 deg] between
    # a point (on the u axis) and the next inner corner; the edge joining them is the nearest part of the outline.
    half = np.pi / 5
    folded = np.abs(np.mod(phi + half, 2 * half) - half)
    px, py = rho * np.cos(folded), rho * np.sin(folded)
    tip, corner = (1.05, 0.0), (0.5 * np.cos(half), 0.5 * np.sin(half))
    outside = (px - tip[0]) * (corner[1] - tip[1]) - (py - tip[1]) * (corner[0] - tip[0]) > 0
    star = _segment_distance(px, py, tip, corner) * np.where(outside, 1.0, -1.0)
    # Regular hexagon with apothem 0.9 (corners at 1.04): the largest of three slab distances.
    hexagon = np.max([np.abs(np.cos(a) * u + np.sin(a) * v) for a in np.deg2rad([0.0, 60.0, 120.0])], axis=0) - 0.9
    # Ring: an annulus from radius 0.45 to 1.05, so a hole wider than a pixel shows even at 16x16.
    ring = np.abs(rho - 0.75) - 0.3
    # Arrow along +u: a shaft (u in [-1.05, 0.1], half-width 0.3) and a head from its base at u = 0 (half-width 0.85)
    # to the tip at u = 1.05; the slanted sides are half-planes through the tip.
    shaft = np.maximum(np.abs(u + 0.475) - 0.575, np.abs(v) - 0.3)
    nx, ny = 0.85, 1.05
    side = (nx * (u - 1.05) + ny * np.abs(v)) / np.hypot(nx, ny)
    head = np.maximum(-u, side)
    arrow = np.minimum(shaft, head)
    return [star, hexagon, ring, arrow]


def _signed_distance(kind: np.ndarray, u: np.ndarray, v: np.ndarray, kinds: str = "base") -> np.ndarray:
    """Signed distance (negative inside) in shape units of each shape kind ``[B]`` on grids ``[B, H, W]``."""
    _kind_set(kinds)
    parts = {"base": _base_distances, "novel": _novel_distances,
             "all": lambda u, v: _base_distances(u, v) + _novel_distances(u, v)}[kinds]
    stacked = np.stack(parts(u, v))  # [K, B, H, W]
    return np.take_along_axis(stacked, kind[None, :, None, None], axis=0)[0]


def _offsets(resolution: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets ``dx [B, 1, R]`` and ``dy [B, R, 1]`` from shape centres ``[B, 2]`` (x, y) in pixels."""
    pixel = np.arange(resolution) + 0.5
    return pixel[None, None, :] - centre[:, 0, None, None], pixel[None, :, None] - centre[:, 1, None, None]


def shape_coverage(kind: np.ndarray, resolution: int, domain: str, size: np.ndarray, centre: np.ndarray,
                   theta: np.ndarray, kinds: str = "base") -> np.ndarray:
    """Ink coverage in [0, 1], ``[B, R, R]``, of shapes in a given pose: the geometry of :func:`render_shapes`.

    Args:
        kind: int ``[B]`` shape kinds, indices into ``KIND_SETS[kinds]``.
        resolution: side R in pixels.
        domain: ``filled`` or ``cutout`` (the shape's area) or ``outline`` (a band of ``max(1, R / 12)`` pixels on
            its edge).
        size: ``[B]`` shape radius in pixels; centre: ``[B, 2]`` (x, y) in pixels; theta: ``[B]`` rotation (rad).
        kinds: the kind set.
    """
    dx, dy = _offsets(resolution, centre)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    radius = size[:, None, None]
    u, v = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    distance = _signed_distance(kind, u, v, kinds) * radius  # in pixels
    if domain in ("filled", "cutout"):
        return np.clip(0.5 - distance, 0.0, 1.0)
    line = max(1.0, resolution / 12.0)
    return np.clip(0.5 - (np.abs(distance) - line / 2.0), 0.0, 1.0)


def render_shapes(labels: np.ndarray, resolution: int, domain: str, rng: np.random.Generator,
                  colours: int = DEFAULT_COLOURS, kinds: str = "base") -> np.ndarray:
    """Render one image per label.

    Args:
        labels: int ``[B]`` fine classes in ``[0, 4 * colours)``.
        resolution: side in pixels.
        domain: one of :data:`DOMAINS`.
        rng: source of positions, sizes, rotations and backgrounds (the draws do not depend on ``colours``
            or ``kinds``).
        colours: palette size k (class c = shape c // k, colour c % k).
        kinds: ``"base"`` or ``"novel"`` (see :data:`KIND_SETS`): which shape kinds the classes are.

    Returns:
        uint8 ``[B, resolution, resolution, 3]``.
    """
    if domain not in DOMAINS:
        raise DatasetError(f"unknown shapes domain '{domain}'; choose one of {', '.join(DOMAINS)}")
    _check_colours(colours)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(_kind_set(kinds)) * colours
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"shapes labels must be in 0..{num_classes - 1}")
    batch, res = len(labels), resolution
    kind, colour = labels // colours, labels % colours
    size = rng.uniform(0.22, 0.34, batch) * res  # shape radius in pixels
    centre = rng.uniform(0.0, 1.0, (batch, 2)) * (res - 2.2 * size[:, None]) + 1.1 * size[:, None]
    theta = rng.uniform(0.0, 2.0 * np.pi, batch)
    coverage = shape_coverage(kind, res, domain, size, centre, theta, kinds)
    dx, dy = _offsets(res, centre)
    rgb = np.asarray(list(PALETTE.values())[:colours], dtype=np.float32)[colour][:, None, None, :]  # [B, 1, 1, 3]
    if domain == "filled":
        shade = rng.uniform(10.0, 45.0, (batch, 1, 1, 1)) + 12.0 * (dy / res)[..., None]
        ground = np.broadcast_to(shade, (batch, res, res, 3))
        ink = rgb
    elif domain == "cutout":
        # The class colour is the ground, darkened toward the bottom; the shape is a light, nearly white hole.
        shade = rng.uniform(0.7, 0.95, (batch, 1, 1, 1)) - 0.25 * (dy / res)[..., None]
        ground = rgb * shade
        ink = np.broadcast_to(rng.uniform(225.0, 250.0, (batch, 1, 1, 1)), (batch, 1, 1, 3))
    else:
        phase = rng.uniform(0.0, 2.0 * np.pi, (batch, 1, 1))
        stripes = 0.5 + 0.5 * np.sin((dx + dy) * (2.0 * np.pi / 6.0) + phase)
        level = rng.uniform(200.0, 235.0, (batch, 1, 1))
        ground = np.repeat((level + 18.0 * stripes)[..., None], 3, axis=-1)
        ink = 0.8 * rgb  # darker ink keeps light colours visible on the light ground
    image = ground + coverage[..., None] * (ink - ground)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shape_domains(domain: str) -> tuple[str, ...]:
    """The domains of a ``domain`` option: one of :data:`DOMAINS`, or several joined by commas (``filled,cutout``)."""
    names = tuple(name.strip() for name in domain.split(","))
    unknown = [name for name in names if name not in DOMAINS]
    if unknown or len(set(names)) != len(names):
        raise DatasetError(f"unknown or repeated shapes domain in '{domain}'; choose one or more of "
                           f"{', '.join(DOMAINS)}, joined by commas")
    return names


def iter_shapes(
    per_class: int, resolution: int = 16, seed: int = 0, domain: str = "filled", chunk: int = 1024,
    colours: int = DEFAULT_COLOURS, kinds: str = "base",
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(image [R, R, 3] uint8, label)`` for ``per_class`` images of every class, class-major.

    Deterministic for a given ``(seed, domain, kinds)``; different domains (and kind sets) draw different geometry.
    Several domains (``"filled,cutout"``) yield each domain's images in turn, each exactly as that domain alone.
    """
    if per_class < 1 or resolution < 4:
        raise DatasetError(f"shapes needs --per-class >= 1 and --resolution >= 4, got {per_class}, {resolution}")
    domains = shape_domains(domain)
    _check_colours(colours)
    shapes = _kind_set(kinds)
    labels = np.repeat(np.arange(len(shapes) * colours), per_class)
    for name in domains:
        stream = [seed, DOMAINS.index(name)] + ([] if kinds == "base" else [list(KIND_SETS).index(kinds)])
        rng = np.random.default_rng(stream)
        for start in range(0, len(labels), chunk):
            part = labels[start:start + chunk]
            yield from zip(render_shapes(part, resolution, name, rng, colours, kinds), part.tolist(), strict=True)


def make_shapes(
    dest: str | Path, resolution: int = 16, per_class: int = 100, seed: int = 0, domain: str = "filled",
    colours: int = DEFAULT_COLOURS, kinds: str = "base", superclass: str = "kind",
) -> dict:
    """Write the shapes dataset (4 shapes x ``colours`` colours) as a dataset zip at ``dest`` (atomically).

    ``kinds="novel"`` draws star, hexagon, ring and arrow instead of the base circle, square, triangle and cross
    (``"all"``: all eight). Several comma-joined domains write ``per_class`` images of every class in each.
    ``superclass``: the hierarchy written to ``dataset.json`` (:func:`shapes_classes`; the images do not change).
    Returns its ``dataset.json``. The defaults (5 colours, base kinds, kind superclasses: 20 classes) write the same
    bytes as before the ``colours``, ``kinds`` and ``superclass`` options existed; other choices are recorded in the
    provenance.
    """
    _check_colours(colours)
    shape_domains(domain)
    classes = shapes_classes(colours, kinds, superclass)
    extra = {"shapes": {"domain": domain, "seed": seed, "per_class": per_class, "resolution": resolution,
                        **({"colours": colours} if colours != DEFAULT_COLOURS else {}),
                        **({"kinds": kinds} if kinds != "base" else {}),
                        **({"superclass": superclass} if superclass != "kind" else {})}}
    return write_dataset_zip(dest, iter_shapes(per_class, resolution, seed, domain, colours=colours, kinds=kinds),
                             classes, extra)
