"""The exporters' GroupNorm as an integer InstanceNormalization group (integer-only targets).

The torch exporters write ``group_norm(x, G)`` (no affine: ``DecomposeGroupNormPass`` moved γ and β into
their own ``Mul`` / ``Add`` sites) as ``Reshape -> InstanceNormalization(ones, zeros) -> Reshape ->
Mul(·, 1) -> Add(·, 0)``. On the QNN HTP that is a float island, and with float scale/bias constants the
HTP fails to finalize the graph (measured: ``QNN_COMMON_ERROR_MEM_ALLOC``); with a uint8 scale and an int32
bias it runs the InstanceNormalization on integers (41 dB vs ONNX Runtime CPU on a hand-made file). This
pass writes that form, value for value::

    DQ(x) -> Reshape -> InstanceNorm(1, 0) -> Reshape -> Mul(·, 1) -> Add(·, 0) -> Q(s, z)

    DQ(x) -> Reshape -> Q/DQ(x's grid) -> InstanceNorm(DQ(1; s=1), DQ(0 int32; s=s_x)) -> Q/DQ(s, z)
          -> Reshape -> Q(s, z)

Each inserted Q/DQ re-quantizes values already on that grid (a reshape of dequantized codes, or the
InstanceNorm output that the following ``Q(s, z)`` quantized after an exact reshape), so the file
computes what it computed before; the identity ``Mul(·, 1)`` / ``Add(·, 0)`` are dropped (``x·1 = x``,
``x + 0 = x``; the dynamo exporter writes those constants as ``CastLike(constant, x)``). Only the exporters'
form with a per-tensor DQ before and a per-tensor Q after is touched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, is_op

__all__ = ["QuantizeInstanceNormPass"]


def _only_use(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` as data (a ``CastLike`` reading only its type does not count)."""
    uses = [u for u, i in value.uses() if not (is_op(u, "CastLike") and i == 1)]
    return uses[0] if len(uses) == 1 and not value.is_graph_output() else None


def _constant_like(value: ir.Value | None, fill: float) -> bool:
    """``value`` is a float32 constant holding only ``fill`` (also through the dynamo exporter's
    ``CastLike(constant, x)``, which is the identity on a float32 constant and float32 ``x``)."""
    producer = value.producer() if value is not None else None
    if is_op(producer, "CastLike") and producer.inputs[0] is not None:
        value = producer.inputs[0]
    arr = const_array(value)
    return arr is not None and arr.dtype == np.float32 and bool(np.all(arr == fill))


def _per_tensor(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(scale, zero point) inputs of a per-tensor Q/DQ, else None."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    scale = const_array(node.inputs[1])
    return (node.inputs[1], node.inputs[2]) if scale is not None and scale.size == 1 else None


class QuantizeInstanceNormPass(ir.passes.InPlacePass):
    """Rewrite the exporters' GroupNorm ``InstanceNormalization`` as an integer group (see the module doc)."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.profile.integer_only:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            if is_op(node, "InstanceNormalization") and len(node.inputs) == 3:
                modified = self._rewrite(graph, node, names) or modified
        return ir.passes.PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, norm: ir.Node, names: NameScope) -> bool:
        x, scale, bias = norm.inputs
        if x is None or not (_constant_like(scale, 1.0) and _constant_like(bias, 0.0)):
            return False
        before = x.producer()
        dq = before.inputs[0].producer() if is_op(before, "Reshape") and before.inputs[0] is not None else None
        if not is_op(dq, "DequantizeLinear") or _per_tensor(dq) is None:
            return False
        after = _only_use(norm.outputs[0])
        if not is_op(after, "Reshape"):
            return False
        tail, identities = after.outputs[0], []
        for op, fill in (("Mul", 1.0), ("Add", 0.0)):  # the exporter's affine with the constants of no affine
            user = _only_use(tail)
            if is_op(user, op) and len(user.inputs) == 2 and user.inputs[0] is tail \
                    and _constant_like(user.inputs[1], fill):
                identities.append(user)
                tail = user.outputs[0]
        q = _only_use(tail)
        if not is_op(q, "QuantizeLinear") or _per_tensor(q) is None:
            return False
        s_x, z_x = _per_tensor(dq)
        s_y, z_y = _per_tensor(q)
        base = norm.name or "InstanceNormalization"
        # the normalized input on x's grid (a reshape of x's codes: exact)
        x_dq = self._qdq(graph, norm, x, s_x, z_x, f"{base}.input", names)
        groups = int(const_array(scale).size)
        storage = np.int8 if self.profile.activation_signed else np.uint8
        unit = self._dequantize(graph, norm, np.ones(groups, storage), np.array(1.0, np.float32),
                                np.array(0, storage), f"{base}.scale", names)
        s_bias = np.array(float(const_array(s_x).reshape(())), np.float32)  # s_x · s_scale, s_scale = 1
        zero = self._dequantize(graph, norm, np.zeros(groups, np.int32), s_bias, np.array(0, np.int32),
                                f"{base}.bias", names)
        norm.replace_input_with(0, x_dq)
        norm.replace_input_with(1, unit)
        norm.replace_input_with(2, zero)
        # the output on the following Q's grid, before the reshape (the Q after it re-quantizes exactly)
        out = norm.outputs[0]
        y_dq = self._qdq(graph, after, out, s_y, z_y, f"{base}.output", names)
        after.replace_input_with(0, y_dq)
        for node in identities:
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
        return True

    @staticmethod
    def _qdq(graph: ir.Graph, before: ir.Node, value: ir.Value, scale: ir.Value, zero: ir.Value, base: str,
             names: NameScope) -> ir.Value:
        q_out = ir.val(names.value(f"{base}_quantized"))
        dq_out = ir.val(names.value(f"{base}_dequantized"), ir.DataType.FLOAT)
        q = ir.node("QuantizeLinear", [value, scale, zero], outputs=[q_out], name=names.node(f"{base}/Q"))
        dq = ir.node("DequantizeLinear", [q_out, scale, zero], outputs=[dq_out], name=names.node(f"{base}/DQ"))
        graph.insert_before(before, [q, dq])
        return dq_out

    @staticmethod
    def _dequantize(graph: ir.Graph, before: ir.Node, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                    base: str, names: NameScope) -> ir.Value:
        c = add_initializer(graph, names.value(f"{base}_quantized"), codes)
        s = add_initializer(graph, names.value(f"{base}_scale"), scale)
        z = add_initializer(graph, names.value(f"{base}_zero_point"), zero)
        out = ir.val(names.value(f"{base}_dequantized"), ir.DataType.FLOAT)
        graph.insert_before(before, ir.node("DequantizeLinear", [c, s, z], outputs=[out],
                                             name=names.node(f"{base}/DequantizeLinear")))
        return out
