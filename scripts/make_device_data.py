"""Write a Dirichlet split of a dataset as the folders real devices and a server would hold.

    python scripts/make_device_data.py OUT [--dataset fashion-mnist] [--num-devices 3]
        [--beta 0.5] [--max-samples 256] [--buffer-ratio 0.01] [--probe-samples 1000]
        [--test-samples 2000] [--format png|npz] [--unlabelled] [--seed 0]

OUT/device-K/       device K's share, used whole by ``supernode.sh --local-data OUT/device-K``
                    (class folders 0/, 1/, ... of PNGs, or one data.npz; flat if --unlabelled)
OUT/server/buffer/  the server buffer D_g, unlabelled (run config ``buffer-dir``)
OUT/server/probe/   train/ and test/ labelled sets for the global score (run config ``probe-dir``)

The split is the one simulation uses (``common.data.partition.make_partition``) under the same seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.datasets import ImageData, load_dataset
from common.data.local import save_images
from common.data.partition import make_partition
from common.runs.experiment import ExperimentData, capped
from common.vocabulary import DATASET_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder to write device-K/ and server/ into")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES)
    parser.add_argument("--data-dir", help="where the dataset is (default: its usual place)")
    parser.add_argument("--num-devices", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--max-samples", type=int, default=256, help="per device (0: all)")
    parser.add_argument("--buffer-ratio", type=float, default=0.01)
    parser.add_argument("--probe-samples", type=int, default=1000, help="labelled probe train")
    parser.add_argument("--test-samples", type=int, default=2000, help="probe test (0: all)")
    parser.add_argument("--format", choices=("png", "npz"), default="png")
    parser.add_argument("--unlabelled", action="store_true", help="devices get no labels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def cap(data: ImageData, size: int, seed: int) -> ImageData:
    return data if size == 0 or size >= len(data) else capped(data, size, seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train = load_dataset(args.dataset, True, args.data_dir, seed=args.seed)
    test = load_dataset(args.dataset, False, args.data_dir, seed=args.seed)
    partition = make_partition(
        train.labels.numpy(),
        test.labels.numpy(),
        args.num_devices,
        args.beta,
        args.buffer_ratio,
        args.seed,
    )
    split = ExperimentData(args.dataset, train, test, partition, args.seed)
    for device in range(args.num_devices):
        share = split.client_train(device, args.max_samples)  # simulation's own draw
        if args.unlabelled:
            share = share.without_labels()
        folder = args.output / f"device-{device}"
        save_images(share, folder, args.format)
        classes = (
            np.bincount(share.labels.numpy(), minlength=train.num_classes)
            if (share.labelled)
            else "unlabelled"
        )
        print(f"{folder}: {len(share)} images, per class {classes}")
    server = args.output / "server"
    buffer = split.buffer().without_labels()
    save_images(buffer, server / "buffer", args.format)
    save_images(cap(train, args.probe_samples, args.seed), server / "probe" / "train", args.format)
    save_images(cap(test, args.test_samples, args.seed), server / "probe" / "test", args.format)
    print(f"{server}: buffer {len(buffer)} images, probe train/ and test/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
