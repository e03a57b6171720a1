"""DMP, Diffusion Model Patching (Ham et al., arXiv 2405.17825): improve a converged DiT without changing it.

Spec: ``papers/dmp.md``. The pre-trained DiT is frozen; a :class:`~..nets.dmp.MixtureOfPrompts` patch (a
zero-initialised prompt pool per block, mixed per token by one shared gate over [c ; block index]) is trained
on the SAME data with the SAME diffusion loss as pre-training, plus the prompt-balancing loss:

    gates, loads = [], []                                    filled by the patched forward, one entry per block
    L = L_simple + L_vb  (dit_loss on net(x_t, t, y, block_hook=patch.hook(gates, loads)))
      + balance_weight * CV^2(sum_l G_l)                    (balance_loss; weight 1, the reference's)
      + load_weight * load_loss(loads)                      (only with topk < 1; weight 1, the reference's)
    AdamW, wd 0, constant lr: prompts at lr (1e-4), gate + W_noise at gate_lr_scale * lr (1e-3); no EMA.

At step 0 the patched model equals the pre-trained one (default ``prompt_mode: add``, ``prompt_init: zero``).
``gating: false`` is the naive prompt-tuning baseline; continued full fine-tuning is plain :class:`Diffusion` at
lr 1e-4. The reference's other variants are options: ``topk`` (sparse routing), ``prompt_mode: prepend``,
``prompt_init: random``.

Checkpoints (``methods/peft.py``, shared with FineDiffusion): when ``checkpoint`` names the base model, the Lightning
checkpoint keeps only the patch (``patch.*`` weights, their optimizer state) plus the base path and a fingerprint of
the frozen weights (under ``peft``); loading re-attaches the patch to the base read from ``checkpoint`` (or the
recorded path) and refuses a different base. Without a base file (a randomly initialised backbone) the full state
is kept. ``checkpoint`` may also be a checkpoint of the original DMP code, whose backbone and patch are both
imported (:mod:`~..io.dmp_checkpoint`).
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
from ..io.dmp_checkpoint import is_dmp_checkpoint, load_dmp_checkpoint
from ..nets.dit import DiT
from ..nets.dmp import LOAD_LOSSES, MixtureOfPrompts, balance_loss, load_loss
from .diffusion import Diffusion, dit_loss
from .peft import BaseReferencedCheckpoint


def dmp_loss(patch: MixtureOfPrompts, net: Callable[..., Tensor], process: GaussianDiffusion, x0: Tensor,
             labels: Tensor, balance_weight: float = 1.0, load_weight: float = 1.0,
             load_form: str = "sum") -> dict[str, Tensor]:
    """DiT's loss through the patched net, plus ``balance_weight`` times the balance loss of the gates used and, when
    the gates keep k < N prompts, ``load_weight`` times the load term (:func:`~..nets.dmp.load_loss`, ``load_form``).

    Args:
        patch: the prompts and gate; net: the frozen DiT.
        process: the training process; x0 ``[B, C, R, R]``; labels ``[B]`` (-1 = null).

    Returns:
        ``{"loss", "mse", "vb"}`` scalars, ``"balance"`` when the patch is gated and ``"load"`` when it is gated
        with k < N (0 in eval mode or without gate noise, as the reference's count of negative gates).
    """
    gates: list[Tensor] = []
    loads: list[Tensor] = []
    out = dit_loss(partial(patch, net, gates=gates, loads=loads), process, x0, labels)
    if gates:
        out["balance"] = balance_loss(torch.stack(gates))
        out["loss"] = out["loss"] + balance_weight * out["balance"]
        if patch.sparse:
            out["load"] = load_loss(torch.stack(loads), load_form) if loads else out["loss"].new_zeros(())
            out["loss"] = out["loss"] + load_weight * out["load"]
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
        topk: fraction of the N prompts each gate keeps (reference ``topk``): k = int(topk * N), the softmax runs
            over the k largest logits and the rest get 0. 1.0 (default) keeps all, the plain softmax; below 1
            the loss gains the load term.
        prompt_mode: ``add`` (default; reference ``type: add``, the paper's DMP: prompt i added to patch token i,
            gate on c = timestep + class embedding) or ``prepend`` (``type: prepend``: N gated prompt tokens in
            front of the patch tokens, replaced at each patched block and dropped before the final layer; the gate
            sees the timestep embedding only). Unlike ``add``, ``prepend`` does not start as the pre-trained
            model: the zero prompt tokens still take part in attention.
        prompt_init: ``zero`` (default; reference ``init_type: zero``) or ``random`` (``init_type: random``: the
            prompts, the gate weight and W_noise Xavier-uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)),
            gate bias 0; drawn from torch's RNG, so set by ``seed_everything``). ``random`` does not start as the
            pre-trained model.
        num_prompts: prompts per block in ``prepend`` mode (reference ``num_tokens``); null (default) = the
            patch-token count, which ``add`` mode requires.
        load_weight: weight of the load term when topk < 1 (reference: fixed 1.0).
        load_loss: the load term when topk < 1: ``sum`` (default, the reference: the sum over prompts of the
            block-mean noisy load estimate; about B * k, it pushes every prompt's routing chance down rather than
            balancing) or ``cv2`` (Shazeer et al. 2017: the squared coefficient of variation of that load).
        **kwargs: :class:`Diffusion` arguments; ``arch`` must be a DiT; ``checkpoint`` is the pre-trained model
            (official DiT ``.pt``, a state dict or one of our ``.ckpt``, whose recorded ``schedule``,
            ``num_timesteps``, ``prediction`` and ``learn_sigma`` must equal this model's), or a checkpoint of the
            original DMP code (``train.py``'s ``{model, opt, config}`` or its ``model`` state dict: a DiT plus
            ``prompt_embeddings``, ``gate.*``, ``w_noise``), which fills the backbone and the patch
            (:func:`~..io.dmp_checkpoint.load_dmp_checkpoint`; the import is logged). The optimizer should be
            AdamW(lr=1e-4, weight_decay=0).

    Raises:
        ConfigError: a U-Net ``arch``, ``compile: true``, a negative ``balance_weight`` or ``load_weight``, a
            non-positive ``gate_lr_scale``, a bad ``patched_blocks``, ``topk``, ``prompt_mode``, ``prompt_init``,
            ``num_prompts`` or ``load_loss``; on loading, a ``.ckpt`` base of another process, or an original DMP
            checkpoint of other settings or shapes (CheckpointError naming the option to set).

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
                 topk: float = 1.0, prompt_mode: str = "add", prompt_init: str = "zero", num_prompts: int | None = None,
                 load_weight: float = 1.0, load_loss: str = "sum", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.net, DiT):
            raise ConfigError(f"DMP patches a DiT; set arch to a DiT-* name (e.g. DiT-S/2), got "
                              f"{self.hparams.get('arch')!r}")
        if self._compile:
            raise ConfigError("DMP does not support compile: true (its block hook is a new function at every call, "
                              "which defeats torch.compile's cache); leave model.init_args.compile false")
        if balance_weight < 0 or load_weight < 0 or gate_lr_scale <= 0:
            raise ConfigError(f"balance_weight and load_weight must be >= 0 and gate_lr_scale > 0, got "
                              f"{balance_weight}, {load_weight} and {gate_lr_scale}")
        if load_loss not in LOAD_LOSSES:
            raise ConfigError(f"load_loss must be one of {', '.join(LOAD_LOSSES)}, got {load_loss!r}")
        self.net.requires_grad_(False)
        self.patch = MixtureOfPrompts.for_dit(self.net, patched_blocks, num_prompts, gating=gating,
                                              noisy_gating=noisy_gating, topk=topk, mode=prompt_mode,
                                              init=prompt_init)
        self.balance_weight, self.load_weight, self.load_form = balance_weight, load_weight, load_loss
        gate = [p for name, p in self.patch.named_parameters() if name != "prompt_embeddings"]
        self.optimizer_factory = partial(_two_groups, self.optimizer_factory, gate, gate_lr_scale)

    @property
    def denoiser(self) -> Callable[..., Tensor]:
        """The patched DiT ``(x, t, y, **kwargs) -> output``, used for sampling (and CFG) too."""
        return partial(self.patch, self.net)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        x0, labels = batch
        return dmp_loss(self.patch, self.net, self.process, x0, labels, self.balance_weight, self.load_weight,
                        self.load_form)

    def load_base_weights(self, path: str) -> str:
        """The parent's loading, except for a checkpoint of the original DMP code, which fills the backbone and the
        patch (its run config, when the file has one, must agree with ``prompt_mode``, ``topk``, ``gating`` and
        ``schedule``); logs what was mapped."""
        if not is_dmp_checkpoint(path):
            return super().load_base_weights(path)
        patch = self.patch
        expect = {"type": (patch.mode, "prompt_mode"), "topk": (patch.topk, "topk"),
                  "gate_type": ("linear" if patch.gating else "PT", "gating (linear: true, PT: false)"),
                  "schedule_name": (self.hparams["schedule"], "schedule")}
        report = load_dmp_checkpoint(self.net, patch, path, expect=expect, unconditional=self.num_classes == 0,
                                     label_table=self.label_table)
        self.label_table_fitted(self.net, report.label_table)
        rank_zero_info(report.describe())
        return f"original DMP {report.source}"

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
        patch = self.patch
        routing = [] if patch.mode == "add" else ["prepended"]
        routing += [f"top-{patch.k} of {patch.num_tokens} gates"] if patch.sparse else []
        routing += ["random init"] if patch.init == "random" else []
        rank_zero_info(
            f"{'DMP' if patch.gating else 'prompt tuning'}: {len(patch.blocks)} of {len(self.net.blocks)} "
            f"blocks patched with {patch.num_tokens} prompts x {patch.hidden_size}"
            f"{' (' + ', '.join(routing) + ')' if routing else ''}; "
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
