"""A round's replies at the Flower boundary, checked in one place: fit replies (metrics, claims,
payload) decoded once to be sure, then set aside to be decoded again when the server round
reaches it, so a round holds one decoded model at a time; evaluation replies (metrics, the
node's partition and bitwidth, once each). What cannot be used becomes a reason."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Mapping
from logging import WARNING
from typing import NamedTuple

import torch
from flwr.common import EvaluateRes, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from common.wire.payload import (
    MAX_MAGNITUDE,
    PayloadError,
    check_plausible,
    decode_state,
    payload_nbytes,
)
from fedqssl_server.nodes import NodeRegistry
from fedqssl_server.replies import EVALUATE_METRICS, FIT_METRICS, reply_problem

__all__ = ["MAX_MAGNITUDE", "check_plausible"]  # the rules the clients apply to the downlink too


class Accepted(NamedTuple):
    """A client result that decoded cleanly; ``decode`` decodes it again when the server round
    needs it."""

    key: int  # its partition
    client: ClientProxy
    result: FitRes
    decode: Callable[[], dict]
    uplink_bytes: int


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


UNKNOWN_CLIENT = "unknown"  # who failed, where Flower hands the strategy only the exception


def failed(failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> list[tuple[str, str]]:
    """Flower's failures of a round as (who, why): an exception carries no client id, so its
    ``who`` is ``UNKNOWN_CLIENT`` and its text goes to ``why`` only (it was the id before)."""
    return [
        (UNKNOWN_CLIENT if isinstance(f, BaseException) else str(f[0].cid), failure_reason(f))
        for f in failures
    ]


def reply_claim_problem(
    client: ClientProxy,
    result: FitRes,
    nodes: NodeRegistry,
    connected: Collection[str],
    taken: Collection[int],
    max_examples: int,
) -> str | None:
    """Why a fit reply cannot be used: its metrics, its claim to a partition and bitwidth, a
    partition already answered for this round (None: it can)."""
    problem = reply_problem(result.metrics, result.num_examples, FIT_METRICS, max_examples)
    if problem is not None:
        return f"client {client.cid} sent a bad reply: {problem}"
    partition, bits = result.metrics["partition-id"], result.metrics["bitwidth"]
    problem = nodes.claim_problem(client.cid, partition, bits, connected)
    if problem is not None:
        return f"client {client.cid} {problem}"
    if partition in taken:
        return f"client {client.cid} repeats partition-id {partition}"
    return None


def accept(
    client: ClientProxy,
    result: FitRes,
    template: Mapping[str, torch.Tensor],
    sends_updates: bool,
) -> Accepted | str:
    """The reply's model, checked against ``template`` at its claimed bitwidth (an int, checked
    by ``reply_claim_problem``) and set aside, or why it was left out."""
    bits = int(result.metrics["bitwidth"])
    try:
        arrays = parameters_to_ndarrays(result.parameters)
        state = decode_state(arrays, expect_bits=bits, template=template)
        check_plausible(state, update=sends_updates)
        del state  # decoded again when the server reaches it: one state held at a time
    except Exception as error:  # any bytes a client sends: numpy's own errors as well
        detail = str(error) if isinstance(error, PayloadError) else repr(error)[:300]
        return f"client {client.cid} sent a bad model: {detail}"
    decode = functools.partial(_decoded, result.parameters, bits, template)
    partition = int(result.metrics["partition-id"])
    return Accepted(partition, client, result, decode, payload_nbytes(arrays))


def take_replies(
    results: list[tuple[ClientProxy, FitRes]],
    nodes: NodeRegistry,
    connected: Collection[str],
    template: Mapping[str, torch.Tensor],
    sends_updates: bool,
    max_examples: int,
) -> tuple[list[Accepted], list[tuple[str, str]]]:
    """A round's fit replies: the usable ones (one per partition, in partition order, each
    node bound to its partition) and the others as (who, why)."""
    accepted: dict[int, Accepted] = {}
    left_out = []
    for client, result in results:
        problem = reply_claim_problem(client, result, nodes, connected, set(accepted), max_examples)
        taken = accept(client, result, template, sends_updates) if problem is None else problem
        if isinstance(taken, str):
            left_out.append((client.cid, taken))
        else:
            nodes.bind(client.cid, taken.key)
            accepted[taken.key] = taken
            if "ray-node" not in result.metrics:  # a deployed SuperNode, not a Ray actor
                warn_unbound_partitions(nodes)
    return [accepted[key] for key in sorted(accepted)], left_out


def warn_unbound_partitions(nodes: NodeRegistry) -> None:
    """Once a run: deployed nodes claim partitions and no ``partition-bindings`` binds them to
    node keys, so the first authenticated node to claim a partition keeps it."""
    if nodes.operator_bindings or nodes.warned_unbound:
        return
    nodes.warned_unbound = True
    log(
        WARNING,
        "partitions are not bound to SuperNode keys (partition-bindings is empty): the first "
        "node to claim a partition keeps it for the run. With SuperNode authentication, bind "
        "them: scripts/deploy/register.sh writes the file, the partition-bindings key names it "
        "(docs/deployment.md)",
    )


def evaluation_replies(
    results: list[tuple[ClientProxy, EvaluateRes]], nodes: NodeRegistry, max_examples: int
) -> tuple[list[EvaluateRes], list[tuple[str, str]]]:
    """The final evaluation's replies: the usable ones (metrics of the right types, from the
    node bound to the partition they name, at its bitwidth, one per partition) and the others
    as (who, why)."""
    usable: list[EvaluateRes] = []
    refused = []
    for client, reply in results:
        problem = reply_problem(
            reply.metrics, reply.num_examples, EVALUATE_METRICS, max_examples
        ) or nodes.evaluation_problem(
            client.cid,
            reply.metrics["partition-id"],
            reply.metrics["bitwidth"],
            {r.metrics["partition-id"] for r in usable},
        )
        if problem is None:
            usable.append(reply)
        else:
            refused.append((client.cid, problem))
    return usable, refused


def _decoded(parameters: Parameters, bits: int, template: Mapping[str, torch.Tensor]) -> dict:
    return decode_state(parameters_to_ndarrays(parameters), bits, template)
