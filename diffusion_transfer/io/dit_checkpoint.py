"""Load official DiT checkpoints (or any DiT state dict) from a local path, strictly, with readable errors.

Spec: ``papers/dit.md`` 4.1-4.2 and 6 ("checkpoint loading"). Accepted files:

* a flat state dict (the released ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt``);
* a training checkpoint dict holding ``ema`` (preferred) and/or ``model`` state dicts (DiT's and FineDiffusion's
  ``train.py``: ``{"model", "ema", "opt", "args"}``, ``args`` an ``argparse.Namespace``).

Files are read with ``torch.load(..., weights_only=True)``, which never runs code embedded in the pickle. Besides
tensors and plain containers it builds only :data:`TRAINING_ARGS_GLOBALS` (``argparse.Namespace``), as data: any
other global (e.g. ``os.system``) is refused with a one-line error.
Weights are never downloaded: a missing file raises an error saying where to get it and where to put it.

This module sits at the bottom of the layer stack: it takes the model as a plain ``nn.Module`` and does not
import ``diffusion_transfer.nets`` (nor Lightning).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, safe_torch_load
from .label_table import LabelLayout, LabelPolicy, LabelTableFit, NetSpace, fit_label_table, space_mismatch
from .peft_checkpoint import PEFT_KEY

__all__ = [
    "DIT_RELEASE_URL",
    "TRAINING_ARGS_GLOBALS",
    "DiTCheckpointError",
    "LoadReport",
    "infer_dit_config",
    "load_dit_checkpoint",
    "read_dit_state_dict",
]

#: Where the official weights are published (facebookresearch/DiT release; CC-BY-NC, never fetched).
DIT_RELEASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
_OFFICIAL_FILES = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
# How many keys of each kind an error lists before summarising the rest.
_SHOW = 5
_LABEL_TABLE = "y_embedder.embedding_table.weight"
_SUPERCLASS_MAP = "y_embedder.class_to_super"  # FineDiffusion's tiered table: one superclass per class
#: Globals a DiT file may name besides tensors and containers: the ``args`` of DiT's / FineDiffusion's ``train.py``.
#: Data only: the restricted unpickler makes a Namespace with ``object.__new__`` and fills its ``__dict__`` (it has no
#: ``__setstate__`` and its ``__init__`` only sets attributes), so no code of the file runs.
TRAINING_ARGS_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
# What infer_dit_config reads that must agree for a checkpoint to fit up to the data's size and label space.
_ARCHITECTURE = ("depth", "hidden_size", "patch_size", "learn_sigma")


class DiTCheckpointError(CheckpointError):
    """A DiT checkpoint file could not be read or does not fit the model; the message says what to do."""


@dataclass
class LoadReport:
    """What :func:`load_dit_checkpoint` did. Lists hold state-dict keys."""

    path: str
    source: str  # "state_dict", "ema" or "model": which part of the file was loaded
    missing: list[str] = field(default_factory=list)  # model keys the file lacked (allowed by the caller)
    unexpected: list[str] = field(default_factory=list)  # file keys the model lacks (allowed by the caller)
    ignored: list[str] = field(default_factory=list)  # file keys dropped on purpose (``ignore_keys``)
    label_table: LabelTableFit | None = None  # how the label table was fitted (None: no table in both)


def _missing_file_message(path: Path) -> str:
    name = path.name
    official = name if name in _OFFICIAL_FILES else _OFFICIAL_FILES[0]
    return (
        f"DiT checkpoint not found: {path}; diffusion_transfer never downloads weights. Get the official DiT "
        f"weights from the facebookresearch/DiT release: {DIT_RELEASE_URL}{official} (512 px: "
        f"{DIT_RELEASE_URL}{_OFFICIAL_FILES[1]}) and put the file at {path} (the DiT scripts keep them under "
        "pretrained_models/), or pass the path where you stored it. The DiT weights are licensed CC-BY-NC."
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def read_dit_state_dict(
    path: str | os.PathLike[str],
    *,
    prefer: str = "ema",
    map_location: str | torch.device = "cpu",
    trusted_globals: Sequence[Any] = (),
) -> tuple[dict[str, Tensor], str]:
    """Read a DiT state dict from a local file with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pt`` file.
        prefer: for training checkpoints holding both, load ``"ema"`` (default, as DiT's ``find_model``) or
            ``"model"``.
        map_location: where tensors land.
        trusted_globals: Python classes allowed in the pickle (``torch.serialization.safe_globals``) besides
            :data:`TRAINING_ARGS_GLOBALS` (``argparse.Namespace``, always allowed: DiT / FineDiffusion ``train.py``
            checkpoints store their ``args`` as one). Only for files you trust; nothing outside these (and plain
            tensors/containers) can be unpickled.

    Returns:
        (state dict {key: Tensor}, source) with source ``"state_dict"``, ``"ema"``, ``"model"`` or
        ``"lightning"`` (the ``net.`` weights of a diffusion_transfer checkpoint).

    Raises:
        FileNotFoundError: the file does not exist; says where to get the official weights.
        DiTCheckpointError: the file is truncated or corrupt, the pickle names a global other than a Namespace
            (e.g. ``os.system``: refused, never run), or no state dict is found (one line each).
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    file = Path(path).expanduser()
    fix = f"get the file again (official weights: {DIT_RELEASE_URL}) or pass another checkpoint"
    obj = safe_torch_load(
        file, what="a DiT checkpoint", error=DiTCheckpointError, map_location=map_location,
        trusted_globals=(*TRAINING_ARGS_GLOBALS, *trusted_globals), missing=_missing_file_message(file), fix=fix,
        # The message names the refused global (e.g. "GLOBAL os.system"); add what is read and the way forward.
        refused_fix=f"{fix}; a DiT file may hold tensors, plain containers and the argparse.Namespace of a "
                    "train.py checkpoint, nothing else: if you trust the file and the refused class is plain data, "
                    "allow it in Python with trusted_globals=[that class]",
    )

    if isinstance(obj, Mapping) and PEFT_KEY in obj:
        base = obj[PEFT_KEY].get("base") if isinstance(obj[PEFT_KEY], Mapping) else None
        raise DiTCheckpointError(
            f"{file} is a parameter-efficient checkpoint: it holds only the trained tensors and refers to its "
            f"base {base!r}, so it cannot serve as base weights. Resume or sample from it with --ckpt_path "
            f"{file} (Python: Method.load_with_base(path, base=...)), and leave `checkpoint` at its base or null"
        )
    if _is_state_dict(obj):
        return dict(obj), "state_dict"
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        # A diffusion_transfer (Lightning) checkpoint: the denoiser is the "net." sub-dict, which holds the
        # EMA weights when the run used TrainableEMA.
        net = {k[len("net."):]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
        if net:
            return net, "lightning"
    if isinstance(obj, Mapping):
        order = ("ema", "model") if prefer == "ema" else ("model", "ema")
        for key in order:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), key
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise DiTCheckpointError(
        f"{file} is not a DiT state dict: expected a flat {{key: tensor}} dict or a dict with an 'ema' "
        f"or 'model' state dict, found {found}. Save the model's state_dict() (or its EMA) and pass that "
        "file."
    )


def infer_dit_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Guess a DiT's architecture from state-dict shapes (for error messages and tools).

    Returns any of ``depth``, ``hidden_size``, ``in_channels``, ``patch_size``, ``input_size``,
    ``learn_sigma``, ``output_conv``, ``table_rows`` that the shapes determine. ``num_heads`` cannot be read from
    shapes.
    ``table_rows`` is ``num_classes + 1`` for models trained with class dropout (usual; 1001 for ImageNet).
    """
    cfg: dict[str, Any] = {}
    depth = sum(1 for k in state_dict if k.startswith("blocks.") and k.endswith(".attn.qkv.weight"))
    if depth:
        cfg["depth"] = depth
    patch = state_dict.get("x_embedder.proj.weight")
    if patch is not None and patch.ndim == 4:
        cfg.update(hidden_size=patch.shape[0], patch_size=patch.shape[2], in_channels=patch.shape[1])
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "patch_size" in cfg:
        side = math.isqrt(pos.shape[1])
        if side * side == pos.shape[1]:
            cfg["input_size"] = side * cfg["patch_size"]
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is not None:
        cfg["table_rows"] = table.shape[0]
    final = state_dict.get("final_layer.linear.weight")
    if final is not None and "patch_size" in cfg:
        out_channels = final.shape[0] // cfg["patch_size"] ** 2
        cfg["learn_sigma"] = out_channels == 2 * cfg["in_channels"]
    if "output_conv.weight" in state_dict:
        cfg["output_conv"] = True
    return cfg


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _listing(title: str, rows: list[str]) -> str:
    more = f"\n    ... and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return f"  {title} ({len(rows)}):\n    " + "\n    ".join(rows[:_SHOW]) + more


def _describe(cfg: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) or "unknown layout"


def dit_label_layouts(model: nn.Module, theirs: Mapping[str, Tensor],
                      tiered: bool | None = None) -> tuple[LabelLayout, LabelLayout, str] | None:
    """The (file, model) layouts of a DiT label table (:class:`~.label_table.LabelLayout`) and how the file's was read.

    The model's comes from its embedder (``num_classes``, FineDiffusion's ``num_superclasses``; the rest is the null
    row). A file holds only the table (and, from our FineDiffusion, its superclass map), so its layout is inferred:

    * with a superclass map: tiered, of the model's layout when it has its shape, else read as its classes followed
      by rows that are never reused;
    * without one, under a tiered model (S superclass rows) whose shape it has exactly (N + S [+ ∅] rows): the
      model's tiered layout when S >= 2 or ``tiered`` is True (an original FineDiffusion ``train.py`` checkpoint,
      which stores no map). With S = 1 the shape is also a flat DiT table's (N classes + ∅), so it is read as flat
      unless ``tiered``;
    * otherwise flat, with the model's null row: 21 rows are 20 classes + ∅ for a model with a null row (DiT trained
      with class dropout, the usual case) and for a tiered model.

    Args:
        tiered: None (the rule above), True (a map-less file must be a tiered table of the model's layout:
            FineDiffusion's ``label_table: tiered``), False (a map-less file is always a flat table).

    Returns:
        (file layout, model layout, note): the note says in one sentence how a map-less table of the tiered shape
        was read ("" otherwise); None when the model or the file has no table.

    Raises:
        ValueError: ``tiered`` with a model that has no superclass rows, or a map-less file of another shape.
    """
    target = model.state_dict()
    if _LABEL_TABLE not in target or _LABEL_TABLE not in theirs:
        return None
    rows, file_rows = target[_LABEL_TABLE].shape[0], theirs[_LABEL_TABLE].shape[0]
    embedder = getattr(model, "y_embedder", None)
    classes = int(getattr(embedder, "num_classes", rows - 1))
    extra = int(getattr(embedder, "num_superclasses", 0))
    ours = LabelLayout(classes, extra, null=rows - classes - extra == 1)
    shape = f"{ours.describe()}{' + a null row' if ours.null else ''} = {rows} rows"
    if tiered and not extra:
        raise ValueError(f"label_table tiered reads the file's class table as a tiered one, but this model's table is "
                         f"flat ({shape}); build the tiered model (tiered: true) or choose strict, reuse or reinit")
    supers = theirs.get(_SUPERCLASS_MAP)
    if supers is not None:  # a tiered table with its map (our FineDiffusion checkpoints)
        n = supers.numel()
        same = file_rows == rows and n == classes and extra > 0
        return (ours if same else LabelLayout(n, max(file_rows - n, 0))), ours, ""
    if extra and file_rows == rows and tiered is not False and (tiered or extra >= 2):
        why = "label_table tiered is set" if tiered else f"the hierarchy has {extra} superclasses"
        return ours, ours, (f"the file's class table has no superclass map but exactly this tiered shape ({shape}) "
                            f"and {why}, so it is read as this tiered table (an original "
                            "FineDiffusion checkpoint): rows 0..N-1 the classes, then the superclass rows in the "
                            "order of this model's superclass ids")
    if tiered:
        raise ValueError(f"label_table tiered reads the file's class table as this tiered one ({shape}), but it has "
                         f"{file_rows} rows; build the model for the file's classes and superclasses, or choose "
                         "reuse or reinit")
    null = ours.null or extra > 0  # a flat file under a tiered model: a DiT's table, with its null row
    flat = LabelLayout(max(file_rows - int(null), 0), 0, null)
    note = ""
    if extra == 1 and file_rows == rows and tiered is None:
        note = (f"the file's class table has this tiered table's shape ({shape}) but no superclass map, and with "
                f"one superclass that is also a flat DiT table's ({flat.describe()} + a null row), so it is read as "
                "flat; set label_table tiered if it is a FineDiffusion table")
    return flat, ours, note


def dit_space(state: Mapping[str, Tensor], labels: LabelLayout | None) -> NetSpace:
    """What a DiT's weights tell of its data: ``labels``, input side (pixels or latents) and channels."""
    cfg = infer_dit_config(state)
    return NetSpace(labels, cfg.get("input_size"), cfg.get("in_channels"))


def _fit_dit_labels(model: nn.Module, loaded: Mapping[str, Tensor], state: dict[str, Tensor], policy: LabelPolicy,
                    file: Path, tiered: bool | None = None) -> LabelTableFit | None:
    """Check the file against the model's data (one-line error) and fit its label table into ``state`` in place.

    Only when the architectures agree: otherwise the key listing of :func:`load_dit_checkpoint` says more.
    ``tiered``: how a table without superclass map is read (:func:`dit_label_layouts`).
    """
    target = model.state_dict()
    file_cfg, model_cfg = infer_dit_config(loaded), infer_dit_config(target)
    if any(file_cfg.get(k) != model_cfg.get(k) for k in _ARCHITECTURE):
        return None
    try:  # the superclass map tells a tiered file even when the caller drops it (FineDiffusion never reads it)
        layouts = dit_label_layouts(model, loaded, tiered) if _LABEL_TABLE in state else None
    except ValueError as err:
        raise DiTCheckpointError(f"{file}: {err}") from None
    theirs, ours, note = layouts if layouts is not None else (None, None, "")
    rule = policy(theirs, ours) if callable(policy) and layouts is not None else policy
    rule = rule if isinstance(rule, str) else "strict"
    message = space_mismatch(file, dit_space(loaded, theirs), dit_space(target, ours), rule)
    if message:
        raise DiTCheckpointError(message)
    if layouts is None or state[_LABEL_TABLE].shape[1:] != target[_LABEL_TABLE].shape[1:]:
        return None
    table, fit = fit_label_table(_LABEL_TABLE, state[_LABEL_TABLE], target[_LABEL_TABLE], rule, theirs, ours)
    state[_LABEL_TABLE] = table
    return dataclasses.replace(fit, note=note)


def load_dit_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    ignore_keys: Iterable[str] = (),
    ignore_mismatched: Iterable[str] = (),
    prefer: str = "ema",
    trusted_globals: Sequence[Any] = (),
    label_table: LabelPolicy = "strict",
    tiered_table: bool | None = None,
) -> LoadReport:
    """Load a DiT checkpoint file into ``model`` (our ``DiT`` or anything with the same key layout).

    Keys and shapes must match exactly unless the caller whitelists differences, which is how a method states
    what it adds or replaces (e.g. FineDiffusion: ``ignore_keys=["y_embedder.class_to_super"]`` and
    ``allow_missing=["blocks.*.norm*", "final_layer.norm_final.*"]``). Patterns are ``fnmatch`` globs. The label
    table is fitted to the model's label space under ``label_table`` (:mod:`~diffusion_transfer.io.label_table`).

    Args:
        model: the module to fill (parameters are copied in place; dtype/device of the model are kept).
        path: local ``.pt`` file; see :func:`read_dit_state_dict` for accepted contents, ``prefer`` and
            ``trusted_globals``.
        strict: if False, any missing/unexpected key is tolerated (and reported); shape mismatches raise.
        allow_missing: model keys that may be absent from the file (they keep their current values).
        allow_unexpected: file keys the model may lack (they are skipped).
        ignore_keys: file keys dropped before comparing (e.g. a label table that is re-initialised).
        ignore_mismatched: file keys dropped only when the model lacks them or their shape differs (a label
            table kept when it fits, re-initialised otherwise).
        label_table: ``strict`` (the file's label space must be the model's), ``reuse`` (its first class rows
            and its null row; new rows keep the model's init) or ``reinit`` (the model's fresh table), see
            :mod:`~diffusion_transfer.io.label_table`; or a rule ``(file layout, model layout) -> policy``.
        tiered_table: how a table without superclass map (an original FineDiffusion checkpoint) meets a tiered
            model: None reads one of the model's exact tiered shape as tiered when it has >= 2 superclasses, True
            always (an error if the shape differs), False never (:func:`dit_label_layouts`).

    Returns:
        A :class:`LoadReport` with the tolerated missing/unexpected and the ignored keys, and how the label table
        was fitted (its ``note`` says how a map-less table of the tiered shape was read).

    Raises:
        FileNotFoundError: no such file (the message says where to get the official weights).
        DiTCheckpointError: unreadable file; a file of the model's architecture made for data of another size or
            channels, or (``strict``) another label space: one line with both and the fix; other keys/shapes that
            do not fit: the file, the first mismatched keys with their shapes, the layout the file implies, and
            what to do.
    """
    file = Path(path).expanduser()
    loaded, source = read_dit_state_dict(file, prefer=prefer, trusted_globals=trusted_globals)
    ignore, if_mismatched = tuple(ignore_keys), tuple(ignore_mismatched)
    target = model.state_dict()
    ignored = sorted(k for k, v in loaded.items() if _matches(k, ignore) or (
        _matches(k, if_mismatched) and (k not in target or tuple(v.shape) != tuple(target[k].shape))))
    state = {k: v for k, v in loaded.items() if k not in set(ignored)}
    fit = _fit_dit_labels(model, loaded, state, label_table, file, tiered_table)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    allow_m, allow_u = tuple(allow_missing), tuple(allow_unexpected)
    bad_missing = [] if not strict else [k for k in missing if not _matches(k, allow_m)]
    bad_unexpected = [] if not strict else [k for k in unexpected if not _matches(k, allow_u)]

    if mismatched or bad_missing or bad_unexpected:
        parts = [
            f"DiT checkpoint {file} (part: {source}) does not fit the model: "
            f"{len(mismatched)} shape-different, {len(bad_missing)} missing and {len(bad_unexpected)} "
            "unexpected key(s)."
        ]
        if mismatched:
            rows = [
                f"{k}: file {_fmt_shape(state[k].shape)} vs model {_fmt_shape(target[k].shape)}"
                for k in mismatched
            ]
            parts.append(_listing("shape-different (file vs model)", rows))
        if bad_missing:
            parts.append(
                _listing("missing from the file", [f"{k} {_fmt_shape(target[k].shape)}" for k in bad_missing])
            )
        if bad_unexpected:
            rows = [f"{k} {_fmt_shape(state[k].shape)}" for k in bad_unexpected]
            parts.append(_listing("unexpected in the file", rows))
        # The file as read, not as fitted: its table rows are its own (20 classes + null = 21).
        parts.append(f"  the file looks like: {_describe(infer_dit_config(loaded))}")
        parts.append(f"  the model looks like: {_describe(infer_dit_config(target))}")
        cfg = infer_dit_config(loaded)
        shape = ", ".join(f"{k}: {cfg[k]}" for k in ("hidden_size", "depth") if k in cfg)
        parts.append(
            f"What to do: build the model with the file's architecture: on the command line --model.init_args.arch "
            f"DiT-S/{cfg.get('patch_size', 2)} --model.init_args.arch_overrides '{{{shape}, num_heads: H}}' (H: the\n"
            "file's heads, which its shapes do not tell); in Python, build_dit with those arguments (the official\n"
            "DiT-XL-2-256x256.pt is build_dit('DiT-XL/2'), input_size=32; the 512x512 file needs input_size=64).\n"
            "Python API only: if the difference is intended (new layers), declare it with allow_missing /\n"
            "allow_unexpected / ignore_keys."
        )
        raise DiTCheckpointError("\n".join(parts))

    # Every remaining key exists in the model with the right shape; missing ones were allowed above.
    model.load_state_dict(state, strict=False)
    return LoadReport(path=str(file), source=source, missing=missing, unexpected=unexpected, ignored=ignored,
                      label_table=fit)
