"""Lightning side of checkpoints that refer to frozen base weights instead of storing them (PEFT, DMP).

A method that trains a few tensors on top of a frozen base file (FineDiffusion / BitFit / DiffFit, a DMP patch)
mixes in :class:`BaseReferencedCheckpoint` before its :class:`Diffusion` parent. Saving keeps only the trained
tensors, the buffers and a fingerprint of the frozen ones; loading reads the base file, checks the fingerprint and
fills the frozen tensors back in. The format and checks live in :mod:`~diffusion_transfer.io.peft_checkpoint`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..io.checkpoint import CKPT_FIX, CheckpointError, safe_torch_load
from ..io.peft_checkpoint import (
    PEFT_KEY,
    base_path,
    checkpoint_bytes,
    expand_state,
    require_base,
    shrink_checkpoint,
)


class BaseReferencedCheckpoint:
    """Mixin for a :class:`~diffusion_transfer.methods.diffusion.Diffusion` subclass: checkpoints refer to the base.

    Method hooks:
        ``load_base_weights(path)``: how the base file goes into the net (default: the parent's ``load_weights``);
            it may set ``_not_in_base``, the state keys the base file lacks (stored with the trained tensors).
        ``_refers_to_base()``: whether a checkpoint is shrunk (default: whenever the run has a base file; without
            one the full state is kept).
    """

    checkpoint: str | None
    _base_loaded: str | None = None  # the base file now in the net (None: none)
    _not_in_base: Sequence[str] = ()

    def load_weights(self, path: str) -> str:
        """``load_base_weights``, remembering the file: loading a checkpoint then reads the base only if needed."""
        source = self.load_base_weights(path)
        self._base_loaded = str(path)
        return source

    def load_base_weights(self, path: str) -> str:
        return super().load_weights(path)  # type: ignore[misc]

    def _refers_to_base(self) -> bool:
        return bool(self._base_loaded or self.checkpoint)

    def _base_file(self) -> str | None:
        return self._base_loaded or self.checkpoint

    def on_fit_start(self) -> None:
        """Refuse a run whose checkpoints would refer to a base it does not have, before the first step.

        Not in ``setup``: Lightning restores ``--ckpt_path`` after ``setup``, and resuming a PEFT checkpoint with
        ``checkpoint: null`` is valid (the base then comes from the checkpoint's record, see
        :meth:`on_load_checkpoint`); ``on_fit_start`` runs after that restore and before the sanity check.
        """
        super().on_fit_start()  # type: ignore[misc]
        if self._refers_to_base():
            require_base(self._base_file())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors (+ buffers, + keys the base lacks) and the base's path and fingerprint.

        Logs two sizes: the kept weights (``state_dict``, what sampling needs) and the whole checkpoint, which a
        resumable training checkpoint makes about 4x larger with AdamW's two moments and the EMA's raw weights.
        """
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if not self._refers_to_base():
            return
        record = shrink_checkpoint(checkpoint, self, self._base_file(), self._not_in_base)
        stored, total = record["stored_parameters"], record["total_parameters"]
        weights, whole = checkpoint_bytes(checkpoint["state_dict"]), checkpoint_bytes(checkpoint)
        rank_zero_info(f"checkpoint refers to base {record['base']}: stores {stored:,} of {total:,} parameters "
                       f"({100 * stored / total:.2f}%), {_size(weights)} of weights; with the optimizer and EMA "
                       f"state the file holds {_size(whole)} of tensors")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-attach to the base: ``checkpoint`` if that file exists, else the recorded path; refuse another base."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        record = checkpoint.get(PEFT_KEY)
        if record is None:
            return
        base = base_path(record, self.checkpoint)
        if self._base_loaded != base:  # setup() has not read it (load_from_checkpoint, or checkpoint null)
            self.load_weights(base)
        expand_state(checkpoint, self, base)  # type: ignore[arg-type]

    @classmethod
    def load_with_base(cls, path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
                       **kwargs: Any) -> Any:
        """``load_from_checkpoint(path)`` onto the base file ``base`` (default: the recorded one), e.g. a moved copy.

        The copy must hold the same weights (fingerprint); ``kwargs`` go to ``load_from_checkpoint``.

        Raises:
            CheckpointError: ``path`` is a full checkpoint (no base to re-attach to; use ``load_from_checkpoint``).
        """
        saved = safe_torch_load(path, what="a checkpoint", fix=CKPT_FIX)
        if PEFT_KEY not in saved:
            raise CheckpointError(f"{path} holds no '{PEFT_KEY}' entry, so it stores the full state and refers to no "
                                  f"base; load it with {cls.__name__}.load_from_checkpoint")
        if base is not None:  # as the `checkpoint` init arg (a load_from_checkpoint kwarg of that name would clash)
            saved["hyper_parameters"]["checkpoint"] = os.fspath(base)
        buffer = io.BytesIO()
        torch.save(saved, buffer)  # small: the trained tensors only
        buffer.seek(0)
        return cls.load_from_checkpoint(buffer, **kwargs)  # type: ignore[attr-defined]


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB ({n:,} bytes)"
