"""Long-tailed class-conditional diffusion: the DDPM baseline, CBDM and T2H (spec ``papers/longtail.md``).

All three train an ε-prediction DDPM (linear β, T = 1000, fixed-large variance; the DDPM CIFAR U-Net or a DiT) with
classifier-free guidance as CBDM and T2H do it: with probability p = 0.1 the **whole batch** is trained without
labels (one draw per step, spec 2.2), and sampling uses ε̂ = ε_c + w (ε_c − ε_u), which is guidance scale
s = 1 + w here (T2H's evaluation: DDIM, 100 steps, w = 1.5, so s = 2.5).

DDPM:   L = mean ‖ε_θ(x_t, t, y or ∅) − ε‖²

CBDM (Qin et al., spec 2.5), one more forward pass at the same x_t and t:
    y' ~ balanced (the paper: uniform over classes) or q(y) (the code, from scratch)
    h = ε_θ(x_t, t, y),  h' = ε_θ(x_t, t, y'),  λ_t = τ t / T
    L = mean ‖h − ε‖² + mean[λ_t ‖h − sg(h')‖² + γ λ_t ‖sg(h) − h'‖²]          (γ = 1/4; 0 on label-dropped rows)

T2H (Zhang et al., spec 2.8), under no_grad in float32, for each sample i of the batch:
    c_i = x_t,i / √ᾱ_t,  σ_t² = 1/ᾱ_t − 1                                      (VE rescaling)
    W_ij = softmax_j(−‖c_i − x0_j‖² / 2σ²_{t_i})    (j over the batch, i included; × q(y_j)^β with prior_power β)
    z_i ~ Categorical(W_i·); kept iff q(y_{z_i}) ≥ q(y_i) (t2h; ≤ for h2t; always for full) and t_i < cut_time
          (when cut_time ≥ 0), else z_i = i
    ε̃_i = ε_i + √(ᾱ_t / (1 − ᾱ_t)) (x0_i − x0_{z_i}),  i.e. x_t,i = √ᾱ_t x0_{z_i} + √(1 − ᾱ_t) ε̃_i
    L = mean ‖ε_θ(x_t, t, y or ∅) − ε̃‖²              (the label y_i is never swapped; q = training class prior)
    The share of rows with z_i ≠ i is logged against t (10 buckets, spec 6).

``conditional: false`` (DDPM, T2H) trains an unconditional model on the labelled data, as the T2H paper's Table 1:
the net always gets ∅ (no label drop, no guidance), and T2H's gate still reads y. The U-Net is then built without
its label map (pytorch-ddpm's unconditional net, so those checkpoints load); a DiT keeps its table and gets its null
row. CBDM cannot be unconditional: its regulariser compares the predictions for two labels y and y'.

Other predictions (``prediction: v`` or ``x0``, a departure from the papers, used by the shapes configs because an
ε-prediction DiT draws pixel clouds there): every loss above goes through the process, which regresses the chosen
target of the same pair (for T2H the re-targeted pair (x0_z, ε̃), so x_t and the gate are unchanged). CBDM's h and
h' are then v predictions; at a fixed x_t, ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t, so ‖h − h'‖² in v is the ε distance
divided by ᾱ_t: the regulariser weighs high-noise steps more than in ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..diffusion.gaussian import GaussianDiffusion, mean_flat
from ..errors import ConfigError
from ..nets.unet import UNET_CONFIGS
from .diffusion import Diffusion, dit_loss

LABEL_DROPS = ("batch", "sample")
CBDM_TARGETS = ("uniform", "train")
TRANSFER_MODES = ("t2h", "h2t", "full")
TRANSFER_BUCKETS = 10  # the per-t transfer histogram: T / 10 timesteps a bucket (spec 6, "transfer-rate logging")


# ------------------------------------------------------------------------------------------------ pure losses


def label_drop_mask(batch: int, prob: float, mode: str = "batch", device: torch.device | str | None = None) -> Tensor:
    """Which samples train unconditionally: bool ``[batch]``.

    ``batch`` (CBDM / T2H): one draw per step, so all labels or none are dropped; ``sample``: one draw per sample.
    """
    if mode == "batch":
        return torch.full((batch,), bool(torch.rand(()) < prob), dtype=torch.bool, device=device)
    if mode == "sample":
        return torch.rand(batch, device=device) < prob
    raise ConfigError(f"label_drop must be one of {LABEL_DROPS}, got {mode!r}")


def _conditioning(labels: Tensor, drop: Tensor | None) -> dict[str, Tensor]:
    return {"y": labels} if drop is None else {"y": labels, "force_drop_ids": drop}


def _null_conditioning(labels: Tensor) -> dict[str, Tensor]:
    """No class reaches the net: null labels, every row dropped (a DiT's null row; a U-Net skips its label map)."""
    return _conditioning(torch.full_like(labels, -1), torch.ones_like(labels, dtype=torch.bool))


def cbdm_regulariser(h: Tensor, h_other: Tensor, t: Tensor, num_timesteps: int, tau: float = 1.0,
                     gamma: float = 0.25, active: Tensor | None = None) -> Tensor:
    """CBDM's mean[λ_t ‖h − sg(h')‖² + γ λ_t ‖sg(h) − h'‖²], λ_t = τ t / T (a scalar).

    Args:
        h: ε prediction for the true labels ``[B, C, R, R]``; h_other: for the drawn labels y'.
        t: original timesteps 0..T-1 ``[B]``; num_timesteps: T.
        tau: τ; gamma: γ, the commitment weight (hard-coded 1/4 in CBDM's code).
        active: bool ``[B]``; rows marked False (label dropped) contribute 0.
    """
    lam = tau * t.to(h.dtype) / num_timesteps
    per_sample = lam * (mean_flat((h - h_other.detach()) ** 2) + gamma * mean_flat((h.detach() - h_other) ** 2))
    if active is not None:
        per_sample = per_sample * active.to(per_sample)
    return per_sample.mean()


def cbdm_loss(net: Callable[..., Tensor], process: GaussianDiffusion, x0: Tensor, labels: Tensor,
              other_labels: Tensor, drop: Tensor | None = None, tau: float = 1.0,
              gamma: float = 0.25) -> dict[str, Tensor]:
    """CBDM's loss of a batch: the DDPM loss plus :func:`cbdm_regulariser` (skipped if every label is dropped).

    Args:
        net: ``net(x_t, t, y, force_drop_ids=...)``; process: the training process.
        x0: ``[B, C, R, R]``; labels: ``[B]``; other_labels: y' ``[B]``; drop: bool ``[B]`` label-drop mask.

    Returns:
        ``{"loss", "mse", "vb", "reg"}`` scalars.
    """
    t = process.sample_timesteps(x0.shape[0], device=x0.device)
    terms = process.training_losses(net, x0, t, model_kwargs=_conditioning(labels, drop))
    out = {k: terms[k].mean() for k in ("loss", "mse", "vb")}
    out["reg"] = torch.zeros((), device=x0.device)
    if drop is not None and drop.device.type == "cpu" and bool(drop.all()):
        return out  # the code adds the regulariser only when y ≠ ∅ (saves the second pass)
    t_model = process.model_timesteps(t)
    keep = None if drop is None else torch.zeros_like(drop)  # y' is never dropped
    h_other = net(terms["x_t"], t_model, **_conditioning(other_labels, keep))
    h, h_other = (process.split_output(o, x0.shape[1])[0] for o in (terms["model_output"], h_other))
    out["reg"] = cbdm_regulariser(h, h_other, t_model, process.original_num_timesteps, tau, gamma,
                                  None if drop is None else ~drop)
    out["loss"] = out["loss"] + out["reg"]
    return out


@torch.no_grad()
def transfer_weights(xt: Tensor, x0: Tensor, abar: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """T2H's posterior over the batch: W_ij ∝ q(y_j)^β exp(−‖x_t,i/√ᾱ_i − x0_j‖² / 2σ_i²), σ_i² = 1/ᾱ_i − 1.

    Args:
        xt: noisy samples ``[B, ...]``; x0: the clean batch ``[B, ...]``; abar: ᾱ of each row's t ``[B]``.
        log_prior: β log q(y_j) ``[B]`` (the prior-weighted sampler) or None.

    Returns:
        float32 ``[B, B]``, rows summing to 1. Always float32 with autocast off (spec pitfall 3).
    """
    with torch.autocast(device_type=xt.device.type, enabled=False):
        abar = abar.to(xt.device)  # the process's float64 table (float32 on MPS)
        c = xt.flatten(1).float() / abar.sqrt().float()[:, None]
        ref = x0.flatten(1).float()
        # ‖c_i − x0_j‖² = ‖c_i‖² − 2 c_i·x0_j + ‖x0_j‖²: the first term is constant along row i, so the row
        # softmax does without it, and float32 never subtracts numbers of order 1e8 (‖c_i‖² near t = T).
        logits = (2 * c @ ref.T - (ref**2).sum(1)[None]) / (2 * (1 / abar - 1)).float()[:, None]
        if log_prior is not None:
            logits = logits + log_prior.float()[None]
        return torch.softmax(logits, dim=1)


@torch.no_grad()
def gate_transfer(z: Tensor, labels: Tensor, prior: Tensor, t: Tensor, mode: str = "t2h",
                  cut_time: int = -1) -> Tensor:
    """Keep the drawn source z_i only where the gate allows it, else z_i = i: int64 ``[B]``.

    ``t2h``: q(y_{z_i}) ≥ q(y_i) (toward classes at least as frequent); ``h2t``: ≤; ``full``: always. With
    ``cut_time`` ≥ 0, only rows with t_i < cut_time may move. Equal priors (same class, or i itself) always pass.
    """
    if mode not in TRANSFER_MODES:
        raise ConfigError(f"transfer_mode must be one of {TRANSFER_MODES}, got {mode!r}")
    src, own = prior[labels[z]], prior[labels]
    keep = {"t2h": src >= own, "h2t": src <= own, "full": torch.ones_like(own, dtype=torch.bool)}[mode]
    if cut_time >= 0:
        keep = keep & (t < cut_time)
    return torch.where(keep, z, torch.arange(len(z), device=z.device))


@torch.no_grad()
def t2h_targets(process: GaussianDiffusion, x0: Tensor, labels: Tensor, prior: Tensor, t: Tensor, noise: Tensor,
                mode: str = "t2h", cut_time: int = -1,
                prior_power: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The re-targeted pair of each row: (x0_z ``[B, ...]``, ε̃ ``[B, ...]``, z int64 ``[B]``).

    Args:
        process: the training process; x0: the clean batch; labels: its classes ``[B]`` (the true ones, also in
            label-dropped batches); prior: q(y), the training class prior ``[K]``; t: process indices ``[B]``;
            noise: ε ``[B, ...]``.
        mode / cut_time: the gate (:func:`gate_transfer`). prior_power: β of the prior-weighted sampler
            (T2H's ``--transfer_tr_tau`` with ``--tr_tau``), which has no gate, so it needs ``mode="full"``.
    """
    abar = process.alphas_cumprod[t.to(process.alphas_cumprod.device)]
    log_prior = None if prior_power is None else prior_power * prior[labels].log()
    z = torch.multinomial(transfer_weights(process.q_sample(x0, t, noise), x0, abar, log_prior), 1).squeeze(1)
    z = gate_transfer(z, labels, prior, process.model_timesteps(t), mode, cut_time)
    scale = (abar / (1 - abar)).sqrt().to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return x0[z], noise + scale * (x0 - x0[z]), z  # ε̃ is exactly ε where z_i = i


def transfer_histogram(moved: Tensor, t_model: Tensor, num_timesteps: int,
                       buckets: int = TRANSFER_BUCKETS) -> tuple[Tensor, Tensor]:
    """Swaps and samples per timestep bucket: two int64 ``[buckets]``; bucket k holds t in [kT/n, (k+1)T/n).

    Args:
        moved: bool ``[B]``, z_i ≠ i; t_model: the original timesteps 0..T-1 ``[B]``; num_timesteps: T.
    """
    bucket = (t_model.long() * buckets // num_timesteps).clamp(0, buckets - 1)
    return torch.bincount(bucket[moved], minlength=buckets), torch.bincount(bucket, minlength=buckets)


def transfer_bucket_names(num_timesteps: int, buckets: int = TRANSFER_BUCKETS) -> list[str]:
    """``t{lo}-{hi}`` of each bucket of :func:`transfer_histogram`, both ends included (T = 1000: t0-99 ...)."""
    return [f"t{k * num_timesteps // buckets}-{(k + 1) * num_timesteps // buckets - 1}" for k in range(buckets)]


def t2h_loss(net: Callable[..., Tensor], process: GaussianDiffusion, x0: Tensor, labels: Tensor, prior: Tensor,
             drop: Tensor | None = None, mode: str = "t2h", cut_time: int = -1,
             prior_power: float | None = None, *, conditional: bool = True, t: Tensor | None = None,
             noise: Tensor | None = None) -> dict[str, Tensor]:
    """T2H's loss of a batch: the DDPM loss of the re-targeted pair (x0_z, ε̃), which has the same x_t.

    Args:
        net, process, x0, labels, drop: as :func:`cbdm_loss`; the rest as :func:`t2h_targets`.
        conditional: False trains an unconditional model (the paper's Table 1): the labels still drive the gate,
            but the net gets only the null label (-1, every row dropped) and ``drop`` is ignored.
        t / noise: process indices ``[B]`` and ε; drawn (t first, then ε) when None.

    Returns:
        Scalars ``loss``, ``mse``, ``vb`` and ``transfer_rate`` (the share of rows with z_i ≠ i); per row ``z``
        (the gated source index, int64 ``[B]``), ``eps_tilde`` (ε̃, the regression target) and ``t``; and the
        per-t histogram ``transfer_swaps`` / ``transfer_samples`` (:func:`transfer_histogram`, int64
        ``[TRANSFER_BUCKETS]``).
    """
    if t is None:
        t = process.sample_timesteps(x0.shape[0], device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)  # dit_loss's draw order (t, then ε): a closed gate gives exactly its loss
    x0_z, eps_tilde, z = t2h_targets(process, x0, labels, prior, t, noise, mode, cut_time, prior_power)
    cond = _conditioning(labels, drop) if conditional else _null_conditioning(labels)
    # The net sees √ᾱ x0_z + √(1-ᾱ) ε̃, which is x_t up to float rounding (bit for bit where z_i = i).
    terms = process.training_losses(net, x0_z, t, noise=eps_tilde, model_kwargs=cond)
    out = {k: terms[k].mean() for k in ("loss", "mse", "vb")}
    moved = z != torch.arange(len(z), device=z.device)
    out["transfer_rate"] = moved.float().mean()
    swaps, samples = transfer_histogram(moved, process.model_timesteps(t), process.original_num_timesteps)
    return {**out, "z": z, "eps_tilde": eps_tilde, "t": t, "transfer_swaps": swaps, "transfer_samples": samples}


# ------------------------------------------------------------------------------------------------ modules


class LongTailDDPM(Diffusion):
    """The DDPM baseline of CBDM / T2H: ε-prediction, fixed-large variance, whole-batch label drop for CFG.

    Args:
        arch: ``ddpm-cifar10`` (the DDPM CIFAR U-Net) by default; any ``Diffusion`` arch (a DiT too).
        learn_sigma: False (DDPM's fixed variance); True trains a DiT-style learned variance with the VB term.
        class_dropout_prob: the label-drop probability p (0.1).
        label_drop: ``batch`` (CBDM / T2H: one draw per step) or ``sample`` (per-sample, DiT's way).
        sampler / sample_steps / guidance_scale: T2H's evaluator, DDIM 100 steps at w = 1.5 (s = 1 + w = 2.5).
        class_counts: training images per class, one per class in label order; None reads
            ``trainer.datamodule.class_counts`` in setup. Either is checked against ``num_classes`` at once.
        sample_in_train_mode: keep the U-Net's dropout active while sampling, as T2H's evaluator does.
        clip_denoised: False (default): no x̂₀ clipping inside the sampling loop, as the CBDM / T2H samplers
            (only the final output is clipped). True clamps x̂₀ at every step.
        conditional: False trains and samples an unconditional model on labelled data (the T2H paper's Table 1):
            the net only ever gets the null label (no label drop, no guidance). A U-Net is built without its label
            map (``label_dim`` 0: pytorch-ddpm's unconditional layout); a DiT keeps its table and needs its null row
            (class_dropout_prob > 0). The labels still give ``class_counts`` (and T2H's gate).
        **kwargs: :class:`Diffusion` arguments (``arch_overrides``, ``checkpoint``, optimizer, ...).
    """

    def __init__(self, arch: str = "ddpm-cifar10", learn_sigma: bool = False, class_dropout_prob: float = 0.1,
                 label_drop: str = "batch", sampler: str = "ddim", sample_steps: int = 100,
                 guidance_scale: float = 2.5, class_counts: Sequence[int] | None = None,
                 sample_in_train_mode: bool = False, clip_denoised: bool = False, conditional: bool = True,
                 **kwargs: Any) -> None:
        overrides = kwargs.pop("arch_overrides", None)
        if not conditional and arch in UNET_CONFIGS:
            if (overrides or {}).get("label_dim"):
                raise ConfigError(f"{type(self).__name__} with conditional: false builds its U-Net without a label "
                                  f"map, but arch_overrides sets label_dim={overrides['label_dim']}; remove it")
            overrides = {**(overrides or {}), "label_dim": 0}
        super().__init__(arch=arch, arch_overrides=overrides, learn_sigma=learn_sigma,
                         class_dropout_prob=class_dropout_prob, sampler=sampler, sample_steps=sample_steps,
                         guidance_scale=guidance_scale, clip_denoised=clip_denoised, **kwargs)
        if label_drop not in LABEL_DROPS:
            raise ConfigError(f"label_drop must be one of {LABEL_DROPS}, got {label_drop!r}")
        embedder = getattr(self.net, "y_embedder", None)
        if not conditional and embedder is not None and getattr(embedder, "null_index", 0) is None:
            raise ConfigError(f"{type(self).__name__} with conditional: false feeds the DiT its null label, but "
                              "class_dropout_prob=0 built it without a null row; set class_dropout_prob > 0 (0.1)")
        self.conditional = bool(conditional)
        self.label_drop = label_drop
        self.class_dropout_prob = class_dropout_prob
        self.class_counts = (None if class_counts is None
                             else self.checked_class_counts(class_counts, "model.init_args.class_counts"))
        self.sample_in_train_mode = sample_in_train_mode

    #: Whether the loss needs q(y) (the training class prior): T2H's gate, CBDM's y' ~ q(y).
    needs_class_prior = False

    def checked_class_counts(self, counts: Sequence[int], source: str) -> list[int]:
        """``counts`` as ints, if they fit this model: one non-negative count per class, not all zero.

        Raises:
            ConfigError: naming ``source`` (where the counts came from) and what to fix.
        """
        counts = [int(c) for c in counts]
        shown = counts if len(counts) <= 12 else [*counts[:5], "...", *counts[-5:]]
        if len(counts) != self.num_classes:
            raise ConfigError(f"{type(self).__name__} has num_classes={self.num_classes}, but {source} has "
                              f"{len(counts)} class counts {shown}: give one count per class, in label order")
        if min(counts, default=0) < 0 or sum(counts) <= 0:
            raise ConfigError(f"{source} must be non-negative training-image counts, not all zero; got {shown}")
        return counts

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.class_counts is None and self._trainer is not None:
            counts = getattr(self.trainer.datamodule, "class_counts", None)
            if counts:  # checked here, not at the first loss
                self.class_counts = self.checked_class_counts(counts, "the data module's class_counts")
        if self.needs_class_prior and self.class_counts is None and stage != "predict":
            raise ConfigError(f"{type(self).__name__} needs the training images per class of its {self.num_classes} "
                              "classes: train on a labelled DiffusionDataModule (it provides class_counts) or pass "
                              "model.init_args.class_counts")

    def class_prior(self) -> Tensor:
        """q(y): float32 ``[num_classes]`` training class frequencies, on the module's device."""
        if not self.class_counts or len(self.class_counts) != self.num_classes or sum(self.class_counts) <= 0:
            raise ConfigError(f"{type(self).__name__} needs the training images per class of its {self.num_classes} "
                              f"classes, got class_counts={self.class_counts}: train on a labelled "
                              "DiffusionDataModule (it provides class_counts) or pass model.init_args.class_counts")
        counts = torch.tensor(self.class_counts, dtype=torch.float64, device=self.device)
        return (counts / counts.sum()).float()

    def drop_mask(self, batch: int) -> Tensor | None:
        """This step's label-drop mask, or None when p = 0 (a DiT without a null row takes no mask)."""
        if self.class_dropout_prob == 0:
            return None
        # A batch-wide decision is drawn and kept on the CPU (reading it needs no device sync; the nets move
        # force_drop_ids themselves), a per-sample one on the device.
        return label_drop_mask(batch, self.class_dropout_prob, self.label_drop,
                               "cpu" if self.label_drop == "batch" else self.device)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        if not self.conditional:
            null = _null_conditioning(labels)
            return dit_loss(self.denoiser, self.process, x0, null["y"], null["force_drop_ids"])
        return dit_loss(self.denoiser, self.process, x0, labels, self.drop_mask(x0.shape[0]))

    def guided_denoiser(self, labels: Tensor, guidance_scale: float,
                        guidance_channels: int | None) -> Callable[[Tensor, Tensor], Tensor]:
        if self.conditional:
            return super().guided_denoiser(labels, guidance_scale, guidance_channels)
        null = torch.full_like(labels, -1)  # an unconditional model: no class, nothing to guide toward
        return lambda x, t: self.denoiser(x, t, null)

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        unet = getattr(self.net, "unet", None)  # only the U-Net has dropout; the wrapper stays in eval mode
        if not self.sample_in_train_mode or unet is None:
            return super().generate(noise, labels, generators, **sampling)
        unet.train()
        try:
            return super().generate(noise, labels, generators, **sampling)
        finally:
            unet.eval()


class CBDM(LongTailDDPM):
    """Class-Balancing Diffusion Models (Qin et al.): DDPM + the class-balancing regulariser.

    Args:
        tau: τ ≥ 0, the regulariser weight in λ_t = τ t / T (``--tau``; README for CIFAR-100-LT: 1.0; 0 = DDPM).
        gamma: γ ≥ 0, the commitment-term weight (hard-coded 0.25 in the code). A negative τ or γ would turn
            the pull into a push, so both are refused.
        target_dist: where y' comes from: ``uniform`` (the paper's balanced target, default) or ``train`` (the
            training class prior, what the code does when training from scratch; it uses uniform for fine-tuning).
        **kwargs: :class:`LongTailDDPM` arguments, but not ``conditional: false``: the regulariser compares the
            net's predictions for y and y', which an unconditional net cannot tell apart (refused).
    """

    def __init__(self, tau: float = 1.0, gamma: float = 0.25, target_dist: str = "uniform", **kwargs: Any) -> None:
        if not kwargs.get("conditional", True):
            raise ConfigError("CBDM cannot be unconditional: its regulariser pulls the prediction for the label y "
                              "toward the one for another label y', so the net must see labels. Set conditional: "
                              "true, or train an unconditional model with LongTailDDPM or T2H (conditional: false)")
        super().__init__(**kwargs)
        if target_dist not in CBDM_TARGETS:
            raise ConfigError(f"target_dist must be one of {CBDM_TARGETS}, got {target_dist!r}")
        for name, value in (("tau", tau), ("gamma", gamma)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"CBDM's {name} must be a finite number >= 0 (it weights a pull toward the other "
                                  f"label's prediction; a negative one pushes away), got {name}={value}")
        if self.num_classes < 1:
            raise ConfigError("CBDM needs class labels; the data has none (num_classes = 0)")
        self.tau, self.gamma, self.target_dist = float(tau), float(gamma), target_dist

    @property
    def needs_class_prior(self) -> bool:  # type: ignore[override]
        return self.target_dist == "train"

    def other_labels(self, batch: int) -> Tensor:
        """y' ``[batch]`` from ``target_dist``."""
        if self.target_dist == "uniform":
            return torch.randint(0, self.num_classes, (batch,), device=self.device)
        return torch.multinomial(self.class_prior(), batch, replacement=True)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        drop = self.drop_mask(x0.shape[0])
        return cbdm_loss(self.denoiser, self.process, x0, labels, self.other_labels(x0.shape[0]),
                         drop, self.tau, self.gamma)


class T2H(LongTailDDPM):
    """T2H, long-tailed diffusion with oriented calibration (Zhang et al.): batch-wise re-targeted ε.

    Args:
        transfer_mode: ``t2h`` (a sample moves only toward classes at least as frequent; the README's choice),
            ``h2t`` (only toward rarer ones) or ``full`` (no gate; the code's ``--transfer_mode`` default).
        cut_time: moves only at timesteps t < cut_time; -1 (the code's default) = at every t, 0 = never (DDPM).
        prior_power: β of the prior-weighted sampler W_ij ∝ q(y_j)^β exp(ℓ_ij) (``--transfer_tr_tau`` with
            ``--tr_tau``, 1.0 there); None (default) = the plain kernel. That sampler has no gate: use mode full.
        **kwargs: :class:`LongTailDDPM` arguments. The reference batch is this device's batch (batch_size matters).
            ``conditional: false`` trains an unconditional model (the paper's Table 1: Full / H2T / T2H; a U-Net
            without label map, which loads T2H's unconditional checkpoints): the labels drive only the gate.

    Training logs ``train/transfer_rate`` (the share of re-targeted rows) and, on the steps the logger writes, the
    rate per tenth of the timesteps, ``train/transfer_rate_t{lo}-{hi}`` (spec 6), pooled over the steps since the
    last write (and over devices).
    """

    needs_class_prior = True

    def __init__(self, transfer_mode: str = "t2h", cut_time: int = -1, prior_power: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if transfer_mode not in TRANSFER_MODES:
            raise ConfigError(f"transfer_mode must be one of {TRANSFER_MODES}, got {transfer_mode!r}")
        if prior_power is not None and transfer_mode != "full":
            raise ConfigError(f"prior_power={prior_power} selects T2H's prior-weighted sampler, which has no gate; "
                              f"set transfer_mode: full (got {transfer_mode!r})")
        if self.num_classes < 1:
            raise ConfigError("T2H needs class labels for its gate; the data has none (num_classes = 0)")
        self.transfer_mode, self.cut_time, self.prior_power = transfer_mode, cut_time, prior_power
        self._transfer_counts: Tensor | None = None  # [2, TRANSFER_BUCKETS] swaps / samples since the last log

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        drop = self.drop_mask(x0.shape[0]) if self.conditional else None
        out = t2h_loss(self.denoiser, self.process, x0, labels, self.class_prior(), drop, self.transfer_mode,
                       self.cut_time, self.prior_power, conditional=self.conditional)
        if self.training:
            counts = torch.stack([out["transfer_swaps"], out["transfer_samples"]])
            self._transfer_counts = counts if self._transfer_counts is None else self._transfer_counts + counts
        return {k: out[k] for k in ("loss", "mse", "vb", "transfer_rate")}  # the scalars, which get logged

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self._transfer_counts is not None and self._writes_logs_now():
            self.log_transfer_histogram(batch_size=len(batch[0]))
        return loss

    def log_transfer_histogram(self, batch_size: int) -> dict[str, float]:
        """Log (and return) the transfer rate of each timestep bucket hit since the last call, then reset."""
        counts, self._transfer_counts = self._transfer_counts, None
        if counts is None:
            return {}
        if self._trainer is not None:  # every rank gets here on the same steps (the logger's schedule)
            counts = self.trainer.strategy.reduce(counts.float(), reduce_op="sum")
        swaps, samples = counts.tolist()
        rates = {f"train/transfer_rate_{name}": s / n
                 for name, s, n in zip(transfer_bucket_names(self.process.original_num_timesteps), swaps, samples,
                                       strict=True) if n > 0}
        for name, rate in rates.items():
            self.log(name, rate, batch_size=batch_size)
        return rates
