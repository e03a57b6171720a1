"""FineDiffusion's tiered class embedder: one table with a row per fine class and a row per superclass.

Spec: ``papers/finediffusion.md`` §2.1-2.3 and §6. With N fine classes, S superclasses and the map π (class ->
superclass), the table ``embedding_table`` has N + S rows of width D (+ 1 null row only with the optional
``null_dropout_prob``, ours):

    rows 0 .. N-1      fine classes y
    rows N .. N+S-1    superclass tokens N + π(y): each class's own "null" (dropout target and guidance anchor)
    row  N+S           ∅ (only when ``null_dropout_prob > 0``; the paper has no such row)

Training (tiered label dropout, §2.2): each label independently becomes its superclass token with probability
``dropout_prob`` (paper 0.1), through ``torch.where`` (the caller's tensor is never modified). The conditioning
stays DiT's c = t_emb(t) + E[y'], so the module drops into :class:`~diffusion_transfer.nets.dit.DiT` as
``model.y_embedder`` (same call signature, same state-dict key ``y_embedder.embedding_table.weight``).

π is data, not code: the ``class_to_super`` buffer ([N] int64, saved with the model, moved with it); -1 marks a
class whose superclass is not known yet (it must be set, e.g. from the data, before training or sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TieredLabelEmbedder", "check_superclass_map", "install_tiered_embedder"]


def check_superclass_map(superclass_of: Sequence[int] | Tensor, num_classes: int, num_superclasses: int,
                         where: str = "the superclass map") -> list[int]:
    """Validate π and return it as a list: one superclass index in ``0..S-1`` per class (length N).

    Raises:
        ValueError: wrong length, a class without superclass (None or negative), or an index >= S; the message
            names the class and the fix.
    """
    values = superclass_of.tolist() if isinstance(superclass_of, Tensor) else list(superclass_of)
    if len(values) != num_classes:
        raise ValueError(f"{where} has {len(values)} entries for {num_classes} classes; give one superclass "
                         "index per class")
    for c, s in enumerate(values):
        if s is None or int(s) < 0:
            raise ValueError(f"{where}: class {c} has no superclass; every class needs one (two-level folders "
                             "superclass/class/, dataset.json 'superclasses', or an iNat annotation file)")
        if int(s) >= num_superclasses:
            raise ValueError(f"{where}: class {c} has superclass {int(s)}, but the table has only "
                             f"{num_superclasses} superclass rows; set num_superclasses to at least {int(s) + 1}")
    return [int(s) for s in values]


class TieredLabelEmbedder(nn.Module):
    """Labels -> [B, D] through one (N + S [+ 1])-row table; tiered dropout to the superclass token.

    Args:
        num_classes: N fine classes.
        num_superclasses: S superclass rows.
        hidden_size: D.
        superclass_of: π, one superclass per class (length N); None leaves it unset (-1) until
            :meth:`set_superclasses`.
        dropout_prob: probability that a training label becomes its superclass token (paper: 0.1, DiT's
            ``class_dropout_prob``); must be > 0, or the superclass rows would never train.
        null_dropout_prob: ours, not the paper's: probability of the unconditional row ∅ (index N + S), which
            exists only when this is > 0 and makes plain classifier-free guidance possible for comparison.

    Labels: ``0..N-1`` classes, ``N..N+S-1`` superclass tokens (given directly, e.g. by guidance), ``-1`` = ∅
    (needs the null row). ``force_drop_ids`` ([B] bool/0-1) sends exactly the marked samples to their superclass
    token and skips random dropout in that call.
    """

    def __init__(self, num_classes: int, num_superclasses: int, hidden_size: int,
                 superclass_of: Sequence[int] | Tensor | None = None, dropout_prob: float = 0.1,
                 null_dropout_prob: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1 or num_superclasses < 1:
            raise ValueError(f"a tiered table needs >= 1 class and >= 1 superclass, got {num_classes}, "
                             f"{num_superclasses}")
        if not 0.0 < dropout_prob < 1.0 or not 0.0 <= null_dropout_prob < 1.0 - dropout_prob:
            raise ValueError(f"tiered dropout needs 0 < class_dropout_prob < 1 (paper 0.1; at 0 the superclass "
                             f"rows never train) and 0 <= null_dropout_prob < 1 - class_dropout_prob, got "
                             f"{dropout_prob}, {null_dropout_prob}")
        self.num_classes, self.num_superclasses = num_classes, num_superclasses
        self.dropout_prob, self.null_dropout_prob = dropout_prob, null_dropout_prob
        self.embedding_table = nn.Embedding(num_classes + num_superclasses + int(null_dropout_prob > 0),
                                            hidden_size)
        # Paper: every row, superclasses included, starts fresh from N(0, 0.02^2) (nothing from ImageNet rows).
        nn.init.normal_(self.embedding_table.weight, std=0.02)
        self.register_buffer("class_to_super", torch.full((num_classes,), -1, dtype=torch.int64))
        if superclass_of is not None:
            self.set_superclasses(superclass_of)

    # ------------------------------------------------------------------------------------------ the map
    @property
    def null_index(self) -> int | None:
        """Row of ∅, or None (the paper's table has no unconditional row)."""
        return self.num_classes + self.num_superclasses if self.null_dropout_prob > 0 else None

    @property
    def has_superclasses(self) -> bool:
        return bool((self.class_to_super >= 0).all())

    def set_superclasses(self, superclass_of: Sequence[int] | Tensor, where: str = "the superclass map") -> None:
        """Set π (validated by :func:`check_superclass_map`)."""
        values = check_superclass_map(superclass_of, self.num_classes, self.num_superclasses, where)
        self.class_to_super.copy_(torch.tensor(values, dtype=torch.int64))

    def superclass_token(self, labels: Tensor) -> Tensor:
        """Table index of each label's superclass row, N + π(y): [B] class labels -> [B] int64.

        Checked on every device, with one host sync per call (once per sampling call, not per step): an unset
        map (-1) would otherwise silently give token N - 1, the last fine class.

        Raises:
            ValueError: a label outside 0..N-1, or a label whose class has no superclass yet.
        """
        labels = labels.long()
        if not labels.numel():
            return labels
        outside = (labels < 0) | (labels >= self.num_classes)
        supers = self.class_to_super[labels.clamp(0, self.num_classes - 1)]
        if bool(outside.any() | (supers < 0).any()):  # the one sync; the details below only on error
            if bool(outside.any()):
                raise ValueError(f"superclass tokens exist for class labels 0..{self.num_classes - 1}, got "
                                 f"{labels.min().item()}..{labels.max().item()}")
            unset = int(labels[supers < 0][0])
            raise ValueError(f"the class -> superclass map is not set (class {unset} has none); give it "
                             "(FineDiffusion reads it from the data module) before training or sampling with "
                             "superclass tokens")
        return self.num_classes + supers

    # ------------------------------------------------------------------------------------------ forward
    def drop_labels(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Labels after tiered dropout: [B] -> [B] int64 table indices (never modifies ``labels``)."""
        labels = labels.long()
        top = self.embedding_table.num_embeddings - 1
        if labels.device.type == "cpu" and labels.numel():
            if int(labels.max()) > top:
                raise ValueError(f"label {int(labels.max())} is out of range: valid are 0..{top} and -1 (null)")
            if int(labels.min()) < 0 and self.null_index is None:
                raise ValueError("a label of -1 (null) was given, but the tiered table has no unconditional row: "
                                 "FineDiffusion's null is the class's superclass token; build it with "
                                 "null_dropout_prob > 0 for plain classifier-free guidance")
        fine = (labels >= 0) & (labels < self.num_classes)
        null = labels < 0
        if force_drop_ids is not None:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(f"force_drop_ids must have the labels' shape {tuple(labels.shape)}, got "
                                 f"{tuple(force_drop_ids.shape)}")
            to_super, to_null = force_drop_ids.to(labels.device).bool() & fine, null
        elif self.training:
            u = torch.rand(labels.shape, device=labels.device)
            to_super = (u < self.dropout_prob) & fine
            to_null = null | ((u >= self.dropout_prob) & (u < self.dropout_prob + self.null_dropout_prob))
        else:
            to_super, to_null = torch.zeros_like(fine), null
        # Gather superclasses only where the label is a class (other labels index row 0 harmlessly).
        tokens = self.num_classes + self.class_to_super[torch.where(fine, labels, 0)]
        out = torch.where(to_super, tokens, labels)
        return torch.where(to_null, top, out) if self.null_index is not None else out

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """labels [B] int -> [B, D]."""
        return self.embedding_table(self.drop_labels(labels, force_drop_ids))


def install_tiered_embedder(model: nn.Module, num_superclasses: int,
                            superclass_of: Sequence[int] | Tensor | None = None, dropout_prob: float = 0.1,
                            null_dropout_prob: float = 0.0) -> TieredLabelEmbedder:
    """Replace ``model.y_embedder`` (a DiT's) by a fresh tiered table, in place; returns the new embedder.

    The number of classes and the width come from the existing embedder's table (``num_classes`` attribute and
    embedding width), so the rest of the model is untouched and nothing is copied.
    """
    old = model.y_embedder
    embedder = TieredLabelEmbedder(old.num_classes, num_superclasses, old.embedding_table.embedding_dim,
                                   superclass_of, dropout_prob, null_dropout_prob)
    model.y_embedder = embedder.to(device=old.embedding_table.weight.device,
                                   dtype=old.embedding_table.weight.dtype)
    return embedder
