"""Diffusion Tuning (Zhong et al., NeurIPS 2024): transfer a pre-trained DiT along the "chain of forgetting".

Spec: ``papers/difftuning.md``. A pre-trained denoiser transfers well at small t (low noise) and ever worse as t
grows, so each step trains one hybrid batch of B rows:

    n_rep = int(B_global * replay_ratio) (shared out over ranks),  n_tgt = B - n_rep
    t_tgt ~ P(t) ∝ (t + 1)^s      on target images x, labels y          (adapt: favours noisy t)
    t_rep ~ P(t) ∝ (T - t)^s'     on bank samples x̂ of the pre-trained model, label = null   (retain: clean t)
    L_i   = hybrid loss (MSE on eps + VB on the learned variance) of row i
    loss  = mean(L[target]) + replay_weight * mean(L[replay])

The weighting is importance sampling of t, as in the reference code (spec §2.6): the two laws are never turned
into loss weights. ``replay_weight = 0`` switches replay off and, with ``t_law: uniform``, gives exactly the
``Diffusion`` full fine-tuning baseline (spec §6 ``full_finetune``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..data.archive import DatasetError
from ..data.replay import ReplayBank
from ..diffusion.gaussian import GaussianDiffusion, timestep_law
from ..errors import ConfigError
from ..io.dit_checkpoint import load_dit_checkpoint
from ..nets.peft import canonical_preset, keys_not_in_dit, preset_arch, select_trainable
from ..nets.unet import UNET_CONFIGS
from ..nets.unet_adapter import DiTCallUNet
from .diffusion import Diffusion

T_LAWS = ("categorical", "uniform")


def replay_share(batch: int, ratio: float, world: int = 1, rank: int = 0) -> int:
    """Replay rows of this rank: int(W * B * ratio) over the W ranks, shares differing by at most one (spec §6).

    Raises:
        DatasetError: the ratio leaves the global replay part, or this rank's target part, empty.
    """
    total = int(world * batch * ratio)
    share = total // world + int(rank < total % world)
    if total == 0 or share >= batch:
        part = "replay" if total == 0 else "target"
        raise DatasetError(f"replay_ratio {ratio} of the global batch {world} x {batch} leaves the {part} part "
                           "empty; pick replay_ratio (default 0.2) and data batch_size so both parts get rows")
    return share


def difftuning_loss(net: Any, process: GaussianDiffusion, x_tgt: Tensor, y_tgt: Tensor, t_tgt: Tensor,
                    x_rep: Tensor, t_rep: Tensor, replay_weight: float = 0.1,
                    noise: Tensor | None = None) -> dict[str, Tensor]:
    """The Diff-Tuning objective on one hybrid batch ``[target; replay]`` (one forward pass, as the reference).

    Args:
        net: ``net(x_t, t, y) -> [B, C or 2C, R, R]``; a label of -1 is the null label.
        process: the training process (T steps).
        x_tgt: target data ``[n_tgt, C, R, R]``; y_tgt: its labels ``[n_tgt]``; t_tgt: its timesteps ``[n_tgt]``.
        x_rep: bank samples ``[n_rep, C, R, R]`` (may be empty); t_rep: their timesteps ``[n_rep]``.
        replay_weight: scale of the replay mean (reference ``LWF_weight``: 0.1).
        noise: optional eps ``[n_tgt + n_rep, C, R, R]`` (drawn by the process when None).

    Returns:
        ``{"loss", "target", "replay", "mse", "vb"}`` scalars; ``target``/``replay`` are the parts' mean losses.
    """
    n = x_tgt.shape[0]
    # Replay rows always train the unconditional branch; their bank labels are ignored (spec §2.4 step 7).
    y = torch.cat([y_tgt, torch.full((x_rep.shape[0],), -1, dtype=y_tgt.dtype, device=y_tgt.device)])
    terms = process.training_losses(net, torch.cat([x_tgt, x_rep]), torch.cat([t_tgt, t_rep]), noise=noise,
                                    model_kwargs={"y": y})
    target, replay = terms["loss"][:n].mean(), terms["loss"][n:]
    out = {"loss": target, "target": target, "mse": terms["mse"].mean(), "vb": terms["vb"].mean()}
    if replay.numel():
        out["replay"] = replay.mean()
        out["loss"] = target + replay_weight * out["replay"]
    return out


class DiffTuning(Diffusion):
    """Diff-Tuning on a DiT: full (or parameter-efficient) fine-tuning with replay of pre-trained samples.

    Args:
        replay_bank: bank of pre-trained samples (spec: ``pretrained_images``), a zip from ``predict`` with
            ``configs/difftuning/bank.yaml``; required when ``replay_weight > 0``.
        replay_ratio: share of the global batch given to replay rows (reference ``LWF_ratio``: 0.2, i.e. 26 + 6
            of 32). The replay rows take the place of the last rows of each data batch.
        replay_weight: scale of the replay loss (``LWF_weight``: 0.1); 0 turns replay off.
        prob_scale: s of the target law P(t) ∝ (t + 1)^s (``prob_scale``: 1.0).
        replay_prob_scale: s' of the replay law P(t) ∝ (T - t)^s' (``LWF_prob_scale``); None or negative = s.
        t_law: ``categorical`` (the two laws above) or ``uniform`` for both parts (``t_prob``).
        replay_xflip: random flips of bank images (the reference flips both batches).
        trainable: a preset of :func:`~diffusion_transfer.nets.peft.select_trainable` (``full`` = ``all``,
            ``bitfit`` = ``bias``, ``finediffusion`` = ``bias_norm``, ``difffit``) or a list of fnmatch patterns
            over ``net`` parameter names; the rest is frozen (Diff-Tuning combined with PEFT). The net gets what
            the preset needs (:func:`~diffusion_transfer.nets.peft.preset_arch`: LN affine for
            ``finediffusion``, γ in blocks 0..``difffit_depth``-1 for ``difffit``), at the identity, so the
            official checkpoint still loads.
        difffit_depth: blocks with DiffFit's γ under ``trainable: difffit`` (Diff-Tuning's ``--difffit``: 14).
        difffit_scales: γ vectors in each of those blocks: 4 (default, Diff-Tuning's code: the attention's qkv
            [3D] and output [D], and the attention and MLP branches [D] each) or 2 (the DiffFit paper's branches
            only, FineDiffusion's DiffFit baseline). All start at 1, so the loaded model is unchanged.
        label_table: ``reuse`` (default, the paper's rule, spec §4): classes 0..N-1 of the new data take the
            pre-trained rows 0..N-1 (kept, not re-initialised) and the null row stays the pre-trained one, so CFG and
            the null-labelled replay rows keep the pre-trained unconditional embedding; with more classes than the
            checkpoint, the extra rows start fresh (the table trains in every preset). ``strict`` / ``reinit``: see
            :class:`~diffusion_transfer.methods.base.DiffusionLightningBase`.
        **kwargs: :class:`Diffusion` arguments (``checkpoint`` is the pre-trained model; ``arch_overrides`` goes on
            top of the preset's needs). ``arch`` may also name a U-Net (``UNET_CONFIGS``): replay and the two laws
            do not depend on the network, and the U-Net's null label is its empty label input. On a U-Net,
            ``trainable`` is ``all`` or a pattern list (the presets are defined on DiT parameter names).
    """

    def __init__(
        self,
        replay_bank: str | None = None,
        replay_ratio: float = 0.2,
        replay_weight: float = 0.1,
        prob_scale: float = 1.0,
        replay_prob_scale: float | None = None,
        t_law: str = "categorical",
        replay_xflip: bool = True,
        trainable: str | list[str] = "all",
        difffit_depth: int = 14,
        difffit_scales: int = 4,
        label_table: str = "reuse",
        **kwargs: Any,
    ) -> None:
        # A plain string before the base saves hyper-parameters, so checkpoints load with weights_only=True.
        replay_bank = None if replay_bank is None else os.fspath(replay_bank)
        if kwargs.get("arch") in UNET_CONFIGS and canonical_preset(trainable) not in ("full", None):
            # The PEFT presets are defined on DiT names (its label table, LayerNorms, branch scales).
            raise ConfigError(f"trainable {trainable!r} is a DiT preset; on the U-Net {kwargs['arch']!r} use all "
                              "or a list of parameter-name patterns (e.g. ['unet.*bias', 'unet.map_label.*'])")
        arch = preset_arch(trainable, difffit_depth, kwargs.pop("arch_overrides", None), difffit_scales)
        super().__init__(arch_overrides=arch, label_table=label_table, **kwargs)
        if self.process.low_noise_scale:
            raise ConfigError("DiffTuning draws t from its own laws: set prob_scale / replay_prob_scale / t_law, "
                              "not low_noise_scale")
        if t_law not in T_LAWS:
            raise ConfigError(f"unknown t_law '{t_law}'; choose one of {', '.join(T_LAWS)}")
        if replay_weight < 0:
            raise ConfigError(f"replay_weight must be >= 0, got {replay_weight}")
        if self.net.null_label is None:
            raise ConfigError("DiffTuning trains replay rows with the null label: class_dropout_prob must be > 0")
        self.replay_bank, self.replay_ratio, self.replay_weight = replay_bank, replay_ratio, replay_weight
        self.replay_xflip = replay_xflip
        self._bank: ReplayBank | None = None
        s = prob_scale
        s_rep = s if replay_prob_scale is None or replay_prob_scale < 0 else replay_prob_scale
        self.uniform = t_law == "uniform"
        steps = self.process.num_timesteps
        # Non-persistent: they follow the module's device but stay out of checkpoints.
        self.register_buffer("target_law", timestep_law(steps, s), persistent=False)
        self.register_buffer("replay_law", timestep_law(steps, s_rep, reverse=True), persistent=False)
        self.selection = select_trainable(self.net, trainable)
        rank_zero_info(f"DiffTuning trainable={trainable}: {self.selection}")

    # ------------------------------------------------------------------------------------ weights and data

    def load_weights(self, path: str) -> str:
        """The pre-trained DiT, strictly, with its label table fitted to this data's classes (``label_table``).

        Only the LN affine / γ that the preset added may be absent from the file (they keep their identity init).
        A U-Net loads as in :class:`Diffusion` (its files, with the same checks).
        """
        if isinstance(self.net, DiTCallUNet):
            return super().load_weights(path)
        report = load_dit_checkpoint(self.net, path, label_table=self.label_table,
                                     allow_missing=keys_not_in_dit(self.net))
        self.label_table_fitted(self.net, report.label_table)
        return report.source

    def open_bank(self) -> ReplayBank:
        """The replay bank, opened (and checked against the model) on first use."""
        if self._bank is None:
            if self.replay_bank is None:
                raise DatasetError("DiffTuning needs replay_bank (samples of the pre-trained model, built with "
                                   "configs/difftuning/bank.yaml), or replay_weight 0 for plain fine-tuning")
            self._bank = ReplayBank(self.replay_bank, self.resolution, self.channels, self.replay_xflip)
        return self._bank

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.replay_weight > 0:
            # Fail before the first step on a missing or mismatched bank, or a batch split with an empty part.
            self.open_bank()
            batch = getattr(self.trainer.datamodule, "batch_size", None)
            if batch is not None:
                replay_share(batch, self.replay_ratio, self.trainer.world_size, self.global_rank)

    # ------------------------------------------------------------------------------------ training

    def draw_timesteps(self, n: int, law: Tensor, device: torch.device) -> Tensor:
        """``n`` timesteps from ``law`` (or uniform with ``t_law: uniform``): int64 ``[n]``."""
        return self.process.sample_timesteps(n, device=device, law=None if self.uniform else law)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """One hybrid step: the first rows of the data batch are the target part, bank samples the rest."""
        x, y = batch
        if not self.training:
            # Validation scores the baseline loss on target images, comparable across methods and steps.
            return super().loss(batch)
        n_rep = 0
        if self.replay_weight > 0:
            world = self.trainer.world_size if self._trainer is not None else 1
            n_rep = replay_share(x.shape[0], self.replay_ratio, world, self.global_rank)
        n_tgt = x.shape[0] - n_rep
        # Draws in dit_loss's order (t, then noise and label dropout inside the process), so replay off with
        # uniform t takes exactly the baseline's step.
        x_rep = self.open_bank().draw(n_rep, x.device).to(x.dtype) if n_rep else x[:0]
        t_tgt = self.draw_timesteps(n_tgt, self.target_law, x.device)
        t_rep = self.draw_timesteps(n_rep, self.replay_law, x.device) if n_rep else t_tgt[:0]
        return difftuning_loss(self.denoiser, self.process, x[:n_tgt], y[:n_tgt], t_tgt, x_rep, t_rep,
                               self.replay_weight)
