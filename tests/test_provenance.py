"""What made a record: git state inside and outside a checkout, the code hash, the CPU's vector
extensions, and the launcher's stamp on a completed run's summary."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from common.runs import provenance

ROOT = Path(__file__).resolve().parents[1]


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout holding a copy of the app's code."""
    folder = tmp_path / "checkout"
    for package in provenance.CODE_PACKAGES:
        shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__py*"))
    git(folder.parent, "init", "-q", str(folder))
    git(folder, "add", ".")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    return folder


def test_git_state_names_the_commit_and_uncommitted_changes(checkout, tmp_path):
    head = git(checkout, "rev-parse", "HEAD")
    assert provenance.git_state(checkout) == (head, False)
    (checkout / "untracked.txt").write_text("not code")  # untracked files do not count
    assert provenance.git_state(checkout) == (head, False)
    with open(checkout / "common" / "config.py", "a") as source:
        source.write("# edited\n")
    assert provenance.git_state(checkout) == (head, True)
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    assert provenance.git_state(outside) == (None, None)


def test_the_code_hash_follows_the_code_not_the_folder(checkout, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    assert provenance.code_hash(copy) == provenance.code_hash(checkout)
    assert provenance.code_hash(ROOT) == provenance.code_hash(checkout)
    (copy / "common" / "seeds.py").write_text("# another seed rule\n")
    assert provenance.code_hash(copy) != provenance.code_hash(checkout)


def test_the_cpu_record_names_the_vector_extensions_that_change_floats():
    intel = "processor\t: 0\nmodel name\t: Xeon X\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n"
    record = provenance.cpu_record(intel)
    assert record["model"] == "Xeon X"
    assert record["isa"] == ["sse4_2", "avx", "avx2", "fma", "avx512f"]
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\n"
    assert provenance.cpu_record(arm)["isa"] == ["asimd"]
    assert provenance.cpu_record("")["isa"] == []


def test_versions_name_every_package_that_changes_what_a_run_computes():
    import numpy
    import torch

    found = provenance.versions()
    assert set(found) == {"python", "torch", "torchvision", "flwr", "ray", "numpy"}
    assert found["torch"] == torch.__version__.split("+")[0] or found["torch"] == torch.__version__
    assert found["numpy"] == numpy.__version__


def run_folder(tmp_path: Path, code: str) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    rounds = [
        {"round": 1, "code-hash": code, "clients": [{"torch-threads": 1, "device": "cpu"}]},
        {"round": 2, "code-hash": code, "clients": [{"torch-threads": 1, "allocator": "fast"}]},
    ]
    record = provenance.run_provenance(
        code, "2026-12-07T10:00:00+0000", {"threads": 2, "device": "cpu"}, rounds
    )
    (folder / "summary.json").write_text(json.dumps({"global-accuracy": 0.5, "provenance": record}))
    return folder


def test_a_runs_provenance_before_and_after_the_launchers_stamp(checkout, tmp_path):
    folder = run_folder(tmp_path, provenance.code_hash(checkout))
    summary = json.loads((folder / "summary.json").read_text())["provenance"]
    # the ServerApp alone (a bare flwr run) knows no command and no commit
    assert summary["launcher"] is None and summary["commit"] is None
    assert summary["threads"] == {"server": 2, "clients": [1]}
    assert summary["device"] == {"server": "cpu", "clients": ["cpu"]}
    assert summary["allocator"] == {"clients": ["fast"]} and summary["same-code-every-round"]
    launch = provenance.launch_record(["simulation.py", "quickstart"], checkout, 1, 0.0)
    provenance.stamp_summary(folder / "summary.json", launch, checkout)
    stamped = json.loads((folder / "summary.json").read_text())
    assert stamped["global-accuracy"] == 0.5  # nothing else changes
    record = stamped["provenance"]
    assert record["commit"] == git(checkout, "rev-parse", "HEAD") and record["dirty"] is False
    assert record["command"] == ["python", "simulation.py", "quickstart"]
    assert record["launcher"] == "simulation.py" and record["cpus-per-client"] == 1


def test_a_run_whose_code_differs_from_the_checkout_is_stamped_dirty(checkout, tmp_path):
    folder = run_folder(tmp_path, "0" * 64)  # the code that ran is not what the checkout holds
    launch = provenance.launch_record(["simulation.py"], checkout, 1, 0.0)
    assert launch["dirty"] is False
    provenance.stamp_summary(folder / "summary.json", launch, checkout)
    assert json.loads((folder / "summary.json").read_text())["provenance"]["dirty"] is True


def test_the_command_names_no_path_of_this_machine(tmp_path):
    argv = [
        str(ROOT / "simulation.py"),
        "configs/quickstart.yaml",
        "--output-dir",
        str(tmp_path / "out"),
        f"--flwr-home={tmp_path / 'home'}",
        "--set",
        f"data-dir={tmp_path / 'data'}",
        "--seeds",
        "0,1",
    ]
    assert provenance.portable_argv(argv, ROOT) == [
        "simulation.py",
        "configs/quickstart.yaml",
        "--output-dir",
        "<elsewhere>/out",
        "--flwr-home=<elsewhere>/home",
        "--set",
        "data-dir=<elsewhere>/data",
        "--seeds",
        "0,1",
    ]


def test_outside_a_checkout_the_launcher_says_no_commit(tmp_path):
    folder = tmp_path / "app"
    shutil.copytree(ROOT / "common", folder / "common", ignore=shutil.ignore_patterns("__py*"))
    launch = provenance.launch_record(["simulation.py"], folder, 1, 0.0)
    assert launch["commit"] is None and launch["dirty"] is None


def test_a_resumed_run_whose_rounds_ran_other_code_says_so():
    rounds = [{"round": 1, "code-hash": "a" * 64}, {"round": 2, "code-hash": "b" * 64}]
    record = provenance.run_provenance("b" * 64, "now", {}, rounds)
    assert record["same-code-every-round"] is False


def test_a_summary_without_provenance_is_left_as_it_is(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"global-accuracy": 0.5}')
    provenance.stamp_summary(path, {"commit": "x"}, ROOT)
    assert path.read_text() == '{"global-accuracy": 0.5}'
    provenance.stamp_summary(tmp_path / "absent.json", {"commit": "x"}, ROOT)  # nothing to stamp
