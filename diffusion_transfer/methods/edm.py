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
step, TF32 off, and the non-leaking augmentation (``augment_p``: 0.12 on CIFAR-10, 0.15 FFHQ / AFHQv2;
:class:`~diffusion_transfer.diffusion.augment.AugmentPipe`), whose 9-d labels condition nets with ``augment_dim`` 9.
Sampling passes no augment labels (= zeros: ``map_augment`` has no bias).

The loss is the per-pixel mean (EDM's code sums over pixels: the same gradient direction, but Adam's eps then acts
on a gradient C·H·W times smaller; Diff-Instruct's phase A sums, as its original does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..diffusion.augment import AUGMENT_DIM, AugmentPipe
from ..diffusion.edm import EDM, PRECONDS, EDMPrecond, Precond, VEPrecond, VPPrecond, make_precond
from ..diffusion.guidance import apply_guidance
from ..errors import ConfigError
from ..io.edm_pickle import EDMNetwork, EDMPickleError, read_edm_pickle
from ..io.unet_checkpoint import check_state_dict, load_unet_checkpoint
from ..nets.unet import UNet, build_unet, unet_class
from .base import DiffusionLightningBase

SOLVERS = ("heun", "euler")


def edm_loss(net: Callable[..., Tensor], process: EDM, x0: Tensor, labels: Tensor | None = None,
             augment_labels: Tensor | None = None, reduction: str = "mean") -> dict[str, Tensor]:
    """EDM training loss of a batch: the batch mean of λ(σ) ‖D(x0 + n; σ) - x0‖² reduced over pixels.

    Args:
        net: ``net(x, c_noise, class_labels, augment_labels)`` (a U-Net of ``nets/unet.py``).
        process: the :class:`EDM` process (its precond fixes the σ law and λ).
        x0: clean (possibly augmented) images [B, C, R, R] in [-1, 1]; labels: int64 [B] (-1 = none) or one-hot;
            augment_labels: [B, augment_dim] or None.
        reduction: over the pixels of a sample, ``mean`` or ``sum`` (EDM's and Diff-Instruct's code: C·R² times
            the mean; not the same Adam step, since Adam's eps is not scaled with the gradient).

    Returns:
        ``{"loss"}``, a scalar.
    """
    return {"loss": process.training_losses(net, x0, labels, augment_labels, reduction=reduction)["loss"].mean()}


#: Our preconditioning names by EDM's class names.
PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
#: Constants that follow from the others (VP's σ range from β_d, β_min, ε_t): not compared, since EDM computes
#: VP's σ(ε_t) in float32 (0.000977 for 0.0010005) and the constants they follow from are compared anyway.
_DERIVED = {"vp": ("sigma_min", "sigma_max")}
#: Settings of EDM pickles that are no preconditioning constant (the fp16 switch applies at run time only).
_NOT_CONSTANTS = ("use_fp16", "class_name")


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


def precond_settings(precond: Precond) -> dict[str, float]:
    """Every constant of a preconditioning: its fields (σ_d, P_mean, P_std, β_d, ...) and its σ range."""
    return {**{f.name: getattr(precond, f.name) for f in dataclasses.fields(precond)},  # type: ignore[arg-type]
            "sigma_min": precond.sigma_min, "sigma_max": precond.sigma_max}


def precond_fix(precond: str, constant: str, value: Any) -> str:
    """How to give a model of preconditioning ``precond`` (``edm`` / ``vp`` / ``ve``) this value of a constant:
    ``set model.init_args.<key>: <value>``."""
    if precond == "edm" and constant in ("sigma_data", "P_mean", "P_std"):
        return f"set model.init_args.{constant}: {value}"
    return f"set model.init_args.precond_kwargs.{constant}: {value}"


def _file_settings(network: EDMNetwork) -> list[tuple[str, str, Any]]:
    """(where, name, value) of every preconditioning constant and loss setting stored in an EDM pickle."""
    found = [(f"{network.entry} ({network.precond})", k, v) for k, v in network.precond_constants.items()]
    if network.loss is not None:
        found += [(f"loss_fn ({network.loss.get('class_name')})", k, v) for k, v in network.loss.items()]
    return [(where, k, v) for where, k, v in found if k not in _NOT_CONSTANTS]


def check_same_precond(theirs: Precond | EDMNetwork, ours: Precond, path: str | os.PathLike[str]) -> None:
    """Raise :class:`EDMPickleError` unless a checkpoint's preconditioning and loss settings equal the model's.

    Args:
        theirs: the :class:`EDMNetwork` of an EDM pickle (its precond class, every constant stored with it and every
            setting of its ``loss_fn``: σ_d, P_mean, P_std; β_d, β_min, M, ε_t; the σ range, except VP's, which
            follows from its β_d, β_min, ε_t), or the :class:`Precond` a checkpoint of ours was trained with.
        ours: the model's. path: the file, named in the error.

    Raises:
        EDMPickleError: another precond class, or constants that differ (each named, with the file's value, the
            model's and the config key that sets it); a loss setting the model's precond does not have.
    """
    if isinstance(theirs, EDMNetwork):
        name = PRECOND_NAMES.get(theirs.precond)
        if name is None:  # iDDPM and unknown classes
            precond_of(theirs)
        settings = _file_settings(theirs)
        described = theirs.precond
    else:
        name, settings, described = theirs.name, [("hyper-parameters", k, v) for k, v in
                                                  precond_settings(theirs).items()], repr(theirs)
    if name != ours.name:
        raise EDMPickleError(f"{path} was trained with {described} (precond {name}), but this model uses precond "
                             f"{ours.name}; set model.init_args.precond: {name} and its constants to match the file")
    model = precond_settings(ours)
    differ, foreign = [], []
    for where, key, value in settings:
        if key in _DERIVED.get(ours.name, ()):
            continue
        if key not in model:
            foreign.append(f"{key}={value} ({where})")
        elif not isinstance(value, (int, float)) or not math.isclose(float(value), float(model[key]),
                                                                     rel_tol=1e-6, abs_tol=1e-12):
            fix = precond_fix(ours.name, key, value)
            differ.append(f"{key}: file {value} ({where}) vs model {model[key]} -> {fix}")
    if foreign:
        raise EDMPickleError(f"{path} sets {', '.join(foreign)}, which precond {ours.name} does not have (this "
                             "library draws the training σ from the precond's own law); the file's network and loss "
                             "do not belong to one of the edm / vp / ve recipes")
    if differ:
        raise EDMPickleError(f"{path} was trained with other {ours.name} constants than this model's: "
                             + "; ".join(differ))


def _precond_constants(precond: str, constants: dict[str, float],
                       precond_kwargs: dict[str, float] | None) -> dict[str, float]:
    """The constants of ``precond``: the top-level EDM ones and ``precond_kwargs``, checked against its fields."""
    extra = dict(precond_kwargs or {})
    if precond not in PRECONDS:
        return constants  # make_precond names the valid choices
    known = {f.name for f in dataclasses.fields(PRECONDS[precond])}  # type: ignore[arg-type]
    if set(extra) & set(constants) or set(extra) - known:
        allowed = sorted(known - set(constants))
        raise ConfigError(f"precond_kwargs {sorted(extra)} is not valid for precond {precond}: it takes "
                          f"{', '.join(allowed)}" + (" (sigma_data, P_mean and P_std are top-level model options)"
                                                     if precond == "edm" else ""))
    return {**constants, **extra}


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
            its preconditioning class, constants and loss settings must equal this model's: an error names each
            one that differs and its config key), a diffusion_transfer ``.ckpt``, a plain state dict, or a
            pytorch-ddpm / CBDM / T2H ``ckpt_*.pt``. Keys and shapes must match exactly, except the label input's
            under ``label_table`` (a base argument; default ``strict``).
        precond: ``edm`` (σ_d-scaled, the paper's), ``vp`` or ``ve`` (EDM's re-implementations of Song et al.).
        sigma_data / P_mean / P_std: EDM preconditioning and training σ law (0.5, -1.2, 1.2).
        precond_kwargs: the other constants of the precond: VP ``beta_d``, ``beta_min``, ``M``, ``epsilon_t``
            (19.9, 0.1, 1000, 1e-5); VE ``sigma_min``, ``sigma_max`` (its training and supported σ range, 0.02,
            100); EDM ``sigma_min``, ``sigma_max`` (0, ∞).
        augment_p: probability of EDM's non-leaking augmentation (:class:`AugmentPipe`; EDM: 0.12 on CIFAR-10,
            0.15 on FFHQ / AFHQv2, 0 on ImageNet). Needs a net with ``augment_dim`` 9, which its labels feed.
        label_dropout: probability of training a sample with the zero label (for guidance; EDM: 0).
        sampler: ``heun`` (EDM) or ``euler``. sample_steps: N (CIFAR 18 = 35 evaluations; FFHQ/AFHQv2 64: 40;
            ImageNet-64: 256).
        sigma_min / sigma_max / rho: the sampling grid (0.002, 80, 7).
        S_churn / S_min / S_max / S_noise: stochastic sampling (0, 0, ∞, 1 = deterministic; EDM ImageNet-64: 40,
            0.05, 50, 1.003).
        guidance_scale: s in D_u + s (D_c - D_u) (1 = none).
        allow_tf32: TF32 matmuls and convolutions on CUDA (EDM: off, for reproducible numerics); set when the
            module is set up.
        compile: ``torch.compile`` the net (:attr:`DiffusionLightningBase.denoiser`); off: on the 2-core CPU it
            was slower than eager bf16 for DDPM++ (``docs/results.md``).
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
        precond_kwargs: dict[str, float] | None = None,
        augment_p: float = 0.0,
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
        compile: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(compile=compile, **kwargs)
        # A plain string, so checkpoints load with torch.load(weights_only=True) (a Path would not).
        checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if sampler not in SOLVERS:
            raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SOLVERS)}")
        constants = {"sigma_data": sigma_data, "P_mean": P_mean, "P_std": P_std} if precond == "edm" else {}
        self.process = EDM(make_precond(precond, **_precond_constants(precond, constants, precond_kwargs)),
                           sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.net = build_unet(arch, img_resolution=self.resolution, in_channels=self.channels,
                              **{"label_dim": self.num_classes, "label_dropout": label_dropout,
                                 **(arch_overrides or {})})
        if not 0 <= augment_p <= 1:
            raise ConfigError(f"augment_p must be in [0, 1], got {augment_p}")
        if augment_p > 0 and getattr(self.net, "augment_dim", 0) != AUGMENT_DIM:
            raise ConfigError(f"augment_p: {augment_p} feeds EDM's {AUGMENT_DIM} augment labels to the net, but the "
                              f"{arch} net here has augment_dim {getattr(self.net, 'augment_dim', 0)}; set "
                              f"model.init_args.arch_overrides.augment_dim: {AUGMENT_DIM}, or augment_p: 0")
        self.augment_pipe = AugmentPipe(augment_p) if augment_p > 0 else None
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
            check_same_precond(report.network, self.process.precond, path)
        return report.source

    def setup(self, stage: str) -> None:
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
        super().setup(stage)

    # ------------------------------------------------------------------------------------ training

    def augment(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(augmented images, augment labels [B, 9]) with ``augment_p``, from torch's global RNG; (images, None)
        without augmentation."""
        return (images, None) if self.augment_pipe is None else self.augment_pipe(images)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        y, augment_labels = self.augment(x0)
        return edm_loss(self.denoiser, self.process, y, labels if self.num_classes else None, augment_labels)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # EDM's gradient cleanup: a rare non-finite gradient entry must not poison Adam's moments.
        for p in self.trainable_parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    # ------------------------------------------------------------------------------------ sampling

    def guided_denoiser(self, labels: Tensor, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoiser(x, sigma)``: D(x; σ, y); with guidance, one doubled batch ``[x; x]`` with labels ``[y; none]``."""
        if guidance_scale == 1.0 or self.num_classes == 0:
            return lambda x, sigma: self.process.denoise(self.denoiser, x, sigma, labels)
        none = torch.full_like(labels, -1)

        def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            both = self.process.denoise(self.denoiser, torch.cat([x, x]), torch.cat([sigma, sigma]),
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
