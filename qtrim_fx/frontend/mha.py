"""``nn.MultiheadAttention`` as traceable math (the reference path of ``F.multi_head_attention_forward``).

torch.fx keeps ``nn.MultiheadAttention`` as one opaque ``call_module`` node, so
its projections could not carry weight or activation sites. The capture tracer
runs :func:`traceable_mha_forward` instead of the module's forward: the same op
sequence as PyTorch's reference (non-fused) path, producing ``F.linear`` nodes
for the in/out projections (weights read from the module's own parameters,
so names and ``state_dict`` are unchanged) and one
``F.scaled_dot_product_attention`` (or the explicit softmax path when
``need_weights=True``). Results equal the reference path bit for bit; the fused
inference fast path (no grad, eval) differs from it by float rounding (~1e-7).

Supported: packed or separate projection weights, ``batch_first`` either way,
``attn_mask`` / ``key_padding_mask`` (bool or float), ``is_causal``, dropout.
Modules with ``bias_k``/``bias_v`` or ``add_zero_attn``, subclasses that override ``forward`` and
modules with forward hooks stay leaves (running this function instead would drop what they add).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["mha_supported", "traceable_mha_forward"]


def mha_supported(m: nn.MultiheadAttention) -> bool:
    """Whether :func:`traceable_mha_forward` computes exactly what ``m`` does when called."""
    return (m.bias_k is None and m.bias_v is None and not m.add_zero_attn
            and type(m).forward is nn.MultiheadAttention.forward
            and not m._forward_hooks and not m._forward_pre_hooks)


@torch.fx.wrap
def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bool masks -> additive float masks (-inf where True), as ``F._canonical_mask``."""
    if torch.is_floating_point(mask):
        return mask
    return torch.zeros_like(mask, dtype=like.dtype).masked_fill_(mask, float("-inf"))


@torch.fx.wrap
def _merge_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, bsz: int, num_heads: int
) -> torch.Tensor | None:
    """(L, S) / (B·H, L, S) attention mask + (B, S) padding mask -> one (B·H | 1, L, S) mask."""
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if key_padding_mask is None:
        return attn_mask
    src_len = key_padding_mask.shape[-1]
    kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
    kpm = kpm.reshape(bsz * num_heads, 1, src_len)
    return kpm if attn_mask is None else attn_mask + kpm


@torch.fx.wrap
def _sdpa_mask(mask: torch.Tensor, bsz: int, num_heads: int, src_len: int) -> torch.Tensor:
    if mask.size(0) == 1 and mask.dim() == 3:
        return mask.unsqueeze(0)
    return mask.view(bsz, num_heads, -1, src_len)


def _in_projection(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, same: bool) -> tuple:
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        if same:
            proj = F.linear(query, m.in_proj_weight, m.in_proj_bias)
            proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        b = m.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b = m.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def traceable_mha_forward(
    m: nn.MultiheadAttention,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, Any]:
    """Same signature and results as ``nn.MultiheadAttention.forward`` (reference path)."""
    same = query is key and key is value
    if m.batch_first:
        if same:
            query = key = value = query.transpose(1, 0)
        else:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    tgt_len, bsz, embed_dim = query.shape
    num_heads, head_dim = m.num_heads, m.head_dim
    # Masks are None or not when traced: only real masks go through the (leaf) mask helpers, so the
    # graph has no mask ops, and no ``mask is not None`` test on a proxy, when the call has none.
    if key_padding_mask is not None:
        key_padding_mask = _float_mask(key_padding_mask, query)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        if attn_mask is not None:
            attn_mask = _float_mask(attn_mask, query)
        if key_padding_mask is not None:
            is_causal = False
    q, k, v = _in_projection(m, query, key, value, same)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    mask = None
    if attn_mask is not None or key_padding_mask is not None:
        mask = _merge_masks(attn_mask, key_padding_mask, bsz, num_heads)
    dropout_p = m.dropout if m.training else 0.0  # capture turns this into a runtime mode_select
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if mask is not None:
            weights = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if m.dropout > 0.0:  # same op in both modes, so the trace differs by the flag only
            weights = F.dropout(weights, p=m.dropout, training=m.training)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if mask is not None:
            mask = _sdpa_mask(mask, bsz, num_heads, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = None
    if m.batch_first:
        out = out.transpose(1, 0)
    return out, weights
