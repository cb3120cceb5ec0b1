"""Models: the CIFAR ResNet-18's shape and size, the small CNN, heads, and bitwidth plumbing."""

import pytest
import torch

from common.learning.models import build_model, build_ssl_model, extract_features, linear_probe
from common.lowbit.layers import QuantAct, QuantConv2d, QuantLinear


def test_resnet18_is_the_cifar_variant_with_correct_downsampling():
    model = build_model("resnet18")
    sizes = {}
    for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda module, inputs, output, name=name: sizes.__setitem__(name, output.shape[-1])
        )
    features = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512)
    assert sizes == {"stem": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}
    assert sum(p.numel() for p in model.parameters()) == 11_168_832  # +5,130 for a 10-class head
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("size", [28, 32])
def test_small_cnn_takes_28_and_32_pixel_images(size):
    model = build_model("small_cnn", 4, in_channels=1)
    assert model(torch.randn(3, 1, size, size)).shape == (3, model.feature_dim)


def test_build_model_sets_bitwidth_everywhere_and_rejects_unknown_names():
    model = build_ssl_model("small_cnn", 6, in_channels=1, predictor=True)
    bits = {m.bits for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantAct))}
    assert bits == {6}
    with pytest.raises(ValueError, match="resnet18, small_cnn"):
        build_model("vgg", 4)


def test_forward_pass_uses_low_bit_weights_and_activations(monkeypatch):
    model = build_model("small_cnn", 3, in_channels=1)
    weights, activations = [], []
    for module in model.modules():
        if isinstance(module, QuantAct):
            module.register_forward_hook(lambda m, i, output: activations.append(output))
    conv2d = torch.nn.functional.conv2d

    def spy(x, weight, *args, **kwargs):
        weights.append(weight)
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    model(torch.randn(2, 1, 28, 28))
    assert len(weights) == len(activations) == 3
    assert all(w.unique().numel() <= 8 for w in weights)
    assert all(a.unique().numel() <= 8 for a in activations)


def test_ssl_heads_and_probe_shapes():
    simclr = build_ssl_model("small_cnn", 4, in_channels=1, projection_dim=32)
    z, p = simclr(torch.randn(4, 1, 28, 28))
    assert z.shape == (4, 32) and p is None
    simsiam = build_ssl_model("small_cnn", 4, in_channels=1, projection_dim=32, predictor=True)
    z, p = simsiam(torch.randn(4, 1, 28, 28))
    assert z.shape == p.shape == (4, 32)
    probe = linear_probe(128, 10, 4)
    assert probe(torch.randn(5, 128)).shape == (5, 10) and probe.bits == 4


def test_extract_features_is_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    encoder = build_model("small_cnn", 8, in_channels=1)
    encoder.train()
    images = torch.randn(10, 1, 28, 28)
    first = extract_features(encoder, images, batch_size=3)
    assert encoder.training
    # chunking changes only float rounding, which can move an 8-bit activation by one level
    # (1/255) before the average pool: equal to far below that, not bit for bit
    assert torch.allclose(first, extract_features(encoder, images, batch_size=10), atol=1e-3)
    encoder.eval()
    assert torch.allclose(first, encoder(images), atol=1e-3)
