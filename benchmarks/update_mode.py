"""Paper-style ``grid`` weight updates vs DoReFa ``latent`` weights, measured on the same run.

Trains low-bit SimCLR (small CNN, Fashion-MNIST by default) from the same seed, data order and
initial weights once per update rule and bitwidth (plus a 32-bit reference), then scores each
frozen encoder with a kNN vote and a linear probe at the same bitwidth (final epoch, test split
never used for selection), beside the untrained floor: the initial encoder at each bitwidth,
scored by the same protocol. Each row states its budget in optimizer steps.

    python benchmarks/update_mode.py          # benchmarks/results/update_mode.json (~12 min)
    python benchmarks/update_mode.py --quick  # a one-minute smoke run: update_mode_quick.json
"""

from __future__ import annotations

import argparse
import time

import harness
import numpy as np
import torch

from common.data.datasets import load_dataset
from common.data.partition import stratified_sample
from common.learning.augment import NORMALIZATION, TwoViews, normalize_transform, ssl_augmentation
from common.learning.evaluation import knn_accuracy, linear_probe_accuracy
from common.learning.models import build_ssl_model, extract_features
from common.learning.training import LowBitSettings, prepare_model, train_epoch
from common.vocabulary import FULL_PRECISION

UNTRAINED = "untrained"  # the floor's row: the initial encoder, no optimizer step
COLUMNS = [
    ("bits", "bits", "d"),
    ("weight_update", "weight update", "s"),
    ("optimizer_steps", "optimizer steps", "d"),
    ("final_loss", "final SimCLR loss", ".4f"),
    ("knn_accuracy", "kNN acc", ".4f"),
    ("probe_accuracy", "linear probe acc", ".4f"),
    ("train_seconds", "train s", ".0f"),
]


def run_one(args: argparse.Namespace, data: dict, bits: int, weight_update: str) -> dict:
    """Train (no step for ``UNTRAINED``) and score one encoder."""
    epochs = 0 if weight_update == UNTRAINED else args.epochs
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, channels, size = data["train"], data["channels"], data["size"]
    model = build_ssl_model("small_cnn", bits, channels, projection_dim=64)
    settings = LowBitSettings(bits, "latent" if epochs == 0 else weight_update, "stochastic")
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
    loss, steps = None, 0
    for epoch in range(epochs):
        loss, epoch_steps = train_epoch(model, loader, optimizer, settings, 0.5, generator)
        steps += epoch_steps
        print(
            f"  {bits:>2}-bit {weight_update:<6} epoch {epoch + 1}/{epochs} "
            f"loss {loss:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - start if epochs else None
    normalize = normalize_transform(channels, *data["norm"])
    probe_train, test = data["probe_train"], data["test"]
    train_features = extract_features(model.encoder, normalize(probe_train.images))
    test_features = extract_features(model.encoder, normalize(test.images))
    return {
        "bits": bits,
        "weight_update": weight_update,
        "optimizer_steps": steps,
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
    args = parser.parse_args()
    name = "update_mode"
    if args.quick:
        args.epochs, args.train_samples, args.probe_epochs, args.bits = 1, 1000, 20, "4"
        name = "update_mode_quick"
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

    low_bits = [int(b) for b in args.bits.split(",")]
    runs = []
    for bits in [FULL_PRECISION, *low_bits]:
        runs.append(run_one(args, data, bits, UNTRAINED))
        modes = ["latent"] if bits == FULL_PRECISION else ["latent", "grid"]
        runs += [run_one(args, data, bits, mode) for mode in modes]
    harness.write_result(
        name,
        "python benchmarks/update_mode.py" + (" --quick" if args.quick else ""),
        headlines(runs, low_bits),
        COLUMNS,
        runs,
        settings=vars(args),
    )


def headlines(runs: list[dict], low_bits: list[int]) -> list[dict]:
    """Per bitwidth: grid's probe accuracy less latent's, and each rule's gain over the floor
    (accuracy points; one seed, so a difference of about a point is noise)."""
    probe = {(run["bits"], run["weight_update"]): 100 * run["probe_accuracy"] for run in runs}
    findings = []
    for bits in low_bits:
        floor = probe[(bits, UNTRAINED)]
        findings.append(
            harness.headline(
                f"{bits}-bit: linear probe points, grid - latent",
                probe[(bits, "grid")] - probe[(bits, "latent")],
            )
        )
        findings += [
            harness.headline(
                f"{bits}-bit {mode}: linear probe points over the untrained floor ({floor:.1f})",
                probe[(bits, mode)] - floor,
            )
            for mode in ("latent", "grid")
        ]
    return findings


if __name__ == "__main__":
    main()
