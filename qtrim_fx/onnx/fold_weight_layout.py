"""Fold layout ops that follow a weight's DequantizeLinear into its integer initializer.

The exporter writes ``F.linear`` on a 3-D input as ``Transpose(W) -> MatMul``; with a
quantized weight the Transpose lands after the DQ and cannot be constant-folded::

    fc.weight_quantized (O, I) -> DequantizeLinear(axis=0) -> Transpose(perm=[1, 0]) -> MatMul
      =>  fc.weight_quantized (I, O) -> DequantizeLinear(axis=1) -> MatMul

Likewise ``Reshape`` by a constant shape (per-channel only when the channel axis survives the
reshape) and ``Identity`` are folded. The DQ (and its initializer) must have no other user; a
layout node whose output is a graph output is left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qtrim_fx.onnx._graph import const_array, is_op

__all__ = ["FoldWeightLayoutPass"]


class FoldWeightLayoutPass(ir.passes.InPlacePass):
    """Identity / Transpose / Reshape after a weight DQ -> permuted integer initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            dq = _foldable_weight_dq(node)
            if dq is None:
                continue
            folded = _fold(dq, node)
            if folded:
                model.graph.remove(node, safe=True)
            modified |= folded
        return ir.passes.PassResult(model, modified)


def _foldable_weight_dq(node: ir.Node) -> ir.Node | None:
    """The weight DQ feeding layout ``node``, if it can absorb it."""
    if not is_op(node, "Identity", "Transpose", "Reshape") or node.outputs[0].is_graph_output():
        return None
    x = node.inputs[0]
    dq = None if x is None else x.producer()
    if not is_op(dq, "DequantizeLinear") or len(x.uses()) != 1:  # type: ignore[union-attr]
        return None
    codes = dq.inputs[0]  # type: ignore[union-attr]
    if codes is None or not codes.is_initializer() or codes.const_value is None or len(codes.uses()) != 1:
        return None
    return dq


def _fold(dq: ir.Node, layout: ir.Node) -> bool:
    codes_value = dq.inputs[0]
    assert codes_value is not None and codes_value.const_value is not None
    codes = codes_value.const_value.numpy()
    axis = _dq_axis(dq, codes.ndim)
    result = _apply_layout(layout, codes, axis)
    if result is None:
        return False
    new_codes, new_axis = result
    codes_value.const_value = ir.tensor(np.ascontiguousarray(new_codes), dtype=codes_value.dtype,
                                        name=codes_value.name)
    codes_value.shape = ir.Shape(new_codes.shape)
    if new_axis is not None:
        dq.attributes["axis"] = ir.AttrInt64("axis", new_axis)
    dq.outputs[0].shape = ir.Shape(new_codes.shape)
    layout.outputs[0].replace_all_uses_with(dq.outputs[0])
    return True


def _dq_axis(dq: ir.Node, rank: int) -> int | None:
    scale = const_array(dq.inputs[1])
    if scale is None or scale.ndim == 0 or (scale.size == 1 and "axis" not in dq.attributes):
        return None
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    return axis + rank if axis < 0 else axis


def _apply_layout(layout: ir.Node, codes: np.ndarray, axis: int | None) -> tuple[np.ndarray, int | None] | None:
    """New codes and channel axis after ``layout``, or ``None`` when it cannot be folded."""
    if layout.op_type == "Identity":
        return codes, axis
    if layout.op_type == "Transpose":
        perm_attr = layout.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(codes.ndim))[::-1]
        return np.transpose(codes, perm), (None if axis is None else perm.index(axis))
    return _reshape(layout, codes, axis)


def _reshape(layout: ir.Node, codes: np.ndarray, axis: int | None) -> tuple[np.ndarray, int | None] | None:
    shape = const_array(layout.inputs[1] if len(layout.inputs) > 1 else None)
    if shape is None:
        return None
    allowzero = layout.attributes["allowzero"].as_int() if "allowzero" in layout.attributes else 0
    dims = [codes.shape[i] if d == 0 and not allowzero else int(d) for i, d in enumerate(shape.tolist())]
    try:
        new = codes.reshape(dims)
    except ValueError:
        return None
    if axis is None:
        return new, None
    lead, channels = math.prod(codes.shape[:axis]), codes.shape[axis]
    for j, d in enumerate(new.shape):
        if d == channels and math.prod(new.shape[:j]) == lead:
            return new, j
    return None
