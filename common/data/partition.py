"""Fed-QSSL's split of a dataset: the server buffer D_g, Dirichlet(beta) label skew among the
clients, per-client local test sets with each client's label distribution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import seeds

# ---------------------------------------------------------------- partitioning


@dataclass(frozen=True)
class Partition:
    """Indices of each part: ``clients[k]`` and ``buffer`` index the training set,
    ``client_tests[k]`` the test set."""

    clients: list[np.ndarray]
    buffer: np.ndarray
    client_tests: list[np.ndarray]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    rng: np.random.Generator,
    min_size: int = 2,
    balanced: bool = False,
    size_band: float = 0.0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices among clients with Dirichlet(beta) label skew.

    For each class, proportions over clients are drawn from Dirichlet(beta) and the class's samples
    are dealt out accordingly; the draw is repeated until every client holds ``min_size`` samples.
    With ``balanced`` a client stops receiving further classes once it holds N/K samples (as in the
    paper's code), which keeps sizes near N/K. With ``size_band`` b > 0 a draw is kept only if every
    client holds between (1 - b) and (1 + b) times the mean (the authors' code: 0.5-1.5x, i.e.
    b = 0.5). Smaller beta means stronger skew.
    """
    labels = np.asarray(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if beta <= 0:
        raise ValueError(f"Dirichlet beta must be > 0, got {beta}")
    if not 0 <= size_band < 1:
        raise ValueError(f"size_band must be in [0, 1), got {size_band}")
    if len(labels) < num_clients * min_size:
        raise ValueError(
            f"{len(labels)} samples cannot give {num_clients} clients {min_size} samples each"
        )
    classes = np.unique(labels)
    target = len(labels) / num_clients
    for _ in range(max_tries):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients)
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, beta))
            if balanced:
                proportions = proportions * (sizes < target)
                total = proportions.sum()
                proportions = (
                    proportions / total if total > 0 else np.full(num_clients, 1 / num_clients)
                )
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].append(part)
                sizes[client] += len(part)
        in_band = size_band == 0 or (
            sizes.min() >= (1 - size_band) * target and sizes.max() <= (1 + size_band) * target
        )
        if sizes.min() >= min_size and in_band:
            return [np.sort(np.concatenate(parts)) for parts in shares]
    band = f" and sizes within {1 - size_band:g}-{1 + size_band:g}x the mean" if size_band else ""
    raise ValueError(
        f"no Dirichlet({beta}) split in {max_tries} tries gave all {num_clients} clients at least "
        f"{min_size} samples{band}: use fewer clients, a larger beta, a wider partition-balance "
        f"(or balanced-partition), or more data"
    )


def stratified_sample(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``fraction`` of each class (at least one per class), sorted."""
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def matching_test_indices(
    test_labels: np.ndarray,
    train_labels: np.ndarray,
    size: int,
    num_classes: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``size`` test indices whose label distribution follows ``train_labels`` (largest remainder);
    a class is capped at the test samples it has."""
    proportions = np.bincount(train_labels, minlength=num_classes) / max(len(train_labels), 1)
    exact = proportions * size
    counts = np.floor(exact).astype(int)
    for label in np.argsort(counts - exact)[: size - counts.sum()]:
        counts[label] += 1
    picked = []
    for label in np.flatnonzero(counts):
        members = np.flatnonzero(test_labels == label)
        picked.append(rng.choice(members, size=min(counts[label], len(members)), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def make_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    beta: float,
    buffer_ratio: float,
    seed: int,
    balanced: bool = False,
    size_band: float = 0.0,
) -> Partition:
    """Fed-QSSL's split: buffer D_g (``buffer_ratio`` of the training pool, stratified), clients by
    Dirichlet(beta) over the rest, and local test sets sized like each client's share."""
    if not 0 < buffer_ratio < 1:
        raise ValueError(f"buffer_ratio must be in (0, 1), got {buffer_ratio}")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    rng = seeds.partition_rng(seed)
    buffer = stratified_sample(train_labels, buffer_ratio, rng)
    pool = np.setdiff1d(np.arange(len(train_labels)), buffer)
    clients = [
        pool[part]
        for part in dirichlet_partition(
            train_labels[pool], num_clients, beta, rng, balanced=balanced, size_band=size_band
        )
    ]
    test_share = len(test_labels) / len(pool)
    client_tests = [
        matching_test_indices(
            test_labels,
            train_labels[indices],
            max(1, round(len(indices) * test_share)),
            num_classes,
            rng,
        )
        for indices in clients
    ]
    return Partition(clients=clients, buffer=buffer, client_tests=client_tests)
