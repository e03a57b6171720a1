"""``predict`` under CPU load: each image depends only on its seed, whatever the batch size or the workers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from diffusion_transfer.cli import main
from diffusion_transfer.data import DiffusionDataModule

from .test_cli import tiny_config

# A busy loop of float32 matmuls in another process, so predict competes for the cores it runs on.
LOAD = """
import torch
torch.set_num_threads(2)
a = torch.randn(384, 384)
print("loading", flush=True)
while True:
    a = torch.tanh(a @ a)
"""

SEEDS = 48


def _images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_predict_images_depend_only_on_their_seed_under_load(shapes_zip: Path, tmp_path: Path) -> None:
    # The predict loader takes the datamodule's batch_size and num_workers, so both really vary below.
    loader = DiffusionDataModule(str(shapes_zip), batch_size=16, num_workers=2).predict_dataloader()
    assert loader.batch_size == 16 and loader.num_workers == 2
    config = tiny_config(tmp_path, shapes_zip)
    main(["fit", "--config", str(config)])
    saved = next((tmp_path / "runs").rglob("config.yaml"))
    checkpoint = str(tmp_path / "ckpt" / "last.ckpt")

    def predict(name: str, seeds: str, batch_size: int, workers: int) -> dict[str, bytes]:
        # One label for every seed: labels cycle by position, and this test is about seeds. DDPM draws fresh noise
        # at every step and guidance doubles the batch, so both paths of per-image randomness are covered.
        main(["predict", "--config", str(saved), "--ckpt_path", checkpoint,
              "--data.init_args.predict_seeds", seeds, "--data.init_args.predict_labels", "7",
              "--data.init_args.batch_size", str(batch_size), "--data.init_args.num_workers", str(workers),
              "--model.init_args.sampler", "ddpm", "--model.init_args.guidance_scale", "2.0",
              "--writer.output_dir", str(tmp_path / name)])
        return _images(tmp_path / name)

    load = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "loading"
        start = time.perf_counter()
        reference = predict("b5-w0", f"0-{SEEDS - 1}", batch_size=5, workers=0)
        assert sorted(reference) == [f"{s:06d}.png" for s in range(SEEDS)]
        assert predict("b16-w2", f"0-{SEEDS - 1}", batch_size=16, workers=2) == reference
        # A reordered subset, one batch of its own with 2 workers: the same seeds give the same bytes.
        subset = predict("subset", "47,3,20-22,0", batch_size=6, workers=2)
        assert subset == {name: reference[name] for name in subset} and len(subset) == 6
        assert load.poll() is None, "the load process ended early"
        elapsed = time.perf_counter() - start
    finally:
        load.kill()
        load.wait()
    # Distinct seeds give distinct images (the comparison above is not vacuous).
    assert len(set(reference.values())) == SEEDS, elapsed
