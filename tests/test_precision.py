"""Mixed precision: bf16-mixed fit / resume / validate / predict for every method on CPU, the sampling precision
option, and the CLI's default precision (native-bf16 detection mocked both ways)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from diffusion_transfer import runtime
from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.cli import build_cli
from diffusion_transfer.data import DiffusionDataModule, make_shapes
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.methods import DMP, DiffInstruct, DiffTuning, Diffusion, EDMDiffusion, FineDiffusion
from diffusion_transfer.methods.longtail import CBDM, T2H

from .test_cli import tiny_config
from .test_core import perturb, trainer

DIT = {"arch": "DiT-S/2", "arch_overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}}
UNET = {"arch_overrides": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
                           "dropout": 0.0, "augment_dim": 0}}
COMMON = {"num_classes": 20, "resolution": 16, "channels": 3, "val_num_images": 0}


def quiet_trainer(root: Path, max_steps: int, callbacks=(), precision: str = "bf16-mixed", **kwargs) -> L.Trainer:
    """``tests.test_core.trainer`` (CPU, quiet, no validation) under ``precision``."""
    return trainer(root, max_steps, callbacks, precision=precision, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16x16 shapes (80 images) and tiny float32 source checkpoints: a DiT and an EDM U-Net (the teacher)."""
    tmp = tmp_path_factory.mktemp("precision")
    make_shapes(tmp / "shapes.zip", resolution=16, per_class=4, seed=0)
    files = {"data": tmp / "shapes.zip", "tmp": tmp}
    for name, model in (("dit", Diffusion(**DIT, **COMMON)), ("edm", EDMDiffusion(**UNET, **COMMON))):
        trainer = quiet_trainer(tmp, 1, precision="32-true")
        trainer.fit(model, DiffusionDataModule(str(files["data"]), batch_size=16))
        trainer.save_checkpoint(tmp / f"{name}.ckpt")
        files[name] = tmp / f"{name}.ckpt"
    return files


METHODS = {
    "Diffusion": lambda f: Diffusion(**DIT, **COMMON),
    "DiffTuning": lambda f: DiffTuning(**DIT, **COMMON, checkpoint=str(f["dit"]), replay_bank=str(f["data"])),
    "DMP": lambda f: DMP(**DIT, **COMMON, checkpoint=str(f["dit"])),
    "FineDiffusion": lambda f: FineDiffusion(**DIT, **COMMON, checkpoint=str(f["dit"]), num_superclasses=4,
                                             superclasses=[c // 5 for c in range(20)]),
    "CBDM": lambda f: CBDM(**DIT, **COMMON, class_counts=[4] * 20, sample_steps=4),
    "T2H": lambda f: T2H(**DIT, **COMMON, class_counts=[4] * 20, sample_steps=4),
    "EDMDiffusion": lambda f: EDMDiffusion(**UNET, **COMMON, sample_steps=4),
    "DiffInstruct": lambda f: DiffInstruct(**UNET, **COMMON, checkpoint=str(f["edm"]), lr=1e-3, glr=1e-3),
}


def record_dtypes(model: nn.Module, seen: set[torch.dtype] | None = None) -> set[torch.dtype]:
    """Collect the output dtypes of every Linear/Conv2d of ``model`` (they show whether autocast was on)."""
    seen = set() if seen is None else seen
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def fit(name: str, files: dict[str, Path], root: Path, max_steps: int, ckpt_path: str | None = None,
        seen: set | None = None) -> tuple[L.LightningModule, dict]:
    torch.manual_seed(0)  # same initial weights in every run
    model = METHODS[name](files)
    if seen is not None:
        record_dtypes(model, seen)
    saver = ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    quiet_trainer(root, max_steps, [TrainableEMA(decay=0.8), saver], enable_checkpointing=True).fit(
        model, DiffusionDataModule(str(files["data"]), batch_size=16), ckpt_path=ckpt_path)
    return model, torch.load(root / f"step={max_steps}.ckpt", weights_only=True)


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_fit_resume_validate_predict(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    seen: set[torch.dtype] = set()
    model, straight = fit(name, files, tmp_path / "a", 4, seen=seen)
    assert torch.bfloat16 in seen  # the net really ran under bf16 autocast (the test is not vacuous)
    # Kept in float32: weights, EMA shadows, optimizer state, noise schedule.
    for key in ("state_dict", "ema_raw_state"):
        assert {v.dtype for v in straight[key].values() if v.is_floating_point()} <= {torch.float32, torch.float64}
    for optimizer in straight["optimizer_states"]:
        for state in optimizer["state"].values():
            assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step"), name
    schedule = model.process.state_dict().values() if isinstance(model.process, nn.Module) else []
    assert all(v.dtype in (torch.float32, torch.float64) for v in schedule if v.is_floating_point())
    # Two steps + resume + two steps equals four steps, to the tolerance of the float32 resume test.
    fit(name, files, tmp_path / "b", 2)
    _, resumed = fit(name, files, tmp_path / "b", 4, ckpt_path=str(tmp_path / "b" / "step=2.ckpt"))
    for key in ("state_dict", "ema_raw_state"):
        for param, value in straight[key].items():
            torch.testing.assert_close(resumed[key][param], value, rtol=0, atol=1e-6, msg=f"{key}/{param}")
    assert any(not torch.equal(straight["state_dict"][n], v) for n, v in straight["ema_raw_state"].items())
    # validate / test / predict under bf16-mixed from the trained module.
    data = DiffusionDataModule(str(files["data"]), batch_size=16, val_max_images=16, predict_seeds="0-2")
    trainer = quiet_trainer(tmp_path, 1, limit_val_batches=1, limit_test_batches=1)
    assert trainer.validate(model, data)[0]["val/loss"] == pytest.approx(trainer.validate(model, data)[0]["val/loss"])
    assert torch.isfinite(torch.tensor(trainer.test(model, data)[0]["test/loss"]))
    seen.clear()
    images = torch.cat([out["images"] for out in trainer.predict(model, data)])
    assert torch.bfloat16 in seen and images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()


def test_sample_precision_option(files: dict[str, Path], tmp_path: Path) -> None:
    model = METHODS["Diffusion"](files)
    perturb(model)  # a fresh DiT outputs exactly zero, in any precision
    seen = record_dtypes(model)
    data = DiffusionDataModule(str(files["data"]), batch_size=16, predict_seeds="0-3")
    expected = {"trainer": {torch.float32}, "32": {torch.float32}, "bf16": {torch.bfloat16}}
    for option, dtypes in expected.items():  # outside a Trainer
        model.sample_precision = option
        seen.clear()
        model.sample(2, steps=2)
        assert seen == dtypes, option
    predicted = {}
    for option, dtypes in {"trainer": {torch.bfloat16}, "32": {torch.float32}}.items():  # under a bf16 Trainer
        model.sample_precision = option
        seen.clear()
        predicted[option] = torch.cat([o["images"] for o in quiet_trainer(tmp_path, 1).predict(model, data)])
        assert seen == dtypes, option
    model.sample_precision = "32"
    fp32 = model.sample(seeds=[0, 1, 2, 3])
    torch.testing.assert_close(predicted["32"], fp32, rtol=0, atol=0)  # "32" inside the bf16 Trainer is float32
    model.sample_precision = "bf16"
    bf16 = model.sample(seeds=[0, 1, 2, 3])
    assert not torch.equal(bf16, fp32) and torch.equal(bf16, predicted["trainer"])
    with pytest.raises(ConfigError, match="sample_precision must be one of trainer, 32, bf16"):
        Diffusion(**DIT, **COMMON, sample_precision="fp16")


CPUINFO_X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
CPUINFO_OLD_X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_detection() -> None:
    assert runtime.cpu_has_native_bf16(CPUINFO_X86) and runtime.cpu_has_native_bf16(CPUINFO_ARM)
    assert not runtime.cpu_has_native_bf16(CPUINFO_OLD_X86) and not runtime.cpu_has_native_bf16("")


@pytest.mark.parametrize("native", [True, False])
def test_cli_default_precision_follows_the_cpu(native: bool, shapes_zip: Path, tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_config(tmp_path, shapes_zip)  # sets no trainer.precision, like the shapes configs
    cli = build_cli(["--config", str(config)], run=False)
    expected = "bf16-mixed" if native else "32-true"
    assert cli.trainer.precision == expected
    assert f"precision: {expected} (the CPU " in capsys.readouterr().out
    for explicit in ("32-true", "bf16-mixed"):  # the user's choice always wins
        cli = build_cli(["--config", str(config), "--trainer.precision", explicit], run=False)
        assert cli.trainer.precision == explicit
        assert "precision:" not in capsys.readouterr().out
