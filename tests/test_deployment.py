"""Real deployment on loopback: a ``flower-superlink`` and ``flower-supernode`` processes started
by ``scripts/deploy/``, TLS with SuperNode authentication, ``flwr run`` against them. Each device
trains on its own folder and the server reads its own buffer and probe folders, all written by
``scripts/make_device_data.py``: nothing here cuts a share out of a global dataset. (The compose
demo's test covers devices that do.)

Every process is started in its own session and stopped by the fixture that started it (by
process group), pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.runs import launcher
from common.runs.superlink import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"
CONNECTION = "fedqssl"
RUN_CONFIG = """dataset = "synthetic"
model-width = 8
num-clients = 3
bitwidths = "4,8,12"
buffer-dir = "{data}/server/buffer"
probe-dir = "{data}/server/probe"
num-rounds = 2
local-epochs = 1
batch-size = 64
round-timeout = {timeout}
output-dir = "{output}"
partition-bindings = "{bindings}"
"""


class Deployment:
    """A SuperLink (TLS + SuperNode auth) on a free loopback port and the processes around it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.keys = base / "keys"
        self.data = base / "data"
        self.address = f"127.0.0.1:{free_port()}"
        self.bindings = base / "partition-bindings.json"
        self.cli_env = launcher.flower_env(base / "cli")
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        env = launcher.flower_env(self.base / f"home-{name}")
        log = open(self.base / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text()

    def stop(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.stop(name)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=ROOT, env=self.cli_env, capture_output=True, text=True, timeout=120
        )

    def supernode(self, name: str, partition: int, bits: int, *extra: str) -> subprocess.Popen:
        command = [
            "bash",
            str(DEPLOY / "supernode.sh"),
            "--partition-id", str(partition),
            "--num-partitions", "3",
            "--bitwidth", str(bits),
            "--local-data", str(self.data / f"device-{partition}"),
            "--superlink", self.address,
            "--keys", str(self.keys),
            "--port", str(free_port()),
            *extra,
        ]  # fmt: skip
        return self.start(name, command)

    def online_nodes(self) -> int:
        listing = self.cli("flwr", "supernode", "list", CONNECTION, "--format", "json")
        nodes = json.loads(listing.stdout).get("nodes", [])
        return sum(1 for node in nodes if node["status"] == "online")

    def run(self, output: Path, timeout: float, on_round=None) -> tuple[dict, Path]:
        """``flwr run`` of the tiny config; (the run's ``flwr list`` entry, its output folder)."""
        config = self.base / f"{output.name}.toml"
        config.write_text(
            RUN_CONFIG.format(
                timeout=timeout, output=output, data=self.data, bindings=self.bindings
            )
        )
        process = subprocess.Popen(
            ["flwr", "run", str(ROOT), CONNECTION, "--run-config", str(config), "--stream"],
            cwd=ROOT, env=self.cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.processes[f"run-{output.name}"] = process
        run_id, lines = None, []
        for line in process.stdout:
            lines.append(line)
            found = re.search(r"run (\d{6,})", line)
            run_id = run_id or (found.group(1) if found else None)
            if on_round is not None and re.search(r"round (\d+)/2: ", line):
                on_round(int(re.search(r"round (\d+)/2: ", line).group(1)))
        process.wait(timeout=60)
        assert run_id, "".join(lines)[-3000:]
        return launcher.run_status(run_id, self.cli_env, CONNECTION), output


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


pytestmark = pytest.mark.slow  # a real SuperLink and SuperNodes


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS + auth), nodes 0-2 registered, bound to partitions 0-2 and running at 4, 8
    and 12 bits on their own folders, plus an unregistered node and a plain-text node that must
    be refused, and a registered node bound to no partition that claims partition 0 and is
    online before node 0."""
    base = tmp_path_factory.mktemp("deploy")
    link = Deployment(base)
    try:
        subprocess.run(
            [
                sys.executable, str(ROOT / "scripts" / "make_device_data.py"), str(link.data),
                "--dataset", "synthetic", "--beta", "0.3", "--max-samples", "150",
                "--buffer-ratio", "0.1", "--probe-samples", "300", "--test-samples", "300",
            ],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["bash", str(DEPLOY / "make-keys.sh"), str(link.keys), "5"], check=True,
            capture_output=True,
        )  # fmt: skip
        host, port = link.address.rsplit(":", 1)
        link.start(
            "superlink",
            [
                "bash",
                str(DEPLOY / "superlink.sh"),
                "--keys",
                str(link.keys),
                "--host",
                host,
                "--port",
                port,
                "--state",
                str(base / "link.db"),
            ],
        )
        wait_for(lambda: port_open(link.address), 60, "the SuperLink's port")
        connect = link.cli(
            "bash",
            str(DEPLOY / "connect.sh"),
            "--superlink",
            link.address,
            "--keys",
            str(link.keys),
        )
        assert connect.returncode == 0, connect.stderr
        for k in range(3):
            registered = link.cli(
                "bash", str(DEPLOY / "register.sh"), str(link.keys / f"supernode-{k}.pub"),
                "--partition", str(k), "--bindings", str(link.bindings),
            )  # fmt: skip
            assert registered.returncode == 0, registered.stdout + registered.stderr
        rogue = link.cli("bash", str(DEPLOY / "register.sh"), str(link.keys / "supernode-4.pub"))
        assert rogue.returncode == 0, rogue.stdout + rogue.stderr
        link.supernode("intruder", 0, 4, "--key", str(link.keys / "supernode-3"))
        link.supernode("plaintext", 1, 8, "--insecure", "--max-retries", "0")
        link.supernode("rogue", 0, 4, "--key", str(link.keys / "supernode-4"))
        wait_for(lambda: link.online_nodes() == 1, 90, "the rogue SuperNode online first")
        for k, bits in enumerate((4, 8, 12)):
            link.supernode(f"node-{k}", k, bits)
        wait_for(lambda: link.online_nodes() == 4, 90, "four registered SuperNodes online")
        yield link
    finally:
        link.stop_all()


def rounds_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]


def test_unregistered_and_plain_text_supernodes_are_refused(deployment):
    intruder = deployment.processes["intruder"]
    wait_for(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to give up")
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")
    assert "Connection attempt failed" in deployment.log("plaintext")
    assert deployment.online_nodes() == 4  # only the registered nodes ever came online


# Runs last: it kills node 2. One run serves both the healthy round and the lost node (a
# second run would cost the suite another ~70 s of Flower polls and ClientApp processes).
def test_three_supernodes_train_on_their_own_data_and_one_killed_mid_run_is_reported_missing(
    deployment, tmp_path
):
    def kill_node_2(finished_round: int) -> None:
        if finished_round == 1:
            deployment.stop("node-2")

    status, output = deployment.run(tmp_path / "fault", timeout=60, on_round=kill_node_2)
    assert status["status"] == "finished:completed", status
    first, second = rounds_of(output)
    # the rogue, online first and claiming partition 0, is refused by the operator's bindings
    bindings = json.loads(deployment.bindings.read_text())
    for record in (first, second):
        assert any(
            f"partition 0 is bound to node {bindings['0']} by partition-bindings" in why
            for why in record["failure-reasons"]
        ), record["failure-reasons"]
    # round 1: every device at its own bitwidth, trained on all of its folder (150 images, 20%
    # of each class held out)
    assert sorted(c["bitwidth"] for c in first["clients"]) == [4, 8, 12]
    assert first["missing-partitions"] == []
    # round 2: node 2 is gone and reported missing; the others go on
    assert sorted(c["partition-id"] for c in second["clients"]) == [0, 1]
    assert second["missing-partitions"] == [2]
    for record in (first, second):
        assert all(110 <= c["examples"] <= 130 for c in record["clients"]), record["clients"]
    # the surviving devices were scored on their own held-out splits
    summary = json.loads((output / "summary.json").read_text())
    assert sorted(c["bitwidth"] for c in summary["local-accuracy"]) == [4, 8]
    assert all(20 <= c["test-examples"] <= 40 for c in summary["local-accuracy"]), summary
    assert summary["buffer-to-client-ratio"] == pytest.approx(
        len(list((deployment.data / "server" / "buffer").iterdir()))
        / np.mean([c["examples"] for c in second["clients"]])
    )
