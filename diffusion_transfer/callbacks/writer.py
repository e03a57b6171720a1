"""``ImageWriter``: write ``predict`` samples as ``{seed:06d}.png`` files (and ``{seed:06d}.label`` class files), a
grid beside them, and optionally a dataset zip; ``save_image_grid``, the one PNG grid writer (also of the
validation grids)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from ..data.archive import UNLABELLED, ClassInfo, write_dataset_zip
from ..metrics.features import quantize
from .run_dir import in_run_dir


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` float in [-1, 1] -> ``[B, H, W, C]`` uint8 (DiT/EDM rule: clamp(127.5 x + 128))."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int) -> Path:
    """Write ``images`` (``[N, C, H, W]`` float in [-1, 1]) as one PNG grid, ``nrow`` per row, 1-px white gaps.

    Written under a temporary name and renamed, so ``path`` is never a half-written file.
    """
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=max(1, nrow), padding=1, pad_value=1.0)
    array = to_uint8(grid[None])[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(partial, format="PNG")
    os.replace(partial, path)
    return path


class ImageWriter(BasePredictionWriter):
    """Write each predicted image as ``output_dir/{seed:06d}.png``, and its class as ``{seed:06d}.label``.

    ``predict_step`` must return a dict with ``images`` (``[B, C, H, W]`` in [-1, 1]), ``seeds`` and
    ``labels`` (``[B]``). Each file is written under a temporary name and renamed, so an interrupted run
    never leaves a half-written PNG. With ``zip_path``, rank 0 packs all images (in seed order) into a
    StyleGAN/EDM dataset zip with their labels once prediction ends; that is how replay banks of
    pre-trained samples are built. Rank 0 also writes the run's first ``GRID_IMAGES`` images as one PNG grid
    beside the folder (``<output_dir>-grid.png``, path in ``grid_path``), not inside it, so tools that read the
    folder see samples only.

    Label files: beside each PNG of a class-conditional model, ``{seed:06d}.label`` holds the image's class
    index as decimal text (``3``); an unconditional model writes none (and removes one an earlier run left).
    Every rank writes its own batches, so the labels travel with their images without gathering them on one
    rank. The zip's ``dataset.json`` (its ``labels``, in seed order; the seeds in ``generated.seeds``) is built
    from these files; tools that read ``*.png`` (FID on a folder) ignore them.

    Outputs live in the run directory: relative ``output_dir`` and ``zip_path`` are taken inside
    ``trainer.default_root_dir`` (``samples`` -> ``<run dir>/samples``, grid ``<run dir>/samples-grid.png``),
    absolute ones are used as given; a relative path that starts with the run directory is read from the
    working directory, one that starts like it but leaves it is refused (the rule of
    :func:`~diffusion_transfer.callbacks.run_dir.in_run_dir`). The paths are resolved when ``predict`` starts.

    Args:
        output_dir: folder for the PNGs and label files (created); default ``samples`` in the run directory.
        zip_path: optional dataset zip to write at the end (e.g. ``samples.zip`` in the run directory).
    """

    #: at most this many of a run's images go into its grid (``<output_dir>-grid.png``)
    GRID_IMAGES = 100

    def __init__(self, output_dir: str = "samples", zip_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.given = (output_dir, zip_path)
        self.output_dir = Path(output_dir)
        self.zip_path: Path | None = Path(zip_path) if zip_path is not None else None
        self.grid_path: Path | None = None  # set on rank 0 once prediction ends

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":  # the CLI adds the writer to every subcommand; only predict writes
            return
        output_dir, zip_path = self.given
        root = trainer.default_root_dir
        self.output_dir = in_run_dir(output_dir, root, "writer.output_dir")
        self.zip_path = in_run_dir(zip_path, root, "writer.zip_path") if zip_path is not None else None

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        labels = prediction["labels"].tolist()
        for image, seed, label in zip(to_uint8(prediction["images"]), prediction["seeds"].tolist(), labels,
                                      strict=True):
            final = self.output_dir / f"{seed:06d}.png"
            partial = final.with_name(f".{final.name}.partial")
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(partial, format="PNG")
            os.replace(partial, final)
            label_file = final.with_suffix(".label")
            if label != UNLABELLED:
                label_file.write_text(str(label))
            else:
                label_file.unlink(missing_ok=True)  # left by an earlier, conditional run into this folder

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            # This run's seeds only: the folder may hold images of earlier runs.
            loaders = trainer.predict_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            seeds = getattr(getattr(loader, "dataset", None), "seeds", None)
            files = ([self.output_dir / f"{s:06d}.png" for s in sorted(seeds)] if seeds is not None
                     else sorted(self.output_dir.glob("[0-9]*.png")))
            num_classes = getattr(pl_module, "num_classes", 0)
            self._write_grid(files[:self.GRID_IMAGES], nrow=min(num_classes, 10) if num_classes else 8)
            if self.zip_path is not None:
                self._write_zip(trainer, files, num_classes)
        trainer.strategy.barrier()

    def _write_grid(self, files: Sequence[Path], nrow: int) -> None:
        """``<output_dir>-grid.png`` beside the folder (inside it, it would join the samples of whatever reads the
        folder, e.g. FID): the run's first images in seed order (classes cycle along each row)."""
        if not files:
            return
        arrays = [np.asarray(Image.open(f)) for f in files]
        images = torch.stack([torch.from_numpy(a.reshape(*a.shape[:2], -1).copy()).permute(2, 0, 1) for a in arrays])
        self.grid_path = save_image_grid(images.float() / 127.5 - 1,
                                         self.output_dir.with_name(f"{self.output_dir.name}-grid.png"), nrow)

    def _write_zip(self, trainer: L.Trainer, files: Sequence[Path], num_classes: int) -> None:
        def items():
            for f in files:
                label_file = f.with_suffix(".label")
                label = int(label_file.read_text()) if label_file.exists() else None
                yield np.asarray(Image.open(f)), label

        # Name the model's classes so the zip keeps the full label space even if some are not drawn.
        names = getattr(trainer.datamodule, "class_names", None) if num_classes else None
        hierarchy = getattr(trainer.datamodule, "superclass_of", None) if num_classes else None
        classes = ClassInfo(class_names=names or ([str(c) for c in range(num_classes)] or None),
                            superclasses=hierarchy)
        write_dataset_zip(self.zip_path, items(), classes,
                          extra={"generated": {"seeds": [int(f.stem) for f in files]}})
