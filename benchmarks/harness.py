"""What every benchmark shares: the machine's facts, timing, child processes, and one result shape.

Each benchmark writes ``benchmarks/results/<name>.json`` through ``write_result``::

    {"benchmark": "step_memory", "command": "python benchmarks/step_memory.py",
     "date": "2026-12-06", "machine": {...}, "commit": "...",
     "headlines": [{"what": ..., "value": 0.43, "goal": "<= 0.6", "met": true}, ...],
     "table": {"columns": [[key, header, format], ...], "rows": [...]}, ...}

``python benchmarks/tables.py`` rewrites each table of ``docs/BENCHMARKS.md`` (between
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``) from these files, so what the document says
is what the last run found, with its date, machine and command beside it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common.atomic import write_text_atomically

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"

Column = tuple[str, str, str]  # (row key, header, format spec: ".2f", "d", "s", ",d", ...)


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, usable cores, torch and its threads, GPU if any,
    and the load average when the benchmark started (a busy machine reads slow)."""
    from fedqssl_server.fine_tunes import usable_cores  # the count server-workers divides

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def commit() -> str | None:
    """The checked-out commit the numbers belong to (None outside a git checkout)."""
    completed = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def timings(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def best_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The fastest of the timed calls: the least disturbed by other work on a noisy machine
    (ratios are taken between minima of the same run)."""
    return min(timings(run, repeats, warmup))


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median of the timed calls."""
    return statistics.median(timings(run, repeats, warmup))


def in_fresh_process(script: str | Path, args: Sequence[str], env: dict | None = None) -> dict:
    """Run ``script`` with ``args`` in a new interpreter and parse the JSON its last output line
    holds: a measurement that nothing else in this process can disturb (allocator state,
    imported modules, peak-memory marks)."""
    completed = subprocess.run(
        [sys.executable, str(script), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def headline(what: str, value: float, goal: str | None = None, met: bool | None = None) -> dict:
    """One finding: what was measured, its value, the goal it is held to and whether it met it."""
    return {"what": what, "value": value, "goal": goal, "met": met}


def write_result(
    name: str,
    command: str,
    headlines: list[dict],
    columns: Sequence[Column],
    rows: list[dict],
    **extra: Any,
) -> Path:
    """Write ``benchmarks/results/<name>.json`` in the shared shape; returns its path. Written
    atomically: a crash leaves the previous result, never half of one."""
    result = {
        "benchmark": name,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": machine(),
        "headlines": headlines,
        "table": {"columns": [list(column) for column in columns], "rows": rows},
        **extra,
    }
    path = RESULTS / f"{name}.json"
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    for finding in headlines:
        print(headline_text(finding))
    print(f"\nwritten to {path}")
    return path


def cell(value: Any, spec: str) -> str:
    """One table cell: '-' for a missing value, else ``value`` in ``spec``."""
    if value is None:
        return "-"
    if spec == "s":
        return str(value)
    return format(value, spec)


def markdown_table(result: dict) -> str:
    """The result's table as Markdown (numbers right-aligned)."""
    columns = result["table"]["columns"]
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in columns) + "|",
    ]
    for row in result["table"]["rows"]:
        lines.append("| " + " | ".join(cell(row.get(key), spec) for key, _, spec in columns) + " |")
    return "\n".join(lines)


def headline_text(finding: dict) -> str:
    """A headline as one sentence-like line."""
    goal = "" if finding["goal"] is None else f" (goal {finding['goal']}: "
    if goal:
        goal += "met)" if finding["met"] else "not met)"
    value = finding["value"]
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"- {finding['what']}: **{shown}**{goal}"
