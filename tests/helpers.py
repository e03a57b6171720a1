"""Test helpers: tiny synthetic images and CIFAR-format tarballs."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

#: The smallest nets the tests train or load: a 2-block DiT and a two-level DDPM U-Net (model init-arg dicts).
TINY_DIT = {"arch": "DiT-S/2", "arch_overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}}
TINY_UNET = {"arch": "ddpm-cifar10", "arch_overrides": {"model_channels": 16, "channel_mult": [1, 2],
                                                        "num_blocks": 1, "attn_resolutions": [4],
                                                        "min_channels_per_group": 4}}  # 48 ch: no GroupNorm(32)


def random_images(n: int, size: int = 8, seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 ``[n, size, size, channels]`` noise images."""
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _add_pickle(tar: tarfile.TarFile, name: str, obj: object) -> None:
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar_tarball(path: Path, kind: int = 10, per_batch: int = 6, seed: int = 0) -> np.ndarray:
    """Write a tiny tarball laid out like ``cifar-{10,100}-python.tar.gz``; return its train images.

    Keys are bytes, as in the official Python 2 pickles. Returns ``[N, 32, 32, 3]`` uint8 in file order.
    """
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        if kind == 10:
            parts = []
            for b in range(1, 6):
                data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
                labels = [int(v) for v in rng.integers(0, 10, per_batch)]
                _add_pickle(tar, f"cifar-10-batches-py/data_batch_{b}", {b"data": data, b"labels": labels,
                                                                         b"batch_label": b"training batch"})
                parts.append(data)
            _add_pickle(tar, "cifar-10-batches-py/test_batch", {b"data": parts[0], b"labels": [0] * per_batch})
            _add_pickle(tar, "cifar-10-batches-py/batches.meta",
                        {b"label_names": [f"class{c}".encode() for c in range(10)]})
            flat = np.concatenate(parts)
        else:
            fine = np.arange(per_batch) % 100
            coarse = fine // 5
            flat = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            _add_pickle(tar, "cifar-100-python/train", {b"data": flat, b"fine_labels": fine.tolist(),
                                                        b"coarse_labels": coarse.tolist()})
            _add_pickle(tar, "cifar-100-python/meta",
                        {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
                         b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
