"""Tests for nets/dit.py and io/dit_checkpoint.py, asserted against papers/dit.md (sections cited per test).

Large configs are only built on the meta device (shapes, no memory); everything that runs is tiny.
"""

from __future__ import annotations

import argparse
import fractions
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion_transfer.io import dit_checkpoint
from diffusion_transfer.io.dit_checkpoint import (
    DiTCheckpointError,
    infer_dit_config,
    load_dit_checkpoint,
    read_dit_state_dict,
)
from diffusion_transfer.nets import attention as attention_module
from diffusion_transfer.nets import dit as dit_module
from diffusion_transfer.nets.dit import (
    DiT,
    DiT_CONFIGS,
    LabelEmbedder,
    build_dit,
    patchify,
    sincos_pos_embed_2d,
    timestep_features,
    unpatchify,
)

TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=3,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
    learn_sigma=True,
    class_dropout_prob=0.1,
)


def tiny(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**TINY, **overrides})


@torch.no_grad()
def randomize(model: DiT, seed: int = 0) -> DiT:
    """Give every trainable parameter (incl. the zero-initialised adaLN/final ones) a random value."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def inputs(model: DiT, batch: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


def meta_shapes(name: str, **overrides) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_dit(name, **overrides)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_table(depth: int, d: int, p: int, tokens: int, rows: int = 1001, c_out: int = 8):
    """The key/shape table of spec 4.1 for general D, depth, p (the XL/2 rows are spelled out below)."""
    table = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, 4, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (rows, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
    }
    for i in range(depth):
        table.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * d, d),
                f"blocks.{i}.attn.qkv.bias": (3 * d,),
                f"blocks.{i}.attn.proj.weight": (d, d),
                f"blocks.{i}.attn.proj.bias": (d,),
                f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
                f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
                f"blocks.{i}.mlp.fc2.bias": (d,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
            }
        )
    return table


# -- spec 4.1 / 8.1 --------------------------------------------------------------------------------
def test_xl2_256_keys_and_shapes_match_official_table():
    shapes = meta_shapes("DiT-XL/2")
    # Literal rows of the spec table for XL/2-256.
    literal = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.27.attn.qkv.bias": (3456,),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
        "blocks.0.adaLN_modulation.1.bias": (6912,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
    }
    for key, shape in literal.items():
        assert shapes[key] == shape, key
    assert shapes == expected_table(depth=28, d=1152, p=2, tokens=256)
    assert "blocks.28.attn.qkv.weight" not in shapes
    assert not any("norm" in k for k in shapes), "blocks have no norm keys (LayerNorms without affine)"


def test_xl2_512_and_s2_tables():
    assert meta_shapes("DiT-XL/2", input_size=64) == expected_table(depth=28, d=1152, p=2, tokens=1024)
    # DiT-S/2: D=384, depth 12, 6 heads (spec 3.1), same pattern.
    assert meta_shapes("DiT-S/2") == expected_table(depth=12, d=384, p=2, tokens=256)
    # /8 at 256 px: 16 tokens; final linear p*p*8 = 512.
    assert meta_shapes("DiT-B/8") == expected_table(depth=12, d=768, p=8, tokens=16)


def test_learn_sigma_off_and_no_dropout_change_the_right_shapes():
    shapes = meta_shapes("DiT-S/2", learn_sigma=False, class_dropout_prob=0.0)
    assert shapes["final_layer.linear.weight"] == (2 * 2 * 4, 384)
    assert shapes["y_embedder.embedding_table.weight"] == (1000, 384)  # no null row (spec pitfall 6)


# -- spec 3.1 / 8.2 --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,count",
    [("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416), ("DiT-L/2", 458_102_816), ("DiT-XL/2", 675_129_632)],
)
def test_parameter_counts(name, count):
    with torch.device("meta"):
        model = build_dit(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_xl2_counts_without_table_and_pos_embed():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    params = dict(model.named_parameters())
    no_table = sum(p.numel() for k, p in params.items() if k != "y_embedder.embedding_table.weight")
    assert no_table == 673_976_480
    assert no_table - params["pos_embed"].numel() == 673_681_568
    # pos_embed is a frozen Parameter and lives in the state dict (spec 2.2 step 2, section 6).
    assert not params["pos_embed"].requires_grad
    assert [k for k, p in params.items() if not p.requires_grad] == ["pos_embed"]


def test_config_names_and_unknown_name_error():
    names = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert sorted(DiT_CONFIGS) == sorted(names)
    with pytest.raises(ValueError) as info:
        build_dit("DiT-XXL/2")
    message = str(info.value)
    assert "DiT-XXL/2" in message
    for name in names:
        assert name in message
    with torch.device("meta"):
        assert build_dit("DiT-XL-2").hidden_size == 1152  # file-name spelling accepted


def test_build_dit_overrides_for_tiny_models():
    model = build_dit("DiT-S/2", input_size=8, depth=2, hidden_size=32, num_heads=2, num_classes=5)
    assert len(model.blocks) == 2 and model.hidden_size == 32 and model.num_patches == 16
    assert model.config["depth"] == 2 and model.config["num_classes"] == 5


# -- spec 2.3 / 8.3 --------------------------------------------------------------------------------
def test_fresh_model_outputs_exact_zeros_and_blocks_are_identity():
    model = tiny()
    for mode in (model.eval, model.train):
        mode()
        x, t, y = inputs(model)
        out = model(x, t, y)
        assert out.shape == (4, 6, 8, 8)
        assert torch.equal(out, torch.zeros_like(out))
    h = torch.randn(3, model.num_patches, TINY["hidden_size"])
    c = torch.randn(3, TINY["hidden_size"])
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


def test_initialisation_follows_spec():
    model = build_dit("DiT-S/4", depth=3)  # real width so the statistics are meaningful
    d = model.hidden_size
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # Xavier-uniform
            assert lin.weight.abs().max() <= bound
            assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            assert torch.count_nonzero(lin.bias) == 0
    fl = model.final_layer
    for p in (fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias, fl.linear.weight, fl.linear.bias):
        assert torch.count_nonzero(p) == 0
    conv = model.x_embedder.proj
    bound = math.sqrt(6 / (d + 4 * 4 * 4))  # Xavier on the (D, C*p*p) view
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    for w in (
        model.y_embedder.embedding_table.weight,
        model.t_embedder.mlp[0].weight,
        model.t_embedder.mlp[2].weight,
    ):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert w.mean().abs() < 0.002
    assert torch.count_nonzero(model.t_embedder.mlp[0].bias) == 0


# -- spec 2.2 step 3 / 8.4 -------------------------------------------------------------------------
def test_timestep_features():
    feats = timestep_features(torch.tensor([0, 7]))
    assert feats.shape == (2, 256)
    assert torch.equal(feats[0, :128], torch.ones(128))
    assert torch.equal(feats[0, 128:], torch.zeros(128))
    k = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000) * k / 128)
    expected = torch.cat([torch.cos(7 * f), torch.sin(7 * f)]).float()
    torch.testing.assert_close(feats[1], expected, atol=1e-5, rtol=0)
    # int and float timesteps give the same embedding
    assert torch.equal(timestep_features(torch.tensor([7.0])), feats[1:])


# -- spec 2.2 step 2 / 8.5 -------------------------------------------------------------------------
def test_pos_embed_layout():
    d, g = 16, 4
    table = sincos_pos_embed_2d(d, g)
    assert table.shape == (g * g, d) and table.dtype == torch.float32
    t00, t01, t10 = table[0], table[1], table[g]
    assert torch.equal(t01[d // 2 :], t00[d // 2 :]) and not torch.equal(t01[: d // 2], t00[: d // 2])
    assert torch.equal(t10[: d // 2], t00[: d // 2]) and not torch.equal(t10[d // 2 :], t00[d // 2 :])
    assert torch.equal(t00[: d // 4], torch.zeros(d // 4)) and torch.equal(
        t00[d // 4 : d // 2], torch.ones(d // 4)
    )
    # token (row 2, col 3): [sin(3 w), cos(3 w), sin(2 w), cos(2 w)], w_k = 10000^(-k/(D/4))
    w = 10000 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    expected = torch.cat([torch.sin(3 * w), torch.cos(3 * w), torch.sin(2 * w), torch.cos(2 * w)]).float()
    torch.testing.assert_close(table[2 * g + 3], expected, atol=1e-6, rtol=0)
    model = tiny()
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 4))


# -- spec 2.2 step 7 / 8.6 -------------------------------------------------------------------------
def test_unpatchify_layout_and_inverse():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(unpatchify(tokens, 2, 3), x)
    # within a token: (patch-row, patch-col, channel), channel fastest; tokens row-major
    tok = torch.zeros(1, 16, 12)
    row, col, pr, pc, ch = 1, 2, 1, 0, 2
    tok[0, row * 4 + col, (pr * 2 + pc) * 3 + ch] = 1.0
    img = unpatchify(tok, 2, 3)
    assert img[0, ch, row * 2 + pr, col * 2 + pc] == 1.0 and img.sum() == 1.0


# -- spec 2.2 step 4 / 8.7 -------------------------------------------------------------------------
def test_label_dropout_and_null_index():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == 11 and emb.null_index == 10
    labels = torch.arange(10).repeat(2000)
    emb.eval()
    assert torch.equal(emb.drop_labels(labels), labels)
    emb.train()
    torch.manual_seed(0)
    dropped = emb.drop_labels(labels)
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.1) < 0.01  # 20000 Bernoulli(0.1): std 0.002
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    # force_drop_ids drops exactly the given rows, in train and eval mode alike
    y = torch.tensor([3, 4, 5, 6])
    mask = torch.tensor([1, 0, 1, 0])
    for mode in (emb.train, emb.eval):
        mode()
        assert emb.drop_labels(y, force_drop_ids=mask).tolist() == [10, 4, 10, 6]
        assert emb.drop_labels(y, force_drop_ids=mask.bool()).tolist() == [10, 4, 10, 6]
    # -1 means null; the embedding is the null row
    emb.eval()
    assert emb.drop_labels(torch.tensor([-1, 2, 10])).tolist() == [10, 2, 10]
    torch.testing.assert_close(emb(torch.tensor([-1])), emb.embedding_table.weight[10:11])


def test_no_null_row_without_dropout():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)
    assert emb.embedding_table.num_embeddings == 10 and emb.null_index is None
    emb.train()
    labels = torch.arange(10)
    assert torch.equal(emb.drop_labels(labels), labels)
    with pytest.raises(ValueError, match="no null row"):
        emb.drop_labels(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="no null row"):
        emb.drop_labels(labels, force_drop_ids=torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        emb.drop_labels(torch.tensor([10]))


def test_forced_null_matches_null_labels_and_batch_is_independent():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model, batch=3)
    null = torch.full_like(y, model.null_label)
    assert model.null_label == TINY["num_classes"]
    # CFG-style doubled batch: each half equals its separate call (up to kernel-order rounding)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    torch.testing.assert_close(both[:3], model(x, t, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[3:], model(x, t, null), atol=1e-5, rtol=1e-5)
    # force_drop_ids, null index and -1 agree
    forced = model(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.bool))
    assert torch.equal(forced, model(x, t, null))
    assert torch.equal(forced, model(x, t, torch.full_like(y, -1)))
    # in train mode, forced drop is deterministic (no extra random dropout)
    model.train()
    mask = torch.tensor([True, False, True])
    a = model(x, t, y, force_drop_ids=mask)
    b = model(x, t, y, force_drop_ids=mask)
    assert torch.equal(a, b)


# -- spec 2.2 steps 6-7 ----------------------------------------------------------------------------
def test_attention_is_sdpa_with_packed_qkv(monkeypatch):
    model = randomize(tiny())
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    # Reference from the spec: one Linear -> [q; k; v], heads contiguous, scale (D/heads)^-1/2, then proj.
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(32, dim=-1)
    heads = [
        torch.softmax(q[..., h * 16 : (h + 1) * 16] @ k[..., h * 16 : (h + 1) * 16].transpose(1, 2) / 4.0, -1)
        @ v[..., h * 16 : (h + 1) * 16]
        for h in range(2)
    ]
    expected = attn.proj(torch.cat(heads, dim=-1))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(  # float32 runs SDPA itself (nets/attention.py)
        attention_module.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_block_and_final_layer_chunk_order():
    model = randomize(tiny())
    block, final = model.blocks[0], model.final_layer
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).split(32, dim=1)

    def ln(z):  # no affine, eps 1e-6
        return F.layer_norm(z, (32,), eps=1e-6)

    h = x + gate1[:, None] * block.attn(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    h = h + gate2[:, None] * block.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    torch.testing.assert_close(block(x, c), h)
    # MLP: fc1, tanh-GELU, fc2
    torch.testing.assert_close(block.mlp(x), block.mlp.fc2(F.gelu(block.mlp.fc1(x), approximate="tanh")))
    shift, scale = final.adaLN_modulation(c).split(32, dim=1)
    torch.testing.assert_close(final(x, c), final.linear(ln(x) * (1 + scale[:, None]) + shift[:, None]))


# -- forward contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_sigma,channels", [(True, 6), (False, 3)])
def test_output_shapes(learn_sigma, channels):
    model = randomize(tiny(learn_sigma=learn_sigma))
    x, t, y = inputs(model, batch=2)
    assert model(x, t, y).shape == (2, channels, 8, 8)
    assert model(x, t.float() + 0.5, y).shape == (2, channels, 8, 8)  # float timesteps
    assert model(x, torch.tensor(10), y).shape == (2, channels, 8, 8)  # scalar t broadcast
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 3, 16, 16), t, y)


def test_tiny_config_from_issue():
    torch.manual_seed(0)
    model = DiT(
        input_size=16,
        patch_size=2,
        in_channels=3,
        hidden_size=64,
        depth=2,
        num_heads=2,
        num_classes=20,
        learn_sigma=True,
        class_dropout_prob=0.1,
    )
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.tensor([1, 999]), torch.tensor([0, 19])).shape == (2, 6, 16, 16)
    assert model.y_embedder.embedding_table.num_embeddings == 21


def test_determinism():
    a, b = randomize(tiny(), seed=3), randomize(tiny(), seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert all(torch.equal(p, q) for p, q in zip(tiny().parameters(), tiny().parameters(), strict=True))
    x, t, y = inputs(a)
    a.eval()
    b.eval()
    assert torch.equal(a(x, t, y), b(x, t, y))
    a.train()
    b.train()
    torch.manual_seed(5)
    out_a = a(x, t, y)
    torch.manual_seed(5)
    assert torch.equal(out_a, b(x, t, y))  # same RNG state -> same label dropout


def test_gradient_checkpointing_same_grads():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model, batch=2)
    model(x, t, y).square().sum().backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, y).square().sum().backward()
    for k, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g)
    assert model.pos_embed.grad is None  # frozen


# -- hooks for methods -----------------------------------------------------------------------------
def test_block_hook_add_and_prepend():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model, batch=2)
    base = model(x, t, y)
    seen = []

    def zero_add(index, h, c):  # DMP "add" at step 0: zero prompts -> unchanged output
        seen.append((index, tuple(h.shape), tuple(c.shape)))
        return h + torch.zeros(model.num_patches, 32)

    assert torch.equal(model(x, t, y, block_hook=zero_add), base)
    assert seen == [(0, (2, 16, 32), (2, 32)), (1, (2, 16, 32), (2, 32))]

    prompts = torch.randn(3, 32)

    def prepend(index, h, c):  # DMP "prepend"/VPT-deep: N extra tokens in front, overwritten per block
        p = prompts.expand(h.shape[0], -1, -1)
        return torch.cat([p, h], dim=1) if index == 0 else torch.cat([p, h[:, 3:]], dim=1)

    out = model(x, t, y, block_hook=prepend)
    assert out.shape == base.shape and not torch.allclose(out, base)


def test_swapped_label_embedder():
    model = randomize(tiny()).eval()

    class Tiered(torch.nn.Module):  # FineDiffusion-like: per-sample null = superclass row
        def __init__(self):
            super().__init__()
            self.embedding_table = torch.nn.Embedding(10 + 2, 32)

        def forward(self, labels, force_drop_ids=None):
            if force_drop_ids is not None:
                labels = torch.where(force_drop_ids.bool(), 10 + labels % 2, labels)
            return self.embedding_table(labels)

    model.y_embedder = Tiered()
    x, t, y = inputs(model, batch=2)
    assert model(x, t, y, force_drop_ids=torch.tensor([1, 0])).shape == (2, 6, 8, 8)
    assert model.null_label is None
    assert model.state_dict()["y_embedder.embedding_table.weight"].shape == (12, 32)


def test_norm_affine_keys_for_finediffusion():
    model = tiny(norm_affine=True)
    keys = model.state_dict().keys()
    assert {"blocks.0.norm1.weight", "blocks.1.norm2.bias", "final_layer.norm_final.weight"} <= set(keys)
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(4, 6, 8, 8))  # identity LN init keeps adaLN-Zero


# -- io: checkpoints -------------------------------------------------------------------------------
def test_roundtrip_flat_and_training_checkpoint(tmp_path):
    src = randomize(tiny(), seed=7)
    flat = tmp_path / "flat.pt"
    torch.save(src.state_dict(), flat)
    dst = tiny()
    report = load_dit_checkpoint(dst, flat)
    assert report.source == "state_dict" and not report.missing and not report.unexpected
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    dst.load_state_dict(src.state_dict(), strict=True)

    # train.py layout: {model, ema, opt, args}; ema preferred, model on request
    ema = randomize(tiny(), seed=8).state_dict()
    train_ckpt = tmp_path / "0001000.pt"
    torch.save({"model": src.state_dict(), "ema": ema, "opt": {}}, train_ckpt)
    assert load_dit_checkpoint(dst, train_ckpt).source == "ema"
    assert torch.equal(dst.final_layer.linear.weight, ema["final_layer.linear.weight"])
    assert load_dit_checkpoint(dst, train_ckpt, prefer="model").source == "model"
    assert torch.equal(dst.final_layer.linear.weight, src.final_layer.linear.weight)


def test_mismatch_error_names_file_keys_and_shapes(tmp_path):
    other = tmp_path / "DiT-other.pt"
    torch.save(tiny(hidden_size=64, depth=3, num_heads=2).state_dict(), other)
    with pytest.raises(DiTCheckpointError) as info:
        load_dit_checkpoint(tiny(), other)
    msg = str(info.value)
    assert str(other) in msg
    assert "pos_embed: file (1, 16, 64) vs model (1, 16, 32)" in msg
    assert "x_embedder.proj.weight: file (64, 3, 2, 2) vs model (32, 3, 2, 2)" in msg
    assert "unexpected in the file" in msg and "blocks.2." in msg
    assert "depth=3, hidden_size=64" in msg  # what the file looks like
    assert "What to do" in msg and "allow_missing" in msg


def test_missing_and_unexpected_keys_and_whitelists(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(tiny().state_dict(), path)
    affine = tiny(norm_affine=True)
    with pytest.raises(
        DiTCheckpointError, match=r"missing from the file \(10\)[\s\S]*blocks\.0\.norm1\.weight \(32\)"
    ):
        load_dit_checkpoint(affine, path)
    # FineDiffusion-style declaration: new LN affines may be missing, the label table is re-initialised
    table_before = affine.y_embedder.embedding_table.weight.clone()
    report = load_dit_checkpoint(
        affine,
        path,
        allow_missing=["blocks.*.norm*", "final_layer.norm_final.*", "y_embedder.*"],
        ignore_keys=["y_embedder.embedding_table.weight"],
    )
    assert report.ignored == ["y_embedder.embedding_table.weight"]
    assert "blocks.0.norm1.weight" in report.missing and "y_embedder.embedding_table.weight" in report.missing
    assert torch.equal(affine.y_embedder.embedding_table.weight, table_before)
    # the reverse direction: extra keys in the file
    path2 = tmp_path / "affine.pt"
    torch.save(tiny(norm_affine=True).state_dict(), path2)
    with pytest.raises(DiTCheckpointError, match="unexpected in the file"):
        load_dit_checkpoint(tiny(), path2)
    assert load_dit_checkpoint(tiny(), path2, strict=False).unexpected


def test_missing_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_dit_checkpoint(tiny(), path)
    msg = str(info.value)
    assert str(path) in msg
    assert "facebookresearch/DiT" in msg and "DiT-XL-2-256x256.pt" in msg
    assert "never downloads" in msg


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "train_ckpt.pt"
    state = tiny().state_dict()
    # train.py's args (an argparse.Namespace) are read as data, by default
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    sd, source = read_dit_state_dict(path)
    assert source == "ema" and set(sd) == set(state)
    torch.save({"model": state, "ema": state, "args": fractions.Fraction(2, 3)}, path)  # any other global
    with pytest.raises(DiTCheckpointError) as info:
        read_dit_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "weights_only" in msg and "fractions.Fraction" in msg
    assert "trusted_globals" in msg
    # the suggested way forward works and still refuses anything else
    sd, source = read_dit_state_dict(path, trusted_globals=[fractions.Fraction])
    assert source == "ema" and set(sd) == set(state)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"step": torch.tensor(3), "optimizer": {"lr": 1.0}}, path)
    with pytest.raises(DiTCheckpointError, match="not a DiT state dict"):
        read_dit_state_dict(path)


def test_infer_config_from_official_layout():
    cfg = infer_dit_config({k: torch.empty(v, device="meta") for k, v in meta_shapes("DiT-XL/2").items()})
    assert cfg == dict(
        hidden_size=1152,
        in_channels=4,
        patch_size=2,
        depth=28,
        input_size=32,
        table_rows=1001,
        learn_sigma=True,
    )


def test_layering_no_lightning_and_io_independent_of_nets():
    for module in (dit_module, dit_checkpoint):
        source = Path(module.__file__).read_text()
        assert not re.search(r"^\s*(import|from)\s+(pytorch_)?lightning", source, re.M)
    io_source = Path(dit_checkpoint.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(diffusion_transfer\.nets|\.\.nets)", io_source, re.M)


def test_pieces_match_timm_modules_used_by_official_dit():
    """Official DiT uses timm's PatchEmbed/Attention/Mlp: same keys (strict load) and the same numbers."""
    timm = pytest.importorskip("timm")
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Attention as TimmAttention

    model = randomize(tiny())
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    ref_attn = TimmAttention(32, num_heads=2, qkv_bias=True)
    ref_attn.load_state_dict(block.attn.state_dict(), strict=True)
    torch.testing.assert_close(block.attn(x), ref_attn(x), atol=1e-5, rtol=1e-5)
    ref_mlp = TimmMlp(32, hidden_features=128, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0)
    ref_mlp.load_state_dict(block.mlp.state_dict(), strict=True)
    torch.testing.assert_close(block.mlp(x), ref_mlp(x))
    ref_patch = TimmPatchEmbed(8, 2, 3, 32, bias=True)
    ref_patch.load_state_dict(model.x_embedder.state_dict(), strict=True)
    img = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.x_embedder(img), ref_patch(img))
    assert timm.__version__


def test_output_conv_starts_as_the_plain_dit_and_adds_a_3x3_residual() -> None:
    plain, with_conv = randomize(tiny()), tiny(output_conv=True)
    assert with_conv.output_conv.weight.abs().sum() == 0 and with_conv.output_conv.bias.abs().sum() == 0
    missing = with_conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["output_conv.bias", "output_conv.weight"]
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2])
    plain.eval(), with_conv.eval()
    assert torch.equal(with_conv(x, t, y), plain(x, t, y))  # zero-initialised residual: the same function
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        with_conv.output_conv.weight.copy_(torch.randn(with_conv.output_conv.weight.shape, generator=gen))
        with_conv.output_conv.bias.copy_(torch.randn(6, generator=gen))
    base = plain(x, t, y)  # [B, 2C, I, I] before the convolution
    expected = base + F.conv2d(base, with_conv.output_conv.weight, with_conv.output_conv.bias, padding=1)
    torch.testing.assert_close(with_conv(x, t, y), expected)
    assert infer_dit_config(with_conv.state_dict())["output_conv"] is True
    assert "output_conv" not in infer_dit_config(plain.state_dict())
