"""Re-quantize after data-movement ops so Conv/Gemm/MatMul/Add/Concat read a DequantizeLinear directly.

``torch.flatten`` / ``view`` between an activation site and a linear layer leaves a float
shape op between the DQ and the Gemm; ONNX Runtime then keeps the Gemm in float (no QGemm)::

    pool_q -> DequantizeLinear(s, z) -> Flatten -> Gemm
      =>  pool_q -> DequantizeLinear(s, z) -> Flatten -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> Gemm

    attn_q -> DequantizeLinear -> Transpose -> Reshape -> Gemm (out_proj)
      =>  attn_q -> DequantizeLinear -> Transpose -> Reshape -> QuantizeLinear -> DequantizeLinear -> Gemm

On an integer-only target (``TargetProfile.integer_only``: qnn, npu) every op reading a dequantized tensor
through data movement is rewired the same way (a pooling, a norm, an activation, an exporter's own
decomposition: the dynamo exporter writes adaptive pooling as ``Transpose -> GatherND -> Transpose ->
ReduceMean``), else the back end runs it in float::

    pool_q -> DequantizeLinear -> Transpose -> GatherND -> Transpose -> ReduceMean -> Q
      =>  ... -> Transpose -> QuantizeLinear -> DequantizeLinear -> ReduceMean -> Q

Exact: shape ops, Gather / GatherND / GatherElements, Slice, Expand, Tile and MaxPool move, select, repeat or
max on-grid values without changing them, so the new QuantizeLinear reproduces the same codes. It is the form ONNX Runtime's own
quantizer writes around such ops (Q/DQ on both sides, same parameters); for TensorRT it is the
canonical input quantization of the Conv/Gemm. Only per-tensor DQs with constant parameters
qualify, and only the data input of ops with a dequantized constant weight is rewired (other
readers, e.g. the float attention-score MatMul, keep the float tensor).
"""

from __future__ import annotations

import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, const_array, dequantizes_constant, is_op, qdq_params

__all__ = ["RequantizeAfterShapeOpsPass"]

#: ops whose outputs are input values moved, selected or maxed: they keep values on the grid.
_SHAPE_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "GatherND", "GatherElements",
              "Slice", "Expand", "Tile", "Identity", "MaxPool")
#: ops that never want a requantized input: quantizers, and readers of a shape only.
_NOT_READERS = ("QuantizeLinear", "DequantizeLinear", "Shape", "Size", "ConstantOfShape", "EyeLike")
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ELEMENTWISE = ("Add", "Mul", "Concat")
_DQ_SUFFIX = "/DequantizeLinear"


class RequantizeAfterShapeOpsPass(ir.passes.InPlacePass):
    """Per-tensor DQ -> shape ops -> weighted op  =>  ... shape ops -> Q -> DQ -> weighted op.

    Args:
        profile: with an integer-only profile every computing op is a reader (see the module doc); without
            one (or a float-capable profile) weighted ops and Add / Mul / Concat.
    """

    def __init__(self, profile: TargetProfile | None = None) -> None:
        super().__init__()
        self.every_reader = profile is not None and profile.integer_only

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        made: dict[ir.Value, ir.Value] = {}  # shape-op output -> its new DQ output (shared by readers)
        for node in list(graph):
            for i in _quantized_inputs(node, self.every_reader):
                x = node.inputs[i]
                dq = _dq_behind_shape_ops(x)
                if x is None or dq is None:
                    continue
                if x not in made:
                    q, new_dq = _requantize(x.producer(), dq, names)  # type: ignore[arg-type]
                    graph.insert_after(x.producer(), [q, new_dq])  # type: ignore[arg-type]
                    made[x] = new_dq.outputs[0]
                node.replace_input_with(i, made[x])
        return ir.passes.PassResult(model, bool(made))


def _quantized_inputs(node: ir.Node, every_reader: bool = False) -> range | tuple[int, ...]:
    """Inputs an integer kernel wants straight from a DequantizeLinear.

    The data input of weighted ops, and every input of residual Add / Mul / Concat
    (QLinearAdd, QLinearMul, QLinearConcat need all of theirs dequantized); with ``every_reader`` (an
    integer-only target) every input of any op that is not itself data movement or a quantizer.
    """
    if _reads_weight_dq(node):
        return (0,)
    if is_op(node, *_ELEMENTWISE):
        return range(len(node.inputs))
    if every_reader and not is_op(node, *_SHAPE_OPS, *_NOT_READERS):
        return range(len(node.inputs))
    return ()


def _reads_weight_dq(node: ir.Node) -> bool:
    """Conv/ConvTranspose/Gemm/MatMul with a dequantized constant as second input."""
    if not is_op(node, *_WEIGHTED) or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    w_dq = node.inputs[1].producer()
    return w_dq is not None and dequantizes_constant(w_dq)


def _dq_behind_shape_ops(x: ir.Value | None) -> ir.Node | None:
    """The per-tensor activation DQ that ``x`` comes from through >= 1 shape op, if any."""
    hops = 0
    # Through each op's first output only: a MaxPool's second output holds int64 indices, not moved values.
    while x is not None and is_op(x.producer(), *_SHAPE_OPS) and x.producer().outputs[0] is x:  # type: ignore[union-attr]
        x = x.producer().inputs[0]  # type: ignore[union-attr]
        hops += 1
    dq = x.producer() if x is not None and hops else None
    if dq is None or not is_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    if const_array(dq.inputs[0]) is not None:  # a weight: FoldWeightLayoutPass's business
        return None
    params = qdq_params(dq)
    return dq if params is not None and not params.per_channel and params.zero_point is not None else None


def _requantize(shape_op: ir.Node, dq: ir.Node, names: NameScope) -> tuple[ir.Node, ir.Node]:
    """Q + DQ with ``dq``'s parameters on ``shape_op``'s output."""
    site = dq.name[: -len(_DQ_SUFFIX)] if dq.name and dq.name.endswith(_DQ_SUFFIX) else dq.name or "qdq"
    base = f"{site}.{shape_op.op_type.lower()}"
    scale, zp = dq.inputs[1], dq.inputs[2]
    x = shape_op.outputs[0]
    q_out = ir.val(names.value(f"{base}_quantized"), dq.inputs[0].dtype, x.shape)  # type: ignore[union-attr]
    q = ir.node("QuantizeLinear", [x, scale, zp], outputs=[q_out], name=names.node(f"{base}/QuantizeLinear"))
    dq_out = ir.val(names.value(f"{base}_dequantized"), ir.DataType.FLOAT, x.shape)
    new_dq = ir.node("DequantizeLinear", [q_out, scale, zp], outputs=[dq_out],
                     name=names.node(f"{base}/DequantizeLinear"))
    return q, new_dq
