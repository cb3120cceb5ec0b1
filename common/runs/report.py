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

UNTRAINED = "untrained-"  # prefix of a score's floor: the same protocol on the initial model
GLOBAL, LOCAL = "global-accuracy", "mean-local-accuracy"
GLOBAL_PROBE, LOCAL_PROBE = "global-probe-accuracy", "mean-local-probe-accuracy"
KNN_ACCURACY = "knn-accuracy"  # the global encoder's kNN monitor after the last round
SCORES = (GLOBAL, LOCAL, GLOBAL_PROBE, LOCAL_PROBE, KNN_ACCURACY)


@dataclass
class Row:
    """One table row: a name and the summaries of its runs (one per seed; None if it failed)."""

    name: str
    summaries: list[dict | None] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        """The values of ``key`` over the runs that finished."""
        return [s[key] for s in self.summaries if s is not None and s.get(key) is not None]

    def gains(self, key: str) -> list[float]:
        """``key`` minus its untrained floor, paired run by run."""
        return [
            s[key] - s[UNTRAINED + key]
            for s in self.summaries
            if s is not None and s.get(key) is not None and s.get(UNTRAINED + key) is not None
        ]

    @property
    def failed_seeds(self) -> list[int]:
        """The seeds whose run wrote no summary."""
        return [seed for seed, s in zip(self.seeds, self.summaries, strict=True) if s is None]


def untrained_row(row: Row, name: str = "untrained") -> Row:
    """The floor of ``row`` as a row of its own: each run's untrained scores in the score keys."""
    summaries = [
        None
        if s is None
        else {
            key: s.get(UNTRAINED + key)
            for key in (GLOBAL, LOCAL, GLOBAL_PROBE, LOCAL_PROBE, KNN_ACCURACY)
        }
        for s in row.summaries
    ]
    return Row(name, summaries, list(row.seeds))


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, nan for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(values: Sequence[float], signed: bool = False) -> str:
    """``59.31 ± 0.42`` (accuracies in %; ``+5.10 ± 0.42`` for a gain), or ``n/a``."""
    mean, spread = mean_spread([100 * v for v in values])
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{text} ± {spread:.2f}" if len(values) > 1 else text


def megabytes_per_round(row: Row) -> str:
    """A row's mean uplink in MB per round."""
    per_round = [
        s["uplink-bytes"] / 1e6 / max(s.get("rounds", 1), 1)
        for s in row.summaries
        if s is not None and s.get("uplink-bytes") is not None
    ]
    return f"{statistics.fmean(per_round):.3f}" if per_round else "n/a"


SSL_PROBE = (("Global Acc", GLOBAL_PROBE), ("Local Acc", LOCAL_PROBE))
KNN = (("Global kNN", KNN_ACCURACY),)


def comparison_table(
    rows: Sequence[Row],
    first_column: str = "Algorithm",
    floor: Row | None = None,
    scores: Sequence[tuple[str, str]] = (("Global Acc", GLOBAL), ("Local Acc", LOCAL)),
    traffic: bool = True,
) -> str:
    """A Markdown table: first column | each score (%) | its gain over each run's untrained floor
    (points, paired by seed) | uplink | runs; ``floor`` (the untrained encoder) first when given.
    ``scores`` are (column title, summary key): the algorithms' own protocol by default,
    ``SSL_PROBE`` for the SSL probe on every row, ``KNN`` for the kNN monitor."""
    titles = [title for title, _ in scores]
    header = (
        f"| {first_column} | "
        + " | ".join(f"{t} (%)" for t in titles)
        + " | "
        + " | ".join(f"{t.split()[0]} gain" if len(scores) > 1 else "Gain" for t in titles)
        + " |"
    )
    rule = "|---|" + "---:|" * 2 * len(scores)
    if traffic:
        header += " Uplink MB/round | Uplink / fp32 |"
        rule += "---:|---:|"
    lines = [header + " Runs |", rule + "---|"]
    for row in [floor] * (floor is not None) + list(rows):
        done = len(row.values(scores[0][1]))
        failed = f", failed seeds {row.failed_seeds}" if row.failed_seeds else ""
        cells = [row.name, *(percent(row.values(key)) for _, key in scores)]
        cells += [
            "—" if row is floor else percent(row.gains(key), signed=True) for _, key in scores
        ]
        if traffic:
            ratio = row.values("uplink-ratio-to-fp32")
            ratio_text = f"{statistics.fmean(ratio):.3f}" if ratio else "n/a"
            cells += ["—", "—"] if row is floor else [megabytes_per_round(row), ratio_text]
        lines.append("| " + " | ".join([*cells, f"{done}/{len(row.seeds)}{failed}"]) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(rows: Sequence[Row], keys: tuple[str, str] = (GLOBAL, LOCAL)) -> str:
    """Every run's global / local accuracy (%) and its untrained floor, one column per seed."""
    seeds = sorted({seed for row in rows for seed in row.seeds})
    lines = [
        "| Row | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]

    def cell(summary: dict | None) -> str:
        """One seed's cell: global / local, with the floor; "failed" or "n/a"."""
        if summary is None:
            return "failed"
        scores = [summary.get(k) for k in (*keys, *(UNTRAINED + k for k in keys))]
        if any(v is None for v in scores[:2]):
            return "n/a"
        if any(v is None for v in scores[2:]):  # the floor's own row
            return "{:.2f} / {:.2f}".format(*(100 * v for v in scores[:2]))
        return "{:.2f} / {:.2f} (floor {:.2f} / {:.2f})".format(*(100 * v for v in scores))

    for row in rows:
        by_seed = dict(zip(row.seeds, row.summaries, strict=True))
        cells = [cell(by_seed[seed]) if seed in by_seed else "" for seed in seeds]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAIRED_SCORES = (("Global probe", GLOBAL_PROBE), ("Global kNN", KNN_ACCURACY), ("Local", LOCAL))


def paired_differences(first: Row, second: Row, key: str) -> dict[int, float]:
    """``first - second`` in ``key``, seed by seed, over the seeds where both finished."""
    theirs = {
        seed: s[key]
        for seed, s in zip(second.seeds, second.summaries, strict=True)
        if s is not None and s.get(key) is not None
    }
    return {
        seed: s[key] - theirs[seed]
        for seed, s in zip(first.seeds, first.summaries, strict=True)
        if s is not None and s.get(key) is not None and seed in theirs
    }


def paired_table(pairs: Sequence[tuple[Row, Row]]) -> str:
    """A Markdown table of paired differences (points): for each (A, B) and each score, A - B
    mean ± spread over the seeds both finished, and each seed's difference."""
    lines = [
        "| A - B | " + " | ".join(f"{title} (points)" for title, _ in PAIRED_SCORES) + " | Seeds |",
        "|---|" + "---:|" * len(PAIRED_SCORES) + "---|",
    ]
    for first, second in pairs:
        cells, seeds = [], set()
        for _, key in PAIRED_SCORES:
            differences = paired_differences(first, second, key)
            seeds |= set(differences)
            each = ", ".join(f"{100 * d:+.2f}" for d in differences.values())
            cells.append(f"{percent(list(differences.values()), signed=True)} ({each})")
        seed_text = ",".join(map(str, sorted(seeds))) or "none"
        lines.append(f"| {first.name} - {second.name} | " + " | ".join(cells) + f" | {seed_text} |")
    return "\n".join(lines) + "\n"


BUDGET_KEYS = ("train-steps", "server-steps", "dequantize-steps", "requantize-steps")


def budget_table(rows: Sequence[Row]) -> str:
    """A Markdown table of each row's training budget: optimizer steps per round, all clients'
    together and the server's (with its de- and re-quantization steps), mean over its runs."""
    lines = [
        "| Row | Client steps / round | Server steps / round | of which de-quantize | "
        "of which re-quantize | p_k range |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = []
        for key in BUDGET_KEYS:
            per_round = [
                s[key] / s["rounds"]
                for s in row.summaries
                if s is not None and s.get(key) is not None and s.get("rounds")
            ]
            cells.append(f"{statistics.fmean(per_round):.0f}" if per_round else "n/a")
        ranges = [s["weight-range"] for s in row.summaries if s and s.get("weight-range")]
        low, high = (
            min(r[0] for r in ranges) if ranges else 0,
            max(r[1] for r in ranges) if ranges else 0,
        )
        cells.append(f"{low:.3f}-{high:.3f}" if ranges else "n/a")
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[Row], path: Path, title: str) -> None:
    """Grouped bars of global and local accuracy per row, with the seeds' spread as error bars
    (put the untrained floor's row among ``rows`` to draw it as bars too)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.8))
    width = 0.38
    for offset, key, label in ((-width / 2, GLOBAL, "global"), (width / 2, LOCAL, "local (mean)")):
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
    """Global and local accuracy against the swept value (mean ± spread over seeds), each beside
    its untrained floor (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for metric, label in ((GLOBAL, "global"), (LOCAL, "local (mean)")):
        stats = [mean_spread([100 * v for v in row.values(metric)]) for row in rows]
        line = axis.errorbar(
            range(len(rows)),
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
        floors = [mean_spread([100 * v for v in row.values(UNTRAINED + metric)])[0] for row in rows]
        axis.plot(
            range(len(rows)),
            floors,
            linestyle="--",
            color=line.lines[0].get_color(),
            label=f"{label}, untrained",
        )
    axis.set_xticks(range(len(rows)), [row.name for row in rows])
    axis.set(xlabel=key, ylabel="accuracy (%)", title=title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
