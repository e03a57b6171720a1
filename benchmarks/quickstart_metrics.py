"""Metrics of the quickstart transfer: untrained weights, the source-domain model, and the fine-tuned one.

    make demo   # first: builds the data, the feature classifier and both checkpoints under runs/demo
    python benchmarks/quickstart_metrics.py [--num-images 1000] [--seeds 0,100000,200000] [--steps 50]

Each model is evaluated on the quickstart's target data (outline shapes) through
``diffusion-transfer validate`` with the shapes FeatureClassifier, ``--sampler`` (default DDIM) with ``--steps`` and
the config's guidance 2.0, balanced labels, for each seed offset. The source model is the config's starting weights
(``model.init_args.checkpoint``: the demo's pre-trained U-Net); "untrained" switches them off. Rows: FID, KID,
precision, recall, class accuracy (mean and spread over the seed offsets). Writes
benchmarks/results/quickstart_metrics.json and prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import evaluate_report

CONFIG, DEMO = "configs/quickstart.yaml", Path("runs/demo")
#: name: (checkpoint to validate or None for the config's starting weights, extra options)
MODELS = {
    "untrained (random init)": (None, ["--model.init_args.checkpoint", "null"]),
    "source model (pre-trained on filled shapes)": (None, []),
    "transferred (quickstart fine-tune on outline)": (DEMO / "quickstart/final.ckpt", []),
}
METRICS = ("fid", "kid", "precision", "recall", "accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seeds", default="0,100000,200000", help="first seed of each evaluation")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/quickstart_metrics.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    sampling = json.dumps({"sampler": args.sampler, "steps": args.steps})
    with tempfile.TemporaryDirectory() as tmp:
        for name, (checkpoint, extra) in MODELS.items():
            if checkpoint is not None and not checkpoint.exists():
                raise SystemExit(f"{checkpoint} is missing; run `make demo` first")
            runs = [evaluate_report(CONFIG, checkpoint, DEMO / "features/final.ckpt", Path(tmp), args.num_images,
                                    sampling, extra, seed, f"{len(results)}-{seed}.json") for seed in seeds]
            results[name] = {"checkpoint": str(checkpoint) if checkpoint else None, "options": extra,
                             "runs": [r["metrics"] for r in runs],
                             "protocol": runs[0]["protocol"], "feature_network": runs[0]["feature_network"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"\n| model | {' | '.join(METRICS)} |")
    print("|---|" + "---|" * len(METRICS))
    for name, result in results.items():
        cells = []
        for metric in METRICS:
            values = [run[metric] for run in result["runs"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
