"""Callbacks: EMA over trainable parameters, and the image writer for ``predict``."""

from .ema import TrainableEMA
from .writer import ImageWriter

__all__ = ["ImageWriter", "TrainableEMA"]
