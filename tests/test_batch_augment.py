"""Batched SimCLR augmentation: each operation against torchvision's, the crop distribution
against RandomResizedCrop's, per-sample randomness, seeding, and its use in training."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from common.learning.augment import NORMALIZATION, normalize_transform, ssl_augmentation
from common.learning.batch_augment import (
    BatchedTwoViews,
    BatchSSLAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
)
from common.learning.training import augmented_epochs, streamed_epochs

FMNIST = NORMALIZATION["fashion-mnist"]
CIFAR = NORMALIZATION["cifar10"]


def images(count: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), generator=generator).to(torch.uint8)


@pytest.mark.parametrize(
    ("ours", "theirs", "channels"),
    [
        (adjust_brightness, TF.adjust_brightness, 1),
        (adjust_brightness, TF.adjust_brightness, 3),
        (adjust_contrast, TF.adjust_contrast, 1),
        (adjust_contrast, TF.adjust_contrast, 3),
        (adjust_saturation, TF.adjust_saturation, 3),  # RGB only
    ],
)
def test_each_adjustment_matches_torchvision_per_sample(ours, theirs, channels):
    x = images(6, channels, 8).float() / 255
    factors = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.25, 1.4])
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(len(x))])
    torch.testing.assert_close(ours(x, factors), expected, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-0.5, 0.5), seed=st.integers(0, 1000))
def test_hue_shift_matches_torchvision(shift, seed):
    x = images(3, 3, 6, seed).float() / 255
    expected = TF.adjust_hue(x, shift)
    torch.testing.assert_close(adjust_hue(x, torch.full((3,), shift)), expected, atol=1e-5, rtol=0)


def test_full_crop_without_jitter_is_the_image_or_its_mirror():
    """Geometry: a crop of the whole image, resized to its own size, returns each pixel (or the
    flipped image), so the box-to-grid mapping is exact."""
    batch = images(64, 1, 12)
    augment = BatchSSLAugmentation(12, 1, *FMNIST, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    augment.jitter_p = 0.0
    views = augment(batch, torch.Generator().manual_seed(0))
    plain = normalize_transform(1, *FMNIST)(batch)
    mirrored = plain.flip(-1)
    same = (views - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
    flipped = (views - mirrored).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert bool((same | flipped).all())
    assert 16 < int(flipped.sum()) < 48  # p = 0.5 per sample, not per batch


def test_crop_boxes_follow_random_resized_crop():
    """Area fraction and aspect ratio: the same ranges and about the same means as torchvision's
    own parameter draw (which rounds to whole pixels)."""
    size = 28
    augment = BatchSSLAugmentation(size, 1, *FMNIST)
    width, height = augment.crop_boxes(20_000, size, size, torch.Generator().manual_seed(1), "cpu")
    area, aspect = width * height, width / height
    assert float(area.min()) >= 0.2 - 1e-6 and float(area.max()) <= 1.0 + 1e-6
    assert float(aspect.min()) >= 0.75 - 1e-6 and float(aspect.max()) <= 4 / 3 + 1e-6
    torch.manual_seed(1)
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0))
    boxes = [crop.make_params([torch.zeros(1, size, size)]) for _ in range(5000)]
    theirs = torch.tensor([b["height"] * b["width"] / size**2 for b in boxes])
    assert abs(float(area.mean()) - float(theirs.mean())) < 0.02
    assert abs(float(aspect.log().mean())) < 0.01  # log-uniform ratio, symmetric around 1


@pytest.mark.parametrize(("channels", "norm"), [(1, FMNIST), (3, CIFAR)])
def test_views_match_torchvision_pipeline_statistics(channels, norm):
    """Same distribution as the per-image pipeline on the same images: per-view mean and spread
    agree within sampling noise (a wrong scale, jitter range or normalization would not)."""
    batch = images(1, channels, 16).expand(2000, -1, -1, -1).contiguous()
    ours = BatchSSLAugmentation(16, channels, *norm)(batch, torch.Generator().manual_seed(2))
    torch.manual_seed(2)
    per_image = ssl_augmentation(16, channels, *norm)
    theirs = torch.stack([per_image(image) for image in batch[:1000]])
    for statistic in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3))):
        a, b = statistic(ours), statistic(theirs)
        spread = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(float(a.mean() - b.mean())) < 5 * spread + 0.01
        assert 0.8 < float(a.std() / b.std()) < 1.25


def test_views_are_seeded_and_differ_per_sample_and_per_view():
    batch = images(32, 3, 16)
    augment = BatchSSLAugmentation(16, 3, *CIFAR)
    first = augment(batch, torch.Generator().manual_seed(5))
    again = augment(batch, torch.Generator().manual_seed(5))
    other = augment(batch, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    same_image = images(1, 3, 16).expand(8, -1, -1, -1)
    views = augment(same_image, torch.Generator().manual_seed(7))
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) == 8
    assert views.dtype == torch.float32 and views.shape == (8, 3, 16, 16)


def test_rejects_non_uint8_batches():
    augment = BatchSSLAugmentation(8, 1, *FMNIST)
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.rand(2, 1, 8, 8), torch.Generator())


@given(count=st.integers(1, 40), batch_size=st.integers(1, 16))
@settings(max_examples=30, deadline=None)
def test_batched_views_cover_each_image_once_per_epoch(count, batch_size):
    """Like the DataLoader it replaces: a reshuffled permutation each epoch, the last partial
    batch dropped only when there is more than one batch."""
    identity = torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)

    class Tag(BatchSSLAugmentation):
        def __call__(self, batch, generator):
            return batch[:, 0, 0, 0].long()

    loader = BatchedTwoViews(identity, Tag(2, 1, *FMNIST), batch_size, seed=3)
    epochs = [torch.cat([first for first, _ in loader]) for _ in range(2)]
    drop = count > batch_size and count % batch_size != 0
    expected = count - count % batch_size if drop else count
    for seen in epochs:
        assert len(seen) == expected == sum(len(a) for a, _ in loader)
        assert len(set(seen.tolist())) == expected  # no image twice
    if count > 3:
        assert not torch.equal(epochs[0], epochs[1]) or drop


def test_shared_epochs_equal_a_fresh_draw():
    """The server augments D_g once a round and shares the views: a second draw with the same
    seed must give the same batches."""
    buffer = images(50, 1, 28)
    augment = BatchSSLAugmentation(28, 1, *FMNIST)
    first = augmented_epochs(buffer, augment, epochs=2, batch_size=16, seed=9)
    second = augmented_epochs(buffer, augment, epochs=2, batch_size=16, seed=9)
    assert len(first) == 2 and len(first[0]) == 3
    for a, b in zip(first, second, strict=True):
        for (x1, x2), (y1, y2) in zip(a, b, strict=True):
            assert torch.equal(x1, y1) and torch.equal(x2, y2) and not torch.equal(x1, x2)


@pytest.mark.parametrize("kind", ["batched", "per-image"])
def test_streamed_epochs_are_the_shared_epochs_made_one_batch_at_a_time(kind):
    """``buffer-only`` trains one model on many epochs of D_g: streamed, its views are the same
    batches, in the same order, and a batched view is gone once the next one is drawn."""
    buffer = images(50, 1, 28)
    augment = (
        BatchSSLAugmentation(28, 1, *FMNIST)
        if kind == "batched"
        else ssl_augmentation(28, 1, *FMNIST)
    )
    shared = [b for epoch in augmented_epochs(buffer, augment, 3, 16, seed=4) for b in epoch]
    streamed = streamed_epochs(buffer, augment, 3, 16, seed=4)
    assert not isinstance(streamed, list)
    alive = []
    for count, (x1, x2) in enumerate(shared):
        y1, y2 = next(streamed)
        assert torch.equal(x1, y1) and torch.equal(x2, y2)
        alive.append(weakref.ref(y1))
        del y1, y2
        gc.collect()
        if kind == "batched":  # at most the batch in hand is held, never the ones before it
            assert sum(ref() is not None for ref in alive) <= 1, count
    assert count + 1 == 9 and next(streamed, None) is None
