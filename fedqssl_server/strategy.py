"""The Flower strategies: ``FedQSSL`` and the baselines, thin glue around ``rounds``.

Every algorithm's strategy is the same Flower glue (``LowBitStrategy``); what it does with what
clients send is its ``ServerRound`` (``fedqssl_server/rounds.py``), chosen by the algorithm's row
in ``common/algorithms.py``. The codec is called here only, at the Flower boundary: payloads are
decoded on the way in and each bitwidth's model is encoded on the way out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common.algorithms import get_algorithm
from common.config import ExperimentConfig
from common.runs.experiment import ServerData
from common.runs.saved_models import save_run_models
from common.vocabulary import FULL_PRECISION
from common.wire.payload import encode_state, payload_nbytes
from fedqssl_server import checkpoint
from fedqssl_server.intake import Accepted, failed, take_replies
from fedqssl_server.monitor import GlobalMonitor
from fedqssl_server.participants import Participants
from fedqssl_server.replies import EVALUATE_METRICS, reply_problem
from fedqssl_server.results import (
    RunRecorder,
    client_record,
    fit_record,
    local_record,
    mean_of,
    round_line,
    run_summary,
    weighted_loss,
)
from fedqssl_server.rounds import AllRefusedError, RoundOutcome, server_round_for


@dataclass
class RoundInProgress:
    """What one round's callbacks (configure_fit, aggregate_fit, evaluate) hand each other."""

    started: float = field(default_factory=time.perf_counter)
    sent_bytes: dict[str, int] = field(default_factory=dict)  # node -> downlink bytes
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (who, why), before fit
    record: dict = field(default_factory=dict)  # what the round adds to rounds.jsonl


class RoundFailedError(RuntimeError):
    """Too few clients returned a usable model: the run fails rather than report an untrained
    model as a result."""


class LowBitStrategy(Strategy):
    """Packed low-bit models both ways, one downlink per bitwidth, for the algorithm that
    ``algorithm`` (a subclass) or the config names.

    The contract with clients:

    - sends each sampled client a ``FitIns`` of its own: the packed codes of the model for its
      partition's bitwidth (the run's ``bitwidths``), or the full-precision global model before
      the server has one for that bitwidth, and ``{"server-round": R}``;
    - expects back the client's model (FedPAQ: its update) as packed codes at that bitwidth,
      ``num_examples`` and the metrics ``partition-id`` and ``bitwidth`` (``replies.py`` lists
      the optional ones and their types);
    - a failure, logged with its reason and recorded, is any reply that is not that: bytes that
      do not decode, a tensor an honest client at that bitwidth would not send, an implausible
      model, a bitwidth other than the partition's, a partition outside the run or bound to
      another connected node, metrics of the wrong type, more than ``max-client-examples``;
      and a model the server round refuses (L_DQ not finite). The round goes on without it; a
      round left with fewer than ``min-fit-clients`` models fails the run (``RoundFailedError``).

    Rounds are numbered as the run counts them: a run resumed from round R's checkpoint
    (``restore``) calls Flower's round 1 round R + 1. After the last round every client scores
    its own model (local accuracy) and the server writes the summary.
    """

    algorithm_name: str | None = None  # set by the named strategies below

    def __init__(
        self, config: ExperimentConfig, data: ServerData, recorder: RunRecorder | None = None
    ) -> None:
        if self.algorithm_name is not None and config.algorithm != self.algorithm_name:
            raise ValueError(
                f"{type(self).__name__} runs {self.algorithm_name}, but the config says "
                f"{config.algorithm}: use strategy_for(config, ...)"
            )
        self.config = config
        self.data = data
        self.algorithm = get_algorithm(config.algorithm)
        self.steps = server_round_for(config, data)
        self.monitor = GlobalMonitor(self.algorithm, data, self.steps.new_model, config)
        self.recorder = recorder
        self.global_state = self.steps.initial_state()
        self.global_payload: list[np.ndarray] | None = None  # its fp32 encoding, made once
        # the model's shape never changes, so neither does its full-precision payload size
        self.fp32_bytes = payload_nbytes(self._global_payload())
        self.nodes = Participants(config)
        self.round_offset = 0  # rounds completed before this process started (resume)
        self.downlink: dict[int, list[np.ndarray]] = {}
        self.round = RoundInProgress()
        self.final_scores: dict[str, float] = {}
        self.saved_models: dict[str, str] = {}  # name -> file in the run folder
        self.untrained_scores: dict[str, float] = {}

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Continue after ``saved.round`` completed rounds: its global model, downlinks,
        partitions and records."""
        self._set_global({k: torch.from_numpy(v) for k, v in saved.global_state.items()})
        self.downlink = saved.downlink
        self.nodes.partition_bits = dict(saved.partition_bits)
        self.round_offset = saved.round
        if self.recorder is not None:
            self.recorder.resume(saved.records, saved.wall_seconds)

    def remaining_rounds(self) -> int:
        """The rounds Flower still has to run (all of them unless resumed)."""
        return self.config.num_rounds - self.round_offset

    # ------------------------------------------------------------ the global model

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """The initial (or restored) global model, full precision."""
        return ndarrays_to_parameters(self._global_payload())

    def _set_global(self, state: dict) -> None:
        self.global_state = state
        self.global_payload = None

    def _global_payload(self) -> list[np.ndarray]:
        """The global model as fp32 payload, encoded once per model, not once per client."""
        if self.global_payload is None:
            self.global_payload = encode_state(self.global_state, FULL_PRECISION)
        return self.global_payload

    def _payload_for(self, partition: int | None) -> list[np.ndarray]:
        """The partition's own re-quantized model; the full-precision global one before there
        is one for its bitwidth or before the node is known."""
        bits = None if partition is None else self.config.bitwidths[partition]
        if bits in self.downlink:
            return self.downlink[bits]
        return self._global_payload()

    # ------------------------------------------------------------ fit

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One ``FitIns`` per sampled client, each with its own bitwidth's model."""
        server_round += self.round_offset
        self.round = RoundInProgress()
        # once there are downlinks each node needs its own bitwidth's: know who is who first
        sampled, self.round.left_out = self.nodes.sample(
            client_manager, server_round, know_all=bool(self.downlink)
        )
        instructions = []
        for client in sampled:
            payload = self._payload_for(self.nodes.partition_of.get(client.cid))
            self.round.sent_bytes[client.cid] = payload_nbytes(payload)
            # a fresh FitIns per client: each carries its own model
            instructions.append(
                (client, FitIns(ndarrays_to_parameters(payload), {"server-round": server_round}))
            )
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Decode and check every reply, run the algorithm's server round on the usable ones,
        and encode its model for each bitwidth (the downlink of the next round)."""
        server_round += self.round_offset
        ordered, refused_replies = take_replies(
            results,
            self.nodes,
            self.nodes.connected,
            self.global_state,
            self.algorithm.sends_updates,
            self.config.max_client_examples,
        )
        for _, reason in refused_replies:
            log(WARNING, "round %s: %s, left out", server_round, reason)
        left_out = [*self.round.left_out, *failed(failures), *refused_replies]
        sent = len(results) + len(failures) + len(self.round.left_out)
        self._require_enough(server_round, ordered, sent, left_out)
        outcome: RoundOutcome | None = None
        try:
            outcome = self.steps.run(
                server_round,
                self.global_state,
                {item.key: item.decode for item in ordered},
                {item.key: item.result.num_examples for item in ordered},
                self.nodes.bitwidths_seen(),
            )
            refused = outcome.refused
        except AllRefusedError as error:
            refused = error.refused
        client_of = {item.key: item.client.cid for item in ordered}
        for key, reason in refused.items():
            log(WARNING, "round %s: %s", server_round, reason)
            left_out.append((client_of[key], reason))
        ordered = [item for item in ordered if item.key not in refused]
        self._require_enough(server_round, ordered, sent, left_out)
        assert outcome is not None  # every model refused leaves none: the round failed above
        self._set_global(outcome.global_state)
        self.downlink = {
            bits: encode_state(state, bits) for bits, state in outcome.requantized.items()
        }
        self._record_fit(ordered, outcome, left_out)
        return ndarrays_to_parameters(self._global_payload()), {}

    def _require_enough(
        self, server_round: int, usable: list[Accepted], sent: int, left_out: list[tuple[str, str]]
    ) -> None:
        """Fail the round (recorded, then ``RoundFailedError``) below min-fit-clients models."""
        if len(usable) >= self.config.min_fit_clients:
            return
        message = (
            f"round {server_round}: {len(usable)} of {sent} clients returned a usable model, "
            f"fewer than min-fit-clients ({self.config.min_fit_clients}); first failure: "
            f"{left_out[0][1] if left_out else 'none reported'}"
        )
        self._record_fit(usable, None, left_out)
        if self.recorder is not None:
            self.recorder.add_round(self._round_record(server_round, error=message))
        raise RoundFailedError(message)

    def _record_fit(
        self, ordered: list[Accepted], outcome: RoundOutcome | None, left_out: list[tuple[str, str]]
    ) -> None:
        """The round's record of fit (``results.fit_record``), with what the server measured of
        each usable client: bytes each way, L_DQ and weight."""
        clients = [
            client_record(
                item.result.metrics,
                item.result.num_examples,
                **{
                    "uplink-bytes": item.uplink_bytes,
                    "downlink-bytes": self.round.sent_bytes.get(item.client.cid),
                    "dq-loss": None if outcome is None else outcome.dq_losses[index],
                    "dequantize-steps": None if outcome is None else outcome.dq_steps[index],
                    "weight": None if outcome is None else outcome.weights[index],
                },
            )
            for index, item in enumerate(ordered)
        ]
        self.round.record = fit_record(
            clients,
            left_out,
            self.config.num_clients,
            self.fp32_bytes,
            {} if outcome is None else outcome.seconds,
            {} if outcome is None else outcome.steps,
        )

    # ------------------------------------------------------------ evaluation

    def evaluate(self, server_round: int, parameters: Parameters):
        """kNN monitor of the global encoder each round. After the last, the final scores of
        the global model beside the untrained floor: the same scores of the initial model (the
        seed's weights every client starts from). Every round but the last ends with a
        checkpoint."""
        flower_round, server_round = server_round, server_round + self.round_offset
        if flower_round > 0 and server_round == self.config.num_rounds:
            self._save_models()
            self.final_scores = self.monitor.scores(self.global_state)
            self.untrained_scores = self.monitor.scores(self.steps.initial_state())
            knn = self.final_scores["knn-accuracy"]
            metrics: dict[str, Scalar] = {**self.final_scores}
        else:
            knn = self.monitor.knn(self.global_state)
            metrics = {"knn-accuracy": knn}
        loss = self.monitor.loss(self.global_state)
        if flower_round > 0:
            self._end_round(server_round, knn, loss)
            if server_round < self.config.num_rounds:
                self._save_checkpoint(server_round)
        return loss, metrics

    def _save_models(self) -> None:
        """What the run trained, kept in its folder before anything else can fail: the global
        model (full precision) and each bitwidth's downlink as sent
        (``common.runs.saved_models``)."""
        if self.recorder is not None:
            self.saved_models = save_run_models(
                self.recorder.output_dir, self._global_payload(), self.downlink
            )

    def _models_with(self, local: list[dict]) -> dict[str, str]:
        """The saved models, with each device's own that lies in the run folder (simulation),
        named ``client-K`` by a path relative to the folder; a device's record says the same."""
        models = dict(self.saved_models)
        folder = self.recorder.output_dir.resolve()
        for client in local:
            saved = client.get("saved-model")
            if saved and Path(saved).resolve().is_relative_to(folder):
                client["saved-model"] = str(Path(saved).resolve().relative_to(folder))
                models[f"client-{client['partition-id']}"] = client["saved-model"]
        return models

    def _save_checkpoint(self, server_round: int) -> None:
        """What the rounds after ``server_round`` depend on, to resume from (``restore``)."""
        if self.recorder is None:
            return
        checkpoint.save(
            checkpoint.Checkpoint(
                round=server_round,
                config=self.config.to_dict(),
                global_state={k: v.numpy() for k, v in self.global_state.items()},
                downlink=self.downlink,
                partition_bits=self.nodes.partition_bits,
                records=self.recorder.rounds,
                wall_seconds=self.recorder.elapsed(),
            ),
            checkpoint.checkpoint_path(self.recorder.output_dir),
        )

    def _round_record(self, server_round: int, **values) -> dict:
        """The round's record for ``rounds.jsonl``: what fit gathered, its seconds, ``values``."""
        return {
            **self.round.record,
            "round": server_round,
            **values,
            "round-seconds": time.perf_counter() - self.round.started,
        }

    def _end_round(self, server_round: int, knn: float, loss: float) -> None:
        record = self._round_record(server_round, **{"knn-accuracy": knn, "global-loss": loss})
        log(INFO, "%s", round_line(record, self.config.num_rounds))
        if self.recorder is not None:
            self.recorder.add_round(record)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """After the last round, every connected client scores its own re-quantized model."""
        server_round += self.round_offset
        if server_round != self.config.num_rounds:
            return []
        client_manager.wait_for(1)
        clients = sorted(client_manager.all().values(), key=lambda c: c.cid)
        if self.downlink:  # each node scores its own bitwidth's model: know who is who
            self.nodes.identify(clients, server_round)
        known = [c for c in clients if not self.downlink or c.cid in self.nodes.partition_of]
        return [
            (
                client,
                EvaluateIns(
                    ndarrays_to_parameters(
                        self._payload_for(self.nodes.partition_of.get(client.cid))
                    ),
                    {},
                ),
            )
            for client in known
        ]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The clients' local scores and their means, then the run's summary."""
        usable = []
        for client, reply in results:
            problem = reply_problem(
                reply.metrics, reply.num_examples, EVALUATE_METRICS, self.config.max_client_examples
            ) or self.nodes.evaluation_problem(
                client.cid,
                reply.metrics["partition-id"],
                reply.metrics["bitwidth"],
                {r.metrics["partition-id"] for r in usable},
            )
            if problem is None:
                usable.append(reply)
                continue
            log(
                WARNING, "evaluation: client %s sent a bad reply: %s, left out", client.cid, problem
            )
            failures = [*failures, RuntimeError(f"client {client.cid}: {problem}")]
        local = sorted(
            (local_record(r.metrics, r.num_examples) for r in usable),
            key=lambda c: c["partition-id"],
        )
        mean_local = mean_of(local, "local-accuracy")
        if self.recorder is not None:
            models = self._models_with(local)  # devices' paths made relative first
            summary = run_summary(
                self.algorithm,
                self.config,
                self.recorder.rounds,
                local,
                self.final_scores,
                self.untrained_scores,
                len(failures),
                len(self.data.buffer),
            )
            log(
                INFO,
                "final: global accuracy %.4f (untrained %.4f), mean local accuracy %s "
                "(untrained %s); results in %s",
                summary["global-accuracy"] or float("nan"),
                summary["untrained-global-accuracy"] or float("nan"),
                *(
                    "n/a" if value is None else f"{value:.4f}"
                    for value in (mean_local, summary["untrained-mean-local-accuracy"])
                ),
                self.recorder.output_dir,
            )
            self.recorder.finish({**summary, "models": models})
            checkpoint.checkpoint_path(self.recorder.output_dir).unlink(missing_ok=True)
        return weighted_loss(local), {"local-accuracy": mean_local or 0.0}


class FedQSSL(LowBitStrategy):
    """Fed-QSSL (the paper's Algorithm 1): each received model is de-quantized by a
    full-precision fine-tune on the server's buffer D_g, weighted by softmax(-L_DQ), averaged,
    and re-quantized by an s-bit fine-tune on D_g for every bitwidth s (``FedQSSLRound``)."""

    algorithm_name = "fedqssl"


class FedSimCLR(LowBitStrategy):
    """Fed-SimCLR: low-bit SimCLR clients, sample-weighted averaging, rounding to each grid."""

    algorithm_name = "fedsimclr"


class FedSimCLRFineTune(LowBitStrategy):
    """The buffer control: Fed-SimCLR whose average is fine-tuned on D_g and re-quantized by
    fine-tuning, as Fed-QSSL does, without per-client de-quantization or its weights."""

    algorithm_name = "fedsimclr-ft"


class BufferOnly(LowBitStrategy):
    """The buffer-only control: no client trains; the server trains the global model on D_g
    for Fed-QSSL's server budget each round (``BufferOnlyRound``)."""

    algorithm_name = "buffer-only"


class FedSimSiam(LowBitStrategy):
    """Fed-SimSiam: low-bit SimSiam clients, sample-weighted averaging."""

    algorithm_name = "fedsimsiam"


class LowBitFedAvg(LowBitStrategy):
    """FedAvg with low-bit supervised clients (the paper's baseline)."""

    algorithm_name = "fedavg"


class LowBitFedProx(LowBitStrategy):
    """FedProx with low-bit supervised clients (``proximal-mu``)."""

    algorithm_name = "fedprox"


class FedPAQ(LowBitStrategy):
    """FedPAQ: low-bit supervised clients send QSGD-coded updates; the server adds their
    sample-weighted mean to the global model."""

    algorithm_name = "fedpaq"


STRATEGIES: dict[str, type[LowBitStrategy]] = {
    cls.algorithm_name: cls
    for cls in (
        FedQSSL,
        FedSimCLR,
        FedSimCLRFineTune,
        BufferOnly,
        FedSimSiam,
        LowBitFedAvg,
        LowBitFedProx,
        FedPAQ,
    )
}


def strategy_for(
    config: ExperimentConfig, data: ServerData, recorder: RunRecorder | None = None
) -> LowBitStrategy:
    """The named strategy of ``config.algorithm``."""
    return STRATEGIES[get_algorithm(config.algorithm).name](config, data, recorder)
