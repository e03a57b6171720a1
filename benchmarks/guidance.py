"""Sample quality of trained checkpoints against the classifier-free guidance scale ([reproduction] item 3).

    python benchmarks/guidance.py --runs difftuning,quickstart [--scales 1.0,1.5,2.0,3.0] [--num-images 200]
    python benchmarks/guidance.py --runs "mine=configs/quickstart.yaml:<checkpoint>:outline"
    python benchmarks/guidance.py --runs ddpm-longtail,cbdm,t2h --scales 1.5,1.75,2.0,2.5,3.0 --seed 200000

Diffusion Tuning trains its replay rows with the null label, on samples of the SOURCE domain, and the shapes
configs evaluate at guidance 2.0, which extrapolates away from exactly that null branch: u + s (c - u). So a method
can look worse than plain fine-tuning only because of the guidance scale. This script re-evaluates each checkpoint
at every scale of ``--scales`` with the config's sampler otherwise unchanged: ``--num-images`` class-balanced samples
at seeds 100000 on (never used in training), scored by the target domain's FeatureClassifier (class accuracy,
precision/recall k = 3, FID in its 32-d features), and names the best scale by accuracy and by FID.
To choose a config's scale without tuning on the seeds that report it, sweep at ``--seed 200000`` (also never used
in training) and report the chosen scale at the default 100000.

A run is ``NAME`` of :data:`RUNS` or ``NAME=CONFIG:CHECKPOINT:DOMAIN`` (a domain of ``shapes_configs.DOMAINS``).
The ``difftuning-dit*`` runs are Diffusion Tuning on the DiT source, as the shapes config ran before 2026-12-07;
to make them again (the s = 1 run first, then s = 0.25, into one run directory):

    make runs/demo/pretrain-dit/final.ckpt
    diffusion-transfer predict --config configs/difftuning/bank.yaml --model.init_args.arch DiT-S/2 \
        --model.init_args.arch_overrides "{hidden_size: 128, depth: 4, num_heads: 4}" \
        --model.init_args.checkpoint runs/demo/pretrain-dit/final.ckpt \
        --trainer.default_root_dir runs/demo/difftuning-bank-dit
    diffusion-transfer fit --config configs/difftuning/shapes.yaml --model.init_args.arch DiT-S/2 \
        --model.init_args.arch_overrides "{hidden_size: 128, depth: 4, num_heads: 4}" \
        --model.init_args.checkpoint runs/demo/pretrain-dit/final.ckpt --model.init_args.prob_scale 1.0 \
        --model.init_args.replay_bank runs/demo/difftuning-bank-dit/bank.zip \
        --trainer.default_root_dir runs/demo/difftuning-dit
    # then the same with --model.init_args.prob_scale 0.25 (lightning_logs/version_1, final.ckpt)
Appends one JSON line per (run, scale) to benchmarks/results/guidance.jsonl and prints Markdown rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import evaluate
from shapes_configs import CONFIGS, feature_network, run_dir_of

#: The demo's U-Net (configs/quickstart.yaml), EDM's GroupNorm rule included.
DEMO_UNET = {"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [8],
             "dropout": 0.0, "min_channels_per_group": 4}
#: name -> (config, checkpoint, target domain, extra options): runs outside the shapes configs' own run directories.
RUNS: dict[str, tuple[str, str, str, list[str]]] = {
    # The same config on the DiT source before 2026-12-07, its run directory moved aside: prob_scale 0.25 (the
    # config's last DiT setting, final.ckpt) and the code's 1.0 (the first run in that directory).
    "difftuning-dit": ("runs/demo/difftuning-dit/lightning_logs/version_1/config.yaml",
                       "runs/demo/difftuning-dit/final.ckpt", "outline", []),
    "difftuning-dit-s1": ("runs/demo/difftuning-dit/lightning_logs/version_0/config.yaml",
                          "runs/demo/difftuning-dit/lightning_logs/version_0", "outline", []),
    # Plain fine-tuning of the same source with the same recipe (uniform t, 3,200 steps of 64: `python
    # benchmarks/demo_recipe.py --recipes transfer-3200`, whose checkpoint is the last one under its run directory).
    # Saved before GroupNorm counts were recorded in checkpoints, so its arch settings are given whole on the
    # command line (README, "Released checkpoints"); its source file has moved since, and --ckpt_path holds it all.
    "finetune-3200": ("configs/quickstart.yaml", "runs/demo_recipe/transfer-3200-seed0", "outline",
                      ["--model.init_args.arch_overrides", json.dumps(DEMO_UNET),
                       "--model.init_args.checkpoint", "null"]),
}
#: The runs of every shapes config (``shapes_configs.CONFIGS``: quickstart, ddpm-longtail, cbdm, t2h, ...) as their
#: README commands leave them: the config, its run directory's final.ckpt, its target domain.
RUNS.update({name: (config, str(run_dir_of(config) / "final.ckpt"), domain, [])
             for name, (config, domain, _) in CONFIGS.items() if name not in RUNS})
DEFAULT_RUNS = "difftuning,difftuning-dit,difftuning-dit-s1,finetune-3200,quickstart"
METRICS = ("accuracy", "precision", "recall", "fid")


def parse_run(spec: str) -> tuple[str, tuple[str, str, str, list[str]]]:
    if "=" not in spec:
        if spec not in RUNS:
            raise SystemExit(f"unknown run {spec!r}; known: {', '.join(RUNS)}, or NAME=CONFIG:CHECKPOINT:DOMAIN")
        return spec, RUNS[spec]
    name, rest = spec.split("=", 1)
    config, checkpoint, domain = rest.rsplit(":", 2)
    return name, (config, checkpoint, domain, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--scales", default="1.0,1.5,2.0,3.0")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=100000,
                        help="first sample seed (100000: the reported one; 200000: for choosing a scale)")
    parser.add_argument("--work", type=Path, default=Path("runs/guidance"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance.jsonl"))
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print("| run | guidance | accuracy | precision | recall | FID |\n|---|---|---|---|---|---|")
    for name, (config, checkpoint, domain, extra) in map(parse_run, args.runs.split(",")):
        if Path(checkpoint).is_dir():  # a run directory of demo_recipe.py: its last checkpoint
            checkpoint = str(max(Path(checkpoint).rglob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime,
                                 default=Path(checkpoint) / "final.ckpt"))
        if not Path(checkpoint).exists():
            raise SystemExit(f"{checkpoint} is missing: train run {name!r} first (see RUNS in this file)")
        features = feature_network(domain)
        rows = []
        for scale in scales:
            start = time.perf_counter()
            metrics = evaluate(config, checkpoint, features, args.work / name / f"g{scale}-s{args.seed}",
                               args.num_images, json.dumps({"guidance_scale": scale}), extra, args.seed)
            row = {"run": name, "config": config, "checkpoint": checkpoint, "target": domain, "guidance": scale,
                   "num_images": args.num_images, "seed": args.seed, "minutes": (time.perf_counter() - start) / 60,
                   **{k: metrics.get(k) for k in METRICS}}
            rows.append(row)
            with args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(f"| {name} | {scale} | {row['accuracy']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                  f"{row['fid']:.2f} |", flush=True)
        by_accuracy = max(rows, key=lambda r: r["accuracy"])["guidance"]
        by_fid = min(rows, key=lambda r: r["fid"])["guidance"]
        print(f"| {name}: best guidance | by accuracy {by_accuracy} | by FID {by_fid} | | | |", flush=True)


if __name__ == "__main__":
    main()
