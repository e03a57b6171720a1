"""DMP: exact start, frozen backbone, gates on the simplex, balance-loss formula, gate noise, patch checkpoints."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_transfer import DMP
from diffusion_transfer.cli import build_cli, main
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.peft_checkpoint import PEFT_KEY
from diffusion_transfer.methods.diffusion import dit_loss
from diffusion_transfer.methods.dmp import dmp_loss
from diffusion_transfer.nets import build_dit
from diffusion_transfer.nets.dmp import MixtureOfPrompts, balance_loss, select_blocks

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
        DMP(arch="ddpm-cifar10", arch_overrides={"model_channels": 16, "num_blocks": 1}, num_classes=20,
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
