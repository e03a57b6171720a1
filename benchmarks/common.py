"""Pieces every benchmark script shares: quiet CPU runs, a fixed-name checkpoint, a train-once step.

The scripts run from the repository root as ``python benchmarks/NAME.py``; Python then puts ``benchmarks/`` on the
import path, so they import this module as ``common``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes

CPU_QUIET = ["--trainer.enable_progress_bar", "false"]
#: the broad source's data and pre-training ([reproduction]'s testbeds of Diffusion Tuning and FineDiffusion)
BROAD_SOURCE_DOMAIN, BROAD_SOURCE_KINDS, BROAD_SOURCE_STEPS = "filled,cutout", "all", 4800


def make_broad_source(path: Path) -> Path:
    """The broad source set at ``path``, built once: two styles, "filled" and "cutout", and all 8 kinds in 5 colours
    (40 classes), 100 images of each in each style (shapes seed 0)."""
    if not path.exists():
        make_shapes(path, resolution=16, per_class=100, seed=0, domain=BROAD_SOURCE_DOMAIN, kinds=BROAD_SOURCE_KINDS)
    return path


def checkpoint_callback(path: Path) -> str:
    return yaml.safe_dump([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(path.parent), "filename": path.stem, "enable_version_counter": False}}])


def fit_into(checkpoint: Path, argv: Sequence[str]) -> Path:
    """``diffusion-transfer fit`` with ``argv``, its last weights saved as ``checkpoint``.

    The fit saves under a ``.partial`` name (its checkpoint callback writes at every epoch) and the file takes its
    real name only when the fit ends, so a script that skips finished work never takes an interrupted fit for one.
    """
    partial = checkpoint.with_name(checkpoint.stem + ".partial.ckpt")
    cli(["fit", *argv, "--trainer.callbacks", checkpoint_callback(partial)])
    partial.replace(checkpoint)
    return checkpoint


def train_once(config: str, data: Path, checkpoint: Path, steps: int, arch: list[str], work: Path) -> None:
    """Train ``config`` on ``data`` into ``checkpoint`` unless it exists (the source model, the feature network)."""
    if checkpoint.exists():
        return
    fit_into(checkpoint, ["--config", config, *arch, *CPU_QUIET, "--data.init_args.path", str(data),
                          "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "null",
                          "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "0",
                          "--trainer.default_root_dir", str(work / Path(config).stem)])


def evaluate_report(config: str | Path, checkpoint: str | Path | None, features: str | Path, work: Path,
                    num_images: int = 200, sampling: str | None = None, extra: Sequence[str] = (), seed: int = 100000,
                    output: str = "metrics.json") -> dict:
    """Sample metrics of ``checkpoint`` (a ``fit`` of ``config``) by ``diffusion-transfer validate``: the whole report.

    ``num_images`` class-balanced samples at seeds ``seed`` on (100000: never used in training), drawn as the config's
    ``metrics.sampling`` says unless ``sampling`` (JSON) is given, scored by the target's FeatureClassifier
    ``features``: FID, precision/recall (k = 3), class accuracy. ``checkpoint`` None validates the config's own
    starting weights (``model.init_args.checkpoint``). The run (and its report) lives in ``work``. ``extra``: more
    command-line options (e.g. the arch settings of a checkpoint saved by an older version, or other metrics
    switches; they come last, so they win). ``output``: the report's file name in ``work``. Returns the report:
    ``metrics`` beside the feature network and reference it was measured with.
    """
    cli(["validate", "--config", str(config), *(["--ckpt_path", str(checkpoint)] if checkpoint else []), *CPU_QUIET,
         "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(work),
         "--metrics.feature_network", str(features), "--metrics.num_images", str(num_images),
         "--metrics.seed", str(seed), "--metrics.per_class", "false", "--metrics.precision_recall", "true",
         "--metrics.output", output, *(["--metrics.sampling", sampling] if sampling else []), *extra])
    return json.loads((work / output).read_text())


def evaluate(config: str | Path, checkpoint: str | Path | None, features: str | Path, work: Path,
             num_images: int = 200, sampling: str | None = None, extra: Sequence[str] = (), seed: int = 100000,
             output: str = "metrics.json") -> dict:
    """The ``metrics`` dict of :func:`evaluate_report` (same arguments)."""
    return evaluate_report(config, checkpoint, features, work, num_images, sampling, extra, seed, output)["metrics"]
