"""Scalar float constants of quantized elementwise ops -> an exact uint8/int8 DequantizeLinear (integer-only targets).

On an integer-only back end (``TargetProfile.integer_only``: the QNN HTP) an elementwise op runs on
integers only when *every* input is dequantized; a float constant operand (the attention score scale
``* d^-0.5``, a ``/ sqrt(2)``) makes it a float op, and the HTP converts around it (measured: the four
score ``Mul`` of vit_tiny and their conversions took ~3/4 of its HTP time). The constant is written as one
code on a grid that holds it exactly::

    DQ(x) -> Mul(·, 0.1767767) -> Q          =>  DQ(x) -> Mul(·, DQ(1, s=0.1767767, z=0)) -> Q
    DQ(x) -> Add(·, -2.0) -> Q               =>  DQ(x) -> Add(·, DQ(0, s=2.0, z=1)) -> Q
    DQ(x) -> Pow(·, 3.0) -> Q                =>  DQ(x) -> Pow(·, DQ(1, s=3.0, z=0)) -> Q
    DQ(x) -> Add(·, 0.0) -> Q                =>  DQ(x) -> Add(·, DQ(0, s=1.0, z=0)) -> Q

A ``Pow`` exponent is treated like the others: the HTP runs ``Pow`` on integers (ElementWisePower) only with
a dequantized exponent; with a float one it converts around a FLOAT_32 power (QNN profile: ~2x the time).

``(1 - 0) · c`` and ``(0 - 1) · |c|`` are ``c`` bit for bit, so the file computes what it computed before.
The code takes the storage type of the other operand's DequantizeLinear (uint16 in an A16 file, where the
HTP ran a uint16 x uint8 score ``Mul`` at ~3M cycles each, 40 % of vit_tiny's time), the profile's
activation type when that is not an 8/16-bit integer.
Only ops already in a group (their other input dequantized, their output read by QuantizeLinear only, or by
one Relu / Clip read by QuantizeLinear only) are touched: a file whose op is a float island anyway is left as it is.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, is_op, source_value

__all__ = ["QuantizeScalarOperandsPass"]

_ELEMENTWISE = ("Mul", "Add", "Sub", "Div", "Pow")


def _scalar(value: ir.Value | None) -> float | None:
    # shape and dtype first: reading a large initializer's data would re-encode it in the written file
    tensor = ir.convenience.get_const_tensor(source_value(value)) if value is not None else None
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or math.prod(int(d) for d in tensor.shape) != 1:
        return None
    arr = const_array(value)
    if arr is None:
        return None
    c = float(arr.reshape(()))
    return c if np.isfinite(c) else None


def _in_group(node: ir.Node, const_index: int) -> bool:
    other = node.inputs[1 - const_index]
    return (other is not None and is_op(other.producer(), "DequantizeLinear")
            and _ends_in_q(node.outputs[0], relu=True))


def _ends_in_q(value: ir.Value, relu: bool) -> bool:
    """``value`` is read by QuantizeLinear only, or (``relu``) by one Relu / Clip that is (``op -> Relu -> Q``:
    one group on the back ends, as a ReLU after an elementwise op is trained: ``relu(y * 0.5)``)."""
    uses = value.uses()
    if not uses or value.is_graph_output():
        return False
    if all(is_op(u, "QuantizeLinear") for u, _ in uses):
        return True
    return (relu and len(uses) == 1 and (is_op(uses[0][0], "Relu") or is_op(uses[0][0], "Clip"))
            and _ends_in_q(uses[0][0].outputs[0], relu=False))


_STORAGE = {ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8, ir.DataType.UINT16: np.uint16,
            ir.DataType.INT16: np.int16}


def _storage(value: ir.Value) -> type[np.integer] | None:
    """The numpy storage type of the codes a DequantizeLinear output ``value`` reads (8/16-bit ints), else None."""
    dq = value.producer()
    typed = [v.dtype for v in (dq.inputs[2] if len(dq.inputs) > 2 else None, dq.inputs[0]) if v is not None]
    return next((_STORAGE[t] for t in typed if t in _STORAGE), None)


class QuantizeScalarOperandsPass(ir.passes.InPlacePass):
    """``op(DQ(x), c) -> Q``  =>  ``op(DQ(x), DQ(code; s, z)) -> Q`` with ``DQ(code) == c`` (see module doc)."""

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
            if not is_op(node, *_ELEMENTWISE) or len(node.inputs) != 2:
                continue
            for index in (0, 1):
                if not _in_group(node, index):
                    continue
                c = _scalar(node.inputs[index])
                if c is None:
                    continue
                dq = self._dequantized(graph, node, c, names, _storage(node.inputs[1 - index]))
                graph.insert_before(node, dq)
                node.replace_input_with(index, dq.outputs[0])
                modified = True
                break
        return ir.passes.PassResult(model, modified)

    def _dequantized(self, graph: ir.Graph, node: ir.Node, c: float, names: NameScope,
                     dtype: type[np.integer] | None) -> ir.Node:
        if dtype is None:
            dtype = np.int8 if self.profile.activation_signed else np.uint8
        code, zero = (1, 0) if c > 0 else (0, 1)  # (code - zero) * |c| == c exactly
        scale = abs(c)
        if c == 0.0:  # ``out = 0; out = out + conv(x)`` (timm MobileOne): (0 - 0) * 1 == 0
            code, zero, scale = 0, 0, 1.0
        base = f"{node.name or node.op_type}.constant"
        q = add_initializer(graph, names.value(f"{base}_quantized"), np.array(code, dtype))
        s = add_initializer(graph, names.value(f"{base}_scale"), np.array(scale, np.float32))
        z = add_initializer(graph, names.value(f"{base}_zero_point"), np.array(zero, dtype))
        out = ir.val(names.value(f"{base}_dequantized"), ir.DataType.FLOAT, ir.Shape([]))
        return ir.node("DequantizeLinear", [q, s, z], outputs=[out], name=names.node(f"{base}/DequantizeLinear"))
