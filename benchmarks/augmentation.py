"""Seconds to make SimCLR's two views of a batch: torchvision per image vs batched tensor ops.

The same uint8 batch (Fashion-MNIST 28x28x1 and CIFAR-shaped 32x32x3 random images), both views,
timed alternately in one process so that machine noise hits both; the ratio is the result.

    python benchmarks/augmentation.py        # writes benchmarks/results/augmentation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common.learning.augment import NORMALIZATION, ssl_augmentation
from common.learning.batch_augment import BatchSSLAugmentation

RESULTS = Path(__file__).parent / "results"
SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}


def seconds(make_views, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        make_views()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def measure(dataset: str, batch: int, repeats: int) -> dict:
    channels, size = SHAPES[dataset]
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    per_image = ssl_augmentation(size, channels, *NORMALIZATION[dataset])
    batched = BatchSSLAugmentation(size, channels, *NORMALIZATION[dataset])
    generator = torch.Generator().manual_seed(0)
    per_image_s = seconds(
        lambda: [torch.stack([per_image(image) for image in images]) for _ in range(2)], repeats
    )
    batched_s = seconds(lambda: [batched(images, generator) for _ in range(2)], repeats)
    return {
        "dataset": dataset,
        "batch": batch,
        "per_image_s": per_image_s,
        "batched_s": batched_s,
        "speedup": per_image_s / batched_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(dataset, args.batch, args.repeats) for dataset in SHAPES]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "augmentation.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| images | batch | per image s (2 views) | batched s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['dataset']} | {row['batch']} | {row['per_image_s']:.3f} | "
            f"{row['batched_s']:.4f} | {row['speedup']:.0f}x |"
        )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
