"""Flower's own ``flwr run .``, as a user types it, not through ``simulation.py``.

Flower 1.41 simulates 2 SuperNodes unless told otherwise: with more clients in the run config,
every client refuses its partition. That run must fail (``flwr list`` says so, with the fix in
the reason) and write no summary; the README's command with ``num-supernodes`` must complete.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from superlinks import superlinks_mentioning

from common.runs import launcher, provenance
from common.runs.superlink import free_port, stop_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "dataset='synthetic' model-width=8 num-clients=3 bitwidths='4,8,12' dirichlet-beta=1.0 "
    "buffer-ratio=0.1 max-samples-per-client=150 num-rounds=1 batch-size=64 local-epochs=1"
)


def flwr_run(tmp_path: Path, *federation: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """``flwr run . --stream`` of the tiny run config; (the process, its ``flwr list`` entry,
    its output folder)."""
    output_dir = tmp_path / "out"
    # Flower's managed SuperLink, on a port of this test's: the fixed 39091 may serve another
    # checkout's run (flwr run would then use that SuperLink, and its copy of the app)
    env = {
        **launcher.flower_env(tmp_path / "flwr"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
    }
    command = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        f"{TINY} output-dir='{output_dir}'",
        *federation,
    ]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
        )
        found = re.search(r"run (\d{6,})", completed.stdout + completed.stderr)
        assert found, completed.stdout[-3000:] + completed.stderr[-3000:]
        status = launcher.run_status(found.group(1), env)
    finally:  # started detached, with no pid said: found by this test's own folder
        stop_processes(superlinks_mentioning(str(tmp_path / "flwr")))
    return completed, status, output_dir


@pytest.mark.slow
def test_bare_flwr_run_with_too_few_supernodes_fails_with_the_fix(tmp_path):
    _, status, output_dir = flwr_run(tmp_path)
    assert status["status"] == "finished:failed", status
    details = status["status-details"]
    assert "0 of 2 clients returned a usable model" in details
    assert '--federation-config "num-supernodes=3"' in details
    assert not (output_dir / "summary.json").exists()  # no result for an untrained model


@pytest.mark.slow
def test_the_readme_flwr_run_command_completes(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert 'flwr run . --federation-config "num-supernodes=4" --stream' in readme
    completed, status, output_dir = flwr_run(tmp_path, "--federation-config", "num-supernodes=3")
    assert status["status"] == "finished:completed", completed.stdout[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert sorted(c["bitwidth"] for c in summary["local-accuracy"]) == [4, 8, 12]
    # no launcher: the ServerApp's copy of the app knows its code, not its command or commit
    record = summary["provenance"]
    assert record["launcher"] is None and record["commit"] is None and record["command"] is None
    assert record["code-hash"] == provenance.code_hash(ROOT) and record["versions"]["flwr"]
    if shutil.which("c++") and shutil.which("ninja"):  # the bundle has no .cpp: found outside it
        assert record["fused-kernels"] == {"server": True, "clients": [True]}, record


def test_the_app_bundle_holds_what_nodes_run_and_nothing_else(tmp_path):
    """Every SuperNode receives the FAB: the three packages and pyproject.toml, not the results,
    benchmarks, scripts or tests (fab-include)."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr")}
    flwr = str(Path(sys.executable).parent / "flwr")
    completed = subprocess.run(
        [flwr, "build", "--app", str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard only
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"common", "fedqssl_client", "fedqssl_server", "pyproject.toml", ".info"}
    assert "fedqssl_server/strategy.py" in names and "common/wire/payload.py" in names


@pytest.mark.slow
def test_a_new_flwr_run_into_a_finished_runs_folder_fails_and_keeps_it(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    files = {"summary.json": '{"global-accuracy": 0.7}\n', "rounds.jsonl": '{"round": 1}\n'}
    for name, text in files.items():
        (folder / name).write_text(text)
    _, status, output_dir = flwr_run(tmp_path, "--federation-config", "num-supernodes=3")
    assert output_dir == folder and status["status"] == "finished:failed", status
    assert "holds a finished run" in status["status-details"]
    assert {name: (folder / name).read_text() for name in files} == files
