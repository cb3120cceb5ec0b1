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
in ``FLWR_HOME`` (default: ``.flwr/`` in this folder). Each command starts its own SuperLink on a
free port, in a Flower home of its own under ``FLWR_HOME/superlinks/``, and stops it, by its pid,
at the end (unless ``--keep-superlink``): runs side by side never share or stop each other's.
``--superlink HOST:PORT`` runs on a SuperLink already running instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common.atomic import claim_new_folder
from common.config import ConfigError, ExperimentConfig
from common.plan import Plan, make_plan, plan_runs, preset_path
from common.plan_report import print_summary, write_report
from common.superlink import SuperLink, SuperLinkError, checked_address, simulation_superlink
from fedqssl_server.checkpoint import CheckpointError, resume_point, reuse_problem
from fedqssl_server.restore import checked_checkpoint

ROOT = Path(__file__).resolve().parent
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's coming default: it stops hiding GPUs from actors given none; every client then says
    # its device itself (fedqssl_client.node.placed_device)
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment ``flwr`` runs in: offline, its state in ``flwr_home``, this venv first."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def toml_value(value: bool | int | float | str) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def run_config_toml(values: dict[str, bool | int | float | str]) -> str:
    """A run config as the TOML file ``flwr run --run-config`` reads."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


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
    run_config = config.to_run_config()
    # the record in the run's folder names no machine path; Flower gets the absolute one (the
    # app runs from a copy elsewhere) from a file of its own
    (output_dir / "run_config.toml").write_text(run_config_toml({**run_config, "output-dir": "."}))
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
    run_id = None
    with tempfile.TemporaryDirectory(prefix="fedqssl-run-") as scratch:
        run_config_file = Path(scratch) / "run_config.toml"
        run_config_file.write_text(run_config_toml(run_config))
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
        with subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            try:
                for line in process.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    found = re.search(r"run (\d{6,})", line)
                    run_id = run_id or (found.group(1) if found else None)
            except BaseException:  # Ctrl-C or SIGTERM: the CLI goes too, not waited for
                process.kill()
                raise
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


def build_parser() -> argparse.ArgumentParser:
    """The command line, with help for every option and an epilog of examples and presets."""
    presets = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
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
    parser.add_argument(
        "preset",
        nargs="?",
        type=preset_argument,
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
    parser.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="CPU cores (and torch threads) per simulated client; Ray runs cores / this clients "
        "at once (default 1)",
    )
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="GPU share per simulated client, e.g. 0.25 for four clients on one GPU; > 0 sets "
        "device cuda and is refused where torch sees no GPU (default 0: CPU)",
    )
    parser.add_argument("--flwr-home", help="Flower's state folder (default: $FLWR_HOME or .flwr/)")
    parser.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="run on this running simulation SuperLink (flower-superlink --insecure "
        "--simulation) instead of starting one on a free port for this command",
    )
    parser.add_argument(
        "--keep-superlink",
        action="store_true",
        help="leave the SuperLink this command started running afterwards, with its Flower "
        "home (the command prints both), for flwr list / flwr log",
    )
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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments."""
    return build_parser().parse_args(argv)


def preset_argument(name: str) -> Path:
    """argparse's reading of the preset argument: a path, or a name in ``configs/``."""
    try:
        return preset_path(name, ROOT / "configs")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for."""
    return make_plan(args.preset, args.set, args.compare, args.sweep, args.seeds)


def has_runs(folder: Path) -> bool:
    """Whether ``folder`` holds a run: its own (one run) or a row's (``ROW/seed-N/``), of any
    seed, so a comparison can be resumed with more seeds than it has run."""
    return (folder / "config.json").is_file() or any(folder.glob("*/seed-*/config.json"))


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
    chosen = resume_dir or args.output_dir or plan.base.get("output-dir")
    if not chosen:
        return claim_new_folder(ROOT / "results" / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir = Path(chosen).resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file: name a folder")
    if args.resume and not output_dir.is_dir():
        raise ConfigError(
            f"--resume {output_dir}: no such folder (a typo?); to start a new run there, give "
            "--output-dir instead"
        )
    return output_dir


def stop_on_signal(signal_number: int, _frame: object) -> None:
    """SIGTERM / SIGHUP end the command as Ctrl-C does: through its cleanup, which stops the
    SuperLink it started and everything under it (left behind, its ServerApp would run on)."""
    raise SystemExit(128 + signal_number)


def announce(link: SuperLink, keep: bool) -> None:
    """Say which SuperLink the runs go to and, when it stays, how to reach it afterwards."""
    if link.pid is None:
        print(f"==> on the SuperLink at {link.address} (--superlink; left running)")
        return
    print(f"==> SuperLink pid {link.pid} on {link.address}, Flower home {link.home}", flush=True)
    if keep:
        print(
            f"==> kept afterwards (--keep-superlink): FLWR_HOME={link.home} flwr list; stop it "
            f"with kill {link.pid}"
        )


def main() -> int:
    """Run the plan; 0 when every run completed, 1 when one failed, 2 on bad input."""
    args = parse_args()
    try:
        plan = plan_from(args)
        require_gpu(plan.base, args.gpus_per_client)
        output_dir = chosen_output_dir(plan, args)
        runs = plan_runs(plan, output_dir)
        if not args.resume:
            for _, _, config in runs:
                problem = reuse_problem(config.output_dir, config.to_dict())
                if problem is not None:
                    raise ConfigError(problem)
        superlink_address = checked_address(args.superlink) if args.superlink else None
        if args.resume:
            runs = [(row, seed, dataclasses.replace(c, resume=True)) for row, seed, c in runs]
            points = {c.output_dir: resume_point(c.output_dir, c.to_dict()) for _, _, c in runs}
            for _, _, config in runs:  # every checkpoint checked whole before Flower starts
                checkpoint = points[config.output_dir].checkpoint
                if checkpoint is not None:
                    checked_checkpoint(checkpoint, config)
            if not has_runs(output_dir):
                raise ConfigError(
                    f"--resume {output_dir}: it holds no run (no config.json in it or in its "
                    "row/seed folders); check the folder, or start with --output-dir"
                )
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
    signal.signal(signal.SIGTERM, stop_on_signal)  # the SuperLink's cleanup then runs
    signal.signal(signal.SIGHUP, stop_on_signal)
    try:
        superlink = simulation_superlink(flwr_home, env, superlink_address, args.keep_superlink)
        with superlink as link:
            announce(link, args.keep_superlink)
            for index, (row, seed, config) in enumerate(runs, 1):
                if len(runs) > 1:
                    print(f"\n==> run {index}/{len(runs)}: {row}, seed {seed}", flush=True)
                if args.resume:
                    print(f"==> resume: {points[config.output_dir].note}")
                    if points[config.output_dir].finished:
                        continue
                if run(config, args, link.env) != 0:
                    failed.append((row, seed))
    except SuperLinkError as error:
        print(f"cannot start the run: {error}", file=sys.stderr)
        return 1
    if len(runs) == 1:
        return 1 if failed else print_summary(Path(runs[0][2].output_dir))
    write_report(plan, runs, output_dir, time.perf_counter() - started)
    for row, seed in failed:
        print(f"run failed: {row}, seed {seed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
