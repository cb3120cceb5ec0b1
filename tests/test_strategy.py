"""The low-bit strategy and its server steps, driven with fabricated Flower results; the server
streams (one received state at a time) with the result of de-quantizing all, then averaging."""

import json

import numpy as np
import pytest
from flower_fakes import FakeManager, FakeProxy, config_dir, fit_result, three_results
from flwr.common import (
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from reference_math import softmax_weights

from common.config import ExperimentConfig
from common.runs.experiment import server_data
from common.wire.packing import packed_size
from common.wire.payload import decode_state, is_quantized, payload_bits
from fedqssl_server import fine_tunes
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import RoundFailedError, strategy_for


def test_aggregation_weights_are_softmax_of_dq_losses_and_requantize_once_per_bitwidth(
    config, monkeypatch
):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    calls = []
    fine_tune = fine_tunes.fine_tune

    def counting(job):
        calls.append(job.bits)
        return fine_tune(job)

    monkeypatch.setattr(fine_tunes, "fine_tune", counting)
    proxies = [FakeProxy(str(i)) for i in range(3)]
    results = three_results(config, proxies)
    parameters, _ = strategy.aggregate_fit(1, results, [])
    # three de-quantizations at full precision, then one re-quantization per distinct bitwidth
    assert calls == [32, 32, 32, 4, 8]
    record = strategy.ledger.fit
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
    assert [c["partition-id"] for c in strategy.ledger.fit["clients"]] == [0]
    # an exception names no client: "unknown" in failed, its text among the reasons
    assert set(strategy.ledger.fit["failed"]) == {"b", "c", "unknown"}
    reasons = " ".join(strategy.ledger.fit["failure-reasons"])
    assert "payload is at 8 bits, the receiver expects 4" in reasons and "node lost" in reasons
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
    (line,) = (folder / "rounds.jsonl").read_text().splitlines()
    assert json.loads(line) == {"round": 1, "code-hash": recorder.code}
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
        # one weight per code (codes_to_weight's table): at most 2^bits values a layer
        assert all(v.unique().numel() <= 2**bits for _, v in quantized)
        assert arrays[1].size == packed_size(sum(v.numel() for _, v in quantized), bits)
        assert strategy.ledger.sent_bytes[proxy.cid] == sum(a.nbytes for a in arrays)


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


def test_a_repeated_partition_id_is_a_failure_not_a_silent_overwrite(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    results = [
        (FakeProxy("a"), fit_result(config, 4, 0, 0)),
        (FakeProxy("b"), fit_result(config, 8, 1, 0)),
    ]
    strategy.aggregate_fit(1, results, [])
    assert [c["bitwidth"] for c in strategy.ledger.fit["clients"]] == [4]
    assert strategy.ledger.fit["failed"] == ["b"]
