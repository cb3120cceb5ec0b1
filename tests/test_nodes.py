"""Which node may speak for which partition: first come with no operator bindings, the
operator's ``partition-bindings`` (partition -> node id) whoever comes first with them."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_mutated_bindings_file_is_read_or_refused_naming_it(tmp_path_factory, data):
    """Mutated copies of a real bindings file (bytes flipped or cut, keys and ids of any text):
    a mapping of the run's partitions to whole-number ids, or a ``ConfigError`` naming it."""
    folder = tmp_path_factory.mktemp("bindings")
    kind = data.draw(st.sampled_from(["flip", "cut", "any-json"]))
    real = json.dumps({"0": "8123456789", "1": "9912", "2": 17}).encode()
    if kind == "any-json":
        # ASCII digits and others: superscript two, Arabic-Indic zero and one
        digits = st.text(st.sampled_from("0129\u00b2\u0660\u0661x- "), max_size=3)
        ids = st.one_of(digits, st.text(max_size=4), st.integers(), st.booleans(), st.none())
        keys = st.one_of(digits, st.text(max_size=3))
        blob = json.dumps(data.draw(st.dictionaries(keys, ids))).encode()
    elif kind == "flip":
        blob = bytearray(real)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    else:
        blob = real[: data.draw(st.integers(0, len(real) - 1))]
    path = folder / "bindings.json"
    path.write_bytes(bytes(blob))
    try:
        bindings = read_partition_bindings(str(path), 3)
    except ConfigError as error:
        assert str(path) in str(error)
        return
    assert set(bindings) <= {0, 1, 2}
    assert all(node.isascii() and node.isdigit() for node in bindings.values())
    assert len(set(bindings.values())) == len(bindings)
