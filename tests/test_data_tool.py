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
    expect_error(capsys, "info", tmp_path / "bad.zip", "--verify", names="b.png", says="truncated or corrupt")


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
