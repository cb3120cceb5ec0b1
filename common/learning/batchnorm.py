"""BatchNorm statistics re-estimated on a data set, with no gradient step (``bn-recalibrate``).

Why: a low-bit client gathers its BatchNorm running statistics under its own clamp(0, 1) s-bit
activations, while the global model runs them at 32 bits under ReLU, and averaging statistics of
clients with different data gives statistics of none of them. A forward pass over the server's
buffer D_g replaces them with the statistics the model itself produces there; its weights, and
BatchNorm's own affine parameters, stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int) -> int:
    """Replace every BatchNorm's running mean and variance by their average over ``images``
    (normalized float32), in batches of ``batch_size`` (the last partial one dropped when there
    is a full one, as in training); returns the batches seen (0: nothing changed)."""
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    size = min(batch_size, len(images))
    if not norms or size < 2:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every batch counts the same
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    batches = len(images) // size
    with torch.no_grad():
        for index in range(batches):
            model(images[index * size : (index + 1) * size].to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)
    return batches
