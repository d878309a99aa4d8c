"""check's float_op rule: ops an integer-only target (qnn, npu) would run in float, named with the tensor."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qtrim_fx.onnx import check, get_profile


def _model(nodes, inits, out="y", shape=(1, 4, 6, 6), out_shape=None) -> onnx.ModelProto:
    base = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
            numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "wq"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0), *nodes],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], [*base, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _qdq(src: str, dst: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [src, "s", "z"], [src + "_q"]),
            helper.make_node("DequantizeLinear", [src + "_q", "s", "z"], [dst])]


def _islands(model, target="qnn") -> list[tuple[str, str]]:
    return sorted((v.node, v.message.split(": ", 1)[1].split(";")[0]) for v in check(model, target) if v.rule == "float_op")


def _conv_concat_pool(quantize_cat: bool) -> onnx.ModelProto:
    """DQ -> Conv -> Relu -> Q -> DQ ─┐
       DQ ───────────────────────────┴ Concat -> cat -> [Q -> DQ ->] GlobalAveragePool -> Q -> DQ -> y"""
    nodes = [helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             *_qdq("r", "rd"), helper.make_node("Concat", ["rd", "xd"], ["cat"], axis=1, name="concat")]
    pool_in = "cat"
    if quantize_cat:
        nodes += _qdq("cat", "catd")
        pool_in = "catd"
    nodes += [helper.make_node("GlobalAveragePool", [pool_in], ["p"], name="pool"), *_qdq("p", "y")]
    return _model(nodes, [])


def test_concat_into_pool_without_qdq_is_two_float_ops_named_with_the_tensor():
    found = _islands(_conv_concat_pool(quantize_cat=False))
    assert found == [("concat", "output 'cat' feeds GlobalAveragePool without a QuantizeLinear"),
                     ("pool", "input 'cat' (from Concat) is not dequantized")]
    assert {v.severity for v in check(_conv_concat_pool(False), "qnn") if v.rule == "float_op"} == {"warning"}


def test_complete_groups_and_fused_conv_relu_are_integer():
    assert _islands(_conv_concat_pool(quantize_cat=True)) == []


def test_bias_add_after_a_weighted_op_is_part_of_its_group():
    nodes = [helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["cb"], name="bias"), helper.make_node("Relu", ["cb"], ["r"]),
             *_qdq("r", "y")]
    b = numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), "b")
    assert _islands(_model(nodes, [b])) == []


def test_float_output_and_only_for_integer_only_targets():
    nodes = [helper.make_node("Conv", ["xd", "w"], ["y"], name="conv")]  # float graph output
    model = _model(nodes, [])
    assert _islands(model, "qnn") == [("conv", "output 'y' is a graph output without a QuantizeLinear")]
    assert _islands(model, "npu") == _islands(model, "qnn")
    for target in ("onnxruntime", "tensorrt", "openvino"):
        assert not get_profile(target).integer_only and _islands(model, target) == []


def test_shape_arithmetic_is_not_a_float_op():
    nodes = [helper.make_node("Shape", ["xd"], ["shp"]), helper.make_node("Reshape", ["xd", "shp"], ["rs"], name="rs"),
             *_qdq("rs", "y")]
    assert _islands(_model(nodes, [])) == []
