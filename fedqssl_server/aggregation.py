"""Weights and weighted sums of model states: the arithmetic of every server round, free of Flower.

Fed-QSSL's aggregation is ``w_G = sum_k p_k w'_k`` with ``p_k = exp(-L_DQ_k) / sum_j
exp(-L_DQ_j)`` (the paper's Algorithm 1, line 13, and the formula after it); FedAvg's is the
same sum with ``p_k = |D_k| / |D|`` (equation 1's weights).

``RunningAverage`` folds one state at a time (an online softmax over log-weights), so a server
holds O(1) states however many clients report; the tests hold the all-at-once reference it
equals up to float rounding (``tests/reference_math.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]


class RunningAverage:
    """``sum_k e^{a_k} x_k / sum_k e^{a_k}`` folded one state at a time: O(1) states held.

    ``a_k`` is a log-weight (``-L_DQ / T`` for Fed-QSSL, ``log n_k`` for sample weights); the
    running maximum of the ``a_k`` keeps every exponent <= 0 (online softmax), and the sums are
    rescaled when it grows. Integer buffers (BatchNorm counters) take the maximum.
    """

    def __init__(self) -> None:
        self.max_log_weight = -math.inf
        self.norm = 0.0
        self.total: State = {}
        self.count = 0  # states folded in

    def add(self, state: Mapping[str, torch.Tensor], log_weight: float) -> None:
        """Fold ``state`` in with log-weight ``log_weight``."""
        if math.isnan(log_weight) or log_weight == math.inf:
            raise ValueError(f"a log-weight must be a number below +inf, got {log_weight}")
        if log_weight > self.max_log_weight:
            if self.total and self.max_log_weight > -math.inf:
                rescale = math.exp(self.max_log_weight - log_weight)
                self.norm *= rescale
                for tensor in self.total.values():
                    if tensor.is_floating_point():
                        tensor.mul_(rescale)
            self.max_log_weight = log_weight
        weight = 0.0 if log_weight == -math.inf else math.exp(log_weight - self.max_log_weight)
        self.norm += weight
        self.count += 1
        for name, tensor in state.items():
            if name not in self.total:
                self.total[name] = (
                    tensor.double() * weight if tensor.is_floating_point() else tensor.clone()
                )
            elif tensor.is_floating_point():
                self.total[name].add_(tensor.double(), alpha=weight)
            else:
                self.total[name] = torch.maximum(self.total[name], tensor)

    def result(self, like: Mapping[str, torch.Tensor]) -> State:
        """The weighted average, in the dtypes of ``like``."""
        if self.norm <= 0:
            raise ValueError("no state with a positive weight was added")
        return {
            name: (self.total[name] / self.norm).to(tensor.dtype)
            if tensor.is_floating_point()
            else self.total[name]
            for name, tensor in like.items()
        }


def add_update(current: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> State:
    """``current + update`` for floating tensors; integer tensors (sent as values, not
    differences) take the update's."""
    return {
        name: (tensor.double() + update[name].double()).to(tensor.dtype)
        if tensor.is_floating_point()
        else update[name]
        for name, tensor in current.items()
    }


def log_weight(weight: float) -> float:
    """log of a weight >= 0 (-inf for 0: ``RunningAverage`` gives it no weight)."""
    return math.log(weight) if weight > 0 else -math.inf
