"""The benchmarks' shared result shape and the document rebuilt from it: every table of
docs/BENCHMARKS.md is what its JSON file says, with the command, date and machine beside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import tables  # noqa: E402


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "results")
    return tmp_path


def write_example(ratio: float) -> Path:
    return harness.write_result(
        "example",
        "python benchmarks/example.py",
        [harness.headline("packed / ideal", ratio, "<= 1.005", ratio <= 1.005)],
        [("bits", "bits", "d"), ("ratio", "ratio", ".4f"), ("note", "note", "s")],
        [{"bits": 4, "ratio": ratio, "note": "codes"}, {"bits": 32, "ratio": 1.0}],
        extra_field=7,
    )


def test_a_result_file_holds_the_command_the_machine_and_its_findings(results_dir):
    path = write_example(1.0012)
    result = json.loads(path.read_text())
    assert result["command"] == "python benchmarks/example.py" and result["extra_field"] == 7
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    assert result["headlines"] == [
        {"what": "packed / ideal", "value": 1.0012, "goal": "<= 1.005", "met": True}
    ]
    assert [p.name for p in path.parent.iterdir()] == ["example.json"]  # no temp file left


def test_tables_rewrites_only_its_blocks_from_the_files(results_dir):
    write_example(1.0012)
    prose = "Intro.\n\n<!-- table:example -->\nold table\n<!-- /table:example -->\n\nAfter.\n"
    text = tables.updated(prose)
    assert text.startswith("Intro.\n\n<!-- table:example -->\n| bits | ratio | note |")
    assert "| 4 | 1.0012 | codes |" in text and "| 32 | 1.0000 | - |" in text
    assert "**1.001** (goal <= 1.005: met)" in text and "`python benchmarks/example.py`" in text
    assert "old table" not in text and text.endswith("<!-- /table:example -->\n\nAfter.\n")
    assert tables.updated(text) == text  # up to date: nothing changes
    write_example(1.01)  # a new run that misses the goal changes the document
    assert "(goal <= 1.005: not met)" in tables.updated(text)
    summary = tables.updated("<!-- headlines:example -->\n<!-- /headlines:example -->\n")
    assert "| bits |" not in summary and "**1.01** (goal <= 1.005: not met)" in summary


def test_a_block_without_its_result_file_is_an_error_naming_the_file(results_dir):
    with pytest.raises(SystemExit, match=r"missing\.json"):
        tables.updated("<!-- table:missing -->\n<!-- /table:missing -->\n")


def test_the_benchmark_documents_are_what_the_result_files_say():
    """Run as a user would: ``tables.py --check`` fails when a table of docs/BENCHMARKS.md or the
    README was edited by hand, or a benchmark re-run without regenerating them."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_every_result_file_is_the_harness_shape_and_shown_in_a_document():
    """No stale or orphaned result: each file in benchmarks/results was written by the harness
    (so it carries its command, machine and commit) and some block of the documents renders it."""
    shown = {
        match.group(3)
        for document in tables.DOCUMENTS
        for match in tables.BLOCK.finditer(document.read_text())
    }
    for path in sorted(harness.RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        assert {"command", "machine", "headlines", "table"} <= result.keys(), path.name
        assert result["benchmark"] == path.stem, path.name
        assert path.stem in shown, f"{path.name} is in no block of {tables.DOCUMENTS}"


def test_update_mode_reports_the_rules_difference_and_each_rules_gain_over_its_floor():
    import update_mode

    runs = [
        {"bits": 4, "weight_update": "untrained", "probe_accuracy": 0.700},
        {"bits": 4, "weight_update": "latent", "probe_accuracy": 0.735},
        {"bits": 4, "weight_update": "grid", "probe_accuracy": 0.750},
    ]
    found = {h["what"]: h["value"] for h in update_mode.headlines(runs, [4])}
    assert found["4-bit: linear probe points, grid - latent"] == pytest.approx(1.5)
    floor = "linear probe points over the untrained floor (70.0)"
    assert found[f"4-bit latent: {floor}"] == pytest.approx(3.5)
    assert found[f"4-bit grid: {floor}"] == pytest.approx(5.0)


def test_local_data_load_slope_cancels_the_loaders_fixed_memory():
    import local_data_load

    rows = [
        {"layout": "npz", "peak-growth-mb": 2.0 + 1.5, "image-mb": 1.5},
        {"layout": "png", "peak-growth-mb": 9.0, "image-mb": 1.5},
        {"layout": "npz", "peak-growth-mb": 2.0 + 6.0, "image-mb": 6.0},
        {"layout": "png", "peak-growth-mb": 18.0, "image-mb": 6.0},
    ]
    assert local_data_load.memory_slope(rows, "npz") == pytest.approx(1.0)  # held once
    assert local_data_load.memory_slope(rows, "png") == pytest.approx(2.0)
