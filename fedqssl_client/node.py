"""What a node's config says about the device: its partition, its bitwidth, where its data is.

Read once per ClientApp call (``node_settings``): the partition id is parsed here only, checked
against the run's ``num-clients``, and a deployed node's own ``bitwidth`` must agree with the
run's ``bitwidths`` entry for its partition (the assignment the server holds every claim to).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, ExperimentConfig, check_bitwidth, parse_bitwidths
from common.vocabulary import is_whole_number

Scalar = bool | bytes | float | int | str
# every key a node config may hold (Flower's simulation sets the first two)
NODE_KEYS = ("partition-id", "num-partitions", "bitwidth", "data-dir", "local-data", "model-dir")


def check_node_keys(node_config: Mapping[str, Scalar]) -> None:
    """A key the node config may not hold (a typo: ``bitwdith=8``) is a ConfigError naming the
    known keys, never silently ignored."""
    for key in node_config:
        if key not in NODE_KEYS:
            close = difflib.get_close_matches(str(key), NODE_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown node config key {key!r}: {hint}a node config holds {', '.join(NODE_KEYS)}"
            )


def node_int(node_config: Mapping[str, Scalar], key: str) -> int:
    """A whole-number node config value (an int, or a string of digits as Flower's own
    simulation may pass); 1.7, true or "one" is a ConfigError naming the key."""
    value = node_config[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and is_whole_number(value.strip()):
        return int(value)
    raise ConfigError(f"node config {key} must be a whole number like 0, got {value!r}")


@dataclass(frozen=True)
class NodeSettings:
    """One device as its node config describes it."""

    config: ExperimentConfig  # the run config as this node sees it (its data-dir)
    partition_id: int
    bits: int
    local_data: str  # its own folder ("": its partition of the run's dataset)
    model_dir: str  # where it keeps its personalized model ("": see ``model_folder``)

    def model_folder(self) -> str:
        """Where this device keeps its personalized model after the last round: its node
        config's ``model-dir``; else, when the run's folder exists on this machine (simulation,
        or a device sharing the server's disk), that folder's ``models/``; else nowhere."""
        if self.model_dir:
            return self.model_dir
        output = self.config.output_dir
        return str(Path(output) / "models") if output and Path(output).is_dir() else ""


def node_settings(
    run_config: Mapping[str, Scalar], node_config: Mapping[str, Scalar]
) -> NodeSettings:
    """The device of ``node_config`` in the run of ``run_config``. A deployed SuperNode's
    ``data-dir`` names where it finds the run's dataset (to cut its partition from); its
    ``local-data``, its own folder, replaces that partition."""
    check_node_keys(node_config)
    values = dict(run_config)
    if "data-dir" in node_config:
        values["data-dir"] = str(node_config["data-dir"])
    config = ExperimentConfig.from_mapping(values)
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has no partition-id: start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N bitwidth=B"'
        )
    partition_id = node_int(node_config, "partition-id")
    partitions = (
        node_int(node_config, "num-partitions")
        if "num-partitions" in node_config
        else config.num_clients
    )
    if partitions != config.num_clients or not 0 <= partition_id < config.num_clients:
        n = config.num_clients
        raise ValueError(
            f"node has partition-id {partition_id} of num-partitions {partitions}, but the run "
            f"has num-clients {n}. Simulation: one SuperNode per client, "
            f'flwr run . --federation-config "num-supernodes={n}" (or set num-clients={partitions}'
            f"); deployment: start {n} SuperNodes with partition-id 0..{n - 1} and "
            f"num-partitions={n}"
        )
    bits = _bitwidth(config, partition_id, node_config.get("bitwidth"))
    return NodeSettings(
        config,
        partition_id,
        bits,
        str(node_config.get("local-data", "")),
        str(node_config.get("model-dir", "")),
    )


def placed_device(config: ExperimentConfig, ray_gpus: list | None) -> ExperimentConfig:
    """``config`` with the device the scheduler placed this client on, said outright: in a Ray
    simulation (``ray_gpus``: the GPU ids Ray gave this actor) a client given no GPU trains on
    the CPU, whatever GPUs the process can see (Ray hides them today and says it will stop),
    and ``device: cuda`` without a GPU share is refused; outside Ray (``None``), as configured."""
    if ray_gpus is None or ray_gpus:
        return config
    if config.device == "cuda":
        raise ConfigError(
            "device is 'cuda' but Ray gave this client no GPU: give clients a GPU share "
            "(simulation.py --gpus-per-client 0.25, or flwr run's federation config "
            "client-resources-num-gpus), or set device to 'auto' or 'cpu'"
        )
    return dataclasses.replace(config, device="cpu")


def _bitwidth(config: ExperimentConfig, partition: int, declared: Scalar | None) -> int:
    """The run's bitwidth for ``partition``; a node's declared ``bitwidth`` (what the device can
    compute) must agree with it, or the node refuses to train."""
    assigned = config.bitwidths[partition]
    if declared is None:
        return assigned
    parsed = parse_bitwidths(str(declared))
    if len(parsed) != 1:
        raise ConfigError(f"node config bitwidth must be one value, got {parsed}")
    if check_bitwidth(parsed[0]) != assigned:
        raise ConfigError(
            f"this node computes at {parsed[0]} bits (node config bitwidth), but the run "
            f"assigns partition {partition} {assigned} bits: give the run config "
            f"bitwidths with {parsed[0]} at position {partition} (one value per partition)"
        )
    return assigned
