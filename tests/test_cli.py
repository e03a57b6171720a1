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
TINY_UNET = ["--model.init_args.arch_overrides", "{model_channels: 16, num_blocks: 1, min_channels_per_group: 4}"]


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


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--model.init_args.low_noise_scale", "-1",
     "low_noise_scale must be a finite number >= 0 (0: uniform t), got -1.0"),
    ("--model.init_args.sampler", "foo", "unknown sampler 'foo'; choose one of ddpm, ddim"),
])
def test_bad_model_values_are_one_line_errors(shapes_zip: Path, tmp_path: Path, capsys, option: str, value: str,
                                              expected: str) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: {expected}" in err and "Traceback" not in err


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


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no usage text
    return lines[0]


def test_an_unknown_option_is_one_line_naming_the_closest(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    cases = {
        ("--trainer.max_step", "5"): "unknown option --trainer.max_step; did you mean --trainer.max_steps?",
        ("--trainer.max_st=5",): "unknown option --trainer.max_st; did you mean --trainer.max_steps?",  # no prefixes
        ("--model.init_args.sample_stepz", "3"):
            "unknown option --model.init_args.sample_stepz; did you mean --model.init_args.sample_steps?",
    }
    for options, expected in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), *options])
        assert exit_info.value.code == 2
        assert _one_error_line(capsys) == f"diffusion-transfer: error: {expected}"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "--trainer.max_steps" in capsys.readouterr().out


def test_an_unknown_config_key_is_one_line_naming_the_closest(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, shapes_zip)
    cases = {
        "trainer.yaml": ({"trainer": {"max_step": 5}},
                         "unknown option trainer.max_step in the config; did you mean trainer.max_steps?"),
        "model.yaml": ({"model": {"init_args": {"sample_stepz": 3}}}, "unknown option model.init_args.sample_stepz "
                       "in the config; did you mean model.init_args.sample_steps?"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--config", str(tmp_path / name)])
        assert exit_info.value.code == 2
        assert _one_error_line(capsys) == f"diffusion-transfer: error: {expected}"
    # The correct spellings still work, on the command line and in a file.
    (tmp_path / "right.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 5}}))
    right = ["--config", str(config), "--config", str(tmp_path / "right.yaml")]
    assert build_cli(right, run=False).trainer.max_steps == 5
    assert build_cli(["--config", str(config), "--trainer.max_steps", "7"], run=False).trainer.max_steps == 7


def _run_dir_config(tmp_path: Path, data: Path) -> Path:
    """The tiny config as the repository's configs are: relative run directory, FinalCheckpoint, zip in the run."""
    config = yaml.safe_load(tiny_config(tmp_path, data).read_text())
    config["trainer"].update(default_root_dir="runs/one", logger=False, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"filename": "last", "enable_version_counter": False}},
        {"class_path": "diffusion_transfer.callbacks.FinalCheckpoint"}])
    config["writer"] = {"zip_path": "samples.zip"}
    config["data"]["init_args"]["predict_seeds"] = "0-3"
    path = tmp_path / "run_dir.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_fit_and_predict_write_only_into_the_run_directory(shapes_zip: Path, tmp_path: Path, monkeypatch) -> None:
    config = _run_dir_config(tmp_path, shapes_zip)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # --trainer.default_root_dir moves every output of the run: nothing lands in runs/one or the working directory.
    main(["fit", "--config", str(config), "--trainer.default_root_dir", "runs/two"])
    assert "runs/two/final.ckpt" in _files(work)
    main(["predict", "--config", str(config), "--trainer.default_root_dir", "runs/two",
          "--ckpt_path", "runs/two/final.ckpt"])
    files = _files(work)
    assert {f"runs/two/samples/{s:06d}.{e}" for s in range(4) for e in ("png", "label")} <= files
    assert {"runs/two/samples.zip", "runs/two/samples-grid.png", "runs/two/checkpoints/last.ckpt"} <= files
    assert all(f.startswith("runs/two/") for f in files), sorted(files)
    # Each PNG's .label file is its class as decimal text (ImageWriter's docstring), the labels the zip holds.
    labels = [int((work / f"runs/two/samples/{s:06d}.label").read_text()) for s in range(4)]
    assert labels == ZipImageDataset(work / "runs/two/samples.zip").labels.tolist() == [0, 1, 2, 3]


def test_output_paths_follow_the_run_directory_rule(shapes_zip: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    config = _run_dir_config(tmp_path, shapes_zip)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    predict = ["predict", "--config", str(config), "--data.init_args.predict_seeds", "0-1"]  # fresh weights
    # Absolute paths are used as given; a relative path that starts with the run directory is not doubled.
    main([*predict, "--writer.output_dir", str(tmp_path / "abs"), "--writer.zip_path", str(tmp_path / "abs.zip")])
    main([*predict, "--writer.output_dir", "runs/one/again", "--writer.zip_path", "again.zip"])
    assert {"abs/000000.png", "abs/000001.png", "abs-grid.png", "abs.zip"} <= _files(tmp_path)
    assert _files(work) - {"runs/one/config.yaml"} == {
        "runs/one/again/000000.png", "runs/one/again/000000.label", "runs/one/again/000001.png",
        "runs/one/again/000001.label", "runs/one/again-grid.png", "runs/one/again.zip"}
    # A path from the working directory into another run's folder would be doubled: refused in one line.
    with pytest.raises(SystemExit) as exit_info:
        main([*predict, "--writer.output_dir", "runs/other/samples"])
    line = _one_error_line(capsys)
    assert exit_info.value.code == 2 and "writer.output_dir runs/other/samples" in line
    assert "runs/one/runs/other/samples" in line and not (work / "runs/other").exists()
