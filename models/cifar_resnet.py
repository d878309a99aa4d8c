"""CIFAR-style ResNet-18: 3x3 stride-1 stem, no max pooling, BasicBlocks [2, 2, 2, 2].

Stages have ``width, 2*width, 4*width, 8*width`` channels (``width=64`` is the usual CIFAR
ResNet-18 with 11.2 M parameters; ``width=16`` has 0.7 M and trains on a CPU). Downsampling
blocks use a 1x1 stride-2 conv + BN shortcut.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet18"]


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus identity (or 1x1 conv-bn) shortcut, then relu.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv and of the shortcut.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (32x32): stem conv3x3 stride 1, four stages, global pool, linear.

    Args:
        num_blocks: BasicBlocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        width: base channels (stage 1); later stages double it.
        num_classes: output logits.
        in_channels: input image channels.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for s in strides:
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet18(width: int = 64, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build a CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2]).

    Args:
        width: base channels (64 is the standard model, 16 is CPU-friendly).
        num_classes: output logits.
        in_channels: input image channels.

    Returns:
        The model (random init, train mode).
    """
    return CifarResNet((2, 2, 2, 2), width=width, num_classes=num_classes, in_channels=in_channels)
