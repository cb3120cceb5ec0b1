"""Small constant tensors made once per device. Building one from Python values, or moving a CPU
copy to the GPU, on every use is a host-to-device copy each time: in a training step's hot path,
a wait for the host per layer. Free of Flower."""

from __future__ import annotations

import functools

import torch


@functools.cache
def constant(
    values: tuple[float, ...] | tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, made once per (values, dtype, device) and shared:
    read it, never write to it."""
    return torch.tensor(values, dtype=dtype, device=device)
