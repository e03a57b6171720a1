"""FineDiffusion: selection rule counts, frozen tensors, tiered dropout, superclass guidance, PEFT checkpoints,
hierarchy errors, DiffFit γ, iNat annotations, 8-colour shapes and a tiny CLI fit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from diffusion_transfer import DiffusionDataModule, FineDiffusion, TrainableEMA
from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.data import DatasetError, make_shapes
from diffusion_transfer.data.archive import ImageCollection
from diffusion_transfer.data.shapes import render_shapes, shapes_classes
from diffusion_transfer.data.sources import read_inat_annotations
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.dit_checkpoint import DiTCheckpointError, read_dit_state_dict
from diffusion_transfer.io.label_table import LabelLayout
from diffusion_transfer.io.peft_checkpoint import checkpoint_bytes, peft_checkpoint_info
from diffusion_transfer.nets import build_dit
from diffusion_transfer.nets.class_embedder import TieredLabelEmbedder, install_tiered_embedder
from diffusion_transfer.nets.dit import DiT
from diffusion_transfer.nets.peft import parameter_groups, select_trainable

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
_TABLE = "y_embedder.embedding_table.weight"
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]


def tiny_dit(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(**{"input_size": 8, "patch_size": 2, "in_channels": 3, "num_classes": 10, **TINY, **kw})


def tiny_model(**kw) -> FineDiffusion:
    args = dict(arch="DiT-S/2", arch_overrides=TINY, num_classes=32, resolution=8, channels=3, num_superclasses=4,
                superclasses=[c // 8 for c in range(32)], sample_steps=2, sampler="ddim")
    return FineDiffusion(**{**args, **kw})


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


# ---------------------------------------------------------------------------------------------- selection rule

def test_selection_counts_on_a_small_dit_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    d, depth, c, p, n, s, tokens = 32, 2, 3, 2, 10, 3, 16  # 8x8 input, patch 2 -> 16 tokens
    out = p * p * 2 * c  # learned sigma: 2C channels per pixel of a patch
    net = tiny_dit(norm_affine=True)
    install_tiered_embedder(net, s, [i % s for i in range(n)])
    total = (depth * (18 * d * d + 15 * d + 4 * d)  # qkv, proj, fc1, fc2, adaLN (weights, biases), 2 affine LNs
             + c * p * p * d + d + 256 * d + d + d * d + d + (n + s) * d + tokens * d  # embedders, table, pos
             + 2 * d + d * out + out + d * 2 * d + 2 * d)  # final LN, linear, adaLN
    fine = select_trainable(net, "finediffusion")
    per_block = 3 * d + d + 4 * d + d + 6 * d + 4 * d  # qkv, proj, fc1, fc2, adaLN biases + norm1/norm2 affine
    expected = depth * per_block + 3 * d + (2 * d + out + 2 * d) + (n + s) * d
    assert (fine.trainable, fine.total) == (expected, total) and expected == 1880
    assert "blocks.0.attn.qkv.weight" not in fine.names and "blocks.1.norm2.weight" in fine.names
    assert "pos_embed" not in fine.names and "y_embedder.embedding_table.weight" in fine.names
    assert not any(pp.requires_grad for name, pp in net.named_parameters() if name not in fine.names)

    plain = tiny_dit()  # LN without affine: BitFit = the 15 D block biases, 3 D embedder biases, final biases, table
    bitfit = select_trainable(plain, "bitfit")
    assert bitfit.trainable == depth * 15 * d + 3 * d + out + 2 * d + (n + 1) * d
    difffit = select_trainable(tiny_dit(branch_scales=1), "difffit")  # γ_msa, γ_mlp in block 0 only
    assert difffit.trainable == bitfit.trainable + 2 * d
    assert {k for k in difffit.names if "gamma" in k} == {"blocks.0.gamma_msa", "blocks.0.gamma_mlp"}
    full = select_trainable(plain, "full")
    assert full.trainable == full.total - tokens * d  # everything but the fixed pos_embed
    share = f"{100 * expected / total:.4f}%"  # 1,880 of 4,864 + (10 + 3) * 32 + ...: computed, not read back
    assert str(fine) == f"trainable parameters: 1,880 of {total:,} ({share})"
    select_trainable(net, "finediffusion", verbose=True)
    assert capsys.readouterr().out.strip() == f"finediffusion: trainable parameters: 1,880 of {total:,} ({share})"
    with pytest.raises(ConfigError, match="unknown trainable preset 'lora'"):
        select_trainable(plain, "lora")
    # A preset whose defining group is empty would silently be BitFit: refused.
    with pytest.raises(ConfigError, match="'bias_norm' trains LayerNorm affine.*exactly BitFit's tensors"):
        select_trainable(plain, "bias_norm")
    with pytest.raises(ConfigError, match="'difffit' trains DiffFit branch scales"):
        select_trainable(plain, "difffit")


def test_the_method_logs_its_selection(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        model = tiny_model()
    trainable = sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.net.parameters())
    expected = f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
    assert f"FineDiffusion peft=finediffusion: {expected}" in caplog.text
    # biases + LN affine + the 36-row table of a 2-block, width-32 DiT with 8x8 inputs, by hand
    assert trainable == 2 * 19 * 32 + 3 * 32 + (2 * 32 + 24 + 2 * 32) + 36 * 32


def test_dit_xl2_shape_table_counts_on_meta() -> None:
    with torch.device("meta"):
        xl = build_dit("DiT-XL/2", num_classes=10000, norm_affine=True)
        install_tiered_embedder(xl, 11)
        stock = build_dit("DiT-XL/2")
    fine = select_trainable(xl, "finediffusion")
    assert (fine.trainable, fine.total) == (12_153_632, 685_640_480)  # spec §2.4 / test 1
    assert round(100 * fine.share, 4) == 1.7726
    assert fine.trainable - 10_011 * 1152 == 620_960
    assert sum(p.numel() for p in stock.parameters()) == 675_129_632
    biases = parameter_groups(stock)["bias"]
    assert sum(p.numel() for k, p in stock.named_parameters() if k in biases) == 489_632  # BitFit's biases
    # A rule by substring would also catch modules merely *named* like a norm; ours goes by module type.
    stock.blocks[0].attn.q_norm_scale = nn.Parameter(torch.ones(4, device="meta"))
    assert "blocks.0.attn.q_norm_scale" not in parameter_groups(stock)["norm"]


# ---------------------------------------------------------------------------------------------- frozen tensors

def test_non_selected_tensors_never_change_and_get_no_gradient() -> None:
    model = randomize(tiny_model())
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    trained = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    optimizer = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 32, (8,), generator=gen)
        optimizer.zero_grad()
        model.loss((x, y))["loss"].backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
    assert all(torch.equal(p, frozen[k]) for k, p in model.named_parameters() if k in frozen)
    changed = [k for k, p in model.named_parameters() if k in trained and not torch.equal(p, trained[k])]
    assert "net.y_embedder.embedding_table.weight" in changed and "net.blocks.0.norm1.weight" in changed
    assert "net.blocks.0.attn.qkv.weight" in frozen


# ---------------------------------------------------------------------------------------------- tiered dropout

def test_tiered_dropout_swaps_about_ten_percent_to_the_superclass_row() -> None:
    pi = [c // 8 for c in range(32)]
    emb = TieredLabelEmbedder(32, 4, 16, pi).train()
    torch.manual_seed(0)
    labels = torch.randint(0, 32, (200_000,))
    before = labels.clone()
    out = emb.drop_labels(labels)
    assert torch.equal(labels, before)  # never mutated in place
    swapped = out != labels
    assert abs(swapped.double().mean().item() - 0.1) < 0.004  # sd sqrt(.09 / 2e5) = 0.0007
    assert torch.equal(out[swapped], 32 + torch.tensor(pi)[labels[swapped]])  # exactly N + π(y), nothing else
    assert torch.equal(emb.eval().drop_labels(labels), labels)
    forced = torch.tensor([1, 0, 1])
    assert emb.drop_labels(torch.tensor([3, 9, 31]), forced).tolist() == [32, 9, 35]
    assert emb.embedding_table.num_embeddings == 36 and emb.null_index is None
    assert abs(emb.embedding_table.weight.std().item() - 0.02) < 0.005  # fresh N(0, 0.02²), superclass rows too
    with pytest.raises(ValueError, match="no unconditional row"):
        emb.drop_labels(torch.tensor([-1]))
    # Ours: an optional ∅ row trained on a further share of labels.
    with_null = TieredLabelEmbedder(32, 4, 16, pi, null_dropout_prob=0.05).train()
    out = with_null.drop_labels(labels)
    assert with_null.null_index == 36 and abs((out == 36).double().mean().item() - 0.05) < 0.003
    assert abs(((out >= 32) & (out < 36)).double().mean().item() - 0.1) < 0.004


# ---------------------------------------------------------------------------------------------- guidance

class HandNet(nn.Module):
    """A denoiser whose output is known: every pixel of every channel k is (label + 1) * (k + 1) + x."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.y_embedder, self.calls = embedder, []

    @property
    def null_label(self):
        return self.y_embedder.null_index

    def forward(self, x, t, y):
        self.calls.append(y.clone())
        k = torch.arange(1, 7, dtype=x.dtype).view(1, 6, 1, 1)
        return torch.cat([x, x], 1) + (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * k


def test_superclass_guidance_formula_on_a_hand_made_denoiser() -> None:
    model = tiny_model()
    model.net = HandNet(model.net.y_embedder)
    y = torch.tensor([0, 9, 31])
    sup = 32 + y // 8  # superclass tokens N + π(y)
    x, t = torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long)
    for scale, channels in ((4.0, None), (2.5, 2)):
        model.net.calls.clear()
        out = model.guided_denoiser(y, scale, channels)(x, t)
        assert len(model.net.calls) == 1 and torch.equal(model.net.calls[0], torch.cat([y, sup]))  # one pass
        cond, anchor = HandNet.forward(model.net, x, t, y), HandNet.forward(model.net, x, t, sup)
        k = 3 if channels is None else channels  # learned variance: only the ε channels are guided
        assert torch.allclose(out[:, :k], anchor[:, :k] + scale * (cond[:, :k] - anchor[:, :k]))
        assert torch.equal(out[:, k:], cond[:, k:])  # unguided channels: the subclass half's own output
    model.net.calls.clear()
    assert torch.equal(model.guided_denoiser(y, 1.0, None)(x, t), HandNet.forward(model.net, x, t, y))
    assert torch.equal(model.net.calls[0], y)  # s = 1: plain subclass conditioning, no doubled batch
    with pytest.raises(ValueError, match="plain CFG needs an unconditional"):
        model.generate(torch.randn(3, 3, 8, 8), y, [torch.Generator()] * 3, guidance="cfg")
    # With the optional ∅ row, plain CFG runs through the parent's path on the same model: [y; ∅].
    cfg = tiny_model(null_dropout_prob=0.05, guidance="cfg")
    cfg.net = HandNet(cfg.net.y_embedder)
    cfg.guided_denoiser(y, 4.0, None)(x, t)
    assert cfg.net.calls[0].tolist() == [0, 9, 31, -1, -1, -1]
    images = tiny_model().sample(labels=[0, 31], seeds=[0, 1], guidance="superclass")
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------- base, hierarchy

def test_loading_the_base_keeps_its_function_and_names_the_new_keys(tmp_path: Path) -> None:
    base = randomize(build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=20, **TINY))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    for peft in ("finediffusion", "difffit"):
        model = tiny_model(peft=peft, checkpoint=str(tmp_path / "base.pt"))
        model.load_weights(str(tmp_path / "base.pt"))
        assert set(model._not_in_base) == {f"net.{k}" for k in model.net.state_dict() if k not in base.state_dict()
                                          or k == "y_embedder.embedding_table.weight"}
        with torch.no_grad():  # a fine row copied from a base row: LN affine (1, 0) / γ = 1 keep the function
            model.net.y_embedder.embedding_table.weight[5] = base.y_embedder.embedding_table.weight[7]
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
        assert torch.allclose(model.net.eval()(x, t, torch.tensor([5, 5])), base.eval()(x, t, torch.tensor([7, 7])),
                              atol=1e-6)
    broken = {k: v for k, v in base.state_dict().items() if k != "blocks.1.mlp.fc1.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(DiTCheckpointError, match="blocks.1.mlp.fc1.weight"):
        tiny_model().load_weights(str(tmp_path / "broken.pt"))


def test_hierarchy_errors_are_clear(shapes_zip: Path) -> None:
    with pytest.raises(ValueError, match="class 1 has no superclass"):
        tiny_model(num_classes=3, superclasses=[0, -1, 1])
    with pytest.raises(ValueError, match="3 entries for 32 classes"):
        tiny_model(superclasses=[0, 1, 2])
    with pytest.raises(ValueError, match="only 4 superclass rows; set num_superclasses to at least 6"):
        tiny_model(superclasses=[5] * 32)
    unsized = tiny_model(superclasses=None, num_superclasses=None)  # the table waits for the data's hierarchy
    with pytest.raises(ValueError, match="tiered table is not built yet"):
        unsized.embedder.superclass_token(torch.tensor([0]))
    with pytest.raises(DatasetError, match="FineDiffusion needs a class -> superclass map"):
        unsized.setup("fit")  # no data module, no map
    # The shapes data (20 classes, shape = superclass) against a model built with another map.
    data = DiffusionDataModule(shapes_zip)
    model = tiny_model(num_classes=20, resolution=16, superclasses=[c % 4 for c in range(20)])
    with pytest.raises(DatasetError, match="inconsistent with the model's: class 1 has superclass 0 there but 1"):
        model.set_superclasses(data.superclass_of, "the shapes data")
    fresh = tiny_model(num_classes=20, superclasses=None)
    fresh.set_superclasses(data.superclass_of)
    assert fresh.embedder.class_to_super.tolist() == [c // 5 for c in range(20)]
    with pytest.raises(ValueError, match="not set"):
        tiny_model(superclasses=None).embedder.superclass_token(torch.tensor([0]))
    with pytest.raises(ValueError, match="superclass guidance needs the tiered table"):
        tiny_model(tiered=False)


class OnAccelerator(torch.Tensor):
    """A CPU tensor that reports a CUDA device: code that checks only CPU tensors skips it."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def test_an_unset_superclass_map_is_caught_on_any_device() -> None:
    emb = TieredLabelEmbedder(8, 2, 4)  # map unset: every entry -1, which would index token N - 1 = 7
    labels = torch.tensor([0, 3, 7]).as_subclass(OnAccelerator)
    assert labels.device.type == "cuda"
    with pytest.raises(ValueError, match=r"map is not set \(class 0 has none\)"):
        emb.superclass_token(labels)
    emb.class_to_super[:5] = torch.tensor([0, 1, 0, 1, 1])  # classes 5..7 still unset
    with pytest.raises(ValueError, match=r"class 7 has none"):
        emb.superclass_token(torch.tensor([1, 7]).as_subclass(OnAccelerator))
    with pytest.raises(ValueError, match="class labels 0..7, got -1..8"):
        emb.superclass_token(torch.tensor([-1, 8]).as_subclass(OnAccelerator))
    emb.set_superclasses([0, 1, 0, 1, 1, 0, 0, 1])
    assert emb.superclass_token(labels).tolist() == [8, 9, 9]  # N + π(y)


def _with_metadata(source: Path, dest: Path, **changes) -> Path:
    """A copy of the dataset zip ``source`` whose dataset.json has ``changes``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "dataset.json":
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(item, data)
    return dest


def test_hierarchy_errors_from_dataset_json_name_the_class(shapes_zip: Path, tmp_path: Path) -> None:
    meta = json.loads(zipfile.ZipFile(shapes_zip).read("dataset.json"))
    sup, names = meta["superclasses"], meta["class_names"]
    assert len(sup) == len(names) == 20
    short = _with_metadata(shapes_zip, tmp_path / "short.zip", superclasses=sup[:-1])
    with pytest.raises(DatasetError, match="superclasses has 19 entries for 20 classes"):
        ImageCollection.open(short)
    unset = _with_metadata(shapes_zip, tmp_path / "unset.zip", superclasses=[*sup[:3], -1, *sup[4:]])
    with pytest.raises(DatasetError, match=rf"class 3 \('{names[3]}'\) has superclass -1; superclass indices are "
                                           rf"0..{len(meta['superclass_names']) - 1}"):
        ImageCollection.open(unset)
    beyond = _with_metadata(shapes_zip, tmp_path / "beyond.zip", superclasses=[*sup[:-1], 9])
    with pytest.raises(DatasetError, match=rf"class 19 \('{names[19]}'\) has superclass 9"):
        ImageCollection.open(beyond)


def test_a_non_dit_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FineDiffusion fine-tunes a DiT.*'ddpm-cifar10' is not one"):
        FineDiffusion(arch="ddpm-cifar10", num_classes=10, resolution=32, num_superclasses=2)
    with pytest.raises(ConfigError, match="'finediffusion' trains LayerNorm affine"):
        tiny_model(arch_overrides={**TINY, "norm_affine": False})
    with pytest.raises(ConfigError, match="'difffit' trains DiffFit branch scales"):
        tiny_model(peft="difffit", difffit_depth=0)


def test_difffit_trains_at_ten_times_the_learning_rate_unless_an_optimizer_is_given() -> None:
    def lr(model: FineDiffusion) -> float:
        return model.configure_optimizers().param_groups[0]["lr"]

    assert lr(tiny_model(peft="difffit")) == 1e-3  # spec §6 / test 7: 10x DiT's 1e-4
    assert lr(tiny_model()) == lr(tiny_model(peft="bitfit")) == lr(tiny_model(peft="full")) == 1e-4
    given = tiny_model(peft="difffit", optimizer=lambda params: torch.optim.AdamW(params, lr=5e-4))
    assert lr(given) == 5e-4


def test_a_config_without_optimizer_gets_the_preset_lr(base_and_data: dict[str, Path], tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs/finediffusion/shapes.yaml").read_text())
    del config["model"]["init_args"]["optimizer"]  # as configs/finediffusion/inat21_dit_xl2.yaml
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "config.yaml"), *CPU, "--model.init_args.arch", "DiT-S/2",
              "--model.init_args.arch_overrides", yaml.safe_dump(TINY), "--data.init_args.path",
              str(base_and_data["data"]), "--trainer.default_root_dir", str(tmp_path)]
    for peft, lr in (("finediffusion", 1e-4), ("difffit", 1e-3)):
        cli = build_cli([*common, "--model.init_args.peft", peft], run=False)
        assert cli.model.configure_optimizers().param_groups[0]["lr"] == lr


def test_inat_annotation_file_gives_classes_and_superclasses(tmp_path: Path) -> None:
    cats = [{"id": 0, "name": "worm", "supercategory": "Animalia"}, {"id": 1, "name": "oak", "supercategory": "Plants"},
            {"id": 2, "name": "fern", "supercategory": "Plants"}]
    (tmp_path / "train_mini" / "x").mkdir(parents=True)
    images = []
    for i in range(3):
        render = render_shapes(np.array([i]), 8, "filled", np.random.default_rng(i))[0]
        from PIL import Image

        Image.fromarray(render).save(tmp_path / "train_mini" / "x" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"train_mini/x/{i}.png"})
    ann = [{"id": i, "image_id": 10 + i, "category_id": [2, 0, 1][i]} for i in range(3)]
    path = tmp_path / "train_mini.json"
    path.write_text(json.dumps({"images": images, "annotations": ann, "categories": cats}))
    collection = read_inat_annotations(path)
    # Superclasses ordered by species count (Plants: 2, Animalia: 1), as the released checkpoints' ids.
    assert collection.classes.superclass_names == ["Plants", "Animalia"]
    assert collection.classes.superclasses == [1, 0, 0] and collection.labels.tolist() == [2, 0, 1]
    assert collection.load(0).size == (8, 8)
    cats[0]["supercategory"] = ""
    path.write_text(json.dumps({"images": images, "annotations": ann, "categories": cats}))
    with pytest.raises(DatasetError, match="category 'worm' has no supercategory"):
        read_inat_annotations(path)


def test_eight_colour_shapes_extend_the_default_palette(tmp_path: Path) -> None:
    classes = shapes_classes(8)
    assert len(classes.class_names) == 32 and classes.superclasses == [c // 8 for c in range(32)]
    assert classes.class_names[5] == "orange circle" and classes.class_names[8] == "red square"
    # Class (shape, colour) draws the same image whatever the palette size, for colours both palettes have.
    five = render_shapes(np.array([0, 6, 13]), 16, "outline", np.random.default_rng(3))  # (0,0) (1,1) (2,3)
    eight = render_shapes(np.array([0, 9, 19]), 16, "outline", np.random.default_rng(3), colours=8)
    assert np.array_equal(five, eight)
    with pytest.raises(DatasetError, match="colours must be in 1..8"):
        make_shapes(tmp_path / "x.zip", colours=9)


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("finediffusion")
    make_shapes(tmp / "shapes8.zip", resolution=8, per_class=2, seed=0, colours=8)
    base = randomize(build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=20, **TINY))
    torch.save(base.state_dict(), tmp / "base.pt")
    return {"tmp": tmp, "data": tmp / "shapes8.zip", "base": tmp / "base.pt"}


def fit(model: FineDiffusion, data: Path, steps: int, folder: Path, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=[TrainableEMA(decay=0.5)], logger=False, limit_val_batches=0,
                        enable_progress_bar=False, default_root_dir=folder, accelerator="cpu", devices=1,
                        enable_model_summary=False)
    trainer.fit(model, DiffusionDataModule(data, batch_size=16), ckpt_path=ckpt_path)
    return trainer


def test_peft_checkpoint_holds_only_trained_tensors_and_reloads_exactly(base_and_data: dict[str, Path],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    tmp, base = base_and_data["tmp"], base_and_data["base"]
    model = tiny_model(checkpoint=str(base), superclasses=None)
    trainer = fit(model, base_and_data["data"], 3, tmp / "a")
    path = tmp / "peft.ckpt"
    with caplog.at_level(logging.INFO):
        trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k for k, _ in model.named_buffers() if k in model.state_dict()}
    assert set(stored["state_dict"]) == trained | buffers  # fresh table, LN affine, biases (+ buffers)
    assert set(stored["ema_raw_state"]) == trained
    info = peft_checkpoint_info(path)
    numel = sum(model.get_parameter(k).numel() for k in trained)
    assert info["peft"] and info["stored_parameters"] == numel
    assert info["stored_share"] < 0.2 and info["base"] == str(base.resolve())
    # Sizes: the weights are 4 bytes per trained element (+ the int64 map); the file also holds AdamW's two
    # moments and one step scalar per tensor, the EMA's raw weights (4x the weights, not 1x) and the
    # ModelCheckpoint's kth_value scalar.
    weights = 4 * numel + 8 * 32
    whole = weights + 4 * numel * 3 + 4 * len(trained) + 4
    assert checkpoint_bytes(stored["state_dict"]) == weights and checkpoint_bytes(stored) == whole
    assert whole <= info["bytes"] < whole + 64 * 1024  # the rest: pickle and zip headers
    assert f"({weights:,} bytes) of weights; with the optimizer and EMA state the file holds " in caplog.text
    assert f"({whole:,} bytes) of tensors" in caplog.text
    # Passing this file as the base (instead of --ckpt_path) says what to do, not "N missing keys".
    with pytest.raises(DiTCheckpointError, match=r"is a parameter-efficient checkpoint.*--ckpt_path.*load_with_base"):
        tiny_model().load_weights(str(path))

    reloaded = FineDiffusion.load_from_checkpoint(path)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([1, 300, 600, 999]), torch.tensor([0, 7, 8, 31])
    with torch.no_grad():
        assert torch.equal(reloaded.net.eval()(x, t, y), model.net.eval()(x, t, y))
    assert reloaded.embedder.class_to_super.tolist() == [c // 8 for c in range(32)]  # the map came from the data
    # Resuming the fit restores the raw weights and keeps the base frozen.
    resumed = tiny_model(checkpoint=str(base), superclasses=None)
    fit(resumed, base_and_data["data"], 4, tmp / "b", ckpt_path=str(path))
    assert torch.equal(resumed.net.blocks[1].mlp.fc1.weight, model.net.blocks[1].mlp.fc1.weight)
    # checkpoint null: the base comes from the checkpoint's record, so the no-base check must not refuse it.
    unconfigured = tiny_model(superclasses=None)
    fit(unconfigured, base_and_data["data"], 4, tmp / "c", ckpt_path=str(path))
    assert torch.equal(unconfigured.net.blocks[1].mlp.fc1.weight, model.net.blocks[1].mlp.fc1.weight)

    other = randomize(build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=20, **TINY), seed=1)
    torch.save(other.state_dict(), tmp / "other.pt")
    for base_file, error in ((tmp / "other.pt", "not the base this PEFT checkpoint was trained from"),
                             (tmp / "gone.pt", "base checkpoint of this parameter-efficient checkpoint is missing")):
        edited = torch.load(path, weights_only=True)
        edited["peft"]["base"] = edited["hyper_parameters"]["checkpoint"] = str(base_file)
        torch.save(edited, tmp / "edited.ckpt")
        with pytest.raises(CheckpointError, match=error):
            FineDiffusion.load_from_checkpoint(tmp / "edited.ckpt")
    # The last edit records a missing base: re-attaching to a copy of the real one restores the model.
    with torch.no_grad():
        copied = FineDiffusion.load_with_base(tmp / "edited.ckpt", base=base).net.eval()(x, t, y)
        assert torch.equal(copied, model.net(x, t, y))


def test_the_data_sizes_the_tiered_table_and_checkpoints_keep_it(base_and_data: dict[str, Path]) -> None:
    tmp = base_and_data["tmp"]
    model = tiny_model(checkpoint=str(base_and_data["base"]), superclasses=None, num_superclasses=None)
    trainer = fit(model, base_and_data["data"], 1, tmp / "sized")  # 32 classes of 8 colours, 4 shape superclasses
    assert model.embedder.num_superclasses == 4 and model.net.y_embedder.embedding_table.weight.shape[0] == 36
    assert model.hparams["num_superclasses"] == 4 and model.hparams["superclasses"] == [c // 8 for c in range(32)]
    assert model.selection.trainable < model.selection.total  # the preset chose again, with the tiered table
    assert model.net.y_embedder.embedding_table.weight.requires_grad
    trainer.save_checkpoint(tmp / "sized.ckpt")
    reloaded = FineDiffusion.load_from_checkpoint(tmp / "sized.ckpt")  # no data: the table from the hyper-parameters
    assert torch.equal(reloaded.net.y_embedder.embedding_table.weight, model.net.y_embedder.embedding_table.weight)


def test_a_peft_fit_without_base_fails_before_its_first_step(base_and_data: dict[str, Path]) -> None:
    model = tiny_model(superclasses=None)  # frozen tensors, so its checkpoints would refer to a base
    with pytest.raises(CheckpointError, match="refers to its base weights, but this run has no base checkpoint"):
        fit(model, base_and_data["data"], 3, base_and_data["tmp"] / "nobase")
    assert model.trainer.global_step == 0
    full = tiny_model(peft="full", superclasses=None)  # stores everything: no base needed
    assert fit(full, base_and_data["data"], 1, base_and_data["tmp"] / "full").global_step == 1


def test_a_finediffusion_base_keeps_its_tiered_table_but_never_its_map(tmp_path: Path) -> None:
    donor = randomize(tiny_model())  # π(c) = c // 8
    torch.save(donor.net.state_dict(), tmp_path / "donor.pt")
    model = tiny_model(superclasses=[c % 4 for c in range(32)])
    model.load_weights(str(tmp_path / "donor.pt"))
    assert torch.equal(model.net.y_embedder.embedding_table.weight, donor.net.y_embedder.embedding_table.weight)
    assert torch.equal(model.net.blocks[0].norm1.weight, donor.net.blocks[0].norm1.weight)
    assert model.embedder.class_to_super.tolist() == [c % 4 for c in range(32)]  # the model's own map
    assert model._not_in_base == ["net.y_embedder.class_to_super"]
    # Another table shape (5 superclasses: 37 rows, not 36): fresh rows, the rest loaded.
    other = tiny_model(num_superclasses=5)
    fresh = other.net.y_embedder.embedding_table.weight.detach().clone()
    other.load_weights(str(tmp_path / "donor.pt"))
    assert torch.equal(other.net.y_embedder.embedding_table.weight, fresh)
    assert torch.equal(other.net.blocks[1].attn.qkv.weight, donor.net.blocks[1].attn.qkv.weight)
    # A flat baseline's table is always fresh (the paper's rule), even when a DiT's table has its shape.
    dit = randomize(build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=32, **TINY))
    torch.save(dit.state_dict(), tmp_path / "dit32.pt")
    flat = tiny_model(tiered=False, guidance="cfg", peft="bitfit")
    fresh = flat.net.y_embedder.embedding_table.weight.detach().clone()
    assert fresh.shape == dit.y_embedder.embedding_table.weight.shape
    flat.load_weights(str(tmp_path / "dit32.pt"))
    assert torch.equal(flat.net.y_embedder.embedding_table.weight, fresh)
    # One superclass: a flat DiT table (32 classes + ∅ = 33 rows) has the tiered shape, but it is no tiered table
    # (the file has no superclass map), so it is not kept either.
    one = tiny_model(num_superclasses=1, superclasses=[0] * 32)
    assert one.net.y_embedder.embedding_table.weight.shape == dit.y_embedder.embedding_table.weight.shape
    one.load_weights(str(tmp_path / "dit32.pt"))
    table = one.net.y_embedder.embedding_table.weight
    assert not torch.equal(table, dit.y_embedder.embedding_table.weight)
    assert abs(table.std().item() - 0.02) < 0.004  # a fresh N(0, 0.02²) table
    assert torch.equal(one.net.blocks[1].attn.qkv.weight, dit.blocks[1].attn.qkv.weight)


def test_a_base_of_another_width_names_the_mismatch(tmp_path: Path) -> None:
    wide = build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=20, hidden_size=48, depth=2, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"(?s)x_embedder\.proj\.weight: file \(48, 3, 2, 2\) vs model "
                                              r"\(32, 3, 2, 2\).*the file looks like: .*hidden_size=48"):
        tiny_model().load_weights(str(tmp_path / "wide.pt"))


# ---------------------------------------------------------------------------------------------- released checkpoints

class RunsCode:
    """Unpickling this would run ``touch MARKER``: the DiT loader must refuse it (and never run it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def original_file(path: Path, model: nn.Module, ema: nn.Module, **args) -> dict[str, torch.Tensor]:
    """Write ``path`` in the original train.py's layout: {model, ema, opt, args}, no superclass map, args a Namespace;
    returns the EMA state as written."""
    def plain(net: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in net.state_dict().items() if k != "y_embedder.class_to_super"}

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(1, 3, 8, 8), torch.tensor([5]), torch.tensor([3])).sum().backward()
    opt.step()  # a real optimizer state: per-tensor moments and steps, param_groups with tuples and floats
    namespace = argparse.Namespace(model="DiT-S/2", image_size=8, num_classes=32, num_super_classes=4, epochs=100,
                                   global_batch_size=3, global_seed=0, vae="mse", resume="DiT-S-2.pt", **args)
    torch.save({"model": plain(model), "ema": plain(ema), "opt": opt.state_dict(), "args": namespace}, path)
    return plain(ema)


def test_an_original_checkpoint_loads_through_checkpoint_with_the_writers_forward(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = randomize(tiny_model(), seed=3)  # what the original trained: LN affine, 32 + 4 rows, π(c) = c // 8
    ema = randomize(tiny_model(), seed=4)
    path = tmp_path / "0005000.pt"
    written = original_file(path, writer.net, ema.net)
    saved = torch.load(path, weights_only=False)  # the test's own file: check it has the original's layout
    assert set(saved) == {"model", "ema", "opt", "args"} and isinstance(saved["args"], argparse.Namespace)
    assert "y_embedder.class_to_super" not in saved["ema"] and saved["ema"][_TABLE].shape == (36, 32)
    # Before: the Namespace was refused, and without a map the 36 rows read as 35 classes + ∅ and were made fresh.
    x, t = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 250, 500, 750, 999])
    y = torch.tensor([0, 9, 31, 32, 35])  # fine classes and superclass tokens N + s
    for part, source in (("ema", ema), ("model", writer)):
        model = tiny_model(checkpoint=str(path), checkpoint_part=part)
        with caplog.at_level(logging.INFO):
            model.load_pretrained()  # how `checkpoint:` loads in every stage's setup
        with torch.no_grad():
            assert torch.equal(model.net.eval()(x, t, y), source.net.eval()(x, t, y))
            guided = model.guided_denoiser(y[:3], 4.0, 3)(x[:3], t[:3])  # superclass guidance: [y; N + π(y)]
            assert torch.equal(guided, source.guided_denoiser(y[:3], 4.0, 3)(x[:3], t[:3]))
        fit = model.label_table_fit
        assert (fit.kept, fit.fresh, fit.file) == (36, 0, LabelLayout(32, 4))
        assert f"{path} (part: {part}): the file's class table has no superclass map but exactly this tiered " \
               "shape (32 classes + 4 superclass rows = 36 rows) and the hierarchy has 4 superclasses, so it is " \
               "read as this tiered table" in caplog.text
        assert model._not_in_base == ["net.y_embedder.class_to_super"]  # table, LN affine: all from the file
    # reinit still starts fresh, whatever the file holds; the rest loads, and the forward differs (the bug).
    fresh = tiny_model(checkpoint=str(path), label_table="reinit")
    table = fresh.net.y_embedder.embedding_table.weight.detach().clone()
    fresh.load_pretrained()
    assert torch.equal(fresh.net.y_embedder.embedding_table.weight, table)
    assert not torch.equal(table, written[_TABLE])
    assert torch.equal(fresh.net.blocks[1].attn.qkv.weight, written["blocks.1.attn.qkv.weight"])
    with torch.no_grad():
        assert not torch.allclose(fresh.net.eval()(x, t, y), ema.net.eval()(x, t, y), atol=1e-3)
    with pytest.raises(ConfigError, match="checkpoint_part must be one of ema, model, got 'opt'"):
        tiny_model(checkpoint_part="opt")


def test_one_superclass_needs_label_table_tiered_and_a_wrong_shape_is_named(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    # With S = 1 the tiered shape (32 + 1 rows) is also a flat DiT's (32 classes + ∅): read as flat unless told.
    one = dict(num_superclasses=1, superclasses=[0] * 32)
    writer = randomize(tiny_model(**one), seed=5)
    path = tmp_path / "one.pt"
    original_file(path, writer.net, writer.net)
    model = tiny_model(**one, checkpoint=str(path))
    table = model.net.y_embedder.embedding_table.weight.detach().clone()
    with caplog.at_level(logging.INFO):
        model.load_pretrained()
    assert torch.equal(model.net.y_embedder.embedding_table.weight, table)  # the paper's fresh table
    assert "read as flat; set label_table tiered if it is a FineDiffusion table" in caplog.text
    with pytest.raises(DiTCheckpointError, match=r"one.pt: the checkpoint is for 32 classes, 8×8×3, this model for 32 "
                                                 r"classes \+ 1 superclass row, .*, or tiered if the file holds"):
        tiny_model(**one, checkpoint=str(path), label_table="strict").load_pretrained()
    told = tiny_model(**one, checkpoint=str(path), label_table="tiered")
    told.load_pretrained()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3, 400, 900]), torch.tensor([0, 31, 32])
    with torch.no_grad():
        assert torch.equal(told.net.eval()(x, t, y), writer.net.eval()(x, t, y))
    # `tiered` with a file of another shape (4 superclasses: 36 rows) names both sizes; a flat model refuses it.
    four = tmp_path / "four.pt"
    original_file(four, tiny_model().net, tiny_model().net)
    with pytest.raises(DiTCheckpointError, match=r"four.pt: label_table tiered reads .* \(32 classes \+ 1 superclass "
                                                 r"row = 33 rows\), but it has 36 rows; build the model"):
        tiny_model(**one, checkpoint=str(four), label_table="tiered").load_pretrained()
    with pytest.raises(ConfigError, match="label_table tiered .* but tiered is false"):
        tiny_model(tiered=False, guidance="cfg", label_table="tiered")
    with pytest.raises(ConfigError, match="label_table must be one of strict, reuse, reinit, tiered"):
        tiny_model(label_table="keep")


def test_a_namespace_is_read_as_data_and_any_other_global_is_refused(tmp_path: Path) -> None:
    net = tiny_model().net
    path = tmp_path / "args.pt"
    original_file(path, net, net)
    state, source = read_dit_state_dict(path)  # no trusted_globals needed
    assert source == "ema" and set(state) == set(net.state_dict()) - {"y_embedder.class_to_super"}
    marker = tmp_path / "ran"
    for name, args in (("payload", RunsCode(marker)), ("nested", argparse.Namespace(f=os.system))):
        bad = tmp_path / f"{name}.pt"
        torch.save({"ema": state, "args": args}, bad)
        model = tiny_model(checkpoint=str(bad))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(DiTCheckpointError) as info:
            model.load_pretrained()
        message = str(info.value)
        assert "\n" not in message and str(bad) in message and "system" in message  # names the refused global
        assert "refuses" in message and "weights_only=False" not in message
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not marker.exists()


def test_every_finediffusion_config_guides_the_originals_three_channels() -> None:
    for config in sorted((REPO / "configs/finediffusion").glob("*.yaml")):
        assert yaml.safe_load(config.read_text())["model"]["init_args"]["guidance_channels"] == 3, config.name
    # On the shapes config's RGB data (3 ε channels + 3 learned-variance ones) 3 is every ε channel: the same
    # function as null ("all"); the variance half comes from the subclass half either way.
    model = tiny_model()
    model.net = HandNet(model.net.y_embedder)
    y, x, t = torch.tensor([0, 9, 31]), torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long)
    three, every = model.guided_denoiser(y, 4.0, 3)(x, t), model.guided_denoiser(y, 4.0, None)(x, t)
    assert torch.equal(three, every)
    assert not torch.equal(three, model.guided_denoiser(y, 4.0, 2)(x, t))  # the count matters where it is < C


def test_tiny_cli_fit_and_predict(base_and_data: dict[str, Path], tmp_path: Path) -> None:
    ckpt = yaml.safe_dump([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": str(tmp_path), "filename": "fd"}}])
    common = ["--config", str(REPO / "configs/finediffusion/shapes.yaml"), *CPU, "--model.init_args.arch", "DiT-S/2",
              "--model.init_args.arch_overrides", yaml.safe_dump(TINY), "--data.init_args.path",
              str(base_and_data["data"]), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *common, "--model.init_args.checkpoint", str(base_and_data["base"]), "--data.init_args.batch_size",
          "8", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--model.init_args.val_num_images", "0",
          "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.callbacks", ckpt])
    assert peft_checkpoint_info(tmp_path / "fd.ckpt")["peft"]
    main(["predict", *common, "--ckpt_path", str(tmp_path / "fd.ckpt"), "--model.init_args.checkpoint", "null",
          "--model.init_args.sample_steps", "2", "--data.init_args.predict_seeds", "0-3",
          "--writer.output_dir", str(tmp_path / "out"), "--trainer.callbacks", "[]"])
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
