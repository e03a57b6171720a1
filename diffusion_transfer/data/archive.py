"""StyleGAN/EDM dataset archives: read image collections, write dataset zips atomically.

The on-disk format is the one of EDM's ``dataset_tool.py``: an uncompressed (``ZIP_STORED``) zip of
uncompressed PNGs named ``{idx // 1000:05d}/img{idx:08d}.png`` with a ``dataset.json`` at the root,
``{"labels": [[name, int], ...]}`` or ``{"labels": null}``. Our documented extensions live in the same
``dataset.json``:

- ``class_names``: ``[str] * num_classes``;
- ``superclasses``: ``[int] * num_classes``, the superclass index of each class;
- ``superclass_names``: ``[str] * num_superclasses``;
- ``class_counts``: per-class image counts (written by our tools, recomputed on read);
- ``longtail``: provenance of a long-tailed subset (imbalance, profile, seed, source).

An :class:`ImageCollection` reads a zip or a folder the same way: every file with an image extension,
at any depth, sorted by name. Labels come from ``dataset.json`` when there is one; a folder without it
takes labels from its layout (``class/img.png`` or ``superclass/class/img.png``), a zip without it is
unlabelled, as in EDM.

Folder layouts, without a ``dataset.json`` (folders whose name starts with ``.`` are not classes):

- flat ``img.png``: unlabelled;
- ``class/img.png``: one class per folder;
- ``superclass/class/img.png``: the same classes, each with its superclass.

Class numbering is the same in both labelled layouts: classes are numbered 0..C-1 in the sorted order (Python
string order, as torchvision's ``ImageFolder``) of their class-folder names, whatever superclass folder holds them,
so ``a/ b/ c/`` and ``zeta/a/ alpha/b/ alpha/c/`` give ``a=0, b=1, c=2``; superclasses are numbered in the sorted
order of their folder names (``alpha=0, zeta=1``). A class-folder name may therefore appear under one superclass
only (two superclasses holding the same name is an error naming both). An empty class or superclass folder (no
image files inside) is an error that names it rather than a class silently dropped, which would renumber the
classes after it.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
METADATA_NAME = "dataset.json"
UNLABELLED = -1
"""Label served for images of an unlabelled dataset (models map it to their null class)."""

_CORRUPT_HINT = "re-create it with `diffusion-transfer-data convert`"
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


MAX_CLASSES = 1 << 20
"""Labels must be below this (ImageNet-21k has 21,841 classes): a tampered label of 2**31 would otherwise make every
per-class count allocate gigabytes."""


def one_line(text: str) -> str:
    """``text`` as one printable line: line breaks become spaces, other control characters escapes."""
    return "".join(c if c.isprintable() else " " if c in "\n\r\t" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class DatasetError(ValueError):
    """An expected problem with user data. The message is one line that names the file and the fix.

    The message is made one printable line whatever it quotes (a zip entry name with a control character, a
    library's multi-line message).
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


def archive_name(index: int, suffix: str = ".png") -> str:
    """Name of entry ``index`` inside a dataset zip: ``00000/img00000000.png`` (1000 per folder)."""
    return f"{index // 1000:05d}/img{index:08d}{suffix}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.split("/")[-1].startswith(".")


# ------------------------------------------------------------------------------------------------
# Storage: where the bytes come from.


class _ZipStorage:
    """Read-only zip with a lazily opened handle per process.

    ``zipfile.ZipFile`` is neither picklable nor fork-safe, so DataLoader workers each open their
    own handle: the handle is dropped when pickled and reopened when the process id changes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        # Not ZipInfo.is_dir(): it fails on the empty name of a damaged entry.
        self.files = sorted(info.filename for info in self._handle().infolist()
                            if info.filename and not info.filename.endswith("/"))

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except Exception as err:  # noqa: BLE001 - a damaged directory raises anything (IndexError, NotImplemented...)
                raise DatasetError(
                    f"{self.path}: not a readable zip archive ({type(err).__name__}: {err}); the file is truncated or "
                    f"corrupt: {_CORRUPT_HINT}"
                ) from None
            self._pid = os.getpid()
        return self._zip

    def read(self, name: str) -> bytes:
        handle = self._handle()
        try:
            return handle.read(name)
        except Exception as err:  # noqa: BLE001 - zlib.error, NotImplementedError (method, version), RuntimeError...
            raise DatasetError(f"{self.path}:{name}: cannot read from the zip ({type(err).__name__}: {err}); the "
                               f"archive is corrupt: {_CORRUPT_HINT}") from None

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"

    def fix(self, name: str) -> str:
        """What to do about a damaged entry ``name``: a zip is rebuilt from its source, not edited."""
        return f"re-create the zip from its source images with `diffusion-transfer-data convert SRC {self.path}`"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None
        state["_pid"] = None
        return state


class _FolderStorage:
    """A folder of image files (any depth).

    ``files`` lists them (POSIX paths relative to ``path``), or the given names (no folder walk); ``folders``
    lists the sub-folders of a walked folder (empty when names are given). ``index_file`` names the file that
    lists the images when it is not the folder's own ``dataset.json`` (an iNat annotation file).
    """

    def __init__(self, path: Path, files: Sequence[str] | None = None, index_file: Path | None = None) -> None:
        self.path = path
        self.index_file = index_file
        self.folders: list[str] = []
        if files is not None:
            self.files = sorted(files)
            return
        found = []
        for root, dirs, names in os.walk(path):
            rel = Path(root).relative_to(path)
            self.folders.extend((rel / d).as_posix() for d in dirs)
            found.extend((rel / f).as_posix() for f in names)
        self.files = sorted(found)
        self.folders.sort()

    def read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except OSError as err:
            raise DatasetError(f"{self.path / name}: cannot read ({err.strerror})") from None

    def where(self, name: str) -> str:
        return str(self.path / name)

    def fix(self, name: str) -> str:
        """What to do about a damaged image ``name``: replace it, or delete it (and its entry where one lists it)."""
        listed_in = self.index_file or (self.path / METADATA_NAME if METADATA_NAME in self.files else None)
        if listed_in is not None:
            return f"replace {self.path / name}, or delete it and its entry in {listed_in}"
        return f"replace or delete {self.path / name}"


# ------------------------------------------------------------------------------------------------
# Collections: names + labels + class metadata, images decoded on demand.


def _describe(err: BaseException) -> str:
    """``str(err)`` without object reprs such as ``<_io.BytesIO object at 0x7f...>`` (the message names the file)."""
    return _OBJECT_REPR.sub("the file", str(err))


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` converted to ``mode`` ("RGB" or "L"); a palette image with transparency goes through RGBA first,
    as PIL asks (it warns otherwise), so the transparent colour keeps its palette value."""
    if image.mode == mode:
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(mode)


@dataclass
class ClassInfo:
    """Class metadata of a dataset.

    Attributes:
        class_names: one name per class, or None when the dataset does not name them.
        superclasses: superclass index of each class (length num_classes), or None.
        superclass_names: one name per superclass, or None.
    """

    class_names: list[str] | None = None
    superclasses: list[int] | None = None
    superclass_names: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("class_names", "superclasses", "superclass_names"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        return out


@dataclass
class ImageCollection:
    """Images of a dataset (zip, folder or in-memory source) with labels and class metadata.

    Attributes:
        source: the path the images come from (for messages).
        names: image names, sorted; ``load(i)`` decodes ``names[i]``.
        labels: int64 array ``[len(names)]`` of class indices, or None when unlabelled.
        classes: class names and hierarchy.
        extra: other keys of ``dataset.json`` (e.g. ``longtail`` provenance), kept as read.
    """

    source: Path
    names: list[str]
    labels: np.ndarray | None
    classes: ClassInfo = field(default_factory=ClassInfo)
    extra: dict[str, Any] = field(default_factory=dict)
    storage: Any = None
    arrays: np.ndarray | None = None  # in-memory images [N, H, W, C] uint8 (e.g. CIFAR batches)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(class_names)`` when named, else ``max(label) + 1``; 0 if unlabelled."""
        if self.labels is None or len(self.labels) == 0:
            return 0  # class names without labels describe nothing a model could condition on
        if self.classes.class_names is not None:
            return len(self.classes.class_names)
        return int(self.labels.max()) + 1

    @property
    def class_counts(self) -> list[int]:
        """Images per class, ``[num_classes]`` (empty when unlabelled)."""
        if self.labels is None:
            return []
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def where(self, index: int) -> str:
        """Human-readable location of image ``index`` for error messages."""
        if self.storage is not None:
            return self.storage.where(self.names[index])
        return f"{self.source}[{self.names[index]}]"

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` fully (raises :class:`DatasetError` on a corrupt file)."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[index])
        name = self.names[index]
        data = self.storage.read(name)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning, where it is
            # turned into an error (diffusion-transfer-data does): a damaged header can claim a huge size.
            raise DatasetError(f"{self.where(index)}: {_describe(err)}; the file is corrupt or far too large for a "
                               f"dataset: {self.storage.fix(name)}") from None
        except UnidentifiedImageError:
            raise DatasetError(f"{self.where(index)}: not an image in a format PIL reads; the file is truncated or "
                               f"corrupt: {self.storage.fix(name)}") from None
        except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types (struct.error, IndexError, ...)
            raise DatasetError(
                f"{self.where(index)}: cannot decode image ({type(err).__name__}: {_describe(err)}); the file is "
                f"truncated or corrupt: {self.storage.fix(name)}"
            ) from None
        return image

    @property
    def latents(self) -> dict[str, Any] | None:
        """The ``latents`` record of a latent zip (scale, channels, resolution, vae), else None."""
        return self.extra.get("latents") or None

    def load_array(self, index: int) -> np.ndarray:
        """Read ``.npy`` entry ``index`` of a latent zip (never unpickles)."""
        data = self.storage.read(self.names[index])
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DatasetError(f"{self.where(index)}: cannot read latents ({err}); the file is truncated or "
                               "corrupt: re-create it with `diffusion-transfer-data encode`") from None

    def subset(self, indices: Sequence[int]) -> ImageCollection:
        """A view of the images at ``indices`` (same storage, same class metadata)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageCollection(
            source=self.source,
            names=[self.names[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            classes=self.classes,
            extra=dict(self.extra),
            storage=self.storage,
            arrays=None if self.arrays is None else self.arrays[idx],
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageCollection:
        """Open a dataset zip or image folder (see the module docstring for how labels are found)."""
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"{path}: no such file or folder; check the path, or build a dataset with "
                               "`diffusion-transfer-data shapes` or `diffusion-transfer-data convert`")
        if path.is_dir():
            storage: Any = _FolderStorage(path)
        elif _is_zipfile(path):
            storage = _ZipStorage(path)
        else:
            raise DatasetError(f"{path}: not a zip archive or a folder (corrupt or of another kind); "
                               "convert it with `diffusion-transfer-data convert`")
        meta = _read_metadata(storage) if METADATA_NAME in storage.files else None
        latents = meta is not None and bool(meta.get("latents"))
        names = [name for name in storage.files if (name.endswith(".npy") if latents else _is_image(name))]
        if not names:
            looked = ".npy latents" if latents else ", ".join(IMAGE_EXTENSIONS)
            raise DatasetError(f"{path}: contains no images (looked for {looked}); "
                               "point to the folder or zip that holds the images")
        if meta is not None:
            labels, classes, extra = _parse_metadata(meta, storage.where(METADATA_NAME), names)
        elif isinstance(storage, _FolderStorage):
            labels, classes = _labels_from_layout(path, names, storage.folders)
            extra = {}
        else:
            labels, classes, extra = None, ClassInfo(), {}
        return cls(source=path, names=names, labels=labels, classes=classes, extra=extra, storage=storage)


def _is_zipfile(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - a damaged end record: a zip, and the zip reader says what is wrong
        return True


def _read_metadata(storage: Any) -> dict[str, Any]:
    where = storage.where(METADATA_NAME)
    try:
        meta = json.loads(storage.read(METADATA_NAME))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{where}: not valid JSON ({err}); fix or delete it") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DatasetError(f'{where}: expected an object with a "labels" key ([[name, int], ...] or null)')
    return meta


def _parse_metadata(meta: dict[str, Any], where: str,
                    names: list[str]) -> tuple[np.ndarray | None, ClassInfo, dict[str, Any]]:
    """Validate ``dataset.json`` (already parsed) against the entry names."""
    classes = ClassInfo(
        class_names=_list_of(meta.get("class_names"), str, where, "class_names"),
        superclasses=_list_of(meta.get("superclasses"), int, where, "superclasses"),
        superclass_names=_list_of(meta.get("superclass_names"), str, where, "superclass_names"),
    )
    extra = {k: v for k, v in meta.items() if k not in ("labels", "class_names", "superclasses",
                                                         "superclass_names", "class_counts")}
    if meta["labels"] is None:
        return None, classes, extra
    entries = meta["labels"]
    if not isinstance(entries, list):
        raise DatasetError(f'{where}: "labels" must be a list of [name, int] pairs or null')
    by_name: dict[str, int] = {}
    for entry in entries:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or isinstance(entry[1], bool) or not isinstance(entry[1], int)):
            raise DatasetError(f"{where}: label entry {entry!r} is not [name, int]; only integer class labels "
                               "are supported")
        if entry[1] < 0:
            raise DatasetError(f"{where}: label {entry[1]} of '{entry[0]}' is negative; labels are 0..C-1")
        if entry[1] >= MAX_CLASSES:
            raise DatasetError(f"{where}: label {entry[1]} of '{entry[0]}' is over the limit of {MAX_CLASSES:,} "
                               "classes; labels are class indices 0..C-1")
        by_name[entry[0]] = entry[1]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DatasetError(f"{where} does not match the images: {len(missing)} image(s) have no label, e.g. "
                           f"'{missing[0]}'; rebuild the dataset.json or re-create the dataset")
    stray = sorted(set(by_name) - set(names))
    if stray:
        raise DatasetError(f"{where} does not match the images: it labels {len(stray)} file(s) that are not "
                           f"there, e.g. '{stray[0]}'; rebuild the dataset.json or re-create the dataset")
    labels = np.array([by_name[n] for n in names], dtype=np.int64)
    if classes.class_names is not None and labels.max() >= len(classes.class_names):
        bad = names[int(np.argmax(labels >= len(classes.class_names)))]
        raise DatasetError(f"{where}: label {by_name[bad]} of '{bad}' is out of range for "
                           f"{len(classes.class_names)} class_names; fix the label or class_names")
    num_classes = len(classes.class_names) if classes.class_names is not None else int(labels.max()) + 1
    _check_hierarchy(classes, num_classes, where)
    return labels, classes, extra


def _check_hierarchy(classes: ClassInfo, num_classes: int, where: str) -> None:
    sup = classes.superclasses
    if sup is None:
        return
    if len(sup) != num_classes:
        raise DatasetError(f"{where}: superclasses has {len(sup)} entries for {num_classes} classes; "
                           "give one superclass index per class")
    count = None if classes.superclass_names is None else len(classes.superclass_names)
    for c, s in enumerate(sup):
        if s < 0 or (count is not None and s >= count):
            name = f" ('{classes.class_names[c]}')" if classes.class_names is not None else ""
            valid = f"0..{count - 1}, one per superclass_names entry" if count is not None else ">= 0"
            raise DatasetError(f"{where}: class {c}{name} has superclass {s}; superclass indices are {valid}; "
                               "fix superclasses or superclass_names")


def _list_of(value: Any, kind: type, where: str, key: str) -> list[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{where}: {key} must be a list of {kind.__name__}")
    return value


def _labels_from_layout(path: Path, names: list[str],
                        folders: Sequence[str] = ()) -> tuple[np.ndarray | None, ClassInfo]:
    """Labels of a folder without dataset.json: flat = unlabelled, ``class/x``, or ``superclass/class/x``.

    Classes are numbered by the sorted class-folder names whatever the superclass level, superclasses by their
    sorted folder names (the module docstring gives the rule). ``folders``: every sub-folder, to find empty ones.
    """
    depths = {name.count("/") for name in names}
    if depths == {0}:
        return None, ClassInfo()
    if len(depths) > 1:
        raise DatasetError(f"{path}: images sit at mixed depths; use a flat folder, class/image or "
                           "superclass/class/image, or add a dataset.json")
    depth = depths.pop()
    if depth > 2:
        raise DatasetError(f"{path}: images are {depth} folders deep; use class/image or superclass/class/image, "
                           "or add a dataset.json")
    _check_no_empty_folders(path, names, folders, depth)
    if depth == 1:
        class_dirs = sorted({name.split("/")[0] for name in names})
        index = {c: i for i, c in enumerate(class_dirs)}
        return np.array([index[n.split("/")[0]] for n in names], dtype=np.int64), ClassInfo(class_names=class_dirs)
    holder: dict[str, str] = {}  # class folder -> the superclass folder that holds it
    for parent, leaf in sorted({tuple(name.split("/")[:2]) for name in names}):
        if leaf in holder:
            raise DatasetError(f"{path}: class folder '{leaf}' sits in two superclasses, '{holder[leaf]}/{leaf}' and "
                               f"'{parent}/{leaf}'; classes are numbered by their folder name, so rename one of "
                               "them or add a dataset.json")
        holder[leaf] = parent
    class_names = sorted(holder)
    super_names = sorted(set(holder.values()))
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[n.split("/")[1]] for n in names], dtype=np.int64)
    return labels, ClassInfo(class_names=class_names,
                             superclasses=[super_names.index(holder[c]) for c in class_names],
                             superclass_names=super_names)


def _check_no_empty_folders(path: Path, names: list[str], folders: Sequence[str], depth: int) -> None:
    """Refuse a class (or superclass) folder without images: dropping it would renumber the classes after it."""
    with_images = {"/".join(name.split("/")[:level]) for name in names for level in range(1, depth + 1)}
    empty = [f for f in folders if f.count("/") < depth and f not in with_images
             and not any(part.startswith(".") for part in f.split("/"))]
    if empty:
        what = "class" if empty[0].count("/") == depth - 1 else "superclass"
        more = f" ({len(empty) - 1} more empty folder(s) after it)" if len(empty) > 1 else ""
        raise DatasetError(f"{path / empty[0]}: empty {what} folder (no image files inside){more}; add images to it "
                           "or delete it")


# ------------------------------------------------------------------------------------------------
# Writing.


def encode_png(image: np.ndarray) -> bytes:
    """Uncompressed PNG (``compress_level=0``) of a ``[H, W]`` or ``[H, W, C]`` uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (loaded back with ``allow_pickle=False``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_dataset_zip(
    dest: str | os.PathLike[str],
    images: Iterable[tuple[np.ndarray, int | None]],
    classes: ClassInfo | None = None,
    extra: dict[str, Any] | None = None,
    latents: bool = False,
) -> dict[str, Any]:
    """Write a StyleGAN/EDM dataset zip atomically.

    Args:
        dest: output ``.zip`` path. Parent folders are created.
        images: ``(image, label)`` pairs; image is ``[H, W]`` or ``[H, W, C]`` uint8, label an int or
            None (all None gives ``"labels": null``).
        classes: class names / hierarchy written to ``dataset.json``.
        extra: other ``dataset.json`` keys (e.g. ``longtail`` provenance; ``latents`` for latent zips).
        latents: write arrays as ``.npy`` entries (any float shape) instead of PNGs.

    Returns:
        The ``dataset.json`` content that was written.

    The zip is built in a temporary file beside ``dest`` and moved into place only when complete, so
    an error or an interrupt never leaves a partial ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    labels: list[int | None] = []
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            encode, suffix = (encode_npy, ".npy") if latents else (encode_png, ".png")
            for index, (image, label) in enumerate(images):
                # A fixed timestamp makes the archive byte-identical for identical content.
                archive.writestr(zipfile.ZipInfo(archive_name(index, suffix), date_time=(1980, 1, 1, 0, 0, 0)),
                                 encode(image))
                labels.append(None if label is None else int(label))
            meta = _metadata_json(labels, classes or ClassInfo(), extra or {}, str(dest), suffix)
            archive.writestr(zipfile.ZipInfo(METADATA_NAME, date_time=(1980, 1, 1, 0, 0, 0)),
                             json.dumps(meta, indent=1))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta


def _metadata_json(labels: list[int | None], classes: ClassInfo, extra: dict[str, Any], where: str,
                   suffix: str = ".png") -> dict:
    if not labels:
        raise DatasetError(f"{where}: no images to write")
    has_label = [label is not None for label in labels]
    if any(has_label) and not all(has_label):
        raise DatasetError(f"{where}: some images have labels and some do not; label all or none")
    meta: dict[str, Any] = {"labels": None}
    if all(has_label):
        meta["labels"] = [[archive_name(i, suffix), label] for i, label in enumerate(labels)]
        num_classes = len(classes.class_names) if classes.class_names else max(labels) + 1  # type: ignore[type-var]
        # Write only what the readers accept: labels 0..C-1 and a valid class hierarchy.
        bad = [label for label in labels if not 0 <= label < num_classes]  # type: ignore[operator]
        if bad:
            raise DatasetError(f"{where}: label {bad[0]} is outside the {num_classes} classes; fix the source's labels "
                               "or class names")
        _check_hierarchy(classes, num_classes, where)
        meta["class_counts"] = np.bincount(np.asarray(labels), minlength=num_classes).tolist()
    meta.update(classes.to_json())
    meta.update(extra)
    return meta
