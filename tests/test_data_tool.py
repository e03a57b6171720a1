"""``diffusion-transfer-data``: commands, and one-line errors with nothing half-written on bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_transfer.data import write_dataset_zip
from diffusion_transfer.data.tool import main

from .helpers import make_cifar_tarball, random_images


def run_tool(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys: pytest.CaptureFixture[str], *argv: str, names: str, says: str) -> None:
    """The command fails with status 2, one stderr line naming ``names`` and containing ``says``."""
    code, _, err = run_tool(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert names in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in err


def no_partial_output(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name == "out.zip"]
    assert leftovers == [], leftovers


def _zip_with(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ commands


def test_shapes_info_longtail_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_tool(capsys, "shapes", tmp_path / "s.zip", "--per-class", 4, "--domain", "outline")
    assert code == 0 and "80 images" in out
    code, out, _ = run_tool(capsys, "info", tmp_path / "s.zip", "--json")
    info = json.loads(out)
    assert (info["images"], info["resolution"], info["channels"], info["num_classes"]) == (80, 16, 3, 20)
    assert info["class_counts"] == [4] * 20 and info["superclass_names"][0] == "circle"
    assert info["shapes"]["domain"] == "outline"
    code, out, _ = run_tool(capsys, "longtail", tmp_path / "s.zip", tmp_path / "lt.zip", "--imbalance", 0.5)
    assert code == 0
    code, out, _ = run_tool(capsys, "info", tmp_path / "lt.zip", "--verify")
    assert code == 0 and "long-tailed subset of s.zip" in out and "[cross]" in out


def test_shapes_command_novel_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_tool(capsys, "shapes", tmp_path / "n.zip", "--per-class", 2, "--kinds", "novel",
                            "--colours", 2, "--resolution", 8, "--domain", "outline")
    assert code == 0 and "16 images" in out and "8 classes (star, hexagon, ring, arrow)" in out
    code, out, _ = run_tool(capsys, "info", tmp_path / "n.zip", "--json")
    info = json.loads(out)
    assert info["class_names"][:3] == ["red star", "green star", "red hexagon"]
    assert info["superclass_names"] == ["star", "hexagon", "ring", "arrow"] and info["shapes"]["kinds"] == "novel"


def test_console_script_module_reports_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "diffusion_transfer.data.tool", "info", str(tmp_path / "no.zip")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"diffusion-transfer-data: error: {tmp_path / 'no.zip'}: no such file or folder; check the path, or build "
        "a dataset with `diffusion-transfer-data shapes` or `diffusion-transfer-data convert`"
    ]


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, "convert", tmp_path / "nowhere", tmp_path / "out.zip", names="nowhere",
                 says="no such file")
    no_partial_output(tmp_path)


def test_archive_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _zip_with(tmp_path / "empty.zip", {"readme.txt": b"hi"})
    expect_error(capsys, "convert", tmp_path / "empty.zip", tmp_path / "out.zip", names="empty.zip",
                 says="contains no images")
    no_partial_output(tmp_path)


@pytest.mark.parametrize(("labels", "says"), [
    ([["a.png", 0]], "have no label"),
    ([["a.png", 0], ["b.png", 1], ["c.png", 1]], "not there"),
    ([["a.png", 0], ["b.png", "x"]], "not [name, int]"),
])
def test_dataset_json_that_does_not_match(tmp_path: Path, capsys: pytest.CaptureFixture[str], labels, says) -> None:
    images = random_images(2)
    _zip_with(tmp_path / "bad.zip", {"a.png": _png(images[0]), "b.png": _png(images[1]),
                                     "dataset.json": json.dumps({"labels": labels}).encode()})
    expect_error(capsys, "convert", tmp_path / "bad.zip", tmp_path / "out.zip", names="dataset.json", says=says)
    no_partial_output(tmp_path)


def test_label_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = random_images(2)
    meta = {"labels": [["a.png", 0], ["b.png", 5]], "class_names": ["x", "y"]}
    _zip_with(tmp_path / "bad.zip", {"a.png": _png(images[0]), "b.png": _png(images[1]),
                                     "dataset.json": json.dumps(meta).encode()})
    expect_error(capsys, "info", tmp_path / "bad.zip", names="dataset.json", says="label 5 of 'b.png' is out of range")


def test_mixed_sizes_need_resolution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    Image.fromarray(random_images(1, size=8)[0]).save(tmp_path / "src" / "a.png")
    Image.fromarray(random_images(1, size=12)[0]).save(tmp_path / "src" / "b.png")
    expect_error(capsys, "convert", tmp_path / "src", tmp_path / "out.zip", names="b.png", says="--resolution")
    no_partial_output(tmp_path)
    code, _, _ = run_tool(capsys, "convert", tmp_path / "src", tmp_path / "ok.zip", "--resolution", 8)
    assert code == 0


def test_non_square_needs_center_crop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "src" / "wide.png")
    expect_error(capsys, "convert", tmp_path / "src", tmp_path / "out.zip", "--resolution", 8,
                 names="wide.png", says="--transform center-crop")


def test_truncated_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _png(random_images(1)[0])
    _zip_with(tmp_path / "bad.zip", {"a.png": good, "b.png": good[: len(good) // 2]})
    expect_error(capsys, "convert", tmp_path / "bad.zip", tmp_path / "out.zip", names="bad.zip:b.png",
                 says="truncated or corrupt")
    no_partial_output(tmp_path)
    # A zip is not edited: the fix is to rebuild it.
    expect_error(capsys, "info", tmp_path / "bad.zip", "--verify", names="bad.zip:b.png",
                 says=f"re-create the zip from its source images with `diffusion-transfer-data convert SRC "
                      f"{tmp_path / 'bad.zip'}`")


@pytest.mark.parametrize("cut", [0, 20, 45, None])  # empty, in the header, in IHDR, half the file
def test_corrupt_image_in_a_folder_names_the_file_and_the_folder_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int | None) -> None:
    images = random_images(3)
    src = tmp_path / "src"
    for rel, image in zip(["cat/1.png", "cat/2.png", "dog/1.png"], images, strict=True):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        data = _png(image)
        (src / rel).write_bytes(data[: len(data) // 2 if cut is None else cut] if rel == "cat/2.png" else data)
    bad = src / "cat" / "2.png"
    for argv in (("info", src, "--verify"), ("convert", src, tmp_path / "out.zip")):
        code, _, err = run_tool(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"diffusion-transfer-data: error: {bad}: ") and err.strip().endswith(
            f"replace or delete {bad}"), err
        assert "dataset.json" not in err and " at 0x" not in err, err  # no folder has one; no object reprs
    no_partial_output(tmp_path)
    # With a dataset.json beside the images, deleting the image means deleting its entry too.
    (src / "dataset.json").write_text(json.dumps({"labels": [["cat/1.png", 0], ["cat/2.png", 0], ["dog/1.png", 1]]}))
    expect_error(capsys, "info", src, "--verify", names=str(bad),
                 says=f"replace {bad}, or delete it and its entry in {src / 'dataset.json'}")


def test_corrupt_image_of_an_annotation_file_names_its_entry(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "imgs").mkdir()
    data = _png(random_images(1)[0])
    (tmp_path / "imgs" / "0.png").write_bytes(data)
    (tmp_path / "imgs" / "1.png").write_bytes(data[:40])
    meta = {"images": [{"id": i, "file_name": f"imgs/{i}.png"} for i in range(2)],
            "annotations": [{"id": i, "image_id": i, "category_id": 0} for i in range(2)],
            "categories": [{"id": 0, "name": "oak", "supercategory": "Plants"}]}
    (tmp_path / "train_mini.json").write_text(json.dumps(meta))
    bad = tmp_path / "imgs" / "1.png"
    expect_error(capsys, "convert", tmp_path / "train_mini.json", tmp_path / "out.zip", names=str(bad),
                 says=f"replace {bad}, or delete it and its entry in {tmp_path / 'train_mini.json'}")


def test_decoder_errors_never_show_object_reprs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(_png(random_images(1)[0]))

    def broken_open(fp, *args, **kwargs):
        raise OSError(f"cannot read {fp!r}")  # as some PIL decoders word it

    monkeypatch.setattr("diffusion_transfer.data.archive.Image.open", broken_open)
    expect_error(capsys, "info", tmp_path / "src", "--verify", names="a.png", says="(OSError: cannot read the file)")


def _image_folder(root: Path) -> None:
    """Class folders of images in the modes that used to warn: grayscale (a non-writable array for torch) and a
    palette image with transparency (PIL asks for RGBA first)."""
    gray, rgb = random_images(2, channels=1, seed=1), random_images(2, seed=2)
    (root / "g").mkdir(parents=True)
    (root / "p").mkdir()
    for i in range(2):
        Image.fromarray(gray[i]).save(root / "g" / f"{i}.png")
        Image.fromarray(rgb[i]).convert("P").save(root / "p" / f"{i}.png", transparency=3)


def test_info_verify_says_verified_and_prints_no_warnings(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src")
    src, out = tmp_path / "src", tmp_path / "o.zip"
    # A fresh interpreter with every warning shown: torch prints its non-writable-array warning once per process.
    script = ("import sys; from diffusion_transfer.data.tool import main; "
              f"sys.exit(main(['info', {str(src)!r}, '--verify']) or main(['convert', {str(src)!r}, {str(out)!r}]) "
              f"or main(['info', {str(out)!r}, '--verify']))")
    result = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == ["note: converted 2 L image(s) to RGB",
                                                  "note: converted 2 P image(s) to RGB"]  # and no warning
    lines = result.stdout.strip().splitlines()
    assert [line for line in lines if line.startswith("verified")] == ["verified 4 images: OK"] * 2
    assert lines[4] == lines[-1] == "verified 4 images: OK", lines  # the last line of each info


def test_info_without_verify_does_not_claim_it_and_json_counts(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _image_folder(tmp_path / "src")
    code, out, _ = run_tool(capsys, "info", tmp_path / "src")
    assert code == 0 and "verified" not in out
    code, out, _ = run_tool(capsys, "info", tmp_path / "src", "--verify", "--json")
    assert code == 0 and json.loads(out)["verified"] == 4


def test_items_come_from_writable_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from diffusion_transfer.data import ImageFolderDataset

    seen = []

    def from_numpy(array: np.ndarray) -> torch.Tensor:
        seen.append(array.flags.writeable)  # torch warns (once per process) about a read-only one
        return torch.tensor(array)

    monkeypatch.setattr("diffusion_transfer.data.datasets.torch.from_numpy", from_numpy)
    _image_folder(tmp_path / "src")
    for channels in (1, 3):
        dataset = ImageFolderDataset(tmp_path / "src", channels=channels)
        for i in range(len(dataset)):
            assert dataset[i][0].shape == (channels, 8, 8)
    assert seen == [True] * 8


def test_empty_class_folder_and_layout_numbering_through_the_tool(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    images = random_images(3)
    for rel, image in zip(["zeta/a/1.png", "alpha/b/1.png", "alpha/c/1.png"], images, strict=True):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "src" / rel)
    code, out, _ = run_tool(capsys, "info", tmp_path / "src")
    assert code == 0
    assert [line.split()[2:] for line in out.splitlines()[2:]] == [["a", "[zeta]"], ["b", "[alpha]"], ["c", "[alpha]"]]
    (tmp_path / "src" / "alpha" / "d").mkdir()
    expect_error(capsys, "convert", tmp_path / "src", tmp_path / "out.zip", names=str(tmp_path / "src" / "alpha" / "d"),
                 says="empty class folder")
    no_partial_output(tmp_path)


def test_truncated_zip(shapes_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = shapes_zip.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    expect_error(capsys, "info", tmp_path / "cut.zip", names="cut.zip", says="corrupt")
    # A flipped byte inside an image is caught by the zip CRC when read.
    damaged = bytearray(data)
    with zipfile.ZipFile(shapes_zip) as archive:
        info = archive.getinfo("00000/img00000003.png")
    damaged[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF
    (tmp_path / "flip.zip").write_bytes(bytes(damaged))
    expect_error(capsys, "convert", tmp_path / "flip.zip", tmp_path / "out.zip", names="img00000003.png",
                 says="corrupt")
    no_partial_output(tmp_path)


def test_corrupt_and_malicious_cifar_tarballs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_cifar_tarball(tmp_path / "cifar.tar.gz", kind=10, per_batch=2)
    data = (tmp_path / "cifar.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    expect_error(capsys, "convert", tmp_path / "cut.tar.gz", tmp_path / "out.zip", names="cut.tar.gz",
                 says="download it again")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    payload = pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2)
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for name in ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    expect_error(capsys, "convert", tmp_path / "evil.tar.gz", tmp_path / "out.zip", names="data_batch_1",
                 says="refusing to load")
    assert not marker.exists()
    no_partial_output(tmp_path)


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def images():
        yield random_images(1)[0], 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset_zip(tmp_path / "out.zip", images())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ export


def _pixels_and_labels(path: Path) -> tuple[list[bytes], list[int], dict]:
    from diffusion_transfer.data import ImageCollection

    collection = ImageCollection.open(path)
    pixels = [np.asarray(collection.load(i).convert("RGB")).tobytes() for i in range(len(collection))]
    labels = [] if collection.labels is None else collection.labels.tolist()
    return pixels, labels, collection.classes.to_json()


def test_export_then_convert_gives_the_same_images_and_labels(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "novel.zip"
    assert run_tool(capsys, "shapes", source, "--kinds", "novel", "--colours", 3, "--per-class", 5, "--seed", 7)[0] == 0
    code, out, _ = run_tool(capsys, "export", source, tmp_path / "images")
    assert code == 0 and "60 images (12 class folders in 4 superclass folders)" in out
    # superclass/class/ folders named NN-name, in index order.
    supers = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert supers == ["00-star", "01-hexagon", "02-ring", "03-arrow"]
    assert sorted(p.name for p in (tmp_path / "images/01-hexagon").iterdir()) == [
        "03-red_hexagon", "04-green_hexagon", "05-blue_hexagon"]
    assert sorted(p.name for p in (tmp_path / "images/00-star/00-red_star").iterdir()) == [
        f"img{i:08d}.png" for i in range(5)]
    assert run_tool(capsys, "convert", tmp_path / "images", tmp_path / "back.zip", "--resolution", 16)[0] == 0
    pixels, labels, classes = _pixels_and_labels(source)
    back_pixels, back_labels, back_classes = _pixels_and_labels(tmp_path / "back.zip")
    assert back_pixels == pixels and back_labels == labels  # same images, same labels, same order
    assert back_classes["superclasses"] == classes["superclasses"]
    assert back_classes["class_names"][3] == "03-red_hexagon" and back_classes["superclass_names"][2] == "02-ring"


def test_export_of_flat_and_class_only_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffusion_transfer.data import ClassInfo

    images = random_images(6, seed=3)
    write_dataset_zip(tmp_path / "plain.zip", [(image, None) for image in images])
    code, out, _ = run_tool(capsys, "export", tmp_path / "plain.zip", tmp_path / "flat")
    assert code == 0 and "6 images (unlabelled, flat)" in out
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [f"img{i:08d}.png" for i in range(6)]
    # Labelled, without superclasses or names, classes out of order: class/ folders; convert pairs them back.
    write_dataset_zip(tmp_path / "classes.zip", zip(images, [2, 0, 1, 0, 2, 1], strict=True),
                      ClassInfo(class_names=["b c/d", "..", "Zeta"]))
    assert run_tool(capsys, "export", tmp_path / "classes.zip", tmp_path / "classes")[0] == 0
    assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == ["00-b_c_d", "01", "02-Zeta"]
    for name, folder in (("plain.zip", "flat"), ("classes.zip", "classes")):
        assert run_tool(capsys, "convert", tmp_path / folder, tmp_path / f"{folder}.zip")[0] == 0
        pixels, labels, _ = _pixels_and_labels(tmp_path / name)
        back_pixels, back_labels, _ = _pixels_and_labels(tmp_path / f"{folder}.zip")
        assert sorted(zip(back_pixels, back_labels or [None] * 6)) == sorted(zip(pixels, labels or [None] * 6))


def test_export_folder_names_sort_in_class_order() -> None:
    from diffusion_transfer.data.tool import folder_name

    assert folder_name(0, "red star", 12) == "00-red_star"
    assert folder_name(7, "a/b:c  d", 12) == "07-a_b_c_d"
    assert folder_name(3, ".hidden", 5) == "03-hidden"  # a leading dot would hide the class from convert
    assert folder_name(4, "café crème", 5) == "04-caf_cr_me"
    assert folder_name(2, "", 5) == folder_name(2, None, 5) == folder_name(2, "///", 5) == "02"
    assert folder_name(7, "x", 1000) == "007-x"
    assert len(folder_name(1, "y" * 300, 5)) == 3 + 64
    names = ["zebra", "Ant", "10 cats", "9 dogs", "émeu", "ant"]
    folders = [folder_name(c, n, len(names)) for c, n in enumerate(names)]
    assert sorted(folders) == folders and len(set(folders)) == len(folders)


def test_export_refuses_to_overwrite_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffusion_transfer.data import ClassInfo

    write_dataset_zip(tmp_path / "d.zip", zip(random_images(4), [0, 1, 0, 1], strict=True))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    expect_error(capsys, "export", tmp_path / "d.zip", busy, names=str(busy),
                 says="already exists and is a folder that is not empty")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    expect_error(capsys, "export", tmp_path / "d.zip", tmp_path / "file", names="file", says="is a file")
    (tmp_path / "empty").mkdir()
    assert run_tool(capsys, "export", tmp_path / "d.zip", tmp_path / "empty")[0] == 0  # an empty folder is filled
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["00", "01"]
    # A class without images cannot be a folder: refused before anything is written.
    write_dataset_zip(tmp_path / "gap.zip", zip(random_images(2), [0, 2], strict=True),
                      ClassInfo(class_names=["a", "b", "c"]))
    expect_error(capsys, "export", tmp_path / "gap.zip", tmp_path / "gap", names="gap.zip",
                 says="class 1 ('b') has no images")
    expect_error(capsys, "export", tmp_path / "missing.zip", tmp_path / "out", names="missing.zip",
                 says="no such file")
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name in ("gap", "out"))
    assert leftovers == []


def test_an_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from diffusion_transfer.data import ImageCollection

    write_dataset_zip(tmp_path / "d.zip", zip(random_images(4), [0, 1, 0, 1], strict=True))
    load = ImageCollection.load

    def interrupted(self: ImageCollection, index: int):
        if index == 2:
            raise KeyboardInterrupt
        return load(self, index)

    monkeypatch.setattr(ImageCollection, "load", interrupted)
    code, _, err = run_tool(capsys, "export", tmp_path / "d.zip", tmp_path / "out")
    assert code == 130 and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip"]
