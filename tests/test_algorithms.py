"""Every algorithm's client and strategy together, in process (no Ray): the wire, the server
step and the evaluation each algorithm is defined by."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import FakeManager, FakeProxy, drive
from flwr.common import Code, EvaluateRes, RecordDict, Status

from common.algorithms import ALGORITHM_NAMES, get_algorithm
from common.config import ConfigError, ExperimentConfig
from common.learning.models import extract_features
from common.learning.training import augmented_epochs, objective_loss
from common.lowbit.layers import QuantAct
from common.runs.experiment import new_model, server_data
from common.vocabulary import FULL_PRECISION
from common.wire.payload import decode_state, payload_bits
from fedqssl_client.client import LOCAL_MODEL, LowBitClient
from fedqssl_server.aggregation import apply_update, sample_weights
from fedqssl_server.monitor import LOSS_IMAGES
from fedqssl_server.results import RunRecorder, row_label
from fedqssl_server.rounds import (
    BufferOnlyRound,
    FedQSSLRound,
    FineTuneRound,
    ServerRound,
    UpdateRound,
    server_round_for,
)
from fedqssl_server.strategy import STRATEGIES, strategy_for


def tiny_config(tmp_path, algorithm, bitwidths="4,8", **extra):
    return ExperimentConfig.from_mapping(
        {
            "algorithm": algorithm,
            "dataset": "synthetic",
            "model-width": 8,
            "num-clients": 2,
            "bitwidths": bitwidths,
            "num-rounds": 2,
            "dirichlet-beta": 1.0,
            "buffer-ratio": 0.1,
            "batch-size": 32,
            "max-samples-per-client": 64,
            "output-dir": str(tmp_path / algorithm),
            **extra,
        }
    )


def federate(config, client_data=None, model_dirs=None):
    """Run ``config.num_rounds`` rounds in process; (strategy, clients). ``client_data``: each
    client's own ClientData (default: its partition); ``model_dirs``: where each keeps its
    personalized model (default: nowhere)."""
    recorder = RunRecorder(config, Path(config.output_dir))
    strategy = strategy_for(config, server_data(config), recorder)
    proxies = [FakeProxy(str(k)) for k in range(config.num_clients)]
    clients = {
        p.cid: LowBitClient(
            config,
            int(p.cid),
            config.bitwidths[int(p.cid)],
            RecordDict(),
            None if client_data is None else client_data[int(p.cid)],
            "" if model_dirs is None else model_dirs[int(p.cid)],
        )
        for p in proxies
    }
    drive(strategy, clients, FakeManager(proxies), config.num_rounds)
    return strategy, clients


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
    # round 2's downlink is each client's own bitwidth: packed codes, not fp32
    for bits in (4, 8):
        assert payload_bits(strategy.downlink[bits]) == bits
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


def test_sample_weights_and_update_application():
    assert np.allclose(sample_weights([10, 30]), [0.25, 0.75])
    with pytest.raises(ValueError, match="positive sum"):
        sample_weights([0, 0])
    current = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    updates = [
        {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(4)},
        {"w": torch.tensor([-2.0, 4.0]), "n": torch.tensor(5)},
    ]
    new = apply_update(current, updates, [0.75, 0.25])
    assert torch.allclose(new["w"], torch.tensor([2.0, 2.0])) and int(new["n"]) == 5


@pytest.mark.parametrize(
    ("algorithm", "server"),
    [
        ("fedqssl", FedQSSLRound),
        ("fedsimclr", ServerRound),
        ("fedsimclr-ft", FineTuneRound),
        ("buffer-only", BufferOnlyRound),
        ("fedsimsiam", ServerRound),
        ("fedavg", ServerRound),
        ("fedprox", ServerRound),
        ("fedpaq", UpdateRound),
    ],
)
def test_each_algorithm_gets_its_server_step(tmp_path, algorithm, server):
    config = tiny_config(tmp_path, algorithm)
    assert type(server_round_for(config, server_data(config))) is server
    # and its strategy, named for it (``from fedqssl_server import FedQSSL``)
    strategy = strategy_for(config, server_data(config))
    assert strategy.algorithm_name == algorithm and type(strategy) is STRATEGIES[algorithm]
    with pytest.raises(ValueError, match=r"runs fedqssl, but the config says"):
        STRATEGIES["fedqssl"](tiny_config(tmp_path, "fedavg"), server_data(config))


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
    assert outcome.weights == pytest.approx([0.75, 0.25], abs=1e-15)
    name = next(k for k, v in base.items() if v.is_floating_point())
    assert torch.allclose(outcome.global_state[name], base[name] + 0.25)
    # the round's model for 4 bits is the average itself: the codec rounds it onto the grid
    assert outcome.requantized[4] is outcome.global_state and outcome.dq_losses == [None, None]


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


def test_full_precision_rows_are_labelled_and_unknown_algorithms_rejected():
    def config(**values):
        return ExperimentConfig.from_mapping({"num-clients": 2, **values})

    fedqssl = get_algorithm("fedqssl")
    assert row_label(fedqssl, config(bitwidths="32,32")) == "Fed-QSSL (Full)"
    assert row_label(fedqssl, config(bitwidths="4,32")) == "Fed-QSSL"
    uniform = config(bitwidths="32", **{"dq-weighting": "uniform"})
    assert row_label(fedqssl, uniform) == "Fed-QSSL (Full, uniform p_k)"
    clamp = config(bitwidths="32", **{"fp-activation": "clamp"})
    assert row_label(get_algorithm("fedsimclr"), clamp) == "Fed-SimCLR (Full, clamp)"
    with pytest.raises(ConfigError, match="algorithm: 'fedsgd' is not one of fedqssl"):
        ExperimentConfig.from_mapping({"algorithm": "fedsgd"})


@pytest.mark.parametrize("algorithm", ["fedsimclr", "fedavg"])
def test_flower_gets_losses_not_one_minus_an_accuracy(tmp_path, algorithm):
    """The server's centralized loss is the global model's own objective on the test split
    (NT-Xent of seeded views, or a classifier's cross-entropy), recorded as ``global-loss``; a
    client's is the cross-entropy of the model its local accuracy scores; Flower's distributed
    loss is their mean weighted by test examples."""
    config = tiny_config(tmp_path, algorithm)
    strategy, clients = federate(config)
    monitor = strategy.monitor
    loss, _ = strategy.evaluate(0, None)
    assert loss == monitor.loss(strategy.global_state)  # deterministic: the run's seed
    model = monitor.model_of(strategy.global_state).eval()
    test = monitor.data.probe_test
    images, labels = test.images[:LOSS_IMAGES], test.labels[:LOSS_IMAGES]
    with torch.no_grad():
        if algorithm == "fedavg":
            logits = model(monitor.data.spec.normalize(images))
            expected = float(torch.nn.functional.cross_entropy(logits, labels))
        else:
            views = monitor.views
            batches = augmented_epochs(images, views, 1, config.batch_size, config.seed)[0]
            losses = [float(objective_loss(model, a, b, config.temperature)) for a, b in batches]
            expected = float(np.mean(losses))
    assert loss == pytest.approx(expected, rel=1e-5)
    knn = json.loads(Path(config.output_dir, "rounds.jsonl").read_text().splitlines()[-1])
    assert knn["global-loss"] > 0 and abs(knn["global-loss"] - (1 - knn["knn-accuracy"])) > 1e-6

    replies = []
    for cid, client in clients.items():
        client_loss, examples, metrics = client.evaluate(strategy.downlink[client.bits], {})
        assert client_loss == metrics["local-loss"] > 0
        assert client_loss != pytest.approx(1 - metrics["local-accuracy"])
        reply = EvaluateRes(Status(Code.OK, ""), client_loss, examples, metrics)
        replies.append((FakeProxy(cid), reply))
    distributed, _ = strategy.aggregate_evaluate(config.num_rounds, replies, [])
    counts = [r.num_examples for _, r in replies]
    losses = [r.loss for _, r in replies]
    assert distributed == pytest.approx(np.average(losses, weights=counts))
