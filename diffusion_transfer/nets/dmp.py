"""DMP's mixture of prompts (Ham et al., arXiv 2405.17825): a patch for a frozen :class:`~.dit.DiT`.

Spec: ``papers/dmp.md`` §2.1-2.3. For every patched block l (default: all of them) a pool of N prompts
P_l [N, D] is added to the N patch tokens, prompt i to token i, each scaled by its gate:

    z_l = W_g [c ; l] + b_g                                   one gating layer shared by all blocks, [B, N]
    z_l <- z_l + eps * (softplus(c W_noise) + 0.01)           eps ~ N(0, I), in training only (noisy gating)
    g_l = softmax(z_l)                                        [B, N], every row sums to 1
    h   <- h + g_l[..., None] * P_l                           before block l, [B, N, D]

c [B, D] is DiT's conditioning vector (timestep + class embedding) and l the raw block index 0..depth-1.
P, W_g, b_g and W_noise all start at zero, so the patched model is exactly the pre-trained one at step 0.
``gating=False`` gives naive prompt tuning (``h <- h + P_l``, the paper's "PT" baseline).

The patch never copies the DiT: it runs through ``DiT.forward(..., block_hook=patch.hook(gates))``, and the
list ``gates`` collects each block's g_l for :func:`balance_loss`. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .dit import BlockHook, DiT

__all__ = ["MixtureOfPrompts", "balance_loss", "select_blocks"]

# Floor of the gate-noise scale (Shazeer et al. 2017, as the reference code): never fully noise-free in training.
NOISE_FLOOR = 0.01
# Added to Mean(I)^2 in the balance loss, as the reference code (only matters for all-zero gates).
CV_EPS = 1e-10


def balance_loss(gates: Tensor) -> Tensor:
    """DMP's prompt-balancing (importance) loss: the squared coefficient of variation of I = sum_l G_l.

    L_imp = Var(I) / (Mean(I)^2 + 1e-10), with mean and variance over all B * N entries of I [B, N] and Var the
    unbiased sample variance (torch's default, as the reference's ``cv_squared``). 0 for uniform gates.

    Args:
        gates: stacked gates G [L_p, B, N] (rows of each block sum to 1).

    Returns:
        scalar loss (float32 or wider).
    """
    importance = gates.float().sum(0)
    return importance.var() / (importance.mean() ** 2 + CV_EPS)


def select_blocks(depth: int, blocks: str | int | Sequence[int] = "all") -> list[int]:
    """Sorted block indices to patch: ``"all"`` = 0..depth-1, a count k in 1..depth = the first k blocks (the
    reference's ``pt_depth``; a digit string such as ``"2"``, as the command line may pass it, counts too), or an
    explicit list of distinct indices in 0..depth-1.

    Raises:
        ConfigError: anything else (a bool, another string, an empty, repeated or out-of-range choice).
    """
    what = "patched_blocks must be 'all', a count of blocks or a list of block indices"
    if isinstance(blocks, str):
        text = blocks.strip()
        if text == "all":
            return list(range(depth))
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(f"{what}, got {blocks!r}")
        blocks = int(text)
    if isinstance(blocks, bool):
        raise ConfigError(f"{what}, got {blocks!r}")
    if isinstance(blocks, int):
        if not 1 <= blocks <= depth:
            raise ConfigError(f"patched_blocks {blocks} must be a count in 1..{depth} (the model's depth)")
        return list(range(blocks))
    if not isinstance(blocks, Sequence) or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
        raise ConfigError(f"{what}, got {blocks!r}")
    chosen = sorted(blocks)
    if not chosen or len(set(chosen)) != len(chosen) or chosen[0] < 0 or chosen[-1] >= depth:
        raise ConfigError(f"patched_blocks {list(blocks)!r} must pick distinct blocks in 0..{depth - 1} "
                          f"(at least one)")
    return chosen


class MixtureOfPrompts(nn.Module):
    """Per-block prompt pools mixed by one shared softmax gate (see the module docstring).

    Args:
        depth: number of blocks of the DiT (block indices 0..depth-1).
        num_tokens: N, prompts per block; must equal the DiT's patch-token count (reference ``num_tokens``).
        hidden_size: D.
        blocks: which blocks get a pool (:func:`select_blocks`; reference ``pt_depth``, paper: all).
        gating: mix the prompts with the gate (DMP, reference ``gate_type: linear``); False = naive prompt
            tuning (``PT``), which builds no gate.
        noisy_gating: add the learned gate noise in training (reference: always on); only with ``gating``.

    Parameters (reference names): ``prompt_embeddings`` [L_p, N, D]; ``gate`` Linear(D + 1 -> N) when gated;
    ``w_noise`` [D, N] when gated with noise (never built otherwise: a parameter that gets no gradient would
    break DDP's ``find_unused_parameters=False`` and inflate counts and checkpoints). All zero-initialised.
    """

    def __init__(self, depth: int, num_tokens: int, hidden_size: int, blocks: str | int | Sequence[int] = "all",
                 gating: bool = True, noisy_gating: bool = True) -> None:
        super().__init__()
        self.blocks = select_blocks(depth, blocks)
        self.num_tokens, self.hidden_size = num_tokens, hidden_size
        self.gating, self.noisy_gating = gating, gating and noisy_gating
        self.row = {block: row for row, block in enumerate(self.blocks)}  # block index -> pool of prompts
        self.prompt_embeddings = nn.Parameter(torch.zeros(len(self.blocks), num_tokens, hidden_size))
        if gating:
            self.gate = nn.Linear(hidden_size + 1, num_tokens)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if self.noisy_gating:
            self.w_noise = nn.Parameter(torch.zeros(hidden_size, num_tokens))

    @classmethod
    def for_dit(cls, net: DiT, blocks: str | int | Sequence[int] = "all", **kwargs: Any) -> MixtureOfPrompts:
        """A patch sized for ``net``: one prompt per patch token (N = ``net.num_patches``), D = its width."""
        return cls(len(net.blocks), net.num_patches, net.hidden_size, blocks, **kwargs)

    def gate_weights(self, c: Tensor, block: int) -> Tensor:
        """g_l for conditioning c [B, D] at block index ``block``: [B, N], rows on the simplex.

        Noisy (a fresh draw from torch's global RNG) in training mode, deterministic in eval mode.
        """
        index = torch.full((c.shape[0], 1), float(block), dtype=c.dtype, device=c.device)
        logits = self.gate(torch.cat([c, index], dim=1))
        if self.training and self.noisy_gating:
            scale = F.softplus(c @ self.w_noise.to(c.dtype)) + NOISE_FLOOR
            logits = logits + torch.randn_like(logits) * scale
        return logits.softmax(dim=-1)

    def hook(self, gates: list[Tensor] | None = None) -> BlockHook:
        """The ``block_hook(index, h, c)`` for ``DiT.forward``; appends each patched block's g_l to ``gates``."""

        def add_prompts(index: int, h: Tensor, c: Tensor) -> Tensor:
            row = self.row.get(index)
            if row is None:
                return h
            if h.shape[1] != self.num_tokens:
                raise ValueError(f"MixtureOfPrompts holds {self.num_tokens} prompts per block but block {index} "
                                 f"sees {h.shape[1]} tokens; build it with MixtureOfPrompts.for_dit(net)")
            prompts = self.prompt_embeddings[row].to(h.dtype)  # [N, D]
            if not self.gating:
                return h + prompts
            g = self.gate_weights(c, index)
            if gates is not None:
                gates.append(g)
            return h + g.to(h.dtype)[..., None] * prompts

        return add_prompts

    def forward(self, net: DiT, x: Tensor, t: Tensor, y: Tensor, gates: list[Tensor] | None = None,
                **kwargs: Any) -> Tensor:
        """The patched DiT: ``net(x, t, y, block_hook=self.hook(gates), **kwargs)`` -> [B, C_out, I, I]."""
        return net(x, t, y, block_hook=self.hook(gates), **kwargs)

    def num_added(self, with_noise: bool = False) -> int:
        """Parameters the patch adds: prompts + gate, as the paper counts them; ``with_noise`` adds W_noise (if
        built: with ``noisy_gating``)."""
        return sum(p.numel() for name, p in self.named_parameters() if with_noise or name != "w_noise")

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, num_tokens={self.num_tokens}, hidden_size={self.hidden_size}, "
                f"gating={self.gating}, noisy_gating={self.noisy_gating}")
