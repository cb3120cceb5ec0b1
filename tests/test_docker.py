"""The docker demo's files: valid compose YAML, Flower 1.41's images and flags, TLS everywhere.

Docker itself is not run here (no daemon or registry offline); every flag a service passes is
checked against the pinned Flower CLI's ``--help``, since flags of older Flower releases
(``--fleet-api-address``, ``--appio-api-address``) are gone or deprecated in 1.41.
"""

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import flwr
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
BINARY_OF_IMAGE = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "fedqssl-superexec": "flower-superexec",
}


@cache
def help_text(binary: str) -> str:
    path = Path(sys.executable).parent / binary
    return subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60).stdout


def binary_of(service: dict) -> str:
    image, tag = service["image"].split(":")
    assert tag == flwr.__version__, f"{service['image']}: tag must be the pinned Flower version"
    return BINARY_OF_IMAGE[image]


def flags(service: dict) -> list[str]:
    return [arg.split("=", 1)[0] for arg in service["command"] if arg.startswith("--")]


def test_compose_file_is_valid_compose_yaml():
    assert set(COMPOSE) <= {"services", "volumes", "networks", "x-superexec", "x-supernode"}
    for name, service in SERVICES.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)
        assert isinstance(service.get("command"), list) and service.get("image"), name
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("..") or source in COMPOSE["volumes"], volume


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_flag_exists_in_the_pinned_flower_cli(name):
    service = SERVICES[name]
    text = help_text(binary_of(service))
    for flag in flags(service):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}(\s|$|\])", text, re.M), (
            f"{name}: {flag} is not a flag of {binary_of(service)} {flwr.__version__}"
        )
        description = text.split(flag, 2)[-1].split("\n  --")[0]
        assert "Deprecated" not in description, f"{name}: {flag} is deprecated in Flower 1.41"


def test_demo_has_three_supernodes_of_different_bitwidths_each_with_a_superexec():
    nodes = {n: s for n, s in SERVICES.items() if binary_of(s) == "flower-supernode"}
    assert len(nodes) >= 3
    bitwidths = set()
    for name, service in nodes.items():
        node_config = next(a for a in service["command"] if a.startswith("--node-config="))
        bitwidths.add(re.search(r"bitwidth=(\d+)", node_config).group(1))
        assert "partition-id=" in node_config and "data-dir=" in node_config
        executors = [
            s for s in SERVICES.values() if f"--runtime-api-address={name}:9094" in s["command"]
        ]
        assert len(executors) == 1, f"{name} needs exactly one SuperExec"
    assert len(bitwidths) == len(nodes)


def test_tls_and_supernode_authentication_are_on():
    link = SERVICES["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert any(a.startswith("--ssl-certfile=") for a in link)
    for name, service in SERVICES.items():
        if binary_of(service) == "flower-supernode":
            assert any(a.startswith("--root-certificates=") for a in service["command"])
            assert any(a.startswith("--auth-supernode-private-key=") for a in service["command"])
            assert "--insecure" not in service["command"], name


def test_dockerfile_builds_from_the_pinned_superexec_image():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"FROM flwr/superexec:{flwr.__version__}" in dockerfile
    assert "torch==2.14.1" in dockerfile and "torchvision==0.29.1" in dockerfile
