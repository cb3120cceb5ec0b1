"""The GPU check cannot rot between lent machines: its argument handling, its Flower-free test
selection and its plan run here on the CPU (``--dry-run``), and its profiler step on a CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_step  # noqa: E402

# Flower-free parts the check must run on CUDA (the server rounds' and fine-tunes' tests build
# Flower's fit results, so they are not among them yet)
CORE = ("quant", "saved_codes", "noise", "training", "models", "packing", "payload", "qsgd")


def test_the_dry_run_plans_every_step_and_selects_the_flower_free_tests(tmp_path):
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry-run"] is True and report["environment"]["torch"]
    assert list(report["steps"]) == ["tests", "gpu_step", "profile"]
    assert all(step["status"] == "planned" for step in report["steps"].values())
    selected = set(report["tests-selected"])
    assert {f"tests/test_{name}.py" for name in CORE} <= selected
    assert "tests/test_strategy.py" not in selected  # imports Flower
    assert not {f"tests/{name}.py" for name in gpu_check.RUN_FLOWER} & selected
    assert all((ROOT / "tests" / f"{name}.py").is_file() for name in gpu_check.RUN_FLOWER)
    tests = report["steps"]["tests"]["command"]
    assert tests[:3] == [sys.executable, "-m", "pytest"] and "gpu_check" in tests
    assert "--batch-size" in report["steps"]["gpu_step"]["command"]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("==> ") >= 3


def test_a_failing_step_is_reported_and_the_check_goes_on(tmp_path):
    report = gpu_check.Report(tmp_path, dry_run=False)
    failed = gpu_check.run_step(report, "broken", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    slow = gpu_check.run_step(
        report, "slow", [sys.executable, "-c", "import time; time.sleep(9)"], 1
    )
    fine = gpu_check.run_step(report, "fine", [sys.executable, "-c", "print('ok')"], 60)
    assert (failed["status"], failed["passed"]) == (3, False)
    assert slow["status"] == "timeout" and "stopped after 1 s" in slow["tail"]
    assert fine["passed"] and "ok" in fine["tail"]


def test_the_pytest_plugin_counts_sync_warnings_and_writes_the_count(tmp_path, monkeypatch):
    target = tmp_path / "count"
    monkeypatch.setenv(gpu_check.COUNT_FILE, str(target))
    monkeypatch.setattr(gpu_check, "_sync_warnings", 0)

    class Recorded:
        def __init__(self, text):
            self.message = UserWarning(text)

    for text in (f"x {gpu_check.SYNC_WARNING} y", "another warning", gpu_check.SYNC_WARNING):
        gpu_check.pytest_warning_recorded(Recorded(text), "call", "test", None)
    gpu_check.pytest_unconfigure(None)
    assert target.read_text() == "2"


def test_the_profile_step_tables_one_low_bit_step():
    table = gpu_step.profile_step(2, device="cpu", row_limit=5)
    assert "Self CPU" in table and "aten::" in table
