"""AttentionRank4Pass: 3-D ``scaled_dot_product_attention`` as the 4-D form every exporter writes.

``F.scaled_dot_product_attention`` takes ``(N, L, E)`` queries as well as ``(N, H, L, E)``; the dynamo
exporter's translation takes only the 4-D form (``AssertionError: only 4D query, key, and value are
supported``), so a model whose attention has no head axis could not be exported from the ``torch.export``
front end. The lowered graph gives the call a head axis of 1, which computes the same attention::

    before:  y = sdpa(q, k, v, attn_mask=m)                        q, k, v: (N, L, E), m: (L, S) or (N, L, S)
    after:   y = squeeze(sdpa(unsqueeze(q, 1), unsqueeze(k, 1), unsqueeze(v, 1),
                              attn_mask=m or unsqueeze(m, 1)), 1)     (a 3-D mask gets the head axis too)

Only calls whose query rank is known to be 3 (``torch.export``'s ``meta["val"]``, or the ranks ``prepare``
records) are rewritten; others are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.ranks import RANK, rank
from qtrim_fx.runtime.qdq import is_quant_dequant

__all__ = ["AttentionRank4Pass"]

_ATEN_SDPA = torch.ops.aten.scaled_dot_product_attention.default


class AttentionRank4Pass(GraphPass):
    """Lowering: 3-D query/key/value attention calls get a head axis of 1 (the exporters' 4-D form)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (_ATEN_SDPA, F.scaled_dot_product_attention):
                continue
            qkv = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
            if any(_rank(t) != 3 for t in qkv):
                continue
            mask = _arg(node, 3, "attn_mask")
            mask_rank = _rank(mask) if isinstance(mask, fx.Node) else None
            if isinstance(mask, fx.Node) and mask_rank is None:
                continue  # a mask of unknown rank may broadcast differently against 4-D scores: leave the call
            aten = node.target is _ATEN_SDPA
            unsqueeze = torch.ops.aten.unsqueeze.default if aten else torch.unsqueeze
            squeeze = torch.ops.aten.squeeze.dim if aten else torch.squeeze
            args, kwargs = list(node.args), dict(node.kwargs)
            lifted = [(i, name, t) for i, (name, t) in enumerate(zip(("query", "key", "value"), qkv, strict=True))]
            if mask_rank == 3:
                lifted.append((3, "attn_mask", mask))
            for i, name, t in lifted:
                with graph.inserting_before(node):
                    new = graph.call_function(unsqueeze, (t, 1))
                new.meta[RANK] = 4
                if i < len(args):
                    args[i] = new
                else:
                    kwargs[name] = new
            node.args, node.kwargs = tuple(args), kwargs
            with graph.inserting_after(node):
                out = graph.call_function(squeeze, (node, 1))
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            out.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", RANK)})
            for k in ("val", "tensor_meta"):
                node.meta.pop(k, None)
            node.meta[RANK] = 4
            modified = True
        return finish(gm, modified)


def _rank(n: Any) -> int | None:
    """:func:`rank`, looking through the ``quant_dequant`` nodes lowering adds (they keep their input's shape)."""
    while isinstance(n, fx.Node) and rank(n) is None and n.op == "call_function" and is_quant_dequant(n.target):
        n = n.args[0]
    return rank(n)


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)
