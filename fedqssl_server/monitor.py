"""How the server scores a global model: the kNN monitor each round, the final protocols after
the last, each beside the untrained floor. Free of Flower.

The global model always runs in full precision (the paper's protocol). Its encoder's features of
the labelled probe set (``probe-samples`` class-stratified train images) and of the uniform test
split are computed once per score, in eval mode. ``knn-accuracy`` is a cosine 20-nearest-
neighbour majority vote on them; ``global-probe-accuracy`` a 100-epoch linear probe (final
epoch, test data never used to pick anything). ``global-accuracy`` is that probe for
self-supervised algorithms and the model's own classifier for supervised ones. The loss each
round (``loss``) is the model's own objective on the test split, for Flower's History.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from common.algorithms import Algorithm
from common.config import ExperimentConfig
from common.learning.evaluation import (
    GLOBAL_PROBE_EPOCHS,
    classifier_loss,
    knn_accuracy,
    linear_probe_accuracy,
)
from common.learning.models import extract_features
from common.learning.objectives import objective
from common.learning.training import augmented_epochs, objective_loss
from common.runs.experiment import ServerData
from common.vocabulary import FULL_PRECISION

LOSS_IMAGES = 1024  # enough for a stable mean; a few forward passes a round


class GlobalMonitor:
    """Scores of global model states on the server's probe data."""

    def __init__(
        self,
        algorithm: Algorithm,
        data: ServerData,
        new_model: Callable[[int], torch.nn.Module],
        config: ExperimentConfig,
    ) -> None:
        self.objective = objective(algorithm.objective)
        self.data = data
        self.new_model = new_model
        self.seed = config.seed
        self.batch_size = config.batch_size
        self.temperature = config.temperature
        self.views = self.objective.augmentation(data.spec, config.augmentation)

    def model_of(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """A full-precision model holding ``state``."""
        model = self.new_model(FULL_PRECISION)
        model.load_state_dict(state)
        return model

    def _features(self, model: torch.nn.Module):
        train, test, normalize = (
            self.data.probe_train,
            self.data.probe_test,
            self.data.spec.normalize,
        )
        return (
            extract_features(model.encoder, normalize(train.images)),
            train.labels,
            extract_features(model.encoder, normalize(test.images)),
            test.labels,
        )

    @torch.no_grad()
    def loss(self, state: Mapping[str, torch.Tensor]) -> float:
        """What Flower's History calls the centralized loss: the global model's own training
        objective, in eval mode, on (at most ``LOSS_IMAGES`` of) the uniform test split: NT-Xent
        (SimSiam's loss) of two views drawn with the run's seed, or a classifier's
        cross-entropy, at the run's batch size (NT-Xent's negatives depend on it)."""
        model = self.model_of(state).eval()
        test = self.data.probe_test
        images, labels = test.images[:LOSS_IMAGES], test.labels[:LOSS_IMAGES]
        if self.objective.supervised:
            return classifier_loss(model, self.data.spec.normalize(images), labels)
        device = next(model.parameters()).device
        batches = augmented_epochs(images, self.views, 1, self.batch_size, self.seed, device)[0]
        losses = [float(objective_loss(model, *views, self.temperature)) for views in batches]
        return sum(losses) / len(losses) if losses else float("nan")

    def knn(self, state: Mapping[str, torch.Tensor]) -> float:
        """The round's monitor: the global encoder's kNN accuracy."""
        return knn_accuracy(*self._features(self.model_of(state)))

    def scores(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The final scores of one state: kNN, the SSL probe, and ``global-accuracy`` (the probe
        for SSL algorithms, the classifier for supervised ones)."""
        model = self.model_of(state)
        features = self._features(model)
        scores = {
            "knn-accuracy": knn_accuracy(*features),
            "global-probe-accuracy": linear_probe_accuracy(
                *features,
                self.data.spec.num_classes,
                FULL_PRECISION,
                epochs=GLOBAL_PROBE_EPOCHS,
                seed=self.seed,
            ),
        }
        own = self.objective.own_accuracy(
            model,
            self.data.spec.normalize(self.data.probe_test.images),
            self.data.probe_test.labels,
        )
        scores["global-accuracy"] = scores["global-probe-accuracy"] if own is None else own
        return scores
