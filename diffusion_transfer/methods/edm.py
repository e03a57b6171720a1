"""``EDMDiffusion``: train or fine-tune an EDM denoiser (Karras et al. 2022) and sample it with EDM's Heun solver.

Algorithm (``papers/edm.md`` 2.2-2.3, the CIFAR-10 recipe "config F"):

    ln σ ~ N(P_mean, P_std²)                      P_mean = -1.2, P_std = 1.2
    n ~ N(0, σ² I)
    loss = λ(σ) ‖D(y + n; σ, c) - y‖²,            λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out(σ)²,  σ_d = 0.5
    D(x; σ, c) = c_skip x + c_out F(c_in x; ¼ ln σ, c)

and samples by Heun's method on σ_i = (80^{1/7} + i/(N-1) (0.002^{1/7} - 80^{1/7}))^7, σ_N = 0: N = 18 steps,
35 network evaluations by default; ``S_churn`` > 0 makes it stochastic. Guidance mixes the conditional and the
zero-label denoiser outputs with :func:`~diffusion_transfer.diffusion.guidance.apply_guidance` (train with
``label_dropout`` > 0 for it to mean anything; EDM's own models use no guidance).

The rest of EDM's recipe: Adam(lr 1e-3) with a linear warm-up over 10 Mimg (``lr_scheduler``), EMA with a 500 kimg
half-life and ramp-up 0.05 (``--ema.halflife_kimg 500``), NaN/Inf gradients replaced by 0 / ±1e5 before each
step, TF32 off. EDM's non-leaking augmentation is not built; nets with ``augment_dim`` 9 (the official CIFAR
ones) train and sample with zero augment labels, which is what sampling uses anyway.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..diffusion.edm import EDM, EDMPrecond, Precond, VEPrecond, VPPrecond
from ..diffusion.guidance import apply_guidance
from ..io.edm_pickle import EDMNetwork, EDMPickleError, read_edm_pickle
from ..io.unet_checkpoint import check_state_dict, load_unet_checkpoint
from ..nets.unet import UNet, build_unet, unet_class
from .base import DiffusionLightningBase

SOLVERS = ("heun", "euler")


def edm_loss(net: Callable[..., Tensor], process: EDM, x0: Tensor, labels: Tensor | None = None,
             augment_labels: Tensor | None = None) -> dict[str, Tensor]:
    """EDM training loss of a batch: the mean over samples and pixels of λ(σ) (D(x0 + n; σ) - x0)².

    Args:
        net: ``net(x, c_noise, class_labels, augment_labels)`` (a U-Net of ``nets/unet.py``).
        process: the :class:`EDM` process (its precond fixes the σ law and λ).
        x0: clean images [B, C, R, R] in [-1, 1]; labels: int64 [B] (-1 = none) or one-hot; augment_labels:
            [B, augment_dim] or None.

    Returns:
        ``{"loss"}``, a scalar. (EDM sums over pixels instead of averaging: a constant factor C·R² that Adam's
        updates do not see.)
    """
    return {"loss": process.training_losses(net, x0, labels, augment_labels)["loss"].mean()}


def precond_of(network: EDMNetwork) -> Precond:
    """Our :class:`Precond` equal to the one an EDM pickle was trained with (its class and constants)."""
    c = network.precond_constants
    if network.precond == "EDMPrecond":
        loss = network.loss or {}
        return EDMPrecond(sigma_data=c.get("sigma_data", 0.5), P_mean=loss.get("P_mean", -1.2),
                          P_std=loss.get("P_std", 1.2), sigma_min=c.get("sigma_min", 0.0),
                          sigma_max=c.get("sigma_max", math.inf))
    if network.precond == "VPPrecond":
        return VPPrecond(**{k: c[k] for k in ("beta_d", "beta_min", "M", "epsilon_t") if k in c})
    if network.precond == "VEPrecond":
        return VEPrecond(**{k: c[k] for k in ("sigma_min", "sigma_max") if k in c})
    raise EDMPickleError(f"{network.path}: the {network.precond} preconditioning is not supported (EDM, VP and VE "
                         "are)")


def check_same_precond(theirs: Precond, ours: Precond, path: str | os.PathLike[str]) -> None:
    """Raise :class:`EDMPickleError` unless the file's preconditioning equals the model's on σ ∈ [1e-3, 1e2]."""
    sigmas = torch.logspace(-3, 2, 11, dtype=torch.float64)
    if not all(torch.allclose(a, b) for a, b in zip(theirs.coefficients(sigmas), ours.coefficients(sigmas))):
        raise EDMPickleError(f"{path} was trained with {theirs}, but this model uses {ours}; set "
                             f"model.init_args.precond (and its constants) to match the file")


def load_edm_network(path: str | os.PathLike[str], entry: str = "ema") -> tuple[UNet, EDM]:
    """Build the net of an official EDM pickle from its stored arguments, load its weights strictly, and return it
    with the matching :class:`EDM` process (e.g. a Diff-Instruct teacher). Nothing in the file is executed.

    Args:
        path: ``edm-*.pkl`` / ``network-snapshot-*.pkl``. entry: ``ema`` (or Diff-Instruct's ``Sg``).

    Returns:
        (net in eval mode, process).
    """
    network = read_edm_pickle(path, entry)
    net = unet_class(network.model_class)(**network.model_kwargs)
    check_state_dict(net, network.state_dict, network.path, f"edm-pickle:{entry}")
    net.load_state_dict(network.state_dict)
    return net.eval(), EDM(precond_of(network))


class EDMDiffusion(DiffusionLightningBase):
    """A U-Net trained with the EDM loss and sampled with EDM's Heun (or Euler) solver.

    Args:
        arch: U-Net name (``ddpmpp-cifar10`` = EDM's CIFAR "vp" net, ``ncsnpp-cifar10`` = its "ve" net,
            ``ddpmpp-ffhq64``, ``ddpmpp-afhqv2-64``, ``adm-imagenet64``, ``ddpm-cifar10``); ``label_dim`` is the
            data's number of classes, the resolution and channels are the data's.
        arch_overrides: U-Net arguments replacing the named config's (e.g. ``{model_channels: 32, channel_mult:
            [1, 2], num_blocks: 1}``); DiT's ``hidden_size`` / ``depth`` mean ``model_channels`` / ``num_blocks``.
        checkpoint: weights to start from when ``fit`` begins: an official EDM ``.pkl`` (its ``ema`` network;
            its preconditioning must equal ``precond``), a diffusion_transfer ``.ckpt``, a plain state dict, or a
            pytorch-ddpm / CBDM / T2H ``ckpt_*.pt``. Keys and shapes must match exactly, except the label input's
            under ``label_table`` (a base argument; default ``strict``).
        precond: ``edm`` (σ_d-scaled, the paper's), ``vp`` or ``ve`` (EDM's re-implementations of Song et al.).
        sigma_data / P_mean / P_std: EDM preconditioning and training σ law (0.5, -1.2, 1.2).
        label_dropout: probability of training a sample with the zero label (for guidance; EDM: 0).
        sampler: ``heun`` (EDM) or ``euler``. sample_steps: N (CIFAR 18 = 35 evaluations; FFHQ/AFHQv2 64: 40;
            ImageNet-64: 256).
        sigma_min / sigma_max / rho: the sampling grid (0.002, 80, 7).
        S_churn / S_min / S_max / S_noise: stochastic sampling (0, 0, ∞, 1 = deterministic; EDM ImageNet-64: 40,
            0.05, 50, 1.003).
        guidance_scale: s in D_u + s (D_c - D_u) (1 = none).
        allow_tf32: TF32 matmuls and convolutions on CUDA (EDM: off, for reproducible numerics); set when the
            module is set up.
        **kwargs: :class:`DiffusionLightningBase` arguments (num_classes, resolution, channels, optimizer, ...).
    """

    def __init__(
        self,
        arch: str = "ddpmpp-cifar10",
        arch_overrides: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        precond: str = "edm",
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        label_dropout: float = 0.0,
        sampler: str = "heun",
        sample_steps: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        guidance_scale: float = 1.0,
        allow_tf32: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # A plain string, so checkpoints load with torch.load(weights_only=True) (a Path would not).
        checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if sampler not in SOLVERS:
            raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SOLVERS)}")
        constants = {"sigma_data": sigma_data, "P_mean": P_mean, "P_std": P_std} if precond == "edm" else {}
        self.process = EDM(precond, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, **constants)
        self.net = build_unet(arch, img_resolution=self.resolution, in_channels=self.channels,
                              **{"label_dim": self.num_classes, "label_dropout": label_dropout,
                                 **(arch_overrides or {})})
        self.checkpoint = checkpoint
        self.allow_tf32 = allow_tf32
        self.sampling = {"sampler": sampler, "steps": sample_steps, "guidance_scale": guidance_scale,
                         "S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise}

    # ------------------------------------------------------------------------------------ weights

    def load_weights(self, path: str) -> str:
        """An EDM ``.pkl``, a DDPM/CBDM ``.pt``, a state dict or our ``.ckpt``; a pickle's precond must match.

        The label input (``map_label``, one column per class) is fitted to this data's classes under
        ``label_table``."""
        report = load_unet_checkpoint(self.net, path, label_table=self.label_table)
        self.label_table_fitted(self.net, report.label_table)
        if report.network is not None:
            check_same_precond(precond_of(report.network), self.process.precond, path)
        return report.source

    def setup(self, stage: str) -> None:
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
        super().setup(stage)

    # ------------------------------------------------------------------------------------ training

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        return edm_loss(self.net, self.process, x0, labels if self.num_classes else None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # EDM's gradient cleanup: a rare non-finite gradient entry must not poison Adam's moments.
        for p in self.trainable_parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    # ------------------------------------------------------------------------------------ sampling

    def guided_denoiser(self, labels: Tensor, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoiser(x, sigma)``: D(x; σ, y); with guidance, one doubled batch ``[x; x]`` with labels ``[y; none]``."""
        if guidance_scale == 1.0 or self.num_classes == 0:
            return lambda x, sigma: self.process.denoise(self.net, x, sigma, labels)
        none = torch.full_like(labels, -1)

        def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            both = self.process.denoise(self.net, torch.cat([x, x]), torch.cat([sigma, sigma]),
                                        torch.cat([labels, none]))
            cond, uncond = both.chunk(2)
            return apply_guidance(cond, uncond, guidance_scale)

        return denoiser

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        """Sample with this module's settings, each overridable by keyword: ``sampler``, ``steps``,
        ``guidance_scale``, ``S_churn``, ``S_min``, ``S_max``, ``S_noise``, ``progress``."""
        unknown = set(sampling) - set(self.sampling) - {"progress"}
        if unknown:
            raise TypeError(f"unknown sampling options {sorted(unknown)}; known: {sorted(self.sampling)}")
        opts = {**self.sampling, **sampling}
        return self.process.sample(
            self.guided_denoiser(labels, float(opts["guidance_scale"])), noise, num_steps=int(opts["steps"]),
            solver=opts["sampler"], S_churn=float(opts["S_churn"]), S_min=float(opts["S_min"]),
            S_max=float(opts["S_max"]), S_noise=float(opts["S_noise"]), generator=list(generators),
            progress=bool(opts.get("progress", False)))
