"""The base of every checkpoint-loading error: the CLI prints its message on one line and exits with status 2."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model; the message names the file and the fix."""
