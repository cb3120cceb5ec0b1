"""Checkpoints and resumption, in process: a run interrupted after round R and resumed equals the
uninterrupted run; a changed config, a damaged checkpoint and a finished run are handled."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from core_helpers import differences, without_timings
from flower_fakes import FakeManager, drive
from helpers import federation, start, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, ExperimentConfig
from common.runs import checkpoint
from common.runs.checkpoint import CheckpointError, resume_point
from fedqssl_server.results import knn_curve


def outputs(config):
    folder = Path(config.output_dir)
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return without_timings(rounds), without_timings(summary)


@pytest.mark.parametrize("algorithm", ["fedqssl", "fedavg", "local-only"])
def test_a_run_resumed_after_round_two_equals_the_uninterrupted_run(tmp_path, algorithm):
    straight = tiny(tmp_path, "straight", algorithm=algorithm)
    clients, proxies = federation(straight, ["a", "b", "c"])
    drive(start(straight), clients, FakeManager(proxies), 4)

    interrupted = tiny(tmp_path, "interrupted", algorithm=algorithm)
    clients, proxies = federation(interrupted, ["a", "b", "c"])
    first = start(interrupted)
    drive(first, clients, FakeManager(proxies), 2, evaluate_at_end=False)  # killed in round 3
    path = checkpoint.checkpoint_path(interrupted.output_dir)
    saved = checkpoint.load(path)
    assert saved.round == 2
    # the downlink of every bitwidth; local-only: every partition's own model instead
    own = algorithm == "local-only"
    assert (
        (sorted(saved.downlink), sorted(saved.personal)) == ([], [0, 1, 2])
        if own
        else (
            [2, 4, 8],
            [],
        )
    )
    with open(Path(interrupted.output_dir) / "rounds.jsonl", "a") as rounds:
        rounds.write('{"round": 3, "half": "written when the process died"}\n')

    # the resumed process: a new strategy, and nodes Flower numbered anew
    resumed_config = ExperimentConfig.from_mapping({**interrupted.to_run_config(), "resume": True})
    point = resume_point(resumed_config.output_dir, resumed_config.to_dict())
    assert not point.finished and point.round == 2
    resumed = start(resumed_config)
    resumed.restore(checkpoint.load(point.checkpoint))
    assert resumed.remaining_rounds() == 2
    clients, proxies = federation(resumed_config, ["x", "y", "z"])
    drive(resumed, clients, FakeManager(proxies), 2)
    # every node was asked who it is once, and got its own bitwidth's model
    assert [p.asked for p in proxies] == [1, 1, 1]
    # bit for bit, timings aside
    assert not differences(outputs(resumed_config), outputs(straight))
    assert not path.exists()  # a finished run keeps no checkpoint
    again = resume_point(resumed_config.output_dir, resumed_config.to_dict())
    assert again.finished and "nothing to do" in again.note


def test_no_checkpoint_after_the_last_round_and_none_without_a_recorder(tmp_path):
    config = tiny(tmp_path, "run", **{"num-rounds": 2})
    clients, proxies = federation(config, ["a", "b", "c"])
    strategy = start(config)
    drive(strategy, clients, FakeManager(proxies), 2, evaluate_at_end=False)
    # round 1 wrote one; round 2 is the last, whose completion is the summary, not a checkpoint
    assert checkpoint.load(checkpoint.checkpoint_path(config.output_dir)).round == 1


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
    config = tiny(tmp_path, "run")
    clients, proxies = federation(config, ["a", "b", "c"])
    drive(start(config), clients, FakeManager(proxies), 1, evaluate_at_end=False)
    changed = ExperimentConfig.from_mapping(
        {**config.to_run_config(), "learning-rate": 0.01, "num-rounds": 5, "resume": True}
    )
    with pytest.raises(CheckpointError, match=r"learning-rate: 0.003 -> 0.01; num-rounds: 4 -> 5"):
        resume_point(changed.output_dir, changed.to_dict())
    # where it writes and the resume switch itself may change
    moved = {**config.to_dict(), "output-dir": "/elsewhere", "resume": True}
    assert resume_point(config.output_dir, moved).round == 1


def test_a_key_newer_than_the_saved_run_counts_as_its_default():
    saved = ExperimentConfig().to_dict()
    del saved["fp-activation"]  # a run from before the key existed
    assert checkpoint.config_differences(saved, ExperimentConfig().to_dict()) == []
    clamp = ExperimentConfig.from_mapping({"fp-activation": "clamp"}).to_dict()
    assert checkpoint.config_differences(saved, clamp) == ["fp-activation: 'relu' -> 'clamp'"]


def test_a_finished_run_of_another_config_is_refused_and_a_damaged_summary_is_refused(
    tmp_path,
):
    config = tiny(tmp_path, "run", **{"num-rounds": 2})
    clients, proxies = federation(config, ["a", "b", "c"])
    drive(start(config), clients, FakeManager(proxies), 2)
    folder = Path(config.output_dir)
    assert resume_point(folder, config.to_dict()).finished
    # accuracy.png starts at round 0, the initial model, whose kNN is the untrained floor
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    curve = knn_curve(rounds, summary["untrained-knn-accuracy"])
    assert [x for x, _ in curve] == [0, 1, 2]
    assert curve[0][1] == 100 * summary["untrained-knn-accuracy"]
    with pytest.raises(CheckpointError, match=r"num-rounds: 2 -> 5"):
        resume_point(folder, {**config.to_dict(), "num-rounds": 5})
    records = {name: (folder / name).read_bytes() for name in ("rounds.jsonl", "config.json")}
    path = folder / "summary.json"
    for damage in ('{"global-accura', "{}", "directory"):  # truncated, empty, not a file
        path.rmdir() if path.is_dir() else path.unlink()
        if damage == "directory":
            path.mkdir()
        else:
            path.write_text(damage)
        # no checkpoint: the run was finished; resuming must not train it again
        with pytest.raises(CheckpointError, match=r"summary.json is not a readable summary"):
            resume_point(folder, config.to_dict())
    assert {name: (folder / name).read_bytes() for name in records} == records


def test_a_damaged_summary_beside_a_checkpoint_resumes_from_the_checkpoint(tmp_path):
    config = tiny(tmp_path, "run", **{"num-rounds": 3})
    clients, proxies = federation(config, ["a", "b", "c"])
    drive(start(config), clients, FakeManager(proxies), 2, evaluate_at_end=False)
    (Path(config.output_dir) / "summary.json").write_text("{")  # killed while writing it
    point = resume_point(config.output_dir, config.to_dict())
    assert point.round == 2 and point.checkpoint is not None
    assert "summary.json is unreadable; resuming after round 2" in point.note


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_mutated_checkpoint_is_read_or_refused_naming_it_never_a_traceback(
    tmp_path_factory, data
):
    """Random bytes flipped, cut or members replaced by raw bytes or JSON: ``load`` returns a
    checkpoint or raises ``CheckpointError`` naming the file, nothing else."""
    folder = tmp_path_factory.mktemp("mutated")
    path = folder / "checkpoint.npz"
    arrays = {"state/w": np.arange(6, dtype=np.float32)}
    meta = {"round": 1, "config": {}, "records": [{"round": 1}], "state-names": ["w"],
            "downlink-lengths": {}, "partition-bits": {}, "wall-seconds": 1.0}  # fmt: skip
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    blob = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "raw-member", "json-member"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(blob))
    elif kind == "cut":
        path.write_bytes(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))]))
    else:
        member = data.draw(st.sampled_from(["meta", "state/w"]))
        payload = b"raw bytes" if kind == "raw-member" else json.dumps(meta).encode()
        with zipfile.ZipFile(path, "w") as archive:  # the member without its .npy header
            for name, array in arrays.items():
                if name == member:
                    archive.writestr(name, payload)
                else:
                    archive.writestr(f"{name}.npy", _npy_bytes(array))
    try:
        checkpoint.load(path)
    except CheckpointError as error:
        assert str(path) in str(error)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage",
    [b"", b"not a zip", b"PK\x03\x04 truncated"],
)
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    path.write_bytes(damage)
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint.*delete it"):
        checkpoint.load(path)


def test_a_checkpoint_holds_no_pickle_and_is_replaced_atomically(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    state = {"w": np.arange(6, dtype=np.float32)}
    saved = checkpoint.Checkpoint(
        round=3,
        config={"seed": 1},
        global_state=state,
        downlink={4: [np.arange(3, dtype=np.uint8), np.zeros(2, dtype=np.float32)]},
        partition_bits={0: 4},
        records=[{"round": 1}],
        wall_seconds=2.5,
    )
    checkpoint.save(saved, path)
    checkpoint.save(saved, path)  # over an existing one
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_FILE]  # no temp left
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
    loaded = checkpoint.load(path)
    assert (loaded.round, loaded.partition_bits, loaded.records) == (3, {0: 4}, [{"round": 1}])
    assert np.array_equal(loaded.downlink[4][0], np.arange(3, dtype=np.uint8))
    assert np.array_equal(loaded.global_state["w"], state["w"])


@pytest.mark.parametrize("meta", [b"[1, 2]", b'{"round": 1, "records": []}', b'{"round": "1"}'])
def test_metadata_of_the_wrong_shape_is_a_damaged_checkpoint_not_a_traceback(tmp_path, meta):
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    np.savez(path, meta=np.frombuffer(meta, dtype=np.uint8))
    for read in (checkpoint.load, checkpoint.read_meta):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            read(path)


def test_a_new_start_on_a_finished_runs_folder_is_refused_and_changes_nothing(tmp_path):
    """Bare ``flwr run`` with another seed into a finished run's folder once deleted its records
    before round 1; now the ServerApp refuses, naming the two ways on."""
    from flwr.common import Context, RecordDict

    from fedqssl_server.app import server_fn

    config = tiny(tmp_path, "run")
    folder = Path(config.output_dir)
    folder.mkdir(parents=True)
    files = {
        "summary.json": '{"global-accuracy": 0.7}\n',
        "rounds.jsonl": '{"round": 1}\n',
        "config.json": json.dumps(config.to_dict()),
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    other_seed = {**config.to_run_config(), "seed": 5}
    context = Context(0, 0, {}, RecordDict(), other_seed)
    with pytest.raises(ConfigError, match=r"holds a finished run.*resume=true.*another output-dir"):
        server_fn(context)
    assert {name: (folder / name).read_text() for name in files} == files
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
