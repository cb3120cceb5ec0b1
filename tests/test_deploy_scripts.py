"""The deploy scripts refuse what would run a command or smuggle node config: every number is
checked as digits before bash could evaluate it, every path and name before it is quoted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedqssl_server.nodes import read_partition_bindings

DEPLOY = Path(__file__).resolve().parents[1] / "scripts" / "deploy"


def refused(tmp_path, script, *args):
    completed = subprocess.run(
        ["bash", str(DEPLOY / script), *args],
        cwd=tmp_path,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr")},
        capture_output=True,
        text=True,
        timeout=60,  # a hang guard only: each stops before starting anything
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    return completed.stderr


NODE = ["--num-partitions", "3", "--bitwidth", "4", "--insecure"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition-id", "x[$(touch PWNED)]", *NODE], "--partition-id must be a whole number"),
        (["--partition-id", "x", *NODE], "--partition-id must be a whole number, got 'x'"),
        (
            ["--partition-id", "0", "--num-partitions", "3", "--bitwidth", '4 local-data="/etc"'],
            "--bitwidth must be a whole number",
        ),
        (["--partition-id", "0", *NODE, "--port", "9$(touch PWNED)"], "--port must be a whole"),
        (["--partition-id", "0", *NODE, "--local-data", 'my"data'], "may not hold a quote"),
    ],
)
def test_supernode_script_refuses_bad_arguments_before_anything_runs(tmp_path, args, message):
    assert message in refused(tmp_path, "supernode.sh", *args)
    assert not (tmp_path / "PWNED").exists()


def test_make_keys_refuses_a_count_that_is_not_a_number_before_writing(tmp_path):
    stderr = refused(tmp_path, "make-keys.sh", "keys", "k[$(touch PWNED)]")
    assert "NUM_SUPERNODES must be a whole number" in stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "keys").exists()
    assert "SERVER_NAMES" in refused(tmp_path, "make-keys.sh", "keys", "2", "a b")


def test_connect_refuses_a_name_toml_cannot_hold(tmp_path):
    assert "--name must be letters" in refused(tmp_path, "connect.sh", "--name", "my lab")
    assert "--superlink must be HOST:PORT" in refused(
        tmp_path, "connect.sh", "--superlink", 'x"]\n[evil', "--insecure"
    )
    assert not (tmp_path / "flwr" / "config.toml").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:60025", "[::1]:8000", "superlink:8000"])
def test_connect_takes_every_real_address_and_writes_the_connection(tmp_path, address):
    completed = subprocess.run(
        [
            "bash",
            str(DEPLOY / "connect.sh"),
            "--name",
            "lab-1",
            "--superlink",
            address,
            "--insecure",
        ],
        cwd=tmp_path,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    config = (tmp_path / "flwr" / "config.toml").read_text()
    assert f'[superlink.lab-1]\naddress = "{address}"\ninsecure = true' in config


def fake_flower(tmp_path: Path) -> Path:
    """A Flower bin folder whose ``flwr supernode register`` answers as Flower's does in JSON
    mode, with the node id in $FAKE_NODE_ID; and the test's Python for the scripts' own use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flower-superlink").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "flwr").write_text(
        '#!/bin/sh\necho "SuperNode $FAKE_NODE_ID registered successfully."\n'
        'echo "{\\"success\\": true, \\"node-id\\": $FAKE_NODE_ID}"\n'
    )
    for tool in ("flower-superlink", "flwr"):
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return bin_dir


def register(tmp_path, bin_dir, node_id, *args):
    return subprocess.run(
        ["bash", str(DEPLOY / "register.sh"), str(tmp_path / "k.pub"), *args],
        cwd=tmp_path,
        env={**os.environ, "FLWR_BIN": str(bin_dir), "FAKE_NODE_ID": str(node_id),
             "FLWR_HOME": str(tmp_path / "flwr")},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def test_register_binds_each_partition_to_the_node_id_flower_gave_its_key(tmp_path):
    bin_dir = fake_flower(tmp_path)
    (tmp_path / "k.pub").write_text("ecdsa-sha2-nistp384 AAAA fake\n")
    bindings = tmp_path / "bindings.json"
    for partition, node in ((1, 222), (0, 111)):
        done = register(tmp_path, bin_dir, node, "--partition", str(partition), "--bindings",
                        str(bindings))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"partition {partition} -> node {node}" in done.stdout
    assert read_partition_bindings(str(bindings), 3) == {0: "111", 1: "222"}
    again = register(tmp_path, bin_dir, 111, "--partition", "2", "--bindings", str(bindings))
    assert again.returncode != 0 and "node 111 is already bound to partition 0" in again.stderr
    assert read_partition_bindings(str(bindings), 3) == {0: "111", 1: "222"}  # left as it was
    lone = register(tmp_path, bin_dir, 333, "--partition", "2")
    assert lone.returncode == 2 and "give --partition and --bindings together" in lone.stderr
    bad = register(tmp_path, bin_dir, 333, "--partition", "$(touch PWNED)", "--bindings", "b")
    assert bad.returncode == 2 and not (tmp_path / "PWNED").exists()
