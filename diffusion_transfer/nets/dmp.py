"""DMP's mixture of prompts (Ham et al., arXiv 2405.17825): a patch for a frozen :class:`~.dit.DiT`.

Spec: ``papers/dmp.md`` §2.1-2.4. For every patched block l (default: all of them) a pool of N prompts P_l [N, D]
is mixed by a gate and fed to the block:

    z_l = W_g [x ; l] + b_g                                   one gating layer shared by all blocks, [B, N]
    z_l <- z_l + eps * sigma,  sigma = softplus(x W_noise) + 0.01   eps ~ N(0, I), in training only (noisy gating)
    g_l = softmax over the k largest z_l, 0 elsewhere         [B, N], every row sums to 1 (k = N: plain softmax)
    add:     h <- h + g_l[..., None] * P_l                    before block l, prompt i to patch token i, [B, N, D]
    prepend: h <- [g_l[..., None] * P_l ; patch tokens]       N prompt tokens in front (first patched block), then
                                                              overwritten by each later patched block's; dropped
                                                              before the final layer (``DiT.head`` keeps the last T)

The gate input x [B, D] is DiT's conditioning vector c (timestep + class embedding) in ``add`` mode and the
timestep embedding alone in ``prepend`` mode, as the reference; l is the raw block index 0..depth-1. k = int(topk * N)
(the reference's truncation). For k < N the training loss gets the reference's load term: per block the noisy
estimate of how often each prompt is in the top k (Shazeer et al. 2017, :func:`prob_in_top_k`), summed over the
batch (:func:`load_loss`). P, W_g, b_g and W_noise start at zero (``init="zero"``; the patched ``add`` model is then
exactly the pre-trained one) or Xavier-uniform with a zero bias (``init="random"``). ``gating=False`` gives naive
prompt tuning (``h <- h + P_l``, the paper's "PT" baseline).

The patch never copies the DiT: it runs through ``DiT.forward(..., block_hook=patch.hook(gates, loads))``; the lists
collect each block's g_l for :func:`balance_loss` and load estimate for :func:`load_loss`. Nothing here imports
Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .dit import BlockHook, DiT

__all__ = ["LOAD_LOSSES", "PROMPT_INITS", "PROMPT_MODES", "MixtureOfPrompts", "balance_loss", "cv_squared",
           "load_loss", "prob_in_top_k", "select_blocks"]

# Floor of the gate-noise scale (Shazeer et al. 2017, as the reference code): never fully noise-free in training.
NOISE_FLOOR = 0.01
# Added to Mean^2 in the squared coefficient of variation, as the reference code (only matters for all-zero input).
CV_EPS = 1e-10
#: Where the prompts go: added to the patch tokens (the paper's DMP) or prepended as extra tokens (VPT-deep style).
PROMPT_MODES = ("add", "prepend")
#: Initial prompts, gate and W_noise: all zero (the reference default) or Xavier-uniform with a zero gate bias.
PROMPT_INITS = ("zero", "random")
#: The load term for k < N: the reference's ``sum`` (of the block-mean load) or Shazeer et al.'s ``cv2``.
LOAD_LOSSES = ("sum", "cv2")


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation Var(x) / (Mean(x)^2 + 1e-10) over all entries of x, as the reference.

    Var is the unbiased sample variance (torch's default); a leading dimension of size 1 gives 0, as the reference's
    ``cv_squared`` (a batch of one sample, or a single prompt), where torch's variance would be NaN or meaningless.
    """
    if x.shape[0] == 1:
        return x.new_zeros((), dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + CV_EPS)


def balance_loss(gates: Tensor) -> Tensor:
    """DMP's prompt-balancing (importance) loss: the squared coefficient of variation of I = sum_l G_l.

    L_imp = Var(I) / (Mean(I)^2 + 1e-10), with mean and variance over all B * N entries of I [B, N] and Var the
    unbiased sample variance (:func:`cv_squared`, as the reference; 0 for a batch of one). 0 for uniform gates.

    Args:
        gates: stacked gates G [L_p, B, N] (rows of each block sum to 1).

    Returns:
        scalar loss (float32 or wider).
    """
    return cv_squared(gates.float().sum(0))


def prob_in_top_k(clean: Tensor, noisy: Tensor, sigma: Tensor, kth: Tensor, next_: Tensor) -> Tensor:
    """Shazeer et al. (2017)'s smooth estimate of P(prompt i is among the k largest noisy logits).

    Prompt i is in the top k iff its noisy logit beats the k-th largest of the OTHER logits: the (k+1)-th largest
    overall when i is in the top k now, the k-th largest when it is not. Redrawing only i's noise, N(0, sigma_i^2),
    that happens with probability Phi((clean_i - threshold) / sigma_i); differentiable in the clean logits and sigma.

    Args:
        clean: logits without noise [B, N]; noisy: clean + eps * sigma [B, N]; sigma: noise scale [B, N] (> 0).
        kth / next_: the k-th and (k+1)-th largest noisy logit of each row [B, 1].

    Returns:
        [B, N] probabilities (float32 or wider).
    """
    threshold = torch.where(noisy > next_, next_, kth)
    return torch.special.ndtr((clean.float() - threshold.float()) / sigma.float())


def load_loss(loads: Tensor, form: str = "sum") -> Tensor:
    """The load term of the DMP loss for k < N, from the per-block load estimates.

    Args:
        loads: [L_p, N], each block's sum over the batch of :func:`prob_in_top_k`.
        form: ``sum`` (the reference: sum_i mean_l load_{l,i}, which is about B * k and is not a balancing term; its
            gradient lowers every prompt's chance of being routed) or ``cv2`` (Shazeer et al. 2017's balancing term:
            :func:`cv_squared` of the block-mean load over the N prompts).

    Returns:
        scalar loss (float32).
    """
    if form not in LOAD_LOSSES:
        raise ConfigError(f"load_loss must be one of {', '.join(LOAD_LOSSES)}, got {form!r}")
    load = loads.float().mean(0)
    return load.sum() if form == "sum" else cv_squared(load)


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
    """Per-block prompt pools mixed by one shared (top-k) softmax gate (see the module docstring).

    Args:
        depth: number of blocks of the DiT (block indices 0..depth-1).
        num_tokens: N, prompts per block (reference ``num_tokens``); in ``add`` mode it must equal the DiT's
            patch-token count (prompt i goes to token i); in ``prepend`` mode any count.
        hidden_size: D.
        blocks: which blocks get a pool (:func:`select_blocks`; reference ``pt_depth``, paper: all).
        gating: mix the prompts with the gate (DMP, reference ``gate_type: linear``); False = naive prompt
            tuning (``PT``), which builds no gate.
        noisy_gating: add the learned gate noise in training (reference: always on); only with ``gating``.
        topk: the fraction of prompts each gate keeps, in (0, 1]; k = int(topk * N) >= 1 (reference ``topk``,
            default 1: every prompt, the plain softmax).
        mode: ``add`` (reference ``type: add``, the paper's DMP) or ``prepend`` (``type: prepend``; the gate then
            sees the timestep embedding instead of c).
        init: ``zero`` (reference ``init_type: zero``) or ``random`` (``init_type: random``): prompts, gate weight
            and W_noise Xavier-uniform (torch's global RNG, so deterministic under ``torch.manual_seed``), gate
            bias 0.

    Parameters (reference names): ``prompt_embeddings`` [L_p, N, D]; ``gate`` Linear(D + 1 -> N) when gated;
    ``w_noise`` [D, N] when gated with noise (never built otherwise: a parameter that gets no gradient would
    break DDP's ``find_unused_parameters=False`` and inflate counts and checkpoints).

    Raises:
        ConfigError: a bad ``blocks``, ``topk``, ``mode`` or ``init``.
    """

    def __init__(self, depth: int, num_tokens: int, hidden_size: int, blocks: str | int | Sequence[int] = "all",
                 gating: bool = True, noisy_gating: bool = True, topk: float = 1.0, mode: str = "add",
                 init: str = "zero") -> None:
        super().__init__()
        if mode not in PROMPT_MODES:
            raise ConfigError(f"prompt_mode must be one of {', '.join(PROMPT_MODES)}, got {mode!r}")
        if init not in PROMPT_INITS:
            raise ConfigError(f"prompt_init must be one of {', '.join(PROMPT_INITS)}, got {init!r}")
        if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0 < topk <= 1 \
                or int(topk * num_tokens) < 1:
            raise ConfigError(f"topk must be a fraction in (0, 1] that keeps at least one of the {num_tokens} "
                              f"prompts (k = int(topk * {num_tokens})), got {topk!r}")
        self.blocks = select_blocks(depth, blocks)
        self.num_tokens, self.hidden_size = num_tokens, hidden_size
        self.gating, self.noisy_gating = gating, gating and noisy_gating
        self.topk, self.mode, self.init = float(topk), mode, init
        self.k = int(topk * num_tokens)  # the reference's truncation: int(0.29 * 100) = 28
        self.row = {block: row for row, block in enumerate(self.blocks)}  # block index -> pool of prompts
        self.prompt_embeddings = nn.Parameter(torch.zeros(len(self.blocks), num_tokens, hidden_size))
        if gating:
            self.gate = nn.Linear(hidden_size + 1, num_tokens)
        if self.noisy_gating:
            self.w_noise = nn.Parameter(torch.zeros(hidden_size, num_tokens))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as ``init`` says (the reference's order: prompts, gate weight, W_noise)."""
        fill = nn.init.xavier_uniform_ if self.init == "random" else nn.init.zeros_
        fill(self.prompt_embeddings)
        if self.gating:
            fill(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if self.noisy_gating:
            fill(self.w_noise)

    @classmethod
    def for_dit(cls, net: DiT, blocks: str | int | Sequence[int] = "all", num_tokens: int | None = None,
                **kwargs: Any) -> MixtureOfPrompts:
        """A patch sized for ``net``: D = its width and, unless ``num_tokens`` says otherwise (``prepend`` mode
        only), one prompt per patch token (N = ``net.num_patches``).

        Raises:
            ConfigError: ``num_tokens`` other than the patch count in ``add`` mode, or below 1.
        """
        if num_tokens is None:
            num_tokens = net.num_patches
        elif kwargs.get("mode", "add") == "add" and num_tokens != net.num_patches:
            raise ConfigError(f"num_prompts must equal the DiT's {net.num_patches} patch tokens in add mode (prompt "
                              f"i is added to token i), got {num_tokens}; leave it null, or use prompt_mode prepend")
        if num_tokens < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {num_tokens}")
        return cls(len(net.blocks), num_tokens, net.hidden_size, blocks, **kwargs)

    @property
    def sparse(self) -> bool:
        """Whether the gates keep fewer than all prompts (k < N): then training adds the load term."""
        return self.k < self.num_tokens

    def route(self, x: Tensor, block: int) -> tuple[Tensor, Tensor | None]:
        """Gates and load estimate of block ``block`` for gate input x [B, D] (c, or the timestep embedding).

        Returns:
            g_l [B, N] on the simplex with k non-zero entries per row (noisy, a fresh draw from torch's global RNG,
            in training mode; deterministic in eval mode), and, when k < N in training with gate noise, the load
            [N] = sum over the batch of :func:`prob_in_top_k` (else None: the reference's load is then 0).
        """
        index = torch.full((x.shape[0], 1), float(block), dtype=x.dtype, device=x.device)
        clean = self.gate(torch.cat([x, index], dim=1))
        noisy = self.training and self.noisy_gating
        logits, sigma = clean, None
        if noisy:
            sigma = F.softplus(x @ self.w_noise.to(x.dtype)) + NOISE_FLOOR
            logits = clean + torch.randn_like(clean) * sigma
        if not self.sparse:  # k = N: the plain softmax, bit for bit (no sort, no scatter)
            return logits.softmax(dim=-1), None
        top, order = logits.topk(self.k + 1, dim=-1)  # k + 1 <= N; the (k+1)-th is the load's threshold
        gates = torch.zeros_like(logits).scatter(-1, order[:, :self.k], top[:, :self.k].softmax(dim=-1))
        if sigma is None:
            return gates, None
        return gates, prob_in_top_k(clean, logits, sigma, top[:, self.k - 1:self.k], top[:, self.k:]).sum(0)

    def gate_weights(self, x: Tensor, block: int) -> Tensor:
        """g_l for gate input x [B, D] at block index ``block``: [B, N], rows on the simplex (:meth:`route`)."""
        return self.route(x, block)[0]

    def hook(self, gates: list[Tensor] | None = None, loads: list[Tensor] | None = None,
             time: Tensor | None = None) -> BlockHook:
        """The ``block_hook(index, h, c)`` for ``DiT.forward``; appends each patched block's g_l to ``gates`` and
        its load estimate (k < N, training with noise) to ``loads``.

        Args:
            time: the timestep embedding [B, D], the gate input in ``prepend`` mode (:meth:`forward` passes it).
        """
        if self.mode == "prepend" and self.gating and time is None:
            raise ValueError("a prepend-mode gate sees the timestep embedding: call the patch (patch(net, x, t, y)) "
                             "or pass hook(..., time=net.t_embedder(t))")
        first = self.blocks[0]

        def patch_tokens(index: int, h: Tensor, c: Tensor) -> Tensor:
            row = self.row.get(index)
            if row is None:
                return h
            if self.mode == "add" and h.shape[1] != self.num_tokens:
                raise ValueError(f"MixtureOfPrompts holds {self.num_tokens} prompts per block but block {index} "
                                 f"sees {h.shape[1]} tokens; build it with MixtureOfPrompts.for_dit(net)")
            prompts = self.prompt_embeddings[row].to(h.dtype)  # [N, D]
            if self.gating:
                g, load = self.route(c if self.mode == "add" else time, index)
                if gates is not None:
                    gates.append(g)
                if loads is not None and load is not None:
                    loads.append(load)
                prompts = g.to(h.dtype)[..., None] * prompts  # [B, N, D]
            if self.mode == "add":
                return h + prompts
            prompts = prompts.expand(h.shape[0], -1, -1)
            # Prepend: N prompt tokens in front at the first patched block; later ones replace them with their own.
            return torch.cat([prompts, h if index == first else h[:, self.num_tokens:]], dim=1)

        return patch_tokens

    def forward(self, net: DiT, x: Tensor, t: Tensor, y: Tensor, gates: list[Tensor] | None = None,
                loads: list[Tensor] | None = None, **kwargs: Any) -> Tensor:
        """The patched DiT: ``net(x, t, y, block_hook=self.hook(gates, loads), **kwargs)`` -> [B, C_out, I, I]."""
        time = None
        if self.mode == "prepend" and self.gating:  # recomputed (a small MLP): DiT.forward hands hooks only c
            time = net.t_embedder(t.expand(y.shape[0]) if t.ndim == 0 else t)
        return net(x, t, y, block_hook=self.hook(gates, loads, time), **kwargs)

    def num_added(self, with_noise: bool = False) -> int:
        """Parameters the patch adds: prompts + gate, as the paper counts them; ``with_noise`` adds W_noise (if
        built: with ``noisy_gating``)."""
        return sum(p.numel() for name, p in self.named_parameters() if with_noise or name != "w_noise")

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, num_tokens={self.num_tokens}, hidden_size={self.hidden_size}, "
                f"gating={self.gating}, noisy_gating={self.noisy_gating}, k={self.k}, mode={self.mode!r}, "
                f"init={self.init!r}")
