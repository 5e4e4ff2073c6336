"""Built-in classifier architectures: a small CNN and an MLP for the 8x8 digits (and the same at 16x16 for the
digits x styles world), and the CIFAR variant of ResNet-18."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a two-layer head; about 0.15 M parameters at 8x8 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, image_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 2) ** 2, 128),
            nn.ReLU(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class DigitsMLP(nn.Module):
    """Two hidden layers on the flattened image, no convolution: the digits world's second judge, built to share
    as little with `DigitsCNN` as possible (an attack that fools one by exploiting its filters should not fool
    the other)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 256, image_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, width),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as used by the Sparse and SalUn papers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


# name -> (builder(num_classes, in_channels), default normalisation mean, std)
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], tuple[float, ...], tuple[float, ...]]] = {
    "digits_cnn": (lambda n, c: DigitsCNN(n, c), (0.3,), (0.4,)),
    "digits_mlp": (lambda n, c: DigitsMLP(n, c), (0.3,), (0.4,)),
    # the same at 16x16: the judges of the digits x styles world (unlearn.worlds.digits_canvas)
    "canvas_cnn": (lambda n, c: DigitsCNN(n, c, image_size=16), (0.3,), (0.4,)),
    "canvas_mlp": (lambda n, c: DigitsMLP(n, c, image_size=16), (0.3,), (0.4,)),
    "resnet18_cifar": (lambda n, c: ResNet18Cifar(n, c), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
