"""What a client's reply may carry (fedqssl_server.replies): every metric's type, the required
ones, and the bound on the examples a client may claim."""

import math

import pytest

from fedqssl_server.replies import EVALUATE_METRICS, FIT_METRICS, reply_problem

GOOD_FIT = {"bitwidth": 4, "partition-id": 0, "loss": 1.5, "train-steps": 3}


def test_an_honest_reply_passes_and_optional_metrics_may_be_absent():
    assert reply_problem(GOOD_FIT, 10, FIT_METRICS, 100) is None
    assert reply_problem({"bitwidth": 4, "partition-id": 0}, 0, FIT_METRICS, 100) is None
    evaluation = {"partition-id": 1, "bitwidth": 8, "local-accuracy": 1.0, "local-model": "probe"}
    assert reply_problem(evaluation, 5, EVALUATE_METRICS, 100) is None


@pytest.mark.parametrize(
    ("metrics", "examples", "problem"),
    [
        ({"partition-id": 0}, 10, "metric 'bitwidth' is missing"),
        ({**GOOD_FIT, "bitwidth": True}, 10, "'bitwidth' must be an int, got True"),
        ({**GOOD_FIT, "partition-id": -1}, 10, "'partition-id' must be an int >= 0"),
        ({**GOOD_FIT, "loss": math.nan}, 10, "'loss' must be a finite number, got nan"),
        ({**GOOD_FIT, "train-steps": 1.0}, 10, "'train-steps' must be an int >= 0"),
        ({**GOOD_FIT, "loss": b"x" * 200}, 10, "got b'xxxx"),
        (GOOD_FIT, -1, "num_examples must be an int >= 0, got -1"),
        (GOOD_FIT, 10.0, "num_examples must be an int >= 0"),
        (GOOD_FIT, 101, "exceeds max-client-examples 100 (raise that key"),
    ],
)
def test_each_bad_fit_reply_is_named(metrics, examples, problem):
    found = reply_problem(metrics, examples, FIT_METRICS, 100)
    assert found is not None and problem in found
    assert len(found) < 200  # a client's long value is cut, not echoed into every log line


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("local-accuracy", 1.5, "'local-accuracy' must be a number in [0, 1]"),
        ("local-loss", -0.1, "'local-loss' must be a finite number >= 0"),
        ("local-model", "x" * 65, "'local-model' must be a short str"),
    ],
)
def test_each_bad_evaluation_metric_is_named(key, value, problem):
    metrics = {"partition-id": 0, "bitwidth": 4, key: value}
    assert problem in reply_problem(metrics, 5, EVALUATE_METRICS, 100)
