"""FineDiffusion (Pan et al., arXiv 2402.18331): parameter-efficient fine-tuning of a DiT to many fine classes.

Spec: ``papers/finediffusion.md``. Starting from a pre-trained DiT:

1. replace the class table by the tiered one (N fine rows + S superclass rows, all fresh N(0, 0.02²));
2. switch the LayerNorms' affine parameters on (weight 1, bias 0: the function is unchanged);
3. train only biases + LayerNorm affines + the table (``nets/peft.py`` preset ``finediffusion``: 1.77% of
   DiT-XL/2 for iNat's 10,000 + 11 rows) with DiT's loss, where a training label becomes its superclass token
   N + π(y) with probability 0.1 (tiered dropout: the superclass is the class's own "null");
4. sample with superclass-conditioned guidance, one doubled batch [y; N + π(y)] through the shared guidance function:

       ε̃(x_t, y) = ε(x_t, N + π(y)) + s · [ε(x_t, y) − ε(x_t, N + π(y))],   s = 4.0.

Baselines of the paper through the same class: ``peft: full | bitfit | difffit`` with ``tiered: false`` (DiT's
flat table with its ∅ row, fresh, and classifier-free guidance). DiffFit trains at lr 1e-3 (10x, spec §6) unless
an optimizer is given. Checkpoints of a PEFT run hold only the trained tensors plus a reference to the base
weights (``methods/peft.py``, ``io/peft_checkpoint.py``).

A released FineDiffusion checkpoint (the original ``train.py``'s ``{"model", "ema", "opt", "args"}``, ``args`` an
``argparse.Namespace`` read as data only) is imported as ``checkpoint``: its EMA weights (``checkpoint_part``), and
its class table kept as this tiered table (the file has no superclass map: see ``label_table``). π must then follow
the release's superclass order (iNat21: spec §2.3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..data.archive import DatasetError
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import ConfigError
from ..io.dit_checkpoint import load_dit_checkpoint
from ..io.label_table import LabelLayout
from ..nets.class_embedder import TieredLabelEmbedder, check_superclass_map, install_tiered_embedder
from ..nets.peft import canonical_preset, keys_not_in_dit, preset_arch, select_trainable
from .diffusion import Diffusion
from .peft import BaseReferencedCheckpoint

GUIDANCE = ("superclass", "cfg")
#: ``label_table`` values: the shared policies, and ``tiered`` (a map-less file's table is this tiered table).
LABEL_TABLES = ("strict", "reuse", "reinit", "tiered")
#: ``checkpoint_part``: which state dict of a training checkpoint ``{"model", "ema", ...}`` is the base.
CHECKPOINT_PARTS = ("ema", "model")
#: AdamW learning rate when no optimizer is given: DiT's 1e-4 (spec §2.5), DiffFit's 10x (spec §2.6, §6).
DEFAULT_LR = 1e-4
PRESET_LR = {"difffit": 1e-3}
_TABLE = "y_embedder.embedding_table.weight"
_MAP = "y_embedder.class_to_super"


_NO_HIERARCHY = ("FineDiffusion needs a class -> superclass map, and neither the data nor the model has one: use "
                 "superclass/class/ folders, a dataset.json with 'superclasses', an iNat annotation file "
                 "(diffusion-transfer-data convert), or model.init_args.superclasses")


def _paper_rule(file: LabelLayout, model: LabelLayout) -> str:
    """FineDiffusion's default ``label_table``: a fresh table (paper §2.1), but a tiered table of this layout is kept.

    The file is tiered when it has a superclass map (ours), or no map but exactly this tiered shape with >= 2
    superclasses (an original checkpoint). With one superclass, the tiered shape N + 1 is also a flat DiT table's
    (N classes + ∅), which is never kept (:func:`~diffusion_transfer.io.dit_checkpoint.dit_label_layouts`).
    """
    return "strict" if model.extra and file == model else "reinit"


def pair_guided(net: Callable[..., Tensor], process: GaussianDiffusion, labels: Tensor, reference: Tensor,
                scale: float, guidance_channels: int | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``model_fn(x, t)`` guiding from ``reference`` labels toward ``labels`` in one doubled batch.

    ``out = net([x; x], [t; t], [y; r])`` and then ``r_out + s (y_out − r_out)`` on the guided channels (the rest
    from the ``y`` half), via :meth:`GaussianDiffusion.guided_output` and hence ``apply_guidance``. With r = ∅ this is
    CFG; with r = N + π(y) FineDiffusion's superclass guidance.
    """
    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        cond, ref = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, reference])).chunk(2)
        return process.guided_output(cond, ref, scale, guidance_channels)

    return model_fn


class FineDiffusion(BaseReferencedCheckpoint, Diffusion):
    """FineDiffusion on a DiT (and the full / BitFit / DiffFit baselines), see the module docstring.

    Args:
        peft: trainable preset of ``nets/peft.py``: ``finediffusion`` (biases + LN affine + table), ``bitfit``
            (biases + table), ``difffit`` (biases + γ + LN affine if on + table), ``full``; or ``fnmatch``
            patterns over net parameter names.
        tiered: the tiered table (paper); False keeps DiT's flat table with its ∅ row (baselines, CFG only).
        num_superclasses: S, the superclass rows (``--num-super-classes``; iNat21: 11). Default: from
            ``superclasses``; with neither, from the data: ``setup`` builds the tiered table from the data module's
            ``superclass_of`` (S = its largest index + 1) and records S and π in the hyper-parameters, so the
            checkpoints rebuild the same table.
        superclasses: π as a list (one superclass per class); default: the data module's ``superclass_of``.
        null_dropout_prob: ours: share of training labels sent to an extra ∅ row of the tiered table, so that
            plain CFG can be compared on the same model (paper: 0, no ∅ row).
        guidance: ``superclass`` (paper, tiered only) or ``cfg`` (needs a ∅ row); ``generate(guidance=...)``
            overrides it per call.
        difffit_depth: blocks 0..k-1 get DiffFit's γ with ``peft: difffit`` (Diff-Tuning's DiffFit: 14).
        guidance_scale: s (``--cfg-scale``: 4.0).
        arch_overrides: DiT arguments on top of what the preset needs (``nets.peft.preset_arch``:
            ``norm_affine`` for ``finediffusion``, ``branch_scales = difffit_depth`` for ``difffit``).
        optimizer: ``params -> Optimizer``; None (default): AdamW, weight decay 0, lr from the preset
            (:data:`PRESET_LR`: 1e-3 for ``difffit``, else :data:`DEFAULT_LR` 1e-4). A given optimizer keeps its
            own lr whatever the preset.
        label_table: None (default, the paper's rule): the class table starts fresh, N(0, 0.02²), except a tiered
            table of exactly this layout, which is kept: a file with a superclass map and this shape (ours), or
            one without a map (an original ``train.py`` checkpoint) of exactly N + S [+ ∅] rows when S >= 2; the
            load logs what it decided. ``tiered``: a map-less file's table is this tiered table whatever S (needed
            for S = 1, where N + 1 rows also fit a flat DiT table; an error if the shape differs). ``reinit``
            always starts fresh; ``reuse`` takes the file's first class rows (and its null row when
            ``null_dropout_prob > 0``), superclass rows fresh unless the file is tiered with this layout;
            ``strict`` requires a tiered file of this layout. See
            :class:`~diffusion_transfer.methods.base.DiffusionLightningBase`.
        checkpoint_part: ``ema`` (default, as the original ``sample.py``) or ``model``: which state dict of a
            training checkpoint ``{"model", "ema", "opt", "args"}`` given as ``checkpoint`` is loaded.
        **kwargs: :class:`Diffusion` arguments; ``arch`` must be a DiT. ``checkpoint`` is the base DiT: its
            label table is fitted under ``label_table``, its superclass map is never read, and the LN affine / γ
            it lacks start at the identity. ``class_dropout_prob`` is the tiered dropout.
    """

    def __init__(
        self,
        peft: str | list[str] = "finediffusion",
        tiered: bool = True,
        num_superclasses: int | None = None,
        superclasses: list[int] | None = None,
        null_dropout_prob: float = 0.0,
        guidance: str = "superclass",
        difffit_depth: int = 14,
        guidance_scale: float = 4.0,
        arch_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        label_table: str | None = None,
        checkpoint_part: str = "ema",
        **kwargs: Any,
    ) -> None:
        arch = kwargs.get("arch")
        if arch is not None and not str(arch).startswith("DiT"):
            raise ConfigError(f"FineDiffusion fine-tunes a DiT (tiered class table, LayerNorm affine, DiffFit γ); "
                              f"arch {arch!r} is not one: use a DiT name, DiT-S/2 ... DiT-XL/8")
        if label_table is not None and label_table not in LABEL_TABLES:
            raise ConfigError(f"label_table must be one of {', '.join(LABEL_TABLES)} (or null: the paper's rule), "
                              f"got {label_table!r}")
        if label_table == "tiered" and not tiered:
            raise ConfigError("label_table tiered reads a checkpoint's table as the tiered one, but tiered is false; "
                              "set tiered: true, or choose strict, reuse or reinit")
        if checkpoint_part not in CHECKPOINT_PARTS:
            raise ConfigError(f"checkpoint_part must be one of {', '.join(CHECKPOINT_PARTS)}, got {checkpoint_part!r}")
        superclasses = None if superclasses is None else [int(s) for s in superclasses]
        preset = canonical_preset(peft)
        if optimizer is None:
            lr = PRESET_LR.get(preset or "", DEFAULT_LR)
            optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
        # `tiered` is `strict` once the file's table is read as tiered (io.dit_checkpoint.dit_label_layouts).
        policy = {None: "reinit", "tiered": "strict"}.get(label_table, label_table)
        super().__init__(guidance_scale=guidance_scale, optimizer=optimizer, label_table=policy,
                         arch_overrides=preset_arch(peft, difffit_depth, arch_overrides), **kwargs)
        self.paper_table = label_table is None
        self.tiered_table = True if label_table == "tiered" else None
        self.checkpoint_part = checkpoint_part
        if guidance not in GUIDANCE:
            raise ConfigError(f"unknown guidance '{guidance}'; choose one of {', '.join(GUIDANCE)}")
        self.tiered = tiered
        self.peft = peft
        self._null_dropout_prob = null_dropout_prob
        if tiered and (num_superclasses is not None or superclasses is not None):
            count = num_superclasses if num_superclasses is not None else max(superclasses) + 1  # type: ignore
            install_tiered_embedder(self.net, count, superclasses, self.net.y_embedder.dropout_prob,
                                    null_dropout_prob)
        elif guidance == "superclass" and not tiered:
            raise ConfigError("superclass guidance needs the tiered table; set tiered: true, or guidance: cfg")
        # Otherwise the tiered table waits for the data's hierarchy (setup).
        self.sampling["guidance"] = guidance
        self._check_guidance(guidance)
        self.selection = select_trainable(self.net, peft)
        rank_zero_info(f"FineDiffusion peft={peft}: {self.selection}")

    # ------------------------------------------------------------------------------------ hierarchy
    @property
    def embedder(self) -> TieredLabelEmbedder:
        if not isinstance(self.net.y_embedder, TieredLabelEmbedder):
            if self.tiered:
                raise ConfigError("the tiered table is not built yet: it is made from the data's superclasses when "
                                  "the model sets up; give num_superclasses or superclasses to build it now")
            raise ConfigError("this model has DiT's flat label table (tiered: false): it has no superclass tokens")
        return self.net.y_embedder

    def set_superclasses(self, superclass_of: Sequence[int], where: str = "the superclass map") -> None:
        """Set π; a different map than the one already set (init arg, checkpoint) is an error."""
        try:
            new = check_superclass_map(superclass_of, self.embedder.num_classes, self.embedder.num_superclasses,
                                       where)
        except ValueError as err:
            raise DatasetError(str(err)) from None
        current = self.embedder.class_to_super.tolist()
        if all(s >= 0 for s in current) and current != new:
            c = next(i for i, (a, b) in enumerate(zip(current, new, strict=True)) if a != b)
            raise DatasetError(f"{where} is inconsistent with the model's: class {c} has superclass {new[c]} there "
                               f"but {current[c]} in the model (init arg or checkpoint); use data with the same "
                               "hierarchy, or a new model")
        self.embedder.set_superclasses(new, where)

    def setup(self, stage: str) -> None:
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        superclass_of = getattr(data, "superclass_of", None)
        if self.tiered and not isinstance(self.net.y_embedder, TieredLabelEmbedder):
            self._install_from_data(superclass_of, getattr(data, "path", "the data"))
        super().setup(stage)
        if not self.tiered:
            return
        if superclass_of is not None:
            self.set_superclasses(superclass_of, f"the superclasses of {getattr(data, 'path', 'the data')}")
        elif stage == "fit" and not self.embedder.has_superclasses:
            raise DatasetError(_NO_HIERARCHY)

    def _install_from_data(self, superclass_of: Sequence[int] | None, where: Any) -> None:
        """The tiered table of the data's hierarchy (S = its largest superclass index + 1), before any weight loads;
        S and π go into the hyper-parameters, so that checkpoints rebuild this table."""
        if superclass_of is None:
            raise DatasetError(f"{where}: {_NO_HIERARCHY}")
        superclass_of = [int(s) for s in superclass_of]
        count = max(superclass_of) + 1
        install_tiered_embedder(self.net, count, superclass_of, self.net.y_embedder.dropout_prob,
                                self._null_dropout_prob)
        self.hparams["num_superclasses"], self.hparams["superclasses"] = count, superclass_of
        self._check_guidance(self.sampling["guidance"])
        self.selection = select_trainable(self.net, self.peft)
        rank_zero_info(f"FineDiffusion: tiered table of {self.embedder.num_classes} classes + {count} superclasses "
                       f"from {where}; peft={self.peft}: {self.selection}")

    # ------------------------------------------------------------------------------------ weights
    def load_base_weights(self, path: str) -> str:
        """The base DiT: strict, except the label table (``label_table``), the superclass map and the preset's keys.

        The file's ``class_to_super`` is never read: the map comes from the init argument or the data. LN affine / γ
        the file lacks keep their identity init; every other missing or shape-different key fails the load. A
        training checkpoint gives its ``checkpoint_part`` (EMA by default); its ``args`` Namespace is read as data.
        """
        report = load_dit_checkpoint(self.net, path, label_table=_paper_rule if self.paper_table else self.label_table,
                                     ignore_keys=[_MAP], allow_missing=[_MAP, *keys_not_in_dit(self.net)],
                                     prefer=self.checkpoint_part, tiered_table=self.tiered_table)
        fit = report.label_table
        if fit is not None and fit.note:
            rank_zero_info(f"FineDiffusion: {path} (part: {report.source}): {fit.note}")
        if fit is not None and fit.kept == fit.model.size:
            rank_zero_info(f"FineDiffusion: kept the class table of {path}: it has this tiered table's layout "
                           f"({fit.model.describe()}, {tuple(self.net.y_embedder.embedding_table.weight.shape)})")
        self.label_table_fitted(self.net, fit)
        # A fresh table is not in the base file: a checkpoint that refers to the base must store it.
        self._not_in_base = [f"net.{k}" for k in report.missing] + ([f"net.{_TABLE}"] if fit and fit.fresh else [])
        return report.source

    def _refers_to_base(self) -> bool:
        """A PEFT run's checkpoint refers to its base (an error without one); a full run stores everything."""
        return any(not p.requires_grad for n, p in self.net.named_parameters() if n != "pos_embed")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        key = "net.y_embedder.class_to_super"
        if self.tiered and key in checkpoint["state_dict"] and self.embedder.has_superclasses:
            self.set_superclasses(checkpoint["state_dict"][key].tolist(), "the checkpoint's superclass map")
        super().on_load_checkpoint(checkpoint)  # re-attaches a PEFT checkpoint to its base

    # ------------------------------------------------------------------------------------ sampling
    def _check_guidance(self, guidance: str) -> None:
        if guidance not in GUIDANCE:
            raise ConfigError(f"unknown guidance '{guidance}'; choose one of {', '.join(GUIDANCE)}")
        if guidance == "cfg" and self.net.null_label is None:
            raise ConfigError("plain CFG needs an unconditional (∅) row, and this tiered table has none (as the "
                              "paper's): use guidance 'superclass', or train with null_dropout_prob > 0")
        if guidance == "superclass" and not self.tiered:
            raise ConfigError("superclass guidance needs the tiered table (tiered: true)")

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        """As :meth:`Diffusion.generate`, plus ``guidance`` = ``superclass`` or ``cfg``."""
        self._guidance = sampling.pop("guidance", self.sampling["guidance"])
        self._check_guidance(self._guidance)
        try:
            return super().generate(noise, labels, generators, **sampling)
        finally:
            del self._guidance

    def guided_denoiser(self, labels: Tensor, guidance_scale: float,
                        guidance_channels: int | None) -> Callable[[Tensor, Tensor], Tensor]:
        """Superclass guidance ``[y; N + π(y)]`` (or the parent's CFG ``[y; ∅]``) in one doubled batch."""
        guidance = getattr(self, "_guidance", self.sampling["guidance"])
        if guidance == "cfg" or guidance_scale == 1.0:
            return super().guided_denoiser(labels, guidance_scale, guidance_channels)
        tokens = self.embedder.superclass_token(labels)
        return pair_guided(self.denoiser, self.process, labels, tokens, guidance_scale, guidance_channels)
