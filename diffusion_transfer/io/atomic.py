"""``AtomicCheckpointIO``: checkpoints written next to their target and renamed into place.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose temporary file lives in the system's
temp folder; committing it is ``shutil.move``, which is a rename only when that folder is on the checkpoint's
file system. Elsewhere (a scratch disk, a network mount) it is a copy, and a process killed during the copy leaves
a truncated checkpoint under the real name. This writer puts the temporary file in the checkpoint's own folder,
flushes it to disk, and ``os.replace``-s it over the target, which is atomic on POSIX and Windows: the file under
the real name is always either the previous complete checkpoint or the new complete one.

Loading goes through :func:`~diffusion_transfer.io.checkpoint.safe_torch_load`: a truncated, bit-flipped or refused
file raises a one-line :class:`~diffusion_transfer.io.checkpoint.CheckpointError` before any weight is restored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .checkpoint import CKPT_FIX, safe_torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file in the same folder + ``os.replace``).

    Remote paths (``s3://`` ...) keep Lightning's own saving and loading. The diffusion-transfer CLI installs it on
    every Trainer it builds; pass ``plugins=[AtomicCheckpointIO()]`` to your own ``Trainer`` to get the same
    guarantees. Local loads check the file (:func:`~diffusion_transfer.io.checkpoint.safe_torch_load`).
    """

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False or "://" in str(path):  # a caller that trusts the file, or a remote one
            return super().load_checkpoint(path, map_location, weights_only)
        return safe_torch_load(path, what="a checkpoint", fix=CKPT_FIX, map_location=map_location,
                               missing=f"Checkpoint file not found: {path}")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)  # only left when the write failed
