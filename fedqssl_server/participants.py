"""Who takes part in a round: Flower's connected nodes, sampled, and which partition each speaks
for (``NodeRegistry``'s bindings, with the Flower side added: nodes asked with
``get_properties``, never trusted blindly)."""

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
from fedqssl_server.nodes import NodeRegistry, read_partition_bindings

LeftOut = list[tuple[str, str]]  # (who, why), in the order found


class Participants(NodeRegistry):
    """The run's nodes: their partition bindings and who is connected this round."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(
            config.bitwidths, read_partition_bindings(config.partition_bindings, config.num_clients)
        )
        self.config = config
        self.connected: set[str] = set()

    def identify(self, clients: list[ClientProxy], server_round: int) -> LeftOut:
        """Ask nodes not yet bound which partition and bitwidth they are (``get_properties``)
        and bind those whose answer holds; returns the others, left out of the round, and why."""
        unknown = [c for c in clients if c.cid not in self.partition_of]
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
                problem = f"could not be asked its partition and bitwidth: {failure_reason(reply)}"
            else:
                properties = reply.properties
                problem = self.claim_problem(
                    client.cid,
                    properties.get("partition-id"),
                    properties.get("bitwidth"),
                    self.connected,
                )
            if problem is None:
                self.bind(client.cid, int(reply.properties["partition-id"]))
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
        if self.config.fraction_fit >= 1 and not know_all:
            return available, []
        left_out = self.identify(available, server_round)
        if self.config.fraction_fit >= 1:
            return [c for c in available if c.cid in self.partition_of], left_out
        bound = sorted(
            (self.partition_of[c.cid], c) for c in available if c.cid in self.partition_of
        )
        wanted = max(int(len(available) * self.config.fraction_fit), self.config.min_fit_clients)
        rng = seeds.client_sampling_rng(self.config.seed, server_round)
        chosen = rng.choice(len(bound), size=min(wanted, len(bound)), replace=False)
        return [bound[index][1] for index in sorted(chosen)], left_out
