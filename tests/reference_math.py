"""Reference arithmetic the streaming server is checked against: all-at-once softmax weights,
weighted averages and updates, as the paper writes them (the server itself folds one state at a
time: ``fedqssl_server.aggregation.RunningAverage``)."""

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedqssl_server.aggregation import State, add_update


def softmax_weights(losses: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """``p_k = exp(-L_k / T) / sum_j exp(-L_j / T)``, computed stably."""
    scores = -np.asarray(losses, dtype=np.float64) / temperature
    if not np.isfinite(scores).all():
        raise ValueError(f"de-quantization losses must be finite, got {list(losses)}")
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Weighted average of floating tensors; integer buffers (BatchNorm counters) take the max."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    averaged: State = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = sum(
                float(w) * s[name].double() for s, w in zip(states, weights, strict=True)
            ).to(first.dtype)
        else:
            averaged[name] = torch.stack([s[name] for s in states]).max(dim=0).values
    return averaged


def sample_weights(examples: Sequence[int]) -> np.ndarray:
    """FedAvg's weights ``n_k / sum_j n_j``."""
    counts = np.asarray(examples, dtype=np.float64)
    if len(counts) == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"sample counts must be >= 0 with a positive sum, got {list(examples)}")
    return counts / counts.sum()


def apply_update(
    current: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> State:
    """``current + sum_k w_k update_k``; integer tensors take the maximum, as in
    ``average_states``."""
    return add_update(current, average_states(updates, weights))
