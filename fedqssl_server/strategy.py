"""The Flower strategy ``FedQSSL``: thin glue around a round's ledger and its server steps.

Fed-QSSL and every baseline run through the same Flower glue; what the server does with what
clients send is the algorithm's ``ServerRound`` (``fedqssl_server/rounds.py``), chosen by its row
in ``common/algorithms.py``. A round's bookkeeping (replies by partition, refusals, the
``min-fit-clients`` rule, the record) is its ``RoundLedger`` (``fedqssl_server/ledger.py``). The
codec is called here only, at the Flower boundary: payloads are decoded on the way in
(``intake``) and each bitwidth's model is encoded on the way out.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any, NoReturn

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
from common.lowbit import kernel
from common.runs import checkpoint
from common.runs.experiment import ServerData, torch_device
from common.runs.saved_models import save_run_models
from common.vocabulary import FULL_PRECISION
from common.wire.payload import encode_state, payload_nbytes
from fedqssl_server.intake import evaluation_replies, failed, take_replies
from fedqssl_server.ledger import RoundLedger
from fedqssl_server.monitor import GlobalMonitor
from fedqssl_server.participants import Participants
from fedqssl_server.results import (
    RunRecorder,
    local_record,
    mean_of,
    round_line,
    run_summary,
    weighted_loss,
)
from fedqssl_server.rounds import server_round_for


class RoundFailedError(RuntimeError):
    """Too few clients returned a usable model: the run fails rather than report an untrained
    model as a result."""


class FedQSSL(Strategy):
    """Fed-QSSL's Flower strategy, which runs every baseline the config's ``algorithm`` names
    too: packed low-bit models both ways, one downlink per bitwidth.

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

    Rounds are numbered as the run counts them (``run_round``): a run resumed from round R's
    checkpoint (``restore``) calls Flower's round 1 round R + 1. After the last round every
    client scores its own model (local accuracy) and the server writes the summary.
    """

    def __init__(
        self, config: ExperimentConfig, data: ServerData, recorder: RunRecorder | None = None
    ) -> None:
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
        self.downlink: dict[int, list[np.ndarray]] = {}  # by bitwidth
        self.personal: dict[int, list[np.ndarray]] = {}  # by partition (local-only)
        self.ledger = self._new_ledger(0)
        self.final_scores: dict[str, float] = {}
        self.saved_models: dict[str, str] = {}  # name -> file in the run folder
        self.untrained_scores: dict[str, float] = {}

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Continue after ``saved.round`` completed rounds: its global model, downlinks,
        partitions and records."""
        self._set_global({k: torch.from_numpy(v) for k, v in saved.global_state.items()})
        self.downlink = saved.downlink
        self.personal = saved.personal
        self.nodes.partition_bits = dict(saved.partition_bits)
        self.round_offset = saved.round
        if self.recorder is not None:
            self.recorder.resume(saved.records, saved.wall_seconds)

    def remaining_rounds(self) -> int:
        """The rounds Flower still has to run (all of them unless resumed)."""
        return self.config.num_rounds - self.round_offset

    def run_round(self, flower_round: int) -> int:
        """Flower's round number as the run counts it (after the rounds of a resumed run)."""
        return flower_round + self.round_offset

    def _new_ledger(self, server_round: int) -> RoundLedger:
        return RoundLedger(
            server_round, self.config.min_fit_clients, self.config.num_clients, self.fp32_bytes
        )

    # ------------------------------------------------------------ the global model

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """The initial (or restored) global model, full precision."""
        return ndarrays_to_parameters(self._global_payload())

    @property
    def sends_own_models(self) -> bool:
        """Whether each node now needs a model of its own (its bitwidth's, or its partition's):
        then the server must know which partition every node is before sending."""
        return bool(self.downlink or self.personal)

    def _set_global(self, state: dict) -> None:
        self.global_state = state
        self.global_payload = None

    def _global_payload(self) -> list[np.ndarray]:
        """The global model as fp32 payload, encoded once per model, not once per client."""
        if self.global_payload is None:
            self.global_payload = encode_state(self.global_state, FULL_PRECISION)
        return self.global_payload

    def _payload_for(self, partition: int | None) -> list[np.ndarray]:
        """The partition's own model (``local-only``) or its bitwidth's re-quantized one; the
        full-precision global one before there is one or before the node is known."""
        if partition in self.personal:
            return self.personal[partition]
        bits = None if partition is None else self.config.bitwidths[partition]
        if bits in self.downlink:
            return self.downlink[bits]
        return self._global_payload()

    # ------------------------------------------------------------ fit

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One ``FitIns`` per sampled client, each with its own bitwidth's model."""
        server_round = self.run_round(server_round)
        self.ledger = self._new_ledger(server_round)
        # once there are downlinks each node needs its own bitwidth's: know who is who first
        sampled, left_out = self.nodes.sample(
            client_manager, server_round, know_all=self.sends_own_models
        )
        self.ledger.left_out_by_sampling(left_out)
        instructions = []
        for client in sampled:
            payload = self._payload_for(self.nodes.partition_of.get(client.cid))
            self.ledger.sent_bytes[client.cid] = payload_nbytes(payload)
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
        and encode its model for each bitwidth (the downlink of the next round). Below
        ``min-fit-clients`` usable models the round is recorded and the run fails."""
        server_round = self.run_round(server_round)
        if self.ledger.server_round != server_round:  # no configure_fit for it: nothing sampled
            self.ledger = self._new_ledger(server_round)
        ledger = self.ledger
        accepted, refused = take_replies(
            results,
            self.nodes,
            self.nodes.connected,
            self.global_state,
            self.algorithm.sends_updates,
            self.config.max_client_examples,
        )
        for _, why in refused:
            log(WARNING, "round %s: %s, left out", server_round, why)
        ledger.take(accepted, [*failed(failures), *refused], len(results) + len(failures))
        outcome = None
        if ledger.shortfall() is None:
            try:
                outcome = self.steps.run(
                    server_round,
                    self.global_state,
                    ledger.decoders(),
                    ledger.examples(),
                    self.nodes.bitwidths_seen(),
                )
            finally:
                if server_round >= self.config.num_rounds:  # no fine-tune after the last round
                    self.steps.close()
            for why in outcome.refused.values():
                log(WARNING, "round %s: %s", server_round, why)
            ledger.drop(outcome.refused)
        problem = ledger.shortfall()
        if outcome is None or outcome.global_state is None or problem is not None:
            self._fail_round(problem or f"round {server_round}: every model was refused")
        self._set_global(outcome.global_state)
        self.downlink = {
            bits: encode_state(state, bits) for bits, state in outcome.requantized.items()
        }
        self.personal = {
            key: encode_state(state, self.config.bitwidths[key])
            for key, state in outcome.personal.items()
        }
        ledger.close_fit(outcome)
        return ndarrays_to_parameters(self._global_payload()), {}

    def _fail_round(self, problem: str) -> NoReturn:
        """Record the round with its ``error``, then fail the run (``RoundFailedError``): a run
        with too few usable models must not report an untrained model as a result."""
        self.steps.close()
        self.ledger.close_fit(None)
        if self.recorder is not None:
            self.recorder.add_round(self.ledger.record(error=problem))
        raise RoundFailedError(problem)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, server_round: int, parameters: Parameters):
        """kNN monitor of the global encoder each round. After the last, the final scores of
        the global model beside the untrained floor: the same scores of the initial model (the
        seed's weights every client starts from). Every round but the last ends with a
        checkpoint."""
        flower_round, server_round = server_round, self.run_round(server_round)
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

    def _server_resources(self) -> dict[str, Any]:
        """What this process ran with, as resolved: torch threads, device, fused kernels."""
        return {
            "threads": torch.get_num_threads(),
            "device": torch_device(self.config).type,
            "fused-kernels": kernel.loaded(),
            "tf32": torch.backends.cudnn.allow_tf32,
        }

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
                personal=self.personal,
                partition_bits=self.nodes.partition_bits,
                records=self.recorder.rounds,
                wall_seconds=self.recorder.elapsed(),
            ),
            checkpoint.checkpoint_path(self.recorder.output_dir),
        )

    def _end_round(self, server_round: int, knn: float, loss: float) -> None:
        record = self.ledger.record(**{"knn-accuracy": knn, "global-loss": loss})
        log(INFO, "%s", round_line(record, self.config.num_rounds))
        if self.recorder is not None:
            self.recorder.add_round(record)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """After the last round, every connected client scores its own re-quantized model."""
        server_round = self.run_round(server_round)
        if server_round != self.config.num_rounds:
            return []
        client_manager.wait_for(1)
        clients = sorted(client_manager.all().values(), key=lambda c: c.cid)
        if self.sends_own_models:  # each node scores its own model: know who is who
            self.nodes.identify(clients, server_round)
        known = [
            c for c in clients if not self.sends_own_models or c.cid in self.nodes.partition_of
        ]
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
        usable, refused = evaluation_replies(results, self.nodes, self.config.max_client_examples)
        for who, why in refused:
            log(WARNING, "evaluation: client %s sent a bad reply: %s, left out", who, why)
        failures = [*failures, *(RuntimeError(f"client {who}: {why}") for who, why in refused)]
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
            self.recorder.finish({**summary, "models": models}, self._server_resources())
            checkpoint.checkpoint_path(self.recorder.output_dir).unlink(missing_ok=True)
        return weighted_loss(local), {"local-accuracy": mean_local or 0.0}


def strategy_for(
    config: ExperimentConfig, data: ServerData, recorder: RunRecorder | None = None
) -> FedQSSL:
    """The strategy of a run: ``FedQSSL`` with ``config.algorithm``'s server steps."""
    return FedQSSL(config, data, recorder)
