"""Loaders on real-format files written here, synthetic data, and the Fed-QSSL partition."""

import functools
import gzip
import hashlib
import operator
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from common.data import datasets as loaders
from common.data.datasets import (
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
    make_synthetic,
    read_idx,
)
from common.data.partition import dirichlet_partition, make_partition


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.fixture
def no_system_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(loaders, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nothing-here")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_loader_reads_idx_files(tmp_path, no_system_fashion_mnist, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28))
    labels = rng.integers(0, 10, 7)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    loaded = load_dataset("fashion-mnist", train=False, data_dir=tmp_path)
    assert loaded.images.shape == (7, 1, 28, 28) and loaded.images.dtype == torch.uint8
    assert np.array_equal(loaded.images[:, 0].numpy(), images)
    assert np.array_equal(loaded.labels.numpy(), labels)


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01x")
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2)), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DatasetFormatError, match="promises 8 bytes"):
        read_idx(tmp_path / "short")


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(
    tmp_path, no_system_fashion_mnist
):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("fashion-mnist", train=True, data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message


def write_cifar(root, dataset_class, monkeypatch, rng):
    """Real CIFAR python pickles, with torchvision's checksum lists pointed at them."""
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if dataset_class is datasets.CIFAR10 else "fine_labels"
    num_classes = 10 if dataset_class is datasets.CIFAR10 else 100
    written = {}

    def dump(name, payload):
        path = folder / name
        path.write_bytes(pickle.dumps(payload))
        return [name, hashlib.md5(path.read_bytes()).hexdigest()]

    train_list = []
    for entry in dataset_class.train_list:
        pixels = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, 5).tolist()
        written.setdefault("train", []).append((pixels, labels))
        train_list.append(dump(entry[0], {"data": pixels, label_key: labels}))
    pixels = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, 4).tolist()
    written["test"] = [(pixels, labels)]
    test_list = [dump(dataset_class.test_list[0][0], {"data": pixels, label_key: labels})]
    meta_key = dataset_class.meta["key"]
    meta = dump(dataset_class.meta["filename"], {meta_key: [f"c{i}" for i in range(num_classes)]})
    monkeypatch.setattr(dataset_class, "train_list", train_list)
    monkeypatch.setattr(dataset_class, "test_list", test_list)
    monkeypatch.setattr(dataset_class, "meta", {**dataset_class.meta, "md5": meta[1]})
    return written, num_classes


@pytest.mark.parametrize(
    ("name", "dataset_class"), [("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)]
)
def test_cifar_loaders_read_python_pickles(tmp_path, monkeypatch, name, dataset_class):
    written, num_classes = write_cifar(
        tmp_path, dataset_class, monkeypatch, np.random.default_rng(1)
    )
    for split, train in (("train", True), ("test", False)):
        loaded = load_dataset(name, train=train, data_dir=tmp_path)
        pixels = np.concatenate([p for p, _ in written[split]])
        labels = functools.reduce(operator.iadd, (lab for _, lab in written[split]), [])
        assert loaded.num_classes == num_classes
        assert loaded.images.shape == (len(labels), 3, 32, 32)
        assert np.array_equal(loaded.images.numpy(), pixels.reshape(-1, 3, 32, 32))
        assert loaded.labels.tolist() == labels


def test_missing_cifar_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data-dir"):
        load_dataset("cifar10", train=True, data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="needs a data-dir"):
        load_dataset("cifar100", train=True)


def test_synthetic_data_is_deterministic_and_shares_classes_across_splits():
    a, b = make_synthetic(50, seed=3), make_synthetic(50, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = make_synthetic(50, seed=4)
    assert not torch.equal(a.images, other.images)
    # same class -> similar images across seeds (shared class patterns)
    mean_a = a.images[a.labels == 0].float().mean(0)
    mean_other_same = other.images[other.labels == 0].float().mean(0)
    mean_other_diff = other.images[other.labels == 1].float().mean(0)
    assert (mean_a - mean_other_same).abs().mean() < (mean_a - mean_other_diff).abs().mean()


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 10, 20_000), rng.integers(0, 10, 4_000)


def test_partition_covers_every_training_sample_exactly_once(labels):
    train, test = labels
    part = make_partition(train, test, 10, 0.1, 0.1, seed=0)
    everything = np.concatenate([*part.clients, part.buffer])
    assert len(everything) == len(train)
    assert np.array_equal(np.sort(everything), np.arange(len(train)))
    assert abs(len(part.buffer) - 0.1 * len(train)) <= 10
    for client in part.clients:
        assert not np.intersect1d(client, part.buffer).size


def skew(train, clients):
    """Mean total-variation distance between client and global label distributions."""
    overall = np.bincount(train, minlength=10) / len(train)
    return np.mean(
        [
            0.5 * np.abs(np.bincount(train[c], minlength=10) / len(c) - overall).sum()
            for c in clients
        ]
    )


def test_skew_grows_as_beta_falls(labels):
    train, _ = labels
    skews = [
        np.mean(
            [
                skew(train, dirichlet_partition(train, 10, beta, np.random.default_rng(s)))
                for s in range(3)
            ]
        )
        for beta in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.05 and skews[2] > 0.5


def test_same_seed_same_split_other_seed_other_split(labels):
    train, test = labels
    first = make_partition(train, test, 5, 0.5, 0.2, seed=7)
    again = make_partition(train, test, 5, 0.5, 0.2, seed=7)
    other = make_partition(train, test, 5, 0.5, 0.2, seed=8)
    for a, b in zip(
        first.clients + first.client_tests, again.clients + again.client_tests, strict=True
    ):
        assert np.array_equal(a, b)
    assert np.array_equal(first.buffer, again.buffer)
    assert not all(np.array_equal(a, b) for a, b in zip(first.clients, other.clients, strict=True))


def test_local_test_sets_follow_each_clients_label_distribution(labels):
    train, test = labels
    part = make_partition(train, test, 10, 0.1, 0.1, seed=1)
    for client, client_test in zip(part.clients, part.client_tests, strict=True):
        assert client_test.max() < len(test) and len(np.unique(client_test)) == len(client_test)
        expected = np.bincount(train[client], minlength=10) / len(client)
        got = np.bincount(test[client_test], minlength=10) / len(client_test)
        assert np.abs(expected - got).max() <= 1.0 / len(client_test) + 1e-9
        assert abs(len(client_test) - len(client) * len(test) / (len(train) * 0.9)) <= 1


def test_balanced_partition_keeps_client_sizes_closer_to_even(labels):
    train, _ = labels

    def spread(balanced):
        sizes = [
            [
                len(c)
                for c in dirichlet_partition(
                    train, 10, 0.1, np.random.default_rng(s), balanced=balanced
                )
            ]
            for s in range(5)
        ]
        return np.mean([np.std(s) / np.mean(s) for s in sizes])

    assert spread(True) < 0.6 * spread(False)


@pytest.mark.parametrize("balanced", [False, True])
def test_partition_balance_keeps_every_client_within_the_band_of_the_mean(labels, balanced):
    train, _ = labels
    for seed in range(3):
        sizes = np.array(
            [
                len(c)
                for c in dirichlet_partition(
                    train, 10, 0.1, np.random.default_rng(seed), balanced=balanced, size_band=0.5
                )
            ]
        )
        assert 0.5 * sizes.mean() <= sizes.min() and sizes.max() <= 1.5 * sizes.mean(), sizes
    with pytest.raises(ValueError, match=r"0\.99-1\.01x the mean.*partition-balance"):
        dirichlet_partition(train, 10, 0.1, np.random.default_rng(0), size_band=0.01, max_tries=5)


def test_partition_rejects_impossible_requests(labels):
    train, test = labels
    with pytest.raises(ValueError, match="beta"):
        dirichlet_partition(train, 10, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="buffer_ratio"):
        make_partition(train, test, 10, 0.1, 1.0, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(train[:10], 10, 0.1, np.random.default_rng(0))
