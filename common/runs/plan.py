"""What a preset asks to run: rows (algorithms, or the values of one config key) times seeds.

Free of Flower: a preset's YAML and the command line's overrides become a ``Plan``, and a plan
becomes one validated ``ExperimentConfig`` per run, each with its own output folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.algorithms import ALGORITHM_NAMES
from common.config import ConfigError, ExperimentConfig, read_yaml_mapping
from common.vocabulary import FULL_PRECISION, is_whole_number

PLAN_KEYS = ("compare", "sweep", "seeds", "pairs")
# comparison rows ``<algorithm><suffix>...``: the overrides each suffix adds
ROW_SUFFIXES = {
    "-full": {"bitwidths": str(FULL_PRECISION)},  # every client at 32 bits: the (Full) rows
    "-uniform": {"dq-weighting": "uniform"},  # Fed-QSSL without its softmax(-L_DQ) weights
    "-highest-bits": {"dq-weighting": "highest-bits"},  # only the highest-bit models, averaged
    "-clamp": {"fp-activation": "clamp"},  # full precision keeps the clients' clamp(0, 1)
    "-bn": {"bn-recalibrate": "global"},  # the global model's BatchNorm statistics on D_g
    "-bnall": {"bn-recalibrate": "all"},  # and each bitwidth's downlink's
}


RunSpec = tuple[str, int, ExperimentConfig]  # (row, seed, config) of one run of a plan


@dataclass
class Plan:
    """What to run: the base config, rows (name -> config overrides) and seeds."""

    name: str
    base: dict
    rows: dict[str, dict]
    seeds: list[int]
    kind: str = "single"  # single, compare or sweep
    sweep_key: str = ""
    pairs: list[tuple[str, str]] = field(default_factory=list)  # rows (A, B): A - B per seed


def read_preset(preset: Path) -> tuple[dict, dict]:
    """(config values, plan values) of a YAML preset; the plan keys are compare/sweep/seeds."""
    values = read_yaml_mapping(preset)
    plan = {key: values.pop(key) for key in PLAN_KEYS if key in values}
    return values, plan


def algorithm_row(name: str) -> dict:
    """Overrides of a comparison row: an algorithm (``fedsimclr``) with optional suffixes:
    ``-full`` (all clients 32-bit), ``-uniform`` (uniform instead of softmax(-L_DQ) weights),
    ``-highest-bits`` (only the models at the highest bitwidth received, averaged),
    ``-clamp`` (full-precision models keep clamp(0, 1), not ReLU)."""
    row: dict = {}
    algorithm = name
    while algorithm not in ALGORITHM_NAMES:
        suffix = next((s for s in ROW_SUFFIXES if algorithm.endswith(s)), None)
        if suffix is None:
            raise ConfigError(
                f"compare: unknown row {name!r}; rows are algorithms "
                f"({', '.join(ALGORITHM_NAMES)}), optionally with the suffixes "
                f"{', '.join(map(repr, ROW_SUFFIXES))}"
            )
        row = {**ROW_SUFFIXES[suffix], **row}
        algorithm = algorithm.removesuffix(suffix)
    return {"algorithm": algorithm, **row}


def parse_list(value: object, what: str) -> list:
    """A comma-separated string or a YAML list, as a non-empty list."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{what} must be a non-empty list, got {value!r}")
    return [item.strip() if isinstance(item, str) else item for item in items]


def parse_seeds(value: object) -> list[int]:
    """Seeds like ``0,1,2``: integers >= 0."""
    seeds = parse_list(value, "seeds")
    if not all(isinstance(s, int) or (isinstance(s, str) and is_whole_number(s)) for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0 like 0,1,2, got {value!r}")
    return [int(s) for s in seeds]


def parse_pairs(value: object, rows: dict) -> list[tuple[str, str]]:
    """A comparison's ``pairs``: ``"A - B"`` strings naming two of its rows (A - B is tabled
    seed by seed); a row that is not compared, with ``--compare`` too, is left out."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"pairs must be a list like ['fedqssl - fedsimclr'], got {value!r}")
    pairs = []
    for item in items:
        first, separator, second = str(item).partition(" - ")
        if not separator or not first.strip() or not second.strip():
            raise ConfigError(f"pairs: {item!r} is not 'ROW - ROW' (spaces around the minus)")
        for name in (first.strip(), second.strip()):
            algorithm_row(name)  # a known row name, or the error naming them
        if first.strip() in rows and second.strip() in rows:
            pairs.append((first.strip(), second.strip()))
    return pairs


def make_plan(
    preset: Path,
    overrides: list[str],
    compare: str | None = None,
    sweep: str | None = None,
    seeds: str | None = None,
) -> Plan:
    """The runs asked for by the preset and the command line, which wins: ``overrides`` as
    ``key=value``, ``compare`` rows, ``sweep`` as ``key=v1,v2``, ``seeds`` as ``0,1,2``."""
    values, plan = read_preset(preset)
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = value.strip()
    base = ExperimentConfig.from_mapping(values).to_dict()  # validates the base config
    run_seeds = parse_seeds(seeds or plan.get("seeds", [base["seed"]]))
    if compare or "compare" in plan:
        names = parse_list(compare or plan["compare"], "compare")
        rows = {n: algorithm_row(n) for n in names}
        pairs = parse_pairs(plan.get("pairs", []), rows)
        return Plan(preset.stem, base, rows, run_seeds, "compare", pairs=pairs)
    if sweep or "sweep" in plan:
        if sweep:
            key, separator, listed = sweep.partition("=")
            if not separator:
                raise ConfigError(f"--sweep expects key=v1,v2,..., got {sweep!r}")
            swept = {key.strip(): listed}
        else:
            swept = plan["sweep"]
        if not isinstance(swept, dict) or len(swept) != 1:
            raise ConfigError(f"sweep must name one config key and its values, got {swept!r}")
        ((key, listed),) = swept.items()
        if str(key).replace("_", "-") == "seed":
            raise ConfigError(
                "sweep: seed is not swept, each row runs every seed of the plan: give the seeds "
                "with --seeds 0,1,2 (or seeds: in the preset)"
            )
        rows = {str(v): {key: v} for v in parse_list(listed, f"sweep {key}")}
        return Plan(preset.stem, base, rows, run_seeds, "sweep", key)
    return Plan(preset.stem, base, {base["algorithm"]: {}}, run_seeds)


def run_config(plan: Plan, row: str, seed: int, output_dir: Path) -> ExperimentConfig:
    """The validated config of one run, its paths absolute (the app runs from a copy)."""
    values = {**plan.base, **plan.rows[row], "seed": seed}
    values["output-dir"] = str(output_dir.resolve())
    for key in ("data-dir", "buffer-dir", "probe-dir", "partition-bindings"):
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return ExperimentConfig.from_mapping(values)


def plan_runs(plan: Plan, output_dir: Path) -> list[RunSpec]:
    """Every (row, seed, config) of the plan; one run's results go straight to ``output_dir``.
    Each row's folder is its name made safe (``safe_name``); two rows whose names become the
    same folder are refused."""
    folders: dict[str, str] = {}
    for row in plan.rows:
        other = folders.setdefault(safe_name(row), row)
        if other != row:
            raise ConfigError(
                f"rows {other!r} and {row!r} would share the folder {safe_name(row)!r}: "
                "give values that differ in letters, digits, '.', '_' or '-'"
            )
    if plan.kind == "single" and len(plan.seeds) == 1:
        return [
            (
                next(iter(plan.rows)),
                plan.seeds[0],
                run_config(plan, next(iter(plan.rows)), plan.seeds[0], output_dir),
            )
        ]
    return [
        (row, seed, run_config(plan, row, seed, output_dir / safe_name(row) / f"seed-{seed}"))
        for row in plan.rows
        for seed in plan.seeds
    ]


def safe_name(text: str) -> str:
    """``text`` usable as one folder name inside the output folder: runs of other characters
    become ``_``, and a name that would be hidden or a path step (``.``, ``..``) gets a ``_``
    in front."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    return f"_{name}" if not name or name.startswith(".") else name


def preset_path(name: str, configs: Path) -> Path:
    """A preset's file: ``name`` as given if it exists, else ``configs/<name>[.yaml]``."""
    given = Path(name)
    if given.exists():
        return given
    for candidate in (configs / name, configs / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in configs.glob("*.yaml")))
    raise ConfigError(f"no preset {name!r}: give a YAML file or one of {known}")
