"""``diffusion-transfer``: every config instantiates; fit -> predict; errors; 2-process CPU DDP (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.data import ZipImageDataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
TINY_MODEL = ["--model.init_args.arch_overrides", "{hidden_size: 32, depth: 2, num_heads: 2}"]
TINY_UNET = ["--model.init_args.arch_overrides", "{model_channels: 16, num_blocks: 1}"]


def tiny_config(tmp_path: Path, data: Path, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "Diffusion", "init_args": {
            "arch": "DiT-S/2", "arch_overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2},
            "sampler": "ddim", "sample_steps": 4, "val_num_images": 4}},
        "data": {"class_path": "DiffusionDataModule",
                 "init_args": {"path": str(data), "batch_size": 16, "val_max_images": 16}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "default_root_dir": str(tmp_path / "runs"),
                    "enable_progress_bar": False, "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}], **trainer},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_every_config_instantiates(config: Path, shapes_zip: Path, tmp_path: Path) -> None:
    # Model and data stay as configured (at tiny width); only the hardware settings move to this CPU.
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
           "--trainer.precision", "32-true"]
    # Pre-trained weights are left out and wide models shrunk, where the model has those arguments.
    init_args = yaml.safe_load(config.read_text())["model"].get("init_args", {})
    tiny = TINY_MODEL if str(init_args.get("arch", "DiT")).startswith("DiT") else TINY_UNET
    model = (["--model.init_args.checkpoint", "null"] if "checkpoint" in init_args else []) + (
        tiny if "arch_overrides" in init_args else [])
    cli = build_cli(["--config", str(config), "--data.init_args.path", str(shapes_zip),
                     "--trainer.default_root_dir", str(tmp_path), *model, *cpu], run=False)
    assert cli.model.num_classes == 20 and cli.model.resolution == 16 and cli.model.channels == 3
    assert cli.datamodule.num_classes == 20


def test_fit_then_predict_writes_pngs_and_zip(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    main(["fit", "--config", str(config)])
    assert "checkpoint:" in capsys.readouterr().out
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    saved = next((tmp_path / "runs").rglob("config.yaml"))
    main(["predict", "--config", str(saved), "--ckpt_path", str(checkpoint),
          "--data.init_args.predict_seeds", "3-9", "--data.init_args.predict_labels", "4,5",
          "--writer.output_dir", str(tmp_path / "out"), "--writer.zip_path", str(tmp_path / "out.zip")])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{s:06d}.png" for s in range(3, 10)]
    dataset = ZipImageDataset(tmp_path / "out.zip")
    assert len(dataset) == 7 and dataset.num_classes == 20
    assert dataset.labels.tolist() == [4, 5, 4, 5, 4, 5, 4]
    # A second run into the same folder packs its own seeds only.
    main(["predict", "--config", str(saved), "--ckpt_path", str(checkpoint), "--data.init_args.predict_seeds", "20-21",
          "--writer.output_dir", str(tmp_path / "out"), "--writer.zip_path", str(tmp_path / "second.zip")])
    assert len(ZipImageDataset(tmp_path / "second.zip")) == 2


def test_command_line_sampling_options_win_over_the_checkpoints(shapes_zip: Path, tmp_path: Path) -> None:
    # Lightning lays a --ckpt_path's stored hyper-parameters over the config; options typed on the command line must
    # still apply (the README's `predict ... --model.init_args.sampler ddpm --model.init_args.sample_steps 250`).
    config = tiny_config(tmp_path, shapes_zip)
    main(["fit", "--config", str(config)])
    checkpoint = str(tmp_path / "ckpt" / "last.ckpt")

    def predict(name: str, *options: str) -> list[bytes]:
        main(["predict", "--config", str(config), "--ckpt_path", checkpoint, "--data.init_args.predict_seeds", "0-3",
              "--writer.output_dir", str(tmp_path / name), *options])
        return [p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))]

    stored = predict("stored")  # the checkpoint's own settings: ddim, 4 steps
    assert predict("same", "--model.init_args.sample_steps", "4") == stored
    assert predict("fewer", "--model.init_args.sample_steps", "1") != stored
    assert predict("ddpm", "--model.init_args.sampler=ddpm") != stored
    cli = build_cli(["--config", str(config), "--model.init_args.sample_steps", "1"], run=False)
    assert cli.model.sampling["steps"] == 1


def test_predict_label_outside_model_is_a_clear_error(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config), "--data.init_args.predict_labels", "20"])
    assert exit_info.value.code == 2
    assert "label 20 is outside the model's classes 0..19" in capsys.readouterr().err


def test_missing_dataset_and_checkpoint_are_clear_errors(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.init_args.path", str(tmp_path / "none.zip")])
    assert exit_info.value.code == 2 and "none.zip: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.checkpoint", str(tmp_path / "DiT-XL-2-256x256.pt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "never downloads weights" in err and "DiT-XL-2-256x256.pt" in err


def test_print_config_and_config_typos(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["arch"] == "DiT-S/2" and printed["ema"]["decay"] == 0.9999
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.sample_stepz", "3"])
    assert exit_info.value.code != 0 and "sample_stepz" in capsys.readouterr().err


def test_two_process_cpu_ddp_fit(shapes_zip: Path, tmp_path: Path) -> None:
    # Under bf16-mixed: the gloo all-reduce of DDP works on the float32 gradients autocast leaves.
    config = tiny_config(tmp_path, shapes_zip, devices=2, strategy="ddp", max_steps=6, val_check_interval=3,
                         check_val_every_n_epoch=None, precision="bf16-mixed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "diffusion_transfer", "fit", "--config", str(config)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = [line for line in (result.stdout + result.stderr).splitlines() if "[rank0]" not in line]
    assert result.returncode == 0, "\n".join(log)[-4000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "Using bfloat16 Automatic Mixed Precision" in result.stderr + result.stdout
    import torch

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and "ema_raw_state" in checkpoint
    assert len(list((tmp_path / "runs").rglob("samples/step*.png"))) == 2  # validation grids, rank 0 only
