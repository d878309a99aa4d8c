"""QuantizeGatherTablePass: an embedding lookup's Q/DQ moves onto the table (same values, integer table).

A per-tensor Q/DQ is elementwise and ``Gather`` only selects elements, so quantizing the gathered
rows equals gathering rows of the quantized table, bit for bit::

    Gather(W, ids) -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> y
      =>  DequantizeLinear(W_q, s, z) -> Gather(·, ids) -> y      W_q = saturate(round(W / s) + z), stored

Why: OpenVINO 2026.4 cannot compile an ``Add`` of two dequantized lookups (token + position
embedding, the position ids computed from shapes alone): ``[AddTransformation] ... Check 'index <
m_inputs.size()' failed``, for BERT, DistilBERT and GPT-2 files. With the Q/DQ on the tables it reads a
compressed weight (its usual int8 embedding form) and compiles; the file also stores the table in 8
bits. The pass runs for profiles with ``quantize_gather_tables`` (``openvino``): on ONNX Runtime a
DequantizeLinear of a large table would run on every inference.

Integer-only profiles (``integer_only``: ``qnn``, ``npu``) get the table's DQ and keep the lookup's
Q/DQ (re-quantizing codes that are already on the grid: the same values)::

    Gather(W, ids) -> Q(s, z) -> DQ(s, z)  =>  DequantizeLinear(W_q, s, z) -> Gather(·, ids) -> Q(s, z) -> DQ(s, z)

Why: the QNN HTP (QNN SDK 2.51, default options) cannot finalize a Gather of a float table
(``QNN_COMMON_ERROR_MEM_ALLOC ... Code: 1002`` for every BERT/DistilBERT/GPT-2 file; it loads with
``soc_model=60``, in FLOAT_32); ``DQ -> Gather -> Q`` is a uint8 lookup it runs on every SoC.

Only a ``Gather`` of a float initializer whose output feeds nothing but per-tensor
QuantizeLinear nodes, each read only by DequantizeLinear nodes with the same parameters, is
rewritten; the original table stays when something else reads it (tied embeddings).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, is_op, qdq_params

__all__ = ["QuantizeGatherTablePass", "quantize_linear"]


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear (per tensor): ``saturate(round_half_even(x / scale) + zero_point)`` in float32."""
    info = np.iinfo(zero_point.dtype)
    codes = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(codes, info.min, info.max).astype(zero_point.dtype)


class QuantizeGatherTablePass(ir.passes.InPlacePass):
    """``Gather(W) -> Q -> DQ`` => ``DQ(W_q) -> Gather`` (``quantize_gather_tables``) or ``DQ(W_q) -> Gather -> Q ->
    DQ`` (``integer_only``)."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not (self.profile.quantize_gather_tables or self.profile.integer_only):
            return ir.passes.PassResult(model, False)
        keep_qdq = not self.profile.quantize_gather_tables
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            if is_op(node, "Gather") and node.graph is graph:
                modified |= _rewrite(graph, node, names, keep_qdq)
        return ir.passes.PassResult(model, modified)


def _matching_qdq(gather: ir.Node) -> tuple[list[ir.Node], list[ir.Node]] | None:
    """The Q nodes reading the lookup and the DQ nodes reading them, when all share per-tensor params."""
    out = gather.outputs[0]
    if out.is_graph_output():
        return None
    qs = [user for user, _ in out.uses()]
    if not qs or not all(is_op(q, "QuantizeLinear") and q.inputs[0] is out for q in qs):
        return None
    first = qdq_params(qs[0])
    if first is None or first.per_channel or first.zero_point is None or first.extra:
        return None
    dqs: list[ir.Node] = []
    for q in qs:
        p = qdq_params(q)
        if p is None or not p.same_as(first) or q.outputs[0].is_graph_output():
            return None
        users = [user for user, _ in q.outputs[0].uses()]
        for dq in users:
            pd = qdq_params(dq) if is_op(dq, "DequantizeLinear") else None
            if pd is None or not pd.same_as(first) or dq.outputs[0].is_graph_output():
                return None
        dqs += users
    return (qs, dqs) if dqs else None


def _rewrite(graph: ir.Graph, gather: ir.Node, names: NameScope, keep_qdq: bool = False) -> bool:
    table = const_array(gather.inputs[0])
    if table is None or table.dtype != np.float32:
        return False
    found = _matching_qdq(gather)
    if found is None:
        return False
    qs, dqs = found
    q0 = qs[0]
    scale, zp = const_array(q0.inputs[1]), const_array(q0.inputs[2])
    assert scale is not None and zp is not None
    base = gather.inputs[0].name or "table"  # type: ignore[union-attr]
    codes = add_initializer(graph, names.value(f"{base}_quantized"), quantize_linear(table, scale, zp))
    dq = ir.node("DequantizeLinear", [codes, q0.inputs[1], q0.inputs[2]], name=names.node(f"{base}/DequantizeLinear"))
    if keep_qdq:  # DQ(W_q) -> Gather -> Q -> DQ: the lookup itself runs on codes
        dq.outputs[0].name = names.value(f"{base}_dequantized")
        graph.insert_before(gather, dq)
        gather.replace_input_with(0, dq.outputs[0])
        return True
    lookup = ir.node("Gather", [dq.outputs[0], gather.inputs[1]], attributes={k: a.value for k, a in gather.attributes.items()},
                     name=names.node(f"{gather.name or 'gather'}_quantized_table"))
    dq.outputs[0].name = names.value(f"{base}_dequantized")
    graph.insert_before(gather, [dq, lookup])
    first_out = dqs[0].outputs[0]
    lookup.outputs[0].name = names.value(f"{first_out.name or 'lookup'}_table")
    if first_out.dtype is not None:
        lookup.outputs[0].dtype = first_out.dtype
    if first_out.shape is not None:
        lookup.outputs[0].shape = first_out.shape
    for d in dqs:
        d.outputs[0].replace_all_uses_with(lookup.outputs[0])
    for n in [*dqs, *qs, gather]:
        graph.remove(n, safe=True)
    return True
