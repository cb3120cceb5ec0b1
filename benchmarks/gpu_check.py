"""The GPU check: what to run first on a lent GPU machine, on its image as it is (its python3 and
torch; no flwr or Ray needed). Each step reports and the check goes on past a failure; all of it
lands in ``OUT/gpu_check.json`` (rewritten after every step) and ``OUT/gpu_check.log``.

1. ``environment``: python, torch, CUDA, the GPU, and whether flwr and Ray are importable;
2. ``tests``: the Flower-free test files (those that import with flwr and Ray blocked) under
   pytest on this machine (the tests that train pick the GPU), with
   ``torch.cuda.set_sync_debug_mode("warn")``, and the synchronizing-operation warnings counted;
3. ``gpu_step``: ``benchmarks/gpu_step.py`` (each objective trains on CUDA, then ResNet-18 step
   times at batch 128: fp32, 4-bit with codes and with float32 saved);
4. ``profile``: ``torch.profiler``'s table of one 4-bit step.

    bash benchmarks/gpu_check.sh                 # OUT defaults to results/gpu-check
    bash benchmarks/gpu_check.sh --dry-run       # on any machine: the plan and the test selection

Goals (issue 41): the Flower-free suite passes on CUDA, no sync warning in a step, a 4-bit codes
step <= 1.3x fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYNC_WARNING = "called a synchronizing CUDA operation"
COUNT_FILE = "FEDQSSL_SYNC_COUNT_FILE"  # where this file, as a pytest plugin, writes its count

# imported with flwr and Ray blocked, in a child of the checked python: prints the modules that
# import (a test file that needs Flower fails here, not on the GPU machine)
_PROBE = """
import importlib, importlib.abc, json, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flwr", "ray"):
            raise ImportError(f"{name} is blocked: the GPU image has no Flower or Ray")
sys.meta_path.insert(0, Blocked())
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
free = []
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
        free.append(name)
    except Exception:
        pass
print(json.dumps(free))
"""


# test files that import without Flower but run its commands, Ray or Docker's stand-in
RUN_FLOWER = (
    "test_compose_demo",
    "test_deploy_scripts",
    "test_deployment",
    "test_flwr_run",
    "test_gpu",
    "test_launcher",
)


def flower_free_tests(python: str) -> list[str]:
    """``tests/test_*.py`` files that import without flwr and Ray and run neither (not in
    ``RUN_FLOWER``), as paths from the root."""
    names = sorted(
        path.stem for path in (ROOT / "tests").glob("test_*.py") if path.stem not in RUN_FLOWER
    )
    completed = subprocess.run(
        [python, "-c", _PROBE, str(ROOT), json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the test selection failed: {completed.stderr[-2000:]}")
    return [f"tests/{name}.py" for name in json.loads(completed.stdout.strip().splitlines()[-1])]


def environment(python: str) -> dict[str, Any]:
    """The checked python's facts, from a child process (the image's own torch)."""
    script = (
        "import importlib.util, json, platform, torch\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,\n"
        "  'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if cuda else None,\n"
        "  'flwr': importlib.util.find_spec('flwr') is not None,\n"
        "  'ray': importlib.util.find_spec('ray') is not None}))\n"
    )
    completed = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def planned_steps(python: str, out: Path, tests: list[str]) -> dict[str, list[str]]:
    """Each step's command, in order."""
    return {
        "tests": [
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check",
            "-m", "not slow", "-rf", *tests,
        ],
        "gpu_step": [python, "benchmarks/gpu_step.py", "--batch-size", "128"],
        "profile": [
            python, "benchmarks/gpu_step.py", "--batch-size", "128",
            "--profile", str(out / "profile.txt"),
        ],
    }  # fmt: skip


class Report:
    """The check's JSON and log, rewritten after every step."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log = (out / "gpu_check.log").open("a", encoding="utf-8")
        self.data: dict[str, Any] = {"dry-run": dry_run, "started": time.strftime("%F %T")}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value
        path = self.out / "gpu_check.json"
        fresh = path.with_suffix(".json.tmp")
        fresh.write_text(json.dumps(self.data, indent=2) + "\n")
        fresh.replace(path)


def run_step(report: Report, name: str, command: list[str], timeout: int) -> dict[str, Any]:
    """One step in a child process: its exit status, seconds and the tail of what it printed
    (all of it to the log); a failure or a timeout is reported and the check goes on."""
    report.say(f"==> {name}: {' '.join(command)}")
    count_file = report.out / f"{name}.sync-count"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]),
        COUNT_FILE: str(count_file),
    }
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        status, output = completed.returncode, completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        output = f"{expired.stdout or ''}{expired.stderr or ''}\n(stopped after {timeout} s)"
        output = output if isinstance(output, str) else output.decode(errors="replace")
    report.log.write(output)
    result = {
        "command": command,
        "status": status,
        "passed": status == 0,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": output[-3000:],
    }
    if count_file.exists():
        result["sync-warnings"] = int(count_file.read_text())
    report.say(f"==> {name}: {'passed' if status == 0 else f'FAILED ({status})'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check")
    parser.add_argument(
        "--python", default=os.environ.get("PYTHON", "python3"), help="the python to check"
    )
    parser.add_argument("--dry-run", action="store_true", help="plan and select; run nothing")
    parser.add_argument(
        "--step-timeout", type=int, default=240, help="seconds a step may take (default 240)"
    )
    args = parser.parse_args(argv)
    report = Report(args.out.resolve(), args.dry_run)
    facts = environment(args.python)
    report.record("environment", facts)
    report.say(f"==> environment: {facts}")
    tests = flower_free_tests(args.python)
    report.record("tests-selected", tests)
    report.say(f"==> {len(tests)} Flower-free test files")
    steps = planned_steps(args.python, report.out, tests)
    if args.dry_run:
        planned = {name: {"command": c, "status": "planned"} for name, c in steps.items()}
        report.record("steps", planned)
        report.say(f"==> dry run: {', '.join(steps)} planned, nothing run")
        return 0
    if facts["gpu"] is None:
        report.say("==> no CUDA GPU visible to this python: run it where there is one")
        return 1
    results: dict[str, Any] = {}
    for name, command in steps.items():
        results[name] = run_step(report, name, command, args.step_timeout)
        report.record("steps", results)
    return 0 if all(r["passed"] for r in results.values()) else 1


# --- loaded by pytest as a plugin (``-p gpu_check``): CUDA sync warnings on, counted ---
_sync_warnings = 0


def pytest_configure(config: Any) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    global _sync_warnings
    if SYNC_WARNING in str(warning_message.message):
        _sync_warnings += 1


def pytest_unconfigure(config: Any) -> None:
    target = os.environ.get(COUNT_FILE)
    if target:
        Path(target).write_text(str(_sync_warnings))


if __name__ == "__main__":
    sys.exit(main())
