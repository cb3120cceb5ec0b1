"""Every algorithm's client and strategy together, in process (no Ray): the wire, the server
step and the evaluation each algorithm is defined by."""

import json
from pathlib import Path

import pytest
import torch
from core_helpers import losses_of, weights_of
from helpers import federate, tiny_config

from common.algorithms import ALGORITHM_NAMES, get_algorithm
from common.config import ExperimentConfig
from common.learning.models import extract_features
from common.lowbit.layers import QuantAct
from common.runs.experiment import new_model, server_data
from common.vocabulary import FULL_PRECISION
from common.wire.payload import decode_state, payload_bits
from fedqssl_client.client import LOCAL_MODEL
from fedqssl_server.rounds import (
    BufferOnlyRound,
    FedQSSLRound,
    FineTuneRound,
    LocalOnlyRound,
    ServerRound,
    UpdateRound,
    server_round_for,
)
from fedqssl_server.strategy import FedQSSL, strategy_for


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
def test_every_algorithm_federates_two_rounds_with_low_bit_payloads(tmp_path, algorithm):
    config = tiny_config(tmp_path, algorithm)
    strategy, clients = federate(config)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    assert summary["label"] == get_algorithm(algorithm).label
    assert 0 <= summary["global-accuracy"] <= 1
    assert [c["bitwidth"] for c in summary["local-accuracy"]] == [4, 8]
    assert all(0 <= c["local-accuracy"] <= 1 for c in summary["local-accuracy"])
    # every score stands beside its untrained floor: the same protocol on the initial model
    for client in summary["local-accuracy"]:
        assert 0 <= client["untrained-local-accuracy"] <= 1
        assert 0 <= client["untrained-local-probe-accuracy"] <= 1
    for key in ("global-accuracy", "mean-local-accuracy", "global-probe-accuracy"):
        assert 0 <= summary[f"untrained-{key}"] <= 1
    if get_algorithm(algorithm).self_supervised:
        assert summary["global-accuracy"] == summary["global-probe-accuracy"]
        assert summary["untrained-global-accuracy"] == summary["untrained-global-probe-accuracy"]
    # round 2's downlink is each client's own bitwidth (local-only: its own model): packed
    # codes, not fp32
    for partition, bits in enumerate((4, 8)):
        sent = strategy._payload_for(partition)
        assert payload_bits(sent) == bits
        assert (sent is strategy.personal.get(partition)) == (algorithm == "local-only")
    record = strategy.recorder.rounds[-1]
    uplink = {c["bitwidth"]: c["uplink-bytes"] for c in record["clients"]}
    assert uplink[4] < uplink[8] < record["fp32-equivalent-bytes"] / 2
    supervised = not get_algorithm(algorithm).self_supervised
    assert all((LOCAL_MODEL in c.state) == supervised for c in clients.values())
    assert_usable_global_model(strategy)


def assert_usable_global_model(strategy) -> None:
    """Finite, varied features and no negative running variance in the global model."""
    for name, tensor in strategy.global_state.items():
        assert not name.endswith("running_var") or (tensor >= 0).all(), name
    images = strategy.data.spec.normalize(strategy.data.probe_test.images[:64])
    features = extract_features(strategy.monitor.model_of(strategy.global_state).encoder, images)
    assert torch.isfinite(features).all() and features.std(dim=0).max() > 0


def test_fedpaq_at_two_and_three_bits_keeps_its_global_model_usable(tmp_path):
    """QSGD-coded batch-norm statistics once drove running variances negative: NaN features,
    a global score of exactly chance (10.00% in every seed of the learning comparison)."""
    config = tiny_config(
        tmp_path, "fedpaq", "2,3", **{"dataset": "fashion-mnist", "max-samples-per-client": 256}
    )
    strategy, _ = federate(config)
    assert_usable_global_model(strategy)


@pytest.mark.parametrize(
    ("algorithm", "server"),
    [
        ("fedqssl", FedQSSLRound),
        ("fedsimclr", ServerRound),
        ("fedsimclr-ft", FineTuneRound),
        ("buffer-only", BufferOnlyRound),
        ("local-only", LocalOnlyRound),
        ("fedsimsiam", ServerRound),
        ("fedavg", ServerRound),
        ("fedprox", ServerRound),
        ("fedpaq", UpdateRound),
    ],
)
def test_each_algorithm_gets_its_server_step(tmp_path, algorithm, server):
    config = tiny_config(tmp_path, algorithm)
    assert type(server_round_for(config, server_data(config))) is server
    # one Flower strategy runs them all (``from fedqssl_server import FedQSSL``), by the config
    strategy = strategy_for(config, server_data(config))
    assert type(strategy) is FedQSSL and type(strategy.steps) is server


def test_fedpaq_at_full_precision_with_one_client_reproduces_its_model_exactly(tmp_path):
    """The update travels unquantized at 32 bits: global + update == the client's model."""
    config = tiny_config(
        tmp_path, "fedpaq", "32", **{"num-clients": 1, "min-fit-clients": 1, "num-rounds": 1}
    )
    strategy, clients = federate(config)
    local = decode_state(clients["0"].state[LOCAL_MODEL].to_numpy_ndarrays())
    for name, tensor in strategy.global_state.items():
        assert torch.allclose(tensor, local[name], atol=1e-6), name


def test_averaging_server_weights_by_samples_and_rounds_the_downlink(tmp_path):
    config = tiny_config(tmp_path, "fedsimclr")
    server = server_round_for(config, server_data(config))
    base = server.initial_state()
    states = {0: base, 1: {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}}
    outcome = server.run(1, base, states, {0: 30, 1: 10}, {4})
    assert weights_of(outcome) == pytest.approx([0.75, 0.25], abs=1e-15)
    name = next(k for k, v in base.items() if v.is_floating_point())
    assert torch.allclose(outcome.global_state[name], base[name] + 0.25)
    # the round's model for 4 bits is the average itself: the codec rounds it onto the grid
    assert outcome.requantized[4] is outcome.global_state and losses_of(outcome) == [None, None]


def test_supervised_local_accuracy_uses_the_clients_own_trained_model(tmp_path):
    config = tiny_config(tmp_path, "fedavg")
    strategy, clients = federate(config)
    client = clients["0"]
    own = decode_state(client.state[LOCAL_MODEL].to_numpy_ndarrays())
    client.evaluate(strategy.downlink[4], {})
    assert all(torch.equal(client.model.state_dict()[k].cpu(), own[k]) for k in own)


def test_untrained_floor_is_the_initial_model_under_the_same_protocol(tmp_path):
    """Supervised rows: the floor of the classifier score is the initial classifier's; the SSL
    probe of the initial encoder is the same for every algorithm of a seed (same weights)."""
    summaries = {}
    for algorithm in ("fedavg", "fedsimclr"):
        config = tiny_config(tmp_path, algorithm)
        strategy, _ = federate(config)
        summaries[algorithm] = json.loads((Path(config.output_dir) / "summary.json").read_text())
        untrained = new_model(config, FULL_PRECISION, 1, 10)
        assert all(
            torch.equal(untrained.state_dict()[k], v)
            for k, v in strategy.steps.initial_state().items()
        )
    supervised, ssl = summaries["fedavg"], summaries["fedsimclr"]
    for key in ("untrained-global-probe-accuracy", "untrained-mean-local-probe-accuracy"):
        assert supervised[key] == ssl[key]
    assert supervised["untrained-global-accuracy"] != supervised["untrained-global-probe-accuracy"]
    assert [c["local-model"] for c in supervised["local-accuracy"]] == ["own", "own"]


def test_fp_activation_reaches_every_model_the_run_builds():
    """The fp-activation control: every full-precision model of the run (clients, server,
    monitor) keeps clamp(0, 1), so its outputs differ from the ReLU model with the same weights."""
    values = {"num-clients": 2, "model-width": 4, "bitwidths": "32"}
    relu = new_model(ExperimentConfig.from_mapping(values), FULL_PRECISION, 1, 10)
    clamp = new_model(
        ExperimentConfig.from_mapping({**values, "fp-activation": "clamp"}), FULL_PRECISION, 1, 10
    )
    acts = [m for m in clamp.modules() if isinstance(m, QuantAct)]
    assert acts and all(m.full_precision == "clamp" for m in acts)
    assert all(torch.equal(v, clamp.state_dict()[k]) for k, v in relu.state_dict().items())
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 3
    relu.eval(), clamp.eval()
    with torch.no_grad():
        assert not torch.allclose(relu.encoder(images), clamp.encoder(images))
