"""The docker demo's files: valid compose YAML, Flower 1.41's images and flags, TLS everywhere.

Docker itself is not run here (no daemon or registry offline); every flag a service passes is
checked against the pinned Flower CLI's ``--help``, since flags of older Flower releases
(``--fleet-api-address``, ``--appio-api-address``) are gone or deprecated in 1.41.
"""

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import flwr
import pytest
import yaml
from compose_emulator import image_of, interpolate

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load(interpolate((ROOT / "docker" / "compose.yaml").read_text()))
SERVICES = COMPOSE["services"]


@cache
def help_text(binary: str) -> str:
    path = Path(sys.executable).parent / binary
    return subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60).stdout


def binary_of(service: dict) -> str:
    tag = service["image"].split(":")[1]
    assert tag == flwr.__version__, f"{service['image']}: tag must be the pinned Flower version"
    return image_of(service, ROOT / "docker").entrypoint[0]


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
            source, target = volume.split(":")[:2]
            assert source.startswith(("./", "../", "/")) or source in COMPOSE.get("volumes", {})
            # Flower's images run as uid 49999 in /app: what they use lives under /app
            assert target.startswith("/app/"), f"{name}: {volume} is outside /app"


def test_each_container_gets_only_the_keys_it_needs():
    """No node can read another node's private key or the SuperLink's."""
    for name, service in SERVICES.items():
        keys = {v.split(":")[1] for v in service.get("volumes", []) if "deploy-keys" in v}
        assert all(
            v.split(":")[0].startswith("../deploy-keys/")
            for v in service["volumes"]
            if "deploy-keys" in v
        ), f"{name} mounts the whole key folder"
        private = {k for k in keys if k.endswith((".key",)) or re.search(r"supernode-\d+$", k)}
        expected = {"superlink": {"/app/keys/server.key"}}.get(
            name, {f"/app/keys/{name}"} if name.startswith("supernode-") else set()
        )
        assert private == expected, f"{name} holds private keys {private}"


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


def test_dockerfile_builds_from_the_pinned_superexec_image_with_the_projects_pins():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"FROM flwr/superexec:{flwr.__version__}" in dockerfile
    assert "==" not in dockerfile, "pins live in pyproject.toml only"
    assert "requirements.py /tmp/fedqssl/pyproject.toml" in dockerfile
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in dockerfile
    # nodes build the fused kernels: a compiler and ninja, installed as root, then back to app
    assert "apt-get install -y --no-install-recommends g++ ninja-build" in dockerfile
    assert dockerfile.index("USER root") < dockerfile.index("g++") < dockerfile.index("USER app")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "results" in ignored  # not sent as build context
    # no bundle carries the kernels' C++: the image holds it, names it and builds it once
    assert "ENV FEDQSSL_KERNEL_SOURCES=/opt/fedqssl/csrc" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY --chown=app:app common/"):
            for source in line.split()[2:-1]:
                assert (ROOT / source).exists(), source
                assert not any(source.startswith(i.rstrip("/")) for i in ignored), source
    assert "kernel.compiled() is None" in dockerfile


@pytest.mark.slow
def test_the_images_pip_step_resolves_in_a_clean_venv(tmp_path):
    """The Dockerfile's install, run as far as this machine allows: the same requirements
    (``docker/requirements.py`` on ``pyproject.toml``) resolved by pip in a fresh venv. The CPU
    torch index is not reachable here, so the pins resolve from the configured index instead."""
    requirements = subprocess.run(
        [sys.executable, ROOT / "docker" / "requirements.py", ROOT / "pyproject.toml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "torch==2.14.1" in requirements and "flwr[simulation]==1.41.*" in requirements
    (tmp_path / "requirements.txt").write_text(requirements)
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    resolved = subprocess.run(
        [
            tmp_path / "venv" / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            tmp_path / "report.json",
            "-r",
            tmp_path / "requirements.txt",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    versions = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}
    assert versions["torch"].startswith("2.14.1") and versions["torchvision"].startswith("0.29.1")
    assert versions["flwr"].startswith("1.41.")


def test_demo_run_config_is_valid_and_points_inside_the_containers_mounts():
    """The ServerApp reads data and writes results only where the compose file mounts them."""
    import tomllib

    from common.config import ExperimentConfig

    with open(ROOT / "docker" / "demo.toml", "rb") as handle:
        config = ExperimentConfig.from_mapping(tomllib.load(handle))
    mounts = {v.split(":")[1] for v in SERVICES["superexec-serverapp"]["volumes"]}
    assert config.data_dir in mounts
    assert any(config.output_dir.startswith(m + "/") for m in mounts)
