"""Where Diff-Instruct's sampling speed-up goes: the one-step generator against its teacher's Heun sampler.

    python benchmarks/diff_instruct_speed.py [--checkpoint runs/diff_instruct/shapes/final.ckpt] [--batch 64]

The teacher's EDM Heun sampler with 18 steps makes 35 network evaluations (NFE) per image, the generator one, so
the ideal speed-up at equal batch is 35x. An earlier benchmark measured 9.3x. This script times, at one batch
size and after a warm-up (best of ``--repeats``):
1. ``DiffInstruct.sample`` end to end: the one-step generator, and the teacher with Heun 18 (``sampler: heun``);
2. the bare network calls under ``torch.no_grad``: one generator forward G(z, c) and one teacher denoiser call
   D(x; σ, c) at the same batch (the same U-Net, preconditioned);
3. what ``sample`` adds around the network: per-image seeded noise, label handling, eval-mode switching, clamping;
and profiles one one-step ``sample`` call (top operators by self time). The speed-up that a perfect
implementation would reach is (35 teacher calls + overhead) / (1 generator call + overhead), so the gap between it
and 35x is the overhead share, which the profile names.

Writes benchmarks/results/diff_instruct_speed.json and prints Markdown rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffusion_transfer.methods import DiffInstruct

HEUN = {"sampler": "heun", "steps": 18}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/diff_instruct/shapes/final.ckpt"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diff_instruct_speed.json"))
    args = parser.parse_args()
    if not args.checkpoint.exists():
        raise SystemExit(f"{args.checkpoint} is missing: run `diffusion-transfer fit --config "
                         "configs/diff_instruct/shapes.yaml` (after its EDM teacher, configs/edm/shapes.yaml)")
    model = DiffInstruct.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    batch, seeds = args.batch, range(args.batch)
    labels = torch.arange(batch) % max(model.num_classes, 1)
    z = torch.randn(batch, *model.generator.latent_shape)
    sigma = torch.full((batch,), 1.0)

    one_step = best_seconds(lambda: model.sample(seeds=seeds), args.repeats)
    heun = best_seconds(lambda: model.sample(seeds=seeds, **HEUN), max(1, args.repeats // 2))
    with torch.no_grad():
        generator_call = best_seconds(lambda: model.generator(z, labels), args.repeats)
        denoiser = model.guided_denoiser(labels, 1.0)
        teacher_call = best_seconds(lambda: denoiser(z, sigma), args.repeats)
    teacher_nfe = 2 * HEUN["steps"] - 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.sample(seeds=seeds)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    row = {
        "checkpoint": str(args.checkpoint), "batch": batch, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "one_step_sample_s": one_step, "heun18_sample_s": heun, "generator_call_s": generator_call,
        "teacher_call_s": teacher_call, "teacher_nfe": teacher_nfe,
        "measured_speedup": heun / one_step, "nfe_ratio": teacher_nfe,
        "network_only_speedup": teacher_nfe * teacher_call / generator_call,
        "one_step_overhead_s": one_step - generator_call, "heun_overhead_s": heun - teacher_nfe * teacher_call,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**row, "profile_one_step": table}, indent=1))
    print(table)
    print("| batch | one-step sample (ms) | Heun 18 sample (ms) | measured speed-up | generator call (ms) | "
          "teacher call (ms) | 35 calls / 1 call | overhead of one-step sample (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {batch} | {1e3 * one_step:.1f} | {1e3 * heun:.0f} | {row['measured_speedup']:.1f}x | "
          f"{1e3 * generator_call:.1f} | {1e3 * teacher_call:.1f} | {row['network_only_speedup']:.1f}x | "
          f"{1e3 * row['one_step_overhead_s']:.1f} |")


if __name__ == "__main__":
    main()
