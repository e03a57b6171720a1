"""``GenerativeEvaluation``: FID, KID, precision/recall, IS, accuracy, per-class and tail FID of a model.

It runs at the end of validation (during ``fit``, and for ``diffusion-transfer validate``) and of ``test``:
every rank generates its share of a fixed list of seeds with the weights in the module (the EMA weights:
:class:`TrainableEMA` swaps them in for validation, and checkpoints store them), the feature network
measures them with autocast off, the features are gathered, and every metric is computed against the
reference statistics of the real data, which are computed once and cached as ``.npz``.

The feature network and the metric live in this callback, not in the LightningModule, so they never reach
checkpoints, EMA copies or the optimizer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..data.archive import UNLABELLED
from ..data.datasets import ImageDataset
from ..data.seeds import assign_labels
from ..metrics.evaluation import GeneratedFeatures, ScoreOptions, score, split_for_rank
from ..metrics.features import FeatureExtractor, extract, load_feature_network
from ..metrics.functional import MetricError
from ..metrics.reference import ReferenceStats, compute_reference_stats
from .ema import TrainableEMA
from .run_dir import in_run_dir


class GenerativeEvaluation(Callback):
    """Measure generated samples against the real data (off unless ``feature_network`` is set).

    Protocol: images for seeds ``seed, seed + 1, ..., seed + num_images - 1`` (each image depends only on its
    seed), labels ``balanced`` (classes in turn, equal counts) or ``prior`` (drawn in proportion to the
    training class counts, seeded), sampling options from ``sampling`` (e.g. ``{sampler: ddim, steps: 50,
    guidance_scale: 1.5}``; default: the model's own).

    Args:
        feature_network: ``inception``, ``inception:/path/weights.pth`` or a FeatureClassifier ``.ckpt``.
        reference: ``.npz`` statistics of the real data (ours, or an ADM/EDM reference file); computed from
            ``reference_data`` and written there when missing. Default: next to the data,
            ``<data>.<network_id>.npz``.
        reference_data: image dataset (zip or folder) for the statistics; default the datamodule's data.
        num_images: generated images per evaluation.
        seed: first seed.
        labels: ``balanced`` or ``prior``.
        sampling: keyword options passed to the model's ``sample``.
        batch_size: images generated per call.
        every_n_validations: during ``fit``, evaluate at every n-th validation (0: never during fit; the
            ``validate`` and ``test`` commands always evaluate).
        kid, precision_recall, per_class: compute these too (they need the raw features or class moments
            the reference keeps).
        kid_subsets, kid_subset_size: KID's subsets.
        tail_fraction: share of classes, rarest by training count, that ``fid_tail`` covers.
        output: JSON file for the results of ``validate``/``test``; default
            ``<log_dir>/metrics-<stage>-step<step>.json``. A relative path is taken inside the run directory
            ``trainer.default_root_dir`` (the rule of :func:`~diffusion_transfer.callbacks.run_dir.in_run_dir`).
    """

    def __init__(
        self,
        feature_network: str | None = None,
        reference: str | None = None,
        reference_data: str | None = None,
        num_images: int = 1000,
        seed: int = 0,
        labels: str = "balanced",
        sampling: dict[str, Any] | None = None,
        batch_size: int = 64,
        every_n_validations: int = 1,
        kid: bool = True,
        precision_recall: bool = True,
        per_class: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        tail_fraction: float = 0.3,
        output: str | None = None,
    ) -> None:
        if labels not in ("balanced", "prior"):
            raise ValueError(f"labels must be 'balanced' or 'prior', got '{labels}'")
        self.feature_network = feature_network
        self.reference = reference
        self.reference_data = reference_data
        self.num_images = num_images
        self.seed = seed
        self.labels = labels
        self.sampling = dict(sampling or {})
        self.batch_size = batch_size
        self.every_n_validations = every_n_validations
        self.options = ScoreOptions(kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                    precision_recall=precision_recall, per_class=per_class,
                                    tail_fraction=tail_fraction, seed=seed)
        self.output = output
        self._network: FeatureExtractor | None = None
        self._reference: ReferenceStats | None = None
        self._metric: GeneratedFeatures | None = None
        self._validations = 0
        self.last_results: dict[str, float | str] | None = None
        self.last_report: Path | None = None  # JSON of the latest evaluation (rank 0)
        self.last_step: int | None = None  # global step of the latest evaluation

    # Kept in checkpoints: a resumed fit counts validations on (so ``every_n_validations`` keeps its rhythm), and
    # ``predict``/``validate`` from a checkpoint can say what the weights scored when they were saved.
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations, "last_step": self.last_step,
                # Plain floats and strings only (numpy scalars would not pass a weights_only load).
                "last_results": {k: float(v) if isinstance(v, float) else str(v)
                                 for k, v in self.last_results.items()} if self.last_results else None,
                "last_report": str(self.last_report) if self.last_report else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
        self.last_step = state_dict.get("last_step")
        self.last_results = state_dict.get("last_results")
        report = state_dict.get("last_report")
        self.last_report = Path(report) if report else None

    def summary(self, title: str = "metrics") -> str | None:
        """One line with the main metrics of the latest evaluation, or None if there was none.

        ``title`` starts the line; ``"{title} (200 images): fid 0.2, precision 0.6, ... (report.json)"``.
        """
        if not self.last_results:
            return None
        shown = [f"{name} {value:.4g}" for name, value in self.last_results.items()
                 if name in ("fid", "kid", "precision", "recall", "accuracy", "fid_tail") and isinstance(value, float)]
        where = f"  ({self.last_report})" if self.last_report else ""
        return f"{title} ({self.num_images} images): {', '.join(shown)}{where}"

    @property
    def enabled(self) -> bool:
        return self.feature_network is not None and self.num_images > 0

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.output and stage != "fit":  # refuse an output path outside the run directory before sampling
            in_run_dir(self.output, trainer.default_root_dir, "metrics.output")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._validations += 1
            if self.every_n_validations <= 0 or self._validations % self.every_n_validations:
                return
        self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self.evaluate(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float | str]:
        """Generate, measure and log; every rank must call it (features and sums are gathered)."""
        network = self._load_network(pl_module.device)
        reference = self._load_reference(trainer, pl_module, network)
        seeds = list(range(self.seed, self.seed + self.num_images))
        labels = self._labels(trainer, pl_module)
        mine = split_for_rank(seeds, trainer.global_rank, trainer.world_size)
        metric = self._metric = (self._metric or GeneratedFeatures()).to(pl_module.device)
        metric.reset()
        # An empty first update: a rank with no seeds still contributes correctly shaped states to the gather.
        metric.update(torch.zeros(0), torch.zeros(0), torch.zeros(0, network.num_features),
                      torch.zeros(0, network.num_logits))
        from tqdm.auto import tqdm

        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        progress = tqdm(batches, desc=f"{stage} metrics: sampling", leave=False,
                        disable=not trainer.is_global_zero or trainer.state.fn == "fit")
        for batch in progress:
            batch_labels = torch.as_tensor([labels[i] for i in batch])
            with trainer.precision_plugin.forward_context():
                images = pl_module.sample(labels=batch_labels if getattr(pl_module, "num_classes", 0) else None,
                                          seeds=[seeds[i] for i in batch], **self.sampling)
            self._check_images(images, reference)
            features, logits = extract(network, images)
            metric.update(torch.as_tensor(batch), batch_labels, features, logits)
        generated = metric.compute()
        metric.reset()
        results = score(generated, reference, self.options, class_counts=self._class_counts(trainer),
                        num_classes=getattr(pl_module, "num_classes", 0))
        self.last_results = results
        self.last_step = trainer.global_step
        suffix = f"_{self.num_images}"
        for name, value in results.items():
            if isinstance(value, float) and name != "num_images":
                tag = name + suffix if name.startswith(("fid", "kid")) else name
                # Already global (computed from gathered features on every rank): no sync_dist.
                pl_module.log(f"{stage}/{tag}", value, sync_dist=False)
        self._write(trainer, pl_module, stage, results)
        return results

    def _labels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[int]:
        num_classes = getattr(pl_module, "num_classes", 0)
        if not num_classes:
            return [UNLABELLED] * self.num_images
        if self.labels == "balanced":
            return assign_labels(self.num_images, num_classes, None)
        counts = torch.as_tensor(self._class_counts(trainer), dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.multinomial(counts / counts.sum(), self.num_images, True, generator=generator).tolist()

    @staticmethod
    def _class_counts(trainer: L.Trainer) -> list[int] | None:
        return getattr(trainer.datamodule, "class_counts", None) if trainer.datamodule is not None else None

    def _check_images(self, images: torch.Tensor, reference: ReferenceStats) -> None:
        if reference.resolution is not None and images.shape[-1] != reference.resolution:
            raise MetricError(f"{self._reference_path}: reference statistics are of {reference.resolution}px images "
                              f"but the model generates {images.shape[-1]}px images")

    def _load_network(self, device: torch.device) -> FeatureExtractor:
        if self._network is None:
            self._network = load_feature_network(str(self.feature_network))
        return self._network.to(device)

    def _load_reference(self, trainer: L.Trainer, pl_module: L.LightningModule,
                        network: FeatureExtractor) -> ReferenceStats:
        if self._reference is not None:
            return self._reference
        data_path = self.reference_data or getattr(trainer.datamodule, "path", None)
        path = Path(self.reference) if self.reference else (
            Path(f"{data_path}.{network.network_id}.npz") if data_path else None)
        if path is None:
            raise MetricError("metrics need reference statistics: set metrics.reference (an .npz) or "
                              "metrics.reference_data (an image dataset)")
        self._reference_path = path
        if not path.is_file():
            if data_path is None:
                raise FileNotFoundError(f"{path}: reference statistics not found, and no metrics.reference_data "
                                        "to compute them from")
            self._compute_reference(trainer, pl_module, network, Path(data_path), path)
        reference = ReferenceStats.load(path)
        # The image side is checked on the first generated batch (latent models decode to a larger side).
        reference.check_compatible(network.network_id, network.num_features, None, str(path))
        self._reference = reference
        return reference

    def _compute_reference(self, trainer: L.Trainer, pl_module: L.LightningModule, network: FeatureExtractor,
                           data_path: Path, path: Path) -> None:
        try:
            dataset = ImageDataset(data_path)
        except Exception as err:
            raise MetricError(f"{data_path}: cannot compute reference statistics from it ({err}); latent datasets "
                              "need metrics.reference_data pointing at the images") from err
        rank_zero_info(f"computing reference statistics of {data_path} with {network.network_id} -> {path}")
        stats = compute_reference_stats(
            dataset, lambda images: extract(network, images), network.num_features, dataset.num_classes,
            network.network_id, dataset.resolution, batch_size=max(self.batch_size, 256),
            rank=trainer.global_rank, world_size=trainer.world_size)
        if trainer.is_global_zero:
            stats.save(path)
        trainer.strategy.barrier("reference-statistics")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str,
               results: dict[str, float | str]) -> None:
        log_dir = trainer.log_dir  # a collective call: every rank makes it
        if not trainer.is_global_zero:
            return
        record = {
            "stage": stage, "step": trainer.global_step, "checkpoint": trainer.ckpt_path,
            "feature_network": self._network.network_id if self._network else None,
            "reference": str(self._reference_path),
            "protocol": {"num_images": self.num_images, "seeds": f"{self.seed}-{self.seed + self.num_images - 1}",
                         "labels": self.labels, "sampling": self.sampling,
                         "weights": "EMA" if _has_ema(trainer) or trainer.ckpt_path else "module"},
            "metrics": {k: v for k, v in results.items() if not isinstance(v, float) or math.isfinite(v)},
        }
        if self.output and trainer.state.fn != "fit":
            path = in_run_dir(self.output, trainer.default_root_dir, "metrics.output")
        else:
            path = Path(log_dir or ".") / f"metrics-{stage}-step{trainer.global_step:07d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        self.last_report = path
        if trainer.state.fn != "fit":
            lines = [f"{name:>20s}  {value:.6g}" if isinstance(value, float) else f"{name:>20s}  {value}"
                     for name, value in results.items() if not name.startswith("fid_class/")]
            print("\n".join([f"{stage} metrics ({self.num_images} images, {record['feature_network']}):", *lines,
                             f"written to {path}"]))


def _has_ema(trainer: L.Trainer) -> bool:
    return any(isinstance(c, TrainableEMA) and c.shadow for c in trainer.callbacks)
