"""MultiplyGatesPass: the gate products of a decomposed activation back to ``torch.mul`` for deployment.

``DecomposeGatesPass`` (prepare, integer-only targets) writes SiLU/HardSwish as ``gate_product(x, g)``,
which returns the activation's own value where the gate is unquantized (exact λ = 0). A lowered gate
is quantized, and the file computes ``Mul(x, DQ(Q(gate)))``; the lowered graph says so with a standard op::

    before:  y = call_function[gate_product](x, q_gate, "silu")
    after:   y = call_function[torch.mul](x, q_gate)              (node name and meta kept)

GELU decomposed by ``DecomposeGeluPass`` ends the same way: ``gelu_product(q_m, x, "none")`` returns
``F.gelu(x)`` where ``q_m`` is the float product; lowered, it is ``torch.mul(q_m, 0.5)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import gate_product, gelu_product

__all__ = ["MultiplyGatesPass"]


class MultiplyGatesPass(GraphPass):
    """Lowering: ``gate_product(x, gate, activation)`` to ``torch.mul(x, gate)``, ``gelu_product(m, x, a)`` to
    ``torch.mul(m, 0.5)``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (gate_product, gelu_product):
                node.args = node.args[:2] if node.target is gate_product else (node.args[0], 0.5)
                node.target = torch.mul
                node.kwargs = {}
                node.meta.pop("is_wrapped", None)  # see RestoreReluPass: a wrap mark would break re-tracing
                modified = True
        return finish(gm, modified)
