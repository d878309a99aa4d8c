"""SafeSoftmaxPass: ``_safe_softmax`` of a quantized tensor is a plain ``softmax``.

``DecomposeAttentionPass`` writes a bool-masked or causal attention with torch's ``aten._safe_softmax`` (0 on a
row whose every entry is ``-inf``, where ``softmax`` gives NaN), so that the prepared model at λ = 0 is torch's
attention. Neither exporter writes ``_safe_softmax`` as one op (TorchScript: "not supported"; dynamo: Softmax plus
an Equal / ReduceMin / Where test in float). Its input on an integer-only target is a quantize-dequantize:
finite, so no row is all ``-inf`` and the two functions agree bit for bit. Lowering writes those as ``softmax``::

    before:  sq = quant_dequant(s, ...);  p = aten._safe_softmax(sq, -1)
    after:   sq = quant_dequant(s, ...);  p = torch.softmax(sq, -1)

A ``_safe_softmax`` of a float tensor (its site excluded by the user) is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.qdq import is_quant_dequant

__all__ = ["SafeSoftmaxPass"]

_SAFE = torch.ops.aten._safe_softmax.default


class SafeSoftmaxPass(GraphPass):
    """Lowering: ``_safe_softmax(quant_dequant(...))`` -> ``softmax`` (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not _SAFE or not node.args:
                continue
            x = node.args[0]
            if not (isinstance(x, fx.Node) and x.op == "call_function" and is_quant_dequant(x.target)):
                continue
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
            node.target = torch.softmax
            node.args, node.kwargs = (x, dim), ({} if dtype is None else {"dtype": dtype})
            modified = True
        return finish(gm, modified)
