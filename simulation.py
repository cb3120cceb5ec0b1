"""Run a Fed-QSSL preset on Flower's Ray simulation backend and print the results summary.

    python simulation.py                                  # configs/quickstart.yaml (CPU, ~3 min)
    python simulation.py configs/cifar10-table1.yaml      # the paper's Table 1 setup (GPU)
    python simulation.py --set num-rounds=5 --set bitwidths=4,8,12

It validates the preset, runs ``flwr run`` with the matching ``--run-config`` and
``--federation-config``, streams its progress, and exits non-zero with the server's error if the
run failed (``flwr run`` itself exits 0 then; the truth is in ``flwr ls``). Flower's state lives in
``FLWR_HOME`` (default: ``.flwr/`` in this folder); the local SuperLink it starts is stopped at the
end unless ``--keep-superlink``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import ConfigError, ExperimentConfig

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


def load_config(preset: Path, overrides: list[str], output_dir: str | None) -> ExperimentConfig:
    values = ExperimentConfig.from_yaml(preset).to_dict()
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = value.strip()
    if output_dir:
        values["output-dir"] = output_dir
    if not values.get("output-dir"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        values["output-dir"] = str(ROOT / "results" / f"{preset.stem}-{stamp}")
    values["output-dir"] = str(Path(values["output-dir"]).resolve())
    if values.get("data-dir"):
        values["data-dir"] = str(Path(values["data-dir"]).resolve())
    return ExperimentConfig.from_mapping(values)


def toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def run_status(run_id: str, env: dict[str, str]) -> dict:
    """The run's entry from ``flwr ls`` (status like ``finished:completed``)."""
    listing = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"],
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


def stop_processes(pids: set[int]) -> None:
    """SIGTERM ``pids`` and the SuperExec children that name one of them as parent."""
    children = {
        int(proc.name)
        for proc in Path("/proc").glob("[0-9]*")
        for pid in pids
        if f"--parent-pid {pid}" in _cmdline(proc)
    }
    for pid in pids | children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def run(config: ExperimentConfig, args: argparse.Namespace) -> int:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_config = output_dir / "run_config.toml"
    run_config.write_text(
        "".join(f"{k} = {toml_value(v)}\n" for k, v in config.to_run_config().items())
    )
    flwr_home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or ROOT / ".flwr").resolve()
    env = flower_env(flwr_home)
    if shutil.which("flwr", path=env["PATH"]) is None:
        print(
            "flwr not found: run `bash scripts/setup.sh` and use .venv/bin/python", file=sys.stderr
        )
        return 2
    supernodes = args.num_supernodes or config.num_clients
    federation = (
        f"num-supernodes={supernodes} client-resources-num-cpus={args.cpus_per_client} "
        f"client-resources-num-gpus={args.gpus_per_client}"
    )
    print(
        f"==> {config.num_clients} clients, bitwidths {','.join(map(str, config.bitwidths))}, "
        f"{config.num_rounds} rounds, {config.model} on {config.dataset}"
    )
    print(f"==> results: {output_dir}", flush=True)
    command = [
        "flwr",
        "run",
        str(ROOT),
        "--run-config",
        str(run_config),
        "--federation-config",
        federation,
        "--stream",
    ]
    running_before = local_superlinks()
    for pid, cmdline in running_before.items():
        print(f"==> reusing the local SuperLink already running (pid {pid}): {cmdline[-120:]}")
    run_id = None
    try:
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
    finally:
        if not args.keep_superlink:
            stop_processes(set(local_superlinks()) - set(running_before))
    if status.get("status") != "finished:completed":
        print(
            f"\nrun {run_id} failed: {status.get('status')}\n{status.get('status-details')}",
            file=sys.stderr,
        )
        return 1
    return print_summary(output_dir)


def print_summary(output_dir: Path) -> int:
    summary_path = output_dir / "summary.json"
    if not summary_path.exists():
        print(f"\nthe run finished but wrote no {summary_path}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    print("\n==> results summary")
    print(f"global accuracy (linear probe, final epoch): {summary['global-accuracy']:.4f}")
    if summary["mean-local-accuracy"] is not None:
        print(f"mean local accuracy (per-client probes):     {summary['mean-local-accuracy']:.4f}")
    for client in summary["local-accuracy"]:
        print(
            f"  client {client['partition-id']:>2} ({client['bitwidth']:>2}-bit): "
            f"{client['local-accuracy']:.4f} on {client['test-examples']} local test images"
        )
    fp32_megabytes = summary["fp32-equivalent-uplink-bytes"] / 1e6
    print(
        f"uplink: {summary['uplink-bytes'] / 1e6:.2f} MB, "
        f"{summary['uplink-ratio-to-fp32']:.3f} of fp32 ({fp32_megabytes:.2f} MB)"
    )
    print(f"wall time: {summary['wall-seconds']:.0f} s; files in {output_dir}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "preset", nargs="?", type=Path, default=ROOT / "configs" / "quickstart.yaml"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    parser.add_argument("--output-dir", help="results folder (default: results/<preset>-<time>)")
    parser.add_argument("--num-supernodes", type=int, help="default: num-clients")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--flwr-home", help="Flower's state folder (default: $FLWR_HOME or .flwr/)")
    parser.add_argument("--keep-superlink", action="store_true")
    args = parser.parse_args()
    try:
        config = load_config(args.preset, args.set, args.output_dir)
    except (ConfigError, OSError) as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return 2
    return run(config, args)


if __name__ == "__main__":
    sys.exit(main())
