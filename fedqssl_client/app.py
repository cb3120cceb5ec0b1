"""The ClientApp: a LowBitClient from the run config, this node's config and its state.

A SuperNode started with ``--node-config "... local-data=/path"`` trains on that folder, whole;
otherwise on its partition of the run's dataset."""

from __future__ import annotations

import os

from flwr.client import ClientApp
from flwr.common import Context

from common.experiment import client_data
from fedqssl_client.client import (
    LowBitClient,
    client_bitwidth,
    node_experiment_config,
    torch_threads,
)


def client_fn(context: Context):
    config = node_experiment_config(context.run_config, context.node_config)
    partition_id = int(context.node_config["partition-id"])
    torch_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # Ray sets it to the num-cpus
    bits = client_bitwidth(config, context.node_config)
    data = client_data(config, partition_id, str(context.node_config.get("local-data", "")))
    return LowBitClient(config, partition_id, bits, context.state, data).to_client()


app = ClientApp(client_fn=client_fn)
