"""One U-Net for the EDM and DDPM families, written from the specs (no code copied).

Spec: ``papers/edm.md`` 2.4 (SongUNet DDPM++ / NCSN++, DhariwalUNet), 4.3 (state-dict layout, parameter counts)
and ``papers/longtail.md`` 2.2 (the DDPM CIFAR U-Net of pytorch-ddpm, CBDM and T2H). The three families differ in
a handful of choices, collected in :class:`UNetStyle`; everything else is one implementation:

==============  ===========================  ==========================  ==========================
choice          ``song`` (DDPM++, NCSN++)    ``dhariwal`` (ADM)          ``ddpm`` (CBDM / T2H)
==============  ===========================  ==========================  ==========================
noise features  [sin, cos], endpoint=True    [cos, sin], endpoint=False  [sin, cos], endpoint=False
label enters    before the MLP, bias, ×√C    after the MLP, no bias      after the MLP, no bias
augment enters  before the MLP               before the MLP              after the MLP
resampling      residual up/down blocks      residual up/down blocks     strided conv / nearest+conv
block           additive emb, skip √½        scale-shift (FiLM), skip 1  additive emb, skip 1
attention       1 head, last decoder block   64 ch/head, every block     1 head, every block
                                             (none under 64 channels)
group norm      min(32, C/4) groups          min(32, C/4) groups         32 groups
output          ``dec.RxR_aux_norm/conv``    ``out_norm`` / ``out_conv`` ``out_norm`` / ``out_conv``
==============  ===========================  ==========================  ==========================

Parameter and buffer names and shapes are those of EDM's network pickles (the ``model.`` sub-module of the
precond), so official weights load strictly by name (:mod:`diffusion_transfer.io.edm_pickle`). Checkpoints of
pytorch-ddpm / CBDM / T2H have their own names; :mod:`diffusion_transfer.io.unet_checkpoint` maps them onto these.

Call: ``net(x [B, C_in, R, R], noise_labels [B], class_labels=None, augment_labels=None) -> [B, C_out, R, R]``.
``noise_labels`` is whatever the process feeds (EDM: c_noise = ln(σ)/4; DDPM: the timestep 0..T-1 as a float).
``class_labels`` is a float one-hot ``[B, label_dim]`` (EDM's convention) or int64 ``[B]`` with -1 = no label;
None and -1 mean a zero one-hot, which is "unconditional" for nets trained with ``label_dropout``.

Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention

__all__ = [
    "STYLES",
    "UNET_CONFIGS",
    "Conv2d",
    "DDPMUNet",
    "FourierEmbedding",
    "PositionalEmbedding",
    "SongUNet",
    "UNet",
    "UNetBlock",
    "UNetStyle",
    "build_unet",
    "one_hot_labels",
    "unet_class",
]


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------
def group_norm(channels: int, eps: float, min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with min(32, C // min_channels_per_group) groups.

    EDM's nets use 4 (at least 4 channels a group; GroupNorm(32) for C >= 128). pytorch-ddpm / CBDM / T2H use
    GroupNorm(32) at every width, which is 1 here (C >= 32; a narrower net, which their code cannot build, gets
    one channel a group). The count is not in the state dict, so a wrong rule loads silently: keep the family's.
    """
    groups = min(32, channels // min_channels_per_group)
    if groups < 1 or channels % groups:
        fix = ("use a width divisible by 32, or min_channels_per_group: 4 (EDM's rule, min(32, C/4) groups)"
               if min_channels_per_group != 4 else "use a multiple of 4 under 128 channels, of 32 above")
        raise ValueError(f"GroupNorm: {channels} channels do not split into min(32, {channels} // "
                         f"{min_channels_per_group}) = {groups} groups; {fix}")
    return nn.GroupNorm(groups, channels, eps=eps)


class Conv2d(nn.Module):
    """Convolution with optional 2x up- or down-sampling (EDM's layer).

    Keys: ``weight`` [out, in, k, k] and ``bias`` [out] (absent for ``kernel=0``, a pure resampler), and the
    persistent buffer ``resample_filter`` [1, 1, f, f] when it resamples with a filter: the outer product of the
    1-D filter with itself divided by its squared sum ([1, 1]: 2x2 box; [1, 3, 3, 1]: 4x4 binomial).

    Resampling with a filter: down = depthwise filter at stride 2, then the conv; up = depthwise transposed
    filter ×4 at stride 2 (nearest-neighbour for [1, 1]), then the conv. ``fused_resample`` (down only, NCSN++'s
    ``aux_residual``) convolves first and filters at stride 2 after. ``resample_filter=None`` resamples the DDPM
    way, without a buffer: nearest-neighbour ×2 then the conv (up), or the conv itself at stride 2 (down).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] | None = (1, 1),
                 fused_resample: bool = False) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        if fused_resample and (up or resample_filter is None or not kernel):
            raise ValueError("Conv2d: fused_resample is implemented for filtered down-sampling convs only")
        if resample_filter is None and (up or down) and not kernel:
            raise ValueError("Conv2d: DDPM-style resampling (resample_filter=None) needs a kernel")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = None
        if (up or down) and resample_filter is not None:
            f1 = torch.as_tensor(resample_filter, dtype=torch.float32)
            f = torch.outer(f1, f1)[None, None] / f1.sum().square()
        self.register_buffer("resample_filter", f)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, R, R] -> [B, out, R', R'] with R' = 2R (up), R/2 (down) or R."""
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        if self.resample_filter is None:
            if self.up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return F.conv2d(x, w, b, stride=2 if self.down else 1, padding=w_pad)
        f = self.resample_filter.to(x.dtype)
        f_pad = (f.shape[-1] - 1) // 2
        if self.fused_resample:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if b is None else x + b.view(1, -1, 1, 1)


class PositionalEmbedding(nn.Module):
    """Noise labels [B] -> [B, N] features ``[cos(x f_k), sin(x f_k)]``, f_k = (1/max_positions)^(k / K).

    K = N/2 - 1 with ``endpoint=True`` (SongUNet: the last frequency is exactly 1/max_positions), K = N/2
    otherwise (DhariwalUNet, DDPM). No parameters.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError(f"PositionalEmbedding needs an even number of channels >= 4, got {num_channels}")
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        k = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        angles = torch.outer(x.float(), (1.0 / self.max_positions) ** k)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Noise labels [B] -> [B, N] features ``[cos(2π x f), sin(2π x f)]`` with random frequencies (NCSN++).

    Key: the persistent buffer ``freqs`` [N/2] ~ N(0, scale²). It is part of a trained model: load it, never
    re-draw it.
    """

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x.float(), 2 * math.pi * self.freqs.float())
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with optional 2x resampling and self-attention; [B, in, R, R], emb [B, E] -> [B, out, R', R'].

    1. h = conv0(SiLU(norm0(x)))                     (conv0 resamples when the block does)
    2. h = SiLU(norm1(h + affine(emb)))              or FiLM: SiLU(shift + norm1(h)·(1 + scale)) (adaptive_scale)
    3. h = (conv1(dropout(h)) + skip(x)) · skip_scale (skip: 1x1 conv, or the bare resampler, when shapes change)
    4. attention: h = (proj(MHA(qkv(norm2(h)))) + h) · skip_scale, softmax scale (C/heads)^-1/2.

    The ``qkv`` output channels are grouped per head with (q, k, v) as the fastest axis, i.e. laid out
    (heads, C/heads, 3), as in EDM's checkpoints.

    Heads: ``num_heads`` if given (0 = no attention), else out_channels // channels_per_head, which is 0 (no
    attention layers at all) for a block narrower than ``channels_per_head``, as in EDM's DhariwalUNet.

    Keys: ``norm0, conv0, affine`` ([out or 2·out, E]), ``norm1, conv1``, ``skip`` (if any), and with at least
    one head ``norm2, qkv`` ([3·out, out, 1, 1]), ``proj``. GroupNorms: :func:`group_norm`.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[int] | None = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, min_channels_per_group: int = 4) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else (out_channels // channels_per_head if num_heads is None else num_heads)
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"UNetBlock: {out_channels} channels do not split into {self.num_heads} heads")
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = {"up": up, "down": down, "resample_filter": resample_filter}
        self.norm0 = group_norm(in_channels, eps, min_channels_per_group)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(out_channels, eps, min_channels_per_group)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample)
        if self.num_heads:
            self.norm2 = group_norm(out_channels, eps, min_channels_per_group)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            attn = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            # Back to contiguous NCHW before proj: with one head the reshape is a channels-last view, proj and the
            # sum would keep that layout, and the next dropout would then draw its mask in another element order
            # than EDM's (whose activations stay NCHW), so the same seed would drop other activations.
            attn = attn.transpose(1, 2).reshape(b, c, h, w).contiguous()
            x = (self.proj(attn) + x) * self.skip_scale
        return x


def one_hot_labels(labels: Tensor | None, label_dim: int, batch: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """Class labels as the float one-hot ``[B, label_dim]`` the nets take.

    Args:
        labels: None (all zeros), int ``[B]`` with -1 (any negative) = zero row, or float ``[B, label_dim]``
            (used as given, e.g. soft labels).
        label_dim: number of classes; batch: B; dtype/device: of the result.
    """
    if labels is None:
        return torch.zeros(batch, label_dim, dtype=dtype, device=device)
    if labels.is_floating_point():
        return labels.to(dtype).reshape(-1, label_dim)
    labels = labels.to(device=device, dtype=torch.int64)
    # Bounds check only on the CPU: on an accelerator it would force a device sync on every call.
    if labels.device.type == "cpu" and labels.numel() and int(labels.max()) >= label_dim:
        raise ValueError(f"label {int(labels.max())} is out of range for {label_dim} classes (-1 = no label)")
    return F.one_hot(labels.clamp(min=0), label_dim).to(dtype) * (labels >= 0).to(dtype)[:, None]


# ------------------------------------------------------------------------------------------------------------
# The U-Net
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetStyle:
    """What separates the U-Net families beyond their sizes (see the module docstring's table).

    Attributes:
        endpoint / swap_sincos: positional features with K = N/2 - 1 / fed as [sin, cos].
        label_site / augment_site: where labels / augment labels are added: ``"noise"`` (to the noise features,
            before the MLP) or ``"emb"`` (to the MLP output, before its final SiLU).
        label_bias / label_scale: ``map_label`` has a bias / sees one-hot × √label_dim.
        stem_mult: the first conv has model_channels × channel_mult[0] channels (else model_channels).
        resample: ``"block"`` (residual up/down :class:`UNetBlock`) or ``"conv"`` (DDPM's bare convs).
        resample_proj: resampling blocks skip through a 1x1 conv (else through the bare resampler).
        adaptive_scale / skip_scale / eps: block FiLM, residual scale, GroupNorm eps.
        decoder_attention: ``"last"`` (only the last block of a decoder level) or ``"all"``.
        output: ``"aux"`` (``dec.RxR_aux_norm``/``_aux_conv``) or ``"out"`` (``out_norm``/``out_conv``).
        init: ``"xavier"`` (uniform, zero biases) or ``"kaiming"`` (PyTorch's default init).
        qkv_gain / zero_gain: init gain of ``qkv`` and of the layers that start near zero (each block's
            ``conv1`` and ``proj``, the output conv; ADM also ``map_augment``).
    """

    endpoint: bool
    swap_sincos: bool
    label_site: str
    label_bias: bool
    label_scale: bool
    augment_site: str
    stem_mult: bool
    resample: str
    resample_proj: bool
    adaptive_scale: bool
    skip_scale: float
    eps: float
    decoder_attention: str
    output: str
    init: str
    qkv_gain: float
    zero_gain: float

    def __post_init__(self) -> None:
        choices = {"label_site": ("noise", "emb"), "augment_site": ("noise", "emb"), "resample": ("block", "conv"),
                   "decoder_attention": ("last", "all"), "output": ("aux", "out"), "init": ("xavier", "kaiming")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"UNetStyle.{name} must be one of {allowed}, got {getattr(self, name)!r}")


STYLES: dict[str, UNetStyle] = {
    # EDM's SongUNet (DDPM++ / NCSN++ of Song et al.). Spec 2.4.
    "song": UNetStyle(endpoint=True, swap_sincos=True, label_site="noise", label_bias=True, label_scale=True,
                      augment_site="noise", stem_mult=False, resample="block", resample_proj=True,
                      adaptive_scale=False, skip_scale=math.sqrt(0.5), eps=1e-6, decoder_attention="last",
                      output="aux", init="xavier", qkv_gain=math.sqrt(0.2), zero_gain=1e-5),
    # EDM's DhariwalUNet (ADM). Spec 2.4.
    "dhariwal": UNetStyle(endpoint=False, swap_sincos=False, label_site="emb", label_bias=False, label_scale=False,
                          augment_site="noise", stem_mult=True, resample="block", resample_proj=False,
                          adaptive_scale=True, skip_scale=1.0, eps=1e-5, decoder_attention="all",
                          output="out", init="kaiming", qkv_gain=1.0, zero_gain=0.0),
    # pytorch-ddpm's CIFAR U-Net as CBDM / T2H use it (longtail.md 2.2). Its interleaved (sin, cos) table is a
    # column permutation of [sin, cos], applied when its checkpoints are loaded. Packed qkv with gain √2 has
    # the init bound of separate Xavier q, k, v.
    "ddpm": UNetStyle(endpoint=False, swap_sincos=True, label_site="emb", label_bias=False, label_scale=False,
                      augment_site="emb", stem_mult=False, resample="conv", resample_proj=False,
                      adaptive_scale=False, skip_scale=1.0, eps=1e-5, decoder_attention="all", output="out",
                      init="xavier", qkv_gain=math.sqrt(2.0), zero_gain=1e-5),
}


class UNet(nn.Module):
    """Encoder-decoder U-Net conditioned on a noise level, a class and an augmentation; see the module docstring.

    Args (EDM's names; sizes in channels or pixels):
        img_resolution: R of the input; level l works at R / 2^l.
        in_channels / out_channels: image channels in and out.
        label_dim: number of classes (0 = unconditional). augment_dim: augment-label size (EDM CIFAR: 9).
        model_channels: base width; level l has model_channels × channel_mult[l] channels.
        channel_mult: per-level multipliers (its length is the number of levels).
        channel_mult_emb: embedding width = model_channels × channel_mult_emb.
        channel_mult_noise: noise-feature width = model_channels × channel_mult_noise.
        num_blocks: residual blocks per encoder level (the decoder has one more per level).
        attn_resolutions: resolutions whose blocks have self-attention.
        dropout: dropout inside the blocks. label_dropout: training-time probability of zeroing a sample's
            one-hot (classifier-free guidance training; EDM default 0).
        embedding_type: ``"positional"`` or ``"fourier"`` (NCSN++; ``fourier_scale`` is its frequency std).
        encoder_type: ``"standard"`` or ``"residual"`` (NCSN++: an ``aux_residual`` conv path of the input).
        decoder_type: ``"standard"`` (the only one built; EDM's ``"skip"`` decoder is refused).
        resample_filter: 1-D resampling filter ([1, 1] DDPM++/ADM, [1, 3, 3, 1] NCSN++).
        num_heads: attention heads (None: out_channels // channels_per_head, 0 below that width; 0: none).
        min_channels_per_group: GroupNorms have min(32, C // this) groups (:func:`group_norm`): 4 in EDM's nets,
            1 in :class:`DDPMUNet` (GroupNorm(32), as pytorch-ddpm / CBDM / T2H).
        style: a :data:`STYLES` name or a :class:`UNetStyle`.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, channel_mult_noise: int = 1, num_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, label_dropout: float = 0.0,
                 embedding_type: str = "positional", encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter: Sequence[int] = (1, 1),
                 num_heads: int | None = 1, channels_per_head: int = 64, fourier_scale: float = 16.0,
                 min_channels_per_group: int = 4, style: str | UNetStyle = "song") -> None:
        super().__init__()
        st = STYLES[style] if isinstance(style, str) else style
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "residual") or decoder_type != "standard":
            raise ValueError(f"only encoder_type 'standard'/'residual' and decoder_type 'standard' are built, got "
                             f"{encoder_type!r}/{decoder_type!r} (no released EDM model uses the 'skip' types)")
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} cannot be halved {len(channel_mult) - 1} times")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout, self.style = label_dim, augment_dim, label_dropout, st
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        site_ch = {"noise": noise_ch, "emb": emb_ch}
        block = dict(emb_channels=emb_ch, num_heads=num_heads, channels_per_head=channels_per_head, dropout=dropout,
                     skip_scale=st.skip_scale, eps=st.eps, resample_filter=resample_filter,
                     resample_proj=st.resample_proj, adaptive_scale=st.adaptive_scale,
                     min_channels_per_group=min_channels_per_group)

        # Mapping network (registration order follows each family's checkpoints).
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=st.endpoint) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch, scale=fourier_scale))
        label = nn.Linear(label_dim, site_ch[st.label_site], bias=st.label_bias) if label_dim else None
        if st.label_site == "noise":
            self.map_label = label
        self.map_augment = nn.Linear(augment_dim, site_ch[st.augment_site], bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(noise_ch, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)
        if st.label_site == "emb":
            self.map_label = label

        # Encoder: every entry except aux_residual pushes its output on the skip stack.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * (mult if st.stem_mult else 1)
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = self._resampler(cout, "down", block)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
                skips.append(cout)

        # Decoder: a block whose input width differs from the running x takes the next skip by concatenation.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = self._resampler(cout, "up", block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = res in attn_resolutions and (idx == num_blocks or st.decoder_attention == "all")
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
        res = img_resolution
        if st.output == "aux":
            self.dec[f"{res}x{res}_aux_norm"] = group_norm(cout, st.eps, min_channels_per_group)
            self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)
            self._head = (f"{res}x{res}_aux_norm", f"{res}x{res}_aux_conv")
        else:
            self.out_norm = group_norm(cout, st.eps, min_channels_per_group)
            self.out_conv = Conv2d(cout, out_channels, 3)
        self.reset_parameters()

    def _resampler(self, channels: int, direction: str, block: dict[str, Any]) -> nn.Module:
        """A level's 2x up/down step: a residual :class:`UNetBlock`, or DDPM's bare conv (no embedding)."""
        if self.style.resample == "block":
            return UNetBlock(channels, channels, **{direction: True}, **block)
        return Conv2d(channels, channels, 3, resample_filter=None, **{direction: True})

    def head(self) -> tuple[nn.Module, nn.Module]:
        """The output (norm, conv) pair: ``dec.RxR_aux_norm/_aux_conv`` (song) or ``out_norm/out_conv``."""
        if self.style.output == "aux":
            return self.dec[self._head[0]], self.dec[self._head[1]]
        return self.out_norm, self.out_conv

    def reset_parameters(self) -> None:
        """Initialise as the family does (see :class:`UNetStyle`); buffers such as Fourier ``freqs`` are kept."""
        st = self.style

        def init(layer: nn.Module | None, gain: float = 1.0) -> None:
            if layer is None or getattr(layer, "weight", None) is None:
                return
            w, b = layer.weight, layer.bias
            if st.init == "xavier":
                nn.init.xavier_uniform_(w, gain=gain)
                if b is not None:
                    nn.init.zeros_(b)
                return
            # PyTorch's default init equals EDM's kaiming_uniform x sqrt(1/3) (weights and biases).
            bound = gain / math.sqrt(w[0].numel())
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

        for module in self.modules():
            if isinstance(module, (Conv2d, nn.Linear)):
                init(module)
        for module in self.modules():
            if isinstance(module, UNetBlock):
                init(module.conv1, st.zero_gain)
                if module.num_heads:
                    init(module.qkv, st.qkv_gain)
                    init(module.proj, st.zero_gain)
        init(self.head()[1], st.zero_gain)
        if st.init == "kaiming":
            init(self.map_augment, st.zero_gain)
        if st in (STYLES["ddpm"], STYLES["dhariwal"]) and self.map_label is not None:
            # Both start the bias-free label map at N(0, 1): pytorch-ddpm / CBDM / T2H embed the class with
            # nn.Embedding, whose default init their initialize() leaves alone (longtail.md 2.2), and EDM's
            # DhariwalUNet uses kaiming_normal x sqrt(label_dim), i.e. std 1. Xavier / PyTorch's default would
            # start it ~16x smaller for 10 classes.
            nn.init.normal_(self.map_label.weight, 0.0, 1.0)

    def _conditioning(self, emb: Tensor, site: str, labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        if labels is not None and self.style.label_site == site:
            emb = emb + self.map_label(labels)
        if self.map_augment is not None and augment_labels is not None and self.style.augment_site == site:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return emb

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None,
              augment_labels: Tensor | None = None) -> Tensor:
        """The conditioning vector every block sees: [B] noise labels (+ labels) -> [B, emb_channels]."""
        emb = self.map_noise(noise_labels)
        if self.style.swap_sincos:
            emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        labels = None
        if self.map_label is not None:
            labels = one_hot_labels(class_labels, self.label_dim, emb.shape[0], emb.dtype, emb.device)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            if self.style.label_scale:
                labels = labels * math.sqrt(self.label_dim)
        emb = self._conditioning(emb, "noise", labels, augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        return F.silu(self._conditioning(emb, "emb", labels, augment_labels))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x [B, C_in, R, R], noise_labels [B] -> [B, C_out, R, R] (see the module docstring for the labels)."""
        emb = self.embed(noise_labels.reshape(-1).expand(x.shape[0]), class_labels, augment_labels)
        skips, aux = [], x
        for name, layer in self.enc.items():
            if name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)
        for name, layer in self.dec.items():
            if "_aux_" in name:
                continue
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
        norm, conv = self.head()
        return conv(F.silu(norm(x)))


# ------------------------------------------------------------------------------------------------------------
# Families and named configurations
# ------------------------------------------------------------------------------------------------------------
def family_kwargs(defaults: dict[str, Any], style: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A family's defaults updated by the caller's arguments, with the family's style (which cannot change)."""
    if "style" in kwargs:
        raise TypeError(f"the {style!r} family fixes its style; build a UNet(style=...) for another one")
    return {**defaults, **kwargs, "style": style}


class SongUNet(UNet):
    """EDM's SongUNet (DDPM++ and NCSN++, style ``"song"``), with EDM's argument names and class defaults.

    The defaults are the ones EDM's pickles rely on (their ``_init_kwargs`` omit them): model_channels 128,
    channel_mult (1, 2, 2, 2), channel_mult_emb 4, num_blocks 4, attn_resolutions (16,), dropout 0.10, one
    attention head. See :data:`UNET_CONFIGS` for the released CIFAR-10 / FFHQ / AFHQv2 settings.
    """

    defaults: dict[str, Any] = dict(model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                                    attn_resolutions=(16,), dropout=0.10, num_heads=1)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__(img_resolution, in_channels, out_channels, **family_kwargs(self.defaults, "song", kwargs))


class DDPMUNet(UNet):
    """The DDPM CIFAR U-Net of pytorch-ddpm as CBDM and T2H use it (style ``"ddpm"``; longtail.md 2.2).

    Defaults are the paper settings: ch 128 (``model_channels``), ch_mult (1, 2, 2, 2), attention at 16x16
    (``attn=[1]`` at 32 px; here ``attn_resolutions``), 2 residual blocks per level (3 in the decoder), dropout
    0.1, time embedding 128 -> 512 -> 512, GroupNorm(32) at every width (``min_channels_per_group=1``; 4 gives
    EDM's min(32, C/4) groups, which differ below 128 channels). The class embedding (``label_dim`` = num_class)
    is added to the time embedding and has no null row: None / -1 skips it, and ``label_dim=0`` builds none (an
    unconditional pytorch-ddpm net); ``augment_dim=9`` is CBDM's ``--augm`` vector. Init: Xavier-uniform, except
    the label map, which starts N(0, 1) like the ``nn.Embedding`` it stands for.
    """

    defaults: dict[str, Any] = dict(model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=2,
                                    attn_resolutions=(16,), dropout=0.1, num_heads=1, min_channels_per_group=1)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__(img_resolution, in_channels, out_channels, **family_kwargs(self.defaults, "ddpm", kwargs))


def unet_class(name: str) -> type[UNet]:
    """The family class by name: ``SongUNet``, ``DhariwalUNet`` (EDM's names, as in its pickles), ``DDPMUNet``."""
    from .adm_unet import DhariwalUNet  # adm_unet builds on this module, so it is imported on demand

    classes: dict[str, type[UNet]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "DDPMUNet": DDPMUNet}
    if name not in classes:
        raise ValueError(f"unknown U-Net class {name!r}; known: {', '.join(classes)}")
    return classes[name]


_SONG_CIFAR = dict(model_channels=128, channel_mult=(2, 2, 2), augment_dim=9, dropout=0.13)
_DDPMPP = dict(embedding_type="positional", encoder_type="standard", channel_mult_noise=1, resample_filter=(1, 1))
_NCSNPP = dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=(1, 3, 3, 1))

#: Named configurations: (class name, arguments). The EDM ones are its ``train.py`` settings (spec 2.4, 3.2).
UNET_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpmpp-cifar10": ("SongUNet", {**_DDPMPP, **_SONG_CIFAR}),  # 55.73 M (uncond), EDM's "vp" arch
    "ncsnpp-cifar10": ("SongUNet", {**_NCSNPP, **_SONG_CIFAR}),  # 56.40 M, EDM's "ve" arch
    "ddpmpp-ffhq64": ("SongUNet", {**_DDPMPP, "channel_mult": (1, 2, 2, 2), "augment_dim": 9, "dropout": 0.05}),
    "ddpmpp-afhqv2-64": ("SongUNet", {**_DDPMPP, "channel_mult": (1, 2, 2, 2), "augment_dim": 9, "dropout": 0.25}),
    "adm-imagenet64": ("DhariwalUNet", {"model_channels": 192, "channel_mult": (1, 2, 3, 4), "dropout": 0.10}),
    "ddpm-cifar10": ("DDPMUNet", {}),  # CBDM / T2H
}

def build_unet(name: str, img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None,
               **overrides: Any) -> UNet:
    """Build a named U-Net (:data:`UNET_CONFIGS`) with any argument overridden, e.g. for a tiny test model.

    Args:
        name: ``ddpmpp-cifar10``, ``ncsnpp-cifar10``, ``ddpmpp-ffhq64``, ``ddpmpp-afhqv2-64``,
            ``adm-imagenet64`` or ``ddpm-cifar10``.
        img_resolution / in_channels / out_channels: image size and channels (out defaults to in).
        **overrides: :class:`UNet` arguments (``label_dim``, ``model_channels``, ``channel_mult``, ...).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown U-Net {name!r}; valid names: {', '.join(UNET_CONFIGS)}")
    class_name, config = UNET_CONFIGS[name]
    kwargs = {**config, **overrides}
    return unet_class(class_name)(img_resolution, in_channels, in_channels if out_channels is None else out_channels,
                                  **kwargs)
