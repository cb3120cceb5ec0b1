"""Peak memory of local training as a device runs it: low-bit against fp32, per allocator.

Each measurement is a fresh process with the environment a user gives it (no allocator variables
set from outside): it sets its allocator as a client does (``common.memory.configure_allocator``:
``lean`` gives freed memory back, ``fast`` is glibc's default), builds the model, resets the
kernel's peak-RSS mark and trains 3 SimCLR steps with the default settings. The growth of the
peak over the built model (optimizer state included) is what those steps needed; more steps are
timed for the step time. Every figure is a ratio to the fp32 step of the same allocator, measured
in the same run, beside what ``common/lowbit/bitops.py`` counts for the same model and batch.

    python benchmarks/step_memory.py      # writes benchmarks/results/step_memory.json (Linux)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CASES = {  # model -> (channels, image size, batch size): the quickstart's batch; ResNet-18 at 32
    "small_cnn": (1, 28, 128),
    "resnet18": (3, 32, 32),
}
MEASURED_STEPS = 3
# (bits, save_codes): fp32, then the default low-bit path (codes saved) and float32 saved
VARIANTS = [(32, False), (4, True), (4, False), (8, True), (12, True)]
ALLOCATORS = ("fast", "lean")
GOAL = 0.6  # issue 27: a 4-bit step's peak growth <= 0.6x fp32's, in the process users run


def measure_in_this_process(
    model_name: str, bits: int, save_codes: bool, allocator: str, timed: int
) -> dict:
    """One fresh measurement; run through ``--one`` so that nothing else shares the process."""
    from common.memory import configure_allocator, peak_resident_mb, reset_peak, resident_mb

    applied = configure_allocator(allocator, in_simulation=False)
    from common.learning.models import build_ssl_model
    from common.learning.training import LowBitSettings, prepare_model, train_step

    torch.manual_seed(0)
    channels, size, batch = CASES[model_name]
    model = build_ssl_model(model_name, bits, channels)
    settings = LowBitSettings(bits, save_codes=save_codes)
    prepare_model(model, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    views = [torch.randn(batch, channels, size, size) for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    reset_peak()
    before = resident_mb()
    for _ in range(MEASURED_STEPS):
        train_step(model, *views, optimizer, settings, generator=generator)
    growth_mb = peak_resident_mb() - before
    seconds = []
    for _ in range(timed):
        start = time.perf_counter()
        train_step(model, *views, optimizer, settings, generator=generator)
        seconds.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "bits": bits,
        "save_codes": save_codes,
        "allocator": applied,
        "batch": batch,
        "growth_mb": growth_mb,
        "step_s": statistics.median(seconds) if seconds else None,
    }


def counted_activation_ratio(model_name: str, bits: int) -> float:
    """What ``common/lowbit/bitops.py`` counts for the step's activations, as a ratio to fp32."""
    from common.learning.models import build_model
    from common.lowbit.bitops import layer_shapes, step_cost
    from common.vocabulary import FULL_PRECISION

    channels, size, batch = CASES[model_name]
    shapes = layer_shapes(build_model(model_name, 4, channels), (channels, size, size))
    low = step_cost(shapes, bits, batch)
    full = step_cost(shapes, FULL_PRECISION, batch)
    return low.activation_bits / full.activation_bits


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def measured(model_name: str, bits: int, save_codes: bool, allocator: str, timed: int) -> dict:
    """One measurement in a fresh process with the caller's environment, unchanged."""
    one = f"{model_name},{bits},{int(save_codes)},{allocator}"
    command = [sys.executable, __file__, "--one", one, "--timed-steps", str(timed)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # model,bits,save_codes,allocator
    args = parser.parse_args()
    if args.one:
        model_name, bits, save_codes, allocator = args.one.split(",")
        row = measure_in_this_process(
            model_name, int(bits), save_codes == "1", allocator, args.timed_steps
        )
        print(json.dumps(row))
        return
    rows = []
    for model_name in args.models.split(","):
        for allocator in ALLOCATORS:
            for bits, save_codes in VARIANTS:
                row = measured(model_name, bits, save_codes, allocator, args.timed_steps)
                rows.append(row)
                print(
                    f"{model_name} {allocator} {bits}-bit codes={save_codes}: growth "
                    f"{row['growth_mb']:.0f} MB, step {_ratio(row['step_s'])} s",
                    flush=True,
                )

    def fp32_of(row: dict, allocator: str) -> dict:
        return next(
            r
            for r in rows
            if r["model"] == row["model"] and r["bits"] == 32 and r["allocator"] == allocator
        )

    for row in rows:
        full, fast_full = fp32_of(row, row["allocator"]), fp32_of(row, "fast")
        row["growth_vs_fp32"] = row["growth_mb"] / full["growth_mb"]
        row["step_time_vs_fp32"] = row["step_s"] / full["step_s"]
        row["step_time_vs_fast_fp32"] = row["step_s"] / fast_full["step_s"]
        row["counted_activations_vs_fp32"] = counted_activation_ratio(row["model"], row["bits"])
    headline = {
        f"{row['model']}-{row['allocator']}": row["growth_vs_fp32"]
        for row in rows
        if row["bits"] == 4 and row["save_codes"]
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "step_memory.json"
    path.write_text(
        json.dumps(
            {
                "command": "python benchmarks/step_memory.py",
                "headline": "4-bit peak growth / fp32, default settings, per model and allocator",
                "goal": f"<= {GOAL} in the process users run",
                "result": headline,
                "machine": {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": "cpu",
                    "date": time.strftime("%Y-%m-%d"),
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        "\n| model | allocator | bits | saved as | growth MB | / fp32 | counted / fp32 "
        "| step s | / fp32 (same allocator) | / fp32 (fast) |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        saved = "codes" if row["save_codes"] else "float32"
        print(
            f"| {row['model']} (batch {row['batch']}) | {row['allocator']} | {row['bits']} | "
            f"{saved} | {row['growth_mb']:.0f} | {row['growth_vs_fp32']:.2f} | "
            f"{row['counted_activations_vs_fp32']:.2f} | {row['step_s']:.3f} | "
            f"{row['step_time_vs_fp32']:.2f} | {row['step_time_vs_fast_fp32']:.2f} |"
        )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
