"""Every method's shapes config, run as its README section says, then scored on its target domain.

    make demo                                           # data, the U-Net source, the "outline" feature network
    make runs/demo/dit-outline/final.ckpt               # the DiT base of DMP and FineDiffusion
    python benchmarks/shapes_configs.py [--configs quickstart,dmp,...] [--num-images 200]

Each entry runs the commands of its README section (e.g. DiffTuning's replay bank, then its ``fit``) with the
config's own settings, and times them. Then ``diffusion-transfer validate`` on the run's ``final.ckpt`` draws
``--num-images`` class-balanced samples at seeds 100000 on (never used in training), as the config samples, and
scores them with the FeatureClassifier of the config's TARGET domain: "outline" for the transfers (quickstart,
DiffTuning, the long-tail configs) and for DMP (which patches the outline DiT on its own data), "filled" for the
configs that train on the source domain (EDM, Diff-Instruct), the 32-class "outline" set for FineDiffusion. The
feature networks other than the demo's are trained here once (``configs/features/shapes.yaml`` on their data).
Reports class accuracy, precision/recall (k = 3), FID in the 32-d features and the wall time of the commands. The
sample grid of each evaluation is kept; look at it.

With ``--grids docs/images`` each evaluation's sample grid (the config's ``val_num_images`` samples, classes in
turn) is also saved there, enlarged 3x, as ``shapes-NAME.png``: the README's pictures. Appends one JSON line per
config to benchmarks/results/shapes_configs.jsonl and prints a Markdown row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from common import CPU_QUIET, evaluate
from PIL import Image

from diffusion_transfer.cli import main as cli
from diffusion_transfer.data.tool import main as data_tool

DEMO = Path("runs/demo")
#: target domain -> (its data zip, the run directory of its FeatureClassifier)
DOMAINS = {
    "outline": (DEMO / "shapes-outline-16.zip", DEMO / "features"),
    "filled": (DEMO / "shapes-filled-16.zip", DEMO / "features-filled"),
    "filled-32": (DEMO / "shapes8-filled-16.zip", DEMO / "features-shapes8"),
    "outline-32": (DEMO / "shapes8-outline-16.zip", DEMO / "features-shapes8-outline"),
}
#: the 32-class sets (8 colours): their README data commands (FineDiffusion's section)
SHAPES8 = ["--colours", "8", "--per-class", "50", "--seed", "2"]
DATA_COMMANDS = {"filled-32": SHAPES8, "outline-32": [*SHAPES8, "--domain", "outline"]}
#: DiffTuning's replay bank: samples of the U-Net source model (its README section's first command)
REPLAY_BANK = ["predict", "--config", "configs/difftuning/bank.yaml"]

#: name -> (config, target domain, CLI commands that the README runs before the config's ``fit``)
CONFIGS: dict[str, tuple[str, str, list[list[str]]]] = {
    "quickstart": ("configs/quickstart.yaml", "outline", []),
    "difftuning": ("configs/difftuning/shapes.yaml", "outline", [REPLAY_BANK]),
    "dmp": ("configs/dmp/shapes.yaml", "outline", []),
    "finediffusion": ("configs/finediffusion/shapes.yaml", "outline-32", []),
    "ddpm-longtail": ("configs/longtail/ddpm_shapes.yaml", "outline", []),
    "cbdm": ("configs/longtail/cbdm_shapes.yaml", "outline", []),
    "t2h": ("configs/longtail/t2h_shapes.yaml", "outline", []),
    "edm": ("configs/edm/shapes.yaml", "filled", []),
    "diff-instruct": ("configs/diff_instruct/shapes.yaml", "filled", []),
}


def feature_network(domain: str) -> Path:
    """The target domain's FeatureClassifier, trained once with configs/features/shapes.yaml."""
    data, run_dir = DOMAINS[domain]
    if not data.exists() and domain in DATA_COMMANDS:
        data_tool(["shapes", str(data), *DATA_COMMANDS[domain]])
    if not (run_dir / "final.ckpt").exists():
        cli(["fit", "--config", "configs/features/shapes.yaml", *CPU_QUIET, "--data.init_args.path", str(data),
             "--trainer.default_root_dir", str(run_dir)])
    return run_dir / "final.ckpt"


def run_dir_of(config: str) -> Path:
    """The config's run directory (``trainer.default_root_dir``), where its ``final.ckpt`` appears."""
    return Path(yaml.safe_load(Path(config).read_text())["trainer"]["default_root_dir"])


def run(name: str, args: argparse.Namespace) -> dict:
    config, domain, before = CONFIGS[name]
    features = feature_network(domain)
    run_dir = run_dir_of(config)
    start = time.perf_counter()
    if args.train:
        for command in before:
            cli([*command, *CPU_QUIET])
        cli(["fit", "--config", config, *CPU_QUIET])
    minutes = (time.perf_counter() - start) / 60
    results = evaluate(config, run_dir / "final.ckpt", features, run_dir / "eval", args.num_images)
    grids = sorted((run_dir / "eval").rglob("samples/*.png"), key=lambda p: p.stat().st_mtime)
    if grids and args.grids:  # the README's picture of this config: the evaluation's grid, 3x, pixels kept sharp
        with Image.open(grids[-1]) as grid:
            args.grids.mkdir(parents=True, exist_ok=True)
            grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(args.grids / f"shapes-{name}.png")
    return {"config": config, "target": domain, "minutes": minutes if args.train else None,
            "grid": str(grids[-1]) if grids else None,
            **{k: results.get(k) for k in ("accuracy", "precision", "recall", "fid")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="only evaluate the runs' existing final.ckpt")
    parser.add_argument("--grids", type=Path, default=None,
                        help="also save each evaluation's sample grid, 3x enlarged, as DIR/shapes-NAME.png")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes_configs.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        row = {"name": name, **run(name, args)}
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")
        minutes = "" if row["minutes"] is None else f"{row['minutes']:.1f}"
        cells = [f"{row[k]:.3f}" if row[k] is not None else "" for k in ("accuracy", "precision", "recall")]
        print(f"| {name} (`{row['config']}`) | {row['target']} | {' | '.join(cells)} | {row['fid']:.2f} | {minutes} | "
              f"{row['grid']} |", flush=True)


if __name__ == "__main__":
    main()
