"""DMP: exact start, frozen backbone, gates on the simplex, balance-loss formula, gate noise, patch checkpoints."""

from __future__ import annotations

import argparse
import collections
import logging
import math
import shutil
import sys
import types
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from diffusion_transfer import DMP
from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.dmp_checkpoint import is_dmp_checkpoint, load_dmp_checkpoint, read_dmp_checkpoint
from diffusion_transfer.io.peft_checkpoint import PEFT_KEY
from diffusion_transfer.methods.diffusion import dit_loss
from diffusion_transfer.methods.dmp import dmp_loss
from diffusion_transfer.nets import build_dit
from diffusion_transfer.nets.dit import unpatchify
from diffusion_transfer.nets.dmp import (
    MixtureOfPrompts,
    balance_loss,
    cv_squared,
    load_loss,
    prob_in_top_k,
    select_blocks,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DiT starts as the identity with zero output (adaLN-Zero); random weights make every test able to fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def tiny(**kwargs) -> DMP:
    args = dict(arch="DiT-S/2", arch_overrides=TINY, num_classes=20, resolution=16, channels=3)
    model = DMP(**{**args, **kwargs})
    randomised(model.net)
    return model


def inputs(b: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 16, 16, generator=gen), torch.randint(0, 1000, (b,), generator=gen), \
        torch.tensor([0, 5, 19, -1, 3, -1])[:b]


@pytest.mark.parametrize("gating", [True, False])
def test_step_zero_equals_the_pretrained_model(gating: bool) -> None:
    model = tiny(gating=gating)
    x, t, y = inputs()
    for train in (False, True):  # train mode: label dropout and gate noise on; same RNG state for both calls
        model.train(train)
        torch.manual_seed(3)
        plain = model.net(x, t, y)
        torch.manual_seed(3)
        patched = model.denoiser(x, t, y)
        assert plain.abs().sum() > 0 and torch.equal(plain, patched)
    # The comparison can fail: any non-zero prompt changes the output (same RNG state, so label dropout and gate
    # noise cannot be the difference; eval mode has neither).
    with torch.no_grad():
        model.patch.prompt_embeddings.fill_(0.1)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(3)
        plain = model.net(x, t, y)
        torch.manual_seed(3)
        assert not torch.allclose(plain, model.denoiser(x, t, y))


def test_gates_are_a_distribution_of_c_and_the_block_index() -> None:
    patch = MixtureOfPrompts(depth=3, num_tokens=8, hidden_size=16).eval()
    c = torch.randn(5, 16)
    assert torch.equal(patch.gate_weights(c, 2), torch.full((5, 8), 1 / 8))  # zero gate: uniform
    with torch.no_grad():
        for p in patch.parameters():
            p.normal_()
    for block in range(3):
        g = patch.gate_weights(c, block)
        assert (g >= 0).all() and torch.allclose(g.sum(-1), torch.ones(5))
        # z = W [c ; l] + b with l the raw block index
        logits = c @ patch.gate.weight[:, :16].T + block * patch.gate.weight[:, 16] + patch.gate.bias
        assert torch.allclose(g, logits.softmax(-1), atol=1e-6)
    assert not torch.allclose(patch.gate_weights(c, 0), patch.gate_weights(c, 1))


def test_gate_noise_only_in_training() -> None:
    patch = MixtureOfPrompts(depth=2, num_tokens=8, hidden_size=16)
    c = torch.randn(4, 16)
    patch.train()
    first, second = patch.gate_weights(c, 0), patch.gate_weights(c, 0)
    assert not torch.allclose(first, second) and torch.allclose(first.sum(-1), torch.ones(4))
    # The noise scale is sigma = softplus(c W_noise) + 0.01 = log 2 + 0.01 at init. Log-gates are the logits up to
    # a per-row shift; centred over the N = 8 entries, i.i.d. N(0, sigma^2) noise keeps sigma * sqrt(7/8) of its sd.
    torch.manual_seed(0)
    logits = patch.gate_weights(c[:1].expand(4000, 16), 0).log()  # 4000 draws for one c
    spread = (logits - logits.mean(-1, keepdim=True)).std(0).mean().item()
    assert abs(spread - (math.log(2) + 0.01) * math.sqrt(7 / 8)) < 0.01  # sd of this estimate ~ 0.003
    patch.eval()
    assert torch.equal(patch.gate_weights(c, 0), patch.gate_weights(c, 0))
    quiet = MixtureOfPrompts(depth=2, num_tokens=8, hidden_size=16, noisy_gating=False).train()
    assert torch.equal(quiet.gate_weights(c, 0), torch.full((4, 8), 1 / 8))


def test_gate_noise_is_eps_times_softplus_of_c_w_noise_plus_the_floor() -> None:
    patch = MixtureOfPrompts(depth=3, num_tokens=8, hidden_size=16)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    c = torch.randn(4, 16, generator=gen)
    logits = c @ patch.gate.weight[:, :16].T + 2 * patch.gate.weight[:, 16] + patch.gate.bias
    scale = torch.log1p(torch.exp(c @ patch.w_noise)) + 0.01  # softplus by hand, [B, N]
    assert scale.std() > 0.5  # W_noise is not a no-op here: the scale varies over samples and prompts
    patch.train()
    torch.manual_seed(11)
    noisy = patch.gate_weights(c, 2)
    torch.manual_seed(11)
    eps = torch.randn(4, 8)
    assert torch.allclose(noisy, (logits + eps * scale).softmax(-1), atol=1e-6)
    assert not torch.allclose(noisy, (logits + eps * 0.01).softmax(-1), atol=1e-3)  # the scale matters
    assert not torch.allclose(noisy, logits.softmax(-1), atol=1e-3)
    patch.eval()  # no noise: the RNG is not even drawn from
    state = torch.get_rng_state()
    assert torch.allclose(patch.gate_weights(c, 2), logits.softmax(-1), atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


def test_without_gate_noise_there_is_no_w_noise() -> None:
    quiet = MixtureOfPrompts(depth=2, num_tokens=8, hidden_size=16, noisy_gating=False)
    assert {n for n, _ in quiet.named_parameters()} == {"prompt_embeddings", "gate.weight", "gate.bias"}
    assert quiet.num_added(with_noise=True) == quiet.num_added() == 2 * 8 * 16 + 17 * 8 + 8
    for noisy in (True, False):  # DDP with find_unused_parameters=False needs a gradient for every trainable tensor
        model = tiny(noisy_gating=noisy).train()
        with torch.no_grad():
            model.patch.prompt_embeddings.normal_()
        torch.manual_seed(0)
        model.loss((torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, -1])))["loss"].backward()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert {"patch.prompt_embeddings", "patch.gate.weight", "patch.gate.bias"} <= set(trainable)
        assert ("patch.w_noise" in trainable) == noisy and len(trainable) == 3 + noisy
        assert all(model.get_parameter(n).grad is not None for n in trainable)
        prompts, gate = model.configure_optimizers().param_groups
        assert prompts["params"] == [model.patch.prompt_embeddings] and gate["lr"] == pytest.approx(1e-3)
        assert {id(p) for p in gate["params"]} == {id(model.get_parameter(n)) for n in trainable[1:]}
        assert model.added_parameters()["w_noise"] == (32 * 64 if noisy else 0)
        assert set(model.state_dict()) >= set(trainable) and ("patch.w_noise" in model.state_dict()) == noisy


def test_guidance_runs_the_patch_on_both_halves_with_their_own_gates() -> None:
    model = tiny(guidance_channels=3).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x, t = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    y, null = torch.tensor([0, 5, 19, 3]), torch.full((4,), -1)
    # The doubled CFG batch: the null half's gates are those of a null-only call, not the conditional half's.
    gates: list[torch.Tensor] = []
    both = model.patch(model.net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), gates=gates)
    null_gates: list[torch.Tensor] = []
    alone = model.patch(model.net, x, t, null, gates=null_gates)
    assert len(gates) == len(null_gates) == 2
    for g, g_null in zip(gates, null_gates):
        assert torch.allclose(g[4:], g_null, atol=1e-6) and (g[:4] - g[4:]).abs().max() > 1e-3
    cond = model.denoiser(x, t, y)
    assert torch.allclose(both[:4], cond, atol=1e-5) and torch.allclose(both[4:], alone, atol=1e-5)
    # Scale 1 is the conditional patched output; scale 2 mixes the two patched predictions on channels 0-2.
    unit = model.process.guided_output(*both.chunk(2), 1.0, 3)
    assert torch.allclose(unit, cond, atol=1e-5)
    assert torch.allclose(model.guided_denoiser(y, 1.0, 3)(x, t), cond, atol=1e-5)
    guided = model.guided_denoiser(y, 2.0, 3)(x, t)
    expected = torch.cat([2 * cond[:, :3] - alone[:, :3], cond[:, 3:]], dim=1)
    assert torch.allclose(guided, expected, atol=1e-5)
    plain = model.process.guided_output(model.net(x, t, y), model.net(x, t, null), 2.0, 3)
    assert not torch.allclose(guided, plain, atol=1e-3)  # the patch is in use


def test_prompts_are_added_per_token_before_the_chosen_blocks() -> None:
    patch = MixtureOfPrompts(depth=4, num_tokens=8, hidden_size=16, blocks=[1, 3]).eval()
    with torch.no_grad():
        patch.prompt_embeddings.normal_()
        patch.gate.bias[5] = 100.0  # one-hot gate on prompt 5
    h, c = torch.randn(2, 8, 16), torch.randn(2, 16)
    gates: list[torch.Tensor] = []
    hook = patch.hook(gates)
    assert torch.equal(hook(0, h, c), h) and torch.equal(hook(2, h, c), h) and not gates  # unpatched blocks
    delta = hook(3, h, c) - h
    assert torch.allclose(delta[:, 5], patch.prompt_embeddings[1, 5].expand(2, 16), atol=1e-6)
    assert delta[:, [0, 1, 2, 3, 4, 6, 7]].abs().max() < 1e-6 and len(gates) == 1
    naive = MixtureOfPrompts(depth=4, num_tokens=8, hidden_size=16, gating=False)
    with torch.no_grad():
        naive.prompt_embeddings.normal_()
    assert torch.equal(naive.hook()(2, h, c), h + naive.prompt_embeddings[2]) and not hasattr(naive, "gate")
    with pytest.raises(ValueError, match="16 prompts per block but block 0 sees 8 tokens"):
        MixtureOfPrompts(depth=1, num_tokens=16, hidden_size=16).hook()(0, h, c)
    assert select_blocks(4) == [0, 1, 2, 3] and select_blocks(4, 2) == [0, 1] and select_blocks(4, [3, 1]) == [1, 3]
    for bad in ([], [4], [-1], [1, 1], "first", "", "-1", "0", "5", 0, 5, True, False, [True], [1.0], 2.0, None):
        with pytest.raises(ConfigError, match="patched_blocks"):
            select_blocks(4, bad)


def test_patched_blocks_as_the_command_line_passes_them(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    # jsonargparse may hand a count over as a string ('2'); it counts, and bad values are a one-line error.
    assert select_blocks(4, "2") == [0, 1] and select_blocks(4, " 4 ") == [0, 1, 2, 3]
    args = ["--config", str(REPO / "configs/dmp/shapes.yaml"), *CPU, "--model.init_args.checkpoint", "null",
            "--model.init_args.arch_overrides", yaml.safe_dump(TINY), "--data.init_args.path", str(shapes_zip),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    for value, blocks in (("2", [0, 1]), ("[1]", [1]), ("all", [0, 1])):
        cli = build_cli([*args, "--model.init_args.patched_blocks", value], run=False)
        assert cli.model.patch.blocks == blocks and cli.model.patch.prompt_embeddings.shape[0] == len(blocks)
    for value, message in (("3", "count in 1..2"), ("true", "got 'true'"), ("[0, 2]", "distinct blocks in 0..1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--trainer.max_steps", "1", "--model.init_args.patched_blocks", value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "diffusion-transfer: error: patched_blocks" in err and message in err
        assert "Traceback" not in err


def test_balance_loss_equals_the_formula() -> None:
    # G [L=2, B=2, N=3] -> I = sum_l G_l = [[1.5, 0.5, 0], [0, 1, 1]]; mean 2/3; unbiased var (66/36)/5 = 11/30;
    # CV^2 = (11/30) / (4/9) = 0.825.
    gates = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    assert abs(balance_loss(gates).item() - 0.825) < 1e-6
    assert balance_loss(torch.full((4, 3, 8), 1 / 8)).item() == 0.0

    # The DMP loss is the diffusion loss of the patched net plus weight x the balance loss of the gates it used.
    model = tiny().train()
    x0, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, -1])
    torch.manual_seed(0)
    out = dmp_loss(model.patch, model.net, model.process, x0, labels, balance_weight=2.0)
    assert out["balance"] > 0  # noisy gates are not uniform
    assert torch.allclose(out["loss"], out["mse"] + out["vb"] + 2.0 * out["balance"])
    torch.manual_seed(0)  # same draws (t, noise, dropout come before the gate noise): same diffusion terms
    plain = dit_loss(model.net, model.process, x0, labels)
    assert torch.equal(plain["mse"], out["mse"]) and torch.equal(plain["vb"], out["vb"])


def test_only_the_patch_trains_with_two_learning_rates(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny()
    with caplog.at_level(logging.INFO):
        model.on_fit_start()
    assert "2 of 2 blocks patched with 64 prompts x 32; +6,272 parameters (+11.80% of the 53,144" in caplog.text
    optimizer = model.configure_optimizers()
    prompts, gate = optimizer.param_groups
    assert prompts["params"] == [model.patch.prompt_embeddings] and prompts["lr"] == 1e-4
    assert {id(p) for p in gate["params"]} == {id(model.patch.gate.weight), id(model.patch.gate.bias),
                                               id(model.patch.w_noise)}
    assert gate["lr"] == pytest.approx(1e-3) and prompts["weight_decay"] == gate["weight_decay"] == 0.0
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    model.train()
    for step in range(3):
        torch.manual_seed(step)
        optimizer.zero_grad()
        model.loss((torch.randn(8, 3, 16, 16), torch.arange(8))).get("loss").backward()
        assert all(p.grad is None for p in model.net.parameters())
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    assert model.patch.prompt_embeddings.abs().sum() > 0 and model.patch.gate.weight.abs().sum() > 0
    counts = model.added_parameters()  # 2 blocks x 64 tokens x 32 + Linear(33 -> 64)
    assert counts["added"] == 2 * 64 * 32 + 33 * 64 + 64 and counts["w_noise"] == 32 * 64
    naive = tiny(gating=False)
    assert [g["params"] for g in naive.configure_optimizers().param_groups] == [[naive.patch.prompt_embeddings]]
    with pytest.raises(ConfigError, match="compile"):
        tiny(compile=True)
    with pytest.raises(ConfigError, match="balance_weight"):
        tiny(balance_weight=-1.0)
    with pytest.raises(ConfigError, match="gate_lr_scale"):
        tiny(gate_lr_scale=0.0)


def test_a_unet_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"DMP patches a DiT; set arch to a DiT-\* name .*'ddpm-cifar10'"):
        DMP(arch="ddpm-cifar10", arch_overrides={"model_channels": 32, "num_blocks": 1}, num_classes=20,
            resolution=16, channels=3, learn_sigma=False)


def test_a_base_checkpoint_of_another_diffusion_process_is_refused(tmp_path: Path) -> None:
    # One of our Lightning checkpoints records the process it was trained with; the patch must train with it.
    donor = tiny()
    path = tmp_path / "base.ckpt"
    for key, value in (("schedule", "cosine"), ("prediction", "v"), ("num_timesteps", 500), (None, None)):
        hparams = {**dict(donor.hparams), **({key: value} if key else {})}
        torch.save({"state_dict": {f"net.{k}": v for k, v in donor.net.state_dict().items()},
                    "hyper_parameters": hparams}, path)
        model = tiny(checkpoint=str(path))
        if key is None:  # the same process: loads, and the weights are the donor's
            model.setup("fit")
            assert all(torch.equal(v, donor.net.state_dict()[k]) for k, v in model.net.state_dict().items())
            continue
        with pytest.raises(CheckpointError, match=f"{key}: {value!r} there, .* set --model.init_args.{key} {value}"):
            model.setup("fit")
        assert tiny(checkpoint=str(path), **{key: value}).load_weights(str(path)) == "lightning"
    official = tmp_path / "official.pt"  # a plain state dict records no process and is not checked
    torch.save(donor.net.state_dict(), official)
    assert tiny(checkpoint=str(official), schedule="cosine").load_weights(str(official)) == "state_dict"


def test_paper_parameter_counts() -> None:
    # papers/dmp.md §4.2: prompts + gate on every block, N = 256 tokens (256 px, /2 patches).
    with torch.device("meta"):
        for name, expected in (("DiT-B/2", 2_556_416), ("DiT-L/2", 6_554_112), ("DiT-XL/2", 8_552_960)):
            assert MixtureOfPrompts.for_dit(build_dit(name)).num_added() == expected


def test_unconditional_patch_trains_and_samples() -> None:
    model = tiny(num_classes=0, sample_steps=2).train()
    with torch.no_grad():
        model.patch.prompt_embeddings.normal_()
    torch.manual_seed(0)
    out = model.loss((torch.randn(4, 3, 16, 16), torch.full((4,), -1)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name, p in model.patch.named_parameters():  # every patch tensor learns, the gate and W_noise included
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.sample(2).shape == (2, 3, 16, 16)


def test_the_diffusion_loss_reaches_the_gate_only_through_the_prompts() -> None:
    # balance_weight 0 and no gate noise: the gate's gradient is dL/dh . P_l dg/dz, so it vanishes iff P = 0.
    model = tiny(balance_weight=0.0, noisy_gating=False).train()
    batch = (torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 5, 19, 3, 7, 1]))
    for prompts, moves in ((0.0, False), (1.0, True)):
        with torch.no_grad():
            model.patch.prompt_embeddings.copy_(prompts * torch.randn(model.patch.prompt_embeddings.shape))
        model.patch.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = model.loss(batch)
        assert out["balance"] == 0.0  # uniform gates: the balance loss is 0, so the gradient is the diffusion loss'
        out["loss"].backward()
        assert model.patch.prompt_embeddings.grad.abs().sum() > 0
        for grad in (model.patch.gate.weight.grad, model.patch.gate.bias.grad):
            assert (grad.abs().sum() > 0) if moves else torch.equal(grad, torch.zeros_like(grad))


def test_without_a_base_file_the_full_state_is_kept(tmp_path: Path) -> None:
    model = tiny()  # no `checkpoint`: a random backbone that no file could give back
    saved = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(saved)
    assert set(saved["state_dict"]) == set(model.state_dict()) and PEFT_KEY not in saved
    torch.save(saved, tmp_path / "full.ckpt")
    with pytest.raises(CheckpointError, match="holds no 'peft' entry"):
        DMP.load_patch(tmp_path / "full.ckpt", base=tmp_path / "any.pt")


def test_cli_fit_saves_only_the_patch_and_reloads_it_on_the_base(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.pt"
    net = randomised(build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=20, **TINY))
    torch.save(net.state_dict(), base)
    args = ["--config", str(REPO / "configs/dmp/shapes.yaml"), *CPU, "--model.init_args.arch", "DiT-S/2",
            "--model.init_args.arch_overrides", yaml.safe_dump(TINY), "--model.init_args.checkpoint", str(base),
            "--model.init_args.val_num_images", "0", "--model.init_args.sample_steps", "2",
            "--data.init_args.path", str(shapes_zip), "--data.init_args.batch_size", "8",
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
            "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks", yaml.safe_dump([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                    "init_args": {"dirpath": str(tmp_path), "filename": "dmp"}}])]
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trained = cli.model
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.net.state_dict().items())  # frozen
    assert trained.patch.prompt_embeddings.abs().sum() > 0

    ckpt = torch.load(tmp_path / "dmp.ckpt", weights_only=True)
    patch = {"patch.prompt_embeddings", "patch.gate.weight", "patch.gate.bias", "patch.w_noise"}
    buffers = {k for k, _ in trained.named_buffers() if k in trained.state_dict()}
    assert set(ckpt["state_dict"]) == patch | buffers and not any(k.startswith("net.") for k in buffers)
    record = ckpt[PEFT_KEY]
    assert record["base"] == str(base) and set(record["trained"]) == patch
    assert set(record["fingerprint"]) == {f"net.{k}" for k in net.state_dict()}  # every frozen backbone tensor
    assert record["stored_parameters"] == sum(trained.get_parameter(k).numel() for k in patch)
    restored = DMP.load_from_checkpoint(tmp_path / "dmp.ckpt").eval()
    trained.eval()
    x, t, y = inputs()
    assert torch.equal(restored.denoiser(x, t, y), trained.denoiser(x, t, y))
    assert not torch.allclose(restored.net(x, t, y), restored.denoiser(x, t, y))  # the patch is in use

    # Predict re-attaches the patch through the CLI; a different base is refused with a clear message.
    main(["predict", *args, "--ckpt_path", str(tmp_path / "dmp.ckpt"), "--data.init_args.predict_seeds", "0-1",
          "--writer.output_dir", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    # (With --ckpt_path the CLI takes the model arguments, the base path included, from the checkpoint.)
    shutil.copy(base, tmp_path / "moved.pt")
    torch.save(randomised(net, seed=1).state_dict(), base)  # the base file changed since the patch was trained
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--ckpt_path", str(tmp_path / "dmp.ckpt"), "--writer.output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not the base this PEFT checkpoint was trained from" in err
    with pytest.raises(CheckpointError, match="frozen tensor net.* differs"):
        DMP.load_from_checkpoint(tmp_path / "dmp.ckpt")
    moved = DMP.load_patch(tmp_path / "dmp.ckpt", base=tmp_path / "moved.pt").eval()
    assert torch.equal(moved.denoiser(x, t, y), trained.denoiser(x, t, y))


# ------------------------------------------------------------------------------------ top-k routing and the load term

def test_topk_one_is_todays_dense_softmax_bit_for_bit() -> None:
    # k = N takes no sort and no scatter: the gates are exactly softmax(W [x ; l] + b (+ eps * sigma)).
    patch = MixtureOfPrompts(depth=3, num_tokens=8, hidden_size=16, topk=1.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    c = torch.randn(5, 16, generator=gen)
    logits = patch.gate(torch.cat([c, torch.full((5, 1), 2.0)], dim=1))
    assert patch.k == 8 and not patch.sparse
    assert torch.equal(patch.eval().gate_weights(c, 2), logits.softmax(-1))
    patch.train()
    torch.manual_seed(0)
    g, load = patch.route(c, 2)
    torch.manual_seed(0)
    eps = torch.randn(5, 8)
    sigma = torch.nn.functional.softplus(c @ patch.w_noise) + 0.01
    assert torch.equal(g, (logits + eps * sigma).softmax(-1)) and load is None
    # The model: no load term at k = N, and the sparse patch of the same weights is another function.
    model = tiny().train()
    torch.manual_seed(0)
    assert "load" not in model.loss((torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, -1])))
    sparse = MixtureOfPrompts(depth=3, num_tokens=8, hidden_size=16, topk=0.875).eval()
    sparse.load_state_dict(patch.state_dict())
    assert sparse.k == 7 and not torch.allclose(sparse.gate_weights(c, 2), logits.softmax(-1))


def test_topk_gates_are_the_softmax_of_the_k_largest_logits() -> None:
    patch = MixtureOfPrompts(depth=2, num_tokens=8, hidden_size=16, topk=0.5).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    c = torch.randn(6, 16, generator=gen)
    g = patch.gate_weights(c, 1)
    logits = c @ patch.gate.weight[:, :16].T + patch.gate.weight[:, 16] + patch.gate.bias
    kth = logits.sort(-1, descending=True).values[:, 3:4]  # the 4th largest: k = int(0.5 * 8) = 4
    expected = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    assert torch.allclose(g, expected, atol=1e-6) and ((g > 0).sum(-1) == 4).all()
    assert torch.allclose(g.sum(-1), torch.ones(6))
    # k = int(topk * N), the reference's truncation: int(0.29 * 100) = int(28.999...) = 28
    assert MixtureOfPrompts(depth=1, num_tokens=100, hidden_size=4, topk=0.29).k == 28
    for bad in (0.0, 1.5, -0.5, 0.1, True, "half"):  # 0.1 * 8 keeps no prompt
        with pytest.raises(ConfigError, match="topk must be a fraction"):
            MixtureOfPrompts(depth=1, num_tokens=8, hidden_size=16, topk=bad)


def test_prob_in_top_k_by_hand() -> None:
    # k = 1, sigma = 1, clean [0, 1, 2], noisy [0.5, 0.8, 2.2]: the top noisy logit is prompt 2 (2.2), the next 0.8.
    # Prompt 2 is in: it stays in while its noisy value beats 0.8 -> Phi(2 - 0.8) = Phi(1.2) = 0.884930;
    # prompts 0 and 1 are out: they get in by beating 2.2 -> Phi(-2.2) = 0.013903, Phi(-1.2) = 0.115070.
    clean, noisy = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.5, 0.8, 2.2]])
    prob = prob_in_top_k(clean, noisy, torch.ones(1, 3), torch.tensor([[2.2]]), torch.tensor([[0.8]]))
    assert torch.allclose(prob, torch.tensor([[0.013903, 0.115070, 0.884930]]), atol=1e-6)


def test_the_load_is_the_batch_sum_of_the_top_k_probabilities() -> None:
    patch = MixtureOfPrompts(depth=2, num_tokens=6, hidden_size=8, topk=0.5).train()  # k = 3
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    c = torch.randn(4, 8, generator=gen)
    torch.manual_seed(5)
    g, load = patch.route(c, 1)
    torch.manual_seed(5)
    eps = torch.randn(4, 6)
    clean = (c @ patch.gate.weight[:, :8].T + patch.gate.weight[:, 8] + patch.gate.bias).tolist()
    sigma = (torch.log1p(torch.exp(c @ patch.w_noise)) + 0.01).tolist()
    expected = [0.0] * 6
    for b in range(4):  # scalar loops, independent of the tensor code
        noisy = [clean[b][i] + eps[b, i].item() * sigma[b][i] for i in range(6)]
        ranked = sorted(noisy, reverse=True)
        for i in range(6):
            threshold = ranked[3] if noisy[i] > ranked[3] else ranked[2]  # (k+1)-th if in the top k, else k-th
            expected[i] += 0.5 * (1 + math.erf((clean[b][i] - threshold) / (sigma[b][i] * math.sqrt(2))))
        assert sum(v > 0 for v in g[b].tolist()) == 3
    assert torch.allclose(load, torch.tensor(expected), atol=1e-5)
    assert patch.eval().route(c, 1)[1] is None  # no noise: the reference's load is its count of negative gates, 0


def test_load_loss_forms_and_cv_squared_by_hand() -> None:
    loads = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # block means [2, 3]
    assert load_loss(loads, "sum").item() == 5.0
    assert abs(load_loss(loads, "cv2").item() - 0.08) < 1e-7  # unbiased var 0.5 / mean^2 6.25
    with pytest.raises(ConfigError, match="load_loss must be one of sum, cv2"):
        load_loss(loads, "mean")
    # As the reference's cv_squared, a leading dimension of one gives 0: the balance loss of a batch of one sample.
    assert cv_squared(torch.tensor([[0.9, 0.1]])).item() == 0.0
    assert balance_loss(torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])).item() == 0.0
    # entries 0.9, 0.1, 0.5, 0.5: mean 0.5, unbiased var (0.16 + 0.16) / 3
    assert abs(cv_squared(torch.tensor([[0.9, 0.1], [0.5, 0.5]])).item() - 0.32 / 3 / 0.25) < 1e-6


def test_sparse_routing_adds_the_load_term_in_training_only() -> None:
    model = tiny(topk=0.5, load_weight=2.0, balance_weight=0.5).train()
    batch = (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2, 3, -1]))
    torch.manual_seed(0)
    out = model.loss(batch)
    assert out["load"] > 0 and torch.allclose(out["loss"], out["mse"] + out["vb"] + 0.5 * out["balance"]
                                              + 2.0 * out["load"])
    gates: list[torch.Tensor] = []
    loads: list[torch.Tensor] = []
    torch.manual_seed(0)
    dit_loss(partial(model.patch, model.net, gates=gates, loads=loads), model.process, *batch)
    assert len(loads) == 2 and torch.allclose(out["load"], torch.stack(loads).mean(0).sum())
    # The reference's load, sum_i P(i in the top k), is about k per sample: 4 samples x k = 32 prompts of 64.
    assert 4 * 32 * 0.5 < out["load"].item() < 4 * 32 * 1.5
    out["loss"].backward()
    assert model.patch.w_noise.grad.abs().sum() > 0  # the load estimate reaches the noise scale
    model.eval()
    torch.manual_seed(0)
    assert model.loss(batch)["load"].item() == 0.0
    cv2 = tiny(topk=0.5, load_loss="cv2").train()
    torch.manual_seed(0)
    assert cv2.loss(batch)["load"] < 1.0  # a coefficient of variation, not a count
    for kwargs, message in (({"load_weight": -1.0}, "load_weight"), ({"load_loss": "max"}, "load_loss must be")):
        with pytest.raises(ConfigError, match=message):
            tiny(**kwargs)


# ------------------------------------------------------------------------------------ prepend mode

def prepend_patch(net: torch.nn.Module, seed: int = 6, **kwargs) -> MixtureOfPrompts:
    patch = MixtureOfPrompts.for_dit(net, mode="prepend", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return patch.eval()


def test_prepend_by_hand() -> None:
    net = tiny().net.eval()
    patch = prepend_patch(net, num_tokens=5)  # any prompt count in prepend mode
    x, t, y = inputs()
    n = 5
    # By hand: the gate sees the timestep embedding and the block index; block 0 gets [g_0 P_0 ; patch tokens],
    # block 1 the same tokens with the first 5 replaced by g_1 P_1; the head decodes only the last T.
    c, time, h = net.embed_condition(t, y), net.t_embedder(t), net.embed_patches(x)
    for block in range(2):
        logits = time @ patch.gate.weight[:, :32].T + block * patch.gate.weight[:, 32] + patch.gate.bias
        prompts = logits.softmax(-1)[..., None] * patch.prompt_embeddings[block]
        h = torch.cat([prompts, h if block == 0 else h[:, n:]], dim=1)
        assert h.shape == (6, n + 64, 32)
        h = net.blocks[block](h, c)
    expected = unpatchify(net.final_layer(h[:, n:], c), 2, 6)
    out = patch(net, x, t, y)
    assert out.shape == (6, 6, 16, 16) and torch.allclose(out, expected, atol=1e-5)
    # The gates see t only: other labels change the output (adaLN) but not the gates, unlike add mode's.
    gates, other = [], []
    patch(net, x, t, y, gates=gates)
    patch(net, x, t, torch.tensor([1, 2, 3, 4, 5, 6]), gates=other)
    assert all(torch.equal(a, b) for a, b in zip(gates, other)) and len(gates) == 2
    with pytest.raises(ValueError, match="prepend-mode gate sees the timestep embedding"):
        patch.hook()(0, h, c)
    with pytest.raises(ConfigError, match="num_prompts must equal the DiT's 64 patch tokens in add mode"):
        MixtureOfPrompts.for_dit(net, num_tokens=5)
    with pytest.raises(ConfigError, match="prompt_mode must be one of add, prepend"):
        MixtureOfPrompts.for_dit(net, mode="append")


def test_prepend_reaches_the_patch_tokens_only_through_attention() -> None:
    # With every attention branch shut (gate_msa = 0) tokens never mix, so the prompt tokens cannot change the patch
    # tokens: the output is the frozen DiT's, for any prompts. With attention on it is not, even for zero prompts
    # (the zero tokens are still attended to), so prepend mode does not start as the pre-trained model.
    net = tiny().net.eval()
    x, t, y = inputs()
    patch = prepend_patch(net, blocks=[1])  # prompts enter at block 1 only
    assert not torch.allclose(patch(net, x, t, y), net(x, t, y), atol=1e-4)
    with torch.no_grad():
        patch.prompt_embeddings.zero_()
    assert not torch.allclose(patch(net, x, t, y), net(x, t, y), atol=1e-4)
    with torch.no_grad():
        for block in net.blocks:  # adaLN chunks: shift, scale, gate (msa), shift, scale, gate (mlp)
            block.adaLN_modulation[-1].weight[64:96] = 0
            block.adaLN_modulation[-1].bias[64:96] = 0
        patch.prompt_embeddings.normal_()
    assert torch.allclose(patch(net, x, t, y), net(x, t, y), atol=1e-6)


def test_prepend_dmp_trains_and_samples(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny(prompt_mode="prepend", num_prompts=16, topk=0.5, prompt_init="random", sample_steps=2).train()
    assert model.patch.prompt_embeddings.shape == (2, 16, 32) and model.patch.k == 8
    with caplog.at_level(logging.INFO):
        model.on_fit_start()
    assert "2 of 2 blocks patched with 16 prompts x 32 (prepended, top-8 of 16 gates, random init); +" in caplog.text
    torch.manual_seed(0)
    out = model.loss((torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, -1])))
    out["loss"].backward()
    assert {"balance", "load"} <= set(out) and torch.isfinite(out["loss"])
    for name, p in model.patch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.eval().sample(2).shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------ random initialisation

def test_random_init_is_xavier_uniform_and_seeded() -> None:
    def build(seed: int) -> MixtureOfPrompts:
        torch.manual_seed(seed)
        return MixtureOfPrompts(depth=4, num_tokens=64, hidden_size=32, init="random")

    patch = build(0)
    # Xavier-uniform U(-a, a), a = sqrt(6 / (fan_in + fan_out)); a [L, N, D] tensor has fan_in N*D, fan_out L*D.
    for tensor, bound in ((patch.prompt_embeddings, math.sqrt(6 / ((64 + 4) * 32))),
                          (patch.gate.weight, math.sqrt(6 / (33 + 64))), (patch.w_noise, math.sqrt(6 / (32 + 64)))):
        values = tensor.detach().flatten()
        assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound
        assert abs(values.var().item() / (bound**2 / 3) - 1) < 0.15  # U(-a, a) has variance a^2 / 3
    assert torch.equal(patch.gate.bias, torch.zeros(64))
    again, other = build(0), build(1)
    assert all(torch.equal(a, b) for a, b in zip(patch.parameters(), again.parameters()))
    assert not torch.equal(patch.prompt_embeddings, other.prompt_embeddings)
    assert MixtureOfPrompts(depth=1, num_tokens=8, hidden_size=16).prompt_embeddings.abs().sum() == 0  # default zero
    with pytest.raises(ConfigError, match="prompt_init must be one of zero, random"):
        MixtureOfPrompts(depth=1, num_tokens=8, hidden_size=16, init="normal")
    model = tiny(prompt_init="random").eval()  # no longer the pre-trained model at step 0
    x, t, y = inputs()
    assert model.patch.w_noise.abs().sum() > 0 and not torch.allclose(model.denoiser(x, t, y), model.net(x, t, y))


# ------------------------------------------------------------------------------------ original DMP checkpoints

BUILT: list[str] = []  # names of fake OmegaConf classes whose state a load set: must stay empty


def fake_omegaconf(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict], object]:
    """A ``DictConfig`` factory laid out as OmegaConf's in a pickle (module paths, NEWOBJ + BUILD, metadata holding
    ``typing.Any``, builtin types and a ``defaultdict``, nodes pointing back to their parent), so that a test writes a
    file like the reference's ``train.py`` without OmegaConf installed."""
    modules = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.base", "omegaconf.dictconfig",
                                                          "omegaconf.nodes")}

    class Node:
        def __setstate__(self, state: dict) -> None:
            BUILT.append(type(self).__name__)

    def place(cls: type, module: str) -> type:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
        return cls

    metadata = place(type("ContainerMetadata", (Node,), {}), "omegaconf.base")
    any_node = place(type("AnyNode", (Node,), {}), "omegaconf.nodes")
    dict_config = place(type("DictConfig", (Node,), {}), "omegaconf.dictconfig")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    def build(content: dict, parent: object = None) -> object:
        node = dict_config()
        meta = metadata()
        meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={"struct": True},
                             resolver_cache=collections.defaultdict(dict), key_type=typing.Any, element_type=int)
        node.__dict__.update(_metadata=meta, _parent=parent, _content={})
        for key, value in content.items():
            if isinstance(value, dict):
                node._content[key] = build(value, node)
            else:
                leaf = any_node()
                leaf.__dict__.update(_val=value, _parent=node, _metadata=None)
                node._content[key] = leaf
        return node

    return build


def reference_config(**vp) -> dict:
    return {"general": {"schedule_name": "linear", "gate_type": "linear"},
            "models": {"name": "DiT-S/2", "vp": {"num_tokens": 64, "topk": 1.0, "type": "add", "uncond": False,
                                                 "init_type": "zero", "gate_type": "linear", "pt_depth": 2, **vp}},
            "logs": {"results_dir": "results/${models.name}"}}


def reference_state(seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """A full DiT + patch state dict in the reference's key layout, every tensor random."""
    model = tiny(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    state = {**model.net.state_dict(), **model.patch.state_dict()}
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}


def test_an_original_dmp_checkpoint_is_imported_with_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    config = fake_omegaconf(monkeypatch)
    state = reference_state()
    path = tmp_path / "0050000.pt"
    torch.save({"model": state, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "config": config(reference_config())}, path)
    assert is_dmp_checkpoint(path) and not is_dmp_checkpoint(tmp_path / "none.pt")
    read = read_dmp_checkpoint(path)
    assert read.source == "model" and read.other == ["opt"] and not BUILT  # no class of the file was built
    assert read.config["models"]["vp"]["pt_depth"] == 2
    assert read.config["logs"]["results_dir"] == "results/${models.name}"  # interpolations stay text
    model = tiny(checkpoint=str(path))
    with caplog.at_level(logging.INFO):
        model.setup("fit")
    assert all(torch.equal(v, state[k]) for k, v in model.net.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in model.patch.state_dict().items())
    for line in ("imported the original DMP checkpoint", "run config: type='add', topk=1.0, gate_type='linear'",
                 "net.*: 32 DiT tensors", "patch.prompt_embeddings <- prompt_embeddings (2, 64, 32)",
                 "patch.gate.weight <- gate.weight (64, 33)", "patch.w_noise <- w_noise (32, 64)",
                 "not loaded: opt (the optimiser state: AdamW restarts)",
                 f"loaded original DMP model weights from {path}"):
        assert line in caplog.text
    x, t, y = inputs()
    assert not torch.allclose(model.eval().denoiser(x, t, y), model.net(x, t, y))  # the imported patch is in use
    # Further training saves only the patch, referring to the imported file as its base; loading re-imports it.
    with torch.no_grad():
        model.patch.prompt_embeddings.add_(1.0)
    saved = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
             "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(saved)
    assert set(saved["state_dict"]) == {f"patch.{k}" for k in model.patch.state_dict()}
    torch.save(saved, tmp_path / "patch.ckpt")
    restored = DMP.load_from_checkpoint(tmp_path / "patch.ckpt").eval()
    assert torch.equal(restored.denoiser(x, t, y), model.denoiser(x, t, y))
    # A bare state dict (the 'model' entry alone) imports the same, with no run config to check.
    torch.save(state, tmp_path / "bare.pt")
    bare = tiny(checkpoint=str(tmp_path / "bare.pt"))
    bare.load_weights(str(tmp_path / "bare.pt"))
    assert torch.equal(bare.patch.gate.weight, state["gate.weight"])
    report = load_dmp_checkpoint(bare.net, bare.patch, tmp_path / "bare.pt")
    assert report.source == "state_dict" and "run config: none in the file" in report.describe()


def test_an_original_dmp_checkpoint_of_other_settings_is_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = fake_omegaconf(monkeypatch)
    state = reference_state()
    path = tmp_path / "dmp.pt"

    def refused(model: DMP, message: str) -> None:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match=message):
            model.load_weights(str(path))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # all or nothing

    torch.save({"model": state, "config": config(reference_config(type="prepend", topk=0.5))}, path)
    refused(tiny(), r"type='prepend' there, 'add' here: set --model.init_args.prompt_mode; topk=0.5 there, 1.0 here")
    tiny(prompt_mode="prepend", topk=0.5).load_weights(str(path))  # matching settings load
    torch.save({"model": state, "config": config(reference_config())}, path)
    refused(tiny(schedule="cosine"), "schedule_name='linear' there, 'cosine' here")
    refused(tiny(patched_blocks=[1]), r"blocks 0-1 \(the reference's pt_depth 2\), this patch for blocks \[1\]: set "
                                      "--model.init_args.patched_blocks 2")
    torch.save({k: v for k, v in state.items() if not k.startswith("gate.")}, path)  # a PT run: no gate
    refused(tiny(), "has no gate .*: set --model.init_args.gating false")
    tiny(gating=False, noisy_gating=False).load_weights(str(path))
    torch.save({k: v[:, :, :16] if k == "prompt_embeddings" else v for k, v in state.items()}, path)
    refused(tiny(), r"prompt_embeddings is \(2, 64, 16\) there, \(2, 64, 32\) here")
    small = {k: v for k, v in reference_state(arch_overrides={**TINY, "depth": 1}).items()}
    torch.save(small, path)
    refused(tiny(), r"do not fit the DiT built here: 10 missing .*which looks like depth=1, hidden_size=32")
    # W_noise is used in training only: a model without gate noise skips it, one with it keeps its init if absent.
    torch.save(state, path)
    quiet = tiny(noisy_gating=False)
    assert "not loaded: w_noise (32, 64) (this patch has no gate noise" in load_dmp_checkpoint(
        quiet.net, quiet.patch, path).describe()
    torch.save({k: v for k, v in state.items() if k != "w_noise"}, path)
    model = tiny()
    report = load_dmp_checkpoint(model.net, model.patch, path)
    assert "kept at their initial values: patch.w_noise" in report.describe() and model.patch.w_noise.abs().sum() == 0
    # Globals outside the run config's are refused, as by any safe load.
    torch.save({"model": state, "config": {"args": argparse.Namespace(lr=1e-4)}}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        read_dmp_checkpoint(path)


def test_reference_label_tables_without_a_null_row(tmp_path: Path) -> None:
    # The reference's default uncond: true builds num_classes rows and no null row; its unconditional runs (FFHQ,
    # num_classes 1) feed label 0 to every sample, while ours use the null row: row 0 fills both rows.
    state = reference_state(num_classes=0)
    state["y_embedder.embedding_table.weight"] = torch.randn(1, 32)
    path = tmp_path / "ffhq.pt"
    torch.save(state, path)
    model = tiny(num_classes=0)
    report = load_dmp_checkpoint(model.net, model.patch, path, unconditional=True)
    table = model.net.y_embedder.embedding_table.weight
    assert table.shape == (2, 32) and torch.equal(table, state["y_embedder.embedding_table.weight"].expand(2, 32))
    assert "1 rows (1 class, no null row) in the file, 2 rows here: 2 from the file" in report.describe()
    # By hand: the reference's model, a table of one row and no null row (no class dropout), fed label 0.
    x, t, _ = inputs()
    plain = DMP(arch="DiT-S/2", arch_overrides=TINY, num_classes=1, resolution=16, channels=3, class_dropout_prob=0.0)
    plain.net.load_state_dict({k: state[k] for k in plain.net.state_dict()})
    plain.patch.load_state_dict({k: state[k] for k in plain.patch.state_dict()})
    plain.eval(), model.eval()
    assert torch.equal(model.denoiser(x, t, torch.full((6,), -1)), plain.denoiser(x, t, torch.zeros(6, dtype=int)))
    # A class-conditional model needs a null row for guidance: strict refuses, reuse keeps the class rows.
    state = reference_state()
    state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:20]
    torch.save(state, path)
    model = tiny()
    with pytest.raises(CheckpointError, match="20 classes and no null row .*set --model.init_args.label_table reuse"):
        model.load_weights(str(path))
    model = tiny(label_table="reuse")
    model.load_weights(str(path))
    table = model.net.y_embedder.embedding_table
    assert torch.equal(table.weight[:20], state["y_embedder.embedding_table.weight"])
    assert model.label_table_fit.fresh == 1 and table.weight.requires_grad  # the fresh null row trains


def test_cli_samples_from_an_original_dmp_checkpoint(shapes_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    config = fake_omegaconf(monkeypatch)
    path = tmp_path / "0050000.pt"
    torch.save({"model": reference_state(), "opt": {}, "config": config(reference_config())}, path)
    args = ["--config", str(REPO / "configs/dmp/shapes.yaml"), *CPU, "--model.init_args.arch", "DiT-S/2",
            "--model.init_args.arch_overrides", yaml.safe_dump(TINY), "--model.init_args.checkpoint", str(path),
            "--model.init_args.sample_steps", "2", "--data.init_args.path", str(shapes_zip),
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with caplog.at_level(logging.INFO):
        main(["predict", *args, "--data.init_args.predict_seeds", "0-1", "--writer.output_dir", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert "patch.prompt_embeddings <- prompt_embeddings (2, 64, 32)" in caplog.text
