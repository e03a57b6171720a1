"""The ceiling of the demo's sample metrics: the same metrics on real "outline" images that no model saw.

    make demo                                  # (or its data + feature classifier targets)
    python benchmarks/heldout_real.py [--per-class 10] [--seed 1]

    # the same for "filled"; benchmarks/shapes_configs.py trains its feature network, or:
    diffusion-transfer fit --config configs/features/shapes.yaml --data.init_args.path runs/demo/shapes-filled-16.zip \
        --trainer.default_root_dir runs/demo/features-filled
    python benchmarks/heldout_real.py --domain filled --data runs/demo/shapes-filled-16.zip \
        --features runs/demo/features-filled/final.ckpt
    # the broad testbed's target; WORK is the --work folder of `benchmarks/difftuning.py --testbed broad`, which
    # builds both files there:
    python benchmarks/heldout_real.py --kinds all --data WORK/shapes-outline-all-16.zip --features WORK/features.ckpt
    # the 64 classes of `benchmarks/finediffusion.py --testbed broad` (its training set is seed 2, its reference 3):
    python benchmarks/heldout_real.py --kinds all --colours 8 --domain filled --seed 4 \
        --data WORK/shapes8-all-family-filled-16-reference.zip --features WORK/features-shapes8-all-family-filled.ckpt

Draws ``--per-class`` new images per class of the shapes "outline" domain with another shapes seed (200 images by
default, the size of the demo's evaluation) and scores them exactly as the demo scores its samples: features and
logits of the outline FeatureClassifier, against the reference statistics of the 4,000 training images (FID in
its 32-d features, precision/recall with k = 3, class accuracy). A perfect generator would score about this.
Appends one JSON line to benchmarks/results/heldout_real.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from diffusion_transfer.data import ZipImageDataset, make_shapes
from diffusion_transfer.data.shapes import KIND_SETS
from diffusion_transfer.metrics import ReferenceStats, load_feature_classifier
from diffusion_transfer.metrics.evaluation import ScoreOptions, score
from diffusion_transfer.metrics.features import extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="shapes seed (the training data is seed 0)")
    parser.add_argument("--features", type=Path, default=Path("runs/demo/features/final.ckpt"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/shapes-outline-16.zip"))
    parser.add_argument("--domain", default="outline", help="the shapes domain of --data and --features")
    parser.add_argument("--kinds", choices=tuple(KIND_SETS), default="base", help="the shapes kinds of --data")
    parser.add_argument("--colours", type=int, default=5, help="the shapes colours of --data (8: the fine targets)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heldout_real.jsonl"))
    args = parser.parse_args()
    network = load_feature_classifier(args.features)
    # The evaluation callback caches the training data's statistics beside the zip, named by the network's id.
    reference_path = args.data.with_name(f"{args.data.name}.{network.network_id}.npz")
    if not reference_path.exists():
        raise SystemExit(f"{reference_path}: not found; run `make demo` first (its evaluation writes it)")
    reference = ReferenceStats.load(reference_path)
    with tempfile.TemporaryDirectory() as tmp:
        heldout = Path(tmp) / "heldout.zip"
        make_shapes(heldout, resolution=16, per_class=args.per_class, seed=args.seed, domain=args.domain,
                    kinds=args.kinds, colours=args.colours)
        dataset = ZipImageDataset(heldout)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = np.asarray(dataset.labels)
    features, logits = extract(network, images)
    results = score({"features": features.numpy(), "labels": labels, "logits": logits.numpy(),
                     "index": np.arange(len(labels))}, reference, ScoreOptions(per_class=False),
                    num_classes=dataset.num_classes)
    row = {"domain": args.domain, **({"kinds": args.kinds} if args.kinds != "base" else {}),
           **({"colours": args.colours} if args.colours != 5 else {}),
           "per_class": args.per_class, "seed": args.seed, "feature_network": network.network_id,
           **{k: results[k] for k in ("num_images", "accuracy", "precision", "recall", "fid")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
