"""Peak memory growth of one training step, low-bit against fp32, with and without saved codes.

Each measurement runs in a fresh process: build the model, take one warm-up step (Adam's state,
thread pools), then reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), take one step
and read the new peak (``VmHWM``) minus the resident size before it. That growth is what a step
needs beyond the model and optimizer: saved activations, gradients, temporaries. A few more steps
are timed for the step-time ratio. Every figure is reported as a ratio to the fp32 step measured
in the same run, beside what ``common/lowbit/bitops.py`` counts for the same model and batch.

    python benchmarks/step_memory.py      # writes benchmarks/results/step_memory.json (Linux)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CASES = {  # model -> (channels, image size, batch size)
    "small_cnn": (1, 28, 256),
    "resnet18": (3, 32, 64),
}
# glibc keeps freed heap memory resident, so a peak RSS would count the allocator's history;
# with a fixed mmap threshold every tensor over 64 KiB is its own mapping, returned on free.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
VARIANTS = [(32, False), (4, False), (4, True), (8, True), (12, True), (8, False), (12, False)]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure_in_this_process(model_name: str, bits: int, save_codes: bool, timed: int) -> dict:
    """One fresh measurement; run through ``--one`` so that nothing else shares the process."""
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
    train_step(model, *views, optimizer, settings, generator=generator)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    train_step(model, *views, optimizer, settings, generator=generator)
    growth_mb = (status_kb("VmHWM") - before) / 1024
    seconds = []
    for _ in range(timed):
        start = time.perf_counter()
        train_step(model, *views, optimizer, settings, generator=generator)
        seconds.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "bits": bits,
        "save_codes": save_codes,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # model,bits,save_codes: one measurement
    args = parser.parse_args()
    if args.one:
        model_name, bits, save_codes = args.one.split(",")
        row = measure_in_this_process(model_name, int(bits), save_codes == "1", args.timed_steps)
        print(json.dumps(row))
        return
    rows = []
    for model_name in args.models.split(","):
        for bits, save_codes in VARIANTS:
            one = f"{model_name},{bits},{int(save_codes)}"
            command = [
                sys.executable,
                __file__,
                "--one",
                one,
                "--timed-steps",
                str(args.timed_steps),
            ]
            output = subprocess.run(
                command, check=True, capture_output=True, text=True, cwd=ROOT, env=MALLOC_ENV
            )
            row = json.loads(output.stdout.strip().splitlines()[-1])
            rows.append(row)
            step = _ratio(row["step_s"])
            print(f"{one}: growth {row['growth_mb']:.0f} MB, step {step} s", flush=True)
    for row in rows:
        full = next(r for r in rows if r["model"] == row["model"] and r["bits"] == 32)
        row["growth_vs_fp32"] = row["growth_mb"] / full["growth_mb"]
        timed = row["step_s"] is not None and full["step_s"] is not None
        row["step_time_vs_fp32"] = row["step_s"] / full["step_s"] if timed else None
        row["counted_activations_vs_fp32"] = counted_activation_ratio(row["model"], row["bits"])
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}
    path = RESULTS / "step_memory.json"
    measured = {row["model"] for row in rows}
    if path.exists():  # keep the other models' rows of an earlier run
        earlier = json.loads(path.read_text())["rows"]
        rows = [row for row in earlier if row["model"] not in measured] + rows
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n| model | bits | saved as | growth MB | / fp32 | counted / fp32 | step time / fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        saved = "codes" if row["save_codes"] else "float32"
        print(
            f"| {row['model']} (batch {row['batch']}) | {row['bits']} | {saved} | "
            f"{row['growth_mb']:.0f} | {row['growth_vs_fp32']:.2f} | "
            f"{row['counted_activations_vs_fp32']:.2f} | {_ratio(row['step_time_vs_fp32'])} |"
        )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
