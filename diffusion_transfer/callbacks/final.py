"""``FinalCheckpoint``: the checkpoint of a *finished* fit, under a fixed name, and nothing before.

A stage of a pipeline (``make demo``'s pre-training, a benchmark's source model) is taken as done when its output
file exists. A ``ModelCheckpoint`` with a fixed filename writes that file at every validation, so a run stopped
half-way leaves a file that the next run takes as finished. This callback writes ``path`` once, when the fit has
completed its planned steps (``max_steps``, or ``max_epochs`` when no step limit is set) without being
interrupted. Under a Trainer with :class:`~diffusion_transfer.io.atomic.AtomicCheckpointIO` (the CLI installs it)
``path`` is never half-written either. Keep a ``ModelCheckpoint`` inside the run folder for resuming an interrupted
fit.

The file lives in the run directory: a relative ``path`` (default ``final.ckpt``) is taken inside
``trainer.default_root_dir``, an absolute one is used as given (the rule of
:func:`~diffusion_transfer.callbacks.run_dir.in_run_dir`). So ``configs/quickstart.yaml`` writes
``runs/demo/quickstart/final.ckpt``, and ``--trainer.default_root_dir runs/mine`` makes it ``runs/mine/final.ckpt``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from .run_dir import in_run_dir


class FinalCheckpoint(L.Callback):
    """Save the trained module to ``path`` at the end of a completed fit (rank 0 writes; every rank calls).

    Args:
        path: checkpoint file to write (its folder is created). Relative: inside the run directory
            (``trainer.default_root_dir``); a relative path that starts with the run directory is read from the
            working directory, one that starts like it but leaves it is refused (it would be doubled). Absolute:
            as given. ``path`` holds the resolved file once the fit has started. Existing files are replaced only
            by a completed fit.
    """

    def __init__(self, path: str = "final.ckpt") -> None:
        self.given = path
        self.path = Path(path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # only fit writes; validate/test/predict from the same config leave it alone
            self.path = in_run_dir(self.given, trainer.default_root_dir, "FinalCheckpoint path")

    def completed(self, trainer: L.Trainer) -> bool:
        """Whether ``trainer`` ran its whole plan: not interrupted, and its step or epoch limit reached."""
        if trainer.interrupted or trainer.sanity_checking:
            return False
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            return trainer.global_step >= trainer.max_steps
        return trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.completed(trainer):
            return
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # A full checkpoint (optimizer and callback states too, so it can be resumed); saying so also keeps
        # Lightning from logging "`weights_only` was not set" at the end of every fit. A collective call under DDP.
        trainer.save_checkpoint(self.path, weights_only=False)
