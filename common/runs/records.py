"""The results of record: the manifest of experiments the docs rest on, their records read back
and checked, and the paired statistics every stated comparison uses. Free of Flower and torch.

An experiment (``docs/results/manifest.yaml``) is a preset, a folder and groups of rows with
their seeds; its records are ``FOLDER/ROW/seed-N/summary.json``. A record counts when it has a
``provenance`` (``common.runs.provenance``); an experiment's records must come from one commit
with no uncommitted change.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.readback import RecordError, read_json_object
from common.runs.plan import safe_name

MANIFEST = Path("docs/results/manifest.yaml")
# the scores a pair may compare, and the summary key behind each
SCORES = {
    "global-probe": "global-probe-accuracy",
    "knn": "knn-accuracy",
    "local": "mean-local-accuracy",
}
# Student's t, two-sided 95 %, by degrees of freedom (beyond the table: the normal's 1.96 is
# within 2 % from 30 on)
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the experiment and the key."""


@dataclass(frozen=True)
class Experiment:
    """One experiment of record: what runs (rows x seeds of a preset) and where it lands."""

    name: str
    preset: str
    folder: Path
    runs: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (rows, seeds) groups
    decisive: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    # a seed whose runs only choose a row (the best global probe: a temperature, a threshold):
    # no table or pair uses it, so the choice is confirmed on seeds it was not made on
    selection_seed: int | None = None

    @property
    def rows(self) -> list[str]:
        """Every row, in manifest order."""
        return [row for rows, _ in self.runs for row in rows]

    def seeds_of(self, row: str) -> tuple[int, ...]:
        """The seeds row ``row`` runs with."""
        return next(seeds for rows, seeds in self.runs if row in rows)

    def run_folder(self, root: Path, row: str, seed: int) -> Path:
        """Where run (row, seed) of this experiment lives under ``root`` (its folder or a
        staging copy of it)."""
        return root / safe_name(row) / f"seed-{seed}"

    @property
    def run_count(self) -> int:
        """How many runs the experiment holds."""
        return sum(len(rows) * len(seeds) for rows, seeds in self.runs)


def load_manifest(path: Path) -> dict[str, Experiment]:
    """The experiments of ``path``, checked: a missing key or a pair naming no row of its
    experiment is a ``ManifestError`` naming both."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ManifestError(f"{path}: cannot be read ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict):
        raise ManifestError(f"{path}: needs a mapping 'experiments: {{NAME: ...}}'")
    return {name: _experiment(path, name, spec) for name, spec in data["experiments"].items()}


def _experiment(path: Path, name: str, spec: object) -> Experiment:
    where = f"{path}: experiment {name!r}"
    if not isinstance(spec, dict):
        raise ManifestError(f"{where} is not a mapping")
    missing = [k for k in ("preset", "folder", "runs", "decisive", "pairs") if k not in spec]
    if missing:
        raise ManifestError(f"{where} lacks {', '.join(missing)}")
    runs = []
    for group in spec["runs"]:
        if not isinstance(group, dict) or not group.get("rows") or not group.get("seeds"):
            raise ManifestError(f"{where}: each runs entry needs rows and seeds")
        runs.append((tuple(map(str, group["rows"])), tuple(int(s) for s in group["seeds"])))
    rows = [row for group, _ in runs for row in group]
    if len(set(rows)) != len(rows):
        raise ManifestError(f"{where}: a row is listed twice")
    pairs = []
    for text in spec["pairs"]:
        first, sep, second = str(text).partition(" - ")
        if not sep or first not in rows or second not in rows:
            raise ManifestError(f"{where}: pair {text!r} is not 'ROW - ROW' of its rows")
        pairs.append((first, second))
    unknown = [row for row in spec["decisive"] if row not in rows]
    if unknown:
        raise ManifestError(f"{where}: decisive rows {unknown} are not among its rows")
    selection = spec.get("selection-seed")
    if selection is not None and not all(selection in seeds for _, seeds in runs):
        raise ManifestError(f"{where}: selection-seed {selection} must be among every row's seeds")
    if selection is not None and not all(len(seeds) > 1 for _, seeds in runs):
        raise ManifestError(f"{where}: a row with only its selection seed confirms nothing")
    return Experiment(
        name,
        str(spec["preset"]),
        Path(spec["folder"]),
        tuple(runs),
        tuple(spec["decisive"]),
        tuple(pairs),
        None if selection is None else int(selection),
    )


@dataclass
class Records:
    """An experiment's summaries as found under a folder, by (row, seed); the problems found."""

    experiment: Experiment
    summaries: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def values(self, row: str, key: str) -> dict[int, float]:
        """Seed -> ``key`` of row ``row``, over its finished runs (the selection seed's aside:
        it chose a row, so it confirms nothing)."""
        return {
            seed: summary[key]
            for (name, seed), summary in sorted(self.summaries.items())
            if name == row
            and seed != self.experiment.selection_seed
            and summary.get(key) is not None
        }

    def chosen(self, key: str = SCORES["global-probe"]) -> str | None:
        """The row with the best ``key`` on the selection seed; None without one, or before
        every row's selection run is in."""
        seed = self.experiment.selection_seed
        if seed is None:
            return None
        scores = {row: self.summaries.get((row, seed), {}).get(key) for row in self.experiment.rows}
        if any(score is None for score in scores.values()):
            return None
        return max(scores, key=lambda row: scores[row])

    @property
    def missing(self) -> list[tuple[str, int]]:
        """The (row, seed) runs the manifest lists that have no usable summary yet."""
        return [
            (row, seed)
            for row in self.experiment.rows
            for seed in self.experiment.seeds_of(row)
            if (row, seed) not in self.summaries
        ]

    @property
    def commits(self) -> set[str | None]:
        """The commits the records were made at."""
        return {s["provenance"].get("commit") for s in self.summaries.values()}


def read_records(experiment: Experiment, root: Path) -> Records:
    """The summaries of ``experiment`` under ``root``, each checked: unreadable, without
    provenance, made with uncommitted changes or with code that changed between rounds is a
    problem named by its file; so is more than one commit across the experiment."""
    records = Records(experiment)
    for row in experiment.rows:
        for seed in experiment.seeds_of(row):
            path = experiment.run_folder(root, row, seed) / "summary.json"
            if not path.exists():
                continue
            try:
                summary = read_json_object(path, "run summary")
            except RecordError as error:
                records.problems.append(str(error))
                continue
            problem = record_problem(summary)
            if problem is not None:
                records.problems.append(f"{path}: {problem}")
                continue
            records.summaries[row, seed] = summary
    if len(records.commits) > 1:
        records.problems.append(
            f"{experiment.name}: its records come from commits {sorted(map(str, records.commits))}"
            f"; re-run them at one (scripts/results.py run {experiment.name})"
        )
    return records


def record_problem(summary: object) -> str | None:
    """Why a summary cannot stand as a record of today's results, or None."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    record = summary.get("provenance")
    if not isinstance(record, dict):
        return "no provenance (made before runs recorded what made them)"
    if not record.get("commit"):
        return "its provenance names no commit (not run by simulation.py from a git checkout)"
    if record.get("dirty") is not False:
        return f"made at {record['commit'][:12]} with uncommitted changes"
    if not record.get("same-code-every-round", False):
        return "its rounds ran different code (resumed after a code change)"
    return None


@dataclass(frozen=True)
class Paired:
    """A - B seed by seed on one score (in points): the differences, their mean and the 95 %
    t-interval of the mean (None below 2 seeds)."""

    differences: dict[int, float]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences.values()) if self.differences else math.nan

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        half = t975(self.n - 1) * statistics.stdev(self.differences.values()) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def verdict(self, first: str, second: str) -> str:
        """The words the interval allows: "beats" / "is below" only where it excludes 0."""
        interval = self.interval
        if interval is None:
            return f"one seed: no interval ({first} - {second})"
        low, high = interval
        if low > 0:
            return f"{first} beats {second}"
        if high < 0:
            return f"{first} is below {second}"
        return f"no difference measured at n = {self.n} (interval [{low:+.2f}, {high:+.2f}])"


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95 % interval at ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975.get(df, 1.96)


def paired(records: Records, first: str, second: str, score: str) -> Paired:
    """``first - second`` on ``score`` (a key of ``SCORES``), in points, over the seeds where
    both rows have a record."""
    key = SCORES[score]
    mine, theirs = records.values(first, key), records.values(second, key)
    return Paired({seed: 100 * (mine[seed] - theirs[seed]) for seed in mine if seed in theirs})


def prediction_interval(values: Sequence[float]) -> tuple[float, float]:
    """Where one more run of the same setting lands with 95 % probability, by the recorded
    seeds' mean and spread (t with n - 1 degrees of freedom, sd * sqrt(1 + 1/n)); a single
    recorded value gives the interval of that value alone."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    half = t975(len(values) - 1) * statistics.stdev(values) * math.sqrt(1 + 1 / len(values))
    return mean - half, mean + half


def per_round(summaries: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
    """``key`` (optimizer steps) per round, mean over the runs that recorded it."""
    values = [s[key] / s["rounds"] for s in summaries.values() if s.get(key) is not None]
    return statistics.fmean(values) if values else None
