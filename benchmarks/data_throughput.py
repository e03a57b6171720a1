"""Loader throughput of DiffusionDataModule on shapes zips: images/s at 16x16 and 32x32, 0 and 2 workers.

    python benchmarks/data_throughput.py [--images 8000] [--batch-size 64] [--epochs 3] [--seed 0]

Writes benchmarks/results/data_throughput.json and prints a Markdown table for docs/results.md.
The timer covers full epochs after one warm-up epoch (worker start-up excluded, persistent workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from diffusion_transfer.data import DiffusionDataModule, make_shapes
from diffusion_transfer.data.shapes import NUM_CLASSES


def measure(path: Path, workers: int, batch_size: int, epochs: int) -> float:
    dm = DiffusionDataModule(str(path), batch_size=batch_size, num_workers=workers, xflip=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch: starts the workers and fills the page cache
        pass
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            images += x.shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in (16, 32):
            path = Path(tmp) / f"shapes-{resolution}.zip"
            start = time.perf_counter()
            make_shapes(path, resolution=resolution, per_class=args.images // NUM_CLASSES, seed=args.seed)
            write_rate = args.images / (time.perf_counter() - start)
            for workers in (0, 2):
                rate = measure(path, workers, args.batch_size, args.epochs)
                rows.append({"resolution": resolution, "workers": workers, "images_per_s": round(rate),
                             "shapes_write_images_per_s": round(write_rate)})
                print(f"{resolution}x{resolution} workers={workers}: {rate:,.0f} images/s", flush=True)
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("\n| resolution | workers | loader images/s | shapes written images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['workers']} | {r['images_per_s']:,} | {r['shapes_write_images_per_s']:,} |")


if __name__ == "__main__":
    main()
