"""Feature networks for the metrics: the standard FID Inception-v3, and a small trainable classifier.

Every feature network is wrapped as a :class:`FeatureExtractor`: a frozen module that takes uint8 images
``[B, C, R, R]`` (what :func:`quantize` makes of generated images, and what datasets hold) and returns
``(features [B, D], logits [B, K] or None)``. Its ``network_id`` goes into reference statistics, so
statistics of one network are never compared with features of another.

- ``"inception"``: torch-fidelity's ``inception-v3-compat`` (the TF 2015-12-05 weights of the FID paper),
  2048-d pool features and 1008 unbiased logits (Inception Score). Weights come from a local file only.
- a ``.ckpt`` of :class:`FeatureClassifier`: a small CNN trained on the dataset itself with
  ``diffusion-transfer fit --config configs/features/<dataset>.yaml``, for data without a standard network
  (shapes, small research sets). Its penultimate features feed FID; its logits give the class accuracy of
  conditional samples.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F

from ..io.checkpoint import safe_torch_load
from ..runtime import destroy_process_group_at_exit
from .functional import MetricError

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


def quantize(images: Tensor) -> Tensor:
    """Images as the metrics see them: uint8 ``[B, C, H, W]``.

    Float images in [-1, 1] become ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8, the rule of the
    DiT/ADM/EDM evaluation scripts (equal to rounding ``127.5 (x + 1)``); uint8 input is returned unchanged,
    so real images from a dataset and generated ones go through the same quantisation.
    """
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


class FeatureExtractor(nn.Module):
    """A frozen feature network: uint8 ``[B, C, R, R]`` -> ``(features [B, D], logits [B, K] or None)``.

    Attributes:
        network_id: names the network and its weights (stored with reference statistics).
        num_features: D.
        num_logits: K (0 when the network has no classifier head).
        resolution: the image side the network requires, or None when it resizes any input itself.
    """

    network_id: str
    num_features: int
    num_logits: int
    resolution: int | None

    def freeze(self) -> FeatureExtractor:
        self.requires_grad_(False).eval()
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Always in eval mode (BatchNorm statistics and dropout must not change with the caller's mode).
        return super().train(False)


# ------------------------------------------------------------------------------------------------ classifier


class FeatureClassifier(L.LightningModule):
    """A small CNN classifier whose penultimate features serve FID on datasets without a standard network.

    Four 3x3 conv layers (GroupNorm, SiLU; two of them stride 2), global average pooling to ``num_features``
    features, and a linear head to ``num_classes`` logits. Trained with cross-entropy on the dataset's labels
    (``DiffusionDataModule`` images in [-1, 1]); unlabelled data cannot train it.

    Args:
        num_classes: classes of the data (linked from the data by the CLI).
        resolution: image side in pixels; the network refuses other sizes when it measures images.
        channels: image channels.
        width: channels of the first conv layer (the second pair has twice as many).
        num_features: dimension D of the features fed to FID (keep it well below the number of images
            evaluated: FID needs more than D images).
        optimizer: ``params -> Optimizer``; default AdamW(lr=1e-3, weight_decay=1e-4).
    """

    def __init__(
        self,
        num_classes: int = 0,
        resolution: int = 16,
        channels: int = 3,
        width: int = 32,
        num_features: int = 32,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if num_classes < 2:
            raise MetricError(f"FeatureClassifier needs labelled data with at least 2 classes, got {num_classes}")
        self.optimizer_factory = optimizer
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU()]

        self.trunk = nn.Sequential(
            *block(channels, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
            *block(2 * width, num_features, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # under CPU DDP, before interpreter exit (see runtime.py)

    def features(self, images: Tensor) -> Tensor:
        """Float images ``[B, C, R, R]`` in [-1, 1] -> penultimate features ``[B, num_features]``."""
        return self.trunk(images)

    def forward(self, images: Tensor) -> Tensor:
        """Float images ``[B, C, R, R]`` in [-1, 1] -> logits ``[B, num_classes]``."""
        return self.head(self.features(images))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        if int(labels.min()) < 0:
            raise MetricError("FeatureClassifier cannot train on unlabelled images (label -1)")
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        sync = stage != "train"
        self.log_dict({f"{stage}/loss": loss.detach(), f"{stage}/accuracy": accuracy}, prog_bar=True,
                      sync_dist=sync, batch_size=len(images))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class ClassifierFeatures(FeatureExtractor):
    """:class:`FeatureClassifier` as a :class:`FeatureExtractor` (uint8 in, features and logits out)."""

    def __init__(self, classifier: FeatureClassifier, network_id: str) -> None:
        super().__init__()
        self.classifier = classifier
        self.network_id = network_id
        self.num_features = int(classifier.hparams.num_features)
        self.num_logits = classifier.num_classes
        self.resolution = classifier.resolution
        self.freeze()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[-1] != self.resolution or images.shape[1] != self.classifier.channels:
            raise MetricError(
                f"the feature classifier ({self.network_id}) takes {self.classifier.channels}x{self.resolution}x"
                f"{self.resolution} images, got {tuple(images.shape[1:])}; train one for this data with "
                "configs/features/<dataset>.yaml"
            )
        features = self.classifier.features(images.float() / 127.5 - 1.0)
        return features, self.classifier.head(features)


def load_feature_classifier(path: str | os.PathLike[str]) -> ClassifierFeatures:
    """A trained :class:`FeatureClassifier` from its Lightning checkpoint (loaded with ``weights_only=True``)."""
    path = Path(path)
    train = "`diffusion-transfer fit --config configs/features/<dataset>.yaml`"
    checkpoint = safe_torch_load(path, what="a feature classifier checkpoint", error=MetricError,
                                 missing=f"{path}: feature classifier checkpoint not found; train it with {train}",
                                 fix=f"train it again with {train}")
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(key.startswith("trunk.") for key in state):
        raise MetricError(f"{path}: not a FeatureClassifier checkpoint (no 'trunk.*' weights); pass a checkpoint "
                          "written by `diffusion-transfer fit --config configs/features/<dataset>.yaml`")
    names = ("num_classes", "resolution", "channels", "width", "num_features")
    classifier = FeatureClassifier(**{name: hparams[name] for name in names if name in hparams})
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MetricError(f"{path}: FeatureClassifier weights do not match its hyper-parameters (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]})")
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return ClassifierFeatures(classifier, f"classifier-{digest.hexdigest()[:16]}")


# ------------------------------------------------------------------------------------------------ Inception


def default_inception_path() -> Path:
    """Where torch.hub caches the FID Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


class InceptionFeatures(FeatureExtractor):
    """The standard FID Inception-v3 (torch-fidelity ``inception-v3-compat``), from a local weights file.

    Takes uint8 images of any size (resized to 299 inside, as the TF original does); 1-channel images are
    repeated to RGB. Features: 2048-d pool3; logits: the 1008 ``logits_unbiased`` of the Inception Score.

    Args:
        weights: path of ``weights-inception-2015-12-05-6726825d.pth``; default the torch.hub cache.
    """

    num_features = 2048
    num_logits = 1008
    resolution = None

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = Path(weights) if weights else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: FID Inception weights not found. Download {INCEPTION_URL} on a machine with internet "
                f"and put it at {default_inception_path()} (or pass its path as metrics.feature_network "
                "'inception:/path/to/file.pth'); nothing is downloaded at run time"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError("the FID Inception needs torch-fidelity: pip install 'diffusion-transfer[fid]'") from err
        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        self.network_id = "inception-v3-tf-2015-12-05"
        self.freeze()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features, logits = self.network(images)
        return features, logits


def load_feature_network(spec: str) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a config string.

    - ``"inception"``: FID Inception with weights from the torch.hub cache;
    - ``"inception:PATH"`` or a ``.pth`` path: FID Inception with weights from PATH;
    - a ``.ckpt`` path: a trained :class:`FeatureClassifier`.
    """
    if spec == "inception":
        return InceptionFeatures()
    if spec.startswith("inception:"):
        return InceptionFeatures(spec.split(":", 1)[1])
    if spec.endswith(".pth"):
        return InceptionFeatures(spec)
    if spec.endswith(".ckpt"):
        return load_feature_classifier(spec)
    raise MetricError(f"unknown feature network '{spec}': use 'inception', 'inception:/path/weights.pth', or the "
                      ".ckpt of a FeatureClassifier")


@torch.no_grad()
def extract(network: FeatureExtractor, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """Run ``network`` on images (float in [-1, 1] or uint8) in full precision (autocast off, TF32 off).

    Mixed precision shifts Inception features by about 1.5%, enough to move FID, so the feature network
    always runs in float32 whatever the trainer's precision.
    """
    device = next(network.parameters()).device
    pixels = quantize(images).to(device)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            features, logits = network(pixels)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    return features.float(), None if logits is None else logits.float()

