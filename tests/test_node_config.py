"""A deployed SuperNode's own node config: its partition, bitwidth and data location."""

import dataclasses

import pytest

from common.config import ConfigError
from fedqssl_client.node import node_settings, placed_device

RUN = {"dataset": "synthetic", "num-clients": 3, "bitwidths": "4,8,12", "data-dir": ""}


def test_node_config_supplies_data_dir_and_a_bitwidth_that_must_match_the_run(tmp_path):
    node = {"partition-id": 1, "num-partitions": 3, "bitwidth": 8, "data-dir": str(tmp_path)}
    settings = node_settings(RUN, node)
    assert settings.config.data_dir == str(tmp_path)
    assert (settings.partition_id, settings.bits, settings.local_data) == (1, 8, "")
    assert node_settings(RUN, {"partition-id": 1}).bits == 8
    # the run's bitwidths are the assignment the server checks every claim against: a node that
    # computes at another bitwidth refuses to train, naming the fix
    with pytest.raises(ConfigError, match=r"6 bits .* assigns partition 1 8 bits: .*position 1"):
        node_settings(RUN, {**node, "bitwidth": 6})


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"partition-id": 3, "num-partitions": 3}, "partition-id 0..2"),
        (
            {"partition-id": 0, "num-partitions": 5},
            'num-clients 3. Simulation: .* --federation-config "num-supernodes=3"',
        ),
        ({"num-partitions": 3}, "node config has no partition-id"),
    ],
)
def test_inconsistent_node_config_is_refused_with_the_fix(node, message):
    with pytest.raises(ValueError, match=message):
        node_settings(RUN, node)


def test_a_bad_node_bitwidth_is_a_config_error():
    with pytest.raises(ConfigError, match="bitwidth 40 is not allowed"):
        node_settings(RUN, {"partition-id": 0, "bitwidth": 40})


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"partition-id": 1.7}, r"node config partition-id must be a whole number like 0, got 1.7"),
        ({"partition-id": True}, r"partition-id must be a whole number like 0, got True"),
        ({"partition-id": "one"}, r"partition-id must be a whole number like 0, got 'one'"),
        ({"partition-id": 0, "num-partitions": 3.9}, r"num-partitions must be a whole number"),
        ({"partition-id": 0, "bitwdith": 8}, r"unknown node config key 'bitwdith': did you mean"),
        ({"partition-id": 0, "colour": "red"}, r"unknown node config key 'colour': a node config"),
    ],
)
def test_node_config_is_as_strict_as_run_config(node, message):
    with pytest.raises(ConfigError, match=message):
        node_settings(RUN, node)


def test_a_partition_id_as_digits_is_what_flowers_own_simulation_may_send():
    assert node_settings(RUN, {"partition-id": "2", "num-partitions": "3"}).partition_id == 2


def test_a_client_placed_without_a_gpu_says_cpu_itself():
    """Ray hides GPUs from an actor given none today and says it will stop: the client does not
    rely on it. Given no GPU by Ray it trains on the CPU; ``cuda`` without a share is refused;
    outside Ray (a SuperNode) and with a GPU share the configured device stands."""
    settings = node_settings(RUN, {"partition-id": 0, "num-partitions": 3})
    assert settings.config.device == "auto"
    assert placed_device(settings.config, []).device == "cpu"
    assert placed_device(settings.config, None).device == "auto"
    assert placed_device(settings.config, [0]).device == "auto"
    cuda = dataclasses.replace(settings.config, device="cuda")
    assert placed_device(cuda, [0]).device == "cuda"
    with pytest.raises(ConfigError, match="Ray gave this client no GPU"):
        placed_device(cuda, [])


@pytest.mark.parametrize("text", ["\u00b2", "\u0661", "1\u0660", " 0\u00b9"])
def test_digits_other_than_ascii_are_not_whole_numbers_anywhere(text):
    """``str.isdigit`` takes superscripts (``int`` refuses them) and Arabic-Indic digits (``int``
    reads them as other numbers): a partition id, a seed or a port written so is refused."""
    from common.runs.plan import parse_seeds
    from fedqssl_client.node import node_int

    with pytest.raises(ConfigError, match="partition-id must be a whole number"):
        node_int({"partition-id": text}, "partition-id")
    with pytest.raises(ConfigError, match="seeds must be integers"):
        parse_seeds(f"0,{text}")
    assert node_int({"partition-id": " 12 "}, "partition-id") == 12
    assert parse_seeds("0,12") == [0, 12]
