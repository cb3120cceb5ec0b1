"""The training budget as a recorded setting: server epochs that may follow the clients' E, the
optimizer steps every round records (clients' and server's by phase), a buffer that gives no
step refused at start, and the buffer-only control trained for exactly Fed-QSSL's server steps."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import federate, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, ExperimentConfig
from common.learning import training
from common.learning.models import build_ssl_model
from common.learning.training import LowBitSettings, Recipe, fit_batches, steps_per_epoch
from common.runs.experiment import server_data
from common.wire.payload import decode_state, encode_state
from fedqssl_server.rounds import BufferOnlyRound, fedqssl_server_steps, server_round_for


def test_server_epochs_may_be_the_clients_local_epochs():
    config = ExperimentConfig.from_mapping(
        {"local-epochs": 5, "dq-epochs": "local", "rq-epochs": " LOCAL "}
    )
    assert (config.dq_epochs, config.rq_epochs) == ("local", "local")
    assert (config.dequantize_epochs, config.requantize_epochs) == (5, 5)
    assert ExperimentConfig.from_mapping(config.to_run_config()) == config  # Flower's scalars
    numbers = ExperimentConfig.from_mapping({"dq-epochs": "3", "rq-epochs": 0})
    assert (numbers.dequantize_epochs, numbers.requantize_epochs) == (3, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dq-epochs": "lokal"}, r"dq-epochs must be an integer or 'local'"),
        ({"rq-epochs": 1.5}, r"rq-epochs must be an integer or 'local'"),
        ({"dq-epochs": True}, r"dq-epochs must be an integer or 'local'"),
        ({"dq-epochs": 0}, r"dq-epochs: must be an integer >= 1 or 'local'"),
        ({"rq-epochs": -1}, r"rq-epochs: must be an integer >= 0 or 'local'"),
    ],
)
def test_bad_server_epochs_are_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_mapping(values)


@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 300), batch_size=st.integers(2, 130))
def test_steps_per_epoch_counts_the_batches_training_steps_on(images, batch_size):
    data = torch.zeros(images, 1, 2, 2, dtype=torch.uint8)
    batches = list(training._loader(data, torch.nn.Identity(), batch_size, 0, None))
    assert steps_per_epoch(0, batch_size) == 0
    assert steps_per_epoch(images, batch_size) == sum(len(first) >= 2 for first, _ in batches)


def test_a_training_call_reports_the_optimizer_steps_it_took(monkeypatch):
    model = build_ssl_model("small_cnn", 4, in_channels=1, width=4, projection_dim=8)
    calls = []
    step = training.train_step
    monkeypatch.setattr(
        training, "train_step", lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
    )
    views = torch.randn(6, 1, 28, 28)
    epochs = [[(views, views)] * 3, [(views, views), (views[:1], views[:1])]]  # one batch of 1
    trained = fit_batches(model, epochs, Recipe(LowBitSettings(4), 1e-3), seed=0)
    assert trained.steps == len(calls) == 4 and len(trained.losses) == 2


def budget_config(tmp_path, algorithm, **extra):
    return tiny_config(
        tmp_path,
        algorithm,
        **{"local-epochs": 2, "dq-epochs": 1, "rq-epochs": "local", **extra},
    )


def test_every_round_records_the_clients_and_the_servers_optimizer_steps(tmp_path):
    config = budget_config(tmp_path, "fedqssl", bitwidths="4,8")
    strategy, _ = federate(config)
    per_epoch = steps_per_epoch(len(strategy.data.buffer), config.batch_size)
    assert per_epoch >= 2  # the test tells epochs from steps
    for record in strategy.recorder.rounds:
        for client in record["clients"]:
            expected = config.local_epochs * steps_per_epoch(client["examples"], config.batch_size)
            assert client["train-steps"] == expected > 0
            assert client["dequantize-steps"] == config.dequantize_epochs * per_epoch
        assert record["train-steps"] == sum(c["train-steps"] for c in record["clients"])
        assert record["dequantize-steps"] == 2 * config.dequantize_epochs * per_epoch
        # rq-epochs: local, i.e. the clients' 2 epochs, for each of the two bitwidths
        assert record["requantize-steps"] == 2 * 2 * per_epoch
        assert record["finetune-steps"] == record["buffer-steps"] == 0
        assert record["server-steps"] == record["dequantize-steps"] + record["requantize-steps"]
        assert record["server-steps"] == fedqssl_server_steps(config, per_epoch, 2, 2)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    for key in ("train-steps", "server-steps", "requantize-steps"):
        assert summary[key] == sum(r[key] for r in strategy.recorder.rounds)
    weights = [c["weight"] for r in strategy.recorder.rounds for c in r["clients"]]
    assert summary["weight-range"] == [min(weights), max(weights)]


def test_the_fine_tune_control_records_its_own_steps(tmp_path):
    config = budget_config(tmp_path, "fedsimclr-ft")
    strategy, _ = federate(config)
    per_epoch = steps_per_epoch(len(strategy.data.buffer), config.batch_size)
    record = strategy.recorder.rounds[-1]
    assert record["finetune-steps"] == config.dequantize_epochs * per_epoch
    assert record["dequantize-steps"] == 0 and record["requantize-steps"] == 2 * 2 * per_epoch
    assert all(c["dequantize-steps"] == 0 for c in record["clients"])


def test_plain_averaging_records_no_server_steps(tmp_path):
    strategy, _ = federate(budget_config(tmp_path, "fedsimclr"))
    record = strategy.recorder.rounds[-1]
    assert record["server-steps"] == 0 and record["train-steps"] > 0


def test_buffer_only_trains_the_server_for_fedqssls_steps_and_no_client(tmp_path):
    fedqssl, _ = federate(budget_config(tmp_path, "fedqssl"))
    config = budget_config(tmp_path, "buffer-only")
    strategy, _ = federate(config)
    assert type(strategy.steps) is BufferOnlyRound
    for own, reference in zip(strategy.recorder.rounds, fedqssl.recorder.rounds, strict=True):
        assert own["train-steps"] == 0
        assert all(c["train-steps"] == 0 and c["loss"] is None for c in own["clients"])
        assert own["buffer-steps"] == own["server-steps"] == reference["server-steps"] > 0
    initial = strategy.steps.initial_state()
    name = next(k for k, v in initial.items() if v.is_floating_point() and v.ndim >= 2)
    assert not torch.equal(strategy.global_state[name], initial[name])  # D_g trained it
    # each bitwidth receives the global model itself, rounded onto its grid by the codec
    for bits, payload in strategy.downlink.items():
        expected = decode_state(encode_state(strategy.global_state, bits))
        assert all(torch.equal(decode_state(payload)[k], v) for k, v in expected.items())
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["label"] == "D_g only (no clients)" and summary["mean-local-accuracy"] >= 0


def test_buffer_only_follows_the_bitwidths_the_round_re_quantizes_for(tmp_path):
    """Before every partition has taken part, Fed-QSSL re-quantizes only for the bitwidths seen;
    the control's budget follows them, not the config's list."""
    config = budget_config(tmp_path, "buffer-only")
    server, reference = (
        server_round_for(c, server_data(c)) for c in (config, budget_config(tmp_path, "fedqssl"))
    )
    states = {0: server.initial_state(), 1: server.initial_state()}
    own = server.run(1, server.initial_state(), states, {0: 10, 1: 10}, {4})
    fedqssl = reference.run(1, reference.initial_state(), states, {0: 10, 1: 10}, {4})
    assert own.steps["buffer"] == sum(fedqssl.steps.values())
    assert own.steps["buffer"] == fedqssl_server_steps(config, server.steps_per_epoch, 2, 1)


@pytest.mark.parametrize("algorithm", ["fedqssl", "fedsimclr-ft", "buffer-only"])
def test_a_buffer_that_gives_no_step_is_refused_at_start(tmp_path, algorithm):
    config = tiny_config(tmp_path, algorithm)
    data = server_data(config)
    tiny = dataclasses.replace(data, buffer=data.buffer[:1])
    with pytest.raises(ConfigError, match=r"1 image\(s\) give no optimizer step.*buffer-ratio"):
        server_round_for(config, tiny)
    server_round_for(tiny_config(tmp_path, "fedsimclr"), tiny)  # no fine-tune: no need
