"""RenormEmbeddingsPass: an embedding with ``max_norm`` looks up a table renormalized once, in full.

``nn.Embedding(max_norm=m)`` (and ``F.embedding(..., max_norm=m)``) rescales, *in place*, every row it looks
up whose norm exceeds ``m`` (``torch.embedding_renorm_``), then gathers. The exporters write the gather only,
so a file held the table as the last forward left it: rows never looked up kept their norm, and ORT's output
on new ids differed from torch's by 0.1-0.2 of the output scale with no error. Renormalizing is idempotent
(a renormed row is below ``m``), so torch's output for *any* ids equals a lookup in the table with every row
renormalized by the same kernel. Lowering (on its own deep copy; the user's model is untouched) does that and
drops ``max_norm``::

    before:  e = call_module[emb](ids)                   emb.max_norm = 1.0, emb.weight partly renormed
    after:   e = call_module[emb](ids)                   emb.max_norm = None, emb.weight: every row renormed

    before:  e = embedding(ids, w, max_norm=1.0)          w = get_attr[table]
    after:   e = embedding(ids, w, max_norm=None)         table: every row renormed

A functional call whose table is computed (not a parameter or buffer) is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.passes.base import GraphPass, PassResult, finish

__all__ = ["RenormEmbeddingsPass", "renorm_table_"]

_FUNCTIONAL = (F.embedding, torch.embedding)


def renorm_table_(table: torch.Tensor, max_norm: float, norm_type: float = 2.0) -> None:
    """Renormalize every row of ``table`` in place with torch's own kernel (rows above ``max_norm`` only)."""
    with torch.no_grad():
        ids = torch.arange(table.shape[0], device=table.device)
        torch.embedding_renorm_(table, ids, float(max_norm), float(norm_type))


class RenormEmbeddingsPass(GraphPass):
    """Lowering: embeddings with ``max_norm`` -> plain lookups in a fully renormalized table (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                m = gm.get_submodule(str(node.target))
                if isinstance(m, nn.Embedding) and m.max_norm is not None:
                    renorm_table_(m.weight.data, m.max_norm, m.norm_type)
                    m.max_norm = None
                    modified = True
            elif node.op == "call_function" and node.target in _FUNCTIONAL:
                modified |= _functional(gm, node)
        return finish(gm, modified)


def _functional(gm: fx.GraphModule, node: fx.Node) -> bool:
    # F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if node.target is not F.embedding:
        return False  # torch.embedding (the ATen form) takes no max_norm
    args = list(node.args)
    max_norm = args[3] if len(args) > 3 else node.kwargs.get("max_norm")
    norm_type = args[4] if len(args) > 4 else node.kwargs.get("norm_type", 2.0)
    weight = args[1] if len(args) > 1 else node.kwargs.get("weight")
    if max_norm is None or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return False
    if not isinstance(max_norm, (int, float)) or not isinstance(norm_type, (int, float)):
        return False
    renorm_table_(resolve_attr(gm, str(weight.target)).data, max_norm, norm_type)
    if len(args) > 3:
        args[3] = None
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "max_norm": None}
    return True
