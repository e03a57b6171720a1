"""EDM: preconditioning, loss, σ grid, Heun/Euler against closed forms; safe pickles; the EDMDiffusion method."""

from __future__ import annotations

import math
import os
import pickle
import sys
import types
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.cli import main
from diffusion_transfer.data import DiffusionDataModule
from diffusion_transfer.diffusion import EDM, EDMPrecond, VEPrecond, VPPrecond, apply_guidance
from diffusion_transfer.diffusion.augment import AugmentPipe
from diffusion_transfer.errors import ConfigError
from diffusion_transfer.io.checkpoint import CheckpointError
from diffusion_transfer.io.edm_pickle import EDMPickleError, read_edm_pickle
from diffusion_transfer.io.unet_checkpoint import UNetCheckpointError, load_unet_checkpoint
from diffusion_transfer.methods import EDMDiffusion, edm_loss, load_edm_network
from diffusion_transfer.methods.edm import check_same_precond
from diffusion_transfer.nets import build_unet
from diffusion_transfer.nets.unet import Conv2d, FourierEmbedding, PositionalEmbedding, UNet, UNetBlock

TINY = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
        "augment_dim": 0}


# ------------------------------------------------------------------------------------------------ maths


def test_edm_preconditioning_at_known_sigmas() -> None:
    precond = EDMPrecond()
    for sigma, expected in ((1.0, (0.2, 0.4472, 0.8944, 0.0)), (2.5, (0.0385, 0.4903, 0.3922, 0.2291))):
        got = [float(c) for c in precond.coefficients(torch.tensor(sigma, dtype=torch.float64))]
        assert got == pytest.approx(expected, abs=5e-5)
    sigma = torch.logspace(-3, 2, 20, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
    assert torch.allclose(precond.loss_weight(sigma), c_out**-2)  # λ(σ) = 1 / c_out²
    # The effective target (y - c_skip (y + n)) / c_out has unit variance for data of std σ_d (EDM's design).
    assert torch.allclose(((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma))
    assert torch.allclose(c_in**2 * (0.25 + sigma**2), torch.ones_like(sigma))


def test_vp_and_ve_preconditioning() -> None:
    vp, sigma = VPPrecond(), torch.logspace(math.log10(0.002), math.log10(80), 25, dtype=torch.float64)
    assert torch.allclose(vp.sigma(vp.sigma_inv(sigma)), sigma)
    c_skip, c_out, c_in, c_noise = vp.coefficients(sigma)
    assert torch.equal(c_skip, torch.ones_like(sigma)) and torch.equal(c_out, -sigma)
    assert torch.allclose(c_in, 1 / (sigma**2 + 1).sqrt()) and torch.allclose(c_noise, 999 * vp.sigma_inv(sigma))
    t = torch.tensor(0.5, dtype=torch.float64)
    assert float(vp.sigma(t)) == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 0.25 + 0.1 * 0.5) - 1))
    ve = VEPrecond()
    assert torch.allclose(ve.coefficients(sigma)[3], torch.log(sigma / 2))
    assert torch.allclose(ve.loss_weight(sigma), sigma**-2) and torch.allclose(vp.loss_weight(sigma), sigma**-2)
    # Sampling grids are clipped to the supported range: VE 0.02..100, VP σ(1e-5)..σ(1).
    assert EDM("ve").sigma_steps(5)[-2] == pytest.approx(0.02)
    assert EDM("vp").sigma_steps(5)[0] == pytest.approx(80.0)
    torch.manual_seed(0)
    log_sigma = VEPrecond().sample_sigma(20000).log()
    assert float(log_sigma.min()) >= math.log(0.02) and float(log_sigma.max()) <= math.log(100)


def test_loss_weighting_sigma_law_and_a_zero_net() -> None:
    process = EDM()
    torch.manual_seed(0)
    log_sigma = process.precond.sample_sigma(200_000).log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.01)
    # With F = 0 the denoiser is c_skip (y + σ n), so the loss is λ (c_skip (y + σ n) - y)² in closed form.
    y, n, sigma = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0.01, 0.5, 1.0, 30.0])

    def zero_net(x, c_noise, labels, augment):
        return torch.zeros_like(x)

    terms = process.training_losses(zero_net, y, sigma=sigma, noise=n)
    c_skip = 0.25 / (sigma**2 + 0.25)
    weight = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    expected = weight * ((c_skip.view(-1, 1, 1, 1) * (y + sigma.view(-1, 1, 1, 1) * n) - y) ** 2).mean((1, 2, 3))
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)
    # A net that returns the ideal F* (the denoiser then outputs y exactly) has zero loss.

    def ideal_net(x, c_noise, labels, augment):
        s = sigma.view(-1, 1, 1, 1)
        return (y - 0.25 / (s**2 + 0.25) * (y + s * n)) / (s * 0.5 / (s**2 + 0.25).sqrt())

    assert float(process.training_losses(ideal_net, y, sigma=sigma, noise=n)["loss"].abs().max()) < 1e-6


def test_sigma_grid() -> None:
    steps = EDM().sigma_steps(18)
    assert steps.dtype == torch.float64 and steps.shape == (19,)
    assert float(steps[0]) == pytest.approx(80.0) and float(steps[17]) == pytest.approx(0.002) and steps[18] == 0
    assert bool((steps[1:] < steps[:-1]).all())
    i = 7
    rho_formula = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(steps[i]) == pytest.approx(rho_formula, rel=1e-12)


def gaussian_denoiser(mean: float, std: float, calls: list[int] | None = None):
    """The exact denoiser of N(mean, std²) data: D(x; σ) = mean + std²/(std² + σ²) (x - mean)."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        if calls is not None:
            calls.append(1)
        s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
        return mean + std**2 / (std**2 + s2) * (x - mean)

    return denoiser


def test_heun_and_euler_evaluation_counts() -> None:
    for solver, expected in (("heun", 35), ("euler", 18)):
        calls: list[int] = []
        EDM().sample(gaussian_denoiser(0.0, 0.5, calls), torch.randn(2, 1), num_steps=18, solver=solver)
        assert len(calls) == expected  # Heun: 2N - 1 (the last step, to σ = 0, is Euler)


def test_heun_converges_to_the_exact_ode_map() -> None:
    # For N(0, s²) data the probability-flow ODE maps x_T to x_T s / √(s² + 80²) (spec 8.3).
    s, ratios = 0.5, []
    for n, expected in ((18, 1.055), (40, 1.0098), (100, 1.0015)):
        out = EDM().sample(gaussian_denoiser(0.0, s), torch.ones(1, 1), num_steps=n)
        ratios.append(float(out) / (80 * s / math.sqrt(s**2 + 80**2)))
        assert ratios[-1] == pytest.approx(expected, abs=5e-4)
    assert ratios[0] > ratios[1] > ratios[2] > 1


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_samples_of_gaussian_data_have_its_moments(churn: float) -> None:
    mean, std = 0.7, 0.3
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(1))
    out = EDM().sample(gaussian_denoiser(mean, std), noise, num_steps=100, S_churn=churn, S_max=50.0,
                       generator=torch.Generator().manual_seed(2))
    # x_T = 80 ε ignores the data mean; the flow then leaves a mean bias of order s/80 (exact: m(1 - s/√(s²+80²))).
    assert float(out.mean()) == pytest.approx(mean * (1 - std / math.sqrt(std**2 + 80**2)), abs=0.01)
    assert float(out.std()) == pytest.approx(std, rel=0.03)


def test_each_sample_depends_only_on_its_own_seed() -> None:
    def draw(seeds: list[int]) -> Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(3, 2, 2, generator=g) for g in generators])
        return EDM().sample(gaussian_denoiser(0.1, 0.5), noise, num_steps=8, S_churn=10.0, generator=generators)

    assert torch.equal(draw([4, 5, 6])[1], draw([5])[0])
    assert not torch.allclose(draw([4])[0], draw([5])[0])


# ------------------------------------------------------------------------------------------------ pickles


class EDMPrecondStandIn(nn.Module):
    """Holds a net under ``model`` like EDM's precond (only the attributes a pickle carries)."""

    def __init__(self, model: nn.Module, **attrs) -> None:
        super().__init__()
        self.model = model
        self.__dict__.update(attrs)


class LossStandIn:
    """EDM's loss object as a pickle carries it: a class name and its scalar settings."""

    def __init__(self, edm_class: str = "EDMLoss", **settings) -> None:
        self._edm_class = edm_class
        self.__dict__.update(settings)


# What EDM's train.py stores for each preconditioning (papers/edm.md 2.1-2.2): the precond's constants, the loss's.
# VP's σ range is σ(ε_t), σ(1) as EDM computes it, in float32 (σ(1e-5) = 0.000977 there, 0.0010005 exactly).
VP_RANGE = [float(VPPrecond().sigma(torch.tensor(t))) for t in (1e-5, 1.0)]
PICKLE_SETTINGS = {
    "EDMPrecond": ({"sigma_min": 0, "sigma_max": float("inf"), "sigma_data": np.float64(0.5)},
                   ("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5})),
    "VPPrecond": ({"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5, "sigma_min": VP_RANGE[0],
                   "sigma_max": VP_RANGE[1]}, ("VPLoss", {"beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5})),
    "VEPrecond": ({"sigma_min": 0.02, "sigma_max": 100.0}, ("VELoss", {"sigma_min": 0.02, "sigma_max": 100.0})),
}


def persistent_name(obj: object) -> str | None:
    """EDM's class name of an object that EDM pickles through its persistence hook (None: pickled normally)."""
    if isinstance(obj, UNet):
        return type(obj).__name__
    if isinstance(obj, (UNetBlock, Conv2d, PositionalEmbedding, FourierEmbedding, nn.GroupNorm, nn.Linear)):
        return type(obj).__name__
    if isinstance(obj, LossStandIn):
        return obj._edm_class
    return {EDMPrecondStandIn: "EDMPrecond"}.get(type(obj))


@pytest.fixture
def edm_standins(monkeypatch: pytest.MonkeyPatch):
    """Stand-ins for EDM's ``torch_utils.persistence`` and ``dnnlib.util`` (never EDM's code)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the real persistence hook must never run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easydict
    for name, module in (("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                         ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(hook=_reconstruct_persistent_obj, EasyDict=easydict)


def write_edm_pickle(path: Path, net: UNet, init_kwargs: dict, standins, precond: str = "EDMPrecond",
                     marker: Path | None = None, precond_attrs: dict | None = None,
                     loss: tuple[str, dict] | None = None) -> None:
    """Pickle ``net`` the way EDM's training loop does (spec 4.1): a dict whose modules reduce to the persistence
    hook with meta = {type, version, module_src, class_name, state}. The source text would write ``marker``.

    The precond stores the constants of :data:`PICKLE_SETTINGS` (updated by ``precond_attrs``); ``loss_fn`` is the
    class and settings ``loss`` (default: the precond's own loss)."""
    source = f"open({str(marker)!r}, 'w').write('executed')\n" if marker else "raise RuntimeError('executed')\n"
    constants, default_loss = PICKLE_SETTINGS[precond]
    ema = EDMPrecondStandIn(net, img_resolution=net.img_resolution, img_channels=net.in_channels,
                            label_dim=net.label_dim, use_fp16=False, **{**constants, **(precond_attrs or {})},
                            _init_args=(), _init_kwargs={"model_type": "SongUNet"})
    net._init_args, net._init_kwargs = (), init_kwargs

    class EDMPickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = persistent_name(obj)
            if name is None:
                return NotImplemented
            name = precond if name == "EDMPrecond" else name
            state = {k: v for k, v in obj.__dict__.items() if k != "style"}  # EDM's classes have no UNetStyle
            meta = {"type": "class", "version": 6, "module_src": source, "class_name": name, "state": state}
            return standins.hook, (meta,)

    loss_class, loss_settings = loss or default_loss
    data = {"ema": ema, "loss_fn": LossStandIn(loss_class, **loss_settings), "augment_pipe": None,
            "dataset_kwargs": standins.EasyDict(path="cifar10-32x32.zip", xflip=False)}
    with path.open("wb") as f:
        EDMPickler(f).dump(data)
    del net._init_args, net._init_kwargs


def tiny_song(**extra) -> tuple[UNet, dict]:
    kwargs = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "label_dim": 4, "augment_dim": 9,
              "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
              "dropout": np.float64(0.13), "embedding_type": "fourier", "encoder_type": "residual",
              "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1], **extra}
    net = build_unet("ncsnpp-cifar10", **{k: v for k, v in kwargs.items() if k != "dropout"}, dropout=0.13)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net, kwargs


def test_restricted_unpickler_round_trip(tmp_path: Path, edm_standins) -> None:
    net, kwargs = tiny_song()
    marker, path = tmp_path / "ran.txt", tmp_path / "edm-tiny.pkl"
    write_edm_pickle(path, net, kwargs, edm_standins, marker=marker)
    network = read_edm_pickle(path)
    assert not marker.exists()  # the embedded source never runs
    expected = net.state_dict()
    assert list(network.state_dict) == list(expected)  # keys and order, with the precond's model. prefix removed
    assert all(torch.equal(network.state_dict[k], v) for k, v in expected.items())
    assert "map_noise.freqs" in network.state_dict  # the Fourier buffer is loaded, not re-drawn
    assert network.model_class == "SongUNet" and network.model_kwargs == {**kwargs, "dropout": 0.13}
    assert network.precond == "EDMPrecond"
    assert network.precond_constants == {"sigma_data": 0.5, "sigma_min": 0, "sigma_max": math.inf, "use_fp16": False}
    assert network.loss == {"class_name": "EDMLoss", "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
    assert network.dataset_kwargs == {"path": "cifar10-32x32.zip", "xflip": False}
    # Built from the stored arguments, the loaded net computes what the pickled one does.
    loaded, process = load_edm_network(path)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 5.0]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(process.denoise(loaded, x, sigma, labels), process.denoise(net.eval(), x, sigma, labels))
    assert isinstance(process.precond, EDMPrecond) and process.precond.sigma_data == 0.5


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "network-snapshot-000000.pkl"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(EDMPickleError, match=r"refused to load the global (posix|nt)\.system") as info:
        read_edm_pickle(path)
    assert str(path) in str(info.value) and not marker.exists()
    eval_call = tmp_path / "eval.pkl"
    eval_call.write_bytes(pickle.dumps({"ema": slice(1)}, protocol=0).replace(b"c__builtin__\nslice",
                                                                               b"cbuiltins\neval"))
    with pytest.raises(EDMPickleError, match="builtins.eval"):
        read_edm_pickle(eval_call)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(EDMPickleError, match="could not be read as an EDM network pickle"):
        read_edm_pickle(tmp_path / "junk.pkl")
    with pytest.raises(FileNotFoundError, match="never downloads weights"):
        read_edm_pickle(tmp_path / "edm-cifar10-32x32-cond-vp.pkl")


def test_strict_load_names_the_first_mismatched_keys(tmp_path: Path, edm_standins) -> None:
    net, kwargs = tiny_song()
    write_edm_pickle(tmp_path / "edm.pkl", net, kwargs, edm_standins)
    same, _ = tiny_song()
    report = load_unet_checkpoint(same, tmp_path / "edm.pkl")
    assert report.source == "edm-pickle" and all(torch.equal(same.state_dict()[k], v)
                                                 for k, v in net.state_dict().items())
    wider, _ = tiny_song(model_channels=32)
    first = next(k for k, v in wider.state_dict().items() if net.state_dict()[k].shape != v.shape)
    with pytest.raises(UNetCheckpointError) as info:
        load_unet_checkpoint(wider, tmp_path / "edm.pkl")
    message = str(info.value)
    assert "shape-different (file vs net) (" in message and f"\n    {first}: file (" in message
    assert "The file holds EDMPrecond(" in message and "model_channels=16" in message
    assert isinstance(info.value, CheckpointError)


# ------------------------------------------------------------------------------------------------ the method


def tiny_model(**kwargs) -> EDMDiffusion:
    defaults = {"arch": "ddpmpp-cifar10", "arch_overrides": TINY, "num_classes": 20, "resolution": 16,
                "channels": 3, "sample_steps": 6, "val_num_images": 0}
    return EDMDiffusion(**{**defaults, **kwargs})


def fixed_loss(model: EDMDiffusion, batch) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            return float(model.loss(batch)["loss"])


def test_training_decreases_the_loss_and_checkpoints_reload(shapes_zip: Path, tmp_path: Path) -> None:
    dm, held = DiffusionDataModule(str(shapes_zip), batch_size=16), DiffusionDataModule(str(shapes_zip), batch_size=64)
    held.setup("fit")
    batch = next(iter(held.train_dataloader()))  # the loss is compared on one fixed batch, σ and noise
    torch.manual_seed(0)  # the same initial weights in every run
    model = tiny_model(optimizer=partial(torch.optim.Adam, lr=3e-3), label_dropout=0.1)
    before = fixed_loss(model, batch)
    ema = TrainableEMA(halflife_kimg=0.5, rampup_ratio=0.05)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=30, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="edm")])
    trainer.fit(model, dm)
    assert ema.num_updates == 30 and ema.current_decay(16) < 1
    after = fixed_loss(model, batch)  # with the EMA weights, which fit leaves in the module
    assert after < 0.75 * before, (before, after)
    # Sampling: each image depends only on its seed (and label), also with churn and guidance.
    options = {"S_churn": 5.0, "guidance_scale": 2.0}
    images = model.sample(seeds=[7, 8], labels=[3, 4], **options)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    # Batched convolutions reassociate sums: allow float32 round-off (another seed changes pixels by O(1)).
    assert torch.allclose(model.sample(seeds=[8], labels=[4], **options)[0], images[1], atol=1e-4)
    assert torch.equal(model.sample(seeds=[7, 8], labels=[3, 4], **options), images)
    assert not torch.allclose(model.sample(seeds=[9], labels=[4], **options)[0], images[1], atol=0.1)
    # Our .ckpt (EMA weights) is a valid starting checkpoint for a new run.
    fresh = tiny_model(checkpoint=str(tmp_path / "edm.ckpt"))
    fresh.setup("fit")
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in fresh.net.state_dict().items())


def test_guidance_mixes_the_two_denoisers() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([1, 7])
    with torch.no_grad():
        cond = model.process.denoise(model.net, x, sigma, labels)
        uncond = model.process.denoise(model.net, x, sigma, torch.full_like(labels, -1))
        guided = model.guided_denoiser(labels, 3.0)(x, sigma)
    # The doubled batch reassociates sums in the convolutions: allow float32 round-off.
    assert torch.allclose(guided, apply_guidance(cond, uncond, 3.0), atol=1e-4)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
    with pytest.raises(TypeError, match="unknown sampling options"):
        model.sample(1, steps=2, eta=0.0)


def test_pickle_with_another_precond_is_refused_by_the_method(tmp_path: Path, edm_standins) -> None:
    net, kwargs = tiny_song()
    write_edm_pickle(tmp_path / "baseline-vp.pkl", net, kwargs, edm_standins, precond="VPPrecond")
    model = EDMDiffusion(arch="ncsnpp-cifar10", arch_overrides={k: v for k, v in kwargs.items() if k not in (
        "img_resolution", "in_channels", "out_channels", "label_dim")}, num_classes=4, resolution=8,
        checkpoint=str(tmp_path / "baseline-vp.pkl"), val_num_images=0)
    with pytest.raises(EDMPickleError, match="was trained with VPPrecond"):
        model.setup("fit")
    model = EDMDiffusion(arch="ncsnpp-cifar10", precond="vp", arch_overrides=model.hparams.arch_overrides,
                         num_classes=4, resolution=8, checkpoint=str(tmp_path / "baseline-vp.pkl"), val_num_images=0)
    model.setup("fit")
    assert torch.equal(model.net.map_noise.freqs, net.map_noise.freqs)


def song_model(path: Path, kwargs: dict, **model_kwargs) -> EDMDiffusion:
    """An EDMDiffusion with the architecture of :func:`tiny_song` that starts from ``path``."""
    overrides = {k: v for k, v in kwargs.items() if k not in ("img_resolution", "in_channels", "out_channels",
                                                                "label_dim")}
    return EDMDiffusion(arch="ncsnpp-cifar10", arch_overrides=overrides, num_classes=4, resolution=8,
                        checkpoint=str(path), val_num_images=0, **model_kwargs)


@pytest.mark.parametrize(("precond", "attrs", "loss", "named", "fix"), [
    # EDMLoss settings: another training σ law (P_mean / P_std) with the same c_* coefficients.
    ("EDMPrecond", {}, ("EDMLoss", {"P_mean": -1.0, "P_std": 1.4, "sigma_data": 0.5}),
     ["P_mean: file -1.0 (loss_fn (EDMLoss)) vs model -1.2 -> set model.init_args.P_mean: -1.0",
      "P_std: file 1.4 (loss_fn (EDMLoss)) vs model 1.2 -> set model.init_args.P_std: 1.4"],
     {"P_mean": -1.0, "P_std": 1.4}),
    # σ_d in the precond and in the loss.
    ("EDMPrecond", {"sigma_data": 0.6}, ("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.6}),
     ["sigma_data: file 0.6 (ema (EDMPrecond)) vs model 0.5 -> set model.init_args.sigma_data: 0.6",
      "sigma_data: file 0.6 (loss_fn (EDMLoss)) vs model 0.5"], {"sigma_data": 0.6}),
    # VE: another σ range, which the c_* coefficients do not show at all.
    ("VEPrecond", {"sigma_min": 0.01, "sigma_max": 50.0}, ("VELoss", {"sigma_min": 0.01, "sigma_max": 50.0}),
     ["sigma_min: file 0.01 (ema (VEPrecond)) vs model 0.02 -> set model.init_args.precond_kwargs.sigma_min: 0.01",
      "sigma_max: file 50.0 (loss_fn (VELoss)) vs model 100.0 -> set model.init_args.precond_kwargs.sigma_max: 50.0"],
     {"precond": "ve", "precond_kwargs": {"sigma_min": 0.01, "sigma_max": 50.0}}),
    # VP: β_min in the loss only (its precond is the default one).
    ("VPPrecond", {}, ("VPLoss", {"beta_d": 19.9, "beta_min": 0.2, "epsilon_t": 1e-5}),
     ["beta_min: file 0.2 (loss_fn (VPLoss)) vs model 0.1 -> set model.init_args.precond_kwargs.beta_min: 0.2"], None),
])
def test_pickle_constants_and_loss_settings_must_equal_the_models(tmp_path: Path, edm_standins, precond: str,
                                                                  attrs: dict, loss: tuple, named: list[str],
                                                                  fix: dict | None) -> None:
    net, kwargs = tiny_song()
    path = tmp_path / "edm.pkl"
    write_edm_pickle(path, net, kwargs, edm_standins, precond=precond, precond_attrs=attrs, loss=loss)
    name = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}[precond]
    with pytest.raises(EDMPickleError) as info:
        song_model(path, kwargs, precond=name).setup("fit")
    message = str(info.value)
    assert message.startswith(f"{path} was trained with other {name} constants than this model's: ")
    assert all(part in message for part in named), message
    if fix is not None:  # the settings the error names make the file load
        model = song_model(path, kwargs, **{"precond": name, **fix})
        model.setup("fit")
        assert torch.equal(model.net.map_noise.freqs, net.map_noise.freqs)
        # load_edm_network builds the file's own process (e.g. VE's σ range clips the sampling grid).
        assert load_edm_network(path)[1].precond == model.process.precond


def test_a_loss_of_another_recipe_and_our_checkpoints_constants_are_refused(tmp_path: Path, edm_standins) -> None:
    net, kwargs = tiny_song()
    path = tmp_path / "vp-with-edm-loss.pkl"
    write_edm_pickle(path, net, kwargs, edm_standins, precond="VPPrecond",
                     loss=("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}))
    with pytest.raises(EDMPickleError, match=r"sets P_mean=-1\.2 \(loss_fn \(EDMLoss\)\), P_std=1\.2 .*which precond "
                                             "vp does not have"):
        song_model(path, kwargs, precond="vp").setup("fit")
    # The Precond of one of our checkpoints (Diff-Instruct's teacher check): every constant, the σ law included.
    check_same_precond(EDMPrecond(), EDMPrecond(), "same.ckpt")
    with pytest.raises(EDMPickleError, match=r"P_std: file 1\.0 \(hyper-parameters\) vs model 1\.2 -> set "
                                             r"model\.init_args\.P_std: 1\.0"):
        check_same_precond(EDMPrecond(P_std=1.0), EDMPrecond(), "teacher.ckpt")
    with pytest.raises(EDMPickleError, match=r"sigma_max: file 50\.0 .*\.precond_kwargs\.sigma_max: 50\.0"):
        check_same_precond(VEPrecond(sigma_max=50.0), VEPrecond(), "teacher.ckpt")
    with pytest.raises(EDMPickleError, match=r"constants than this model's: beta_d: file 10\.0 \(hyper-parameters\) "
                                             r"vs model 19\.9 -> set model\.init_args\.precond_kwargs\.beta_d: 10\.0$"):
        check_same_precond(VPPrecond(beta_d=10.0), VPPrecond(), "teacher.ckpt")  # (its σ range follows)


def test_precond_kwargs_are_checked() -> None:
    assert tiny_model(precond="ve", precond_kwargs={"sigma_min": 0.01}).process.precond == VEPrecond(sigma_min=0.01)
    with pytest.raises(ConfigError, match="not valid for precond ve: it takes sigma_max, sigma_min"):
        tiny_model(precond="ve", precond_kwargs={"beta_d": 10.0})
    with pytest.raises(ConfigError, match="sigma_data, P_mean and P_std are top-level model options"):
        tiny_model(precond_kwargs={"P_mean": -1.0})


def test_augment_p_augments_the_batch_and_feeds_its_labels_to_the_net() -> None:
    torch.manual_seed(0)
    model = tiny_model(arch_overrides={**TINY, "augment_dim": 9}, augment_p=0.5)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(args[3]))
    x0, labels = torch.rand(6, 3, 16, 16) * 2 - 1, torch.tensor([0, 3, 5, 7, 9, 19])
    with torch.random.fork_rng():
        torch.manual_seed(5)
        loss = model.loss((x0, labels))["loss"]
    with torch.random.fork_rng():  # by hand: augment first, then EDM's loss of the augmented images
        torch.manual_seed(5)
        y, augment_labels = AugmentPipe(0.5)(x0)
        expected = edm_loss(model.net, model.process, y, labels, augment_labels)["loss"]
    assert torch.equal(loss, expected) and not torch.equal(y, x0)
    assert torch.equal(seen[0], augment_labels) and seen[0].shape == (6, 9) and bool(seen[0].abs().sum(1).gt(0).any())
    plain = tiny_model(arch_overrides={**TINY, "augment_dim": 9})  # augment_p 0: no augment labels (= zeros)
    plain.net.register_forward_pre_hook(lambda module, args: seen.append(args[3]))
    plain.loss((x0, labels))
    assert seen[-1] is None and plain.augment(x0) == (x0, None)
    with pytest.raises(ConfigError, match=r"augment_dim 0; set model\.init_args\.arch_overrides\.augment_dim: 9, "
                                          "or augment_p: 0"):
        tiny_model(augment_p=0.12)
    with pytest.raises(ConfigError, match=r"augment_p must be in \[0, 1\]"):
        tiny_model(arch_overrides={**TINY, "augment_dim": 9}, augment_p=1.5)


def test_cli_refuses_a_malicious_checkpoint_with_one_line(shapes_zip: Path, tmp_path: Path, capsys) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "edm-evil.pkl"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil.write_bytes(pickle.dumps({"ema": Evil()}))
    config = {"model": {"class_path": "EDMDiffusion", "init_args": {"arch_overrides": TINY, "val_num_images": 0,
                                                                    "checkpoint": str(evil)}},
              "data": {"class_path": "DiffusionDataModule", "init_args": {"path": str(shapes_zip), "batch_size": 8}},
              "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False,
                          "enable_checkpointing": False, "default_root_dir": str(tmp_path)}}
    (tmp_path / "edm.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "edm.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not marker.exists()
    assert err.count("\n") == 1 and "refused to load the global" in err and str(evil) in err


@pytest.mark.parametrize("cls", ["EDMDiffusion", "Diffusion"])
def test_compile_wraps_the_net_without_copying_it(cls: str) -> None:
    # torch.compile is lazy: building the wrapper compiles nothing, so this stays fast.
    from diffusion_transfer.methods import Diffusion

    if cls == "EDMDiffusion":
        eager, compiled = tiny_model(), tiny_model(compile=True)
    else:
        args = {"arch": "DiT-S/4", "arch_overrides": {"hidden_size": 32, "depth": 1, "num_heads": 2},
                "num_classes": 2, "resolution": 8, "channels": 3}
        eager, compiled = Diffusion(**args), Diffusion(**args, compile=True)
    assert eager.denoiser is eager.net
    wrapper = compiled.denoiser
    assert wrapper is not compiled.net and wrapper._orig_mod is compiled.net and compiled.denoiser is wrapper
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no second copy of the weights
    assert compiled.hparams["compile"] is True
