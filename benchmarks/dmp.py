"""Does DMP improve a converged DiT? DMP vs continued full fine-tuning vs prompt tuning on shapes, several seeds.

    make runs/demo/pretrain-dit/final.ckpt
    python benchmarks/dmp.py [--steps 400] [--seeds 0,1,2] [--num-images 1000]
    python benchmarks/dmp.py --tiny       # smoke test: tiny models, a few steps, results under /tmp
    # on the DiT that draws "outline" shapes (the base of configs/dmp/shapes.yaml):
    make runs/demo/dit-outline/final.ckpt
    python benchmarks/dmp.py --base-config configs/diffusion/shapes16_dit_outline.yaml \
        --pretrained runs/demo/dit-outline/final.ckpt --data runs/demo/shapes-outline-16.zip \
        --work runs/bench-dmp-outline --out benchmarks/results/dmp_outline.json

The paper's claim (papers/dmp.md §5): further training of a converged DiT on its own pre-training data makes it worse
with full fine-tuning or naive prompt tuning, and better with DMP. Protocol, all on the base's domain (``--data``;
default "filled"):
1. the feature network for FID: configs/features/shapes.yaml trained on that data (once, in the work folder);
2. convergence: the base's run (``--base-config``, default configs/diffusion/shapes16_pretrain.yaml: lr 1e-3, EMA
   0.995) is resumed from its checkpoint (``runs/demo``; trained here when missing) in chunks of ``--chunk`` steps,
   with the FID of its EMA weights after each chunk, until ``--patience`` chunks in a row fail to beat the best FID
   so far by more than ``--tol`` (relative). Its last checkpoint is the converged model. If the FID is still
   improving after ``--max-chunks`` chunks the script stops without comparing (``--allow-unconverged`` compares
   anyway). Chunks and their FIDs already in the work folder are reused, so a rerun with a larger ``--max-chunks``
   continues; resume is exact, so the chunk size changes only where the FID is measured;
3. for each seed, ``--steps`` more steps from the converged model on the same data, batch 64, raw weights (no EMA,
   as the paper), constant lr: DMP (configs/dmp/shapes.yaml: prompts 1e-4, gate 1e-3, balance loss weight 1), naive
   prompt tuning (the same, ``gating: false``) and full fine-tuning (the base's config at lr 1e-4);
   ``--lr-scale`` multiplies all three learning rates;
4. FID and class accuracy of ``--num-images`` balanced samples (DDIM 50, guidance 2.0, sample seeds 0..n-1 for every
   model) with that feature network, against the whole data set.
Writes benchmarks/results/dmp.json (FID curve of the convergence phase, every run, mean and sample std over seeds,
added parameters) and prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import CPU_QUIET, checkpoint_callback, fit_into, train_once
from common import evaluate as common_evaluate

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes

PRETRAIN = "configs/diffusion/shapes16_pretrain.yaml"
DMP_CONFIG = "configs/dmp/shapes.yaml"
#: name -> (config, base learning rate, extra overrides); every run also gets --ema.decay 0 (raw weights).
METHODS = {
    "DMP": (DMP_CONFIG, 1e-4, []),
    "prompt tuning": (DMP_CONFIG, 1e-4, ["--model.init_args.gating", "false"]),
    "full fine-tuning": (None, 1e-4, []),  # the base's own config (--base-config)
}
METRICS = ("fid", "accuracy", "precision", "recall")
NO_VAL = ["--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
          "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
          "--model.init_args.val_num_images", "0"]


def evaluate(config: str, checkpoint: Path, args: argparse.Namespace, arch: list[str], output: Path) -> dict:
    """FID, precision/recall and accuracy of ``checkpoint`` (a DMP checkpoint is re-attached to its base), against
    the whole data set, sample seeds 0 on (the same for every model) -> the metrics dict (also in ``output``)."""
    sampling = json.dumps({"sampler": "ddim", "steps": args.eval_steps, "guidance_scale": 2.0})
    metrics = common_evaluate(config, checkpoint, args.feature_network, output.parent, args.num_images, sampling,
                              [*arch, "--data.init_args.path", str(args.data), "--trainer.logger", "false",
                               "--trainer.callbacks", "[]", "--metrics.reference", str(args.reference),
                               "--metrics.kid", "false"], seed=0, output=output.name)
    return {k: metrics[k] for k in METRICS}


def adamw(lr: float) -> list[str]:
    """The CLI override of a run's optimizer: AdamW at ``lr``, no weight decay (every run of this benchmark)."""
    return ["--model.init_args.optimizer",
            json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.0}})]


def converge(args: argparse.Namespace, arch: list[str]) -> tuple[Path, list[dict], bool]:
    """Train the base on chunk by chunk until the FID stops improving (or ``--max-chunks``).

    Without ``--converge-lr`` the base's own run is resumed (its step count, optimizer and EMA go on). With it, the
    first chunk is a new fit from ``--pretrained``'s (EMA) weights with a fresh AdamW at that rate, and the next
    chunks resume that fit; its steps count from 0. Returns the last checkpoint, the FID curve and whether the FID
    had stopped improving.
    """
    fresh = args.converge_lr is not None
    step = 0 if fresh else int(torch.load(args.pretrained, map_location="cpu", weights_only=True)["global_step"])
    prefix = f"lr{args.converge_lr:g}-" if fresh else ""
    checkpoint, curve = args.pretrained, []
    while True:
        output = args.work / "metrics" / f"converge-{prefix}step{step}.json"
        # A rerun with a larger --max-chunks reuses the chunks (and their FIDs) it already has.
        result = ({k: json.loads(output.read_text())["metrics"][k] for k in METRICS} if output.exists()
                  else evaluate(args.base_config, checkpoint, args, arch, output))
        curve.append({"step": step, **result})
        print(f"convergence: step {step}, FID {result['fid']:.3f}")
        fids = [point["fid"] for point in curve]
        stalled = len(fids) > args.patience and all(
            fids[i] > (1 - args.tol) * min(fids[:i]) for i in range(len(fids) - args.patience, len(fids)))
        if stalled or len(curve) > args.max_chunks:
            return checkpoint, curve, stalled
        step += args.chunk
        following = args.work / "converge" / f"{prefix}step{step}.ckpt"
        if not following.exists():
            if not fresh:
                start = ["--ckpt_path", str(checkpoint)]
            elif checkpoint == args.pretrained:
                start = ["--model.init_args.checkpoint", str(checkpoint), *adamw(args.converge_lr)]
            else:  # the resumed optimizer keeps its rate; the override only keeps the config consistent with it
                start = ["--model.init_args.checkpoint", str(args.pretrained), *adamw(args.converge_lr), "--ckpt_path",
                         str(checkpoint)]
            fit_into(following, ["--config", args.base_config, *arch, *CPU_QUIET, *NO_VAL, *start,
                                 "--data.init_args.path", str(args.data), "--trainer.max_steps", str(step),
                                 "--trainer.default_root_dir", str(args.work / "converge")])
        checkpoint = following


def method_config(method: str, args: argparse.Namespace) -> str:
    """The config ``method`` trains and samples with: DMP's, or (full fine-tuning) the base's own."""
    return METHODS[method][0] or args.base_config


def further_train(method: str, seed: int, base: Path, args: argparse.Namespace, arch: list[str]) -> Path:
    _, lr, extra = METHODS[method]
    config = method_config(method, args)
    slug = "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")
    checkpoint = args.work / "checkpoints" / f"{slug}-seed{seed}.ckpt"
    checkpoint.unlink(missing_ok=True)
    cli(["fit", "--config", config, *extra, *arch, *CPU_QUIET, *NO_VAL, "--seed_everything", str(seed),
         "--model.init_args.train_seed", str(seed), "--model.init_args.checkpoint", str(base),
         *adamw(lr * args.lr_scale),
         "--ema.decay", "0", "--data.init_args.path", str(args.data), "--trainer.max_steps", str(args.steps),
         "--trainer.default_root_dir", str(args.work / "fit"), "--trainer.callbacks", checkpoint_callback(checkpoint)])
    return checkpoint


def trainable_share(checkpoint: Path, base: Path) -> dict[str, float]:
    """Trained parameters of a run (the paper's count for a patch: W_noise left out) and their share of the DiT."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    backbone = sum(v.numel() for k, v in torch.load(base, map_location="cpu", weights_only=True)["state_dict"].items()
                   if k.startswith("net."))
    patch = sum(v.numel() for k, v in state.items() if k.startswith("patch.") and k != "patch.w_noise")
    trained = patch if patch else backbone
    return {"trained_parameters": trained, "share": trained / backbone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="further-training steps of each run (batch 64)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's learning rates")
    parser.add_argument("--chunk", type=int, default=1600, help="steps between FIDs in the convergence phase")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--tol", type=float, default=0.03, help="relative FID gain that counts as improving")
    parser.add_argument("--max-chunks", type=int, default=16)
    parser.add_argument("--converge-lr", type=float, default=None,
                        help="converge at this learning rate: a new fit from --pretrained's weights (default: resume "
                             "the base's run at its own rate)")
    parser.add_argument("--allow-unconverged", action="store_true",
                        help="compare the methods even if the FID was still improving after --max-chunks chunks")
    parser.add_argument("--num-images", type=int, default=1000, help="generated images per FID")
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo/pretrain-dit/final.ckpt"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/shapes-filled-16.zip"))
    parser.add_argument("--base-config", default=PRETRAIN,
                        help="the config that made --pretrained: resumed to convergence, and the full fine-tuning "
                             "baseline (e.g. configs/diffusion/shapes16_dit_outline.yaml with --pretrained "
                             "runs/demo/dit-outline/final.ckpt and --data runs/demo/shapes-outline-16.zip)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-dmp"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dmp.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny everything in a temporary folder")
    args = parser.parse_args()
    arch: list[str] = []
    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="bench-dmp-"))
        arch = ["--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides",
                "{hidden_size: 32, depth: 2, num_heads: 2}"]
        args.work, args.out, args.steps, args.chunk, args.max_chunks = tmp, tmp / "dmp.json", 2, 2, 1
        args.num_images, args.eval_steps, args.seeds, args.allow_unconverged = 40, 2, "0,1", True
        args.pretrained, args.data = tmp / "pretrained.ckpt", tmp / "filled.zip"
        make_shapes(args.data, resolution=16, per_class=8, seed=0, domain="filled")
    if not args.data.exists():
        raise SystemExit(f"{args.data} is missing; build the demo data first (see this script's header)")
    # The feature network of the base's domain, named after its data (``features-filled.ckpt`` for the default).
    domain = args.data.stem.removeprefix("shapes-").removesuffix("-16")
    args.feature_network = args.work / f"features-{domain}.ckpt"
    args.reference = args.work / f"reference-{domain}.npz"
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_once(args.base_config, args.data, args.pretrained, 2 if args.tiny else 1600, arch, args.work)
    train_once("configs/features/shapes.yaml", args.data, args.feature_network, 2 if args.tiny else 800, [],
               args.work)
    base, curve, stalled = converge(args, arch)
    converged_at = time.time()
    if not stalled and not args.allow_unconverged:
        # The paper's claim is about a converged model: comparing on a still-improving one measures something else.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"converged": {"curve": curve, "fid_stopped_improving": False}}, indent=2))
        fids = ", ".join(f"{point['fid']:.2f}" for point in curve)
        raise SystemExit(f"the FID was still improving after {args.max_chunks} chunks of {args.chunk} steps ({fids}); "
                         f"raise --max-chunks, or pass --allow-unconverged to compare anyway. Curve: {args.out}")
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    for seed in seeds:
        for method in METHODS:
            checkpoint = further_train(method, seed, base, args, arch)
            output = args.work / "metrics" / f"{checkpoint.stem}.json"
            result = evaluate(method_config(method, args), checkpoint, args, arch, output)
            runs[method].append({"seed": seed, **result, **trainable_share(checkpoint, base)})

    reference = curve[-1]
    summary = {method: {**{k: {"mean": statistics.mean(r[k] for r in rs),
                               "std": statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0} for k in METRICS},
                        "fid_change": statistics.mean(r["fid"] for r in rs) - reference["fid"],
                        "share": rs[0]["share"], "trained_parameters": rs[0]["trained_parameters"]}
               for method, rs in runs.items()}
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "converged": {"checkpoint": str(base), "curve": curve, "fid_stopped_improving": stalled,
                            "minutes": round((converged_at - started) / 60, 1)},
              "minutes": round((time.time() - started) / 60, 1), "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    warning = "" if stalled else "; WARNING: the FID had not stopped improving within --max-chunks chunks"
    recipe = f"at lr {args.converge_lr:g}, a new fit" if args.converge_lr is not None else "the base's run resumed"
    print(f"\nconvergence ({recipe}): "
          + ", ".join(f"step {p['step']}: FID {p['fid']:.2f}" for p in curve) + warning)
    print(f"\n| method (+{args.steps} steps from step {reference['step']}) | trained parameters | FID "
          f"({args.num_images} images) | FID change | class accuracy | precision | recall | seeds |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| converged model | - | {reference['fid']:.3f} | - | {reference['accuracy']:.3f} | "
          f"{reference['precision']:.3f} | {reference['recall']:.3f} | - |")
    for method, s in summary.items():
        print(f"| {method} | {s['trained_parameters']:,} ({s['share']:.2%}) | {s['fid']['mean']:.3f} ± "
              f"{s['fid']['std']:.3f} | {s['fid_change']:+.3f} | {s['accuracy']['mean']:.3f} ± "
              f"{s['accuracy']['std']:.3f} | {s['precision']['mean']:.3f} | {s['recall']['mean']:.3f} | "
              f"{len(seeds)} |")
    print(f"wrote {args.out} ({record['minutes']} min)")


if __name__ == "__main__":
    main()
