"""A callback that SIGKILLs its own fit mid-step, for tests/test_reliability.py.

Killing from the outside once ``last.ckpt`` reaches a step races the fit: a tiny model on a loaded CI machine can
finish all its steps between the poll that sees the checkpoint and the signal. Killing from inside is exact: the
process dies after the forward and backward of the step after ``step`` and before its optimizer update, so the last
checkpoint holds ``step`` and the step in flight is lost, as in a real crash.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class SigkillAt(L.Callback):
    """SIGKILL the process at the first optimizer step taken once ``trainer.global_step >= step``.

    Args:
        step: the global step the last checkpoint should hold when the process dies.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
