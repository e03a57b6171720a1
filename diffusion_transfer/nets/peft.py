"""Parameter selection for (parameter-efficient) fine-tuning: which tensors of a net train, by explicit rules.

Spec: ``papers/finediffusion.md`` §2.4, §2.6 and §6 ("explicit module-type rules"). A parameter belongs to

* ``bias``:  a parameter whose own name is ``bias`` (Linear, Conv, LayerNorm, ...);
* ``norm``:  a parameter of a normalisation layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm); DiT's LayerNorms
  have none unless built with ``norm_affine=True``;
* ``table``: a parameter of the class-label embedder ``y_embedder`` (the class table, tiered or not);
* ``gamma``: a DiffFit scale (``blocks.{i}.gamma_msa`` / ``gamma_mlp``, and with four scales a block also
  ``blocks.{i}.attn.gamma_qkv`` / ``gamma_proj``; see ``nets/dit.py``).

Presets (``pos_embed``, DiT's fixed sin-cos table, never trains):

====================  =====================================  ==============================================
preset                trains                                 DiT-XL/2, 10,000 + 11 rows, affine LNs
====================  =====================================  ==============================================
``finediffusion``     bias + norm + table                    12,153,632 of 685,640,480 (1.7726 %)
``bitfit``            bias + table                           489,632 biases + the table
``difffit``           bias + norm + gamma + table            biases, γ (and LN affine if the net has it)
``full``              everything                             all but ``pos_embed``
====================  =====================================  ==============================================

Rules are by module type, not by substring, so a future ``q_norm`` Identity or a module named ``*bias*`` is
not caught by accident (spec pitfall 6). A list of ``fnmatch`` patterns over parameter names is accepted too.

A preset may need tensors that an official DiT lacks (spec §2.6: on vanilla DiT ``norm`` selects nothing):
:func:`preset_arch` gives the DiT arguments that create them (``finediffusion``: ``norm_affine``; ``difffit``:
``branch_scales``, and ``attention_scales`` for Diff-Tuning's four γ a block), :func:`keys_not_in_dit` the
parameter names a base DiT file may therefore lack (they start at the identity), and :func:`select_trainable`
refuses a preset whose defining group (``DEFINING``) is empty instead of silently training BitFit's tensors.
FineDiffusion and DiffTuning both build and load through these. Pure torch: nothing here imports Lightning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["DEFINING", "DIFFFIT_SCALES", "PRESETS", "Selection", "canonical_preset", "keys_not_in_dit",
           "parameter_groups", "preset_arch", "select_trainable"]

#: Fixed tables that never train, whatever the selection.
NEVER = ("pos_embed",)
#: Preset -> the rule groups it trains (``all`` = every parameter).
PRESETS: dict[str, tuple[str, ...]] = {
    "finediffusion": ("bias", "norm", "table"),
    "bitfit": ("bias", "table"),
    "difffit": ("bias", "norm", "gamma", "table"),
    "full": ("all",),
}
#: Older names (Diff-Tuning's presets) kept working.
ALIASES = {"all": "full", "bias": "bitfit", "bias_norm": "finediffusion"}
#: DiffFit's γ vectors per block: 2 (the DiffFit paper: the attention and MLP branches; FineDiffusion's baseline)
#: or 4 (Diff-Tuning's ``--difffit``: also the attention's qkv [3D] and output projection [D]).
DIFFFIT_SCALES = (2, 4)
#: Preset -> the group that tells it apart from ``bitfit``; an empty one is a configuration error.
DEFINING = {"finediffusion": "norm", "difffit": "gamma"}
_NEEDS = {"norm": "LayerNorm affine parameters, which a DiT has only with norm_affine: true (FineDiffusion and "
                  "DiffTuning set it for this preset unless arch_overrides turns it off)",
          "gamma": "DiffFit branch scales γ, which a DiT has only with branch_scales >= 1 (FineDiffusion and "
                   "DiffTuning set it from difffit_depth unless arch_overrides turns it off)"}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
          *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


@dataclass(frozen=True)
class Selection:
    """What :func:`select_trainable` did: the trainable names and the counts (elements, not tensors)."""

    names: tuple[str, ...]
    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable share of all parameters (``pos_embed`` included in the denominator, as the paper's 1.77%)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.4f}%)"


def parameter_groups(model: nn.Module, label_embedder: str = "y_embedder") -> dict[str, set[str]]:
    """Parameter names of ``model`` in each rule group: ``bias``, ``norm``, ``table``, ``gamma``, ``all``.

    A parameter may sit in several groups (a LayerNorm bias is ``bias`` and ``norm``).
    """
    groups: dict[str, set[str]] = {k: set() for k in ("bias", "norm", "table", "gamma", "all")}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for local, _ in module.named_parameters(recurse=False):
            name = prefix + local
            groups["all"].add(name)
            if local == "bias":
                groups["bias"].add(name)
            if local.startswith("gamma_"):
                groups["gamma"].add(name)
            if isinstance(module, _NORMS):
                groups["norm"].add(name)
            if module_name == label_embedder or module_name.startswith(label_embedder + "."):
                groups["table"].add(name)
    return groups


def canonical_preset(selection: str | Sequence[str]) -> str | None:
    """The preset a selection names (aliases resolved), or None for a pattern list.

    Raises:
        ConfigError: an unknown preset name.
    """
    if not isinstance(selection, str):
        return None
    preset = ALIASES.get(selection, selection)
    if preset not in PRESETS:
        raise ConfigError(f"unknown trainable preset {selection!r}; choose one of "
                          f"{', '.join([*PRESETS, *ALIASES])} or give a list of parameter-name patterns")
    return preset


def preset_arch(selection: str | Sequence[str], difffit_depth: int = 14,
                overrides: Mapping[str, Any] | None = None, difffit_scales: int = 2) -> dict[str, Any]:
    """DiT arguments (``arch_overrides``) for a selection: what the preset needs, then ``overrides`` on top.

    ``finediffusion`` switches the LayerNorm affines on (spec §2.4), ``difffit`` adds γ to blocks
    0..``difffit_depth``-1 (spec §6: LN affine stays off, as vanilla DiT): ``difffit_scales`` 2 (one per branch)
    or 4 (also on the attention's qkv and output, ``attention_scales``); the other presets and pattern lists
    change nothing. An explicit key in ``overrides`` wins (e.g. ``{norm_affine: true}`` for DiffFit with LN).

    Raises:
        ConfigError: unknown preset, or with ``difffit`` a negative ``difffit_depth`` or ``difffit_scales`` not in
            :data:`DIFFFIT_SCALES`.
    """
    preset = canonical_preset(selection)
    needed: dict[str, Any] = {}
    if preset == "finediffusion":
        needed["norm_affine"] = True
    elif preset == "difffit":
        if difffit_depth < 0:
            raise ConfigError(f"difffit_depth must be >= 0 (blocks 0..k-1 get DiffFit's γ; Diff-Tuning: 14), "
                              f"got {difffit_depth}")
        if difffit_scales not in DIFFFIT_SCALES:
            raise ConfigError(f"difffit_scales must be 2 (γ on the attention and MLP branches, the DiffFit paper) or "
                              f"4 (also on qkv and the attention output, Diff-Tuning's code), got {difffit_scales}")
        needed["branch_scales"] = difffit_depth
        if difffit_scales == 4:
            needed["attention_scales"] = True
    return {**needed, **(overrides or {})}


def keys_not_in_dit(model: nn.Module) -> list[str]:
    """Parameter names of ``model`` that an official DiT file lacks: LayerNorm affines and DiffFit γ.

    They are built at the identity (weight 1, bias 0, γ = 1), so a base file may leave them out; pass them as
    ``allow_missing`` when loading it (every other missing key stays an error).
    """
    groups = parameter_groups(model)
    return sorted(groups["norm"] | groups["gamma"])


def resolve(selection: str | Sequence[str], model: nn.Module) -> set[str]:
    """The parameter names a preset name (or an ``fnmatch`` pattern list) selects, before ``NEVER`` is removed.

    Raises:
        ConfigError: unknown preset, or a preset whose defining group (:data:`DEFINING`) is empty in ``model``.
    """
    groups = parameter_groups(model)
    preset = canonical_preset(selection)
    if preset is not None:
        defining = DEFINING.get(preset)
        if defining is not None and not groups[defining]:
            raise ConfigError(f"trainable preset {selection!r} trains {_NEEDS[defining]}; this net has none, so "
                              "it would train exactly BitFit's tensors. Build the net with them, or choose "
                              "'bitfit'")
        return set().union(*(groups[g] for g in PRESETS[preset]))
    patterns = tuple(selection)
    return {n for n in groups["all"] if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def select_trainable(model: nn.Module, selection: str | Sequence[str], verbose: bool = False) -> Selection:
    """Set ``requires_grad`` on ``model``: the selected parameters train, every other one is frozen.

    Args:
        model: the net (a :class:`~diffusion_transfer.nets.dit.DiT` or any module using the same names).
        selection: a preset of :data:`PRESETS` (or an alias ``all``/``bias``/``bias_norm``), or ``fnmatch``
            patterns over parameter names (e.g. ``["final_layer.*"]``).
        verbose: print the trainable count and percentage.

    Returns:
        The :class:`Selection` (names, trainable and total element counts).

    Raises:
        ConfigError: unknown preset, a preset whose defining group is empty (``finediffusion`` without LN
            affine, ``difffit`` without γ), or a selection that picks no parameter.
    """
    chosen = resolve(selection, model) - set(NEVER)
    if not chosen:
        raise ConfigError(f"trainable {selection!r} selects no parameter of the net")
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        total += p.numel()
        trainable += p.numel() if name in chosen else 0
    result = Selection(tuple(n for n, _ in model.named_parameters() if n in chosen), trainable, total)
    if verbose:
        print(f"{selection if isinstance(selection, str) else 'patterns'}: {result}")
    return result
