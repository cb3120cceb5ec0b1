"""A checkpoint checked against the run it is to continue, before anything is restored or any
record rewritten: a damaged, foreign or stale checkpoint is refused with one line naming the
file and what is wrong, and every file of the run stays as it was."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from common.config import ExperimentConfig
from common.runs.checkpoint import Checkpoint, CheckpointError, load
from common.runs.experiment import run_model
from common.vocabulary import FULL_PRECISION
from common.wire.payload import PayloadError, decode_state


def model_template(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The state dict of the run's full-precision model: what a saved global model must match."""
    return run_model(config, FULL_PRECISION).state_dict()


def checkpoint_problem(
    saved: Checkpoint, config: ExperimentConfig, template: Mapping[str, torch.Tensor]
) -> str | None:
    """What makes ``saved`` unfit to continue ``config`` (None: it fits)."""
    if not 0 <= saved.round < config.num_rounds:
        return f"round {saved.round} is outside this run's rounds 0..{config.num_rounds - 1}"
    if list(saved.global_state) != list(template):
        missing = sorted(set(template) - set(saved.global_state))
        extra = sorted(set(saved.global_state) - set(template))
        return f"its model's tensors differ from this run's (missing {missing}, extra {extra})"
    for name, array in saved.global_state.items():
        expected = template[name]
        if tuple(array.shape) != tuple(expected.shape):
            shapes = f"{tuple(array.shape)}, the model {tuple(expected.shape)}"
            return f"tensor {name} has shape {shapes}"
        if str(array.dtype) != str(expected.dtype).removeprefix("torch."):
            return f"tensor {name} is {array.dtype}, the model's is {expected.dtype}"
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"tensor {name} holds non-finite values"
    for bits, payload in saved.downlink.items():
        if bits not in config.bitwidths:
            return f"it holds a {bits}-bit downlink, but the run's bitwidths are {config.bitwidths}"
        try:
            decode_state(payload, expect_bits=bits, template=template)
        except PayloadError as error:
            return f"its {bits}-bit downlink does not decode: {error}"
    for partition, payload in saved.personal.items():
        if not 0 <= partition < config.num_clients:
            return f"it holds the own model of partition {partition}, not a partition of this run"
        try:
            decode_state(payload, expect_bits=config.bitwidths[partition], template=template)
        except PayloadError as error:
            return f"partition {partition}'s own model does not decode: {error}"
    for partition, bits in saved.partition_bits.items():
        if not 0 <= partition < config.num_clients or config.bitwidths[partition] != bits:
            return f"partition {partition} at {bits} bits is not a partition of this run"
    rounds = [record.get("round") if isinstance(record, dict) else None for record in saved.records]
    if rounds != list(range(1, saved.round + 1)):
        return f"its records are of rounds {rounds}, not 1..{saved.round}"
    if not (math.isfinite(saved.wall_seconds) and saved.wall_seconds >= 0):
        return f"its wall time {saved.wall_seconds} is not a number of seconds"
    return None


def checked_checkpoint(path: Path, config: ExperimentConfig) -> Checkpoint:
    """The checkpoint at ``path``, read and checked against ``config``; a ``CheckpointError``
    naming the file otherwise."""
    saved = load(path)
    problem = checkpoint_problem(saved, config, model_template(config))
    if problem is not None:
        raise CheckpointError(
            f"{path} cannot continue this run: {problem}. Nothing was changed; delete the "
            "checkpoint to start the run over, or resume with the config it was written by"
        )
    return saved
