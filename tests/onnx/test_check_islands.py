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
    # Concat and pooling are kinds qnn's profile runs on integers (activation_sites): errors
    assert {v.severity for v in check(_conv_concat_pool(False), "qnn") if v.rule == "float_op"} == {"error"}
    # an integer-only profile that declares no activation_sites still names them, as warnings
    bare = get_profile("qnn").replace(name="bare_int", activation_sites=())
    assert {v.severity for v in check(_conv_concat_pool(False), bare) if v.rule == "float_op"} == {"warning"}


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


def _norm_softmax(quantize_norm_in: bool, quantize_norm_out: bool, quantize_softmax_out: bool,
                  float_params: bool = False) -> onnx.ModelProto:
    """x (B, 4, 6) -> Q -> DQ -> Add(x, x) -> [Q -> DQ] -> LayerNormalization -> [Q -> DQ] -> Softmax -> [Q -> DQ] -> y

    A hand-made transformer fragment, as another tool would write it (the residual Add is quantized on
    its inputs only, LayerNorm and Softmax in float unless asked)."""
    if float_params:
        params = [numpy_helper.from_array(np.ones(6, np.float32), "g"), numpy_helper.from_array(np.zeros(6, np.float32), "b")]
        nodes = []
    else:  # γ: uint8 codes + DQ, β: int32 codes + DQ (what the QNN HTP takes)
        params = [numpy_helper.from_array(np.full(6, 200, np.uint8), "gq"), numpy_helper.from_array(np.array(0.005, np.float32), "gs"),
                  numpy_helper.from_array(np.array(0, np.uint8), "gz"), numpy_helper.from_array(np.zeros(6, np.int32), "bq"),
                  numpy_helper.from_array(np.array(2.5e-4, np.float32), "bs"), numpy_helper.from_array(np.array(0, np.int32), "bz")]
        nodes = [helper.make_node("DequantizeLinear", ["gq", "gs", "gz"], ["g"]),
                 helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"])]
    nodes.append(helper.make_node("Add", ["xd", "xd"], ["h"], name="residual"))
    src = "h"
    if quantize_norm_in:
        nodes += _qdq("h", "hd")
        src = "hd"
    nodes.append(helper.make_node("LayerNormalization", [src, "g", "b"], ["ln"], axis=-1, name="norm"))
    src = "ln"
    if quantize_norm_out:
        nodes += _qdq("ln", "lnd")
        src = "lnd"
    nodes.append(helper.make_node("Softmax", [src], ["p"], axis=-1, name="softmax"))
    nodes += _qdq("p", "y") if quantize_softmax_out else [helper.make_node("Identity", ["p"], ["y"])]
    return _model(nodes, params, shape=(1, 4, 6))


def _float_op_errors(model, target="qnn") -> list[tuple[str, str]]:
    return sorted((v.node, v.message.split(" ", 1)[0]) for v in check(model, target)
                  if v.rule == "float_op" and v.severity == "error")


def test_float_layernorm_and_softmax_are_errors_naming_op_and_tensor(tmp_path):
    path = tmp_path / "ln_softmax.onnx"
    onnx.save(_norm_softmax(False, False, False), path)
    found = {v.node: v for v in check(path, "qnn") if v.rule == "float_op"}
    assert {n: v.severity for n, v in found.items()} == {"residual": "error", "norm": "error", "softmax": "error"}
    assert "LayerNormalization runs in float" in found["norm"].message and "'h'" in found["norm"].message
    assert "Softmax runs in float" in found["softmax"].message and "input 'ln'" in found["softmax"].message
    assert "target='qnn'" in found["norm"].message  # the fix: prepare for the target
    assert _float_op_errors(path, "npu") == [("norm", "LayerNormalization"), ("residual", "Add"),
                                             ("softmax", "Softmax")]
    for target in ("onnxruntime", "tensorrt", "openvino"):  # not integer-only: no float_op at all
        assert not [v for v in check(path, target) if v.rule == "float_op"]


def test_layernorm_softmax_in_complete_groups_pass_and_each_missing_qdq_is_named():
    assert _float_op_errors(_norm_softmax(True, True, True)) == []
    assert _float_op_errors(_norm_softmax(True, False, True)) == [("norm", "LayerNormalization"),
                                                                 ("softmax", "Softmax")]
    assert _float_op_errors(_norm_softmax(True, True, False)) == [("softmax", "Softmax")]


def test_a_shape_reader_next_to_the_quantize_does_not_break_the_group():
    nodes = [helper.make_node("Transpose", ["xd"], ["t"], perm=[0, 1, 3, 2], name="tr"), *_qdq("t", "td"),
             helper.make_node("Shape", ["t"], ["shp"]), helper.make_node("Reshape", ["td", "shp"], ["rs"], name="rs"),
             *_qdq("rs", "y")]
    assert _islands(_model(nodes, [])) == []



def test_a_layernorm_with_float_gamma_beta_is_a_float_op_even_in_a_complete_group():
    """The QNN HTP runs LayerNorm on integers only with γ dequantized from uint8 and β from int32."""
    found = [v for v in check(_norm_softmax(True, True, True, float_params=True), "qnn") if v.rule == "float_op"]
    assert [(v.node, v.severity) for v in found] == [("norm", "error")]
    assert "scale 'g' is a float constant" in found[0].message


def test_a_float_layernorm_beta_is_a_float_op_for_int32_bias_targets_only():
    """qnn stores biases int32 + DQ and wants β so too; npu's back end takes float biases (``bias="float"``, as
    for its Conv biases), so a float β there is what lowering writes and check accepts. γ stays required."""
    model = _norm_softmax(True, True, True)
    beta = next(n for n in model.graph.node if n.output[0] == "b")
    model.graph.node.remove(beta)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(6, np.float32), "b"))
    found = [v for v in check(model, "qnn") if v.rule == "float_op"]
    assert [(v.node, v.severity) for v in found] == [("norm", "error")]
    assert "bias 'b' is a float constant" in found[0].message
    npu = get_profile("npu").replace(activation_signed=False)  # the fragment's grids are uint8
    assert get_profile("npu").bias == "float"
    assert [v for v in check(model, npu) if v.rule == "float_op"] == []
    floats = _norm_softmax(True, True, True, float_params=True)  # γ float too: still named on npu
    assert [v.message.split(": ", 1)[1].split(";")[0] for v in check(floats, npu) if v.rule == "float_op"] == [
        "scale 'g' is a float constant, not dequantized (uint8 scale, int32 bias)"]


def test_an_elementwise_op_with_a_float_constant_operand_is_a_float_op():
    scale = numpy_helper.from_array(np.array(0.125, np.float32), "c")
    nodes = [helper.make_node("Mul", ["xd", "c"], ["m"], name="scale"), *_qdq("m", "y")]
    found = [v for v in check(_model(nodes, [scale]), "qnn") if v.rule == "float_op"]
    assert [(v.node, v.severity) for v in found] == [("scale", "error")]
    assert "operand 'c' is a float constant" in found[0].message
    # the exact one-code form qtrim_fx writes: DQ(1; s=c, z=0)
    code = [numpy_helper.from_array(np.array(1, np.uint8), "cq"), numpy_helper.from_array(np.array(0, np.uint8), "cz"),
            numpy_helper.from_array(np.array(0.125, np.float32), "cs")]
    nodes = [helper.make_node("DequantizeLinear", ["cq", "cs", "cz"], ["c"]), *nodes]
    model = _model(nodes, code)
    assert [v for v in check(model, "qnn") if v.severity == "error"] == []
