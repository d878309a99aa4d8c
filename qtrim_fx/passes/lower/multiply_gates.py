"""MultiplyGatesPass: the gate products of a decomposed activation back to ``torch.mul`` for deployment.

``DecomposeGatesPass`` (prepare, integer-only targets) writes SiLU/HardSwish as ``gate_product(x, g)``,
which returns the activation's own value where the gate is unquantized (exact λ = 0). A lowered gate
is quantized, and the file computes ``Mul(x, DQ(Q(gate)))``; the lowered graph says so with a standard op::

    before:  y = call_function[gate_product](x, q_gate, "silu")
    after:   y = call_function[torch.mul](x, q_gate)              (node name and meta kept)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import gate_product

__all__ = ["MultiplyGatesPass"]


class MultiplyGatesPass(GraphPass):
    """Lowering: ``gate_product(x, gate, activation)`` to ``torch.mul(x, gate)``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is gate_product:
                node.target = torch.mul
                node.args = node.args[:2]
                node.kwargs = {}
                node.meta.pop("is_wrapped", None)  # see RestoreReluPass: a wrap mark would break re-tracing
                modified = True
        return finish(gm, modified)
