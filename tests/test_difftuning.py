"""Diffusion Tuning: t-laws, batch split, null replay labels, loss formula, label reuse, bank, CLI errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import chisquare

from diffusion_transfer import DiffTuning, Diffusion
from diffusion_transfer.cli import main
from diffusion_transfer.data import DatasetError, ZipImageDataset, make_shapes
from diffusion_transfer.data.replay import ReplayBank
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.dit_checkpoint import DiTCheckpointError
from diffusion_transfer.methods.difftuning import difftuning_loss, replay_share, timestep_law
from diffusion_transfer.nets import build_dit

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]


def tiny(**kwargs) -> DiffTuning:
    args = dict(arch="DiT-S/2", arch_overrides=TINY, num_classes=20, resolution=16, channels=3)
    return DiffTuning(**{**args, **kwargs})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source/target shapes, a tiny 'pre-trained' DiT (.ckpt, 1 step), and its bank built by bank.yaml."""
    tmp = tmp_path_factory.mktemp("difftuning")
    make_shapes(tmp / "filled.zip", resolution=16, per_class=2, seed=0, domain="filled")
    make_shapes(tmp / "outline.zip", resolution=16, per_class=2, seed=1, domain="outline")
    tiny_cli = ["--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides", yaml.safe_dump(TINY)]
    main(["fit", "--config", str(REPO / "configs/diffusion/shapes16_pretrain.yaml"), *tiny_cli, *CPU,
          "--data.init_args.path", str(tmp / "filled.zip"), "--data.init_args.batch_size", "8",
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
          "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", str(tmp),
          "--trainer.callbacks", yaml.safe_dump([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                  "init_args": {"dirpath": str(tmp), "filename": "pre"}}])])
    main(["predict", "--config", str(REPO / "configs/difftuning/bank.yaml"), *tiny_cli, *CPU,
          "--model.init_args.checkpoint", str(tmp / "pre.ckpt"), "--data.init_args.path", str(tmp / "filled.zip"),
          "--data.init_args.predict_seeds", "0-11", "--model.init_args.sample_steps", "2",
          "--writer.output_dir", str(tmp / "bank"), "--writer.zip_path", str(tmp / "bank.zip"),
          "--trainer.default_root_dir", str(tmp)])
    return {"tmp": tmp, "filled": tmp / "filled.zip", "outline": tmp / "outline.zip", "pre": tmp / "pre.ckpt",
            "bank": tmp / "bank.zip", "bank_dir": tmp / "bank"}


# ---------------------------------------------------------------------------------------------- timestep laws

def test_timestep_laws_match_the_formulas() -> None:
    model = tiny(replay_bank="unused.zip")
    p_tgt, p_rep = model.target_law, model.replay_law
    assert torch.isclose(p_tgt[999] / p_tgt[0], torch.tensor(1000.0, dtype=torch.float64))
    assert torch.allclose(p_rep, p_tgt.flip(0))  # (T - t)^s is the target law reversed
    t = torch.arange(1000, dtype=torch.float64)
    assert abs(float((p_tgt * t).sum()) - 666.0) < 1e-9 and abs(float((p_rep * t).sum()) - 333.0) < 1e-9

    torch.manual_seed(0)
    n = 10**6
    draws = {name: model.draw_timesteps(n, law, torch.device("cpu")) for name, law in
             (("target", p_tgt), ("replay", p_rep))}
    assert abs(draws["target"].double().mean().item() - 666.0) < 1.5  # sd 236 / sqrt(1e6) = 0.24
    assert abs(draws["replay"].double().mean().item() - 333.0) < 1.5
    for name, law in (("target", p_tgt), ("replay", p_rep)):
        counts = torch.bincount(draws[name], minlength=1000).numpy()
        assert chisquare(counts, law.numpy() * n).pvalue > 1e-3
    # The test can tell the laws apart: target draws do not fit the replay law (nor the uniform one).
    counts = torch.bincount(draws["target"], minlength=1000).numpy()
    assert chisquare(counts, p_rep.numpy() * n).pvalue < 1e-12
    assert chisquare(counts, np.full(1000, n / 1000)).pvalue < 1e-12

    # s' defaults to s (None or negative); its own value otherwise; uniform draws both parts uniformly.
    assert torch.allclose(tiny(prob_scale=2.0).replay_law, timestep_law(1000, 2.0, reverse=True))
    assert torch.allclose(tiny(prob_scale=2.0, replay_prob_scale=-1).replay_law, timestep_law(1000, 2.0, True))
    assert torch.allclose(tiny(replay_prob_scale=0.5).replay_law, timestep_law(1000, 0.5, reverse=True))
    uniform = tiny(t_law="uniform")
    assert abs(uniform.draw_timesteps(n, uniform.target_law, torch.device("cpu")).double().mean() - 499.5) < 1.5


def test_low_noise_scale_is_the_base_law_and_difftuning_refuses_it() -> None:
    """Diffusion's low_noise_scale is Diff-Tuning's replay law on every training row; DiffTuning keeps its own laws."""
    base = Diffusion(arch="DiT-S/8", arch_overrides={"hidden_size": 32, "depth": 1, "num_heads": 2}, resolution=16,
                     num_classes=4, low_noise_scale=0.5, val_num_images=0)
    assert torch.allclose(base.process.timestep_probs, timestep_law(1000, 0.5, reverse=True))
    with pytest.raises(ConfigError, match="not low_noise_scale"):
        tiny(low_noise_scale=1.0)


def test_batch_split_over_ranks() -> None:
    assert replay_share(32, 0.2) == 6  # 26 target + 6 replay, as the reference
    for world, batch in ((4, 8), (3, 11), (2, 16)):
        shares = [replay_share(batch, 0.2, world, rank) for rank in range(world)]
        assert sum(shares) == int(world * batch * 0.2) and max(shares) - min(shares) <= 1
    with pytest.raises(DatasetError, match="replay part empty"):
        replay_share(32, 0.01)
    with pytest.raises(DatasetError, match="target part empty"):
        replay_share(4, 1.0)


# ---------------------------------------------------------------------------------------------- loss

class _FakeProcess:
    """A process whose per-sample loss is a given vector; records what it was called with."""

    def __init__(self, per_sample: torch.Tensor) -> None:
        self.per_sample, self.calls = per_sample, []

    def training_losses(self, net, x0, t, noise=None, model_kwargs=None):
        self.calls.append((x0, t, model_kwargs["y"]))
        return {"loss": self.per_sample, "mse": self.per_sample, "vb": torch.zeros_like(self.per_sample)}


def test_loss_assembly_equals_the_formula() -> None:
    # Mocked per-sample losses: batch 32 = 26 target + 6 replay -> mean(first 26) + 0.1 * mean(last 6).
    per_sample = torch.arange(32, dtype=torch.float64) ** 2
    process = _FakeProcess(per_sample)
    y = torch.arange(26) % 20
    out = difftuning_loss(None, process, torch.zeros(26, 3, 4, 4), y, torch.zeros(26, dtype=torch.long),
                          torch.ones(6, 3, 4, 4), torch.ones(6, dtype=torch.long), replay_weight=0.1)
    expected = per_sample[:26].mean() + 0.1 * per_sample[26:].mean()
    assert torch.isclose(out["loss"], expected) and torch.isclose(out["replay"], per_sample[26:].mean())
    x, t, labels = process.calls[0]
    assert x.shape[0] == t.shape[0] == 32 and labels[:26].tolist() == y.tolist() and (labels[26:] == -1).all()

    # A real net and process on a hand-made batch: equals the two parts computed separately.
    torch.manual_seed(0)
    model = tiny().eval()  # eval: no label dropout, so the parts are deterministic
    x_tgt, x_rep = torch.randn(5, 3, 16, 16), torch.randn(3, 3, 16, 16)
    y_tgt, t_tgt = torch.tensor([0, 3, 7, 19, 2]), torch.tensor([999, 500, 10, 700, 0])
    t_rep = torch.tensor([1, 5, 300])
    noise = torch.randn(8, 3, 16, 16)
    out = difftuning_loss(model.net, model.process, x_tgt, y_tgt, t_tgt, x_rep, t_rep, 0.1, noise=noise)
    tgt = model.process.training_losses(model.net, x_tgt, t_tgt, noise=noise[:5], model_kwargs={"y": y_tgt})["loss"]
    rep = model.process.training_losses(model.net, x_rep, t_rep, noise=noise[5:],
                                        model_kwargs={"y": torch.full((3,), 20)})["loss"]  # 20 = null index
    assert torch.allclose(out["loss"], tgt.mean() + 0.1 * rep.mean(), rtol=1e-5, atol=1e-6)


def test_replay_rows_get_the_null_label(setup: dict[str, Path]) -> None:
    model = tiny(replay_bank=str(setup["bank"])).train()
    seen: list[torch.Tensor] = []
    model.net.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    labels = torch.arange(40) % 20
    for step in range(20):
        torch.manual_seed(step)
        model.loss((torch.randn(40, 3, 16, 16), labels))
    rows = torch.stack(seen)  # [20 steps, 40 rows]: indices into the label table
    assert (rows[:, 32:] == 20).all()  # 8 replay rows (int(40 * 0.2)), always the null row
    target = rows[:, :32]
    kept = target == labels[:32]
    assert ((target == 20) | kept).all()  # target rows keep their label unless class dropout nulls them
    assert 0.05 < 1 - kept.double().mean().item() < 0.15  # dropout rate 0.1 (640 draws, sd 0.012)


def test_replay_off_with_uniform_t_is_the_baseline_step() -> None:
    torch.manual_seed(0)
    baseline = Diffusion(arch="DiT-S/2", arch_overrides=TINY, num_classes=20, resolution=16, channels=3)
    # Random final layer: the adaLN-zero init would make every output 0 and the comparison weaker.
    torch.nn.init.normal_(baseline.net.final_layer.linear.weight, std=0.02)
    batch = (torch.randn(12, 3, 16, 16), torch.arange(12) % 20)

    def step(model: Diffusion) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.load_state_dict(baseline.state_dict())
        model.train().zero_grad()
        torch.manual_seed(7)
        loss = model.loss(batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.net.parameters() if p.grad is not None]

    reference, grads = step(baseline)
    loss, tuned_grads = step(tiny(replay_weight=0.0, t_law="uniform"))
    assert torch.equal(loss, reference) and all(torch.equal(a, b) for a, b in zip(grads, tuned_grads, strict=True))
    # The t-law matters: the categorical target law gives another loss for the same RNG.
    assert not torch.equal(step(tiny(replay_weight=0.0))[0], reference)


# ---------------------------------------------------------------------------------------------- weights

def test_new_label_space_reuses_pretrained_rows_and_null(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pre = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=5, **TINY)
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    table = pre.y_embedder.embedding_table.weight.detach()  # [6, D]: classes 0..4, null 5
    model = tiny(num_classes=3, checkpoint=str(tmp_path / "pre.pt"))
    model.load_pretrained()
    loaded = model.net.y_embedder.embedding_table.weight.detach()
    assert torch.equal(loaded, torch.cat([table[:3], table[5:]]))
    assert torch.equal(model.net.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)
    # More classes than the pre-trained table: rows 0..4 and the null row are kept, rows 5 and 6 start fresh.
    more = tiny(num_classes=7)
    fresh = more.net.y_embedder.embedding_table.weight.detach().clone()
    more.load_weights(str(tmp_path / "pre.pt"))
    assert torch.equal(more.net.y_embedder.embedding_table.weight, torch.cat([table[:5], fresh[5:7], table[5:]]))
    with pytest.raises(DiTCheckpointError, match="checkpoint is for 5 classes.*label_table reuse"):
        tiny(num_classes=7, label_table="strict").load_weights(str(tmp_path / "pre.pt"))


def test_trainable_selection() -> None:
    model = tiny(trainable="bias")
    names = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".bias") or n == "y_embedder.embedding_table.weight" for n in names)
    assert "y_embedder.embedding_table.weight" in names and "blocks.0.attn.qkv.weight" not in names
    assert {n for n, p in tiny().net.named_parameters() if not p.requires_grad} == {"pos_embed"}
    assert [n for n, p in tiny(trainable=["final_layer.*"]).net.named_parameters() if p.requires_grad] == [
        n for n, _ in model.net.final_layer.named_parameters(prefix="final_layer")]
    with pytest.raises(ConfigError, match="unknown trainable preset"):
        tiny(trainable="lora")
    with pytest.raises(ConfigError, match="selects no parameter"):
        tiny(trainable=["nothing.*"])


def test_peft_presets_build_their_tensors_and_load_the_official_layout(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    pre = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, **TINY)  # no LN affine, no γ
    with torch.no_grad():  # random weights everywhere: adaLN-zero would make every output 0
        for name, p in pre.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    d, depth = TINY["hidden_size"], TINY["depth"]
    bitfit = tiny(trainable="bitfit").selection.trainable
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 999]), torch.tensor([0, 7, 19])
    # bias_norm adds the two LN affines of each block and the final LN; difffit four γ per block (Diff-Tuning's:
    # qkv 3D, attention output D, the two branches D each), or the DiffFit paper's two with difffit_scales 2.
    for trainable, extra, depth_kw in (("bias_norm", depth * 4 * d + 2 * d, {}), ("difffit", depth * 6 * d, {}),
                                       ("difffit", depth * 2 * d, {"difffit_scales": 2}),
                                       ("difffit", 6 * d, {"difffit_depth": 1})):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            model = tiny(trainable=trainable, **depth_kw)
        sel = model.selection
        assert sel.trainable == bitfit + extra
        assert (f"DiffTuning trainable={trainable}: trainable parameters: {sel.trainable:,} of {sel.total:,} "
                f"({100 * sel.trainable / sel.total:.4f}%)") in caplog.text
        model.load_weights(str(tmp_path / "pre.pt"))  # the new tensors may be absent; nothing else may
        with torch.no_grad():  # identity init: the function is the pre-trained one
            assert torch.allclose(model.net.eval()(x, t, y), pre.eval()(x, t, y), atol=1e-5)
    assert {n for n in model.selection.names if "gamma" in n} == {
        "blocks.0.gamma_msa", "blocks.0.gamma_mlp", "blocks.0.attn.gamma_qkv", "blocks.0.attn.gamma_proj"}
    broken = {k: v for k, v in pre.state_dict().items() if k != "blocks.1.attn.proj.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(DiTCheckpointError, match="blocks.1.attn.proj.weight"):
        tiny(trainable="difffit").load_weights(str(tmp_path / "broken.pt"))
    # A preset whose own tensors are switched off would silently train BitFit's: refused.
    with pytest.raises(ConfigError, match="'bias_norm' trains LayerNorm affine"):
        tiny(trainable="bias_norm", arch_overrides={**TINY, "norm_affine": False})
    with pytest.raises(ConfigError, match="'difffit' trains DiffFit branch scales"):
        tiny(trainable="difffit", difffit_depth=0)
    with pytest.raises(ConfigError, match="difffit_scales must be 2 .* or 4 .*got 3"):
        tiny(trainable="difffit", difffit_scales=3)


def test_each_difffit_scale_multiplies_its_own_tensor() -> None:
    """γ = v on one vector equals the γ-free DiT whose matching weights (and biases) are scaled by v by hand."""
    torch.manual_seed(0)
    pre = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, **TINY)
    with torch.no_grad():
        for name, p in pre.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    model = tiny(trainable="difffit")
    model.net.load_state_dict(pre.state_dict(), strict=False)  # only the γ are absent
    net, d = model.net.eval(), TINY["hidden_size"]
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 999]), torch.tensor([0, 7, 19])
    v3 = torch.rand(3 * d) + 0.5  # per channel of [q; k; v]
    gate = slice(2 * d, 3 * d), slice(5 * d, 6 * d)  # adaLN chunks 2 and 5: gate_msa, gate_mlp

    def scaled(layer: torch.nn.Linear, v: torch.Tensor | float, rows: slice = slice(None)) -> None:
        layer.weight[rows] *= v if isinstance(v, float) else v[:, None]
        layer.bias[rows] *= v

    cases = {"attn.gamma_qkv": (v3, lambda b: scaled(b.attn.qkv, v3)),
             "attn.gamma_proj": (2.0, lambda b: scaled(b.attn.proj, 2.0)),
             "gamma_msa": (2.0, lambda b: scaled(b.adaLN_modulation[-1], 2.0, gate[0])),
             "gamma_mlp": (2.0, lambda b: scaled(b.mlp.fc2, 2.0))}
    with torch.no_grad():
        base = pre.eval()(x, t, y)
        assert torch.allclose(net(x, t, y), base, atol=1e-6)  # γ = 1: the source's function
        for name, (value, by_hand) in cases.items():
            gamma = net.get_parameter(f"blocks.1.{name}")
            gamma.copy_(torch.ones_like(gamma) * value)
            ref = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, **TINY).eval()
            ref.load_state_dict(pre.state_dict())
            by_hand(ref.blocks[1])
            expected = ref(x, t, y)
            assert not torch.allclose(expected, base, atol=1e-4)  # the scale is visible
            torch.testing.assert_close(net(x, t, y), expected, atol=1e-5, rtol=1e-5)
            gamma.fill_(1.0)


# ---------------------------------------------------------------------------------------------- bank and CLI

def test_bank_round_trips_through_predict(setup: dict[str, Path]) -> None:
    dataset = ZipImageDataset(setup["bank"])
    assert len(dataset) == 12 and dataset.num_classes == 20 and dataset.labels.tolist() == [i % 20 for i in range(12)]
    png = np.asarray(Image.open(setup["bank_dir"] / "000005.png"))
    assert np.array_equal(dataset[5][0].permute(1, 2, 0).numpy(), png)  # the zip holds exactly the samples
    bank = ReplayBank(setup["bank"], resolution=16, channels=3, xflip=False)
    torch.manual_seed(0)
    x = bank.draw(4)
    index = torch.randint(12, (4,), generator=torch.Generator().manual_seed(0))  # the same indices
    assert torch.equal(x, torch.stack([dataset[int(i)][0].float() / 127.5 - 1 for i in index]))


def _fit(setup: dict[str, Path], *extra: str) -> None:
    main(["fit", "--config", str(REPO / "configs/difftuning/shapes.yaml"), *CPU,
          "--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides", yaml.safe_dump(TINY),
          "--model.init_args.checkpoint", str(setup["pre"]), "--model.init_args.replay_bank", str(setup["bank"]),
          "--model.init_args.val_num_images", "0", "--data.init_args.path", str(setup["outline"]),
          "--data.init_args.batch_size", "10", "--metrics.feature_network", "null", "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(setup["tmp"] / "fit"), *extra])


def test_shapes_config_fits_from_the_pretrained_model(setup: dict[str, Path]) -> None:
    _fit(setup)  # 8 target + 2 replay rows per step, from the bank that bank.yaml wrote


def test_finediffusion_selection_fits_from_a_checkpoint_without_ln_affine(setup: dict[str, Path]) -> None:
    _fit(setup, "--model.init_args.trainable", "bias_norm")  # pre.ckpt has no LN affine: they start at (1, 0)


@pytest.mark.parametrize("case", ["missing bank", "bank size", "labels", "ratio"])
def test_bad_input_is_a_one_line_error(case: str, setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    extra: list[str] = []
    if case == "missing bank":
        extra, expected = ["--model.init_args.replay_bank", str(tmp_path / "none.zip")], "none.zip: no such file"
    elif case == "bank size":
        make_shapes(tmp_path / "bank8.zip", resolution=8, per_class=1, seed=0)
        extra, expected = ["--model.init_args.replay_bank", str(tmp_path / "bank8.zip")], "holds 3x8x8 samples"
    elif case == "labels":
        small = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=4, **TINY)
        torch.save(small.state_dict(), tmp_path / "four.pt")
        extra = ["--model.init_args.checkpoint", str(tmp_path / "four.pt"), "--model.init_args.label_table", "strict"]
        expected = "the checkpoint is for 4 classes, 16×16×3, this model for 20 classes, 16×16×3"
    else:
        extra, expected = ["--model.init_args.replay_ratio", "0.05"], "leaves the replay part empty"
    with pytest.raises(SystemExit) as exit_info:
        _fit(setup, *extra)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_shapes_configs_run_on_the_unet_source(setup: dict[str, Path], tmp_path: Path) -> None:
    """bank.yaml and shapes.yaml as shipped (the demo's U-Net, narrowed): a U-Net source, its bank, 2 DiffTuning
    steps that load it through the U-Net loader; the DiT PEFT presets are refused on the U-Net."""
    unet = yaml.safe_dump({"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
                           "dropout": 0.0, "min_channels_per_group": 4})
    narrow = ["--model.init_args.arch_overrides", unet]
    save = yaml.safe_dump([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": str(tmp_path), "filename": "pre"}}])
    main(["fit", "--config", str(REPO / "configs/diffusion/shapes16_pretrain_unet.yaml"), *narrow, *CPU,
          "--data.init_args.path", str(setup["filled"]), "--data.init_args.batch_size", "8",
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
          "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks", save])
    main(["predict", "--config", str(REPO / "configs/difftuning/bank.yaml"), *narrow, *CPU,
          "--model.init_args.checkpoint", str(tmp_path / "pre.ckpt"), "--data.init_args.path", str(setup["filled"]),
          "--data.init_args.predict_seeds", "0-3", "--model.init_args.sample_steps", "2",
          "--writer.output_dir", str(tmp_path / "bank"), "--writer.zip_path", str(tmp_path / "bank.zip"),
          "--trainer.default_root_dir", str(tmp_path)])
    fit = ["fit", "--config", str(REPO / "configs/difftuning/shapes.yaml"), *narrow, *CPU,
           "--model.init_args.checkpoint", str(tmp_path / "pre.ckpt"),
           "--model.init_args.replay_bank", str(tmp_path / "bank.zip"), "--model.init_args.val_num_images", "0",
           "--data.init_args.path", str(setup["outline"]), "--data.init_args.batch_size", "10",
           "--metrics.feature_network", "null", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
           "--trainer.callbacks", "[]", "--trainer.logger", "false",
           "--trainer.default_root_dir", str(tmp_path / "fit")]
    main(fit)
    with pytest.raises(ConfigError, match="is a DiT preset; on the U-Net"):
        DiffTuning(arch="ddpm-cifar10", arch_overrides=yaml.safe_load(unet), num_classes=20, resolution=16,
                   trainable="bitfit")
