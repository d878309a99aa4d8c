"""A zero constant operand on an integer-only target (issue 17 zoo: timm MobileOne on qnn / npu, 27 float Adds).

MobileOne sums its branches from Python zeros (``out = scale_out + identity_out; out += conv(x)``), which the
exporter writes as ``Add(DQ(x), 0.0)``. The HTP runs an Add on integers only when every input is dequantized, and
the pass that writes scalar operands as one exact code skipped 0.0 (no scale holds it as code 1). It is now
``DQ(0; s=1, z=0)``, exactly 0.0: the graph computes the same values (``onnx.reference`` and ONNX Runtime) and
``check`` finds no float op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx import check
from qtrim_fx.onnx.quantize_scalar_operands import QuantizeScalarOperandsPass


def _graph(op: str, constant: float, dtype: int = TensorProto.UINT8) -> onnx.ModelProto:
    """x -> Q -> DQ -> op(·, constant) -> Q -> DQ -> y."""
    init = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("z", dtype, [], [128 if dtype == TensorProto.UINT8 else 0]),
            helper.make_tensor("c", TensorProto.FLOAT, [], [constant])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node(op, ["xd", "c"], ["y0"], name="op"),
             helper.make_node("QuantizeLinear", ["y0", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ReferenceEvaluator(model).run(None, {"x": x})[0], sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_zero_operand_becomes_one_exact_code(op, target, tmp_path):
    before = _graph(op, 0.0, TensorProto.INT8 if target == "npu" else TensorProto.UINT8)
    ir_model = ir.serde.deserialize_model(before)
    assert QuantizeScalarOperandsPass(get_profile(target))(ir_model).modified
    after = ir.serde.serialize_model(ir_model)
    node = next(n for n in after.graph.node if n.name == "op")
    dq = next(n for n in after.graph.node if n.output[0] == node.input[1])
    assert dq.op_type == "DequantizeLinear"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    assert (int(inits[dq.input[0]]), float(inits[dq.input[1]]), int(inits[dq.input[2]])) == (0, 1.0, 0)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32) * 3
    for a, b in zip(_run(before, x), _run(after, x), strict=True):
        np.testing.assert_array_equal(a, b)
    path = tmp_path / "m.onnx"
    onnx.save(after, path)
    assert [v for v in check(path, target) if v.rule == "float_op"] == []
    onnx.save(before, path)
    assert [v for v in check(path, target) if v.rule == "float_op"]  # the float constant was the island


def test_float_capable_targets_keep_the_constant():
    ir_model = ir.serde.deserialize_model(_graph("Add", 0.0))
    assert not QuantizeScalarOperandsPass(get_profile("onnxruntime"))(ir_model).modified


@pytest.mark.parametrize("act", ["Relu", "Clip", "Sigmoid"])
def test_scalar_operand_of_an_op_fused_with_a_relu_is_quantized_too(act):
    """``relu(y * 0.5)`` (or an in-place ``y.mul_(0.5); y.relu_()``): the Mul's output goes through a Relu to the Q,
    one group on the back ends; its 0.5 stayed a float constant (``check``: float_op /Mul). A Sigmoid is not fused
    that way: left alone (the Mul is not in a group)."""
    model = _graph("Mul", 0.5)
    g = model.graph
    op = next(n for n in g.node if n.name == "op")
    op.output[0] = "m"
    g.node.insert(list(g.node).index(op) + 1, helper.make_node(act, ["m"], ["y0"], name="act"))
    onnx.checker.check_model(model)
    ir_model = ir.serde.deserialize_model(model)
    modified = QuantizeScalarOperandsPass(get_profile("qnn"))(ir_model).modified
    assert modified == (act != "Sigmoid")
    after = ir.serde.serialize_model(ir_model)
    mul = next(n for n in after.graph.node if n.name == "op")
    producer = next((n for n in after.graph.node if mul.input[1] in n.output), None)
    assert (producer is not None and producer.op_type == "DequantizeLinear") == (act != "Sigmoid")
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32) * 3
    for a, b in zip(_run(model, x), _run(after, x), strict=True):
        np.testing.assert_array_equal(a, b)
    if act != "Sigmoid":
        after.ir_version = 9  # the hand-made graph's; the exporters write one the runtimes load
        assert [v for v in check(after, "qnn") if v.rule == "float_op"] == []
