"""What a low-bit training step keeps for backward, kept as low-bit codes instead of float32.

Autograd saves the tensors each backward formula needs. In a plain PyTorch low-bit network those
are float32 copies of values that carry only ``s`` bits: the quantized activation (saved by the
next conv or linear layer), the float input of the activation's clamp, and the layer's output
(saved by the BatchNorm after it). A low-bit step then needs *more* memory than fp32, the opposite
of what low-bit hardware promises. Inside ``saving_codes()`` (wrapped around the forward pass of
every low-bit training step) three rules apply, through PyTorch's ``saved_tensors_hooks``:

1. a quantized activation (marked by ``mark_codes``) is saved once as its integer codes (uint8
   up to 8 bits, int16 up to 15, int32 at 16) and rebuilt in backward as ``codes / levels``: the
   same float, bit for bit;
2. the activation's own backward keeps a one-bit-per-element mask of where its clamp passes the
   gradient, not its float input (``bounded_activation``), and a max-pool of an activation keeps
   one uint8 argmax per window, not int64 indices (``max_pool``);
3. a quantized layer's output (marked by ``mark_recomputable``) is not saved at all: backward
   recomputes it from the layer's saved input codes and weight (one extra conv or matmul per
   layer, the price of the memory), and a quantized weight is saved as its codes and scale and
   decoded again (``common.lowbit.quantizers.quantize_weight``). The exception: an output that
   costs ``KEEP_FROM_MACS`` (1024) or more multiply-adds per element to recompute is kept in
   float32. Those are the deep convs of ResNet-18 (128 or more input channels at 3x3): small
   outputs, costly to recompute; keeping them costs 0.07 of an fp32 step's peak memory and
   saves about 60% of the recomputation's time (docs/BENCHMARKS.md). No layer of the
   small CNN (at most 576) is kept.

Outside the context (evaluation, full precision) nothing is marked and nothing changes. The
numbers are those of the float32 path: ``tests/test_saved_codes.py`` compares losses and every
gradient with the context on and off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from common.lowbit import kernel
from common.lowbit.device_constants import constant

_active_depth = 0  # > 0 while a forward pass runs inside saving_codes()


def active() -> bool:
    """Whether tensors should be marked: a forward pass inside ``saving_codes`` with grad on."""
    return _active_depth > 0 and torch.is_grad_enabled()


class _BoundedQuantize(torch.autograd.Function):
    """DoReFa's activation, clamp(0, 1) then a ``levels`` grid, saving a bool mask for backward.

    The gradient is the clamp's (passed where 0 <= x <= 1, as ``torch.clamp``'s backward), and
    rounding is straight-through: the same gradient as ``grid + (bounded - bounded.detach())``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int, keep_codes: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        fused = kernel.bounded_quantize() if kernel.fusable(x) else None
        if fused is not None:  # one pass, the same floats (common.lowbit.kernel)
            code_bytes = code_dtype(levels).itemsize if keep_codes else 0
            out, packed, codes = fused(x, levels, code_bytes)
            ctx.save_for_backward(packed)
            if keep_codes:
                out._saved_codes_packed = codes  # type: ignore[attr-defined]
            return out
        bounded = x.clamp(0.0, 1.0)
        ctx.save_for_backward(pack_bits(bounded == x))  # 0 <= x <= 1 (NaN: False, as the clamp)
        codes = bounded.mul_(levels).round_()
        if not keep_codes:
            return codes.div_(levels)
        out = codes / levels
        # what the next layer saves for backward (``_pack``): taken here, where the codes are
        # whole numbers already, instead of by a second pass over ``out`` (the same integers)
        out._saved_codes_packed = codes.to(code_dtype(levels))  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        fused = kernel.masked_gradient() if kernel.fusable(grad) else None
        if fused is not None:
            return fused(grad, packed), None, None
        passes = unpack_bits(packed, ctx.shape)
        # a product, not torch.where: the same values (a blocked gradient becomes a signed
        # zero), about 3x faster on the CPU
        return grad * passes, None, None


_CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)

BIT_VALUES = tuple(1 << i for i in range(8))  # bit i of a packed byte


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as one bit per element (uint8, little-endian within each byte); NumPy's
    packer on the CPU (about 30x faster than tensor ops), tensor ops elsewhere."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_tensor(flat)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed."""
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little")
        return torch.from_numpy(bits).view(torch.bool).reshape(shape)
    return _unpack_bits_tensor(packed, shape)


def _pack_bits_tensor(flat: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, -flat.numel() % 8))
    values = constant(BIT_VALUES, torch.uint8, flat.device)
    return (flat.view(-1, 8) * values).sum(1, dtype=torch.uint8)


def _unpack_bits_tensor(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & constant(BIT_VALUES, torch.uint8, packed.device)) != 0
    return bits.reshape(-1)[: shape.numel()].reshape(shape)


class _WindowMaxPool(torch.autograd.Function):
    """Max-pool over non-overlapping k x k windows that saves, for backward, each window's
    argmax as one uint8 (not ``F.max_pool2d``'s int64 flat indices: 32x less memory).

    The argmax is ``torch.max``'s over each window's elements in row-major order: the first
    maximum, the element ``F.max_pool2d`` picks, so ties (common on a low-bit grid) break the same
    way and outputs and gradients equal ``F.max_pool2d``'s bit for bit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.k, ctx.shape = k, x.shape
        fused = _window_pool_kernel(x)
        if fused is not None:  # one pass, the same floats and indices (common.lowbit.kernel)
            values, argmax = fused(x, k)
            ctx.save_for_backward(argmax)
            return values
        values, argmax = torch.stack(_window_elements(x, k), dim=-1).max(dim=-1)
        ctx.save_for_backward(argmax.to(torch.uint8))
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        k, (n, c, height, width) = ctx.k, ctx.shape
        fusable = grad.device.type == "cpu" and grad.dtype == torch.float32
        fused = kernel.window_max_unpool() if fusable else None
        if fused is not None:
            return fused(grad.contiguous(), argmax, k, height, width), None
        rows, cols = argmax.shape[2], argmax.shape[3]
        # each window's k * k gradients at once: the incoming gradient where the argmax was
        windows = grad.new_zeros(n, c, rows, cols, k * k)
        windows.scatter_(-1, argmax.long().unsqueeze(-1), grad.unsqueeze(-1))
        windows = windows.view(n, c, rows, cols, k, k)
        whole = windows.permute(0, 1, 2, 4, 3, 5).reshape(n, c, rows * k, cols * k)
        if (rows * k, cols * k) == (height, width):
            return whole, None
        grad_input = grad.new_zeros(ctx.shape)  # rows and columns beyond the last window: 0
        grad_input[:, :, : rows * k, : cols * k] = whole
        return grad_input, None


def _window_pool_kernel(x: torch.Tensor) -> Callable[..., list[torch.Tensor]] | None:
    """The fused window max-pool where it takes ``x`` (a contiguous 4-D float32 CPU batch)."""
    return kernel.window_max_pool() if kernel.fusable(x) and x.dim() == 4 else None


def _window_elements(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The k * k strided views (N, C, H // k, W // k) holding each window's elements, in the
    window's row-major order; rows and columns beyond the last whole window are left out."""
    rows, cols = x.shape[2] // k * k, x.shape[3] // k * k
    return [x[:, :, i:rows:k, j:cols:k] for i in range(k) for j in range(k)]


def _is_window_pool(pool: torch.nn.MaxPool2d) -> bool:
    """Whether ``pool`` takes non-overlapping square windows (what ``_WindowMaxPool`` does)."""
    kernel, stride = pool.kernel_size, pool.stride or pool.kernel_size
    return (
        isinstance(kernel, int)
        and stride in (kernel, (kernel, kernel))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
        and kernel * kernel <= 256
    )


def max_pool(pool: torch.nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``; on a marked activation inside ``saving_codes``, saving one uint8 argmax per
    window instead of int64 indices (non-overlapping windows; other pools run as
    ``F.max_pool2d``). The max of values on a grid is on the grid: the output keeps the mark.

    Every other training pass whose pool the fused kernel takes (CPU, float32) runs through it
    too, whatever its bitwidth: F.max_pool2d's values and gradients (a window of several NaNs
    aside), and a 32-bit step pays for its pooling what a low-bit step pays, so that the
    low-bit/fp32 step ratio (benchmarks) measures quantization, not a faster pool."""
    marked = active() and hasattr(x, "_saved_codes_levels")
    fused = torch.is_grad_enabled() and _window_pool_kernel(x) is not None
    if not ((marked or fused) and _is_window_pool(pool)):
        return pool.forward_plain(x)
    out = _WindowMaxPool.apply(x, pool.kernel_size)
    copy_mark(out, x)
    return out


def bounded_activation(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The quantized activation, marked so that what is saved for backward is its codes."""
    out = _BoundedQuantize.apply(x, levels, active())
    mark_codes(out, levels)
    return out


def mark_codes(tensor: torch.Tensor, levels: int) -> None:
    """Mark ``tensor`` as holding ``codes / levels`` so that saving it keeps the codes."""
    if active():
        tensor._saved_codes_levels = levels  # type: ignore[attr-defined]


def copy_mark(target: torch.Tensor, source: torch.Tensor) -> None:
    """Carry ``source``'s codes mark to ``target`` (e.g. a max-pool of a quantized activation)."""
    levels = getattr(source, "_saved_codes_levels", None)
    if levels is not None:
        mark_codes(target, levels)


# A layer output that costs this many multiply-adds per element or more to recompute is kept in
# float32 instead (rule 3 above)
KEEP_FROM_MACS = 1024


def mark_recomputable(
    output: torch.Tensor,
    layer: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    macs_per_element: int,
) -> None:
    """Mark ``output`` as recomputable by ``layer(*inputs)`` in backward, unless recomputing it
    costs ``KEEP_FROM_MACS`` or more multiply-adds per element (then it is saved as it is).

    Called after the layer ran, so its inputs have already been saved (as codes if marked): the
    recipe holds what the layer itself saved, nothing more. ``layer`` must not hold a float
    tensor the recipe is meant to spare.
    """
    if active() and macs_per_element < KEEP_FROM_MACS:
        packed = tuple(_pack(tensor) for tensor in inputs)
        output._saved_codes_recipe = (layer, packed)  # type: ignore[attr-defined]


def code_dtype(levels: int) -> torch.dtype:
    """The smallest integer type holding codes 0..levels (uint8 to 8 bits, int16 to 15, int32)."""
    if levels <= torch.iinfo(torch.uint8).max:
        return torch.uint8
    return torch.int16 if levels <= torch.iinfo(torch.int16).max else torch.int32


def _pack(tensor: torch.Tensor) -> object:
    levels = getattr(tensor, "_saved_codes_levels", None)
    if levels is not None:
        codes = getattr(tensor, "_saved_codes_packed", None)
        if codes is None:  # the first save: later saves of the same tensor share these codes
            dtype = code_dtype(levels)
            codes = torch.round(tensor.detach() * levels).to(dtype)
            tensor._saved_codes_packed = codes  # type: ignore[attr-defined]
        return ("codes", codes, levels, tensor.dtype)
    recipe = getattr(tensor, "_saved_codes_recipe", None)
    if recipe is not None:
        return ("recompute", *recipe)
    return tensor


def _unpack(packed: object) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    kind, *rest = packed  # type: ignore[misc]
    if kind == "codes":
        codes, levels, dtype = rest
        fusable = dtype == torch.float32 and kernel.fusable(codes, _CODE_DTYPES)
        fused = kernel.decode_codes() if fusable else None
        return fused(codes, levels) if fused is not None else codes.to(dtype) / levels
    layer, packed_inputs = rest
    with torch.no_grad():
        return layer(*(_unpack(packed) for packed in packed_inputs))


@contextlib.contextmanager
def saving_codes() -> Iterator[None]:
    """Run a forward pass whose saved activations are low-bit codes (see the module docstring)."""
    global _active_depth
    _active_depth += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _active_depth -= 1
