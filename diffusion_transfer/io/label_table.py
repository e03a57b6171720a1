"""Fit a checkpoint's label table to a model built for another label space: one rule for every net family.

A class-conditional net embeds label c through entry c of one table. The layouts the nets use:

* DiT (``y_embedder.embedding_table.weight``, ``[rows, D]``, one entry per row): rows 0..N-1 the classes, then
  FineDiffusion's superclass rows N..N+S-1 (tiered table only), then the null row (when trained with class dropout).
  DiT-XL/2-256's 1001 rows are 1000 classes + null.
* U-Net (``map_label.weight`` of ``nets/unet.py``, a Linear ``[E, N]``, one entry per *column*): N classes and no
  null entry, since the null label is the zero one-hot (DDPM / CBDM / T2H, EDM). EDM's song style feeds the one-hot
  scaled by √N, so a column kept for a table of another size is rescaled by √(N_file / N_model) to keep its
  embedding.

The policy ``label_table`` (an init argument of every method, ``--model.init_args.label_table``):

``strict``
    the file's label space must be the model's; otherwise a one-line error names the option.
``reuse``
    class entries 0..min(N_file, N_model)-1 and the null entry (when both have one) come from the file; every other
    entry (new classes, superclass rows) keeps the model's own initialisation, i.e. is fresh.
``reinit``
    the model's own table, freshly initialised; nothing of the file's table is kept.

A difference the policy cannot fix (the image size, the channels) is one short line with what the checkpoint and
the model have and how to convert the data: :func:`space_mismatch`. Like the loaders, this module takes tensors and
plain modules only and imports neither ``diffusion_transfer.nets`` nor Lightning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "LABEL_TABLE_POLICIES",
    "LabelLayout",
    "LabelPolicy",
    "LabelTableFit",
    "NetSpace",
    "check_label_policy",
    "fit_label_table",
    "song_label_scale",
    "space_mismatch",
]

#: Values of ``label_table``; see the module docstring.
LABEL_TABLE_POLICIES = ("strict", "reuse", "reinit")


def check_label_policy(policy: str) -> str:
    """``policy`` if it is a :data:`LABEL_TABLE_POLICIES` value.

    Raises:
        ConfigError: any other value (the message lists the valid ones).
    """
    if policy not in LABEL_TABLE_POLICIES:
        raise ConfigError(f"label_table must be one of {', '.join(LABEL_TABLE_POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class LabelLayout:
    """What the entries of a label table stand for, in order: classes, other rows, the null entry.

    Attributes:
        classes: N, entries 0..N-1 (class c is entry c).
        extra: entries after the classes that belong to no class (FineDiffusion's superclass rows); never reused
            from a table of another layout, since their meaning depends on a hierarchy the file does not give.
        null: whether the last entry is the null label's (DiT with class dropout).
    """

    classes: int
    extra: int = 0
    null: bool = False

    @property
    def size(self) -> int:
        """Entries of the table: ``classes + extra + null``."""
        return self.classes + self.extra + int(self.null)

    def describe(self) -> str:
        """``"20 classes"``, ``"32 classes + 4 superclass rows"``: the null row is implied, not counted."""
        text = f"{self.classes} class{'es' if self.classes != 1 else ''}"
        return f"{text} + {self.extra} superclass row{'s' if self.extra != 1 else ''}" if self.extra else text


#: ``label_table`` as a caller passes it: a policy, or a rule choosing one from the (file, model) layouts (how
#: FineDiffusion keeps a tiered table of its own layout and re-initialises any other).
LabelPolicy = str | Callable[[LabelLayout, LabelLayout], str]


@dataclass(frozen=True)
class LabelTableFit:
    """What :func:`fit_label_table` did to one table (part of a loader's report)."""

    key: str  # state-dict key of the table, relative to the module the loader filled
    policy: str
    file: LabelLayout | None  # None: the file's net has no label input
    model: LabelLayout | None  # None: the model has no label input
    kept: int  # entries copied from the file
    fresh: int  # entries left at the model's initialisation: they must train (or the classes are never learned)
    note: str = ""  # how the loader read a table whose layout the file does not say (one sentence; "" if none)


@dataclass(frozen=True)
class NetSpace:
    """The data a net is built for, as far as its weights tell: label layout, image side, channels (None: unknown)."""

    labels: LabelLayout | None
    resolution: int | None
    channels: int | None

    def describe(self) -> str:
        """``"20 classes, 16×16×3"`` (``"unconditional"`` without labels; the size as far as known)."""
        labels = self.labels.describe() if self.labels is not None and self.labels.classes else "unconditional"
        if self.resolution is not None and self.channels is not None:
            return f"{labels}, {self.resolution}×{self.resolution}×{self.channels}"
        if self.channels is not None:
            return f"{labels}, {self.channels} channels"
        return labels


def fit_label_table(key: str, theirs: Tensor, ours: Tensor, policy: str, file: LabelLayout, model: LabelLayout,
                    axis: int = 0, scale: float = 1.0) -> tuple[Tensor, LabelTableFit]:
    """The table the model loads under ``policy``: entries from the file where the policy keeps them, else its own.

    Args:
        key: the table's state-dict key (reported).
        theirs: the file's table, ``file.size`` entries along ``axis``; ours: the model's current (fresh) table.
        policy: ``strict``, ``reuse`` or ``reinit`` (module docstring).
        file / model: the layouts of ``theirs`` / ``ours``.
        axis: 0 for one entry per row (DiT ``[rows, D]``), 1 for one per column (U-Net ``map_label.weight [E, N]``).
        scale: factor on the kept class entries (EDM song style: √(N_file / N_model), see the module docstring).

    Returns:
        (table with ``ours``' shape, dtype and device, :class:`LabelTableFit`). ``ours`` is not modified.

    Raises:
        ValueError: ``strict`` with another layout (callers report it first, with :func:`space_mismatch`), or
            shapes that disagree with the layouts or with each other off ``axis`` (another width: callers check).
    """
    check_label_policy(policy)
    if theirs.shape[axis] != file.size or ours.shape[axis] != model.size:
        raise ValueError(f"{key}: tables of {theirs.shape[axis]} and {ours.shape[axis]} entries do not match the "
                         f"layouts {file} and {model}")
    if theirs.ndim != ours.ndim or any(a != b for d, (a, b) in enumerate(zip(theirs.shape, ours.shape)) if d != axis):
        raise ValueError(f"{key}: file {tuple(theirs.shape)} and model {tuple(ours.shape)} differ off axis {axis}")
    if policy == "strict" and file != model:
        raise ValueError(f"{key}: the file's label space ({file.describe()}) is not the model's ({model.describe()})")
    out = ours.detach().clone()
    if policy == "reinit":
        return out, LabelTableFit(key, policy, file, model, kept=0, fresh=model.size)
    if policy == "strict":  # same layout, same shape: the file's table as is
        out.copy_(theirs)
        return out, LabelTableFit(key, policy, file, model, kept=model.size, fresh=0)
    # reuse: class entries by index, the null entry by meaning; superclass rows only from a table of this layout.
    kept = min(file.classes, model.classes)
    dst, src = out.movedim(axis, 0), theirs.movedim(axis, 0).to(out.dtype)  # `dst` is a view: writes land in `out`
    dst[:kept] = src[:kept] * scale
    if file.extra == model.extra and file.classes == model.classes:
        dst[model.classes:model.classes + model.extra] = src[file.classes:file.classes + file.extra]
        kept += model.extra
    if file.null and model.null:
        dst[-1] = src[-1]
        kept += 1
    return out, LabelTableFit(key, policy, file, model, kept=kept, fresh=model.size - kept)


def _convert_fix(theirs: NetSpace, ours: NetSpace) -> str:
    """How to make the data the checkpoint's size: the ``diffusion-transfer-data`` command line."""
    side = theirs.resolution if theirs.resolution is not None else ours.resolution
    if theirs.channels == 4 and ours.channels != 4:
        # A latent DiT (SD VAE, 8x downsampling): the data must be latents of images 8x the latent side.
        return (f"the checkpoint works on {side}×{side}×4 VAE latents: convert the images with "
                f"`diffusion-transfer-data convert SRC DEST --resolution {8 * side}`, encode them with "
                "`diffusion-transfer-data encode` and set --model.init_args.vae")
    if ours.channels == 4 and theirs.channels != 4:
        return (f"the checkpoint works on {side}×{side}×{theirs.channels} images, not latents: convert the images "
                f"with `diffusion-transfer-data convert SRC DEST --resolution {side}` and leave "
                "--model.init_args.vae unset")
    options = []
    if theirs.resolution is not None and theirs.resolution != ours.resolution:
        options.append(f"--resolution {theirs.resolution}")
    if theirs.channels is not None and theirs.channels != ours.channels:
        options.append(f"--channels {theirs.channels}")
    return f"convert the data to the checkpoint's size: `diffusion-transfer-data convert SRC DEST {' '.join(options)}`"


def space_mismatch(file: str | os.PathLike[str], theirs: NetSpace, ours: NetSpace, policy: str) -> str | None:
    """The one-line error for a checkpoint made for other data, or None when ``policy`` can load it.

    The image side and channels must always agree (as far as the file tells them); the label layouts only under
    ``strict``, and only when both nets have a label input (a conditional vs an unconditional net is told by the
    loader's key listing). The line says what the checkpoint has, what this model has (its ``num_classes``,
    ``resolution`` and ``channels`` come from the data on the command line) and the fix::

        ckpt.pt: the checkpoint is for 20 classes, 16×16×3, this model for 10 classes, 8×8×3; convert the data to
        the checkpoint's size: `diffusion-transfer-data convert SRC DEST --resolution 16`
    """
    size = any(a is not None and b is not None and a != b
               for a, b in ((theirs.resolution, ours.resolution), (theirs.channels, ours.channels)))
    labels = (policy == "strict" and theirs.labels is not None and ours.labels is not None
              and theirs.labels != ours.labels)
    if not (size or labels):
        return None
    fixes = [_convert_fix(theirs, ours)] if size else []
    if labels:
        fixes.append("set --model.init_args.label_table reuse (keep the checkpoint's entries of the first classes and "
                     "its null row) or reinit (a new table)")
        mine, file_labels = ours.labels, theirs.labels
        # A tiered table of one superclass has a flat DiT table's shape (N classes + ∅): only the user can tell.
        if mine is not None and file_labels is not None and mine.extra and not file_labels.extra \
                and file_labels.size == mine.size:
            fixes[-1] += (", or tiered if the file holds a tiered table of this layout without its superclass map "
                          "(an original FineDiffusion checkpoint)")
    return (f"{file}: the checkpoint is for {theirs.describe()}, this model for {ours.describe()}; "
            f"{'; and '.join(fixes)}")


def song_label_scale(file: LabelLayout, model: LabelLayout) -> float:
    """√(N_file / N_model): keeps a class's embedding when a net feeds its one-hot scaled by √N (EDM song style)."""
    return math.sqrt(file.classes / model.classes) if file.classes and model.classes else 1.0

