"""Seconds to make SimCLR's two views of a batch: torchvision per image vs batched tensor ops.

The same uint8 batch (Fashion-MNIST 28x28x1 and CIFAR-shaped 32x32x3 random images), both views,
timed alternately in one process so that machine noise hits both; the ratio is the result.

    python benchmarks/augmentation.py        # writes benchmarks/results/augmentation.json
"""

from __future__ import annotations

import argparse

import harness
import torch

from common.learning.augment import NORMALIZATION, ssl_augmentation
from common.learning.batch_augment import BatchSSLAugmentation

SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}


def measure(dataset: str, batch: int, repeats: int) -> dict:
    channels, size = SHAPES[dataset]
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    per_image = ssl_augmentation(size, channels, *NORMALIZATION[dataset])
    batched = BatchSSLAugmentation(size, channels, *NORMALIZATION[dataset])
    generator = torch.Generator().manual_seed(0)
    per_image_s = harness.median_seconds(
        lambda: [torch.stack([per_image(image) for image in images]) for _ in range(2)], repeats, 0
    )
    batched_s = harness.median_seconds(
        lambda: [batched(images, generator) for _ in range(2)], repeats, 0
    )
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
    harness.write_result(
        "augmentation",
        "python benchmarks/augmentation.py",
        [
            harness.headline(f"{row['dataset']}: batched speed-up over per-image", row["speedup"])
            for row in rows
        ],
        [
            ("dataset", "images", "s"),
            ("batch", "batch", "d"),
            ("per_image_s", "per image s (2 views)", ".3f"),
            ("batched_s", "batched s", ".4f"),
            ("speedup", "speed-up", ".0f"),
        ],
        rows,
    )


if __name__ == "__main__":
    main()
