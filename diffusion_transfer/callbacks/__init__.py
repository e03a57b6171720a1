"""Callbacks: EMA over trainable parameters, the image writer for ``predict``, and sample metrics."""

from .ema import TrainableEMA
from .evaluation import GenerativeEvaluation
from .writer import ImageWriter

__all__ = ["GenerativeEvaluation", "ImageWriter", "TrainableEMA"]
