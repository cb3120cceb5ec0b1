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

Every server streams: it loads, de-quantizes and folds one received model at a time into a
running weighted sum (``RunningAverage``, an online softmax for Fed-QSSL's weights), so a round
holds O(1) model states however many clients report; ``received`` maps each client to its state
or to a function that decodes it. D_g is augmented once per round and every de-quantization
trains on those same views.

Baselines: ``AveragingServer`` (Fed-SimCLR, Fed-SimSiam, FedAvg, FedProx) averages the received
models weighted by sample count; ``UpdateServer`` (FedPAQ) adds the sample-weighted mean of the
received updates to the global model. Both re-quantize by rounding only (``encode_state``).
``FineTuneServer`` (Fed-SimCLR + D_g fine-tune) is the buffer control: the plain sample-weighted
average, then the same full-precision fine-tune on D_g and per-bitwidth re-quantization as
Fed-QSSL, so the buffer's extra training is separated from Fed-QSSL's weighting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.algorithms import get_algorithm
from common.codec import encode_state
from common.config import ExperimentConfig
from common.experiment import ServerData, new_model, torch_device
from common.quant import FULL_PRECISION
from common.training import augmented_epochs, fit_batches

State = dict[str, torch.Tensor]
StateSource = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


def load(source: StateSource) -> Mapping[str, torch.Tensor]:
    """A received state, decoding it now if it arrived as a decoder (one state in memory)."""
    return source() if callable(source) else source


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


class RunningAverage:
    """``sum_k e^{a_k} x_k / sum_k e^{a_k}`` folded one state at a time: O(1) states held.

    ``a_k`` is a log-weight (``-L_DQ / T`` for Fed-QSSL, ``log n_k`` for sample weights); the
    running maximum of the ``a_k`` keeps every exponent <= 0 (online softmax), and the sums are
    rescaled when it grows. Integer buffers (BatchNorm counters) take the maximum, as in
    ``average_states``, whose result this equals up to float rounding.
    """

    def __init__(self) -> None:
        self.max_log_weight = -math.inf
        self.norm = 0.0
        self.total: State = {}

    def add(self, state: Mapping[str, torch.Tensor], log_weight: float) -> None:
        if math.isnan(log_weight) or log_weight == math.inf:
            raise ValueError(f"a log-weight must be a number below +inf, got {log_weight}")
        if log_weight > self.max_log_weight:
            if self.total and self.max_log_weight > -math.inf:
                rescale = math.exp(self.max_log_weight - log_weight)
                self.norm *= rescale
                for tensor in self.total.values():
                    if tensor.is_floating_point():
                        tensor.mul_(rescale)
            self.max_log_weight = log_weight
        weight = 0.0 if log_weight == -math.inf else math.exp(log_weight - self.max_log_weight)
        self.norm += weight
        for name, tensor in state.items():
            if name not in self.total:
                self.total[name] = (
                    tensor.double() * weight if tensor.is_floating_point() else tensor.clone()
                )
            elif tensor.is_floating_point():
                self.total[name].add_(tensor.double(), alpha=weight)
            else:
                self.total[name] = torch.maximum(self.total[name], tensor)

    def result(self, like: Mapping[str, torch.Tensor]) -> State:
        """The weighted average, in the dtypes of ``like``."""
        if self.norm <= 0:
            raise ValueError("no state with a positive weight was added")
        return {
            name: (self.total[name] / self.norm).to(tensor.dtype)
            if tensor.is_floating_point()
            else self.total[name]
            for name, tensor in like.items()
        }


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


def add_update(current: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> State:
    """``current + update`` for floating tensors; integer tensors (sent as values, not
    differences) take the update's."""
    return {
        name: (tensor.double() + update[name].double()).to(tensor.dtype)
        if tensor.is_floating_point()
        else update[name]
        for name, tensor in current.items()
    }


def apply_update(
    current: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> State:
    """``current + sum_k w_k update_k``; integer tensors take the maximum, as in
    ``average_states``."""
    return add_update(current, average_states(updates, weights))


def log_weight(weight: float) -> float:
    return math.log(weight) if weight > 0 else -math.inf


class AllRefusedError(ValueError):
    """Every received model of a round was refused by the server step (reasons in ``refused``)."""

    def __init__(self, refused: Mapping[int, str]) -> None:
        super().__init__("; ".join(refused.values()))
        self.refused = dict(refused)


@dataclass
class RoundOutcome:
    """What one server round produced, for the strategy and the results files. Lists follow
    ``keys``: the received clients that count, sorted; ``refused`` says why others do not."""

    global_state: State
    keys: list[int]
    weights: list[float]
    downlink: dict[int, list[np.ndarray]]
    dq_losses: list[float | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)


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

    def combine(self, current: State, average: State) -> State:
        """The new global model from the weighted average of what clients sent."""
        return average

    def sample_average(
        self, current: State, received: Mapping[int, StateSource], examples: Mapping[int, int]
    ) -> tuple[list[int], np.ndarray, State]:
        """(sorted keys, n_k / sum n_j, the weighted average), loading one state at a time."""
        keys = sorted(received)
        weights = sample_weights([examples[key] for key in keys])
        total = RunningAverage()
        for key, weight in zip(keys, weights, strict=True):
            total.add(load(received[key]), log_weight(weight))
        return keys, weights, total.result(current)

    def run_round(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, StateSource],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """Aggregate ``received`` (keyed by client) into the new global model and round it to
        each of ``bitwidths``."""
        start = time.perf_counter()
        keys, weights, average = self.sample_average(current, received, examples)
        global_state = self.combine(current, average)
        after_aggregate = time.perf_counter()
        downlink = {bits: encode_state(global_state, bits) for bits in sorted(set(bitwidths))}
        return RoundOutcome(
            global_state=global_state,
            keys=keys,
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

    def combine(self, current: State, average: State) -> State:
        return add_update(current, average)


class FedQSSLServer(AveragingServer):
    """The server's half of Fed-QSSL on its buffer D_g."""

    def __init__(self, config: ExperimentConfig, data: ServerData) -> None:
        super().__init__(config, data)
        self.buffer = data.buffer
        self.augmentation = data.spec.augmentation(config.augmentation)

    def finetune(self, state: Mapping[str, torch.Tensor], bits: int, epochs: int, seed: int):
        """Fine-tune ``state`` on D_g at ``bits`` (32: full precision); (state, last loss).
        The seed fixes D_g's augmented views and batch order."""
        return self.train_on(state, bits, self.views_of_buffer(epochs, seed), seed)

    def views_of_buffer(self, epochs: int, seed: int):
        """``epochs`` of seeded augmented batches of D_g, on the models' device."""
        return augmented_epochs(
            self.buffer,
            self.augmentation,
            epochs,
            self.config.batch_size,
            seed,
            torch_device(self.config),
        )

    def train_on(self, state: Mapping[str, torch.Tensor], bits: int, views, seed: int):
        """``state`` trained at ``bits`` on given epochs of batches; (state, last loss)."""
        model = self.new_model(bits)
        model.load_state_dict(state)
        losses = fit_batches(
            model,
            views,
            self.config.low_bit_settings(bits),
            self.config.learning_rate,
            self.config.temperature,
            seed,
        )
        return cpu_state(model), losses[-1] if losses else float("nan")

    def round_seed(self, server_round: int) -> int:
        return self.config.seed * 1_000_003 + server_round * 1_000_000

    def dequantize(self, state: Mapping[str, torch.Tensor], views, seed: int):
        """One received model fine-tuned in full precision on the round's views of D_g:
        (w'_k, L_DQ_k), the loss of its last epoch. Every client of a round trains on the same
        views in the same order, so L_DQ compares models, not augmentation luck."""
        return self.train_on(state, FULL_PRECISION, views, seed)

    def log_weight(self, loss: float) -> float:
        """log p_k up to a constant: ``-L_DQ / T`` (softmax), or 0 (``dq-weighting: uniform``,
        the control that measures what the softmax adds)."""
        return 0.0 if self.config.dq_weighting == "uniform" else -loss / self.config.dq_temperature

    def weigh(self, losses: Sequence[float]) -> np.ndarray:
        """``p_k = softmax(-L_DQ / T)`` (or 1/K), the weights the running sum applied."""
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
        received: Mapping[int, StateSource],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """De-quantize each received model (in key order, not arrival) and fold it into the
        p_k-weighted sum at once, then re-quantize the global model for ``bitwidths``. A model
        whose L_DQ is not finite (it diverged on D_g) is refused; the round goes on without it."""
        start = time.perf_counter()
        seed = self.round_seed(server_round)
        views = self.views_of_buffer(self.config.dq_epochs, seed)
        total = RunningAverage()
        losses: dict[int, float] = {}
        refused: dict[int, str] = {}
        for key in sorted(received):
            state, loss = self.dequantize(load(received[key]), views, seed)
            if not math.isfinite(loss):
                refused[key] = f"client {key}: de-quantization loss {loss} on D_g, refused"
                continue
            losses[key] = loss
            total.add(state, self.log_weight(loss))
        if not losses:
            raise AllRefusedError(refused)
        weights = self.weigh(list(losses.values()))
        after_dq = time.perf_counter()
        global_state = total.result(current)
        after_aggregate = time.perf_counter()
        downlink = self.requantize(server_round, global_state, bitwidths)
        return RoundOutcome(
            global_state=global_state,
            keys=list(losses),
            weights=weights.tolist(),
            downlink=downlink,
            dq_losses=list(losses.values()),
            seconds={
                "dequantize": after_dq - start,
                "aggregate": after_aggregate - after_dq,
                "requantize": time.perf_counter() - after_aggregate,
            },
            refused=refused,
        )


class FineTuneServer(FedQSSLServer):
    """The ``fedsimclr-ft`` control: the sample-weighted average of the received models,
    fine-tuned once in full precision on D_g (``dq-epochs``) and re-quantized by fine-tuning as
    Fed-QSSL does; no per-client de-quantization, no loss-based weights."""

    def run_round(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, StateSource],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """Average, fine-tune the average on D_g in full precision, re-quantize by fine-tuning."""
        start = time.perf_counter()
        keys, weights, average = self.sample_average(current, received, examples)
        after_aggregate = time.perf_counter()
        global_state, _ = self.finetune(
            average, FULL_PRECISION, self.config.dq_epochs, self.round_seed(server_round)
        )
        after_finetune = time.perf_counter()
        downlink = self.requantize(server_round, global_state, bitwidths)
        return RoundOutcome(
            global_state=global_state,
            keys=keys,
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
