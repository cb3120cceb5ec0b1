"""Checkpoints and resumption, in process: a run interrupted after round R and resumed equals the
uninterrupted run; a changed config, a damaged checkpoint and a finished run are handled."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from flower_fakes import FakeManager, FakeProxy, drive
from flwr.common import Context, RecordDict

from common.config import ExperimentConfig
from common.runs.experiment import server_data
from fedqssl_client.client import LowBitClient
from fedqssl_server import checkpoint
from fedqssl_server.app import server_fn
from fedqssl_server.checkpoint import CheckpointError, resume_point
from fedqssl_server.restore import checked_checkpoint
from fedqssl_server.results import RunRecorder, knn_curve
from fedqssl_server.strategy import strategy_for


def tiny(tmp_path, name, **extra):
    return ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "model-width": 4,
            "num-clients": 3,
            "bitwidths": "2,4,8",
            "num-rounds": 4,
            "dirichlet-beta": 1.0,
            "buffer-ratio": 0.05,
            "batch-size": 16,
            "max-samples-per-client": 32,
            "probe-samples": 100,
            "output-dir": str(tmp_path / name),
            **extra,
        }
    )


def federation(config, ids):
    """Nodes with the given ids (node k holds partition k) and their in-process clients."""
    clients = {
        cid: LowBitClient(config, k, config.bitwidths[k], RecordDict()) for k, cid in enumerate(ids)
    }
    proxies = [FakeProxy(cid, clients[cid].get_properties({})) for cid in ids]
    return clients, proxies


def start(config):
    return strategy_for(config, server_data(config), RunRecorder(config, Path(config.output_dir)))


def without_timings(value):
    """A record with every wall-clock figure dropped (they differ run to run; nothing else may)."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if not k.endswith("seconds") and k != "server-seconds"
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def differences(a, b, path: str = "") -> list[str]:
    """Where two records differ, as ``path: a != b`` lines (so a failure says what differed)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in differences(a.get(k), b.get(k), f"{path}.{k}")
        ]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def outputs(config):
    folder = Path(config.output_dir)
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return without_timings(rounds), without_timings(summary)


@pytest.mark.parametrize("algorithm", ["fedqssl", "fedavg"])
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
    assert saved.round == 2 and sorted(saved.downlink) == [2, 4, 8]
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


def test_a_finished_run_of_another_config_is_refused_and_a_damaged_summary_is_not_finished(
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
    (folder / "summary.json").write_text('{"global-accura')  # truncated as a crash leaves it
    point = resume_point(folder, config.to_dict())
    assert not point.finished and point.checkpoint is None
    assert "summary.json is unreadable" in point.note


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


@pytest.fixture
def interrupted(tmp_path):
    """A 4-round run stopped after round 2: its config and checkpoint."""
    config = tiny(tmp_path, "run", **{"algorithm": "fedsimclr"})
    clients, proxies = federation(config, ["a", "b", "c"])
    drive(start(config), clients, FakeManager(proxies), 2, evaluate_at_end=False)
    return config, checkpoint.checkpoint_path(config.output_dir)


def rewritten(path, **changes):
    saved = checkpoint.load(path)
    for key, value in changes.items():
        setattr(saved, key, value(saved) if callable(value) else value)
    checkpoint.save(saved, path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"round": 7}, r"round 7 is outside this run's rounds 0..3"),
        (
            {"global_state": lambda s: {**s.global_state, "extra.weight": np.zeros(2, np.float32)}},
            r"tensors differ from this run's \(missing \[\], extra \['extra.weight'\]\)",
        ),
        (
            {
                "global_state": lambda s: {
                    k: v[..., :1] if v.ndim == 4 else v for k, v in s.global_state.items()
                }
            },
            r"has shape \(4, 1, 3, 1\), the model \(4, 1, 3, 3\)",
        ),
        (
            {
                "global_state": lambda s: {
                    k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                    for k, v in s.global_state.items()
                }
            },
            r"holds non-finite values",
        ),
        ({"downlink": lambda s: {4: s.downlink[2], 8: s.downlink[8]}}, r"4-bit downlink does not"),
        ({"downlink": lambda s: {**s.downlink, 12: s.downlink[8]}}, r"holds a 12-bit downlink"),
        ({"records": lambda s: s.records[:1]}, r"records are of rounds \[1\], not 1..2"),
        ({"records": [{"round": 1}, "x"]}, r"records are of rounds \[1, None\]"),
        ({"partition_bits": {0: 32}}, r"partition 0 at 32 bits is not a partition of this run"),
    ],
)
def test_a_checkpoint_unfit_for_the_run_is_refused_before_any_record_is_touched(
    interrupted, changes, message
):
    config, path = interrupted
    rewritten(path, **changes)
    folder = Path(config.output_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    resumed = dataclasses.replace(config, resume=True)
    with pytest.raises(CheckpointError, match=message):
        checked_checkpoint(path, resumed)
    context = Context(0, 0, {}, RecordDict(), resumed.to_run_config())
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} cannot continue this run"):
        server_fn(context)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing changed


def test_a_checkpoint_of_another_model_is_refused_and_a_good_one_accepted(interrupted):
    config, path = interrupted
    assert checked_checkpoint(path, config).round == 2
    wider = dataclasses.replace(config, model_width=8)
    with pytest.raises(CheckpointError, match="has shape"):
        checked_checkpoint(path, wider)


@pytest.mark.parametrize("meta", [b"[1, 2]", b'{"round": 1, "records": []}', b'{"round": "1"}'])
def test_metadata_of_the_wrong_shape_is_a_damaged_checkpoint_not_a_traceback(tmp_path, meta):
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    np.savez(path, meta=np.frombuffer(meta, dtype=np.uint8))
    for read in (checkpoint.load, checkpoint.read_meta):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            read(path)
