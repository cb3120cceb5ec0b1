"""Run Fed-QSSL and its baselines on Flower's Ray simulation backend; print or tabulate results.

    python simulation.py                                  # configs/quickstart.yaml (CPU, ~3 min)
    python simulation.py configs/fmnist-table1.yaml       # Table 1 at CPU scale: every algorithm
    python simulation.py --compare fedqssl,fedsimclr --seeds 0,1,2
    python simulation.py --sweep dirichlet-beta=0.05,0.1,0.5,1.0 --ray-address HEAD:6379

A comparison runs each row on the same partition, bitwidths and seeds and writes
``comparison.md``/``.json``/``.png``; a sweep does the same over one key's values. Each command
runs on a SuperLink of its own, stopped by its pid at the end (``common.runs.launcher``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from common.config import ConfigError
from common.runs import provenance
from common.runs.checkpoint import CheckpointError
from common.runs.launcher import (
    APP_DIR,
    announce,
    checked_ray_address,
    checked_runs,
    chosen_output_dir,
    flower_env,
    require_gpu,
    run_all,
    stop_on_signal,
)
from common.runs.plan import Plan, make_plan, preset_path
from common.runs.plan_report import print_summary, write_report
from common.runs.superlink import SuperLinkError, checked_address, simulation_superlink

CONFIGS = APP_DIR / "configs"


def build_parser() -> argparse.ArgumentParser:
    """The command line, with help for every option and an epilog of examples and presets."""
    presets = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""examples:
  python simulation.py                                   # the quickstart, ~3 min on 2 CPUs
  python simulation.py fmnist-lowbit --seeds 0 --compare fedqssl,fedsimclr
  python simulation.py fmnist-lowbit --resume results/fmnist-lowbit-20261201-120000

presets (configs/): {presets}
config keys, their defaults and allowed values: README.md "Changing the experiment" and
common/config.py (ExperimentConfig); a wrong key or value is refused before anything starts.""",
    )
    # one option in a few lines, as --help shows it
    # fmt: off
    add = parser.add_argument
    add("preset", nargs="?", type=preset_argument, default=CONFIGS / "quickstart.yaml",
        help="a YAML preset: a path, or a name in configs/ (quickstart, fmnist-learning, ...)")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable)")
    add("--compare", help="algorithms to compare, e.g. fedqssl,fedsimclr-full")
    add("--sweep", help="one config key and its values, e.g. local-epochs=1,2,4")
    add("--seeds", help="seeds to run each row with, e.g. 0,1,2")
    add("--output-dir", help="results folder (default: results/<preset>-<time>)")
    add("--cpus-per-client", type=int, default=1,
        help="CPU cores (and torch threads) per simulated client; Ray runs cores / this clients "
        "at once (default 1)")
    add("--gpus-per-client", type=float, default=0.0,
        help="GPU share per simulated client, e.g. 0.25 for four clients on one GPU; > 0 sets "
        "device cuda and is refused where torch sees no GPU (default 0: CPU)")
    add("--flwr-home", help="Flower's state folder (default: $FLWR_HOME or .flwr/)")
    add("--superlink", metavar="HOST:PORT",
        help="run on this running simulation SuperLink (flower-superlink --insecure "
        "--simulation) instead of starting one on a free port for this command")
    add("--ray-address", metavar="HOST:PORT", help="run the clients on this running Ray cluster "
        "(ray start --head), not a Ray of the run's own; README: On a Ray cluster")
    add("--keep-superlink", action="store_true",
        help="leave the SuperLink this command started running afterwards, with its Flower "
        "home (the command prints both), for flwr list / flwr log")
    add("--resume", nargs="?", const=True, default=False, metavar="DIR",
        help="continue the runs in DIR (default: --output-dir): a finished run is kept, an "
        "interrupted one continues after its last completed round (its checkpoint); refused, "
        "naming the keys, when DIR holds runs of another config")
    # fmt: on
    return parser


def preset_argument(name: str) -> Path:
    """argparse's reading of the preset argument: a path, or a name in ``configs/``."""
    try:
        return preset_path(name, CONFIGS)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for."""
    return make_plan(args.preset, args.set, args.compare, args.sweep, args.seeds)


def refuse(message: str, status: int = 2) -> int:
    """Say why the command stops, on stderr; its exit status (2: bad input)."""
    print(message, file=sys.stderr)
    return status


def main() -> int:
    """Run the plan; 0 when every run completed, 1 when one failed, 2 on bad input."""
    args = build_parser().parse_args()
    try:
        plan = plan_from(args)
        require_gpu(plan.base, args.gpus_per_client)
        output_dir = chosen_output_dir(plan, args.resume, args.output_dir)
        runs, points = checked_runs(plan, output_dir, bool(args.resume))
        superlink_address = checked_address(args.superlink) if args.superlink else None
        ray_address = checked_ray_address(args.ray_address, args.superlink)
    except CheckpointError as error:
        return refuse(f"cannot resume: {error}")
    except (ConfigError, OSError, ValueError, yaml.YAMLError) as error:
        return refuse(f"invalid configuration: {error}")
    flwr_home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or APP_DIR / ".flwr").resolve()
    launch = provenance.launch_record(sys.argv, APP_DIR, args.cpus_per_client, args.gpus_per_client)
    started_at = provenance.started_now()
    env = flower_env(flwr_home, ray_address)
    if shutil.which("flwr", path=env["PATH"]) is None:
        return refuse("flwr not found: run `bash scripts/setup.sh` and use .venv/bin/python")
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, stop_on_signal)  # the SuperLink's cleanup then runs
    signal.signal(signal.SIGHUP, stop_on_signal)
    try:
        superlink = simulation_superlink(flwr_home, env, superlink_address, args.keep_superlink)
        with superlink as link:
            announce(link, args.keep_superlink)
            failed = run_all(
                runs, points, args.cpus_per_client, args.gpus_per_client, link.env, launch
            )
    except SuperLinkError as error:
        return refuse(f"cannot start the run: {error}", status=1)
    if len(runs) == 1:
        return 1 if failed else print_summary(Path(runs[0][2].output_dir))
    invocation = provenance.invocation_provenance(launch, started_at)
    write_report(plan, runs, output_dir, time.perf_counter() - started, invocation)
    for row, seed in failed:
        print(f"run failed: {row}, seed {seed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
