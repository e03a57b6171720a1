"""Corrupt files are refused cleanly (issue #20 item 3).

Every kind of file the library reads (our ``.ckpt`` through ``--ckpt_path`` and as a ``checkpoint:``, a feature network
``.ckpt``, an official DiT ``.pt``, a U-Net ``.pt``, an EDM ``.pkl``, a PEFT checkpoint, a reference-statistics
``.npz``, a replay bank), truncated, bit-flipped or carrying a pickled payload, gives one line that names the file and
the fix: the layer's error class from Python, ``diffusion-transfer: error: ...`` and exit status 2 from the CLI. Never
a traceback, a half-loaded model, or advice to load with ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import random
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from diffusion_transfer.cli import main
from diffusion_transfer.data import DatasetError, DiffusionDataModule, make_shapes, write_dataset_zip
from diffusion_transfer.data.replay import ReplayBank
from diffusion_transfer.io.atomic import AtomicCheckpointIO
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.dit_checkpoint import DiTCheckpointError, load_dit_checkpoint
from diffusion_transfer.io.edm_pickle import EDMPickleError, read_edm_pickle
from diffusion_transfer.io.peft_checkpoint import peft_checkpoint_info
from diffusion_transfer.io.unet_checkpoint import UNetCheckpointError, read_unet_state_dict
from diffusion_transfer.methods import DMP, Diffusion, FineDiffusion
from diffusion_transfer.metrics import FeatureClassifier, MetricError, ReferenceStats, load_feature_classifier
from diffusion_transfer.nets import build_dit, build_unet

from .test_cli import tiny_config
from .test_edm import edm_standins, tiny_song, write_edm_pickle  # noqa: F401 - edm_standins is a fixture

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
MODEL = {"arch": "DiT-S/2", "arch_overrides": TINY, "num_classes": 20, "resolution": 16, "channels": 3,
         "val_num_images": 0}
CORRUPTIONS = ["truncated", "bit-flipped", "payload"]
SEEDS = [0, 1]


# ------------------------------------------------------------------------------------------------ damaging files


class Payload:
    """Unpickling this runs ``touch MARKER``: a safe reader must refuse it, and never advise loading it unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _record_spans(data: bytes, suffix: str | None) -> list[tuple[int, int]]:
    """Byte ranges of the stored records of a zip (the data after each local header), those ending in ``suffix``."""
    spans = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if suffix and not info.filename.endswith(suffix):
                continue
            start = info.header_offset
            names = int.from_bytes(data[start + 26:start + 28], "little")
            extra = int.from_bytes(data[start + 28:start + 30], "little")
            begin = start + 30 + names + extra
            if info.compress_size:
                spans.append((begin, begin + info.compress_size))
    return spans


def damage(src: Path, dest: Path, how: str, seed: int = 0, records: str | None = None) -> Path:
    """``dest``: ``src`` cut to 60 % (``truncated``) or with 3 seeded bit flips (``bit-flipped``).

    In a zip (torch files, ``.npz``, dataset zips) the flips land in the stored records (``records``: only those whose
    name ends so), whose CRC-32 the readers check; elsewhere they land anywhere.
    """
    data = bytearray(src.read_bytes())
    if how == "truncated":
        dest.write_bytes(data[: len(data) * 3 // 5])
        return dest
    rng = random.Random(seed)
    spans = _record_spans(bytes(data), records) if zipfile.is_zipfile(io.BytesIO(bytes(data))) else [(0, len(data))]
    for _ in range(3):
        begin, end = rng.choices(spans, weights=[e - b for b, e in spans])[0]
        data[rng.randrange(begin, end)] ^= 1 << rng.randrange(8)
    dest.write_bytes(data)
    return dest


def assert_one_line(message: str, path: Path, fix: str) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert fix in message, message
    assert "weights_only=False" not in message, message


def refused(message: str) -> bool:
    return "refuses" in message and "not from a trusted source" in message


# ------------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-step CLI fit of a tiny DiT: its data and ``last.ckpt``."""
    tmp = tmp_path_factory.mktemp("run")
    make_shapes(tmp / "shapes.zip", resolution=16, per_class=2, seed=0)
    config = tiny_config(tmp, tmp / "shapes.zip", max_steps=1, limit_val_batches=0)
    main(["fit", "--config", str(config)])
    return {"data": tmp / "shapes.zip", "ckpt": tmp / "ckpt" / "last.ckpt"}


def payload_checkpoint(src: Path, dest: Path) -> Path:
    """``src`` with a pickled payload beside its weights (as a tampered download would carry)."""
    checkpoint = torch.load(src, weights_only=True)
    checkpoint["callbacks"] = {"Evil": Payload(dest.with_suffix(".ran"))}
    torch.save(checkpoint, dest)
    return dest


def bad_file(src: Path, tmp_path: Path, how: str, seed: int, records: str | None = None) -> Path:
    dest = tmp_path / f"bad-{how}-{seed}{src.suffix}"
    return payload_checkpoint(src, dest) if how == "payload" else damage(src, dest, how, seed, records)


# ------------------------------------------------------------------------------------------------ (a) our .ckpt


@pytest.mark.parametrize("how,records", [("truncated", None), ("bit-flipped", "data.pkl"),
                                         ("bit-flipped", None), ("payload", None)],
                         ids=["truncated", "flipped-pickle", "flipped-tensors", "payload"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_cli_refuses_a_damaged_ckpt_path(run, tmp_path: Path, capsys, subcommand: str, how: str,
                                         records: str | None) -> None:
    bad = bad_file(run["ckpt"], tmp_path, how, seed=0, records=records)
    config = tiny_config(tmp_path, run["data"], max_steps=1, limit_val_batches=0)  # its own run folders
    writer = ["--writer.output_dir", str(tmp_path / "pred")] if subcommand == "predict" else []
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--ckpt_path", str(bad), *writer])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("diffusion-transfer: error: "), err
    assert_one_line(err[0], bad, "train again")
    assert refused(err[0]) == (how == "payload")
    assert not bad.with_suffix(".ran").exists()


def test_cli_points_a_released_training_file_from_ckpt_path_to_checkpoint(run, tmp_path: Path, capsys) -> None:
    # A released DiT/FineDiffusion train.py file ({model, ema, opt, args: Namespace}) is weights, not a run to resume.
    import argparse

    weights = torch.load(run["ckpt"], weights_only=True)["state_dict"]
    released = tmp_path / "0050000.pt"
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, released)
    config = tiny_config(tmp_path, run["data"], max_steps=1, limit_val_batches=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), "--ckpt_path", str(released)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert_one_line(err[0], released, "--model.init_args.checkpoint")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_cli_refuses_a_damaged_checkpoint_init_arg(run, tmp_path: Path, capsys, how: str) -> None:
    bad = bad_file(run["ckpt"], tmp_path, how, seed=1)
    config = tiny_config(tmp_path, run["data"], max_steps=1, limit_val_batches=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), "--model.init_args.checkpoint", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("diffusion-transfer: error: "), err
    assert_one_line(err[0], bad, "pass another checkpoint")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_python_refuses_a_damaged_ckpt(run, tmp_path: Path, how: str, seed: int) -> None:
    bad = bad_file(run["ckpt"], tmp_path, how, seed)
    model = Diffusion(**MODEL, checkpoint=str(bad))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DiTCheckpointError) as info:  # the `checkpoint:` init arg
        model.load_pretrained()
    assert_one_line(str(info.value), bad, "pass another checkpoint")
    assert refused(str(info.value)) == (how == "payload")
    with pytest.raises(CheckpointError) as info:  # what Lightning calls for --ckpt_path
        AtomicCheckpointIO().load_checkpoint(bad)
    assert_one_line(str(info.value), bad, "train again")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not bad.with_suffix(".ran").exists()


def test_a_trainer_with_the_checkpoint_io_restores_nothing_from_a_damaged_ckpt(run, tmp_path: Path) -> None:
    bad = damage(run["ckpt"], tmp_path / "bad.ckpt", "bit-flipped", seed=2)  # in the tensors: only a CRC sees it
    model = Diffusion(**MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    with pytest.raises(CheckpointError, match="could not be read as a checkpoint"):
        trainer.validate(model, DiffusionDataModule(str(run["data"]), batch_size=8), ckpt_path=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_ckpt_that_does_not_fit_is_refused_before_any_weight_is_copied(run, tmp_path: Path, capsys) -> None:
    # What a flipped bit in a shape would give, were it not for the CRC: weights of another size.
    wide = {"arch_overrides": {"hidden_size": 64, "depth": 2, "num_heads": 2}}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(tiny_config(tmp_path, run["data"])), "--ckpt_path", str(run["ckpt"]),
              "--model.init_args.arch_overrides", "{hidden_size: 64, depth: 2, num_heads: 2}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("diffusion-transfer: error: "), err
    assert_one_line(err[0], run["ckpt"], "do not fit")
    assert "net.pos_embed: file (1, 64, 32) vs model (1, 64, 64)" in err[0]
    model = Diffusion(**{**MODEL, **wide})
    state = torch.load(run["ckpt"], weights_only=True)["state_dict"]
    state["net.t_embedder.mlp.0.weight"] = model.state_dict()["net.t_embedder.mlp.0.weight"] + 1  # the one that fits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape-different"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # all or nothing


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_feature_network_is_a_metric_error(tmp_path: Path, how: str) -> None:
    classifier = FeatureClassifier(num_classes=4, resolution=16, width=8, num_features=8)
    good = tmp_path / "features.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, good)
    assert load_feature_classifier(good).num_features == 8
    bad = bad_file(good, tmp_path, how, seed=0)
    with pytest.raises(MetricError) as info:
        load_feature_classifier(bad)
    assert_one_line(str(info.value), bad, "configs/features")
    assert refused(str(info.value)) == (how == "payload")


# ------------------------------------------------------------------------------------------------ (b) DiT .pt


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_dit_file_is_refused_and_the_model_untouched(tmp_path: Path, how: str, seed: int) -> None:
    net = build_dit("DiT-S/2", input_size=16, num_classes=20, **TINY)
    good = tmp_path / "DiT-tiny.pt"
    torch.save({"model": net.state_dict(), "ema": net.state_dict()}, good)
    if how == "payload":  # DiT's train.py stores `args` beside the weights: here something that runs code
        bad = tmp_path / "DiT-payload.pt"
        torch.save({"ema": net.state_dict(), "args": Payload(tmp_path / "ran")}, bad)
    else:
        bad = damage(good, tmp_path / "DiT-bad.pt", how, seed)
    target = build_dit("DiT-S/2", input_size=16, num_classes=20, **TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DiTCheckpointError) as info:
        load_dit_checkpoint(target, bad)
    assert_one_line(str(info.value), bad, "pass another checkpoint")
    assert ("trusted_globals" in str(info.value)) == (how == "payload")
    assert refused(str(info.value)) == (how == "payload")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_unet_file_is_refused(tmp_path: Path, how: str) -> None:
    net = build_unet("ddpm-cifar10", model_channels=16, num_blocks=1, min_channels_per_group=4)
    good = tmp_path / "ckpt_100.pt"
    torch.save({"ema_model": net.state_dict()}, good)
    if how == "payload":
        bad = tmp_path / "payload.pt"
        torch.save({"ema_model": net.state_dict(), "args": Payload(tmp_path / "ran")}, bad)
    else:
        bad = damage(good, tmp_path / "ckpt_bad.pt", how, seed=0)
    with pytest.raises(UNetCheckpointError) as info:
        read_unet_state_dict(bad)
    assert_one_line(str(info.value), bad, "pass another checkpoint")
    assert refused(str(info.value)) == (how == "payload")


# ------------------------------------------------------------------------------------------------ (c) EDM .pkl


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_edm_pickle_is_refused(tmp_path: Path, edm_standins, how: str) -> None:  # noqa: F811
    net, kwargs = tiny_song()
    good = tmp_path / "edm-tiny.pkl"
    write_edm_pickle(good, net, kwargs, edm_standins)
    if how == "payload":
        # A nested storage blob that is itself a malicious pickle: the restricted unpickler allows the storage hook,
        # whose safe torch.load must refuse the blob.
        bad = tmp_path / "edm-payload.pkl"
        bad.write_bytes(_edm_with_blob(Payload(tmp_path / "ran")))
        with pytest.raises(EDMPickleError) as info:
            read_edm_pickle(bad)
        assert_one_line(str(info.value), bad, "pass another network pickle")
        assert refused(str(info.value)) and "storage blob" in str(info.value) and ".system" in str(info.value)
        assert not (tmp_path / "ran").exists()
        return
    if how == "truncated":
        bad = damage(good, tmp_path / "edm-bad.pkl", how)
        with pytest.raises(EDMPickleError) as info:
            read_edm_pickle(bad)
        assert_one_line(str(info.value), bad, "pass another network pickle")
        return
    # An EDM pickle has no checksum: a flip in a tensor's bytes is invisible to any reader. A flip in the structure
    # must give the one-line error; count that some of the seeded files did.
    errors = 0
    for seed in range(30):
        bad = damage(good, tmp_path / f"edm-flipped-{seed}.pkl", how, seed)
        try:
            read_edm_pickle(bad)
        except EDMPickleError as err:
            assert_one_line(str(err), bad, "pass another network pickle")
            errors += 1
        bad.unlink()
    assert errors >= 3


def _edm_with_blob(payload: Payload) -> bytes:
    """An EDM-like pickle whose ``ema`` is ``torch.storage._load_from_bytes(<a pickle of payload>)``."""
    import pickle

    class Blob:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(payload, protocol=2),)  # as torch.save writes

    return pickle.dumps({"ema": Blob()})


# ------------------------------------------------------------------------------------------------ (d) PEFT


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_peft_checkpoint_is_refused(tmp_path: Path, how: str) -> None:
    net = build_dit("DiT-S/2", input_size=16, num_classes=20, **TINY)
    base = tmp_path / "base.pt"
    torch.save(net.state_dict(), base)
    good = tmp_path / "peft.ckpt"  # the layout of a PEFT checkpoint: trained tensors plus the record of the base
    torch.save({"state_dict": {"net.final_layer.linear.bias": torch.zeros(24)}, "hyper_parameters": {},
                "peft": {"base": str(base), "trained": ["net.final_layer.linear.bias"], "fingerprint": {},
                         "stored_parameters": 24, "total_parameters": 100}}, good)
    bad = bad_file(good, tmp_path, how, seed=0)
    for load in (lambda: FineDiffusion.load_with_base(bad, base=base), lambda: peft_checkpoint_info(bad)):
        with pytest.raises(CheckpointError) as info:
            load()
        assert_one_line(str(info.value), bad, "train again")
        assert refused(str(info.value)) == (how == "payload")
    # A DMP whose base is damaged: the process check skips the unreadable file, the base load refuses it.
    model = DMP(**MODEL, checkpoint=str(bad_file(base, tmp_path, how, seed=1)))
    with pytest.raises(DiTCheckpointError) as info:
        model.load_pretrained()
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


# ------------------------------------------------------------------------------------------------ (e) reference .npz


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_reference_npz_is_a_metric_error(tmp_path: Path, how: str) -> None:
    rng = np.random.default_rng(0)
    good = ReferenceStats(mu=rng.normal(size=8), sigma=np.eye(8), num_images=10, feature_network="classifier-x",
                          class_counts=np.arange(4)).save(tmp_path / "ref.npz")
    if how == "payload":  # an object array: numpy would unpickle it with allow_pickle=True
        bad = tmp_path / "ref-payload.npz"
        np.savez(bad, mu=np.zeros(8), sigma=np.array([Payload(tmp_path / "ran")], dtype=object))
    else:
        bad = damage(good, tmp_path / "ref-bad.npz", how, seed=0)
    with pytest.raises(MetricError) as info:
        ReferenceStats.load(bad)
    assert_one_line(str(info.value), bad, "computed again")
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------------------ (f) replay bank


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_replay_bank_is_a_dataset_error(tmp_path: Path, how: str) -> None:
    # A bank is a dataset zip (`predict --writer.zip_path`); DiffTuning opens it in setup and reads it every step.
    if how == "payload":  # a latent bank whose .npy entries hold pickled objects instead of float arrays
        bank = tmp_path / "bank-payload.zip"
        write_dataset_zip(bank, [(np.zeros((8, 4, 4), np.float32), None)] * 4, latents=True,
                          extra={"latents": {"scale": 0.18215, "channels": 4, "resolution": 4}})
        _replace_npy(bank, np.array([Payload(tmp_path / "ran")], dtype=object))
        channels, resolution = 4, 4
    else:
        make_shapes(tmp_path / "bank.zip", resolution=8, per_class=1, seed=0)
        bank = damage(tmp_path / "bank.zip", tmp_path / "bank-bad.zip", how, seed=0, records=".png")
        channels, resolution = 3, 8
    torch.manual_seed(0)
    with pytest.raises(DatasetError) as info:
        ReplayBank(bank, resolution=resolution, channels=channels, xflip=False).draw(256)
    assert_one_line(str(info.value), bank, "bank.yaml")
    assert not (tmp_path / "ran").exists()


def _replace_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, buffer.getvalue() if name.endswith(".npy") else data)
