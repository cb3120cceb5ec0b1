"""The docker-compose demo, run as written where there is no Docker engine.

``docker/demo.sh`` runs unchanged, its ``docker compose`` answered by ``compose_emulator.py``:
every service of ``docker/compose.yaml`` is a local process with its image's entrypoint, its exact
flags, uid 49999, ``/app`` as working directory and home, its volumes at their container paths in
a private mount namespace, and its own network namespace on a bridge, so the three SuperNodes all
listen on port 9094 as in the file. What the emulator cannot reproduce (the images' own
filesystems, Docker's DNS, restart policies) is listed in its docstring; the image's pip step is
checked separately in a clean venv (``test_docker.py``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network and mount namespaces, a bridge, setpriv to uid 49999"
    for tool in ("unshare", "nsenter", "setpriv", "ip", "openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not FASHION_MNIST.is_dir():
        return f"needs Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)"
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True)
    return None if probe.returncode == 0 else "this kernel refuses new namespaces"


def copy_of_the_repo(target: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) and the venv, so the demo's keys,
    volumes and Flower state never touch the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


@pytest.mark.slow
def test_the_compose_demo_runs_to_completion_as_written(tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    repo = copy_of_the_repo(tmp_path / "repo")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "docker").write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "compose_emulator.py"} "$@"\n'
    )
    (shim / "docker").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COMPOSE_EMULATOR_STATE": str(tmp_path / "emulator"),
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FASHION_MNIST_DIR": str(FASHION_MNIST),
    }
    compose = ["docker", "compose", "-f", "docker/compose.yaml"]
    try:
        demo = subprocess.run(
            ["bash", "docker/demo.sh"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    finally:
        subprocess.run([*compose, "down"], cwd=repo, env=env, check=False, timeout=120)
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
        for log in sorted((tmp_path / "emulator").glob("*.log"))
    )
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-3000:] + logs

    results = repo / "docker" / "volumes" / "results" / "compose-demo"
    rounds = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for record in rounds:
        assert sorted(c["bitwidth"] for c in record["clients"]) == [4, 8, 12]
        assert record["failed"] == []
    summary = json.loads(demo.stdout[demo.stdout.rindex("\n{") :])  # the demo's last step
    assert summary == json.loads((results / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["global-accuracy"] is not None
    if shutil.which("c++") and shutil.which("ninja"):  # the image holds the kernels' source
        assert summary["provenance"]["fused-kernels"] == {"server": True, "clients": [True]}
    # written by the containers' user, into the folders the demo gave to it
    state = repo / "docker" / "volumes" / "state" / "superlink.db"
    assert state.stat().st_uid == 49999 and (results / "summary.json").stat().st_uid == 49999
