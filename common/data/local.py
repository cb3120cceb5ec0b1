"""A device's (or the server's) own images from disk, used whole: no partitioning.

Accepted layouts of a folder (or an ``.npz`` file given directly):

- class sub-folders of images (torchvision's ``ImageFolder`` layout) named by the integer label,
  ``0/``, ``1/``, ...: integer names, because a device that holds only some classes must still
  give each the run's global label;
- a flat folder of images: unlabelled (enough for self-supervised training);
- one ``.npz`` with ``images`` (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 and optional
  ``labels`` (N,);
- an idx pair (the MNIST format): one ``*images*idx3-ubyte[.gz]`` and optional
  ``*labels*idx1-ubyte[.gz]``.

A folder with ``train/`` and ``test/`` sub-folders (each in one of those layouts) gives its own
test split; otherwise a seeded, class-stratified share of labelled data is held out for testing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.data.datasets import DatasetFormatError, DatasetNotFoundError, ImageData, read_idx
from common.readback import NPZ_DAMAGE, npz_array
from common.vocabulary import is_whole_number

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_log = logging.getLogger(__name__)
LAYOUTS = (
    "class sub-folders named 0, 1, ... holding images, a flat folder of images (unlabelled), one "
    ".npz with 'images' [and 'labels'], or an idx pair (*images*idx3-ubyte, *labels*idx1-ubyte)"
)


def load_images(
    path: str | os.PathLike[str], channels: int, image_size: int, num_classes: int
) -> ImageData:
    """The images (and labels, if the layout has them) at ``path``, checked against the run's
    image shape (``channels`` x ``image_size`` x ``image_size``) and label range."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"local data {path} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetFormatError(f"{path}: a data file must be an .npz; or give {LAYOUTS}")
        images, labels = _read_npz(path)
    else:
        images, labels = _read_folder(path, channels, image_size)
    images = _to_nchw(images, channels, image_size, path)
    if len(images) == 0:
        raise DatasetNotFoundError(f"{path} holds 0 images: a device needs images to train on")
    if labels is not None:
        labels = _checked_labels(labels, len(images), num_classes, path)
    return ImageData(images, labels, num_classes)


def local_train_test(
    path: str | os.PathLike[str],
    channels: int,
    image_size: int,
    num_classes: int,
    test_fraction: float,
    seed: int | list[int],
) -> tuple[ImageData, ImageData | None]:
    """(train, test) from ``path``: its ``train/`` and ``test/`` sub-folders when it has both,
    else all of it with ``test_fraction`` of each class held out (seeded). Unlabelled data is
    all for training and has no test set (None)."""
    root = Path(path)
    shape = (channels, image_size, num_classes)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = load_images(root / "train", *shape), load_images(root / "test", *shape)
        if not test.labelled:
            raise DatasetFormatError(f"{root / 'test'}: a test split needs labels; give {LAYOUTS}")
        return train, test
    data = load_images(root, *shape)
    if not data.labelled:
        return data, None
    held_out = _stratified_share(data.labels.numpy(), test_fraction, np.random.default_rng(seed))
    if len(held_out) == 0 or len(held_out) == len(data):
        raise DatasetFormatError(
            f"{root}: {len(data)} labelled images leave no train/test split at "
            f"local-test-fraction {test_fraction}: add images, change the fraction, or give "
            "train/ and test/ sub-folders"
        )
    kept = np.setdiff1d(np.arange(len(data)), held_out)
    return data.subset(kept), data.subset(held_out)


def _stratified_share(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``round(fraction * n_c)`` indices of each class c (none of a class too small for one)."""
    picked = [
        rng.choice(members, size=round(fraction * len(members)), replace=False)
        for members in (np.flatnonzero(labels == label) for label in np.unique(labels))
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise DatasetFormatError(
                    f"{path}: no 'images' array (found {', '.join(archive.files) or 'none'})"
                )
            labels = npz_array(archive, "labels") if "labels" in archive else None
            return npz_array(archive, "images"), labels
    except NPZ_DAMAGE as error:
        if isinstance(error, DatasetFormatError):
            raise
        raise DatasetFormatError(
            f"{path}: not a readable .npz of images ({type(error).__name__}: {error}); object "
            "arrays are refused (no pickle)"
        ) from None


def _read_folder(
    path: Path, channels: int, size: int
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | None]:
    archives = sorted(path.glob("*.npz"))
    if len(archives) > 1:
        raise DatasetFormatError(f"{path}: {len(archives)} .npz files; keep exactly one")
    if archives:
        return _read_npz(archives[0])
    idx_images = sorted(path.glob("*images*idx3-ubyte*"))
    if idx_images:
        idx_labels = sorted(path.glob("*labels*idx1-ubyte*"))
        if len(idx_images) > 1 or len(idx_labels) > 1:
            raise DatasetFormatError(f"{path}: keep one idx images file and at most one labels")
        return read_idx(idx_images[0]), read_idx(idx_labels[0]) if idx_labels else None
    links = [entry for entry in path.iterdir() if entry.is_dir() and entry.is_symlink()]
    if links:
        raise DatasetFormatError(
            f"{links[0]} is a link to a folder: links are not followed; copy the images in instead"
        )
    folders = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if folders and files:
        raise DatasetFormatError(
            f"{path} holds both images and sub-folders: put every image in its class folder "
            "(labelled) or none in sub-folders (unlabelled)"
        )
    if folders:
        return _read_class_folders(path, folders, channels, size)
    if files:
        return _decode_all(_image_files(path), channels, size), None
    raise DatasetNotFoundError(f"{path} holds no images; give {LAYOUTS}")


def _read_class_folders(
    path: Path, folders: list[str], channels: int, size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """torchvision's ImageFolder walk, with each folder's integer name as its label."""
    wrong = [name for name in folders if not is_whole_number(name)]
    if wrong:
        raise DatasetFormatError(
            f"{path}: class folders must be named by their integer label (0, 1, ...) so every "
            f"device labels a class alike; found {', '.join(wrong[:5])}"
        )
    samples = [(file, int(name)) for name in folders for file in _image_files(path / name)]
    empty = [name for name in folders if not any(f.parent.name == name for f, _ in samples)]
    if empty and samples:
        _log.warning(
            "%s: class folder(s) %s hold no image: those classes are absent from this device's "
            "data (remove the folders if that is meant)",
            path,
            ", ".join(empty),
        )
    if not samples:
        raise DatasetNotFoundError(f"{path}: its class folders hold no images; give {LAYOUTS}")
    images = _decode_all([file for file, _ in samples], channels, size)
    return images, np.array([label for _, label in samples], dtype=np.int64)


def _decode_all(files: list[Path], channels: int, size: int) -> torch.Tensor:
    """Every file decoded straight into one preallocated uint8 (N, C, H, W) array: the folder's
    images are held once, plus the one being decoded."""
    images = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    for index, file in enumerate(files):
        images[index] = _decode(file, channels, size)
    return images


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, each real file once. Links to folders are not
    followed (a link back up would read images again, or never end): one is an error naming it,
    as is a link to a file already read."""
    found: dict[str, Path] = {}
    for root, directories, files in os.walk(folder, followlinks=False):
        for name in directories:
            if (Path(root) / name).is_symlink():
                raise DatasetFormatError(
                    f"{Path(root) / name} is a link to a folder: links are not followed (an "
                    "image would be read twice, or forever); copy the images in instead"
                )
        for name in sorted(files):
            file = Path(root) / name
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            real = os.path.realpath(file)
            if real in found:
                raise DatasetFormatError(
                    f"{file} is the same image as {found[real]}: give each image once (a "
                    "duplicate could land in both the train and the test split)"
                )
            found[real] = file
    return sorted(found.values())


def _decode(path: Path, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 (C, H, W), converted to grey or RGB as the run needs. Its
    declared size is checked before any pixel is decoded, so a small file declaring a huge image
    costs nothing; 16-bit greyscale keeps its high byte (not clipped to white)."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if (height, width) != (size, size):
                raise DatasetFormatError(
                    f"{path}: {height} x {width} pixels, but the run's dataset has "
                    f"{size} x {size}: resize the images to {size} x {size}"
                )
            if opened.mode.startswith("I;16"):
                grey = Image.fromarray((np.asarray(opened, dtype=np.uint16) >> 8).astype(np.uint8))
                pixels = np.asarray(grey.convert("L" if channels == 1 else "RGB"))
            elif opened.mode in ("I", "F"):
                raise DatasetFormatError(
                    f"{path}: {opened.mode!r} images (32-bit) are not read; save it as 8-bit"
                )
            else:
                pixels = np.asarray(opened.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise DatasetFormatError(f"{path}: not a readable image ({error})") from None
    return torch.from_numpy(pixels.copy()).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)


def _to_nchw(
    images: np.ndarray | torch.Tensor, channels: int, image_size: int, source: Path
) -> torch.Tensor:
    """uint8 (N, C, H, W) at the run's shape; grey <-> RGB converted, sizes never resampled."""
    if isinstance(images, np.ndarray):  # shared, not copied, unless numpy cannot write it
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if images.dtype != torch.uint8:
        raise DatasetFormatError(
            f"{source}: images must be uint8 0-255, got {images.dtype}; convert them first"
        )
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[-2:] != (image_size, image_size):
        raise DatasetFormatError(
            f"{source}: images of shape {tuple(images.shape[1:])}, but the run's dataset has "
            f"{channels} x {image_size} x {image_size}: resize them to {image_size} x {image_size}"
        )
    if images.shape[1] == 4:  # drop alpha
        images = images[:, :3]
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != channels:
        raise DatasetFormatError(f"{source}: {images.shape[1]} channels per image, need {channels}")
    return images.contiguous()


def _checked_labels(labels: np.ndarray, count: int, num_classes: int, source: Path) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{source}: labels must be {count} integers (one per image), got {labels.dtype} "
            f"{labels.shape}"
        )
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{source}: labels must be in 0..{num_classes - 1} (the run's dataset has "
            f"{num_classes} classes), found {labels.min()}..{labels.max()}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def save_images(data: ImageData, folder: str | os.PathLike[str], file_format: str = "png") -> None:
    """Write ``data`` in a layout ``load_images`` reads back: class folders of PNGs (flat when
    unlabelled), or one ``data.npz``. ``folder`` must not exist yet or be empty."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: remove it or write elsewhere")
    folder.mkdir(parents=True, exist_ok=True)
    if file_format == "npz":
        arrays = {"images": data.images.numpy()}
        if data.labelled:
            arrays["labels"] = data.labels.numpy()
        np.savez_compressed(folder / "data.npz", **arrays)
        return
    if file_format != "png":
        raise ValueError(f"file_format must be png or npz, got {file_format!r}")
    labels = data.labels.tolist() if data.labelled else [None] * len(data)
    for index, (image, label) in enumerate(zip(data.images, labels, strict=True)):
        target = folder if label is None else folder / str(label)
        target.mkdir(exist_ok=True)
        pixels = image.permute(1, 2, 0).numpy()
        Image.fromarray(pixels[..., 0] if len(image) == 1 else pixels).save(
            target / f"{index:06d}.png"
        )
