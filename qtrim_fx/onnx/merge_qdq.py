"""Merge duplicate Q/DQ on one tensor and drop re-quantization that cannot change anything.

Two sites on the same tensor with identical parameters (by value, not by initializer)::

    x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> a
    x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> b
      =>  x -> QuantizeLinear -> DequantizeLinear -> a, b

A Q right after a DQ with the same parameters reproduces the DQ's input codes exactly
(``round(((q - z) * s) / s) + z == q``), so back-to-back sites collapse::

    x -> Q(s, z) -> DQ(s, z) -> Q(s, z) -> DQ(s, z) -> y   =>   x -> Q -> DQ -> y

Parameters that differ (scale, zero point or its dtype, axis, other attributes) are kept.
"""

from __future__ import annotations

import onnx_ir as ir

from qtrim_fx.onnx._graph import QDQParams, is_op, qdq_params

__all__ = ["MergeDuplicateQDQPass"]


class MergeDuplicateQDQPass(ir.passes.InPlacePass):
    """Merge sibling Q (or DQ) nodes with equal parameters; remove DQ -> Q with equal parameters."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        while True:
            changed = _drop_requantize(graph)
            changed |= _merge_siblings(graph, "QuantizeLinear")
            changed |= _merge_siblings(graph, "DequantizeLinear")
            if not changed:
                return ir.passes.PassResult(model, modified)
            modified = True


def _equivalent(a: ir.Node, b: ir.Node) -> bool:
    if tuple(a.inputs[1:]) == tuple(b.inputs[1:]) and _attrs(a) == _attrs(b):
        return True
    pa, pb = qdq_params(a), qdq_params(b)
    return pa is not None and pb is not None and pa.same_as(pb)


def _attrs(node: ir.Node) -> dict[str, object]:
    return {k: a.value for k, a in node.attributes.items()}


def _merge_siblings(graph: ir.Graph, op_type: str) -> bool:
    order = {node: i for i, node in enumerate(graph)}
    changed = False
    for node in list(graph):
        if node not in order or not is_op(node, op_type) or node.inputs[0] is None:
            continue
        for other in _later_siblings(node, op_type, order):
            if other.outputs[0].is_graph_output() or not _equivalent(node, other):
                continue
            other.outputs[0].replace_all_uses_with(node.outputs[0])
            graph.remove(other, safe=True)
            del order[other]
            changed = True
    return changed


def _later_siblings(node: ir.Node, op_type: str, order: dict[ir.Node, int]) -> list[ir.Node]:
    x = node.inputs[0]
    assert x is not None
    mine = order[node]
    found = {user for user, idx in x.uses() if idx == 0 and is_op(user, op_type)}
    return sorted((u for u in found if u in order and order[u] > mine), key=order.__getitem__)


def _drop_requantize(graph: ir.Graph) -> bool:
    changed = False
    for q in list(graph):
        if not is_op(q, "QuantizeLinear") or q.outputs[0].is_graph_output() or q.inputs[0] is None:
            continue
        dq = q.inputs[0].producer()
        if not is_op(dq, "DequantizeLinear") or not _same_grid(dq, q):  # type: ignore[arg-type]
            continue
        q.outputs[0].replace_all_uses_with(dq.inputs[0])  # type: ignore[union-attr, arg-type]
        graph.remove(q, safe=True)
        changed = True
    return changed


def _same_grid(dq: ir.Node, q: ir.Node) -> bool:
    if not _equivalent(dq, q):
        return False
    params: QDQParams | None = qdq_params(q)
    codes = dq.inputs[0]
    # The DQ's input must be in the Q's output type, or the replacement changes the dtype.
    return params is not None and codes is not None and params.storage is not None and (
        codes.dtype is None or codes.dtype == params.storage.ir_dtype)
