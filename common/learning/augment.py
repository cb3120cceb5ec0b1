"""Per-image augmentations (torchvision v2), normalization, and the datasets that apply them;
the batched GPU-friendly pipeline is ``common.learning.batch_augment``.

torchvision is imported by the functions that build its transforms, not with this module: a
client that trains with the batched pipeline never needs it, and importing it costs a fresh
process (Flower starts one per ClientApp message) about 1.2 s and 170 MB of peak memory
(torchvision's ops import torch's compiler stack), measured on this project's 2-core machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.transforms import v2

# Per-channel statistics of the training sets, used to normalize inputs.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5,), (0.25,)),
}


def normalize_transform(
    channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    """uint8 image tensor -> normalized float32 tensor (no augmentation: evaluation, probes)."""
    from torchvision.transforms import v2

    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def ssl_augmentation(
    image_size: int, channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    """SimCLR's augmentations for uint8 CHW tensors: crop, flip, colour jitter, grayscale.

    RGB (CIFAR) gets the full SimCLR recipe; single-channel images (Fashion-MNIST) get the crop,
    flip and brightness/contrast jitter, since hue, saturation and grayscale mean nothing there.
    """
    from torchvision.transforms import v2

    if channels == 3:
        colour: list[nn.Module] = [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    else:
        colour = [v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8)]
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *colour,
            normalize_transform(channels, mean, std),
        ]
    )


def supervised_augmentation(
    image_size: int, channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    """The standard light augmentation of supervised training: padded crop and flip."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomCrop(image_size, padding=image_size // 8),
            v2.RandomHorizontalFlip(),
            normalize_transform(channels, mean, std),
        ]
    )


class Labelled(torch.utils.data.Dataset):
    """One augmentation of each uint8 image with its label: supervised baselines' input."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: nn.Module) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class TwoViews(torch.utils.data.Dataset):
    """Two independent augmentations of each uint8 image: the input SimCLR and SimSiam train on."""

    def __init__(self, images: torch.Tensor, transform: nn.Module) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)
