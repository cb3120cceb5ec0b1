"""Helpers the test modules share that need Flower: a tiny config and an in-process federation
(the Flower-free ones are in ``core_helpers``)."""

from pathlib import Path

from flower_fakes import FakeManager, FakeProxy, drive
from flwr.common import RecordDict

from common.config import ExperimentConfig
from common.runs.experiment import server_data
from fedqssl_client.client import LowBitClient
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import strategy_for


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


def tiny(tmp_path, name, **extra):
    return ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "model-width": 4,
            "num-clients": 3,
            "bitwidths": "2,4,8",
            "num-rounds": 4,
            "dirichlet-beta": 1.0,
            "buffer-ratio": 0.05,
            "batch-size": 16,
            "max-samples-per-client": 32,
            "probe-samples": 100,
            "output-dir": str(tmp_path / name),
            **extra,
        }
    )


def federation(config, ids):
    """Nodes with the given ids (node k holds partition k) and their in-process clients."""
    clients = {
        cid: LowBitClient(config, k, config.bitwidths[k], RecordDict()) for k, cid in enumerate(ids)
    }
    proxies = [FakeProxy(cid, clients[cid].get_properties({})) for cid in ids]
    return clients, proxies


def start(config):
    return strategy_for(config, server_data(config), RunRecorder(config, Path(config.output_dir)))
