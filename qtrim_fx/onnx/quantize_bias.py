"""Store Conv / ConvTranspose / Gemm biases as int32 + DequantizeLinear (profiles with ``bias="int32"``).

Integer kernels add the bias in the accumulator, whose scale is ``s_x * s_w``::

    x_dq  = DequantizeLinear(x_q, s_x, z_x)
    w_dq  = DequantizeLinear(w_q, s_w, 0, axis)
    Conv(x_dq, w_dq, conv.bias (f32))
      =>  Conv(x_dq, w_dq, DequantizeLinear(conv.bias_quantized (int32), s_x * s_w, 0 (int32), axis=0))

``conv.bias_quantized = round_half_even(b / (s_x * s_w))`` saturated to int32 (what the ONNX
Runtime and QNN quantizers write); the bias then differs from the float one by at most half an
accumulator step. Only applies when both inputs come from DQ nodes with constant scales, the
activation scale is per-tensor and a per-channel weight scale runs along the output channel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, is_op, qdq_params

__all__ = ["QuantizeBiasPass"]

_INT32 = np.iinfo(np.int32)


class QuantizeBiasPass(ir.passes.InPlacePass):
    """Float bias -> int32 initializer + DequantizeLinear; a no-op for ``bias="float"`` profiles."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.profile.bias != "int32":
            return ir.passes.PassResult(model, False)
        graph = model.graph
        names = NameScope(graph)
        modified = False
        shared = {id(n.inputs[2]) for n in graph if len(n.inputs) > 2 and n.inputs[2] is not None
                  and len(n.inputs[2].uses()) > 1}
        for node in list(graph):
            scale = _bias_scale(node)
            if scale is None:
                continue
            bias = node.inputs[2]
            assert bias is not None
            dq = _bias_dq(graph, bias, scale, names, _shared_bias_base(node) if id(bias) in shared else None)
            graph.insert_before(node, dq)
            node.replace_input_with(2, dq.outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified)


def _out_channel_axis(node: ir.Node) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if "transB" in node.attributes and node.attributes["transB"].as_int() else 1
    return 0


def _bias_scale(node: ir.Node) -> np.ndarray | None:
    """``s_x * s_w`` (0-D or (C,)) if ``node`` has a float constant bias between quantized inputs."""
    if not is_op(node, "Conv", "ConvTranspose", "Gemm", "LayerNormalization") or len(node.inputs) < 3 \
            or node.inputs[2] is None:
        return None  # LayerNormalization: only with a dequantized scale (γ), what integer-only lowering writes
    bias = const_array(node.inputs[2])
    x_dq, w_dq = (v.producer() if v is not None else None for v in node.inputs[:2])
    if bias is None or bias.dtype != np.float32 or not is_op(x_dq, "DequantizeLinear") \
            or not is_op(w_dq, "DequantizeLinear"):
        return None
    x_p = qdq_params(x_dq)  # type: ignore[arg-type]
    w_p = qdq_params(w_dq, rank=_rank(w_dq))  # type: ignore[arg-type]
    if x_p is None or w_p is None or x_p.per_channel:
        return None
    if is_op(node, "LayerNormalization") and w_p.per_channel:
        return None
    if w_p.per_channel and (w_p.axis != _out_channel_axis(node) or w_p.scale.size != bias.size):
        return None
    return (np.float32(x_p.scale) * w_p.scale.astype(np.float32)).astype(np.float32)


def _rank(dq: ir.Node) -> int | None:
    codes = const_array(dq.inputs[0])
    return None if codes is None else codes.ndim


def _shared_bias_base(node: ir.Node) -> str | None:
    """A bias tensor read by several layers (exporters merge equal constants, e.g. all-zero folded biases,
    under a name each picks differently): name its int32 copy after this layer's weight codes instead."""
    weight = node.inputs[1]
    dq = weight.producer() if weight is not None else None
    codes = dq.inputs[0] if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs else None
    if codes is None or not codes.name:
        return None
    return f"{codes.name.removesuffix('_quantized')}.bias"


def _bias_dq(graph: ir.Graph, bias: ir.Value, scale: np.ndarray, names: NameScope,
             base: str | None = None) -> ir.Node:
    b = const_array(bias)
    assert b is not None
    codes = np.clip(np.rint(b / scale), _INT32.min, _INT32.max).astype(np.int32)
    base = base or bias.name or "bias"
    q = add_initializer(graph, names.value(f"{base}_quantized"), codes)
    s = add_initializer(graph, names.value(f"{base}_scale"), scale)
    z = add_initializer(graph, names.value(f"{base}_zero_point"), np.zeros(scale.shape, np.int32))
    attrs = {"axis": 0} if scale.ndim == 1 else {}
    out = ir.val(names.value(f"{base}_dequantized"), ir.DataType.FLOAT, ir.Shape(codes.shape))
    return ir.node("DequantizeLinear", [q, s, z], attrs, outputs=[out], name=names.node(f"{base}/DequantizeLinear"))
