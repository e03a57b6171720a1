"""Checkpoints of parameter-efficient runs: only the trained tensors plus a reference to the base weights.

A PEFT run (FineDiffusion, BitFit, DiffFit, a DMP patch) trains a few percent of a net. Its Lightning checkpoint
therefore keeps, of the module's ``state_dict``, only the trained parameters and the buffers (small, and some, such as
the class -> superclass map, are data), and records under :data:`PEFT_KEY`:

    {"base": absolute path of the frozen base checkpoint, "trained": [names], "fingerprint": {name: float},
     "stored_parameters": int, "total_parameters": int}

The fingerprint holds one float64 sum per frozen tensor, so loading onto a different base file fails with a
message naming the first differing tensor instead of silently producing another model. Nothing here imports
Lightning; the hooks of :class:`~diffusion_transfer.methods.peft.BaseReferencedCheckpoint` call these functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .checkpoint import CKPT_FIX, CheckpointError, safe_torch_load

__all__ = ["PEFT_KEY", "base_path", "checkpoint_bytes", "expand_state", "fingerprint", "peft_checkpoint_info",
           "require_base", "shrink_checkpoint"]

PEFT_KEY = "peft"


def fingerprint(tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """One float64 sum per tensor: a cheap identity check of frozen weights (device- and order-robust to ~1e-9)."""
    return {name: float(t.detach().double().sum()) for name, t in tensors}


def require_base(base: str | None) -> str:
    """``base``, or the error a checkpoint that refers to its base raises without one.

    Raises:
        CheckpointError: no base checkpoint (a PEFT checkpoint alone could not be restored).
    """
    if not base:
        raise CheckpointError("a parameter-efficient checkpoint refers to its base weights, but this run has no "
                              "base checkpoint (model.init_args.checkpoint); train from one, or use the full preset")
    return base


def checkpoint_bytes(obj: Any) -> int:
    """Bytes of the tensor data ``torch.save(obj)`` writes: every storage reachable from ``obj``, once each.

    Within a few kB (pickle and zip headers) of the file size; unlike ``4 x stored parameters`` it counts all
    that a training checkpoint holds: the optimizer moments, the EMA's raw weights, buffers and their dtypes.
    """
    seen: dict[tuple[str, int], int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(obj)
    return sum(seen.values())


def shrink_checkpoint(checkpoint: dict[str, Any], module: nn.Module, base: str | None,
                      not_in_base: Iterable[str] = ()) -> dict[str, Any]:
    """Reduce a Lightning checkpoint of ``module`` to its trained tensors (in place) and return the PEFT record.

    Keeps the parameters with ``requires_grad`` (their values as already in ``checkpoint["state_dict"]``, i.e. the
    EMA weights when :class:`~diffusion_transfer.callbacks.TrainableEMA` wrote them), every buffer, and the
    ``not_in_base`` keys (frozen tensors the base file does not hold, e.g. a frozen fresh table): everything the
    base file cannot give back.

    Raises:
        CheckpointError: no base checkpoint to refer to (a PEFT checkpoint alone could not be restored).
    """
    base = require_base(base)
    params = dict(module.named_parameters())
    trained = sorted(n for n, p in params.items() if p.requires_grad)
    buffers = {n for n, _ in module.named_buffers()}
    state = checkpoint["state_dict"]
    extra = set(not_in_base)
    frozen = [(n, p) for n, p in params.items() if not p.requires_grad and n not in extra]
    keep = buffers | set(trained) | extra
    record = {"base": os.path.abspath(base), "trained": trained, "fingerprint": fingerprint(frozen),
              "stored_parameters": sum(p.numel() for n, p in params.items() if n in keep),
              "total_parameters": sum(p.numel() for p in params.values())}
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
    checkpoint[PEFT_KEY] = record
    return record


def base_path(record: Mapping[str, Any], configured: str | None) -> str:
    """The base file to load: the configured path if it exists, else the absolute path stored at save time."""
    for candidate in (configured, record.get("base")):
        if candidate and Path(candidate).expanduser().is_file():
            return str(candidate)
    raise CheckpointError(f"the base checkpoint of this parameter-efficient checkpoint is missing: "
                          f"{record.get('base')!r} (configured: {configured!r}); put the base weights back there, or "
                          "pass their new location as model.init_args.checkpoint")


def expand_state(checkpoint: dict[str, Any], module: nn.Module, base: str) -> None:
    """Turn a PEFT checkpoint's ``state_dict`` back into a full one, in place, from ``module`` (base loaded).

    ``module`` must already hold the base weights; the function checks them against the stored fingerprint and
    fills every key the checkpoint lacks from the module, so Lightning's strict load succeeds.

    Raises:
        CheckpointError: the base weights differ from those the run was trained from, or a trained tensor is absent.
    """
    record = checkpoint[PEFT_KEY]
    params = dict(module.named_parameters())
    for name, value in record["fingerprint"].items():
        if name not in params:
            raise CheckpointError(f"{base}: the model has no parameter {name!r} that the PEFT checkpoint was "
                                  "trained with; build the model with the checkpoint's hyper-parameters")
        now = float(params[name].detach().double().sum())
        if not math.isclose(now, value, rel_tol=1e-6, abs_tol=1e-6 * params[name].numel() ** 0.5):
            raise CheckpointError(f"{base} is not the base this PEFT checkpoint was trained from: frozen tensor "
                                  f"{name} differs (sum {now:.6g} vs {value:.6g}); put its original base "
                                  f"{record['base']} back, or load onto a copy of it with "
                                  f"{type(module).__name__}.load_with_base(CKPT, base=COPY)")
    state = checkpoint["state_dict"]
    absent = [n for n in record["trained"] if n not in state]
    if absent:
        raise CheckpointError(f"the PEFT checkpoint lacks {len(absent)} trained tensor(s), e.g. {absent[0]}; "
                              "the file is truncated or was edited")
    checkpoint["state_dict"] = {**module.state_dict(), **state}


def peft_checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size report of a checkpoint file: bytes on disk, stored and total parameters, base, tensors.

    Works for full checkpoints too (``peft`` is then False and every parameter counts as stored).
    """
    file = Path(path)
    ckpt = safe_torch_load(file, what="a checkpoint", fix=CKPT_FIX)
    record = ckpt.get(PEFT_KEY)
    state = ckpt["state_dict"]
    stored = sum(v.numel() for v in state.values() if v.is_floating_point())
    info = {"path": str(file), "bytes": file.stat().st_size, "peft": record is not None,
            "tensors": len(state), "stored_parameters": record["stored_parameters"] if record else stored,
            "total_parameters": record["total_parameters"] if record else stored,
            "base": record["base"] if record else None}
    info["stored_share"] = info["stored_parameters"] / max(info["total_parameters"], 1)
    return info
