"""Runs that survive being killed: SIGKILL mid-fit, then ``--ckpt_path last``, equals an uninterrupted run; a save
interrupted half-way leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_transfer.data import make_shapes

STEPS = 30
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the fits' subprocesses
REPO = Path(__file__).resolve().parents[1]  # tests.sigkill must import in the fit's process
TINY_DIT = {"class_path": "Diffusion", "init_args": {
    "arch": "DiT-S/2", "arch_overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}, "val_num_images": 0,
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}}
TINY_UNET = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
             "augment_dim": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shapes data and, for Diff-Instruct, a tiny EDM teacher checkpoint (float32, one step)."""
    import lightning as L

    from diffusion_transfer.data import DiffusionDataModule
    from diffusion_transfer.methods import EDMDiffusion

    tmp = tmp_path_factory.mktemp("reliability")
    make_shapes(tmp / "shapes.zip", resolution=16, per_class=4, seed=0)
    teacher = EDMDiffusion(arch_overrides=TINY_UNET, num_classes=20, resolution=16, val_num_images=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(teacher, DiffusionDataModule(str(tmp / "shapes.zip"), batch_size=16))
    trainer.save_checkpoint(tmp / "teacher.ckpt")
    return {"data": tmp / "shapes.zip", "teacher": tmp / "teacher.ckpt"}


def write_config(folder: Path, model: dict, data: Path, ema: dict) -> Path:
    """A fit of STEPS steps in float32 that saves ``last.ckpt`` after every optimizer step."""
    config = {
        "seed_everything": 0, "model": model, "ema": ema,
        "data": {"class_path": "DiffusionDataModule", "init_args": {"path": str(data), "batch_size": 16}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "precision": "32-true",
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(folder), "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(folder / "ckpt"), "save_last": True, "save_top_k": 0,
                                       "every_n_train_steps": 1}}]},
    }
    path = folder / "fit.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_transfer", "fit", "--config", str(config), *extra]


def saved_step(path: Path) -> int:
    """The global step of ``path``, or -1 while it does not exist (it is written atomically, so never partial)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except FileNotFoundError:
        return -1


def kill_at(config: Path, step: int, env: dict) -> int:
    """Run the fit of ``config`` plus a callback that SIGKILLs it mid-step once it has saved ``step`` (the resume then
    runs ``config`` as it is); return the step its last checkpoint holds."""
    spec = yaml.safe_load(config.read_text())
    spec["trainer"]["callbacks"].append({"class_path": "tests.sigkill.SigkillAt", "init_args": {"step": step}})
    killing = config.with_name("killing.yaml")
    killing.write_text(yaml.safe_dump(spec))
    result = subprocess.run(command(killing), env={**env, "PYTHONPATH": str(REPO)}, cwd=config.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"the fit was not killed: {result.stderr[-2000:]}"
    return saved_step(config.parent / "ckpt" / "last.ckpt")


def fit_settings(method: str, files: dict[str, Path]) -> tuple[dict, dict]:
    """The model and EMA settings of the killed fits."""
    if method == "Diffusion":
        return TINY_DIT, {"decay": 0.9}
    # two optimizers, manual optimization: global_step advances by 2 per batch
    return ({"class_path": "DiffInstruct", "init_args": {
        "arch_overrides": TINY_UNET, "checkpoint": str(files["teacher"]), "lr": 1e-3, "glr": 1e-3,
        "val_num_images": 0}}, {"halflife_kimg": 0.05, "submodule": "generator"})


@pytest.fixture(scope="module")
def uninterrupted(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``method -> run folder`` of its uninterrupted fit, run once per method and shared by every kill step."""
    root, done = tmp_path_factory.mktemp("uninterrupted"), {}

    def run_folder(method: str) -> Path:
        if method not in done:
            model, ema = fit_settings(method, files)
            config = write_config(root / method, model, files["data"], ema)
            subprocess.run(command(config), env=ENV, cwd=config.parent, check=True, capture_output=True)
            done[method] = config.parent
        return done[method]

    return run_folder


# 80 images in batches of 16: 5 batches an epoch. Diffusion takes one optimizer step per batch, DiffInstruct two.
# Kills mid-epoch, and right after an epoch's last batch (a checkpoint whose loader state holds the whole epoch:
# before ResumableDataLoader.load_state_dict treated it as a finished epoch, that resume ended 8e-3 away).
@pytest.mark.parametrize(("method", "kill_step"), [("Diffusion", 12), ("DiffInstruct", 14), ("Diffusion", 10),
                                                   ("DiffInstruct", 20)])
def test_sigkill_then_resume_equals_an_uninterrupted_run(method: str, kill_step: int, files: dict[str, Path],
                                                         uninterrupted: Callable[[str], Path],
                                                         tmp_path: Path) -> None:
    model, ema = fit_settings(method, files)
    killed = write_config(tmp_path / "killed", model, files["data"], ema)
    reached = kill_at(killed, kill_step, ENV)
    assert reached == kill_step
    result = subprocess.run(command(killed, "--ckpt_path", "last"), env=ENV, cwd=killed.parent, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(f / "ckpt" / "last.ckpt", weights_only=True) for f in (uninterrupted(method), killed.parent))
    assert a["global_step"] == b["global_step"] == STEPS
    for key in ("state_dict", "ema_raw_state"):  # EMA weights and raw weights
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=1e-6, msg=f"{key}/{name}")
    for first, second in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, state in first["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(second["state"][index][name], value, rtol=0, atol=1e-6)


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    from diffusion_transfer.io.atomic import AtomicCheckpointIO

    writer, path = AtomicCheckpointIO(), tmp_path / "run" / "model.ckpt"
    writer.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)
    before = path.read_bytes()
    original_save = torch.save

    def die_half_way(obj, file, *args, **kwargs):  # the process dies after writing part of the new file
        original_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.ckpt"]  # no temporary file left behind
    writer.save_checkpoint({"global_step": 3}, path)  # a complete save replaces it
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_the_cli_trainer_saves_atomically(shapes_zip: Path, tmp_path: Path) -> None:
    from diffusion_transfer.cli import build_cli
    from diffusion_transfer.io.atomic import AtomicCheckpointIO

    from .test_cli import tiny_config

    cli = build_cli(["--config", str(tiny_config(tmp_path, shapes_zip))], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
