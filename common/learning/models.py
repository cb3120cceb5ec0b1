"""Feature extractors (CIFAR ResNet-18, a small CNN), SimCLR/SimSiam heads, classifiers, probes.

All convolutions and linear layers are quantized layers (``common.lowbit.layers``): one
``set_bitwidth`` call moves a whole model between bitwidths. The input image is never
activation-quantized (it is already 8-bit data, and signed after normalization); activations are
quantized after every nonlinearity of the backbone and the heads, where DoReFa's bounded [0, 1]
activation replaces ReLU.
The projection and prediction outputs stay unquantized because the losses normalize them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.lowbit.layers import QuantAct, QuantConv2d, QuantLinear, set_bitwidth
from common.lowbit.saved_codes import max_pool
from common.vocabulary import FULL_PRECISION
from common.vocabulary import MODEL_NAMES as MODEL_NAMES


class BasicBlock(nn.Module):
    """ResNet basic block; the stride goes to the first 3x3 conv and to the 1x1 shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = QuantConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = QuantAct()
        self.conv2 = QuantConv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = QuantAct()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                QuantConv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, spatial 32 -> 32 -> 16 -> 8 -> 4, 512 features."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            QuantConv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            QuantAct(),
        )
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)


class CodesMaxPool2d(nn.MaxPool2d):
    """Max-pool that saves a uint8 argmax per window for backward (``saved_codes.max_pool``).

    Its output stays marked as codes: the max of values on a grid is on the grid.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool(self, x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class SmallCNN(nn.Module):
    """Three conv blocks for 28x28 / 32x32 inputs on CPU: 28 -> 14 -> 7, ``width * 4`` features."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index, out_channels in enumerate((width, width * 2, width * 4)):
            layers += [
                QuantConv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                QuantAct(),
            ]
            if index < 2:
                layers.append(CodesMaxPool2d(2))
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-act-Linear: SimCLR's projection head and SimSiam's predictor."""
    return nn.Sequential(
        QuantLinear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        QuantAct(),
        QuantLinear(hidden_dim, out_dim),
    )


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda in_channels, width: ResNet18(in_channels),
    "small_cnn": lambda in_channels, width: SmallCNN(in_channels, width or 32),
}


def build_model(
    name: str, bitwidth: int = FULL_PRECISION, in_channels: int = 3, width: int | None = None
) -> nn.Module:
    """The feature extractor ``name`` at ``bitwidth``; it has a ``feature_dim`` attribute."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return set_bitwidth(_BACKBONES[name](in_channels, width), bitwidth)


class SSLModel(nn.Module):
    """Encoder + projection head (+ predictor for SimSiam). ``forward`` returns (z, p or None)."""

    def __init__(
        self,
        encoder: nn.Module,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        predictor: bool = False,
    ) -> None:
        super().__init__()
        feature_dim = int(encoder.feature_dim)
        hidden = hidden_dim or feature_dim
        self.encoder = encoder
        self.projector = mlp_head(feature_dim, hidden, projection_dim)
        self.predictor = (
            mlp_head(projection_dim, max(projection_dim // 2, 16), projection_dim)
            if predictor
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.projector(self.encoder(x))
        return z, (self.predictor(z) if self.predictor is not None else None)


def build_ssl_model(
    name: str,
    bitwidth: int = FULL_PRECISION,
    in_channels: int = 3,
    width: int | None = None,
    projection_dim: int = 128,
    predictor: bool = False,
) -> SSLModel:
    """Encoder ``name`` with a projection head (and a SimSiam predictor), all at ``bitwidth``."""
    encoder = build_model(name, bitwidth, in_channels, width)
    return set_bitwidth(SSLModel(encoder, projection_dim, predictor=predictor), bitwidth)


class Classifier(nn.Module):
    """Encoder + linear head, for the supervised baselines (FedAvg, FedProx, FedPAQ)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = QuantLinear(int(encoder.feature_dim), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_classifier(
    name: str,
    bitwidth: int = FULL_PRECISION,
    in_channels: int = 3,
    width: int | None = None,
    num_classes: int = 10,
) -> Classifier:
    """Encoder ``name`` with a linear classification head, all at ``bitwidth``."""
    encoder = build_model(name, bitwidth, in_channels, width)
    return set_bitwidth(Classifier(encoder, num_classes), bitwidth)


def linear_probe(feature_dim: int, num_classes: int, bitwidth: int = FULL_PRECISION) -> nn.Module:
    """A linear classifier on frozen features, at the client's bitwidth."""
    return set_bitwidth(QuantLinear(feature_dim, num_classes), bitwidth)


@torch.no_grad()
def extract_features(
    encoder: nn.Module, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Features of ``images`` (already normalized) from a frozen encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = [
        encoder(images[start : start + batch_size].to(device)).cpu()
        for start in range(0, len(images), batch_size)
    ]
    encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, int(encoder.feature_dim))
