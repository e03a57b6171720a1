"""Diff-Instruct: the IKL surrogate against the closed-form Gaussian gradient, the two phases, sampling, checkpoints,
the EMA interval, 2-process CPU DDP."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.callbacks.writer import to_uint8
from diffusion_transfer.cli import main
from diffusion_transfer.data import DiffusionDataModule, make_shapes
from diffusion_transfer.diffusion import EDM, EDMPrecond
from diffusion_transfer.errors import ConfigError
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
    teacher = lambda x_t, s: x_t / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731 - D_q of N(0, 1) data
    fake = lambda x_t, s: theta.detach() + (x_t - theta.detach()) / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
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


def expected_over_sigma(f, p_mean: float = -1.2, p_std: float = 1.2) -> np.ndarray:
    """E[f(σ²)] for ln σ ~ N(p_mean, p_std²), by Gauss-Hermite quadrature (f maps an array of σ² to [nodes, ...])."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    values = f(np.exp(2 * (p_mean + p_std * nodes))[:, None])
    return (weights[:, None] * values).sum(0) / math.sqrt(2 * math.pi)


def test_surrogate_gradient_for_a_non_unit_variance_generator() -> None:
    # p_θ,a = N(θ, a²) per pixel (x = θ + a z), teacher q = N(0, 1), the exact denoisers at the σ they are passed:
    # D_p(x_t; σ) = θ + a²/(a²+σ²) (x_t - θ), D_q(x_t; σ) = x_t/(1+σ²). With a ≠ 1 the difference depends on x_t and
    # σ, so the σ handed to the nets and the ∂x/∂a path both matter. Target: ∇ E_σ[σ² KL(N(θ, a²+σ²) ‖ N(0, 1+σ²))].
    precond = EDMPrecond()
    theta = torch.tensor([0.7, -1.5], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_(True)
    a = torch.tensor([0.5, 1.8], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_(True)
    gen, half = torch.Generator().manual_seed(1), 1_000_000
    z, noise = (torch.randn(half, 1, 1, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    z, noise = torch.cat([z, -z]), torch.cat([noise, -noise])  # antithetic pairs (same σ): exact θ-gradient
    sigma = (torch.randn(half, generator=gen, dtype=torch.float64) * precond.P_std + precond.P_mean).exp().repeat(2)
    seen = {}

    def teacher(x_t, s):
        seen["x_t"], seen["sigma"] = x_t, s
        return x_t / (1 + s.view(-1, 1, 1, 1) ** 2)

    def fake(x_t, s):
        t, var = theta.detach(), a.detach() ** 2
        return t + var / (var + s.view(-1, 1, 1, 1) ** 2) * (x_t - t)

    x = theta + a * z
    loss = ikl_surrogate_loss(x, teacher, fake, precond, sigma=sigma, noise=noise)["loss"]
    g_theta, g_a = torch.autograd.grad(loss, [theta, a])
    # The nets saw x_t = sg(x) + σ n and that σ (the linear denoisers alone cannot see the noise scale).
    assert torch.equal(seen["sigma"], sigma) and torch.equal(seen["x_t"], x.detach() + sigma.view(-1, 1, 1, 1) * noise)
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    var, var_q = a**2 + s2, 1 + s2
    kl = 0.5 * (var / var_q + theta**2 / var_q - 1 - torch.log(var / var_q))
    e_theta, e_a = torch.autograd.grad((s2 * kl).mean(0).sum(), [theta, a])
    assert torch.allclose(g_theta, e_theta, rtol=1e-9, atol=1e-12)
    # ∂/∂a: the same σ draws, within the Monte-Carlo error of z and n (its standard error from the pairs).
    with torch.no_grad():
        per_sample = (fake(x.detach() + sigma.view(-1, 1, 1, 1) * noise, sigma) - teacher(
            x.detach() + sigma.view(-1, 1, 1, 1) * noise, sigma)) * z
        pairs = (per_sample[:half] + per_sample[half:]) / 2
        stderr = pairs.std(0) / math.sqrt(half)
    assert torch.allclose(g_a, pairs.mean(0, keepdim=True), rtol=1e-9)
    assert ((g_a - e_a).abs() < 5 * stderr).all() and (e_a.abs() > 100 * stderr).all()  # tight and not trivial
    assert torch.equal(g_a.sign(), (a.detach() - 1).sign())  # descent moves a toward the teacher's unit scale
    # Against the expectation over σ by quadrature: ∂θ = θ E[σ²/(1+σ²)], ∂a = a E[σ² (1/(1+σ²) - 1/(a²+σ²))].
    th, av = theta.detach().flatten().numpy(), a.detach().flatten().numpy()
    closed_theta = th * expected_over_sigma(lambda v: v / (1 + v))
    closed_a = av * expected_over_sigma(lambda v: v * (1 / (1 + v) - 1 / (av**2 + v)))
    np.testing.assert_allclose(g_theta.flatten().numpy(), closed_theta, rtol=0.01)
    np.testing.assert_allclose(g_a.flatten().numpy(), closed_a, rtol=0.01)
    # A wrong σ for the nets (σ² instead of σ: D_p and D_q at the wrong noise level) gives another gradient.
    loss = ikl_surrogate_loss(theta + a * z, lambda x_t, s: teacher(x_t, s**2), lambda x_t, s: fake(x_t, s**2), precond,
                              sigma=sigma, noise=noise)["loss"]
    wrong = torch.autograd.grad(loss, [theta, a])
    assert not torch.allclose(wrong[0], e_theta, rtol=0.05) and not torch.allclose(wrong[1], e_a, rtol=0.05)


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
        expected = 2.0 * edm_loss(model.fake_score.train(), process, x, labels, reduction="sum")["loss"]
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


def test_phase_a_sums_over_pixels_and_its_first_adam_step() -> None:
    # Spec 2.3 A.5: Σ over pixels, mean over the batch. Under Adam the sum is not the mean times a constant that
    # cancels: eps meets a gradient C·H·W = 768 times larger.
    torch.manual_seed(0)
    model = tiny(sgls=1.5, lr=1e-2, eps=1e-3)  # a large eps, so that the reduction visibly changes the step
    with torch.no_grad():
        for p in model.fake_score.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    process, labels, pixels = model.process, torch.tensor([2, 4, 6, 8]), 3 * 16 * 16
    x0 = torch.randn(4, 3, 16, 16)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        summed = edm_loss(model.fake_score, process, x0, labels, reduction="sum")["loss"]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        mean = edm_loss(model.fake_score, process, x0, labels)["loss"]
    assert torch.allclose(summed, pixels * mean, rtol=1e-5)
    # The first step of the fake score's Adam (betas (0, 0.999)): m = g, v̂ = g², so Δ = -lr g / (|g| + eps), with g
    # the gradient of sgls · mean_b Σ_pixels λ(σ) (D_φ(x + σn; σ) - x)², computed here from the draws.
    params = [p for p in model.fake_score.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        with torch.no_grad():
            x = process.denoise(model.generator.net.eval(), torch.randn(4, 3, 16, 16), 1.0, labels)
        sigma = process.precond.sample_sigma(4)
        noise = torch.randn_like(x)
        model.fake_score.train()
        d = process.denoise(model.fake_score, x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels)
        weight = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
        by_hand = 1.5 * (weight.view(-1, 1, 1, 1) * (d - x) ** 2).sum((1, 2, 3)).mean()
    grads = torch.autograd.grad(by_hand, params)
    opt_score = model.configure_optimizers()[0]
    with torch.random.fork_rng():
        torch.manual_seed(7)  # the same draws
        opt_score.zero_grad()
        model.fake_score_loss(labels, 4).backward()
        opt_score.step()
    for p, p0, g in zip(params, before, grads):
        assert torch.allclose(p.detach(), p0 - 1e-2 * g / (g.abs() + 1e-3), atol=1e-7, rtol=1e-5)
    # The per-pixel mean (the former reduction) would have taken a measurably different step.
    assert any(not torch.allclose(p.detach(), p0 - 1e-2 * (g / pixels) / (g.abs() / pixels + 1e-3), atol=1e-5)
               for p, p0, g in zip(params, before, grads))


def recorded_augment_labels(*modules: torch.nn.Module) -> list[list]:
    """For each module, a list that collects the augment labels of its calls (``net(x, c_noise, labels, augment)``)."""
    seen: list[list] = [[] for _ in modules]
    for module, store in zip(modules, seen):
        module.register_forward_pre_hook(lambda m, args, store=store: store.append(args[3]))
    return seen


def test_phase_a_augments_the_generator_samples_when_the_teacher_has_augment_labels() -> None:
    from diffusion_transfer.diffusion.augment import AugmentPipe

    # Spec 2.3 A.2 and 6: p = 0.12 when the teacher has augment_dim 9; off without augment input; 0 switches it off.
    assert tiny().augment_pipe is None and tiny(arch_overrides={**TINY, "augment_dim": 9}, augment_p=0).augment_pipe \
        is None
    torch.manual_seed(0)
    model = tiny(arch_overrides={**TINY, "augment_dim": 9, "dropout": 0.1}, sgls=2.0)
    assert model.augment_pipe.p == 0.12 and model.hparams.augment_p is None
    with torch.no_grad():
        for p in model.fake_score.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fake_seen, teacher_seen = recorded_augment_labels(model.fake_score, model.net)
    labels = torch.arange(16) % 20
    with torch.random.fork_rng():
        torch.manual_seed(4)
        phase_a = model.fake_score_loss(labels, 16)
    with torch.random.fork_rng():  # by hand: generator samples, EDM's augmentation, then the summed EDM loss
        torch.manual_seed(4)
        with torch.no_grad():
            x = model.process.denoise(model.generator.net.eval(), torch.randn(16, 3, 16, 16), 1.0, labels)
        y, augment_labels = AugmentPipe(0.12)(x)
        expected = 2.0 * edm_loss(model.fake_score.train(), model.process, y, labels, augment_labels,
                                  reduction="sum")["loss"]
    assert torch.equal(phase_a, expected)
    assert torch.equal(fake_seen[0], augment_labels) and bool(augment_labels.abs().sum(1).gt(0).any())
    assert not teacher_seen  # phase A never calls the teacher
    fake_seen.clear()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model.generator_loss(labels, 16)
    assert fake_seen == [None] and teacher_seen == [None]  # phase B: no augmentation (zero labels)


def test_attention_blocks_leave_nchw_activations_so_dropout_drops_the_originals_elements() -> None:
    # EDM's activations stay contiguous NCHW; dropout draws its mask in memory order, so a layout change (with one
    # head, our attention reshape is a channels-last view) drops other elements for the same seed.
    from diffusion_transfer.nets.unet import UNetBlock

    torch.manual_seed(0)
    attn = UNetBlock(16, 16, 8, attention=True, num_heads=1, dropout=0.3, skip_scale=0.5**0.5, adaptive_scale=False)
    after = UNetBlock(16, 16, 8, dropout=0.3, adaptive_scale=False)
    with torch.no_grad():  # the blocks' convolutions are uninitialised until a U-Net initialises them
        for p in [*attn.parameters(), *after.parameters()]:
            p.copy_(torch.randn_like(p) * 0.2)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        mid = attn(x, emb)
        out = after(mid, emb)
    with torch.random.fork_rng():  # the reference: the same computation on contiguous tensors
        torch.manual_seed(1)
        reference = after(attn(x, emb).contiguous(), emb)
    assert mid.is_contiguous() and torch.equal(out, reference)
    # Eval mode: the block against the attention written out (the qkv channels laid out (heads, C/heads, 3)).
    attn.eval()
    with torch.no_grad():
        h = F.silu(attn.norm1(attn.conv0(F.silu(attn.norm0(x))) + attn.affine(emb)[:, :, None, None]))
        h = (attn.conv1(h) + x) * 0.5**0.5
        q, k, v = attn.qkv(attn.norm2(h)).reshape(2, 16, 3, 16).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q, k / 4).softmax(dim=2)
        expected = (attn.proj(torch.einsum("nqk,nck->ncq", weights, v).reshape(2, 16, 4, 4)) + h) * 0.5**0.5
        got = attn(x, emb)
    assert got.is_contiguous() and torch.allclose(got, expected, atol=1e-5)
    # A whole U-Net in train mode: the same output as with every block's output made contiguous.
    net = build_unet("ddpmpp-cifar10", img_resolution=8, label_dim=0, **{**TINY, "dropout": 0.2,
                                                                         "attn_resolutions": [8, 4]}).train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, noise = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.3])
    with torch.random.fork_rng():
        torch.manual_seed(2)
        out = net(x, noise)
    hooks = [m.register_forward_hook(lambda m, args, output: output.contiguous()) for m in net.modules()
             if isinstance(m, UNetBlock)]
    with torch.random.fork_rng():
        torch.manual_seed(2)
        reference = net(x, noise)
    for hook in hooks:
        hook.remove()
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------------------------ the method


class _AtTrainStart(L.Callback):
    """Copies of the three nets and of the EMA shadow when training starts (after setup and on_fit_start)."""

    def __init__(self, ema: TrainableEMA) -> None:
        self.ema = ema

    def on_train_start(self, trainer: L.Trainer, pl_module: DiffInstruct) -> None:
        self.nets = {name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in (
            ("net", pl_module.net), ("fake_score", pl_module.fake_score), ("generator", pl_module.generator.net))}
        self.shadow = {k: v.clone() for k, v in self.ema.shadow.items()}


def test_fit_keeps_the_teacher_and_round_trips_init_sigma(shapes: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    net = {k[len("net."):]: v for k, v in teacher.items() if k.startswith("net.")}
    model = tiny(checkpoint=str(teacher_ckpt), init_sigma=2.5, lr=1e-3, glr=1e-3)
    assert any(not torch.equal(v, net[k]) for k, v in model.fake_score.state_dict().items())  # random until setup
    ema = TrainableEMA(halflife_kimg=0.05)
    start = _AtTrainStart(ema)
    trainer = L.Trainer(max_steps=6, callbacks=[ema, start, L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="di")], **QUIET)
    trainer.fit(model, DiffusionDataModule(str(shapes), batch_size=8))
    # Spec 8.10: teacher, fake score, teacher-shaped generator and the generator's EMA all start as the teacher file.
    for name, state in start.nets.items():
        assert state.keys() == net.keys() and all(torch.equal(v, net[k]) for k, v in state.items()), name
    params = dict(model.generator.net.named_parameters())
    assert start.shadow.keys() == {f"generator.net.{k}" for k in params}
    assert all(torch.equal(v, net[k[len("generator.net."):]]) for k, v in start.shadow.items())
    # Two Adams with betas (0, 0.999), eps 1e-8, lr and glr; 6 optimizer steps = 3 iterations = 3 EMA updates.
    fake_opt, gen_opt = (o.param_groups[0] for o in trainer.optimizers)
    assert (fake_opt["betas"], fake_opt["eps"], fake_opt["lr"], gen_opt["lr"]) == ((0.0, 0.999), 1e-8, 1e-3, 1e-3)
    assert ema.submodule == "generator" and ema.num_updates == 3
    assert all(k.startswith("generator.") for k in ema.shadow)
    # The teacher never changes; the fake score and the generator started from it and moved.
    assert all(torch.equal(model.net.state_dict()[k[len("net."):]], v) for k, v in teacher.items() if k[:4] == "net.")
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
    # Phase B draws σ from the precond's law: only EDM's LN(-1.2, 1.2²) is Diff-Instruct (spec 2.3, 3.1).
    for precond in ("vp", "ve"):
        with pytest.raises(ConfigError, match=f"needs precond: edm .*not '{precond}'"):
            tiny(checkpoint=str(teacher_ckpt), precond=precond)
    # A bare state dict loads, with a warning: neither its preconditioning nor its resolution can be checked.
    torch.save({k[len("net."):]: v for k, v in saved["state_dict"].items() if k.startswith("net.")},
               tmp_path / "teacher.pt")
    bare = tiny(checkpoint=str(tmp_path / "teacher.pt"))
    with pytest.warns(UserWarning, match=r"bare state dict, so neither its preconditioning .* can be verified"):
        bare.setup("fit")
    assert all(torch.equal(v, bare.net.state_dict()[k]) for k, v in bare.fake_score.state_dict().items())
    with pytest.raises(ConfigError, match="unknown generator 'stylegan'"):
        tiny(generator="stylegan")
    with pytest.raises(ConfigError, match="does not take optimizer"):
        tiny(optimizer=torch.optim.SGD)
    with pytest.raises(ConfigError, match="set ema.submodule to 'generator'"):
        L.Trainer(max_steps=2, callbacks=[TrainableEMA(submodule="fake_score")], **QUIET).fit(
            tiny(checkpoint=str(teacher_ckpt)), DiffusionDataModule(str(shapes), batch_size=4))
    with pytest.raises(CheckpointError, match="needs a teacher to fit"):
        L.Trainer(max_steps=2, **QUIET).fit(tiny(), DiffusionDataModule(str(shapes), batch_size=4))



def test_non_finite_loss_hint_names_the_learning_rates_only(teacher_ckpt: Path, shapes: Path) -> None:
    # Lightning refuses gradient clipping under manual optimisation, so the hint must not suggest it.
    model = tiny(checkpoint=str(teacher_ckpt))
    with pytest.raises(L.fabric.utilities.exceptions.MisconfigurationException, match="gradient clipping"):
        L.Trainer(max_steps=2, gradient_clip_val=1.0, **QUIET).fit(model, DiffusionDataModule(str(shapes),
                                                                                              batch_size=4))
    for phase in ("fake_score_loss", "generator_loss"):
        model = tiny(checkpoint=str(teacher_ckpt))
        setattr(model, phase, lambda labels, n: torch.tensor(float("inf")))
        with pytest.raises(FloatingPointError) as error:
            L.Trainer(max_steps=2, **QUIET).fit(model, DiffusionDataModule(str(shapes), batch_size=4))
        expected = (f"DiffInstruct: the {phase} is inf at step {0 if phase == 'fake_score_loss' else 1}; "
                    "lower the learning rates (model.init_args.lr / glr)")
        assert str(error.value) == expected


def test_ema_decays_once_per_iteration_for_the_images_since_its_last_update() -> None:
    # DiffInstruct takes two optimizer steps per batch, so global_step advances by 2 per iteration. EDM's EMA decays
    # by β = 0.5^(images / h) for the images since the previous update, however often it updates; images are
    # counted once per iteration (spec 2.3). Here h = 8 images, batch 4, no ramp-up, 6 iterations.
    batch, iterations, halflife = (torch.zeros(4, 1),), 6, 8.0
    for every, updates in ((1, 6), (2, 6), (3, 4), (4, 3)):
        module = torch.nn.Linear(1, 1, bias=False)
        trainer = SimpleNamespace(global_step=0, world_size=1, accumulate_grad_batches=1)
        ema = TrainableEMA(halflife_kimg=halflife / 1000, rampup_ratio=None, update_every_n_steps=every)
        with torch.no_grad():
            module.weight.fill_(0.0)
        ema.on_fit_start(trainer, module)
        shadow, pending = 0.0, 0
        for i in range(1, iterations + 1):
            with torch.no_grad():
                module.weight.fill_(float(i))  # the raw weight after iteration i
            trainer.global_step += 2
            ema.on_train_batch_end(trainer, module, None, batch, i - 1)
            pending += 4
            if trainer.global_step // every != (trainer.global_step - 2) // every:  # a multiple of `every` passed
                shadow += (1 - 0.5 ** (pending / halflife)) * (i - shadow)
                pending = 0
            assert float(ema.shadow["weight"]) == pytest.approx(shadow, rel=1e-6), (every, i)
        assert ema.num_updates == updates and ema.images_seen == 4 * iterations and pending == 0
        # Every interval ends on iteration 6: the decays multiply to 0.5^(24 / 8), the one-batch-per-update value.
        with torch.no_grad():
            module.weight.fill_(0.0)
        ema.on_fit_start(SimpleNamespace(global_step=100), module)  # keeps the shadow, restarts the step count
        ema.shadow["weight"].fill_(1.0)
        trainer = SimpleNamespace(global_step=100, world_size=1, accumulate_grad_batches=1)
        for i in range(iterations):
            trainer.global_step += 2
            ema.on_train_batch_end(trainer, module, None, batch, i)
        assert float(ema.shadow["weight"]) == pytest.approx(0.5 ** 3, rel=1e-6), every


def test_cli_fit_then_predict_and_validate_without_the_teacher_file(shapes: Path, teacher_ckpt: Path, tmp_path: Path,
                                                                   capsys) -> None:
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(teacher_ckpt.read_bytes())
    model = {"arch_overrides": TINY, "checkpoint": str(teacher), "lr": 1e-4, "glr": 1e-4, "val_num_images": 4}
    config = {"model": {"class_path": "DiffInstruct", "init_args": model},
              "data": {"class_path": "DiffusionDataModule", "init_args": {"path": str(shapes), "batch_size": 8}},
              "ema": {"halflife_kimg": 0.05, "submodule": "generator"},
              # float32 pinned: the PNGs are compared byte for byte with a float32 sample() below.
              "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 1,
                          "precision": "32-true",
                          "enable_progress_bar": False, "default_root_dir": str(tmp_path / "runs"), "callbacks": [
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(tmp_path), "filename": "di"}}]}}
    (tmp_path / "di.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "di.yaml")])
    assert "checkpoint:" in capsys.readouterr().out and torch.load(tmp_path / "di.ckpt")["global_step"] == 4
    predict = ["predict", "--config", str(tmp_path / "di.yaml"), "--ckpt_path", str(tmp_path / "di.ckpt"),
               "--data.init_args.predict_seeds", "0-2"]
    main([*predict, "--writer.output_dir", str(tmp_path / "with_teacher")])
    # Our .ckpt holds the teacher: predict and validate from it need not (and do not) read the teacher file.
    teacher.unlink()
    main([*predict, "--writer.output_dir", str(tmp_path / "out")])
    names = [f"{s:06d}.png" for s in range(3)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == names
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "with_teacher" / n).read_bytes() for n in names)
    labels = [int((tmp_path / "out" / n).with_suffix(".label").read_text()) for n in names]
    expected = to_uint8(DiffInstruct.load_from_checkpoint(tmp_path / "di.ckpt").sample(seeds=[0, 1, 2],
                                                                                        labels=labels))
    written = np.stack([np.asarray(Image.open(tmp_path / "out" / n)) for n in names])
    assert np.array_equal(written, expected)  # the checkpoint's (EMA) generator, not a fresh or teacher one
    main(["validate", "--config", str(tmp_path / "di.yaml"), "--ckpt_path", str(tmp_path / "di.ckpt")])
    assert "val/generator_loss" in capsys.readouterr().out
    # Without --ckpt_path the teacher file is needed again, and its absence is a one-line error.
    for command in (predict[:3] + predict[5:] + ["--writer.output_dir", str(tmp_path / "none")],
                    ["fit", "--config", str(tmp_path / "di.yaml")]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2 and "teacher.ckpt" in capsys.readouterr().err, command[0]


DDP_SCRIPT = """
import sys

import lightning as L
import torch

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.data import DiffusionDataModule
from diffusion_transfer.methods import DiffInstruct



class Wrapped(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.find_unused = trainer.strategy.model.find_unused_parameters  # the DistributedDataParallel wrapper


shapes, teacher, out = sys.argv[1:]
torch.set_num_threads(1)
wrapped = Wrapped()
model = DiffInstruct(arch_overrides=TINY, num_classes=20, resolution=16, val_num_images=0, checkpoint=teacher,
                     lr=1e-3, glr=1e-3)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, limit_val_batches=0,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    callbacks=[TrainableEMA(halflife_kimg=0.05), wrapped])
trainer.fit(model, DiffusionDataModule(shapes, batch_size=4))
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
torch.save({"state": state, "find_unused_parameters": wrapped.find_unused}, f"{out}/rank{trainer.global_rank}.pt")
"""


def test_two_process_cpu_ddp_fit_with_plain_ddp(shapes: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    # Plain `strategy: ddp` (find_unused_parameters=False): each phase leaves the other network without a gradient,
    # so DiffInstruct.setup switches the search for unused parameters on before DDP wraps the module.
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.replace("TINY", repr(TINY)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(shapes), str(teacher_ckpt), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "find_unused_parameters=True" in output
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(rank["find_unused_parameters"] for rank in ranks)
    # The ranks drew different latents and noise (seeds per rank): equal weights mean synchronised gradients.
    state0, state1 = (rank["state"] for rank in ranks)
    assert state0.keys() == state1.keys() and all(torch.equal(v, state1[k]) for k, v in state0.items())
    teacher = {k[len("net."):]: v for k, v in torch.load(teacher_ckpt, weights_only=True)["state_dict"].items()
               if k.startswith("net.")}
    assert all(torch.equal(state0[f"net.{k}"], v) for k, v in teacher.items())  # the teacher stays frozen
    for prefix in ("fake_score.", "generator.net."):  # both networks trained (the generator: its EMA, left in)
        assert any(not torch.equal(state0[prefix + k], v) for k, v in teacher.items()), prefix

