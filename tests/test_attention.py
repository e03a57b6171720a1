"""nets/attention.py: the explicit CPU form equals softmax(q kᵀ/√d) v, and each dtype/length takes its path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion_transfer.nets.attention import EXPLICIT_MAX_TOKENS, attention
from diffusion_transfer.nets.dit import Attention


def qkv(tokens: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, tokens, 16, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("tokens", [16, 64, EXPLICIT_MAX_TOKENS + 1])
def test_float32_is_sdpa_bit_for_bit(tokens: int) -> None:
    q, k, v = qkv(tokens, torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("tokens", [16, 64, EXPLICIT_MAX_TOKENS])
def test_short_bf16_sequences_match_the_definition_forward_and_backward(tokens: int) -> None:
    q, k, v = qkv(tokens, torch.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = reference(q, k, v)
    # bf16 keeps 8 bits: inputs and outputs round at ~2^-8 relative; SDPA's bf16 kernel is held to the same bound.
    for result in (out, F.scaled_dot_product_attention(q, k, v)):
        assert (result.double() - exact).abs().max() < 3e-2
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    theirs = torch.autograd.grad(reference(q64, k64, v64), (q64, k64, v64), grad.double())
    for a, b in zip(mine, theirs):
        assert (a.double() - b).abs().max() < 5e-2 * max(1.0, b.abs().max().item())


def test_long_bf16_sequences_take_sdpa() -> None:
    q, k, v = qkv(EXPLICIT_MAX_TOKENS + 1, torch.bfloat16)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_the_dit_attention_under_autocast_stays_close_to_float32() -> None:
    torch.manual_seed(0)
    layer = Attention(hidden_size=32, num_heads=2)
    x = torch.randn(4, 64, 32)
    exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x)
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - exact).abs().max() < 3e-2 * exact.abs().max()
