"""The ServerApp: the configured algorithm's strategy for ``num-rounds`` rounds."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from common.config import ExperimentConfig
from common.experiment import server_data
from fedqssl_server.results import RunRecorder, default_output_dir
from fedqssl_server.strategy import LowBitStrategy


def server_fn(context: Context) -> ServerAppComponents:
    config = ExperimentConfig.from_mapping(context.run_config)
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    log(
        INFO,
        "%s: %d clients, bits %s, %s on %s; results -> %s",
        config.algorithm,
        config.num_clients,
        ",".join(map(str, config.bitwidths)),
        config.model,
        config.dataset,
        output_dir,
    )
    strategy = LowBitStrategy(config, server_data(config), RunRecorder(config, output_dir))
    timeout = config.round_timeout or None  # deployment: a dead SuperNode must not stall a round
    return ServerAppComponents(
        strategy=strategy,
        config=ServerConfig(num_rounds=config.num_rounds, round_timeout=timeout),
    )


app = ServerApp(server_fn=server_fn)
