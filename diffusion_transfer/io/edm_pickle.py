"""Read official EDM network pickles (``edm-*.pkl``, ``network-snapshot-*.pkl``) without running them.

Spec: ``papers/edm.md`` 4.1-4.3 and 6, ``papers/ecosystem.md`` 8.4. The files are plain ``pickle.dump`` of a dict
(``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``; Diff-Instruct adds ``Sg``). Every EDM module in them
reduces to ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, which would ``exec`` the source text
stored in ``meta['module_src']``: loading them normally runs code from the file (and needs EDM's own packages).

:class:`RestrictedUnpickler` instead resolves only these globals and refuses every other one, naming the file:

* the persistence hook -> an inert :class:`PersistentObject` holding ``class_name`` and ``state`` (the source text
  is dropped unread);
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (tensors), and ``torch.storage._load_from_bytes``
  replaced by ``torch.load(..., weights_only=True)`` of the nested storage blob;
* ``collections.OrderedDict``, ``builtins.set/frozenset``; ``torch.nn.modules.container.*`` -> :class:`ModuleStub`;
* numpy scalars (numeric dtypes only, rebuilt from their bytes) and ``numpy.dtype``; ``dnnlib.util.EasyDict`` ->
  ``dict``.

The tensors are then flattened exactly as ``state_dict()`` would (parameters, persistent buffers, children), and the
architecture is read from the stored constructor arguments (``_init_kwargs``). This module imports neither
``diffusion_transfer.nets`` nor Lightning; :func:`diffusion_transfer.io.unet_checkpoint.load_unet_checkpoint`
loads the result into a U-Net with a strict key/shape check.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from .checkpoint import CheckpointError, one_line_reason, safe_torch_load, unreadable_message

__all__ = [
    "EDM_RELEASE_URL",
    "EDMNetwork",
    "EDMPickleError",
    "ModuleStub",
    "PersistentObject",
    "RestrictedUnpickler",
    "flatten_state",
    "read_edm_pickle",
]

#: Where NVlabs publishes the EDM networks (CC BY-NC-SA 4.0; never fetched by this library).
EDM_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_FIX = f"get the file again (official EDM networks: {EDM_RELEASE_URL}) or pass another network pickle"
PERSISTENCE_HOOK = ("torch_utils.persistence", "_reconstruct_persistent_obj")
PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
# Precond attributes worth reporting (whichever the class has).
_PRECOND_CONSTANTS = ("sigma_data", "sigma_min", "sigma_max", "use_fp16", "beta_d", "beta_min", "M", "epsilon_t",
                      "C_1", "C_2")


class EDMPickleError(CheckpointError):
    """An EDM pickle was refused (it references a global outside the allow-list) or has an unexpected layout."""


@dataclass
class PersistentObject:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, as inert data.

    Attributes:
        class_name: EDM's class (``EDMPrecond``, ``SongUNet``, ``UNetBlock``, ...).
        state: the object's ``__dict__`` (for modules: ``_parameters``, ``_buffers``, ``_modules``, ...,
            ``_init_args``, ``_init_kwargs`` and plain attributes).
        module_src_chars: length of the embedded source text, which is never executed nor kept.
    """

    class_name: str
    state: dict[str, Any]
    module_src_chars: int = 0

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """Constructor keyword arguments (``_init_kwargs``), numpy scalars made Python numbers."""
        return {k: _plain(v) for k, v in dict(self.state.get("_init_kwargs") or {}).items()}


class ModuleStub:
    """An inert stand-in for a ``torch.nn`` container (``ModuleDict``, ...) in the file; keeps its state."""

    state: dict[str, Any]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def _persistent_stub(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state"), dict):
        raise EDMPickleError("a persistent object in the file has an unexpected layout (not EDM's persistence "
                             "format version 6)")
    source = meta.get("module_src")
    return PersistentObject(meta["class_name"], meta["state"], len(source) if isinstance(source, str) else 0)


def _load_storage(data: bytes, source: str = "an EDM network pickle") -> Any:
    # EDM's pickles nest each storage as a torch.save blob (zip or legacy format); weights_only reads both and
    # cannot run code. A blob that holds anything else is refused, naming the outer file.
    return safe_torch_load(io.BytesIO(data), name=f"{source} (a torch storage blob inside it)",
                           what="a tensor storage", error=EDMPickleError, fix=_FIX)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    # Rebuilt from its raw bytes: numeric dtypes only (an object scalar would unpickle a nested payload).
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise EDMPickleError(f"refused a numpy scalar of dtype {dtype!r} (only numeric scalars are read)")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED: dict[tuple[str, str], Any] = {
    PERSISTENCE_HOOK: _persistent_stub,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("dnnlib.util", "EasyDict"): dict,
}
_CONTAINERS: dict[str, type[ModuleStub]] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allow-listed globals (module docstring) and refuses the rest.

    Args:
        file: the open binary file. source: its path, named in every error.
    """

    def __init__(self, file: BinaryIO, source: str | os.PathLike[str]) -> None:
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # bound to the file its errors name
            return partial(_load_storage, source=self.source)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch.nn.modules.container":
            return _CONTAINERS.setdefault(name, type(name, (ModuleStub,), {}))
        raise EDMPickleError(
            f"{self.source}: refused to load the global {module}.{name}. diffusion_transfer reads EDM network "
            "pickles with a restricted unpickler that never runs code from the file; this file references something "
            "outside the tensors and plain data of an EDM network pickle, so it is not loaded. If you trust the "
            "file, export the network once where the EDM code is installed "
            "(torch.save(pickle.load(f)['ema'].state_dict(), 'net.pt')) and load that .pt instead."
        )


def flatten_state(obj: PersistentObject | ModuleStub, prefix: str = "") -> dict[str, Tensor]:
    """The ``state_dict()`` of a pickled module: parameters, persistent buffers, then children, recursively.

    ``None`` entries and names in ``_non_persistent_buffers_set`` are skipped, as ``state_dict()`` does.
    """
    out: dict[str, Tensor] = {}
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    tensors = [*(state.get("_parameters") or {}).items(),
               *((n, b) for n, b in (state.get("_buffers") or {}).items() if n not in skip)]
    for name, value in tensors:
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise EDMPickleError(f"{prefix}{name} holds a {type(value).__name__}, not a tensor")
        out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, ModuleStub)):
            raise EDMPickleError(f"sub-module {prefix}{name} is a {type(child).__name__}, not a pickled module")
        out.update(flatten_state(child, f"{prefix}{name}."))
    return out


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers; lists/tuples/dicts recursively; everything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _scalars(obj: Any) -> dict[str, Any] | None:
    """A pickled object's class and plain scalar attributes (for ``loss_fn`` / ``augment_pipe``)."""
    if not isinstance(obj, PersistentObject):
        return None
    plain = {k: _plain(v) for k, v in obj.state.items() if not k.startswith("_")}
    return {"class_name": obj.class_name,
            **{k: v for k, v in plain.items() if isinstance(v, (bool, int, float, str))}}


@dataclass
class EDMNetwork:
    """One network read from an EDM pickle.

    Attributes:
        path: the file. entry: the dict key it came from (``ema``).
        precond: the precond class (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``).
        precond_constants: its constants found in the file (``sigma_data``, ``sigma_min``, ``use_fp16``, ...).
        model_class: the network class (``SongUNet`` or ``DhariwalUNet``).
        model_kwargs: the network's constructor arguments (``img_resolution``, ``in_channels``, ``label_dim``,
            ``embedding_type``, ...), exactly as stored; EDM's class defaults fill in the rest.
        state_dict: the network's tensors by ``state_dict`` name, without the precond's ``model.`` prefix.
        loss / augment: class and scalar settings of ``loss_fn`` (P_mean, P_std, sigma_data) and ``augment_pipe``
            (probabilities), when present. dataset_kwargs: as stored.
    """

    path: str
    entry: str
    precond: str
    precond_constants: dict[str, Any]
    model_class: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, Tensor]
    loss: dict[str, Any] | None = None
    augment: dict[str, Any] | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: ``EDMPrecond(sigma_data=0.5) over SongUNet(img_resolution=32, ...)``."""
        constants = ", ".join(f"{k}={v}" for k, v in self.precond_constants.items())
        kwargs = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        return f"{self.precond}({constants}) over {self.model_class}({kwargs})"


def _missing_message(file: Path) -> str:
    return (
        f"EDM network pickle not found: {file}; diffusion_transfer never downloads weights. Get the official EDM "
        f"networks from the NVlabs/edm release, e.g. {EDM_RELEASE_URL}edm-cifar10-32x32-cond-vp.pkl (licensed "
        f"CC BY-NC-SA 4.0), and put the file at {file}, or pass the path where you stored it."
    )


def read_edm_pickle(path: str | os.PathLike[str], entry: str = "ema") -> EDMNetwork:
    """Read one network of an EDM pickle with :class:`RestrictedUnpickler`; nothing in the file is executed.

    Args:
        path: local ``.pkl`` file.
        entry: which network: ``ema`` (EDM, Diff-Instruct's generator) or ``Sg`` (Diff-Instruct's fake score).

    Returns:
        :class:`EDMNetwork`.

    Raises:
        FileNotFoundError: no such file (the message says where the official files are published).
        EDMPickleError: a refused global (also inside a nested storage blob), a truncated or corrupt file, or not an
            EDM network pickle; one line that names the file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(_missing_message(file))
    try:
        with file.open("rb") as f:
            data = RestrictedUnpickler(f, file).load()
    except EDMPickleError as err:
        message = str(err)
        raise EDMPickleError(message if str(file) in message else f"{file}: {message}") from None
    except Exception as err:  # noqa: BLE001 - any parse failure means "not a readable pickle"
        raise EDMPickleError(unreadable_message(file, "an EDM network pickle", one_line_reason(err), _FIX)) \
            from None
    if not isinstance(data, dict) or entry not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EDMPickleError(f"{file} has no '{entry}' entry (found {found}); EDM network pickles hold 'ema', "
                             "'loss_fn', 'augment_pipe' and 'dataset_kwargs'")
    precond = data[entry]
    model = precond.state.get("_modules", {}).get("model") if isinstance(precond, PersistentObject) else None
    if not isinstance(precond, PersistentObject) or precond.class_name not in PRECOND_CLASSES \
            or not isinstance(model, PersistentObject):
        found = precond.class_name if isinstance(precond, PersistentObject) else type(precond).__name__
        raise EDMPickleError(f"{file}: '{entry}' is a {found}, not an EDM precond wrapping a network "
                             f"(one of {', '.join(PRECOND_CLASSES)} with a 'model' sub-module)")
    if model.state.get("_init_args"):
        raise EDMPickleError(f"{file}: the network was built with positional arguments; only keyword arguments "
                             "(EDM's convention) can be mapped")
    constants = {k: _plain(precond.state[k]) for k in _PRECOND_CONSTANTS if k in precond.state}
    dataset = data.get("dataset_kwargs")
    return EDMNetwork(path=str(file), entry=entry, precond=precond.class_name, precond_constants=constants,
                      model_class=model.class_name, model_kwargs=model.init_kwargs, state_dict=flatten_state(model),
                      loss=_scalars(data.get("loss_fn")), augment=_scalars(data.get("augment_pipe")),
                      dataset_kwargs=_plain(dict(dataset)) if isinstance(dataset, dict) else {})
