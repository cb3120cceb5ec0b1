"""Run Fed-QSSL and its baselines on Flower's Ray simulation backend; print or tabulate results.

    python simulation.py                                  # configs/quickstart.yaml (CPU, ~3 min)
    python simulation.py --set num-rounds=5 --set bitwidths=4,8,12
    python simulation.py --set algorithm=fedavg           # one baseline
    python simulation.py configs/fmnist-table1.yaml       # Table 1 at CPU scale: every algorithm
    python simulation.py --compare fedqssl,fedsimclr --seeds 0,1,2
    python simulation.py --sweep dirichlet-beta=0.05,0.1,0.5,1.0

One run validates the preset, runs ``flwr run`` with the matching ``--run-config`` and
``--federation-config``, streams its progress, and exits non-zero with the server's error if the
run failed (``flwr run`` itself exits 0 then; the truth is in ``flwr list``). A comparison (a
preset's ``compare:`` list or ``--compare``) runs each algorithm on the same partition,
bitwidths and seeds and writes ``comparison.md``/``.json``/``.png``; a sweep (a preset's
``sweep:`` or ``--sweep``) does the same over the values of one config key (``sweep.*``). A row
named ``<algorithm>-full`` runs that algorithm with every client at 32 bits. Flower's state lives
in ``FLWR_HOME`` (default: ``.flwr/`` in this folder); the local SuperLink it starts is stopped at
the end unless ``--keep-superlink``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from common import report
from common.algorithms import ALGORITHM_NAMES, get_algorithm
from common.config import ConfigError, ExperimentConfig, read_yaml_mapping
from common.quant import FULL_PRECISION
from fedqssl_server.checkpoint import CheckpointError, resume_point

ROOT = Path(__file__).resolve().parent
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment ``flwr`` runs in: offline, its state in ``flwr_home``, this venv first."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


PLAN_KEYS = ("compare", "sweep", "seeds")
# comparison rows ``<algorithm><suffix>...``: the overrides each suffix adds
ROW_SUFFIXES = {
    "-full": {"bitwidths": str(FULL_PRECISION)},  # every client at 32 bits: the (Full) rows
    "-uniform": {"dq-weighting": "uniform"},  # Fed-QSSL without its softmax(-L_DQ) weights
}


@dataclass
class Plan:
    """What to run: the base config, rows (name -> config overrides) and seeds."""

    name: str
    base: dict
    rows: dict[str, dict]
    seeds: list[int]
    kind: str = "single"  # single, compare or sweep
    sweep_key: str = ""


def read_preset(preset: Path) -> tuple[dict, dict]:
    """(config values, plan values) of a YAML preset; the plan keys are compare/sweep/seeds."""
    values = read_yaml_mapping(preset)
    plan = {key: values.pop(key) for key in PLAN_KEYS if key in values}
    return values, plan


def algorithm_row(name: str) -> dict:
    """Overrides of a comparison row: an algorithm (``fedsimclr``) with optional suffixes:
    ``-full`` (all clients 32-bit), ``-uniform`` (uniform instead of softmax(-L_DQ) weights)."""
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
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{what} must be a non-empty list, got {value!r}")
    return [item.strip() if isinstance(item, str) else item for item in items]


def parse_seeds(value: object) -> list[int]:
    seeds = parse_list(value, "seeds")
    if not all(isinstance(s, int) or (isinstance(s, str) and s.isdigit()) for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0 like 0,1,2, got {value!r}")
    return [int(s) for s in seeds]


def make_plan(preset: Path, args: argparse.Namespace) -> Plan:
    """The runs asked for by the preset and the command line (the command line wins)."""
    values, plan = read_preset(preset)
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = value.strip()
    base = ExperimentConfig.from_mapping(values).to_dict()  # validates the base config
    seeds = parse_seeds(args.seeds or plan.get("seeds", [base["seed"]]))
    if args.compare or "compare" in plan:
        names = parse_list(args.compare or plan["compare"], "compare")
        return Plan(preset.stem, base, {n: algorithm_row(n) for n in names}, seeds, "compare")
    if args.sweep or "sweep" in plan:
        if args.sweep:
            key, separator, listed = args.sweep.partition("=")
            if not separator:
                raise ConfigError(f"--sweep expects key=v1,v2,..., got {args.sweep!r}")
            sweep = {key.strip(): listed}
        else:
            sweep = plan["sweep"]
        if not isinstance(sweep, dict) or len(sweep) != 1:
            raise ConfigError(f"sweep must name one config key and its values, got {sweep!r}")
        ((key, listed),) = sweep.items()
        rows = {str(v): {key: v} for v in parse_list(listed, f"sweep {key}")}
        return Plan(preset.stem, base, rows, seeds, "sweep", key)
    return Plan(preset.stem, base, {base["algorithm"]: {}}, seeds)


def run_config(plan: Plan, row: str, seed: int, output_dir: Path) -> ExperimentConfig:
    """The validated config of one run, its paths absolute (the app runs from a copy)."""
    values = {**plan.base, **plan.rows[row], "seed": seed}
    values["output-dir"] = str(output_dir.resolve())
    for key in ("data-dir", "buffer-dir", "probe-dir"):
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return ExperimentConfig.from_mapping(values)


def plan_runs(plan: Plan, output_dir: Path) -> list[tuple[str, int, ExperimentConfig]]:
    """Every (row, seed, config) of the plan; one run's results go straight to ``output_dir``."""
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
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def run_status(run_id: str, env: dict[str, str], connection: str = "") -> dict:
    """The run's entry from ``flwr list`` on ``connection`` (default: the CLI's default one);
    its status reads like ``finished:completed``."""
    listing = subprocess.run(
        [
            "flwr",
            "list",
            *([connection] if connection else []),
            "--run-id",
            run_id,
            "--format",
            "json",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listing.stdout).get("runs", [])
    except json.JSONDecodeError:
        runs = []
    return runs[0] if runs else {"status": "unknown", "status-details": listing.stdout[-2000:]}


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def local_superlinks() -> dict[int, str]:
    """pid -> command line of every SuperLink that ``flwr run`` started for local simulation."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        cmdline = _cmdline(proc)
        if "flower-superlink" in cmdline and "local-superlink" in cmdline:
            found[int(proc.name)] = cmdline
    return found


def stop_processes(pids: set[int], signal_number: int = signal.SIGTERM) -> None:
    """Signal ``pids`` and the SuperExec children that name one of them as parent (SIGTERM:
    stop; SIGKILL: what a crash does, for tests)."""
    children = {
        int(proc.name)
        for proc in Path("/proc").glob("[0-9]*")
        for pid in pids
        if f"--parent-pid {pid}" in _cmdline(proc)
    }
    for pid in pids | children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number)


def require_gpu(values: dict, gpus_per_client: float) -> None:
    """``--gpus-per-client`` > 0 means clients train on the GPU: ``device`` becomes ``cuda``, so a
    client that sees none fails loudly instead of quietly training on the CPU."""
    if gpus_per_client <= 0:
        return
    if values.get("device", "auto") == "cpu":
        raise ConfigError(f"--gpus-per-client {gpus_per_client} contradicts device: cpu")
    import torch  # only here: the driver needs torch for this check alone

    if not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus-per-client {gpus_per_client}, but torch sees no GPU on this machine: drop "
            "the flag to train on the CPU, or install a CUDA build of torch"
        )
    values["device"] = "cuda"


def run(config: ExperimentConfig, args: argparse.Namespace, env: dict[str, str]) -> int:
    """One ``flwr run`` of ``config``; 0 when ``flwr list`` says it completed."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_config_file = output_dir / "run_config.toml"
    run_config_file.write_text(
        "".join(f"{k} = {toml_value(v)}\n" for k, v in config.to_run_config().items())
    )
    federation = (  # one simulated SuperNode per client partition
        f"num-supernodes={config.num_clients} client-resources-num-cpus={args.cpus_per_client} "
        f"client-resources-num-gpus={args.gpus_per_client}"
    )
    print(
        f"==> {config.algorithm}: {config.num_clients} clients, bitwidths "
        f"{','.join(map(str, config.bitwidths))}, {config.num_rounds} rounds, {config.model} on "
        f"{config.dataset}, seed {config.seed}"
    )
    print(f"==> results: {output_dir}", flush=True)
    command = [
        "flwr",
        "run",
        str(ROOT),
        "--run-config",
        str(run_config_file),
        "--federation-config",
        federation,
        "--stream",
    ]
    run_id = None
    with subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = re.search(r"run (\d{6,})", line)
            run_id = run_id or (found.group(1) if found else None)
    if run_id is None:
        print(f"\nflwr run did not start a run (exit {process.returncode})", file=sys.stderr)
        return 1
    status = run_status(run_id, env)
    if status.get("status") != "finished:completed":
        print(
            f"\nrun {run_id} failed: {status.get('status')}\n{status.get('status-details')}",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def managed_superlink(keep: bool):
    """Stop, on the way out, the local SuperLinks started inside (not one running before)."""
    running_before = local_superlinks()
    for pid, cmdline in running_before.items():
        print(f"==> reusing the local SuperLink already running (pid {pid}): {cmdline[-120:]}")
    try:
        yield
    finally:
        if not keep:
            stop_processes(set(local_superlinks()) - set(running_before))


def read_summary(output_dir: Path) -> dict | None:
    path = output_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def print_summary(output_dir: Path) -> int:
    summary = read_summary(output_dir)
    if summary is None:
        print(f"\nthe run finished but wrote no {output_dir / 'summary.json'}", file=sys.stderr)
        return 1
    print(f"\n==> results summary ({summary.get('label', '')})")
    print(f"global accuracy (final epoch):           {summary['global-accuracy']:.4f}")
    if summary["mean-local-accuracy"] is not None:
        print(f"mean local accuracy (per-client models): {summary['mean-local-accuracy']:.4f}")
    print(f"untrained floor (initial model, same protocol): {floor_line(summary)}")
    for client in summary["local-accuracy"]:
        print(
            f"  client {client['partition-id']:>2} ({client['bitwidth']:>2}-bit): "
            f"{client['local-accuracy']:.4f} (untrained {client['untrained-local-accuracy']:.4f}) "
            f"on {client['test-examples']} local test images"
        )
    fp32_megabytes = summary["fp32-equivalent-uplink-bytes"] / 1e6
    print(
        f"uplink: {summary['uplink-bytes'] / 1e6:.2f} MB, "
        f"{summary['uplink-ratio-to-fp32']:.3f} of fp32 ({fp32_megabytes:.2f} MB)"
    )
    print(f"wall time: {summary['wall-seconds']:.0f} s; files in {output_dir}")
    return 0


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


def write_report(plan: Plan, runs: list, output_dir: Path, seconds: float) -> None:
    """comparison.* or sweep.*: the tables (with the untrained floor), the per-run numbers and
    the plot."""
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


def preset_path(name: str) -> Path:
    """A preset's file: ``name`` as given if it exists, else ``configs/<name>[.yaml]``."""
    given = Path(name)
    if given.exists():
        return given
    for candidate in (ROOT / "configs" / name, ROOT / "configs" / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    raise argparse.ArgumentTypeError(f"no preset {name!r}: give a YAML file or one of {known}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "preset",
        nargs="?",
        type=preset_path,
        default=ROOT / "configs" / "quickstart.yaml",
        help="a YAML preset: a path, or a name in configs/ (quickstart, fmnist-learning, ...)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    parser.add_argument("--compare", help="algorithms to compare, e.g. fedqssl,fedsimclr-full")
    parser.add_argument("--sweep", help="one config key and its values, e.g. local-epochs=1,2,4")
    parser.add_argument("--seeds", help="seeds to run each row with, e.g. 0,1,2")
    parser.add_argument("--output-dir", help="results folder (default: results/<preset>-<time>)")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--flwr-home", help="Flower's state folder (default: $FLWR_HOME or .flwr/)")
    parser.add_argument("--keep-superlink", action="store_true")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue the runs in DIR (default: --output-dir): a finished run is kept, an "
        "interrupted one continues after its last completed round (its checkpoint); refused, "
        "naming the keys, when DIR holds runs of another config",
    )
    return parser.parse_args(argv)


def chosen_output_dir(plan: Plan, args: argparse.Namespace) -> Path:
    """``--resume DIR``, ``--output-dir``, the preset's ``output-dir``, or a new timestamped
    folder under ``results/``."""
    resume_dir = args.resume if isinstance(args.resume, str) else None
    if (
        resume_dir
        and args.output_dir
        and Path(resume_dir).resolve() != Path(args.output_dir).resolve()
    ):
        raise ConfigError(
            f"--resume {resume_dir} and --output-dir {args.output_dir} name different folders: "
            "give one"
        )
    output_dir = Path(
        resume_dir
        or args.output_dir
        or plan.base.get("output-dir")
        or ROOT / "results" / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ).resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file: name a folder")
    return output_dir


def main() -> int:
    args = parse_args()
    try:
        plan = make_plan(args.preset, args)
        require_gpu(plan.base, args.gpus_per_client)
        output_dir = chosen_output_dir(plan, args)
        runs = plan_runs(plan, output_dir)
        if args.resume:
            runs = [(row, seed, dataclasses.replace(c, resume=True)) for row, seed, c in runs]
            points = {c.output_dir: resume_point(c.output_dir, c.to_dict()) for _, _, c in runs}
    except CheckpointError as error:
        print(f"cannot resume: {error}", file=sys.stderr)
        return 2
    except (ConfigError, OSError, ValueError, yaml.YAMLError) as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return 2
    flwr_home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or ROOT / ".flwr").resolve()
    env = flower_env(flwr_home)
    if shutil.which("flwr", path=env["PATH"]) is None:
        print(
            "flwr not found: run `bash scripts/setup.sh` and use .venv/bin/python", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    failed = []
    with managed_superlink(args.keep_superlink):
        for index, (row, seed, config) in enumerate(runs, 1):
            if len(runs) > 1:
                print(f"\n==> run {index}/{len(runs)}: {row}, seed {seed}", flush=True)
            if args.resume:
                print(f"==> resume: {points[config.output_dir].note}")
                if points[config.output_dir].finished:
                    continue
            if run(config, args, env) != 0:
                failed.append((row, seed))
    if len(runs) == 1:
        return 1 if failed else print_summary(Path(runs[0][2].output_dir))
    write_report(plan, runs, output_dir, time.perf_counter() - started)
    for row, seed in failed:
        print(f"run failed: {row}, seed {seed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
