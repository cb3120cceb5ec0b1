"""The server's view of the global model (fedqssl_server.monitor): the losses Flower gets are
losses, computed as the objective says."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import FakeProxy
from flwr.common import Code, EvaluateRes, Status
from helpers import federate, tiny_config

from common.learning.training import augmented_epochs, objective_loss
from fedqssl_server.monitor import LOSS_IMAGES


@pytest.mark.parametrize("algorithm", ["fedsimclr", "fedavg"])
def test_flower_gets_losses_not_one_minus_an_accuracy(tmp_path, algorithm):
    """The server's centralized loss is the global model's own objective on the test split
    (NT-Xent of seeded views, or a classifier's cross-entropy), recorded as ``global-loss``; a
    client's is the cross-entropy of the model its local accuracy scores; Flower's distributed
    loss is their mean weighted by test examples."""
    config = tiny_config(tmp_path, algorithm)
    strategy, clients = federate(config)
    monitor = strategy.monitor
    loss, _ = strategy.evaluate(0, None)
    assert loss == monitor.loss(strategy.global_state)  # deterministic: the run's seed
    model = monitor.model_of(strategy.global_state).eval()
    test = monitor.data.probe_test
    images, labels = test.images[:LOSS_IMAGES], test.labels[:LOSS_IMAGES]
    with torch.no_grad():
        if algorithm == "fedavg":
            logits = model(monitor.data.spec.normalize(images))
            expected = float(torch.nn.functional.cross_entropy(logits, labels))
        else:
            views = monitor.views
            batches = augmented_epochs(images, views, 1, config.batch_size, config.seed)[0]
            losses = [float(objective_loss(model, a, b, config.temperature)) for a, b in batches]
            expected = float(np.mean(losses))
    assert loss == pytest.approx(expected, rel=1e-5)
    knn = json.loads(Path(config.output_dir, "rounds.jsonl").read_text().splitlines()[-1])
    assert knn["global-loss"] > 0 and abs(knn["global-loss"] - (1 - knn["knn-accuracy"])) > 1e-6

    replies = []
    for cid, client in clients.items():
        client_loss, examples, metrics = client.evaluate(strategy.downlink[client.bits], {})
        assert client_loss == metrics["local-loss"] > 0
        assert client_loss != pytest.approx(1 - metrics["local-accuracy"])
        reply = EvaluateRes(Status(Code.OK, ""), client_loss, examples, metrics)
        replies.append((FakeProxy(cid), reply))
    distributed, _ = strategy.aggregate_evaluate(config.num_rounds, replies, [])
    counts = [r.num_examples for _, r in replies]
    losses = [r.loss for _, r in replies]
    assert distributed == pytest.approx(np.average(losses, weights=counts))
