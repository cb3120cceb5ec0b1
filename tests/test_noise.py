"""Counter-based noise: SplitMix64 exactly, the same floats in the kernel and in tensor ops, and
draws uniform and independent enough for unbiased stochastic rounding."""

import pytest
import torch
from core_helpers import kernels, needs_compiler
from hypothesis import given, settings
from hypothesis import strategies as st

from common.lowbit import kernel, noise

seeds = st.integers(min_value=0, max_value=noise.SEED_LIMIT - 1)
UINT64 = (1 << 64) - 1


def splitmix64(seed: int, index: int) -> float:
    """The reference, in Python integers: SplitMix64's output for counter ``index``."""
    z = (seed + (index + 1) * noise.GOLDEN_GAMMA) & UINT64
    z = ((z ^ (z >> 30)) * noise.MIX_1) & UINT64
    z = ((z ^ (z >> 27)) * noise.MIX_2) & UINT64
    z ^= z >> 31
    return (z >> 40) / 2**24


def tensor_ops_uniform(seed: int, count: int) -> torch.Tensor:
    with kernels(on=False):
        return noise.uniform(seed, count)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, count=st.integers(0, 300))
def test_the_tensor_ops_compute_splitmix64_exactly(seed, count):
    expected = torch.tensor([splitmix64(seed, i) for i in range(count)], dtype=torch.float32)
    assert torch.equal(tensor_ops_uniform(seed, count), expected)


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(seed=seeds, count=st.integers(0, 70_000))
def test_the_kernel_draws_what_the_tensor_ops_draw(seed, count):
    assert kernel.counter_uniform() is not None, "a C++ compiler is here, so the kernel must build"
    assert torch.equal(noise.uniform(seed, count), tensor_ops_uniform(seed, count))


def test_draws_are_uniform_on_torch_rands_grid_and_uncorrelated():
    draws = noise.uniform(noise.draw_seed(torch.Generator().manual_seed(0)), 1 << 20).double()
    assert draws.min() >= 0 and draws.max() < 1
    assert torch.equal(draws * 2**24, (draws * 2**24).round())  # multiples of 2^-24
    # 64 bins of 16384 expected each: a chi-square with 63 degrees of freedom, its 99.99% point
    # is about 120
    counts = torch.bincount((draws * 64).long(), minlength=64).double()
    chi_square = float(((counts - 16384) ** 2 / 16384).sum())
    assert chi_square < 120, chi_square
    neighbours = torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1]
    assert abs(float(neighbours)) < 0.005  # sd of a null correlation here: 0.001


def test_seeds_come_from_the_generator_and_give_different_draws():
    first = noise.draw_seed(torch.Generator().manual_seed(1))
    assert first == noise.draw_seed(torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    seeds_drawn = {noise.draw_seed(generator) for _ in range(100)}
    assert len(seeds_drawn) == 100 and all(0 <= s < noise.SEED_LIMIT for s in seeds_drawn)
    a, b = (noise.uniform(s, 4096) for s in sorted(seeds_drawn)[:2])
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1  # null sd ~0.016


def test_a_seed_outside_the_range_is_refused():
    with pytest.raises(ValueError, match="outside"):
        noise.uniform(-1, 4)
    with pytest.raises(ValueError, match="outside"):
        noise.uniform(noise.SEED_LIMIT, 4)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, count=st.integers(0, 3000))
def test_a_seed_tensor_draws_what_its_int_draws(seed, count):
    """A GPU generator's seed stays a 0-dim tensor on its device (no host read per layer): the
    tensor ops draw from it exactly what they draw from the int."""
    with kernels(on=False):
        from_tensor = noise.uniform(torch.tensor(seed, dtype=torch.int64), count)
        assert torch.equal(from_tensor, tensor_ops_uniform(seed, count))


def test_a_cpu_generator_gives_int_seeds_and_a_bad_seed_tensor_is_refused():
    seed = noise.draw_seed(torch.Generator().manual_seed(3))
    assert isinstance(seed, int) and 0 <= seed < noise.SEED_LIMIT
    with pytest.raises(ValueError, match="0-dim int64"):
        noise.uniform(torch.tensor([1, 2]), 4)
