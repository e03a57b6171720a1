"""``diffusion-transfer-data``: build, convert, subset and inspect dataset zips.

Expected problems (missing files, corrupt archives, mismatched labels, ...) print one line naming the
file and the fix and exit with status 2; nothing half-written is left behind. A damaged image is named by its
path in a folder or as ``ZIP:member`` in a zip, with the fix for that source (a folder: replace or delete the
file; a zip: re-create it with ``convert``).

Image folders without a ``dataset.json`` are labelled by their layout, ``class/img.png`` or
``superclass/class/img.png``. Both number the classes in the sorted order of the class-folder names, whatever
superclass holds them, so the two layouts of the same classes give identical labels; superclasses are numbered in
the sorted order of their names. An empty class folder is an error that names it (delete it or add images), as is
one class-folder name under two superclasses.

``export`` writes a dataset back out as such a folder (:func:`export_folder`), so that ``convert`` of it gives the
same images with the same labels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .archive import DatasetError, ImageCollection, one_line
from .datasets import open_dataset
from .longtail import PROFILES, make_longtail
from .shapes import DOMAINS, KIND_SETS, SUPERCLASS_BY, make_shapes
from .sources import TRANSFORMS, convert, open_source


def dataset_info(path: str, verify: bool = False, progress: bool = False) -> dict[str, Any]:
    """Summary of a dataset zip or folder: images, resolution, channels, classes, counts, superclasses.

    With ``verify``, every image is decoded and its size checked (slow on large sets); ``verified`` then holds the
    number of images (or latents) read, and a damaged one raises :class:`DatasetError` naming it.
    """
    dataset = open_dataset(path)
    collection = dataset.collection
    classes = collection.classes
    info: dict[str, Any] = {
        "path": str(path),
        "images": len(dataset),
        "resolution": dataset.resolution,
        "channels": dataset.channels,
        "labelled": collection.labels is not None,
        "num_classes": dataset.num_classes,
        "class_counts": dataset.class_counts,
        "class_names": classes.class_names,
        "superclasses": classes.superclasses,
        "superclass_names": classes.superclass_names,
    }
    info.update(collection.extra)
    if verify:
        from tqdm.auto import tqdm

        for i in tqdm(range(len(dataset)), desc="verify", unit="img", disable=not progress):
            dataset[i]
        info["verified"] = len(dataset)
    return info


def _print_info(info: dict[str, Any]) -> None:
    print(f"{info['path']}: {info['images']} images, {info['resolution']}x{info['resolution']}, "
          f"{info['channels']} channel(s)")
    if not info["labelled"]:
        print("unlabelled")
        _print_verified(info)
        return
    names = info["class_names"] or [str(c) for c in range(info["num_classes"])]
    sup, sup_names = info["superclasses"], info["superclass_names"]
    print(f"{info['num_classes']} classes" + (f", {max(sup) + 1} superclasses" if sup else ""))
    for c, (name, count) in enumerate(zip(names, info["class_counts"], strict=True)):
        parent = ""
        if sup:
            parent = f"  [{sup_names[sup[c]] if sup_names else sup[c]}]"
        print(f"  {c:5d}  {count:7d}  {name}{parent}")
    if "longtail" in info:
        lt = info["longtail"]
        print(f"long-tailed subset of {lt['source']}: imbalance {lt['imbalance']}, profile {lt['profile']}, "
              f"seed {lt['seed']}")
    _print_verified(info)


def _print_verified(info: dict[str, Any]) -> None:
    if "verified" in info:
        print(f"verified {info['verified']} {'latents' if info.get('latents') else 'images'}: OK")


def folder_name(index: int, name: str | None, count: int) -> str:
    """The folder of class (or superclass) ``index`` of ``count``: ``{index}-{safe name}``, e.g. ``03-red_hexagon``.

    The index is zero-padded to the width of ``count - 1`` (at least 2 digits), so the sorted order of the folders,
    by which ``convert`` numbers classes, is the index order. The name keeps ASCII letters, digits, ``.``, ``_`` and
    ``-``; every run of other characters (spaces, ``/``, ``:``, non-ASCII...) becomes one ``_``, leading and trailing
    ``._-`` are dropped and it is cut to 64 characters. A name that is then empty, or none, gives the index alone.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._-")[:64].rstrip("._-")
    number = f"{index:0{max(2, len(str(count - 1)))}d}"
    return f"{number}-{safe}" if safe else number


def export_folder(src: str | os.PathLike[str], dest: str | os.PathLike[str], progress: bool = False) -> dict[str, Any]:
    """Write the images of dataset ``src`` (zip, folder or CIFAR tarball) as PNG files in class folders at ``dest``.

    Layout: ``superclass/class/img{index:08d}.png`` when the dataset has superclasses, ``class/img{index:08d}.png``
    when it is labelled, flat ``img{index:08d}.png`` when it is not; folder names by :func:`folder_name`, ``index``
    the image's position in ``src``. ``convert`` of the folder therefore gives back the same images, classes and
    superclasses, in the same order when ``src`` is sorted by class (class names become the folder names). Written
    to a temporary folder beside ``dest`` and renamed into place; an existing ``dest`` must be an empty folder.

    Returns:
        ``{"images": N, "classes": C, "superclasses": S, "layout": "superclass/class" | "class" | "flat"}``.

    Raises:
        DatasetError: ``dest`` exists and is not an empty folder; ``src`` holds latents, or has a class (or
            superclass) without images, which a folder cannot hold (``convert`` refuses empty class folders).
    """
    dest = Path(dest)
    _check_export_dest(dest)
    collection = open_source(src)
    if collection.latents:
        raise DatasetError(f"{src}: holds VAE latents, not images; export the image zip they were encoded from")
    parents = _export_folders(collection, src)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    from tqdm.auto import tqdm

    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for i in tqdm(range(len(collection)), desc="export", unit="img", disable=not progress):
            image = collection.load(i)
            folder = tmp / parents[int(collection.labels[i])] if collection.labels is not None else tmp
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"img{i:08d}.png", format="PNG")
        try:
            os.replace(tmp, dest)  # over an empty folder too (POSIX rename)
        except OSError as err:
            raise DatasetError(f"{dest}: cannot move the exported images into place ({err.strerror}); choose a new "
                               "folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    classes = collection.classes
    layout = "flat" if collection.labels is None else "superclass/class" if classes.superclasses else "class"
    return {"images": len(collection), "classes": collection.num_classes, "layout": layout,
            "superclasses": len(set(classes.superclasses)) if classes.superclasses else 0}


def _check_export_dest(dest: Path) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        return
    if dest.exists() or dest.is_symlink():
        what = "a folder that is not empty" if dest.is_dir() else "a file"
        raise DatasetError(f"{dest}: already exists and is {what}; export writes a new folder: choose another "
                           "path or delete it")


def _export_folders(collection: ImageCollection, src: Any) -> list[str]:
    """The folder (relative to the export root) of each class: ``class`` or ``superclass/class``."""
    if collection.labels is None:
        return []
    classes, count = collection.classes, collection.num_classes
    names = classes.class_names or [None] * count
    empty = [c for c, n in enumerate(collection.class_counts) if n == 0]
    if empty:
        label = f" ('{names[empty[0]]}')" if names[empty[0]] else ""
        raise DatasetError(f"{src}: class {empty[0]}{label} has no images, and a class folder cannot be empty "
                           "(convert would renumber the classes after it); export a dataset whose classes all "
                           "have images")
    folders = [folder_name(c, names[c], count) for c in range(count)]
    sup = classes.superclasses
    if not sup:
        return folders
    num_super = len(classes.superclass_names) if classes.superclass_names else max(sup) + 1
    unused = sorted(set(range(num_super)) - set(sup))
    if unused:
        raise DatasetError(f"{src}: superclass {unused[0]} holds no class, and a superclass folder cannot be empty; "
                           "export a dataset whose superclasses all hold classes")
    super_names = classes.superclass_names or [None] * num_super
    return [f"{folder_name(sup[c], super_names[sup[c]], num_super)}/{folders[c]}" for c in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-transfer-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="write the synthetic shapes dataset")
    p.add_argument("dest", help="output .zip")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--per-class", type=int, default=100, help="images per class (4 shapes x --colours classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default="filled",
                   help=f"style: one of {', '.join(DOMAINS)}, or several joined by commas (filled,cutout: "
                        "--per-class images of every class in each, a broad source)")
    p.add_argument("--colours", type=int, default=5, help="colours per shape, 1..8 (5: 20 classes; 8: 32)")
    p.add_argument("--kinds", choices=tuple(KIND_SETS), default="base",
                   help="shape kinds: base = circle, square, triangle, cross; novel = star, hexagon, ring, arrow "
                        "(classes a base-trained model never saw, for transfer to new classes); all = the 8 of both")
    p.add_argument("--superclass", choices=SUPERCLASS_BY, default="kind",
                   help="the hierarchy in dataset.json: each class's shape kind (its superclass's classes differ in "
                        "colour), its colour (they differ in shape) or its kind's family (round: circle, ring; "
                        "polygon: square, hexagon; pointed: triangle, arrow; spiky: cross, star; with --kinds all "
                        "they differ in shape and colour); the images are the same")

    p = sub.add_parser(
        "convert", help="folder / zip / CIFAR tar.gz -> dataset zip",
        description="Convert an image folder, dataset zip, CIFAR python tarball or iNat annotation file into a "
                    "dataset zip. Folders: class/img.png or superclass/class/img.png, classes numbered in the sorted "
                    "order of the class-folder names in both layouts (superclasses: sorted by name); an empty class "
                    "folder is an error.")
    p.add_argument("src", help="image folder, dataset zip, or cifar-{10,100}-python.tar.gz")
    p.add_argument("dest", help="output .zip")
    p.add_argument("--resolution", type=int, default=None, help="output side in pixels")
    p.add_argument("--transform", choices=TRANSFORMS, default="none")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)

    p = sub.add_parser(
        "export", help="dataset zip -> folder of class sub-folders of PNGs (convert reads it back)",
        description="Write the images of a dataset zip (or folder, or CIFAR tarball) as PNGs in a new folder: "
                    "superclass/class/ sub-folders when the dataset has superclasses, class/ when it is labelled, flat "
                    "when not. Folders are named NN-name: the class index, zero-padded, then the name with every run "
                    "of characters other than ASCII letters, digits, '.', '_' and '-' made one '_'. convert of the "
                    "folder gives back the same images and labels. DEST must not exist or be an empty folder.")
    p.add_argument("src", help="dataset zip (or image folder, or cifar-{10,100}-python.tar.gz)")
    p.add_argument("dest", help="new folder")

    p = sub.add_parser("longtail", help="long-tailed subset of a labelled dataset zip")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--imbalance", type=float, default=0.01, help="tail/head ratio, 0.01 = ratio 100")
    p.add_argument("--profile", choices=PROFILES, default="exp")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("encode", help="image dataset zip -> VAE latent zip (for latent DiTs)")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--vae", required=True, help="local folder of diffusers' AutoencoderKL (config.json + weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("info", help="image count, resolution, classes and counts of a dataset")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true",
                   help="decode every image and check its size; ends with 'verified N images: OK', or exits 2 "
                        "naming the first damaged image")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # An image over PIL's decompression-bomb limit (often a damaged header claiming a huge size) is an error
        # that names the file, not a warning printed above it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    try:
        if args.command == "shapes":
            meta = make_shapes(args.dest, args.resolution, args.per_class, args.seed, args.domain, args.colours,
                               args.kinds, args.superclass)
            print(f"wrote {args.dest}: {len(meta['labels'])} images, {args.resolution}x{args.resolution}, "
                  f"{len(meta['class_names'])} classes ({', '.join(meta['superclass_names'])}), domain {args.domain} "
                  f"({time.perf_counter() - start:.1f} s)")
        elif args.command == "convert":
            summary = convert(args.src, args.dest, args.resolution, args.transform, args.max_images,
                              args.channels, progress)
            for note in summary.notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"wrote {summary.dest}: {summary.images} images, {summary.resolution}x{summary.resolution}, "
                  f"{len(summary.class_counts) or 'no'} classes")
        elif args.command == "export":
            done = export_folder(args.src, args.dest, progress)
            what = f"{done['classes']} class folders" if done["classes"] else "unlabelled, flat"
            if done["superclasses"]:
                what += f" in {done['superclasses']} superclass folders"
            print(f"wrote {args.dest}: {done['images']} images ({what})")
        elif args.command == "longtail":
            meta = make_longtail(args.src, args.dest, args.imbalance, args.profile, args.seed, progress)
            counts = meta["class_counts"]
            print(f"wrote {args.dest}: {sum(counts)} images; per class {counts}")
        elif args.command == "encode":
            from .latents import encode_latents

            meta = encode_latents(args.src, args.dest, args.vae, args.batch_size, args.device, progress)
            record = meta["latents"]
            print(f"wrote {args.dest}: {len(meta['labels'] or []) or 'unlabelled'} latents of "
                  f"{record['channels']}x{record['resolution']}x{record['resolution']} (scale {record['scale']})")
        else:
            info = dataset_info(args.path, args.verify, progress)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_info(info)
    except (DatasetError, FileNotFoundError, ImportError) as err:
        print(f"diffusion-transfer-data: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusion-transfer-data: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left early (`info ... | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
