"""Which node may speak for which partition: first come with no operator bindings, the
operator's ``partition-bindings`` (partition -> node id) whoever comes first with them."""

import json

import pytest

from common.config import ConfigError
from fedqssl_server.nodes import NodeRegistry, read_partition_bindings

BITS = (4, 8, 12)


def claims_in_order(registry: NodeRegistry, claims) -> dict[str, str | None]:
    """Each (node, partition) claim in turn, binding those allowed; node -> its refusal."""
    outcome = {}
    for node, partition in claims:
        problem = registry.claim_problem(node, partition, BITS[partition], {n for n, _ in claims})
        if problem is None:
            registry.bind(node, partition)
        outcome[node] = problem
    return outcome


def test_without_bindings_a_node_that_speaks_first_takes_the_partition():
    outcome = claims_in_order(NodeRegistry(BITS), [("rogue", 0), ("honest", 0)])
    assert outcome["rogue"] is None and "bound to node rogue" in outcome["honest"]


@pytest.mark.parametrize("order", [[("rogue", 0), ("honest", 0)], [("honest", 0), ("rogue", 0)]])
def test_with_bindings_the_bound_node_gets_its_partition_whoever_speaks_first(order):
    registry = NodeRegistry(BITS, {0: "honest", 1: "other"})
    outcome = claims_in_order(registry, order)
    assert outcome["honest"] is None and registry.node_of(0) == "honest"
    assert outcome["rogue"] == "partition 0 is bound to node honest by partition-bindings"
    # a bound node may not speak for another partition either, nor take a free one
    assert registry.claim_problem("other", 2, 12, set()) == (
        "node other is bound to partition 1 by partition-bindings"
    )
    assert registry.claim_problem("rogue", 2, 12, set()) is None  # partition 2 is unbound


def write(tmp_path, content) -> str:
    path = tmp_path / "bindings.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_a_bindings_file_is_read_and_every_fault_named(tmp_path):
    assert read_partition_bindings("", 3) == {}
    assert read_partition_bindings(write(tmp_path, {"0": 17, "2": "9"}), 3) == {0: "17", 2: "9"}
    faults = {
        "{not json": "not JSON",
        "[1, 2]": "must be a JSON object",
        '{"3": "1"}': "partition '3' is not one of the run's 0..2",
        '{"-1": "1"}': "partition '-1' is not one",
        '{"0": "1x"}': "partition 0's node id '1x' is not a whole number",
        '{"0": true}': "partition 0's node id True is not a whole number",
        '{"0": "5", "1": 5}': "node 5 is bound to two partitions",
    }
    for content, message in faults.items():
        with pytest.raises(ConfigError) as refused:
            read_partition_bindings(write(tmp_path, content), 3)
        assert f"bindings.json: {message}" in str(refused.value)
    with pytest.raises(ConfigError, match=r"no such file \(write it with scripts/deploy/register"):
        read_partition_bindings(str(tmp_path / "missing.json"), 3)
