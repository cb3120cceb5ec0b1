"""The ClientApp: a LowBitClient from the run config, this node's config and its state."""

from __future__ import annotations

import os

from flwr.client import ClientApp
from flwr.common import Context

from common.config import ExperimentConfig
from fedqssl_client.client import LowBitClient, client_bitwidth, torch_threads


def client_fn(context: Context):
    config = ExperimentConfig.from_mapping(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    if not 0 <= partition_id < config.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{config.num_clients - 1} (num-clients)"
        )
    torch_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # Ray sets it to the num-cpus
    bits = client_bitwidth(config, context.node_config)
    return LowBitClient(config, partition_id, bits, context.state).to_client()


app = ClientApp(client_fn=client_fn)
