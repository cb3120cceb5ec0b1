"""Centralized learning curves: how fast one low-bit SimCLR model learns, bitwidth by bitwidth.

A pilot for choosing a federated regime (docs/RESULTS.md, "Pilots"): one model trains on an IID
class-stratified sample of Fashion-MNIST with the project's own low-bit training step, and every
``--every`` steps its encoder is scored as the server scores a global model (the full-precision
linear probe on ``--probe-samples`` labelled images, the 20-NN monitor), beside step 0 (the
untrained floor, same protocol). It answers, in minutes instead of a federated run's hours: how
many steps does full precision need to gain N points, and how far do 2, 3, 4 bits fall behind?

    .venv/bin/python scripts/learning_curve.py --bits 32,2 --steps 600 --every 100 \\
        --output results/curve.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.data.datasets import ImageData, load_dataset
from common.data.partition import stratified_sample
from common.learning.evaluation import knn_accuracy, linear_probe_accuracy
from common.learning.models import build_ssl_model, extract_features
from common.learning.training import LowBitSettings, Recipe, augmented_epochs, fit_batches
from common.lowbit.layers import set_bitwidth
from common.runs.experiment import DatasetSpec
from common.vocabulary import FULL_PRECISION


def stratified(data: ImageData, size: int, seed: int, stream: int) -> ImageData:
    rng = np.random.default_rng([seed, stream])
    return data.subset(stratified_sample(data.labels.numpy(), min(0.999, size / len(data)), rng))


def scores(
    encoder: torch.nn.Module, spec: DatasetSpec, labelled: ImageData, test: ImageData, seed: int
) -> dict[str, float]:
    """The server's global protocol on one encoder: its weights run in full precision (as the
    global model is scored), a 100-epoch probe (final epoch) and the 20-NN monitor."""
    encoder = set_bitwidth(copy.deepcopy(encoder), FULL_PRECISION)
    features = (
        extract_features(encoder, spec.normalize(labelled.images)),
        labelled.labels,
        extract_features(encoder, spec.normalize(test.images)),
        test.labels,
    )
    return {
        "probe": linear_probe_accuracy(*features, spec.num_classes, seed=seed),
        "knn": knn_accuracy(*features),
    }


def curve(
    args: argparse.Namespace,
    bits: int,
    spec: DatasetSpec,
    images: torch.Tensor,
    labelled: ImageData,
    test: ImageData,
) -> list[dict]:
    """Scores at step 0 and every ``args.every`` steps of one model at ``bits``."""
    torch.manual_seed(args.seed)
    model = build_ssl_model("small_cnn", bits, spec.channels, args.width, 128)
    recipe = Recipe(LowBitSettings(bits), args.learning_rate, batch_size=args.batch_size)
    augmentation = spec.augmentation("batched")
    points = [{"step": 0, **scores(model.encoder, spec, labelled, test, args.seed)}]
    steps_per_epoch = len(images) // args.batch_size
    step, chunk, start = 0, 0, time.perf_counter()
    while step < args.steps:
        epochs = max(1, args.every // steps_per_epoch)
        batches = augmented_epochs(
            images, augmentation, epochs, args.batch_size, args.seed * 1000 + chunk
        )
        fit_batches(model, batches, recipe, args.seed + chunk)
        step += epochs * steps_per_epoch
        chunk += 1
        point = {
            "step": step,
            "seconds": time.perf_counter() - start,
            **scores(model.encoder, spec, labelled, test, args.seed),
        }
        points.append(point)
        print(
            f"  {bits:>2}-bit step {step:4d}: probe {point['probe']:.4f} "
            f"kNN {point['knn']:.4f} ({point['seconds']:.0f} s)",
            flush=True,
        )
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="32,2", help="comma-separated bitwidths")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100, help="score every this many steps")
    parser.add_argument("--images", type=int, default=8000, help="IID unlabelled train images")
    parser.add_argument("--width", type=int, default=32, help="small CNN width")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--probe-samples", type=int, default=200)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = DatasetSpec.of("fashion-mnist")
    train, test = load_dataset("fashion-mnist", True), load_dataset("fashion-mnist", False)
    images = stratified(train, args.images, args.seed, 0).images
    labelled = stratified(train, args.probe_samples, args.seed, 1)
    test = stratified(test, args.test_samples, args.seed, 2) if args.test_samples < 10000 else test
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "curves": {},
    }
    for bits in (int(b) for b in args.bits.split(",")):
        results["curves"][str(bits)] = curve(args, bits, spec, images, labelled, test)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
