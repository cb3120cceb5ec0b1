"""Low-bit self-supervised training: one step and one epoch, at any bitwidth.

A step at ``bits`` < 32: forward with ``bits``-bit weights and activations, backward, quantile-
quantize each quantized layer's weight gradient at ``bits + 2`` bits, optimizer step, and, for the
paper's ``grid`` update, put the weights back on the ``bits``-bit grid (w <- Q(w - lr * g_Q)).
With ``latent`` (DoReFa practice) the stored weights stay float32 and only the forward pass sees
them quantized. At 32 bits every quantizer is a no-op: plain full-precision training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from common.models import SSLModel
from common.quant import FULL_PRECISION, Rounding, project_weights_, quantize_weight_grads_
from common.ssl import TwoViews, nt_xent_loss, simsiam_loss


@dataclass(frozen=True)
class LowBitSettings:
    """How a client trains: its bitwidth, the weight-update rule and the gradient rounding."""

    bits: int = FULL_PRECISION
    weight_update: str = "grid"
    grad_rounding: Rounding = "stochastic"


def ssl_loss(
    model: SSLModel, view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """SimCLR's NT-Xent, or SimSiam's loss when the model has a predictor."""
    z1, p1 = model(view1)
    z2, p2 = model(view2)
    if p1 is not None and p2 is not None:
        return simsiam_loss(p1, p2, z1, z2)
    return nt_xent_loss(z1, z2, temperature)


def prepare_model(model: SSLModel, settings: LowBitSettings) -> None:
    """Put a model's stored weights on its grid before ``grid`` training (forward unchanged)."""
    if settings.weight_update == "grid":
        project_weights_(model, settings.bits, "deterministic")


def train_step(
    model: SSLModel,
    view1: torch.Tensor,
    view2: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    settings: LowBitSettings,
    temperature: float = 0.5,
    generator: torch.Generator | None = None,
) -> float:
    """One low-bit SSL step; returns the loss."""
    loss = ssl_loss(model, view1, view2, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    quantize_weight_grads_(model, settings.bits, settings.grad_rounding, generator)
    optimizer.step()
    if settings.weight_update == "grid":
        project_weights_(model, settings.bits, "stochastic", generator)
    return float(loss.detach())


def train_epoch(
    model: SSLModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    settings: LowBitSettings,
    temperature: float = 0.5,
    generator: torch.Generator | None = None,
) -> float:
    """One pass over ``batches`` of view pairs; returns the mean loss (nan if no batch)."""
    model.train()
    device = next(model.parameters()).device
    total, steps = 0.0, 0
    for view1, view2 in batches:
        if len(view1) < 2:  # BatchNorm and the contrastive loss need two samples
            continue
        total += train_step(
            model, view1.to(device), view2.to(device), optimizer, settings, temperature, generator
        )
        steps += 1
    return total / steps if steps else float("nan")


def fit_ssl(
    model: SSLModel,
    images: torch.Tensor,
    transform: torch.nn.Module,
    settings: LowBitSettings,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    temperature: float,
    seed: int,
) -> list[float]:
    """Train ``model`` on two augmented views of uint8 ``images`` for ``epochs``; loss per epoch.

    The one training loop of clients (local training) and server (de- and re-quantization).
    A fresh Adam optimizer is made per call, as each federated round starts from received weights.
    """
    torch.manual_seed(seed)  # torchvision's augmentations draw from the global generator
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        TwoViews(images, transform),
        batch_size=min(batch_size, len(images)),
        shuffle=True,
        drop_last=len(images) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    prepare_model(model, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=1e-6)
    return [
        train_epoch(model, loader, optimizer, settings, temperature, generator)
        for _ in range(epochs)
    ]
