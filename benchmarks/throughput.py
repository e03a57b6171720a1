"""Training and sampling throughput of the DiT, through Lightning and in a plain PyTorch loop.

    python benchmarks/throughput.py [--steps 30] [--warmup 5] [--repeats 1] [--only NAME] [--compile] [--seed 0]

Models: DiT-S/2 on 32x32x4 latents (batch 8, the 256-px latent shape), the quickstart model (DiT-S/4,
hidden 128, depth 4, on 16x16x3 pixels, batch 64), and the EDM U-Nets: DDPM++ at its CIFAR-10 size
(EDMDiffusion ``ddpmpp-cifar10``, 32x32x3, batch 8) and the tiny DDPM++ of configs/edm/shapes.yaml
(16x16x3, batch 32). For each it measures:

- train images/s of the same step (loss + backward + AdamW + EMA update) in a plain PyTorch loop and under
  Lightning's Trainer (our training_step, EMA callback on), so the Lightning overhead is visible; with
  --repeats the two alternate and the overhead is the median of the paired differences;
- the FLOP/s achieved by the training step (FLOPs counted by torch.utils.flop_counter) against this
  machine's measured fp32 matmul peak;
- sampling images/s (DiT: DDIM, 50 steps, guidance 1.5, i.e. a doubled batch per step; EDM: Heun, 18 steps
  = 35 evaluations, guidance 1.5);
- with --compile, the same plain-loop step under torch.compile.

Writes benchmarks/results/throughput.json and prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from diffusion_transfer.callbacks import TrainableEMA
from diffusion_transfer.methods import Diffusion, EDMDiffusion

MODELS = {
    "DiT-S/2 latent 32x32x4, batch 8": dict(arch="DiT-S/2", arch_overrides=None, resolution=32, channels=4,
                                             batch=8, num_classes=1000),
    "quickstart DiT-S/4 (128x4) 16x16x3, batch 64": dict(
        arch="DiT-S/4", arch_overrides={"hidden_size": 128, "depth": 4, "num_heads": 4}, resolution=16,
        channels=3, batch=64, num_classes=20),
    "EDM DDPM++ CIFAR-10 (ddpmpp-cifar10) 32x32x3, batch 8": dict(
        method=EDMDiffusion, arch="ddpmpp-cifar10", arch_overrides=None, resolution=32, channels=3, batch=8,
        num_classes=10),
    "demo U-Net (configs/quickstart.yaml) 16x16x3, batch 64": dict(
        arch="ddpm-cifar10", arch_overrides={"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1,
                                             "attn_resolutions": [8], "dropout": 0.0},
        resolution=16, channels=3, batch=64, num_classes=20),
    "EDM tiny DDPM++ (configs/edm/shapes.yaml) 16x16x3, batch 32": dict(
        method=EDMDiffusion, arch="ddpmpp-cifar10", arch_overrides={
            "model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [8],
            "dropout": 0.0, "augment_dim": 0}, resolution=16, channels=3, batch=32, num_classes=20),
}
SAMPLING = {Diffusion: {"sampler": "ddim", "steps": 50, "guidance_scale": 1.5},
            EDMDiffusion: {"sampler": "heun", "steps": 18, "guidance_scale": 1.5}}


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of a square matmul (the practical peak of this CPU with torch's BLAS)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def build(spec: dict) -> tuple[Diffusion | EDMDiffusion, torch.Tensor, torch.Tensor]:
    method = spec.get("method", Diffusion)
    model = method(arch=spec["arch"], arch_overrides=spec["arch_overrides"], num_classes=spec["num_classes"],
                   resolution=spec["resolution"], channels=spec["channels"], val_num_images=0)
    x = torch.randn(spec["batch"], spec["channels"], spec["resolution"], spec["resolution"])
    y = torch.randint(0, spec["num_classes"], (spec["batch"],))
    return model, x, y


def step_flops(model: Diffusion, x: torch.Tensor, y: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model.loss((x, y))["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def plain_loop(model: Diffusion, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
               compiled: bool = False) -> float:
    """Seconds per training step of the bare PyTorch loop."""
    loss_fn = model.loss
    if compiled:
        model._compile = True  # the module's own opt-in switch (model init arg `compile: true`)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    # The same EMA update TrainableEMA makes, so both loops do the same work and the gap is Lightning's.
    shadows = [p.detach().clone() for p in params]
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn((x, y))["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(shadows, [p.detach() for p in params], 1.0 - 0.9999)
    model._compile = False
    return (time.perf_counter() - start) / steps


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.end, self.steps = time.perf_counter(), self.steps + 1


def lightning_loop(model: Diffusion, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> float:
    """Seconds per training step under Trainer.fit (same data every step, EMA on)."""
    total = warmup + steps
    data = TensorDataset(x.repeat(total, 1, 1, 1), y.repeat(total))
    timer = _StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[TrainableEMA(), timer])
    trainer.fit(model, DataLoader(data, batch_size=x.shape[0]))
    return (timer.end - timer.start) / timer.steps


def sampling_rate(model: Diffusion | EDMDiffusion, count: int) -> float:
    start = time.perf_counter()
    model.sample(count, **SAMPLING[type(model)])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="alternating plain/Lightning runs (medians)")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for name, spec in MODELS.items():
        if args.only and args.only not in name:
            continue
        model, x, y = build(spec)
        flops = step_flops(model, x, y)
        # Alternate the two loops and take medians, so drift of a shared machine hits both alike.
        plains, lightnings = [], []
        for _ in range(args.repeats):
            plains.append(plain_loop(model, x, y, args.steps, args.warmup))
            lightnings.append(lightning_loop(model, x, y, args.steps, args.warmup))
        plain, lightning = statistics.median(plains), statistics.median(lightnings)
        gaps = sorted(100 * (light / base - 1) for base, light in zip(plains, lightnings, strict=True))
        row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "batch": spec["batch"],
               "train_img_s_plain": spec["batch"] / plain, "train_img_s_lightning": spec["batch"] / lightning,
               "lightning_overhead_pct": statistics.median(gaps), "repeats": args.repeats,
               "overhead_pct_per_pair": gaps,
               "train_gflop_per_step": flops / 1e9, "achieved_gflop_s": flops / plain / 1e9,
               "fraction_of_matmul_peak": flops / plain / peak,
               "sample_img_s": sampling_rate(model, spec["batch"])}
        if args.compile:
            compiled = plain_loop(model, x, y, args.steps, args.warmup, compiled=True)
            row["train_img_s_compiled"] = spec["batch"] / compiled
            row["compile_speedup"] = plain / compiled
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "matmul_peak_gflop_s": peak / 1e9, "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("\n| model | train img/s plain | train img/s Lightning | overhead | GFLOP/s (of peak) | sample img/s"
          + (" | compiled img/s (speed-up)" if args.compile else "") + " |")
    print("|---|---|---|---|---|---|" + ("---|" if args.compile else ""))
    for r in rows:
        extra = f" | {r['train_img_s_compiled']:.1f} ({r['compile_speedup']:.2f}x)" if args.compile else ""
        share = 100 * r["fraction_of_matmul_peak"]
        print(f"| {r['model']} | {r['train_img_s_plain']:.1f} | {r['train_img_s_lightning']:.1f} | "
              f"{r['lightning_overhead_pct']:+.1f}% | {r['achieved_gflop_s']:.1f} ({share:.0f}%) | "
              f"{r['sample_img_s']:.1f}{extra} |")


if __name__ == "__main__":
    main()
