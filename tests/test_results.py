"""A run's records (fedqssl_server.results): row labels, the kNN curve from the untrained
floor, a round's record and log line."""

import pytest

from common.algorithms import get_algorithm
from common.config import ConfigError, ExperimentConfig
from fedqssl_server.results import row_label


def test_full_precision_rows_are_labelled_and_unknown_algorithms_rejected():
    def config(**values):
        return ExperimentConfig.from_mapping({"num-clients": 2, **values})

    fedqssl = get_algorithm("fedqssl")
    assert row_label(fedqssl, config(bitwidths="32,32")) == "Fed-QSSL (Full)"
    assert row_label(fedqssl, config(bitwidths="4,32")) == "Fed-QSSL"
    uniform = config(bitwidths="32", **{"dq-weighting": "uniform"})
    assert row_label(fedqssl, uniform) == "Fed-QSSL (Full, uniform p_k)"
    clamp = config(bitwidths="32", **{"fp-activation": "clamp"})
    assert row_label(get_algorithm("fedsimclr"), clamp) == "Fed-SimCLR (Full, clamp)"
    with pytest.raises(ConfigError, match="algorithm: 'fedsgd' is not one of fedqssl"):
        ExperimentConfig.from_mapping({"algorithm": "fedsgd"})
