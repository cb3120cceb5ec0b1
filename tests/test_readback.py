"""Records read back are checked, not trusted: mutated copies of real records are read or
refused with a ``RecordError`` naming the file, never another exception."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, ExperimentConfig
from common.readback import RecordError, read_json_object
from common.runs.checkpoint import resume_point
from common.runs.plan_report import read_summary

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "docs" / "results" / "quickstart" / "fedqssl" / "seed-0"


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(["summary.json", "config.json"]))
def test_a_mutated_record_is_read_or_refused_naming_it(tmp_path_factory, data, name):
    folder = tmp_path_factory.mktemp("record")
    blob = bytearray((REAL / name).read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "empty-object", "list", "binary"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "cut":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "empty-object":
        blob = bytearray(b"{}")
    elif kind == "list":
        blob = bytearray(b"[1, 2]")
    else:
        blob = bytearray(data.draw(st.binary(min_size=1, max_size=64)))
    path = folder / name
    path.write_bytes(bytes(blob))
    readers = [lambda: read_json_object(path)]
    if name == "summary.json":
        readers.append(lambda: read_summary(folder))
    for read in readers:
        try:
            assert isinstance(read(), dict)
        except RecordError as error:
            assert str(path) in str(error)


def test_a_record_that_is_a_folder_or_missing_is_named(tmp_path):
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(RecordError, match=r"summary.json: a run summary must be a file"):
        read_summary(tmp_path)
    with pytest.raises(RecordError, match=r"config.json: no such record"):
        read_json_object(tmp_path / "config.json")
    assert read_summary(tmp_path / "elsewhere") is None  # no summary: nothing to read


def test_a_summary_without_scores_is_not_a_finished_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RecordError, match=r"without its scores"):
        read_summary(tmp_path)


def test_resume_reads_a_damaged_config_beside_a_summary_as_the_error_it_is(tmp_path):
    (tmp_path / "summary.json").write_text((REAL / "summary.json").read_text())
    (tmp_path / "config.json").write_text("{truncated")
    from common.runs.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"no readable config.json"):
        resume_point(tmp_path, {})


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_config_record_with_mutated_values_is_a_config_or_a_config_error(data):
    """A real run's ``config.json`` with one value replaced by any JSON value or a key renamed:
    ``ExperimentConfig.from_mapping`` (what ``use_model`` and a resume read it with) gives a
    config or a ``ConfigError`` naming the key, never another exception."""
    values = read_json_object(REAL / "config.json")
    key = data.draw(st.sampled_from(sorted(values)))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    if data.draw(st.booleans()):
        values[key] = data.draw(st.one_of(scalars, st.lists(scalars, max_size=3)))
    else:
        values[key + data.draw(st.sampled_from(["x", "-", "_"]))] = values.pop(key)
    try:
        assert isinstance(ExperimentConfig.from_mapping(values), ExperimentConfig)
    except ConfigError as error:
        assert key.replace("_", "-") in str(error) or key in str(error)
