"""Diff-Instruct on shapes: a one-step generator distilled from an EDM teacher vs the teacher's 18-step Heun sampler.

    make runs/demo/features/final.ckpt      # the feature network (and runs/demo data)
    python benchmarks/diff_instruct.py [--teacher-steps 600] [--iterations 100] [--seeds 0,1] [--num-images 500]
    python benchmarks/diff_instruct.py --tiny       # smoke test: tiny models, a few steps, results under /tmp

Protocol:
1. the teacher: configs/edm/shapes.yaml (a small class-conditional EDM U-Net) trained on the "outline" shapes
   (``runs/demo/shapes-outline-16.zip``, the feature network's domain) for ``--teacher-steps`` steps; an existing
   ``<work>/teacher-outline.ckpt`` is reused; or ``--teacher PATH``, a teacher trained elsewhere, e.g. the
   shapes config's on "filled" (then pass ``--data`` and ``--feature-network`` of that domain);
2. for each seed s: Diff-Instruct (configs/diff_instruct/shapes.yaml, generator = the teacher applied once at
   σ_init = 1) for ``--iterations`` iterations (2 optimizer steps each), training seed s; data-free: the data
   module only supplies labels;
3. FID and class accuracy of ``--num-images`` balanced samples with the shapes FeatureClassifier against the outline
   data set, through ``diffusion-transfer validate``: the distilled generator (EMA weights, 1 evaluation), the
   undistilled one-step generator (the teacher applied once at σ_init, the starting point) and the teacher with
   Heun, 18 steps = 35 evaluations; evaluation seeds s · 100000 + i, so every row has one value per seed;
4. sampling speed (images/s, batch ``--speed-batch``, after a warm-up) of the generator and the teacher on this
   machine, and their ratio.
Writes benchmarks/results/diff_instruct.json and prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import CPU_QUIET, checkpoint_callback, evaluate_report, train_once

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes
from diffusion_transfer.methods import DiffInstruct

TEACHER_CONFIG, DI_CONFIG = "configs/edm/shapes.yaml", "configs/diff_instruct/shapes.yaml"
TINY_UNET = "{model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [8], dropout: 0.0, " \
            "augment_dim: 0}"
HEUN = {"sampler": "heun", "steps": 18}
METRICS = ("fid", "accuracy")


def distil(seed: int, args: argparse.Namespace, arch: list[str]) -> Path:
    checkpoint = args.work / "checkpoints" / f"diff-instruct-seed{seed}.ckpt"
    checkpoint.unlink(missing_ok=True)
    cli(["fit", "--config", DI_CONFIG, *arch, *CPU_QUIET, "--seed_everything", str(seed),
         "--model.init_args.train_seed", str(seed), "--model.init_args.checkpoint", str(args.teacher),
         "--model.init_args.val_num_images", "0", "--data.init_args.path", str(args.data),
         "--trainer.max_steps", str(2 * args.iterations), "--trainer.limit_val_batches", "0",
         "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
         "--trainer.logger", "false", "--trainer.default_root_dir", str(args.work / "fit"),
         "--trainer.callbacks", checkpoint_callback(checkpoint)])
    return checkpoint


def evaluate(config: str, checkpoint: Path | None, model_args: list[str], sampling: dict, seed: int,
             args: argparse.Namespace, arch: list[str], output: Path) -> dict:
    """FID and accuracy of ``checkpoint`` (None: the config's starting weights as ``model_args`` set them)."""
    result = evaluate_report(
        config, checkpoint, args.feature_network, output.parent, args.num_images,
        json.dumps(sampling) if sampling else None,
        [*arch, *model_args, "--data.init_args.path", str(args.data), "--trainer.logger", "false",
         "--trainer.callbacks", "[]", "--metrics.kid", "false", "--metrics.precision_recall", "false"],
        seed=seed * 100000, output=output.name)
    return {"seed": seed, **{k: result["metrics"][k] for k in METRICS}}


def images_per_second(model: DiffInstruct, batch: int, repeats: int, **sampling) -> float:
    model.sample(seeds=range(batch), **sampling)  # warm-up
    started = time.perf_counter()
    for r in range(repeats):
        model.sample(seeds=range(r * batch, (r + 1) * batch), **sampling)
    return repeats * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=600, help="EDM teacher training steps (batch 32)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="an existing EDM teacher checkpoint (e.g. runs/edm/shapes/final.ckpt, `make "
                             "runs/edm/shapes/final.ckpt`) instead of training one on --data")
    parser.add_argument("--iterations", type=int, default=100, help="Diff-Instruct iterations per seed (batch 32)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num-images", type=int, default=500, help="generated images per FID")
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/shapes-outline-16.zip"))
    parser.add_argument("--feature-network", type=Path,
                        default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-diff-instruct"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diff_instruct.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny everything in a temporary folder")
    args = parser.parse_args()
    arch: list[str] = []
    if args.tiny:  # every model, data set and step count shrunk; teacher and feature network built here
        tmp = Path(tempfile.mkdtemp(prefix="bench-diff-instruct-"))
        arch = ["--model.init_args.arch_overrides", TINY_UNET]
        args.work, args.out, args.teacher_steps, args.iterations = tmp, tmp / "diff_instruct.json", 2, 2
        args.num_images, args.speed_batch = 40, 4
        args.data, args.feature_network = tmp / "outline.zip", tmp / "features.ckpt"
        make_shapes(args.data, resolution=16, per_class=8, seed=1, domain="outline")
        train_once("configs/features/shapes.yaml", args.data, args.feature_network, 2, [], args.work)
    for path in (args.data, args.feature_network):
        if not path.exists():
            raise SystemExit(f"{path} is missing; build the demo data and feature network first (see the header)")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    given_teacher = args.teacher is not None
    if given_teacher and not args.teacher.exists():
        raise SystemExit(f"{args.teacher} is missing; train it first (e.g. make runs/edm/shapes/final.ckpt)")
    args.teacher = args.teacher or args.work / "teacher-outline.ckpt"
    started = time.time()
    if not given_teacher:
        train_once(TEACHER_CONFIG, args.data, args.teacher, args.teacher_steps, arch, args.work)
    teacher_minutes = round((time.time() - started) / 60, 1)

    rows: dict[str, list[dict]] = {"Diff-Instruct, one step (1 NFE)": [],
                                   "one-step generator before distillation (1 NFE)": [],
                                   "EDM teacher, Heun 18 steps (35 NFE)": []}
    names = list(rows)
    fit_seconds = []
    for seed in seeds:
        fit_started = time.time()
        checkpoint = distil(seed, args, arch)
        fit_seconds.append(time.time() - fit_started)
        metrics = args.work / "metrics"
        rows[names[0]].append(evaluate(DI_CONFIG, checkpoint, ["--model.init_args.checkpoint", "null"], {}, seed, args,
                                       arch, metrics / f"di-{seed}.json"))
        rows[names[1]].append(evaluate(DI_CONFIG, None, ["--model.init_args.checkpoint", str(args.teacher)], {}, seed,
                                       args, arch, metrics / f"init-{seed}.json"))
        rows[names[2]].append(evaluate(TEACHER_CONFIG, args.teacher, [], HEUN, seed, args, arch,
                                       metrics / f"teacher-{seed}.json"))

    model = DiffInstruct.load_from_checkpoint(checkpoint, map_location="cpu").eval()  # the last seed's
    speed = {"one_step": images_per_second(model, args.speed_batch, 3),
             "teacher_heun18": images_per_second(model, args.speed_batch, 1, **HEUN)}
    speed["ratio"] = speed["one_step"] / speed["teacher_heun18"]
    summary = {name: {k: {"mean": statistics.mean(r[k] for r in rs),
                          "std": statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0} for k in METRICS}
               for name, rs in rows.items()}
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"torch_threads": torch.get_num_threads(), "device": "cpu"},
              "minutes": round((time.time() - started) / 60, 1), "teacher_minutes": teacher_minutes,
              "distillation_minutes_per_seed": [round(s / 60, 2) for s in fit_seconds],
              "runs": rows, "summary": summary, "images_per_second": speed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| sampler | FID ({args.num_images} images) | class accuracy | images/s (CPU) | seeds |\n"
          "|---|---|---|---|---|")
    speeds = [speed["one_step"], speed["one_step"], speed["teacher_heun18"]]
    for (name, s), ips in zip(summary.items(), speeds):
        print(f"| {name} | {s['fid']['mean']:.2f} ± {s['fid']['std']:.2f} | "
              f"{s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | {ips:.1f} | {len(seeds)} |")
    print(f"one-step / teacher sampling speed: {speed['ratio']:.1f}x; wrote {args.out} ({record['minutes']} min)")


if __name__ == "__main__":
    main()
