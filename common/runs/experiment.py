"""The data of one experiment, as every participant derives it from the config.

In simulation, clients and server each load the dataset and compute the same seeded partition (a
second on Fashion-MNIST), so no data or index list travels; a process that hosts several clients
(the Ray simulation) loads it once. A deployed device may instead bring its own folder
(``local-data``), and the server its own buffer and probe folders (``buffer-dir``, ``probe-dir``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from common import seeds
from common.algorithms import get_algorithm
from common.config import ExperimentConfig
from common.data.datasets import DATASET_SHAPES, DatasetFormatError, ImageData, load_dataset
from common.data.local import load_images, local_train_test
from common.data.partition import Partition, make_partition, stratified_sample
from common.learning.augment import (
    NORMALIZATION,
    normalize_transform,
    ssl_augmentation,
    supervised_augmentation,
)
from common.learning.batch_augment import BatchSSLAugmentation
from common.learning.models import Classifier, SSLModel
from common.learning.objectives import objective
from common.learning.training import Augmentation
from common.lowbit.layers import set_fp_activation


@dataclass(frozen=True)
class DatasetSpec:
    """What every participant agrees on about the run's data: image shape, classes and the
    normalization and augmentations of its dataset."""

    name: str
    channels: int
    image_size: int
    num_classes: int

    @classmethod
    def of(cls, dataset: str) -> DatasetSpec:
        """The spec of dataset ``dataset``."""
        return cls(dataset, *DATASET_SHAPES[dataset])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, image size, classes): what a folder of local data is checked against."""
        return self.channels, self.image_size, self.num_classes

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the dataset's training set."""
        return NORMALIZATION[self.name]

    def augmentation(self, mode: str) -> Augmentation:
        """SimCLR's views: ``batched`` (whole batches as tensor ops) or ``per-image``
        (torchvision, one image per call)."""
        if mode == "batched":
            return BatchSSLAugmentation(self.image_size, self.channels, *self.normalization)
        return ssl_augmentation(self.image_size, self.channels, *self.normalization)

    def supervised_augmentation(self) -> torch.nn.Module:
        """A classifier's light augmentation: padded crop and flip."""
        return supervised_augmentation(self.image_size, self.channels, *self.normalization)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as normalized float32, no augmentation."""
        return normalize_transform(self.channels, *self.normalization)(images)


@dataclass(frozen=True)
class ClientData:
    """One device's data: what it trains on, and its labelled local test set (None when its data
    has no labels: it trains, but has no local score)."""

    spec: DatasetSpec
    train: ImageData
    test: ImageData | None


@dataclass(frozen=True)
class ServerData:
    """The server's data: the buffer D_g (images only) and the labelled probe sets that score the
    global model (``probe_train`` fits the probe and kNN monitor, ``probe_test`` scores it)."""

    spec: DatasetSpec
    buffer: torch.Tensor
    probe_train: ImageData
    probe_test: ImageData


@dataclass(frozen=True)
class ExperimentData:
    """Train and test splits with the Fed-QSSL partition of them."""

    dataset: str
    train: ImageData
    test: ImageData
    partition: Partition
    seed: int

    @property
    def spec(self) -> DatasetSpec:
        """What every participant agrees on about this dataset."""
        return DatasetSpec.of(self.dataset)

    def client_train(self, client: int, max_samples: int = 0) -> ImageData:
        """Client ``client``'s share, capped at ``max_samples`` (0: all) by a seeded draw."""
        indices = self.partition.clients[client]
        if 0 < max_samples < len(indices):
            rng = seeds.client_cap_rng(self.seed, client)
            indices = np.sort(rng.choice(indices, size=max_samples, replace=False))
        return self.train.subset(indices)

    def client_test(self, client: int) -> ImageData:
        """Client ``client``'s local test set (test split, its label distribution)."""
        return self.test.subset(self.partition.client_tests[client])

    def for_client(self, client: int, max_samples: int = 0) -> ClientData:
        """Client ``client``'s training share and local test set."""
        return ClientData(
            self.spec, self.client_train(client, max_samples), self.client_test(client)
        )

    def buffer(self) -> ImageData:
        """The server's buffer D_g (its labels are never used)."""
        return self.train.subset(self.partition.buffer)

    def uniform_train(self, size: int) -> ImageData:
        """A class-stratified labelled train subset for the global probe and kNN monitor."""
        return capped(self.train, size, self.seed)

    def for_server(self, probe_samples: int) -> ServerData:
        """The server's buffer D_g and probe sets."""
        return ServerData(
            self.spec, self.buffer().images, self.uniform_train(probe_samples), self.test
        )


def capped(data: ImageData, size: int, seed: int) -> ImageData:
    """A class-stratified subset of about ``size`` of labelled ``data`` (seeded)."""
    fraction = min(0.999, size / len(data))
    rng = seeds.probe_sample_rng(seed)
    return data.subset(stratified_sample(data.labels.numpy(), fraction, rng))


@functools.lru_cache(maxsize=2)
def _load(
    dataset: str,
    data_dir: str,
    download: bool,
    seed: int,
    num_clients: int,
    beta: float,
    buffer_ratio: float,
    balanced: bool,
    size_band: float,
) -> ExperimentData:
    train = load_dataset(dataset, True, data_dir or None, download, seed)
    test = load_dataset(dataset, False, data_dir or None, download, seed)
    partition = make_partition(
        train.labels.numpy(),
        test.labels.numpy(),
        num_clients,
        beta,
        buffer_ratio,
        seed,
        balanced,
        size_band,
    )
    return ExperimentData(dataset, train, test, partition, seed)


def experiment_data(config: ExperimentConfig) -> ExperimentData:
    """The (cached) data and partition that ``config`` describes."""
    return _load(
        config.dataset,
        config.data_dir,
        config.download,
        config.seed,
        config.num_clients,
        config.dirichlet_beta,
        config.buffer_ratio,
        config.balanced_partition,
        config.partition_balance,
    )


def client_data(config: ExperimentConfig, partition_id: int, local_data: str = "") -> ClientData:
    """A device's data: its own folder ``local_data``, used whole (a held-out test split when it
    is labelled), or else its partition of the run's dataset."""
    if not local_data:
        return experiment_data(config).for_client(partition_id, config.max_samples_per_client)
    spec = DatasetSpec.of(config.dataset)
    train, test = local_train_test(
        local_data, *spec.shape, config.local_test_fraction, [config.seed, partition_id]
    )
    if len(train) < 2:
        raise DatasetFormatError(
            f"{local_data}: {len(train)} training image(s); a device needs at least 2 (a "
            "training step contrasts the images of a batch)"
        )
    return ClientData(spec, train, test)


def server_data(config: ExperimentConfig) -> ServerData:
    """The server's buffer from ``buffer-dir`` and probe sets from ``probe-dir`` when set, else
    from the run's dataset and partition (not loaded at all when both folders are set)."""
    spec = DatasetSpec.of(config.dataset)
    from_dataset = (
        None
        if config.buffer_dir and config.probe_dir
        else experiment_data(config).for_server(config.probe_samples)
    )
    buffer = (
        load_images(config.buffer_dir, *spec.shape).images
        if config.buffer_dir
        else from_dataset.buffer
    )
    probe_train, probe_test = (
        _probe_folder(config, spec)
        if config.probe_dir
        else (from_dataset.probe_train, from_dataset.probe_test)
    )
    return ServerData(spec, buffer, probe_train, probe_test)


def _probe_folder(config: ExperimentConfig, spec: DatasetSpec) -> tuple[ImageData, ImageData]:
    train, test = local_train_test(
        config.probe_dir, *spec.shape, config.local_test_fraction, config.seed
    )
    if test is None:
        raise DatasetFormatError(f"probe-dir {config.probe_dir}: the global probe needs labels")
    train = capped(train, config.probe_samples, config.seed)
    if len(test) == 0:
        raise DatasetFormatError(f"probe-dir {config.probe_dir}: its test split holds no image")
    unseen = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
    if unseen:
        raise DatasetFormatError(
            f"probe-dir {config.probe_dir}: classes {unseen} are in the test split but have no "
            "labelled train image, so the probe cannot learn them: give each class scored at "
            "least one train image (or raise probe-samples)"
        )
    return train, test


def set_precision(config: ExperimentConfig) -> None:
    """CUDA's TF32 switches, by the config's ``tf32`` (off by default: cuDNN convolutions would
    otherwise run in TF32, about 10 mantissa bits, whatever the bitwidth a row states)."""
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.allow_tf32 = config.tf32


def torch_device(config: ExperimentConfig) -> torch.device:
    """Where models train: ``auto`` is the GPU when this process sees one (in a Ray simulation,
    clients see one only with ``--gpus-per-client`` > 0), else the CPU; CUDA's TF32 use is set
    by the config (``set_precision``) wherever the device is chosen."""
    set_precision(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device is 'cuda' but torch sees no GPU here: set device to 'auto' or 'cpu', or give "
            "clients GPUs (simulation.py --gpus-per-client 0.1)"
        )
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def new_model(
    config: ExperimentConfig, bits: int, channels: int, num_classes: int
) -> SSLModel | Classifier:
    """The algorithm's model at ``bits`` with the seed's initial weights (same everywhere), on the
    config's device: an SSL model (with SimSiam's predictor for ``fedsimsiam``) or a classifier."""
    goal = objective(get_algorithm(config.algorithm).objective)
    torch.manual_seed(config.seed)  # initialised on the CPU: the same weights on every device
    model = goal.build(config.model, bits, channels, config.model_width, num_classes)
    set_fp_activation(model, config.fp_activation)
    return model.to(torch_device(config))


def run_model(config: ExperimentConfig, bits: int) -> SSLModel | Classifier:
    """``new_model`` shaped by the run's dataset alone (no data loaded): what a saved model or a
    checkpoint of the run is loaded into."""
    spec = DatasetSpec.of(config.dataset)
    return new_model(config, bits, spec.channels, spec.num_classes)
