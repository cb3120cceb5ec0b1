"""The ServerApp (fedqssl_server.app): what Flower's run config starts, continues or refuses."""

import dataclasses
from pathlib import Path

import pytest
from flower_fakes import FakeManager, drive
from flwr.common import Context, RecordDict
from helpers import federation, start, tiny

from common.config import ConfigError
from fedqssl_server import FedQSSL
from fedqssl_server.app import server_fn


def context_of(config) -> Context:
    return Context(0, 0, {}, RecordDict(), config.to_run_config())


def test_a_new_run_gets_the_configured_rounds_and_records_into_its_folder(tmp_path):
    config = tiny(tmp_path, "run", **{"num-rounds": 3})
    components = server_fn(context_of(config))
    assert components.config.num_rounds == 3 and components.config.round_timeout is None
    strategy = components.strategy
    assert isinstance(strategy, FedQSSL) and strategy.recorder.output_dir == Path(config.output_dir)


def test_resume_needs_the_folder_of_the_run_to_continue(tmp_path):
    config = dataclasses.replace(tiny(tmp_path, "run"), resume=True, output_dir="")
    with pytest.raises(ConfigError, match="resume needs output-dir"):
        server_fn(context_of(config))


def test_an_interrupted_run_continues_after_its_checkpoint_and_a_finished_one_is_kept(tmp_path):
    config = tiny(tmp_path, "run", **{"algorithm": "fedsimclr"})
    clients, proxies = federation(config, ["a", "b", "c"])
    drive(start(config), clients, FakeManager(proxies), 2, evaluate_at_end=False)
    resumed = server_fn(context_of(dataclasses.replace(config, resume=True)))
    assert resumed.config.num_rounds == config.num_rounds - 2
    assert resumed.strategy.run_round(1) == 3 and len(resumed.strategy.recorder.rounds) == 2
    drive(start(config), clients, FakeManager(proxies), config.num_rounds)  # to the end
    folder = Path(config.output_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    finished = server_fn(context_of(dataclasses.replace(config, resume=True)))
    assert finished.config.num_rounds == 0 and finished.strategy.recorder is None
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
