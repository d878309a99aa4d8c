"""Tiny test models: small enough to build, trace, export and run in milliseconds.

Each one exercises a graph pattern the passes must handle:

- :class:`TinyConvNet`: conv-bn-relu twice, a residual ``add``, a channel ``cat``,
  global pooling and a linear head.
- :class:`TinyMLP`: linear-relu stack (flattens its input).
- :class:`AttentionBlock`: one pre-norm transformer block with hand-written attention.
- :class:`ConvTransposeNet`: conv, ``ConvTranspose2d`` (per-channel weight axis 1 in ONNX) and BN.
"""

from __future__ import annotations

import torch
from torch import nn

from .vit import MLP, SelfAttention

__all__ = ["AttentionBlock", "ConvTransposeNet", "TinyConvNet", "TinyMLP"]


class TinyConvNet(nn.Module):
    """conv-bn-relu x2 with a residual add, a concat, global average pooling and a linear head.

    Graph: ``x -> c1 -> a = relu(bn1(c1)) -> b = relu(bn2(conv2(a))) + a -> cat([b, a]) -> pool -> fc``.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: channels of both convolutions.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a))) + a
        y = torch.cat([b, a], dim=1)
        return self.fc(torch.flatten(self.pool(y), 1))


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on flattened inputs.

    Args:
        in_features: flattened input size.
        hidden: hidden width.
        num_classes: output logits.
    """

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class AttentionBlock(nn.Module):
    """One pre-norm transformer block with hand-written multi-head self-attention.

    ``x + attn(ln1(x))`` then ``+ mlp(ln2(x))``; attention is ``softmax(q @ k^T * scale) @ v`` with
    separate q/k/v ``nn.Linear`` projections. Input and output are ``(batch, tokens, dim)``.

    Args:
        dim: embedding size.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden size as a multiple of ``dim``.
    """

    def __init__(self, dim: int = 32, num_heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, impl="manual")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvTransposeNet(nn.Module):
    """Conv (stride 2) -> BN -> ReLU -> ConvTranspose2d (stride 2) -> BN -> ReLU -> 1x1 conv.

    The output has the input's spatial size, ``out_channels`` channels (a tiny decoder).

    Args:
        in_channels: input image channels.
        width: hidden channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int = 3, width: int = 8, out_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.deconv = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv(x)))
        x = self.relu2(self.bn2(self.deconv(x)))
        return self.head(x)
