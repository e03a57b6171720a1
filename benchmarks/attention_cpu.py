"""Attention on a CPU: SDPA against the explicit ``softmax(q kᵀ/√d) v`` of ``nets/attention.py``, forward + backward.

    python benchmarks/attention_cpu.py [--repeats 3] [--steps 10]

Shapes ``[batch, heads, tokens, head_dim]`` of the nets this library trains: the shapes DiT (patch 2 on 16 px: 64
tokens), the demo U-Net's 8x8 attention, DiT-S/2 on 32x32 latents (256 tokens) and longer sequences. For each
dtype (float32; bf16 as autocast makes it) the two forms alternate within each repeat; each cell is the best repeat
of ``--steps`` forward + backward passes. Writes benchmarks/results/attention_cpu.json and prints Markdown rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion_transfer.nets.attention import explicit_attention

SHAPES = {
    "shapes DiT, patch 2 on 16 px (batch 64, 4 heads)": (64, 4, 64, 32),
    "demo U-Net at 8x8 (batch 64, 1 head of 64)": (64, 1, 64, 64),
    "old shapes DiT, patch 4 (16 tokens)": (64, 4, 16, 32),
    "128 tokens": (16, 6, 128, 64),
    "DiT-S/2 on 32x32x4 latents (batch 8, 256 tokens)": (8, 6, 256, 64),
    "512 tokens": (8, 6, 512, 64),
}


def seconds(fn, shape: tuple[int, ...], dtype: torch.dtype, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    fn(q, k, v).backward(grad)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn(q, k, v).backward(grad)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            best = {"sdpa": float("inf"), "explicit": float("inf")}
            for _ in range(args.repeats):
                for form, fn in (("sdpa", F.scaled_dot_product_attention), ("explicit", explicit_attention)):
                    best[form] = min(best[form], seconds(fn, shape, dtype, args.steps))
            rows.append({"shape": name, "bhnd": shape, "dtype": str(dtype).removeprefix("torch."),
                         "sdpa_ms": best["sdpa"] * 1e3, "explicit_ms": best["explicit"] * 1e3,
                         "speedup": best["sdpa"] / best["explicit"]})
            r = rows[-1]
            print(f"| {name} | {r['dtype']} | {r['sdpa_ms']:.2f} | {r['explicit_ms']:.2f} | {r['speedup']:.2f}x |",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "repeats": args.repeats, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
