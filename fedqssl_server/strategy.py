"""The Flower strategy of every algorithm: thin glue between Flower and ``server_steps``."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING
from typing import NamedTuple

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common.algorithms import get_algorithm
from common.codec import (
    PayloadError,
    check_plausible,
    decode_state,
    encode_state,
    payload_nbytes,
)
from common.config import ExperimentConfig
from common.evaluation import classifier_accuracy, knn_accuracy, linear_probe_accuracy
from common.experiment import ServerData
from common.models import extract_features
from common.quant import FULL_PRECISION
from fedqssl_server import checkpoint
from fedqssl_server.nodes import NodeRegistry
from fedqssl_server.replies import EVALUATE_METRICS, FIT_METRICS, reply_problem
from fedqssl_server.results import RunRecorder
from fedqssl_server.server_steps import AllRefusedError, RoundOutcome, make_server

# what each client's evaluation reports: its score, the SSL probe's, and both on the initial model
LOCAL_SCORES = (
    "local-accuracy",
    "local-probe-accuracy",
    "untrained-local-accuracy",
    "untrained-local-probe-accuracy",
)


def mean_of(clients: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the clients that reported it (None if none did)."""
    values = [c[key] for c in clients if c.get(key) is not None]
    return float(np.mean(values)) if values else None


def row_label(label: str, config: ExperimentConfig) -> str:
    """The paper's row name: ``Fed-QSSL``; ``Fed-QSSL (Full)`` when no client is low-bit;
    ``(uniform p_k)`` when Fed-QSSL's softmax weights are replaced by uniform ones."""
    notes = []
    if all(b == FULL_PRECISION for b in config.bitwidths):
        notes.append("Full")
    if get_algorithm(config.algorithm).server_step == "fedqssl" and (
        config.dq_weighting == "uniform"
    ):
        notes.append("uniform p_k")
    return f"{label} ({', '.join(notes)})" if notes else label


class Accepted(NamedTuple):
    """A client result that decoded cleanly; ``decode`` decodes it again when the server step
    needs it, so a round holds one decoded state at a time."""

    key: int
    client: ClientProxy
    result: FitRes
    decode: Callable[[], dict]
    uplink_bytes: int


# the stream of the config's seed that decides which clients a round samples
SAMPLING_STREAM = 3


class RoundFailedError(RuntimeError):
    """Too few clients returned a usable model: the run fails rather than report an untrained
    model as a result."""


def failure_reason(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """What Flower knows about a failed client: the exception (a ClientApp's error arrives as
    one), or the status message of a result that is not OK."""
    if isinstance(failure, BaseException):
        text = str(failure)
        # a ClientApp's exception arrives wrapped in Ray's and Flower's reprs: keep its message
        inner = re.search(r"occurred\. Message: (.*?)'?>?\)?\. It originated", text, re.DOTALL)
        return inner.group(1).strip() if inner else f"{type(failure).__name__}: {text}"
    client, result = failure
    return f"client {client.cid}: {result.status.code.name} {result.status.message}"


class LowBitStrategy(Strategy):
    """Packed low-bit models both ways, one downlink per bitwidth; the algorithm's server steps
    (``make_server``: Fed-QSSL's de-/re-quantization, or averaging) combine what clients send.

    Rounds are numbered as the run counts them: a run resumed from round R's checkpoint
    (``restore``) calls Flower's round 1 round R + 1. Each partition is bound to the node that
    first spoke for it and must claim the bitwidth the run assigns it (``NodeRegistry``).
    """

    def __init__(
        self, config: ExperimentConfig, data: ServerData, recorder: RunRecorder | None = None
    ) -> None:
        self.config = config
        self.data = data
        self.algorithm = get_algorithm(config.algorithm)
        self.server = make_server(config, data)
        self.recorder = recorder
        self.global_state = self.server.initial_state()
        self.global_payload: list[np.ndarray] | None = None  # its fp32 encoding, made once
        # the model's shape never changes, so neither does its full-precision payload size
        self.fp32_bytes = payload_nbytes(self._global_payload())
        self.nodes = NodeRegistry(config.bitwidths)
        self.connected: set[str] = set()
        self.round_offset = 0  # rounds completed before this process started (resume)
        self.downlink: dict[int, list[np.ndarray]] = {}
        self.sent_bytes: dict[str, int] = {}
        self.current: dict = {}
        self.final_scores: dict[str, float] = {}
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
        return self.config.num_rounds - self.round_offset

    # ------------------------------------------------------------ fit

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
        is one for its bitwidth or before the node is known (encoded once per round)."""
        bits = None if partition is None else self.config.bitwidths[partition]
        if bits in self.downlink:
            return self.downlink[bits]
        return self._global_payload()

    def _identify(self, clients: list[ClientProxy], server_round: int) -> None:
        """Ask nodes not yet bound which partition and bitwidth they are (``get_properties``),
        and bind those whose answer holds; the others are left out of the round, with why."""
        unknown = [c for c in clients if c.cid not in self.nodes.partition_of]
        if not unknown:
            return
        timeout = self.config.round_timeout or None

        def ask(client: ClientProxy):
            try:
                return client.get_properties(GetPropertiesIns({}), timeout, server_round)
            except Exception as error:  # a node that cannot answer sits this round out
                return error

        with ThreadPoolExecutor(max_workers=min(len(unknown), 32)) as pool:
            replies = list(pool.map(ask, unknown))
        for client, reply in zip(unknown, replies, strict=True):
            if isinstance(reply, BaseException):
                problem = f"did not say which partition it is: {failure_reason(reply)}"
            else:
                properties = reply.properties
                problem = self.nodes.claim_problem(
                    client.cid,
                    properties.get("partition-id"),
                    properties.get("bitwidth"),
                    self.connected,
                )
            if problem is None:
                self.nodes.bind(client.cid, int(reply.properties["partition-id"]))
            else:
                self._leave_out(server_round, client.cid, f"client {client.cid} {problem}")

    def _leave_out(self, server_round: int, who: str, reason: str) -> None:
        log(WARNING, "round %s: %s, left out", server_round, reason)
        self.current.setdefault("left-out", []).append((who, reason))

    def _sample(self, client_manager: ClientManager, server_round: int) -> list[ClientProxy]:
        """Every available client, or a ``fraction-fit`` share of them (at least
        ``min-fit-clients``) drawn by partition with the config's seed and the round number: the
        same partitions whatever ids Flower gave the nodes, so a resumed run samples as the
        uninterrupted one."""
        client_manager.wait_for(self.config.min_fit_clients)
        available = sorted(client_manager.all().values(), key=lambda c: c.cid)
        self.connected = {client.cid for client in available}
        if self.config.fraction_fit >= 1:
            return available
        self._identify(available, server_round)
        bound = sorted(
            (self.nodes.partition_of[c.cid], c)
            for c in available
            if c.cid in self.nodes.partition_of
        )
        wanted = max(int(len(available) * self.config.fraction_fit), self.config.min_fit_clients)
        rng = np.random.default_rng([self.config.seed, server_round, SAMPLING_STREAM])
        chosen = rng.choice(len(bound), size=min(wanted, len(bound)), replace=False)
        return [bound[index][1] for index in sorted(chosen)]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        self.current = {"started": time.perf_counter()}
        self.sent_bytes = {}
        sampled = self._sample(client_manager, server_round)
        if self.downlink:  # each node needs its own bitwidth's model: know who is who first
            self._identify(sampled, server_round)
        instructions = []
        for client in sampled:
            partition = self.nodes.partition_of.get(client.cid)
            if partition is None and self.downlink:
                continue  # left out by _identify, with its reason
            payload = self._payload_for(partition)
            self.sent_bytes[client.cid] = payload_nbytes(payload)
            # a fresh FitIns per client: each carries its own model
            instructions.append(
                (client, FitIns(ndarrays_to_parameters(payload), {"server-round": server_round}))
            )
        return instructions

    def _decode(self, server_round: int, client: ClientProxy, result: FitRes) -> Accepted | str:
        """The decoded model, or why it was left out."""
        bits = int(result.metrics["bitwidth"])  # an int: checked by reply_problem
        try:
            arrays = parameters_to_ndarrays(result.parameters)
            state = decode_state(arrays, expect_bits=bits, template=self.global_state)
            check_plausible(state, update=self.algorithm.sends_updates)
            del state  # decoded again when the server reaches it: one state held at a time
        except Exception as error:  # any bytes a client sends: numpy's own errors as well
            detail = str(error) if isinstance(error, PayloadError) else repr(error)[:300]
            return f"client {client.cid} sent a bad model: {detail}"
        decode = functools.partial(self._decoded, result.parameters, bits)
        partition = int(result.metrics["partition-id"])
        return Accepted(partition, client, result, decode, payload_nbytes(arrays))

    def _decoded(self, parameters: Parameters, bits: int) -> dict:
        arrays = parameters_to_ndarrays(parameters)
        return decode_state(arrays, expect_bits=bits, template=self.global_state)

    def _reply_problem(self, client: ClientProxy, result: FitRes, taken: set[int]) -> str | None:
        """Why a fit reply cannot be used: its metrics, its claim to a partition, a partition
        already answered for this round (None: it can)."""
        problem = reply_problem(
            result.metrics, result.num_examples, FIT_METRICS, self.config.max_client_examples
        )
        if problem is not None:
            return f"client {client.cid} sent a bad reply: {problem}"
        partition, bits = result.metrics["partition-id"], result.metrics["bitwidth"]
        problem = self.nodes.claim_problem(client.cid, partition, bits, self.connected)
        if problem is not None:
            return f"client {client.cid} {problem}"
        if partition in taken:
            return f"client {client.cid} repeats partition-id {partition}"
        return None

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        accepted: dict[int, Accepted] = {}
        # (who, why) of every client left out this round
        left_out = list(self.current.get("left-out", [])) + [
            (str(f if isinstance(f, BaseException) else f[0].cid), failure_reason(f))
            for f in failures
        ]
        for client, result in results:
            problem = self._reply_problem(client, result, set(accepted))
            decoded = self._decode(server_round, client, result) if problem is None else problem
            if isinstance(decoded, str):
                log(WARNING, "round %s: %s, left out", server_round, decoded)
                left_out.append((client.cid, decoded))
            else:
                self.nodes.bind(client.cid, decoded.key)
                accepted[decoded.key] = decoded
        ordered = [accepted[key] for key in sorted(accepted)]  # outcome lists follow sorted keys
        sent = len(results) + len(failures) + len(self.current.get("left-out", []))
        self._require_enough(server_round, ordered, sent, left_out)
        outcome: RoundOutcome | None = None
        try:
            outcome = self.server.run_round(
                server_round,
                self.global_state,
                {item.key: item.decode for item in ordered},
                {item.key: item.result.num_examples for item in ordered},
                self.nodes.bitwidths_seen(),
            )
            refused = outcome.refused
        except AllRefusedError as error:
            refused = error.refused
        for key, reason in refused.items():
            log(WARNING, "round %s: %s", server_round, reason)
            left_out.append((accepted[key].client.cid, reason))
        ordered = [item for item in ordered if item.key not in refused]
        self._require_enough(server_round, ordered, sent, left_out)
        assert outcome is not None  # every model refused leaves none: the round failed above
        self._set_global(outcome.global_state)
        self.downlink = outcome.downlink
        self._record_round(ordered, outcome, left_out)
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
        self._record_round(usable, None, left_out)
        if self.recorder is not None:
            self.recorder.add_round(self._round_record(server_round, error=message))
        raise RoundFailedError(message)

    def _record_round(
        self,
        ordered: list[Accepted],
        outcome: RoundOutcome | None,
        left_out: list[tuple[str, str]],
    ) -> None:
        clients = [
            {
                "partition-id": item.result.metrics.get("partition-id"),
                "bitwidth": item.result.metrics["bitwidth"],
                "loss": item.result.metrics.get("loss"),
                "train-seconds": item.result.metrics.get("train-seconds"),
                "torch-threads": item.result.metrics.get("torch-threads"),
                "gpu-peak-mb": item.result.metrics.get("gpu-peak-mb"),
                "examples": item.result.num_examples,
                "uplink-bytes": item.uplink_bytes,
                "downlink-bytes": self.sent_bytes.get(item.client.cid),
                "dq-loss": None if outcome is None else outcome.dq_losses[index],
                "weight": None if outcome is None else outcome.weights[index],
            }
            for index, item in enumerate(ordered)
        ]
        present = {item.key for item in ordered}
        self.current.pop("left-out", None)  # now part of failed / failure-reasons
        self.current.update(
            {
                "clients": clients,
                "failed": [who for who, _ in left_out],
                "failure-reasons": [why for _, why in left_out],
                "missing-partitions": [
                    k for k in range(self.config.num_clients) if k not in present
                ],
                "fp32-equivalent-bytes": self.fp32_bytes * len(clients),
                "server-seconds": {} if outcome is None else outcome.seconds,
            }
        )

    # ------------------------------------------------------------ evaluation

    def _model_of(self, state: dict):
        model = self.server.new_model(FULL_PRECISION)
        model.load_state_dict(state)
        return model

    def _global_features(self, model):
        train, test, normalize = (
            self.data.probe_train,
            self.data.probe_test,
            self.data.spec.normalize,
        )
        return (
            extract_features(model.encoder, normalize(train.images)),
            train.labels,
            extract_features(model.encoder, normalize(test.images)),
            test.labels,
        )

    def _scores(self, model) -> dict[str, float]:
        """Global scores of one model: the kNN monitor, the SSL protocol (a linear probe on the
        frozen encoder) and, for a supervised algorithm, its own protocol (the classifier) as
        ``global-accuracy``; for SSL algorithms ``global-accuracy`` is the probe."""
        features = self._global_features(model)
        scores = {
            "knn-accuracy": knn_accuracy(*features),
            "global-probe-accuracy": linear_probe_accuracy(
                *features, self.data.spec.num_classes, FULL_PRECISION, seed=self.config.seed
            ),
        }
        scores["global-accuracy"] = (
            scores["global-probe-accuracy"]
            if self.algorithm.self_supervised
            else classifier_accuracy(
                model,
                self.data.spec.normalize(self.data.probe_test.images),
                self.data.probe_test.labels,
            )
        )
        return scores

    def evaluate(self, server_round: int, parameters: Parameters):
        """kNN monitor of the global encoder each round. After the last, global accuracy on the
        uniform test set (a linear probe on the frozen global encoder for SSL, the global
        classifier for supervised algorithms), beside the untrained floor: the same scores of
        the initial model (the seed's weights every client starts from). Every round but the
        last ends with a checkpoint."""
        flower_round, server_round = server_round, server_round + self.round_offset
        model = self._model_of(self.global_state)
        if flower_round > 0 and server_round == self.config.num_rounds:
            self.final_scores = self._scores(model)
            self.untrained_scores = self._scores(self._model_of(self.server.initial_state()))
            knn = self.final_scores["knn-accuracy"]
            metrics: dict[str, Scalar] = {**self.final_scores}
        else:
            knn = knn_accuracy(*self._global_features(model))
            metrics = {"knn-accuracy": knn}
        if flower_round > 0:
            self._end_round(server_round, knn)
            if server_round < self.config.num_rounds:
                self._save_checkpoint(server_round)
        return 1.0 - knn, metrics

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
        record = {**self.current, "round": server_round, **values}
        record["round-seconds"] = time.perf_counter() - record.pop("started", time.perf_counter())
        return record

    def _end_round(self, server_round: int, knn: float) -> None:
        record = self._round_record(server_round, **{"knn-accuracy": knn})
        clients = record.get("clients", [])
        bits = ",".join(str(c["bitwidth"]) for c in clients)
        weights = ",".join(f"{c['weight']:.2f}" for c in clients if c["weight"] is not None)
        log(
            INFO,
            "round %d/%d: %d clients (bits %s), %d failed, missing partitions %s, p_k [%s], "
            "uplink %.2f MB (fp32 %.2f MB), kNN acc %.4f, %.0fs",
            server_round,
            self.config.num_rounds,
            len(clients),
            bits,
            len(record.get("failed", [])),
            record.get("missing-partitions", []),
            weights,
            sum(c["uplink-bytes"] for c in clients) / 1e6,
            record.get("fp32-equivalent-bytes", 0) / 1e6,
            knn,
            record["round-seconds"],
        )
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
        if self.downlink:
            self._identify(clients, server_round)
        known = [c for c in clients if c.cid in self.nodes.partition_of or not self.downlink]
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
            )
            if problem is None:
                usable.append(reply)
                continue
            log(
                WARNING, "evaluation: client %s sent a bad reply: %s, left out", client.cid, problem
            )
            failures = [*failures, RuntimeError(f"client {client.cid}: {problem}")]
        local = sorted(
            (
                {
                    "partition-id": r.metrics.get("partition-id"),
                    "bitwidth": r.metrics.get("bitwidth"),
                    **{key: r.metrics.get(key) for key in LOCAL_SCORES},
                    "local-model": r.metrics.get("local-model", "probe"),
                    "test-examples": r.num_examples,
                }
                for r in usable
            ),
            key=lambda c: c["partition-id"],
        )
        means = {
            key.replace("local-", "mean-local-", 1): mean_of(local, key) for key in LOCAL_SCORES
        }
        mean_local = means["mean-local-accuracy"]
        if self.recorder is not None:
            summary = self._summary(local, means, len(failures))
            log(
                INFO,
                "final: global accuracy %.4f (untrained %.4f), mean local accuracy %s "
                "(untrained %s); results in %s",
                summary["global-accuracy"] or float("nan"),
                summary["untrained-global-accuracy"] or float("nan"),
                *(
                    "n/a" if value is None else f"{value:.4f}"
                    for value in (mean_local, means["untrained-mean-local-accuracy"])
                ),
                self.recorder.output_dir,
            )
            self.recorder.finish(summary)
            checkpoint.checkpoint_path(self.recorder.output_dir).unlink(missing_ok=True)
        return (None if mean_local is None else 1 - mean_local), {
            "local-accuracy": mean_local or 0.0
        }

    def _summary(self, local: list[dict], means: dict, failures: int) -> dict:
        rounds = self.recorder.rounds
        uplink = sum(c["uplink-bytes"] for r in rounds for c in r.get("clients", []))
        fp32 = sum(r.get("fp32-equivalent-bytes", 0) for r in rounds)
        final, untrained = self.final_scores, self.untrained_scores
        return {
            "algorithm": self.algorithm.name,
            "label": row_label(self.algorithm.label, self.config),
            "global-accuracy": final.get("global-accuracy"),
            "mean-local-accuracy": means["mean-local-accuracy"],
            "global-probe-accuracy": final.get("global-probe-accuracy"),
            "mean-local-probe-accuracy": means["mean-local-probe-accuracy"],
            "untrained-global-accuracy": untrained.get("global-accuracy"),
            "untrained-mean-local-accuracy": means["untrained-mean-local-accuracy"],
            "untrained-global-probe-accuracy": untrained.get("global-probe-accuracy"),
            "untrained-mean-local-probe-accuracy": means["untrained-mean-local-probe-accuracy"],
            "local-accuracy": local,
            "evaluation-failures": failures,
            "uplink-bytes": uplink,
            "fp32-equivalent-uplink-bytes": fp32,
            "uplink-ratio-to-fp32": uplink / fp32 if fp32 else None,
            "downlink-bytes": sum(
                c["downlink-bytes"] or 0 for r in rounds for c in r.get("clients", [])
            ),
            "knn-accuracy": rounds[-1]["knn-accuracy"] if rounds else None,
            "untrained-knn-accuracy": untrained.get("knn-accuracy"),
            "rounds": len(rounds),
            "buffer-to-client-ratio": self._buffer_to_client_ratio(),
        }

    def _buffer_to_client_ratio(self) -> float | None:
        """|D_g| / mean |D_k| (the paper's Figure 3b axis): the clients' sizes as they reported
        them in the last round (after the per-client sample cap)."""
        clients = self.recorder.rounds[-1].get("clients", []) if self.recorder.rounds else []
        mean_size = mean_of(clients, "examples")
        return len(self.data.buffer) / mean_size if mean_size else None
