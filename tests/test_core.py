"""Core: the Diffusion method on the base module, TrainableEMA, resume, sampling, the CLI."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.data import DiffusionDataModule
from diffusion_transfer.diffusion import GaussianDiffusion
from diffusion_transfer.io.dit_checkpoint import DiTCheckpointError
from diffusion_transfer.methods import Diffusion

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def tiny_model(**kwargs) -> Diffusion:
    defaults = {"arch": "DiT-S/2", "arch_overrides": TINY, "num_classes": 20, "resolution": 16, "channels": 3,
                "sample_steps": 8, "val_num_images": 0}
    return Diffusion(**{**defaults, **kwargs})


def trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root,
               "limit_val_batches": 0, "enable_checkpointing": False}
    return L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    """Random weights everywhere (a fresh DiT outputs exactly zero, which hides label effects)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ------------------------------------------------------------------------------------------------ training


def test_loss_decreases_on_shapes(shapes_zip: Path, tmp_path: Path) -> None:
    from functools import partial

    model = tiny_model(optimizer=partial(torch.optim.AdamW, lr=2e-3), learn_sigma=False)
    recorder = LossRecorder()
    trainer(tmp_path, 100, [recorder]).fit(model, DiffusionDataModule(str(shapes_zip), batch_size=32))
    first, last = recorder.losses[:20], recorder.losses[-20:]
    assert sum(last) / 20 < 0.6 * sum(first) / 20, (first, last)


def test_unlabelled_data_trains_with_null_labels(tmp_path: Path) -> None:
    from diffusion_transfer.data import write_dataset_zip

    from .helpers import random_images

    write_dataset_zip(tmp_path / "u.zip", ((im, None) for im in random_images(16, size=16)))
    dm = DiffusionDataModule(str(tmp_path / "u.zip"), batch_size=8)
    model = tiny_model(num_classes=dm.num_classes)
    trainer(tmp_path, 2).fit(model, dm)
    assert model.sample(2).shape == (2, 3, 16, 16)


def test_frozen_parameters_never_change_and_never_reach_the_optimizer(shapes_zip: Path, tmp_path: Path) -> None:
    model = tiny_model()
    model.net.blocks[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.net.blocks[0].named_parameters()}
    optimizer = model.configure_optimizers()
    handed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert handed == {id(p) for p in model.parameters() if p.requires_grad}
    assert not handed & {id(p) for p in model.net.blocks[0].parameters()}
    trainer(tmp_path, 5, [TrainableEMA(decay=0.5)]).fit(model, DiffusionDataModule(str(shapes_zip), batch_size=16))
    for name, p in model.net.blocks[0].named_parameters():
        assert torch.equal(p, frozen[name]), name


def test_nan_loss_stops_with_step_and_hint(shapes_zip: Path, tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    monkeypatch.setattr(model, "loss", lambda batch: {"loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(FloatingPointError, match=r"at step 0; lower the learning rate"):
        trainer(tmp_path, 3).fit(model, DiffusionDataModule(str(shapes_zip), batch_size=16))


def _fit_with_checkpoint(data: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> dict:
    torch.manual_seed(0)  # same initial weights in every run
    model = tiny_model(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    saver = ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=4)
    trainer(root, max_steps, [TrainableEMA(decay=0.8), saver], enable_checkpointing=True).fit(
        model, DiffusionDataModule(str(data), batch_size=16), ckpt_path=ckpt_path)
    return torch.load(root / f"step={max_steps}.ckpt", weights_only=True)


def test_resume_equals_uninterrupted_run(shapes_zip: Path, tmp_path: Path) -> None:
    # 160 images / batch 16 = 10 steps per epoch: the resume at step 4 is mid-epoch.
    straight = _fit_with_checkpoint(shapes_zip, tmp_path / "a", 8)
    _fit_with_checkpoint(shapes_zip, tmp_path / "b", 4)
    resumed = _fit_with_checkpoint(shapes_zip, tmp_path / "b", 8, ckpt_path=str(tmp_path / "b" / "step=4.ckpt"))
    for key in ("state_dict", "ema_raw_state"):  # EMA weights, raw weights
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=1e-6, msg=f"{key}/{name}")
    for index, state in straight["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed["optimizer_states"][0]["state"][index][name], state[name],
                                       rtol=0, atol=1e-6)
    # The EMA really differs from the raw weights (the test would be vacuous otherwise).
    assert any(not torch.equal(straight["state_dict"][n], v) for n, v in straight["ema_raw_state"].items())


# ------------------------------------------------------------------------------------------------ EMA


class _Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_ema_decay_math_tracks_trainable_only() -> None:
    module, ema = _Toy(), TrainableEMA(decay=0.9)
    ema.on_fit_start(SimpleNamespace(global_step=0), module)
    assert list(ema.shadow) == ["trained"]
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, -1.0], start=1):
        module.trained.data.fill_(value)
        ema.on_train_batch_end(SimpleNamespace(global_step=step, world_size=1, accumulate_grad_batches=1),
                               module, None, torch.zeros(4, 1), 0)
        expected = 0.9 * expected + 0.1 * value
    torch.testing.assert_close(ema.shadow["trained"], expected)
    # A second call within the same optimizer step (gradient accumulation) does not update again.
    ema.on_train_batch_end(SimpleNamespace(global_step=3, world_size=1, accumulate_grad_batches=1),
                           module, None, torch.zeros(4, 1), 0)
    torch.testing.assert_close(ema.shadow["trained"], expected)


def test_ema_halflife_with_rampup() -> None:
    ema = TrainableEMA(halflife_kimg=0.5, rampup_ratio=0.05)
    ema.images_seen = 2000  # ramp-up caps the half-life at 0.05 * 2000 = 100 images
    assert ema.current_decay(64) == pytest.approx(0.5 ** (64 / 100))
    ema.images_seen = 10**6  # past the ramp-up: 500 images
    assert ema.current_decay(64) == pytest.approx(0.5 ** (64 / 500))


def test_ema_weights_are_in_checkpoints_and_load_from_checkpoint(shapes_zip: Path, tmp_path: Path) -> None:
    checkpoint = _fit_with_checkpoint(shapes_zip, tmp_path, 4)
    assert set(checkpoint["ema_raw_state"]) == {n for n, p in tiny_model().named_parameters() if p.requires_grad}
    loaded = Diffusion.load_from_checkpoint(tmp_path / "step=4.ckpt")  # weights_only=True by default
    for name, value in loaded.state_dict().items():
        if name in checkpoint["ema_raw_state"]:
            assert torch.equal(value, checkpoint["state_dict"][name])


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_per_seed_and_batch_independent(sampler: str) -> None:
    model = tiny_model(sampler=sampler, guidance_scale=3.0)
    perturb(model)
    images = model.sample(seeds=[5, 6, 7], labels=[0, 1, 2])
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1.0
    alone = model.sample(seeds=[6], labels=[1])
    # Batched matmuls reassociate sums, so allow float32 round-off (a different seed changes pixels by O(1)).
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-4)
    assert torch.equal(model.sample(seeds=[5, 6, 7], labels=[0, 1, 2]), images)
    assert not torch.allclose(model.sample(seeds=[5], labels=[3]), images[:1])  # the label matters
    assert not torch.allclose(model.sample(seeds=[5], labels=[0], guidance_scale=1.0), images[:1])


def test_per_sample_generators_match_single_draws() -> None:
    process = GaussianDiffusion(num_timesteps=50, variance="fixedsmall")
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = torch.stack([torch.randn(2, 4, 4, generator=g) for g in gens])
    batch = process.ddpm_sample(model_fn, noise=noise, generator=gens)
    g = torch.Generator().manual_seed(2)
    single = process.ddpm_sample(model_fn, noise=torch.randn(1, 2, 4, 4, generator=g), generator=[g])
    torch.testing.assert_close(single[0], batch[1])


def test_predict_rejects_labels_outside_the_model() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the model's classes 0..19"):
        model.predict_step((torch.tensor([0]), torch.tensor([20])), 0)
    with pytest.raises(ValueError, match="outside the model's classes"):
        model.sample(seeds=[0], labels=[25])


def test_checkpoint_of_another_size_names_file_and_keys(tmp_path: Path) -> None:
    other = tiny_model(arch_overrides={**TINY, "hidden_size": 48})
    torch.save(other.net.state_dict(), tmp_path / "other.pt")
    model = tiny_model(checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(DiTCheckpointError, match="other.pt") as err:
        model.load_pretrained()
    assert "x_embedder.proj.weight" in str(err.value) or "pos_embed" in str(err.value)
    torch.save(tiny_model().net.state_dict(), tmp_path / "same.pt")
    ok = tiny_model(checkpoint=str(tmp_path / "same.pt"))
    ok.load_pretrained()


def test_unknown_model_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="DiT-XL/2"):
        tiny_model(arch="DiT-M/2")


def test_each_sampler_uses_its_own_timestep_spacing() -> None:
    model = tiny_model()
    seen: list[int] = []
    forward = model.net.forward
    model.net.forward = lambda x, t, y, **kw: (seen.append(int(t[0])), forward(x, t, y, **kw))[1]
    model.sample(1, sampler="ddpm", steps=10)
    ddpm, seen[:] = sorted(seen), []
    model.sample(1, sampler="ddim", steps=10)
    assert sorted(seen) == list(range(0, 1000, 100))  # DDIM's even stride
    assert ddpm[0] == 0 and ddpm[-1] == 999 and len(ddpm) == 10  # IDDPM spacing keeps both ends


def test_predict_and_validate_from_checkpoint_use_ema_weights(shapes_zip: Path, tmp_path: Path) -> None:
    checkpoint = _fit_with_checkpoint(shapes_zip, tmp_path, 4)
    model = tiny_model()
    loader = DiffusionDataModule(str(shapes_zip), batch_size=16, predict_seeds="0-1").predict_dataloader()
    trainer(tmp_path, 1, [TrainableEMA()]).predict(model, loader, ckpt_path=tmp_path / "step=4.ckpt")
    for name in checkpoint["ema_raw_state"]:
        assert torch.equal(model.state_dict()[name], checkpoint["state_dict"][name]), name


def test_fit_after_load_from_checkpoint_keeps_its_weights(shapes_zip: Path, tmp_path: Path) -> None:
    torch.save(tiny_model().net.state_dict(), tmp_path / "pretrained.pt")
    model = tiny_model(checkpoint=tmp_path / "pretrained.pt")  # a Path: stored as str in hparams
    assert model.hparams.checkpoint == str(tmp_path / "pretrained.pt")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="tuned")
    trainer(tmp_path, 2, [saver], enable_checkpointing=True).fit(model, DiffusionDataModule(shapes_zip, batch_size=16))
    (tmp_path / "pretrained.pt").unlink()  # continuing must not need (or reload) the initial weights
    tuned = Diffusion.load_from_checkpoint(tmp_path / "tuned.ckpt")
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    trainer(tmp_path, 0).fit(tuned, DiffusionDataModule(str(shapes_zip), batch_size=16))
    for name, value in tuned.named_parameters():
        assert torch.equal(value, before[name]), name


def test_micro_batches_of_one_step_draw_different_noise() -> None:
    from diffusion_transfer.methods.base import _step_seed

    seeds = {_step_seed(0, step, rank, micro) for step in range(3) for rank in range(2) for micro in range(4)}
    assert len(seeds) == 24


def test_training_metrics_reach_the_logger(shapes_zip: Path, tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger, recorder = CSVLogger(tmp_path, name="run"), LossRecorder()
    trainer(tmp_path, 6, [recorder], logger=logger, log_every_n_steps=2).fit(
        tiny_model(), DiffusionDataModule(str(shapes_zip), batch_size=16))
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # every log_every_n_steps, none missing
    for row in rows:  # each written value is that step's loss, not a stale one from an earlier step
        assert float(row["train/loss"]) == pytest.approx(recorder.losses[int(row["step"])], rel=1e-6)


# ------------------------------------------------------------------------------------------------ final checkpoint


class _Interrupt(L.Callback):
    """Stop the fit the way Ctrl-C does, after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_final_checkpoint_appears_only_when_the_fit_completes(shapes_zip: Path, tmp_path: Path) -> None:
    from diffusion_transfer.callbacks import FinalCheckpoint

    final = tmp_path / "stage" / "model.ckpt"
    saver = ModelCheckpoint(dirpath=tmp_path / "run", filename="last", every_n_train_steps=2)
    # Interrupted after 4 of 6 steps: the run folder has a resumable checkpoint, the stage's file does not exist.
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        trainer(tmp_path, 6, [TrainableEMA(decay=0.5), saver, FinalCheckpoint(str(final)), _Interrupt(4)],
                enable_checkpointing=True).fit(tiny_model(), DiffusionDataModule(str(shapes_zip), batch_size=16))
    assert (tmp_path / "run" / "last.ckpt").exists() and not final.exists()
    # Resumed to the end: now it appears, with the finished step count and the EMA weights.
    model = tiny_model()
    trainer(tmp_path, 6, [TrainableEMA(decay=0.5), FinalCheckpoint(str(final))]).fit(
        model, DiffusionDataModule(str(shapes_zip), batch_size=16), ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    saved = torch.load(final, weights_only=True)
    assert saved["global_step"] == 6 and "ema_raw_state" in saved
    for name, value in model.state_dict().items():  # the module holds the EMA weights after fit
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=0, atol=0)
    # An early stop by a callback (should_stop) before max_steps is no completed stage either.
    final.unlink()

    class _Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            trainer.should_stop = trainer.global_step >= 2

    trainer(tmp_path, 6, [FinalCheckpoint(str(final)), _Stop()]).fit(
        tiny_model(), DiffusionDataModule(str(shapes_zip), batch_size=16))
    assert not final.exists()


def test_clip_denoised_defaults_by_space_and_reaches_the_sampler(monkeypatch) -> None:
    from diffusion_transfer.methods.longtail import LongTailDDPM

    assert tiny_model().sampling["clip_denoised"] is True  # pixels: x̂₀ clamped, as ADM samples pixel models
    assert tiny_model(vae="some/folder").sampling["clip_denoised"] is False  # latents are unbounded (DiT)
    assert tiny_model(clip_denoised=False).sampling["clip_denoised"] is False
    longtail = LongTailDDPM(arch="DiT-S/2", arch_overrides=TINY, num_classes=20, resolution=16, class_counts=[1] * 20)
    assert longtail.sampling["clip_denoised"] is False  # the CBDM / T2H samplers do not clip inside the loop
    model = tiny_model(learn_sigma=False)  # (a wild learned variance would overflow the DDPM noise)
    perturb(model, scale=0.5)  # an untrained, wild net: its x̂₀ leaves [-1, 1] at high noise
    seen = []
    original = GaussianDiffusion.p_mean_variance

    def record(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((kwargs.get("clip_denoised"), float(out["pred_x0"].abs().max())))
        return out

    monkeypatch.setattr(GaussianDiffusion, "p_mean_variance", record)
    for sampler in ("ddim", "ddpm"):
        seen.clear()
        model.sample(2, sampler=sampler, steps=4)
        assert seen and all(clip is True and peak <= 1.0 for clip, peak in seen), sampler
        seen.clear()
        model.sample(2, sampler=sampler, steps=4, clip_denoised=False)
        assert max(peak for _, peak in seen) > 1.0, sampler  # the clamp above was not vacuous
