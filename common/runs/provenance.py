"""What made a record: the command, the code, the packages and the machine (``provenance``).

A run's ``summary.json`` and a plan's ``comparison.json`` carry it, so that a number can be traced
to the commit, versions and CPU that produced it: floats differ between AVX2, AVX-512 and NEON
builds, so the same seed replays digit for digit only where all of these agree.

The ServerApp runs from a copy of the app that Flower installs elsewhere, with no git checkout
and no knowledge of the command that started it: it records what it can see (the hash of the
code it runs, the host, the resources as resolved) and leaves the command and commit None. The
launcher (``simulation.py``) then adds what only it knows (``launch_record``) to each run it
completed (``stamp_summary``), whichever SuperLink or Ray cluster ran it. Free of Flower and
torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic import write_text_atomically
from common.readback import read_json_object

# the packages whose versions change what a run computes or how it is run
PACKAGES = ("torch", "torchvision", "flwr", "ray", "numpy")
# the CPU's vector extensions that decide which float kernels torch and NumPy run
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon", "asimd")
# the code a node runs (pyproject's fab-include): what ``code-hash`` covers
CODE_PACKAGES = ("common", "fedqssl_client", "fedqssl_server")


def started_now() -> str:
    """The current time as ISO 8601 with its UTC offset, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files have uncommitted changes) of the checkout holding
    ``folder``; (None, None) outside a git checkout or without git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return None, None
        changes = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git on this machine
        return None, None
    dirty = bool(changes.stdout.strip()) if changes.returncode == 0 else None
    return head.stdout.strip(), dirty


def code_hash(app_dir: Path) -> str:
    """SHA-256 over the app's Python files (path and bytes, in path order): the same for a
    checkout and for the copy Flower runs, so a record names its code even without git."""
    digest = hashlib.sha256()
    files = sorted(path for package in CODE_PACKAGES for path in (app_dir / package).rglob("*.py"))
    for path in files:
        digest.update(path.relative_to(app_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Python's and each package's version (None where a package is not installed)."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}}


def cpu_record(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model, architecture and the vector extensions among ``ISA_FLAGS`` it has (read
    from ``/proc/cpuinfo`` on Linux; ``cpuinfo`` gives that text in tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model": fields.get("model name") or fields.get("Model") or platform.processor() or None,
        "machine": platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
    }


def portable_argv(argv: Sequence[str], app_dir: Path) -> list[str]:
    """``argv`` with no path of this machine: a path inside ``app_dir`` relative to it, any other
    absolute one as ``<elsewhere>/NAME`` (also after ``KEY=`` or ``--option=``)."""

    def portable(arg: str) -> str:
        prefix, sep, value = arg.partition("=")
        if sep and not arg.startswith("/"):
            return prefix + sep + portable(value)
        if not arg.startswith("/"):
            return arg
        path = Path(arg).resolve()
        if path.is_relative_to(app_dir.resolve()):
            return path.relative_to(app_dir.resolve()).as_posix() or "."
        return f"<elsewhere>/{path.name}"

    return [portable(arg) for arg in argv]


def launch_record(
    argv: Sequence[str], app_dir: Path, cpus_per_client: int, gpus_per_client: float
) -> dict[str, Any]:
    """What only the launcher knows: its command line (``portable_argv``), the checkout's commit
    and whether it had uncommitted changes, and the resources it gave each client."""
    commit, dirty = git_state(app_dir)
    return {
        "command": ["python", *portable_argv(argv, app_dir)],
        "commit": commit,
        "dirty": dirty,
        "cpus-per-client": cpus_per_client,
        "gpus-per-client": gpus_per_client,
    }


def host_record() -> dict[str, Any]:
    """What any process can say of itself: package versions and the CPU."""
    return {"versions": versions(), "cpu": cpu_record()}


def _distinct(values: Iterable[Any]) -> list[Any]:
    return sorted({value for value in values if value is not None}, key=str)


# what the launcher adds to a run's provenance (None where a run was started without it)
LAUNCH_KEYS = ("command", "commit", "dirty", "cpus-per-client", "gpus-per-client")


def run_provenance(
    code: str, started: str, server: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A run's ``provenance`` as its ServerApp sees it: the hash of the code that ran, the host,
    and the threads, devices, allocators and fused-kernel use as resolved, the server's
    (``server``: ``threads``, ``device``, ``fused-kernels``) beside what the clients reported
    in ``rounds``; the launcher's keys None until ``stamp_summary`` fills them."""
    clients = [c for r in rounds for c in r.get("clients", [])]
    codes = _distinct(r.get("code-hash") for r in rounds)
    return {
        "launcher": None,
        **dict.fromkeys(LAUNCH_KEYS),
        "code-hash": code,
        # a resumed run whose rounds ran different code says so
        "same-code-every-round": codes in ([], [code]),
        **host_record(),
        "threads": {
            "server": server.get("threads"),
            "clients": _distinct(c.get("torch-threads") for c in clients),
        },
        "device": {
            "server": server.get("device"),
            "clients": _distinct(c.get("device") for c in clients),
        },
        "allocator": {"clients": _distinct(c.get("allocator") for c in clients)},
        "fused-kernels": {
            "server": server.get("fused-kernels"),
            "clients": _distinct(c.get("fused-kernels") for c in clients),
        },
        "tf32": server.get("tf32"),
        "started": started,
    }


def stamp_summary(summary_path: Path, launch: Mapping[str, Any], app_dir: Path) -> None:
    """Add the launcher's record to a completed run's ``summary.json`` (rewritten atomically).
    Its commit names the code that ran only if the checkout still holds that code: where the
    run's ``code-hash`` differs from the checkout's now (the tree was edited during the run),
    ``dirty`` is True. A summary without provenance (an older run, kept) is left as it is."""
    if not summary_path.is_file():
        return
    summary = read_json_object(summary_path, "run summary")
    record = summary.get("provenance")
    if not isinstance(record, dict):
        return
    edited = record.get("code-hash") != code_hash(app_dir)
    record.update({key: launch.get(key) for key in LAUNCH_KEYS}, launcher="simulation.py")
    if edited and launch.get("commit") is not None:
        record["dirty"] = True
    write_text_atomically(summary_path, json.dumps(summary, indent=2) + "\n")


def invocation_provenance(launch: Mapping[str, Any], started: str) -> dict[str, Any]:
    """A plan's (``comparison.json``'s) ``provenance``: the launcher's record and the host."""
    return {**launch, **host_record(), "started": started}
