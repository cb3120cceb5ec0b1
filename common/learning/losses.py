"""Self-supervised objectives: NT-Xent for SimCLR (the paper's contrastive local objective
L_CL,k, with cosine similarity and temperature tau) and SimSiam's negative cosine (its
L_siam,k)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE) loss for two views; row i of ``z1`` and ``z2`` is a positive pair.

    Each of the 2N embeddings is classified against the other 2N - 1 by cosine similarity over
    ``temperature``; the loss is the mean cross-entropy of picking its positive.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"views must be matching (N, D) tensors, got {z1.shape} and {z2.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.arange(2 * n, device=z.device).roll(n)  # i's positive: i + n mod 2n
    return F.cross_entropy(logits, targets)


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """SimSiam: symmetric negative cosine between predictions and stop-gradient projections."""
    return (
        -(
            F.cosine_similarity(p1, z2.detach(), dim=1).mean()
            + F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        )
        / 2
    )
