"""Seeded fuzzer of the data layer: mutated dataset zips, PNGs, ``dataset.json`` files and CIFAR tarballs.

One implementation, two users: ``tests/test_fuzz_data.py`` runs a couple of hundred cases in CI and
``benchmarks/fuzz_data.py --cases N`` runs thousands. Case ``i`` of seed ``s`` is always the same input.

Each case builds one mutated input from small pristine sources and feeds it to ``diffusion-transfer-data``
``convert``, ``info --verify`` and ``longtail`` (in-process, through ``main(argv)``) and, for zips, to
``ZipImageDataset`` (construct, then read every item). The contract (README, "Datasets"):

- the tool exits 0 with a valid output, or 2 with exactly one stderr line (``diffusion-transfer-data: error:
  ...``) that names the input; never a traceback;
- ``ZipImageDataset`` reads every item, or raises :class:`DatasetError` with a one-line message naming the file;
- the destination either does not exist or is a complete dataset zip that ``ZipImageDataset`` reads fully
  (and ``info`` describes); no temporary file is left beside it;
- every call ends within the case timeout.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import pickle
import random
import shutil
import signal
import struct
import tarfile
import tempfile
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion_transfer.data import DatasetError, ZipImageDataset, make_shapes
from diffusion_transfer.data.tool import main as tool_main

from .helpers import make_cifar_tarball

KINDS = (
    "dataset-zip",     # bytes of a whole dataset zip (headers, central directory, data)
    "png-in-zip",      # one PNG inside a well-formed zip with a dataset.json
    "png-in-folder",   # one PNG inside a class/ folder
    "json-in-zip",     # the dataset.json of a zip, as bytes or as JSON values
    "json-in-folder",  # the dataset.json of a folder
    "cifar-gz",        # bytes of a CIFAR python tar.gz
    "cifar-tar",       # bytes of the tar inside it (headers, sizes), re-compressed
    "cifar-pickle",    # bytes of one pickled batch inside a well-formed tarball
    "cifar-object",    # values of one batch (labels, arrays, names), pickled as the authors did
)
"""Case ``i`` mutates the input kind ``KINDS[i % len(KINDS)]``."""

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


# ------------------------------------------------------------------------------------------------ sources


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _foreign_images() -> dict[str, bytes]:
    """Six 8x8 PNGs in the modes users' data comes in (RGB, L, RGBA, P, 1, LA), two per class folder."""
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    modes = ["RGB", "L", "RGBA", "P", "1", "LA"]
    images = [im.convert(mode) for im, mode in zip(rgb, modes, strict=True)]
    return {f"{cls}/{i}.png": _png(images[2 * c + i]) for c, cls in enumerate(["bird", "cat", "dog"]) for i in range(2)}


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _tar_gz(members: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class Sources:
    """The pristine inputs every case starts from (built once, a few KB each)."""

    dataset_zip: bytes                   # make_shapes: 12 images 8x8, 4 classes, superclasses, class_names
    images: dict[str, bytes]             # class/i.png in six modes
    labels_json: bytes                   # EDM-style dataset.json for ``images`` (no class_names)
    cifar: dict[int, list[tuple[str, bytes]]]  # 10 / 100 -> tar members (name, pickle bytes)

    @classmethod
    def build(cls) -> Sources:
        with tempfile.TemporaryDirectory() as tmp:
            make_shapes(Path(tmp) / "shapes.zip", resolution=8, per_class=3, seed=0, colours=1)
            dataset_zip = (Path(tmp) / "shapes.zip").read_bytes()
            cifar = {}
            for kind, per_batch in ((10, 2), (100, 6)):
                make_cifar_tarball(Path(tmp) / f"c{kind}.tar.gz", kind=kind, per_batch=per_batch)
                cifar[kind] = _tar_members(Path(tmp) / f"c{kind}.tar.gz")
        images = _foreign_images()
        labels = {"labels": [[name, i // 2] for i, name in enumerate(sorted(images))]}
        return cls(dataset_zip, images, json.dumps(labels).encode(), cifar)


# ------------------------------------------------------------------------------------------------ mutations


def mutate_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str]:
    """One random byte-level mutation of ``data[lo:hi]`` (flips, truncation, splices, size-like integers)."""
    hi = len(data) if hi is None else hi
    buf = bytearray(data)
    op = rng.choice(["flip", "flip", "truncate", "overwrite", "integer", "insert", "delete"])
    pos = rng.randrange(lo, max(lo + 1, hi))
    if op == "truncate":
        return bytes(buf[:pos]), f"truncate at {pos}/{len(data)}"
    if not buf:
        return bytes([rng.randrange(256)]), "one random byte"
    pos = min(pos, len(buf) - 1)
    if op == "flip":
        where = sorted({min(len(buf) - 1, rng.randrange(lo, max(lo + 1, hi))) for _ in range(rng.randint(1, 4))})
        for p in where:
            buf[p] ^= rng.randrange(1, 256)
        return bytes(buf), f"flip bytes {where}"
    if op == "overwrite":
        n = rng.randint(1, 16)
        buf[pos:pos + n] = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(n))
        return bytes(buf), f"overwrite {n} bytes at {pos}"
    if op == "integer":
        value = rng.choice(INTERESTING + (len(data), len(data) + 1, rng.randrange(1 << 32)))
        width, order = rng.choice([(2, "<"), (4, "<"), (4, ">"), (8, "<")])
        packed = struct.pack(order + {2: "H", 4: "I", 8: "Q"}[width], value & ((1 << (8 * width)) - 1))
        buf[pos:pos + width] = packed
        return bytes(buf), f"write {value:#x} as {order}{width} at {pos}"
    if op == "insert":
        chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        return bytes(buf[:pos] + chunk + buf[pos:]), f"insert {len(chunk)} bytes at {pos}"
    n = rng.randint(1, 32)
    return bytes(buf[:pos] + buf[pos + n:]), f"delete {n} bytes at {pos}"


def mutate_png(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Raw bytes, or one chunk's payload with its CRC recomputed (to get past the CRC into the decoder)."""
    if rng.random() < 0.5:
        return mutate_bytes(data, rng)
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((pos, length, data[pos + 4:pos + 8].decode("latin-1")))
        pos += 12 + length
    start, length, kind = rng.choice([c for c in chunks if c[2] in ("IHDR", "IDAT", "PLTE", "tRNS")] or chunks)
    payload, how = mutate_bytes(data[start + 8:start + 8 + length], rng)
    chunk = struct.pack(">I", len(payload)) + kind.encode("latin-1") + payload
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]))
    return data[:start] + chunk + data[start + 12 + length:], f"{kind} chunk with a valid CRC: {how}"


JUNK: tuple[Any, ...] = (None, True, -1, 0, 3, 2**31, 2**63, 10**30, -(2**40), 1.5, float("1e308"), "", "x",
                         "dataset.json", [], [0], [[]], [["x", 0]], [-1], {}, {"a": 1}, "\u00e9\u4e2d")


def mutate_json_value(meta: Any, rng: random.Random) -> tuple[Any, str]:
    """Replace, delete or duplicate one node of a parsed JSON document."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(meta, ())
    # Half the time away from the label list, which otherwise holds nearly every node.
    others = [p for p in paths if p[:1] != ("labels",)]
    path = rng.choice(others if others and rng.random() < 0.5 else paths)
    if not path:
        return rng.choice(JUNK), "whole document replaced"
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.choice(["replace", "replace", "replace", "delete", "duplicate"])
    if op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = rng.choice(JUNK)
        return meta, f"{list(path)} = {parent[key]!r}"
    return meta, f"{op} {list(path)}"


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    meta, how = mutate_json_value(json.loads(data), rng)
    return json.dumps(meta).encode(), how


def mutate_zip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Bytes of a zip, aimed at the whole file, its central directory, or one local header."""
    region = rng.choice(["file", "directory", "header"])
    if region == "file":
        return mutate_bytes(data, rng)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    if region == "directory":
        start = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
        start = min(data.find(b"PK\x01\x02"), start) if start >= 0 else max(0, len(data) - 22)
        out, how = mutate_bytes(data, rng, start, len(data))
        return out, f"central directory: {how}"
    info = rng.choice(infos)
    out, how = mutate_bytes(data, rng, info.header_offset, info.header_offset + 30 + len(info.filename))
    return out, f"local header of {info.filename}: {how}"


def _zip(files: dict[str, bytes], rng: random.Random | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (name, data) in enumerate(files.items()):
            method = zipfile.ZIP_DEFLATED if (rng.random() < 0.5 if rng else i % 2) else zipfile.ZIP_STORED
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buffer.getvalue()


def _mutate_cifar_object(obj: dict, rng: random.Random) -> tuple[dict, str]:
    key = rng.choice(list(obj))
    value = obj[key]
    op = rng.choice(["delete", "junk", "element", "shape"])
    if op == "delete":
        del obj[key]
        return obj, f"delete {key!r}"
    if op == "element" and isinstance(value, list) and value:
        i = rng.randrange(len(value))
        value[i] = rng.choice([-1, 10, 99, 100, 255, 256, 2**40, None, "x", b"\xff", 1.5, []])
        return obj, f"{key!r}[{i}] = {value[i]!r}"
    if op == "shape" and isinstance(value, np.ndarray):
        shapes = [(value.shape[0], 3071), (value.shape[0] + 1, 3072), (3072,), (0, 3072), (value.size,)]
        new = np.resize(value, rng.choice(shapes)).astype(rng.choice([np.uint8, np.int64, np.float32, np.int8]))
        obj[key] = new
        return obj, f"{key!r} as {new.dtype} {new.shape}"
    junk = [None, 0, "x", b"x", [], {}, [b"a"], np.zeros(3), np.zeros((2, 2)), [-1, 0], list(range(200))]
    obj[key] = rng.choice(junk)
    return obj, f"{key!r} = {obj[key]!r:.40}"


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One mutated input: ``files`` (relative path -> bytes) to write under a fresh folder, and what to run."""

    index: int
    kind: str
    how: str
    files: dict[str, bytes]
    src: str                     # the input path relative to the case folder ("input.zip", "input-folder", ...)
    commands: tuple[str, ...]    # of "convert", "info", "longtail", "dataset"

    def __str__(self) -> str:
        return f"case {self.index} ({self.kind}: {self.how})"


def make_case(sources: Sources, seed: int, index: int) -> Case:
    """Case ``index`` of ``seed``: always the same mutated input."""
    rng = random.Random(f"{seed}:{index}")
    kind = KINDS[index % len(KINDS)]
    zip_commands = ("convert", "info", "longtail", "dataset")
    folder_commands = ("convert", "info", "longtail")
    if kind == "dataset-zip":
        data, how = mutate_zip(sources.dataset_zip, rng)
        return Case(index, kind, how, {"input.zip": data}, "input.zip", zip_commands)
    if kind in ("png-in-zip", "png-in-folder"):
        files = dict(sources.images)
        name = rng.choice(sorted(files))
        files[name], how = mutate_png(files[name], rng)
        how = f"{name}: {how}"
        if kind == "png-in-folder":
            return Case(index, kind, how, {f"input-folder/{k}": v for k, v in files.items()}, "input-folder",
                        folder_commands)
        files["dataset.json"] = sources.labels_json
        return Case(index, kind, how, {"input.zip": _zip(files, rng)}, "input.zip", zip_commands)
    if kind in ("json-in-zip", "json-in-folder"):
        files = dict(sources.images)
        if kind == "json-in-zip" and rng.random() < 0.5:  # our own zip: class_names, superclasses, class_counts
            with zipfile.ZipFile(io.BytesIO(sources.dataset_zip)) as archive:
                files = {n: archive.read(n) for n in archive.namelist()}
        meta = files.get("dataset.json", sources.labels_json)
        files["dataset.json"], how = mutate_json(meta, rng)
        if kind == "json-in-folder":
            return Case(index, kind, how, {f"input-folder/{k}": v for k, v in files.items()}, "input-folder",
                        folder_commands)
        return Case(index, kind, how, {"input.zip": _zip(files, rng)}, "input.zip", zip_commands)
    # CIFAR tarballs
    cifar = rng.choice([10, 100])
    members = list(sources.cifar[cifar])
    if kind == "cifar-gz":
        data, how = mutate_bytes(_tar_gz(members), rng)
    elif kind == "cifar-tar":
        raw = gzip.decompress(_tar_gz(members))
        if rng.random() < 0.6:  # a member header (name, mode, size, checksum, ...)
            headers = [i for i in range(0, len(raw), 512) if raw[i + 257:i + 262] == b"ustar"]
            start = rng.choice(headers)
            raw, how = mutate_bytes(raw, rng, start, start + 512)
            how = f"tar header at {start}: {how}"
        else:
            raw, how = mutate_bytes(raw, rng)
        data = gzip.compress(raw, mtime=0)
    else:
        i = rng.randrange(len(members))
        name, payload = members[i]
        if kind == "cifar-pickle":
            payload, how = mutate_bytes(payload, rng)
        else:
            obj, how = _mutate_cifar_object(pickle.loads(payload), rng)
            payload = pickle.dumps(obj, protocol=2)
        members[i] = (name, payload)
        how = f"{name}: {how}"
        data = _tar_gz(members)
    return Case(index, kind, f"CIFAR-{cifar} {how}", {"input.tar.gz": data}, "input.tar.gz", ("convert",))


def pristine_cases(sources: Sources) -> list[Case]:
    """The unmutated inputs, one per source (every command must succeed on them: the fuzzer is not vacuous)."""
    zip_commands, folder_commands = ("convert", "info", "longtail", "dataset"), ("convert", "info", "longtail")
    foreign = {**sources.images, "dataset.json": sources.labels_json}
    return [
        Case(-1, "dataset-zip", "pristine", {"input.zip": sources.dataset_zip}, "input.zip", zip_commands),
        Case(-1, "png-in-zip", "pristine", {"input.zip": _zip(foreign)}, "input.zip", zip_commands),
        Case(-1, "png-in-folder", "pristine", {f"input-folder/{k}": v for k, v in sources.images.items()},
             "input-folder", folder_commands),
        Case(-1, "json-in-folder", "pristine", {f"input-folder/{k}": v for k, v in foreign.items()}, "input-folder",
             folder_commands),
        *(Case(-1, "cifar-gz", f"pristine CIFAR-{kind}", {"input.tar.gz": _tar_gz(sources.cifar[kind])},
               "input.tar.gz", ("convert",)) for kind in (10, 100)),
    ]


# ------------------------------------------------------------------------------------------------ checks


class CaseTimeout(BaseException):
    """Raised by the alarm when a call runs past the case timeout (a BaseException: no library catches it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (SIGALRM; Unix, main thread only)."""
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_tool(*argv: str) -> tuple[int, str, str]:
    """``diffusion-transfer-data ARGV`` in-process: (exit status, stdout, stderr); exceptions propagate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool_main(list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def read_fully(path: Path) -> int:
    """Construct ``ZipImageDataset(path)`` and read every item (and the class counts); returns the item count."""
    dataset = ZipImageDataset(path)
    for i in range(len(dataset)):
        dataset[i]
    assert sum(dataset.class_counts) in (0, len(dataset))
    return len(dataset)


@dataclass
class CaseResult:
    case: Case
    outcomes: dict[str, str] = field(default_factory=dict)  # command -> "ok" | "error"
    problems: list[str] = field(default_factory=list)       # broken promises, with the traceback's last line


def _traceback(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1] if frames else None
    where = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
    return f"{type(err).__name__}: {str(err)[:200]}{where}"


def _check_output(dest: Path, problems: list[str], command: str) -> None:
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    if leftovers:
        problems.append(f"{command}: left temporary files {leftovers}")
    if not dest.exists():
        return
    try:
        read_fully(dest)
        code, _, err = run_tool("info", str(dest))
        if code != 0:
            problems.append(f"{command}: wrote {dest.name}, which `info` refuses: {err.strip()}")
    except DatasetError as err:
        problems.append(f"{command}: wrote {dest.name}, which ZipImageDataset refuses: {err}")
    except Exception as err:  # noqa: BLE001 - any other exception is a finding
        problems.append(f"{command}: wrote {dest.name}, whose reading raises {_traceback(err)}")


def run_case(case: Case, folder: Path, timeout: float = 10.0) -> CaseResult:
    """Write ``case``'s files under ``folder`` (which must be empty), run its commands, check every promise."""
    for name, data in case.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    src = folder / case.src
    result = CaseResult(case)
    for command in case.commands:
        out_dir = folder / f"out-{command}"
        out_dir.mkdir()
        dest = out_dir / "out.zip"
        argv = {"convert": ("convert", str(src), str(dest)), "info": ("info", str(src), "--verify"),
                "longtail": ("longtail", str(src), str(dest), "--imbalance", "0.5"),
                "dataset": ()}[command]
        try:
            with deadline(timeout):
                if command == "dataset":
                    try:
                        read_fully(src)
                        result.outcomes[command] = "ok"
                    except DatasetError as err:
                        result.outcomes[command] = "error"
                        message = str(err)
                        if "\n" in message.strip() or case.src not in message:
                            result.problems.append(f"dataset: DatasetError is not one line naming {case.src}: "
                                                   f"{message!r}")
                    continue
                code, _, err = run_tool(*argv)
                lines = err.strip().splitlines()
                if code == 0:
                    result.outcomes[command] = "ok"
                    if command != "info" and not dest.exists():
                        result.problems.append(f"{command}: exit 0 but no {dest.name}")
                elif code == 2:
                    result.outcomes[command] = "error"
                    if len(lines) != 1 or not lines[0].startswith("diffusion-transfer-data: error: "):
                        result.problems.append(f"{command}: exit 2 without a one-line error: {err!r:.300}")
                    elif case.src not in lines[0]:
                        result.problems.append(f"{command}: the error does not name {case.src}: {lines[0]}")
                    if dest.exists():
                        result.problems.append(f"{command}: exit 2 but {dest.name} was written")
                else:
                    result.outcomes[command] = "error"
                    result.problems.append(f"{command}: exit {code}: {err!r:.300}")
                if command != "info":
                    _check_output(dest, result.problems, command)
        except CaseTimeout:
            result.outcomes[command] = "timeout"
            result.problems.append(f"{command}: still running after {timeout:.0f} s")
        except Exception as err:  # noqa: BLE001 - any exception is a finding
            result.outcomes[command] = "crash"
            result.problems.append(f"{command}: traceback: {_traceback(err)}")
    return result


def run_cases(indices: range | list[int], seed: int, workdir: Path, timeout: float = 10.0,
              sources: Sources | None = None,
              report: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run cases ``indices`` of ``seed`` in fresh folders under ``workdir`` (each removed after its run)."""
    sources = sources or Sources.build()
    results = []
    for index in indices:
        case = make_case(sources, seed, index)
        folder = workdir / f"case-{index}"
        folder.mkdir(parents=True)
        try:
            result = run_case(case, folder, timeout)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results.append(result)
        if report is not None:
            report(result)
    return results
