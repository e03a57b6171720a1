"""Import a checkpoint of the original DMP code (sangminwoo/DMP) onto a DiT and its mixture-of-prompts patch.

Spec: ``papers/dmp.md`` §2.1, §2.4, §4.1. The reference's ``train.py`` saves ``{"model": state dict, "opt": AdamW
state, "config": the Hydra run config}``; ``model`` is a full DiT state dict (the official key layout, see
:mod:`.dit_checkpoint`) plus the patch, under the names our :class:`~..nets.dmp.MixtureOfPrompts` uses too:

    prompt_embeddings [L_p, N, D]            prompts of blocks 0..L_p-1 (L_p = the run's models.vp.pt_depth)
    gate.weight [N, D + 1], gate.bias [N]    the gate shared by all blocks (absent for gate_type PT)
    w_noise [D, N]                           the gate-noise projection (used in training only)

Reading: ``torch.load(weights_only=True)`` through :func:`.checkpoint.safe_torch_load`. The run config is an
OmegaConf ``DictConfig``, whose classes a safe load refuses; every global of the file from OmegaConf, ``typing`` or
``builtins`` is therefore read as an inert :class:`ConfigStub` (``collections.defaultdict``, OmegaConf's resolver
cache, as a plain dict): never the real class, and nothing from the file runs. :func:`plain_config` turns the
config back into plain dicts. Any other global is refused as usual.

Mapping (:func:`load_dmp_checkpoint`): the DiT keys go to ``net`` (keys and shapes strictly equal,
:func:`.checkpoint.check_fits`; the label table as ``label_table`` says, plus the reference's layouts without a null
row); the patch keys to ``patch`` under the same names. The run config, when present, must agree with the model's
settings. Everything is checked before any tensor is copied; :class:`DMPLoadReport` says what went where. This
module imports neither ``diffusion_transfer.nets`` nor Lightning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_fits, safe_torch_load
from .dit_checkpoint import infer_dit_config
from .label_table import LabelLayout, LabelTableFit, fit_label_table

__all__ = [
    "DMP_KEYS",
    "ConfigStub",
    "DMPCheckpoint",
    "DMPLoadReport",
    "is_dmp_checkpoint",
    "load_dmp_checkpoint",
    "plain_config",
    "read_dmp_checkpoint",
    "reference_settings",
]

#: The reference's patch keys, in its state dict and in our MixtureOfPrompts alike.
DMP_KEYS = ("prompt_embeddings", "gate.weight", "gate.bias", "w_noise")
_LABEL_TABLE = "y_embedder.embedding_table.weight"
# Top-level modules of the run config's globals (OmegaConf's containers, nodes and metadata; typing.Any and builtin
# types stored as values), read as inert stubs.
_STUB_MODULES = ("omegaconf", "typing", "builtins")
# Wrapper prefixes a state dict may carry (DDP's module., torch.compile's _orig_mod.).
_PREFIXES = ("module.", "_orig_mod.")
# The run-config entries reported and checked: models.vp.* (the patch) and general.schedule_name.
_VP_SETTINGS = ("type", "topk", "gate_type", "pt_depth", "num_tokens", "uncond", "init_type")
_MAX_DEPTH = 64  # nesting of a run config; deeper (or cyclic) content is not a Hydra config
_FIX = "pass the checkpoint that the original DMP train.py saved ({results_dir}/.../checkpoints/NNNNNNN.pt)"


class ConfigStub:
    """An inert stand-in for a class of the run config (OmegaConf ``DictConfig``, its nodes and metadata,
    ``typing.Any``, builtin types stored as values): it keeps the arguments and state the pickle gives and runs
    nothing. Each global gets its own subclass, whose ``qualified`` attribute is the global's name."""

    qualified = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> ConfigStub:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept whatever arguments the pickle passes (``__new__`` keeps them) and build nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _empty_dict(*args: Any) -> dict[Any, Any]:
    """Stand-in for ``collections.defaultdict`` (a dict, so the pickle may fill it; the factory is dropped)."""
    return {}


def _config_globals(file: Path) -> list[tuple[Any, str]]:
    """Stand-ins for the file's globals that a safe load refuses and the run config uses (none for other files)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # noqa: BLE001 - a legacy or damaged file: safe_torch_load reports it
        return []
    out: list[tuple[Any, str]] = []
    for name in sorted(names):
        if name == "collections.defaultdict":
            out.append((_empty_dict, name))
        elif name.split(".")[0] in _STUB_MODULES:
            out.append((type(name.rsplit(".", 1)[-1], (ConfigStub,), {"qualified": name}), name))
    return out


def plain_config(obj: Any, _depth: int = 0) -> Any:
    """A run config read with :class:`ConfigStub` as plain dicts, lists and values.

    A ``DictConfig`` / ``ListConfig`` stub becomes its ``_content`` (a dict / list), a value node its ``_val``; a type
    stored as a value becomes its name (``"typing.Any"``). Interpolations stay strings (``"${models.name}"``).
    Nesting deeper than 64 levels gives None.
    """
    if _depth > _MAX_DEPTH:
        return None
    if isinstance(obj, ConfigStub):
        state = obj.state if isinstance(obj.state, Mapping) else {}
        for key in ("_content", "_val"):  # containers, value nodes
            if key in state:
                return plain_config(state[key], _depth + 1)
        return obj.qualified
    if isinstance(obj, Mapping):
        return {str(k): plain_config(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v, _depth + 1) for v in obj]
    return obj


def reference_settings(config: Any) -> dict[str, Any]:
    """The patch settings of a plain run config: ``models.vp.{type, topk, gate_type, pt_depth, num_tokens, uncond,
    init_type}`` and ``general.schedule_name``, as far as present (``{}`` for no config)."""
    if not isinstance(config, Mapping):
        return {}
    models = config.get("models")
    vp = models.get("vp") if isinstance(models, Mapping) else None
    out = {k: vp[k] for k in _VP_SETTINGS if isinstance(vp, Mapping) and k in vp}
    general = config.get("general")
    if isinstance(general, Mapping) and "schedule_name" in general:
        out["schedule_name"] = general["schedule_name"]
    return out


@dataclass
class DMPCheckpoint:
    """What :func:`read_dmp_checkpoint` found in a file.

    Attributes:
        state: the state dict (DiT + patch keys, wrapper prefixes removed).
        source: ``"model"`` (``train.py``'s ``{model, opt, config}``) or ``"state_dict"`` (a bare state dict).
        config: the run config as plain data (:func:`plain_config`), or None.
        other: the file's other top-level entries, not loaded (``opt``).
    """

    state: dict[str, Tensor]
    source: str
    config: Any = None
    other: list[str] = field(default_factory=list)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_dmp_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> DMPCheckpoint:
    """Read a checkpoint of the original DMP code safely (module docstring): ``train.py``'s ``{model, opt, config}``
    or a bare state dict.

    Args:
        path: the ``.pt`` file. mmap: memory-map the tensors (only the pickle is read; for a quick look).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unreadable file, one that holds globals other than the run config's, or one without a
            state dict (one line each, naming the file).
    """
    file = Path(path).expanduser()
    obj = safe_torch_load(file, what="a DMP checkpoint", fix=_FIX, mmap=mmap, trusted_globals=_config_globals(file),
                          refused_fix=f"only the tensors, plain data and the OmegaConf run config of the original "
                                      f"code are read; {_FIX}")
    if _is_state_dict(obj):
        return DMPCheckpoint(_strip_prefix(dict(obj)), "state_dict")
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        other = sorted(str(k) for k in obj if k not in ("model", "config"))
        return DMPCheckpoint(_strip_prefix(dict(obj["model"])), "model", plain_config(obj.get("config")), other)
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{file} is not a DMP checkpoint: expected a state dict or a dict with a 'model' state "
                          f"dict (the original train.py's), found {found}; {_FIX}")


def is_dmp_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint of the original DMP code: its state dict holds ``prompt_embeddings``.

    Reads only the pickle (memory-mapped). A file that cannot be read so is not one (its own loader says why).
    """
    try:
        return "prompt_embeddings" in read_dmp_checkpoint(path, mmap=True).state
    except (CheckpointError, OSError, ValueError, RuntimeError):
        return False


@dataclass
class DMPLoadReport:
    """What :func:`load_dmp_checkpoint` did, for the log (:meth:`describe`).

    Attributes:
        path: the file. source: ``"model"`` or ``"state_dict"`` (:class:`DMPCheckpoint`).
        settings: the run config's patch settings (:func:`reference_settings`; ``{}`` without a config).
        backbone: DiT tensors loaded into ``net``.
        mapped: ``(file key, our key, shape)`` of every patch tensor loaded.
        kept: our patch tensors the file lacks (they keep their initial values), with why.
        skipped: file entries not loaded, with why.
        label_table: how the label table was fitted (None: copied as is).
    """

    path: str
    source: str
    settings: dict[str, Any]
    backbone: int
    mapped: list[tuple[str, str, tuple[int, ...]]]
    kept: list[str]
    skipped: list[str]
    label_table: LabelTableFit | None = None

    def describe(self) -> str:
        """A few lines: the file and its run config, then every tensor mapped, kept or skipped, with shapes."""
        config = ", ".join(f"{k}={v!r}" for k, v in self.settings.items()) or "none in the file"
        part = "train.py's 'model'" if self.source == "model" else "a bare state dict"
        lines = [f"imported the original DMP checkpoint {self.path} ({part}; run config: {config}):",
                 f"  net.*: {self.backbone} DiT tensors, every key of the backbone, shapes equal"]
        fit = self.label_table
        if fit is not None:
            layout = (f"{fit.file.size} rows ({fit.file.describe()}{' + null' if fit.file.null else ', no null row'})"
                      if fit.file is not None else "none")
            lines.append(f"  net.{fit.key}: {layout} in the file, {fit.model.size if fit.model else 0} rows here: "
                         f"{fit.kept} from the file, {fit.fresh} fresh (label_table {fit.policy})"
                         f"{'; ' + fit.note if fit.note else ''}")
        lines += [f"  patch.{ours} <- {theirs} {tuple(shape)}" for theirs, ours, shape in self.mapped]
        if self.kept:
            lines.append("  kept at their initial values: " + "; ".join(self.kept))
        if self.skipped:
            lines.append("  not loaded: " + "; ".join(self.skipped))
        return "\n".join(lines)


def _check_settings(file: Path, settings: Mapping[str, Any], expect: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse a run config whose patch settings differ from the model's: the shapes cannot tell them apart."""
    differ = []
    for key, (ours, option) in expect.items():
        if key not in settings:
            continue
        theirs = settings[key]
        same = (math.isclose(float(theirs), float(ours), rel_tol=1e-9)
                if isinstance(theirs, (int, float)) and isinstance(ours, (int, float)) else theirs == ours)
        if not same:
            differ.append(f"{key}={theirs!r} there, {ours!r} here: set --model.init_args.{option}")
    if differ:
        raise CheckpointError(f"{file}: the DMP run that saved this checkpoint used other settings, so its patch "
                              f"would compute something else here ({'; '.join(differ)})")


def _fit_labels(net: nn.Module, state: dict[str, Tensor], policy: str, unconditional: bool,
                file: Path) -> LabelTableFit | None:
    """Fit the file's label table into ``state`` in place (None when there is nothing to fit: same layout, or a
    width that :func:`check_fits` reports).

    The reference builds ``num_classes`` rows without a null row under its default ``uncond: true``, and feeds label
    0 to every sample of an unconditional run (FFHQ); this model's unconditional samples use the null row.
    """
    target = net.state_dict().get(_LABEL_TABLE)
    theirs = state.get(_LABEL_TABLE)
    if target is None or theirs is None or theirs.ndim != 2 or theirs.shape[1:] != target.shape[1:]:
        return None
    classes = int(getattr(getattr(net, "y_embedder", None), "num_classes", target.shape[0] - 1))
    ours = LabelLayout(classes, null=target.shape[0] - classes == 1)
    rows = theirs.shape[0]
    if rows == ours.size:
        layout = ours
    elif rows == classes:  # the reference's uncond: true, no null row
        layout = LabelLayout(rows)
    else:
        layout = LabelLayout(max(rows - int(ours.null), 0), null=ours.null)
    if unconditional and layout.classes == 1 and policy != "reinit":
        state[_LABEL_TABLE] = theirs[:1].to(target.dtype).expand_as(target).clone()
        return LabelTableFit(_LABEL_TABLE, policy, layout, ours, kept=ours.size, fresh=0,
                             note="the reference feeds label 0 to every sample of an unconditional run, so its row 0 "
                                  "fills every row here (the null row, which this model's samples use, included)")
    if layout == ours:
        return None
    if policy == "strict":
        why = (f"its table has {rows} rows: {layout.describe()} and no null row (the reference's uncond: true), so "
               "classifier-free guidance has no null label" if not layout.null else
               f"its table has {rows} rows ({layout.describe()} + null)")
        raise CheckpointError(f"{file}: the checkpoint's label space does not fit this model's ({ours.describe()} + "
                              f"null): {why}; set --model.init_args.label_table reuse (keep its class rows; the rows "
                              "it lacks start fresh and train) or reinit, or build the model for its classes")
    state[_LABEL_TABLE], fit = fit_label_table(_LABEL_TABLE, theirs, target, policy, layout, ours)
    return fit


def _check_patch(file: Path, patch: nn.Module, found: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Refuse patch tensors that do not fit ``patch``; return what stays at its init and what is not loaded."""
    mine = patch.state_dict()
    prompts, ours = found["prompt_embeddings"], mine.get("prompt_embeddings")
    if ours is None or prompts.ndim != 3:
        raise CheckpointError(f"{file}: prompt_embeddings {tuple(prompts.shape)} is not [L_p, N, D] prompts, or the "
                              "patch has none; the file is not a DMP checkpoint of this layout")
    depth, n, width = prompts.shape
    blocks = list(getattr(patch, "blocks", range(ours.shape[0])))
    if blocks != list(range(depth)):
        raise CheckpointError(f"{file}: the checkpoint holds prompts for blocks 0-{depth - 1} (the reference's "
                              f"pt_depth {depth}), this patch for blocks {blocks}: set "
                              f"--model.init_args.patched_blocks {depth}")
    if (n, width) != tuple(ours.shape[1:]):
        mode = getattr(patch, "mode", "add")
        fix = (f"set --model.init_args.num_prompts {n}" if mode == "prepend" and width == ours.shape[2] else
               "build the backbone the checkpoint patched (add mode has one prompt per patch token)")
        raise CheckpointError(f"{file}: prompt_embeddings is {tuple(prompts.shape)} there, {tuple(ours.shape)} here "
                              f"(N prompts x D per block); {fix}")
    gated = "gate.weight" in mine
    if ("gate.weight" in found) != gated:
        raise CheckpointError(
            f"{file}: the checkpoint {'has a gate (gate_type linear)' if not gated else 'has no gate (gate_type PT)'}"
            f", this patch {'none' if not gated else 'one'}: set --model.init_args.gating "
            f"{'true' if not gated else 'false'}")
    for key in ("gate.weight", "gate.bias", "w_noise"):
        if key in found and key in mine and found[key].shape != mine[key].shape:
            raise CheckpointError(f"{file}: {key} is {tuple(found[key].shape)} there, {tuple(mine[key].shape)} here; "
                                  "the file is not a DMP checkpoint of this backbone")
    kept = ["patch.w_noise (the file has none; gate noise starts as softplus(0) + 0.01)"] \
        if "w_noise" in mine and "w_noise" not in found else []
    skipped = [f"w_noise {tuple(found['w_noise'].shape)} (this patch has no gate noise, noisy_gating false; it is "
               "used in training only)"] if "w_noise" in found and "w_noise" not in mine else []
    return kept, skipped


def load_dmp_checkpoint(net: nn.Module, patch: nn.Module, path: str | os.PathLike[str], *,
                        expect: Mapping[str, tuple[Any, str]] | None = None, unconditional: bool = False,
                        label_table: str = "strict") -> DMPLoadReport:
    """Load a checkpoint of the original DMP code into a DiT ``net`` and its patch ``patch``, all or nothing.

    Args:
        net: our DiT (official key layout). patch: our ``MixtureOfPrompts`` (keys :data:`DMP_KEYS`, attribute
            ``blocks``); both are filled in place, their dtype and device kept.
        path: the file (:func:`read_dmp_checkpoint`).
        expect: ``{run-config key: (this model's value, option that sets it)}`` for the keys of
            :func:`reference_settings`, e.g. ``{"type": ("add", "prompt_mode")}``; a file whose config differs is
            refused (its shapes would fit and its patch compute something else).
        unconditional: the model is unconditional (every sample uses the null row).
        label_table: ``strict``, ``reuse`` or ``reinit`` (:mod:`.label_table`) for a label table of another layout.

    Returns:
        :class:`DMPLoadReport`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unreadable or refused file; no patch in it; another run config; a backbone or patch of
            other shapes, blocks or gate (the message names the option to set).
    """
    file = Path(path).expanduser()
    found = read_dmp_checkpoint(file)
    settings = reference_settings(found.config)
    if "prompt_embeddings" not in found.state:
        raise CheckpointError(f"{file} holds no prompt_embeddings, so it is no DMP patch (a DiT, or the reference's "
                              "gate_type FT run); load it as the base of a new patch or with Diffusion")
    _check_settings(file, settings, expect or {})
    backbone = {k: v for k, v in found.state.items() if k not in DMP_KEYS}
    tensors = {k: v for k, v in found.state.items() if k in DMP_KEYS}
    fit = _fit_labels(net, backbone, label_table, unconditional, file)
    try:
        check_fits(net, backbone, file=file)
    except CheckpointError as err:
        shape = ", ".join(f"{k}={v}" for k, v in infer_dit_config(backbone).items())
        raise CheckpointError(f"{err} (the DiT part of a DMP checkpoint, which looks like {shape})") from None
    kept, skipped = _check_patch(file, patch, tensors)

    net.load_state_dict(backbone)
    mine = patch.state_dict()
    mapped = []
    with torch.no_grad():
        for key in DMP_KEYS:
            if key in tensors and key in mine:
                patch.get_parameter(key).copy_(tensors[key])
                mapped.append((key, key, tuple(tensors[key].shape)))
    skipped += [f"{k} (the optimiser state: AdamW restarts)" if k == "opt" else k for k in found.other]
    return DMPLoadReport(path=str(file), source=found.source, settings=settings, backbone=len(backbone),
                         mapped=mapped, kept=kept, skipped=skipped, label_table=fit)
