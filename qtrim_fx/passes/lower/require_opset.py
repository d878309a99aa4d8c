"""RequireOpsetPass: refuse, before export, an op the target's opset cannot express.

Analysis only (no edits). The ONNX exporter writes ``scaled_dot_product_attention`` from opset 14
on; at an older opset it fails deep inside torch with ``UnsupportedOperatorError``. The ``npu``
profile exports at opset 13 (edge toolchains parse it), so every attention model hit that::

    graph with sdpa, profile.opset 13  ->  ProfileError naming the node, the opset it needs and
                                           ``opset=14`` (within the target's max_opset) as the fix

:func:`required_opset` gives the oldest opset a graph needs, so export can pick it (as it does for
INT4 weights) instead of refusing.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from qtrim_fx.core.errors import ProfileError
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.passes.base import GraphPass, PassResult

__all__ = ["RequireOpsetPass", "required_opset"]

#: call_function targets -> the oldest opset the ONNX exporter writes them at
_MIN_OPSET: dict[object, int] = {
    F.scaled_dot_product_attention: 14,
    torch._C._nn.scaled_dot_product_attention: 14,
    torch.ops.aten.scaled_dot_product_attention.default: 14,
}


def required_opset(gm: fx.GraphModule) -> tuple[int, fx.Node] | None:
    """The oldest opset that exports every op of ``gm``, and the node that needs it (None: any opset)."""
    need: tuple[int, fx.Node] | None = None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        opset = _MIN_OPSET.get(node.target)
        if opset is not None and (need is None or opset > need[0]):
            need = (opset, node)
    return need


class RequireOpsetPass(GraphPass):
    """Lowering check: every op of the graph can be exported at ``profile.opset``."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def call(self, gm: fx.GraphModule) -> PassResult:
        need = required_opset(gm)
        p = self.profile
        if need is not None and need[0] > p.opset:
            opset, node = need
            fix = (f"pass opset={opset} (target {p.name!r} takes up to {p.max_opset})" if opset <= p.max_opset
                   else f"target {p.name!r} stops at opset {p.max_opset}: use another target")
            raise ProfileError(
                f"target {p.name!r} exports at opset {p.opset}, but {node.name} "
                f"({getattr(node.target, '__name__', node.target)}) is written to ONNX from opset {opset} on; {fix}")
        return PassResult(gm, False)
