"""The server's weighted sums (fedqssl_server.aggregation): the running average a round folds one
state at a time equals the all-at-once reference, whatever the weights."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_math import apply_update, average_states, sample_weights, softmax_weights

from fedqssl_server.aggregation import RunningAverage


def test_softmax_weights_and_weighted_average():
    weights = softmax_weights([1.0, 2.0, 3.0], temperature=1.0)
    expected = np.exp([-1.0, -2.0, -3.0]) / np.exp([-1.0, -2.0, -3.0]).sum()
    assert np.allclose(weights, expected)
    assert np.allclose(softmax_weights([1000.0, 1001.0], 0.5), softmax_weights([0.0, 1.0], 0.5))
    states = [
        {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2)},
        {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(5)},
    ]
    averaged = average_states(states, [0.25, 0.75])
    assert torch.allclose(averaged["w"], torch.tensor([2.5, 4.5])) and int(averaged["n"]) == 5
    with pytest.raises(ValueError, match="finite"):
        softmax_weights([float("nan"), 1.0])


@settings(max_examples=60, deadline=None)
@given(
    log_weights=st.lists(
        st.floats(min_value=-700, max_value=700, allow_nan=False), min_size=1, max_size=6
    ),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_running_average_equals_the_softmax_weighted_average(log_weights, seed):
    generator = torch.Generator().manual_seed(seed)
    states = [
        {
            "w": torch.randn(5, generator=generator),
            "n": torch.randint(0, 9, (2,), generator=generator),
        }
        for _ in log_weights
    ]
    total = RunningAverage()
    for state, log_weight in zip(states, log_weights, strict=True):
        total.add(state, log_weight)
    expected = average_states(states, softmax_weights([-a for a in log_weights]))
    result = total.result(states[0])
    torch.testing.assert_close(result["w"], expected["w"], rtol=1e-6, atol=1e-6)
    assert torch.equal(result["n"], expected["n"])


def test_running_average_gives_zero_weight_to_minus_infinity_and_refuses_nan():
    total = RunningAverage()
    total.add({"w": torch.tensor([100.0])}, -math.inf)
    total.add({"w": torch.tensor([2.0])}, math.log(3))
    assert total.result({"w": torch.tensor([0.0])})["w"].item() == 2.0
    with pytest.raises(ValueError, match="log-weight"):
        total.add({"w": torch.tensor([1.0])}, math.nan)
    with pytest.raises(ValueError, match="positive weight"):
        RunningAverage().result({"w": torch.tensor([0.0])})


def test_sample_weights_and_update_application():
    assert np.allclose(sample_weights([10, 30]), [0.25, 0.75])
    with pytest.raises(ValueError, match="positive sum"):
        sample_weights([0, 0])
    current = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    updates = [
        {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(4)},
        {"w": torch.tensor([-2.0, 4.0]), "n": torch.tensor(5)},
    ]
    new = apply_update(current, updates, [0.75, 0.25])
    assert torch.allclose(new["w"], torch.tensor([2.0, 2.0])) and int(new["n"]) == 5
