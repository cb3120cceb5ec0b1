"""Stochastic rounding's uniform noise, computed from a counter instead of read from a stream.

Value i of the draw with seed s is SplitMix64's output for that counter,
``mix(s + (i + 1) * 0x9E3779B97F4A7C15)``, its top 24 bits over 2^24: a float in [0, 1) on
``torch.rand``'s 2^-24 grid. Each draw takes one seed from the caller's ``torch.Generator``, so a
seeded run repeats itself, and value i depends on nothing but (seed, i). Why not ``torch.rand``:
its generator is serial and its noise a tensor written and read back (about 100 ms of a CPU
ResNet-18 step's 435 ms of quantization, docs/BENCHMARKS.md), while a counter lets the fused
kernels (``common.lowbit.kernel``) make each value where they use it, and gives the same floats
in the kernels and in the tensor ops below, on any device.
"""

from __future__ import annotations

import torch

from common.lowbit import kernel

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's counter step
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
SEED_LIMIT = 1 << 62  # seeds are drawn in [0, SEED_LIMIT)


# a draw's seed: a Python int from a CPU generator; from a GPU generator the 0-dim int64 tensor
# on its device, so that drawing it never waits for the GPU (an int() would, once per layer)
Seed = int | torch.Tensor


def draw_seed(generator: torch.Generator | None) -> Seed:
    """One draw's seed from ``generator`` (torch's default generator when None)."""
    device = generator.device if generator is not None else "cpu"
    drawn = torch.randint(SEED_LIMIT, (1,), generator=generator, device=device)
    return int(drawn) if drawn.device.type == "cpu" else drawn.reshape(())


def uniform(seed: Seed, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The draw's first ``count`` values (float32 in [0, 1)): the fused kernel on the CPU where
    it is built, int64 tensor ops elsewhere (the same floats, from an int seed or its tensor)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise ValueError(f"a seed tensor is a 0-dim int64 one, got {seed.dtype} {seed.shape}")
    elif not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed} is outside [0, 2^62): draw it with draw_seed")
    fused = kernel.counter_uniform() if torch.device(device).type == "cpu" else None
    if fused is not None:
        return fused(int(seed), count)  # a CPU seed: int() waits for no device
    return at_counters(torch.arange(1, count + 1, dtype=torch.int64, device=device), seed)


def at_counters(counter: torch.Tensor, seed: Seed) -> torch.Tensor:
    """SplitMix64's draws at int64 ``counter`` (consumed) for ``seed``, an int or an int64
    tensor broadcast against it (one seed per element: many draws in one pass), as floats."""
    # int64 arithmetic wraps modulo 2^64 as SplitMix64's uint64 does; right shifts are masked
    # to be logical
    z = counter.mul_(_signed(GOLDEN_GAMMA)).add_(seed)
    z = (z ^ _shift_right(z, 30)).mul_(_signed(MIX_1))
    z = (z ^ _shift_right(z, 27)).mul_(_signed(MIX_2))
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).float().mul_(2.0**-24)


def _signed(constant: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(z: torch.Tensor, places: int) -> torch.Tensor:
    return (z >> places) & ((1 << (64 - places)) - 1)
