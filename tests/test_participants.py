"""Who takes part in a round (fedqssl_server.participants): sampling by partition."""

import pytest
from flower_fakes import FakeManager, FakeProxy

from common.config import ExperimentConfig
from common.runs.experiment import server_data
from fedqssl_server.strategy import strategy_for


def nodes(ids, bits=4):
    """Fake nodes with these ids, node k speaking for partition k."""
    return [FakeProxy(cid, {"partition-id": k, "bitwidth": bits}) for k, cid in enumerate(ids)]


@pytest.mark.parametrize(
    ("fraction", "minimum", "expected"), [(0.5, 2, 5), (0.1, 3, 3), (1.0, 2, 10)]
)
def test_client_sampling_follows_fraction_fit_and_min_fit_clients_by_partition(
    tmp_path, fraction, minimum, expected
):
    config = ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "num-clients": 10,
            "bitwidths": "4",
            "dirichlet-beta": 1.0,
            "fraction-fit": fraction,
            "min-fit-clients": minimum,
            "output-dir": str(tmp_path),
        }
    )

    def sampled_partitions(ids, server_round):
        strategy = strategy_for(config, server_data(config))
        chosen = strategy.configure_fit(server_round, None, FakeManager(nodes(ids)))
        return sorted(proxy.properties["partition-id"] for proxy, _ in chosen)

    first = sampled_partitions([str(i) for i in range(10)], 1)
    assert len(first) == expected
    # drawn by partition with the seed and round: the same partitions under other node ids (a
    # resumed run, whose nodes Flower numbers anew), and another draw in another round
    assert sampled_partitions([f"node-{9 - i}" for i in range(10)], 1) == first
    if expected < 10:
        assert any(sampled_partitions([str(i) for i in range(10)], r) != first for r in (2, 3))
