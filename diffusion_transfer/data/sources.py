"""Turn image sources into dataset zips: folders, zips and the CIFAR-10/100 python tarballs.

``convert`` is the library side of ``diffusion-transfer-data convert``. Sources: image folders (``class/`` or
``superclass/class/``, whose classes are numbered alike: see :mod:`~diffusion_transfer.data.archive`), dataset zips,
the CIFAR python tarballs, and iNaturalist-2021-style annotation files (``train_mini.json``: COCO-like
``images``/``annotations``/``categories`` with a ``supercategory`` per category).
Geometry follows EDM's ``dataset_tool.py``: ``center-crop`` takes the centred square of side min(H, W) and
resizes it with LANCZOS; ``center-crop-wide`` is our square variant of its wide mode (scale to the target width, then
crop or letterbox the height); ``none`` only resizes images that are already square.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .archive import ClassInfo, DatasetError, ImageCollection, _FolderStorage, to_mode, write_dataset_zip

TRANSFORMS = ("none", "center-crop", "center-crop-wide")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches that can build numpy arrays and nothing else.

    The batches are pickles; a plain ``pickle.load`` would run any code a tampered file carries.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': a CIFAR batch holds only arrays, "
                                     "lists and strings")


def open_tar(path: Path) -> tarfile.TarFile:
    """Open a (compressed) tar archive, turning format errors into :class:`DatasetError`."""
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DatasetError(f"{path}: not a readable tar archive ({err}); the download is truncated or "
                           "corrupt: download it again") from None


def _check_memo(data: bytes) -> None:
    """Refuse memo indices past the pickle's length before unpickling.

    The C unpickler grows its memo to twice the largest index it is given and clears it, so one tampered 4-byte
    index (``LONG_BINPUT 997361213``) costs 16 GB and minutes. A real pickle numbers its entries in order, so its
    indices stay below its length. Walking the opcodes also catches unknown opcodes and truncated arguments.
    """
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is past the end of the pickle")


def _unpickle_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> dict[Any, Any]:
    try:
        handle = tar.extractfile(member)
        if handle is None:
            raise tarfile.TarError("not a regular file")
        data = handle.read()
        _check_memo(data)
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetError(f"{path}:{member.name}: {err}; this is not an original CIFAR file, download it "
                           "again from its authors") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive or pickle raises anything (zlib, Memory, Key...)
        raise DatasetError(f"{path}:{member.name}: cannot read ({type(err).__name__}: {err}); the archive is "
                           "truncated or corrupt: download it again") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}:{member.name}: expected a dict of arrays; not a CIFAR python batch")
    # The official batches were pickled by Python 2, so keys arrive as bytes.
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _tampered(where: str, what: str) -> DatasetError:
    return DatasetError(f"{where}: {what}; this is not an original CIFAR python batch: download it again")


def _entry(batch: dict[Any, Any], key: str, where: str) -> Any:
    if key not in batch:
        raise _tampered(where, f"has no '{key}' entry")
    return batch[key]


def _strings(batch: dict[Any, Any], key: str, where: str) -> list[str]:
    values = _entry(batch, key, where)
    if not isinstance(values, list) or not values or not all(isinstance(v, (bytes, str)) for v in values):
        raise _tampered(where, f"'{key}' is not a list of names")
    try:
        return [v.decode() if isinstance(v, bytes) else v for v in values]
    except UnicodeDecodeError:
        raise _tampered(where, f"'{key}' holds a name that is not UTF-8") from None


def _pixels(batch: dict[Any, Any], where: str) -> np.ndarray:
    data = _entry(batch, "data", where)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and len(data)):
        shape = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _tampered(where, f"'data' is {shape}, not uint8 [N, 3072] images")
    return data


def _class_labels(batch: dict[Any, Any], key: str, count: int, num_classes: int, where: str) -> np.ndarray:
    values = _entry(batch, key, where)
    try:
        labels = np.asarray(values) if isinstance(values, (list, np.ndarray)) else np.empty(0, dtype=object)
    except (ValueError, TypeError, OverflowError):  # ragged or nested lists
        labels = np.empty(0, dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != count:
        raise _tampered(where, f"'{key}' is not a list of {count} integer labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise _tampered(where, f"'{key}' holds label {int(bad[0])}, outside the {num_classes} classes")
    return labels.astype(np.int64)


def read_cifar_tarball(path: str | Path) -> ImageCollection:
    """Read the training split of ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``.

    Returns an in-memory collection of ``[N, 32, 32, 3]`` uint8 images with labels and class names;
    for CIFAR-100, ``superclasses`` holds each fine class's coarse class (20 superclasses).

    Raises:
        DatasetError: a truncated or corrupt archive, or batches that do not hold uint8 ``[N, 3072]`` images with
            one in-range label each (the message names the member).
    """
    path = Path(path)
    with open_tar(path) as tar:
        try:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DatasetError(f"{path}: cannot list the tar archive ({err}); download it again") from None
        batches = sorted(n for n in members if n.startswith("data_batch_"))
        if batches and "batches.meta" in members:  # CIFAR-10
            parts = [(members[n].name, _unpickle_member(tar, members[n], path)) for n in batches]
            meta_name = members["batches.meta"].name
            meta = _unpickle_member(tar, members["batches.meta"], path)
            label_key, coarse_names = "labels", None
            class_names = _strings(meta, "label_names", f"{path}:{meta_name}")
        elif "train" in members and "meta" in members:  # CIFAR-100
            parts = [(members["train"].name, _unpickle_member(tar, members["train"], path))]
            meta_name = members["meta"].name
            meta = _unpickle_member(tar, members["meta"], path)
            label_key = "fine_labels"
            class_names = _strings(meta, "fine_label_names", f"{path}:{meta_name}")
            coarse_names = _strings(meta, "coarse_label_names", f"{path}:{meta_name}")
        else:
            raise DatasetError(f"{path}: not a CIFAR-10/100 python archive (no data_batch_* + batches.meta, "
                               "nor train + meta); give the python version of the tarball")
    images, labels, superclasses, seen = [], [], [0] * len(class_names), set()
    for name, batch in parts:
        where = f"{path}:{name}"
        data = _pixels(batch, where)
        fine = _class_labels(batch, label_key, len(data), len(class_names), where)
        images.append(data)
        labels.append(fine)
        if coarse_names is not None:
            coarse = _class_labels(batch, "coarse_labels", len(data), len(coarse_names), where)
            for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
                if f in seen and superclasses[f] != c:
                    raise _tampered(where, f"fine class {f} sits in coarse classes {superclasses[f]} and {c}")
                superclasses[f] = c
                seen.add(f)
    classes = ClassInfo(class_names=class_names)
    if coarse_names is not None:
        classes = ClassInfo(class_names=class_names, superclasses=superclasses, superclass_names=coarse_names)
    pixels = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    names = [f"{i:05d}" for i in range(len(pixels))]
    return ImageCollection(source=path, names=names, labels=np.concatenate(labels), classes=classes, arrays=pixels)


def read_inat_annotations(path: str | Path) -> ImageCollection:
    """Read an iNaturalist-2021-style annotation file; image ``file_name`` paths are relative to its folder.

    Classes are the categories in id order (for iNat21 the id equals the ``ImageFolder`` index of the released
    checkpoints); superclasses are the ``supercategory`` values ordered by species count, largest first (iNat21:
    Plants, Insects, Birds, ..., Animalia), the order FineDiffusion's released weights use.

    Raises:
        DatasetError: not such a file, a category without supercategory, an image without (or with two)
            annotations, or an annotation naming an unknown category.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
        images, annotations, categories = meta["images"], meta["annotations"], meta["categories"]
        cats = sorted(categories, key=lambda c: c["id"])
        files = {im["id"]: im["file_name"] for im in images}
        pairs = [(a["image_id"], a["category_id"]) for a in annotations]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the annotation file ({err})") from None
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not an iNat-style annotation file (needs images[id, file_name], annotations["
                           f"image_id, category_id], categories[id, name, supercategory]); missing {err}") from None
    index = {c["id"]: i for i, c in enumerate(cats)}
    unnamed = [c.get("name", c["id"]) for c in cats if not c.get("supercategory")]
    if unnamed:
        raise DatasetError(f"{path}: category {unnamed[0]!r} has no supercategory; every class needs one "
                           f"({len(unnamed)} lack it)")
    sizes: dict[str, int] = {}
    for c in cats:
        sizes[c["supercategory"]] = sizes.get(c["supercategory"], 0) + 1
    supers = sorted(sizes, key=lambda name: (-sizes[name], name))
    label_of: dict[str, int] = {}
    for image_id, category in pairs:
        if category not in index or image_id not in files:
            raise DatasetError(f"{path}: annotation of image {image_id} names an unknown image or category "
                               f"{category}; the file is inconsistent")
        if files[image_id] in label_of:
            raise DatasetError(f"{path}: image {files[image_id]} has two annotations; one class per image")
        label_of[files[image_id]] = index[category]
    unlabelled = [f for f in files.values() if f not in label_of]
    if unlabelled:
        raise DatasetError(f"{path}: {len(unlabelled)} image(s) have no annotation, e.g. {unlabelled[0]}")
    names = sorted(label_of)
    classes = ClassInfo(class_names=[str(c.get("name", c["id"])) for c in cats],
                        superclasses=[supers.index(c["supercategory"]) for c in cats], superclass_names=supers)
    return ImageCollection(source=path, names=names, labels=np.array([label_of[n] for n in names], dtype=np.int64),
                           classes=classes, storage=_FolderStorage(path.parent, names, index_file=path))


def _is_tarfile(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (tarfile.TarError, EOFError, OSError, zlib.error):  # a damaged compressed stream, e.g. a bad gzip
        return False


def open_source(path: str | Path) -> ImageCollection:
    """Open any convertible source: image folder, dataset zip, CIFAR python tarball, or iNat annotation file."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return read_inat_annotations(path)
    if path.is_file() and _is_tarfile(path):
        return read_cifar_tarball(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise DatasetError(f"{path}: not a readable tar archive; the download is truncated or corrupt: "
                           "download it again")
    return ImageCollection.open(path)


def transform_image(image: Image.Image, resolution: int | None, transform: str, where: str) -> Image.Image:
    """Apply the crop/resize ``transform`` to reach ``resolution x resolution`` (None keeps the size)."""
    width, height = image.size
    if transform == "center-crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif transform == "center-crop-wide":
        if resolution is None:
            raise DatasetError("--transform center-crop-wide needs --resolution")
        scaled_height = max(1, round(resolution * height / width))
        image = image.resize((resolution, scaled_height), Image.Resampling.LANCZOS)
        canvas = Image.new(image.mode, (resolution, resolution))
        # Crop the height when it is larger than the target, letterbox it when smaller.
        canvas.paste(image, (0, (resolution - scaled_height) // 2))
        return canvas
    elif transform != "none":
        raise DatasetError(f"unknown transform '{transform}'; choose one of {', '.join(TRANSFORMS)}")
    if resolution is not None and image.size != (resolution, resolution):
        if image.size[0] != image.size[1]:
            raise DatasetError(f"{where}: image is {width}x{height}, not square; pass --transform center-crop "
                               "(or center-crop-wide)")
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


@dataclass
class ConvertSummary:
    """What ``convert`` wrote: image count, resolution, channels, class counts and notes for the user."""

    dest: Path
    images: int
    resolution: int
    channels: int
    class_counts: list[int]
    notes: list[str] = field(default_factory=list)


def convert(
    src: str | Path,
    dest: str | Path,
    resolution: int | None = None,
    transform: str = "none",
    max_images: int | None = None,
    channels: int = 3,
    progress: bool = True,
) -> ConvertSummary:
    """Convert ``src`` (folder, zip or CIFAR tarball) into a dataset zip at ``dest``.

    Args:
        src: image folder (class sub-folders, ``superclass/class`` folders, or flat = unlabelled),
            dataset zip, or ``cifar-{10,100}-python.tar.gz``.
        dest: output zip; written atomically (nothing is left behind on error).
        resolution: output side in pixels; None keeps the source size (which must then be uniform
            and square).
        transform: ``none``, ``center-crop`` or ``center-crop-wide`` (see module docstring).
        max_images: keep only the first N images in name order.
        channels: 3 (RGB) or 1 (grayscale); images of other modes are converted, with a note.
        progress: show a progress bar.
    """
    if channels not in (1, 3):
        raise DatasetError(f"--channels must be 1 or 3, got {channels}")
    if resolution is not None and resolution < 1:
        raise DatasetError(f"--resolution must be positive, got {resolution}")
    collection = open_source(src)
    if max_images is not None:
        collection = collection.subset(range(min(max_images, len(collection))))
    mode = "RGB" if channels == 3 else "L"
    converted: dict[str, int] = {}
    size: list[tuple[int, int]] = []

    def images() -> Iterator[tuple[np.ndarray, int | None]]:
        from tqdm.auto import tqdm

        for i in tqdm(range(len(collection)), desc="convert", unit="img", disable=not progress):
            image = collection.load(i)
            if image.mode != mode:
                converted[image.mode] = converted.get(image.mode, 0) + 1
                image = to_mode(image, mode)
            image = transform_image(image, resolution, transform, collection.where(i))
            if not size:
                if image.size[0] != image.size[1]:
                    raise DatasetError(f"{collection.where(i)}: image is {image.size[0]}x{image.size[1]}, not "
                                       "square; pass --resolution R --transform center-crop")
                size.append(image.size)
            elif image.size != size[0]:
                raise DatasetError(f"{collection.where(i)}: image is {image.size[0]}x{image.size[1]} but earlier "
                                   f"ones are {size[0][0]}x{size[0][1]}; pass --resolution R to resize all")
            yield np.asarray(image), None if collection.labels is None else int(collection.labels[i])

    meta = write_dataset_zip(dest, images(), collection.classes, _provenance(collection))
    notes = [f"converted {n} {m} image(s) to {mode}" for m, n in sorted(converted.items())]
    return ConvertSummary(Path(dest), len(collection), size[0][0], channels, meta.get("class_counts", []), notes)


def _provenance(collection: ImageCollection) -> dict[str, Any]:
    # Keep provenance such as a long-tail record when re-converting our own zips.
    return {k: v for k, v in collection.extra.items() if k == "longtail"}
