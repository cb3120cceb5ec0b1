"""Low-bit training steps: gradients on the quantile grid, weights on the grid, SSL, supervised and
FedProx objectives."""

import pytest
import torch
from torchvision.transforms import v2

from common.learning.evaluation import knn_accuracy, linear_probe_accuracy
from common.learning.models import build_classifier, build_ssl_model
from common.learning.training import (
    LowBitSettings,
    Proximal,
    Recipe,
    fit_local,
    prepare_model,
    ssl_loss,
    train_epoch,
    train_step,
)
from common.lowbit.layers import quantized_layers
from common.lowbit.quantizers import quantize_weight, weight_codes


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
    losses = [
        train_epoch(model, [views], optimizer, settings, 0.1, generator)[0] for _ in range(40)
    ]
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


def labelled_batch(seed=0, n=32, classes=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    images = torch.randn(n, 1, 28, 28, generator=generator) + labels.view(-1, 1, 1, 1).float()
    return images, labels


def twin_classifiers(bits):
    torch.manual_seed(0)
    model = build_classifier("small_cnn", bits, 1, 8, num_classes=4)
    twin = build_classifier("small_cnn", bits, 1, 8, num_classes=4)
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("bits", [4, 32])
def test_fedprox_with_mu_zero_is_exactly_fedavgs_step(bits):
    fedavg, fedprox = twin_classifiers(bits)
    settings = LowBitSettings(bits)
    anchor = [p.detach().clone() + 0.5 for p in fedprox.parameters()]  # far from the weights
    for model, proximal in ((fedavg, None), (fedprox, Proximal(0.0, anchor))):
        prepare_model(model, settings)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_step(
            model,
            *labelled_batch(),
            optimizer,
            settings,
            0.5,
            torch.Generator().manual_seed(3),
            proximal,
        )
    for name, tensor in fedavg.state_dict().items():
        assert torch.equal(tensor, fedprox.state_dict()[name]), name


def test_fedprox_term_pulls_each_weight_towards_the_global_model():
    """SGD at 32 bits: the proximal step differs from FedAvg's by -lr * mu * (w - anchor)."""
    fedavg, fedprox = twin_classifiers(32)
    anchor = [p.detach().clone() + torch.randn_like(p) for p in fedprox.parameters()]
    start = [p.detach().clone() for p in fedprox.parameters()]
    lr, mu = 0.1, 0.3
    for model, proximal in ((fedavg, None), (fedprox, Proximal(mu, anchor))):
        train_step(
            model,
            *labelled_batch(),
            torch.optim.SGD(model.parameters(), lr=lr),
            LowBitSettings(32),
            proximal=proximal,
        )
    for a, b, w, ref in zip(fedavg.parameters(), fedprox.parameters(), start, anchor, strict=True):
        assert torch.allclose(b - a, -lr * mu * (w - ref), atol=1e-5)


def test_low_bit_supervised_training_fits_a_labelled_batch():
    model, _ = twin_classifiers(4)
    images, labels = labelled_batch(n=64)
    losses = fit_local(
        model,
        (images.clamp(-3, 6) * 25 + 80).to(torch.uint8),
        v2.ToDtype(torch.float32, scale=True),
        Recipe(LowBitSettings(4), 1e-2, batch_size=64, epochs=30),
        seed=0,
        labels=labels,
    ).losses
    assert losses[-1] < 0.5 * losses[0]
    for layer in quantized_layers(model):  # the stored weights are the 4-bit model
        assert torch.equal(quantize_weight(layer.weight.detach(), 4), layer.weight.detach())
        assert weight_codes(layer.weight.detach(), 4)[0].unique().numel() <= 16


def test_fit_local_refuses_labels_for_an_ssl_model_and_none_for_a_classifier():
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    ssl_model = build_ssl_model("small_cnn", 32, in_channels=1, width=8, projection_dim=16)
    classifier, _ = twin_classifiers(32)
    for model, labels in ((ssl_model, torch.zeros(8, dtype=torch.long)), (classifier, None)):
        with pytest.raises(ValueError, match="pass labels"):
            fit_local(
                model,
                images,
                torch.nn.Identity(),
                Recipe(LowBitSettings(32), 1e-3, batch_size=8),
                0,
                labels=labels,
            )


@pytest.mark.parametrize("mode", ["per-image", "batched"])
def test_shared_views_are_on_the_device_asked_for_in_either_augmentation(mode):
    """The server's shared views (D_g's epochs, the monitor's loss) feed a model on the server's
    device; per-image views came back on the CPU, a crash on a GPU. ``meta`` stands in for
    another device here."""
    from common.learning.training import augmented_epochs
    from common.runs.experiment import DatasetSpec

    images = torch.randint(0, 255, (20, 1, 28, 28), dtype=torch.uint8)
    transform = DatasetSpec.of("fashion-mnist").augmentation(mode)
    device = torch.device("meta") if mode == "per-image" else torch.device("cpu")
    epochs = augmented_epochs(images, transform, 2, 8, 0, device)
    assert len(epochs) == 2 and epochs[0]
    assert {t.device.type for batches in epochs for views in batches for t in views} == {
        device.type
    }
