"""The Flower launcher behind ``simulation.py``: a plan's runs checked, each one a ``flwr run`` on a
SuperLink of the command's own, its status read back from ``flwr list``.

``flwr run`` exits 0 even when the ServerApp failed; the truth is in ``flwr list``, which
``run_once`` reads. Before anything starts, ``checked_runs`` refuses what would lose or mix
results: a folder holding another run, a checkpoint that does not match its config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.atomic import claim_new_folder
from common.config import ConfigError, ExperimentConfig
from common.runs import provenance
from common.runs.checkpoint import ResumePoint, resume_point, reuse_problem
from common.runs.plan import Plan, RunSpec, plan_runs
from common.runs.restore import checked_checkpoint
from common.runs.superlink import SuperLink
from common.vocabulary import is_whole_number

# the Flower app: the folder of pyproject.toml, which ``flwr run`` builds and ships
APP_DIR = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's coming default: it stops hiding GPUs from actors given none; every client then says
    # its device itself (fedqssl_client.node.placed_device)
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def flower_env(flwr_home: Path, ray_address: str | None = None) -> dict[str, str]:
    """The environment ``flwr`` runs in: offline, its state in ``flwr_home``, this venv first.
    With ``ray_address`` the simulation joins that running Ray cluster: Flower's Ray backend
    calls ``ray.init()``, which connects to ``RAY_ADDRESS`` (the SuperLink started here, and the
    simulation under it, inherit this environment)."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return env


def checked_ray_address(address: str | None, superlink: str | None = None) -> str | None:
    """``address`` (HOST:PORT of a Ray cluster's head, as ``ray start --head --port`` printed
    it) if its head answers (None if none is given); ``ConfigError`` naming the fix otherwise,
    and with ``superlink``: a running SuperLink's simulation has its own Ray already."""
    if address is None:
        return None
    if superlink is not None:
        raise ConfigError("--ray-address needs a SuperLink of this command: drop --superlink")
    host, _, port = address.rpartition(":")
    if not host or not is_whole_number(port):
        raise ConfigError(f"--ray-address {address!r}: give HOST:PORT of the cluster's head")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers there ({error}); start one with "
            f"`ray start --head --port={port}` on that machine (and `ray start --address="
            f"{address}` on every other), or drop --ray-address for a Ray of this run's own"
        ) from None
    return address


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
        cwd=APP_DIR,
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


def run_once(
    config: ExperimentConfig, cpus_per_client: int, gpus_per_client: float, env: dict[str, str]
) -> int:
    """One ``flwr run`` of ``config``, its output streamed; 0 when ``flwr list`` says it completed
    (``flwr run`` itself exits 0 when the server failed)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_config = config.to_run_config()
    # the record in the run's folder names no machine path; Flower gets the absolute one (the
    # app runs from a copy elsewhere) from a file of its own
    (output_dir / "run_config.toml").write_text(run_config_toml({**run_config, "output-dir": "."}))
    federation = (  # one simulated SuperNode per client partition
        f"num-supernodes={config.num_clients} client-resources-num-cpus={cpus_per_client} "
        f"client-resources-num-gpus={gpus_per_client}"
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
            str(APP_DIR),
            "--run-config",
            str(run_config_file),
            "--federation-config",
            federation,
            "--stream",
        ]
        with subprocess.Popen(
            command,
            env=env,
            cwd=APP_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
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


def has_runs(folder: Path) -> bool:
    """Whether ``folder`` holds a run: its own (one run) or a row's (``ROW/seed-N/``), of any
    seed, so a comparison can be resumed with more seeds than it has run."""
    return (folder / "config.json").is_file() or any(folder.glob("*/seed-*/config.json"))


def chosen_output_dir(plan: Plan, resume: bool | str, output_dir: str | None) -> Path:
    """``--resume DIR``, ``--output-dir``, the preset's ``output-dir``, or a new timestamped
    folder under ``results/``."""
    resume_dir = resume if isinstance(resume, str) else None
    if resume_dir and output_dir and Path(resume_dir).resolve() != Path(output_dir).resolve():
        raise ConfigError(
            f"--resume {resume_dir} and --output-dir {output_dir} name different folders: give one"
        )
    chosen = resume_dir or output_dir or plan.base.get("output-dir")
    if not chosen:
        return claim_new_folder(
            APP_DIR / "results" / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    folder = Path(chosen).resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {folder} is a file: name a folder")
    if resume and not folder.is_dir():
        raise ConfigError(
            f"--resume {folder}: no such folder (a typo?); to start a new run there, give "
            "--output-dir instead"
        )
    return folder


def checked_runs(
    plan: Plan, output_dir: Path, resume: bool
) -> tuple[list[RunSpec], dict[str, ResumePoint]]:
    """The plan's runs in ``output_dir``, each checked before Flower starts: a new run refuses a
    folder holding another run; ``resume`` checks every checkpoint whole and returns where each
    run continues (by output folder). ``ConfigError`` or ``CheckpointError`` say what is wrong."""
    runs = plan_runs(plan, output_dir)
    if not resume:
        for _, _, config in runs:
            problem = reuse_problem(config.output_dir, config.to_dict())
            if problem is not None:
                raise ConfigError(problem)
        return runs, {}
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
    return runs, points


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


def run_all(
    runs: list[RunSpec],
    points: dict[str, ResumePoint],
    cpus_per_client: int,
    gpus_per_client: float,
    env: dict[str, str],
    launch: dict | None = None,
) -> list[tuple[str, int]]:
    """Each run in turn (a resumed one from its ``points`` entry; a finished one skipped), each
    completed one's summary stamped with ``launch`` (``provenance.stamp_summary``); returns the
    (row, seed) of those that failed."""
    failed = []
    for index, (row, seed, config) in enumerate(runs, 1):
        if len(runs) > 1:
            print(f"\n==> run {index}/{len(runs)}: {row}, seed {seed}", flush=True)
        point = points.get(config.output_dir)
        if point is not None:
            print(f"==> resume: {point.note}")
            if point.finished:
                continue
        if run_once(config, cpus_per_client, gpus_per_client, env) != 0:
            failed.append((row, seed))
        elif launch is not None:
            provenance.stamp_summary(Path(config.output_dir) / "summary.json", launch, APP_DIR)
    return failed
