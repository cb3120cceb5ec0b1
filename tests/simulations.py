"""Real ``simulation.py`` commands for the slow tests: a tiny preset, started in the background
or run to the end, with the run's ``flwr list`` entry read back and its SuperLink stopped."""

import re
import subprocess
import sys
from pathlib import Path

from superlinks import announced_superlink

from common.runs import launcher
from common.runs.superlink import stop_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = """dataset: synthetic
model: small_cnn
model-width: 8
num-clients: 3
bitwidths: [4, 8, 12]
dirichlet-beta: 1.0
buffer-ratio: 0.1
max-samples-per-client: 150
local-epochs: 1
num-rounds: 2
batch-size: 64
"""


def start_simulation(tmp_path: Path, preset_text: str, *extra: str) -> subprocess.Popen:
    """``simulation.py`` on ``preset_text`` in the background, its output in ``tmp_path``."""
    tmp_path.mkdir(exist_ok=True)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(preset_text)
    command = [
        sys.executable,
        str(ROOT / "simulation.py"),
        str(preset),
        "--output-dir",
        str(tmp_path / "out"),
        "--flwr-home",
        str(tmp_path / "flwr"),
        *extra,
    ]
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr)


def finished_simulation(tmp_path: Path, process: subprocess.Popen, env: dict | None = None):
    """(the finished command, its run's ``flwr list`` entry, its output folder). A run started
    with ``--keep-superlink`` is asked its SuperLink, which is then stopped, by its pid; ``env``
    reaches the SuperLink of a run given ``--superlink``."""
    # a hang guard only: a tiny run takes about a minute on an idle machine
    returncode = process.wait(timeout=900)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    completed = subprocess.CompletedProcess(process.args, returncode, stdout, stderr)
    kept = "--keep-superlink" in process.args
    pid, _, home = announced_superlink(completed.stdout) if kept else (None, None, None)
    try:
        found = re.search(r"run (\d{6,})", completed.stdout)
        status = None
        if found and (kept or env):
            env = env or launcher.flower_env(home)
            status = launcher.run_status(found.group(1), env)
    finally:
        if pid is not None:
            stop_processes({pid})
    return completed, status, tmp_path / "out"


def run_simulation(tmp_path: Path, preset_text: str, *extra: str):
    """``simulation.py`` on ``preset_text``, to the end; as ``finished_simulation``."""
    process = start_simulation(tmp_path, preset_text, "--keep-superlink", *extra)
    return finished_simulation(tmp_path, process)
