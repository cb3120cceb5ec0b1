"""Low-bit training steps: gradients on the quantile grid, weights on the weight grid, learning."""

import pytest
import torch

from common.evaluation import knn_accuracy, linear_probe_accuracy
from common.models import build_ssl_model
from common.quant import quantize_weight, quantized_layers
from common.training import LowBitSettings, prepare_model, ssl_loss, train_epoch, train_step


def batch(seed=0, n=16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=generator)
    return x + 0.1 * torch.randn(x.shape, generator=generator), x + 0.1 * torch.randn(
        x.shape, generator=generator
    )


def capture_grads(model):
    captured = {}
    for index, layer in enumerate(quantized_layers(model)):
        layer.weight.register_hook(lambda g, i=index: captured.__setitem__(i, g))
    return captured


@pytest.mark.parametrize("weight_update", ["latent", "grid"])
def test_low_bit_step_quantizes_gradients_and_keeps_forward_weights_on_grid(weight_update):
    torch.manual_seed(0)
    model = build_ssl_model("small_cnn", 4, in_channels=1, projection_dim=16)
    settings = LowBitSettings(4, weight_update, "stochastic")
    prepare_model(model, settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, *batch(), optimizer, settings, generator=torch.Generator().manual_seed(1))
    on_grid = []
    for layer in quantized_layers(model):
        assert layer.weight.grad.unique().numel() <= 2 ** (4 + 2)  # s + 2 bits for gradients
        forward = quantize_weight(layer.weight.detach(), 4)
        assert forward.unique().numel() <= 2**4
        on_grid.append(torch.equal(layer.weight.detach(), forward))
    # grid: the stored weights are the 4-bit model; latent: float32 weights behind it
    assert all(on_grid) if weight_update == "grid" else not any(on_grid)


def test_full_precision_step_is_a_plain_optimizer_step():
    torch.manual_seed(0)
    model = build_ssl_model("small_cnn", 32, in_channels=1, projection_dim=16)
    reference = build_ssl_model("small_cnn", 32, in_channels=1, projection_dim=16)
    reference.load_state_dict(model.state_dict())
    views = batch()
    train_step(model, *views, torch.optim.SGD(model.parameters(), lr=0.1), LowBitSettings(32))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ssl_loss(reference, *views).backward()
    optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("weight_update", ["latent", "grid"])
def test_four_bit_training_lowers_the_loss_on_a_fixed_batch(weight_update):
    torch.manual_seed(0)
    model = build_ssl_model("small_cnn", 4, in_channels=1, projection_dim=16)
    settings = LowBitSettings(4, weight_update, "stochastic")
    prepare_model(model, settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    views = batch(n=32)
    generator = torch.Generator().manual_seed(2)
    losses = [train_epoch(model, [views], optimizer, settings, 0.1, generator) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_knn_and_probe_score_separable_features_high_and_random_labels_at_chance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (800,), generator=generator)
    centres = torch.randn(4, 16, generator=generator) * 3
    features = centres[labels] + torch.randn(800, 16, generator=generator)
    train, test = slice(0, 600), slice(600, 800)
    assert knn_accuracy(features[train], labels[train], features[test], labels[test]) > 0.95
    assert (
        linear_probe_accuracy(
            features[train], labels[train], features[test], labels[test], 4, bits=4, epochs=20
        )
        > 0.95
    )
    shuffled = labels[torch.randperm(800, generator=generator)]
    assert (
        linear_probe_accuracy(
            features[train], shuffled[train], features[test], shuffled[test], 4, epochs=20
        )
        < 0.45
    )
