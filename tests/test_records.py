"""The results of record: the manifest, records read back and checked, paired intervals and the
words they allow, the generated tables, and the check that a page says what its records give."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.runs import record_tables
from common.runs.records import (
    SCORES,
    Experiment,
    ManifestError,
    Paired,
    load_manifest,
    paired,
    prediction_interval,
    read_records,
    t975,
)

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "a" * 40


def load_script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts/results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment(folder: Path) -> Experiment:
    return Experiment(
        "tiny",
        "quickstart",
        folder,
        ((("fedqssl", "fedsimclr"), (0, 1, 2)), (("local-only",), (0, 1))),
        ("fedqssl",),
        (("fedqssl", "fedsimclr"), ("fedqssl", "local-only")),
    )


def summary(probe: float, local: float = 0.8, commit: str = COMMIT, **extra) -> dict:
    return {
        "label": extra.pop("label", "Row"),
        "global-probe-accuracy": probe,
        "untrained-global-probe-accuracy": 0.6,
        "mean-local-accuracy": local,
        "untrained-mean-local-accuracy": 0.7,
        "knn-accuracy": probe - 0.1,
        "untrained-knn-accuracy": 0.4,
        "train-steps": 60,
        "server-steps": 30,
        "rounds": 6,
        "wall-seconds": 10.0,
        "provenance": {"commit": commit, "dirty": False, "same-code-every-round": True},
        **extra,
    }


def write(root: Path, row: str, seed: int, record: object) -> Path:
    folder = root / row / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(record) if not isinstance(record, str) else record)
    return path


@pytest.fixture
def records_dir(tmp_path) -> Path:
    for seed, (mine, theirs) in enumerate([(0.70, 0.66), (0.71, 0.68), (0.72, 0.69)]):
        write(tmp_path, "fedqssl", seed, summary(mine, label="Fed-QSSL"))
        write(tmp_path, "fedsimclr", seed, summary(theirs, label="Fed-SimCLR"))
    for seed in (0, 1):
        write(tmp_path, "local-only", seed, summary(0.65, local=0.81 - seed / 100))
    return tmp_path


def test_student_t_and_the_words_an_interval_allows():
    assert t975(2) == pytest.approx(4.303) and t975(4) == pytest.approx(2.776)
    assert t975(100) == pytest.approx(1.96)
    beats = Paired({0: 4.0, 1: 3.0, 2: 3.5})
    low, _ = beats.interval
    assert low > 0 and beats.verdict("A", "B") == "A beats B"
    mixed = Paired({0: 2.0, 1: -1.0, 2: 0.5})
    assert mixed.verdict("A", "B").startswith("no difference measured at n = 3 (interval [")
    assert Paired({0: -3.0, 1: -2.9, 2: -3.1}).verdict("A", "B") == "A is below B"
    assert Paired({0: 1.0}).interval is None  # one seed: no interval, no claim
    assert prediction_interval([1.0, 2.0, 3.0])[0] < 1.0  # wider than the seeds' range


def test_paired_differences_are_taken_seed_by_seed_in_points(records_dir):
    records = read_records(experiment(records_dir), records_dir)
    assert not records.problems and records.commits == {COMMIT}
    result = paired(records, "fedqssl", "fedsimclr", "global-probe")
    assert result.differences == pytest.approx({0: 4.0, 1: 3.0, 2: 3.0})
    # local-only has seeds 0 and 1 only: the pair uses the seeds both rows have
    assert sorted(paired(records, "fedqssl", "local-only", "local").differences) == [0, 1]
    assert records.missing == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ("{not json", "not JSON"),
        ("[0.7]", "a run summary is an object"),
        ({"global-probe-accuracy": 0.7}, "no provenance"),
        (summary(0.7, provenance={"commit": COMMIT, "dirty": True}), "uncommitted changes"),
        (summary(0.7, provenance={"commit": None, "dirty": None}), "names no commit"),
        (
            summary(0.7, provenance={"commit": COMMIT, "dirty": False}),
            "rounds ran different code",
        ),
    ],
)
def test_a_record_that_cannot_stand_is_named_with_why(records_dir, record, problem):
    path = write(records_dir, "fedsimclr", 1, record)
    records = read_records(experiment(records_dir), records_dir)
    assert any(str(path) in p and problem in p for p in records.problems), records.problems
    assert ("fedsimclr", 1) in records.missing


def test_records_of_two_commits_are_one_problem(records_dir):
    write(records_dir, "fedsimclr", 2, summary(0.69, commit="b" * 40))
    records = read_records(experiment(records_dir), records_dir)
    assert any("come from commits" in p for p in records.problems)


def test_the_tables_show_the_floor_the_gains_the_budget_and_each_seed(records_dir):
    records = read_records(experiment(records_dir), records_dir)
    rows = record_tables.rows_table(records)
    assert "| untrained floor | 0,1,2 | 60.00 ± 0.00 | " in rows
    assert "| Fed-QSSL | 0,1,2 | 71.00 ± 1.00 | +11.00 |" in rows
    assert "| Row | 0,1 (2/2) |" not in rows and "| 10 | 5 |" in rows  # steps a round
    pairs = record_tables.pairs_table(records)
    line = next(x for x in pairs.splitlines() if x.startswith("| fedqssl - fedsimclr | global"))
    assert "| +3.33 |" in line and "| 3 | +4.00, +3.00, +3.00 | fedqssl beats fedsimclr |" in line


def test_a_page_block_differing_from_its_records_is_named(records_dir, tmp_path):
    records = read_records(experiment(records_dir), records_dir)
    make = record_tables.renderers({"tiny": records})
    page = tmp_path / "page.md"
    page.write_text("# Results\n<!-- generated: tiny/pairs -->\nold\n<!-- /generated -->\nend\n")
    page.write_text(record_tables.rewrite(page.read_text(), make))
    assert record_tables.stale_blocks(page, make) == []
    assert page.read_text().endswith("<!-- /generated -->\nend\n")
    text = page.read_text()
    at = text.index("+3.33")
    page.write_text(text[:at] + "+3.34" + text[at + 5 :])  # one digit changed
    assert record_tables.stale_blocks(page, make) == ["page.md: tiny/pairs"]
    with pytest.raises(ValueError, match="no such table"):
        record_tables.rewrite("<!-- generated: nope -->\n<!-- /generated -->", make)


def test_a_manifest_pair_must_name_rows_of_its_experiment(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "experiments:\n  x:\n    preset: quickstart\n    folder: f\n"
        "    runs: [{rows: [fedqssl], seeds: [0]}]\n    decisive: [fedqssl]\n"
        "    pairs: [fedqssl - fedsimclr]\n"
    )
    with pytest.raises(ManifestError, match="pair 'fedqssl - fedsimclr'"):
        load_manifest(path)


def test_the_shipped_manifest_names_presets_and_rows_that_exist():
    """Each experiment's rows as ``run`` asks simulation.py for them (``--compare`` rows, or a
    sweep's values) are the preset's rows."""
    from common.runs.plan import make_plan, preset_path

    script = load_script()
    for name, spec in load_manifest(ROOT / "docs/results/manifest.yaml").items():
        preset = preset_path(spec.preset, ROOT / "configs")
        flag, rows = script.rows_arguments(spec, spec.rows)
        compare, sweep = (rows, None) if flag == "--compare" else (None, rows)
        plan = make_plan(preset, [], compare, sweep, "0")
        assert list(plan.rows) == spec.rows, name
        assert plan.kind == ("compare" if flag == "--compare" else "sweep"), name


def test_a_selection_seed_chooses_a_row_and_enters_no_table_or_pair(tmp_path):
    """A setting picked after seeing results is confirmed on seeds it was not picked on: the
    selection seed's runs name the chosen row and are left out of every mean and pair."""
    spec = Experiment(
        "temperature", "ablation-dq-temperature", tmp_path,
        ((("1.0", "0.03"), (9, 0, 1)),), ("0.03",), (("0.03", "1.0"),), selection_seed=9,
    )  # fmt: skip
    for seed, (warm, sharp) in {9: (0.60, 0.90), 0: (0.70, 0.71), 1: (0.70, 0.69)}.items():
        write(tmp_path, "1.0", seed, summary(warm))
        write(tmp_path, "0.03", seed, summary(sharp))
    records = read_records(spec, tmp_path)
    assert records.chosen() == "0.03"
    assert sorted(records.values("0.03", SCORES["global-probe"])) == [0, 1]
    result = paired(records, "0.03", "1.0", "global-probe")
    assert result.n == 2 and result.mean == pytest.approx(0.0)  # +1 and -1, not seed 9's +30
    assert "Seed 9 only chooses a row (the best global probe): `0.03`" in record_tables.status(
        records
    )
    assert "| 0,1 |" in record_tables.rows_table(records)


@pytest.mark.parametrize(
    ("seeds", "problem"),
    [([0, 1], "must be among every row's seeds"), ([9], "confirms nothing")],
)
def test_a_selection_seed_must_leave_seeds_to_confirm_on(tmp_path, seeds, problem):
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "experiments:\n  t:\n    preset: quickstart\n    folder: x\n"
        f"    runs: [{{rows: [fedqssl], seeds: {seeds}}}]\n"
        "    selection-seed: 9\n    decisive: [fedqssl]\n    pairs: []\n"
    )
    with pytest.raises(ManifestError, match=problem):
        load_manifest(path)


def test_run_goes_seed_by_seed_and_refuses_to_mix_commits(records_dir):
    script = load_script()
    spec = experiment(records_dir)
    assert script.seed_order(spec) == [
        (0, ("fedqssl", "fedsimclr", "local-only")),
        (1, ("fedqssl", "fedsimclr", "local-only")),
        (2, ("fedqssl", "fedsimclr")),
    ]
    staging = records_dir.parent
    spec = dataclasses.replace(spec, name=records_dir.name)
    (records_dir / "fedqssl" / "seed-0" / "config.json").write_text("{}")
    with pytest.raises(script.ResultsError, match="continue with --resume"):
        script.prepare_staging(spec, COMMIT, False, staging, ROOT)
    assert script.prepare_staging(spec, COMMIT, True, staging, ROOT) == records_dir
    with pytest.raises(script.ResultsError, match="resume from a worktree of that commit"):
        script.prepare_staging(spec, "c" * 40, True, staging, ROOT)


def test_a_new_staging_folder_resumes_from_the_checkout_named(records_dir, tmp_path):
    """A worktree of the records' commit lacks the seeds published after it: ``--published``
    names the checkout that holds them, and only records of the worktree's commit are taken."""
    script = load_script()
    for name in ("config.json", "run_config.toml"):
        (records_dir / "fedqssl" / "seed-0" / name).write_text("{}")
    checkout = records_dir.parent
    spec = dataclasses.replace(experiment(Path(records_dir.name)), name="tiny")
    staging = tmp_path / "staging"
    folder = script.prepare_staging(spec, COMMIT, True, staging, checkout)
    assert folder == staging / "tiny"
    assert (
        read_records(spec, folder).summaries.keys()
        == read_records(spec, records_dir).summaries.keys()
    )
    assert (folder / "fedqssl" / "seed-0" / "run_config.toml").is_file()
    other = script.prepare_staging(spec, "c" * 40, True, tmp_path / "fresh", checkout)
    assert not read_records(spec, other).summaries  # another commit's records are not taken


def test_publish_replaces_the_folder_only_with_checked_records(records_dir, tmp_path, monkeypatch):
    script = load_script()
    target = tmp_path / "published"
    target.mkdir()
    (target / "old.txt").write_text("an older record")
    spec = experiment(target)
    monkeypatch.setattr(script, "ROOT", Path("/"))
    staging = records_dir.parent
    spec = dataclasses.replace(spec, name=records_dir.name)
    write(records_dir, "fedsimclr", 2, summary(0.69, provenance={"commit": COMMIT, "dirty": True}))
    with pytest.raises(script.ResultsError, match="not published"):
        script.publish(spec, staging)
    assert (target / "old.txt").exists()  # nothing changed
    write(records_dir, "fedsimclr", 2, summary(0.69))
    assert script.publish(spec, staging) == 0
    assert not (target / "old.txt").exists()
    assert len(read_records(spec, target).summaries) == 8


def test_the_repositorys_pages_say_what_their_records_give():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts/results.py"), "check"],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard: it reads records and trains nothing
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_answer_says_only_what_each_interval_allows(tmp_path):
    rows = ("fedqssl", "fedsimclr", "fedsimclr-ft", "buffer-only")
    spec = Experiment(
        record_tables.ANSWER_EXPERIMENT,
        "fmnist-lowbit-budget",
        tmp_path,
        ((rows, (0, 1, 2)),),
        ("fedqssl",),
        (),
    )
    scores = {  # global probe by seed: above Fed-SimCLR, level with -ft, below the buffer
        "fedqssl": (0.70, 0.71, 0.72),
        "fedsimclr": (0.67, 0.68, 0.69),
        "fedsimclr-ft": (0.71, 0.70, 0.72),
        "buffer-only": (0.74, 0.75, 0.76),
    }
    for row, values in scores.items():
        for seed, value in enumerate(values):
            write(tmp_path, row, seed, summary(value))
    text = record_tables.answer({spec.name: read_records(spec, tmp_path)})
    assert "Fed-QSSL beats Fed-SimCLR" in text
    assert "+3.00 points (95 % interval [+3.00, +3.00], n = 3)" in text
    assert "no difference is measured between Fed-QSSL and fine-tuning the plain average" in text
    assert "the buffer alone, with no client, scores above Fed-QSSL" in text
    assert "10 client and 5 server optimizer steps a round" in text
    assert len(text.splitlines()) <= 15


def test_verify_sets_each_decisive_number_beside_the_recorded_interval(records_dir, tmp_path):
    script = load_script()
    spec = experiment(records_dir)
    recorded = read_records(spec, records_dir)
    mine_dir = tmp_path / "mine"
    write(mine_dir, "fedqssl", 0, summary(0.70))  # the probe as recorded; the kNN, far off:
    mine = read_records(experiment(mine_dir), mine_dir)
    mine.summaries["fedqssl", 0]["knn-accuracy"] = 0.95
    lines, outside = script.compared(spec, mine, recorded)
    assert outside == 1
    probe = next(line for line in lines if "fedqssl global-probe" in line)
    assert "70.00 (recorded seed 0: 70.00; 3 seeds' 95 % prediction interval" in probe
    assert probe.endswith("within)")
    assert next(line for line in lines if "fedqssl knn" in line).endswith("OUTSIDE)")
    assert "differs from the records' commit" in lines[0]  # the records' commit is made up


def test_one_changed_digit_in_a_shipped_page_fails_the_check(tmp_path):
    from common.runs.records import MANIFEST

    manifest = load_manifest(ROOT / MANIFEST)
    records = {name: read_records(e, ROOT / e.folder) for name, e in manifest.items()}
    make = record_tables.renderers(records)
    for page in (ROOT / "README.md", ROOT / "docs/RESULTS.md"):
        text = page.read_text()
        for key, body in record_tables.blocks(text):
            at = next((i for i, c in enumerate(body) if c.isdigit()), None)
            if at is None:
                continue
            digit = "1" if body[at] != "1" else "2"
            changed = text.replace(body, body[:at] + digit + body[at + 1 :], 1)
            copy = tmp_path / page.name
            copy.write_text(changed)
            assert f"{page.name}: {key}" in record_tables.stale_blocks(copy, make)
