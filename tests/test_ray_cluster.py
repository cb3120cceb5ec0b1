"""Simulations on a Ray cluster that already runs (``simulation.py --ray-address``): a two-node
cluster on loopback, head and worker started as processes of their own, each with its own
folder; the clients spread over both nodes (each round records its clients' node), the results
equal the same run on a Ray of its own; everything the test started is stopped by pid."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from core_helpers import differences, without_timings
from simulations import ROOT, TINY, finished_simulation, run_simulation, start_simulation

from common.runs.superlink import free_port, stop_processes

RAY = str(Path(sys.executable).parent / "ray")
# four clients over two one-CPU nodes: Ray places one actor on each
PRESET = TINY.replace("num-clients: 3", "num-clients: 4").replace(
    "bitwidths: [4, 8, 12]", "bitwidths: [4, 8, 12, 4]"
)
NODES_ALIVE = (
    "import sys, ray; ray.init(address=sys.argv[1]); print(sum(n['Alive'] for n in ray.nodes()))"
)


def ray_node(folder: str, *args: str) -> subprocess.Popen:
    """One Ray node in the foreground (``--block``), its files in ``folder`` (kept short: Ray's
    socket paths must fit in 107 bytes)."""
    command = [RAY, "start", "--block", "--num-cpus=1", f"--temp-dir={folder}", *args]
    command += ["--disable-usage-stats"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def alive_nodes(address: str) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", NODES_ALIVE, address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return int(completed.stdout.split()[-1]) if completed.returncode == 0 else 0


@pytest.fixture(scope="module")
def two_node_cluster():
    """(address, nodes) of a head and a worker node on loopback, shared by this module's tests
    (the one that kills the worker runs last); stopped, folders removed."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    folders = [tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp")]
    head = ray_node(folders[0], "--head", f"--port={port}", "--include-dashboard=false")
    nodes = [head]
    try:
        deadline = time.monotonic() + 180  # a hang guard: a node starts in seconds when idle
        while alive_nodes(address) < 1:
            assert time.monotonic() < deadline and head.poll() is None, "the head did not start"
            time.sleep(2)
        nodes.append(ray_node(folders[1], f"--address={address}"))
        while alive_nodes(address) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, "no worker node"
            time.sleep(2)
        yield address, nodes
    finally:
        stop_processes({node.pid for node in nodes})
        for node in nodes:
            node.wait(timeout=60)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def records(folder: Path) -> tuple[list[dict], dict]:
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return rounds, json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_a_run_on_a_two_node_ray_cluster_spreads_its_clients_and_equals_one_node(
    tmp_path, two_node_cluster
):
    address, _ = two_node_cluster
    completed, status, cluster_out = run_simulation(
        tmp_path / "cluster", PRESET, "--ray-address", address
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert status["status"] == "finished:completed"
    completed, _, alone_out = run_simulation(tmp_path / "alone", PRESET)
    assert completed.returncode == 0, completed.stderr[-3000:]
    on_cluster, alone = records(cluster_out), records(alone_out)
    nodes = {c["ray-node"] for record in on_cluster[0] for c in record["clients"]}
    assert len(nodes) == 2  # the work went to both nodes
    drop = ("models", "output-dir")
    for _, summary in (on_cluster, alone):
        for key in drop:
            summary.pop(key, None)
    assert not differences(without_timings(list(on_cluster)), without_timings(list(alone)))


@pytest.mark.slow
def test_a_lost_worker_node_is_recorded_the_run_fails_loudly_and_resumes_on_the_rest(
    tmp_path, two_node_cluster
):
    """The worker node killed (SIGKILL, raylet and all) after round 1 of 4: the round in
    flight records its clients' loss; Flower keeps sending to the lost actors, so the run ends
    with the server's error (or completes, were Flower to recover); ``--resume`` then continues
    from the checkpoint on the node that is left."""
    address, nodes = two_node_cluster
    preset = PRESET.replace("num-rounds: 2", "num-rounds: 4")
    folder = tmp_path / "lost"
    process = start_simulation(folder, preset, "--ray-address", address, "--keep-superlink")
    rounds_file = folder / "out" / "rounds.jsonl"
    deadline = time.monotonic() + 600  # a hang guard: round 1 takes seconds when idle
    while not (rounds_file.exists() and rounds_file.read_text().strip()):
        assert time.monotonic() < deadline and process.poll() is None, "round 1 never ended"
        time.sleep(1)
    stop_processes({nodes[1].pid}, signal.SIGKILL)
    completed, status, out = finished_simulation(folder, process)
    reasons = [
        why
        for line in (out / "rounds.jsonl").read_text().splitlines()
        for why in json.loads(line)["failure-reasons"]
    ]
    assert any("Actor" in why for why in reasons), reasons  # the lost clients, recorded
    if completed.returncode != 0:  # loudly: the server's error, not a summary
        assert status["status"] == "finished:failed" and not (out / "summary.json").exists()
        completed, _, out = run_simulation(folder, preset, "--ray-address", address, "--resume")
    assert completed.returncode == 0, completed.stderr[-3000:]
    rounds, summary = records(out)
    assert [record["round"] for record in rounds] == [1, 2, 3, 4]
    assert summary["global-accuracy"] is not None
