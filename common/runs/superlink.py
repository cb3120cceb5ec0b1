"""The SuperLink a simulation runs on: started by this process on a free port, in a Flower home
of its own, and stopped by the pid it was given, so two runs on one machine (two presets, two
checkouts) never share, reuse or stop each other's SuperLink. Flower's own ``flwr run`` instead
starts one detached SuperLink on the fixed port 39091 and reuses whatever answers there, whatever
checkout and ``FLWR_HOME`` started it (whose copy of the app its clients then import)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONNECTION = "fedqssl-simulation"
STARTUP_SECONDS = 120.0  # a hang guard: a SuperLink starts in about a second on an idle machine


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or reached; the message says why and what to do."""


@dataclass(frozen=True)
class SuperLink:
    """A SuperLink the ``flwr`` CLI reaches through ``env`` (its ``FLWR_HOME`` holds a default
    connection to ``address``); ``pid`` is None for one given with ``--superlink``."""

    address: str
    env: dict[str, str]
    home: Path
    pid: int | None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def checked_address(address: str) -> str:
    """``HOST:PORT`` as given to ``--superlink``, or a ValueError naming the expected form."""
    found = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})", address)
    if not found or not 0 < int(found.group(2)) < 65536:
        raise ValueError(
            f"--superlink {address!r}: give HOST:PORT of a running simulation SuperLink, "
            "e.g. 127.0.0.1:39091"
        )
    return address


def is_healthy(address: str, timeout: float = 1.0) -> bool:
    """Whether a SuperLink answers its HTTP health check at ``address``."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as response:
            return 200 <= response.status < 300
    except (OSError, urllib.error.URLError):
        return False


def write_connection(home: Path, address: str) -> None:
    """The ``flwr`` CLI's config in ``home``: one default connection, to ``address``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def _start(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start ``flower-superlink --simulation`` on a free port; (its process, its address) once
    it answers. A port taken between choosing and binding makes it exit: tried again."""
    log = home / "superlink.log"
    for _ in range(3):
        address = f"127.0.0.1:{free_port()}"
        command = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            address.rsplit(":", 1)[1],
            "--database",
            str(home / "state.db"),
            "--log-file",
            str(log),
            "--disable-runtime-dependency-installation",
        ]
        # its own session: a terminal's Ctrl-C reaches this process, whose cleanup stops it
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if is_healthy(address):
                    return process, address
                time.sleep(0.2)
        except BaseException:  # interrupted while it starts: it must not outlive us
            stop_processes({process.pid}, signal.SIGKILL)
            raise
        if process.poll() is None:  # neither up nor exited: a hang
            stop_processes({process.pid}, signal.SIGKILL)
            break
    raise SuperLinkError(f"flower-superlink did not start; its log: {log}")


@contextlib.contextmanager
def simulation_superlink(
    flwr_home: Path, env: dict[str, str], address: str | None = None, keep: bool = False
) -> Iterator[SuperLink]:
    """A SuperLink for this process's ``flwr run`` calls, in a Flower home of its own under
    ``flwr_home/superlinks/``. With ``address``: that running SuperLink, neither started nor
    stopped here. Otherwise one started here and stopped on the way out with everything under
    it (the SuperExec, the ServerApp, Ray), its folder removed unless ``keep`` (the SuperLink
    then keeps running, for ``flwr list`` and ``flwr log``)."""
    home = flwr_home / "superlinks" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    home.mkdir(parents=True)
    env = {**env, "FLWR_HOME": str(home)}
    if address is not None:
        if not is_healthy(address, timeout=5.0):
            remove_home(home)
            raise SuperLinkError(
                f"--superlink {address}: no SuperLink answers there (start one with "
                "`flower-superlink --insecure --simulation`, or drop --superlink to have one "
                "started for this run)"
            )
        write_connection(home, address)
        try:
            yield SuperLink(address, env, home, None)
        finally:
            remove_home(home)
        return
    process, address = _start(home, env)
    write_connection(home, address)
    try:
        yield SuperLink(address, env, home, process.pid)
    finally:
        if not keep:
            stop_processes({process.pid})
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            remove_home(home)


def remove_home(home: Path) -> None:
    """Remove a Flower home made here, and ``superlinks/`` above it once it is empty."""
    shutil.rmtree(home, ignore_errors=True)
    with contextlib.suppress(OSError):
        home.parent.rmdir()


def _arguments(proc: Path) -> list[str]:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _names_parent(proc: Path, pids: set[int]) -> bool:
    """Whether ``proc`` was started with ``--parent-pid P`` for a P in ``pids``."""
    arguments = _arguments(proc)
    return any(
        flag == "--parent-pid" and value in {str(pid) for pid in pids}
        for flag, value in itertools.pairwise(arguments)
    )


def _parent_of(proc: Path) -> int | None:
    try:  # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(pids: set[int]) -> set[int]:
    """``pids``, the SuperExec processes that name one of them as parent, and every descendant
    of those (the ``flwr-simulation`` process that runs the ServerApp, Ray's processes)."""
    processes = list(Path("/proc").glob("[0-9]*"))
    parents = {int(proc.name): _parent_of(proc) for proc in processes}
    tree = set(pids) | {int(proc.name) for proc in processes if _names_parent(proc, pids)}
    frontier = set(tree)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree


def stop_processes(pids: set[int], signal_number: int = signal.SIGTERM) -> None:
    """Signal ``pids`` and everything under them (``process_tree``) at once: a ServerApp left
    orphaned would otherwise run on and write into its results folder. SIGTERM: stop; SIGKILL:
    what a crash does, for tests."""
    for pid in process_tree(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number)
