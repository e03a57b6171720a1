"""``Diffusion``: plain training from scratch, or full fine-tuning from a checkpoint (every paper's baseline).

The loss is DiT's: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1}, labels dropped to the
null class with probability 0.1, and the IDDPM hybrid loss (MSE on eps + VB on the learned variance). The
DiT-family methods (Diffusion Tuning, DMP, FineDiffusion) subclass this module and change the loss, the
trainable set or the label embedder; the long-tail methods (CBDM, T2H) change the loss only.

The backbone is either a DiT (``arch`` ``DiT-S/2`` ... ``DiT-XL/8``) or a U-Net of ``nets/unet.py`` (``arch`` a
``UNET_CONFIGS`` name, e.g. ``ddpm-cifar10``, the DDPM CIFAR U-Net of CBDM / T2H), wrapped by
:class:`~diffusion_transfer.nets.unet_adapter.DiTCallUNet` so both take ``net(x_t, t, y, force_drop_ids=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..diffusion.gaussian import GaussianDiffusion
from ..errors import ConfigError
from ..io.checkpoint import check_same_settings
from ..io.dit_checkpoint import load_dit_checkpoint
from ..io.unet_checkpoint import load_unet_checkpoint
from ..nets.dit import DiT_CONFIGS, build_dit
from ..nets.unet import UNET_CONFIGS, build_unet
from ..nets.unet_adapter import DiTCallUNet
from .base import DiffusionLightningBase

SAMPLERS = ("ddpm", "ddim")


def dit_loss(net: Callable[..., Tensor], process: GaussianDiffusion, x0: Tensor, labels: Tensor,
             force_drop_ids: Tensor | None = None) -> dict[str, Tensor]:
    """Per-batch DiT training loss (hybrid loss with learned sigma, else MSE), averaged over the batch.

    Args:
        net: ``net(x_t, t, y, force_drop_ids=...) -> output [B, C or 2C, R, R]``.
        process: the training process (T steps, not respaced).
        x0: clean images or latents ``[B, C, R, R]``; labels: ``[B]`` int64 (-1 = null).
        force_drop_ids: optional ``[B]`` mask of samples trained with the null label.

    Returns:
        ``{"loss", "mse", "vb"}`` scalars.
    """
    t = process.sample_timesteps(x0.shape[0], device=x0.device)
    kwargs: dict[str, Any] = {"y": labels}
    if force_drop_ids is not None:
        kwargs["force_drop_ids"] = force_drop_ids
    terms = process.training_losses(net, x0, t, model_kwargs=kwargs)
    return {k: terms[k].mean() for k in ("loss", "mse", "vb")}


def build_backbone(arch: str, resolution: int, channels: int, num_classes: int, class_dropout_prob: float,
                   learn_sigma: bool, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The denoiser named ``arch``: a DiT, or a U-Net (``UNET_CONFIGS``) in :class:`DiTCallUNet`.

    Outputs C channels, or 2C with ``learn_sigma``. A DiT always has a label table (one row for unconditional
    data) plus the null row; a U-Net has ``num_classes`` label columns and no null row (-1 skips the label).
    """
    if arch in UNET_CONFIGS:
        unet = build_unet(arch, img_resolution=resolution, in_channels=channels,
                          out_channels=2 * channels if learn_sigma else channels,
                          **{"label_dim": num_classes, **(overrides or {})})
        return DiTCallUNet(unet, class_dropout_prob)
    if not arch.startswith("DiT"):  # build_dit names the valid DiT spellings itself
        raise ValueError(f"unknown model {arch!r}; valid names: {', '.join([*DiT_CONFIGS, *UNET_CONFIGS])}")
    # Unconditional data still gets a one-row table plus the null row; every label is then -1 (null).
    return build_dit(arch, input_size=resolution, in_channels=channels, num_classes=max(num_classes, 1),
                     class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma, **(overrides or {}))


#: Settings that give the net's output its meaning; a checkpoint trained with others is refused when loaded as a
#: starting point (its shapes fit, its predictions do not).
PROCESS_SETTINGS = ("prediction", "schedule", "num_timesteps", "learn_sigma")


class Diffusion(DiffusionLightningBase):
    """A DiT or U-Net trained with Gaussian diffusion: from scratch, or fine-tuned from a checkpoint.

    Args:
        arch: DiT name, ``DiT-S/2`` ... ``DiT-XL/8``, or a U-Net name of ``UNET_CONFIGS`` (``ddpm-cifar10``:
            the DDPM CIFAR U-Net of CBDM / T2H; set ``learn_sigma: false`` for its fixed-variance recipe).
        arch_overrides: net arguments replacing the named config's (DiT e.g. ``{hidden_size: 64, depth: 4,
            num_heads: 4}``; U-Net e.g. ``{model_channels: 32, channel_mult: [1, 2, 2]}``).
        checkpoint: weights to start from when ``fit`` begins. DiT: an official DiT ``.pt``, a plain state dict,
            or a diffusion_transfer ``.ckpt`` (its EMA weights). U-Net: a pytorch-ddpm / CBDM / T2H
            ``ckpt_*.pt`` (its ``ema_model``), an EDM ``.pkl``, a state dict or our ``.ckpt``. Shapes must match
            exactly, except the label table's under ``label_table`` (a base argument; default ``strict``).
        class_dropout_prob: label dropout for classifier-free guidance (DiT: 0.1).
        learn_sigma: learned-range variance with the hybrid loss (DiT: True); False = fixed variance, MSE.
        schedule: ``linear`` (DiT) or ``cosine``. prediction: ``epsilon``, ``x0`` or ``v``.
        num_timesteps: T (1000).
        low_noise_scale: s of the training law of t, P(t) ∝ (T - t)^s (Diff-Tuning's replay law). 0 (default) is
            DDPM/DiT's uniform t. s > 0 spends more steps at low noise (mean t ≈ T / (s + 2): 333 at s = 1), where a
            transfer that keeps the layout and changes fine detail (strokes, texture) has to learn; the shapes demo
            reaches the same quality with half the images at s = 1 (docs/results.md, "The transfer stage").
        sampler: ``ddpm`` (ancestral) or ``ddim``. sample_steps: respaced steps (DiT: 250).
        guidance_scale: classifier-free guidance s in ``u + s (c - u)`` (1 = none; DiT: 1.5 FID, 4.0 pictures).
        guidance_channels: guide only the first k channels (3 reproduces DiT); None guides all.
        eta: DDIM noise (0 = deterministic).
        clip_denoised: clamp x̂₀ to [-1, 1] at every sampling step. None (default) decides by the space: True for
            pixels (as ADM/IDDPM sample their pixel models; without it an undertrained pixel model's x̂₀
            overshoots at high noise and the samples end as scattered saturated pixels), False for VAE latents
            (DiT's ``clip_denoised=False``: latents are not bounded).
        compile: wrap the net in ``torch.compile`` for training and sampling.
        vae: local folder of the SD VAE (diffusers ``AutoencoderKL``) for latent models: the net works on
            latents (train on a zip from ``diffusion-transfer-data encode``) and samples are decoded to
            images. Loaded on first use and never saved in checkpoints.
        **kwargs: :class:`DiffusionLightningBase` arguments (num_classes, resolution, channels, optimizer, ...).
    """

    def __init__(
        self,
        arch: str = "DiT-S/2",
        arch_overrides: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        schedule: str = "linear",
        prediction: str = "epsilon",
        num_timesteps: int = 1000,
        low_noise_scale: float = 0.0,
        sampler: str = "ddpm",
        sample_steps: int = 250,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
        eta: float = 0.0,
        clip_denoised: bool | None = None,
        compile: bool = False,
        vae: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(compile=compile, **kwargs)
        # Plain strings, so checkpoints load with torch.load(weights_only=True) (a Path would not).
        checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        vae = None if vae is None else os.fspath(vae)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
        self.net = build_backbone(arch, self.resolution, self.channels, self.num_classes, class_dropout_prob,
                                  learn_sigma, arch_overrides)
        self.process = GaussianDiffusion(num_timesteps, schedule, prediction,
                                         "learned_range" if learn_sigma else "fixedlarge",
                                         low_noise_scale=low_noise_scale)
        self.checkpoint = checkpoint
        self.sampling = {"sampler": sampler, "steps": sample_steps, "guidance_scale": guidance_scale,
                         "guidance_channels": guidance_channels, "eta": eta,
                         "clip_denoised": vae is None if clip_denoised is None else bool(clip_denoised)}
        self._respaced: dict[tuple[int, str], GaussianDiffusion] = {}
        self.vae = vae
        self._codec: Any = None

    def to_images(self, samples: Tensor) -> Tensor:
        if self.vae is None:
            return samples
        if self._codec is None:
            from ..nets.vae import LatentCodec

            # Kept outside the module tree: frozen, not averaged by EMA, never in checkpoints.
            object.__setattr__(self, "_codec", LatentCodec.from_folder(self.vae))
        codec = self._codec.to(samples.device)
        return codec.decode(samples.to(next(codec.parameters()).dtype)).float()

    # ------------------------------------------------------------------------------------ weights

    def load_weights(self, path: str) -> str:
        """Load ``path`` strictly but for the label table (``label_table``): DiT files into a DiT, U-Net files
        (CBDM / T2H ``.pt``, EDM ``.pkl``, our ``.ckpt``, ...) into the U-Net. Our own ``.ckpt`` must also have
        been trained with this model's :data:`PROCESS_SETTINGS` (e.g. a v-prediction source for a v model)."""
        check_same_settings(path, {name: self.hparams[name] for name in PROCESS_SETTINGS if name in self.hparams})
        module = self.net.unet if isinstance(self.net, DiTCallUNet) else self.net
        load = load_unet_checkpoint if isinstance(self.net, DiTCallUNet) else load_dit_checkpoint
        report = load(module, path, label_table=self.label_table)
        self.label_table_fitted(module, report.label_table)
        return report.source

    # ------------------------------------------------------------------------------------ training

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        return dit_loss(self.denoiser, self.process, x0, labels)

    # ------------------------------------------------------------------------------------ sampling

    def sampling_process(self, steps: int, sampler: str) -> GaussianDiffusion:
        """The training process respaced for ``sampler`` with ``steps`` steps (cached, not a child module).

        DDIM uses DDIM's even stride (``"ddim50"``: 0, 20, ..., 980); DDPM uses IDDPM's rounding, which keeps
        both ends (``"250"``: 0, 4, ..., 999), as DiT samples.
        """
        full = steps >= self.process.num_timesteps
        spec = "full" if full else (f"ddim{steps}" if sampler == "ddim" else str(steps))
        key = (spec, str(self.process.betas.device))
        if key not in self._respaced:
            self._respaced[key] = self.process if full else self.process.respace(spec)
        return self._respaced[key]

    def guided_denoiser(self, labels: Tensor, guidance_scale: float,
                        guidance_channels: int | None) -> Callable[[Tensor, Tensor], Tensor]:
        """``model_fn(x, t)`` with classifier-free guidance: one doubled batch ``[x; x]`` with labels ``[y; null]``."""
        if guidance_scale == 1.0 or self.num_classes == 0:
            return lambda x, t: self.denoiser(x, t, labels)
        null = torch.full_like(labels, -1)

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            cond, uncond = out.chunk(2)
            return self.process.guided_output(cond, uncond, guidance_scale, guidance_channels)

        return model_fn

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        """Sample with this module's sampling settings, each overridable by keyword.

        Keywords: ``sampler``, ``steps``, ``guidance_scale``, ``guidance_channels``, ``eta``, ``clip_denoised``,
        ``progress``.
        """
        unknown = set(sampling) - set(self.sampling) - {"progress"}
        if unknown:
            raise TypeError(f"unknown sampling options {sorted(unknown)}; known: {sorted(self.sampling)}")
        opts = {**self.sampling, **sampling}
        if opts["sampler"] not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{opts['sampler']}'; choose one of {', '.join(SAMPLERS)}")
        process = self.sampling_process(int(opts["steps"]), opts["sampler"])
        model_fn = self.guided_denoiser(labels, float(opts["guidance_scale"]), opts["guidance_channels"])
        common = {"noise": noise, "generator": list(generators), "progress": bool(opts.get("progress", False)),
                  "clip_denoised": bool(opts["clip_denoised"])}
        if opts["sampler"] == "ddim":
            return process.ddim_sample(model_fn, eta=float(opts["eta"]), **common)
        return process.ddpm_sample(model_fn, **common)
