"""Sample quality of bf16 sampling against float32 sampling: the same weights, the same seeds.

    make demo      # first: the transferred model and the feature classifier under runs/demo
    python benchmarks/sample_precision.py [--seeds 100000,200000,300000] [--num-images 200]

For each first seed, ``diffusion-transfer validate`` evaluates the quickstart's transferred model with the Trainer in
float32 and ``--model.init_args.sample_precision`` ``32`` or ``bf16``, with the config's sampler (DDPM 100 steps,
guidance 2.0) and metrics (the outline FeatureClassifier, balanced labels). Reports FID, precision, recall and class
accuracy as mean ± sample std over the seed offsets, so the bf16 - fp32 gap can be read against the seed-to-seed
spread. Writes benchmarks/results/sample_precision_demo.json and prints Markdown rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import evaluate as common_evaluate

METRICS = ("fid", "precision", "recall", "accuracy")


def evaluate(precision: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Metrics of the checkpoint sampled in ``precision`` (``32`` or ``bf16``) under a float32 Trainer."""
    return common_evaluate(args.config, args.checkpoint, args.feature_network, work, args.num_images, None,
                           ["--trainer.precision", "32-true", "--model.init_args.sample_precision", precision],
                           seed, f"{precision}-{seed}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/quickstart/final.ckpt"))
    parser.add_argument("--feature-network", type=Path, default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--seeds", default="100000,200000,300000", help="first seed of each evaluation")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/sample_precision_demo.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {precision: [evaluate(precision, seed, args, Path(tmp)) for seed in seeds]
                for precision in ("32", "bf16")}
    Path(args.out).write_text(json.dumps({"args": {**vars(args), "checkpoint": str(args.checkpoint)},
                                          "runs": rows}, indent=1) + "\n")
    print(f"\n| sampling | {' | '.join(METRICS)} |")
    print("|---|" + "---|" * len(METRICS))
    for precision, runs in rows.items():
        cells = [f"{statistics.mean(r[m] for r in runs):.3f} ± {statistics.stdev(r[m] for r in runs):.3f}"
                 for m in METRICS]
        print(f"| {precision} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
