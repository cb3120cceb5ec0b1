"""Quantized layers (conv, linear, activation) and the walkers that set or project a whole
model's bitwidth, over the quantizers of ``common.lowbit.quantizers``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from common.lowbit import kernel
from common.lowbit.quantizers import (
    Rounding,
    mark_on_grid,
    project_all_to_grid_,
    project_to_grid_,
    quantize_activation,
    quantize_gradients_,
    quantize_weight,
)
from common.lowbit.saved_codes import mark_recomputable
from common.vocabulary import FP_ACTIVATIONS, FULL_PRECISION, check_bits


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward pass uses ``bits``-bit weights (bias stays float32).

    At low bits its output is recomputed in backward instead of saved
    (``common.lowbit.saved_codes``).
    """

    bits: int = FULL_PRECISION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = quantize_weight(self.weight, self.bits)
        out = self._conv_forward(x, weight, self.bias)
        if self.bits != FULL_PRECISION:
            frozen_bias = _detached(self.bias)
            mark_recomputable(
                out,
                lambda y, w: self._conv_forward(y, w, frozen_bias),
                x,
                weight,
                macs_per_element=self.in_channels // self.groups * math.prod(self.kernel_size),
            )
        return out


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward pass uses ``bits``-bit weights (bias stays float32).

    At low bits its output is recomputed in backward instead of saved
    (``common.lowbit.saved_codes``).
    """

    bits: int = FULL_PRECISION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = quantize_weight(self.weight, self.bits)
        out = F.linear(x, weight, self.bias)
        if self.bits != FULL_PRECISION:
            frozen_bias = _detached(self.bias)
            mark_recomputable(
                out,
                lambda y, w: F.linear(y, w, frozen_bias),
                x,
                weight,
                macs_per_element=self.in_features,
            )
        return out


class QuantAct(nn.Module):
    """Bounded, ``bits``-bit activation (``quantize_activation``); ReLU at 32 bits unless
    ``full_precision`` says clamp."""

    bits: int = FULL_PRECISION
    full_precision: str = "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.bits, self.full_precision)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, full_precision={self.full_precision}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def set_bitwidth(model: nn.Module, bits: int) -> nn.Module:
    """Set the weight and activation bitwidth of every quantized layer of ``model``; returns it."""
    check_bits(bits)
    for module in model.modules():
        if isinstance(module, (*QUANT_LAYERS, QuantAct)):
            module.bits = bits
    return model


def set_fp_activation(model: nn.Module, name: str) -> nn.Module:
    """Set the 32-bit nonlinearity (``FP_ACTIVATIONS``) of every activation of ``model``."""
    if name not in FP_ACTIVATIONS:
        raise ValueError(f"fp-activation {name!r} is not one of {', '.join(FP_ACTIVATIONS)}")
    for module in model.modules():
        if isinstance(module, QuantAct):
            module.full_precision = name
    return model


def quantized_layers(model: nn.Module) -> list[QuantConv2d | QuantLinear]:
    """Every conv and linear layer of ``model`` (the layers with codes)."""
    return [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]


@torch.no_grad()
def quantize_weight_grads_(
    model: nn.Module,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> None:
    """Quantile-quantize, in place, the weight gradient of every quantized layer at ``bits + 2``.

    The paper gives gradients two more bits than weights. Biases and BatchNorm stay float32.
    """
    if bits == FULL_PRECISION:
        return
    grads = [layer.weight.grad for layer in quantized_layers(model)]
    quantize_gradients_([grad for grad in grads if grad is not None], bits + 2, rounding, generator)


@torch.no_grad()
def project_weights_(
    model: nn.Module,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> None:
    """Put every quantized layer's stored weights on its ``bits``-bit grid: w <- Q(w).

    This is the paper's update ``w_{t+1} = Q(w_t - lr * g_Q)`` when called after each optimizer
    step (stochastic rounding: unbiased in the companded domain), and the initial projection of a
    model that starts on the grid (deterministic).
    """
    if bits == FULL_PRECISION:
        return
    weights = [layer.weight for layer in quantized_layers(model)]
    fused = kernel.project_to_grid_() is not None and all(kernel.fusable(w) for w in weights)
    if rounding == "stochastic" and not fused:  # the GPU's path: launches flat in the layers
        project_all_to_grid_(weights, bits, generator)
    else:
        for weight in weights:
            project_to_grid_(weight, bits, rounding, generator)
    for weight in weights:
        mark_on_grid(weight, bits)
