"""Scoring models: kNN accuracy (cheap monitor), a linear probe (the paper's post-training step,
Algorithm 1 line 16: each client freezes the encoder and trains a linear classifier on its own
labels), a classifier's accuracy and loss.

Features come from the encoder in eval mode, computed once, so BatchNorm statistics cannot drift
while the probe trains. The probe trains a fixed number of epochs and reports the *final* epoch's
test accuracy: test data is never used to pick anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from common.learning.models import linear_probe
from common.lowbit.layers import quantize_weight_grads_
from common.vocabulary import FULL_PRECISION

# Final-epoch probe lengths: the server's global probe on its labelled probe set, and a client's
# local probe on its own labelled share (a few hundred images, at its bitwidth, on the device).
GLOBAL_PROBE_EPOCHS = 100
LOCAL_PROBE_EPOCHS = 30


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
) -> float:
    """Accuracy of a cosine-similarity k-nearest-neighbour vote (majority of the k nearest)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):
        similarity = test[start : start + 1024] @ train.T
        neighbours = train_labels[similarity.topk(k, dim=1).indices]
        votes = F.one_hot(neighbours, num_classes).sum(dim=1)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + 1024]).sum())
    return correct / max(len(test), 1)


@dataclass
class LinearProbe:
    """A trained linear probe: the training features' standardization and the linear layer (at
    its bitwidth). Saved with a device's model, it is the device's whole classifier."""

    mean: torch.Tensor
    std: torch.Tensor
    layer: torch.nn.Module

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class predictions for frozen features."""
        return self.layer((features - self.mean) / self.std).argmax(dim=1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The share of ``labels`` predicted."""
        return float((self.predict(features) == labels).float().mean())

    @torch.no_grad()
    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean cross-entropy of the probe on frozen features: the loss its accuracy scores."""
        return float(F.cross_entropy(self.layer((features - self.mean) / self.std), labels))


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    bits: int = FULL_PRECISION,
    epochs: int = GLOBAL_PROBE_EPOCHS,
    learning_rate: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearProbe:
    """A linear probe on frozen features (Algorithm 1 line 16, post-training).

    Args:
        train_features: (N, D) features of the labelled images.
        train_labels: (N,) their classes.
        num_classes: the classifier's outputs.
        bits: the probe's bitwidth: a low-bit client's probe has its weight gradients
            quantile-quantized at ``bits + 2``, as in local training.
        epochs: full passes; the probe of the final epoch is returned (nothing is selected).
        learning_rate: Adam's step size.
        batch_size: features per step.
        seed: seeds the initial weights and the batch order.

    Returns:
        ``LinearProbe``: the layer and the training set's feature mean and std it standardizes
        with.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    train_x = (train_features - mean) / std
    probe = linear_probe(train_x.shape[1], num_classes, bits)
    optimizer = torch.optim.Adam(probe.parameters(), lr=learning_rate)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train_x[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            quantize_weight_grads_(probe, bits, "stochastic", generator)
            optimizer.step()
    return LinearProbe(mean, std, probe)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    bits: int = FULL_PRECISION,
    epochs: int = GLOBAL_PROBE_EPOCHS,
    learning_rate: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Train a probe (``train_linear_probe``, same arguments) on the train features and return
    its final-epoch accuracy on ``test_features`` / ``test_labels``, in [0, 1]."""
    probe = train_linear_probe(
        train_features, train_labels, num_classes, bits, epochs, learning_rate, batch_size, seed
    )
    return probe.accuracy(test_features, test_labels)


@torch.no_grad()
def classifier_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """A classifier's logits (eval mode, on the CPU) for already-normalized ``images``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model(images[start : start + batch_size].to(device)).cpu()
        for start in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def classifier_accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Accuracy of a classifier (eval mode) on already-normalized ``images``."""
    if len(images) == 0:
        return 0.0
    logits = classifier_logits(model, images, batch_size)
    return float((logits.argmax(dim=1) == labels).float().mean())


def classifier_loss(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Mean cross-entropy of a classifier (eval mode) on already-normalized ``images``: the
    loss its accuracy scores."""
    return float(F.cross_entropy(classifier_logits(model, images, batch_size), labels))
