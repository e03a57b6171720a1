"""DiT: the class-conditional diffusion transformer of Peebles & Xie (ICCV 2023), written from the spec.

Spec: ``papers/dit.md`` (2.1-2.3 forward pass and initialisation, 3.1 configs, 4.1 checkpoint layout).
Parameter names and shapes equal those of the official checkpoints (``DiT-XL-2-256x256.pt`` loads strictly
through :func:`diffusion_transfer.io.dit_checkpoint.load_dit_checkpoint`); the code itself is our own.

Shapes used throughout: B batch, C latent channels, I latent side, p patch size, G = I / p tokens per side,
T = G * G patch tokens, D hidden size.

Extension points used by the transfer methods, so that none of them copies this file:

* **DMP** (prompt patching): ``forward(..., block_hook=fn)`` calls ``fn(index, h, c)`` before every block; it
  may add to the tokens or prepend extra ones (the head keeps only the last T tokens). The pieces of the
  forward pass (:meth:`DiT.embed_patches`, :meth:`DiT.embed_condition`, :meth:`DiT.forward_blocks`,
  :meth:`DiT.head`) are public for methods that need their own loop.
* **FineDiffusion** (tiered label table, affine LayerNorms): ``model.y_embedder`` can be replaced by any
  module with the call signature ``(labels [B], force_drop_ids=None) -> [B, D]``; ``norm_affine=True`` builds
  the LayerNorms with weights and biases (keys ``blocks.{i}.norm1/norm2.*`` and ``final_layer.norm_final.*``).
* **DiffFit** (branch scales): ``branch_scales=k`` gives blocks 0..k-1 learnable vectors ``gamma_msa`` and
  ``gamma_mlp`` (shape [D], init 1) that scale the attention and MLP branch outputs; k = 0 (default) keeps the
  official key table. ``attention_scales=True`` adds, in the same blocks, ``attn.gamma_qkv`` [3D] on the qkv
  output and ``attn.gamma_proj`` [D] on the attention output (Diff-Tuning's DiffFit: 4 vectors a block).
  Parameter selection for fine-tuning lives in ``nets/peft.py``.
* **Diff-Tuning / CFG** (null labels per sample): a label of ``-1`` means "null" and maps to the null index
  ``num_classes``; ``force_drop_ids`` (a [B] bool or 0/1 mask) drops exactly the marked samples.

Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attention

__all__ = [
    "DiT_CONFIGS",
    "Attention",
    "BlockHook",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "build_dit",
    "modulate",
    "patchify",
    "sincos_pos_embed_2d",
    "timestep_features",
    "unpatchify",
]

#: ``block_hook(index, h, c) -> h``: called before block ``index`` with tokens h [B, T', D] (T' >= T) and the
#: conditioning vector c [B, D]; returns the tokens the block will see.
BlockHook = Callable[[int, Tensor, Tensor], Tensor]

# Timestep features are 256-dimensional in every released DiT (spec 2.2 step 3: 128 frequencies, cos, sin).
TIMESTEP_FEATURES = 256
# All LayerNorms of DiT use eps 1e-6 (spec 2.2 step 6 and pitfall 1).
LN_EPS = 1e-6


# ------------------------------------------------------------------------------------------------------------
# Fixed embeddings and token layout
# ------------------------------------------------------------------------------------------------------------
def timestep_features(t: Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of raw (not normalised) timesteps, laid out ``[cos(t f), sin(t f)]`` (as GLIDE).

    Args:
        t: [B] integer or float timesteps (DiT sees the original 0..999, never normalised ones).
        dim: feature size, even; frequencies f_k = exp(-ln(max_period) * k / (dim / 2)), k = 0 .. dim/2 - 1.
        max_period: the base of the geometric frequency ladder.

    Returns:
        [B, dim] float32 features.
    """
    if dim % 2:
        raise ValueError(f"timestep feature size must be even, got {dim}")
    half = dim // 2
    # float32 throughout, like the reference implementation, so features agree bit-for-bit in the usual case.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[n] positions -> [n, dim]: [sin(pos w_k), then cos(pos w_k)] for k < dim/2, w_k = 1e4^(-2k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> Tensor:
    """MAE-style fixed 2-D sin-cos table for a ``grid_size`` x ``grid_size`` token grid in row-major order.

    Token ``row * grid_size + col`` gets ``[sincos(col), sincos(row)]``: the first D/2 channels encode the
    column (w) coordinate and the last D/2 the row (h), as in the official checkpoint (spec 2.2 step 2).

    Args:
        hidden_size: D, divisible by 4.
        grid_size: G tokens per side.

    Returns:
        [G*G, D] float32 table (computed in float64 on the CPU, then rounded, like the reference).
    """
    if hidden_size % 4:
        raise ValueError(
            f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {hidden_size}"
        )
    # Explicit CPU device: this must also work while a ``torch.device('meta')`` context is active.
    pos = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    half = hidden_size // 2
    per_coord = _sincos_1d(half, pos)  # [G, D/2], the same table serves rows and columns
    cols = per_coord[None, :, :].expand(grid_size, grid_size, half)  # [row, col, D/2] varies with col
    rows = per_coord[:, None, :].expand(grid_size, grid_size, half)  # varies with row
    return torch.cat([cols, rows], dim=-1).reshape(grid_size * grid_size, hidden_size).float()


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """Token outputs back to an image: [B, T, p*p*C] -> [B, C, G*p, G*p].

    Inside one token's vector the layout is (patch-row, patch-col, channel), channel fastest (spec 2.2/7).
    """
    b, num_tokens, width = tokens.shape
    g = math.isqrt(num_tokens)
    if g * g != num_tokens or width != patch_size * patch_size * channels:
        raise ValueError(
            f"cannot unpatchify tokens of shape {tuple(tokens.shape)} with patch_size={patch_size}, "
            f"channels={channels}: need a square token count and width p*p*C={patch_size**2 * channels}"
        )
    x = tokens.reshape(b, g, g, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, G(row), p, G(col), p]
    return x.reshape(b, channels, g * patch_size, g * patch_size)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Inverse of :func:`unpatchify`: [B, C, H, W] -> [B, T, p*p*C] with the same within-token layout."""
    b, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image side {h}x{w} is not divisible by patch_size={patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``: x [B, T, D], shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------------------------------
# Embedders
# ------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a p x p, stride-p Conv2d, then flatten to tokens.

    [B, C, I, I] -> [B, T, D] with T = (I/p)^2 in row-major order. Key: ``proj.{weight,bias}``.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, I, I] -> [B, T, D]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Raw timesteps -> [B, D]: 256-dim [cos, sin] features, then Linear(256, D), SiLU, Linear(D, D).

    Keys: ``mlp.0.*`` and ``mlp.2.*`` (index 1 is the SiLU).
    """

    def __init__(self, hidden_size: int, feature_size: int = TIMESTEP_FEATURES) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.mlp = nn.Sequential(
            nn.Linear(feature_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:
        """t [B] int or float timesteps -> [B, D]."""
        feats = timestep_features(t, self.feature_size)
        # Cast to the weights' dtype so a model converted with .to(bfloat16) still runs outside autocast.
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D] through ``embedding_table``, with class dropout to a null index (CFG training).

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0`` (the last row, index ``num_classes``, is
    the null label) and ``num_classes`` rows otherwise, exactly as the official checkpoints (spec 2.2 step 4,
    pitfall 6).

    Label conventions:
      * ``0 .. num_classes-1``: a class; ``num_classes``: null (unconditional); any negative label (use
        ``-1``): null as well, so callers need not know the table size.
      * ``force_drop_ids`` ([B], bool or 0/1): when given, exactly those samples become null and no random
        dropout is applied in that call (deterministic, as the reference implementation). Without it, in
        training mode each label independently becomes null with probability ``dropout_prob``.

    A replacement (e.g. FineDiffusion's tiered table) needs only the same call signature; ``null_index`` is
    optional (it tells guidance code which label is null).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def null_index(self) -> int | None:
        """The null label (``num_classes``), or None when the table was built without a null row."""
        return self.num_classes if self.dropout_prob > 0 else None

    def _require_null(self, why: str) -> int:
        if self.null_index is None:
            raise ValueError(
                f"{why}, but this label embedder was built with class_dropout_prob=0 and has no null row "
                f"(table of {self.num_classes} rows). Build the model with class_dropout_prob > 0 (DiT: 0.1)."
            )
        return self.null_index

    def drop_labels(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Labels after null mapping and dropout: [B] -> [B] int64 indices into ``embedding_table``."""
        labels = labels.long()
        # Bounds check only on the CPU: on an accelerator it would force a device sync on every call.
        if labels.device.type == "cpu" and labels.numel():
            top = self.embedding_table.num_embeddings - 1
            if int(labels.max()) > top:
                raise ValueError(
                    f"label {int(labels.max())} is out of range: valid are 0..{top} and -1 (null)"
                )
        negative = labels < 0
        if labels.device.type == "cpu" and bool(negative.any()):
            self._require_null("a label of -1 (null) was given")
        if force_drop_ids is not None:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(
                    f"force_drop_ids must have the labels' shape {tuple(labels.shape)}, got "
                    f"{tuple(force_drop_ids.shape)}"
                )
            drop = force_drop_ids.to(device=labels.device).bool() | negative
            return torch.where(drop, self._require_null("force_drop_ids was given"), labels)
        if self.training and self.dropout_prob > 0:
            drop = (torch.rand(labels.shape, device=labels.device) < self.dropout_prob) | negative
            return torch.where(drop, self.num_classes, labels)
        if self.null_index is None:
            return labels
        return torch.where(negative, self.null_index, labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """labels [B] int -> [B, D] (see the class docstring for null labels and dropout)."""
        return self.embedding_table(self.drop_labels(labels, force_drop_ids))


# ------------------------------------------------------------------------------------------------------------
# Transformer pieces
# ------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention: one packed ``qkv`` Linear ([q; k; v] along dim 0), SDPA, output ``proj``.

    Uses :func:`~diffusion_transfer.nets.attention.attention` (SDPA, or its explicit form for short bf16
    sequences on a CPU) with SDPA's default scale (D/heads)^-1/2.
    With ``scales`` (DiffFit in Diff-Tuning), learnable vectors (init 1) multiply the outputs of the two Linears,
    biases included: ``gamma_qkv`` [3D] the packed [q; k; v], ``gamma_proj`` [D] the output.
    [B, N, D] -> [B, N, D].
    """

    def __init__(self, hidden_size: int, num_heads: int, scales: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.gamma_qkv = nn.Parameter(torch.ones(3 * hidden_size)) if scales else None
        self.gamma_proj = nn.Parameter(torch.ones(hidden_size)) if scales else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x) if self.gamma_qkv is None else self.qkv(x) * self.gamma_qkv
        # [B, N, 3D] -> [3, B, heads, N, head_dim]; heads are contiguous inside each of q, k, v.
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.proj(attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d))
        return out if self.gamma_proj is None else out * self.gamma_proj


class Mlp(nn.Module):
    """Feed-forward ``fc1`` (D -> ratio*D), tanh-GELU, ``fc2`` (ratio*D -> D): [B, N, D] -> [B, N, D]."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (spec 2.2 step 6).

    ``adaLN_modulation`` = SiLU, Linear(D, 6D); its chunks, in order, are shift/scale/gate for attention,
    then shift/scale/gate for the MLP:
      x <- x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
      x <- x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    LayerNorms have no affine parameters (eps 1e-6) unless ``norm_affine`` (FineDiffusion) is set. With
    ``branch_scale`` (DiffFit) each branch output is also multiplied by its own learnable [D] vector γ (init 1):
    ``x + gate * γ ⊙ branch``; γ and the gate both scale channels, so their order does not matter.
    ``attention_scales`` (with ``branch_scale``) also scales the attention's qkv and output (:class:`Attention`).
    Works on any token count, so prepended extra tokens pass through. x [B, N, D], c [B, D] -> [B, N, D].
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_affine: bool = False,
        branch_scale: bool = False, attention_scales: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS, elementwise_affine=norm_affine)
        self.attn = Attention(hidden_size, num_heads, scales=branch_scale and attention_scales)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS, elementwise_affine=norm_affine)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        # DiffFit's γ; absent (None) by default so the official key table is unchanged.
        self.gamma_msa = nn.Parameter(torch.ones(hidden_size)) if branch_scale else None
        self.gamma_mlp = nn.Parameter(torch.ones(hidden_size)) if branch_scale else None

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, N, D], c [B, D] -> [B, N, D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        if self.gamma_msa is not None:
            gate_msa, gate_mlp = gate_msa * self.gamma_msa, gate_mlp * self.gamma_mlp
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Output head: LN (no affine), modulate with (shift, scale) from ``adaLN_modulation``, then ``linear``.

    x [B, T, D], c [B, D] -> [B, T, p*p*C_out].
    """

    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, norm_affine: bool = False
    ) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=LN_EPS, elementwise_affine=norm_affine)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, T, D], c [B, D] -> [B, T, p*p*C_out]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # shift first (spec 2.2 step 7)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Class-conditional diffusion transformer (``papers/dit.md``), state-dict compatible with official DiT.

    forward(x [B, C, I, I], t [B], y [B]) -> [B, C_out, I, I] with C_out = 2C when ``learn_sigma`` (channels
    0..C-1 are the predicted noise, C..2C-1 the unsquashed variance interpolation v) and C otherwise.

    Args:
        input_size: latent side I (32 for 256 px, 64 for 512 px); must be divisible by ``patch_size``.
        patch_size: p.
        in_channels: C (4 for SD-VAE latents).
        hidden_size: D, divisible by 4 and by ``num_heads``.
        depth: number of :class:`DiTBlock`.
        num_heads: attention heads.
        mlp_ratio: MLP width over D.
        class_dropout_prob: label dropout in training; > 0 also creates the null row ``num_classes``.
        num_classes: number of real classes (1000 for ImageNet).
        learn_sigma: output 2C channels (noise + variance) instead of C.
        norm_affine: give the LayerNorms weights and biases (FineDiffusion); the official DiT has none.
        branch_scales: DiffFit γ vectors in the first ``branch_scales`` blocks (0 = none, the official layout).
        attention_scales: those blocks also get γ on the attention's qkv [3D] and output [D] (Diff-Tuning's DiffFit).
        output_conv: add a 3x3 convolution after unpatchify, as a residual ``x + conv(x)`` that starts at zero
            (key ``output_conv.*``; off in the official layout). The final Linear decodes each patch on its own;
            the convolution lets neighbouring patches agree across their borders, which U-ViT (Bao et al. 2023)
            found to improve samples. It matters for small pixel models, where a stroke is 1 pixel wide.

    Attributes:
        gradient_checkpointing: recompute blocks in the backward pass to save activation memory.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        norm_affine: bool = False,
        branch_scales: int = 0,
        attention_scales: bool = False,
        output_conv: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        # Plain types only, so the config can be stored in checkpoints that load with weights_only=True.
        self.config: dict[str, Any] = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            norm_affine=norm_affine,
            branch_scales=branch_scales,
            attention_scales=attention_scales,
            output_conv=output_conv,
        )
        if branch_scales < 0:
            raise ValueError(f"branch_scales must be >= 0 (blocks with DiffFit γ), got {branch_scales}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder: nn.Module = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A Parameter (not a buffer) because the official state dict stores it; frozen: it is a fixed table.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, norm_affine=norm_affine, branch_scale=i < branch_scales,
                     attention_scales=attention_scales)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine=norm_affine)
        self.output_conv = (nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if output_conv else None)
        self.initialize_weights()

    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Re-initialise every parameter as the spec (2.3) says.

        Xavier-uniform Linear weights with zero biases; the patch conv as a Linear on its [D, C*p*p] view;
        label table and both timestep-MLP weights N(0, 0.02^2); zero weight and bias for every block's adaLN
        Linear, the final adaLN and ``final_layer.linear`` (adaLN-Zero: blocks start as the identity and the
        output is 0); ``pos_embed`` from the fixed sin-cos table. Affine LayerNorms (``norm_affine``) start at
        weight 1, bias 0, and DiffFit's γ at 1, so both leave the function of a loaded DiT unchanged.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid_size)[None])

        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)

        table = getattr(self.y_embedder, "embedding_table", None)
        if isinstance(table, nn.Embedding):
            nn.init.normal_(table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            for gamma in (block.gamma_msa, block.gamma_mlp, block.attn.gamma_qkv, block.attn.gamma_proj):
                if gamma is not None:
                    nn.init.ones_(gamma)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.output_conv is not None:  # a residual that starts at zero: the net starts as without it
            nn.init.zeros_(self.output_conv.weight)
            nn.init.zeros_(self.output_conv.bias)

    # --------------------------------------------------------------------------------------------------------
    @property
    def null_label(self) -> int | None:
        """Index of the null (unconditional) label for CFG, or None if the label embedder has none."""
        return getattr(self.y_embedder, "null_index", None)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Latents to position-embedded tokens: [B, C, I, I] -> [B, T, D]."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT built for inputs [B, {expected[0]}, {expected[1]}, {expected[2]}], got "
                f"{tuple(x.shape)}; pos_embed is a fixed table, so build the model with the matching "
                "input_size/in_channels"
            )
        return self.x_embedder(x) + self.pos_embed

    def embed_condition(self, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Conditioning vector c = t_embedder(t) + y_embedder(y): t [B] (or a scalar), y [B] -> [B, D]."""
        if t.ndim == 0:
            t = t.expand(y.shape[0])
        return self.t_embedder(t) + self.y_embedder(y, force_drop_ids=force_drop_ids)

    def forward_blocks(self, h: Tensor, c: Tensor, block_hook: BlockHook | None = None) -> Tensor:
        """Run the transformer blocks: h [B, N, D], c [B, D] -> [B, N', D].

        ``block_hook(index, h, c)`` runs before each block and may change the tokens, even their count.
        """
        for index, block in enumerate(self.blocks):
            if block_hook is not None:
                h = block_hook(index, h, c)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return h

    def head(self, h: Tensor, c: Tensor) -> Tensor:
        """Final layer and unpatchify: h [B, N, D] (N >= T) -> [B, C_out, I, I].

        Only the last T tokens are decoded, so tokens a hook prepended (DMP ``prepend``, VPT) are dropped.
        """
        tokens = self.final_layer(h[:, h.shape[1] - self.num_patches :], c)
        out = unpatchify(tokens, self.patch_size, self.out_channels)
        return out if self.output_conv is None else out + self.output_conv(out)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        force_drop_ids: Tensor | None = None,
        block_hook: BlockHook | None = None,
    ) -> Tensor:
        """Predict noise (and variance) for noisy latents.

        Args:
            x: [B, C, I, I] noisy latents.
            t: [B] timesteps, raw 0..T-1 (int or float), or a 0-dim tensor shared by the batch.
            y: [B] int labels; ``num_classes`` or -1 = null label.
            force_drop_ids: optional [B] bool/0-1 mask of samples whose label becomes null (no random
                dropout in that call).
            block_hook: optional ``fn(index, h, c) -> h`` applied before each block (prompt patching).

        Returns:
            [B, C_out, I, I]; C_out = 2C with ``learn_sigma``.
        """
        c = self.embed_condition(t, y, force_drop_ids)
        h = self.forward_blocks(self.embed_patches(x), c, block_hook)
        return self.head(h, c)


# ------------------------------------------------------------------------------------------------------------
# Named configurations (spec 3.1)
# ------------------------------------------------------------------------------------------------------------
_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

#: ``"DiT-XL/2"`` -> architecture kwargs (depth, hidden_size, num_heads, patch_size), 12 published configs.
DiT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(**arch, patch_size=p) for size, arch in _SIZES.items() for p in (2, 4, 8)
}


def build_dit(name: str, **overrides: Any) -> DiT:
    """Build a named DiT (``"DiT-S/2"`` ... ``"DiT-XL/8"``; ``"DiT-XL-2"`` is accepted too).

    Defaults are those of the released models: ``input_size=32`` (256 px), ``in_channels=4``,
    ``num_classes=1000``, ``learn_sigma=True``, ``class_dropout_prob=0.1``. Any :class:`DiT` argument can be
    overridden, including the architecture ones (e.g. ``depth=2`` for a tiny test model).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    key = name
    if key not in DiT_CONFIGS and key.count("-") == 2:  # file-name spelling "DiT-XL-2"
        head, _, patch = key.rpartition("-")
        key = f"{head}/{patch}"
    if key not in DiT_CONFIGS:
        raise ValueError(f"unknown DiT model {name!r}; valid names: {', '.join(DiT_CONFIGS)}")
    kwargs: dict[str, Any] = dict(DiT_CONFIGS[key])
    kwargs.update(overrides)
    return DiT(**kwargs)
