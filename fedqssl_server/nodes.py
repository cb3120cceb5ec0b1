"""Which node speaks for which partition in a run, and what a partition may claim.

A client's reply names its partition and its bitwidth; the server believes neither blindly. The
run config's ``bitwidths`` is the assignment of record (a node's own ``bitwidth`` node config
must agree with it), so a partition configured at 4 bits cannot claim 32 and be sent a 32-bit
model. The first node to claim a partition is bound to it for the run: another node claiming it
is refused while the bound one is still connected, so a hostile node cannot push out an honest
one; a node that reconnects under a new id (a restarted SuperNode, a resumed run) takes its
partition back once the old id has gone. With SuperNode authentication on, the operator may
instead bind partitions to node ids outright (``partition-bindings``: the ids the SuperLink gave
each registered public key, written by ``scripts/deploy/register.sh``): a claim against that
binding is refused whoever comes first. Free of Flower: nodes are their id strings.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

from common.config import ConfigError
from common.vocabulary import is_whole_number

MAX_BINDINGS_BYTES = 1 << 20  # a file of one line per partition; anything larger is not one


def read_partition_bindings(path: str, num_clients: int) -> dict[int, str]:
    """The operator's partition -> node id bindings in ``path`` (a JSON object, ``{"0":
    "8123...", ...}``; ``{}`` when ``path`` is empty). Every problem is a ConfigError naming the
    file: not JSON, a partition outside the run, a node id that is not a whole number, one node
    bound to two partitions."""
    if not path:
        return {}
    where = f"partition-bindings {path}"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where}: no such file (write it with scripts/deploy/register.sh)")
    if file.stat().st_size > MAX_BINDINGS_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_BINDINGS_BYTES} bytes, not a bindings file")
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{where}: not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: must be a JSON object {{"PARTITION": "NODE_ID", ...}}')
    bindings: dict[int, str] = {}
    for key, node in raw.items():
        if not is_whole_number(key) or not 0 <= int(key) < num_clients:
            raise ConfigError(
                f"{where}: partition {key!r} is not one of the run's 0..{num_clients - 1}"
            )
        node = str(node) if isinstance(node, int) and not isinstance(node, bool) else node
        if not isinstance(node, str) or not is_whole_number(node):
            raise ConfigError(f"{where}: partition {key}'s node id {node!r} is not a whole number")
        if node in bindings.values():
            raise ConfigError(f"{where}: node {node} is bound to two partitions")
        bindings[int(key)] = node
    return bindings


class NodeRegistry:
    """Node id -> partition bindings of one run, checked against the run's bitwidths."""

    def __init__(
        self, bitwidths: tuple[int, ...], operator_bindings: Mapping[int, str] | None = None
    ) -> None:
        self.bitwidths = bitwidths
        self.operator_bindings = dict(operator_bindings or {})  # partition -> node, fixed
        self.partition_of: dict[str, int] = {}
        # partitions that took part in the run so far -> their bitwidth (what to re-quantize for)
        self.partition_bits: dict[int, int] = {}
        self.warned_unbound = False  # said once a run that no partition-bindings bind nodes

    def node_of(self, partition: int) -> str | None:
        """The node bound to ``partition``, if any."""
        return next((n for n, p in self.partition_of.items() if p == partition), None)

    def claim_problem(
        self, node: str, partition: object, bits: object, connected: Collection[str]
    ) -> str | None:
        """Why ``node`` may not speak for ``partition`` at ``bits`` (None: it may)."""
        if isinstance(partition, bool) or not isinstance(partition, int):
            return f"partition-id must be an int, got {partition!r}"
        if not 0 <= partition < len(self.bitwidths):
            return (
                f"partition-id {partition} is outside the run's partitions "
                f"0..{len(self.bitwidths) - 1} (num-clients {len(self.bitwidths)})"
            )
        assigned = self.bitwidths[partition]
        if bits != assigned:
            return (
                f"claims {bits!r} bits for partition {partition}, which the run assigns "
                f"{assigned} bits (run config bitwidths)"
            )
        owner = self.operator_bindings.get(partition)
        if owner is not None and owner != node:
            return f"partition {partition} is bound to node {owner} by partition-bindings"
        fixed = next((p for p, n in self.operator_bindings.items() if n == node), None)
        if fixed is not None and fixed != partition:
            return f"node {node} is bound to partition {fixed} by partition-bindings"
        bound = self.node_of(partition)
        if bound is not None and bound != node and bound in connected:
            return f"partition {partition} is bound to node {bound} for this run"
        known = self.partition_of.get(node)
        if known is not None and known != partition:
            return f"node {node} spoke for partition {known} earlier in this run, not {partition}"
        return None

    def evaluation_problem(
        self, node: str, partition: object, bits: object, taken: Collection[object]
    ) -> str | None:
        """Why ``node``'s evaluation reply for ``partition`` at ``bits`` cannot be used (None:
        it can): it must speak for the partition it is bound to, at that partition's bitwidth,
        and for one not yet answered (``taken``)."""
        bound = self.partition_of.get(node)
        if bound is None:
            return f"node {node} speaks for no partition in this run (it trained in no round)"
        if partition != bound:
            return f"reports partition-id {partition!r}, but speaks for partition {bound}"
        if bits != self.bitwidths[bound]:
            return (
                f"reports {bits!r} bits for partition {bound}, which the run assigns "
                f"{self.bitwidths[bound]} bits"
            )
        if partition in taken:
            return f"repeats partition-id {partition}"
        return None

    def bind(self, node: str, partition: int) -> None:
        """Bind ``node`` to ``partition`` (after ``claim_problem`` said yes), releasing the
        partition's earlier node, which has gone."""
        earlier = self.node_of(partition)
        if earlier is not None and earlier != node:
            del self.partition_of[earlier]
        self.partition_of[node] = partition
        self.partition_bits[partition] = self.bitwidths[partition]

    def bitwidths_seen(self) -> set[int]:
        """The bitwidths of every partition that took part so far (the downlinks to make)."""
        return set(self.partition_bits.values())
