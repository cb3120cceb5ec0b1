"""The ServerApp: the configured algorithm's strategy for ``num-rounds`` rounds."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from common.config import ConfigError, ExperimentConfig
from common.runs.checkpoint import resume_point
from common.runs.experiment import server_data
from common.runs.restore import checked_checkpoint
from fedqssl_server.results import RunRecorder, default_output_dir
from fedqssl_server.strategy import strategy_for


def server_fn(context: Context) -> ServerAppComponents:
    """The run's strategy; with ``resume`` it continues the run in ``output-dir`` from its last
    checkpoint (a finished run there: nothing to do; another config there: refused). Without
    ``resume`` a folder holding a finished run is refused before anything in it is touched."""
    config = ExperimentConfig.from_mapping(context.run_config)
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    if config.resume and not config.output_dir:
        raise ConfigError("resume needs output-dir: the folder of the run to continue")
    if not config.resume and (output_dir / "summary.json").exists():
        raise ConfigError(
            f"{output_dir} holds a finished run (summary.json); nothing was changed. To keep it "
            "and its results, resume it (run config resume=true, or simulation.py --resume), or "
            "give another output-dir for a new run"
        )
    point = resume_point(output_dir, config.to_dict()) if config.resume else None
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
    if point is not None:
        log(INFO, "resume: %s", point.note)
    finished = point is not None and point.finished
    # the whole checkpoint is checked before the records are touched: a refused one leaves them
    saved = None
    if point is not None and point.checkpoint is not None:
        saved = checked_checkpoint(point.checkpoint, config)
    strategy = strategy_for(config, server_data(config))
    if finished:
        strategy.round_offset = config.num_rounds
    else:
        strategy.recorder = RunRecorder(config, output_dir)
    if saved is not None:
        strategy.restore(saved)
    timeout = config.round_timeout or None  # deployment: a dead SuperNode must not stall a round
    return ServerAppComponents(
        strategy=strategy,
        config=ServerConfig(num_rounds=strategy.remaining_rounds(), round_timeout=timeout),
    )


app = ServerApp(server_fn=server_fn)
