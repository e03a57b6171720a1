"""Long-tail methods (papers/longtail.md): CFG label drop, CBDM's regulariser, T2H's transfer, the U-Net backbone."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusion_transfer.cli import build_cli
from diffusion_transfer.diffusion.gaussian import GaussianDiffusion
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.methods import CBDM, T2H, Diffusion, LongTailDDPM, longtail
from diffusion_transfer.methods.longtail import (
    cbdm_loss,
    cbdm_regulariser,
    gate_transfer,
    label_drop_mask,
    t2h_loss,
    t2h_targets,
    transfer_weights,
)

from .helpers import TINY_DIT, TINY_UNET
from .test_unet import ddpm_checkpoint, ddpm_reference_forward

REPO = Path(__file__).resolve().parents[1]
COUNTS = [40, 20, 10, 5]  # class 0 is the head, class 3 the tail
PRIOR = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)


def tiny(cls: type = LongTailDDPM, backbone: dict | None = None, **kwargs) -> Diffusion:
    args = {**(backbone or TINY_DIT), "num_classes": 4, "resolution": 8, "channels": 3, **kwargs}
    if cls is not Diffusion:
        args.setdefault("class_counts", COUNTS)
    return cls(**args)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 4


def randomise(model: Diffusion) -> None:
    """Non-zero weights everywhere (DiT starts with a zero output, which would make every prediction equal)."""
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.1)


# ------------------------------------------------------------------------------------------------ CFG label drop


def test_label_drop_is_per_batch_at_rate_p() -> None:
    torch.manual_seed(0)
    masks = torch.stack([label_drop_mask(8, 0.1, "batch") for _ in range(4000)])
    assert bool((masks.all(1) | ~masks.any(1)).all())  # all labels of a batch or none
    assert 0.081 < masks[:, 0].float().mean() < 0.119  # 0.1 ± 4 standard errors
    per_sample = torch.stack([label_drop_mask(8, 0.1, "sample") for _ in range(500)])
    assert 0.085 < per_sample.float().mean() < 0.115 and bool((per_sample.any(1) & ~per_sample.all(1)).any())


def test_module_passes_whole_batch_drops_to_the_net() -> None:
    model = tiny(class_dropout_prob=0.5)
    seen: list[torch.Tensor] = []
    forward = model.net.forward
    model.net.forward = lambda x, t, y, **kw: (seen.append(kw["force_drop_ids"]), forward(x, t, y, **kw))[1]
    for seed in range(24):
        torch.manual_seed(seed)
        model.loss(batch(4))
    drops = torch.stack(seen)
    assert bool((drops.all(1) | ~drops.any(1)).all())  # never a partly dropped batch
    assert 0 < int(drops[:, 0].sum()) < 24  # both outcomes occur (p = 0.5 here)


# ------------------------------------------------------------------------------------------------ CBDM


def test_cbdm_regulariser_value_and_stop_gradients_follow_the_formula() -> None:
    torch.manual_seed(0)
    h, h2 = torch.randn(4, 3, 2, 2, requires_grad=True), torch.randn(4, 3, 2, 2, requires_grad=True)
    t, tau, gamma = torch.tensor([0, 250, 500, 999]), 1.5, 0.25
    active = torch.tensor([True, True, False, True])
    reg = cbdm_regulariser(h, h2, t, 1000, tau, gamma, active)
    lam = tau * t.double() / 1000 * active  # λ_t = τ t / T, 0 on dropped rows
    sq = ((h - h2).double() ** 2).mean(dim=(1, 2, 3))
    assert reg.detach().item() == pytest.approx(float((lam * (1 + gamma) * sq).mean()), rel=1e-6)
    reg.backward()
    n = h.numel()
    lam4 = lam.float().view(-1, 1, 1, 1)
    # The first term moves only h (toward sg(h')), the commitment term only h' (weight γ).
    torch.testing.assert_close(h.grad, 2 * lam4 * (h - h2).detach() / n)
    torch.testing.assert_close(h2.grad, 2 * gamma * lam4 * (h2 - h).detach() / n)


def test_cbdm_loss_is_ddpm_plus_regulariser_at_the_same_noisy_input() -> None:
    model = tiny(CBDM)
    randomise(model)
    calls: list[tuple] = []
    net = model.net

    def spy(x, t, y, **kw):
        out = net(x, t, y, **kw)
        calls.append((x, t, y, out))
        return out

    x, y = batch(8)
    other = (y + 1) % 4
    torch.manual_seed(0)
    out = cbdm_loss(spy, model.process, x, y, other, torch.zeros(8, dtype=torch.bool), tau=1.0, gamma=0.25)
    (x1, t1, y1, h), (x2, t2, y2, h2) = calls
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(y2, other)
    expected = (t1.double() / 1000 * 1.25 * ((h - h2).double() ** 2).mean(dim=(1, 2, 3))).mean()
    assert out["reg"].item() == pytest.approx(expected.item(), rel=1e-5) and out["reg"].item() > 0
    assert out["loss"].item() == pytest.approx((out["mse"] + out["reg"]).item(), rel=1e-6)
    calls.clear()  # a dropped batch gets no regulariser (and no second pass)
    dropped = cbdm_loss(spy, model.process, x, y, other, torch.ones(8, dtype=torch.bool))
    assert len(calls) == 1 and dropped["reg"].item() == 0.0


def test_cbdm_regulariser_vanishes_when_the_model_ignores_labels() -> None:
    model = tiny(CBDM, class_dropout_prob=0.0)
    randomise(model)
    torch.manual_seed(1)
    assert model.loss(batch())["reg"].item() > 0  # labels matter: the regulariser is on
    with torch.no_grad():
        model.net.y_embedder.embedding_table.weight.zero_()  # every label (and null) embeds to 0
    torch.manual_seed(1)
    assert model.loss(batch())["reg"].item() == 0.0


@pytest.mark.parametrize("target", ["uniform", "train"])
def test_cbdm_second_labels_follow_the_target_distribution(target: str) -> None:
    model = tiny(CBDM, target_dist=target)
    torch.manual_seed(0)
    freq = torch.bincount(model.other_labels(20000), minlength=4).float() / 20000
    expected = torch.full((4,), 0.25) if target == "uniform" else PRIOR
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


# ------------------------------------------------------------------------------------------------ T2H


def test_transfer_weights_equal_the_kernel_formula_on_a_hand_made_batch() -> None:
    x0 = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.5]]], [[[-1.0, 0.0]]]])  # [3, 1, 1, 2]
    xt = torch.tensor([[[[0.3, -0.2]]], [[[0.1, 0.9]]], [[[-0.8, 0.4]]]])
    abar = torch.tensor([0.5, 0.2, 0.05], dtype=torch.float64)
    log_prior = torch.log(torch.tensor([0.6, 0.3, 0.1]))  # q(y_j) of the three rows
    expected, expected_prior = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        sigma2 = 1 / abar[i] - 1
        for j in range(3):
            d = ((xt[i].double() / abar[i].sqrt() - x0[j].double()) ** 2).sum()
            expected[i, j] = torch.exp(-d / (2 * sigma2))
            expected_prior[i, j] = expected[i, j] * log_prior[j].exp().double() ** 2
    expected /= expected.sum(1, keepdim=True)
    expected_prior /= expected_prior.sum(1, keepdim=True)
    w = transfer_weights(xt, x0, abar)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(transfer_weights(xt, x0, abar, 2 * log_prior).double(), expected_prior,
                               atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # distances stay float32 under autocast
        torch.testing.assert_close(transfer_weights(xt, x0, abar).double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["t2h", "h2t"])
def test_t2h_never_moves_toward_a_rarer_class_nor_outside_its_timestep_gate(mode: str) -> None:
    process = GaussianDiffusion()
    torch.manual_seed(0)
    x0, y = batch(32)
    moved_rows = 0
    for _ in range(20):
        t = torch.randint(800, 1000, (32,))  # where the kernel is wide and moves are frequent
        _, _, z = t2h_targets(process, x0, y, PRIOR, t, torch.randn_like(x0), mode, cut_time=900)
        moved = z != torch.arange(32)
        src, own = PRIOR[y[z]], PRIOR[y]
        assert bool((src >= own).all()) if mode == "t2h" else bool((src <= own).all())
        assert not bool(moved[t >= 900].any())  # the timestep gate
        moved_rows += int(moved.sum())
    assert moved_rows > 100  # the gate lets moves through where allowed
    _, _, z = t2h_targets(process, x0, y, PRIOR, torch.full((32,), 999), torch.randn_like(x0), "full")
    assert bool((PRIOR[y[z]] < PRIOR[y]).any()) and bool((PRIOR[y[z]] > PRIOR[y]).any())  # ungated goes both ways


def test_t2h_retarget_keeps_x_t_and_is_the_identity_where_nothing_moves() -> None:
    process = GaussianDiffusion()
    torch.manual_seed(0)
    x0, y = batch(16)
    t, noise = torch.randint(0, 1000, (16,)), torch.randn(16, 3, 8, 8)
    x0_z, eps, z = t2h_targets(process, x0, y, PRIOR, t, noise, "full")
    torch.testing.assert_close(process.q_sample(x0_z, t, eps), process.q_sample(x0, t, noise), atol=1e-5, rtol=1e-5)
    same = z == torch.arange(16)
    assert torch.equal(eps[same], noise[same]) and torch.equal(x0_z[same], x0[same])
    assert torch.equal(gate_transfer(torch.arange(16).flip(0), y, PRIOR, t, "t2h", cut_time=0), torch.arange(16))


def zero_net(calls: list) -> object:
    """A net predicting ε = 0 that records what it is given."""
    def net(x, t, y, **kw):
        calls.append((x, t, y, kw))
        return torch.zeros_like(x)
    return net


def test_t2h_loss_at_t999_swaps_and_regresses_onto_the_transferred_noise() -> None:
    process = GaussianDiffusion()  # fixed variance: loss = mse
    torch.manual_seed(0)
    x0, y = batch(16)
    t, noise = torch.full((16,), 999), torch.randn(16, 3, 8, 8)
    calls: list = []
    out = t2h_loss(zero_net(calls), process, x0, y, PRIOR, None, "full", t=t, noise=noise)
    z = out["z"]
    assert (z != torch.arange(16)).float().mean().item() > 0.8  # the kernel is flat: nearly every row moves
    assert out["transfer_rate"].item() == (z != torch.arange(16)).float().mean().item()
    ((x_in, t_in, y_in, kw),) = calls
    # The transfer leaves x_t alone (only the target changes): the net sees q_sample(x0, t, ε) ...
    torch.testing.assert_close(x_in, process.q_sample(x0, t, noise), atol=1e-6, rtol=0)
    assert (x_in - process.q_sample(x0[z], t, noise)).abs().max() > 1e-3  # ... not x_t of the source image
    assert torch.equal(t_in, t) and torch.equal(y_in, y) and "force_drop_ids" not in kw
    # ... and regresses onto ε̃ = ε + √(ᾱ/(1-ᾱ)) (x0_i − x0_z), so the loss of ε̂ = 0 is mean ε̃².
    abar = process.alphas_cumprod[999]
    eps_tilde = noise.double() + (abar / (1 - abar)).sqrt() * (x0 - x0[z]).double()
    torch.testing.assert_close(out["eps_tilde"].double(), eps_tilde, atol=1e-6, rtol=0)
    expected = (eps_tilde**2).mean().item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert abs(expected - (noise.double() ** 2).mean().item()) > 1e-3  # plain ε would fail the line above


def cifar_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.arange(n) % 4


def test_transfer_rate_is_zero_at_low_noise_and_one_minus_one_over_b_at_t999() -> None:
    # Spec 8.6, mode full: for ‖Δ‖² ≈ 2000 the logit gap at t ≤ 500 is ≳ 80 (no move); at t = 999, σ² ≈ 24800
    # and W is nearly uniform, so a row keeps itself with probability ≈ 1/B.
    process, b = GaussianDiffusion(), 64
    torch.manual_seed(0)
    low_swaps = low_samples = high_swaps = high_samples = 0
    for seed in range(8):
        x0, y = cifar_like(b, seed)
        low = t2h_loss(zero_net([]), process, x0, y, PRIOR, None, "full", t=torch.randint(0, 501, (b,)))
        high = t2h_loss(zero_net([]), process, x0, y, PRIOR, None, "full", t=torch.full((b,), 999))
        assert int(low["transfer_samples"][6:].sum()) == 0 and int(high["transfer_samples"][9]) == b
        low_swaps += int(low["transfer_swaps"].sum())
        low_samples += int(low["transfer_samples"].sum())
        high_swaps += int(high["transfer_swaps"][9])
        high_samples += int(high["transfer_samples"][9])
    assert low_samples == high_samples == 8 * b
    assert low_swaps / low_samples < 0.005
    assert abs(high_swaps / high_samples - (1 - 1 / b)) < 0.02  # 512 rows: the standard error is ≈ 0.006


def test_transfer_histogram_counts_swaps_and_samples_per_tenth_of_t() -> None:
    process = GaussianDiffusion()
    torch.manual_seed(3)
    x0, y = batch(64)
    t = torch.randint(0, 1000, (64,))
    out = t2h_loss(zero_net([]), process, x0, y, PRIOR, None, "full", t=t)
    moved = out["z"] != torch.arange(64)
    for k in range(10):
        rows = (t >= 100 * k) & (t <= 100 * k + 99)
        assert int(out["transfer_samples"][k]) == int(rows.sum())
        assert int(out["transfer_swaps"][k]) == int((rows & moved).sum())
    assert int(out["transfer_swaps"].sum()) > 0 and int(out["transfer_samples"].sum()) == 64
    assert longtail.transfer_bucket_names(1000)[::9] == ["t0-99", "t900-999"]


def test_t2h_logs_the_per_t_transfer_rate_pooled_over_steps_when_the_logger_writes(monkeypatch) -> None:
    model = tiny(T2H, transfer_mode="full", class_dropout_prob=0.0)
    randomise(model)
    results: list[dict] = []
    original = longtail.t2h_loss
    monkeypatch.setattr(longtail, "t2h_loss", lambda *a, **kw: results.append(original(*a, **kw)) or results[-1])
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    writes = [False]
    model._writes_logs_now = lambda: writes[0]
    model.train()
    model.training_step(batch(32, seed=1), 0)
    assert not [k for k in logged if k.startswith("train/transfer_rate_t")]  # not a logging step: counted only
    writes[0] = True
    model.training_step(batch(32, seed=2), 1)
    swaps = sum(r["transfer_swaps"] for r in results).double()
    samples = sum(r["transfer_samples"] for r in results).double()
    expected = {f"train/transfer_rate_t{100 * k}-{100 * k + 99}": (swaps[k] / samples[k]).item()
                for k in range(10) if samples[k] > 0}
    got = {k: v for k, v in logged.items() if k.startswith("train/transfer_rate_t")}
    assert len(results) == 2 and got.keys() == expected.keys() and len(got) >= 5
    assert got == pytest.approx(expected)
    assert max(got.values()) > 0 and model._transfer_counts is None  # reset after the write
    assert "train/transfer_rate" in logged and "train/z" not in logged  # only scalars reach log_dict
    model.eval()
    model.loss(batch(8))  # validation losses are not counted
    assert model._transfer_counts is None


@pytest.mark.parametrize("backbone", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_unconditional_t2h_never_shows_the_net_a_class_label(backbone: dict) -> None:
    seen: list[torch.Tensor | None] = []

    def labels_seen(model: Diffusion) -> None:
        # What the net's class input receives: DiT table indices (null = num_classes); the U-Net's class_labels
        # (int, -1 = none; None when it has no label map).
        if hasattr(model.net, "unet"):
            model.net.unet.register_forward_hook(lambda mod, args, out: seen.append(args[2]))
        else:
            model.net.y_embedder.embedding_table.register_forward_hook(
                lambda mod, args, out: seen.append(args[0].detach().clone()))

    def is_null(x: torch.Tensor | None) -> bool:
        return x is None or bool((x == -1).all()) or bool((x == 4).all())

    for conditional in (True, False):
        model = tiny(T2H, backbone, conditional=conditional, class_dropout_prob=0.1, transfer_mode="t2h")
        if hasattr(model.net, "unet"):  # unconditional: no label map at all (pytorch-ddpm's unconditional layout)
            assert (model.net.unet.map_label is None) == (not conditional)
        randomise(model)
        labels_seen(model)
        seen.clear()
        model.train()
        for seed in range(3):
            torch.manual_seed(seed)
            model.loss(batch(8))
        model.sample(seeds=[0, 1], labels=[1, 2], steps=2, guidance_scale=2.5)
        assert seen and all(is_null(x) for x in seen) == (not conditional)
    # The gate still reads the labels: t2h moves only toward classes at least as frequent.
    calls: list = []
    x0, y = batch(32)
    out = t2h_loss(zero_net(calls), GaussianDiffusion(), x0, y, PRIOR, None, "t2h", conditional=False,
                   t=torch.full((32,), 999))
    moved = out["z"] != torch.arange(32)
    assert bool(moved.any()) and bool((PRIOR[y[out["z"]]] >= PRIOR[y]).all())
    ((_, _, y_in, kw),) = calls
    assert bool((y_in == -1).all()) and bool(kw["force_drop_ids"].all())
    with pytest.raises(ConfigError, match="null row"):
        tiny(T2H, conditional=False, class_dropout_prob=0.0)


def test_unconditional_t2h_and_ddpm_load_an_original_unconditional_checkpoint(tmp_path: Path) -> None:
    # A pytorch-ddpm / T2H ckpt.pt without label_embedding, at a width where GroupNorm(32) applies (32, 64, 96 ch).
    ch, ch_mult, blocks = 32, (1, 2), 1
    sd = ddpm_checkpoint(tmp_path / "uncond.pt", ch, ch_mult, (1,), blocks, 0)
    ddpm_checkpoint(tmp_path / "cond.pt", ch, ch_mult, (1,), blocks, 4)
    unet = {"arch": "ddpm-cifar10", "learn_sigma": False,
            "arch_overrides": {"model_channels": ch, "channel_mult": list(ch_mult), "num_blocks": blocks,
                               "attn_resolutions": [4], "dropout": 0.0}}
    x, y = batch(4)
    t = torch.tensor([0, 5, 500, 999])
    with torch.no_grad():
        ref = ddpm_reference_forward(sd, x, t, None)
    for cls in (T2H, LongTailDDPM):
        model = tiny(cls, unet, conditional=False).eval()
        assert "map_label.weight" not in model.net.unet.state_dict()
        assert model.load_weights(str(tmp_path / "uncond.pt")) == "ddpm:ema_model"
        with torch.no_grad():
            torch.testing.assert_close(model.net(x, t, y), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            guided = model.guided_denoiser(y, 2.5, None)(x, t)  # unconditional: no guidance, any label
            torch.testing.assert_close(guided, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        # A conditional file into this model names the setting to change, and loads without its label map under
        # label_table reuse.
        with pytest.raises(CheckpointError, match=r"class-conditional \(4 classes(.|\n)*conditional: true"):
            model.load_weights(str(tmp_path / "cond.pt"))
    tiny(T2H, unet, conditional=False, label_table="reuse").load_weights(str(tmp_path / "cond.pt"))
    # The unconditional file into a conditional model names conditional: false (not label_table, which would
    # leave the label map untrained from a fresh start).
    with pytest.raises(CheckpointError, match=r"file is unconditional(.|\n)*conditional: false"):
        tiny(T2H, unet).load_weights(str(tmp_path / "uncond.pt"))
    with pytest.raises(ConfigError, match="label_dim=4"):
        tiny(T2H, {**unet, "arch_overrides": {**unet["arch_overrides"], "label_dim": 4}}, conditional=False)


def test_unconditional_ddpm_trains_without_labels_and_cbdm_refuses_to_be_unconditional() -> None:
    calls: list[dict] = []
    model = tiny(LongTailDDPM, conditional=False)  # a DiT: it keeps its table and gets the null label
    model.net.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    model.train()
    for seed in range(5):  # every row of every batch null, whatever the label-drop draw would have been
        torch.manual_seed(seed)
        model.loss(batch(8))
    assert len(calls) == 5 and all(bool((kw["y"] == -1).all() and kw["force_drop_ids"].all()) for kw in calls)
    with pytest.raises(ConfigError, match="CBDM cannot be unconditional"):
        tiny(CBDM, conditional=False)


@pytest.mark.parametrize("backbone", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_t2h_with_its_gate_closed_equals_the_ddpm_loss(backbone: dict) -> None:
    ddpm, t2h = tiny(LongTailDDPM, backbone), tiny(T2H, backbone, cut_time=0)
    randomise(ddpm)
    t2h.load_state_dict(ddpm.state_dict())
    ddpm.eval(), t2h.eval()  # U-Net dropout off: both passes see the same net
    for seed in range(2):
        torch.manual_seed(seed)
        expected = ddpm.loss(batch(seed=seed))
        torch.manual_seed(seed)
        got = t2h.loss(batch(seed=seed))
        assert torch.equal(got["loss"], expected["loss"]) and got["transfer_rate"].item() == 0.0


def test_long_tail_methods_need_class_counts_and_valid_flags() -> None:
    with pytest.raises(ConfigError, match="class_counts"):
        tiny(T2H, class_counts=None).loss(batch())
    with pytest.raises(ConfigError, match="transfer_mode: full"):
        tiny(T2H, prior_power=1.0)
    with pytest.raises(ConfigError, match="target_dist"):
        tiny(CBDM, target_dist="balanced")


@pytest.mark.parametrize("kwargs,match", [({"tau": -1.0}, "tau=-1.0"), ({"gamma": -0.25}, "gamma=-0.25"),
                                          ({"tau": float("nan")}, "tau=nan"), ({"gamma": float("inf")}, "gamma")])
def test_cbdm_refuses_weights_that_flip_or_break_the_regulariser(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny(CBDM, **kwargs)


def test_cbdm_with_zero_tau_is_the_ddpm_loss() -> None:
    model = tiny(CBDM, tau=0.0, gamma=0.0)  # the boundary is allowed: the regulariser is off
    randomise(model)
    torch.manual_seed(0)
    out = model.loss(batch())
    assert out["reg"].item() == 0.0 and out["loss"].item() == out["mse"].item()  # fixed variance: loss = mse


def fake_trainer(counts: list[int]) -> SimpleNamespace:
    return SimpleNamespace(datamodule=SimpleNamespace(class_counts=counts))


def test_class_counts_of_the_wrong_length_are_refused_when_known() -> None:
    with pytest.raises(ConfigError, match=r"num_classes=4, but model.init_args.class_counts has 3 class counts"):
        tiny(T2H, class_counts=[5, 3, 1])
    with pytest.raises(ConfigError, match="non-negative"):
        tiny(CBDM, class_counts=[5, 3, -1, 1])
    # Read from the data module in setup: checked there, before any loss.
    model = tiny(T2H, class_counts=None)
    model._trainer = fake_trainer([9, 5, 3, 2, 1])
    with pytest.raises(ConfigError, match=r"data module's class_counts has 5 class counts \[9, 5, 3, 2, 1\]"):
        model.setup("fit")
    model._trainer = fake_trainer([])  # unlabelled data: T2H cannot gate
    with pytest.raises(ConfigError, match="needs the training images per class of its 4 classes"):
        model.setup("fit")
    model.setup("predict")  # sampling needs no prior
    model._trainer = fake_trainer([8, 4, 2, 1])
    model.setup("fit")
    torch.testing.assert_close(model.class_prior(), torch.tensor([8, 4, 2, 1]) / 15)
    uniform = tiny(CBDM, class_counts=None)  # y' uniform: no prior needed
    uniform._trainer = fake_trainer([])
    uniform.setup("fit")
    assert uniform.class_counts is None


# ------------------------------------------------------------------------------------------------ U-Net backbone


def test_diffusion_on_the_unet_backbone_trains_samples_and_guides_with_the_skipped_label(tmp_path: Path) -> None:
    model = tiny(Diffusion, TINY_UNET, learn_sigma=False, class_dropout_prob=0.1)
    net, x, y = model.net, *batch(8)
    t = torch.randint(0, 1000, (8,))
    model.eval()  # no dropout, no random label drop
    with torch.no_grad():  # outputs of a visible size (the output conv starts at gain 1e-5)
        net.unet.map_label.weight.normal_()
        net.unet.out_conv.weight.normal_(0, 0.1)
        # The null label is the U-Net without its label embedding (no null row), also via force_drop_ids.
        bare = net.unet(x, t.float(), None)
        torch.testing.assert_close(net(x, t, torch.full_like(y, -1)), bare)
        torch.testing.assert_close(net(x, t, y, force_drop_ids=torch.ones(8, dtype=torch.bool)), bare)
        assert not torch.allclose(net(x, t, y), bare)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, -1))
    guided = model.guided_denoiser(y, 2.5, None)(x, t)  # w = 1.5: 2.5 c - 1.5 u
    torch.testing.assert_close(guided, 2.5 * cond - 1.5 * uncond, atol=1e-5, rtol=1e-5)
    model.train()

    def eval_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model.loss((x, y))["loss"].item() for _ in range(3))

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(20):
        torch.manual_seed(step)
        optimizer.zero_grad()
        model.loss((x, y))["loss"].backward()
        optimizer.step()
    assert eval_loss() < before
    images = model.sample(seeds=[3, 4], labels=[1, 2], steps=4, guidance_scale=2.5)
    assert images.shape == (2, 3, 8, 8) and bool(images.isfinite().all())
    torch.testing.assert_close(model.sample(seeds=[4], labels=[2], steps=4, guidance_scale=2.5), images[1:],
                               atol=1e-3, rtol=1e-3)  # per-seed noise; only the batch's float rounding differs
    # Our own .ckpt (keys net.unet.*) and a bare U-Net state dict both load back strictly.
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.net.state_dict().items()}}, tmp_path / "m.ckpt")
    torch.save(model.net.unet.state_dict(), tmp_path / "unet.pt")
    model.eval()
    for name in ("m.ckpt", "unet.pt"):
        other = tiny(Diffusion, TINY_UNET, learn_sigma=False).eval()
        other.load_weights(str(tmp_path / name))
        torch.testing.assert_close(other.net(x, t, y), model.net(x, t, y))


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("config,arch", [
    ("t2h_shapes.yaml", ["--model.init_args.arch_overrides",  # its U-Net, v-prediction and learned sigma, tiny
                         "{model_channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: []}"]),
    ("t2h_shapes.yaml", ["--model.init_args.arch", "DiT-S/2",  # the same config on a DiT
                         "--model.init_args.arch_overrides", "{hidden_size: 32, depth: 2, num_heads: 2}"]),
    ("cbdm_cifar10lt.yaml", ["--model.init_args.arch_overrides",  # 48 channels: EDM's GroupNorm rule
                             "{model_channels: 16, num_blocks: 1, min_channels_per_group: 4}"])])
def test_tiny_cli_fit_reads_the_long_tailed_class_counts(config: str, arch: list[str], shapes_zip: Path,
                                                         tmp_path: Path) -> None:
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "longtail" / config),
                     "--model.init_args.checkpoint", "null", *arch,
                     "--model.init_args.val_num_images", "0", "--data.init_args.path", str(shapes_zip),
                     "--data.init_args.longtail_imbalance", "0.25", "--data.init_args.batch_size", "8",
                     "--data.init_args.num_workers", "0", "--metrics.feature_network", "null",
                     "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                     "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                     "--trainer.log_every_n_steps", "1",
                     "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path)])
    counts = cli.datamodule.class_counts
    assert counts[0] == 8 and counts[-1] == 2 and cli.model.class_counts == counts
    assert cli.trainer.global_step == 2
    rates = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/transfer_rate_t")}
    if config.startswith("t2h"):  # the per-t histogram goes through Lightning's logging (8 rows: a few buckets)
        assert rates and all(0.0 <= v <= 1.0 for v in rates.values())
    else:
        assert not rates
