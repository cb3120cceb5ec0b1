"""The server's half of every algorithm, free of Flower.

Fed-QSSL (``FedQSSLServer``):

1. De-quantize: each received model is fine-tuned in *full precision* on the buffer D_g for
   ``dq-epochs``; ``L_DQ_k`` is the loss of its last epoch. Every client of a round gets the same
   augmented views in the same order, so ``L_DQ`` compares models, not augmentation luck.
2. Weight: ``p_k = softmax(-L_DQ / dq-temperature)`` (``dq-weighting = "uniform"``: ``1/K``, the
   control that measures what the softmax adds).
3. Aggregate: the global model is ``sum_k p_k w'_k`` (floats; integer buffers take the maximum).
4. Re-quantize: once per distinct bitwidth s, the global model is fine-tuned on D_g with s-bit
   operations (``rq-epochs``) and encoded as s-bit codes for every client of that bitwidth.

Baselines: ``AveragingServer`` (Fed-SimCLR, Fed-SimSiam, FedAvg, FedProx) averages the received
models weighted by sample count; ``UpdateServer`` (FedPAQ) adds the sample-weighted mean of the
received updates to the global model. Both re-quantize by rounding only (``encode_state``).
``FineTuneServer`` (Fed-SimCLR + D_g fine-tune) is the buffer control: the plain sample-weighted
average, then the same full-precision fine-tune on D_g and per-bitwidth re-quantization as
Fed-QSSL, so the buffer's extra training is separated from Fed-QSSL's weighting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.algorithms import get_algorithm
from common.codec import encode_state
from common.config import ExperimentConfig
from common.experiment import ServerData, new_model
from common.quant import FULL_PRECISION
from common.training import LowBitSettings, fit_local

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


def cpu_state(model: torch.nn.Module) -> State:
    """A model's state on the CPU: the server keeps and combines states there, whatever device
    trained them (decoded payloads arrive on the CPU)."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def sample_weights(examples: Sequence[int]) -> np.ndarray:
    """FedAvg's weights ``n_k / sum_j n_j``."""
    counts = np.asarray(examples, dtype=np.float64)
    if len(counts) == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"sample counts must be >= 0 with a positive sum, got {list(examples)}")
    return counts / counts.sum()


def apply_update(
    current: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> State:
    """``current + sum_k w_k update_k`` for floating tensors; integer tensors (sent as values,
    not differences) take the maximum, as in ``average_states``."""
    mean_update = average_states(updates, weights)
    return {
        name: (tensor.double() + mean_update[name].double()).to(tensor.dtype)
        if tensor.is_floating_point()
        else mean_update[name]
        for name, tensor in current.items()
    }


@dataclass
class RoundOutcome:
    """What one server round produced, for the strategy and the results files."""

    global_state: State
    weights: list[float]
    downlink: dict[int, list[np.ndarray]]
    dq_losses: list[float | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class AveragingServer:
    """Sample-weighted averaging, re-quantization by rounding (Fed-SimCLR/SimSiam, FedAvg/Prox)."""

    def __init__(self, config: ExperimentConfig, data: ServerData) -> None:
        self.config = config
        self.channels = data.spec.channels
        self.num_classes = data.spec.num_classes

    def new_model(self, bits: int):
        return new_model(self.config, bits, self.channels, self.num_classes)

    def initial_state(self) -> State:
        return cpu_state(self.new_model(FULL_PRECISION))

    def combine(self, current: State, states: list[State], weights: np.ndarray) -> State:
        return average_states(states, weights)

    def run_round(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, State],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """Aggregate ``received`` (keyed by client; lists follow sorted keys) into the new global
        model and round it to each of ``bitwidths``."""
        start = time.perf_counter()
        keys = sorted(received)
        weights = sample_weights([examples[key] for key in keys])
        global_state = self.combine(current, [received[key] for key in keys], weights)
        after_aggregate = time.perf_counter()
        downlink = {bits: encode_state(global_state, bits) for bits in sorted(set(bitwidths))}
        return RoundOutcome(
            global_state=global_state,
            weights=weights.tolist(),
            downlink=downlink,
            dq_losses=[None] * len(keys),
            seconds={
                "aggregate": after_aggregate - start,
                "requantize": time.perf_counter() - after_aggregate,
            },
        )


class UpdateServer(AveragingServer):
    """FedPAQ: the received payloads are model updates; their weighted mean moves the model."""

    def combine(self, current: State, states: list[State], weights: np.ndarray) -> State:
        return apply_update(current, states, weights)


class FedQSSLServer(AveragingServer):
    """The server's half of Fed-QSSL on its buffer D_g."""

    def __init__(self, config: ExperimentConfig, data: ServerData) -> None:
        super().__init__(config, data)
        self.buffer = data.buffer
        self.augmentation = data.spec.augmentation()

    def finetune(self, state: Mapping[str, torch.Tensor], bits: int, epochs: int, seed: int):
        """Fine-tune ``state`` on D_g at ``bits`` (32: full precision); (state, last loss).
        The seed fixes D_g's augmented views and batch order."""
        model = self.new_model(bits)
        model.load_state_dict(state)
        settings = LowBitSettings(bits, self.config.weight_update, self.config.grad_rounding)
        losses = fit_local(
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
        return cpu_state(model), losses[-1] if losses else float("nan")

    def round_seed(self, server_round: int) -> int:
        return self.config.seed * 1_000_003 + server_round * 1_000_000

    def dequantize(
        self, server_round: int, received: Mapping[int, State]
    ) -> tuple[list[State], list[float]]:
        """Each received model fine-tuned in full precision on D_g, and its L_DQ, in key order.
        Every client of a round sees the same views of D_g in the same order, so L_DQ compares
        the models, not their augmentation luck (identical models get identical losses)."""
        seed = self.round_seed(server_round)
        dequantized = [
            self.finetune(received[key], FULL_PRECISION, self.config.dq_epochs, seed)
            for key in sorted(received)
        ]
        return [state for state, _ in dequantized], [loss for _, loss in dequantized]

    def weigh(self, losses: Sequence[float], examples: Sequence[int]) -> np.ndarray:
        """softmax(-L_DQ / T), or uniform weights (``dq-weighting: uniform``, the control that
        measures what the softmax adds)."""
        if self.config.dq_weighting == "uniform":
            return np.full(len(losses), 1.0 / len(losses))
        return softmax_weights(losses, self.config.dq_temperature)

    def requantize(
        self, server_round: int, global_state: State, bitwidths: Iterable[int]
    ) -> dict[int, list[np.ndarray]]:
        """The global model fine-tuned on D_g with s-bit operations for each bitwidth s, as
        s-bit codes."""
        seed = self.round_seed(server_round) + 500_000
        return {
            bits: encode_state(
                self.finetune(global_state, bits, self.config.rq_epochs, seed + bits)[0], bits
            )
            for bits in sorted(set(bitwidths))
        }

    def run_round(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, State],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """De-quantize ``received`` models (keyed by client: order follows the key, not
        arrival), weight, aggregate, re-quantize for ``bitwidths``. Lists follow sorted keys."""
        start = time.perf_counter()
        states, losses = self.dequantize(server_round, received)
        weights = self.weigh(losses, [examples[key] for key in sorted(received)])
        after_dq = time.perf_counter()
        global_state = average_states(states, weights)
        after_aggregate = time.perf_counter()
        downlink = self.requantize(server_round, global_state, bitwidths)
        return RoundOutcome(
            global_state=global_state,
            weights=weights.tolist(),
            downlink=downlink,
            dq_losses=losses,
            seconds={
                "dequantize": after_dq - start,
                "aggregate": after_aggregate - after_dq,
                "requantize": time.perf_counter() - after_aggregate,
            },
        )


class FineTuneServer(FedQSSLServer):
    """The ``fedsimclr-ft`` control: the sample-weighted average of the received models,
    fine-tuned once in full precision on D_g (``dq-epochs``) and re-quantized by fine-tuning as
    Fed-QSSL does; no per-client de-quantization, no loss-based weights."""

    def run_round(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, State],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """Average, fine-tune the average on D_g in full precision, re-quantize by fine-tuning."""
        start = time.perf_counter()
        keys = sorted(received)
        weights = sample_weights([examples[key] for key in keys])
        average = average_states([received[key] for key in keys], weights)
        after_aggregate = time.perf_counter()
        global_state, _ = self.finetune(
            average, FULL_PRECISION, self.config.dq_epochs, self.round_seed(server_round)
        )
        after_finetune = time.perf_counter()
        downlink = self.requantize(server_round, global_state, bitwidths)
        return RoundOutcome(
            global_state=global_state,
            weights=weights.tolist(),
            downlink=downlink,
            dq_losses=[None] * len(keys),
            seconds={
                "aggregate": after_aggregate - start,
                "finetune": after_finetune - after_aggregate,
                "requantize": time.perf_counter() - after_finetune,
            },
        )


SERVERS = {
    "fedqssl": FedQSSLServer,
    "finetune": FineTuneServer,
    "average": AveragingServer,
    "update": UpdateServer,
}


def make_server(config: ExperimentConfig, data: ServerData) -> AveragingServer:
    """The server steps of ``config.algorithm``."""
    return SERVERS[get_algorithm(config.algorithm).server_step](config, data)
