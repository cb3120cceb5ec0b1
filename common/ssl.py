"""Self-supervised objectives (NT-Xent for SimCLR, SimSiam's negative cosine), augmentations and
the datasets that apply them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE) loss for two views; row i of ``z1`` and ``z2`` is a positive pair.

    Each of the 2N embeddings is classified against the other 2N - 1 by cosine similarity over
    ``temperature``; the loss is the mean cross-entropy of picking its positive.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"views must be matching (N, D) tensors, got {z1.shape} and {z2.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """SimSiam: symmetric negative cosine between predictions and stop-gradient projections."""
    return (
        -(
            F.cosine_similarity(p1, z2.detach(), dim=1).mean()
            + F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        )
        / 2
    )


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
