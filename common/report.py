"""Comparison tables and plots from finished runs' ``summary.json`` files (no Flower, no torch).

A comparison is rows (algorithms, or the values of one swept config key) times seeds; each cell
is one run. Tables give mean ± sample standard deviation over the seeds that finished, shaped
like the paper's Tables 1-3 (Algorithm | Global Acc | Local Acc) plus bytes communicated.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One table row: a name and the summaries of its runs (one per seed; None if it failed)."""

    name: str
    summaries: list[dict | None] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [s[key] for s in self.summaries if s is not None and s.get(key) is not None]

    @property
    def failed_seeds(self) -> list[int]:
        return [seed for seed, s in zip(self.seeds, self.summaries, strict=True) if s is None]


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, nan for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(values: Sequence[float]) -> str:
    """``59.31 ± 0.42`` (accuracies in %), or ``n/a``."""
    mean, spread = mean_spread([100 * v for v in values])
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {spread:.2f}" if len(values) > 1 else f"{mean:.2f}"


def megabytes_per_round(row: Row) -> str:
    per_round = [
        s["uplink-bytes"] / 1e6 / max(s.get("rounds", 1), 1)
        for s in row.summaries
        if s is not None and s.get("uplink-bytes") is not None
    ]
    return f"{statistics.fmean(per_round):.3f}" if per_round else "n/a"


def comparison_table(rows: Sequence[Row], first_column: str = "Algorithm") -> str:
    """A Markdown table: first column | Global Acc (%) | Local Acc (%) | uplink | seeds."""
    lines = [
        f"| {first_column} | Global Acc (%) | Local Acc (%) | Uplink MB/round | "
        "Uplink / fp32 | Runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = row.values("uplink-ratio-to-fp32")
        done = len(row.values("global-accuracy"))
        failed = f", failed seeds {row.failed_seeds}" if row.failed_seeds else ""
        lines.append(
            f"| {row.name} | {percent(row.values('global-accuracy'))} | "
            f"{percent(row.values('mean-local-accuracy'))} | {megabytes_per_round(row)} | "
            f"{statistics.fmean(ratio):.3f} | {done}/{len(row.seeds)}{failed} |"
            if ratio
            else f"| {row.name} | n/a | n/a | n/a | n/a | 0/{len(row.seeds)}{failed} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[Row], path: Path, title: str) -> None:
    """Grouped bars of global and local accuracy per row, with the seeds' spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.8))
    width = 0.38
    for offset, key, label in (
        (-width / 2, "global-accuracy", "global"),
        (width / 2, "mean-local-accuracy", "local (mean)"),
    ):
        stats = [mean_spread([100 * v for v in row.values(key)]) for row in rows]
        axis.bar(
            [i + offset for i in range(len(rows))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            capsize=3,
            label=label,
        )
    axis.set_xticks(range(len(rows)), [row.name for row in rows], rotation=25, ha="right")
    axis.set(ylabel="accuracy (%)", title=title)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_sweep(rows: Sequence[Row], key: str, path: Path, title: str) -> None:
    """Global and local accuracy against the swept value (mean ± spread over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for metric, label in (("global-accuracy", "global"), ("mean-local-accuracy", "local (mean)")):
        stats = [mean_spread([100 * v for v in row.values(metric)]) for row in rows]
        axis.errorbar(
            range(len(rows)),
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    axis.set_xticks(range(len(rows)), [row.name for row in rows])
    axis.set(xlabel=key, ylabel="accuracy (%)", title=title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
