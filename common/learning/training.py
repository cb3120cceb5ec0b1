"""Low-bit local training (the paper's Algorithm 1, lines 3-8): one step, one epoch and one call,
for every objective and bitwidth.

A step at ``bits`` < 32: forward with ``bits``-bit weights and activations, backward, quantile-
quantize each quantized layer's weight gradient at ``bits + 2`` bits, optimizer step, and, for the
paper's ``grid`` update, put the weights back on the ``bits``-bit grid (w <- Q(w - lr * g_Q)).
With ``latent`` (DoReFa practice) the stored weights stay float32 and only the forward pass sees
them quantized. At 32 bits every quantizer is a no-op: plain full-precision training.

The objective follows the model and the data: an ``SSLModel`` trains on two augmented views with
SimCLR's NT-Xent (SimSiam's loss if it has a predictor); a ``Classifier`` trains on one augmented
view and its label with cross-entropy. FedProx's proximal term is an option of the same step.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ExperimentConfig
from common.learning.augment import Labelled, TwoViews
from common.learning.batch_augment import BatchedTwoViews, BatchSSLAugmentation
from common.learning.losses import nt_xent_loss, simsiam_loss
from common.learning.models import Classifier, SSLModel
from common.lowbit.layers import project_weights_, quantize_weight_grads_
from common.lowbit.quantizers import Rounding, quantizing_once
from common.lowbit.saved_codes import saving_codes
from common.vocabulary import FULL_PRECISION

# Per-image torchvision transforms, or SimCLR's augmentations a batch at a time.
Augmentation = nn.Module | BatchSSLAugmentation


@dataclass(frozen=True)
class LowBitSettings:
    """How a client trains: its bitwidth, the weight-update rule and the gradient rounding.

    ``save_codes`` keeps what backward needs as low-bit codes (``common.lowbit.saved_codes``: the
    same numbers, less memory, one recomputed layer output each); off, autograd keeps float32
    tensors (the reference path, faster where memory is no object).
    """

    bits: int = FULL_PRECISION
    weight_update: str = "grid"
    grad_rounding: Rounding = "stochastic"
    save_codes: bool = True


@dataclass(frozen=True)
class Recipe:
    """How a model trains, in one object (``ExperimentConfig.recipe`` builds it from a config):
    its low-bit settings, Adam's learning rate, SimCLR's temperature, the batch size, the epochs
    of a ``fit_local`` call and FedProx's ``mu`` (0: no proximal term)."""

    settings: LowBitSettings
    learning_rate: float
    temperature: float = 0.5
    batch_size: int = 128
    epochs: int = 1
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class Proximal:
    """FedProx's term ``mu / 2 * ||w - anchor||^2`` over the trainable parameters."""

    mu: float
    anchor: Sequence[torch.Tensor]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The proximal term of ``model``'s current parameters."""
        squares = [
            (param - ref).pow(2).sum()
            for param, ref in zip(model.parameters(), self.anchor, strict=True)
        ]
        return self.mu / 2 * torch.stack(squares).sum()


def ssl_loss(
    model: SSLModel, view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """SimCLR's NT-Xent, or SimSiam's loss when the model has a predictor."""
    z1, p1 = model(view1)
    z2, p2 = model(view2)
    if p1 is not None and p2 is not None:
        return simsiam_loss(p1, p2, z1, z2)
    return nt_xent_loss(z1, z2, temperature)


def objective_loss(
    model: SSLModel | Classifier, first: torch.Tensor, second: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of (images, labels) for a classifier; the SSL loss of two views otherwise."""
    if isinstance(model, Classifier):
        return F.cross_entropy(model(first), second)
    return ssl_loss(model, first, second, temperature)


def prepare_model(model: nn.Module, settings: LowBitSettings) -> None:
    """Put a model's stored weights on its grid before ``grid`` training (forward unchanged)."""
    if settings.weight_update == "grid":
        project_weights_(model, settings.bits, "deterministic")


def train_step(
    model: SSLModel | Classifier,
    first: torch.Tensor,
    second: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    settings: LowBitSettings,
    temperature: float = 0.5,
    generator: torch.Generator | None = None,
    proximal: Proximal | None = None,
) -> float:
    """One low-bit step on a batch (two views, or images and labels); returns the loss."""
    with saving_codes() if settings.save_codes else contextlib.nullcontext(), quantizing_once():
        loss = objective_loss(model, first, second, temperature)
    if proximal is not None:
        loss = loss + proximal.penalty(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    quantize_weight_grads_(model, settings.bits, settings.grad_rounding, generator)
    optimizer.step()
    if settings.weight_update == "grid":
        project_weights_(model, settings.bits, "stochastic", generator)
    return float(loss.detach())


def train_epoch(
    model: SSLModel | Classifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    settings: LowBitSettings,
    temperature: float = 0.5,
    generator: torch.Generator | None = None,
    proximal: Proximal | None = None,
) -> tuple[float, int]:
    """One pass over ``batches``: (mean loss, nan if no step; optimizer steps taken). A batch of
    one sample is skipped (BatchNorm and the contrastive loss need two)."""
    model.train()
    device = next(model.parameters()).device
    total, steps = 0.0, 0
    for first, second in batches:
        if len(first) < 2:
            continue
        total += train_step(
            model,
            first.to(device),
            second.to(device),
            optimizer,
            settings,
            temperature,
            generator,
            proximal,
        )
        steps += 1
    return (total / steps if steps else float("nan")), steps


@dataclass(frozen=True)
class Trained:
    """What one training call did: each epoch's mean loss and the optimizer steps it took (the
    budget every round record states)."""

    losses: list[float]
    steps: int

    @property
    def last_loss(self) -> float:
        """The last epoch's mean loss (nan when no epoch ran)."""
        return self.losses[-1] if self.losses else float("nan")


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``images`` (``_loader``'s batches: the last partial batch
    dropped, one batch of all of them when they are fewer than ``batch_size``, none below 2)."""
    if images < 2:
        return 0
    return images // batch_size if images > batch_size else 1


def _loader(
    images: torch.Tensor,
    transform: Augmentation,
    batch_size: int,
    seed: int,
    labels: torch.Tensor | None,
    device: torch.device | None = None,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Two augmented views per image (one view and its label with ``labels``), seeded order.

    A ``BatchSSLAugmentation`` augments whole batches on ``device``; a torchvision transform
    augments image by image in a DataLoader, drawing from torch's global generator (seeded here).
    """
    if isinstance(transform, BatchSSLAugmentation):
        if labels is not None:
            raise ValueError("batched augmentation makes SSL views; labelled data is per-image")
        return BatchedTwoViews(images, transform, batch_size, seed, device)
    torch.manual_seed(seed)
    dataset = TwoViews(images, transform) if labels is None else Labelled(images, labels, transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=min(batch_size, len(images)),
        shuffle=True,
        drop_last=len(images) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


def augmented_epochs(
    images: torch.Tensor,
    transform: Augmentation,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | None = None,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches ``fit_local`` would draw with this seed, drawn once for many models to share.

    Training draws nothing else from the augmentations' generators, so ``fit_batches`` on these
    equals ``fit_local`` with the same seed (the server's de-quantization augments D_g once a
    round). Every view is on ``device`` when one is given, per-image (torchvision) views too.
    """
    loader = _loader(images, transform, batch_size, seed, None, device)
    if device is None or isinstance(transform, BatchSSLAugmentation):
        return [list(loader) for _ in range(epochs)]
    return [[(a.to(device), b.to(device)) for a, b in loader] for _ in range(epochs)]


def streamed_epochs(
    images: torch.Tensor,
    transform: Augmentation,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``augmented_epochs``'s batches, epoch after epoch, each made as it is drawn: for one
    model's long run of batches, whose views held at once would not fit (``buffer-only`` at
    CIFAR scale: every epoch of D_g on the GPU). A torchvision transform draws from torch's
    global generator, which training may draw from between batches, so its views are made
    ahead, as ``augmented_epochs`` makes them."""
    if not isinstance(transform, BatchSSLAugmentation):
        return itertools.chain.from_iterable(
            augmented_epochs(images, transform, epochs, batch_size, seed, device)
        )
    loader = _loader(images, transform, batch_size, seed, None, device)
    return (batch for _ in range(epochs) for batch in loader)


def fit_batches(
    model: SSLModel | Classifier,
    epochs: Sequence[Iterable[tuple[torch.Tensor, torch.Tensor]]],
    recipe: Recipe,
    seed: int,
) -> Trained:
    """Train ``model`` on each epoch's batches in turn: each epoch's mean loss, the steps taken.

    A fresh Adam optimizer is made per call, as each federated round starts from received
    weights. ``recipe.proximal_mu > 0`` adds FedProx's term around the weights the call started
    from.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = recipe.settings
    prepare_model(model, settings)
    proximal = None
    if recipe.proximal_mu > 0:
        proximal = Proximal(recipe.proximal_mu, [p.detach().clone() for p in model.parameters()])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate, weight_decay=1e-6)
    epoch_results = [
        train_epoch(model, batches, optimizer, settings, recipe.temperature, generator, proximal)
        for batches in epochs
    ]
    return Trained([loss for loss, _ in epoch_results], sum(steps for _, steps in epoch_results))


def fit_local(
    model: SSLModel | Classifier,
    images: torch.Tensor,
    transform: Augmentation,
    recipe: Recipe,
    seed: int,
    labels: torch.Tensor | None = None,
) -> Trained:
    """Train ``model`` in place: the one training loop of clients (local training, Algorithm 1
    lines 3-8) and server (de- and re-quantization), for every algorithm.

    Two augmented views per image for an SSL model, one view and its label for a classifier.
    Batches are augmented as they are drawn (``augmented_epochs`` draws the same ones ahead, to
    share them among the server's fine-tunes).

    Args:
        model: an ``SSLModel`` or ``Classifier`` at its bitwidth (``set_bitwidth``).
        images: uint8 images (N, C, H, W).
        transform: the augmentation of the objective (two views, or one).
        recipe: epochs, batch size, optimizer and the low-bit settings.
        seed: seeds the batch order and the augmentation (and stochastic rounding).
        labels: the class of each image, for a classifier only.

    Returns:
        ``Trained``: each epoch's mean loss, the last one, and the optimizer steps taken.

    Raises:
        ValueError: labels given to an SSL model, or none to a classifier.
    """
    if isinstance(model, Classifier) != (labels is not None):
        raise ValueError("a Classifier trains on labels, an SSL model without: pass labels iff")
    device = next(model.parameters()).device
    loader = _loader(images, transform, recipe.batch_size, seed, labels, device)
    return fit_batches(model, [loader] * recipe.epochs, recipe, seed)


def low_bit_settings(config: ExperimentConfig, bits: int) -> LowBitSettings:
    """How a model trains at ``bits`` under ``config`` (client training, server fine-tunes)."""
    return LowBitSettings(bits, config.weight_update, config.grad_rounding, config.save_codes)


def recipe(config: ExperimentConfig, bits: int, proximal: bool = False) -> Recipe:
    """How a model trains at ``bits`` under ``config``: a client's local training
    (``proximal``: with FedProx's term), or a server fine-tune (its epochs are its views')."""
    return Recipe(
        low_bit_settings(config, bits),
        config.learning_rate,
        config.temperature,
        config.batch_size,
        config.local_epochs,
        config.proximal_mu if proximal else 0.0,
    )
