"""Why the DDPM++ training step gains less from bf16 than DiT: where its bf16 step goes, and what oneDNN's bf16
3x3 convolutions gain over float32 at the net's widths and resolutions.

    python benchmarks/conv_bf16.py [--repeats 5]

1. A profile of one bf16-autocast training step (forward, backward, fused AdamW) of EDM's DDPM++ at CIFAR-10 size,
   batch 8, as in ``benchmarks/precision.py``: the share of the step's self time per op.
2. One 3x3 convolution, forward + backward, batch 8, at the (channels, resolution) of DDPM++ CIFAR-10: float32
   against bf16 autocast, NCHW and channels_last, best of ``--repeats``.

The convolutions bound what bf16 can give a convolutional net: if they are a share s of the step and gain g, the
step gains at most 1 / (s / g + (1 - s)). Prints Markdown tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from diffusion_transfer.nets.unet import build_unet


def step_profile() -> list[tuple[str, float]]:
    """(op, share of self CPU time) of one bf16 training step of DDPM++ CIFAR-10, largest first."""
    torch.manual_seed(0)
    net = build_unet("ddpmpp-cifar10", img_resolution=32, label_dim=10)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x, sigma, y = torch.randn(8, 3, 32, 32), torch.rand(8) + 0.1, torch.arange(8) % 10

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, sigma, y)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda r: -r[1])


def conv_ms(channels: int, resolution: int, bf16: bool, channels_last: bool, repeats: int) -> float:
    """Best milliseconds of one 3x3 conv forward + backward (batch 8)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=fmt)
    x = torch.randn(8, channels, resolution, resolution).contiguous(memory_format=fmt).requires_grad_()

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().sum().backward()

    for _ in range(2):
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shares = step_profile()
    conv = sum(s for k, s in shares if "convolution" in k)
    print("| op (bf16 DDPM++ step) | share of self time |\n|---|---|")
    for key, share in shares[:8]:
        print(f"| `{key}` | {100 * share:.1f}% |")
    print(f"| all convolution ops | {100 * conv:.1f}% |")
    print("\n| channels x resolution | fp32 (ms) | bf16 (ms) | bf16 gain | fp32 NHWC | bf16 NHWC |")
    print("|---|---|---|---|---|---|")
    for channels, resolution in ((128, 32), (256, 32), (256, 16), (256, 8)):  # DDPM++ CIFAR-10: 256 ch at each level
        t = {(b, cl): conv_ms(channels, resolution, b, cl, args.repeats) for b in (False, True) for cl in (False, True)}
        print(f"| {channels} x {resolution}² | {t[False, False]:.1f} | {t[True, False]:.1f} | "
              f"{t[False, False] / t[True, False]:.2f}x | {t[False, True]:.1f} | {t[True, True]:.1f} |")


if __name__ == "__main__":
    main()
