"""Diff-Instruct: the IKL surrogate against the closed-form Gaussian gradient, the two phases, sampling, checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.cli import main
from diffusion_transfer.data import DiffusionDataModule, make_shapes
from diffusion_transfer.diffusion import EDM, EDMPrecond
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.methods import DiffInstruct, EDMDiffusion, edm_loss, ikl_surrogate_loss
from diffusion_transfer.nets import build_unet
from diffusion_transfer.nets.generator import DCGANGenerator

TINY = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
        "augment_dim": 0}
QUIET = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
         "enable_model_summary": False, "limit_val_batches": 0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes.zip"
    make_shapes(path, resolution=16, per_class=4, seed=0)
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny EDMDiffusion checkpoint (one training step from perturbed weights), as configs/edm/shapes.yaml writes."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = EDMDiffusion(arch_overrides=TINY, num_classes=20, resolution=16, val_num_images=0)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    L.Trainer(max_steps=1, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, filename="teacher")],
              **QUIET).fit(model, DiffusionDataModule(str(shapes), batch_size=8))
    return folder / "teacher.ckpt"


def tiny(**kwargs) -> DiffInstruct:
    return DiffInstruct(**{"arch_overrides": TINY, "num_classes": 20, "resolution": 16, "val_num_images": 0, **kwargs})


# ------------------------------------------------------------------------------------------------ the maths


def expected_sigma_ratio(p_mean: float = -1.2, p_std: float = 1.2) -> float:
    """E[σ²/(1+σ²)] for ln σ ~ N(p_mean, p_std²), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sigma2 = np.exp(2 * (p_mean + p_std * nodes))
    return float((weights * sigma2 / (1 + sigma2)).sum() / math.sqrt(2 * math.pi))


def test_surrogate_gradient_is_the_sigma2_weighted_ikl_gradient() -> None:
    # Spec 8.1, one θ per pixel: generator x = θ + ε (p_θ = N(θ, 1)), teacher q = N(0, 1), exact denoiser of each.
    ratio = expected_sigma_ratio()
    assert ratio == pytest.approx(0.20944, abs=1e-5)  # the spec's quadrature value
    precond = EDMPrecond()
    theta = torch.tensor([0.7, -1.5], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    n = 2_000_000
    eps, noise = torch.randn(n, 1, 1, 2, generator=gen, dtype=torch.float64), torch.randn(n, 1, 1, 2, generator=gen,
                                                                                         dtype=torch.float64)
    sigma = (torch.randn(n, generator=gen, dtype=torch.float64) * precond.P_std + precond.P_mean).exp()
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    teacher = lambda x_t, s: x_t / (1 + s2)  # noqa: E731 - D_q of N(0, 1) data
    fake = lambda x_t, s: theta.detach() + (x_t - theta.detach()) / (1 + s2)  # noqa: E731 - D_p of N(θ, 1)
    loss = ikl_surrogate_loss(theta + eps, teacher, fake, precond, sigma=sigma, noise=noise)["loss"]
    (surrogate,) = torch.autograd.grad(loss, theta)
    # The same σ draws in d/dθ E_σ[σ² KL(N(θ, 1+σ²) ‖ N(0, 1+σ²))], KL = θ²/(2(1+σ²)) per pixel: exact agreement.
    kl = (s2 * theta**2 / (2 * (1 + s2))).mean(0).sum()
    (analytic,) = torch.autograd.grad(kl, theta)
    assert torch.allclose(surrogate, analytic, rtol=1e-10, atol=1e-12)
    # Against the quadrature θ E[σ²/(1+σ²)] (θ = 0.7 -> 0.14661): within Monte-Carlo error (< 1%, ~1e-4 here).
    closed = theta.detach() * ratio
    assert torch.allclose(surrogate, closed, rtol=0.01, atol=3e-4)
    assert float(surrogate.flatten()[0]) == pytest.approx(0.14661, abs=5e-4)
    # Descending it (with the fake score tracking p_θ exactly) moves θ monotonically toward the teacher's mean 0.
    theta_1d, path = torch.tensor(2.0, requires_grad=True), []
    optimizer = torch.optim.SGD([theta_1d], lr=1.0)
    for _ in range(30):
        x, mean = theta_1d + torch.randn(4096, 1, generator=gen), theta_1d.detach().clone()
        fake_1d = lambda x_t, s, t=mean: t + (x_t - t) / (1 + s.view(-1, 1) ** 2)  # noqa: E731
        optimizer.zero_grad()
        ikl_surrogate_loss(x, lambda x_t, s: x_t / (1 + s.view(-1, 1) ** 2), fake_1d, precond)["loss"].backward()
        optimizer.step()
        path.append(float(theta_1d.detach()))
    assert all(b < a for a, b in zip([2.0, *path], path)) and 0 < path[-1] < 0.02  # ≈ 2 (1 - 0.209)^30 = 0.01


def test_one_dropout_mask_for_both_score_nets() -> None:
    # Spec 8.2: fake score = teacher with dropout on -> d_fake - d_real = 0 exactly with a shared mask, not without.
    process = EDM()
    torch.manual_seed(0)
    teacher = build_unet("ddpmpp-cifar10", img_resolution=8, label_dim=0, **{**TINY, "dropout": 0.5}).train()
    with torch.no_grad():  # the zero-initialised convolutions after the dropout would hide its mask
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fake = copy.deepcopy(teacher)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    grads = []
    for shared in (True, False):
        loss = ikl_surrogate_loss(x, lambda x_t, s: process.denoise(teacher, x_t, s),
                                  lambda x_t, s: process.denoise(fake, x_t, s), process.precond,
                                  shared_randomness=shared)["loss"]
        grads.append(torch.autograd.grad(loss, x)[0])
    assert torch.equal(grads[0], torch.zeros_like(x)) and grads[1].abs().max() > 1e-3


def test_phase_a_is_the_edm_loss_and_phase_b_only_reaches_the_generator() -> None:
    torch.manual_seed(0)
    model = tiny(sgls=2.0, ls=3.0, init_sigma=2.5, arch_overrides={**TINY, "dropout": 0.2})
    with torch.no_grad():
        for p in model.fake_score.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    labels, process = torch.tensor([1, 5, 7]), model.process
    with torch.random.fork_rng():
        torch.manual_seed(1)
        phase_a = model.fake_score_loss(labels, 3)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        z = torch.randn(3, 3, 16, 16)
        with torch.no_grad():  # the generator in eval mode: x = D_θ(σ_init z; σ_init)
            x = process.denoise(model.generator.net.eval(), 2.5 * z, 2.5, labels)
        expected = 2.0 * edm_loss(model.fake_score.train(), process, x, labels)["loss"]
    assert torch.equal(phase_a, expected)
    nan_images = torch.full((3, 3, 16, 16), float("nan"))  # data-free: the images of a batch are never read
    assert all(torch.isfinite(v) for v in model.loss((nan_images, labels)).values())
    phase_a.backward()
    assert all(p.grad is None for p in model.generator.parameters())
    # Phase B: gradient = that of ls · Σ_pixels sg(d_fake - d_real) x; nothing reaches the teacher or the fake score.
    model.fake_score.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model.generator_loss(labels, 3).backward()
    got = [p.grad.clone() for p in model.generator.parameters()]
    assert all(p.grad is None for p in [*model.net.parameters(), *model.fake_score.parameters()])
    model.generator.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        x = process.denoise(model.generator.net.train(), 2.5 * torch.randn(3, 3, 16, 16), 2.5, labels)
        sigma, noise = process.precond.sample_sigma(3), torch.randn(3, 3, 16, 16)
        x_t = x.detach() + sigma.view(-1, 1, 1, 1) * noise
        with torch.no_grad(), torch.random.fork_rng():
            d_real = process.denoise(model.net.train(), x_t, sigma, labels)
        with torch.no_grad():
            d_fake = process.denoise(model.fake_score.train(), x_t, sigma, labels)
        (3.0 * ((d_fake - d_real) * x).sum((1, 2, 3)).mean()).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, model.generator.parameters()))
    assert max(float(g.abs().max()) for g in got) > 0


# ------------------------------------------------------------------------------------------------ the method


def test_fit_keeps_the_teacher_and_round_trips_init_sigma(shapes: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    model = tiny(checkpoint=str(teacher_ckpt), init_sigma=2.5, lr=1e-3, glr=1e-3)
    ema = TrainableEMA(halflife_kimg=0.05)
    trainer = L.Trainer(max_steps=6, callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path,
                                                                                         filename="di")], **QUIET)
    trainer.fit(model, DiffusionDataModule(str(shapes), batch_size=8))
    # Two Adams with betas (0, 0.999), eps 1e-8, lr and glr; 6 optimizer steps = 3 iterations = 3 EMA updates.
    fake_opt, gen_opt = (o.param_groups[0] for o in trainer.optimizers)
    assert (fake_opt["betas"], fake_opt["eps"], fake_opt["lr"], gen_opt["lr"]) == ((0.0, 0.999), 1e-8, 1e-3, 1e-3)
    assert ema.submodule == "generator" and ema.num_updates == 3
    assert all(k.startswith("generator.") for k in ema.shadow)
    # The teacher never changes; the fake score and the generator started from it and moved.
    assert all(torch.equal(model.net.state_dict()[k[len("net."):]], v) for k, v in teacher.items() if k[:4] == "net.")
    net = {k[len("net."):]: v for k, v in teacher.items() if k.startswith("net.")}
    assert any(not torch.equal(v, net[k]) for k, v in model.fake_score.state_dict().items())
    assert any(not torch.equal(v, net[k]) for k, v in model.generator.net.state_dict().items())
    # Round trip: σ_init comes back from the checkpoint, and sampling with another σ_init is refused.
    checkpoint = torch.load(tmp_path / "di.ckpt", weights_only=True)
    assert checkpoint["init_sigma"] == 2.5
    loaded = DiffInstruct.load_from_checkpoint(tmp_path / "di.ckpt")
    images = loaded.sample(seeds=[3, 4], labels=[0, 9])
    assert loaded.init_sigma == 2.5 and torch.equal(images, model.sample(seeds=[3, 4], labels=[0, 9]))
    other = tiny(init_sigma=1.0)
    with pytest.warns(UserWarning, match="trained with init_sigma=2.5"):
        other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])
    assert other.generator.init_sigma == 2.5 and torch.equal(other.sample(seeds=[3, 4], labels=[0, 9]), images)
    with pytest.raises(ValueError, match="trained with init_sigma=2.5 and cannot be sampled with 1.0"):
        loaded.sample(seeds=[3], init_sigma=1.0)


def test_one_step_and_teacher_sampling(teacher_ckpt: Path) -> None:
    model = tiny(checkpoint=str(teacher_ckpt))
    model.setup("predict")
    images = model.sample(seeds=[1, 2, 3], labels=[4, 5, 6])
    assert images.shape == (3, 3, 16, 16) and torch.equal(model.sample(seeds=[1, 2, 3], labels=[4, 5, 6]), images)
    assert torch.allclose(model.sample(seeds=[2], labels=[5])[0], images[1], atol=1e-5)  # only its own seed counts
    assert not torch.allclose(model.sample(seeds=[9], labels=[5])[0], images[1], atol=0.05)
    # One pass at σ_init = 1: x = 0.2 z + 0.4472 F(0.8944 z; c_noise = 0) with the teacher's weights (spec 2.2).
    z, labels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([4, 5])
    with torch.no_grad():
        expected = 0.2 * z + 0.4472136 * model.net.eval()(0.8944272 * z, torch.zeros(2), labels)
        assert torch.allclose(model.eval().generate(z, labels, []), expected, atol=1e-5)
    # The teacher's own EDM Heun sampling stays available: identical to EDMDiffusion with the teacher's weights.
    edm = EDMDiffusion(arch_overrides=TINY, num_classes=20, resolution=16, val_num_images=0)
    edm.net.load_state_dict(model.net.state_dict())
    heun = model.sample(seeds=[1, 2], labels=[4, 5], sampler="heun", steps=3)
    assert torch.equal(heun, edm.sample(seeds=[1, 2], labels=[4, 5], steps=3))
    assert not torch.allclose(heun, images[:2], atol=0.05)


def test_dcgan_generator_variant(teacher_ckpt: Path) -> None:
    model = tiny(checkpoint=str(teacher_ckpt), generator="dcgan", generator_overrides={"z_dim": 8,
                                                                                        "base_channels": 8})
    model.setup("fit")
    assert isinstance(model.generator, DCGANGenerator) and model.generator.latent_shape == (8,)
    images = model.sample(seeds=[1, 2], labels=[3, 3])
    assert images.shape == (2, 3, 16, 16)
    assert torch.allclose(model.sample(seeds=[2], labels=[3])[0], images[1], atol=1e-5)
    loss = model.generator_loss(torch.tensor([0, 1]), 2)
    loss.backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    with pytest.raises(ValueError, match="resolution must be 4"):
        DCGANGenerator(resolution=12)


def test_bad_inputs_are_clear_errors(teacher_ckpt: Path, shapes: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads weights"):
        tiny(checkpoint=str(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl")).setup("fit")
    saved = torch.load(teacher_ckpt, weights_only=True)
    not_edm = {"state_dict": saved["state_dict"], "hyper_parameters": {"resolution": 16}}  # e.g. a Gaussian UNet
    torch.save(not_edm, tmp_path / "ddpm.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of an EDM denoiser"):
        tiny(checkpoint=str(tmp_path / "ddpm.ckpt")).setup("fit")
    torch.save({**saved, "hyper_parameters": {**saved["hyper_parameters"], "resolution": 8}}, tmp_path / "t8.ckpt")
    with pytest.raises(CheckpointError, match=r"works at 8x8 but the generator makes 16x16"):
        tiny(checkpoint=str(tmp_path / "t8.ckpt")).setup("fit")
    with pytest.raises(CheckpointError, match="was trained with EDMPrecond"):
        tiny(checkpoint=str(teacher_ckpt), precond="ve").setup("fit")
    with pytest.raises(ValueError, match="unknown generator 'stylegan'"):
        tiny(generator="stylegan")
    with pytest.raises(ValueError, match="does not take optimizer"):
        tiny(optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="set ema.submodule to 'generator'"):
        L.Trainer(max_steps=2, callbacks=[TrainableEMA(submodule="fake_score")], **QUIET).fit(
            tiny(checkpoint=str(teacher_ckpt)), DiffusionDataModule(str(shapes), batch_size=4))
    with pytest.raises(CheckpointError, match="needs a teacher to fit"):
        L.Trainer(max_steps=2, **QUIET).fit(tiny(), DiffusionDataModule(str(shapes), batch_size=4))


def test_cli_fit_then_predict(shapes: Path, teacher_ckpt: Path, tmp_path: Path, capsys) -> None:
    model = {"arch_overrides": TINY, "checkpoint": str(teacher_ckpt), "lr": 1e-4, "glr": 1e-4, "val_num_images": 4}
    config = {"model": {"class_path": "DiffInstruct", "init_args": model},
              "data": {"class_path": "DiffusionDataModule", "init_args": {"path": str(shapes), "batch_size": 8}},
              "ema": {"halflife_kimg": 0.05, "submodule": "generator"},
              "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 1,
                          "enable_progress_bar": False, "default_root_dir": str(tmp_path / "runs"), "callbacks": [
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(tmp_path), "filename": "di"}}]}}
    (tmp_path / "di.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "di.yaml")])
    assert "checkpoint:" in capsys.readouterr().out and torch.load(tmp_path / "di.ckpt")["global_step"] == 4
    main(["predict", "--config", str(tmp_path / "di.yaml"), "--ckpt_path", str(tmp_path / "di.ckpt"),
          "--model.init_args.checkpoint", "null", "--data.init_args.predict_seeds", "0-2",
          "--writer.output_dir", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{s:06d}.png" for s in range(3)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "di.yaml"), "--model.init_args.checkpoint", str(tmp_path / "no.pkl")])
    assert exit_info.value.code == 2 and "no.pkl" in capsys.readouterr().err
