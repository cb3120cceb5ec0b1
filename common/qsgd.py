"""QSGD's unbiased stochastic quantizer for model updates (FedPAQ's uplink).

A tensor v becomes its norm and one signed level per entry: with s levels,
``Q(v)_i = ||v|| * sign(v_i) * l_i / s`` where ``l_i`` is ``floor(s |v_i| / ||v||)`` or one more,
the upper one with probability equal to the fractional part, so ``E[Q(v)] = v`` exactly.
At ``bits`` bits there are ``s = 2^(bits-1) - 1`` levels: a level and its sign fit one code
``l * sign + s`` in ``[0, 2s]``, so an update entry costs the client's bitwidth on the wire.
"""

from __future__ import annotations

import torch


def qsgd_levels(bits: int) -> int:
    """Levels per sign at ``bits`` bits (2 bits: 1 level, i.e. ternary {-||v||, 0, ||v||})."""
    if not 2 <= bits <= 16:
        raise ValueError(f"QSGD codes need 2..16 bits, got {bits}")
    return (1 << (bits - 1)) - 1


def qsgd_expected_levels(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower level, probability of the upper one) per entry; exposes the rounding for tests."""
    levels = qsgd_levels(bits)
    flat = values.detach().reshape(-1).double()
    norm = flat.norm()
    if norm == 0:
        return torch.zeros_like(flat), torch.zeros_like(flat)
    scaled = (flat.abs() / norm * levels).clamp(0, levels)
    lower = scaled.floor()
    return lower, scaled - lower


def qsgd_encode(
    values: torch.Tensor, bits: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Stochastic QSGD codes in ``[0, 2s]`` (int64, flattened) and the norm they scale by."""
    levels = qsgd_levels(bits)
    lower, upper_probability = qsgd_expected_levels(values, bits)
    draw = torch.rand(lower.shape, generator=generator, dtype=torch.float64)
    level = lower + (draw < upper_probability).double()
    sign = torch.sign(values.detach().reshape(-1).double())
    codes = (sign * level).to(torch.int64) + levels
    return codes, float(values.detach().double().norm())


def qsgd_decode(codes: torch.Tensor, norm: float, bits: int) -> torch.Tensor:
    """Values of QSGD ``codes`` (flattened, float32)."""
    levels = qsgd_levels(bits)
    return (codes.to(torch.float64) - levels) * (norm / levels)
