"""Paper-style ``grid`` weight updates vs DoReFa ``latent`` weights, measured on the same run.

Trains low-bit SimCLR (small CNN, Fashion-MNIST by default) from the same seed, data order and
initial weights once per update rule and bitwidth (plus a 32-bit reference), then scores each
frozen encoder with a kNN vote and a linear probe at the same bitwidth (final epoch, test split
never used for selection). Writes a JSON file and prints a Markdown table.

    python benchmarks/update_mode.py            # the full comparison (~10 min on 2 cores)
    python benchmarks/update_mode.py --quick    # a one-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common.data.datasets import load_dataset
from common.data.partition import stratified_sample
from common.learning.augment import NORMALIZATION, TwoViews, normalize_transform, ssl_augmentation
from common.learning.evaluation import knn_accuracy, linear_probe_accuracy
from common.learning.models import build_ssl_model, extract_features
from common.learning.training import LowBitSettings, prepare_model, train_epoch
from common.vocabulary import FULL_PRECISION

RESULTS = Path(__file__).parent / "results"


def run_one(args: argparse.Namespace, data: dict, bits: int, weight_update: str) -> dict:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, channels, size = data["train"], data["channels"], data["size"]
    model = build_ssl_model("small_cnn", bits, channels, projection_dim=64)
    settings = LowBitSettings(bits, weight_update, "stochastic")
    prepare_model(model, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-6)
    views = TwoViews(train.images, ssl_augmentation(size, channels, *data["norm"]))
    loader = torch.utils.data.DataLoader(
        views,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss, _ = train_epoch(model, loader, optimizer, settings, 0.5, generator)
        print(
            f"  {bits:>2}-bit {weight_update:<6} epoch {epoch + 1}/{args.epochs} "
            f"loss {loss:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - start
    normalize = normalize_transform(channels, *data["norm"])
    probe_train, test = data["probe_train"], data["test"]
    train_features = extract_features(model.encoder, normalize(probe_train.images))
    test_features = extract_features(model.encoder, normalize(test.images))
    return {
        "bits": bits,
        "weight_update": weight_update,
        "final_loss": loss,
        "knn_accuracy": knn_accuracy(
            train_features, probe_train.labels, test_features, test.labels
        ),
        "probe_accuracy": linear_probe_accuracy(
            train_features,
            probe_train.labels,
            test_features,
            test.labels,
            10,
            bits,
            epochs=args.probe_epochs,
            seed=args.seed,
        ),
        "train_seconds": train_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--bits", default="4,8", help="comma-separated low bitwidths")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run: 1 epoch, 1,000 images")
    parser.add_argument("--output", type=Path, default=RESULTS / "update_mode.json")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_samples, args.probe_epochs, args.bits = 1, 1000, 20, "4"
        args.output = args.output.with_name("update_mode_quick.json")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rng = np.random.default_rng(args.seed)
    full_train = load_dataset(args.dataset, True, args.data_dir, seed=args.seed)
    full_test = load_dataset(args.dataset, False, args.data_dir, seed=args.seed)
    fraction = min(1.0, args.train_samples / len(full_train))
    train_fraction = min(0.999, fraction)
    data = {
        "train": full_train.subset(
            stratified_sample(full_train.labels.numpy(), train_fraction, rng)
        ),
        "probe_train": full_train.subset(
            stratified_sample(full_train.labels.numpy(), min(0.999, 5000 / len(full_train)), rng)
        ),
        "test": full_test.subset(
            stratified_sample(full_test.labels.numpy(), min(0.999, 2000 / len(full_test)), rng)
        ),
        "channels": full_train.channels,
        "size": full_train.image_size,
        "norm": NORMALIZATION[args.dataset],
    }
    print(
        f"{args.dataset}: {len(data['train'])} SimCLR images, probe on "
        f"{len(data['probe_train'])}, test on {len(data['test'])}; {args.epochs} epochs, "
        f"seed {args.seed}",
        flush=True,
    )

    runs = [run_one(args, data, FULL_PRECISION, "latent")]
    for bits in (int(b) for b in args.bits.split(",")):
        runs += [run_one(args, data, bits, mode) for mode in ("latent", "grid")]

    report = {
        "command": "python benchmarks/update_mode.py" + (" --quick" if args.quick else ""),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| bits | weight update | final SimCLR loss | kNN acc | linear probe acc | train s |")
    print("|---:|---|---:|---:|---:|---:|")
    for run in runs:
        print(
            f"| {run['bits']} | {run['weight_update']} | {run['final_loss']:.4f} | "
            f"{run['knn_accuracy']:.4f} | {run['probe_accuracy']:.4f} | "
            f"{run['train_seconds']:.0f} |"
        )
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
