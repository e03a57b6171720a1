"""Guidance: the one function that mixes a conditional and an unconditional prediction.

Classifier-free guidance (DiT, CBDM, T2H) and superclass guidance (FineDiffusion) are both uses of
:func:`apply_guidance`; callers decide what the two predictions are conditioned on.

Scale conventions (they differ between papers, and mixing them up silently changes results):

* **DiT / ADM / this library**: ``guided = u + s * (c - u)``. ``s = 1`` is plain conditional sampling,
  ``s = 0`` is unconditional. DiT uses ``s = 1.5`` for FID and ``s = 4.0`` for pictures.
* **CBDM / T2H** (``--omega`` / ``--w``): ``guided = c + w * (c - u) = (1 + w) * c - w * u``.
  ``w = 0`` is plain conditional sampling. Convert with ``s = 1 + w``; T2H's ``w = 1.5`` is ``s = 2.5``,
  i.e. ``2.5 * c - 1.5 * u``.

DiT's released sampler guides only output channels 0-2 of its 4 latent ε channels (a quirk inherited from
GLIDE, where 3 meant "all RGB channels"). Its published FIDs depend on it, so ``guidance_channels=3``
reproduces them; guiding all 4 channels at scale ``1 + 3/4 * (s3 - 1)`` behaves about the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_guidance"]


def apply_guidance(
    cond: Tensor,
    uncond: Tensor,
    scale: float | Tensor,
    guidance_channels: int | None = None,
) -> Tensor:
    """Guided prediction ``uncond + scale * (cond - uncond)`` on the first ``guidance_channels`` channels.

    Args:
        cond: conditional prediction, shape [B, C, ...] (channel dim 1), e.g. ε̂(x_t, t, y).
        uncond: unconditional prediction ε̂(x_t, t, ∅), same shape as ``cond``.
        scale: guidance scale s (DiT convention, 1 = conditional), a float or a tensor of shape [B] for a
            per-sample scale. For the CBDM/T2H weight w pass ``1 + w``.
        guidance_channels: guide only channels ``[0, guidance_channels)``; the remaining channels are
            taken from ``cond`` unchanged (DiT keeps the conditional half). ``None`` guides every channel
            of the tensors given, so with a learned-variance output (2C channels) either pass the ε half
            only or set ``guidance_channels=C`` (see ``GaussianDiffusion.guided_output``); the DiT
            reproduction configs set 3.

    Returns:
        Guided tensor, same shape and dtype as ``cond``.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond shapes differ: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    if isinstance(scale, Tensor) and scale.ndim > 0:
        if scale.shape != (cond.shape[0],):
            raise ValueError(f"a tensor scale must have shape [B] = [{cond.shape[0]}], "
                             f"got {tuple(scale.shape)}")
        scale = scale.to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
    k = cond.shape[1] if guidance_channels is None else guidance_channels
    if not 0 < k <= cond.shape[1]:
        raise ValueError(f"guidance_channels must be in [1, {cond.shape[1]}], got {guidance_channels}")
    # Written as c + (s - 1)(c - u), algebraically equal to u + s(c - u): at s = 1 the result is exactly
    # the conditional prediction, and with s = 1 + w it is the CBDM/T2H expression term for term.
    c, u = cond[:, :k], uncond[:, :k]
    guided = c + (scale - 1) * (c - u)
    if k == cond.shape[1]:
        return guided
    return torch.cat([guided, cond[:, k:]], dim=1)
