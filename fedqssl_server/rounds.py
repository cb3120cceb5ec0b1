"""One server round of every algorithm as the paper's named steps (Algorithm 1, lines 10-14:
collect, de-quantize on D_g, aggregate with DQ-loss weights, re-quantize per bitwidth), free of
Flower and the codec.

``ServerRound.run`` takes the decoded states the clients sent (or functions that decode them, so
one is held at a time) and returns the new global model and one model per bitwidth for the
downlink; the strategy decodes and encodes at the Flower boundary. Per client, in key order:

1. ``dequantized``: the received s_k-bit model becomes a full-precision one, w'_k (Fed-QSSL:
   fine-tuned in full precision on the buffer D_g, L_DQ_k the loss of its last epoch; every
   client of a round trains on the same views of D_g in the same order, so L_DQ compares models,
   not augmentation luck; the baselines: the decoded model itself);
2. ``weigh``: its log-weight, log p_k up to a constant (Fed-QSSL: -L_DQ_k / T, the paper's
   ``p_k = exp(-L_DQ_k) / sum_j exp(-L_DQ_j)``; the baselines: log n_k / n, FedAvg's weights);
   folded at once into a running weighted sum (``RunningAverage``: an online softmax), so a
   round holds O(1) model states however many clients report.

Then, once per round:

3. ``aggregate``: the global model ``w_G = sum_k p_k w'_k`` (FedPAQ: the current model plus the
   weighted mean update; the ``fedsimclr-ft`` control: the average, fine-tuned on D_g); with
   ``bn-recalibrate`` its BatchNorm statistics are then re-estimated on D_g (no gradient step;
   ``all``: each bitwidth's downlink's too, at its bitwidth, after step 4);
4. ``requantize``: one model per bitwidth s for the clients at s (Fed-QSSL: w_G fine-tuned on D_g
   with s-bit operations; the baselines: w_G itself, which the codec rounds onto the s-bit grid).

A received model whose L_DQ is not finite (it diverged on D_g), or whose weight is 0 (a client
reporting no training examples), is refused; the round goes on without it. ``run`` returns the
refusals with the outcome (no global model when every model was refused): the strategy's round
ledger decides what too few usable models mean.

The fine-tunes (de- and re-quantizations) run in this process or side by side in
``server-workers`` processes (``fedqssl_server.fine_tunes``); the numbers are the same up to the
floating-point order of another thread count. Every fine-tune counts its optimizer steps by
phase (``dequantize``, ``requantize``, ``finetune``, ``buffer``): the server's budget, recorded
beside the clients' in every round.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common import seeds
from common.algorithms import get_algorithm
from common.config import ConfigError, ExperimentConfig
from common.learning.batchnorm import recalibrate_batchnorm
from common.learning.training import augmented_epochs, steps_per_epoch, streamed_epochs
from common.runs.experiment import ServerData, new_model, torch_device
from common.vocabulary import FULL_PRECISION
from fedqssl_server.aggregation import RunningAverage, State, add_update, log_weight
from fedqssl_server.fine_tunes import FineTune, FineTuned, FineTunes, cpu_state

StateSource = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


def load(source: StateSource) -> Mapping[str, torch.Tensor]:
    """A received state, decoding it now if it arrived as a decoder (one state in memory)."""
    return source() if callable(source) else source


@dataclass(frozen=True)
class ClientOutcome:
    """What the server step made of one received model: its weight p_k, its de-quantization
    loss L_DQ_k (None where the algorithm has none) and the optimizer steps that took."""

    weight: float
    dq_loss: float | None
    dq_steps: int


@dataclass
class RoundOutcome:
    """What one server round produced, by client key (its partition), in key order: the received
    models that count (``clients``) and why the others do not (``refused``). ``global_state`` is
    None when every model was refused; ``requantized`` holds one model per bitwidth, as states:
    the strategy encodes them for the downlink."""

    global_state: State | None
    clients: dict[int, ClientOutcome]
    requantized: dict[int, State] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # the server's optimizer steps by phase
    seconds: dict[str, float] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    # each client's own next model, by key (``local-only``: its own, sent back); empty otherwise
    personal: dict[int, State] = field(default_factory=dict)


class ServerRound:
    """Plain averaging (Fed-SimCLR, Fed-SimSiam, FedAvg, FedProx): w'_k is the received model,
    p_k = n_k / n, w_G the weighted average, each bitwidth's downlink w_G rounded by the codec."""

    def __init__(self, config: ExperimentConfig, data: ServerData) -> None:
        self.config = config
        self.data = data
        self.step_counts: dict[str, int] = {}  # this round's optimizer steps by phase
        self.round_bitwidths: set[int] = set()
        if config.bn_recalibrate != "none" and len(data.buffer) < 2:
            raise ConfigError(
                f"bn-recalibrate re-estimates BatchNorm statistics on D_g, but it holds "
                f"{len(data.buffer)} image(s) (at least 2 are needed): raise buffer-ratio, put "
                "more images in buffer-dir, or set bn-recalibrate: none"
            )

    def close(self) -> None:
        """Release what the rounds hold between rounds (plain averaging holds nothing)."""

    def new_model(self, bits: int):
        """The algorithm's model at ``bits`` with the seed's initial weights."""
        return new_model(self.config, bits, self.data.spec.channels, self.data.spec.num_classes)

    def initial_state(self) -> State:
        """The seed's initial model, full precision, on the CPU."""
        return cpu_state(self.new_model(FULL_PRECISION))

    def views(self, server_round: int) -> list | None:
        """What every de-quantization of the round shares (Fed-QSSL: the views of D_g)."""
        return None

    def dequantized(
        self, received: Mapping[int, StateSource], views: list | None, server_round: int
    ) -> Iterator[tuple[int, Mapping[str, torch.Tensor], float | None, int]]:
        """(key, w'_k, L_DQ_k, its optimizer steps) of each received model, in key order, each
        decoded when reached: here the received model itself, no loss, no step."""
        for key in sorted(received):
            yield key, load(received[key]), None, 0

    def weigh(self, key: int, loss: float | None, examples: int, total_examples: int) -> float:
        """log p_k of partition ``key`` up to a constant: FedAvg's log(n_k / n)."""
        return log_weight(examples / total_examples if total_examples else 0.0)

    def aggregate(self, current: State, total: RunningAverage, server_round: int) -> State:
        """w_G = sum_k p_k w'_k."""
        return total.result(current)

    def recalibrated(self, state: Mapping[str, torch.Tensor], bits: int) -> State:
        """``state`` with its BatchNorm statistics re-estimated at ``bits`` on D_g (un-augmented,
        as the probes see images), no gradient step (``bn-recalibrate``)."""
        model = self.new_model(bits)
        model.load_state_dict(state)
        images = self.data.spec.normalize(self.data.buffer)
        recalibrate_batchnorm(model, images, self.config.batch_size)
        return cpu_state(model)

    def requantize(
        self, server_round: int, global_state: State, bitwidths: Iterable[int]
    ) -> dict[int, State]:
        """Each bitwidth's downlink model: w_G, put on the s-bit grid by the codec."""
        return dict.fromkeys(sorted(set(bitwidths)), global_state)

    def run(
        self,
        server_round: int,
        current: State,
        received: Mapping[int, StateSource],
        examples: Mapping[int, int],
        bitwidths: Iterable[int],
    ) -> RoundOutcome:
        """The round: dequantize and weigh each client in key order (not arrival order),
        folding it into the weighted sum at once, then aggregate and requantize. Models refused
        on the way are in the outcome's ``refused``; when none is left there is no global model."""
        start = time.perf_counter()
        self.step_counts = {}
        bitwidths = self.round_bitwidths = set(bitwidths)  # what this round re-quantizes for
        views = self.views(server_round)
        total = RunningAverage()
        total_examples = sum(examples[key] for key in received)
        kept: dict[int, tuple[float | None, float, int]] = {}  # key -> (L_DQ, log-weight, steps)
        refused: dict[int, str] = {}
        for key, state, loss, dq_steps in self.dequantized(received, views, server_round):
            if loss is not None and not math.isfinite(loss):
                refused[key] = f"client {key}: de-quantization loss {loss} on D_g, refused"
                continue
            weight = self.weigh(key, loss, examples[key], total_examples)
            if weight == -math.inf and examples[key] == 0:
                refused[key] = f"client {key}: reported 0 training examples, weight 0, left out"
                continue
            kept[key] = (loss, weight, dq_steps)
            total.add(state, weight)
        if not kept:
            return RoundOutcome(global_state=None, clients={}, refused=refused)
        after_dequantize = time.perf_counter()
        global_state = self.aggregate(current, total, server_round)
        if self.config.bn_recalibrate != "none":
            global_state = self.recalibrated(global_state, FULL_PRECISION)
        after_aggregate = time.perf_counter()
        requantized = self.requantize(server_round, global_state, bitwidths)
        if self.config.bn_recalibrate == "all":
            requantized = {bits: self.recalibrated(s, bits) for bits, s in requantized.items()}
        weights = normalized([weight for _, weight, _ in kept.values()]).tolist()
        return RoundOutcome(
            global_state=global_state,
            clients={
                key: ClientOutcome(weight, loss, steps)
                for (key, (loss, _, steps)), weight in zip(kept.items(), weights, strict=True)
            },
            requantized=requantized,
            steps=dict(self.step_counts),
            seconds={
                "dequantize": after_dequantize - start,
                "aggregate": after_aggregate - after_dequantize,
                "requantize": time.perf_counter() - after_aggregate,
            },
            refused=refused,
        )


def normalized(log_weights: Sequence[float]) -> np.ndarray:
    """p_k from log-weights, computed stably (the weights the running sum applied)."""
    scores = np.asarray(log_weights, dtype=np.float64)
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


class UpdateRound(ServerRound):
    """FedPAQ: clients send model updates; w_G is the current model plus their weighted mean."""

    def aggregate(self, current: State, total: RunningAverage, server_round: int) -> State:
        """w_G = w + sum_k p_k Δw_k."""
        return add_update(current, total.result(current))


class BufferRound(ServerRound):
    """What the rounds that train on the server's buffer D_g share: the check that D_g gives an
    optimizer step, seeded views of D_g, a fine-tune counted by phase, and re-quantization by
    s-bit fine-tuning (``finetuned_downlinks``)."""

    def __init__(self, config: ExperimentConfig, data: ServerData) -> None:
        super().__init__(config, data)
        self.augmentation = data.spec.augmentation(config.augmentation)
        self.steps_per_epoch = steps_per_epoch(len(data.buffer), config.batch_size)
        self.fine_tunes = FineTunes(config)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{config.algorithm} fine-tunes on the server buffer D_g, but its "
                f"{len(data.buffer)} image(s) give no optimizer step (at least 2 are needed): "
                "raise buffer-ratio, or put more images in buffer-dir"
            )

    def close(self) -> None:
        """Stop the server's worker processes (a later round would start new ones)."""
        self.fine_tunes.close()

    def round_seed(self, server_round: int) -> int:
        """The seed of the round's de-quantization (``common.seeds``)."""
        return seeds.server_round_seed(self.config.seed, server_round)

    def views_of_buffer(self, epochs: int, seed: int) -> list:
        """``epochs`` of seeded augmented batches of D_g, on the models' device, drawn at once
        (the round's models share them)."""
        return self._of_buffer(augmented_epochs, epochs, seed)

    def streamed_buffer(self, epochs: int, seed: int) -> Iterator:
        """The same batches as ``views_of_buffer``'s, one after another, each made as it is
        drawn (one model's long run of them)."""
        return self._of_buffer(streamed_epochs, epochs, seed)

    def _of_buffer(self, draw: Callable, epochs: int, seed: int):
        return draw(
            self.data.buffer,
            self.augmentation,
            epochs,
            self.config.batch_size,
            seed,
            torch_device(self.config),
        )

    def job(
        self, state: Mapping[str, torch.Tensor], bits: int, views, seed: int, phase: str
    ) -> FineTune:
        """A fine-tune of ``state`` at ``bits`` on given epochs of batches, counted as ``phase``."""
        spec = self.data.spec
        return FineTune(
            self.config, spec.channels, spec.num_classes, state, bits, views, seed, phase
        )

    def counted(self, done: FineTuned) -> FineTuned:
        """``done``, its optimizer steps added to its phase's count."""
        self.step_counts[done.phase] = self.step_counts.get(done.phase, 0) + done.steps
        return done

    def train_on(
        self, state: Mapping[str, torch.Tensor], bits: int, views, seed: int, phase: str
    ) -> tuple[State, float]:
        """``state`` trained at ``bits`` on given epochs of batches, in this process; (state,
        last loss). Its optimizer steps count towards ``phase``."""
        done = self.counted(self.fine_tunes.one(self.job(state, bits, views, seed, phase)))
        return done.state, done.last_loss

    def finetuned_downlinks(
        self, server_round: int, global_state: State, bitwidths: Iterable[int]
    ) -> dict[int, State]:
        """For each bitwidth s, w_G fine-tuned on D_g with s-bit operations (``rq-epochs``),
        so that the client at s receives an s-bit model shaped by the server's data (the
        paper's re-quantization); side by side with ``server-workers`` > 1."""
        seed = functools.partial(seeds.requantize_seed, self.config.seed, server_round)
        order = sorted(set(bitwidths))
        jobs = (
            self.job(
                global_state,
                bits,
                self.views_of_buffer(self.config.requantize_epochs, seed(bits)),
                seed(bits),
                "requantize",
            )
            for bits in order
        )
        return {
            bits: self.counted(done).state
            for bits, done in zip(order, self.fine_tunes.map(jobs), strict=True)
        }


class FedQSSLRound(BufferRound):
    """Fed-QSSL's server on its buffer D_g (the paper's Algorithm 1, server side):
    de-quantization by full-precision fine-tuning, softmax(-L_DQ) weights, re-quantization by
    s-bit fine-tuning."""

    def views(self, server_round: int) -> list:
        """D_g augmented once for the round: every client's de-quantization trains on these."""
        return self.views_of_buffer(self.config.dequantize_epochs, self.round_seed(server_round))

    def dequantized(self, received, views, server_round):
        """w'_k: each received model fine-tuned in full precision on the round's views of D_g
        for ``dq-epochs``; L_DQ_k is the loss of the last epoch (side by side with
        ``server-workers`` > 1, taken in key order)."""
        keys = sorted(received)
        seed = self.round_seed(server_round)
        jobs = (
            self.job(load(received[key]), FULL_PRECISION, views, seed, "dequantize") for key in keys
        )
        for key, done in zip(keys, self.fine_tunes.map(jobs), strict=True):
            yield key, self.counted(done).state, done.last_loss, done.steps

    def run(self, server_round, current, received, examples, bitwidths) -> RoundOutcome:
        """The round, knowing first the highest bitwidth among the models received (for
        ``dq-weighting: highest-bits``)."""
        if self.config.dq_weighting == "highest-bits":
            self.highest_bits = max((self.config.bitwidths[k] for k in received), default=None)
        return super().run(server_round, current, received, examples, bitwidths)

    def weigh(self, key, loss, examples, total_examples):
        """log p_k up to a constant: -L_DQ_k / T. The controls: ``dq-weighting: uniform``, 0
        (p_k = 1/K: what the softmax adds); ``highest-bits``, 0 for the models at the highest
        bitwidth received and -inf (p_k = 0) for the others (what a sharp softmax adds over
        dropping the low-bit models)."""
        if self.config.dq_weighting == "uniform":
            return 0.0
        if self.config.dq_weighting == "highest-bits":
            return 0.0 if self.config.bitwidths[key] == self.highest_bits else -math.inf
        return -loss / self.config.dq_temperature

    requantize = BufferRound.finetuned_downlinks


class FineTuneRound(BufferRound):
    """The ``fedsimclr-ft`` control: the buffer's extra training without Fed-QSSL's weighting.
    FedAvg's weights and no per-client de-quantization; the average is fine-tuned once in full
    precision on D_g (``dq-epochs``) and re-quantized by fine-tuning as Fed-QSSL does."""

    def aggregate(self, current, total, server_round):
        """w_G: the weighted average, fine-tuned in full precision on D_g."""
        seed = self.round_seed(server_round)
        views = self.views_of_buffer(self.config.dequantize_epochs, seed)
        return self.train_on(total.result(current), FULL_PRECISION, views, seed, "finetune")[0]

    requantize = BufferRound.finetuned_downlinks


def fedqssl_server_steps(
    config: ExperimentConfig, steps_per_epoch: int, clients: int, bitwidths: int
) -> int:
    """Fed-QSSL's server budget in a round of ``clients`` received models re-quantized for
    ``bitwidths`` bitwidths: one de-quantization each and one re-quantization per bitwidth, each
    ``epochs x steps_per_epoch`` steps."""
    return steps_per_epoch * (
        clients * config.dequantize_epochs + bitwidths * config.requantize_epochs
    )


class BufferOnlyRound(BufferRound):
    """The ``buffer-only`` control: what D_g alone teaches. Clients do not train and what they
    send back is ignored (uniform weights); each round the server trains the global model in
    full precision on D_g for the steps Fed-QSSL's server would take in that round
    (``fedqssl_server_steps``), and every bitwidth's downlink is that model rounded by the
    codec, scored as the others are."""

    def weigh(self, key, loss, examples, total_examples):
        return 0.0

    def aggregate(self, current, total, server_round):
        """w_G: the current global model trained on D_g for Fed-QSSL's round budget."""
        budget = fedqssl_server_steps(
            self.config, self.steps_per_epoch, total.count, len(self.round_bitwidths)
        )
        seed = self.round_seed(server_round)
        views = self.streamed_buffer(-(-budget // self.steps_per_epoch), seed)
        batches = itertools.islice(views, budget)  # made as trained on, not held at once
        return self.train_on(current, FULL_PRECISION, [batches], seed, "buffer")[0]


class LocalOnlyRound(ServerRound):
    """The ``local-only`` control, personalized FL's "Local" row: every client trains its own
    SimCLR model at its bitwidth from the seed's initial weights and keeps it; the server sends
    each client its own model back (the codes it sent re-encode to themselves), so no client
    sees another's. The global model is the sample-weighted average of the local models, scored
    as the others are and never sent: its global score says what one-shot averaging of
    independent models would give."""

    def dequantized(self, received, views, server_round):
        """Each received model as it is, kept as its client's own next model."""
        self.own: dict[int, State] = {}
        for key, state, loss, steps in super().dequantized(received, views, server_round):
            self.own[key] = dict(state)
            yield key, state, loss, steps

    def requantize(self, server_round, global_state, bitwidths):
        """No shared downlink: each client gets its own model (``personal``)."""
        return {}

    def run(self, server_round, current, received, examples, bitwidths) -> RoundOutcome:
        """Plain averaging for the global score; each kept client's own model as ``personal``."""
        outcome = super().run(server_round, current, received, examples, bitwidths)
        outcome.personal = {key: self.own[key] for key in outcome.clients}
        self.own = {}
        return outcome


ROUNDS: dict[str, type[ServerRound]] = {
    "fedqssl": FedQSSLRound,
    "finetune": FineTuneRound,
    "buffer": BufferOnlyRound,
    "average": ServerRound,
    "update": UpdateRound,
    "none": LocalOnlyRound,
}


def server_round_for(config: ExperimentConfig, data: ServerData) -> ServerRound:
    """The server steps of ``config.algorithm``."""
    return ROUNDS[get_algorithm(config.algorithm).server_step](config, data)
