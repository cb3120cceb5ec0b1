"""Bit operations and memory of one low-bit training step (the paper's Figures 1-2).

Per quantized layer (conv or linear) with M multiply-accumulates per sample, at weight and
activation bitwidth s and gradient bitwidth g = s + 2 (32 and 32 at full precision):

- forward:  M * s_w * s_in, where s_in is the bitwidth of the layer's input: s after a quantized
  activation, 8 for the first layer (8-bit image data), 32 at full precision;
- backward: M * g * s_w for the gradient with respect to the input (not needed by the first
  layer) plus M * g * s_in for the gradient with respect to the weights.

Memory of a step: weights (count x s), activations kept for backward (each quantized layer's
output elements x s x batch), and weight gradients (count x g). BatchNorm, biases and other
elementwise work are left out, as in the paper's accounting.

What this counts is the paper's model of low-bit hardware, **not what this PyTorch code does**:
here only the weight gradients are quantized (quantile grid, s + 2 bits); the error signals between
layers stay float32 and every operation runs in float32 arithmetic. What backward keeps of the
activations is their codes (``common.lowbit.saved_codes``), so measured step memory falls below
fp32, but it also holds float32 gradients, one layer's recomputed output at a time and the float32
outputs of the layers costliest to recompute (``saved_codes.KEEP_FROM_MACS``): measured against
this counter in docs/BENCHMARKS.md ("Memory a device really needs").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.lowbit.layers import QuantConv2d, QuantLinear
from common.vocabulary import FULL_PRECISION

IMAGE_BITS = 8


@dataclass(frozen=True)
class LayerShape:
    """What the counts need of one quantized layer, per sample."""

    name: str
    macs: int
    weights: int
    outputs: int
    first: bool


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerShape]:
    """Multiply-accumulates, weight count and output size of each quantized layer (batch 1)."""
    shapes: list[LayerShape] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):

            def record(layer, inputs, output, name=name):
                """Forward hook: this layer's MACs, weights and outputs for one sample."""
                per_output = layer.weight[0].numel()  # in_channels/groups * kernel, or in_features
                outputs = output[0].numel()
                shapes.append(
                    LayerShape(
                        name, outputs * per_output, layer.weight.numel(), outputs, first=not shapes
                    )
                )

            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return shapes


@dataclass(frozen=True)
class StepCost:
    """Bit operations and memory bits of one training step at one bitwidth."""

    bits: int
    forward_bitops: int
    backward_bitops: int
    weight_bits: int
    activation_bits: int
    gradient_bits: int

    @property
    def memory_bits(self) -> int:
        """Bits of training memory: weights, saved activations and weight gradients."""
        return self.weight_bits + self.activation_bits + self.gradient_bits


def step_cost(shapes: list[LayerShape], bits: int, batch_size: int = 1) -> StepCost:
    """The cost of one step of ``batch_size`` samples with every layer at ``bits``."""
    full = bits == FULL_PRECISION
    weight_bits = bits
    grad_bits = FULL_PRECISION if full else bits + 2
    forward = backward = activations = 0
    for shape in shapes:
        input_bits = FULL_PRECISION if full else (IMAGE_BITS if shape.first else bits)
        forward += shape.macs * weight_bits * input_bits
        backward += shape.macs * grad_bits * input_bits
        if not shape.first:
            backward += shape.macs * grad_bits * weight_bits
        activations += shape.outputs * bits
    weights = sum(s.weights for s in shapes)
    return StepCost(
        bits=bits,
        forward_bitops=forward * batch_size,
        backward_bitops=backward * batch_size,
        weight_bits=weights * weight_bits,
        activation_bits=activations * batch_size,
        gradient_bits=weights * grad_bits,
    )


def mean_cost(shapes: list[LayerShape], bitwidths: tuple[int, ...], batch_size: int) -> StepCost:
    """The per-client mean cost of a bitwidth configuration (e.g. 20% 4-bit, 30% 6-bit, ...)."""
    costs = [step_cost(shapes, bits, batch_size) for bits in bitwidths]

    def mean(field: str) -> int:
        """The mean of one count over the configuration's clients."""
        return round(sum(getattr(c, field) for c in costs) / len(costs))

    return StepCost(
        bits=0,
        forward_bitops=mean("forward_bitops"),
        backward_bitops=mean("backward_bitops"),
        weight_bits=mean("weight_bits"),
        activation_bits=mean("activation_bits"),
        gradient_bits=mean("gradient_bits"),
    )
