"""CUDA check and ResNet-18 step times on a GPU: low-bit training step / full-precision step.

Every objective (SimCLR, SimSiam, supervised with FedProx's term) trains a few low-bit steps on
the GPU through ``fit_local`` (the weights must stay on the grid and the losses finite), then
one ResNet-18 SimCLR step at batch 256 on CIFAR-sized inputs is timed per bitwidth with CUDA
synchronisation, and reported as a ratio to the fp32 step measured in the same run.

    python benchmarks/gpu_step.py     # needs a CUDA GPU; writes benchmarks/results/gpu_step.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from common.config import ExperimentConfig
from common.learning.augment import ssl_augmentation
from common.learning.training import LowBitSettings, Recipe, fit_local, prepare_model, train_step
from common.lowbit.layers import quantized_layers
from common.lowbit.quantizers import quantize_weight, weight_codes
from common.runs.experiment import new_model
from common.vocabulary import FULL_PRECISION

RESULTS = Path(__file__).parent / "results"
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def objectives_train_on_cuda() -> list[dict]:
    """A few low-bit epochs of each algorithm's objective on the GPU; checks, not timings."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    rows = []
    for algorithm in ("fedqssl", "fedsimsiam", "fedprox"):
        config = ExperimentConfig.from_mapping(
            {"algorithm": algorithm, "model": "resnet18", "device": "cuda", "bitwidths": "4"}
        )
        model = new_model(config, 4, 3, 10)
        losses = fit_local(
            model,
            images,
            ssl_augmentation(32, 3, *CIFAR),
            Recipe(
                LowBitSettings(4),
                1e-3,
                batch_size=64,
                epochs=2,
                proximal_mu=0.01 if algorithm == "fedprox" else 0.0,
            ),
            seed=0,
            labels=labels if algorithm == "fedprox" else None,
        ).losses
        # on the grid: at most 2^4 codes per layer, and quantizing again moves nothing (on CUDA
        # up to float rounding: its tanh/atanh are not bit-exact inverses as the CPU's are)
        on_grid = all(
            weight_codes(layer.weight.detach(), 4)[0].unique().numel() <= 16
            and torch.allclose(
                quantize_weight(layer.weight.detach(), 4), layer.weight.detach(), atol=1e-6
            )
            for layer in quantized_layers(model)
        )
        device = next(model.parameters()).device.type
        rows.append(
            {"algorithm": algorithm, "losses": losses, "on_grid": on_grid, "device": device}
        )
        if not (on_grid and device == "cuda" and all(math.isfinite(x) for x in losses)):
            raise SystemExit(f"CUDA check failed for {algorithm}: {rows[-1]}")
    return rows


def step_times(batch_size: int, repeats: int) -> list[dict]:
    config = ExperimentConfig.from_mapping({"model": "resnet18", "device": "cuda"})
    views = [torch.randn(batch_size, 3, 32, 32, device="cuda") for _ in range(2)]
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for bits in (4, 8, 12, FULL_PRECISION):
        model = new_model(config, bits, 3, 10)
        settings = LowBitSettings(bits)
        prepare_model(model, settings)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        times = []
        for index in range(repeats + 3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, *views, optimizer, settings, 0.5, generator)
            torch.cuda.synchronize()
            if index >= 3:
                times.append(time.perf_counter() - start)
        rows.append({"bits": bits, "step_ms": 1000 * statistics.median(times)})
    full = rows[-1]["step_ms"]
    for row in rows:
        row["ratio_to_fp32"] = row["step_ms"] / full
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_step.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "objectives": objectives_train_on_cuda(),
        "resnet18_simclr_step": step_times(args.batch_size, args.repeats),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['gpu']}, torch {result['torch']}, ResNet-18 SimCLR step, batch {args.batch_size}"
    )
    print("| bits | step (ms) | / fp32 |\n|---:|---:|---:|")
    for row in result["resnet18_simclr_step"]:
        print(f"| {row['bits']} | {row['step_ms']:.1f} | {row['ratio_to_fp32']:.2f} |")


if __name__ == "__main__":
    main()
