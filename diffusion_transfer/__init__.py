"""diffusion_transfer: transfer pre-trained diffusion models to new jobs, on PyTorch Lightning.

Public names are imported lazily (PEP 562) so that light tools, such as the dataset command, do not
pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DiT": "diffusion_transfer.nets",
    "build_dit": "diffusion_transfer.nets",
    "UNet": "diffusion_transfer.nets",
    "SongUNet": "diffusion_transfer.nets",
    "DhariwalUNet": "diffusion_transfer.nets",
    "DDPMUNet": "diffusion_transfer.nets",
    "build_unet": "diffusion_transfer.nets",
    "GaussianDiffusion": "diffusion_transfer.diffusion",
    "EDM": "diffusion_transfer.diffusion",
    "apply_guidance": "diffusion_transfer.diffusion",
    "Diffusion": "diffusion_transfer.methods",
    "DiffTuning": "diffusion_transfer.methods",
    "LongTailDDPM": "diffusion_transfer.methods.longtail",
    "CBDM": "diffusion_transfer.methods.longtail",
    "T2H": "diffusion_transfer.methods.longtail",
    "DiTCallUNet": "diffusion_transfer.nets.unet_adapter",
    "DMP": "diffusion_transfer.methods",
    "MixtureOfPrompts": "diffusion_transfer.nets.dmp",
    "DiffusionLightningBase": "diffusion_transfer.methods",
    "EDMDiffusion": "diffusion_transfer.methods",
    "FineDiffusion": "diffusion_transfer.methods",
    "DiffInstruct": "diffusion_transfer.methods",
    "DCGANGenerator": "diffusion_transfer.nets.generator",
    "load_edm_network": "diffusion_transfer.methods",
    "CheckpointError": "diffusion_transfer.io.checkpoint",
    "GenerativeEvaluation": "diffusion_transfer.callbacks",
    "FeatureClassifier": "diffusion_transfer.metrics",
    "ReferenceStats": "diffusion_transfer.metrics",
    "frechet_distance": "diffusion_transfer.metrics",
    "TrainableEMA": "diffusion_transfer.callbacks",
    "ImageWriter": "diffusion_transfer.callbacks",
    "FinalCheckpoint": "diffusion_transfer.callbacks",
    "DatasetError": "diffusion_transfer.data",
    "DiffusionDataModule": "diffusion_transfer.data",
    "ImageDataset": "diffusion_transfer.data",
    "ImageFolderDataset": "diffusion_transfer.data",
    "ZipImageDataset": "diffusion_transfer.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
