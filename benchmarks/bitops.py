"""Bit operations and memory of local training per bitwidth configuration (paper Figures 1-2).

    python benchmarks/bitops.py                       # ResNet-18, CIFAR-sized input, batch 256
    python benchmarks/bitops.py --model small_cnn --channels 1 --size 28

Prints a table and writes two bar charts and a JSON file to benchmarks/results/. The formulas are
in ``common/lowbit/bitops.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import harness

from common.learning.models import build_model
from common.lowbit.bitops import layer_shapes, mean_cost, step_cost
from common.vocabulary import FULL_PRECISION

CONFIGURATIONS = {
    "20% 4 / 30% 6 / 30% 8 / 20% 12-bit": (4, 4, 6, 6, 6, 8, 8, 8, 12, 12),
    "50% 6 / 50% 12-bit": (6,) * 5 + (12,) * 5,
    "full precision": (FULL_PRECISION,),
}


def bar_chart(rows: list[dict], parts: tuple[str, ...], unit: float, ylabel: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8))
    width = 0.8 / len(parts)
    for index, part in enumerate(parts):
        axis.bar(
            [i + index * width for i in range(len(rows))],
            [row[part] / unit for row in rows],
            width,
            label=part.replace("_", " "),
        )
    axis.set_xticks(
        [i + width * (len(parts) - 1) / 2 for i in range(len(rows))],
        [row["configuration"] for row in rows],
        fontsize=7,
    )
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    shapes = layer_shapes(
        build_model(args.model, in_channels=args.channels), (args.channels, args.size, args.size)
    )
    full = step_cost(shapes, FULL_PRECISION, args.batch_size)
    rows = []
    for name, bitwidths in CONFIGURATIONS.items():
        cost = mean_cost(shapes, bitwidths, args.batch_size)
        rows.append(
            {
                "configuration": name,
                **dataclasses.asdict(cost),
                "memory_bits": cost.memory_bits,
                "bitops_vs_full": (cost.forward_bitops + cost.backward_bitops)
                / (full.forward_bitops + full.backward_bitops),
                "memory_vs_full": cost.memory_bits / full.memory_bits,
                "forward_tbitops": cost.forward_bitops / 1e12,
                "backward_tbitops": cost.backward_bitops / 1e12,
                "weights_mb": cost.weight_bits / 8e6,
                "activations_mb": cost.activation_bits / 8e6,
                "gradients_mb": cost.gradient_bits / 8e6,
            }
        )
    stem = f"bitops_{args.model}"
    command = "python benchmarks/bitops.py"
    if (args.model, args.channels, args.size, args.batch_size) != ("resnet18", 3, 32, 256):
        command += (
            f" --model {args.model} --channels {args.channels} --size {args.size} "
            f"--batch-size {args.batch_size}"
        )
    mixed = rows[0]
    harness.write_result(
        stem,
        command,
        [
            harness.headline(
                f"{mixed['configuration']}: bit operations / fp32", mixed["bitops_vs_full"]
            ),
            harness.headline(f"{mixed['configuration']}: memory / fp32", mixed["memory_vs_full"]),
        ],
        [
            ("configuration", "configuration", "s"),
            ("forward_tbitops", "forward Tbitops", ".1f"),
            ("backward_tbitops", "backward Tbitops", ".1f"),
            ("bitops_vs_full", "bitops vs full", ".3f"),
            ("weights_mb", "weights MB", ".2f"),
            ("activations_mb", "activations MB", ".1f"),
            ("gradients_mb", "gradients MB", ".2f"),
            ("memory_vs_full", "memory vs full", ".3f"),
        ],
        rows,
        settings=vars(args),
    )
    bar_chart(
        rows,
        ("forward_bitops", "backward_bitops"),
        1e12,
        "Tera bit-operations per step",
        harness.RESULTS / f"{stem}_bitops.png",
    )
    bar_chart(
        rows,
        ("weight_bits", "activation_bits", "gradient_bits"),
        8e6,
        "MB per step",
        harness.RESULTS / f"{stem}_memory.png",
    )


if __name__ == "__main__":
    main()
