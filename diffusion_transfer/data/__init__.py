"""Datasets: StyleGAN/EDM zips, image folders, long-tailed subsets, the synthetic shapes data.

``DiffusionDataModule`` needs Lightning and is imported on first use, so the dataset tool starts fast.
"""

from .archive import UNLABELLED, ClassInfo, DatasetError, ImageCollection, write_dataset_zip
from .datasets import ImageDataset, ImageFolderDataset, LatentDataset, ZipImageDataset, open_dataset
from .longtail import longtail_counts, make_longtail, select_longtail
from .shapes import make_shapes, render_shapes
from .sources import convert, read_cifar_tarball

__all__ = [
    "UNLABELLED", "ClassInfo", "DatasetError", "DiffusionDataModule", "ImageCollection", "ImageDataset",
    "ImageFolderDataset", "LatentDataset", "ZipImageDataset", "convert", "longtail_counts", "make_longtail",
    "make_shapes",
    "open_dataset", "read_cifar_tarball", "render_shapes", "select_longtail", "write_dataset_zip",
]


def __getattr__(name: str):
    if name == "DiffusionDataModule":
        from .datamodule import DiffusionDataModule

        return DiffusionDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
