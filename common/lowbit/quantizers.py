"""Low-bit quantizers of Fed-QSSL: weights, activations, gradients, and the layers that use them.

Every quantizer is a no-op at ``FULL_PRECISION`` (32) bits.

Weights use the paper's tanh companding quantizer, per layer::

    M = max|tanh(w)|                      (the layer's one float, sent with the codes)
    c = round((2^s - 1) * (tanh(w) / (2M) + 1/2))      integer codes in [0, 2^s - 1]
    w_q = atanh(M * (2c / (2^s - 1) - 1))              the weight the forward pass uses
                                          (one table of 2^s weights a layer: ``weight_table``)

The paper's formula stops at ``2c/(2^s-1) - 1`` (a grid in [-1, 1]); mapping the grid back through
``atanh(M * .)`` (the inverse compander, as in the paper's analysis section) keeps each layer's
magnitude and makes the quantizer idempotent: quantizing ``w_q`` again gives the same codes and
scale, bit for bit, so a model decoded from the wire and trained on resumes exactly where the
sender's forward pass was.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from common.lowbit import kernel, noise, saved_codes
from common.lowbit.saved_codes import bounded_activation, mark_recomputable
from common.vocabulary import FULL_PRECISION

# Largest per-layer compander scale. tanh saturates to 1.0 in float32 near |w| = 9, and atanh(1) is
# inf, so the scale is capped: weights beyond atanh(MAX_SCALE) ~ 4.95 are clipped to it.
MAX_SCALE = 0.9999

Rounding = Literal["stochastic", "deterministic"]


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _round_(x: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    """Round float32 ``x`` to integers in place (returned); stochastic rounding is unbiased:
    E[round(x)] = x, with one ``common.lowbit.noise`` draw (seeded from ``generator``). The
    training step's stochastic rounding of weights is ``project_to_grid_``'s fused pass; this is
    its tensor-op reference (and the path of ``weight_codes`` called on its own)."""
    if rounding == "deterministic":
        return x.round_()
    seed = noise.draw_seed(generator)
    floor = torch.floor(x)
    draws = noise.uniform(seed, x.numel(), x.device).view(x.shape)
    return x.sub_(floor).gt_(draws).add_(floor)  # floor + (x - floor > draw)


# ---------------------------------------------------------------- weights


def weight_codes(
    weight: torch.Tensor,
    bits: int,
    rounding: Rounding = "deterministic",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (float32 tensor of whole numbers in [0, 2^bits-1]) and the scale M.

    Deterministic rounding is the forward pass's; stochastic rounding is the paper's unbiased
    projection of an updated weight back onto the grid (in the companded domain).
    """
    levels = _levels(bits)
    companded, scale, divisor = _companded(weight)
    unit = companded.div_(divisor).add_(0.5).clamp_(0.0, 1.0).mul_(levels)
    return _round_(unit, rounding, generator).clamp_(0, levels), scale


def _companded(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tanh(weight)`` (a new float32 tensor: the scale and the codes share it), the scale M =
    max |tanh(w)| capped at ``MAX_SCALE``, and the divisor 2M (2 for an all-zero layer) that
    maps the companded weights to [-1/2, 1/2]."""
    companded = torch.tanh(weight.detach().float())
    low, high = torch.aminmax(companded)  # one pass: max |t| = max(high, -low), NaN kept
    scale = torch.maximum(high, low.neg()).abs_().clamp_(max=MAX_SCALE)
    return companded, scale, 2 * torch.where(scale > 0, scale, torch.ones_like(scale))


@torch.no_grad()
def project_to_grid_(
    weight: torch.Tensor,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> None:
    """``weight <- codes_to_weight(*weight_codes(weight, bits, rounding, generator), bits)`` in
    place, the same floats; the stochastic projection of a contiguous float32 CPU weight in one
    fused pass from ``tanh(weight)`` (the codes are never materialised)."""
    levels = _levels(bits)
    fused = kernel.project_to_grid_() if kernel.fusable(weight) else None
    if fused is None or rounding != "stochastic":
        weight.copy_(codes_to_weight(*weight_codes(weight, bits, rounding, generator), bits))
        return
    companded, scale, divisor = _companded(weight)
    seed = noise.draw_seed(generator)
    fused(weight, companded, float(divisor), levels, seed, weight_table(scale, bits))
    torch.autograd.graph.increment_version(weight)  # written through its pointer


@torch.no_grad()
def project_all_to_grid_(
    weights: Sequence[torch.Tensor], bits: int, generator: torch.Generator | None = None
) -> None:
    """``project_to_grid_(w, bits, "stochastic", generator)`` for each weight in turn, the same
    floats as its tensor ops, in a number of tensor ops that does not grow with the number of
    weights: the per-layer path launches about 75 small kernels a layer, which leave a GPU
    mostly idle. The weights are taken as one flat vector; each layer's scale, seed, noise
    counter and table are gathered per element. Weights of one device."""
    if not weights:
        return
    levels = _levels(bits)
    device = weights[0].device
    layer_of, counter = _flat_layout(tuple(w.numel() for w in weights), device)
    count = len(weights)
    companded = torch.tanh(torch.cat([w.detach().reshape(-1).float() for w in weights]))
    high = companded.new_full((count,), -math.inf).scatter_reduce_(0, layer_of, companded, "amax")
    low = companded.new_full((count,), math.inf).scatter_reduce_(0, layer_of, companded, "amin")
    scale = torch.maximum(high, low.neg()).abs_().clamp_(max=MAX_SCALE)
    divisor = 2 * torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = companded.div_(divisor[layer_of]).add_(0.5).clamp_(0.0, 1.0).mul_(levels)
    # one seed a layer, drawn as the per-layer path draws them one by one (the same on the CPU)
    seeds = torch.randint(noise.SEED_LIMIT, (count,), generator=generator, device=device)
    draws = noise.at_counters(counter.clone(), seeds[layer_of])
    floor = torch.floor(unit)
    codes = unit.sub_(floor).gt_(draws).add_(floor).clamp_(0, levels)
    tables = _weight_tables(scale, bits)
    unknown = torch.isnan(codes)
    index = codes.masked_fill(unknown, 0).long().add_(layer_of * (levels + 1))
    projected = tables.reshape(-1)[index].masked_fill_(unknown, math.nan)
    parts = projected.split([w.numel() for w in weights])
    views = [part.view_as(w) for part, w in zip(parts, weights, strict=True)]
    torch._foreach_copy_(list(weights), views)


@functools.cache
def _flat_layout(
    lengths: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For weights of ``lengths`` laid end to end: each element's layer and its 1-based counter
    within its layer (made once per model shape and device)."""
    sizes = torch.tensor(lengths, dtype=torch.int64)
    layer_of = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    counter = torch.arange(1, int(sizes.sum()) + 1) - starts[layer_of]
    return layer_of.to(device), counter.to(device)


def _weight_tables(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight_table`` of each of ``scales`` (shape (L,)), as rows. On the CPU row by row:
    its vectorized ``atanh`` gives an element one float or another, one ulp apart, by where the
    element falls in the loop, so only a table of its own gives ``weight_table``'s floats."""
    if scales.device.type == "cpu":
        return torch.stack([weight_table(scale, bits) for scale in scales])
    return _weight_tables_at_once(scales, bits)


def _weight_tables_at_once(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Every layer's table in one pass (``weight_table`` is its one-row case): a GPU's ``atanh``
    does not depend on where an element sits, so the rows are each layer's own table there (on
    a CPU within an ulp)."""
    levels = _levels(bits)
    steps = torch.arange(levels + 1, dtype=torch.float32, device=scales.device)
    tables = steps.mul_(2).sub_(levels).div_(levels).mul(scales.unsqueeze(1)).atanh_()
    end = _exact_inverses(scales)
    tables[:, -1] = end
    tables[:, 0] = -end
    return tables


def _exact_inverses(scales: torch.Tensor) -> torch.Tensor:
    """For each of ``scales`` (shape (L,)) a float t with ``tanh(t) == scale``: ``atanh(scale)``
    or the nearest of its neighbours within 3 ulps that maps back exactly (``atanh`` itself where
    none does; a scale near 1 maps a few floats to each tanh value, a small one about one). No
    ``.item()``, no tensor index: no device sync."""
    start = torch.atanh(scales)
    candidates, up, down = [start], start, start
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        candidates += [up, down]
    stacked = torch.stack(candidates)
    exact = torch.tanh(stacked) == scales
    first = torch.where(exact.any(0), exact.int().argmax(0), 0)
    return stacked.gather(0, first.unsqueeze(0)).squeeze(0)


def codes_to_weight(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Decode codes (whole numbers in [0, 2^bits - 1], float32 or an integer type) to weights;
    the one function the forward pass, the grid projection and the codec use.

    Each code's weight is computed once, in a table of the layer's 2^bits weights
    (``weight_table``), and looked up: one value per code, where ``atanh`` over the whole tensor
    gave one float in its vectorized body and sometimes another, one ulp away, in its scalar
    tail, and a fraction of the cost (no ``atanh`` per weight). A NaN code decodes to NaN.
    """
    table = weight_table(scale, bits).to(codes.device)
    fused = kernel.decode_table() if kernel.fusable(codes, _DECODABLE) else None
    if fused is not None:
        return fused(codes, table)
    if not codes.is_floating_point():
        return table[codes.long()]
    unknown = torch.isnan(codes)
    return table[codes.masked_fill(unknown, 0).long()].masked_fill_(unknown, math.nan)


_DECODABLE = (torch.uint8, torch.int16, torch.int32, torch.float32)


def weight_table(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The layer's 2^bits weights, ``atanh(M * (2c - L) / L)`` for c = 0..L, L = 2^bits - 1.

    The grid ``(2c - L) / L`` is exactly -1 and 1 at the ends and symmetric, and the end weights
    are +-``_exact_inverses(M)``, whose tanh is M itself: quantizing the decoded weights again
    gives the same codes *and* the same scale (``weight_codes`` takes M as the largest
    ``|tanh(w)|``), so a model decoded and projected again stays where it was, bit for bit.
    """
    return _weight_tables_at_once(scale.float().reshape(1), bits)[0]


class _StraightThrough(torch.autograd.Function):
    """The quantized weight forward, the incoming gradient unchanged to the float weight
    backward (STE): ``quantized + (weight - weight.detach())`` without its two passes."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


@dataclass(frozen=True)
class _Held:
    """One weight's quantization, held for the other forward passes inside ``quantizing_once``:
    valid while the weight is the same tensor at the same version and bitwidth."""

    weight: torch.Tensor
    version: int
    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    out: torch.Tensor | None  # the forward weight, where autograd keeps it in float32 anyway

    def serves(self, weight: torch.Tensor, bits: int) -> bool:
        """Whether this is ``weight``'s quantization at ``bits``, unchanged since."""
        return self.weight is weight and self.version == weight._version and self.bits == bits


_held: dict[int, _Held] | None = None  # id(weight) -> its quantization, inside quantizing_once


@contextlib.contextmanager
def quantizing_once() -> Iterator[None]:
    """Quantize each weight once for all the forward passes run inside (SimCLR runs the model
    on two views with the same weights), as long as the weight has not changed (its version
    counter). Saving float32 for backward, the passes share the forward weight itself; saving
    codes, they share its codes (which backward keeps anyway) and decode them again, so that no
    float32 weight outlives its layer."""
    global _held
    outer = _held
    _held = {} if outer is None else outer
    try:
        yield
    finally:
        _held = outer


def _holding() -> dict[int, _Held] | None:
    """Where this forward pass keeps its weights' quantizations (None: outside
    ``quantizing_once``, or without grad, where nothing is shared)."""
    return _held if torch.is_grad_enabled() else None


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Forward-pass weight at ``bits``; the gradient passes straight through (STE).

    The value is bit-for-bit ``codes_to_weight(*weight_codes(weight, bits), bits)``.
    """
    if bits == FULL_PRECISION or on_grid(weight, bits):
        return weight
    holding = _holding()
    held = holding.get(id(weight)) if holding is not None else None
    if held is not None and not held.serves(weight, bits):
        held = None  # another tensor at a reused id, or the weight changed since
    if held is not None and held.out is not None:
        return held.out
    keep_codes = saved_codes.active()  # backward keeps codes and scale, decodes them there
    if held is not None:
        codes, scale = held.codes, held.scale
    else:
        codes, scale = weight_codes(weight, bits)
        if keep_codes:  # whole numbers: the smaller type decodes to the same floats
            codes = codes.to(saved_codes.code_dtype(_levels(bits)))
    out = _StraightThrough.apply(weight, codes_to_weight(codes, scale, bits).to(weight.dtype))
    if keep_codes:
        decode = functools.partial(_decode_weight, scale=scale, bits=bits, dtype=weight.dtype)
        mark_recomputable(out, decode, codes, macs_per_element=0)  # a table lookup
    if holding is not None:
        kept = None if keep_codes else out
        holding[id(weight)] = _Held(weight, weight._version, bits, codes, scale, kept)
    return out


def mark_on_grid(weight: torch.Tensor, bits: int) -> None:
    """Record that ``weight`` holds decoded ``bits``-bit codes (``project_weights_`` wrote them).

    Decoding and quantizing again gives the same codes and scale (``weight_table``), so until
    the weight changes ``quantize_weight`` returns it as it is: its own quantization bit for bit,
    without the tanh, scale and decode passes, and nothing new for backward to keep (the
    parameter itself). A change is any in-place write (its version counter: the optimizer step,
    ``load_state_dict``) or new storage (``.to(device)``).
    """
    weight._on_grid = (bits, weight._version, weight.data_ptr())  # type: ignore[attr-defined]


def on_grid(weight: torch.Tensor, bits: int) -> bool:
    """Whether ``weight`` is unchanged since ``mark_on_grid(weight, bits)``."""
    return getattr(weight, "_on_grid", None) == (bits, weight._version, weight.data_ptr())


def _decode_weight(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype):
    return codes_to_weight(codes, scale, bits).to(dtype)


# ---------------------------------------------------------------- activations


def quantize_activation(x: torch.Tensor, bits: int, full_precision: str = "relu") -> torch.Tensor:
    """DoReFa activation: clamp to [0, 1], then ``bits``-bit uniform grid; at full precision
    ``full_precision`` (``FP_ACTIVATIONS``): ReLU, or clamp(0, 1) without rounding.

    The gradient is the clamp's (1 inside (0, 1), 0 outside); rounding is straight-through.
    By default the nonlinearity at 32 bits is ReLU (unbounded), as in full-precision SimCLR: the
    (Full) rows, the server's full-precision de-quantization and every global evaluation run ReLU
    on weights that low-bit clients trained under clamp(0, 1). This is the paper's and DoReFa's
    convention; it means a low-bit model evaluated at 32 bits is not the function its client
    trained. ``"clamp"`` keeps the clients' nonlinearity everywhere (the ``fp-activation`` key).
    """
    if bits == FULL_PRECISION:
        return F.relu(x) if full_precision == "relu" else x.clamp(0.0, 1.0)
    return bounded_activation(x, _levels(bits))


# ---------------------------------------------------------------- gradients


def quantile_centres(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2^bits centres ``Quantile(i / (2^bits - 1))``, i = 0..2^bits-1, of a tensor's values.

    Centre 0 is the minimum and the last centre the maximum; between ranks the quantile is linearly
    interpolated (as ``torch.quantile``, which refuses tensors above 16 M elements).
    """
    return _centres_of_sorted(_sorted(values.detach().reshape(-1).float()), 1 << bits)


def _sorted_all(flats: list[torch.Tensor]) -> list[torch.Tensor]:
    """``_sorted`` of each, on a thread per core where there are several to sort."""
    if len(flats) < 2:
        return [_sorted(flat) for flat in flats]
    return list(_sorting_pool(os.getpid()).map(_sorted, flats))


@functools.cache
def _sorting_pool(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The sorting threads of process ``pid`` (a forked child has none of its parent's)."""
    return concurrent.futures.ThreadPoolExecutor(
        max(1, torch.get_num_threads()), thread_name_prefix="fedqssl-sort"
    )


def _sorted(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s values in ascending order (NaN last): NumPy's sort on the CPU (about 3.5x
    faster than ``torch.sort``, which also computes the indices), ``torch.sort`` elsewhere. Only
    the values are used, and they are the same whichever sort orders the ties."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.sort(flat.numpy()))
    return torch.sort(flat).values


def _centres_of_sorted(ordered: torch.Tensor, count: int) -> torch.Tensor:
    n = ordered.numel()
    position = torch.arange(count, dtype=torch.float64, device=ordered.device) * (
        (n - 1) / (count - 1)
    )
    low = position.floor().long().clamp(max=n - 1)
    high = (low + 1).clamp(max=n - 1)
    frac = (position - low.double()).float()
    return ordered[low] + (ordered[high] - ordered[low]) * frac


# A layer's gradient with more elements than this has its quantile centres estimated from a
# random sample instead of a full sort (``quantize_gradient``); the sample has
# ``max(QUANTILE_SAMPLE, 4 * centres)`` elements.
SAMPLED_QUANTILES_ABOVE = 1 << 18
QUANTILE_SAMPLE = 1 << 16


def quantize_gradient(
    grad: torch.Tensor,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
    sample_above: int = SAMPLED_QUANTILES_ABOVE,
) -> torch.Tensor:
    """Quantile-quantize one layer's gradient onto its 2^bits empirical quantiles.

    Each value is rounded to one of the two centres around it (``round_between``): to the nearer
    one (deterministic), or to the upper one with probability (g - lower) / (upper - lower)
    (stochastic, unbiased as the paper's Assumption 1 asks). Up to ``sample_above`` elements the
    centres are exact (one sort of the values); larger gradients take them from a random sample
    (the exact minimum and maximum, sample quantiles between), still unbiased, since every value
    lies between its two centres, at a fraction of a sort's cost (docs/BENCHMARKS.md). A training
    step quantizes all its layers at once: ``quantize_gradients_``, the same numbers.
    """
    if bits >= FULL_PRECISION or grad.numel() < 2:
        return grad
    quantized = grad.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    quantize_gradients_([quantized], bits, rounding, generator, sample_above)
    return quantized.to(grad.dtype)


@dataclass(frozen=True)
class _GradientPlan:
    """One layer's part of ``quantize_gradients_``: its gradient, the gradient's values as flat
    float32 (a view where it is contiguous float32), what to sort for its centres (the values,
    or the sample), and its noise seed (None: deterministic rounding)."""

    grad: torch.Tensor
    flat: torch.Tensor
    to_sort: torch.Tensor
    sampled: bool
    seed: noise.Seed | None


@torch.no_grad()
def quantize_gradients_(
    grads: list[torch.Tensor],
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
    sample_above: int = SAMPLED_QUANTILES_ABOVE,
) -> None:
    """``quantize_gradient`` of each of ``grads``, written into it, the same numbers.

    The generator's draws are taken layer by layer in order first (each sampled layer's sample
    positions, then each layer's seed), so the numbers do not depend on what runs alongside;
    then the layers' sorts run on a thread per core (NumPy's sort releases the GIL); then each
    layer is rounded in place.
    """
    if bits >= FULL_PRECISION:
        return
    count = 1 << bits
    sample_size = max(QUANTILE_SAMPLE, 4 * count)
    plans = []
    for grad in grads:
        if grad.numel() < 2:
            continue
        flat = grad.detach().reshape(-1).float()
        sampled = flat.numel() > max(sample_above, sample_size)
        to_sort = flat
        if sampled:
            picks = torch.randint(
                flat.numel(), (sample_size,), generator=generator, device=flat.device
            )
            to_sort = flat[picks]
        seed = None if rounding == "deterministic" else noise.draw_seed(generator)
        plans.append(_GradientPlan(grad, flat, to_sort, sampled, seed))
    for plan, ordered in zip(plans, _sorted_all([p.to_sort for p in plans]), strict=True):
        centres = _centres_of_sorted(ordered, count)
        if plan.sampled:  # the tensor's own extremes: every value lies between two centres
            centres[0], centres[-1] = torch.aminmax(plan.flat)
        # a contiguous float32 gradient is rounded into itself through its flat view
        in_place = plan.flat.is_contiguous() and plan.flat.data_ptr() == plan.grad.data_ptr()
        rounded = round_between(plan.flat, centres, plan.seed, plan.flat if in_place else None)
        if not in_place:
            plan.grad.copy_(rounded.view(plan.grad.shape))


def round_between(
    values: torch.Tensor,
    centres: torch.Tensor,
    seed: noise.Seed | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each of the flat float32 ``values`` rounded to the centre below or above it (ascending
    ``centres``; values outside them take the end brackets): upward where its fraction of the
    gap exceeds the ``common.lowbit.noise`` draw ``seed`` (None: 0.5, the nearer centre).

    In tensor ops, per element: the bracket (``searchsorted``), one gather of the lower centre
    and one of the gap, the fraction, one comparison, one gather of the pick. A zero gap divides
    by inf (fraction 0: the lower centre, which equals the upper one). The fused kernel does it
    in one pass, the same floats. ``out`` (contiguous float32, ``values`` itself allowed) takes
    the result where given.
    """
    fused = kernel.round_between() if values.device.type == "cpu" else None
    if fused is not None:
        return fused(values.contiguous(), centres.contiguous(), seed, out)
    count = centres.numel()
    bracket = (torch.searchsorted(centres, values, right=True) - 1).clamp_(0, count - 2)
    gaps = centres[1:] - centres[:-1]
    safe_gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, math.inf))
    frac = (values - centres[:-1][bracket]).div_(safe_gaps[bracket])
    threshold = 0.5 if seed is None else noise.uniform(seed, values.numel(), values.device)
    rounded = centres[bracket + (frac > threshold)]
    return rounded if out is None else out.copy_(rounded)
