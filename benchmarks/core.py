"""Benchmarks of the core layer, reported as ratios measured within one run.

1. Packed payload bytes / ideal bytes for ResNet-18 (ideal: s bits per quantized weight plus
   4 bytes per full-precision element). Goal <= 1.005.
2. Low-bit training step time / full-precision step time, small CNN, same batch, CPU. Goal <= 1.5.
3. The 14-bit quantile gradient quantizer on ResNet-18's 11.2 M weight gradients, layer by layer,
   with exact quantiles (a sort per layer) and with the default sampled quantiles for large
   layers, against one full-precision ResNet-18 backward pass at batch 64.

    python benchmarks/core.py     # writes benchmarks/results/core.json, prints Markdown tables
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.learning.models import build_model, build_ssl_model
from common.learning.training import LowBitSettings, prepare_model, train_step
from common.lowbit.layers import quantized_layers
from common.lowbit.quantizers import SAMPLED_QUANTILES_ABOVE, quantize_gradient
from common.vocabulary import FULL_PRECISION
from common.wire.payload import encode_state, is_quantized, payload_nbytes

RESULTS = Path(__file__).parent / "results"


def median_seconds(work: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def payload_ratios() -> list[dict]:
    state = build_model("resnet18").state_dict()
    quantized = sum(t.numel() for k, t in state.items() if is_quantized(k, t))
    other = sum(t.numel() for k, t in state.items() if not is_quantized(k, t))
    rows = []
    for bits in (4, 6, 8, 12, FULL_PRECISION):
        ideal = (quantized * bits + 7) // 8 + 4 * other
        if bits == FULL_PRECISION:
            ideal = 4 * (quantized + other)
        measured = payload_nbytes(encode_state(state, bits)) + 4 * 128  # + np.save headers
        rows.append(
            {
                "bits": bits,
                "payload_bytes": measured,
                "ideal_bytes": ideal,
                "ratio": measured / ideal,
            }
        )
    return rows


def step_times(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    views = (
        torch.randn(128, 1, 28, 28, generator=generator),
        torch.randn(128, 1, 28, 28, generator=generator),
    )
    rows = []
    reference = None
    # save_codes: backward keeps low-bit codes (the default: the memory the paper counts) or
    # float32 copies (the same numbers, faster where memory is plentiful)
    for bits, update, save_codes in (
        (FULL_PRECISION, "latent", True),
        (4, "latent", True),
        (4, "grid", True),
        (4, "grid", False),
        (8, "latent", True),
        (12, "latent", True),
        (12, "grid", False),
    ):
        model = build_ssl_model("small_cnn", bits, in_channels=1, projection_dim=64)
        settings = LowBitSettings(bits, update, "stochastic", save_codes)
        prepare_model(model, settings)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        seconds = median_seconds(
            lambda m=model, o=optimizer, s=settings: train_step(m, *views, o, s, 0.5, generator),
            repeats,
        )
        reference = reference or seconds
        rows.append(
            {
                "bits": bits,
                "weight_update": update,
                "save_codes": save_codes,
                "step_seconds": seconds,
                "ratio_to_fp32": seconds / reference,
            }
        )
    return rows


def gradient_quantizer(repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet18")
    head = torch.nn.Linear(512, 10)
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def backward() -> None:
        loss = torch.nn.functional.cross_entropy(head(model(images)), labels)
        model.zero_grad(set_to_none=True)
        loss.backward()

    def forward_backward() -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(model(images)), labels)
        forward = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start - forward

    backward()
    backward_seconds = statistics.median(forward_backward() for _ in range(repeats))
    grads = [layer.weight.grad for layer in quantized_layers(model)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = {}
    # exact: one sort per layer whatever its size; sampled: the default, layers above
    # SAMPLED_QUANTILES_ABOVE elements estimate their centres from a sample
    for name, above in (("exact", flat.numel() + 1), ("sampled", SAMPLED_QUANTILES_ABOVE)):
        per_layer = median_seconds(
            lambda above=above: [quantize_gradient(g, 14, sample_above=above) for g in grads],
            repeats,
            1,
        )
        error = sum(
            float(((quantize_gradient(g, 14, sample_above=above) - g) ** 2).sum()) for g in grads
        )
        rows[name] = {
            "per_layer_seconds": per_layer,
            "per_layer_ratio_to_backward": per_layer / backward_seconds,
            "squared_error": error,
        }
    return {
        "values": flat.numel(),
        "layers": len(grads),
        "sampled_layers": sum(g.numel() > SAMPLED_QUANTILES_ABOVE for g in grads),
        "bits": 14,
        "resnet18_backward_seconds_batch64": backward_seconds,
        **rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULTS / "core.json")
    args = parser.parse_args()
    report = {
        "command": "python benchmarks/core.py",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "torch": torch.__version__,
        "payload": payload_ratios(),
        "step_time": step_times(args.repeats),
        "gradient_quantizer": gradient_quantizer(max(3, args.repeats // 3)),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print("| ResNet-18 payload | bytes | ideal bytes | ratio |\n|---:|---:|---:|---:|")
    for row in report["payload"]:
        print(
            f"| {row['bits']}-bit | {row['payload_bytes']:,} | {row['ideal_bytes']:,} | "
            f"{row['ratio']:.5f} |"
        )
    print(
        "\n| small CNN step, batch 128 | weight update | saved for backward | ms / step | vs fp32 |"
        "\n|---:|---|---|---:|---:|"
    )
    for row in report["step_time"]:
        print(
            f"| {row['bits']}-bit | {row['weight_update']} | "
            f"{'codes' if row['save_codes'] else 'float32'} | {1000 * row['step_seconds']:.1f} | "
            f"{row['ratio_to_fp32']:.2f} |"
        )
    g = report["gradient_quantizer"]
    print(
        f"\n14-bit gradient quantizer on ResNet-18's {g['values']:,} weight gradients "
        f"({g['layers']} layers, {g['sampled_layers']} above the sampling threshold); one "
        f"backward at batch 64: {g['resnet18_backward_seconds_batch64']:.3f} s"
    )
    exact = g["exact"]["squared_error"]
    for name in ("exact", "sampled"):
        row = g[name]
        print(
            f"  {name}: {row['per_layer_seconds']:.3f} s ({row['per_layer_ratio_to_backward']:.2f}"
            f" x backward), squared error {row['squared_error'] / exact:.3f} x exact's"
        )
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
