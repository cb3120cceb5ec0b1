"""Where a training step spends its time: fp32 against the default 4-bit step (codes saved) and
the float32-saving one, phase by phase, with the fused kernels and without them.

The models and batches of ``benchmarks/step_memory.py``, one fresh process per (model, kernels
on/off); inside it the three steps take turns (3 steps each per turn, ``--turns`` turns), so
drift on a busy machine lands on all three alike, and each phase's median over every timed step
is reported: forward (both SimCLR views, with the weight and activation quantizers), backward
(the codes path's recomputed layers included), the gradient quantizer
(``quantize_weight_grads_``), Adam, and the grid projection (``project_weights_``). Kernels off
is what a machine without a C++ compiler runs (``FEDQSSL_FUSED_KERNEL=off``): the same numbers,
the tensor ops. ``timed_step`` repeats ``common.learning.training.train_step``'s sequence with a
clock between phases (no proximal term: SimCLR only).

    python benchmarks/step_split.py      # writes benchmarks/results/step_split.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import harness
import torch
from step_memory import CASES, STEP_GOAL_CODES, STEP_GOAL_FLOAT32

from common.learning.models import build_ssl_model
from common.learning.training import LowBitSettings, objective_loss, prepare_model
from common.lowbit import kernel
from common.lowbit.layers import project_weights_, quantize_weight_grads_
from common.lowbit.quantizers import quantizing_once
from common.lowbit.saved_codes import saving_codes
from common.vocabulary import FULL_PRECISION

STEPS = {"fp32": (FULL_PRECISION, False), "4-bit codes": (4, True), "4-bit float32": (4, False)}
PHASES = ("forward", "backward", "gradient_quantizer", "adam", "projection")
GOALS = {"4-bit codes": STEP_GOAL_CODES, "4-bit float32": STEP_GOAL_FLOAT32}


def timed_step(model, optimizer, settings: LowBitSettings, views, generator) -> list[float]:
    """One training step (``common.learning.training.train_step``'s sequence), each phase's
    seconds."""
    marks = [time.perf_counter()]
    with saving_codes() if settings.save_codes else contextlib.nullcontext(), quantizing_once():
        loss = objective_loss(model, *views, 0.5)
    marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(time.perf_counter())
    quantize_weight_grads_(model, settings.bits, settings.grad_rounding, generator)
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    if settings.weight_update == "grid":
        project_weights_(model, settings.bits, "stochastic", generator)
    marks.append(time.perf_counter())
    return [later - earlier for earlier, later in itertools.pairwise(marks)]


def measure_in_this_process(model_name: str, turns: int) -> dict:
    """{step: {phase: median ms}} for the three steps of ``model_name``, taking turns."""
    channels, size, batch = CASES[model_name]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, channels, size, size, generator=generator) for _ in range(2)]
    runs = {}
    for name, (bits, save_codes) in STEPS.items():
        model = build_ssl_model(model_name, bits, in_channels=channels)
        settings = LowBitSettings(bits, "grid", "stochastic", save_codes)
        prepare_model(model, settings)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):  # warm-up: first-call allocations, the kernels' load
            timed_step(model, optimizer, settings, views, generator)
        runs[name] = (model, optimizer, settings, [])
    for _ in range(turns):
        for model, optimizer, settings, seconds in runs.values():
            for _ in range(3):
                seconds.append(timed_step(model, optimizer, settings, views, generator))
    return {
        name: {
            phase: 1000 * statistics.median(step[k] for step in seconds)
            for k, phase in enumerate(PHASES)
        }
        | {"total": 1000 * statistics.median(sum(step) for step in seconds)}
        for name, (_, _, _, seconds) in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # model name: measure, print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_in_this_process(args.child, args.turns)))
        return
    rows, headlines = [], []
    for model_name in CASES:
        for kernels in ("on", "off"):
            env = dict(os.environ)
            env.pop(kernel.SWITCH, None)
            if kernels == "off":
                env[kernel.SWITCH] = "off"
            print(f"==> {model_name}, fused kernels {kernels}", file=sys.stderr)
            medians = harness.in_fresh_process(
                Path(__file__), ["--child", model_name, "--turns", str(args.turns)], env
            )
            fp32 = medians["fp32"]["total"]
            for name, phases in medians.items():
                ratio = phases["total"] / fp32
                rows.append(
                    {
                        "model": model_name,
                        "kernels": kernels,
                        "step": name,
                        **phases,
                        "ratio_to_fp32": ratio,
                    }
                )
                if name in GOALS and kernels == "on":
                    headlines.append(
                        harness.headline(
                            f"{model_name}: {name} step / fp32 step (one process, fused kernels)",
                            ratio,
                            f"<= {GOALS[name]}",
                            ratio <= GOALS[name],
                        )
                    )
    harness.write_result(
        "step_split",
        "python benchmarks/step_split.py",
        headlines,
        [
            ("model", "model", "s"),
            ("kernels", "kernels", "s"),
            ("step", "step", "s"),
            *((phase, f"{phase.replace('_', ' ')} ms", ".1f") for phase in PHASES),
            ("total", "total ms", ".1f"),
            ("ratio_to_fp32", "/ fp32", ".2f"),
        ],
        rows,
        turns=args.turns,
        batch={name: case[2] for name, case in CASES.items()},
    )


if __name__ == "__main__":
    main()
