"""Training and sampling speed by precision: float32 against bf16-mixed, and what helps beyond autocast.

    python benchmarks/precision.py [--steps 20] [--warmup 3] [--repeats 3] [--only NAME] [--compile] [--batch N]

The models are those of ``benchmarks/throughput.py`` (DiT-S/2 on 32x32x4 latents, the quickstart DiT, EDM
DDPM++ at CIFAR-10 size and the tiny DDPM++ of configs/edm/shapes.yaml). Every number is a training step through
``Trainer.fit`` with our ``training_step`` and the ``TrainableEMA`` callback, i.e. what a user's run does. Variants:

- ``fp32``: ``precision="32-true"`` and AdamW as torch builds it by default (our own float32 path, measured level
  with the original code);
- ``bf16``: ``precision="bf16-mixed"`` (the CLI's default on hardware with native bf16);
- ``bf16 fused``: bf16-mixed with ``AdamW(fused=True)``;
- ``bf16 channels_last`` (U-Nets): bf16-mixed, fused AdamW, net and inputs in channels_last;
- ``bf16 compile`` (``--compile``: the model's ``compile: true`` switch): bf16-mixed + fused AdamW under
  ``torch.compile``; its start-up (the first step, which compiles) is reported apart.

The variants alternate within each repeat and each takes its best (least disturbed) repeat, so drift of a shared
machine hits all alike. Sampling compares ``sample_precision`` ``32`` and ``bf16`` (DiT: DDIM 50 steps; EDM:
Heun 18 steps; guidance 1.5), interleaved, best of the repeats. Writes benchmarks/results/precision.json and
prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from throughput import MODELS, SAMPLING, build
from torch.utils.data import DataLoader, TensorDataset

from diffusion_transfer.callbacks import TrainableEMA


class _StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def train_step_times(model, x: torch.Tensor, y: torch.Tensor, steps: int, precision: str) -> list[float]:
    """Per-step seconds of ``steps`` steps of ``Trainer.fit`` (same batch every step, EMA on)."""
    data = TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps))
    timer = _StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        precision=precision, callbacks=[TrainableEMA(), timer])
    trainer.fit(model, DataLoader(data, batch_size=x.shape[0]))
    return timer.times


def variants(spec: dict, compile_net: bool) -> dict[str, dict]:
    is_dit = spec["arch"].startswith("DiT")
    table = {"fp32": {"precision": "32-true"}, "bf16": {"precision": "bf16-mixed"},
             "bf16 fused": {"precision": "bf16-mixed", "fused": True}}
    if not is_dit:
        table["bf16 channels_last"] = {"precision": "bf16-mixed", "fused": True, "channels_last": True}
    if compile_net:
        table["bf16 compile"] = {"precision": "bf16-mixed", "fused": True, "compile": True}
    return table


def prepare(model, x: torch.Tensor, options: dict) -> torch.Tensor:
    """Apply a variant's switches to ``model``; return the input batch in the variant's memory format."""
    model.optimizer_factory = partial(torch.optim.AdamW, lr=1e-4, **({"fused": True} if options.get("fused") else {}))
    fmt = torch.channels_last if options.get("channels_last") else torch.contiguous_format
    model.to(memory_format=fmt)
    model._compile = bool(options.get("compile"))
    return x.contiguous(memory_format=fmt)


def sample_seconds(model, count: int, precision: str) -> float:
    model.sample_precision = precision
    start = time.perf_counter()
    model.sample(count, **SAMPLING[type(model)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--sample-count", type=int, default=None, help="images per sampling run (default: batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="training batch of every model (default: its own)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rows = []
    for name, spec in MODELS.items():
        if args.only and args.only not in name:
            continue
        if args.batch:
            name = name.replace(f"batch {spec['batch']}", f"batch {args.batch}")
            spec = {**spec, "batch": args.batch}
        model, x, y = build(spec)
        table = variants(spec, args.compile)
        best = {key: float("inf") for key in table}
        startup: dict[str, float] = {}
        for _ in range(args.repeats):
            for key, options in table.items():
                batch = prepare(model, x, options)
                times = train_step_times(model, batch, y, args.warmup + args.steps, options["precision"])
                if options.get("compile") and key not in startup:
                    startup[key] = times[0]  # the first step compiles
                best[key] = min(best[key], sum(times[args.warmup:]) / args.steps)
            prepare(model, x, {})
        count = args.sample_count or spec["batch"]
        sampling = {"32": float("inf"), "bf16": float("inf")}
        for _ in range(args.repeats):
            for precision in sampling:
                sampling[precision] = min(sampling[precision], sample_seconds(model, count, precision))
        row = {"model": name, "batch": spec["batch"],
               "train_step_s": best, "train_speedup_vs_fp32": {k: best["fp32"] / v for k, v in best.items()},
               "compile_startup_s": startup, "sample_images": count, "sample_s": sampling,
               "sample_speedup_bf16": sampling["32"] / sampling["bf16"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("\n| model | variant | train step (ms) | vs fp32 |")
    print("|---|---|---|---|")
    for r in rows:
        for key, seconds in r["train_step_s"].items():
            extra = f" (first step {r['compile_startup_s'][key]:.1f} s)" if key in r["compile_startup_s"] else ""
            print(f"| {r['model']} | {key}{extra} | {1000 * seconds:.1f} | {r['train_speedup_vs_fp32'][key]:.2f}x |")
    print("\n| model | sampling fp32 (s) | sampling bf16 (s) | bf16 speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['sample_images']} images) | {r['sample_s']['32']:.2f} | "
              f"{r['sample_s']['bf16']:.2f} | {r['sample_speedup_bf16']:.2f}x |")


if __name__ == "__main__":
    main()
