"""Datasets held in memory as uint8 tensors, and Fed-QSSL's split of them.

The split: a server buffer D_g taken off the training pool (stratified by class), the rest divided
among clients by Dirichlet(beta) label skew, and per-client local test sets drawn from the *test*
split with each client's label distribution. Everything is deterministic under a seed.

The partitioner is written here rather than taken from flwr-datasets: that package works on
Hugging Face ``datasets`` tables (pulling pyarrow and pandas in), while this project keeps images in
memory as tensors and needs the label proportions of each client to draw its local test set.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.vocabulary import DATASET_NAMES

# (channels, image size, classes) of each dataset: what a device's own images must match
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "synthetic": (1, 28, 10),
}
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where and how to get them."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format."""


@dataclass(frozen=True)
class ImageData:
    """Images as uint8 (N, C, H, W), integer labels (N,) or None (a device's unlabelled data),
    and the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError("labels must be one per image")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        """Whether the images have labels."""
        return self.labels is not None

    @property
    def channels(self) -> int:
        """Channels of each image."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length of each (square) image."""
        return int(self.images.shape[-1])

    def without_labels(self) -> ImageData:
        """The same images as unlabelled data (a device that has no labels)."""
        return ImageData(self.images, None, self.num_classes)

    def subset(self, indices: np.ndarray) -> ImageData:
        """The images (and labels) at ``indices``."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], labels, self.num_classes)


# ---------------------------------------------------------------- loaders


def load_dataset(
    name: str,
    train: bool,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
) -> ImageData:
    """Load the train or test split of ``name`` into memory.

    ``fashion-mnist`` is read from ``data_dir`` or the Debian package's directory; ``cifar10`` and
    ``cifar100`` through torchvision from ``data_dir`` (downloaded there if ``download`` and the
    network allows); ``synthetic`` is generated from ``seed``.
    """
    if name == "fashion-mnist":
        return _load_fashion_mnist(train, data_dir)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, train, data_dir, download)
    if name == "synthetic":
        return make_synthetic(1000 if train else 500, seed=seed + (0 if train else 1))
    raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")


# the most data one IDX file may declare (Fashion-MNIST's training images are 47 MB): reading
# stops at the header's promise, so memory stays within it however large the file
MAX_IDX_BYTES = 2**30


def read_idx(path: str | os.PathLike[str], max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, as a uint8 array. Only the
    bytes the header declares are read (at most ``max_bytes``): a file that holds more, or
    less, is refused naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
                raise DatasetFormatError(
                    f"{path}: not an unsigned-byte IDX file (bad magic number)"
                )
            dims = handle.read(4 * magic[3])
            if len(dims) < 4 * magic[3]:
                raise DatasetFormatError(f"{path}: truncated IDX header")
            shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))
            expected = math.prod(shape)  # Python ints: no wrap-around
            if expected > max_bytes:
                raise DatasetFormatError(
                    f"{path}: IDX header declares shape {shape} ({expected} bytes), more than "
                    f"the {max_bytes} bytes one file may hold"
                )
            raw = bytearray(expected)  # filled in place: the array below is its only copy
            filled = 0
            while filled < expected:
                got = handle.readinto(memoryview(raw)[filled:])
                if not got:
                    break
                filled += got
            extra = handle.read(1)
    except (OSError, EOFError) as error:  # gzip's own errors on a damaged file among them
        raise DatasetFormatError(f"{path}: not a readable IDX file ({error})") from None
    if filled != expected or extra:
        found = f"{filled}" if not extra else "more"
        raise DatasetFormatError(
            f"{path}: IDX header promises {expected} bytes of data for shape {shape}, "
            f"file has {found}"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _find_file(stem: str, directories: list[Path]) -> Path | None:
    for directory in directories:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_fashion_mnist(train: bool, data_dir: str | os.PathLike[str] | None) -> ImageData:
    directories = []
    if data_dir is not None:
        root = Path(data_dir)
        directories += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    directories.append(FASHION_MNIST_SYSTEM_DIR)
    image_stem, label_stem = _FASHION_FILES[train]
    image_path = _find_file(image_stem, directories)
    label_path = _find_file(label_stem, directories)
    if image_path is None or label_path is None:
        looked = ", ".join(str(d) for d in directories)
        raise DatasetNotFoundError(
            f"Fashion-MNIST file {image_stem}[.gz] / {label_stem}[.gz] not found; looked in: "
            f"{looked}. Install it offline with `apt-get install dataset-fashion-mnist` (files go "
            f"to {FASHION_MNIST_SYSTEM_DIR}), or put the four idx files in a directory and pass "
            "it as data-dir."
        )
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetFormatError(
            f"{image_path} / {label_path}: expected (N, 28, 28) images and (N,) labels, got "
            f"{images.shape} and {labels.shape}"
        )
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
    )


def _load_cifar(
    name: str, train: bool, data_dir: str | os.PathLike[str] | None, download: bool
) -> ImageData:
    from torchvision import datasets

    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if data_dir is None:
        raise DatasetNotFoundError(
            f"{name} needs a data-dir: the directory holding (or to receive) torchvision's "
            f"'{dataset_class.base_folder}' folder"
        )
    try:
        dataset = dataset_class(str(data_dir), train=train, download=download)
    except (RuntimeError, OSError) as error:
        raise DatasetNotFoundError(
            f"{name} not found in {Path(data_dir) / dataset_class.base_folder} ({error}). "
            f"Download it there on a machine with internet (torchvision "
            f"datasets.{dataset_class.__name__}(root, download=True), or set download=true), "
            "then pass that directory as data-dir."
        ) from error
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    return ImageData(
        images,
        torch.as_tensor(dataset.targets, dtype=torch.int64),
        num_classes=len(dataset.classes),
    )


def make_synthetic(
    num_samples: int,
    num_classes: int = 10,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
) -> ImageData:
    """Small learnable images: a fixed random pattern per class, randomly shifted, plus noise.

    The class patterns depend only on the class and the shape (not on ``seed``), so a train and a
    test set made with different seeds share classes.
    """
    patterns = torch.rand(
        num_classes,
        channels,
        image_size // 4,
        image_size // 4,
        generator=torch.Generator().manual_seed(12345),
    )
    patterns = torch.nn.functional.interpolate(patterns, size=image_size, mode="bilinear")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    shifts = torch.randint(-2, 3, (num_samples, 2), generator=generator)
    images = patterns[labels]
    images = torch.stack(
        [
            torch.roll(image, (int(dy), int(dx)), dims=(1, 2))
            for image, (dy, dx) in zip(images, shifts, strict=True)
        ]
    )
    images = images + 0.15 * torch.randn(images.shape, generator=generator)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, labels, num_classes)
