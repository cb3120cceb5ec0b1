"""What a client trains for: SimCLR, SimSiam or supervised, each knowing its model, augmentation,
inputs and how it is scored. The one place the self-supervised / supervised difference lives.

- SimCLR: encoder + projection head, two augmented views per image, NT-Xent
  (``common.learning.training`` picks the loss from the model), scored by a linear probe on the
  frozen encoder;
- SimSiam: the same with a predictor head and SimSiam's loss;
- supervised (FedAvg, FedProx, FedPAQ): encoder + linear head, one lightly augmented view and
  its label, cross-entropy; scored by its own classifier (and, to compare methods rather than
  protocols, by the same probe as the SSL rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from common.data.datasets import ImageData
from common.learning.evaluation import classifier_accuracy, classifier_loss
from common.learning.models import Classifier, SSLModel, build_classifier, build_ssl_model
from common.learning.training import Augmentation

PROJECTION_DIM = 128


class HasAugmentations(Protocol):
    """What an objective needs of a dataset: its two kinds of augmentation (``DatasetSpec``)."""

    def augmentation(self, mode: str) -> Augmentation: ...

    def supervised_augmentation(self) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Objective:
    name: str  # simclr, simsiam or supervised

    @property
    def supervised(self) -> bool:
        """Trains on labels (and so needs them on every client)."""
        return self.name == "supervised"

    def build(
        self, model: str, bits: int, channels: int, width: int, num_classes: int
    ) -> SSLModel | Classifier:
        """The objective's model around the ``model`` encoder, at ``bits``."""
        if self.supervised:
            return build_classifier(model, bits, channels, width, num_classes)
        return build_ssl_model(
            model, bits, channels, width, PROJECTION_DIM, predictor=self.name == "simsiam"
        )

    def augmentation(self, spec: HasAugmentations, mode: str) -> Augmentation:
        """SimCLR's views (``batched`` or ``per-image``) for SSL; a padded crop and flip for a
        classifier."""
        return spec.supervised_augmentation() if self.supervised else spec.augmentation(mode)

    def training_labels(self, data: ImageData) -> torch.Tensor | None:
        """What training reads besides the images: the labels, for a classifier only."""
        return data.labels if self.supervised else None

    def own_accuracy(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> float | None:
        """The model's own score on normalized ``images``: a classifier's accuracy; None for
        an SSL model, which is scored by a probe on its encoder."""
        return classifier_accuracy(model, images, labels) if self.supervised else None

    def own_loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> float | None:
        """The cross-entropy behind ``own_accuracy``: a classifier's; None for an SSL model."""
        return classifier_loss(model, images, labels) if self.supervised else None


OBJECTIVES = {name: Objective(name) for name in ("simclr", "simsiam", "supervised")}


def objective(name: str) -> Objective:
    """The objective an algorithm's row names (``Algorithm.objective``)."""
    return OBJECTIVES[name]
