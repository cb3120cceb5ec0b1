"""What finished runs print and write: a run's summary lines, a plan's comparison or sweep.

Reads the runs' ``summary.json`` files (no Flower, no torch); the tables and plots themselves
are ``common/runs/report.py``'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.algorithms import get_algorithm
from common.config import ExperimentConfig
from common.readback import RecordError, read_json_object
from common.runs import report
from common.runs.plan import Plan


def read_summary(output_dir: Path) -> dict | None:
    """A run's ``summary.json``, or None when it has none; a damaged one is a ``RecordError``
    naming it."""
    path = output_dir / "summary.json"
    if not path.exists():
        return None
    summary = read_json_object(path, "run summary")
    if "global-accuracy" not in summary:
        raise RecordError(f"{path}: a run summary without its scores (no 'global-accuracy')")
    return summary


def print_summary(output_dir: Path) -> int:
    """Print a finished run's summary; 1 when it wrote none."""
    summary = read_summary(output_dir)
    if summary is None:
        print(f"\nthe run finished but wrote no {output_dir / 'summary.json'}", file=sys.stderr)
        return 1
    print("\n" + "\n".join(summary_lines(summary, str(output_dir))))
    return 0


def summary_lines(summary: dict, where: str) -> list[str]:
    """What a finished run prints: its scores beside the untrained floor, uplink, budget, time
    and where its files are (``where``)."""
    lines = [
        f"==> results summary ({summary.get('label', '')})",
        f"global accuracy (final epoch):           {summary['global-accuracy']:.4f}",
    ]
    if summary["mean-local-accuracy"] is not None:
        local = summary["mean-local-accuracy"]
        lines.append(f"mean local accuracy (per-client models): {local:.4f}")
    lines.append(f"untrained floor (initial model, same protocol): {floor_line(summary)}")
    for client in summary["local-accuracy"]:
        lines.append(
            f"  client {client['partition-id']:>2} ({client['bitwidth']:>2}-bit): "
            f"{client['local-accuracy']:.4f} (untrained {client['untrained-local-accuracy']:.4f}) "
            f"on {client['test-examples']} local test images"
        )
    fp32_megabytes = summary["fp32-equivalent-uplink-bytes"] / 1e6
    lines.append(
        f"uplink: {summary['uplink-bytes'] / 1e6:.2f} MB, "
        f"{summary['uplink-ratio-to-fp32']:.3f} of fp32 ({fp32_megabytes:.2f} MB)"
    )
    if "server-steps" in summary:
        lines.append(
            f"budget: {summary['train-steps']} client optimizer steps, "
            f"{summary['server-steps']} server steps over {summary['rounds']} rounds"
        )
    lines.append(f"wall time: {summary['wall-seconds']:.0f} s; files in {where}")
    return lines


def floor_line(summary: dict) -> str:
    """``global 0.7777 (gain +0.0050), mean local 0.8790 (gain +0.0037), kNN 0.71 (...)``."""
    parts = []
    for name, key in (
        ("global", report.GLOBAL),
        ("mean local", report.LOCAL),
        ("kNN", report.KNN_ACCURACY),
    ):
        value, floor = summary.get(key), summary.get(report.UNTRAINED + key)
        if value is not None and floor is not None:
            parts.append(f"{name} {floor:.4f} (gain {value - floor:+.4f})")
    return ", ".join(parts) or "n/a"


def floor_source(plan: Plan, rows: dict[str, report.Row]) -> report.Row:
    """The row whose untrained scores stand for the floor: the first self-supervised low-bit
    row (the SSL probe at the plan's bitwidths), else the first row."""
    for name, row in rows.items():
        algorithm = get_algorithm(plan.rows[name].get("algorithm", plan.base["algorithm"]))
        if algorithm.self_supervised and "bitwidths" not in plan.rows[name]:
            return row
    return next(iter(rows.values()))


def write_report(
    plan: Plan, runs: list, output_dir: Path, seconds: float, provenance: dict | None = None
) -> None:
    """comparison.* or sweep.*: the tables (with the untrained floor), the per-run numbers and
    the plot; the JSON carries the invocation's ``provenance`` (``common.runs.provenance``)."""
    rows = {name: report.Row(name) for name in plan.rows}
    for name, seed, config in runs:
        rows[name].seeds.append(seed)
        rows[name].summaries.append(read_summary(Path(config.output_dir)))
    run_seconds = sum(sum(row.values("wall-seconds")) for row in rows.values())
    for name, row in rows.items():
        labels = {s["label"] for s in row.summaries if s is not None and plan.kind != "sweep"}
        row.name = labels.pop() if len(labels) == 1 else name
    stem = "sweep" if plan.kind == "sweep" else "comparison"
    first = plan.sweep_key if plan.kind == "sweep" else "Algorithm"
    title = f"{plan.name}: {first} ({len(plan.seeds)} seed{'s' * (len(plan.seeds) > 1)})"
    base = ExperimentConfig.from_mapping(plan.base)
    floor = None if plan.kind == "sweep" else report.untrained_row(floor_source(plan, rows))
    supervised = any(
        not get_algorithm(row.get("algorithm", base.algorithm)).self_supervised
        for row in plan.rows.values()
    )
    table_rows = list(rows.values())
    lines = [
        f"# {title}\n",
        report.comparison_table(table_rows, first, floor),
        f"Mean ± sample standard deviation over seeds {plan.seeds}; final-epoch accuracies. "
        f"Gains are each run's accuracy minus its own untrained floor (the initial model, same "
        f"protocol, same seed), in points. "
        + ("The row *untrained* is the initial encoder under the SSL probe. " if floor else "")
        + f"{base.num_clients} clients, bitwidths {','.join(map(str, base.bitwidths))} "
        f"(rows named *(Full)* at 32 bits), {base.model} (width {base.model_width}) on "
        f"{base.dataset}, Dirichlet {base.dirichlet_beta}, {base.num_rounds} rounds of "
        f"E = {base.local_epochs}. Wall time {seconds / 60:.1f} min for this invocation; the "
        f"runs' own wall times sum to {run_seconds / 60:.1f} min.\n",
    ]
    if plan.kind == "sweep":
        lines[-1] += f"Each row sets {plan.sweep_key} to its value, overriding the above.\n"
        ratios = [
            report.mean_spread(row.values("buffer-to-client-ratio"))[0] for row in rows.values()
        ]
        lines.append(
            "Measured |D_g| / mean |D_k| per row: "
            + ", ".join(f"{r.name}: {x:.2f}" for r, x in zip(rows.values(), ratios, strict=True))
            + "\n"
        )
    if supervised:
        lines += [
            "## Every row under the SSL probe\n",
            "Supervised rows are scored above by their classifiers; here every row's encoder is "
            "scored by the same linear probes as the self-supervised rows.\n",
            report.comparison_table(table_rows, first, floor, report.SSL_PROBE, traffic=False),
        ]
    lines += [
        "## Global kNN monitor\n",
        "The global encoder's cosine 20-nearest-neighbour majority vote (labelled set: "
        f"{base.probe_samples} class-stratified train images; the uniform test split), after the "
        "last round, beside the same score of the initial encoder.\n",
        report.comparison_table(table_rows, first, floor, report.KNN, traffic=False),
    ]
    if plan.pairs:
        lines += [
            "## Paired differences\n",
            "Row A minus row B, run by run on the same seed (same partition, same initial "
            "model): mean ± sample standard deviation, then each seed's difference.\n",
            report.paired_table([(rows[a], rows[b]) for a, b in plan.pairs]),
        ]
    lines += [
        "## Training budget\n",
        "Optimizer steps per round, as the runs recorded them (`rounds.jsonl`): every client's "
        "local steps together, and the server's (de-quantization, re-quantization, the "
        "control's fine-tune or buffer training); n/a for runs recorded before steps were.\n",
        report.budget_table(table_rows),
        "## Per seed: global / local (untrained floor)\n",
        report.per_seed_table(([floor] if floor else []) + table_rows),
    ]
    (output_dir / f"{stem}.md").write_text("\n".join(lines))
    (output_dir / f"{stem}.json").write_text(
        json.dumps(
            {
                "plan": plan.name,
                "kind": plan.kind,
                "sweep-key": plan.sweep_key or None,
                "base-config": plan.base,
                "seeds": plan.seeds,
                "wall-seconds": seconds,
                "provenance": provenance,
                "rows": {
                    name: {"label": row.name, "seeds": row.seeds, "summaries": row.summaries}
                    for name, row in (({"untrained": floor} if floor else {}) | rows).items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    if plan.kind == "sweep":
        report.plot_sweep(table_rows, plan.sweep_key, output_dir / f"{stem}.png", title)
    else:
        report.plot_comparison([floor, *table_rows], output_dir / f"{stem}.png", title)
    print(f"\n==> {stem} ({output_dir / (stem + '.md')})\n")
    print("\n".join(lines))
