"""Dataset layer: zip format round trips, sources, long-tail subsets, shapes, the DataModule."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_transfer.data import (
    ClassInfo,
    DatasetError,
    DiffusionDataModule,
    ImageFolderDataset,
    ZipImageDataset,
    convert,
    longtail_counts,
    make_longtail,
    make_shapes,
    select_longtail,
    write_dataset_zip,
)
from diffusion_transfer.data.shapes import DOMAINS, NUM_CLASSES, render_shapes, shapes_classes

from .helpers import make_cifar_tarball, random_images


def _write_folder(root: Path, images: np.ndarray, relpaths: list[str]) -> None:
    for image, rel in zip(images, relpaths, strict=True):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)


def _pixels(dataset) -> np.ndarray:
    return np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------------ format


def test_zip_round_trip_layout_and_labels(tmp_path: Path) -> None:
    images = random_images(5, size=8)
    labels = [3, 0, 2, 2, 1]
    dest = tmp_path / "out.zip"
    write_dataset_zip(dest, zip(images, labels, strict=True), ClassInfo(class_names=list("abcd")))
    with zipfile.ZipFile(dest) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        meta = json.loads(archive.read("dataset.json"))
    assert sorted(infos) == ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000002.png",
                             "00000/img00000003.png", "00000/img00000004.png", "dataset.json"]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
    assert meta["labels"] == [[f"00000/img{i:08d}.png", label] for i, label in enumerate(labels)]
    assert meta["class_counts"] == [1, 1, 2, 1]
    dataset = ZipImageDataset(dest)
    assert (dataset.resolution, dataset.channels, dataset.num_classes) == (8, 3, 4)
    np.testing.assert_array_equal(_pixels(dataset), images)
    assert [dataset[i][1] for i in range(5)] == labels
    assert dataset[0][0].dtype == torch.uint8 and dataset[0][0].shape == (3, 8, 8)


def test_archive_names_roll_over_every_thousand() -> None:
    from diffusion_transfer.data.archive import archive_name

    assert archive_name(999) == "00000/img00000999.png"
    assert archive_name(1000) == "00001/img00001000.png"


def test_unlabelled_zip_has_null_labels(tmp_path: Path) -> None:
    dest = tmp_path / "u.zip"
    write_dataset_zip(dest, ((im, None) for im in random_images(3)))
    with zipfile.ZipFile(dest) as archive:
        assert json.loads(archive.read("dataset.json"))["labels"] is None
    dataset = ZipImageDataset(dest)
    assert dataset.num_classes == 0 and dataset[1][1] == -1


def test_zip_without_dataset_json_reads_nested_images_sorted(tmp_path: Path) -> None:
    images = random_images(3)
    dest = tmp_path / "plain.zip"
    with zipfile.ZipFile(dest, "w") as archive:
        for name, image in zip(["b/x.png", "a/deep/y.png", "c.png"], images, strict=True):
            buffer = __import__("io").BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            archive.writestr(name, buffer.getvalue())
    dataset = ZipImageDataset(dest)
    assert dataset.collection.names == ["a/deep/y.png", "b/x.png", "c.png"]
    np.testing.assert_array_equal(_pixels(dataset), images[[1, 0, 2]])
    assert dataset.labels is None


def test_dataset_pickles_after_use_for_workers(shapes_zip: Path) -> None:
    dataset = ZipImageDataset(shapes_zip)
    first = dataset[3][0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[3][0], first)


def test_small_dataset_decodes_each_image_once_and_its_cache_is_not_writable_through_items(
        shapes_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusion_transfer.data import datasets

    dataset = ZipImageDataset(shapes_zip)
    loads = []
    load = dataset.collection.load
    monkeypatch.setattr(dataset.collection, "load", lambda i: loads.append(i) or load(i))
    first, label = dataset[5]
    again, label_again = dataset[5]
    assert loads == [5] and torch.equal(first, again) and label == label_again
    first.zero_()  # an item is the caller's own tensor
    assert torch.equal(dataset[5][0], again) and loads == [5]
    # Over the size limit, every access decodes (and checks) the image again, with the same pixels.
    monkeypatch.setattr(datasets, "MAX_CACHED_BYTES", 0)
    uncached = ZipImageDataset(shapes_zip)
    monkeypatch.setattr(uncached.collection, "load", lambda i: loads.append(i) or load(i))
    assert torch.equal(uncached[5][0], again) and torch.equal(uncached[5][0], again) and loads == [5, 5, 5]


# ------------------------------------------------------------------------------------------------ sources


def test_convert_class_folder_round_trip(tmp_path: Path) -> None:
    images = random_images(4, size=8, seed=1)
    _write_folder(tmp_path / "src", images, ["cat/1.png", "cat/2.png", "dog/1.png", "emu/9.png"])
    convert(tmp_path / "src", tmp_path / "out.zip", progress=False)
    dataset = ZipImageDataset(tmp_path / "out.zip")
    np.testing.assert_array_equal(_pixels(dataset), images)
    assert dataset.labels.tolist() == [0, 0, 1, 2]
    assert dataset.collection.classes.class_names == ["cat", "dog", "emu"]
    folder = ImageFolderDataset(tmp_path / "src")
    np.testing.assert_array_equal(_pixels(folder), images)
    assert folder.labels.tolist() == [0, 0, 1, 2]


def test_convert_two_level_folder_gives_superclasses(tmp_path: Path) -> None:
    images = random_images(4, seed=2)
    _write_folder(tmp_path / "src", images, ["bird/owl/a.png", "bird/wren/b.png", "fish/cod/c.png",
                                             "fish/cod/d.png"])
    convert(tmp_path / "src", tmp_path / "out.zip", progress=False)
    dataset = ZipImageDataset(tmp_path / "out.zip")
    classes = dataset.collection.classes
    assert classes.class_names == ["cod", "owl", "wren"]  # sorted class-folder names, as a flat cod/ owl/ wren/
    assert classes.superclasses == [1, 0, 0]
    assert classes.superclass_names == ["bird", "fish"]
    assert dataset.labels.tolist() == [1, 2, 0, 0]


def test_flat_and_two_level_folders_of_the_same_classes_give_identical_labels(tmp_path: Path) -> None:
    # Superclass order (alpha < mid < zeta) disagrees with class order (a < b < c < d) on purpose.
    images = random_images(8, seed=6)
    files = {"a": ["1.png", "2.png"], "b": ["1.png"], "c": ["7.png", "8.png", "9.png"], "d": ["1.png", "5.png"]}
    parent = {"a": "zeta", "b": "alpha", "c": "mid", "d": "alpha"}
    leaves = [f"{c}/{f}" for c, names in files.items() for f in names]
    _write_folder(tmp_path / "flat", images, leaves)
    _write_folder(tmp_path / "nested", images, [f"{parent[leaf.split('/')[0]]}/{leaf}" for leaf in leaves])
    flat, nested = ImageFolderDataset(tmp_path / "flat"), ImageFolderDataset(tmp_path / "nested")
    label_of = {}
    for dataset, root in ((flat, tmp_path / "flat"), (nested, tmp_path / "nested")):
        for name, label in zip(dataset.collection.names, dataset.labels.tolist(), strict=True):
            assert label_of.setdefault(Image.open(root / name).tobytes(), label) == label  # same image, same label
    assert sorted(label_of.values()) == [0, 0, 1, 2, 2, 2, 3, 3]
    assert flat.collection.classes.class_names == nested.collection.classes.class_names == ["a", "b", "c", "d"]
    hierarchy = nested.collection.classes
    assert hierarchy.superclass_names == ["alpha", "mid", "zeta"] and hierarchy.superclasses == [2, 0, 1, 0]
    # Converted zips carry the same numbering.
    for name in ("flat", "nested"):
        convert(tmp_path / name, tmp_path / f"{name}.zip", progress=False)
    a, b = ZipImageDataset(tmp_path / "flat.zip"), ZipImageDataset(tmp_path / "nested.zip")
    by_pixels = {a[i][0].numpy().tobytes(): a[i][1] for i in range(len(a))}
    assert all(by_pixels[b[i][0].numpy().tobytes()] == b[i][1] for i in range(len(b)))
    assert b.collection.classes.superclasses == [2, 0, 1, 0]


def test_one_class_name_under_two_superclasses_is_an_error_naming_both(tmp_path: Path) -> None:
    _write_folder(tmp_path / "src", random_images(3), ["birds/other/a.png", "fish/other/b.png", "fish/cod/c.png"])
    with pytest.raises(DatasetError, match="class folder 'other' sits in two superclasses, 'birds/other' and "
                                           "'fish/other'"):
        ImageFolderDataset(tmp_path / "src")


@pytest.mark.parametrize(("layout", "empty", "what"), [
    (["a/1.png", "c/1.png"], "b", "empty class folder"),
    (["s/a/1.png", "t/c/1.png"], "s/b", "empty class folder"),
    (["s/a/1.png", "t/c/1.png"], "u", "empty superclass folder"),
])
def test_an_empty_class_folder_is_an_error_that_names_it(tmp_path: Path, layout, empty, what) -> None:
    _write_folder(tmp_path / "src", random_images(len(layout)), layout)
    (tmp_path / "src" / empty).mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'src' / empty}: {what} .*add images to it or delete it"):
        ImageFolderDataset(tmp_path / "src")
    (tmp_path / "src" / empty / "notes.txt").write_text("no image here")  # still no class
    with pytest.raises(DatasetError, match=what):
        ImageFolderDataset(tmp_path / "src")
    (tmp_path / "src" / empty / "notes.txt").unlink()
    (tmp_path / "src" / empty).rmdir()
    (tmp_path / "src" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert ImageFolderDataset(tmp_path / "src").num_classes == 2


def test_convert_flat_folder_and_zip_source(tmp_path: Path) -> None:
    images = random_images(3, seed=3)
    _write_folder(tmp_path / "flat", images, ["x.png", "y.png", "z.png"])
    convert(tmp_path / "flat", tmp_path / "a.zip", progress=False)
    convert(tmp_path / "a.zip", tmp_path / "b.zip", progress=False)
    dataset = ZipImageDataset(tmp_path / "b.zip")
    assert dataset.labels is None
    np.testing.assert_array_equal(_pixels(dataset), images)


def test_convert_cifar10_tarball(tmp_path: Path) -> None:
    images = make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", kind=10, per_batch=3)
    summary = convert(tmp_path / "cifar-10-python.tar.gz", tmp_path / "c10.zip", progress=False)
    assert summary.images == 15 and summary.resolution == 32  # 5 training batches, no test batch
    dataset = ZipImageDataset(tmp_path / "c10.zip")
    np.testing.assert_array_equal(_pixels(dataset), images)
    assert dataset.collection.classes.class_names == [f"class{c}" for c in range(10)]


def test_convert_cifar100_tarball_has_coarse_superclasses(tmp_path: Path) -> None:
    make_cifar_tarball(tmp_path / "cifar-100-python.tar.gz", kind=100, per_batch=100)
    convert(tmp_path / "cifar-100-python.tar.gz", tmp_path / "c100.zip", progress=False)
    classes = ZipImageDataset(tmp_path / "c100.zip").collection.classes
    assert len(classes.class_names) == 100 and len(classes.superclass_names) == 20
    assert classes.superclasses == [c // 5 for c in range(100)]


def test_convert_center_crop_resize_and_max_images(tmp_path: Path) -> None:
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 200  # the centred 8x8 square is uniform 200
    _write_folder(tmp_path / "src", np.stack([wide, wide]), ["a.png", "b.png"])
    convert(tmp_path / "src", tmp_path / "crop.zip", transform="center-crop", max_images=1, progress=False)
    dataset = ZipImageDataset(tmp_path / "crop.zip")
    assert len(dataset) == 1 and dataset.resolution == 8
    assert (dataset[0][0] == 200).all()
    convert(tmp_path / "src", tmp_path / "r4.zip", resolution=4, transform="center-crop", progress=False)
    assert ZipImageDataset(tmp_path / "r4.zip").resolution == 4
    convert(tmp_path / "src", tmp_path / "wide.zip", resolution=8, transform="center-crop-wide", progress=False)
    letterboxed = ZipImageDataset(tmp_path / "wide.zip")[0][0]
    assert letterboxed.shape == (3, 8, 8) and (letterboxed[:, 0] == 0).all()  # black bar above the 8x4 band


def test_convert_grayscale_and_rgba_are_converted_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    gray = random_images(1, channels=1, seed=4)[0]
    Image.fromarray(gray).save(tmp_path / "src" / "a.png")
    Image.fromarray(random_images(1, channels=4, seed=5)[0], "RGBA").save(tmp_path / "src" / "b.png")
    summary = convert(tmp_path / "src", tmp_path / "out.zip", progress=False)
    assert summary.notes == ["converted 1 L image(s) to RGB", "converted 1 RGBA image(s) to RGB"]
    first = ZipImageDataset(tmp_path / "out.zip")[0][0]
    assert first.shape == (3, 8, 8)
    np.testing.assert_array_equal(first[1].numpy(), gray)


# ------------------------------------------------------------------------------------------------ long tail


def _lt_total(num_classes: int, imbalance: float) -> list[int]:
    return longtail_counts(num_classes, 50000 / num_classes, imbalance)


def test_longtail_counts_match_published_cifar_lt() -> None:
    assert _lt_total(10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(_lt_total(10, 0.01)) == 12406
    c100 = _lt_total(100, 0.01)
    assert sum(c100) == 10847 and c100[:5] == [500, 477, 455, 434, 415] and c100[-5:] == [6, 5, 5, 5, 5]
    assert sum(_lt_total(10, 0.002)) == 10011
    assert sum(_lt_total(10, 0.1)) == 20431


def test_longtail_counts_follow_formula_and_step_profile() -> None:
    counts = longtail_counts(7, 333.0, 0.05)
    assert counts == [int(333.0 * 0.05 ** (c / 6.0)) for c in range(7)]
    assert longtail_counts(5, 100.0, 0.1, "step") == [100, 100, 10, 10, 10]
    with pytest.raises(DatasetError, match="tail/head ratio"):
        longtail_counts(10, 100.0, 100.0)


def test_longtail_selection_equals_global_seed_procedure_and_keeps_global_rng() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    ours = select_longtail(labels, 10, 0.01, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)
    # The originals' procedure: global seed, then one shuffle per class in label order.
    np.random.seed(0)
    reference = []
    for c, n_c in enumerate(ours.requested):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        reference.extend(idx[:n_c].tolist())
    assert ours.indices.tolist() == reference
    assert ours.counts == np.bincount(labels[ours.indices], minlength=10).tolist()


def test_make_longtail_zip_records_counts_and_is_seeded(shapes_zip: Path, tmp_path: Path) -> None:
    meta = make_longtail(shapes_zip, tmp_path / "lt.zip", imbalance=0.25, seed=0, progress=False)
    expected = [int(8 * 0.25 ** (c / 19)) for c in range(20)]
    assert meta["class_counts"] == expected
    assert meta["longtail"]["imbalance"] == 0.25 and meta["superclasses"] == [c // 5 for c in range(20)]
    dataset = ZipImageDataset(tmp_path / "lt.zip")
    assert dataset.class_counts == expected
    make_longtail(shapes_zip, tmp_path / "again.zip", imbalance=0.25, seed=0, progress=False)
    make_longtail(shapes_zip, tmp_path / "other.zip", imbalance=0.25, seed=1, progress=False)
    assert (tmp_path / "again.zip").read_bytes() == (tmp_path / "lt.zip").read_bytes()
    assert (tmp_path / "other.zip").read_bytes() != (tmp_path / "lt.zip").read_bytes()


# ------------------------------------------------------------------------------------------------ shapes


def test_shapes_deterministic_by_seed(tmp_path: Path) -> None:
    make_shapes(tmp_path / "a.zip", per_class=3, seed=7)
    make_shapes(tmp_path / "b.zip", per_class=3, seed=7)
    make_shapes(tmp_path / "c.zip", per_class=3, seed=8)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert (tmp_path / "a.zip").read_bytes() != (tmp_path / "c.zip").read_bytes()
    dataset = ZipImageDataset(tmp_path / "a.zip")
    assert len(dataset) == 3 * NUM_CLASSES and dataset.class_counts == [3] * NUM_CLASSES
    assert dataset.collection.classes.superclass_names == ["circle", "square", "triangle", "cross"]


# sha256 of make_shapes(resolution=16, per_class=3, seed=0, ...) zips, computed before the ``kinds`` option existed.
DEFAULT_SHAPES_SHA256 = {
    ("filled", 5): "95031ef664b1c38a642407721faa2846ae58b990c66db17f537e31070a785001",
    ("outline", 8): "225883534edc5269f5b94fcff16275b3308d509788496e32724de629a1280cd3",
}


def test_default_shapes_are_byte_identical_to_before_the_kinds_option(tmp_path: Path) -> None:
    import hashlib

    for (domain, colours), digest in DEFAULT_SHAPES_SHA256.items():
        make_shapes(tmp_path / "s.zip", resolution=16, per_class=3, seed=0, domain=domain, colours=colours)
        assert hashlib.sha256((tmp_path / "s.zip").read_bytes()).hexdigest() == digest, (domain, colours)


def _rotation_min_distances(domain: str, res: int) -> np.ndarray:
    """``[8, 8]``: mean |coverage difference| of two kinds (base then novel), centred at the same size, minimised
    over 120 rotations of the second: how unlike each other the kinds stay, whatever their rotation."""
    from diffusion_transfer.data.shapes import shape_coverage

    rotations = np.linspace(0.0, 2.0 * np.pi, 120, endpoint=False)

    def masks(theta: np.ndarray) -> np.ndarray:
        n = len(theta)
        return np.stack([shape_coverage(np.full(n, k), res, domain, np.full(n, 0.28 * res), np.full((n, 2), res / 2),
                                        theta, kinds) for kinds in ("base", "novel") for k in range(4)])

    upright, turned = masks(np.zeros(1))[:, 0], masks(rotations)
    distance = np.abs(upright[:, None, None] - turned[None]).mean(axis=(-1, -2)).min(axis=2)
    return np.minimum(distance, distance.T)


@pytest.mark.parametrize("domain", DOMAINS)
def test_novel_shape_kinds_differ_from_each_other_and_from_the_base_kinds_at_16px(domain: str) -> None:
    from diffusion_transfer.data.shapes import NOVEL_SHAPES, SHAPES

    d = _rotation_min_distances(domain, 16)
    names = SHAPES + NOVEL_SHAPES
    novel_pairs = [(i, j) for i in range(4, 8) for j in range(4, 8) if i < j]
    # Measured (filled / outline): the closest novel pair is star-arrow 0.070 / hexagon-arrow 0.127 ...
    solid = domain in ("filled", "cutout")  # the same ink coverage (the shape's area); only the colours differ
    assert min(d[i, j] for i, j in novel_pairs) > (0.06 if solid else 0.1), d
    # ... and the closest novel-base pair hexagon-circle 0.027 / 0.053 (the base circle-square pair: 0.053 / 0.103).
    assert min(d[i, j] for i in range(4, 8) for j in range(4)) > (0.02 if solid else 0.04), d
    ring, circle = names.index("ring"), names.index("circle")
    assert d[ring, circle] > 0.07  # a thick annulus vs a disc; a double outline vs a single one


def test_novel_shapes_dataset_names_classes_and_records_kinds(tmp_path: Path) -> None:
    from diffusion_transfer.data.shapes import NOVEL_SHAPES

    for domain in DOMAINS:
        meta = make_shapes(tmp_path / f"{domain}.zip", resolution=8, per_class=2, seed=0, domain=domain, colours=3,
                           kinds="novel")
        assert meta["class_names"] == [f"{c} {k}" for k in NOVEL_SHAPES for c in ("red", "green", "blue")]
        assert meta["superclass_names"] == list(NOVEL_SHAPES) and meta["superclasses"] == [c // 3 for c in range(12)]
        assert meta["shapes"]["kinds"] == "novel" and meta["class_counts"] == [2] * 12
    make_shapes(tmp_path / "base.zip", resolution=8, per_class=2, seed=0, colours=3)
    assert not np.array_equal(_pixels(ZipImageDataset(tmp_path / "filled.zip")),
                              _pixels(ZipImageDataset(tmp_path / "base.zip")))
    with pytest.raises(DatasetError, match="unknown shapes kinds 'odd'; choose one of base, novel"):
        make_shapes(tmp_path / "x.zip", kinds="odd")
    assert not (tmp_path / "x.zip").exists()


def test_colour_superclasses_change_the_hierarchy_not_the_images(tmp_path: Path) -> None:
    by_kind = make_shapes(tmp_path / "kind.zip", resolution=8, per_class=2, seed=0, colours=3)
    by_colour = make_shapes(tmp_path / "colour.zip", resolution=8, per_class=2, seed=0, colours=3,
                            superclass="colour")
    # Class c is kind c // 3 in colour c % 3: its superclass is now the colour, named after it.
    assert by_colour["superclasses"] == [c % 3 for c in range(12)]
    assert by_colour["superclass_names"] == ["red", "green", "blue"]
    assert by_colour["class_names"] == by_kind["class_names"] and by_colour["labels"] == by_kind["labels"]
    assert by_colour["shapes"]["superclass"] == "colour" and "superclass" not in by_kind["shapes"]
    assert np.array_equal(_pixels(ZipImageDataset(tmp_path / "kind.zip")),
                          _pixels(ZipImageDataset(tmp_path / "colour.zip")))
    # The datamodule hands the colour hierarchy to a model (FineDiffusion's superclass rows).
    assert DiffusionDataModule(str(tmp_path / "colour.zip")).superclass_of == [c % 3 for c in range(12)]
    with pytest.raises(DatasetError, match="unknown shapes superclass 'size'; choose one of kind, colour"):
        make_shapes(tmp_path / "x.zip", superclass="size")
    assert not (tmp_path / "x.zip").exists()


def test_family_superclasses_group_two_kinds_in_every_colour() -> None:
    classes = shapes_classes(colours=2, kinds="all", superclass="family")
    # kinds: circle square triangle cross star hexagon ring arrow; families in first-appearance order
    assert classes.superclass_names == ["round", "polygon", "pointed", "spiky"]
    family_of_kind = [0, 1, 2, 3, 3, 1, 0, 2]
    assert classes.superclasses == [family_of_kind[c // 2] for c in range(16)]
    # each family holds exactly two kinds in both colours: its classes differ in shape and in colour
    members = {s: [classes.class_names[c] for c in range(16) if classes.superclasses[c] == s] for s in range(4)}
    assert members[0] == ["red circle", "green circle", "red ring", "green ring"]
    # on a set with one kind per family the families are the kinds, under their family names
    novel = shapes_classes(colours=2, kinds="novel", superclass="family")
    assert novel.superclass_names == ["spiky", "polygon", "round", "pointed"]
    assert novel.superclasses == [c // 2 for c in range(8)]


def test_shapes_domains_differ_in_style_and_classes_in_colour() -> None:
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    filled, outline, cutout = (render_shapes(labels, 16, d, np.random.default_rng(0)).astype(float)
                               for d in ("filled", "outline", "cutout"))
    assert filled.mean() < 80 < 150 < outline.mean()  # dark ground vs light ground
    # The brightest pixel of a filled red shape is red-dominant, of a blue one blue-dominant.
    red, blue = filled[labels == 0], filled[labels == 2]
    assert red[..., 0].max() > 150 > red[..., 2].max()
    assert blue[..., 2].max() > 150 > blue[..., 0].max()
    # Cutout: the class colour is the ground (the corner pixels, which no shape reaches), the shape a light hole.
    corners = cutout[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [B, 4, 3]
    assert (corners[labels == 0][..., 0] > 2 * corners[labels == 0][..., 2]).all()  # red ground
    assert (corners[labels == 2][..., 2] > 2 * corners[labels == 2][..., 0]).all()  # blue ground
    assert (cutout.min(axis=-1).max(axis=(1, 2)) > 200).all()  # every image holds a nearly white pixel: the shape


def test_all_kinds_are_the_base_kinds_then_the_novel_ones() -> None:
    from diffusion_transfer.data.shapes import NOVEL_SHAPES, SHAPES, shape_coverage

    classes = shapes_classes(colours=2, kinds="all")
    assert classes.superclass_names == list(SHAPES + NOVEL_SHAPES) and len(classes.class_names) == 16
    rng = np.random.default_rng(3)
    n = 6
    pose = (16, "outline", rng.uniform(3, 5, n), rng.uniform(6, 10, (n, 2)), rng.uniform(0, 6, n))
    for k in range(4):
        kind = np.full(n, k)
        assert np.array_equal(shape_coverage(kind, *pose, kinds="all"), shape_coverage(kind, *pose, kinds="base"))
        assert np.array_equal(shape_coverage(kind + 4, *pose, kinds="all"),
                              shape_coverage(kind, *pose, kinds="novel"))


def test_several_domains_in_one_dataset_are_each_domain_alone_in_turn(tmp_path: Path) -> None:
    meta = make_shapes(tmp_path / "broad.zip", resolution=8, per_class=2, seed=4, domain="filled,cutout", colours=2)
    assert meta["class_counts"] == [4] * 8 and meta["shapes"]["domain"] == "filled,cutout"
    broad = _pixels(ZipImageDataset(tmp_path / "broad.zip"))
    for part, domain in enumerate(("filled", "cutout")):
        make_shapes(tmp_path / f"{domain}.zip", resolution=8, per_class=2, seed=4, domain=domain, colours=2)
        assert np.array_equal(broad[part * 16:(part + 1) * 16], _pixels(ZipImageDataset(tmp_path / f"{domain}.zip")))
    for bad in ("filled,odd", "filled,filled"):
        with pytest.raises(DatasetError, match="unknown or repeated shapes domain"):
            make_shapes(tmp_path / "x.zip", domain=bad)
        assert not (tmp_path / "x.zip").exists()


# ------------------------------------------------------------------------------------------------ datamodule


def test_datamodule_properties_batches_and_workers(shapes_zip: Path) -> None:
    from diffusion_transfer.data import DiffusionDataModule

    dm = DiffusionDataModule(str(shapes_zip), batch_size=16, num_workers=0, xflip=True)
    assert (dm.num_classes, dm.resolution, dm.channels) == (20, 16, 3)
    assert dm.class_counts == [8] * 20 and dm.superclass_of == [c // 5 for c in range(20)]
    assert torch.allclose(dm.class_prior, torch.full((20,), 0.05))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= x.min() and x.max() <= 1.0
    # Workers: each opens its own zip handle; every image arrives exactly once per epoch.
    dm2 = DiffusionDataModule(str(shapes_zip), batch_size=16, num_workers=2, drop_last=False)
    dm2.setup("fit")
    seen = torch.cat([x.flatten(1) for x, _ in dm2.val_dataloader()])
    expected = torch.stack([dm.dataset[i][0].float().div(127.5).sub(1).flatten() for i in range(160)])
    assert torch.equal(seen, expected)


def test_datamodule_longtail_and_validation_split(shapes_zip: Path) -> None:
    from diffusion_transfer.data import DiffusionDataModule

    dm = DiffusionDataModule(str(shapes_zip), batch_size=4, longtail_imbalance=0.25, val_fraction=0.2)
    lt_counts = [int(8 * 0.25 ** (c / 19)) for c in range(20)]
    dm.setup("fit")
    train, val = dm._splits
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == sum(lt_counts)
    assert sum(dm.class_counts) == len(train)
    with pytest.raises(DatasetError, match="fewer than batch_size"):
        DiffusionDataModule(str(shapes_zip), batch_size=1000).setup("fit")


def test_epoch_sampler_reshuffles_without_set_epoch_and_repeats_with_it() -> None:
    from diffusion_transfer.data.datamodule import EpochShuffleSampler

    sampler = EpochShuffleSampler(50, seed=3)
    first, second = list(sampler), list(sampler)  # DDP: Lightning's wrapper never calls set_epoch on us
    assert sorted(first) == list(range(50)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_unlabelled_zip_with_class_names_has_no_classes(tmp_path: Path) -> None:
    write_dataset_zip(tmp_path / "u.zip", ((im, None) for im in random_images(2)), ClassInfo(class_names=["a", "b"]))
    dataset = ZipImageDataset(tmp_path / "u.zip")
    assert dataset.num_classes == 0 and dataset.class_counts == []


def test_bad_seeds_and_labels_are_clear_errors() -> None:
    from diffusion_transfer.data.seeds import assign_labels, parse_seeds

    assert parse_seeds("1,5,9-11") == [1, 5, 9, 10, 11] and parse_seeds(3) == [0, 1, 2]
    for bad, says in [("5-3", "ranges go up"), ("x", "cannot read seeds"), ("1,1", "repeat a seed")]:
        with pytest.raises(DatasetError, match=says):
            parse_seeds(bad)
    with pytest.raises(DatasetError, match="cannot read labels"):
        assign_labels(2, 10, "red")
    with pytest.raises(DatasetError, match="outside the model's classes"):
        assign_labels(2, 10, "3,10")
    assert assign_labels(3, 10, np.array([4, 5]).tolist()) == [4, 5, 4]
