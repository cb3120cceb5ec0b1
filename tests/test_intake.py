"""Replies at the Flower boundary (fedqssl_server.intake): whatever bytes and metrics a client
sends, the round goes on without what cannot be used, and says why."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from flower_fakes import FakeProxy, config_dir, fit_result
from flwr.common import (
    Code,
    EvaluateRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from common.config import ExperimentConfig
from common.learning.models import build_model
from common.runs.experiment import server_data
from common.wire.payload import PayloadError, decode_state, encode_state, is_quantized
from fedqssl_server.intake import MAX_MAGNITUDE, check_plausible
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import strategy_for


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def hostile_payloads(config) -> dict[str, list[bytes]]:
    """Byte payloads a hostile or broken client can send (issue 12, part 1)."""
    honest = fit_result(config, 4, 5, 2).parameters.tensors
    huge = npy_bytes(np.zeros(4, np.uint8)).replace(b"(4,)", b"(1099511627776,)")
    deep = np.frombuffer(b"[" * 100_000, np.uint8)
    digits = b'{"format":"fedqssl","version":1,"bits":' + b"9" * 5000 + b',"tensors":[]}'
    return {
        "garbage": [b"\x00garbage", *honest[1:]],
        "pickle": [pickle.dumps({"a": 1}), *honest[1:]],
        "object dtype": [npy_bytes(np.array([{"a": 1}], dtype=object), True), *honest[1:]],
        "empty": [b"", *honest[1:]],
        "2**40 elements": [huge, *honest[1:]],
        "deep header": [npy_bytes(deep), *honest[1:]],
        "5000-digit bits": [npy_bytes(np.frombuffer(digits, np.uint8)), *honest[1:]],
    }


def averaging(config):
    """The same strategy with plain averaging: the reply checks without D_g's fine-tunes."""
    return ExperimentConfig.from_mapping({**config.to_run_config(), "algorithm": "fedsimclr"})


def test_no_bytes_a_client_sends_end_the_round(config):
    config = averaging(config)
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    good = (FakeProxy("good"), fit_result(config, 4, 0, 0))
    for case, tensors in hostile_payloads(config).items():
        bad = fit_result(config, 4, 5, 2)
        bad.parameters = Parameters(tensors=tensors, tensor_type="numpy.ndarray")
        strategy.aggregate_fit(1, [good, (FakeProxy(case), bad)], [])
        assert strategy.ledger.fit["failed"] == [case], case
        assert "sent a bad model" in strategy.ledger.fit["failure-reasons"][0], case
        assert [c["partition-id"] for c in strategy.ledger.fit["clients"]] == [0], case


def with_header(arrays: list[np.ndarray], **changes) -> list[np.ndarray]:
    header = {**json.loads(bytes(arrays[0]).decode()), **changes}
    return [np.frombuffer(json.dumps(header).encode(), np.uint8), *arrays[1:]]


def poisoned_payloads(config) -> dict[str, list[np.ndarray]]:
    """Payloads whose format is valid but whose model no honest client sends (issue 12, part 2)."""
    state = decode_state(parameters_to_ndarrays(fit_result(config, 4, 7, 2).parameters))
    conv = next(name for name, tensor in state.items() if is_quantized(name, tensor))
    variance = next(name for name in state if name.endswith("running_var"))

    def changed(name, value):
        return {**state, name: value}

    return {
        "conv weight as int64 2**62": encode_state(
            changed(conv, torch.full(state[conv].shape, 2**62, dtype=torch.int64)), 4
        ),
        "running_var 1e30": encode_state(
            changed(variance, torch.full_like(state[variance], 1e30)), 4
        ),
        "negative running_var": encode_state(changed(variance, -state[variance]), 4),
        "fp32 weights under a 4-bit header": with_header(encode_state(state, 32), bits=4),
    }


# What each refusal names.
POISON_REFUSED = {
    "conv weight as int64 2**62": "sent as 'int'; at 4 bits it travels as 'codes' or 'qsgd'",
    "running_var 1e30": "holds 1e+30, beyond the 1e+06",
    "negative running_var": "a BatchNorm variance below 0",
    "fp32 weights under a 4-bit header": "sent as 'float'; at 4 bits",
}


@pytest.mark.parametrize("case", list(POISON_REFUSED))
def test_a_poisoned_model_is_refused_and_the_round_equals_the_round_without_it(tmp_path, case):
    config = averaging(
        ExperimentConfig.from_mapping(
            {"dataset": "synthetic", "num-clients": 3, "bitwidths": "4", "min-fit-clients": 1}
        )
    )

    def strategy():
        return strategy_for(config, server_data(config), RunRecorder(config, tmp_path / case))

    honest = [(FakeProxy(str(i)), fit_result(config, 4, i, i)) for i in range(2)]
    bad = fit_result(config, 4, 7, 2)
    bad.parameters = ndarrays_to_parameters(poisoned_payloads(config)[case])
    with_bad, without = strategy(), strategy()
    with_bad.aggregate_fit(1, [*honest, (FakeProxy("bad"), bad)], [])
    without.aggregate_fit(1, honest, [])
    assert with_bad.ledger.fit["failed"] == ["bad"]
    assert "sent a bad model" in with_bad.ledger.fit["failure-reasons"][0]
    assert POISON_REFUSED[case] in with_bad.ledger.fit["failure-reasons"][0]
    for name, tensor in without.global_state.items():
        torch.testing.assert_close(with_bad.global_state[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("loss", b"\x00bytes"),
        ("partition-id", b"1"),
        ("partition-id", "1"),
        ("bitwidth", "4"),
        ("bitwidth", True),
        ("loss", float("nan")),
        ("train-seconds", -1.0),
        ("num_examples", -5),
    ],
)
def test_a_fit_reply_with_a_wrong_metric_type_is_a_logged_failure(config, key, value):
    config = averaging(config)
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    bad = fit_result(config, 4, 1, 1)
    if key == "num_examples":
        bad.num_examples = value
    else:
        bad.metrics[key] = value
    strategy.aggregate_fit(
        1, [(FakeProxy("good"), fit_result(config, 4, 0, 0)), (FakeProxy("bad"), bad)], []
    )
    assert strategy.ledger.fit["failed"] == ["bad"]
    assert key in strategy.ledger.fit["failure-reasons"][0]
    json.dumps(strategy.ledger.fit)  # what rounds.jsonl will hold stays JSON


def test_a_client_claiming_more_examples_than_the_bound_cannot_take_the_round(config):
    """Sample-weighted averaging trusts num_examples: 10**15 would give one client all the
    weight. It is refused, and the round equals the round without it."""
    config = averaging(config)

    def strategy():
        return strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))

    honest = [(FakeProxy(str(i)), fit_result(config, config.bitwidths[i], i, i)) for i in range(2)]
    greedy = fit_result(config, 4, 2, 2)
    greedy.num_examples = 10**15
    with_bad, without = strategy(), strategy()
    with_bad.aggregate_fit(1, [*honest, (FakeProxy("greedy"), greedy)], [])
    without.aggregate_fit(1, honest, [])
    assert with_bad.ledger.fit["failed"] == ["greedy"]
    assert "exceeds max-client-examples 100000" in with_bad.ledger.fit["failure-reasons"][0]
    for name, tensor in without.global_state.items():
        torch.testing.assert_close(with_bad.global_state[name], tensor, rtol=0, atol=0)
    greedy.num_examples = config.max_client_examples  # at the bound: counted
    at_bound = strategy()
    at_bound.aggregate_fit(1, [*honest, (FakeProxy("greedy"), greedy)], [])
    assert at_bound.ledger.fit["failed"] == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("partition-id", "0"),
        ("partition-id", None),
        ("local-accuracy", "0.9"),
        ("local-accuracy", 7.0),
    ],
)
def test_an_evaluate_reply_with_a_wrong_metric_type_is_left_out_of_the_means(config, key, value):
    strategy = strategy_for(averaging(config), server_data(config), None)
    strategy.nodes.bind("a", 0)
    strategy.nodes.bind("b", 1)

    def reply(partition, accuracy):
        metrics = {
            "partition-id": partition,
            "bitwidth": config.bitwidths[partition],
            "local-accuracy": accuracy,
        }
        return EvaluateRes(Status(Code.OK, ""), 1 - accuracy, 10, metrics)

    bad = reply(1, 0.2)
    if value is None:
        del bad.metrics[key]
    else:
        bad.metrics[key] = value
    results = [(FakeProxy("a"), reply(0, 0.8)), (FakeProxy("b"), bad)]
    _, metrics = strategy.aggregate_evaluate(1, results, [])
    assert metrics["local-accuracy"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("node", "partition", "bits", "reason"),
    [
        ("b", 0, 4, "reports partition-id 0, but speaks for partition 1"),
        ("b", 1, 32, "reports 32 bits for partition 1, which the run assigns 8 bits"),
        ("stranger", 2, 4, "node stranger speaks for no partition in this run"),
        ("a", 0, 4, "repeats partition-id 0"),
    ],
)
def test_an_evaluate_reply_must_speak_for_its_nodes_partition_at_its_bitwidth(
    config, monkeypatch, node, partition, bits, reason
):
    """Evaluation replies are held to the fit replies' contract: a node reports only for the
    partition it is bound to, at its bitwidth, once; anything else is a logged failure."""
    strategy = strategy_for(averaging(config), server_data(config), None)
    strategy.nodes.bind("a", 0)
    strategy.nodes.bind("b", 1)

    def reply(partition, bits, accuracy):
        metrics = {"partition-id": partition, "bitwidth": bits, "local-accuracy": accuracy}
        return EvaluateRes(Status(Code.OK, ""), 1 - accuracy, 10, metrics)

    honest = [(FakeProxy("a"), reply(0, 4, 0.8))]
    lying = (FakeProxy(node), reply(partition, bits, 0.1))
    logged = []
    monkeypatch.setattr(
        "fedqssl_server.strategy.log", lambda level, message, *args: logged.append(message % args)
    )
    _, metrics = strategy.aggregate_evaluate(1, [*honest, lying], [])
    assert metrics["local-accuracy"] == pytest.approx(0.8)
    assert any(reason in line for line in logged), logged


def test_plausibility_bounds_magnitudes_and_model_variances_not_update_variances():
    state = build_model("small_cnn", 4, 1).state_dict()
    check_plausible(state)  # an honest model passes
    variance = next(name for name in state if name.endswith("running_var"))
    negative = {**state, variance: -state[variance]}
    with pytest.raises(PayloadError, match="variance below 0"):
        check_plausible(negative)
    check_plausible(negative, update=True)  # an update may lower a variance
    conv = next(name for name, t in state.items() if is_quantized(name, t))
    at_limit = {**state, conv: torch.full_like(state[conv], MAX_MAGNITUDE)}
    check_plausible(at_limit)
    beyond = {**state, conv: torch.full_like(state[conv], MAX_MAGNITUDE * 2)}
    for candidate in (beyond, {**state, conv: torch.full_like(state[conv], float("nan"))}):
        with pytest.raises(PayloadError, match="beyond"):
            check_plausible(candidate, update=True)


def test_deployed_nodes_claiming_unbound_partitions_are_warned_about_once(config, monkeypatch):
    """With no partition-bindings the first node to claim a partition keeps it: said once a
    run when deployed SuperNodes (no Ray node in their replies) claim partitions, never in a
    Ray simulation and never with bindings declared."""
    from fedqssl_server import intake
    from fedqssl_server.nodes import NodeRegistry

    said = []
    monkeypatch.setattr(intake, "log", lambda level, text, *args: said.append(text))
    template = strategy_for(config, server_data(config)).global_state
    proxies = [FakeProxy(str(i)) for i in range(2)]

    def replies(ray_node):
        results = []
        for index, proxy in enumerate(proxies):
            result = fit_result(config, config.bitwidths[index], index, index)
            if ray_node:
                result.metrics["ray-node"] = "abc123"
            results.append((proxy, result))
        return results

    simulated = NodeRegistry(config.bitwidths)
    intake.take_replies(replies(True), simulated, {"0", "1"}, template, False, 10**6)
    assert said == []
    deployed = NodeRegistry(config.bitwidths)
    for _ in range(2):  # two rounds: one warning
        intake.take_replies(replies(False), deployed, {"0", "1"}, template, False, 10**6)
    assert len(said) == 1 and "partition-bindings is empty" in said[0]
    bound = NodeRegistry(config.bitwidths, {0: "0", 1: "1"})
    intake.take_replies(replies(False), bound, {"0", "1"}, template, False, 10**6)
    assert len(said) == 1


def test_a_failure_flower_gives_as_an_exception_is_recorded_as_unknown_with_its_reason():
    """Flower hands the strategy a ClientApp's exception without the client: the round's
    ``failed`` must not hold the error text as if it were a node id."""
    from fedqssl_server.intake import UNKNOWN_CLIENT, failed

    error = RuntimeError("client 2 refuses to train: its bitwidth 4 is not the run's 8")
    assert failed([error]) == [(UNKNOWN_CLIENT, f"RuntimeError: {error}")]
