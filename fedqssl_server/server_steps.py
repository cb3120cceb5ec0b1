"""Fed-QSSL's server steps, free of Flower: de-quantize, weight, aggregate, re-quantize.

1. De-quantize: each received model is fine-tuned in *full precision* on the buffer D_g for
   ``dq-epochs``; ``L_DQ_k`` is the loss of its last epoch.
2. Weight: ``p_k = softmax(-L_DQ / dq-temperature)``.
3. Aggregate: the global model is ``sum_k p_k w'_k`` (floats; integer buffers take the maximum).
4. Re-quantize: once per distinct bitwidth s, the global model is fine-tuned on D_g with s-bit
   operations (``rq-epochs``) and encoded as s-bit codes for every client of that bitwidth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.codec import encode_state
from common.config import ExperimentConfig
from common.experiment import ExperimentData, new_model
from common.quant import FULL_PRECISION
from common.training import LowBitSettings, fit_ssl

State = dict[str, torch.Tensor]


def softmax_weights(losses: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """``p_k = exp(-L_k / T) / sum_j exp(-L_j / T)``, computed stably."""
    scores = -np.asarray(losses, dtype=np.float64) / temperature
    if not np.isfinite(scores).all():
        raise ValueError(f"de-quantization losses must be finite, got {list(losses)}")
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Weighted average of floating tensors; integer buffers (BatchNorm counters) take the max."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    averaged: State = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = sum(
                float(w) * s[name].double() for s, w in zip(states, weights, strict=True)
            ).to(first.dtype)
        else:
            averaged[name] = torch.stack([s[name] for s in states]).max(dim=0).values
    return averaged


@dataclass
class RoundOutcome:
    """What one server round produced, for the strategy and the results files."""

    global_state: State
    dq_losses: list[float]
    weights: list[float]
    downlink: dict[int, list[np.ndarray]]
    seconds: dict[str, float] = field(default_factory=dict)


class FedQSSLServer:
    """The server's half of Fed-QSSL on its buffer D_g."""

    def __init__(self, config: ExperimentConfig, data: ExperimentData) -> None:
        self.config = config
        self.buffer = data.buffer().images
        self.channels = data.train.channels
        self.augmentation = data.augmentation()

    def initial_state(self) -> State:
        return new_model(self.config, FULL_PRECISION, self.channels).state_dict()

    def finetune(self, state: Mapping[str, torch.Tensor], bits: int, epochs: int, seed: int):
        """Fine-tune ``state`` on D_g at ``bits`` (32: full precision); (state, last loss)."""
        model = new_model(self.config, bits, self.channels)
        model.load_state_dict(state)
        settings = LowBitSettings(bits, self.config.weight_update, self.config.grad_rounding)
        losses = fit_ssl(
            model,
            self.buffer,
            self.augmentation,
            settings,
            epochs,
            self.config.learning_rate,
            self.config.batch_size,
            self.config.temperature,
            seed,
        )
        return model.state_dict(), losses[-1] if losses else float("nan")

    def run_round(
        self, server_round: int, received: Mapping[int, State], bitwidths: Iterable[int]
    ) -> RoundOutcome:
        """De-quantize ``received`` models (keyed by client: seeds and order follow the key, not
        arrival), weight, aggregate, re-quantize for ``bitwidths``. Lists follow sorted keys."""
        seed = self.config.seed * 1_000_003 + server_round * 1_000_000
        start = time.perf_counter()
        dequantized = [
            self.finetune(received[key], FULL_PRECISION, self.config.dq_epochs, seed + key)
            for key in sorted(received)
        ]
        losses = [loss for _, loss in dequantized]
        weights = softmax_weights(losses, self.config.dq_temperature)
        after_dq = time.perf_counter()
        global_state = average_states([state for state, _ in dequantized], weights)
        after_aggregate = time.perf_counter()
        downlink = {
            bits: encode_state(
                self.finetune(global_state, bits, self.config.rq_epochs, seed + 500_000 + bits)[0],
                bits,
            )
            for bits in sorted(set(bitwidths))
        }
        end = time.perf_counter()
        return RoundOutcome(
            global_state=global_state,
            dq_losses=losses,
            weights=weights.tolist(),
            downlink=downlink,
            seconds={
                "dequantize": after_dq - start,
                "aggregate": after_aggregate - after_dq,
                "requantize": end - after_aggregate,
            },
        )
