"""The low-bit strategy and its server steps, driven with fabricated Flower results; the server
streams (one received state at a time) with the result of de-quantizing all, then averaging."""

import dataclasses
import gc
import io
import json
import math
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import FakeManager, FakeProxy
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from common import seeds
from common.config import ExperimentConfig
from common.learning.training import fit_batches, fit_local, recipe
from common.lowbit.quantizers import weight_codes
from common.runs.experiment import new_model, server_data
from common.vocabulary import FULL_PRECISION
from common.wire.packing import packed_size
from common.wire.payload import decode_state, encode_state, is_quantized, payload_bits
from fedqssl_server import aggregation, monitor, rounds
from fedqssl_server.aggregation import RunningAverage, average_states, softmax_weights
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import RoundFailedError, strategy_for


@pytest.fixture
def config(tmp_path):
    return ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "num-clients": 3,
            "bitwidths": "4,8,4",
            "num-rounds": 1,
            "dirichlet-beta": 1.0,
            "buffer-ratio": 0.1,
            "batch-size": 32,
            "min-fit-clients": 1,  # the failure tests keep one good client of several
            "output-dir": str(tmp_path / "out"),
        }
    )


def fit_result(config, bits, seed, partition_id=0):
    model = new_model(config, bits, 1, 10)  # seeds torch with config.seed: reseed after it
    torch.manual_seed(seed)
    for parameter in model.parameters():  # make every client's model different
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    payload = encode_state(model.state_dict(), bits)
    metrics = {"bitwidth": bits, "partition-id": partition_id, "loss": 1.0}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), 10, metrics)


def three_results(config, proxies):
    """Fit results of three clients at 4, 8 and 4 bits."""
    return [
        (proxy, fit_result(config, bits, index, index))
        for index, (proxy, bits) in enumerate(zip(proxies, (4, 8, 4), strict=True))
    ]


def config_dir(config):
    return Path(config.output_dir)


def test_softmax_weights_and_weighted_average():
    weights = softmax_weights([1.0, 2.0, 3.0], temperature=1.0)
    expected = np.exp([-1.0, -2.0, -3.0]) / np.exp([-1.0, -2.0, -3.0]).sum()
    assert np.allclose(weights, expected)
    assert np.allclose(softmax_weights([1000.0, 1001.0], 0.5), softmax_weights([0.0, 1.0], 0.5))
    states = [
        {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2)},
        {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(5)},
    ]
    averaged = average_states(states, [0.25, 0.75])
    assert torch.allclose(averaged["w"], torch.tensor([2.5, 4.5])) and int(averaged["n"]) == 5
    with pytest.raises(ValueError, match="finite"):
        softmax_weights([float("nan"), 1.0])


def test_aggregation_weights_are_softmax_of_dq_losses_and_requantize_once_per_bitwidth(
    config, monkeypatch
):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    calls = []
    train_on = strategy.steps.train_on

    def counting(state, bits, views, seed, phase):
        calls.append(bits)
        return train_on(state, bits, views, seed, phase)

    monkeypatch.setattr(strategy.steps, "train_on", counting)
    proxies = [FakeProxy(str(i)) for i in range(3)]
    results = three_results(config, proxies)
    parameters, _ = strategy.aggregate_fit(1, results, [])
    # three de-quantizations at full precision, then one re-quantization per distinct bitwidth
    assert calls == [32, 32, 32, 4, 8]
    record = strategy.round.record
    losses = [c["dq-loss"] for c in record["clients"]]
    assert np.allclose([c["weight"] for c in record["clients"]], softmax_weights(losses, 1.0))
    # the global model is the weighted aggregate, returned at full precision
    assert payload_bits(parameters_to_ndarrays(parameters)) == 32
    assert sorted(strategy.downlink) == [4, 8]


def test_malformed_payload_is_a_logged_failure_not_a_crash(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    good = fit_result(config, 4, 0)
    bad = fit_result(config, 8, 1, 1)
    arrays = parameters_to_ndarrays(bad.parameters)
    bad.parameters = ndarrays_to_parameters([arrays[0], arrays[1][:-5], *arrays[2:]])
    liar = fit_result(config, 8, 2, 2)
    liar.metrics["bitwidth"] = 4  # claims its partition's 4 bits, sends 8
    results = [(FakeProxy("a"), good), (FakeProxy("b"), bad), (FakeProxy("c"), liar)]
    parameters, _ = strategy.aggregate_fit(1, results, [RuntimeError("node lost")])
    assert parameters is not None
    assert [c["partition-id"] for c in strategy.round.record["clients"]] == [0]
    assert set(strategy.round.record["failed"]) == {"b", "c", "node lost"}
    assert "payload is at 8 bits, the receiver expects 4" in " ".join(
        strategy.round.record["failure-reasons"]
    )
    assert strategy.nodes.partition_of == {"a": 0}


def test_a_round_with_fewer_usable_models_than_min_fit_clients_fails_the_run(config):
    """Bare ``flwr run .`` with too few SuperNodes: every client fails; the run must fail with
    the clients' own reason, and write no summary of a model nobody trained."""
    config = ExperimentConfig.from_mapping({**config.to_run_config(), "min-fit-clients": 2})
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    reason = ValueError("node has partition-id 0 of num-partitions 2, but the run has ...")
    failed = r"0 of 2 clients .* first failure: ValueError: node"
    with pytest.raises(RoundFailedError, match=failed):
        strategy.aggregate_fit(1, [], [reason, RuntimeError("lost")])
    # one usable model of two is still too few
    bad = fit_result(config, 8, 1, 1)
    bad.metrics["bitwidth"] = 4
    results = [(FakeProxy("a"), fit_result(config, 4, 0)), (FakeProxy("b"), bad)]
    with pytest.raises(RoundFailedError, match=r"1 of 2 clients .* client b claims 4 bits"):
        strategy.aggregate_fit(2, results, [])
    lines = (config_dir(config) / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert "first failure" in json.loads(lines[0])["error"]
    assert not (config_dir(config) / "summary.json").exists()


def test_a_new_run_in_a_used_folder_starts_its_own_records(config):
    folder = config_dir(config)
    folder.mkdir(parents=True)
    (folder / "rounds.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (folder / "summary.json").write_text('{"global-accuracy": 0.9}\n')
    recorder = RunRecorder(config, folder)
    recorder.add_round({"round": 1})
    assert (folder / "rounds.jsonl").read_text() == '{"round": 1}\n'
    assert not (folder / "summary.json").exists()
    # the recorded config names the folder it sits in, not this machine's path to it
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["output-dir"] == "." and str(folder) not in (folder / "config.json").read_text()


def test_each_client_gets_its_own_fitins_with_its_bitwidths_packed_model(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    proxies = [FakeProxy(str(i)) for i in range(3)]
    first = strategy.configure_fit(1, None, FakeManager(proxies))
    assert all(payload_bits(parameters_to_ndarrays(ins.parameters)) == 32 for _, ins in first)
    results = three_results(config, proxies)
    strategy.aggregate_fit(1, results, [])
    second = strategy.configure_fit(2, None, FakeManager(proxies))
    assert len({id(ins) for _, ins in second}) == 3
    for (proxy, ins), bits in zip(second, (4, 8, 4), strict=True):
        arrays = parameters_to_ndarrays(ins.parameters)
        assert payload_bits(arrays) == bits
        state = decode_state(arrays)
        quantized = [(k, v) for k, v in state.items() if is_quantized(k, v)]
        # counted as codes: torch's vectorized atanh can differ by one ulp from its scalar tail,
        # so one code may decode to two adjacent floats (sender and receiver alike)
        assert all(weight_codes(v, bits)[0].unique().numel() <= 2**bits for _, v in quantized)
        assert arrays[1].size == packed_size(sum(v.numel() for _, v in quantized), bits)
        assert strategy.round.sent_bytes[proxy.cid] == sum(a.nbytes for a in arrays)


def test_round_records_bytes_and_times(config):
    recorder = RunRecorder(config, config_dir(config))
    strategy = strategy_for(config, server_data(config), recorder)
    proxies = [FakeProxy(str(i)) for i in range(3)]
    strategy.configure_fit(1, None, FakeManager(proxies))
    results = three_results(config, proxies)
    strategy.aggregate_fit(1, results, [])
    strategy.evaluate(1, None)
    line = json.loads((config_dir(config) / "rounds.jsonl").read_text().splitlines()[0])
    assert line["round"] == 1 and 0 <= line["knn-accuracy"] <= 1
    assert [c["bitwidth"] for c in line["clients"]] == [4, 8, 4]
    for client, (_, result) in zip(line["clients"], results, strict=True):
        assert client["uplink-bytes"] == sum(
            a.nbytes for a in parameters_to_ndarrays(result.parameters)
        )
    assert set(line["server-seconds"]) == {"dequantize", "aggregate", "requantize"}
    assert line["fp32-equivalent-bytes"] > 3 * line["clients"][0]["uplink-bytes"]
    assert "global-accuracy" in strategy.evaluate(1, None)[1]  # num-rounds is 1: last round


def test_server_rounds_import_neither_flower_nor_the_codec():
    """The round's steps take and return states: Flower and the wire stay in the strategy."""
    for module in (rounds, aggregation, monitor):
        source = Path(module.__file__).read_text()
        assert "flwr" not in source, module
    assert "common.wire.payload" not in Path(rounds.__file__).read_text()


def test_round_outcome_does_not_depend_on_arrival_order(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(config, bits, key, key).parameters))
        for key, bits in enumerate((4, 8, 4))
    }
    examples = dict.fromkeys(states, 10)
    current = strategy.global_state
    forward = strategy.steps.run(1, current, states, examples, {4, 8})
    backward = strategy.steps.run(1, current, dict(reversed(states.items())), examples, {4, 8})
    assert forward.weights == backward.weights
    assert all(
        torch.equal(forward.global_state[k], backward.global_state[k]) for k in forward.global_state
    )
    assert all(
        torch.equal(forward.requantized[4][k], backward.requantized[4][k])
        for k in forward.requantized[4]
    )


def nodes(ids, bits=4):
    """Fake nodes with these ids, node k speaking for partition k."""
    return [FakeProxy(cid, {"partition-id": k, "bitwidth": bits}) for k, cid in enumerate(ids)]


@pytest.mark.parametrize(
    ("fraction", "minimum", "expected"), [(0.5, 2, 5), (0.1, 3, 3), (1.0, 2, 10)]
)
def test_client_sampling_follows_fraction_fit_and_min_fit_clients_by_partition(
    tmp_path, fraction, minimum, expected
):
    config = ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "num-clients": 10,
            "bitwidths": "4",
            "dirichlet-beta": 1.0,
            "fraction-fit": fraction,
            "min-fit-clients": minimum,
            "output-dir": str(tmp_path),
        }
    )

    def sampled_partitions(ids, server_round):
        strategy = strategy_for(config, server_data(config))
        chosen = strategy.configure_fit(server_round, None, FakeManager(nodes(ids)))
        return sorted(proxy.properties["partition-id"] for proxy, _ in chosen)

    first = sampled_partitions([str(i) for i in range(10)], 1)
    assert len(first) == expected
    # drawn by partition with the seed and round: the same partitions under other node ids (a
    # resumed run, whose nodes Flower numbers anew), and another draw in another round
    assert sampled_partitions([f"node-{9 - i}" for i in range(10)], 1) == first
    if expected < 10:
        assert any(sampled_partitions([str(i) for i in range(10)], r) != first for r in (2, 3))


def test_a_repeated_partition_id_is_a_failure_not_a_silent_overwrite(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    results = [
        (FakeProxy("a"), fit_result(config, 4, 0, 0)),
        (FakeProxy("b"), fit_result(config, 8, 1, 0)),
    ]
    strategy.aggregate_fit(1, results, [])
    assert [c["bitwidth"] for c in strategy.round.record["clients"]] == [4]
    assert strategy.round.record["failed"] == ["b"]


def test_identical_models_get_identical_dq_losses_and_weights(config):
    """Every client's de-quantization sees the same views of D_g in the same order, so L_DQ
    compares models, not augmentation luck."""
    server = rounds.server_round_for(config, server_data(config))
    same = decode_state(parameters_to_ndarrays(fit_result(config, 4, 0).parameters))
    other = decode_state(parameters_to_ndarrays(fit_result(config, 4, 1).parameters))
    outcome = server.run(
        1, server.initial_state(), {0: same, 1: same, 2: other}, dict.fromkeys(range(3), 10), {4}
    )
    first, second, third = outcome.dq_losses
    assert first == second and first != third
    assert outcome.weights[0] == outcome.weights[1]
    assert np.allclose(outcome.weights, softmax_weights(outcome.dq_losses))


def initial(config):
    return rounds.server_round_for(config, server_data(config)).initial_state()


def test_server_fine_tunes_keep_float32_for_backward_whatever_save_codes_says(config, monkeypatch):
    """The server is not a low-bit device: its s-bit re-quantization never takes the slower
    codes-saving path, and its result is what the codes path gives (bit for bit)."""
    assert config.save_codes  # the default: clients save codes
    server = rounds.server_round_for(config, server_data(config))
    state = decode_state(parameters_to_ndarrays(fit_result(config, 4, 0).parameters))
    fast = server.requantize(1, state, {4})[4]
    entered = []
    monkeypatch.setattr(
        "common.learning.training.saving_codes",
        lambda: entered.append(1) or pytest.fail("codes path"),
    )
    server.requantize(1, state, {4})
    assert not entered
    monkeypatch.undo()
    model = new_model(config, 4, 1, 10)
    model.load_state_dict(state)
    seed = seeds.requantize_seed(config.seed, 1, 4)  # the seed requantize gives 4 bits in round 1
    fit_batches(
        model, server.views_of_buffer(config.requantize_epochs, seed), recipe(config, 4), seed
    )
    assert all(torch.equal(fast[k], v.cpu()) for k, v in model.state_dict().items())


def test_uniform_dq_weighting_drops_only_the_softmax(tmp_path, config):
    uniform = ExperimentConfig.from_mapping({**config.to_run_config(), "dq-weighting": "uniform"})
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(config, 4, key).parameters))
        for key in range(3)
    }
    outcomes = [
        rounds.server_round_for(c, server_data(c)).run(
            1,
            rounds.server_round_for(c, server_data(c)).initial_state(),
            states,
            dict.fromkeys(states, 10),
            {4},
        )
        for c in (config, uniform)
    ]
    softmax, flat = outcomes
    assert flat.weights == pytest.approx([1 / 3] * 3)
    assert flat.dq_losses == softmax.dq_losses  # same de-quantization, other weights
    assert not np.allclose(softmax.weights, flat.weights)


def test_finetune_control_averages_by_samples_then_trains_the_average_on_the_buffer(
    config, monkeypatch
):
    control = ExperimentConfig.from_mapping({**config.to_run_config(), "algorithm": "fedsimclr-ft"})
    server = rounds.server_round_for(control, server_data(control))
    assert type(server) is rounds.FineTuneRound
    calls = []
    train_on = server.train_on

    def recording(state, bits, views, seed, phase):
        calls.append((bits, len(views), phase))
        return train_on(state, bits, views, seed, phase)

    monkeypatch.setattr(server, "train_on", recording)
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(control, 4, key).parameters))
        for key in range(3)
    }
    outcome = server.run(1, server.initial_state(), states, {0: 10, 1: 10, 2: 20}, {4, 8})
    assert outcome.weights == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    # one full-precision fine-tune of the average (not one per client), then one per bitwidth
    assert calls == [
        (32, control.dequantize_epochs, "finetune"),
        (4, control.requantize_epochs, "requantize"),
        (8, control.requantize_epochs, "requantize"),
    ]
    average = average_states([states[k] for k in range(3)], outcome.weights)
    name = next(k for k, v in average.items() if v.is_floating_point() and v.ndim >= 2)
    assert not torch.allclose(outcome.global_state[name], average[name])  # trained on D_g
    assert sorted(outcome.requantized) == [4, 8] and outcome.dq_losses == [None] * 3


@settings(max_examples=60, deadline=None)
@given(
    log_weights=st.lists(
        st.floats(min_value=-700, max_value=700, allow_nan=False), min_size=1, max_size=6
    ),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_running_average_equals_the_softmax_weighted_average(log_weights, seed):
    generator = torch.Generator().manual_seed(seed)
    states = [
        {
            "w": torch.randn(5, generator=generator),
            "n": torch.randint(0, 9, (2,), generator=generator),
        }
        for _ in log_weights
    ]
    total = RunningAverage()
    for state, log_weight in zip(states, log_weights, strict=True):
        total.add(state, log_weight)
    expected = average_states(states, softmax_weights([-a for a in log_weights]))
    result = total.result(states[0])
    torch.testing.assert_close(result["w"], expected["w"], rtol=1e-6, atol=1e-6)
    assert torch.equal(result["n"], expected["n"])


def test_running_average_gives_zero_weight_to_minus_infinity_and_refuses_nan():
    total = RunningAverage()
    total.add({"w": torch.tensor([100.0])}, -math.inf)
    total.add({"w": torch.tensor([2.0])}, math.log(3))
    assert total.result({"w": torch.tensor([0.0])})["w"].item() == 2.0
    with pytest.raises(ValueError, match="log-weight"):
        total.add({"w": torch.tensor([1.0])}, math.nan)
    with pytest.raises(ValueError, match="positive weight"):
        RunningAverage().result({"w": torch.tensor([0.0])})


def received_states(config, count=3):
    return {
        key: decode_state(parameters_to_ndarrays(fit_result(config, 4, key, key).parameters))
        for key in range(count)
    }


def test_streamed_round_equals_dequantizing_every_model_then_averaging(config):
    """Today's result before streaming, rebuilt from the paper's steps: each model fine-tuned in
    full precision on D_g (same seed for all), p = softmax(-L_DQ), weighted average."""
    data = server_data(config)
    server = rounds.server_round_for(config, data)
    states = received_states(config)
    outcome = server.run(7, server.initial_state(), states, dict.fromkeys(states, 10), {4})
    seed = server.round_seed(7)
    dequantized, losses = [], []
    for key in sorted(states):
        model = server.new_model(FULL_PRECISION)
        model.load_state_dict(states[key])
        trained = fit_local(
            model,
            data.buffer,
            data.spec.augmentation(config.augmentation),
            dataclasses.replace(recipe(config, FULL_PRECISION), epochs=config.dequantize_epochs),
            seed,
        )
        dequantized.append({k: v.detach() for k, v in model.state_dict().items()})
        losses.append(trained.last_loss)
    weights = softmax_weights(losses, config.dq_temperature)
    expected = average_states(dequantized, weights)
    assert outcome.dq_losses == losses
    assert np.allclose(outcome.weights, weights)
    for name, tensor in expected.items():
        torch.testing.assert_close(outcome.global_state[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_server_holds_one_received_state_at_a_time(config):
    server = rounds.server_round_for(config, server_data(config))
    states = received_states(config, count=4)
    alive: list[weakref.ref] = []

    def decoder(key):
        def decode():
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier received state is still held"
            state = {name: tensor.clone() for name, tensor in states[key].items()}
            alive.append(weakref.ref(next(iter(state.values()))))
            return state

        return decode

    received = {key: decoder(key) for key in states}
    outcome = server.run(1, server.initial_state(), received, dict.fromkeys(states, 10), {4})
    assert outcome.keys == [0, 1, 2, 3] and len(alive) == 4


def test_a_model_that_diverges_on_the_buffer_is_refused_and_the_round_goes_on(config):
    """A model whose de-quantization loss is not finite (BatchNorm weights of 3e38: the strategy
    refuses those values before, the server step refuses their L_DQ too) does not end the round:
    it is refused, and the round equals the round without it."""
    server = rounds.server_round_for(config, server_data(config))
    states = received_states(config)
    poisoned = dict(states[2])
    for name in poisoned:
        if name.endswith("weight") and poisoned[name].dim() == 1:  # every BatchNorm scale
            poisoned[name] = torch.full_like(poisoned[name], 3e38)
    initial = server.initial_state()
    with_bad = server.run(1, initial, {**states, 2: poisoned}, dict.fromkeys(states, 10), {4})
    del states[2]
    without = server.run(1, initial, states, dict.fromkeys(states, 10), {4})
    assert with_bad.keys == without.keys == [0, 1]
    assert "de-quantization loss" in with_bad.refused[2]
    for name, tensor in without.global_state.items():
        assert torch.isfinite(with_bad.global_state[name].float()).all()
        torch.testing.assert_close(with_bad.global_state[name], tensor)


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
        assert strategy.round.record["failed"] == [case], case
        assert "sent a bad model" in strategy.round.record["failure-reasons"][0], case
        assert [c["partition-id"] for c in strategy.round.record["clients"]] == [0], case


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
    assert with_bad.round.record["failed"] == ["bad"]
    assert "sent a bad model" in with_bad.round.record["failure-reasons"][0]
    assert POISON_REFUSED[case] in with_bad.round.record["failure-reasons"][0]
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
    assert strategy.round.record["failed"] == ["bad"]
    assert key in strategy.round.record["failure-reasons"][0]
    json.dumps(strategy.round.record)  # what rounds.jsonl will hold stays JSON


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
    assert with_bad.round.record["failed"] == ["greedy"]
    assert "exceeds max-client-examples 100000" in with_bad.round.record["failure-reasons"][0]
    for name, tensor in without.global_state.items():
        torch.testing.assert_close(with_bad.global_state[name], tensor, rtol=0, atol=0)
    greedy.num_examples = config.max_client_examples  # at the bound: counted
    at_bound = strategy()
    at_bound.aggregate_fit(1, [*honest, (FakeProxy("greedy"), greedy)], [])
    assert at_bound.round.record["failed"] == []


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
