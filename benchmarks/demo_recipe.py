"""The ablation that chose the CPU recipe of ``make demo``: what each change buys in sample quality and minutes.

    make runs/demo/features/final.ckpt       # the target's feature classifier (and data)
    python benchmarks/demo_recipe.py --recipes baseline,patch2 [--seed 0] [--num-images 200]
    python benchmarks/demo_recipe.py --recipes unet --resample '{"sampler": "ddpm", "steps": 250}'

A ``RECIPES`` entry trains a DiT (or the U-Net) from scratch with ``configs/diffusion/shapes16_pretrain.yaml`` plus
its overrides, on the "outline" shapes (the demo's target domain: what the samples must look like). A ``TRANSFERS``
entry fine-tunes the cached pre-trained U-Net with ``configs/quickstart.yaml`` plus its overrides, as ``make demo``
does (``make runs/demo/pretrain-unet/final.ckpt`` first). Each run ends with one evaluation of
``--num-images`` samples at seeds from 100000 on (never used in training): class accuracy by the target's
FeatureClassifier, precision/recall (k = 3) and FID in its 32-d features. Wall time is the whole ``fit``
(training and the final evaluation). Each run's sample grid is kept under ``--work``; look at it.

Appends one JSON line per run to benchmarks/results/demo_recipe.jsonl and prints a Markdown row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CPU_QUIET, evaluate

from diffusion_transfer.cli import build_cli
from diffusion_transfer.cli import main as cli

WARMUP = ('{"class_path": "torch.optim.lr_scheduler.LinearLR", '
          '"init_args": {"start_factor": 0.01, "total_iters": %d}}')


def dit(patch: int, hidden: int, depth: int, heads: int) -> list[str]:
    return ["--model.init_args.arch", f"DiT-S/{patch}", "--model.init_args.arch_overrides",
            json.dumps({"hidden_size": hidden, "depth": depth, "num_heads": heads})]


def lr(value: float, warmup: int = 0) -> list[str]:
    out = ["--model.init_args.optimizer.init_args.lr", str(value)]
    return out + (["--model.init_args.lr_scheduler", WARMUP % warmup] if warmup else [])


#: name -> (max_steps, overrides of configs/diffusion/shapes16_pretrain.yaml): DiT/U-Net from scratch on "outline"
RECIPES: dict[str, tuple[int, list[str]]] = {
    # The recipe before this ablation: DiT-S/4 (16 tokens of 4x4 px), hidden 128, depth 4, lr 1e-3, 1600 steps.
    "baseline": (1600, dit(4, 128, 4, 4)),
    "patch2": (1600, dit(2, 128, 4, 4)),
    "patch2-warmup": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200)),
    "patch2-lr3e-4": (1600, dit(2, 128, 4, 4) + lr(3e-4, 100)),
    "patch2-fixed-var": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.learn_sigma", "false"]),
    "patch2-v": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.prediction", "v"]),
    "patch2-v-lr2e-3": (1600, dit(2, 128, 4, 4) + lr(2e-3, 200) + ["--model.init_args.prediction", "v"]),
    "patch2-v-fixed-var": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.prediction", "v",
                                                                      "--model.init_args.learn_sigma", "false"]),
    "patch2-x0": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.prediction", "x0"]),
    "patch2-cosine": (1600, dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.schedule", "cosine"]),
    "patch2-wide": (1600, dit(2, 192, 6, 6) + lr(1e-3, 200)),
    # A convolutional net in the same pipeline (the DDPM U-Net at 16 px): separates the recipe from the DiT.
    "unet": (1600, ["--model.init_args.arch", "ddpm-cifar10", "--model.init_args.arch_overrides",
                    json.dumps({"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1,
                                "attn_resolutions": [8], "dropout": 0.0})] + lr(1e-3, 200)),
    "unet-v": (1600, ["--model.init_args.arch", "ddpm-cifar10", "--model.init_args.arch_overrides",
                      json.dumps({"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1,
                                  "attn_resolutions": [8], "dropout": 0.0})] + lr(1e-3, 200)
               + ["--model.init_args.prediction", "v"]),
}


def cosine(peak: float, total: int, warmup: int = 0) -> list[str]:
    """Learning rate ``peak``: a warm-up over ``warmup`` steps from peak/100, then a cosine decay to peak/1e5 at
    step ``total`` (torch's OneCycleLR without momentum cycling)."""
    return ["--model.init_args.lr_scheduler", json.dumps({
        "class_path": "torch.optim.lr_scheduler.OneCycleLR",
        "init_args": {"max_lr": peak, "total_steps": total, "pct_start": warmup / total,
                      "anneal_strategy": "cos", "cycle_momentum": False, "div_factor": 100.0,
                      "final_div_factor": 1.0e3}})]


#: The DiT source of the ``dit-*`` transfers: configs/diffusion/shapes16_pretrain.yaml on "filled" with patch 2,
#: v-prediction and 200 warm-up steps, 2,400 steps (the U-Net source's recipe, on the DiT).
DIT_SOURCE = Path("runs/demo_recipe/dit-patch2-v-source")
DIT_SOURCE_OVERRIDES = dit(2, 128, 4, 4) + lr(1e-3, 200) + ["--model.init_args.prediction", "v",
                                                             "--trainer.max_steps", "2400",
                                                             "--trainer.val_check_interval", "1200"]


def dit_source() -> Path:
    """Train the DiT source once (its ``final.ckpt``), as ``make`` trains the U-Net one."""
    final = DIT_SOURCE / "final.ckpt"
    if not final.exists():
        cli(["fit", "--config", "configs/diffusion/shapes16_pretrain.yaml", *CPU_QUIET, *DIT_SOURCE_OVERRIDES,
             "--trainer.default_root_dir", str(DIT_SOURCE)])
    return final


def low_noise(scale: float) -> list[str]:
    """The training law P(t) ∝ (T - t)^s (``low_noise_scale``; 0 = uniform t)."""
    return ["--model.init_args.low_noise_scale", str(scale)]


#: The quickstart before 2026-12-07 (uniform t, unfused AdamW): the earlier ``transfer*`` rows keep it.
UNIFORM_T = low_noise(0.0) + ["--model.init_args.optimizer.init_args.fused", "false"]
BATCH_32 = ["--data.init_args.batch_size", "32"]

#: name -> (max_steps, overrides of configs/quickstart.yaml): transfers of the cached "filled" U-Net
#: (runs/demo/pretrain-unet/final.ckpt) to "outline", as `make demo` runs them.
TRANSFERS: dict[str, tuple[int, list[str]]] = {
    "transfer": (1600, UNIFORM_T),
    "transfer-1200": (1200, UNIFORM_T),
    "transfer-cosine-1e-3": (1200, UNIFORM_T + cosine(1e-3, 1200, 50)),
    "transfer-3200": (3200, UNIFORM_T),
    "transfer-bs32-2400": (2400, UNIFORM_T + BATCH_32),
    "transfer-bs32-3200-g1.5": (3200, UNIFORM_T + BATCH_32 + ["--model.init_args.guidance_scale", "1.5"]),
    "transfer-bs32-lr1e-3-2400": (2400, UNIFORM_T + BATCH_32 + lr(1e-3)),
    # The low-noise law (2026-12-07; rows at several steps come from one run with --eval-every).
    "transfer-low0.5-bs32-2400": (2400, UNIFORM_T + BATCH_32 + low_noise(0.5)),
    "transfer-low1-bs32-2400": (2400, UNIFORM_T + BATCH_32 + low_noise(1.0)),
    "transfer-low2-bs32-1600": (1600, UNIFORM_T + BATCH_32 + low_noise(2.0)),
    "transfer-low1-bs32-cosine-1600": (1600, UNIFORM_T + BATCH_32 + low_noise(1.0) + [
        "--model.init_args.lr_scheduler",
        '{"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 1600}}']),
    "transfer-low1-1600": (1600, UNIFORM_T + low_noise(1.0)),
    # configs/quickstart.yaml as it is: s = 1, fused AdamW, 2,000 steps of 64.
    "transfer-low1-2000": (2000, []),
    # The same transfer of the DiT source above (dit_source): the quickstart recipe on a patch-2 v-prediction DiT.
    "dit-transfer-3200": (3200, UNIFORM_T + dit(2, 128, 4, 4)
                          + ["--model.init_args.checkpoint", str(DIT_SOURCE / "final.ckpt")]),
}


def run(name: str, args: argparse.Namespace) -> list[dict]:
    config = "configs/quickstart.yaml" if name in TRANSFERS else "configs/diffusion/shapes16_pretrain.yaml"
    steps, overrides = {**RECIPES, **TRANSFERS}[name]
    if name.startswith("dit-"):
        dit_source()
    steps = args.steps or steps
    work = args.work / f"{name}-seed{args.seed}"
    command = ["fit", "--config", config, *CPU_QUIET, *overrides,
               "--data.init_args.path", str(args.data), "--seed_everything", str(args.seed),
               "--model.init_args.train_seed", str(args.seed),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(args.eval_every or steps),
               "--trainer.default_root_dir", str(work), "--trainer.callbacks", "[]",
               "--model.init_args.val_num_images", "40",
               "--metrics.feature_network", str(args.features), "--metrics.num_images", str(args.num_images),
               "--metrics.seed", "100000", "--metrics.per_class", "false", "--metrics.every_n_validations", "1"]
    if args.precision:
        command += ["--trainer.precision", args.precision]
    start = time.perf_counter()
    trainer = build_cli(command).trainer
    minutes = (time.perf_counter() - start) / 60
    val_loss = trainer.callback_metrics.get("val/loss")
    rows = []
    # One row per evaluation (--eval-every); minutes and the validation loss belong to the whole run.
    for report in sorted(work.rglob("metrics-val-step*.json"), key=lambda p: p.stat().st_mtime):
        results = json.loads(report.read_text())["metrics"]
        at = int(report.stem.rsplit("step", 1)[1])
        grid = report.parent / "samples" / f"step{at:07d}.png"
        rows.append({"recipe": name, "seed": args.seed, "steps": at, "run_steps": steps, "overrides": overrides,
                     "eval_every": args.eval_every, "minutes": minutes if at == steps else None,
                     "trainer_precision": str(trainer.precision),
                     "val_loss": None if val_loss is None or at != steps else float(val_loss),
                     "grid": str(grid) if grid.exists() else None,
                     **{k: results.get(k) for k in ("accuracy", "precision", "recall", "fid")}})
    return rows


def resample(name: str, args: argparse.Namespace) -> dict:
    """Evaluate a trained recipe's checkpoint again with other sampling options (``--resample JSON``)."""
    work = args.work / f"{name}-seed{args.seed}"
    checkpoint = max(work.rglob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    start = time.perf_counter()
    results = evaluate(checkpoint.parents[1] / "config.yaml", checkpoint, args.features, work / "resample",
                       args.num_images, args.resample)
    return {"recipe": name, "seed": args.seed, "resample": json.loads(args.resample), "checkpoint": str(checkpoint),
            "minutes": (time.perf_counter() - start) / 60,
            **{k: results.get(k) for k in ("accuracy", "precision", "recall", "fid")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's step count")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--precision", default=None, help="trainer precision (default: the CLI's choice)")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/shapes-outline-16.zip"))
    parser.add_argument("--features", type=Path, default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--work", type=Path, default=Path("runs/demo_recipe"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_recipe.jsonl"))
    parser.add_argument("--resample", default=None, help="JSON sampling options: re-evaluate trained recipes only")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate every N steps as well, one row each (training noise is seeded per step, "
                             "so the extra evaluations do not change the training)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.recipes.split(","):
        for row in [resample(name, args)] if args.resample else run(name, args):
            with args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")
            minutes = "" if row["minutes"] is None else f"{row['minutes']:.1f}"
            print(f"| {name} | {row.get('steps', args.resample)} | {row['accuracy']:.3f} | {row['precision']:.3f} | "
                  f"{row['recall']:.3f} | {row['fid']:.2f} | {minutes} | {row.get('grid')} |", flush=True)


if __name__ == "__main__":
    main()
