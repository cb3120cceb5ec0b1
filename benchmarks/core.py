"""Benchmarks of the core layer, reported as ratios measured within one run.

1. Packed payload bytes / ideal bytes for ResNet-18 (ideal: s bits per quantized weight plus
   4 bytes per full-precision element). Goal <= 1.005.
2. Low-bit training step time / full-precision step time, small CNN, same batch, CPU. Goal <= 1.5.
3. The 14-bit quantile gradient quantizer on ResNet-18's 11.2 M weight gradients, all layers at
   once as a training step runs it (``quantize_gradients_``), with exact quantiles (a sort per
   layer) and with the default sampled quantiles for large layers, rounded by the fused kernel
   and by tensor ops (the same numbers, checked), against one full-precision ResNet-18 backward
   pass at batch 64.

    python benchmarks/core.py     # writes payload_bytes.json, step_time.json and
                                  # gradient_quantizer.json in benchmarks/results/
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import harness
import torch

from common.learning.models import build_model, build_ssl_model
from common.learning.training import LowBitSettings, prepare_model, train_step
from common.lowbit import kernel
from common.lowbit.layers import quantized_layers
from common.lowbit.quantizers import (
    SAMPLED_QUANTILES_ABOVE,
    quantize_gradient,
    quantize_gradients_,
)
from common.vocabulary import FULL_PRECISION
from common.wire.payload import encode_state, is_quantized, payload_nbytes

PAYLOAD_GOAL = 1.005  # packed bytes / ideal bytes
ERROR_DRAWS = 3  # seeded quantizations whose squared error the gradient table sums


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
        seconds = harness.median_seconds(
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


@contextlib.contextmanager
def without_kernel(off: bool) -> Iterator[None]:
    """The gradient quantizer without its fused kernels, exact and sampled layers' (as on a
    machine without a compiler)."""
    loaders = {name: getattr(kernel, name) for name in ("round_between", "counter_uniform")}
    if off:
        for name in loaders:
            setattr(kernel, name, lambda: None)
    try:
        yield
    finally:
        for name, loader in loaders.items():
            setattr(kernel, name, loader)


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
    # exact: one sort per layer whatever its size; sampled: the default, layers above
    # SAMPLED_QUANTILES_ABOVE elements estimate their centres from a sample; either rounds in
    # the fused kernels (common/lowbit/kernel.py) or, as without a compiler, in tensor ops
    fused = kernel.round_between() is not None
    cases = [("exact", flat.numel() + 1, "full sort" + (", fused kernel" if fused else ""))]
    if fused:
        cases.append(("sampled", SAMPLED_QUANTILES_ABOVE, "fused kernel"))
    cases.append(("sampled", SAMPLED_QUANTILES_ABOVE, "tensor ops"))
    rows, kernel_outputs = [], None
    buffers = [g.clone() for g in grads]

    def quantize_all(above: int) -> None:
        """The training step's call (every layer at once, in place), on a fresh copy of the
        gradients (the copy, ~3 ms, is in the time)."""
        for buffer, grad in zip(buffers, grads, strict=True):
            buffer.copy_(grad)
        quantize_gradients_(buffers, 14, sample_above=above)

    for name, above, rounding in cases:
        with without_kernel(rounding == "tensor ops"):
            seconds = harness.median_seconds(lambda above=above: quantize_all(above), repeats, 1)
            # squared error over ERROR_DRAWS seeded draws: one draw of sampled centres is noisy
            outputs = [
                [quantize_gradient(g, 14, "stochastic", torch.Generator().manual_seed(seed), above)
                 for g in grads]
                for seed in range(ERROR_DRAWS)
            ]  # fmt: skip
        if rounding == "fused kernel":
            kernel_outputs = outputs
        elif rounding == "tensor ops" and kernel_outputs is not None:
            # the kernel gives the tensor ops' numbers, or this is no comparison
            assert all(
                torch.equal(a, b)
                for draw, kernel_draw in zip(outputs, kernel_outputs, strict=True)
                for a, b in zip(draw, kernel_draw, strict=True)
            )
        rows.append(
            {
                "quantiles": name,
                "rounding": rounding,
                "sampled_layers": 0
                if name == "exact"
                else sum(g.numel() > SAMPLED_QUANTILES_ABOVE for g in grads),
                "seconds": seconds,
                "ratio_to_backward": seconds / backward_seconds,
                "squared_error": sum(
                    float(((q - g) ** 2).sum())
                    for draw in outputs
                    for q, g in zip(draw, grads, strict=True)
                ),
            }
        )
    for row in rows:
        row["error_vs_exact"] = row["squared_error"] / rows[0]["squared_error"]
    return {
        "values": flat.numel(),
        "layers": len(grads),
        "bits": 14,
        "resnet18_backward_seconds_batch64": backward_seconds,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    command = "python benchmarks/core.py"
    payload = payload_ratios()
    worst = max(row["ratio"] for row in payload)
    harness.write_result(
        "payload_bytes",
        command,
        [
            harness.headline(
                "ResNet-18 packed payload bytes / ideal, worst bitwidth",
                worst,
                f"<= {PAYLOAD_GOAL}",
                worst <= PAYLOAD_GOAL,
            )
        ],
        [
            ("bits", "bits", "d"),
            ("payload_bytes", "payload bytes", ",d"),
            ("ideal_bytes", "ideal bytes", ",d"),
            ("ratio", "ratio", ".5f"),
        ],
        payload,
    )
    steps = step_times(args.repeats)
    for row in steps:
        row["saved"] = "codes" if row["save_codes"] else "float32"
        row["step_ms"] = 1000 * row["step_seconds"]
    harness.write_result(
        "step_time",
        command,
        [
            harness.headline(
                f"small CNN {row['bits']}-bit step / fp32, {row['weight_update']} update, "
                f"{row['saved']} saved",
                row["ratio_to_fp32"],
            )
            for row in steps
            if row["bits"] == 4
        ],
        [
            ("bits", "bits", "d"),
            ("weight_update", "weight update", "s"),
            ("saved", "saved for backward", "s"),
            ("step_ms", "ms / step", ".1f"),
            ("ratio_to_fp32", "vs fp32", ".2f"),
        ],
        steps,
    )
    quantizer = gradient_quantizer(max(3, args.repeats // 3))
    rows = quantizer.pop("rows")
    harness.write_result(
        "gradient_quantizer",
        command,
        [
            harness.headline(
                "sampled / exact quantiles: seconds per step",
                rows[1]["seconds"] / rows[0]["seconds"],
            ),
            harness.headline("sampled / exact quantiles: squared error", rows[1]["error_vs_exact"]),
            *(
                [
                    harness.headline(
                        "sampled quantiles, fused kernel / tensor ops: seconds per step",
                        rows[1]["seconds"] / rows[2]["seconds"],
                    )
                ]
                if len(rows) == 3
                else []
            ),
        ],
        [
            ("quantiles", "quantiles", "s"),
            ("rounding", "rounding", "s"),
            ("sampled_layers", "sampled layers", "d"),
            ("seconds", "s per step", ".2f"),
            ("ratio_to_backward", "/ backward", ".2f"),
            ("error_vs_exact", "squared error / exact's", ".3f"),
        ],
        rows,
        **quantizer,
    )


if __name__ == "__main__":
    main()
