"""EDM's non-leaking augmentation (Karras et al. 2022; ``papers/edm.md`` 2.5), written from the spec.

Each training image is flipped and geometrically transformed at random, and the net is told how through a 9-d
augment label (``map_augment``, a bias-free Linear). The denoiser learns the augmented images as a separate,
label-marked distribution; sampling passes zero labels (= None, no bias), so augmentations do not leak into samples.

Ops (EDM's choice for CIFAR-10 (p = 0.12) and FFHQ / AFHQv2 (0.15); ImageNet none). An op with multiplier m is applied
to a sample with probability min(1, m·p); otherwise its parameters are 0, i.e. the identity with zero labels:

==============  ====  ================================================================  =========================
op              m     parameters                                                        label entries
==============  ====  ================================================================  =========================
xflip           1e8   b ~ Bernoulli(½): mirror left-right (m·p >= 1: half the images)   [0] b
yflip           1     b ~ Bernoulli(½): mirror top-bottom                               [1] b
scale           1     w ~ N(0, 1): zoom by s = 2^(0.2 w) about the centre               [2] w
rotate_frac     1     θ ~ U(-π, π): rotate by θ, anticlockwise on screen                [3] cos θ - 1, [4] sin θ
aniso           1     w ~ N(0, 1), r ~ U(-π, π): stretch by 2^(0.2 w) along the         [5] w cos r, [6] w sin r
                      direction at angle r (anticlockwise on screen), squeeze across it
translate_frac  1     w_x, w_y ~ N(0, 1): shift by (0.125 W w_x, 0.125 H w_y) pixels    [7] w_x, [8] w_y
                      (right, down)
==============  ====  ================================================================  =========================

Flips move pixels; the four geometric ops compose (scale, then rotation, then aniso, then translation) into one
affine map, applied by resampling: reflect-pad, upsample 2x with the Symlet-6 filter, bilinear sampling, filter with
it again and downsample 2x. The two filter passes compose to the identity (an orthonormal filter's autocorrelation
vanishes at even lags), so a shift by whole pixels is exact. The label layout is the spec's; signs and units (the
rotation's sense, shifts in 0.125·size, zooms as log2(s)/0.2) follow EDM's conventions as we read them, since an
official net's ``map_augment`` was trained on those (not checked against a trained net). As in EDM, (w, r) and
(-w, r + π) give the same aniso label for different stretches.

Conventions: image coordinates x (right) and y (down), centred on the image; a matrix maps output pixel positions to
the input positions they show. No Lightning, no weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUGMENT_DIM", "SYM6", "AugmentParams", "AugmentPipe", "warp"]

#: Length of the augment label (the nets' ``augment_dim`` for EDM's augmentation).
AUGMENT_DIM = 9

#: The Symlet-6 orthonormal low-pass (scaling) filter h: Σh = √2, Σ h_k h_{k+2m} = δ_m, 6 vanishing moments
#: (Daubechies, "Ten lectures on wavelets", 1992; the values PyWavelets lists as ``sym6`` ``dec_lo``).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
        0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
# Sample j of the 2x grid (the transposed convolution of a signal with SYM6 at stride 2, uncropped) sits at input
# position j/2 - HALF_OFFSET, half the filter's delay at low frequencies (its centroid Σ k h_k / Σ h_k = 5.098 taps),
# so that rotations and zooms turn about the image centre; decimating with SYM6 delays by the same amount.
HALF_OFFSET = sum(k * h for k, h in enumerate(SYM6)) / sum(SYM6) / 2


@dataclass
class AugmentParams:
    """Per-sample parameters of one draw, each [N] (``translate``: [N, 2]); zeros where an op is not applied.

    Attributes:
        xflip / yflip: 0 or 1. scale: w (zoom 2^(scale_std·w)). rotate: θ in radians. aniso: w (stretch
        2^(aniso_std·w)); aniso_angle: r in radians. translate: (w_x, w_y) in units of translate_frac_std · size.
    """

    xflip: Tensor
    yflip: Tensor
    scale: Tensor
    rotate: Tensor
    aniso: Tensor
    aniso_angle: Tensor
    translate: Tensor

    def labels(self) -> Tensor:
        """The 9-d augment labels [N, 9] float32 (layout in the module docstring)."""
        return torch.stack([self.xflip.float(), self.yflip.float(), self.scale, self.rotate.cos() - 1,
                            self.rotate.sin(), self.aniso * self.aniso_angle.cos(),
                            self.aniso * self.aniso_angle.sin(), self.translate[:, 0], self.translate[:, 1]],
                           dim=1).float()

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same parameters on ``device``."""
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _rotation(angle: Tensor) -> Tensor:
    """[N] angles -> [N, 2, 2] matrices [[cos, -sin], [sin, cos]]."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def warp(images: Tensor, inverse: Tensor, shift: Tensor) -> Tensor:
    """Resample images under an affine map: output pixel p shows the input at ``inverse @ (p - shift)``.

    Positions are in pixels, centred on the image (x right, y down). Reflect padding supplies the input outside the
    image (up to one image size on each side; beyond that, zeros), bilinear interpolation runs on a 2x Symlet-6
    upsampling, and the result is filtered and decimated back. An integer ``shift`` with ``inverse`` = I is an exact
    shift of the reflect-padded image.

    Args:
        images: [N, C, H, W] float. inverse: [N, 2, 2]. shift: [N, 2] (x, y) pixels.

    Returns:
        [N, C, H, W] in the images' dtype (computed in float32 at least).
    """
    with torch.autocast(images.device.type, enabled=False):  # a bf16 autocast would round the filtered images
        return _warp(images, inverse, shift)


def _warp(images: Tensor, inverse: Tensor, shift: Tensor) -> Tensor:
    n, c, h, w = images.shape
    dtype = torch.promote_types(images.dtype, torch.float32)
    x, inverse, shift = images.to(dtype), inverse.to(dtype), shift.to(dtype)
    taps = torch.tensor(SYM6, dtype=dtype, device=images.device)
    size = torch.tensor([w, h], dtype=dtype, device=images.device)
    centre = (size - 1) / 2
    # The 2x output grid (before filtering and decimation): 2·size + len - 2 samples per axis, sample v at output
    # position v/2 - HALF_OFFSET (centred). Where each of them reads the input, and the extremes over the batch
    # (the map is affine: at the grid's corners).
    axes = [torch.arange(2 * s + len(SYM6) - 2, dtype=dtype, device=images.device) / 2 - HALF_OFFSET - c0
            for s, c0 in zip((w, h), centre)]
    gy, gx = torch.meshgrid(axes[1], axes[0], indexing="ij")
    in_pos = torch.einsum("nij,nhwj->nhwi", inverse, torch.stack([gx, gy], -1)[None] - shift[:, None, None])
    corners = in_pos[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [N, 4, 2]
    # Pad so that each bilinear tap reads a 2x-grid sample whose whole filter support lies in the padded image:
    # sample j (input position (j - 2·HALF_OFFSET)/2) needs len - 1 <= j <= 2·padded size - 2.
    low = ((len(SYM6) - 1) / 2 - HALF_OFFSET - centre - corners.amin((0, 1))).ceil().clamp(min=0)
    high = (corners.amax((0, 1)) - centre + HALF_OFFSET).ceil().clamp(min=0)
    limit = size - 1  # reflect padding cannot exceed the image; beyond it the bilinear taps read zeros
    (lx, ly), (hx, hy) = low.minimum(limit).int().tolist(), high.minimum(limit).int().tolist()
    x = F.pad(x, [lx, hx, ly, hy], mode="reflect").reshape(n * c, 1, h + ly + hy, w + lx + hx)
    x = F.conv_transpose2d(x, taps.view(1, 1, 1, -1), stride=(1, 2))  # zero insertion + filter, along x
    x = F.conv_transpose2d(x, taps.view(1, 1, -1, 1), stride=(2, 1))  # then along y
    up = x.reshape(n, c, *x.shape[-2:])
    index = 2 * (in_pos + centre + torch.tensor([lx, ly], dtype=dtype, device=images.device)) + 2 * HALF_OFFSET
    extent = torch.tensor([up.shape[-1], up.shape[-2]], dtype=dtype, device=images.device)
    grid = 2 * index / (extent - 1) - 1
    x = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    x = x.reshape(n * c, 1, *x.shape[-2:])
    x = F.conv2d(x, taps.view(1, 1, 1, -1), stride=(1, 2))  # filter + decimate, along x
    x = F.conv2d(x, taps.view(1, 1, -1, 1), stride=(2, 1))  # then along y
    return x.reshape(n, c, h, w).to(images.dtype)


class AugmentPipe:
    """EDM's augmentation: ``images, labels = pipe(images, generator)`` (module docstring).

    Args:
        p: overall probability (EDM: 0.12 CIFAR-10, 0.15 FFHQ / AFHQv2; 0 = identity with zero labels).
        xflip / yflip / scale / rotate_frac / aniso / translate_frac: per-op multipliers m (op probability
            min(1, m·p); 0 disables the op, its label entries stay 0). EDM: 1e8, 1, 1, 1, 1, 1.
        scale_std / aniso_std: std of log2 of the zoom / stretch (0.2). rotate_frac_max: largest rotation as a
            fraction of π (1). translate_frac_std: std of the shift as a fraction of the image size (0.125).
    """

    def __init__(self, p: float, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0, scale_std: float = 0.2,
                 aniso_std: float = 0.2, rotate_frac_max: float = 1.0, translate_frac_std: float = 0.125) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"AugmentPipe: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.multipliers = {"xflip": xflip, "yflip": yflip, "scale": scale, "rotate": rotate_frac, "aniso": aniso,
                            "translate": translate_frac}
        self.scale_std, self.aniso_std = scale_std, aniso_std
        self.rotate_frac_max, self.translate_frac_std = rotate_frac_max, translate_frac_std

    def __repr__(self) -> str:
        return f"AugmentPipe(p={self.p})"

    def probability(self, op: str) -> float:
        """The probability that ``op`` (``xflip``, ``yflip``, ``scale``, ``rotate``, ``aniso``, ``translate``)
        is applied to a sample: min(1, m·p)."""
        return min(1.0, self.multipliers[op] * self.p)

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> AugmentParams:
        """Parameters for n samples. The same draws are made whatever p is (p only gates them), so a seed fixes
        them all.

        Args:
            generator: source of randomness (its device is used); None: torch's global RNG on ``device``.
        """
        if generator is not None:
            device = generator.device
        kw = {"generator": generator, "device": device}
        gate = torch.rand(n, 6, **kw)
        flips = torch.randint(0, 2, (n, 2), **kw)
        scale, aniso = torch.randn(n, **kw), torch.randn(n, **kw)
        rotate = (torch.rand(n, **kw) * 2 - 1) * (math.pi * self.rotate_frac_max)
        aniso_angle = (torch.rand(n, **kw) * 2 - 1) * math.pi
        translate = torch.randn(n, 2, **kw)
        on = {op: gate[:, i] < self.probability(op) for i, op in enumerate(self.multipliers)}
        return AugmentParams(xflip=flips[:, 0] * on["xflip"], yflip=flips[:, 1] * on["yflip"],
                             scale=scale * on["scale"], rotate=rotate * on["rotate"], aniso=aniso * on["aniso"],
                             aniso_angle=aniso_angle * on["aniso"], translate=translate * on["translate"][:, None])

    def apply(self, images: Tensor, params: AugmentParams) -> tuple[Tensor, Tensor]:
        """Augment images [N, C, H, W] with the given parameters: (augmented images, labels [N, 9] float32).

        Samples whose geometric parameters are all 0 skip the resampling (they are returned exactly).
        """
        params = params.to(images.device)
        out = torch.where(params.xflip.bool().view(-1, 1, 1, 1), images.flip(-1), images)
        out = torch.where(params.yflip.bool().view(-1, 1, 1, 1), out.flip(-2), out)
        moved = (params.scale != 0) | (params.rotate != 0) | (params.aniso != 0) | (params.translate != 0).any(1)
        if bool(moved.any()):
            with torch.autocast(images.device.type, enabled=False):  # float32 matrices under mixed precision
                out = self._move(out, params, moved.nonzero().squeeze(1))
        return out, params.labels()

    def _move(self, images: Tensor, params: AugmentParams, idx: Tensor) -> Tensor:
        """The geometric ops applied to the samples ``idx`` of images [N, C, H, W]; the others are unchanged."""
        p = AugmentParams(**{f.name: getattr(params, f.name)[idx].float() for f in fields(params)})
        # Output -> input: undo the translation, then aniso, the rotation and the zoom (applied in that order).
        zoom = (2 ** (-self.scale_std * p.scale))[:, None, None] * torch.eye(2, device=images.device)
        stretch = torch.diag_embed(torch.stack([2 ** (-self.aniso_std * p.aniso), 2 ** (self.aniso_std * p.aniso)], -1))
        r = _rotation(p.aniso_angle)
        inverse = zoom @ _rotation(p.rotate) @ r.transpose(1, 2) @ stretch @ r
        size = torch.tensor([images.shape[-1], images.shape[-2]], dtype=torch.float32, device=images.device)
        return images.index_copy(0, idx, warp(images[idx], inverse, p.translate * size * self.translate_frac_std))

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw and apply: (augmented images [N, C, H, W], labels [N, 9] float32 on the images' device)."""
        return self.apply(images, self.draw(images.shape[0], generator, images.device))
