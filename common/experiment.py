"""The data of one experiment, as every participant derives it from the config.

Clients and server each load the dataset and compute the same seeded partition (a second on
Fashion-MNIST), so no data or index list travels; a process that hosts several clients (the Ray
simulation) loads it once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from common.algorithms import get_algorithm
from common.config import ExperimentConfig
from common.data import ImageData, Partition, load_dataset, make_partition, stratified_sample
from common.models import Classifier, SSLModel, build_classifier, build_ssl_model
from common.ssl import (
    NORMALIZATION,
    normalize_transform,
    ssl_augmentation,
    supervised_augmentation,
)

PROJECTION_DIM = 128


@dataclass(frozen=True)
class ExperimentData:
    """Train and test splits with the Fed-QSSL partition of them."""

    dataset: str
    train: ImageData
    test: ImageData
    partition: Partition
    seed: int

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return NORMALIZATION[self.dataset]

    def augmentation(self) -> torch.nn.Module:
        return ssl_augmentation(self.train.image_size, self.train.channels, *self.normalization)

    def supervised_augmentation(self) -> torch.nn.Module:
        return supervised_augmentation(
            self.train.image_size, self.train.channels, *self.normalization
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_transform(self.train.channels, *self.normalization)(images)

    def client_train(self, client: int, max_samples: int = 0) -> ImageData:
        """Client ``client``'s share, capped at ``max_samples`` (0: all) by a seeded draw."""
        indices = self.partition.clients[client]
        if 0 < max_samples < len(indices):
            rng = np.random.default_rng([self.seed, client])
            indices = np.sort(rng.choice(indices, size=max_samples, replace=False))
        return self.train.subset(indices)

    def client_test(self, client: int) -> ImageData:
        return self.test.subset(self.partition.client_tests[client])

    def buffer(self) -> ImageData:
        """The server's buffer D_g (its labels are never used)."""
        return self.train.subset(self.partition.buffer)

    def uniform_train(self, size: int) -> ImageData:
        """A class-stratified labelled train subset for the global probe and kNN monitor."""
        fraction = min(0.999, size / len(self.train))
        rng = np.random.default_rng([self.seed, 1])
        return self.train.subset(stratified_sample(self.train.labels.numpy(), fraction, rng))


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


def torch_device(config: ExperimentConfig) -> torch.device:
    """Where models train: ``auto`` is the GPU when this process sees one (in a Ray simulation,
    clients see one only with ``--gpus-per-client`` > 0), else the CPU."""
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
    algorithm = get_algorithm(config.algorithm)
    torch.manual_seed(config.seed)  # initialised on the CPU: the same weights on every device
    if not algorithm.self_supervised:
        model = build_classifier(config.model, bits, channels, config.model_width, num_classes)
    else:
        model = build_ssl_model(
            config.model,
            bits,
            channels,
            config.model_width,
            PROJECTION_DIM,
            predictor=algorithm.objective == "simsiam",
        )
    return model.to(torch_device(config))
