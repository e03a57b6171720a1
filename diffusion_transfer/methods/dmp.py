"""DMP, Diffusion Model Patching (Ham et al., arXiv 2405.17825): improve a converged DiT without changing it.

Spec: ``papers/dmp.md``. The pre-trained DiT is frozen; a :class:`~..nets.dmp.MixtureOfPrompts` patch (a
zero-initialised prompt pool per block, mixed per token by one shared gate over [c ; block index]) is trained
on the SAME data with the SAME diffusion loss as pre-training, plus the prompt-balancing loss:

    gates = []                                               filled by the patched forward, one [B, N] per block
    L = L_simple + L_vb  (dit_loss on net(x_t, t, y, block_hook=patch.hook(gates)))
      + balance_weight * CV^2(sum_l G_l)                    (balance_loss; weight 1, the reference's)
    AdamW, wd 0, constant lr: prompts at lr (1e-4), gate + W_noise at gate_lr_scale * lr (1e-3); no EMA.

At step 0 the patched model equals the pre-trained one. ``gating: false`` is the naive prompt-tuning baseline;
continued full fine-tuning is plain :class:`Diffusion` at lr 1e-4.

Checkpoints (``methods/peft.py``, shared with FineDiffusion): when ``checkpoint`` names the base model, the Lightning
checkpoint keeps only the patch (``patch.*`` weights, their optimizer state) plus the base path and a fingerprint of
the frozen weights (under ``peft``); loading re-attaches the patch to the base read from ``checkpoint`` (or the
recorded path) and refuses a different base. Without a base file (a randomly initialised backbone) the full state
is kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..diffusion.gaussian import GaussianDiffusion
from ..errors import ConfigError
from ..nets.dit import DiT
from ..nets.dmp import MixtureOfPrompts, balance_loss
from .diffusion import Diffusion, dit_loss
from .peft import BaseReferencedCheckpoint


def dmp_loss(patch: MixtureOfPrompts, net: Callable[..., Tensor], process: GaussianDiffusion, x0: Tensor,
             labels: Tensor, balance_weight: float = 1.0) -> dict[str, Tensor]:
    """DiT's loss through the patched net, plus ``balance_weight`` times the balance loss of the gates used.

    Args:
        patch: the prompts and gate; net: the frozen DiT.
        process: the training process; x0 ``[B, C, R, R]``; labels ``[B]`` (-1 = null).

    Returns:
        ``{"loss", "mse", "vb"}`` scalars, and ``"balance"`` when the patch is gated.
    """
    gates: list[Tensor] = []
    out = dit_loss(partial(patch, net, gates=gates), process, x0, labels)
    if gates:
        out["balance"] = balance_loss(torch.stack(gates))
        out["loss"] = out["loss"] + balance_weight * out["balance"]
    return out


def _two_groups(factory: Callable[..., torch.optim.Optimizer], gate: list[nn.Parameter], gate_lr_scale: float,
                params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """``factory`` over two parameter groups: the gate (and W_noise) at ``gate_lr_scale`` x the prompts' lr."""
    gate_ids = {id(p) for p in gate}
    params = list(params)
    groups = [{"params": [p for p in params if id(p) not in gate_ids]}]
    if any(id(p) in gate_ids for p in params):
        groups.append({"params": [p for p in params if id(p) in gate_ids]})
    optimizer = factory(groups)
    for group in optimizer.param_groups[1:]:
        group["lr"] = optimizer.param_groups[0]["lr"] * gate_lr_scale
    return optimizer


class DMP(BaseReferencedCheckpoint, Diffusion):
    """Diffusion Model Patching: train a mixture of prompts on a frozen, pre-trained DiT.

    Args:
        patched_blocks: blocks that get a prompt pool: ``all`` (paper), the first k (reference ``pt_depth``; on
            the command line ``--model.init_args.patched_blocks 2``), or a list of indices (``[0, 2]``).
        gating: mix prompts with the gate (DMP, reference ``gate_type: linear``); false = naive prompt tuning
            (``PT``).
        noisy_gating: learned gate noise in training (reference: on); false builds no W_noise.
        balance_weight: weight of the prompt-balancing (importance) loss (reference: fixed 1.0).
        gate_lr_scale: the gate's and W_noise's lr over the prompts' lr, which is the optimizer's lr (reference:
            10, i.e. 1e-3 for lr 1e-4).
        **kwargs: :class:`Diffusion` arguments; ``arch`` must be a DiT; ``checkpoint`` is the pre-trained model
            (official DiT ``.pt``, a state dict or one of our ``.ckpt``, whose recorded ``schedule``,
            ``num_timesteps``, ``prediction`` and ``learn_sigma`` must equal this model's), and the optimizer
            should be AdamW(lr=1e-4, weight_decay=0).

    Raises:
        ConfigError: a U-Net ``arch``, ``compile: true``, a negative ``balance_weight``, a non-positive
            ``gate_lr_scale`` or a bad ``patched_blocks``; on loading, a ``.ckpt`` base of another process.

    The backbone is frozen (``requires_grad=False``), with one exception: when ``label_table`` (a base argument,
    default ``strict``) leaves fresh rows in the label table (``reinit``, or ``reuse`` with more classes than the
    base), the table joins the trainable set (at the prompts' lr, stored in patch checkpoints), or the new classes
    could never be learned; ``reuse`` with fewer classes keeps it frozen (every row is the base's). DiT has no
    dropout or normalisation statistics, so its train mode only switches label dropout on, which DMP keeps as the
    reference does: the null label trains its own gates, which classifier-free guidance then uses. The gate noise
    follows the module's mode (on in ``fit``, off in validation and sampling).
    """

    def __init__(self, patched_blocks: int | str | list[int] = "all", gating: bool = True,
                 noisy_gating: bool = True, balance_weight: float = 1.0, gate_lr_scale: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.net, DiT):
            raise ConfigError(f"DMP patches a DiT; set arch to a DiT-* name (e.g. DiT-S/2), got "
                              f"{self.hparams.get('arch')!r}")
        if self._compile:
            raise ConfigError("DMP does not support compile: true (its block hook is a new function at every call, "
                              "which defeats torch.compile's cache); leave model.init_args.compile false")
        if balance_weight < 0 or gate_lr_scale <= 0:
            raise ConfigError(f"balance_weight must be >= 0 and gate_lr_scale > 0, got {balance_weight} and "
                              f"{gate_lr_scale}")
        self.net.requires_grad_(False)
        self.patch = MixtureOfPrompts.for_dit(self.net, patched_blocks, gating=gating, noisy_gating=noisy_gating)
        self.balance_weight = balance_weight
        gate = [p for name, p in self.patch.named_parameters() if name != "prompt_embeddings"]
        self.optimizer_factory = partial(_two_groups, self.optimizer_factory, gate, gate_lr_scale)

    @property
    def denoiser(self) -> Callable[..., Tensor]:
        """The patched DiT ``(x, t, y, **kwargs) -> output``, used for sampling (and CFG) too."""
        return partial(self.patch, self.net)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        return dmp_loss(self.patch, self.net, self.process, x0, labels, self.balance_weight)

    def added_parameters(self) -> dict[str, float]:
        """``{"added", "w_noise", "backbone", "share"}``: the paper's count (prompts + gate), W_noise (training
        only, left out by the paper) and the share of the backbone's parameters that ``added`` is."""
        backbone = sum(p.numel() for p in self.net.parameters())
        added = self.patch.num_added()
        return {"added": added, "w_noise": self.patch.num_added(with_noise=True) - added, "backbone": backbone,
                "share": added / backbone}

    def on_fit_start(self) -> None:
        counts = self.added_parameters()
        noise = f" plus {counts['w_noise']:,} of gate noise used in training only" if counts["w_noise"] else ""
        table = self.net.y_embedder.embedding_table.weight
        frozen = "frozen but for its label table, which has fresh rows" if table.requires_grad else "frozen"
        rank_zero_info(
            f"{'DMP' if self.patch.gating else 'prompt tuning'}: {len(self.patch.blocks)} of {len(self.net.blocks)} "
            f"blocks patched with {self.patch.num_tokens} prompts x {self.patch.hidden_size}; "
            f"+{counts['added']:,} parameters (+{counts['share']:.2%} of the {counts['backbone']:,}-parameter "
            f"backbone){noise}; the backbone is {frozen}")
        if self.checkpoint is None:
            rank_zero_info("DMP: no `checkpoint` is set, so the patch trains on a randomly initialised backbone")

    # ------------------------------------------------------------------------------------ patch-only checkpoints

    @classmethod
    def load_patch(cls, path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> DMP:
        """A saved patch re-attached to the base model file ``base`` (default: the recorded one), e.g. a moved copy.

        ``load_from_checkpoint`` does the same with the recorded path; see :meth:`load_with_base`.
        """
        return cls.load_with_base(path, base)
