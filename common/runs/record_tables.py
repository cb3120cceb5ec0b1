"""The generated parts of the docs: tables and sentences made from the records of the manifest's
experiments, and the markers that hold them in a page. Free of Flower and torch.

A generated block in a Markdown page reads ``<!-- generated: KEY -->`` ... ``<!-- /generated -->``;
``render`` makes each KEY's text from the records (``EXPERIMENT/rows``, ``EXPERIMENT/pairs``,
``EXPERIMENT/status``, ``answer``, ``headline``), ``rewrite`` puts it in, and ``stale_blocks``
names the blocks whose text differs from what the records give.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from common.runs.plan_report import summary_lines
from common.runs.records import SCORES, Paired, Records, paired, per_round

BLOCK = re.compile(
    r"(<!-- generated: (?P<key>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S
)
# the scores of a row table, as (column title, summary key)
ROW_SCORES = (
    ("Global probe", SCORES["global-probe"]),
    ("Local", SCORES["local"]),
    ("Global kNN", SCORES["knn"]),
)
# where an answer's numbers come from: the experiment at the authors' server budget
ANSWER_EXPERIMENT = "fmnist-lowbit-budget"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _percent(records: Records, row: str, key: str) -> list[float]:
    return [100 * v for v in records.values(row, key).values()]


def _gains(records: Records, row: str, key: str) -> list[float]:
    values, floors = records.values(row, key), records.values(row, "untrained-" + key)
    return [100 * (values[s] - floors[s]) for s in values if s in floors]


def _label(records: Records, row: str) -> str:
    labels = {s.get("label") for (name, _), s in records.summaries.items() if name == row}
    return labels.pop() if len(labels) == 1 else row


def _steps(records: Records, row: str, key: str) -> str:
    summaries = {seed: s for (name, seed), s in records.summaries.items() if name == row}
    value = per_round(summaries, key)
    return "n/a" if value is None else f"{value:.0f}"


def rows_table(records: Records) -> str:
    """Every row: its seeds, each score (mean ± sample sd over seeds, %) beside its gain over
    each run's own untrained floor, and its budget in optimizer steps a round. The first line is
    the floor itself (the initial encoder, same protocol) of the experiment's first row."""
    experiment = records.experiment
    titles = " | ".join(f"{t} % | gain" for t, _ in ROW_SCORES)
    lines = [
        f"| Row | Seeds | {titles} | Client steps / round | Server steps / round |",
        "|---|---|" + "---:|---:|" * len(ROW_SCORES) + "---:|---:|",
    ]
    first = experiment.rows[0]
    floors = " | ".join(
        f"{_mean_sd(_percent(records, first, 'untrained-' + key))} | " for _, key in ROW_SCORES
    )
    seeds = sorted(records.values(first, SCORES["global-probe"]))
    lines.append(f"| untrained floor | {_seeds(seeds)} | {floors} | 0 | 0 |")
    for row in experiment.rows:
        seeds = sorted(records.values(row, SCORES["global-probe"]))
        cells = " | ".join(
            f"{_mean_sd(_percent(records, row, key))} | {_signed(_gains(records, row, key))}"
            for _, key in ROW_SCORES
        )
        planned = [s for s in experiment.seeds_of(row) if s != experiment.selection_seed]
        lines.append(
            f"| {_label(records, row)} | {_seeds(seeds, len(planned))} | {cells} "
            f"| {_steps(records, row, 'train-steps')} | {_steps(records, row, 'server-steps')} |"
        )
    return "\n".join(lines) + "\n"


def _seeds(seeds: list[int], planned: int | None = None) -> str:
    text = ",".join(map(str, seeds)) or "none"
    return text if planned is None or len(seeds) == planned else f"{text} ({len(seeds)}/{planned})"


def _signed(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.2f}" if values else "n/a"


def _bounds(result: Paired, none: str = "n/a") -> str:
    """``[+1.52, +3.30]``, the 95 % t-interval of a paired difference; ``none`` below 2 seeds."""
    interval = result.interval
    return none if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _method_at_budget(records: Records) -> tuple[str, str, str, str]:
    """Fed-QSSL's global probe and its untrained floor (mean ± sd, %) and its client and server
    optimizer steps a round, as the answer and the headline state them."""
    summaries = {s: v for (row, s), v in records.summaries.items() if row == "fedqssl"}
    client, server = per_round(summaries, "train-steps"), per_round(summaries, "server-steps")
    return (
        _mean_sd(_percent(records, "fedqssl", SCORES["global-probe"])),
        _mean_sd(_percent(records, "fedqssl", "untrained-" + SCORES["global-probe"])),
        "n/a" if client is None else f"{client:.0f}",
        "n/a" if server is None else f"{server:.0f}",
    )


def pairs_table(records: Records) -> str:
    """Every pair of the experiment on each score: the mean paired difference (points), its 95 %
    t-interval and n, each seed's difference, and what the interval allows to be said."""
    lines = [
        "| A - B | Score | Mean (points) | 95 % interval | n | Per seed | Reading |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for first, second in records.experiment.pairs:
        for score in SCORES:
            result = paired(records, first, second, score)
            if not result.n:
                continue
            each = ", ".join(f"{d:+.2f}" for _, d in sorted(result.differences.items()))
            lines.append(
                f"| {first} - {second} | {score} | {result.mean:+.2f} | {_bounds(result)} "
                f"| {result.n} "
                f"| {each} | {result.verdict(first, second)} |"
            )
    return "\n".join(lines) + "\n"


def status(records: Records) -> str:
    """Which runs the experiment's numbers rest on: how many of the manifest's, at which commit,
    with which packages and CPU."""
    experiment = records.experiment
    done, total = len(records.summaries), experiment.run_count
    commits = ", ".join(sorted(str(c)[:12] for c in records.commits)) or "none"
    sample = next(iter(records.summaries.values()), None)
    where = ""
    if sample is not None:
        record = sample["provenance"]
        versions = record.get("versions", {})
        cpu = record.get("cpu", {})
        where = (
            f"; torch {versions.get('torch')}, flwr {versions.get('flwr')}, "
            f"{cpu.get('model')} ({' '.join(cpu.get('isa', [])[-3:])})"
        )
    pending = f"; {total - done} runs still to run" if done < total else ""
    chosen = ""
    if experiment.selection_seed is not None:
        row = records.chosen()
        chosen = (
            f" Seed {experiment.selection_seed} only chooses a row (the best global probe): "
            f"{'not run yet' if row is None else f'`{row}`'}; no table or pair uses it."
        )
    return (
        f"`{experiment.name}`: {done} of {total} runs (preset `{experiment.preset}`, records in "
        f"`{experiment.folder}`), commit {commits}{where}{pending}. Re-run: `python "
        f"scripts/results.py run {experiment.name}`.{chosen}\n"
    )


def _phrase(result: Paired) -> str:
    """``+2.41 points (95 % interval [+1.52, +3.30], n = 5)``."""
    bounds = "no interval" if result.interval is None else f"95 % interval {_bounds(result)}"
    return f"{result.mean:+.2f} points ({bounds}, n = {result.n})"


def _sign(result: Paired) -> int:
    """+1 where the interval lies above 0, -1 below, 0 where it holds 0."""
    low, high = result.interval
    return 1 if low > 0 else -1 if high < 0 else 0


# what each outcome of a comparison lets the answer say (by _sign: above, within, below 0)
_READINGS = {
    "fedsimclr": {
        1: "Fed-QSSL beats Fed-SimCLR",
        0: "no difference between Fed-QSSL and Fed-SimCLR is measured at this n",
        -1: "Fed-QSSL is below Fed-SimCLR",
    },
    "fedsimclr-ft": {
        1: "Fed-QSSL's own steps (per-client de-quantization and weights) add to what training "
        "the average on D_g gives",
        0: "no difference is measured between Fed-QSSL and fine-tuning the plain average on the "
        "same D_g at this n",
        -1: "fine-tuning the plain average on D_g does better than Fed-QSSL",
    },
    "buffer-only": {
        1: "the clients add to what the buffer teaches alone",
        0: "no difference is measured between the federation and the buffer alone",
        -1: "the buffer alone, with no client, scores above Fed-QSSL",
    },
}


def answer(all_records: Mapping[str, Records]) -> str:
    """The short answer to "does Fed-QSSL beat Fed-SimCLR, and why", from the experiment at the
    authors' server budget; every reading follows the interval of its comparison."""
    records = all_records[ANSWER_EXPERIMENT]
    if not records.values("fedqssl", SCORES["global-probe"]):
        return f"`{ANSWER_EXPERIMENT}` has no published run yet: nothing to answer with.\n"
    score, floor, client, server = _method_at_budget(records)
    lines = [
        f"Fashion-MNIST at CPU scale, 4 clients at 2/2/3/3 bits, {client} client and "
        f"{server} server optimizer steps a round: Fed-QSSL's global probe is {score} % "
        f"(untrained floor {floor} %)."
    ]
    for second, what in (
        ("fedsimclr", "Fed-SimCLR (plain averaging, no server step)"),
        ("fedsimclr-ft", "the plain average fine-tuned on the same D_g (`fedsimclr-ft`)"),
        ("buffer-only", "D_g alone, no client, the same server steps (`buffer-only`)"),
    ):
        result = paired(records, "fedqssl", second, "global-probe")
        if not result.n:
            lines.append(f"- Against {what}: not run yet.")
            continue
        reading = (
            _READINGS[second][_sign(result)]
            if result.interval is not None
            else "one seed, no interval: no reading yet"
        )
        lines.append(f"- Against {what}: {_phrase(result)}: {reading}.")
    uniform = paired(records, "fedqssl", "fedqssl-uniform", "global-probe")
    if uniform.n:
        lines.append(
            f"- Softmax(-L_DQ) against uniform p_k: {_phrase(uniform)}: "
            f"{uniform.verdict('softmax', 'uniform')}."
        )
    local = paired(records, "fedqssl", "local-only", "local")
    if local.n:
        lines.append(
            f"- Personalization, mean local probe against each client training alone "
            f"(`local-only`): {_phrase(local)}: {local.verdict('Fed-QSSL', 'local-only')}."
        )
    return "\n".join(lines) + "\n"


def headline(all_records: Mapping[str, Records]) -> str:
    """README's results at a glance: the decisive pairs of the answer's experiment, each with its
    interval, n and the floor and budget beside it."""
    records = all_records[ANSWER_EXPERIMENT]
    if not records.summaries:
        return f"`{ANSWER_EXPERIMENT}` has no published run yet (docs/RESULTS.md says which).\n"
    lines = [
        "| Comparison (global probe, points) | Mean | 95 % interval | n | Reading |",
        "|---|---:|---|---:|---|",
    ]
    for first, second in (
        ("fedqssl", "fedsimclr"),
        ("fedqssl", "fedsimclr-ft"),
        ("fedqssl", "buffer-only"),
    ):
        result = paired(records, first, second, "global-probe")
        if not result.n:
            continue
        lines.append(
            f"| {_label(records, first)} - {_label(records, second)} | {result.mean:+.2f} | "
            f"{_bounds(result)} | {result.n} | {result.verdict(first, second)} |"
        )
    score, floor, client, server = _method_at_budget(records)
    budget = f"{client} / {server}"
    lines.append("")
    lines.append(
        f"Fed-QSSL's global probe {score} %, untrained floor {floor} %; optimizer steps a round "
        f"(clients / server) {budget}; `{records.experiment.preset}`, 2/2/3/3-bit clients."
    )
    return "\n".join(lines) + "\n"


def run_summary(records: Records) -> str:
    """What the experiment's first run printed at its end, as a code block (the README's
    quickstart sample); its files' folder as a default run names it."""
    if not records.summaries:
        return f"(`{records.experiment.name}` has no published run yet)\n"
    summary = records.summaries[min(records.summaries)]
    where = f"results/{records.experiment.preset}-..."
    return "```\n" + "\n".join(summary_lines(summary, where)) + "\n```\n"


def renderers(all_records: Mapping[str, Records]) -> dict[str, Callable[[], str]]:
    """Every block key the pages may hold, with the function that makes its text."""
    keys: dict[str, Callable[[], str]] = {
        "answer": lambda: answer(all_records),
        "headline": lambda: headline(all_records),
    }
    for name, records in all_records.items():
        keys[f"{name}/rows"] = lambda r=records: rows_table(r)
        keys[f"{name}/pairs"] = lambda r=records: pairs_table(r)
        keys[f"{name}/status"] = lambda r=records: status(r)
        keys[f"{name}/summary"] = lambda r=records: run_summary(r)
    return keys


def blocks(text: str) -> list[tuple[str, str]]:
    """(key, body) of every generated block in a page, in order."""
    return [(m["key"], m["body"]) for m in BLOCK.finditer(text)]


def rewrite(text: str, make: Mapping[str, Callable[[], str]]) -> str:
    """The page with every generated block's body made anew; an unknown key is a ValueError."""

    def body(match: re.Match) -> str:
        key = match["key"]
        if key not in make:
            raise ValueError(f"generated block {key!r}: no such table (known: {sorted(make)})")
        return match.group(1) + make[key]() + match.group(4)

    return BLOCK.sub(body, text)


def stale_blocks(path: Path, make: Mapping[str, Callable[[], str]]) -> list[str]:
    """The keys of ``path``'s generated blocks whose text differs from the records'."""
    text = path.read_text(encoding="utf-8")
    stale = []
    for key, body in blocks(text):
        if key not in make:
            stale.append(f"{path.name}: {key} (no such table)")
        elif make[key]() != body:
            stale.append(f"{path.name}: {key}")
    return stale
