"""Callbacks: EMA over trainable parameters, the image writer for ``predict``, sample metrics, and the final checkpoint
of a completed fit."""

from .ema import TrainableEMA
from .evaluation import GenerativeEvaluation
from .final import FinalCheckpoint
from .writer import ImageWriter

__all__ = ["FinalCheckpoint", "GenerativeEvaluation", "ImageWriter", "TrainableEMA"]
