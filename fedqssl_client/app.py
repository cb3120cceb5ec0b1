"""The ClientApp: a LowBitClient from the run config, this node's config and its state, in a
process whose allocator the run config's ``allocator`` sets (``common.memory``).

A SuperNode started with ``--node-config "... local-data=/path"`` trains on that folder, whole;
otherwise on its partition of the run's dataset."""

from __future__ import annotations

import os

from flwr.client import ClientApp
from flwr.common import Context

from common.memory import configure_allocator
from common.runs.experiment import client_data
from fedqssl_client.client import LowBitClient, torch_threads
from fedqssl_client.node import node_settings, placed_device


def ray_gpu_ids() -> list | None:
    """The GPU ids Ray gave this process's actor; None outside a Ray simulation."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_gpu_ids() if ray.is_initialized() else None


def ray_node() -> str:
    """The id of the Ray node this actor runs on ("" outside a Ray simulation): on a cluster of
    several, each round's record says where a client's work went."""
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def client_fn(context: Context):
    """This node's client for this message (Flower builds one per call)."""
    node = node_settings(context.run_config, context.node_config)
    torch_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # Ray sets it to the num-cpus
    gpu_ids = ray_gpu_ids()
    configure_allocator(node.config.allocator, in_simulation=gpu_ids is not None)
    config = placed_device(node.config, gpu_ids)
    data = client_data(config, node.partition_id, node.local_data)
    client = LowBitClient(
        config, node.partition_id, node.bits, context.state, data, node.model_folder()
    )
    client.ray_node = ray_node()
    return client.to_client()


app = ClientApp(client_fn=client_fn)
