"""MobileNetV2-style network: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear project),
ReLU6 and BN, with a width multiplier.

Differences from torchvision's ``mobilenet_v2`` (to keep it small and useful at 32x32):
``width_mult`` defaults to 0.35, the last 1x1 conv is scaled by ``width_mult`` too (torchvision keeps
it at 1280), and ``stem_stride`` (default 1) replaces the stride-2 stem so 32x32 inputs are not
reduced to 1x1 too early.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2", "make_divisible"]

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
DEFAULT_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going down by more than 10 %.

    Args:
        v: channel count before rounding.
        divisor: required multiple.

    Returns:
        The rounded channel count (at least ``divisor``).
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise -> 1x1 project (linear, no activation) [+ identity].

    Args:
        inp: input channels.
        oup: output channels.
        stride: depthwise stride (1 or 2).
        expand_ratio: hidden channels = ``round(inp * expand_ratio)``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier.

    Args:
        num_classes: output logits.
        in_channels: input image channels.
        width_mult: channel multiplier for every layer (0.35 by default: about 0.3 M parameters at 10
            classes).
        stem_stride: stride of the first 3x3 conv (1 for 32x32 inputs, 2 for ImageNet-size inputs).
        settings: ``(t, c, n, s)`` rows; defaults to the paper's.
        dropout: dropout before the classifier (0 keeps eval and train outputs identical).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 0.35,
        stem_stride: int = 1,
        settings: tuple[tuple[int, int, int, int], ...] = DEFAULT_SETTINGS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult)
        last_channel = make_divisible(1280 * width_mult)
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, input_channel, 3, stem_stride)]
        for t, c, n, s in settings:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(_conv_bn_relu6(input_channel, last_channel, 1, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
