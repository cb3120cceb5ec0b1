"""Who takes part in a round: Flower's connected nodes, sampled, and which partition each speaks
for (the Flower side of ``NodeRegistry``: nodes asked with ``get_properties``, never trusted
blindly)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from logging import WARNING

from flwr.common import GetPropertiesIns
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from common import seeds
from common.config import ExperimentConfig
from fedqssl_server.intake import failure_reason
from fedqssl_server.nodes import NodeRegistry

LeftOut = list[tuple[str, str]]  # (who, why), in the order found


class Participants:
    """The run's nodes: partition bindings (``registry``) and who is connected this round."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.registry = NodeRegistry(config.bitwidths)
        self.connected: set[str] = set()

    @property
    def partition_of(self) -> dict[str, int]:
        """Node id -> the partition it is bound to."""
        return self.registry.partition_of

    def identify(self, clients: list[ClientProxy], server_round: int) -> LeftOut:
        """Ask nodes not yet bound which partition and bitwidth they are (``get_properties``)
        and bind those whose answer holds; returns the others, left out of the round, and why."""
        unknown = [c for c in clients if c.cid not in self.registry.partition_of]
        if not unknown:
            return []
        timeout = self.config.round_timeout or None

        def ask(client: ClientProxy):
            try:
                return client.get_properties(GetPropertiesIns({}), timeout, server_round)
            except Exception as error:  # a node that cannot answer sits this round out
                return error

        with ThreadPoolExecutor(max_workers=min(len(unknown), 32)) as pool:
            replies = list(pool.map(ask, unknown))
        left_out = []
        for client, reply in zip(unknown, replies, strict=True):
            if isinstance(reply, BaseException):
                problem = f"did not say which partition it is: {failure_reason(reply)}"
            else:
                properties = reply.properties
                problem = self.registry.claim_problem(
                    client.cid,
                    properties.get("partition-id"),
                    properties.get("bitwidth"),
                    self.connected,
                )
            if problem is None:
                self.registry.bind(client.cid, int(reply.properties["partition-id"]))
            else:
                reason = f"client {client.cid} {problem}"
                log(WARNING, "round %s: %s, left out", server_round, reason)
                left_out.append((client.cid, reason))
        return left_out

    def sample(
        self, client_manager: ClientManager, server_round: int, know_all: bool
    ) -> tuple[list[ClientProxy], LeftOut]:
        """The round's clients and those left out: every available client, or a
        ``fraction-fit`` share (at least ``min-fit-clients``) drawn by partition with the seed
        and the round number, the same partitions whatever ids Flower gave the nodes, so a
        resumed run samples as the uninterrupted one. ``know_all``: every sampled node must be
        bound to a partition (each needs its own bitwidth's model); unknown ones are asked."""
        client_manager.wait_for(self.config.min_fit_clients)
        available = sorted(client_manager.all().values(), key=lambda c: c.cid)
        self.connected = {client.cid for client in available}
        if self.config.fraction_fit >= 1:
            left_out = self.identify(available, server_round) if know_all else []
            return [c for c in available if self.known(c, know_all)], left_out
        left_out = self.identify(available, server_round)
        bound = sorted(
            (self.partition_of[c.cid], c) for c in available if c.cid in self.partition_of
        )
        wanted = max(int(len(available) * self.config.fraction_fit), self.config.min_fit_clients)
        rng = seeds.client_sampling_rng(self.config.seed, server_round)
        chosen = rng.choice(len(bound), size=min(wanted, len(bound)), replace=False)
        return [bound[index][1] for index in sorted(chosen)], left_out

    def known(self, client: ClientProxy, required: bool = True) -> bool:
        """Whether ``client`` may be sent a model: bound to a partition, or none is required."""
        return not required or client.cid in self.partition_of
