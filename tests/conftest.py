"""Shared fixtures: tiny datasets built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def shapes_zip(tmp_path: Path) -> Path:
    """A 16x16 shapes dataset zip, 8 images per class (160 images, 20 classes, 4 superclasses)."""
    from diffusion_transfer.data import make_shapes

    path = tmp_path / "shapes.zip"
    make_shapes(path, resolution=16, per_class=8, seed=0)
    return path
