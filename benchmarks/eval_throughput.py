"""How fast the metrics run: feature extraction images/s and the time of a 10k-image FID, and its parts.

    python benchmarks/eval_throughput.py [--num-images 10000] [--inception-images 256] [--batch 100] [--seed 0]

Feature networks:
- the shapes FeatureClassifier (32-d features, 16x16 input; random weights: speed does not depend on values);
- the FID Inception-v3 (torch-fidelity ``inception-v3-compat``, 2048-d; random weights of the real layout,
  as the real file cannot be downloaded here), fed 32x32 uint8 images, which it resizes to 299x299.

For each: images/s of ``metrics.extract`` (quantisation, autocast off), and the seconds of the metric maths on
``--num-images`` features per side: reference moments, FID (two symmetric eigendecompositions), KID
(100 subsets of 1000) and precision/recall (k=3). Inception extraction of 10k images on a CPU takes tens of
minutes, so it is timed on ``--inception-images`` images and extrapolated (marked so in the output).

Writes benchmarks/results/eval_throughput.json and prints Markdown rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_transfer.metrics import (
    FeatureMoments,
    ReferenceStats,
    extract,
    frechet_distance,
    kernel_inception_distance,
    mean_and_covariance,
    precision_recall,
)
from diffusion_transfer.metrics.features import ClassifierFeatures, FeatureClassifier, InceptionFeatures


def random_inception(tmp: Path) -> InceptionFeatures:
    """InceptionFeatures with random weights in the real layout (torch-fidelity's download bypassed)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    download, load = fidelity.load_state_dict_from_url, fidelity.FeatureExtractorInceptionV3.load_state_dict
    fidelity.load_state_dict_from_url = lambda *args, **kwargs: {}
    fidelity.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fidelity.load_state_dict_from_url, fidelity.FeatureExtractorInceptionV3.load_state_dict = download, load
    torch.save(network.state_dict(), tmp / "inception-random.pth")
    return InceptionFeatures(tmp / "inception-random.pth")


def time_extraction(network, images: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    extract(network, images[:batch])  # warm-up
    start = time.perf_counter()
    features = [extract(network, images[i:i + batch])[0] for i in range(0, len(images), batch)]
    return time.perf_counter() - start, torch.cat(features).numpy()


def time_maths(features: np.ndarray, num_images: int, seed: int) -> dict[str, float]:
    """Seconds of each metric on ``num_images`` features per side (tiled from the extracted ones plus noise)."""
    rng = np.random.default_rng(seed)
    reps = -(-num_images // len(features))
    real = np.tile(features, (reps, 1))[:num_images] + rng.standard_normal((num_images, features.shape[1])) * 0.01
    fake = real + rng.standard_normal(real.shape) * 0.1
    out = {}
    start = time.perf_counter()
    moments = FeatureMoments(real.shape[1], 0)
    for i in range(0, num_images, 1000):
        moments.update(torch.from_numpy(real[i:i + 1000]), torch.zeros(0))
    reference: ReferenceStats = moments.to_stats()
    out["reference moments s"] = time.perf_counter() - start
    start = time.perf_counter()
    frechet_distance(*mean_and_covariance(fake), reference.mu, reference.sigma)
    out["FID maths s"] = time.perf_counter() - start
    start = time.perf_counter()
    kernel_inception_distance(real, fake, subsets=100, subset_size=1000, seed=seed)
    out["KID s"] = time.perf_counter() - start
    start = time.perf_counter()
    precision_recall(real, fake, k=3)
    out["precision/recall s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--inception-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp()  # the random Inception weights (87 MB) are written here, not into the repo
    classifier = ClassifierFeatures(FeatureClassifier(num_classes=20, resolution=16, channels=3), "classifier-random")
    networks = {
        "FeatureClassifier (shapes, 16x16, 32-d)": (classifier, 16, args.num_images),
        "Inception-v3 (32x32 -> 299, 2048-d)": (random_inception(Path(tmp)), 32, args.inception_images),
    }
    rows = []
    for name, (network, size, count) in networks.items():
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
        seconds, features = time_extraction(network, images, args.batch)
        rate = count / seconds
        row = {"network": name, "images timed": count, "extract img/s": rate,
               f"extract {args.num_images} images s": args.num_images / rate,
               "extrapolated": count < args.num_images, **time_maths(features, args.num_images, args.seed)}
        rows.append(row)
        print(json.dumps(row))
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "args": vars(args), "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp)
    n = args.num_images
    print(f"\n| network | extract img/s | extract {n} images (s) | reference moments (s) | FID maths (s) | "
          "KID (s) | precision/recall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(f"| {r['network']} | {r['extract img/s']:.1f} | {r[f'extract {n} images s']:.1f}{mark} | "
              f"{r['reference moments s']:.2f} | {r['FID maths s']:.2f} | {r['KID s']:.2f} | "
              f"{r['precision/recall s']:.2f} |")


if __name__ == "__main__":
    main()
