"""DDPM vs CBDM vs T2H on long-tailed shapes (imbalance 0.01), several seeds, equal steps.

    make runs/demo/pretrain-unet/final.ckpt runs/demo/features/final.ckpt
    python benchmarks/longtail.py [--steps 350] [--seeds 0,1,2] [--methods ddpm,cbdm,t2h] [--num-images 1000]
                                  [--guidance-scales 2.5,config]
    python benchmarks/longtail.py --tiny       # smoke test: tiny models, a few steps, results under /tmp

Departures from the spec (papers/longtail.md), which trains the DDPM CIFAR U-Net from scratch with a fixed variance
(eps MSE only) on CIFAR-LT: this is a **transfer** benchmark. Each method fine-tunes the demo's DDPM U-Net (1.1M
parameters, v-prediction, pre-trained on the balanced "filled" shapes domain) to a long-tailed "outline" domain, and
keeps its **learned sigma** (IDDPM hybrid loss: MSE + VB, the pre-trained checkpoint has the variance channels);
the MSE regresses v, CBDM's regulariser compares v predictions and T2H's re-targeted pair gives the v target.
``--pretrained none`` trains the same U-Net from scratch instead; the spec's recipe is
configs/longtail/*_cifar10lt.yaml. (Until 2026-12-07 the configs fine-tuned a DiT-S/4 eps source instead.)
Evaluation follows the spec: DDIM 100, w = 1.5; ``--guidance-scales 2.5,config`` also evaluates every run at the
scale of its method's config (the scale best for that method on seeds 200000, ``benchmarks/guidance.py --seed
200000``).

Protocol, for each seed s and each method (configs/longtail/{ddpm,cbdm,t2h}_shapes.yaml):
1. training data: the "outline" shapes (runs/demo/shapes-outline-16.zip, 200 images per class) cut to the long-tailed
   subset of ``--imbalance`` 0.01 by the data module (``longtail_imbalance``, as ``diffusion-transfer-data
   longtail``): class c keeps int(200 * 0.01^(c/19)) images, 200 for class 0 down to 2 for class 19, 911 in all;
2. the model: the demo's U-Net pre-trained on balanced "filled" shapes (runs/demo/pretrain-unet/final.ckpt),
   fine-tuned for ``--steps`` steps (batch 64, AdamW 5e-4, EMA 0.99, training seed s), the same for the three
   methods: whole-batch label drop 0.1; CBDM adds its regulariser (tau 1, gamma 1/4, y' uniform); T2H re-targets eps
   within each batch (mode t2h, no cut time), all with the configs' low-noise law. The configs train 2,000 steps;
   ``--steps`` sets another length;
3. evaluation: ``--num-images`` samples with balanced labels (EMA weights, DDIM ``--eval-steps`` 100 as T2H's
   evaluator) at each scale of ``--guidance-scales`` (default T2H's w = 1.5, i.e. guidance_scale 2.5), measured with
   the shapes FeatureClassifier against the **full, balanced** outline set: FID, tail FID (the 6 rarest classes,
   14-19, pooled; reference: their balanced images), mean per-class FID, and class accuracy.
Writes benchmarks/results/longtail.json (every run, mean and sample std over seeds) and prints Markdown rows for
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from common import CPU_QUIET, checkpoint_callback, evaluate_report, train_once

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes

METHODS = {"ddpm": "DDPM (CFG)", "cbdm": "CBDM", "t2h": "T2H"}
METRICS = ("fid", "fid_tail", "fid_class_mean", "accuracy")


def config(method: str) -> str:
    return f"configs/longtail/{method}_shapes.yaml"


def fine_tune(method: str, seed: int, args: argparse.Namespace, arch: list[str], work: Path) -> Path:
    checkpoint = work / "checkpoints" / f"{method}-seed{seed}.ckpt"
    checkpoint.unlink(missing_ok=True)
    start = "null" if str(args.pretrained) == "none" else str(args.pretrained)
    cli(["fit", "--config", config(method), *arch, *CPU_QUIET, "--seed_everything", str(seed),
         "--model.init_args.train_seed", str(seed), "--model.init_args.checkpoint", start,
         "--model.init_args.val_num_images", "0", "--data.init_args.path", str(args.data),
         "--data.init_args.longtail_imbalance", str(args.imbalance), "--data.init_args.seed", str(seed),
         "--metrics.feature_network", "null", "--trainer.max_steps", str(args.steps),
         "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
         "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(work / "fit"), "--trainer.callbacks", checkpoint_callback(checkpoint)])
    return checkpoint


def config_guidance(method: str) -> float:
    """The guidance scale the method's shapes config samples with (its ``metrics.sampling``)."""
    return float(yaml.safe_load(Path(config(method)).read_text())["metrics"]["sampling"]["guidance_scale"])


def evaluate(method: str, checkpoint: Path, args: argparse.Namespace, arch: list[str], output: Path,
             guidance_scale: float) -> dict:
    """Validate with metrics: the data module keeps the long-tailed class counts (for the tail), while the reference
    statistics are those of the full balanced zip (``<zip>.<network>.npz``)."""
    sampling = {"sampler": "ddim", "steps": args.eval_steps, "guidance_scale": guidance_scale}
    return evaluate_report(
        config(method), checkpoint, args.feature_network, output.parent, args.num_images, json.dumps(sampling),
        [*arch, "--model.init_args.checkpoint", "null", "--data.init_args.path", str(args.data),
         "--data.init_args.longtail_imbalance", str(args.imbalance), "--trainer.logger", "false",
         "--trainer.callbacks", "[]", "--metrics.per_class", "true", "--metrics.tail_fraction", "0.3",
         "--metrics.kid", "false", "--metrics.precision_recall", "false"], seed=0, output=output.name)


def summarise(values: list[float | None]) -> dict[str, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    return {"mean": statistics.mean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0}


def cell(s: dict[str, float | None], digits: int) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=350, help="fine-tuning steps of every run (batch 64)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="ddpm,cbdm,t2h", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--imbalance", type=float, default=0.01, help="tail/head ratio of the training subset")
    parser.add_argument("--num-images", type=int, default=1000, help="generated images per evaluation")
    parser.add_argument("--eval-steps", type=int, default=100, help="DDIM steps (T2H's evaluator: 100)")
    parser.add_argument("--guidance-scales", default="2.5",
                        help="comma-separated s = 1 + w (T2H's w = 1.5: 2.5), or 'config': the method config's scale")
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo/pretrain-unet/final.ckpt"),
                        help="starting weights, or 'none' to train from scratch")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/shapes-outline-16.zip"),
                        help="the full balanced data set (training uses its long-tailed subset)")
    parser.add_argument("--feature-network", type=Path,
                        default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-longtail"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/longtail.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny everything in a temporary folder")
    args = parser.parse_args()
    arch: list[str] = []
    if args.tiny:  # tiny models and data; the source model and the feature network are built here
        tmp = Path(tempfile.mkdtemp(prefix="bench-longtail-"))
        arch = ["--model.init_args.arch_overrides",
                "{model_channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [], dropout: 0.0}"]
        args.work, args.out, args.steps, args.num_images, args.eval_steps = tmp, tmp / "longtail.json", 3, 240, 2
        args.seeds = ",".join(args.seeds.split(",")[:2])
        args.pretrained, args.feature_network, args.data = tmp / "pretrained.ckpt", tmp / "features.ckpt", tmp / "o.zip"
        make_shapes(tmp / "filled.zip", resolution=16, per_class=20, seed=0, domain="filled")
        make_shapes(args.data, resolution=16, per_class=20, seed=1, domain="outline")
        train_once("configs/diffusion/shapes16_pretrain_unet.yaml", tmp / "filled.zip", args.pretrained, 2,
                   arch, tmp)
        train_once("configs/features/shapes.yaml", args.data, args.feature_network, 2, [], tmp)
    for path in (args.data, args.feature_network, *([] if str(args.pretrained) == "none" else [args.pretrained])):
        if not path.exists():
            raise SystemExit(f"{path} is missing; build the demo data and models first (see this script's header)")
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    scales = {method: [config_guidance(method) if g.strip() == "config" else float(g)
                       for g in args.guidance_scales.split(",")] for method in methods}
    scales = {method: list(dict.fromkeys(found)) for method, found in scales.items()}  # config may repeat 2.5
    runs: dict[str, list[dict]] = {f"{method}@{g}": [] for method in methods for g in scales[method]}
    for seed in seeds:
        for method in methods:
            checkpoint = fine_tune(method, seed, args, arch, args.work)
            for g in scales[method]:
                result = evaluate(method, checkpoint, args, arch,
                                  args.work / "metrics" / f"{checkpoint.stem}-g{g}.json", g)
                metrics = result["metrics"]
                runs[f"{method}@{g}"].append(
                    {"seed": seed, "guidance_scale": g, **{k: metrics.get(k) for k in METRICS},
                     **({"fid_tail_error": metrics["fid_tail_error"]} if "fid_tail_error" in metrics else {}),
                     "feature_network": result["feature_network"], "reference": result["reference"]})

    summary = {key: {k: summarise([r[k] for r in rs]) for k in METRICS} for key, rs in runs.items()}
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "protocol": {"sampler": "ddim", "steps": args.eval_steps, "guidance_scales": scales,
                           "labels": "balanced", "tail": "rarest 30% of classes by training count"},
              "minutes": round((time.time() - started) / 60, 1), "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| method | guidance | FID ({args.num_images} images) | tail FID | mean per-class FID | class accuracy | "
          "seeds |\n|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        method, g = key.split("@")
        print(f"| {METHODS[method]} | {g} | {cell(s['fid'], 2)} | {cell(s['fid_tail'], 2)} | "
              f"{cell(s['fid_class_mean'], 2)} | {cell(s['accuracy'], 3)} | {len(seeds)} |")
    print(f"wrote {args.out} ({record['minutes']} min)")


if __name__ == "__main__":
    main()
