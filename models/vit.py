"""A small Vision Transformer whose attention comes in the three forms the passes must handle.

``attention="manual"`` (default) writes attention out by hand, the form most research code uses::

    q, k, v = self.q(x), self.k(x), self.v(x)          # separate nn.Linear projections
    attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
    out = self.proj(attn @ v)

``attention="sdpa"`` calls ``F.scaled_dot_product_attention(q, k, v)`` on the same projections, and
``attention="mha"`` uses ``nn.MultiheadAttention`` (a leaf module under ``symbolic_trace``, with its
projections packed in ``in_proj_weight``). Shapes never go through Python ints taken from tensors, so
every variant traces with ``torch.fx.symbolic_trace`` and exports with a dynamic batch dimension.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "AttentionImpl", "SelfAttention", "TransformerBlock", "VisionTransformer"]

AttentionImpl = Literal["manual", "sdpa", "mha"]
_IMPLS = ("manual", "sdpa", "mha")


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``(batch, tokens, dim)`` in one of three implementations.

    Args:
        dim: embedding size.
        num_heads: heads; must divide ``dim``.
        impl: ``"manual"`` (q @ k^T * scale, softmax, @ v), ``"sdpa"`` (F.scaled_dot_product_attention)
            or ``"mha"`` (nn.MultiheadAttention, batch_first).
    """

    def __init__(self, dim: int, num_heads: int, impl: AttentionImpl = "manual") -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {_IMPLS}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; pick a divisor")
        self.impl = impl
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        if impl == "mha":
            self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (B, H, N, Dh) without reading sizes into Python, so tracing stays symbolic.
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = q @ k.transpose(-2, -1) * self.scale
            attn = attn.softmax(dim=-1)
            out = attn @ v
        return self.proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: input and output size.
        hidden: hidden size.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    Args:
        dim: embedding size.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``dim``.
        attention: attention implementation, see :class:`SelfAttention`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, attention: AttentionImpl = "manual"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Small ViT: conv patch embedding, cls token, learned positional embedding, pre-norm blocks, head.

    Args:
        image_size: input height and width (square).
        patch_size: patch side; must divide ``image_size``.
        in_channels: input channels.
        num_classes: output logits.
        dim: embedding size.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``dim``.
        attention: ``"manual"``, ``"sdpa"`` or ``"mha"`` (see :class:`SelfAttention`).
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        attention: AttentionImpl = "manual",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, num_heads, mlp_ratio, attention) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
