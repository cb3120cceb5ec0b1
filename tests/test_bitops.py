"""BitOps and memory counts against hand computations."""

import torch

from common.learning.models import build_model
from common.lowbit.bitops import layer_shapes, mean_cost, step_cost
from common.lowbit.layers import QuantAct, QuantConv2d, QuantLinear


def two_layer_model():
    return torch.nn.Sequential(
        QuantConv2d(3, 8, 3, padding=1, bias=False),  # 32x32x8 outputs, 27 MACs each
        QuantAct(),
        torch.nn.Flatten(),
        QuantLinear(8 * 32 * 32, 10),
    )


def test_one_conv_layer_matches_a_hand_computation():
    shapes = layer_shapes(two_layer_model(), (3, 32, 32))
    conv, fc = shapes
    assert conv.first and not fc.first
    assert conv.macs == 32 * 32 * 8 * 27 and conv.weights == 8 * 27 and conv.outputs == 8192
    assert fc.macs == 8192 * 10 and fc.weights == 81920 and fc.outputs == 10
    cost = step_cost(shapes, 4, batch_size=2)
    # forward: conv reads the 8-bit image, fc reads 4-bit activations; weights at 4 bits
    assert cost.forward_bitops == 2 * (conv.macs * 4 * 8 + fc.macs * 4 * 4)
    # backward at 6-bit gradients: conv needs only its weight gradient
    assert cost.backward_bitops == 2 * (conv.macs * 6 * 8 + fc.macs * 6 * 4 + fc.macs * 6 * 4)
    assert cost.weight_bits == (216 + 81920) * 4
    assert cost.gradient_bits == (216 + 81920) * 6
    assert cost.activation_bits == 2 * (8192 + 10) * 4


def test_full_precision_is_32_bits_everywhere():
    shapes = layer_shapes(two_layer_model(), (3, 32, 32))
    cost = step_cost(shapes, 32)
    macs = sum(s.macs for s in shapes)
    assert cost.forward_bitops == macs * 32 * 32
    assert cost.backward_bitops == (2 * macs - shapes[0].macs) * 32 * 32
    assert cost.memory_bits == 32 * (
        2 * sum(s.weights for s in shapes) + sum(s.outputs for s in shapes)
    )


def test_resnet18_counts_and_configuration_mean():
    shapes = layer_shapes(build_model("resnet18"), (3, 32, 32))
    assert sum(s.weights for s in shapes) == 11_159_232  # every conv weight
    assert 0.55e9 < sum(s.macs for s in shapes) < 0.56e9  # the CIFAR ResNet-18's ~0.56 GMACs
    mix = mean_cost(shapes, (4, 4, 6, 6, 6, 8, 8, 8, 12, 12), batch_size=1)
    full = step_cost(shapes, 32)
    assert mix.forward_bitops < full.forward_bitops / 10
    assert mix.backward_bitops > mix.forward_bitops  # gradients carry two more bits
    assert mix.weight_bits == round(11_159_232 * 7.4)  # mean of 4,4,6,6,6,8,8,8,12,12
