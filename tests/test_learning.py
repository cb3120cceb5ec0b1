"""Training must learn: the trained encoder beats its own initial weights on real data.

Every other test would still pass if SimCLR training stopped learning (a sign flip in the loss, a
gradient quantizer that zeroes updates, an optimizer on the wrong parameters). This one trains the
quickstart model on Fashion-MNIST for 100 steps and scores the encoder as the server scores the
global model (kNN monitor and linear probe on frozen features), against the untrained floor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.datasets import ImageData, load_dataset
from common.data.partition import stratified_sample
from common.learning.augment import NORMALIZATION, normalize_transform, ssl_augmentation
from common.learning.evaluation import knn_accuracy, linear_probe_accuracy
from common.learning.models import build_ssl_model, extract_features
from common.learning.training import LowBitSettings, Recipe, fit_local
from common.vocabulary import FULL_PRECISION

pytestmark = pytest.mark.slow

SEED = 0


def sample(data: ImageData, size: int, stream: int) -> ImageData:
    rng = np.random.default_rng([SEED, stream])
    return data.subset(stratified_sample(data.labels.numpy(), size / len(data), rng))


def scores(encoder: torch.nn.Module, labelled: ImageData, test: ImageData) -> dict[str, float]:
    normalize = normalize_transform(1, *NORMALIZATION["fashion-mnist"])
    features = (
        extract_features(encoder, normalize(labelled.images)),
        labelled.labels,
        extract_features(encoder, normalize(test.images)),
        test.labels,
    )
    return {
        "knn": knn_accuracy(*features),
        "probe": linear_probe_accuracy(*features, num_classes=10, seed=SEED),
    }


def test_simclr_training_beats_the_untrained_encoder_on_fashion_mnist():
    train, test = load_dataset("fashion-mnist", True), load_dataset("fashion-mnist", False)
    unlabelled, labelled, test = (
        sample(train, 3200, 0),
        sample(train, 500, 1),
        sample(test, 2000, 2),
    )
    torch.manual_seed(SEED)
    model = build_ssl_model("small_cnn", FULL_PRECISION, 1, 32, 128)
    before = scores(model.encoder, labelled, test)
    losses = fit_local(
        model,
        unlabelled.images,
        ssl_augmentation(28, 1, *NORMALIZATION["fashion-mnist"]),
        Recipe(LowBitSettings(FULL_PRECISION), 3e-3, 0.5, 128, epochs=4),  # 25 steps an epoch
        seed=SEED,
    ).losses
    after = scores(model.encoder, labelled, test)
    assert losses[-1] < losses[0] - 0.2, losses
    # measured at this seed: kNN 58.8% -> 65.3%. The 500-label probe has not moved yet at 100
    # steps (73.7% -> 73.4%; it needs a few hundred, docs/RESULTS.md), so it is reported, not
    # asserted: a probe on random conv features is already strong.
    assert after["knn"] >= before["knn"] + 0.04, (before, after)
    assert after["probe"] >= before["probe"] - 0.02, (before, after)
