"""Load U-Net weights (``diffusion_transfer.nets.unet``) from a local file, strictly, with readable errors.

Accepted files (nothing is ever downloaded, nothing in them is executed):

* an official EDM network pickle (``*.pkl``), read by :func:`diffusion_transfer.io.edm_pickle.read_edm_pickle`;
* a checkpoint of pytorch-ddpm / CBDM / T2H (``ckpt_{step}.pt``: ``net_model`` and ``ema_model`` state dicts,
  longtail.md 4), whose names are mapped exactly onto our ``DDPMUNet`` by :func:`ddpm_to_unet_state_dict`
  (class-conditional, with ``label_embedding``, or unconditional, without: a net with ``label_dim=0``);
* a diffusion_transfer ``.ckpt`` (its ``net.`` weights, the EMA ones when trained with TrainableEMA) or a plain
  state dict ``.pt``.

``.pt`` / ``.ckpt`` files are read with ``torch.load(weights_only=True)``. Keys and shapes must match the net
exactly; an error names the file, the first mismatched keys with their shapes, and what the file holds. Like
:mod:`diffusion_transfer.io.dit_checkpoint`, this module takes the net as a plain ``nn.Module`` and imports
neither ``diffusion_transfer.nets`` nor Lightning.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import GROUP_NORMS_KEY, CheckpointError, check_group_norms, group_norm_layout, safe_torch_load
from .dit_checkpoint import LoadReport, _fmt_shape, _is_state_dict, _listing
from .edm_pickle import EDM_RELEASE_URL, EDMNetwork, read_edm_pickle
from .label_table import (
    LabelLayout,
    LabelTableFit,
    NetSpace,
    fit_label_table,
    song_label_scale,
    space_mismatch,
)

__all__ = [
    "UNetCheckpointError",
    "UNetLoadReport",
    "check_state_dict",
    "ddpm_to_unet_state_dict",
    "load_unet_checkpoint",
    "read_unet_state_dict",
    "unet_space",
]

DDPM_ENTRIES = ("ema_model", "net_model")
# pytorch-ddpm ResBlock sub-modules -> UNetBlock names (attention q/k/v are packed separately).
_DDPM_BLOCK = (("block1.0.", "norm0."), ("block1.2.", "conv0."), ("temb_proj.1.", "affine."), ("block2.0.", "norm1."),
               ("block2.3.", "conv1."), ("shortcut.", "skip."), ("attn.group_norm.", "norm2."), ("attn.proj.", "proj."))
_TIME = "time_embedding.timembedding."
# The label input: map_label.weight [E, N] (one column per class, no null entry) and, in the song style, a bias [E].
_LABEL_MAP = "map_label.weight"
_LABEL_KEYS = (_LABEL_MAP, "map_label.bias")
_LEVEL = re.compile(r"^enc\.(\d+)x\1_")  # encoder entries are named by their resolution: enc.32x32_conv, ...


class UNetCheckpointError(CheckpointError):
    """A U-Net checkpoint could not be read or does not fit the net; the message names the file and the fix."""


@dataclass
class UNetLoadReport(LoadReport):
    """What :func:`load_unet_checkpoint` loaded; ``network`` describes an EDM pickle (None for other files)."""

    network: EDMNetwork | None = None


def _torch_load(file: Path) -> object:
    fix = "copy the file again from where it was trained or published, or pass another checkpoint"
    return safe_torch_load(
        file, what="a U-Net checkpoint", error=UNetCheckpointError, missing=_missing_message(file), fix=fix,
        refused_fix=f"{fix}; if it is a pytorch-ddpm / CBDM / T2H checkpoint you trust, save its state dict alone "
                    "(torch.save(ck['ema_model'], 'net.pt')) where its code is installed, and pass that")


def _missing_message(file: Path) -> str:
    return (f"U-Net checkpoint not found: {file}; diffusion_transfer never downloads weights. EDM networks (.pkl) "
            f"are published at {EDM_RELEASE_URL}; CBDM / T2H checkpoints are the ckpt_<step>.pt files of their "
            f"training runs. Put the file at {file} or pass the path where you stored it.")


def read_unet_state_dict(path: str | os.PathLike[str], prefer: str = "ema",
                         entry: str = "ema") -> tuple[dict[str, Tensor], str, EDMNetwork | None]:
    """Read the weights of a U-Net file (see the module docstring) without loading them anywhere.

    Args:
        path: ``.pkl`` (EDM), ``.pt`` or ``.ckpt``.
        prefer: for pytorch-ddpm checkpoints, ``"ema"`` (``ema_model``, default) or ``"model"`` (``net_model``).
        entry: for EDM pickles, the network to read (``ema``; Diff-Instruct's fake score: ``Sg``).

    Returns:
        (state dict, source, network) with source ``"edm-pickle"``, ``"ddpm:ema_model"`` / ``"ddpm:net_model"``
        (still in pytorch-ddpm names), ``"lightning"`` or ``"state_dict"``; network is the
        :class:`~diffusion_transfer.io.edm_pickle.EDMNetwork` of a pickle, else None.
    """
    state, source, network, _ = _read_unet(Path(path).expanduser(), prefer, entry)
    return state, source, network


def _read_unet(file: Path, prefer: str, entry: str
               ) -> tuple[dict[str, Tensor], str, EDMNetwork | None, Mapping[str, int] | None]:
    """:func:`read_unet_state_dict`, plus the GroupNorm record of one of our ``.ckpt`` files (None otherwise)."""
    if file.suffix == ".pkl":
        network = read_edm_pickle(file, entry=entry)
        return network.state_dict, "edm-pickle", network, None
    obj = _torch_load(file)
    if _is_state_dict(obj):
        state = dict(obj)
        return state, ("ddpm:state_dict" if "head.weight" in state else "state_dict"), None, None
    if isinstance(obj, Mapping):
        if _is_state_dict(obj.get("state_dict")):  # a diffusion_transfer (Lightning) checkpoint
            net = {k[len("net."):]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
            if net:
                return net, "lightning", None, obj.get(GROUP_NORMS_KEY)
        for key in DDPM_ENTRIES if prefer == "ema" else DDPM_ENTRIES[::-1]:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), f"ddpm:{key}", None, None
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise UNetCheckpointError(f"{file} holds no U-Net weights: expected a state dict, a diffusion_transfer .ckpt or "
                              f"a pytorch-ddpm checkpoint with {' / '.join(DDPM_ENTRIES)}, found {found}")


# ------------------------------------------------------------------------------------------------------------
# pytorch-ddpm / CBDM / T2H names -> ours
# ------------------------------------------------------------------------------------------------------------
def _entries(keys: Sequence[str], group: str) -> list[str]:
    """Names of the ``group.NAME.*`` entries of a state dict, in order."""
    return list(dict.fromkeys(k.split(".")[1] for k in keys if k.startswith(group + ".")))


def _ddpm_time_table(steps: int, channels: int) -> Tensor:
    """pytorch-ddpm's frozen table: row t = [sin(t f_0), cos(t f_0), sin(t f_1), ...], f_k = 10⁴^(-2k/channels)."""
    freqs = torch.exp(-torch.arange(0, channels, 2) / channels * math.log(10000))
    angles = torch.arange(steps).float()[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(steps, channels)


def ddpm_to_unet_state_dict(state: Mapping[str, Tensor], target_keys: Sequence[str],
                            file: str | os.PathLike[str] = "<state dict>") -> dict[str, Tensor]:
    """Re-label a pytorch-ddpm / CBDM / T2H U-Net state dict with our ``DDPMUNet`` names (exact, no refitting).

    The layers correspond one to one in order: ``head`` and ``downblocks.*`` to the ``enc.*`` entries,
    ``middleblocks.{0,1}`` and ``upblocks.*`` to the ``dec.*`` entries, ``tail.{0,2}`` to ``out_norm`` /
    ``out_conv``. Inside a ResBlock, ``block1.{0,2}``, ``temb_proj.1``, ``block2.{0,3}``, ``shortcut`` become
    ``norm0, conv0, affine, norm1, conv1, skip``; attention ``group_norm`` / ``proj`` become ``norm2`` / ``proj``
    and ``proj_q/k/v`` are packed into ``qkv`` in the (C, 3) channel layout of one head. The frozen sinusoid
    table is checked and dropped (our net computes it); its interleaved (sin, cos) columns become the [sin; cos]
    column order of ``map_layer0``. ``label_embedding.weight`` [C, E] is ``map_label.weight`` transposed;
    ``augm_embedding`` is ``map_augment``. Keys left over keep their names, so a strict check reports them.

    Args:
        state: the pytorch-ddpm state dict (a ``module.`` prefix from DataParallel is removed).
        target_keys: the net's ``state_dict()`` keys (they fix the order and the output names).
        file: named in errors.

    Raises:
        UNetCheckpointError: the layers do not line up (another ch_mult / num_res_blocks / attn), or the time
            table is not pytorch-ddpm's.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = dict(state)
    out: dict[str, Tensor] = {}

    def take(src: str, dst: str) -> None:
        for key in [k for k in state if k.startswith(src)]:
            out[dst + key[len(src):]] = state.pop(key)

    def count(group: str) -> int:
        return len({k.split(".")[1] for k in state if k.startswith(group + ".")})

    src = ["head", *(f"downblocks.{i}" for i in range(count("downblocks"))), "middleblocks.0", "middleblocks.1",
           *(f"upblocks.{i}" for i in range(count("upblocks")))]
    dst = [f"enc.{n}" for n in _entries(target_keys, "enc")] + \
          [f"dec.{n}" for n in _entries(target_keys, "dec") if "_aux_" not in n]
    if len(src) != len(dst):
        raise UNetCheckpointError(f"{file}: the pytorch-ddpm checkpoint has {len(src)} layers (head, down, middle, up) "
                                  f"but the net has {len(dst)}; build the net with the checkpoint's ch_mult, "
                                  "num_res_blocks and attn")
    for s, d in zip(src, dst):
        resblock, resample = f"{s}.block1.0.weight" in state, f"{s}.main.weight" in state
        if resample != d.endswith(("_down", "_up")) or (s != "head" and resblock == resample):
            raise UNetCheckpointError(f"{file}: checkpoint layer {s} does not line up with the net's {d}; build the "
                                      "net with the checkpoint's ch_mult and num_res_blocks")
        if not resblock:
            take(f"{s}.main." if resample else f"{s}.", f"{d}.")
            continue
        qkv = [f"{s}.attn.proj_{c}." for c in "qkv"]
        if f"{qkv[0]}weight" in state:
            for kind in ("weight", "bias"):
                parts = [state.pop(p + kind) for p in qkv]
                out[f"{d}.qkv.{kind}"] = torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])
        for old, new in _DDPM_BLOCK:
            take(f"{s}.{old}", f"{d}.{new}")
    last = _entries(target_keys, "dec")[-1]
    head = "out_" if "out_conv.weight" in target_keys else f"dec.{last.removesuffix('conv')}"
    take("tail.0.", f"{head}norm.")
    take("tail.2.", f"{head}conv.")

    table = state.pop(f"{_TIME}0.weight", None)
    if table is not None and (table.ndim != 2 or not torch.allclose(
            table.float(), _ddpm_time_table(*table.shape), atol=1e-3)):
        raise UNetCheckpointError(f"{file}: {_TIME}0.weight is not pytorch-ddpm's sinusoid table, so the time "
                                  "embedding cannot be mapped")
    if f"{_TIME}1.weight" in state:
        w = state.pop(f"{_TIME}1.weight")
        out["map_layer0.weight"] = torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)  # interleaved -> [sin; cos]
    take(f"{_TIME}1.", "map_layer0.")
    take(f"{_TIME}3.", "map_layer1.")
    if "label_embedding.weight" in state:
        out["map_label.weight"] = state.pop("label_embedding.weight").t().contiguous()
    take("augm_embedding.", "map_augment.")
    return {**out, **state}


# ------------------------------------------------------------------------------------------------------------
# Strict loading
# ------------------------------------------------------------------------------------------------------------
def _describe_net(net: nn.Module) -> str:
    attrs = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim")
    return f"{type(net).__name__}(" + ", ".join(f"{a}={getattr(net, a)}" for a in attrs if hasattr(net, a)) + ")"


def check_state_dict(net: nn.Module, state: Mapping[str, Tensor], file: str | os.PathLike[str], source: str,
                     hint: str = "") -> None:
    """Raise :class:`UNetCheckpointError` unless ``state`` has exactly the net's keys with the same shapes.

    The message names the file and part, lists the first shape-different, missing and unexpected keys with their
    shapes, describes the net, and ends with ``hint`` (what the file holds and how to build a matching net).
    """
    target = net.state_dict()
    mismatched = [f"{k}: file {_fmt_shape(state[k].shape)} vs net {_fmt_shape(v.shape)}"
                  for k, v in target.items() if k in state and state[k].shape != v.shape]
    missing = [f"{k} {_fmt_shape(v.shape)}" for k, v in target.items() if k not in state]
    unexpected = [f"{k} {_fmt_shape(v.shape)}" for k, v in state.items() if k not in target]
    if not (mismatched or missing or unexpected):
        return
    parts = [f"U-Net checkpoint {file} (part: {source}) does not fit the net {_describe_net(net)}: "
             f"{len(mismatched)} shape-different, {len(missing)} missing and {len(unexpected)} unexpected key(s)."]
    for title, rows in (("shape-different (file vs net)", mismatched), ("missing from the file", missing),
                        ("unexpected in the file", unexpected)):
        if rows:
            parts.append(_listing(title, rows))
    parts.append(hint or "What to do: build the net with the architecture the file was trained with.")
    raise UNetCheckpointError("\n".join(parts))


def unet_space(state: Mapping[str, Tensor], resolution_known: bool = True) -> NetSpace:
    """What a U-Net's weights tell of its data: classes (columns of ``map_label``), side and input channels.

    The side is the largest ``enc.RxR_*`` name; ``resolution_known=False`` for weights renamed after the model's
    own names (pytorch-ddpm files name no resolution).
    """
    sides = [int(m.group(1)) for k in state if (m := _LEVEL.match(k))]
    side = max(sides) if sides else None
    stem = state.get(f"enc.{side}x{side}_conv.weight")
    table = state.get(_LABEL_MAP)
    return NetSpace(None if table is None else LabelLayout(table.shape[1]), side if resolution_known else None,
                    None if stem is None else stem.shape[1])


def _architecture(state: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Width and depth of a U-Net, independent of the resolution it was built for (its entries are named by it)."""
    side = unet_space(state).resolution
    stem = state.get(f"enc.{side}x{side}_conv.weight")
    entries = {".".join(k.split(".")[:2]) for k in state if k.startswith(("enc.", "dec."))}
    return (-1 if stem is None else stem.shape[0], len(entries))


def _fit_unet_labels(net: nn.Module, state: dict[str, Tensor], policy: str, file: Path,
                     resolution_known: bool) -> LabelTableFit | None:
    """Check the file against the net's data (one-line error) and fit its label input into ``state`` in place.

    A file whose net has a label input when this one has none, or the reverse, loads under ``reuse`` / ``reinit``
    (the file's label input is dropped; the net's stays fresh); under ``strict`` the key listing reports it.
    """
    target = net.state_dict()
    theirs, ours = unet_space(state, resolution_known), unet_space(target)
    if _architecture(state) != _architecture(target):
        return None  # another width or depth: the key listing says more
    message = space_mismatch(file, theirs, ours, policy)
    if message:
        raise UNetCheckpointError(message)
    if policy == "strict" or (theirs.labels is None and ours.labels is None):
        return None
    if ours.labels is None:  # an unconditional net: the file's label input goes
        for key in _LABEL_KEYS:
            state.pop(key, None)
        return LabelTableFit(_LABEL_MAP, policy, theirs.labels, None, kept=0, fresh=0)
    if theirs.labels is None:  # a conditional net from an unconditional file: a fresh label input
        state.update({k: target[k] for k in _LABEL_KEYS if k in target})
        return LabelTableFit(_LABEL_MAP, policy, None, ours.labels, kept=0, fresh=ours.labels.size)
    if state[_LABEL_MAP].shape[0] != target[_LABEL_MAP].shape[0]:
        return None
    scale = song_label_scale(theirs.labels, ours.labels) if getattr(getattr(net, "style", None), "label_scale",
                                                                       False) else 1.0
    state[_LABEL_MAP], fit = fit_label_table(_LABEL_MAP, state[_LABEL_MAP], target[_LABEL_MAP], policy, theirs.labels,
                                             ours.labels, axis=1, scale=scale)
    if policy == "reinit" and "map_label.bias" in target:  # the bias belongs to the label input: fresh as well
        state["map_label.bias"] = target["map_label.bias"]
    return fit


def _conditioning_hint(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    """The fix when one of file and net is class-conditional and the other not ("" otherwise)."""
    if (_LABEL_MAP in state) == (_LABEL_MAP in target):
        return ""
    if _LABEL_MAP in state:
        classes = state[_LABEL_MAP].shape[1]
        return (f"\nThe file is class-conditional ({classes} classes: {_LABEL_MAP} "
                f"{_fmt_shape(state[_LABEL_MAP].shape)}) and the net is unconditional. Build the net conditional "
                f"(LongTailDDPM / T2H: conditional: true; a U-Net: label_dim {classes}), or load the file without its "
                "label input with label_table: reuse.")
    classes = target[_LABEL_MAP].shape[1]
    return (f"\nThe file is unconditional (no {_LABEL_MAP}) and the net is class-conditional ({classes} classes). "
            "Build the net unconditional (LongTailDDPM / T2H: conditional: false, which keeps the labels for the "
            "class counts and T2H's gate; other models: arch_overrides {label_dim: 0}), or give it a fresh label "
            "input with label_table: reinit.")


def load_unet_checkpoint(net: nn.Module, path: str | os.PathLike[str], *, prefer: str = "ema", entry: str = "ema",
                         label_table: str = "strict") -> UNetLoadReport:
    """Load a U-Net file (see the module docstring) into ``net`` in place, keys and shapes strictly equal.

    Args:
        net: the U-Net to fill (its dtype and device are kept).
        path: local ``.pkl``, ``.pt`` or ``.ckpt`` file (a ``.ckpt`` of a U-Net ``Diffusion``, whose keys are
            ``unet.*``, too). prefer / entry: see :func:`read_unet_state_dict`.
        label_table: ``strict``, ``reuse`` or ``reinit``: how the file's label input (``map_label``, one column per
            class) is fitted to the net's classes (:mod:`~diffusion_transfer.io.label_table`).

    Returns:
        :class:`UNetLoadReport` (``source`` says which part was loaded; ``network`` for EDM pickles;
        ``label_table`` how the label input was fitted).

    Raises:
        FileNotFoundError: no such file (the message says where official weights are published).
        CheckpointError: an unreadable or refused file (:class:`~diffusion_transfer.io.edm_pickle.EDMPickleError`);
            a file of the net's width made for data of another size or channels, or (``strict``) another number of
            classes: one line with both and the fix; other keys/shapes that do not fit, the fix naming the setting
            when one of file and net is class-conditional and the other not; a pytorch-ddpm file for a net whose
            GroupNorms do not have 32 groups (:class:`UNetCheckpointError`).
    """
    file = Path(path).expanduser()
    state, source, network, group_norms = _read_unet(file, prefer, entry)
    target = net.state_dict()
    if state and all(k.startswith("unet.") for k in state) and not any(k.startswith("unet.") for k in target):
        state = {k[len("unet."):]: v for k, v in state.items()}  # our .ckpt of a DiTCallUNet (U-Net Diffusion)
    hint = ""
    if source.startswith("ddpm:"):
        state = ddpm_to_unet_state_dict(state, list(target), file)
        hint = ("What to do: this is a pytorch-ddpm / CBDM / T2H checkpoint; build a DDPMUNet with its settings "
                "(build_unet('ddpm-cifar10', label_dim=num_class or 0 for an unconditional file, augment_dim=9 if "
                "trained with --augm)).")
    elif network is not None:
        hint = (f"The file holds {network.describe()}.\nWhat to do: build the net with those arguments "
                "(edm-*-vp.pkl: build_unet('ddpmpp-cifar10', label_dim=...), edm-*-ve.pkl: 'ncsnpp-cifar10', "
                "ImageNet-64: 'adm-imagenet64' with img_resolution=64, label_dim=1000).")
    fit = _fit_unet_labels(net, state, label_table, file, resolution_known=not source.startswith("ddpm:"))
    hint += _conditioning_hint(state, target)
    check_state_dict(net, state, file, source, hint)
    layout = group_norm_layout(net)
    if source.startswith("ddpm:"):  # pytorch-ddpm's nets normalise with GroupNorm(32) at every width
        check_group_norms(layout, dict.fromkeys(layout, 32), file, error=UNetCheckpointError,
                          origin="a pytorch-ddpm / CBDM / T2H checkpoint, GroupNorm(32) everywhere")
    elif source == "lightning":  # our .ckpt: its recorded group counts (or, older files, EDM's rule)
        check_group_norms(layout, group_norms, file)
    net.load_state_dict(state)
    return UNetLoadReport(path=str(file), source=source, network=network, label_table=fit)
