"""SimCLR's augmentations drawn for a whole batch at once, as tensor operations (CPU or GPU).

torchvision's v2 transforms augment one image per call: on 28x28 Fashion-MNIST the Python and
dispatch overhead of a crop, a flip and a jitter per image costs more than the small CNN's step.
Here every sample still gets its own random parameters, but the work is a few batched ops:
one ``affine_grid``/``grid_sample`` for crop + flip + resize, per-sample factors for the jitter.

Where it differs from ``common.learning.augment.ssl_augmentation`` (same distributions otherwise):
- the crop box is continuous (sub-pixel offsets and sizes) where torchvision rounds it to whole
  pixels, and it is resampled bilinearly without antialiasing (crops only ever enlarge here);
- the colour-jitter order (brightness, contrast, saturation, hue) is drawn once per batch, where
  torchvision draws it per image;
- the random stream is the batch generator's, so the views differ from the per-image path's for
  the same seed (both are seeded and reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn import functional as F

from common.lowbit.device_constants import constant

# Luma weights as torchvision's rgb_to_grayscale (ITU-R 601-2, its rounding).
LUMA = (0.2989, 0.587, 0.114)


class BatchSSLAugmentation:
    """uint8 (B, C, H, W) images -> one augmented, normalized float32 view of each.

    Single-channel images get crop, flip and brightness/contrast jitter; RGB images also get
    saturation/hue jitter and random grayscale, as ``ssl_augmentation``.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        self.image_size = image_size
        self.channels = channels
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        rgb = channels == 3
        # (brightness, contrast, saturation, hue) strengths, as ColorJitter(0.4, 0.4[, 0.4, 0.1]).
        self.jitter = (0.4, 0.4, 0.4, 0.1) if rgb else (0.4, 0.4, 0.0, 0.0)
        self.jitter_p = 0.8
        self.grayscale_p = 0.2 if rgb else 0.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(images.shape)
            raise ValueError(f"expected a uint8 (B, C, H, W) batch, got {images.dtype} {shape}")
        x = images.float() / 255
        x = self.crop_and_flip(x, generator)
        x = self.colour_jitter(x, generator)
        if self.grayscale_p > 0:
            chosen = _uniform(len(x), generator, x.device) < self.grayscale_p
            x = torch.where(chosen.view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
        mean = constant(self.mean, torch.float32, x.device).view(1, -1, 1, 1)
        std = constant(self.std, torch.float32, x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def crop_boxes(
        self, count: int, height: int, width: int, generator: torch.Generator, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's crop (width, height) as fractions of the image, as RandomResizedCrop:
        area in ``scale``, log aspect ratio uniform in ``ratio``, up to 10 draws until it fits,
        else the largest centred box of a clamped ratio."""
        tries = 10
        area = _uniform((count, tries), generator, device) * (self.scale[1] - self.scale[0])
        area = (area + self.scale[0]) * height * width
        low, high = self.log_ratio
        aspect = torch.exp(low + _uniform((count, tries), generator, device) * (high - low))
        crop_w = torch.sqrt(area * aspect)
        crop_h = torch.sqrt(area / aspect)
        fits = (crop_w <= width) & (crop_h <= height)
        first = torch.argmax(fits.int(), dim=1, keepdim=True)  # the first draw that fits
        any_fits = fits.any(dim=1)
        crop_w = crop_w.gather(1, first).squeeze(1)
        crop_h = crop_h.gather(1, first).squeeze(1)
        fallback_w, fallback_h = self._fallback(height, width)
        crop_w = torch.where(any_fits, crop_w, torch.full_like(crop_w, fallback_w))
        crop_h = torch.where(any_fits, crop_h, torch.full_like(crop_h, fallback_h))
        return crop_w / width, crop_h / height

    def _fallback(self, height: int, width: int) -> tuple[float, float]:
        """torchvision's centre crop when no draw fits: the whole image, ratio clamped."""
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        image_ratio = width / height
        if image_ratio < low:
            return width, width / low
        if image_ratio > high:
            return height * high, height
        return width, height

    def crop_and_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random resized crop to ``image_size`` and a horizontal flip with p = 0.5, as one
        affine resampling per sample."""
        count, _, height, width = x.shape
        frac_w, frac_h = self.crop_boxes(count, height, width, generator, x.device)
        centre_x = (2 * _uniform(count, generator, x.device) - 1) * (1 - frac_w)
        centre_y = (2 * _uniform(count, generator, x.device) - 1) * (1 - frac_h)
        flip = torch.where(_uniform(count, generator, x.device) < 0.5, -1.0, 1.0)
        # Output pixel centres in [-1, 1] (align_corners=False), mapped into each crop box.
        steps = (2 * torch.arange(self.image_size, device=x.device) + 1) / self.image_size - 1
        grid_x = (frac_w * flip).view(-1, 1, 1) * steps.view(1, 1, -1) + centre_x.view(-1, 1, 1)
        grid_y = frac_h.view(-1, 1, 1) * steps.view(1, -1, 1) + centre_y.view(-1, 1, 1)
        size = (count, self.image_size, self.image_size)
        grid = torch.stack([grid_x.expand(size), grid_y.expand(size)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def colour_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ColorJitter applied with p = ``jitter_p`` per sample: each factor drawn per sample,
        the order of the four adjustments drawn once for the batch."""
        count = len(x)
        applied = _uniform(count, generator, x.device) < self.jitter_p
        jittered = x
        order = torch.randperm(4, generator=generator, device=generator.device).tolist()
        for which in order:
            strength = self.jitter[which]
            if strength == 0:
                continue
            spread = (2 * _uniform(count, generator, x.device) - 1) * strength
            jittered = ADJUSTMENTS[which](jittered, spread if which == 3 else 1 + spread)
        return torch.where(applied.view(-1, 1, 1, 1), jittered, x)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black by a per-sample ``factor``, as torchvision's adjust_brightness."""
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma, as torchvision's adjust_contrast."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor.view(-1, 1, 1, 1) * (x - mean)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's grayscale, as torchvision's adjust_saturation."""
    gray = _grayscale(x)
    return (gray + factor.view(-1, 1, 1, 1) * (x - gray)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + ``shift`` (per sample, in turns, modulo 1) -> RGB, as adjust_hue."""
    maximum, argmax = x.max(dim=1)
    minimum = x.min(dim=1).values
    chroma = maximum - minimum
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    red, green, blue = x.unbind(dim=1)
    hue = torch.where(
        argmax == 0,
        ((green - blue) / safe_chroma) % 6,
        torch.where(argmax == 1, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    safe_maximum = torch.where(maximum > 0, maximum, torch.ones_like(maximum))
    saturation = torch.where(maximum > 0, chroma / safe_maximum, torch.zeros_like(maximum))
    # HSV -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) % 6
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6) % 6
        weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
        channels.append(maximum - maximum * saturation * weight)
    return torch.stack(channels, dim=1)


# ColorJitter's four adjustments, in its numbering.
ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images; single-channel images are their own luma."""
    if x.shape[1] == 1:
        return x
    weights = constant(LUMA, torch.float32, x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


class BatchedTwoViews:
    """Two batched augmentations of each uint8 image in a seeded, reshuffled-per-epoch order:
    what a DataLoader over ``TwoViews`` yields, with the views drawn a batch at a time on the
    images' device."""

    def __init__(
        self,
        images: torch.Tensor,
        augmentation: BatchSSLAugmentation,
        batch_size: int,
        seed: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.images = images if device is None else images.to(device)
        self.augmentation = augmentation
        self.batch_size = min(batch_size, len(images))
        self.drop_last = len(images) > batch_size
        self.order = torch.Generator().manual_seed(seed)
        self.views = torch.Generator(device=self.images.device).manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=self.order).to(self.images.device)
        for index in range(len(self)):
            batch = self.images[order[index * self.batch_size : (index + 1) * self.batch_size]]
            yield self.augmentation(batch, self.views), self.augmentation(batch, self.views)
