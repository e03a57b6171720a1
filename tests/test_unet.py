"""U-Nets: EDM's key/shape tables and parameter counts, embedding maths, resampling, and pytorch-ddpm checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_transfer.io.unet_checkpoint import UNetCheckpointError, load_unet_checkpoint
from diffusion_transfer.nets import DDPMUNet, DhariwalUNet, SongUNet, build_unet
from diffusion_transfer.nets.unet import Conv2d, PositionalEmbedding, UNetBlock

TINY = {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (8,), "dropout": 0.0,
        "min_channels_per_group": 4}  # EDM's GroupNorm rule: DDPM's GroupNorm(32) cannot split 48 channels


def perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Random weights everywhere (zero-initialised output layers would hide label effects)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------------------ EDM layouts


def spec_songunet_table(label_dim: int, ncsnpp: bool) -> dict[str, tuple[int, ...]]:
    """The CIFAR-10 DDPM++ / NCSN++ state-dict table of papers/edm.md 2.4 and 4.3, written out from the spec."""
    table: dict[str, tuple[int, ...]] = {}
    noise, emb, width, taps = (256 if ncsnpp else 128), 512, 256, (4 if ncsnpp else 2)

    def add(name: str, out: int, inp: int | None = None, kernel: int | None = None, bias: bool = True,
            resample: bool = False) -> None:
        shape = (out,) if inp is None else (out, inp) if kernel is None else (out, inp, kernel, kernel)
        table[f"{name}.weight"] = shape
        if bias:
            table[f"{name}.bias"] = (out,)
        if resample:
            table[f"{name}.resample_filter"] = (1, 1, taps, taps)

    def block(name: str, cin: int, cout: int, attention: bool = False, resample: bool = False) -> None:
        add(f"{name}.norm0", cin)
        add(f"{name}.conv0", cout, cin, 3, resample=resample)
        add(f"{name}.affine", cout, emb)
        add(f"{name}.norm1", cout)
        add(f"{name}.conv1", cout, cout, 3)
        if cin != cout or resample:  # a 1x1 skip when the channel count or the resolution changes
            add(f"{name}.skip", cout, cin, 1, resample=resample)
        if attention:
            add(f"{name}.norm2", cout)
            add(f"{name}.qkv", 3 * cout, cout, 1)
            add(f"{name}.proj", cout, cout, 1)

    if ncsnpp:
        table["map_noise.freqs"] = (noise // 2,)
    if label_dim:
        add("map_label", noise, label_dim)
    add("map_augment", noise, 9, bias=False)
    add("map_layer0", emb, noise)
    add("map_layer1", emb, emb)
    # Encoder: every entry's output goes on the skip stack (the first conv has 128 channels, all else 256).
    add("enc.32x32_conv", 128, 3, 3)
    skips = [128]
    for res in (32, 16, 8):
        if res != 32:
            block(f"enc.{res}x{res}_down", width, width, resample=True)
            skips.append(width)
            if ncsnpp:
                add(f"enc.{res}x{res}_aux_residual", width, 3 if res == 16 else width, 3, resample=True)
        for i in range(4):
            block(f"enc.{res}x{res}_block{i}", 128 if (res, i) == (32, 0) else width, width, attention=res == 16)
            skips.append(width)
    # Decoder: 5 blocks per level, each concatenating the next popped skip; attention at 16x16 only in block4.
    block("dec.8x8_in0", width, width, attention=True)
    block("dec.8x8_in1", width, width)
    for res in (8, 16, 32):
        if res != 8:
            block(f"dec.{res}x{res}_up", width, width, resample=True)
        for i in range(5):
            block(f"dec.{res}x{res}_block{i}", width + skips.pop(), width, attention=res == 16 and i == 4)
    add("dec.32x32_aux_norm", width)
    add("dec.32x32_aux_conv", 3, width, 3)
    assert not skips
    return table


@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("arch", ["ddpmpp-cifar10", "ncsnpp-cifar10"])
def test_cifar_songunet_reproduces_the_spec_key_table(arch: str, label_dim: int) -> None:
    with torch.device("meta"):
        net = build_unet(arch, img_resolution=32, label_dim=label_dim)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = spec_songunet_table(label_dim, ncsnpp=arch.startswith("ncsnpp"))
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert "out_conv.weight" not in got and got["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)


@pytest.mark.parametrize(("arch", "kwargs", "count"), [
    ("ddpmpp-cifar10", {}, 55_733_891),
    ("ddpmpp-cifar10", {"label_dim": 10}, 55_735_299),
    ("ncsnpp-cifar10", {}, 56_397_827),
    ("adm-imagenet64", {"img_resolution": 64, "label_dim": 1000}, 295_899_267),
])
def test_parameter_counts_match_the_spec(arch: str, kwargs: dict, count: int) -> None:
    with torch.device("meta"):
        net = build_unet(arch, **{"img_resolution": 32, **kwargs})
    assert sum(p.numel() for p in net.parameters()) == count


def test_adm_layout_names_and_widths() -> None:
    with torch.device("meta"):
        net = build_unet("adm-imagenet64", img_resolution=64, label_dim=1000)
    sd = net.state_dict()
    assert isinstance(net, DhariwalUNet) and "out_conv.weight" in sd and not any("aux" in k for k in sd)
    assert sd["map_label.weight"].shape == (768, 1000) and "map_label.bias" not in sd  # bias-free label Linear
    assert sd["enc.64x64_block0.affine.weight"].shape == (2 * 192, 768)  # FiLM: scale and shift
    assert [k for k in sd if k.startswith("enc.") and k.endswith("block0.norm0.weight")] == [
        f"enc.{r}x{r}_block0.norm0.weight" for r in (64, 32, 16, 8)]
    assert sum(k.startswith("dec.8x8_block") and k.endswith("conv0.weight") for k in sd) == 4
    assert "enc.32x32_down.skip.resample_filter" in sd and "enc.32x32_down.skip.weight" not in sd
    assert net.enc["8x8_block0"].num_heads == 768 // 64


@pytest.mark.parametrize(("width", "num_heads", "heads"), [
    (32, None, 0), (60, None, 0), (64, None, 1), (128, None, 2), (192, None, 3), (256, 0, 0), (32, 1, 1),
    (256, 2, 2)])
def test_attention_heads_follow_edms_rule(width: int, num_heads: int | None, heads: int) -> None:
    # EDM: num_heads if given (0 = none; SongUNet passes 1), else out_channels // channels_per_head, 0 under 64.
    block = UNetBlock(width, width, emb_channels=8, attention=True, num_heads=num_heads, channels_per_head=64)
    assert block.num_heads == heads
    assert any(k.startswith("qkv.") for k in block.state_dict()) == (heads > 0)
    x = torch.randn(1, width, 4, 4)
    assert block(x, torch.randn(1, 8)).shape == x.shape


def test_narrow_adm_has_no_attention_and_loads_that_layout_strictly() -> None:
    # 32 channels at 8 px (attention asked, 0 heads) and 64 at 4 px (1 head): EDM builds norm2/qkv/proj only there.
    net = DhariwalUNet(8, 3, 3, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8, 4))
    sd = net.state_dict()
    attention = {k.rsplit(".", 2)[0] for k in sd if ".qkv." in k}
    assert attention == {"enc.4x4_block0", "dec.4x4_in0", "dec.4x4_block0", "dec.4x4_block1"}
    assert all(sd[f"{name}.qkv.weight"].shape == (192, 64, 1, 1) for name in attention)
    assert not any(k.startswith(("enc.8x8_", "dec.8x8_")) and (".qkv." in k or ".norm2." in k) for k in sd)
    # A state dict of that layout (random values, shapes from the table above) loads strictly; the old layout,
    # with one head forced on the 32-channel blocks, does not.
    generator = torch.Generator().manual_seed(0)
    copy = DhariwalUNet(8, 3, 3, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8, 4))
    copy.load_state_dict({k: torch.randn(v.shape, generator=generator) for k, v in sd.items()}, strict=True)
    old = {**sd, "enc.8x8_block0.qkv.weight": torch.zeros(96, 32, 1, 1), "enc.8x8_block0.qkv.bias": torch.zeros(96)}
    with pytest.raises(RuntimeError, match="Unexpected key.*enc.8x8_block0.qkv.weight"):
        copy.load_state_dict(old, strict=True)
    assert all(b.num_heads == 0 for b in DhariwalUNet(8, 3, 3, model_channels=64, channel_mult=(1,), num_blocks=1,
                                                       attn_resolutions=(8,), num_heads=0).modules()
               if isinstance(b, UNetBlock))


def test_own_state_dict_loads_strictly_and_unknown_names_are_refused() -> None:
    net = build_unet("ncsnpp-cifar10", img_resolution=16, label_dim=3, **TINY)
    copy = build_unet("ncsnpp-cifar10", img_resolution=16, label_dim=3, **TINY)
    copy.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(copy.map_noise.freqs, net.map_noise.freqs)  # the Fourier buffer is state, not re-drawn
    with pytest.raises(ValueError, match="valid names: ddpmpp-cifar10"):
        build_unet("ddpmpp")
    with pytest.raises(TypeError, match="fixes its style"):
        SongUNet(16, 3, 3, style="ddpm")


def test_overrides_shrink_a_unet_and_set_attention_heads() -> None:
    net = build_unet("ddpmpp-cifar10", img_resolution=16, model_channels=32, num_blocks=2, num_heads=2)
    assert net.enc["8x8_block0"].num_heads == 0 and net.enc["16x16_block1"].qkv.weight.shape[0] == 3 * 64
    assert net.enc["16x16_block1"].num_heads == net.dec["4x4_in0"].num_heads == 2
    with pytest.raises(TypeError):
        build_unet("ddpmpp-cifar10", hidden_size=32)  # DiT's words are not U-Net arguments


# ------------------------------------------------------------------------------------------------ layers


def test_resampling_filters() -> None:
    x = torch.randn(2, 3, 8, 8)
    box, binomial = Conv2d(3, 3, 0, down=True), Conv2d(3, 3, 0, down=True, resample_filter=(1, 3, 3, 1))
    assert torch.equal(box.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    f = torch.tensor([1.0, 3, 3, 1])
    assert torch.allclose(binomial.resample_filter[0, 0], torch.outer(f, f) / 64)
    assert torch.allclose(box(x), F.avg_pool2d(x, 2), atol=1e-6)  # [1, 1] down = 2x2 box average
    up = Conv2d(3, 3, 0, up=True)(x)
    assert torch.allclose(up, x.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)  # nearest
    assert binomial(x).shape == (2, 3, 4, 4) and Conv2d(3, 3, 0, up=True, resample_filter=(1, 3, 3, 1))(x).shape \
        == (2, 3, 16, 16)
    fused = Conv2d(3, 5, 3, down=True, resample_filter=(1, 3, 3, 1), fused_resample=True)
    assert fused(x).shape == (2, 5, 4, 4)
    # DDPM resampling: the conv itself at stride 2, or nearest-neighbour then the conv; no buffer.
    strided = Conv2d(3, 3, 3, down=True, resample_filter=None)
    assert "resample_filter" not in strided.state_dict()
    assert torch.allclose(strided(x), F.conv2d(x, strided.weight, strided.bias, stride=2, padding=1))


def test_positional_embedding_formula() -> None:
    x = torch.tensor([0.7, -2.0])
    freqs_endpoint = torch.tensor([1e-4 ** (k / 3) for k in range(4)])  # k / (C/2 - 1): the last is 1e-4
    expected = torch.cat([torch.cos(x[:, None] * freqs_endpoint), torch.sin(x[:, None] * freqs_endpoint)], 1)
    assert torch.allclose(PositionalEmbedding(8, endpoint=True)(x), expected, atol=1e-6)
    freqs = torch.tensor([1e-4 ** (k / 4) for k in range(4)])
    assert torch.allclose(PositionalEmbedding(8)(x)[:, 4:], torch.sin(x[:, None] * freqs), atol=1e-6)


@pytest.mark.parametrize("family", ["song", "dhariwal", "ddpm"])
def test_embedding_order_label_site_and_label_scale(family: str) -> None:
    """With identity MLP layers the conditioning vector is readable: check feature order, endpoint and labels."""
    cls = {"song": SongUNet, "dhariwal": DhariwalUNet, "ddpm": DDPMUNet}[family]
    net = cls(8, 3, 3, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), channel_mult_emb=1,
              label_dim=4, num_heads=1)
    with torch.no_grad():
        for layer in (net.map_layer0, net.map_layer1):
            layer.weight.copy_(torch.eye(8))
            layer.bias.zero_()
        net.map_label.weight.copy_(torch.eye(8, 4))
        if net.map_label.bias is not None:
            net.map_label.bias.zero_()
    sigma = torch.tensor([0.3])
    k = torch.arange(4.0)
    freqs = 1e-4 ** (k / (3 if family == "song" else 4))
    sin, cos = torch.sin(sigma * freqs), torch.cos(sigma * freqs)
    feats = torch.cat([cos, sin]) if family == "dhariwal" else torch.cat([sin, cos])
    onehot = torch.eye(8)[2]
    if family == "song":  # label x √label_dim added to the noise features, before the MLP
        expected = F.silu(F.silu(feats + 2.0 * onehot))
    else:  # label added to the MLP output, unscaled
        expected = F.silu(F.silu(feats) + onehot)
    assert torch.allclose(net.embed(sigma, torch.tensor([2]))[0], expected, atol=1e-6)


def test_label_and_augment_conventions() -> None:
    net = build_unet("ddpmpp-cifar10", img_resolution=8, label_dim=5, **TINY).eval()
    perturb(net)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.2, 1.0, -0.5])
    labels = torch.tensor([4, -1, 0])
    onehot = torch.zeros(3, 5)
    onehot[0, 4], onehot[2, 0] = 1.0, 1.0
    out = net(x, sigma, labels)
    assert torch.equal(out, net(x, sigma, onehot))  # int labels (-1 = none) are the float one-hot
    assert torch.equal(net(x, sigma, None), net(x, sigma, torch.zeros(3, 5)))  # None = zero one-hot
    assert not torch.allclose(out, net(x, sigma, torch.tensor([3, -1, 0])))
    # Augment labels: zeros and None are identical, because map_augment has no bias (spec 2.5, pitfall 8).
    assert torch.equal(net(x, sigma, labels, torch.zeros(3, 9)), out)
    assert not torch.allclose(net(x, sigma, labels, torch.ones(3, 9)), out)
    with pytest.raises(ValueError, match="label 5 is out of range"):
        net(x, sigma, torch.tensor([5, 0, 0]))


def test_label_dropout_zeroes_labels_in_training_only() -> None:
    net = build_unet("ddpmpp-cifar10", img_resolution=8, label_dim=5, label_dropout=1.0, **TINY)
    perturb(net)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 1.0]), torch.tensor([1, 2])
    assert torch.equal(net.train()(x, sigma, labels), net(x, sigma, None))
    assert not torch.allclose(net.eval()(x, sigma, labels), net(x, sigma, None))



@pytest.mark.parametrize("family", ["song", "dhariwal", "ddpm"])
def test_label_map_init_is_the_families_own(family: str) -> None:
    # pytorch-ddpm / CBDM / T2H: nn.Embedding's N(0, 1), untouched by their Xavier initialize() (longtail.md 2.2);
    # EDM's DhariwalUNet: kaiming_normal x sqrt(label_dim), also N(0, 1). SongUNet keeps Xavier-uniform.
    torch.manual_seed(0)
    cls = {"song": SongUNet, "dhariwal": DhariwalUNet, "ddpm": DDPMUNet}[family]
    net = cls(8, 3, 3, label_dim=100, **TINY)
    w = net.map_label.weight.detach()
    fan_out, fan_in = w.shape  # 6400 entries: the sample std is within ±2.5 % of the true one (4 std errors)
    if family in ("ddpm", "dhariwal"):
        assert abs(w.std().item() - 1.0) < 0.04 and abs(w.mean().item()) < 0.05
        assert w.abs().max().item() > 3.0  # Gaussian tails; a uniform of std 1 stops at √3
        layer = net.map_layer1.weight  # the other Linears keep the family's uniform init
        bound = math.sqrt(6 / sum(layer.shape)) if family == "ddpm" else 1 / math.sqrt(layer.shape[1])
        assert layer.abs().max().item() <= bound + 1e-6
        return
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= bound + 1e-6
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.04 * bound
# ------------------------------------------------------------------------------------------------ pytorch-ddpm


def ddpm_layout(ch: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], num_res_blocks: int, num_class: int,
                steps: int) -> dict[str, tuple[int, ...]]:
    """pytorch-ddpm's state-dict layout (longtail.md 2.2, 4), with CBDM's label_embedding if num_class > 0."""
    table: dict[str, tuple[int, ...]] = {"time_embedding.timembedding.0.weight": (steps, ch)}
    tdim = 4 * ch

    def add(name: str, *shape: int) -> None:
        table[f"{name}.weight"], table[f"{name}.bias"] = shape, shape[:1]

    def resblock(name: str, cin: int, cout: int, attention: bool) -> None:
        add(f"{name}.block1.0", cin)
        add(f"{name}.block1.2", cout, cin, 3, 3)
        add(f"{name}.temb_proj.1", cout, tdim)
        add(f"{name}.block2.0", cout)
        add(f"{name}.block2.3", cout, cout, 3, 3)
        if cin != cout:
            add(f"{name}.shortcut", cout, cin, 1, 1)
        if attention:
            add(f"{name}.attn.group_norm", cout)
            for part in ("proj_q", "proj_k", "proj_v", "proj"):
                add(f"{name}.attn.{part}", cout, cout, 1, 1)

    add("time_embedding.timembedding.1", tdim, ch)
    add("time_embedding.timembedding.3", tdim, tdim)
    if num_class:
        table["label_embedding.weight"] = (num_class, tdim)
    add("head", ch, 3, 3, 3)
    chs, now, i_down = [ch], ch, 0
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            resblock(f"downblocks.{i_down}", now, ch * mult, level in attn)
            now, i_down = ch * mult, i_down + 1
            chs.append(now)
        if level != len(ch_mult) - 1:
            add(f"downblocks.{i_down}.main", now, now, 3, 3)
            i_down += 1
            chs.append(now)
    resblock("middleblocks.0", now, now, True)
    resblock("middleblocks.1", now, now, False)
    i_up = 0
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            resblock(f"upblocks.{i_up}", chs.pop() + now, ch * mult, level in attn)
            now, i_up = ch * mult, i_up + 1
        if level != 0:
            add(f"upblocks.{i_up}.main", now, now, 3, 3)
            i_up += 1
    add("tail.0", now)
    add("tail.2", 3, now, 3, 3)
    return table


def ddpm_reference_forward(sd: dict[str, Tensor], x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """pytorch-ddpm's forward pass written from longtail.md 2.2 (GroupNorm(32), Swish, the label added to temb)."""

    def gn(h: Tensor, name: str) -> Tensor:
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def conv(h: Tensor, name: str, stride: int = 1) -> Tensor:
        w = sd[f"{name}.weight"]
        return F.conv2d(h, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)

    temb = sd["time_embedding.timembedding.0.weight"][t]
    temb = F.linear(temb, sd["time_embedding.timembedding.1.weight"], sd["time_embedding.timembedding.1.bias"])
    temb = F.linear(F.silu(temb), sd["time_embedding.timembedding.3.weight"], sd["time_embedding.timembedding.3.bias"])
    if y is not None:
        temb = temb + sd["label_embedding.weight"][y]

    def resblock(h: Tensor, name: str) -> Tensor:
        out = conv(F.silu(gn(h, f"{name}.block1.0")), f"{name}.block1.2")
        out = out + F.linear(F.silu(temb), sd[f"{name}.temb_proj.1.weight"], sd[f"{name}.temb_proj.1.bias"])[..., None,
                                                                                                             None]
        out = conv(F.silu(gn(out, f"{name}.block2.0")), f"{name}.block2.3")
        out = out + (conv(h, f"{name}.shortcut") if f"{name}.shortcut.weight" in sd else h)
        if f"{name}.attn.proj_q.weight" not in sd:
            return out
        b, c, hh, ww = out.shape
        a = gn(out, f"{name}.attn.group_norm")
        q, k, v = (conv(a, f"{name}.attn.proj_{p}").reshape(b, c, hh * ww) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        return out + conv(torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww), f"{name}.attn.proj")

    def indices(group: str) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in sd if k.startswith(group + ".")})

    h = conv(x, "head")
    hs = [h]
    for i in indices("downblocks"):
        name = f"downblocks.{i}"
        h = resblock(h, name) if f"{name}.block1.0.weight" in sd else conv(h, f"{name}.main", stride=2)
        hs.append(h)
    h = resblock(resblock(h, "middleblocks.0"), "middleblocks.1")
    for i in indices("upblocks"):
        name = f"upblocks.{i}"
        if f"{name}.block1.0.weight" in sd:
            h = resblock(torch.cat([h, hs.pop()], dim=1), name)
        else:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{name}.main")
    return conv(F.silu(gn(h, "tail.0")), "tail.2")


def ddpm_checkpoint(path: Path, ch: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], num_res_blocks: int,
                    num_class: int, steps: int = 1000, seed: int = 0) -> dict[str, Tensor]:
    """Write a pytorch-ddpm ``ckpt.pt`` of random weights in the original layout; return its ``ema_model``."""
    generator = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in
          ddpm_layout(ch, ch_mult, attn, num_res_blocks, num_class, steps).items()}
    freqs = torch.exp(-torch.arange(0, ch, 2) / ch * math.log(10000))
    angles = torch.arange(steps).float()[:, None] * freqs
    sd["time_embedding.timembedding.0.weight"] = torch.stack([angles.sin(), angles.cos()], -1).reshape(steps, ch)
    raw = {k: v + 1 for k, v in sd.items()}
    torch.save({"net_model": raw, "ema_model": sd, "step": 200_000, "x_T": torch.zeros(1)}, path)
    return sd


def test_pytorch_ddpm_checkpoint_maps_exactly_onto_ddpmunet(tmp_path: Path) -> None:
    ch, ch_mult, attn, blocks, classes = 128, (1, 2), (1,), 1, 3
    sd = ddpm_checkpoint(tmp_path / "ckpt.pt", ch, ch_mult, attn, blocks, classes)
    generator = torch.Generator().manual_seed(1)
    net = DDPMUNet(8, 3, 3, model_channels=ch, channel_mult=ch_mult, attn_resolutions=(4,), num_blocks=blocks,
                   label_dim=classes).eval()
    report = load_unet_checkpoint(net, tmp_path / "ckpt.pt")
    assert report.source == "ddpm:ema_model"
    x, t = torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([3, 917])
    y = torch.tensor([2, 0])
    with torch.no_grad():
        for labels in (y, None):
            ref = ddpm_reference_forward(sd, x, t, labels)
            assert torch.allclose(net(x, t.float(), labels), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    # The same net without the label embedding refuses the file, names the unexpected key and the two fixes.
    plain = DDPMUNet(8, 3, 3, model_channels=ch, channel_mult=ch_mult, attn_resolutions=(4,), num_blocks=blocks)
    with pytest.raises(UNetCheckpointError, match=r"unexpected in the file \(1\):\n    map_label.weight \(512, 3\)"
                       r"(.|\n)*class-conditional \(3 classes(.|\n)*conditional: true(.|\n)*label_table: reuse"):
        load_unet_checkpoint(plain, tmp_path / "ckpt.pt")
    load_unet_checkpoint(plain, tmp_path / "ckpt.pt", label_table="reuse")  # the label input dropped
    with torch.no_grad():
        ref = ddpm_reference_forward(sd, x, t, None)
        assert torch.allclose(plain.eval()(x, t.float()), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    deeper = DDPMUNet(8, 3, 3, model_channels=ch, channel_mult=ch_mult, attn_resolutions=(4,), num_blocks=2,
                      label_dim=classes)
    with pytest.raises(UNetCheckpointError, match="has 11 layers .* but the net has 15"):
        load_unet_checkpoint(deeper, tmp_path / "ckpt.pt")


def test_ddpm_unet_has_pytorch_ddpms_32_groups_and_edms_rule_only_when_asked(tmp_path: Path) -> None:
    # ch 64: pytorch-ddpm's GroupNorm(32) has 2 channels a group; EDM's min(32, C/4) would take 16 groups at 64.
    ch, ch_mult, blocks = 64, (1, 2), 1
    sd = ddpm_checkpoint(tmp_path / "ckpt.pt", ch, ch_mult, (1,), blocks, 0)
    arch = dict(model_channels=ch, channel_mult=ch_mult, attn_resolutions=(4,), num_blocks=blocks)

    def groups(net: torch.nn.Module) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for m in net.modules():
            if isinstance(m, torch.nn.GroupNorm):
                out.setdefault(m.num_channels, set()).add(m.num_groups)
        return out

    net = DDPMUNet(8, 3, 3, **arch).eval()
    assert groups(net) == {c: {32} for c in (64, 128, 192, 256)}  # widths 64, 128 and the concatenations
    load_unet_checkpoint(net, tmp_path / "ckpt.pt")
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 917])
    with torch.no_grad():
        ref = ddpm_reference_forward(sd, x, t, None)  # GroupNorm(32) written out
        assert torch.allclose(net(x, t.float()), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    # The option gives EDM's rule, another function of the same weights, so the loader refuses the file for it.
    edm_rule = DDPMUNet(8, 3, 3, min_channels_per_group=4, **arch).eval()
    assert groups(edm_rule) == {64: {16}, 128: {32}, 192: {32}, 256: {32}}
    with pytest.raises(UNetCheckpointError, match=r"ckpt.pt: its U-Net normalises \S+ \(64 channels\) in 32 groups "
                                                  r"\(a pytorch-ddpm .*\), this model in 16 .*"
                                                  "min_channels_per_group: 1$"):
        load_unet_checkpoint(edm_rule, tmp_path / "ckpt.pt")
    edm_rule.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert not torch.allclose(edm_rule(x, t.float()), ref, rtol=1e-2, atol=1e-2 * ref.abs().max())
    # EDM's nets keep their rule; a DDPM width that GroupNorm(32) cannot split asks for the option.
    assert groups(SongUNet(8, 3, 3, **arch))[64] == {16}
    with pytest.raises(ValueError, match="48 channels do not split into .* 32 groups.*min_channels_per_group: 4"):
        DDPMUNet(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
