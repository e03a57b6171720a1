"""One ``label_table`` option (strict | reuse | reinit) puts any checkpoint-starting method onto any label space.

For each method family, a tiny checkpoint of K classes is loaded into a model of M != K classes (M < K and M > K):
``strict`` refuses with one line naming the option, ``reuse`` keeps the first class entries and the null row exactly
(new entries are the model's own fresh ones), ``reinit`` keeps no entry of the file, and every other weight is the
file's. A checkpoint for data of another size is one line with the right numbers and the conversion to run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.data import make_shapes
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.dit_checkpoint import DiTCheckpointError, load_dit_checkpoint
from diffusion_transfer.io.label_table import LabelLayout, fit_label_table
from diffusion_transfer.methods import (
    CBDM,
    DMP,
    T2H,
    DiffInstruct,
    DiffTuning,
    Diffusion,
    EDMDiffusion,
    FineDiffusion,
)
from diffusion_transfer.nets.dit import build_dit

from .helpers import TINY_DIT, TINY_UNET

REPO = Path(__file__).resolve().parents[1]
DIT, DDPM_UNET = TINY_DIT, TINY_UNET
EDM_UNET = {"arch": "ddpmpp-cifar10", "arch_overrides": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                                         "attn_resolutions": [4], "dropout": 0.0, "augment_dim": 0}}
K = 6  # classes of every checkpoint


@dataclass
class Family:
    """How to build a method of M classes and where its label table lies."""

    build: Callable[..., nn.Module]
    key: str  # the table, as a key of model.state_dict()
    axis: int = 0  # 0: one row per class (DiT), 1: one column per class (U-Net map_label)
    null: bool = True  # a null entry last
    song: bool = False  # EDM's song U-Net: kept columns rescaled by √(K / M)

    def model(self, classes: int, **kwargs) -> nn.Module:
        return self.build(num_classes=classes, resolution=8, channels=3, val_num_images=0, **kwargs)


def _diff_instruct(**kwargs) -> DiffInstruct:
    return DiffInstruct(**EDM_UNET, **kwargs)


FAMILIES = {
    "Diffusion": Family(lambda **kw: Diffusion(**DIT, **kw), "net.y_embedder.embedding_table.weight"),
    "DMP": Family(lambda **kw: DMP(**DIT, **kw), "net.y_embedder.embedding_table.weight"),
    "DiffTuning": Family(lambda **kw: DiffTuning(**DIT, replay_weight=0.0, **kw),
                         "net.y_embedder.embedding_table.weight"),
    # The flat baseline of FineDiffusion (its tiered table has its own test below).
    "FineDiffusion-flat": Family(lambda **kw: FineDiffusion(**DIT, tiered=False, guidance="cfg", peft="bitfit", **kw),
                                 "net.y_embedder.embedding_table.weight"),
    "T2H-DiT": Family(lambda **kw: T2H(**DIT, class_counts=[1] * kw["num_classes"], **kw),
                      "net.y_embedder.embedding_table.weight"),
    "CBDM-UNet": Family(lambda **kw: CBDM(**DDPM_UNET, class_counts=[1] * kw["num_classes"], **kw),
                        "net.unet.map_label.weight", axis=1, null=False),
    "Diffusion-UNet": Family(lambda **kw: Diffusion(**DDPM_UNET, learn_sigma=False, **kw), "net.unet.map_label.weight",
                             axis=1, null=False),
    "EDMDiffusion": Family(lambda **kw: EDMDiffusion(**EDM_UNET, **kw), "net.map_label.weight", axis=1, null=False,
                           song=True),
}


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every float tensor redrawn, so a file's entries never equal a fresh model's by chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model


def save_checkpoint(model: nn.Module, path: Path, **hyper_parameters) -> dict[str, Tensor]:
    """``model`` as one of our ``.ckpt`` files (keys ``net.*``); returns its state dict."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hyper_parameters}, path)
    return state


def entries(table: Tensor, axis: int) -> Tensor:
    """The table with one entry per row."""
    return table.movedim(axis, 0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Tensor]]]:
    """One K-class checkpoint per family (module scope: built once)."""
    folder = tmp_path_factory.mktemp("label_table")
    out = {}
    for seed, (name, family) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        out[name] = (folder / f"{name}.ckpt", save_checkpoint(randomised(family.model(K), seed + 100),
                                                              folder / f"{name}.ckpt"))
    return out


@pytest.mark.parametrize("classes", [3, 9], ids=["fewer", "more"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_takes_a_checkpoint_of_another_label_space(name: str, classes: int, files) -> None:
    family = FAMILIES[name]
    path, saved = files[name]
    # strict: one line that names the option and the right class counts.
    with pytest.raises(CheckpointError) as info:
        family.model(classes, checkpoint=str(path), label_table="strict").load_pretrained()
    message = str(info.value)
    assert "\n" not in message and "--model.init_args.label_table reuse" in message
    assert f"the checkpoint is for {K} classes, 8×8×3, this model for {classes} classes, 8×8×3" in message

    for policy in ("reuse", "reinit"):
        model = family.model(classes, checkpoint=str(path), label_table=policy)
        fresh = model.state_dict()[family.key].clone()
        model.load_pretrained()
        state = model.state_dict()
        table, theirs, ours = (entries(t, family.axis) for t in (state[family.key], saved[family.key], fresh))
        kept = min(K, classes)
        if policy == "reuse":
            scale = math.sqrt(K / classes) if family.song else 1.0
            torch.testing.assert_close(table[:kept], theirs[:kept] * scale, rtol=0, atol=0)
            assert torch.equal(table[kept:classes], ours[kept:classes])  # new classes: the model's own init
            if family.null:
                assert torch.equal(table[-1], theirs[-1])  # the null row stays the pre-trained one
            assert model.label_table_fit.kept == kept + family.null
            assert model.label_table_fit.fresh == max(classes - K, 0)
        else:
            assert torch.equal(table, ours)  # nothing of the file's table
            assert not any(torch.equal(row, other) for row in table for other in theirs)
        rest = [k for k in saved if k.startswith("net.") and not k.startswith(family.key.rsplit(".", 1)[0])]
        assert rest and all(torch.equal(state[k], saved[k]) for k in rest), name


def test_dmp_trains_a_label_table_with_fresh_rows_only(files) -> None:
    path, _ = files["DMP"]
    table = "net.y_embedder.embedding_table.weight"
    for classes, policy, trains in ((3, "reuse", False), (9, "reuse", True), (3, "reinit", True), (K, "strict", False)):
        model = FAMILIES["DMP"].model(classes, checkpoint=str(path), label_table=policy)
        model.load_pretrained()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert (table in trainable) is trains, (classes, policy)
        assert all(n.startswith("patch.") or n == table for n in trainable)  # the rest of the base stays frozen
        optimizer = model.configure_optimizers()
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert (id(model.get_parameter(table)) in in_optimizer) is trains


def test_diff_instruct_teacher_serves_fewer_classes_but_never_new_ones(tmp_path: Path) -> None:
    teacher = randomised(EDMDiffusion(**EDM_UNET, num_classes=K, resolution=8, val_num_images=0), 5)
    path = tmp_path / "teacher.ckpt"
    saved = save_checkpoint(teacher, path, precond="edm", resolution=8)
    model = _diff_instruct(num_classes=3, resolution=8, val_num_images=0, checkpoint=str(path), label_table="reuse")
    model.load_pretrained()
    columns = model.net.map_label.weight
    torch.testing.assert_close(columns, saved["net.map_label.weight"][:, :3] * math.sqrt(K / 3), rtol=0, atol=0)
    assert torch.equal(model.fake_score.map_label.weight, columns)  # fake score and generator copy the teacher
    assert torch.equal(model.generator.net.map_label.weight, columns)
    with pytest.raises(CheckpointError, match=f"checkpoint is for {K} classes, 8×8×3, this model for 3 classes"):
        _diff_instruct(num_classes=3, resolution=8, checkpoint=str(path), label_table="strict").load_pretrained()
    for classes, policy in ((9, "reuse"), (3, "reinit")):
        with pytest.raises(ConfigError, match="frozen teacher, which cannot learn new classes"):
            _diff_instruct(num_classes=classes, resolution=8, checkpoint=str(path),
                           label_table=policy).load_pretrained()


def test_finediffusion_tiered_table_reuses_class_and_null_rows(files) -> None:
    path, saved = files["Diffusion"]  # a flat DiT: K classes + null
    file_table = saved["net.y_embedder.embedding_table.weight"]
    make = lambda policy: FineDiffusion(**DIT, num_classes=9, resolution=8, val_num_images=0,  # noqa: E731
                                        num_superclasses=2, null_dropout_prob=0.05, checkpoint=str(path),
                                        label_table=policy)
    with pytest.raises(DiTCheckpointError, match=f"checkpoint is for {K} classes, 8×8×3, this model for 9 classes "
                                                 r"\+ 2 superclass rows, 8×8×3; set --model.init_args.label_table"):
        make("strict").load_pretrained()
    model = make("reuse")
    fresh = model.net.y_embedder.embedding_table.weight.detach().clone()  # 9 classes, 2 superclasses, null
    model.load_pretrained()
    table = model.net.y_embedder.embedding_table.weight
    assert torch.equal(table[:K], file_table[:K]) and torch.equal(table[-1], file_table[-1])
    assert torch.equal(table[K:11], fresh[K:11])  # new classes and the superclass rows start fresh
    paper = make(None)  # the default: the paper's fresh table
    fresh = paper.net.y_embedder.embedding_table.weight.detach().clone()
    paper.load_pretrained()
    assert torch.equal(paper.net.y_embedder.embedding_table.weight, fresh)
    assert paper._not_in_base[-1] == "net.y_embedder.embedding_table.weight"


def test_defaults_per_method(files) -> None:
    expected = {"Diffusion": "strict", "DMP": "strict", "T2H-DiT": "strict", "CBDM-UNet": "strict",
                "EDMDiffusion": "strict", "DiffTuning": "reuse", "FineDiffusion-flat": "reinit"}
    for name, default in expected.items():
        assert FAMILIES[name].model(3).label_table == default, name
    assert _diff_instruct(num_classes=3, resolution=8).label_table == "strict"
    assert FAMILIES["FineDiffusion-flat"].model(3).paper_table  # None: the paper's rule (fresh, or a tiered twin)
    with pytest.raises(ConfigError, match="label_table must be one of strict, reuse, reinit, got 'keep'"):
        FAMILIES["Diffusion"].model(3, label_table="keep")


# ------------------------------------------------------------------------------------------------ other data sizes


def test_a_checkpoint_for_another_image_size_is_one_line_with_the_numbers(tmp_path: Path) -> None:
    # 20 classes + null = 21 rows, 16 px: the checkpoint; the data has 10 classes at 8 px.
    big = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, hidden_size=32, depth=2, num_heads=2)
    torch.save(big.state_dict(), tmp_path / "dit16.pt")
    model = Diffusion(**DIT, num_classes=10, resolution=8, checkpoint=str(tmp_path / "dit16.pt"))
    with pytest.raises(DiTCheckpointError) as info:
        model.load_pretrained()
    assert str(info.value) == (
        f"{tmp_path / 'dit16.pt'}: the checkpoint is for 20 classes, 16×16×3, this model for 10 classes, 8×8×3; "
        "convert the data to the checkpoint's size: `diffusion-transfer-data convert SRC DEST --resolution 16`; and "
        "set --model.init_args.label_table reuse (keep the checkpoint's entries of the first classes and its null "
        "row) or reinit (a new table)")
    # Under reuse only the size is left to fix; DiffTuning (reuse by default) says the same.
    expected = (f"{tmp_path / 'dit16.pt'}: the checkpoint is for 20 classes, 16×16×3, this model for 10 classes, "
                "8×8×3; convert the data to the checkpoint's size: `diffusion-transfer-data convert SRC DEST "
                "--resolution 16`")
    for method in (Diffusion(**DIT, num_classes=10, resolution=8, label_table="reuse"),
                   DiffTuning(**DIT, num_classes=10, resolution=8, replay_weight=0.0)):
        with pytest.raises(DiTCheckpointError) as info:
            method.load_weights(str(tmp_path / "dit16.pt"))
        assert str(info.value) == expected
    # Channels: a grey checkpoint for colour data.
    grey = build_dit("DiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    torch.save(grey.state_dict(), tmp_path / "grey.pt")
    with pytest.raises(DiTCheckpointError, match=r"for 10 classes, 8×8×1, this model for 10 classes, 8×8×3; "
                                                 r"convert .* --channels 1`$"):
        Diffusion(**DIT, num_classes=10, resolution=8).load_weights(str(tmp_path / "grey.pt"))
    # A latent checkpoint for pixel data says how to make latents.
    latent = build_dit("DiT-S/2", input_size=4, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    torch.save(latent.state_dict(), tmp_path / "latent.pt")
    with pytest.raises(DiTCheckpointError, match=r"4×4×4 VAE latents: .*--resolution 32`, encode them"):
        Diffusion(**DIT, num_classes=10, resolution=8).load_weights(str(tmp_path / "latent.pt"))


def test_a_unet_checkpoint_for_another_image_size_is_one_line(tmp_path: Path) -> None:
    big = Diffusion(**DDPM_UNET, learn_sigma=False, num_classes=20, resolution=16)
    torch.save({"state_dict": big.state_dict()}, tmp_path / "unet16.ckpt")
    model = Diffusion(**DDPM_UNET, learn_sigma=False, num_classes=20, resolution=8, label_table="reuse")
    with pytest.raises(CheckpointError) as info:
        model.load_weights(str(tmp_path / "unet16.ckpt"))
    assert str(info.value) == (
        f"{tmp_path / 'unet16.ckpt'}: the checkpoint is for 20 classes, 16×16×3, this model for 20 classes, 8×8×3; "
        "convert the data to the checkpoint's size: `diffusion-transfer-data convert SRC DEST --resolution 16`")


def test_an_architecture_mismatch_describes_the_file_as_it_is(tmp_path: Path) -> None:
    # The long listing stays for another width; its description of the file is the file's own table (21 rows),
    # not the table fitted to the model (the bug: "table_rows=11").
    wide = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, hidden_size=48, depth=2, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(DiTCheckpointError) as info:
        DiffTuning(**DIT, num_classes=10, resolution=8, replay_weight=0.0).load_weights(str(tmp_path / "wide.pt"))
    message = str(info.value)
    assert "the file looks like: " in message and "input_size=16, table_rows=21" in message
    assert "hidden_size=48" in message


# ------------------------------------------------------------------------------------------------ the function


def test_fit_label_table_rows_and_columns() -> None:
    theirs, ours = torch.arange(12.0).reshape(6, 2), -torch.ones(4, 2)  # 5 classes + null -> 3 classes + null
    table, fit = fit_label_table("t", theirs, ours, "reuse", LabelLayout(5, null=True), LabelLayout(3, null=True))
    assert table.tolist() == [[0, 1], [2, 3], [4, 5], [10, 11]] and (fit.kept, fit.fresh) == (4, 0)
    assert ours.eq(-1).all()  # the model's tensor is not modified
    columns, fit = fit_label_table("t", theirs.t(), -torch.ones(2, 8), "reuse", LabelLayout(6), LabelLayout(8),
                                   axis=1)
    assert torch.equal(columns[:, :6], theirs.t()) and columns[:, 6:].eq(-1).all() and fit.fresh == 2
    with pytest.raises(ValueError, match="label space"):
        fit_label_table("t", theirs, ours, "strict", LabelLayout(5, null=True), LabelLayout(3, null=True))
    with pytest.raises(ConfigError, match="label_table must be one of strict, reuse, reinit"):
        fit_label_table("t", theirs, ours, "keep", LabelLayout(5, null=True), LabelLayout(3, null=True))


def test_io_loader_default_is_strict_and_reports_the_fit(tmp_path: Path) -> None:
    pre = build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=K, hidden_size=32, depth=2, num_heads=2)
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    small = build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=3, hidden_size=32, depth=2, num_heads=2)
    with pytest.raises(DiTCheckpointError, match="label_table reuse"):
        load_dit_checkpoint(small, tmp_path / "pre.pt")
    report = load_dit_checkpoint(small, tmp_path / "pre.pt", label_table="reuse")
    fit = report.label_table
    assert fit.file == LabelLayout(K, null=True) and fit.model == LabelLayout(3, null=True) and fit.kept == 4


def test_cli_fit_onto_a_new_label_space(tmp_path: Path, capsys) -> None:
    """The issue's run: a 20-class checkpoint, data of 8 classes (`shapes --colours 2`), fine-tuned from the CLI."""
    make_shapes(tmp_path / "eight.zip", resolution=16, per_class=2, seed=0, colours=2)
    pre = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, hidden_size=32, depth=2, num_heads=2)
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    args = ["fit", "--config", str(REPO / "configs/dmp/shapes.yaml"), "--model.init_args.arch", "DiT-S/2",
            "--model.init_args.arch_overrides",
            yaml.safe_dump(DIT["arch_overrides"]), "--model.init_args.checkpoint", str(tmp_path / "pre.pt"),
            "--model.init_args.val_num_images", "0", "--data.init_args.path", str(tmp_path / "eight.zip"),
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
            "--metrics.feature_network", "null"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "the checkpoint is for 20 classes, 16×16×3, this model for 8 classes, 16×16×3; set " in err[0]
    cli = build_cli([*args[1:], "--model.init_args.label_table", "reuse"], run=False)  # exposed on the CLI
    assert cli.model.label_table == "reuse"
    main([*args, "--model.init_args.label_table", "reinit"])  # fits, the fresh table trains with the patch


@pytest.mark.parametrize("family", ["Diffusion", "Diffusion-UNet", "T2H-DiT", "DMP"])
def test_a_checkpoint_of_another_diffusion_process_is_refused(family: str, tmp_path: Path) -> None:
    # A v-prediction source fits an epsilon model's every shape; only the recorded hyper-parameters can tell.
    donor = FAMILIES[family].model(K)
    path = tmp_path / "v.ckpt"
    save_checkpoint(donor, path, **{**dict(donor.hparams), "prediction": "v"})
    with pytest.raises(CheckpointError, match=r"v.ckpt: .*prediction: 'v' there, 'epsilon' here.*"
                                              r"set --model.init_args.prediction v$"):
        FAMILIES[family].model(K, checkpoint=str(path)).setup("fit")
    FAMILIES[family].model(K, checkpoint=str(path), prediction="v").setup("fit")  # the same process: loads
