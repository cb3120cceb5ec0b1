"""Quantizers: grids, exact codes, straight-through gradients, unbiasedness, Lemma 1's shape."""

import contextlib
import itertools
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import bits_of, kernels, needs_compiler
from hypothesis import given, settings
from hypothesis import strategies as st

from common.lowbit import kernel, noise, quantizers
from common.lowbit.layers import (
    QuantAct,
    QuantConv2d,
    QuantLinear,
    project_weights_,
    set_bitwidth,
    set_fp_activation,
)
from common.lowbit.quantizers import (
    MAX_SCALE,
    _centres_of_sorted,
    codes_to_weight,
    project_to_grid_,
    quantile_centres,
    quantize_activation,
    quantize_gradient,
    quantize_gradients_,
    quantize_weight,
    quantizing_once,
    round_between,
    weight_codes,
)
from common.lowbit.saved_codes import code_dtype
from common.vocabulary import FULL_PRECISION, check_bits

low_bits = st.integers(min_value=2, max_value=16)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def random_weight(seed: int, shape=(16, 8, 3, 3), std: float = 0.2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


@settings(max_examples=60, deadline=None)
@given(bits=low_bits, seed=seeds, std=st.sampled_from([1e-3, 0.05, 0.5, 3.0]))
def test_forward_weights_are_decoded_codes_with_at_most_2_pow_s_values(bits, seed, std):
    weight = random_weight(seed, std=std)
    forward = quantize_weight(weight, bits)
    codes, scale = weight_codes(weight, bits)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert 0 <= float(scale) <= MAX_SCALE
    assert torch.equal(forward, codes_to_weight(codes, scale, bits))
    assert forward.unique().numel() <= 2**bits


@settings(max_examples=80, deadline=None)
@given(
    bits=low_bits,
    seed=seeds,
    std=st.sampled_from([1e-3, 0.2, 3.0]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
)
def test_weight_quantizer_is_idempotent_and_keeps_magnitude(bits, seed, std, rounding):
    """Codes and scale again, bit for bit, also after the stochastic projection's codes: a
    decoded model projected again does not move (``mark_on_grid`` relies on it)."""
    weight = random_weight(seed, std=std)
    generator = torch.Generator().manual_seed(seed)
    codes_once, scale_once = weight_codes(weight, bits, rounding, generator)
    once = codes_to_weight(codes_once, scale_once, bits)
    codes_twice, scale_twice = weight_codes(once, bits)
    assert torch.equal(codes_once, codes_twice)
    assert torch.equal(bits_of(scale_once), bits_of(scale_twice))
    assert torch.equal(bits_of(quantize_weight(once, bits)), bits_of(once))
    # the largest weight keeps its magnitude exactly (up to float rounding of tanh/atanh), up
    # to atanh(MAX_SCALE), where larger weights are clipped
    largest = min(float(weight.abs().max()), math.atanh(MAX_SCALE))
    assert math.isclose(float(once.abs().max()), largest, rel_tol=1e-4)


def test_weight_quantizer_extremes_and_zero_layer():
    zeros = torch.zeros(4, 4)
    assert torch.equal(quantize_weight(zeros, 4), zeros)
    huge = torch.tensor([[20.0, -1.0], [0.5, 0.0]])
    forward = quantize_weight(huge, 4)
    assert torch.isfinite(forward).all()
    assert math.isclose(float(forward.max()), math.atanh(MAX_SCALE), rel_tol=1e-4)


def test_weight_gradient_passes_straight_through():
    weight = random_weight(1).requires_grad_()
    upstream = torch.randn_like(weight)
    (quantize_weight(weight, 4) * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def test_full_precision_is_a_no_op_everywhere():
    weight = random_weight(2)
    assert quantize_weight(weight, FULL_PRECISION) is weight
    x = torch.randn(100)
    assert torch.equal(quantize_activation(x, FULL_PRECISION), torch.relu(x))
    assert quantize_gradient(x, FULL_PRECISION) is x


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(min_value=2, max_value=8), seed=seeds)
def test_activations_are_on_the_grid_in_unit_interval(bits, seed):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * 2
    y = quantize_activation(x, bits)
    assert y.min() >= 0 and y.max() <= 1
    assert y.unique().numel() <= 2**bits
    levels = 2**bits - 1
    assert torch.equal(y, torch.round(y * levels) / levels)


def test_full_precision_activation_is_relu_or_the_clients_clamp_without_rounding():
    x = torch.linspace(-2, 2, 401)
    assert torch.equal(quantize_activation(x, FULL_PRECISION, "relu"), torch.relu(x))
    clamped = quantize_activation(x, FULL_PRECISION, "clamp")
    assert torch.equal(clamped, x.clamp(0, 1))
    inside = (x > 0) & (x < 1)
    assert torch.equal(clamped[inside], x[inside])  # not rounded to any grid
    model = torch.nn.Sequential(QuantConv2d(1, 2, 3), QuantAct(), QuantAct())
    set_fp_activation(model, "clamp")
    assert [m.full_precision for m in model if isinstance(m, QuantAct)] == ["clamp", "clamp"]
    set_bitwidth(model, 4)  # a bitwidth change keeps the choice for when it is back at 32 bits
    assert all(m.full_precision == "clamp" for m in model if isinstance(m, QuantAct))
    with pytest.raises(ValueError, match="fp-activation 'tanh' is not one of relu, clamp"):
        set_fp_activation(model, "tanh")


def test_activation_gradient_is_the_clamps():
    x = torch.tensor([-0.5, 0.2, 0.7, 1.5], requires_grad=True)
    quantize_activation(x, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(min_value=2, max_value=14), seed=seeds, n=st.integers(2, 3000))
def test_gradient_quantizer_maps_onto_quantile_centres_keeping_extremes(bits, seed, n):
    grad = torch.randn(n, generator=torch.Generator().manual_seed(seed)) ** 3
    centres = quantile_centres(grad, bits)
    assert centres.numel() == 2**bits
    assert centres[0] == grad.min() and centres[-1] == grad.max()
    for rounding in ("stochastic", "deterministic"):
        quantized = quantize_gradient(grad, bits, rounding, torch.Generator().manual_seed(seed))
        assert torch.isin(quantized, centres).all()
        assert quantized.unique().numel() <= 2**bits
        assert quantized.min() == grad.min() and quantized.max() == grad.max()


def test_deterministic_gradient_quantizer_rounds_to_nearest_centre():
    grad = torch.randn(500, generator=torch.Generator().manual_seed(3))
    centres = quantile_centres(grad, 3)
    quantized = quantize_gradient(grad, 3, "deterministic")
    distance = (grad - quantized).abs()
    nearest = (grad[:, None] - centres[None, :]).abs().min(dim=1).values
    assert torch.allclose(distance, nearest, atol=1e-6)


def test_stochastic_gradient_quantizer_is_unbiased():
    # Each draw picks the lower or upper centre around g, so the mean of T draws has a standard
    # deviation of at most gap / (2 sqrt(T)); allow 5 of those per element.
    grad = torch.randn(300, generator=torch.Generator().manual_seed(4))
    draws = 4000
    generator = torch.Generator().manual_seed(5)
    samples = torch.stack(
        [quantize_gradient(grad, 3, "stochastic", generator) for _ in range(draws)]
    )
    centres = quantile_centres(grad, 3)
    index = torch.searchsorted(centres, grad).clamp(1, len(centres) - 1)
    gap = centres[index] - centres[index - 1]
    tolerance = 5 * gap / (2 * math.sqrt(draws)) + 1e-6
    assert ((samples.mean(dim=0) - grad).abs() <= tolerance).all()
    # ...while nearest rounding is biased for the same values
    deterministic_bias = (quantize_gradient(grad, 3, "deterministic") - grad).abs().mean()
    assert (samples.mean(dim=0) - grad).abs().mean() < deterministic_bias / 5


def test_weight_quantization_error_shrinks_about_4x_per_bit():
    weight = torch.randn(200_000, generator=torch.Generator().manual_seed(6)) * 0.1
    errors = [float(((quantize_weight(weight, b) - weight) ** 2).mean()) for b in range(3, 12)]
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(3.0 < r < 5.0 for r in ratios), ratios


def _stochastic_error(grad: torch.Tensor, bits_range: range) -> list[float]:
    generator = torch.Generator().manual_seed(8)
    return [
        float(((quantize_gradient(grad, b, "stochastic", generator) - grad) ** 2).mean())
        for b in bits_range
    ]


def test_gradient_quantization_variance_shrinks_about_4x_per_bit_on_bounded_values():
    # Lemma 1's O(G^2 / 2^(2R)) shape: evenly spread, bounded values -> evenly spaced centres.
    grad = torch.rand(400_000, generator=torch.Generator().manual_seed(7)) * 2 - 1
    errors = _stochastic_error(grad, range(4, 11))
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(3.5 < r < 4.5 for r in ratios), ratios


def test_gradient_quantization_variance_on_gaussian_values_is_tail_dominated():
    # Quantile centres leave the two extreme bins (min..first quantile, last quantile..max) wide
    # on unbounded data, so the error shrinks by less than 4x per bit, but still by more than 2x.
    grad = torch.randn(400_000, generator=torch.Generator().manual_seed(7))
    errors = _stochastic_error(grad, range(4, 11))
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(2.0 < r < 4.0 for r in ratios), ratios


@pytest.mark.parametrize("bits", [0, 1, 17, 31, 33, True, 4.0])
def test_unsupported_bitwidths_are_rejected(bits):
    with pytest.raises(ValueError, match="bitwidth"):
        check_bits(bits)


def test_set_bitwidth_reaches_every_quantized_module():
    model = torch.nn.Sequential(
        QuantConv2d(1, 2, 3), QuantAct(), torch.nn.Sequential(QuantLinear(2, 2), QuantAct())
    )
    set_bitwidth(model, 6)
    assert [m.bits for m in model.modules() if hasattr(m, "bits")] == [6, 6, 6, 6]
    with pytest.raises(ValueError):
        set_bitwidth(model, 33)


def test_stochastic_projection_puts_weights_on_grid_unbiasedly_in_tanh_space():
    layer = set_bitwidth(QuantLinear(64, 64), 4)
    original = layer.weight.detach().clone()
    generator = torch.Generator().manual_seed(9)
    tanh_means = torch.zeros_like(original)
    trials = 400
    for _ in range(trials):
        layer.weight.data.copy_(original)
        project_weights_(layer, 4, "stochastic", generator)
        assert layer.weight.unique().numel() <= 16
        assert torch.equal(layer.weight, quantize_weight(layer.weight, 4))
        tanh_means += torch.tanh(layer.weight) / trials
    grid_step = 2 * float(torch.tanh(original).abs().max()) / 15
    tolerance = 5 * grid_step / (2 * math.sqrt(trials))
    assert ((tanh_means - torch.tanh(original)).abs() <= tolerance).all()


def test_sampled_quantiles_keep_every_value_between_two_centres_and_stay_unbiased():
    """Above ``sample_above`` elements the centres come from a sample (exact min and max at the
    ends): every value still rounds to one of the two centres around it, so the stochastic
    quantizer stays unbiased (the centres differ from draw to draw)."""
    grad = torch.rand(150_000, generator=torch.Generator().manual_seed(11)) * 2 - 1
    generator = torch.Generator().manual_seed(12)
    draws = 100
    samples = torch.stack(
        [
            quantize_gradient(grad, 3, "stochastic", generator, sample_above=100_000)
            for _ in range(draws)
        ]
    )
    assert samples.min() == grad.min() and samples.max() == grad.max()
    assert all(draw.unique().numel() <= 8 for draw in samples[:10])
    # 8 centres over [-1, 1]: gaps near 2/7, so the mean of 100 draws is within 5 standard
    # errors of gap / (2 sqrt(draws)); nearest rounding misses by up to a gap / 2 = 0.14
    assert ((samples.mean(dim=0) - grad).abs() <= 5 * 0.3 / (2 * math.sqrt(draws))).all()
    assert abs(float((samples - grad).mean())) < 1e-3
    nearest = quantize_gradient(grad, 3, "deterministic", sample_above=100_000)
    assert (nearest - grad).abs().max() > 0.1  # the tolerance above would catch its bias


def test_sampled_quantiles_cost_little_accuracy_on_a_large_layer():
    grad = torch.randn(600_000, generator=torch.Generator().manual_seed(13))
    errors = {}
    for name, above in (("exact", 10**9), ("sampled", 1 << 18)):
        quantized = quantize_gradient(
            grad, 6, "stochastic", torch.Generator().manual_seed(14), above
        )
        errors[name] = float(((quantized - grad) ** 2).mean())
    assert errors["sampled"] < 1.15 * errors["exact"], errors


# ------------------------------------------------ the fused kernels against the plain formulas


def with_signed_zero_ties(values, ties: float, generator) -> None:
    """Set a ``ties`` share of ``values``, in place, to 0.0 or -0.0: runs of equal values."""
    n = values.numel()
    tied = torch.rand(n, generator=generator) < ties
    values[tied] = torch.where(torch.rand(n, generator=generator) < 0.5, 0.0, -0.0)[tied]


def plain_weight_codes(weight, bits, rounding, generator):
    """The module docstring's formulas, one out-of-place operation each (the code before it
    shared tanh between scale and codes and rounded in place)."""
    levels = (1 << bits) - 1
    scale = torch.tanh(weight).abs().max().clamp(max=MAX_SCALE)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = (torch.tanh(weight) / (2 * safe_scale) + 0.5).clamp(0.0, 1.0) * levels
    if rounding == "deterministic":
        rounded = torch.round(unit)
    else:
        floor = torch.floor(unit)
        draws = noise.uniform(noise.draw_seed(generator), unit.numel()).view(unit.shape)
        rounded = floor + (draws < (unit - floor)).float()
    return rounded.clamp(0, levels), scale


def plain_round_between(values, centres, bracket, rounding, generator):
    """Each value to its lower or upper centre, as the paper writes it (the code before it)."""
    lower, upper = centres[bracket], centres[bracket + 1]
    gap = upper - lower
    frac = ((values - lower) / torch.where(gap > 0, gap, torch.ones_like(gap))).clamp(0.0, 1.0)
    frac = torch.where(gap > 0, frac, torch.zeros_like(frac))
    if rounding == "deterministic":
        pick_upper = frac > 0.5
    else:
        pick_upper = noise.uniform(noise.draw_seed(generator), values.numel()) < frac
    return torch.where(pick_upper, upper, lower)


@settings(max_examples=60, deadline=None)
@given(
    bits=low_bits,
    seed=seeds,
    std=st.sampled_from([1e-3, 0.5, 6.0]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
    fused=st.booleans(),
)
def test_weight_codes_and_decoding_equal_the_plain_formulas_bit_for_bit(
    bits, seed, std, rounding, fused
):
    weight = random_weight(seed, std=std)
    weight[0, 0, 0] = 0.0
    with kernels(on=fused):
        codes, scale = weight_codes(weight, bits, rounding, torch.Generator().manual_seed(seed))
    plain_codes, plain_scale = plain_weight_codes(
        weight, bits, rounding, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(bits_of(codes), bits_of(plain_codes)) and torch.equal(scale, plain_scale)
    with kernels(on=fused):
        decoded = codes_to_weight(codes, scale, bits)
        as_integers = codes_to_weight(codes.to(code_dtype((1 << bits) - 1)), scale, bits)
    assert torch.equal(bits_of(decoded), bits_of(as_integers))
    # one weight per code: atanh(M * (2c - L) / L), its argument in float32, atanh within 4
    # ulps of float64's (the end weights may move 3 ulps to make tanh give M back exactly)
    levels = (1 << bits) - 1
    argument = (codes * 2 - levels) / levels * scale
    exact = torch.atanh(argument.double())
    assert torch.allclose(decoded.double(), exact, rtol=5e-7, atol=1e-38)
    for code in codes.unique():
        assert decoded[codes == code].unique().numel() == 1


@settings(max_examples=60, deadline=None)
@given(
    bits=low_bits,
    seed=seeds,
    std=st.sampled_from([1e-3, 0.5, 6.0]),
    size=st.integers(1, 3000),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
    fused=st.booleans(),
)
def test_the_grid_projection_writes_the_decoded_codes_bit_for_bit(
    bits, seed, std, size, rounding, fused
):
    """``project_to_grid_`` (one fused pass for stochastic rounding) against the codes decoded,
    also on NaN, infinite and zero weights and partial lanes; it bumps the version counter."""
    weight = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * std
    weight[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])[: min(size, 4)]
    expected = codes_to_weight(
        *weight_codes(weight, bits, rounding, torch.Generator().manual_seed(seed)), bits
    )
    projected = weight.clone()
    version = projected._version
    with kernels(on=fused):
        project_to_grid_(projected, bits, rounding, torch.Generator().manual_seed(seed))
    assert torch.equal(bits_of(projected), bits_of(expected))
    assert projected._version > version


@needs_compiler
def test_the_grid_projection_is_the_same_with_and_without_the_fused_kernel():
    weight = random_weight(5, shape=(64, 64, 3, 3))
    projected = {}
    for fused in (True, False):
        projected[fused] = weight.clone()
        with kernels(on=fused):
            project_to_grid_(projected[fused], 4, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(bits_of(projected[True]), bits_of(projected[False]))
    assert not torch.equal(projected[True], weight)


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    bits=st.sampled_from([2, 6, 14]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
    fused=st.booleans(),
)
def test_quantizing_a_models_gradients_at_once_equals_one_layer_after_another(
    seed, bits, rounding, fused
):
    """In place, sorts on threads, draws in layer order: the numbers of ``quantize_gradient``
    layer by layer with one generator, for exact and sampled layers, a one-value layer, a
    non-contiguous and a float64 gradient."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(size, generator=generator) for size in (3000, 1, 70_000, 500, 90_000)]
    grads[3] = torch.randn(40, 30, generator=generator).t()  # non-contiguous
    grads[4] = grads[4].double()
    expected = []
    generator = torch.Generator().manual_seed(seed)
    for grad in grads:
        expected.append(quantize_gradient(grad, bits, rounding, generator, sample_above=60_000))
    quantized = [grad.clone() for grad in grads]
    with kernels(on=fused):
        quantize_gradients_(
            quantized, bits, rounding, torch.Generator().manual_seed(seed), sample_above=60_000
        )
    for mine, theirs in zip(quantized, expected, strict=True):
        assert mine.dtype == theirs.dtype
        assert torch.equal(
            mine.contiguous().view(torch.uint8), theirs.contiguous().view(torch.uint8)
        )
    assert not torch.equal(quantized[0], grads[0])


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8, 12]), seed=seeds)
def test_weight_decoding_is_the_same_with_and_without_the_kernel_nan_codes_included(bits, seed):
    codes, scale = weight_codes(random_weight(seed), bits)
    codes.view(-1)[::7] = math.nan
    with kernels(on=False):
        plain = codes_to_weight(codes, scale, bits)
    assert torch.isnan(plain.view(-1)[::7]).all()
    assert torch.equal(bits_of(codes_to_weight(codes, scale, bits)), bits_of(plain))


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    n=st.integers(2, 5000),
    bits=st.integers(2, 8),
    ties=st.sampled_from([0.0, 0.3, 0.9]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
    fused=st.booleans(),
)
def test_rounding_between_centres_equals_the_plain_formula_bit_for_bit(
    seed, n, bits, ties, rounding, fused
):
    """Also where centres coincide (many equal values: a zero gap) and on signed zeros."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator)
    with_signed_zero_ties(values, ties, generator)
    ordered = torch.sort(values).values
    centres = _centres_of_sorted(ordered, 1 << bits)
    bracket = (torch.searchsorted(centres, values, right=True) - 1).clamp(0, (1 << bits) - 2)
    stochastic = rounding == "stochastic"
    draw = noise.draw_seed(torch.Generator().manual_seed(seed)) if stochastic else None
    with kernels(on=fused):
        rounded = round_between(values, centres, draw)
    plain = plain_round_between(
        values, centres, bracket, rounding, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(bits_of(rounded), bits_of(plain))


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    n=st.integers(1, 70_000),
    bits=st.sampled_from([2, 6, 14]),
    ties=st.sampled_from([0.0, 0.3, 0.9]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
)
def test_the_fused_kernel_rounds_as_the_tensor_ops_bit_for_bit(seed, n, bits, ties, rounding):
    """Brackets from searchsorted's predicate and the same float32 arithmetic: the same floats,
    also on zero gaps, signed zeros, values outside the centres and infinities."""
    assert kernel.round_between() is not None, "a C++ compiler is here, so the kernel must build"
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator)
    with_signed_zero_ties(values, ties, generator)
    count = 1 << bits
    centres = _centres_of_sorted(torch.sort(values[: max(2, n // 3)]).values, count)
    values[: min(n, 2)] = torch.tensor([math.inf, -math.inf])[: min(n, 2)]
    draw = None if rounding == "deterministic" else seed
    fused = round_between(values, centres, draw)
    with kernels(on=False):
        expected = round_between(values, centres, draw)
    assert torch.equal(bits_of(fused), bits_of(expected))


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    n=st.integers(2, 5000),
    bits=st.sampled_from([2, 6, 14]),
    ties=st.sampled_from([0.0, 0.3, 0.9]),
    rounding=st.sampled_from(["deterministic", "stochastic"]),
)
def test_an_exact_layer_quantizes_the_same_with_and_without_the_fused_kernels(
    seed, n, bits, ties, rounding
):
    """Sort, centres, brackets and rounding: the same floats, also where ties (equal values,
    signed zeros) fill whole brackets, and with fewer values than centres."""
    assert kernel.round_between() is not None, "a C++ compiler is here, so the kernel must build"
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=generator)
    with_signed_zero_ties(grad, ties, generator)
    fused = quantize_gradient(grad, bits, rounding, torch.Generator().manual_seed(seed))
    with kernels(on=False):
        plain = quantize_gradient(grad, bits, rounding, torch.Generator().manual_seed(seed))
    assert torch.equal(bits_of(fused), bits_of(plain))


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    n=st.integers(2, 3000),
    bits=st.sampled_from([2, 4, 8]),
    ties=st.sampled_from([0.0, 0.5]),
)
def test_each_gradient_value_lands_on_one_of_the_two_centres_around_it(seed, n, bits, ties):
    """Brackets by value, ties included: no value moves past a centre it does not lie beside."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=generator)
    with_signed_zero_ties(grad, ties, generator)
    centres = quantile_centres(grad, bits)
    quantized = quantize_gradient(grad, bits, "stochastic", torch.Generator().manual_seed(seed))
    below = centres[(torch.searchsorted(centres, grad, right=True) - 1).clamp(0, len(centres) - 2)]
    above = centres[torch.searchsorted(centres, grad, right=False).clamp(1, len(centres) - 1)]
    assert ((quantized == below) | (quantized == above) | (quantized == grad)).all()


def test_a_large_gradient_quantizes_the_same_with_and_without_the_fused_kernel():
    grad = torch.randn(300_000, generator=torch.Generator().manual_seed(3)) * 0.01
    quantized = {}
    for fused in (True, False):
        for rounding in ("stochastic", "deterministic"):
            generator = torch.Generator().manual_seed(4)
            with kernels(on=fused):
                quantized[fused, rounding] = quantize_gradient(grad, 6, rounding, generator)
    for rounding in ("stochastic", "deterministic"):
        assert torch.equal(bits_of(quantized[True, rounding]), bits_of(quantized[False, rounding]))


def test_each_python_environment_builds_the_kernels_under_its_own_name(monkeypatch):
    """Two venvs taking turns with one build folder would rebuild it on every load."""
    here = kernel.build_name()
    assert here == kernel.build_name() and here.startswith("fedqssl_kernels_")
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")
    assert kernel.build_name() != here


def test_the_kernel_is_off_when_switched_off_or_without_a_compiler(monkeypatch, caplog):
    kernel.compiled.cache_clear()
    try:
        monkeypatch.setenv(kernel.SWITCH, "off")
        assert kernel.round_between() is None
        kernel.compiled.cache_clear()
        monkeypatch.delenv(kernel.SWITCH)
        monkeypatch.setenv("CXX", "no-such-compiler")
        with caplog.at_level(logging.WARNING):
            assert kernel.round_between() is None
        assert "no no-such-compiler on PATH" in caplog.text
    finally:
        kernel.compiled.cache_clear()


def test_an_app_run_from_a_bundle_finds_the_kernels_source_outside_it(monkeypatch, tmp_path):
    """A Flower App Bundle carries no .cpp: the copy of kernel.py inside one (here: a module
    file with no csrc beside it) takes the folder FEDQSSL_KERNEL_SOURCES names, else the
    checkout the environment's editable install points at."""
    source = Path(kernel.__file__).with_name("csrc") / kernel.SOURCE_NAME
    assert source.is_file() and "PYBIND11_MODULE" in source.read_text()
    monkeypatch.setattr(kernel, "__file__", str(tmp_path / "fab" / "common/lowbit/kernel.py"))
    monkeypatch.delenv(kernel.SOURCES, raising=False)
    found = kernel.source_file()  # this environment's editable install: the checkout's file
    assert found is not None and found.read_bytes() == source.read_bytes()
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / kernel.SOURCE_NAME).write_text("// elsewhere")
    monkeypatch.setenv(kernel.SOURCES, str(tmp_path / "sources"))
    assert kernel.source_file() == tmp_path / "sources" / kernel.SOURCE_NAME
    monkeypatch.setattr(kernel, "_installed_sources", lambda: [])
    monkeypatch.setenv(kernel.SOURCES, str(tmp_path / "empty"))
    assert kernel.source_file() is None


def test_a_build_of_another_interface_version_or_no_source_is_not_used(monkeypatch, caplog):
    """Sources of another version (a checkout older than the bundle) would call functions of
    other signatures: their build is left unused and the step keeps its tensor ops."""
    import torch.utils.cpp_extension

    class OtherVersion:
        @staticmethod
        def abi_version() -> int:
            return kernel.ABI_VERSION + 1

    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *a, **k: OtherVersion())
    with caplog.at_level(logging.WARNING):
        assert kernel.compiled.__wrapped__() is None
    assert f"this code needs {kernel.ABI_VERSION}" in caplog.text
    monkeypatch.setattr(kernel, "source_file", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert kernel.compiled.__wrapped__() is None
    assert f"no {kernel.SOURCE_NAME} found (set {kernel.SOURCES}" in caplog.text


def test_quantizing_once_reuses_a_weights_quantization_until_the_weight_changes():
    layer = QuantConv2d(2, 3, 3, bias=False)
    layer.bits = 4
    with quantizing_once():
        first, again = quantize_weight(layer.weight, 4), quantize_weight(layer.weight, 4)
        other_bits = quantize_weight(layer.weight, 6)
        with torch.no_grad():
            unused = quantize_weight(layer.weight, 4)
            layer.weight.add_(0.05)  # an optimizer step: the version counter moves
        after_step = quantize_weight(layer.weight, 4)
    outside = quantize_weight(layer.weight, 4), quantize_weight(layer.weight, 4)
    assert again is first and other_bits is not first and unused is not first
    assert after_step is not first and not torch.equal(after_step, first)
    assert outside[0] is not outside[1] and torch.equal(outside[0], after_step)


def test_a_projected_weight_is_its_own_quantization_until_it_changes():
    model = torch.nn.Sequential(QuantConv2d(2, 3, 3, bias=False))
    layer = model[0]
    project_weights_(model, 4, "stochastic", torch.Generator().manual_seed(1))
    assert quantize_weight(layer.weight, 4) is layer.weight
    assert torch.equal(
        bits_of(codes_to_weight(*weight_codes(layer.weight, 4), 4)), bits_of(layer.weight)
    )
    assert quantize_weight(layer.weight, 6) is not layer.weight  # another grid
    with torch.no_grad():
        layer.weight.add_(0.05)  # an optimizer step: the version counter moves
    assert quantize_weight(layer.weight, 4) is not layer.weight
    project_weights_(model, 4, "deterministic")
    assert quantize_weight(layer.weight, 4) is layer.weight
    layer.weight.data = layer.weight.data.clone()  # new storage, the same version
    assert quantize_weight(layer.weight, 4) is not layer.weight


@pytest.mark.parametrize("save_codes", [True, False])
def test_training_on_the_grid_is_the_same_with_and_without_the_projected_shortcut(save_codes):
    """Three grid-update steps: every parameter, bit for bit, whether the forward pass takes a
    just-projected weight as it is or quantizes it again."""
    from common.learning.models import build_ssl_model
    from common.learning.training import LowBitSettings, prepare_model, train_step
    from common.lowbit import quantizers

    settings = LowBitSettings(bits=4, save_codes=save_codes)
    trained = []
    for shortcut in (True, False):
        torch.manual_seed(5)
        model = build_ssl_model("small_cnn", 4, 1, width=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        views = torch.rand(3, 2, 16, 1, 28, 28, generator=torch.Generator().manual_seed(6))
        generator = torch.Generator().manual_seed(7)
        with pytest.MonkeyPatch.context() as patch:
            if not shortcut:
                patch.setattr(quantizers, "on_grid", lambda weight, bits: False)
            prepare_model(model, settings)
            for first, second in views:
                train_step(model, first, second, optimizer, settings, generator=generator)
        if shortcut:  # each step's forward pass took the projected weights as they were
            layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
            assert all(quantizers.on_grid(m.weight, 4) for m in layers)
        trained.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*trained, strict=True))


@pytest.mark.parametrize("save_codes", [True, False])
def test_a_step_quantizing_once_has_the_gradients_of_one_quantizing_each_pass(save_codes):
    """SimCLR's two forward passes share each quantized weight inside ``train_step``: the loss
    and every gradient are those of quantizing the weight anew in each pass."""
    from common.learning.models import build_ssl_model
    from common.learning.training import ssl_loss
    from common.lowbit.saved_codes import saving_codes

    gradients = []
    for once in (True, False):
        torch.manual_seed(5)
        model = build_ssl_model("small_cnn", 4, 1, width=8)
        views = torch.rand(2, 16, 1, 28, 28, generator=torch.Generator().manual_seed(6))
        sharing = quantizing_once() if once else contextlib.nullcontext()
        with saving_codes() if save_codes else contextlib.nullcontext(), sharing:
            loss = ssl_loss(model, views[0], views[1])
        loss.backward()
        gradients.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(*gradients, strict=True))


def test_saving_codes_the_passes_share_a_weights_codes_not_its_float_copy():
    """In the codes path no float32 weight outlives its layer: the second pass decodes the
    codes the first one kept for backward (the same tensor), to the same values."""
    from common.lowbit.saved_codes import saving_codes

    layer = QuantConv2d(2, 3, 3, bias=False)
    with saving_codes(), quantizing_once():
        first, second = quantize_weight(layer.weight, 4), quantize_weight(layer.weight, 4)
    assert first is not second and torch.equal(bits_of(first), bits_of(second))
    first_codes, second_codes = (w._saved_codes_recipe[1][0] for w in (first, second))
    assert second_codes is first_codes and first_codes.dtype == torch.uint8


def _model_weights(name: str, bits: int) -> list[torch.Tensor]:
    from common.config import ExperimentConfig
    from common.lowbit.layers import quantized_layers
    from common.runs.experiment import new_model

    config = ExperimentConfig.from_mapping({"model": name, "model-width": 8})
    model = new_model(config, bits, 3 if name == "resnet18" else 1, 10)
    return [layer.weight.detach().clone() * 1.7 for layer in quantized_layers(model)]


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("bits", [2, 4, 12])
def test_projecting_all_layers_at_once_gives_the_per_layer_floats(name, bits):
    """The GPU's flat projection, on the CPU with the kernels off: every layer's weights bit for
    bit as ``project_to_grid_`` layer after layer gives them from the same generator."""
    weights = _model_weights(name, bits)
    one_by_one, at_once = [w.clone() for w in weights], [w.clone() for w in weights]
    with kernels(on=False):
        generator = torch.Generator().manual_seed(3)
        for weight in one_by_one:
            project_to_grid_(weight, bits, "stochastic", generator)
        quantizers.project_all_to_grid_(at_once, bits, torch.Generator().manual_seed(3))
    for a, b in zip(one_by_one, at_once, strict=True):
        assert torch.equal(bits_of(a), bits_of(b))
    nan = [w.clone() for w in weights[:2]]
    nan[1][0, 0, 0, 0] = math.nan  # a NaN layer decodes to NaN, the others are untouched
    with kernels(on=False):
        quantizers.project_all_to_grid_(nan, bits, torch.Generator().manual_seed(3))
    assert torch.isnan(nan[1]).all() and torch.equal(bits_of(nan[0]), bits_of(at_once[0]))


def test_the_tables_at_once_are_each_layers_table_and_map_back_exactly():
    scales = torch.tensor([0.3, 0.761, 0.999, 1e-4, 0.0])
    at_once = quantizers._weight_tables_at_once(scales, 4)
    for row, scale in zip(at_once, scales, strict=True):
        own = quantizers.weight_table(scale, 4)
        assert torch.allclose(row, own, rtol=0, atol=float(torch.finfo(torch.float32).eps))
        assert torch.equal(row[-1], own[-1]) and torch.equal(row[0], own[0])


def test_the_flat_projection_issues_as_many_ops_for_22_layers_as_for_5(monkeypatch):
    """Launches must not grow with the layers (a GPU step is launch-bound otherwise): the
    tensor ops the flat projection dispatches, views aside, counted for a small CNN and a
    ResNet-18 (the GPU's one-pass tables standing in for the CPU's per-layer ones)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "detach", "split_with_sizes", "alias", "unsqueeze",
             "squeeze", "select", "slice", "as_strided", "expand", "t"}  # fmt: skip

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__.rstrip("_") not in views:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(quantizers, "_weight_tables", quantizers._weight_tables_at_once)
    counts = {}
    for name in ("small_cnn", "resnet18"):
        weights = _model_weights(name, 4)
        with kernels(on=False), Count() as count:
            quantizers.project_all_to_grid_(weights, 4, torch.Generator().manual_seed(0))
        counts[name] = (len(weights), count.ops)
    assert counts["small_cnn"][0] < counts["resnet18"][0]
    assert counts["small_cnn"][1] == counts["resnet18"][1] < 100, counts
