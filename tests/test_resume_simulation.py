"""A real ``simulation.py`` run killed with SIGKILL during round 3 of 4 and resumed with
``--resume`` ends with the same ``rounds.jsonl`` and ``summary.json`` as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from core_helpers import differences, without_timings
from simulations import TINY
from superlinks import announced_superlink

from common.runs.superlink import stop_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# the end-to-end tests' tiny run, at 2, 4 and 8 bits, for 4 rounds of 2 local epochs
PRESET = (
    TINY.replace("bitwidths: [4, 8, 12]", "bitwidths: [2, 4, 8]")
    .replace("num-rounds: 2", "num-rounds: 4")
    .replace("local-epochs: 1", "local-epochs: 2")
    .replace("batch-size: 64", "batch-size: 32")
)


def command(tmp_path: Path, *extra: str) -> list[str]:
    preset = tmp_path / "resumable.yaml"
    preset.write_text(PRESET)
    return [
        sys.executable,
        str(ROOT / "simulation.py"),
        str(preset),
        "--flwr-home",
        str(tmp_path / "flwr"),
        *extra,
    ]


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # a hang guard only: each run is well under a minute when the machine is idle
    return subprocess.run(
        command(tmp_path, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def records(folder: Path):
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return without_timings(rounds), without_timings(summary)


def kill_during_round_3(tmp_path: Path, folder: Path) -> None:
    """Start the run and SIGKILL its process group, and the SuperLink it started, once round 2
    is recorded: round 3 is under way."""
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            command(tmp_path, "--output-dir", str(folder)),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    rounds = folder / "rounds.jsonl"
    try:
        while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):
            assert process.poll() is None, "the run ended before round 3"
            assert time.monotonic() < deadline, "round 2 never ended"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # the SuperLink it started (its own session) and its ServerApp, as a crash would
        pid, _, _ = announced_superlink((tmp_path / "killed.log").read_text())
        stop_processes({pid}, signal.SIGKILL)
    assert not (folder / "summary.json").exists()


def test_a_run_killed_in_round_three_resumes_to_the_uninterrupted_result(tmp_path):
    straight = run(tmp_path, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    folder = tmp_path / "killed"
    kill_during_round_3(tmp_path, folder)
    resumed = run(tmp_path, "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "==> resume: resuming after round 2" in resumed.stdout
    # bit for bit, timings aside
    assert not differences(records(folder), records(tmp_path / "straight"))
    assert not (folder / "checkpoint.npz").exists()

    again = run(tmp_path, "--resume", str(folder))
    assert again.returncode == 0 and "finished: nothing to do" in again.stdout
    assert "==> results summary" in again.stdout

    changed = run(tmp_path, "--resume", str(folder), "--set", "learning-rate=0.01")
    assert changed.returncode == 2
    assert "cannot resume" in changed.stderr and "learning-rate: 0.003 -> 0.01" in changed.stderr
