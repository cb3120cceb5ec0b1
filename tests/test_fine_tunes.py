"""The server's fine-tunes side by side in worker processes (``server-workers``): the round's
numbers are the one-process numbers, results come in order, memory stays bounded, and a worker
that dies fails the round with an error that says what to change."""

import dataclasses
import os

import pytest
import torch
from core_helpers import losses_of, weights_of
from flower_fakes import FakeProxy, config_dir, fit_result, three_results
from flwr.common import parameters_to_ndarrays

from common.config import ConfigError, ExperimentConfig
from common.runs.experiment import server_data
from common.vocabulary import FULL_PRECISION
from common.wire.payload import decode_state
from fedqssl_server import rounds
from fedqssl_server.fine_tunes import FineTunes
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import strategy_for


def with_workers(config: ExperimentConfig, workers: int, **keys: object) -> ExperimentConfig:
    """``config`` with ``server-workers`` and any other run-config ``keys`` set."""
    return ExperimentConfig.from_mapping(  # on the CPU by name: workers are for CPU cores
        {**config.to_run_config(), "server-workers": workers, "device": "cpu", **keys}
    )


def received(config, count: int) -> dict[int, dict[str, torch.Tensor]]:
    return {
        key: decode_state(parameters_to_ndarrays(fit_result(config, 4, key, key).parameters))
        for key in range(count)
    }


def test_a_round_in_worker_processes_equals_the_round_in_one_process(config):
    states = received(config, 4)
    outcomes = {}
    for workers in (1, 2):
        server = rounds.server_round_for(with_workers(config, workers), server_data(config))
        try:
            outcomes[workers] = server.run(
                1, server.initial_state(), states, dict.fromkeys(states, 10), {4, 8}
            )
            if workers == 2:  # the fine-tunes really ran elsewhere, in both workers
                server.fine_tunes.start()
                pool = server.fine_tunes._started_pool()
                assert len(pool._processes) == 2
                assert pool.submit(os.getpid).result() != os.getpid()
        finally:
            server.fine_tunes.close()
    one, pooled = outcomes[1], outcomes[2]
    assert list(pooled.clients) == list(one.clients) == [0, 1, 2, 3]
    assert pooled.steps == one.steps and pooled.steps["dequantize"] > 0
    assert losses_of(pooled) == pytest.approx(losses_of(one), rel=1e-6)
    assert weights_of(pooled) == pytest.approx(weights_of(one), rel=1e-5)
    for name, tensor in one.global_state.items():
        torch.testing.assert_close(pooled.global_state[name], tensor, rtol=1e-5, atol=1e-6)
    assert sorted(pooled.requantized) == [4, 8]
    for bits, state in one.requantized.items():
        for name, tensor in state.items():
            torch.testing.assert_close(pooled.requantized[bits][name], tensor, rtol=1e-4, atol=1e-5)


def test_workers_take_jobs_lazily_and_return_them_in_order(config):
    """At most 2 x workers jobs are drawn before the first result: a round that decodes each
    received model when its job is drawn holds O(workers) states, however many clients."""
    server = rounds.server_round_for(with_workers(config, 2), server_data(config))
    views = server.views_of_buffer(1, seed=3)
    initial = server.initial_state()
    drawn = []

    def jobs():
        for index in range(7):
            drawn.append(index)
            yield server.job(initial, FULL_PRECISION, views, seed=index, phase=f"job-{index}")

    try:
        results = server.fine_tunes.map(jobs())
        first = next(results)
        assert len(drawn) <= 4
        phases = [first.phase] + [done.phase for done in results]
    finally:
        server.fine_tunes.close()
    assert phases == [f"job-{index}" for index in range(7)]


def test_a_worker_that_dies_fails_with_an_error_naming_server_workers(config):
    fine_tunes = FineTunes(with_workers(config, 2))
    try:
        future = fine_tunes._started_pool().submit(os._exit, 1)
        with pytest.raises(RuntimeError, match="server-workers"):
            fine_tunes._result(future)
        assert fine_tunes._pool is None  # closed: the next round starts new workers
    finally:
        fine_tunes.close()


def test_server_workers_must_be_a_positive_count(config):
    with pytest.raises(ConfigError, match="server-workers"):
        with_workers(config, 0)
    assert dataclasses.replace(config).server_workers == 1  # the default: one process


def test_the_strategy_stops_its_workers_after_the_last_round_not_before(config, monkeypatch):
    """Worker processes live for the run: kept between rounds, stopped when the last round's
    fine-tunes are done (not left to the interpreter's exit)."""
    config = with_workers(config, 2, **{"num-rounds": 2})
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    pools = []
    started_pool = FineTunes._started_pool

    def recording(self):
        pool = started_pool(self)
        if pool not in pools:
            pools.append(pool)
        return pool

    monkeypatch.setattr(FineTunes, "_started_pool", recording)
    proxies = [FakeProxy(str(i)) for i in range(3)]
    try:
        strategy.aggregate_fit(1, three_results(config, proxies), [])
        assert len(pools) == 1 and strategy.steps.fine_tunes._pool is pools[0]  # kept
        workers = list(pools[0]._processes.values())
        assert workers and all(worker.is_alive() for worker in workers)
        strategy.aggregate_fit(2, three_results(config, proxies), [])
        assert strategy.steps.fine_tunes._pool is None and len(pools) == 1  # the same, stopped
        assert not any(worker.is_alive() for worker in workers)
    finally:
        strategy.steps.close()


def test_workers_on_a_gpu_are_refused_at_start_not_at_the_first_fine_tune(config, monkeypatch):
    from fedqssl_server import fine_tunes

    monkeypatch.setattr(fine_tunes, "torch_device", lambda _: torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"server-workers: .* set server-workers: 1"):
        FineTunes(with_workers(config, 2))
    FineTunes(with_workers(config, 1))  # one process: nothing to refuse
