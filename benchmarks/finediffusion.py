"""FineDiffusion vs full fine-tuning, BitFit and DiffFit on a fine-grained shapes task, several seeds.

    make runs/demo/pretrain-dit/final.ckpt
    python benchmarks/finediffusion.py [--steps 150] [--seeds 0,1,2] [--num-images 256]
    python benchmarks/finediffusion.py --tiny       # smoke test: tiny models, a few steps, results under /tmp
    # from the DiT that draws "outline" shapes (the base of configs/finediffusion/shapes.yaml) to 32 outline classes:
    make runs/demo/dit-outline/final.ckpt
    python benchmarks/finediffusion.py --domain outline --pretrained runs/demo/dit-outline/final.ckpt \
        --steps 1000 --methods "FineDiffusion,full fine-tuning (lr 1e-4),BitFit,DiffFit" \
        --work runs/bench-finediffusion-outline --out benchmarks/results/finediffusion_outline.json
    # from a broad DiT source (built here) to 64 classes whose superclasses hold two kinds in every colour:
    python benchmarks/finediffusion.py --testbed broad --steps 1000 \
        --methods "FineDiffusion,BitFit,FineDiffusion with kind superclasses,full fine-tuning (lr 1e-4),DiffFit" \
        --work runs/bench-finediffusion-broad --out benchmarks/results/finediffusion_broad.json

Protocol:
1. base: the DiT pre-trained on the 20 "filled" shapes classes (5 colours; runs/demo, configs/diffusion/
   shapes16_pretrain.yaml), or ``--pretrained``. Target: a NEW label space of 32 classes (4 shapes x 8 colours, three
   colours new and close to old ones) in the ``--domain`` style (filled or outline), grouped into the 4 shape
   superclasses: ``--per-class`` training images (seed 2) and a separate reference set for FID (100 per class,
   seed 3);
2. a FeatureClassifier on the 32-class reference data (configs/features/shapes.yaml, data overridden, 400 steps);
3. for each seed, each method fine-tunes from the base with configs/finediffusion/shapes.yaml: same data, steps,
   batch 64, AdamW lr 1e-3 (full fine-tuning also at 1e-4, its usual rate), EMA 0.99, training seed.
   ``--methods`` runs a subset. Every label table is fresh (the paper's rule):
   - FineDiffusion: tiered 32 + 4-row table, LN affine on, biases + LN + table train, superclass guidance;
   - full fine-tuning / BitFit (biases + table) / DiffFit (biases + γ in every block + table): DiT's flat table
     with its ∅ row, classifier-free guidance;
   - guidance ablation: FineDiffusion with an extra ∅ row (10% superclass + 10% ∅ labels), sampled with superclass
     guidance and with plain CFG at the same scale from the same weights;
   - the 2x2 between FineDiffusion and BitFit: "FineDiffusion with flat table" (LN affines on, DiT's flat table, CFG)
     and "BitFit with tiered table" (LN affines off, the tiered table, superclass guidance);
   - "FineDiffusion with colour superclasses": the 8 colours as the superclasses (the data's are the 4 kinds), so
     that a class differs from its superclass in shape; "FineDiffusion with kind superclasses": the kinds (for the
     broad testbed, whose data's superclasses are the families);
4. FID and class accuracy of ``--num-images`` class-balanced samples (EMA weights, DDIM ``--eval-steps``, guidance
   ``--guidance-scale`` for every method) against the reference set;
5. cost, once per method in a fresh subprocess: median training-step time (forward + backward + AdamW + EMA, after
   5 warm-up steps) and peak resident memory (Linux VmHWM of that process, and its growth during fit; CPU tensors
   are invisible to tracemalloc, so the process RSS is what is measured); stored share = PEFT checkpoint parameters
   over all parameters, and bytes on disk.
Writes benchmarks/results/finediffusion.json (every run, mean and sample std over seeds; rewritten after each run,
so an interrupted benchmark keeps what it finished) and prints Markdown rows.

``--testbed broad`` ([reproduction]: the paper's base is pre-trained on a broad set, ImageNet, and its target is a
finer label space, iNat-2021, whose supercategories hold species that differ in form and colour): the base is the
DiT of configs/diffusion/shapes16_pretrain.yaml pre-trained here (4,800 steps) on two styles, "filled" and
"cutout", and all 8 kinds in 5 colours (40 classes, 100 images of each in each style, the source of
``benchmarks/difftuning.py --testbed broad``); the target is 64 classes, all 8 kinds x 8 colours, in ``--domain``
style, grouped into 4 kind families (``superclass="family"`` of the shapes data: round = circle, ring; polygon =
square, hexagon; pointed = triangle, arrow; spiky = cross, star), so the 16 classes of a superclass differ in shape
and colour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from common import BROAD_SOURCE_STEPS, CPU_QUIET, checkpoint_callback, make_broad_source, train_once
from common import evaluate as common_evaluate

from diffusion_transfer.cli import build_cli
from diffusion_transfer.cli import main as cli
from diffusion_transfer.data import make_shapes
from diffusion_transfer.io.peft_checkpoint import peft_checkpoint_info

CONFIG = "configs/finediffusion/shapes.yaml"
COLOURS = 8  # the target's colours: class = kind * COLOURS + colour
#: --testbed -> (the target's kind set, its hierarchy); "broad" also builds its base, the broad source, in --work
TESTBEDS = {"narrow": ("base", "kind"), "broad": ("all", "family")}
FLAT = ["--model.init_args.tiered", "false", "--model.init_args.guidance", "cfg"]
#: name -> model overrides. The last one is the guidance ablation (evaluated twice).
METHODS = {
    "FineDiffusion": ["--model.init_args.peft", "finediffusion"],
    "full fine-tuning": ["--model.init_args.peft", "full", *FLAT],
    # Full fine-tuning at DiT's (and the paper's) lr: at the shared 1e-3, updating every weight from a fresh table
    # is a different, harsher regime than updating 1% of them.
    "full fine-tuning (lr 1e-4)": ["--model.init_args.peft", "full", *FLAT, "--model.init_args.optimizer",
                                  json.dumps({"class_path": "torch.optim.AdamW",
                                              "init_args": {"lr": 1e-4, "weight_decay": 0.0}})],
    "BitFit": ["--model.init_args.peft", "bitfit", *FLAT],
    "DiffFit": ["--model.init_args.peft", "difffit", *FLAT],
    "FineDiffusion + ∅ row": ["--model.init_args.peft", "finediffusion", "--model.init_args.null_dropout_prob", "0.1"],
    # The two differences between FineDiffusion and BitFit, one at a time (a 2x2 with those two rows):
    # FineDiffusion's LayerNorm affines with BitFit's flat table and CFG, and BitFit with FineDiffusion's table.
    "FineDiffusion with flat table": ["--model.init_args.peft", "finediffusion", *FLAT],
    "BitFit with tiered table": ["--model.init_args.peft", "bitfit"],
    # The data's superclass is the shape kind, and its fine classes differ in colour only; here (HIERARCHY) the
    # superclass is the colour, so a class differs from its superclass in shape, as an iNat species from its
    # supercategory.
    "FineDiffusion with colour superclasses": ["--model.init_args.peft", "finediffusion"],
    # On the broad testbed the data's superclasses are kind families; here they are the kinds again.
    "FineDiffusion with kind superclasses": ["--model.init_args.peft", "finediffusion"],
}
ABLATION = "FineDiffusion + ∅ row"
#: methods trained and scored with another hierarchy in the data's dataset.json (the same images): make_shapes'
#: ``superclass``. Every other method sees the testbed's (kinds on the narrow one, kind families on the broad one).
HIERARCHY = {"FineDiffusion with colour superclasses": "colour", "FineDiffusion with kind superclasses": "kind"}
METRICS = ("fid", "accuracy", "precision", "recall")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower().replace("∅", "null")).strip("-")


def common(args: argparse.Namespace, arch: list[str], method: str) -> list[str]:
    return ["--config", CONFIG, *METHODS[method], *arch, *CPU_QUIET, "--data.init_args.batch_size", str(args.batch)]


def target_sets(args: argparse.Namespace, method: str | None = None) -> tuple[Path, Path]:
    """The (training, reference) zips ``method`` sees, built when missing: the shared ones (the testbed's
    hierarchy), or for a method of :data:`HIERARCHY` the same images with its hierarchy, beside them."""
    superclass = HIERARCHY.get(method, args.superclass)
    if superclass == args.superclass:
        data, reference = args.data, args.reference
    elif args.data_given:
        raise SystemExit(f"{method} needs the target built here with {superclass} superclasses; leave out --data")
    else:
        data, reference = (p.with_name(f"{p.stem}-{superclass}-superclasses.zip") for p in (args.data, args.reference))
    if not data.exists():
        make_shapes(data, resolution=16, per_class=args.per_class, seed=2, colours=COLOURS, domain=args.domain,
                    kinds=args.kinds, superclass=superclass)
    if not reference.exists():
        make_shapes(reference, resolution=16, per_class=6 if args.tiny else 100, seed=3, colours=COLOURS,
                    domain=args.domain, kinds=args.kinds, superclass=superclass)
    return data, reference


def fine_tune(method: str, seed: int, args: argparse.Namespace, arch: list[str]) -> Path:
    checkpoint = args.work / "checkpoints" / f"{slug(method)}-seed{seed}.ckpt"
    checkpoint.unlink(missing_ok=True)
    cli(["fit", *common(args, arch, method), "--seed_everything", str(seed), "--model.init_args.train_seed", str(seed),
         "--model.init_args.checkpoint", str(args.pretrained), "--model.init_args.val_num_images", "0",
         "--data.init_args.path", str(target_sets(args, method)[0]), "--data.init_args.seed", str(seed),
         "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
         "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(args.work / "fit"), "--trainer.callbacks", checkpoint_callback(checkpoint)])
    return checkpoint


def evaluate(method: str, checkpoint: Path, args: argparse.Namespace, arch: list[str], output: Path,
             guidance: str | None = None) -> dict:
    """FID, precision/recall and accuracy of ``checkpoint`` against the reference set, sample seeds 0 on (the same
    for every method), with ``guidance`` (superclass / cfg) or the method's own -> the metrics dict."""
    sampling = {"sampler": "ddim", "steps": args.eval_steps, "guidance_scale": args.guidance_scale}
    if guidance:
        sampling["guidance"] = guidance
    return common_evaluate(CONFIG, checkpoint, args.feature_network, output.parent, args.num_images,
                           json.dumps(sampling), [*common(args, arch, method)[2:], "--model.init_args.checkpoint",
                                                  "null", "--data.init_args.path",
                                                  str(target_sets(args, method)[1]),
                                                  "--trainer.logger", "false", "--trainer.callbacks", "[]",
                                                  "--metrics.kid", "false"], seed=0, output=output.name)


# ---------------------------------------------------------------------------------------------- cost (subprocess)

class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end: forward, backward, optimizer, EMA)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *_: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *_: object) -> None:
        self.times.append(time.perf_counter() - self._start)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def profile_child(method: str, args: argparse.Namespace, arch: list[str]) -> None:
    """Run in a fresh process: a short fit with the step timer; prints one JSON line."""
    built = build_cli(["--config", CONFIG, *METHODS[method], *arch, "--data.init_args.batch_size", str(args.batch),
                       "--model.init_args.checkpoint", str(args.pretrained), "--data.init_args.path", str(args.data),
                       "--model.init_args.val_num_images", "0", "--trainer.max_steps", str(args.profile_steps),
                       "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.callbacks", "[]",
                       "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                       "--trainer.default_root_dir", str(args.work / "profile")], run=False)
    timer = StepTimer()
    built.trainer.callbacks.append(timer)
    built.model.load_pretrained()  # the base is loaded before measuring the memory the fit adds
    before = _status_mb("VmHWM")
    built.trainer.fit(built.model, built.datamodule)
    steps = timer.times[5:] or timer.times
    print("PROFILE " + json.dumps({"step_ms": 1000 * statistics.median(steps), "steps_timed": len(steps),
                                   "peak_rss_mb": _status_mb("VmHWM"), "rss_growth_mb": _status_mb("VmHWM") - before,
                                   "trainable": built.model.selection.trainable,
                                   "total": built.model.selection.total}))


def profile(method: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--profile", method, "--work", str(args.work), "--pretrained",
            str(args.pretrained), "--data", str(target_sets(args, method)[0]), "--profile-steps",
            str(args.profile_steps), "--batch", str(args.batch), *(["--tiny"] if args.tiny else [])]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("PROFILE "))[8:])


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="training images per class")
    parser.add_argument("--testbed", choices=tuple(TESTBEDS), default="narrow",
                        help="narrow: 32 classes (4 kinds x 8 colours, kind superclasses) from --pretrained; broad: "
                             "64 classes in 4 kind families from a broad DiT source built in --work (see the header)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of each run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-images", type=int, default=256, help="generated images per FID (8 per class)")
    parser.add_argument("--eval-steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="the same s for every method")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="the base DiT (default: runs/demo/pretrain-dit/final.ckpt; broad: WORK/pretrained.ckpt)")
    parser.add_argument("--data", type=Path, default=None, help="default: WORK/shapes8-DOMAIN-16-Npc.zip (built)")
    parser.add_argument("--domain", default="filled", choices=("filled", "outline"),
                        help="style of the target (and of its reference set and feature network)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-finediffusion"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finediffusion.json"))
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny everything in a temporary folder")
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)  # internal: cost measurement child
    args = parser.parse_args()
    arch: list[str] = []
    args.kinds, args.superclass = TESTBEDS[args.testbed]
    if args.tiny:
        arch = ["--model.init_args.arch", "DiT-S/2", "--model.init_args.arch_overrides",
                "{hidden_size: 32, depth: 2, num_heads: 2}"]
    if args.profile:
        profile_child(args.profile, args, arch)
        return
    if args.tiny:  # every model, data set and step count shrunk; base model and feature network built here
        tmp = Path(tempfile.mkdtemp(prefix="bench-finediffusion-"))
        args.work, args.out, args.steps, args.per_class, args.batch = tmp, tmp / "finediffusion.json", 2, 2, 16
        args.num_images, args.eval_steps, args.profile_steps, args.pretrained = 64, 2, 7, tmp / "pretrained.ckpt"
        make_shapes(tmp / "filled.zip", resolution=16, per_class=4, seed=0, kinds=args.kinds)
        train_once("configs/diffusion/shapes16_pretrain.yaml", tmp / "filled.zip", args.pretrained, 2, arch, tmp)
    elif args.testbed == "broad":  # the broad source (two styles, all 8 kinds, 40 classes), built once in --work
        args.work.mkdir(parents=True, exist_ok=True)
        args.pretrained = args.pretrained or args.work / "pretrained.ckpt"
        source = make_broad_source(args.work / "shapes-broad-16.zip")
        train_once("configs/diffusion/shapes16_pretrain.yaml", source, args.pretrained, BROAD_SOURCE_STEPS, arch,
                   args.work)
    args.pretrained = args.pretrained or Path("runs/demo/pretrain-dit/final.ckpt")
    if not args.pretrained.exists():
        raise SystemExit(f"{args.pretrained} is missing; build it first: make {args.pretrained}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.data_given = args.data is not None
    # The narrow testbed's names are kept from before --testbed (and the filled set's from before --domain), so an
    # existing work folder is reused.
    tag = "" if args.testbed == "narrow" else f"-{args.kinds}-{args.superclass}"
    args.data = args.data or args.work / f"shapes8{tag}-{args.domain}-16-{args.per_class}pc.zip"
    args.reference = args.work / f"shapes8{tag}-{args.domain}-16-reference.zip"
    args.feature_network = args.work / ("features-shapes8.ckpt" if args.domain == "filled" and not tag
                                        else f"features-shapes8{tag}-{args.domain}.ckpt")
    target_sets(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    train_once("configs/features/shapes.yaml", args.reference, args.feature_network, 2 if args.tiny else 400, [],
               args.work)

    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    if ABLATION in methods:
        runs[f"{ABLATION}, CFG"] = []
    cost: dict[str, dict] = {}
    for method in methods:
        cost[method] = profile(method, args)

    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    def write_record() -> tuple[dict, dict]:
        """The summary of the runs so far, written to ``--out`` (after every run: an interruption keeps them)."""
        summary = {m: {k: stat([r[k] for r in rs]) for k in (*METRICS, "stored_share", "checkpoint_bytes")}
                   for m, rs in runs.items() if rs}
        record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "minutes": round((time.time() - started) / 60, 1), "cost": cost, "runs": runs, "summary": summary,
                  "measured": "step_ms: median wall time of a training step (batch start to end) on this CPU, other "
                              "processes running; peak_rss_mb: VmHWM of a fresh process after a short fit; "
                              "rss_growth_mb: its growth during the fit"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        return summary, record

    for seed in seeds:
        for method in methods:
            checkpoint = fine_tune(method, seed, args, arch)
            info = peft_checkpoint_info(checkpoint)
            stored = {"stored_share": info["stored_share"], "checkpoint_bytes": info["bytes"]}
            metrics_dir = args.work / "metrics"
            result = evaluate(method, checkpoint, args, arch, metrics_dir / f"{checkpoint.stem}.json")
            runs[method].append({"seed": seed, **{k: result[k] for k in METRICS}, **stored})
            if method == ABLATION:
                result = evaluate(method, checkpoint, args, arch, metrics_dir / f"{checkpoint.stem}-cfg.json", "cfg")
                runs[f"{ABLATION}, CFG"].append({"seed": seed, **{k: result[k] for k in METRICS}, **stored})
            write_record()
    summary, record = write_record()
    # the step cost of full fine-tuning does not depend on its learning rate; absent with --methods
    full_ms = next((cost[m]["step_ms"] for m in ("full fine-tuning", "full fine-tuning (lr 1e-4)") if m in cost), None)
    print(f"\n| method | guidance (s = {args.guidance_scale}) | FID ({args.num_images} images) | class accuracy | "
          "precision | recall | trainable | stored | checkpoint | step time (speed-up vs full) | peak RSS (growth in "
          "fit) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        method = name.removesuffix(", CFG")
        c = cost[method]
        guidance = "CFG" if name.endswith(", CFG") or "cfg" in METHODS[method] else "superclass"
        speed_up = f"{full_ms / c['step_ms']:.2f}x" if full_ms else "n/a"
        print(f"| {method} | {guidance} | {s['fid']['mean']:.2f} ± {s['fid']['std']:.2f} | "
              f"{s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | {s['precision']['mean']:.3f} | "
              f"{s['recall']['mean']:.3f} | {100 * c['trainable'] / c['total']:.2f}% | "
              f"{100 * s['stored_share']['mean']:.2f}% | {s['checkpoint_bytes']['mean'] / 2**20:.2f} MiB | "
              f"{c['step_ms']:.0f} ms ({speed_up}) | {c['peak_rss_mb']:.0f} MB (+{c['rss_growth_mb']:.0f}) |")
    print(f"seeds: {seeds}; {args.steps} steps at batch {args.batch}; wrote {args.out} ({record['minutes']} min)")


if __name__ == "__main__":
    main()
