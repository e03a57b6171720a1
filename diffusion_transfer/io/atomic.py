"""``AtomicCheckpointIO``: checkpoints written next to their target and renamed into place.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose temporary file lives in the system's
temp folder; committing it is ``shutil.move``, which is a rename only when that folder is on the checkpoint's
file system. Elsewhere (a scratch disk, a network mount) it is a copy, and a process killed during the copy leaves
a truncated checkpoint under the real name. This writer puts the temporary file in the checkpoint's own folder,
flushes it to disk, and ``os.replace``-s it over the target, which is atomic on POSIX and Windows: the file under
the real name is always either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file in the same folder + ``os.replace``).

    Remote paths (``s3://`` ...) keep Lightning's own saving. The diffusion-transfer CLI installs it on every Trainer
    it builds; pass ``plugins=[AtomicCheckpointIO()]`` to your own ``Trainer`` to get the same guarantee.
    """

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
