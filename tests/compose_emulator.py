"""``docker compose`` for a machine with no Docker engine: each service of a compose file as a
local process, as close to its container as Linux namespaces allow.

What it reproduces, per service: the image's entrypoint binary (from this virtualenv, which
stands in for the image's ``/python/venv``), the command flags exactly as the compose file gives
them, the image's user (uid 49999), its working directory and ``HOME`` (``/app``), its volumes at
their container paths in a private mount namespace (bind mounts of host paths, read-only where
marked; named volumes and missing bind sources as fresh root-owned empty folders, the way Docker
makes them), its own network namespace and address on a bridge this tool creates, service names
resolving through ``/etc/hosts``, and published ports forwarded from the host's loopback.

From a Dockerfile it takes the entrypoint, working directory, ``ENV`` lines and the ``COPY`` of
build-context folders to paths outside ``/tmp`` (bound read-only at their container paths, over
a tmpfs of their top folder): the kernels' C++ the image holds, so containers build and run the
fused kernels (each in its own HOME: the image's build-time build is not reproduced).

What it cannot reproduce, and why: the rest of the image's own filesystem (Python, flwr and the
app's dependencies come from this virtualenv; an image that lacks a package is not caught here:
``build`` only reads the Dockerfile, whose pip step a test runs in a clean venv), Docker's
embedded DNS server (names resolve through the mounted ``/etc/hosts`` instead), ``restart:``
policies, and cgroup limits. Needs root (namespaces, a bridge, setpriv).

Used as a ``docker`` command on PATH (a shim runs ``python compose_emulator.py "$@"``), with its
state in ``$COMPOSE_EMULATOR_STATE``::

    docker compose -f docker/compose.yaml build | up -d [SERVICE...] | exec SERVICE CMD... | down
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

VENV_BIN = Path(sys.executable).parent
APP_UID = 49999  # Flower's images: user ``app``, HOME and WORKDIR /app
APP_HOME = "/app"


@dataclass(frozen=True)
class Image:
    entrypoint: tuple[str, ...]
    workdir: str = APP_HOME
    uid: int = APP_UID
    env: tuple[tuple[str, str], ...] = ()  # the Dockerfile's ENV
    # the Dockerfile's COPY of build-context folders to paths outside /tmp (which its RUN steps
    # delete), as (host folder, container folder)
    copies: tuple[tuple[str, str], ...] = ()


FLOWER_IMAGES = {
    "flwr/superlink": Image(("flower-superlink",)),
    "flwr/supernode": Image(("flower-supernode",)),
    "flwr/superexec": Image(("flower-superexec",)),
}


def interpolate(text: str) -> str:
    """Compose's ``${VAR}`` and ``${VAR:-default}`` from the environment."""

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(3) or ""
        return os.environ.get(name) or default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", value, text)


def image_of(service: dict, compose_dir: Path) -> Image:
    """The image's entrypoint, workdir and user: Flower's published images, or one built
    ``FROM`` one of them by a Dockerfile (its ENTRYPOINT and WORKDIR override the base's)."""
    build = service.get("build")
    if build is None:
        return FLOWER_IMAGES[service["image"].split(":")[0]]
    dockerfile = (compose_dir / build["context"] / build["dockerfile"]).read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    image = FLOWER_IMAGES[base.split(":")[0]]
    entry = re.findall(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.M)
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    env = tuple(tuple(m) for m in re.findall(r"^ENV\s+(\w+)=(\S+)", dockerfile, re.M))
    context = (compose_dir / build["context"]).resolve()
    copies = tuple(
        (str(context / source), target.rstrip("/"))
        for source, target in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+/)\s+(/\S+)$", dockerfile, re.M)
        if not target.startswith("/tmp/")
    )
    return Image(
        tuple(json.loads(entry[-1])) if entry else image.entrypoint,
        workdir[-1] if workdir else image.workdir,
        image.uid,
        env,
        copies,
    )


def run(*command: str) -> None:
    subprocess.run(command, check=True)


class Project:
    """One compose file and the emulator's state for it."""

    def __init__(self, compose_file: Path, state_dir: Path) -> None:
        self.file = compose_file.resolve()
        self.dir = self.file.parent
        self.spec = yaml.safe_load(interpolate(self.file.read_text()))
        self.services: dict[str, dict] = self.spec["services"]
        self.state_dir = state_dir
        self.state_file = state_dir / "state.json"
        self.state = (
            json.loads(self.state_file.read_text())
            if self.state_file.exists()
            else {"tag": secrets.token_hex(2), "running": {}, "forwarders": [], "made": []}
        )
        # one address per service, fixed by its place in the file
        self.subnet = (
            f"10.{200 + int(self.state['tag'], 16) % 50}.{int(self.state['tag'], 16) % 250}"
        )
        self.address = {n: f"{self.subnet}.{10 + i}" for i, n in enumerate(self.services)}

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    # ------------------------------------------------------------ network

    @property
    def bridge(self) -> str:
        return f"fq{self.state['tag']}br"

    def ensure_network(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            return
        self.save()
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{ip} {name}\n" for name, ip in self.address.items()
        )
        (self.state_dir / "hosts").write_text(hosts)

    def attach(self, name: str) -> str:
        """A network namespace for ``name`` with its address on the bridge."""
        index = list(self.services).index(name)
        netns, host_end, inner = (f"fq{self.state['tag']}{k}{index}" for k in ("n", "h", "c"))
        run("ip", "netns", "add", netns)
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", inner)
        run("ip", "link", "set", inner, "netns", netns)
        run("ip", "link", "set", host_end, "master", self.bridge, "up")
        for command in (
            ["ip", "addr", "add", f"{self.address[name]}/24", "dev", inner],
            ["ip", "link", "set", inner, "up"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", "default", "via", f"{self.subnet}.1"],
        ):
            run("ip", "netns", "exec", netns, *command)
        return netns

    # ------------------------------------------------------------ services

    def mounts(self, name: str) -> list[tuple[str, str, bool]]:
        """(host path, container path, read-only) of the service's volumes."""
        found = []
        for volume in self.services[name].get("volumes", []):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            if source.startswith((".", "/")):
                host = (self.dir / source).resolve()
                if not host.exists():  # Docker creates a missing bind source as a root folder
                    host.mkdir(parents=True)
            else:  # a named volume: a fresh, root-owned empty folder
                host = self.state_dir / "volumes" / source
                host.mkdir(parents=True, exist_ok=True)
            found.append((str(host), target, read_only))
        return found

    def container_script(self, name: str, image: Image, app_dir: Path) -> str:
        lines = ["set -e", f"mount --bind {shlex.quote(str(app_dir))} {APP_HOME}"]
        for host, target, read_only in self.mounts(name):
            h, t = shlex.quote(host), shlex.quote(target)
            # mount points appear inside the container's tree, as Docker makes them
            lines.append(
                f"if [ -d {h} ]; then mkdir -p {t}; "
                f"else mkdir -p $(dirname {t}); [ -e {t} ] || touch {t}; fi"
            )
            lines.append(f"mount --bind {h} {t}")
            if read_only:
                lines.append(f"mount -o remount,bind,ro {t}")
        covered = set()
        for host, target in image.copies:  # the image's own folders: over a tmpfs of their root
            top = "/" + Path(target).parts[1]
            if top not in covered:
                lines.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(top)}")
                covered.add(top)
            h, t = shlex.quote(host), shlex.quote(target)
            lines += [f"mkdir -p {t}", f"mount --bind {h} {t}", f"mount -o remount,bind,ro {t}"]
        lines.append(f"mount --bind {shlex.quote(str(self.state_dir / 'hosts'))} /etc/hosts")
        lines += self.interpreter_access(name)
        lines.append(f"cd {shlex.quote(image.workdir)}")
        return "\n".join(lines)

    def interpreter_access(self, name: str) -> list[str]:
        """The stand-in interpreter may live where uid 49999 cannot go (a pyenv build under
        /root, mode 0700): in the service's mount namespace only, cover that folder with an open
        tmpfs and put the interpreter's subtree back into it. The image has its own Python in
        /usr/local, so nothing of the container's view is lost."""
        real = Path(os.path.realpath(sys.executable))
        for parent in reversed(real.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                child = real.relative_to(parent).parts[0]
                hold = shlex.quote(str(self.state_dir / "containers" / name / "interpreter"))
                closed, inside = shlex.quote(str(parent)), shlex.quote(str(parent / child))
                return [
                    f"mkdir -p {hold}",
                    f"mount --bind {inside} {hold}",
                    f"mount -t tmpfs -o mode=755 tmpfs {closed}",
                    f"mkdir {inside}",
                    f"mount --bind {hold} {inside}",
                ]
        return []

    def user_env(self, image: Image) -> list[str]:
        return [
            "setpriv",
            f"--reuid={image.uid}",
            f"--regid={image.uid}",
            "--clear-groups",
            "env",
            "-i",
            f"HOME={APP_HOME}",
            f"PATH={VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
            "LANG=C.UTF-8",
            *(f"{key}={value}" for key, value in image.env),
        ]

    def start(self, name: str) -> None:
        if name in self.state["running"]:
            return
        for dependency in self.services[name].get("depends_on", []):
            self.start(dependency)
        service = self.services[name]
        image = image_of(service, self.dir)
        app_dir = self.state_dir / "containers" / name / "app"  # the image's own /app
        app_dir.mkdir(parents=True, exist_ok=True)
        os.chown(app_dir, image.uid, image.uid)
        if not Path(APP_HOME).exists():
            Path(APP_HOME).mkdir()
            self.state["made"].append(APP_HOME)
        netns = self.attach(name)
        command = [*image.entrypoint, *map(str, service.get("command", []))]
        script = self.container_script(name, image, app_dir)
        script += "\nexec " + shlex.join([*self.user_env(image), *command])
        log = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "nsenter",
                f"--net=/run/netns/{netns}",
                "bash",
                "-c",
                script,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state["running"][name] = {"pid": process.pid, "netns": netns}
        for port in service.get("ports", []):
            published, target = str(port).split(":")[-2:]
            forwarder = subprocess.Popen(
                [sys.executable, __file__, "forward", published, self.address[name], target],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.state["forwarders"].append(forwarder.pid)
        self.save()
        print(f"emulator: started {name} ({self.address[name]}, pid {process.pid})", flush=True)

    def exec(self, name: str, command: list[str]) -> int:
        entry = self.state["running"].get(name)
        if entry is None:
            print(f"emulator: service {name} is not running", file=sys.stderr)
            return 1
        image = image_of(self.services[name], self.dir)
        pid = str(entry["pid"])
        enter = ["nsenter", "-t", pid, "-m", "-n", f"--wd={image.workdir}"]
        return subprocess.run([*enter, *self.user_env(image), *command]).returncode

    def down(self) -> None:
        pids = [e["pid"] for e in self.state["running"].values()] + self.state["forwarders"]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
            time.sleep(1 if sig == signal.SIGTERM else 0)
        for entry in self.state["running"].values():
            subprocess.run(["ip", "netns", "del", entry["netns"]], check=False)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
        for made in self.state["made"]:
            with contextlib.suppress(OSError):
                Path(made).rmdir()
        self.state = {**self.state, "running": {}, "forwarders": [], "made": []}
        self.save()


async def forward(listen_port: int, target_host: str, target_port: int) -> None:
    """A published port: the host's loopback to the service's address (docker-proxy's job)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if argv[:1] == ["forward"]:
        asyncio.run(forward(int(argv[1]), argv[2], int(argv[3])))
        return 0
    if argv[:1] != ["compose"] or "-f" not in argv:
        print(f"emulator: only 'compose -f FILE ...' is emulated, got {argv}", file=sys.stderr)
        return 2
    at = argv.index("-f")
    project = Project(Path(argv[at + 1]), Path(os.environ["COMPOSE_EMULATOR_STATE"]))
    command, rest = argv[at + 2], argv[at + 3 :]
    if command == "build":
        for name, service in project.services.items():
            if "build" in service:
                image = image_of(service, project.dir)
                print(f"emulator: {name}: image not built (no engine); runs {image.entrypoint}")
        return 0
    if command == "up":
        project.ensure_network()
        for name in [r for r in rest if not r.startswith("-")] or list(project.services):
            project.start(name)
        return 0
    if command == "exec":
        return project.exec(rest[0], rest[1:])
    if command == "down":
        project.down()
        return 0
    print(f"emulator: compose {command} is not emulated", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
