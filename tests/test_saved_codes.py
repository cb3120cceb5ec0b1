"""Saved activations as codes: the same numbers as the float32 path, a fraction of its memory."""

import contextlib
import math

import pytest
import torch
from core_helpers import bits_of, kernels, needs_compiler
from hypothesis import given, settings
from hypothesis import strategies as st

from common.learning.models import CodesMaxPool2d, build_classifier, build_ssl_model
from common.learning.training import objective_loss
from common.lowbit import kernel, saved_codes
from common.lowbit.layers import QuantConv2d
from common.lowbit.quantizers import quantize_activation
from common.lowbit.saved_codes import saving_codes
from common.vocabulary import FULL_PRECISION


def loss_and_grads(model, views, use_codes: bool):
    model.zero_grad(set_to_none=True)
    if use_codes:
        with saving_codes():
            loss = objective_loss(model, *views, temperature=0.5)
    else:
        loss = objective_loss(model, *views, temperature=0.5)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def views_for(model_name: str, batch: int, seed: int):
    channels, size = (1, 28) if model_name == "small_cnn" else (3, 32)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size, size, generator=generator) for _ in range(2)]


@pytest.mark.parametrize(
    ("model_name", "predictor", "bits"),
    [
        ("small_cnn", False, 2),
        ("small_cnn", False, 4),
        ("small_cnn", True, 8),
        ("small_cnn", False, 12),
        ("resnet18", False, 4),
    ],
)
def test_codes_give_the_same_loss_and_gradients_as_float32(model_name, predictor, bits):
    torch.manual_seed(0)
    channels = 1 if model_name == "small_cnn" else 3
    model = build_ssl_model(model_name, bits, channels, width=8, predictor=predictor)
    views = views_for(model_name, 16, seed=1)
    plain_loss, plain_grads = loss_and_grads(model, views, use_codes=False)
    coded_loss, coded_grads = loss_and_grads(model, views, use_codes=True)
    assert torch.equal(coded_loss, plain_loss)
    for coded, plain in zip(coded_grads, plain_grads, strict=True):
        assert torch.equal(coded, plain)  # bit for bit: codes rebuild and recompute exactly


def test_a_classifier_step_is_unchanged_too():
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 3, 1, width=8)
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(16) % 10
    plain = loss_and_grads(model, (images, labels), use_codes=False)
    coded = loss_and_grads(model, (images, labels), use_codes=True)
    assert torch.equal(plain[0], coded[0])
    for a, b in zip(plain[1], coded[1], strict=True):
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(min_value=2, max_value=16),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_activation_codes_rebuild_the_float_bit_for_bit_and_keep_its_gradient(bits, seed):
    x = (
        torch.randn(257, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.5
    ).requires_grad_()
    with saving_codes():
        out = quantize_activation(x, bits)
    codes = saved_codes._pack(out)
    expected_dtype = torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32
    assert codes[0] == "codes" and codes[1].dtype == expected_dtype
    assert torch.equal(saved_codes._unpack(codes), out.detach())
    (grad,) = torch.autograd.grad(out.sum(), x)
    passes = (x.detach() >= 0) & (x.detach() <= 1)  # the clamp's gradient, as torch.clamp's
    assert torch.equal(grad, passes.float())


def activation_through(x, grad, bits, keep_codes):
    """The activation's output, its input gradient and (saving codes) its codes and their
    decoded floats, each as bit patterns where float."""
    x = x.clone().requires_grad_()
    with saving_codes() if keep_codes else contextlib.nullcontext():
        out = quantize_activation(x, bits)
        packed = saved_codes._pack(out) if keep_codes else None
    out.backward(grad)
    results = [bits_of(out.detach()), bits_of(x.grad)]
    if packed is not None:
        results += [packed[1], bits_of(saved_codes._unpack(packed))]
    return results


SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1.0000001, -1e-38, 1e-38]


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=3000),
    bits=st.integers(min_value=2, max_value=16),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    on_grid=st.booleans(),
    keep_codes=st.booleans(),
)
def test_the_fused_activation_kernels_give_the_tensor_ops_floats(
    n, bits, seed, on_grid, keep_codes
):
    """Output, mask gradient, codes and decoded floats, bit for bit: on values of a grid (exact
    halves between codes), signed zeros, NaN, infinities, the ends of [0, 1], and a tail that
    fills no whole mask byte."""
    assert kernel.compiled() is not None, "a C++ compiler is here, so the kernels must build"
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator) * 0.8 + 0.4
    if on_grid:  # half-way between two codes: rounding's ties
        x = (torch.round(x * 2 * ((1 << bits) - 1)) + 0.5) / (2 * ((1 << bits) - 1))
    x[: min(n, len(SPECIAL_VALUES))] = torch.tensor(SPECIAL_VALUES)[: min(n, len(SPECIAL_VALUES))]
    x = x[torch.randperm(n, generator=generator)]
    grad = torch.randn(n, generator=generator)
    grad[: min(n, 4)] = torch.tensor([math.inf, -0.0, math.nan, -1.0])[: min(n, 4)]
    fused = activation_through(x, grad, bits, keep_codes)
    with kernels(on=False):
        plain = activation_through(x, grad, bits, keep_codes)
    if keep_codes:  # a NaN's code is whatever the float-to-integer conversion gives
        fused[2], plain[2] = fused[2][~x.isnan()], plain[2][~x.isnan()]
    for got, expected in zip(fused, plain, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def saved_bytes(model, views, use_codes: bool) -> int:
    """Bytes of distinct storage that autograd keeps for backward after one forward pass."""
    kept: dict[int, int] = {}

    def record(packed) -> None:
        if isinstance(packed, torch.Tensor):
            kept[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
        elif packed[0] == "codes":
            record(packed[1])
        else:
            for source in packed[2]:
                record(source)

    def counting_pack(tensor):
        packed = original_pack(tensor)
        record(packed)
        return packed

    original_pack = saved_codes._pack
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_codes._pack = counting_pack
    try:
        if use_codes:
            with saving_codes():
                loss = objective_loss(model, *views, temperature=0.5)
        else:
            with torch.autograd.graph.saved_tensors_hooks(counting_pack, saved_codes._unpack):
                loss = objective_loss(model, *views, temperature=0.5)
    finally:
        saved_codes._pack = original_pack
    del loss
    return sum(size for ptr, size in kept.items() if ptr not in params)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_a_four_bit_step_keeps_under_a_third_of_what_float32_saves(model_name, monkeypatch):
    """Every layer output recomputed (the deep layers' kept outputs: the next test)."""
    monkeypatch.setattr(saved_codes, "KEEP_FROM_MACS", 1 << 62)
    torch.manual_seed(0)
    channels = 1 if model_name == "small_cnn" else 3
    views = views_for(model_name, 32, seed=3)
    full = saved_bytes(build_ssl_model(model_name, FULL_PRECISION, channels, width=8), views, False)
    low = build_ssl_model(model_name, 4, channels, width=8)
    without_codes = saved_bytes(low, views, use_codes=False)
    with_codes = saved_bytes(low, views, use_codes=True)
    print(f"{model_name}: saved bytes fp32 {full}, 4-bit {without_codes}, as codes {with_codes}")
    assert with_codes < full / 3
    assert with_codes < without_codes / 3


def test_outputs_costly_to_recompute_are_kept_in_float32_and_only_those(monkeypatch):
    """ResNet-18's convs of 1024 multiply-adds or more per output element (128 or more input
    channels at 3x3) keep their float32 outputs: exactly those outputs' bytes more than
    recomputing every layer, and no other change."""
    torch.manual_seed(0)
    model = build_ssl_model("resnet18", 4, 3)
    views = views_for("resnet18", 4, seed=5)
    costly = [
        layer
        for layer in model.modules()
        if isinstance(layer, QuantConv2d)
        and layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        >= saved_codes.KEEP_FROM_MACS
    ]
    kept_bytes = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: kept_bytes.append(out.nbytes))
        for layer in costly
    ]
    with_kept = saved_bytes(model, views, use_codes=True)
    for hook in hooks:
        hook.remove()
    monkeypatch.setattr(saved_codes, "KEEP_FROM_MACS", 1 << 62)
    every_one_recomputed = saved_bytes(model, views, use_codes=True)
    assert len(costly) == 11  # the 3x3 convs of layer3 and layer4, layer2's but its first
    assert with_kept - every_one_recomputed == sum(kept_bytes) > 0


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=4))
def test_masks_pack_to_one_bit_each_and_back(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    packed = saved_codes.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(saved_codes.unpack_bits(packed, mask.shape), mask)
    # the tensor-op packer (GPU tensors) writes the same bytes as NumPy's (CPU tensors)
    assert torch.equal(saved_codes._pack_bits_tensor(mask.reshape(-1)), packed)
    assert torch.equal(saved_codes._unpack_bits_tensor(packed, mask.shape), mask)


def window_pool_through(x, grad_out, size, fused: bool):
    """_WindowMaxPool's output, saved argmax and input gradient, with its fused kernels or its
    tensor ops."""
    with kernels(on=fused):
        x = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = saved_codes._WindowMaxPool.apply(x, size)
        out.backward(grad_out)
    return out.detach(), saved[0], x.grad


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(2, 9),
    width=st.integers(2, 9),
    size=st.integers(1, 3),
    levels=st.sampled_from([1, 3, 15, 0]),  # 0: continuous values, no ties
    seed=st.integers(0, 2**16),
    fused=st.booleans(),
)
def test_window_max_pool_equals_torch_max_pool_bit_for_bit(
    height, width, size, levels, seed, fused
):
    """The uint8-argmax pool, fused or in tensor ops, picks the element F.max_pool2d picks, ties
    included (on a 2-bit grid most windows tie), so forward and gradient agree exactly; odd sizes
    drop the same rows and columns."""
    if size > min(height, width):
        return
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, height, width, generator=generator)
    if levels:
        x = torch.round(x * levels) / levels
    grad_out = torch.randn(2, 3, height // size, width // size, generator=generator)
    out_mine, _, grad_mine = window_pool_through(x, grad_out, size, fused)
    theirs = x.clone().requires_grad_()
    out_theirs = torch.nn.functional.max_pool2d(theirs, size)
    assert torch.equal(out_mine, out_theirs)
    out_theirs.backward(grad_out)
    assert torch.equal(grad_mine, theirs.grad)


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_the_fused_window_pool_gives_its_tensor_ops_values_indices_and_gradients(
    height, width, size, seed
):
    """Bit for bit also where F.max_pool2d is no reference: NaN (the first one wins), signed
    zeros (the first of equal zeros), infinities."""
    assert kernel.compiled() is not None, "a C++ compiler is here, so the kernels must build"
    if size > min(height, width):
        return
    generator = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(2, 3, height, width, generator=generator) * 2) / 2
    specials = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf])
    picks = torch.randint(0, 3 * len(specials), x.shape, generator=generator)
    x = torch.where(picks < len(specials), specials[picks.clamp(max=len(specials) - 1)], x)
    grad_out = torch.randn(2, 3, height // size, width // size, generator=generator)
    fused = window_pool_through(x, grad_out, size, fused=True)
    plain = window_pool_through(x, grad_out, size, fused=False)
    for got, expected in zip(fused, plain, strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(
            bits_of(got) if got.is_floating_point() else got,
            bits_of(expected) if expected.is_floating_point() else expected,
        )


@needs_compiler
def test_a_32_bit_training_pass_pools_as_a_low_bit_one_with_max_pool2d_numbers():
    """Outside ``saving_codes`` (fp32 steps, float32-saving steps) a training pass pools through
    the same fused kernel as the codes path (a uint8 argmax is what it saves), so step-time
    ratios compare like with like; its values and gradients are F.max_pool2d's."""
    assert kernel.compiled() is not None, "a C++ compiler is here, so the kernels must build"
    pool = CodesMaxPool2d(2)
    x = torch.round(torch.rand(2, 4, 9, 8, generator=torch.Generator().manual_seed(5)) * 3) / 3
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pool(mine)
    assert [t.dtype for t in saved] == [torch.uint8]
    expected = torch.nn.functional.max_pool2d(theirs, 2)
    assert torch.equal(out, expected)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(grad_out)
    expected.backward(grad_out)
    assert torch.equal(mine.grad, theirs.grad)
    with torch.no_grad():  # evaluation: torch's own pool
        assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2))


def test_the_max_pool_saves_one_byte_per_window():
    x = torch.rand(4, 8, 28, 28, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved_codes._WindowMaxPool.apply(x, 2)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 4 * 8 * 14 * 14)]
