"""End to end: ``simulation.py`` drives a real ``flwr run`` on the Ray backend."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import simulation

ROOT = Path(__file__).resolve().parents[1]
TINY = """dataset: synthetic
model: small_cnn
model-width: 8
num-clients: 3
bitwidths: [4, 8, 12]
dirichlet-beta: 1.0
buffer-ratio: 0.1
max-samples-per-client: 150
num-rounds: 2
batch-size: 64
"""


def run_simulation(tmp_path: Path, preset_text: str, *extra: str):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(preset_text)
    output_dir = tmp_path / "out"
    before = set(simulation.local_superlinks())
    command = [
        sys.executable,
        str(ROOT / "simulation.py"),
        str(preset),
        "--output-dir",
        str(output_dir),
        "--flwr-home",
        str(tmp_path / "flwr"),
        "--num-supernodes",
        "3",
        "--keep-superlink",
        *extra,
    ]
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
        found = re.search(r"run (\d{6,})", completed.stdout)
        status = (
            simulation.run_status(found.group(1), simulation.flower_env(tmp_path / "flwr"))
            if found
            else None
        )
    finally:
        simulation.stop_processes(set(simulation.local_superlinks()) - before)
    return completed, status, output_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_simulation(tmp_path_factory.mktemp("sim"), TINY)


def test_simulation_finishes_and_writes_results(tiny_run):
    completed, status, output_dir = tiny_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert status["status"] == "finished:completed"
    assert "==> results summary" in completed.stdout

    summary = json.loads((output_dir / "summary.json").read_text())
    assert 0 <= summary["global-accuracy"] <= 1
    assert sorted(c["bitwidth"] for c in summary["local-accuracy"]) == [4, 8, 12]
    assert all(0 <= c["local-accuracy"] <= 1 for c in summary["local-accuracy"])
    assert 0 < summary["uplink-ratio-to-fp32"] < 1

    rounds = [json.loads(line) for line in (output_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(c["bitwidth"] for c in record["clients"]) == [4, 8, 12]
        assert record["failed"] == []
        assert abs(sum(c["weight"] for c in record["clients"]) - 1) < 1e-6
        by_bits = {c["bitwidth"]: c["uplink-bytes"] for c in record["clients"]}
        assert by_bits[4] < by_bits[8] < by_bits[12] < record["fp32-equivalent-bytes"] / 3
    # round 1 downlink is the fp32 initial model; round 2 sends each client its own bitwidth
    down = {c["bitwidth"]: c["downlink-bytes"] for c in rounds[1]["clients"]}
    assert down[4] < down[8] < down[12] < rounds[0]["clients"][0]["downlink-bytes"]

    config = json.loads((output_dir / "config.json").read_text())
    assert config["bitwidths"] == [4, 8, 12] and config["num-rounds"] == 2
    for plot in ("accuracy.png", "bytes.png"):
        assert (output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_server_makes_simulation_exit_non_zero(tmp_path):
    broken = TINY.replace("dataset: synthetic", "dataset: cifar10\ndata-dir: /nonexistent-dir")
    completed, status, _ = run_simulation(tmp_path, broken)
    assert status is not None and status["status"].startswith("finished:failed")
    assert completed.returncode == 1
    assert "failed" in completed.stderr


def test_invalid_preset_is_rejected_before_anything_starts(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text(TINY.replace("bitwidths: [4, 8, 12]", "bitwidths: [4, 8, 33]"))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "simulation.py"), str(preset)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "bitwidths: bitwidth 33 is not allowed" in completed.stderr
