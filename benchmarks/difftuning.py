"""Diffusion Tuning vs standard fine-tuning on a shapes transfer (filled -> outline), several seeds.

    make runs/demo/pretrain-unet/final.ckpt runs/demo/features/final.ckpt
    python benchmarks/difftuning.py [--per-class 200] [--steps 3200] [--seeds 0,1,2] [--guidance 1.5,2.0]
    python benchmarks/difftuning.py --backbone dit       # the same on the DiT source (make runs/demo/pretrain-dit/...)
    python benchmarks/difftuning.py --testbed broad --work runs/bench-difftuning-broad   # the broad source, few-shot
    python benchmarks/difftuning.py --tiny       # smoke test: tiny models, a few steps, results under /tmp

``--testbed broad`` ([reproduction] item 1) builds everything in ``--work`` (``--source``, ``--target`` and
``--feature-network`` are then those files, whatever the options say): a source pre-trained (4,800 steps) on
two styles, "filled" and "cutout", with all 8 shape kinds (40 classes, 100 images of each in each style), and a
few-shot target in the style the source never saw: 10 "outline" images per class of the same 40 classes (seed
1000 + s). Its FeatureClassifier and FID reference are a full "outline" set of the 40 classes (100 a class, seed 0).

Protocol, for each seed s:
1. the source model (``--backbone``): the demo's U-Net pre-trained on "filled" shapes
   (configs/diffusion/shapes16_pretrain_unet.yaml), or the DiT of configs/diffusion/shapes16_pretrain.yaml; trained
   here with its config when the file is missing;
2. the replay bank (once): ``--bank-size`` samples of the source model through ``predict`` with
   configs/difftuning/bank.yaml (``--bank-sampler``/``--bank-steps``: DDPM 100 as the config);
3. the target set: ``--per-class`` "outline" images per class, drawn with seed 1000 + s (a different set per seed);
4. two fine-tunings from the source model, same data, steps, batch, optimiser, EMA and training seed:
   standard fine-tuning (configs/quickstart.yaml with uniform t, ``low_noise_scale: 0``: the papers' baseline) and
   Diffusion Tuning (configs/difftuning/shapes.yaml: 20% replay rows at weight 0.1, its two t-laws at the config's
   ``prob_scale``);
5. at each scale of ``--guidance``: FID, precision/recall (k = 3) and class accuracy of ``--num-images`` balanced
   samples (EMA weights, DDPM ``--eval-steps``, x0 clipped) with the shapes FeatureClassifier, against the full
   outline data set (``runs/demo/shapes-outline-16.zip``), sample seeds 100000 on (never used in training).
Writes benchmarks/results/difftuning_<backbone>.json (every run, mean and sample std over seeds) and prints Markdown
rows for docs/results.md. The table of 2026-11-22 in docs/results.md came from this script's first version (DiT-S/4 eps
source, 20 images per class, 500 steps, DDIM 50 at guidance 2.0, FID and accuracy of 1,000 images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    BROAD_SOURCE_DOMAIN,
    BROAD_SOURCE_KINDS,
    BROAD_SOURCE_STEPS,
    CPU_QUIET,
    checkpoint_callback,
    make_broad_source,
    train_once,
)
from common import evaluate as common_evaluate

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes

#: name -> (config, extra overrides). The two ablations separate Diff-Tuning's two ingredients.
METHODS = {
    "standard fine-tuning": ("configs/quickstart.yaml", ["--model.init_args.low_noise_scale", "0"]),
    "Diffusion Tuning": ("configs/difftuning/shapes.yaml", []),
    "ablation: replay with uniform t": ("configs/difftuning/shapes.yaml", ["--model.init_args.t_law", "uniform"]),
    "ablation: t-law without replay": ("configs/difftuning/shapes.yaml", ["--model.init_args.replay_weight", "0"]),
}
DEFAULT_METHODS = "standard fine-tuning,Diffusion Tuning"
METRICS = ("fid", "precision", "recall", "accuracy")
#: --backbone -> (source config, source checkpoint, the options that put both fine-tuning configs on it)
BACKBONES = {
    "unet": ("configs/diffusion/shapes16_pretrain_unet.yaml", "runs/demo/pretrain-unet/final.ckpt", []),
    "dit": ("configs/diffusion/shapes16_pretrain.yaml", "runs/demo/pretrain-dit/final.ckpt",
            ["--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides",
             "{hidden_size: 128, depth: 4, num_heads: 4}"]),
}
#: --testbed -> shapes options and step counts of the source and the target; "narrow" uses the demo's files.
TESTBEDS = {
    "narrow": {"source_domain": "filled", "kinds": "base", "source_steps": 2400, "per_class": 200, "steps": 3200},
    "broad": {"source_domain": BROAD_SOURCE_DOMAIN, "kinds": BROAD_SOURCE_KINDS, "source_steps": BROAD_SOURCE_STEPS,
              "per_class": 10, "steps": 2000},
}


def fine_tune(method: str, seed: int, data: Path, args: argparse.Namespace, arch: list[str], work: Path) -> Path:
    config, extra = METHODS[method]
    slug = "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")
    checkpoint = work / "checkpoints" / f"{slug}-seed{seed}.ckpt"
    checkpoint.unlink(missing_ok=True)
    cli(["fit", "--config", config, *extra, *arch, *CPU_QUIET, "--seed_everything", str(seed),
         "--model.init_args.train_seed", str(seed), "--model.init_args.checkpoint", str(args.pretrained),
         "--model.init_args.val_num_images", "0", "--data.init_args.path", str(data),
         "--data.init_args.seed", str(seed), "--metrics.feature_network", "null", "--trainer.max_steps",
         str(args.steps), "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
         "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(work / "fit"), "--trainer.callbacks", checkpoint_callback(checkpoint),
         *(["--model.init_args.replay_bank", str(work / "bank.zip")] if "difftuning" in config else [])])
    return checkpoint


def evaluate(method: str, checkpoint: Path, args: argparse.Namespace, arch: list[str], work: Path,
             guidance: float) -> dict:
    return common_evaluate(METHODS[method][0], checkpoint, args.feature_network, work, args.num_images,
                           json.dumps({"sampler": "ddpm", "steps": args.eval_steps, "guidance_scale": guidance}),
                           [*arch, "--model.init_args.checkpoint", "null", "--data.init_args.path", str(args.target),
                            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--metrics.kid", "false"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", choices=list(TESTBEDS), default="narrow",
                        help="narrow: the demo's filled source and 20 classes; broad: see the header")
    parser.add_argument("--per-class", type=int, default=None,
                        help="target images per class (default: the testbed's, 200 narrow, 10 broad)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps of each run, batch 64 (default: the testbed's, 3200 / 2000)")
    parser.add_argument("--backbone", choices=list(BACKBONES), default="unet")
    parser.add_argument("--guidance", default="1.5,2.0", help="guidance scales of the evaluation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--bank-size", type=int, default=2000)
    parser.add_argument("--bank-sampler", default="ddpm")
    parser.add_argument("--bank-steps", type=int, default=100)
    parser.add_argument("--num-images", type=int, default=200, help="generated images per evaluation")
    parser.add_argument("--eval-steps", type=int, default=100, help="DDPM steps of the evaluation")
    parser.add_argument("--pretrained", type=Path, default=None, help="the source (default: the backbone's)")
    parser.add_argument("--source", type=Path, default=Path("runs/demo/shapes-filled-16.zip"))
    parser.add_argument("--target", type=Path, default=Path("runs/demo/shapes-outline-16.zip"))
    parser.add_argument("--feature-network", type=Path,
                        default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-difftuning"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/difftuning_<backbone>.json")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny everything in a temporary folder")
    args = parser.parse_args()
    source_config, pretrained, arch = BACKBONES[args.backbone]
    testbed = TESTBEDS[args.testbed]
    args.per_class = args.per_class or testbed["per_class"]
    args.steps = args.steps or testbed["steps"]
    args.out = args.out or Path(f"benchmarks/results/difftuning_{args.backbone}"
                                f"{'_broad' if args.testbed == 'broad' else ''}.json")
    if args.tiny:  # every model, data set and step count shrunk; source model and feature network built here
        tmp = Path(tempfile.mkdtemp(prefix="bench-difftuning-"))
        arch = ["--model.init_args.arch_overrides", "{model_channels: 16, channel_mult: [1, 2], num_blocks: 1, "
                "attn_resolutions: [8], dropout: 0.0, min_channels_per_group: 4}"] if args.backbone == "unet" else [
                "--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides",
                "{hidden_size: 32, depth: 2, num_heads: 2}"]
        args.work, args.out, args.steps, args.bank_size, args.bank_steps = tmp, tmp / "difftuning.json", 2, 16, 2
        args.num_images, args.eval_steps, args.per_class = 40, 2, 4
        args.pretrained, args.feature_network = tmp / "pretrained.ckpt", tmp / "features.ckpt"
        args.source, args.target = tmp / "filled.zip", tmp / "outline.zip"
        make_shapes(args.source, resolution=16, per_class=8, seed=0, domain=testbed["source_domain"],
                    kinds=testbed["kinds"])
        make_shapes(args.target, resolution=16, per_class=8, seed=1, domain="outline", kinds=testbed["kinds"])
    elif args.testbed == "broad":  # every file of the broad testbed lives in the work folder, built below
        args.pretrained = args.pretrained or args.work / "pretrained.ckpt"
        args.source, args.target = args.work / "shapes-broad-16.zip", args.work / "shapes-outline-all-16.zip"
        args.feature_network = args.work / "features.ckpt"
        args.work.mkdir(parents=True, exist_ok=True)
        make_broad_source(args.source)
        if not args.target.exists():  # the target style's full set: the FeatureClassifier's data and FID reference
            make_shapes(args.target, resolution=16, per_class=100, seed=0, domain="outline", kinds=testbed["kinds"])
    args.pretrained = args.pretrained or Path(pretrained)
    for path in (args.source, args.target):
        if not path.exists():
            raise SystemExit(f"{path} is missing; build the demo data first (see this script's header)")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_once(source_config, args.source, args.pretrained, 2 if args.tiny else testbed["source_steps"], arch,
               args.work)
    train_once("configs/features/shapes.yaml", args.target, args.feature_network, 2 if args.tiny else 800, [],
               args.work)
    bank = args.work / "bank.zip"
    if not bank.exists():
        cli(["predict", "--config", "configs/difftuning/bank.yaml", *arch, *CPU_QUIET, "--model.init_args.checkpoint",
             str(args.pretrained), "--data.init_args.path", str(args.source),
             "--data.init_args.predict_seeds", f"0-{args.bank_size - 1}",
             "--model.init_args.sampler", args.bank_sampler, "--model.init_args.sample_steps", str(args.bank_steps),
             "--writer.output_dir", str(args.work / "bank"), "--writer.zip_path", str(bank),
             "--trainer.default_root_dir", str(args.work)])
        shutil.rmtree(args.work / "bank")  # the zip holds the same images

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    scales = [float(g) for g in args.guidance.split(",")]
    rows = [f"{method}, guidance {g}" for method in methods for g in scales]
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for seed in seeds:
        data = args.work / f"outline-{args.per_class}pc-seed{seed}.zip"
        if not data.exists():
            make_shapes(data, resolution=16, per_class=args.per_class, seed=1000 + seed, domain="outline",
                        kinds=testbed["kinds"])
        for method in methods:
            checkpoint = fine_tune(method, seed, data, args, arch, args.work)
            for g in scales:
                result = evaluate(method, checkpoint, args, arch, args.work / "metrics" / f"{checkpoint.stem}-g{g}", g)
                runs[f"{method}, guidance {g}"].append({"seed": seed, **{k: result[k] for k in METRICS},
                                                       "feature_network": str(args.feature_network)})

    summary = {row: {k: {"mean": statistics.mean(r[k] for r in rs),
                         "std": statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0} for k in METRICS}
               for row, rs in runs.items()}
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "minutes": round((time.time() - started) / 60, 1), "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| method | FID ({args.num_images} images) | precision | recall | class accuracy | seeds |\n"
          "|---|---|---|---|---|---|")
    for row, s in summary.items():
        cells = " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("precision", "recall", "accuracy"))
        print(f"| {row} | {s['fid']['mean']:.2f} ± {s['fid']['std']:.2f} | {cells} | {len(seeds)} |")
    print(f"wrote {args.out} ({record['minutes']} min)")


if __name__ == "__main__":
    main()
