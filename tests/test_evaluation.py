"""Sample metrics through the CLI: the shapes feature classifier, validate/test reports, fit logging, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.data import make_shapes
from diffusion_transfer.metrics import MetricError, ReferenceStats, load_feature_classifier

REPO = Path(__file__).resolve().parents[1]
DIT_STEPS = 800


def _fit_config(path: Path, config: dict, root: Path, checkpoint: Path, **trainer) -> Path:
    """Write ``config`` with CPU settings, no validation, and one checkpoint at ``checkpoint``."""
    config["trainer"].update(accelerator="cpu", devices=1, default_root_dir=str(root), enable_progress_bar=False,
                             limit_val_batches=0, val_check_interval=None, check_val_every_n_epoch=1, **trainer)
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(checkpoint.parent), "filename": checkpoint.stem, "enable_version_counter": False}}]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Outline shapes (800 images), the feature classifier of configs/features/shapes.yaml (300 steps), and a
    tiny DiT trained on them for DIT_STEPS steps."""
    tmp = tmp_path_factory.mktemp("evaluation")
    data = tmp / "shapes.zip"
    make_shapes(data, resolution=16, per_class=40, seed=0, domain="outline")
    features = yaml.safe_load((REPO / "configs/features/shapes.yaml").read_text())
    features["data"]["init_args"]["path"] = str(data)
    main(["fit", "--config", str(_fit_config(tmp / "features.yaml", features, tmp / "runs", tmp / "features.ckpt",
                                             max_steps=300))])
    dit = {
        "seed_everything": 0,
        "model": {"class_path": "Diffusion", "init_args": {
            "arch": "DiT-S/4", "arch_overrides": {"hidden_size": 64, "depth": 2, "num_heads": 2},
            "sampler": "ddim", "sample_steps": 10, "guidance_scale": 2.0, "val_num_images": 0,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2.0e-3}}}},
        "data": {"class_path": "DiffusionDataModule",
                 "init_args": {"path": str(data), "batch_size": 32, "val_max_images": 32}},
        "ema": {"decay": 0.95},
        "trainer": {},
    }
    config = _fit_config(tmp / "dit.yaml", dit, tmp / "runs", tmp / "dit.ckpt", max_steps=DIT_STEPS)
    main(["fit", "--config", str(config)])
    return {"tmp": tmp, "data": data, "features": tmp / "features.ckpt", "dit": tmp / "dit.ckpt", "config": config}


def _validate(trained: dict[str, Path], output: Path, *extra: str, checkpoint: bool = True) -> dict:
    args = ["validate", "--config", str(trained["config"]), "--trainer.limit_val_batches", "1",
            "--metrics.feature_network", str(trained["features"]), "--metrics.num_images", "200",
            "--metrics.output", str(output), *extra]
    main(args + (["--ckpt_path", str(trained["dit"])] if checkpoint else []))
    return json.loads(output.read_text())


def test_trained_model_beats_its_untrained_weights(trained: dict[str, Path], capsys) -> None:
    untrained = _validate(trained, trained["tmp"] / "untrained.json", checkpoint=False)
    report = _validate(trained, trained["tmp"] / "trained.json")
    assert "val metrics (200 images" in capsys.readouterr().out
    assert report["metrics"]["fid"] < 0.5 * untrained["metrics"]["fid"]
    assert report["metrics"]["accuracy"] > 3 * (1 / 20)  # chance is 1 in 20 classes
    assert report["protocol"] == {"num_images": 200, "seeds": "0-199", "labels": "balanced", "sampling": {},
                                  "weights": "EMA"}
    assert report["feature_network"].startswith("classifier-")
    # Reference statistics were computed once, next to the data, from all 800 images.
    reference = ReferenceStats.load(report["reference"])
    assert Path(report["reference"]).parent == trained["data"].parent
    assert reference.num_images == 800 and reference.resolution == 16 and reference.class_counts.tolist() == [40] * 20
    # The metric's network never lands in the model checkpoint.
    state = torch.load(trained["dit"], weights_only=True)["state_dict"]
    assert not any("trunk" in key or "classifier" in key for key in state)


def test_feature_classifier_loads_and_refuses_other_checkpoints(trained: dict[str, Path]) -> None:
    network = load_feature_classifier(trained["features"])
    assert network.num_features == 32 and network.num_logits == 20 and network.resolution == 16
    features, logits = network(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert features.shape == (2, 32) and logits.shape == (2, 20)
    with pytest.raises(MetricError, match="not a FeatureClassifier checkpoint"):
        load_feature_classifier(trained["dit"])
    with pytest.raises(MetricError, match="takes 3x16x16 images, got"):
        network(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_bad_metric_inputs_are_one_line_errors(trained: dict[str, Path], capsys) -> None:
    def error_of(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            _validate(trained, trained["tmp"] / "bad.json", *extra)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "not a FeatureClassifier checkpoint" in error_of("--metrics.feature_network", str(trained["dit"]))
    assert "20 images for 32-dimensional features" in error_of("--metrics.num_images", "20")
    foreign = trained["tmp"] / "foreign.npz"
    np.savez(foreign, mu=np.zeros(32), sigma=np.eye(32), feature_network="inception-v3-tf-2015-12-05")
    assert "made with feature network 'inception-v3" in error_of("--metrics.reference", str(foreign))
    assert "inception-2015-12-05" in error_of("--metrics.feature_network", "inception:/nowhere/weights.pth")


def test_fid_is_logged_during_fit(trained: dict[str, Path], capsys) -> None:
    root = trained["tmp"] / "fit-metrics"
    cli = build_cli(["fit", "--config", str(trained["config"]), "--trainer.max_steps", "2",
                     "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
                     "--trainer.default_root_dir", str(root),
                     "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                     "--metrics.feature_network", str(trained["features"]), "--metrics.num_images", "40",
                     "--metrics.per_class", "false"])
    assert "val/fid_40" in cli.trainer.callback_metrics and "val/accuracy" in cli.trainer.callback_metrics
    assert "metrics (40 images): fid " in capsys.readouterr().out  # printed with the run's paths
    written = list(root.rglob("metrics-val-step0000002.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["metrics"]["num_images"] == 40


def test_a_resumed_fit_names_the_step_of_the_metrics_it_restored(trained: dict[str, Path], capsys) -> None:
    root, ckpt = trained["tmp"] / "resumed", trained["tmp"] / "resumed-ckpt"
    common = ["fit", "--config", str(trained["config"]), "--trainer.limit_val_batches", "1",
              "--trainer.default_root_dir", str(root), "--trainer.enable_checkpointing", "true",
              "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                  "init_args": {"dirpath": str(ckpt), "filename": "last"}}]),
              "--metrics.feature_network", str(trained["features"]), "--metrics.num_images", "40",
              "--metrics.per_class", "false"]
    build_cli([*common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert "\nmetrics (40 images): fid " in capsys.readouterr().out
    # Two more steps and no validation: the only metrics are the restored ones, of the step-2 weights.
    build_cli([*common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "0", "--ckpt_path", str(ckpt / "last.ckpt")])
    out = capsys.readouterr().out
    assert "metrics of the latest evaluation, at step 2 (these weights are at step 4) (40 images): fid " in out
    assert "\nmetrics (40 images)" not in out


def test_two_process_evaluation_equals_one_process(trained: dict[str, Path]) -> None:
    # 101 images split 51/50 over two ranks, and reference statistics computed in two shards.
    common = ["--metrics.num_images", "101", "--metrics.per_class", "false"]
    single = _validate(trained, trained["tmp"] / "single.json", *common,
                       "--metrics.reference", str(trained["tmp"] / "ref-single.npz"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "diffusion_transfer", "validate", "--config", str(trained["config"]),
               "--ckpt_path", str(trained["dit"]), "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.limit_val_batches", "1", "--metrics.feature_network", str(trained["features"]),
               "--metrics.output", str(trained["tmp"] / "double.json"),
               "--metrics.reference", str(trained["tmp"] / "ref-double.npz"), *common]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=trained["tmp"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    double = json.loads((trained["tmp"] / "double.json").read_text())
    assert double["metrics"].keys() == single["metrics"].keys()
    for name, value in single["metrics"].items():
        assert double["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    one, two = (ReferenceStats.load(trained["tmp"] / f"ref-{n}.npz") for n in ("single", "double"))
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(two.features, one.features)


def test_test_command_reports_metrics(trained: dict[str, Path], capsys) -> None:
    output = trained["tmp"] / "test.json"
    main(["test", "--config", str(trained["config"]), "--ckpt_path", str(trained["dit"]),
          "--metrics.feature_network", str(trained["features"]), "--metrics.num_images", "40",
          "--metrics.per_class", "false", "--metrics.output", str(output)])
    report = json.loads(output.read_text())
    assert report["stage"] == "test" and report["metrics"]["num_images"] == 40
    assert "test metrics (40 images" in capsys.readouterr().out


def test_checkpoint_keeps_the_evaluation_and_predict_reports_it(trained: dict[str, Path], capsys) -> None:
    # Validation after every step, metrics at every 2nd validation. A fit stopped after step 1 and resumed must
    # count on (evaluate at step 2), and `predict` from that checkpoint must end with its grid and metrics.
    root = trained["tmp"] / "kept"
    checkpoint = root / "ckpt" / "last.ckpt"
    common = ["--config", str(trained["config"]), "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "1", "--trainer.check_val_every_n_epoch", "null",
              "--trainer.default_root_dir", str(root), "--trainer.callbacks", yaml.safe_dump([{
                  "class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                      "dirpath": str(checkpoint.parent), "filename": "last", "enable_version_counter": False}}]),
              "--metrics.feature_network", str(trained["features"]), "--metrics.num_images", "40",
              "--metrics.per_class", "false", "--metrics.every_n_validations", "2"]
    main(["fit", *common, "--trainer.max_steps", "1"])
    state = torch.load(checkpoint, weights_only=True)["callbacks"]
    (evaluation,) = [v for k, v in state.items() if k.startswith("GenerativeEvaluation")]
    assert evaluation["validations"] == 1 and evaluation["last_results"] is None
    capsys.readouterr()
    main(["fit", *common, "--trainer.max_steps", "2", "--ckpt_path", str(checkpoint)])
    reports = list(root.rglob("metrics-val-step*.json"))
    assert [p.name for p in reports] == ["metrics-val-step0000002.json"]
    written = json.loads(reports[0].read_text())["metrics"]
    state = torch.load(checkpoint, weights_only=True)["callbacks"]
    (evaluation,) = [v for k, v in state.items() if k.startswith("GenerativeEvaluation")]
    assert evaluation["validations"] == 2 and evaluation["last_step"] == 2
    assert evaluation["last_results"]["precision"] == pytest.approx(written["precision"])

    capsys.readouterr()
    out = root / "samples"
    main(["predict", *common, "--ckpt_path", str(checkpoint), "--data.init_args.predict_seeds", "0-12",
          "--writer.output_dir", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0] == f"sample grid: {root / 'samples-grid.png'}"
    assert last[1].startswith("metrics of these weights at step 2 (40 images): fid ")
    for name in ("precision", "recall", "accuracy"):
        assert f"{name} {written[name]:.4g}" in last[1]
    # The grid: 13 images, 10 per row (20 classes), 1-px white gaps; each cell is that seed's PNG.
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s:06d}.{e}" for s in range(13) for e in ("png", "label"))
    grid = np.asarray(Image.open(root / "samples-grid.png"))
    assert grid.shape == (1 + 2 * 17, 1 + 10 * 17, 3)
    for index, seed in ((0, 0), (12, 12)):
        row, col = divmod(index, 10)
        cell = grid[1 + 17 * row:17 + 17 * row, 1 + 17 * col:17 + 17 * col]
        assert np.array_equal(cell, np.asarray(Image.open(out / f"{seed:06d}.png")))
    assert (grid[0] == 255).all() and (grid[1 + 17 * 1 + 16:, 1 + 17 * 3:] == 255).all()  # gaps, empty cells
