"""Scaled dot-product attention for every net: SDPA, or on a CPU for short sequences two batched matmuls.

On a CPU, PyTorch's SDPA kernels are slow in bf16: for up to 256 tokens the explicit form ``softmax(q kᵀ / √d) v``
(two batched bf16 matmuls, the softmax in float32 as autocast runs it) takes its forward and backward 2-12x
faster, and from 512 tokens on the two are level while the explicit form needs the N x N matrix. In float32 SDPA
is as fast or faster, so float32 keeps it, and its results are unchanged (``benchmarks/attention_cpu.py``,
docs/results.md "Attention on a CPU").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Longest sequence (keys) for which a CPU takes the explicit path in bf16/fp16 (level with SDPA at 512 tokens).
EXPLICIT_MAX_TOKENS = 256


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d) v`` with scale d^-1/2 (SDPA's default), no mask, no dropout.

    Args:
        q: ``[..., N_q, d]``; k: ``[..., N_k, d]``; v: ``[..., N_k, d_v]`` (same leading dims).

    Returns:
        ``[..., N_q, d_v]`` in ``v``'s dtype.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= EXPLICIT_MAX_TOKENS:
        return explicit_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The explicit form: two batched matmuls, the softmax in float32. Shapes as :func:`attention`."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    return logits.float().softmax(dim=-1).to(v.dtype) @ v
