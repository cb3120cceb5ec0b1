"""torch.compile against the fused C++ kernels on the element-wise work: DoReFa's activation
(clamp, mask, round, divide, codes), its backward (unpack the mask, multiply) and saved codes
back to floats. Each is timed three ways in one process, alternately: the eager tensor ops the
step falls back to, ``torch.compile`` of those same ops (inductor's CPU code), and the kernel.
Floats are compared bit for bit with the eager ops, which the step's results are held to.

    python benchmarks/compile_vs_kernels.py   # writes benchmarks/results/compile_vs_kernels.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import harness
import torch

from common.lowbit import kernel
from common.lowbit.saved_codes import code_dtype

_BIT_VALUES = 1 << torch.arange(8, dtype=torch.uint8)


def activation(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoReFa's forward as tensor ops: (output, the clamp's mask one bit per element, codes)."""
    bounded = x.clamp(0.0, 1.0)
    mask = (bounded == x).reshape(-1, 8).to(torch.uint8)
    packed = (mask * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)
    codes = (bounded * levels).round()
    return codes / levels, packed, codes.to(code_dtype(levels))


def gradient(grad: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Its backward: the mask unpacked, times the incoming gradient."""
    passes = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return grad * passes.reshape(grad.shape).to(grad.dtype)


def decode(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Saved codes back to the float activation."""
    return codes.to(torch.float32) / levels


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32) if tensor.dtype == torch.float32 else tensor


def same(first: object, second: object) -> bool:
    """Bit for bit, tuples element-wise."""
    if isinstance(first, tuple):
        return all(same(a, b) for a, b in zip(first, second, strict=True))
    return torch.equal(bits_of(first), bits_of(second))


def compiled_once(function: Callable, *args: object) -> tuple[Callable, float]:
    """``torch.compile`` of ``function`` and the seconds its first call (the compilation) took."""
    compiled = torch.compile(function, dynamic=False)
    start = time.perf_counter()
    compiled(*args)
    return compiled, time.perf_counter() - start


def measure(shape: tuple[int, ...], bits: int, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    levels = 2**bits - 1
    x = torch.randn(shape, generator=generator) * 0.6 + 0.5
    grad = torch.randn(shape, generator=generator)
    _, packed, codes = activation(x, levels)
    fused_forward, fused_backward = kernel.bounded_quantize(), kernel.masked_gradient()
    fused_decode = kernel.decode_codes()
    code_bytes = code_dtype(levels).itemsize
    cases = {
        "activation": (
            lambda f: f(x, levels),
            activation,
            lambda: tuple(fused_forward(x, levels, code_bytes)),
        ),
        "backward": (lambda f: f(grad, packed), gradient, lambda: fused_backward(grad, packed)),
        "decode": (lambda f: f(codes, levels), decode, lambda: fused_decode(codes, levels)),
    }
    rows = []
    for name, (call, eager, fused) in cases.items():
        compiled, compile_s = compiled_once(eager, *call(lambda *a: a))
        expected = call(eager)
        runs = {"eager": partial(call, eager), "compiled": partial(call, compiled), "kernel": fused}
        seconds = {key: [] for key in runs}
        for _ in range(repeats):  # alternately, so that machine noise hits all three
            for key, run in runs.items():
                seconds[key].append(harness.best_seconds(run, 3))
        best = {key: min(values) for key, values in seconds.items()}
        rows.append(
            {
                "work": name,
                "elements": x.numel(),
                "bits": bits,
                "eager_ms": 1e3 * best["eager"],
                "compiled_ms": 1e3 * best["compiled"],
                "kernel_ms": 1e3 * best["kernel"],
                "compiled_over_kernel": best["compiled"] / best["kernel"],
                "compile_s": compile_s,
                "compiled_same": same(call(compiled), expected),
                "kernel_same": same(fused(), expected),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if kernel.compiled() is None:
        raise SystemExit("the fused kernels did not build here (no C++ compiler or ninja?)")
    # a small CNN's first activation at batch 256 (16 channels of 28 x 28), 2 and 4 bits
    rows = [row for bits in (2, 4) for row in measure((256, 16, 28, 28), bits, args.repeats)]
    ratios = [row["compiled_over_kernel"] for row in rows]
    harness.write_result(
        "compile_vs_kernels",
        "python benchmarks/compile_vs_kernels.py",
        [
            harness.headline(
                "torch.compile time / kernel time, geometric mean over the six cases",
                float(torch.tensor(ratios).log().mean().exp()),
            ),
            harness.headline(
                "cases where torch.compile's floats equal the eager ops' bit for bit",
                f"{sum(row['compiled_same'] for row in rows)} of {len(rows)}",
            ),
            harness.headline(
                "cases where the kernel's floats equal the eager ops' bit for bit",
                f"{sum(row['kernel_same'] for row in rows)} of {len(rows)}",
            ),
        ],
        [
            ("work", "work", "s"),
            ("bits", "bits", "d"),
            ("elements", "elements", ",d"),
            ("eager_ms", "eager ms", ".2f"),
            ("compiled_ms", "torch.compile ms", ".2f"),
            ("kernel_ms", "kernel ms", ".2f"),
            ("compiled_over_kernel", "compile / kernel", ".2f"),
            ("compile_s", "compile s (first call)", ".1f"),
            ("compiled_same", "compile: same floats", "s"),
            ("kernel_same", "kernel: same floats", "s"),
        ],
        rows,
    )


if __name__ == "__main__":
    main()
