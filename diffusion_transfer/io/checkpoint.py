"""The base of every checkpoint-loading error, and the one safe reader of torch files.

:func:`safe_torch_load` is how every ``.pt`` / ``.ckpt`` file (and every torch blob nested in an EDM pickle) is read:
``torch.load(weights_only=True)``, after checking the CRC-32 of each record of a zip-format file (``torch.load``
checks none, so a flipped bit in the tensors would load silently). A missing, truncated, bit-flipped or refused file
raises one error of one line that names the file and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

__all__ = ["CKPT_FIX", "GROUP_NORMS_KEY", "CheckpointError", "check_fits", "check_group_norms", "group_norm_layout",
           "one_line_reason", "safe_torch_load", "unreadable_message"]


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model; the message names the file and the fix."""


#: The fix for a damaged checkpoint of ours (a ``.ckpt`` written by a diffusion_transfer run).
CKPT_FIX = "pass another checkpoint of the run (an earlier save), or train again"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's refusal text: the reason follows this marker (sometimes on the next non-empty line).
_REFUSAL_MARKER = "WeightsUnpickler error:"
# Lines of torch's refusal text around the reason (advice, links, the numbered options).
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
_MAX_REASON = 200
_CHUNK = 1 << 24
_SHOW = 3  # keys of each kind a mismatch message names


def one_line_reason(err: BaseException) -> str:
    """``Type: first sentence of the first line`` of an exception, without advice to load files unsafely.

    torch's messages run over several lines and some advise ``weights_only=False``; a refusal keeps only what
    ``WeightsUnpickler`` refused (``Unsupported global: GLOBAL argparse.Namespace ...``).
    """
    text = _ANSI.sub("", str(err))
    if _REFUSAL_MARKER in text:
        text = text.split(_REFUSAL_MARKER, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_BOILERPLATE) and "weights_only" not in line]
    first = (reasons or lines or [""])[0]
    # The first sentence; torch's next ones are advice (add_safe_globals, weights_only=False, "file an issue").
    first = re.split(r"(?<=[a-z0-9)'\"])\. ", first, maxsplit=1)[0].rstrip(".")
    if "weights_only" in first:
        first = ""
    if len(first) > _MAX_REASON:
        first = first[:_MAX_REASON - 3] + "..."
    name = type(err).__name__
    return f"{name}: {first}" if first else name


def unreadable_message(file: str | os.PathLike[str], what: str, reason: str, fix: str) -> str:
    """The one-line message of a truncated or corrupt file: ``FILE could not be read as WHAT (...); FIX``."""
    return f"{file} could not be read as {what} (truncated or corrupt: {reason}); {fix}"


def _refused_message(file: str, what: str, reason: str, fix: str) -> str:
    return (f"{file} holds objects that a safe load (torch.load(weights_only=True)) refuses ({reason}), so it is "
            f"not loaded as {what}: it may be corrupt or not from a trusted source; {fix}")


def _check_records(source: str | os.PathLike[str] | IO[bytes], tensors: bool) -> None:
    """Read every record of a zip-format torch file, so that :mod:`zipfile` checks its CRC-32 (and its headers).

    ``tensors=False`` reads only the small records (the pickle, the version), not the tensor storages
    (``.../data/<key>``), for a memory-mapped load that reads only the pickle. Records written without a CRC
    (``torch.serialization.set_crc32_options(False)`` stores 0) are opened but not summed.

    Raises:
        zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError: the file is damaged.
    """
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            storage = "/data/" in info.filename and not info.filename.endswith(".pkl")
            with archive.open(info) as record:  # parses the local header: name, method, flags
                if (tensors or not storage) and (info.CRC or not info.file_size):
                    while record.read(_CHUNK):
                        pass


def _is_zip(source: Path | IO[bytes]) -> bool:
    if isinstance(source, Path):
        with source.open("rb") as file:
            return file.read(4) == b"PK\x03\x04"
    position = source.tell()
    try:
        return source.read(4) == b"PK\x03\x04"
    finally:
        source.seek(position)


def safe_torch_load(
    path: str | os.PathLike[str] | IO[bytes],
    *,
    what: str,
    fix: str,
    refused_fix: str | None = None,
    missing: str | None = None,
    name: str | None = None,
    error: type[Exception] = CheckpointError,
    map_location: Any = "cpu",
    mmap: bool = False,
    trusted_globals: Sequence[Any] = (),
) -> Any:
    """``torch.load(path, weights_only=True)``, with one clear, one-line error for a missing or damaged file.

    Args:
        path: a local file, or an open binary buffer (``name`` then says what to call it in messages).
        what: what the file should be, with its article (``"a DiT checkpoint"``); said in every message.
        fix: what to do about an unreadable file (one line, no final full stop).
        refused_fix: what to do about a file that holds objects a safe load refuses (default: ``fix``). Never
            advise ``weights_only=False``: such a file may be corrupt or made to run code.
        missing: the message of a missing file (default: ``FILE: no such file (expected WHAT); check the path``).
        error: the exception class to raise (a :class:`CheckpointError`, or the layer's own error class).
        map_location, mmap: as for ``torch.load``. With ``mmap`` only the small records' CRC-32 are checked (the
            tensors are not read); a legacy-format file is read whole.
        trusted_globals: Python classes to allow in the pickle (``torch.serialization.safe_globals``).

    Returns:
        what ``torch.load`` returns.

    Raises:
        FileNotFoundError: no such file (message: ``missing``).
        error: the file is truncated or corrupt (a zip record whose CRC-32 differs, a pickle cut short, ...), or
            it holds objects that ``weights_only`` refuses (the message names the refused global and says the file
            may be corrupt or not from a trusted source).
    """
    buffer = not isinstance(path, (str, os.PathLike))
    source: Path | IO[bytes] = path if buffer else Path(path).expanduser()  # type: ignore[assignment]
    label = name or (str(source) if not buffer else "<buffer>")
    if not buffer and not source.is_file():  # type: ignore[union-attr]
        raise FileNotFoundError(missing or f"{label}: no such file (expected {what}); check the path")
    try:
        zip_format = _is_zip(source)
        if zip_format:
            _check_records(source, tensors=not mmap)
            if buffer:
                source.seek(0)  # type: ignore[union-attr]
        with torch.serialization.safe_globals(list(trusted_globals)):
            # Only zip-format files can be memory-mapped; a legacy one (torch < 1.6) is read whole.
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap and zip_format)
    except Exception as err:  # noqa: BLE001 - any failure to parse means "damaged"; the refusal is told apart
        text = str(err)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            message = _refused_message(label, what, one_line_reason(err), refused_fix or fix)
        else:
            message = unreadable_message(label, what, one_line_reason(err), fix)
        raise error(message) from None  # torch's own text advises weights_only=False


def recorded_hyperparameters(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``hyper_parameters`` a diffusion_transfer (Lightning) checkpoint recorded; ``{}`` for any other file.

    Memory-mapped, so the tensors are not read. An unreadable file gives ``{}``: its loader reports it.
    """
    try:
        obj = safe_torch_load(path, what="a checkpoint", fix=CKPT_FIX, mmap=True)
    except (CheckpointError, OSError):
        return {}
    hparams = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def check_same_settings(path: str | os.PathLike[str], expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose recorded training settings (e.g. ``prediction``) differ from ``expected``.

    Weights of a v-prediction model loaded into an epsilon-prediction one fit every shape and train without an
    error, from a start that is no better than noise: only the recorded hyper-parameters can tell. Files that
    record none (official releases, plain state dicts) pass.

    Raises:
        CheckpointError: one line naming the file, each differing setting and the options that match the file.
    """
    recorded = recorded_hyperparameters(path)
    differ = {k: recorded[k] for k, v in expected.items() if k in recorded and recorded[k] != v}
    if differ:
        said = "; ".join(f"{k}: {v!r} there, {expected[k]!r} here" for k, v in differ.items())
        options = " ".join(f"--model.init_args.{k} {v}" for k, v in differ.items())
        raise CheckpointError(f"{path}: the checkpoint was trained with another diffusion process ({said}), so its "
                              f"outputs mean something else here: set {options}")


def check_fits(module: nn.Module, state: Mapping[str, Any], *, strict: bool = True,
               file: str | os.PathLike[str] | None = None) -> None:
    """Refuse, before any weight is assigned, a state dict whose shapes (or, if ``strict``, keys) differ from
    ``module``'s: ``load_state_dict`` copies every fitting tensor before it raises, which leaves a half-loaded model.

    Raises:
        CheckpointError: one line naming the file, the first shape-different, missing and unexpected keys, and the fix.
    """
    target = module.state_dict()

    def shape(value: Any) -> str:
        return "(" + ", ".join(map(str, getattr(value, "shape", ()))) + ")"

    mismatched = [f"{k}: file {shape(v)} vs model {shape(target[k])}" for k, v in state.items()
                  if k in target and hasattr(v, "shape") and tuple(v.shape) != tuple(target[k].shape)]
    missing = [k for k in target if k not in state] if strict else []
    unexpected = [k for k in state if k not in target] if strict else []
    if not (mismatched or missing or unexpected):
        return
    parts = [f"{len(rows)} {title} ({'; '.join(rows[:_SHOW])}{'; ...' if len(rows) > _SHOW else ''})"
             for title, rows in (("shape-different", mismatched), ("missing", missing), ("unexpected", unexpected))
             if rows]
    raise CheckpointError(f"{file or 'the checkpoint'}: its weights do not fit the {type(module).__name__} built "
                          f"here: {', '.join(parts)}; build the model with the checkpoint's hyper-parameters (leave "
                          "out the options that change its architecture), or pass the checkpoint of this model")


#: Top-level key of our ``.ckpt`` files: {module name: group count} of the U-Net GroupNorms. No state dict holds a
#: group count, so a file of another rule would load strictly and silently compute another function.
GROUP_NORMS_KEY = "unet_group_norms"


def _net_relative(name: str) -> str:
    """A module name without the wrappers' prefixes (``net.``, ``unet.``), so that a file's names and a bare net's
    compare."""
    for prefix in ("net.", "unet."):
        name = name.removeprefix(prefix)
    return name


def group_norm_layout(module: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (channels, groups)} of every ``nn.GroupNorm`` under ``module`` (names as ``named_modules``)."""
    return {name: (m.num_channels, m.num_groups) for name, m in module.named_modules() if isinstance(m, nn.GroupNorm)}


def check_group_norms(current: Mapping[str, tuple[int, int]], stored: Mapping[str, int] | None,
                      file: str | os.PathLike[str] | None, *, origin: str | None = None,
                      error: type[CheckpointError] = CheckpointError) -> None:
    """Refuse a checkpoint whose U-Net GroupNorms had other group counts than the model's.

    Args:
        current: the model's U-Net GroupNorms, ``{name: (channels, groups)}`` (:func:`group_norm_layout`).
        stored: the file's group counts ``{name: groups}``: our ``GROUP_NORMS_KEY`` record, or what a foreign
            format implies (``origin``); None for one of our files saved before the record existed, when every
            U-Net GroupNorm had min(32, C // 4) groups (EDM's rule), which is then checked.
        file: named in the error.
        origin: what the file is when its counts come from its format (e.g. "a pytorch-ddpm / CBDM / T2H
            checkpoint, GroupNorm(32) everywhere"); None for our own ``.ckpt``.
        error: the error class raised.

    Raises:
        CheckpointError: one line: the first differing GroupNorm and the ``min_channels_per_group`` that rebuilds
            the file's rule.
    """
    expected = ({_net_relative(k): int(v) for k, v in stored.items()} if stored is not None
                else {_net_relative(k): min(32, c // 4) for k, (c, _) in current.items()})
    wrong = [(k, c, g, expected[_net_relative(k)]) for k, (c, g) in current.items()
             if _net_relative(k) in expected and expected[_net_relative(k)] != g]
    if not wrong:
        return
    name, channels, groups, theirs = wrong[0]
    rule = next((m for m in (1, 4) if min(32, channels // m) == theirs), None)
    resume = ("" if origin else " (with --ckpt_path, on the command line and in the whole arch_overrides dict: a "
              "checkpoint's stored settings override the config file)")
    fix = (f"set model.init_args.arch_overrides.min_channels_per_group: {rule}{resume}" if rule is not None
           else "build the model with the checkpoint's GroupNorm groups")
    when = (f" ({origin})" if origin else "" if stored is not None
            else " (a file saved before group counts were recorded: EDM's min(32, C/4) rule)")
    raise error(f"{file or 'the checkpoint'}: its U-Net normalises {name} ({channels} channels) in {theirs} "
                f"groups{when}, this model in {groups} ({len(wrong)} GroupNorms differ), so its weights "
                f"would compute another function; {fix}")
