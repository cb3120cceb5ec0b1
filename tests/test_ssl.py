"""NT-Xent against a literal implementation, SimSiam, and the augmentation pipelines."""

import math

import pytest
import torch

from common.learning.augment import NORMALIZATION, TwoViews, normalize_transform, ssl_augmentation
from common.learning.losses import nt_xent_loss, simsiam_loss


def reference_nt_xent(z1, z2, temperature):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(
            math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i
        )
        total += -math.log(math.exp(float(z[i] @ z[positive]) / temperature) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_definition(temperature):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    assert math.isclose(
        float(nt_xent_loss(z1, z2, temperature)),
        reference_nt_xent(z1, z2, temperature),
        rel_tol=1e-5,
    )


def test_nt_xent_rewards_aligned_positives_and_validates_input():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    other = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    assert nt_xent_loss(z, z * 3.0, 0.5) < nt_xent_loss(z, other, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z, z, 0.0)
    with pytest.raises(ValueError, match="matching"):
        nt_xent_loss(z, z[:4], 0.5)


def test_simsiam_loss_is_minus_one_for_aligned_and_stops_gradient_to_targets():
    p = torch.randn(8, 4, requires_grad=True)
    z = (p.detach() * 2).requires_grad_()
    loss = simsiam_loss(p, p, z, z)
    assert math.isclose(float(loss.detach()), -1.0, rel_tol=1e-6)
    loss.backward()
    assert z.grad is None


@pytest.mark.parametrize(
    ("dataset", "channels", "size"), [("fashion-mnist", 1, 28), ("cifar10", 3, 32)]
)
def test_augmentations_make_two_different_normalized_views(dataset, channels, size):
    images = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    views = TwoViews(images, ssl_augmentation(size, channels, *NORMALIZATION[dataset]))
    torch.manual_seed(0)
    first, second = views[0]
    assert first.shape == second.shape == (channels, size, size)
    assert first.dtype == torch.float32 and not torch.equal(first, second)
    plain = normalize_transform(channels, *NORMALIZATION[dataset])(images[0])
    mean, std = NORMALIZATION[dataset]
    expected = (images[0].float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert torch.allclose(plain, expected, atol=1e-5)
