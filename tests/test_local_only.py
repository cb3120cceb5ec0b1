"""The ``local-only`` control (personalized FL's "Local" row): each client trains and keeps its own
model, and no client's model depends on what another client holds."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import federate, tiny_config

from common.runs import checkpoint
from common.runs.experiment import experiment_data
from common.runs.restore import checked_checkpoint
from common.wire.payload import decode_state


def own_models(strategy) -> dict[int, dict[str, torch.Tensor]]:
    return {k: decode_state(payload) for k, payload in strategy.personal.items()}


def test_a_clients_model_does_not_depend_on_the_other_clients_data(tmp_path):
    """Client 1 given other images changes client 1's model and, under averaging, client 0's;
    under local-only client 0's model is the same to the bit."""
    results = {}
    for algorithm in ("local-only", "fedsimclr"):
        for variant in ("own", "other"):
            config = tiny_config(tmp_path / variant, algorithm, **{"num-rounds": 3})
            data = experiment_data(config)
            shares = [data.for_client(k, config.max_samples_per_client) for k in (0, 1)]
            if variant == "other":  # client 1 trains on its images turned upside down
                flipped = dataclasses.replace(
                    shares[1].train, images=shares[1].train.images.flip(-2)
                )
                shares[1] = dataclasses.replace(shares[1], train=flipped)
            strategy, clients = federate(config, client_data=shares)
            results[algorithm, variant] = (strategy, clients)

    def client_model(algorithm, variant, partition):
        strategy, clients = results[algorithm, variant]
        if algorithm == "local-only":
            return own_models(strategy)[partition]
        return clients[str(partition)].model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(client_model("local-only", "own", 0), client_model("local-only", "other", 0))
    assert not same(client_model("local-only", "own", 1), client_model("local-only", "other", 1))
    assert not same(client_model("fedsimclr", "own", 0), client_model("fedsimclr", "other", 0))


def test_local_only_sends_each_client_its_own_model_and_takes_no_server_step(tmp_path):
    config = tiny_config(tmp_path, "local-only", **{"num-rounds": 2})
    strategy, clients = federate(config)
    assert strategy.downlink == {}  # no shared model is ever sent
    for partition, client in clients.items():
        # the last model a client received (and scored) is its own, as it sent it
        received = client.model.state_dict()
        assert all(
            torch.equal(received[k], v) for k, v in own_models(strategy)[int(partition)].items()
        )
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["label"] == "Local only (no federation)"
    assert summary["server-steps"] == 0 and summary["train-steps"] > 0


def test_a_checkpoint_keeps_every_partitions_own_model_and_refuses_a_foreign_one(tmp_path):
    config = tiny_config(tmp_path, "local-only", **{"num-rounds": 3})
    strategy, _ = federate(config)
    saved = checkpoint.Checkpoint(
        round=1,
        config=config.to_dict(),
        global_state={k: v.numpy() for k, v in strategy.global_state.items()},
        downlink={},
        partition_bits={0: 4, 1: 8},
        records=strategy.recorder.rounds[:1],
        wall_seconds=1.0,
        personal=strategy.personal,
    )
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(saved, path)
    loaded = checkpoint.load(path)
    assert sorted(loaded.personal) == [0, 1]
    for partition, payload in strategy.personal.items():
        assert all((a == b).all() for a, b in zip(loaded.personal[partition], payload, strict=True))
    checked_checkpoint(path, config)
    foreign = dataclasses.replace(saved, personal={5: strategy.personal[0]})
    checkpoint.save(foreign, path)
    with pytest.raises(checkpoint.CheckpointError, match="own model of partition 5"):
        checked_checkpoint(path, config)
