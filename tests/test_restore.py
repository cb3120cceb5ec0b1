"""A checkpoint checked whole against the run before anything is touched
(common.runs.restore), through the ServerApp as a resumed run meets it."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from flower_fakes import FakeManager, drive
from flwr.common import Context, RecordDict
from helpers import federation, start, tiny

from common.runs import checkpoint
from common.runs.checkpoint import CheckpointError
from common.runs.restore import checked_checkpoint
from fedqssl_server.app import server_fn


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
