"""Each ONNX pass on its own: what it rewrites, what it leaves alone, idempotence, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.fx
from onnx import TensorProto, helper, numpy_helper

from qtrim_fx.onnx import ExportError, get_profile
from qtrim_fx.onnx.expand_placeholders import ExpandPlaceholdersPass
from qtrim_fx.onnx.export import _torch_export, qdq_passes, run_qdq_passes
from qtrim_fx.onnx.finalize import FinalizeModelPass, validate_model
from qtrim_fx.onnx.fold_weight_layout import FoldWeightLayoutPass
from qtrim_fx.onnx.merge_qdq import MergeDuplicateQDQPass
from qtrim_fx.onnx.name_after_sites import NameAfterSitesPass, module_of_site
from qtrim_fx.onnx.quantize_bias import QuantizeBiasPass
from qtrim_fx.onnx.requantize_shape_ops import RequantizeAfterShapeOpsPass
from qtrim_fx.runtime.qdq import quant_dequant
from tests.onnx.qdq_models import convnet, run_ort, token_mixer

ORT = get_profile("onnxruntime")
F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=17, qtrim=False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("qtrim", 1)] if qtrim else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def _run(pass_, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.from_proto(model)
    result = pass_(ir_model)
    return ir.to_proto(result.model), result.modified


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _raw(gm, args, prof=ORT) -> onnx.ModelProto:
    return _torch_export(gm, args, prof, ["x"], ["output"], True)


# -- ExpandPlaceholdersPass --------------------------------------------------------------------
def test_raw_export_has_one_placeholder_per_site():
    gm, args = convnet(ORT)
    raw = _raw(gm, args)
    ph = [n for n in raw.graph.node if n.domain == "qtrim"]
    assert len(ph) == 9
    attrs = {a.name: helper.get_attribute_value(a) for a in ph[1].attribute}
    assert attrs == {"qmin": -127, "qmax": 127, "bits": 8, "signed": 1, "name": b"conv1.weight", "axis": 0}


def test_expand_placeholders_rewrites_all_and_is_idempotent():
    gm, args = convnet(ORT)
    out, modified = _run(ExpandPlaceholdersPass(ORT), _raw(gm, args))
    assert modified
    assert not [n for n in out.graph.node if n.domain == "qtrim"]
    assert _op_types(out).count("QuantizeLinear") == 6
    assert _op_types(out).count("DequantizeLinear") == 9
    again, modified = _run(ExpandPlaceholdersPass(ORT), out)
    assert not modified and again == out


def test_expand_placeholders_leaves_plain_models_alone():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F32, [2])],
                   [helper.make_tensor_value_info("y", F32, [2])], {})
    out, modified = _run(ExpandPlaceholdersPass(ORT), model)
    assert not modified and _op_types(out) == ["Relu"]


def _placeholder(inputs, output, name, **attrs):
    node = helper.make_node("QDQ", inputs, [output], domain="qtrim", **attrs)
    node.attribute.append(helper.make_attribute("name", name))  # make_node's name= is the node name
    return node


def test_constant_node_weight_through_identity_becomes_integer_initializer():
    w = np.array([[0.5, -0.26], [0.1, 0.74]], np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Identity", ["w"], ["w2"]),
        _placeholder(["w2", "s", "z"], "wq", qmin=-127, qmax=127, bits=8, signed=1, name="m.weight", axis=1),
        helper.make_node("MatMul", ["x", "wq"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F32, [1, 2])],
                   [helper.make_tensor_value_info("y", F32, [1, 2])],
                   {"s": np.array([0.5 / 127, 0.74 / 127], np.float32), "z": np.zeros(2, np.float32)}, qtrim=True)
    out, modified = _run(ExpandPlaceholdersPass(ORT), model)
    assert modified
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    np.testing.assert_array_equal(inits["m.weight_quantized"], [[127, -45], [25, 127]])
    assert inits["m.weight_quantized"].dtype == np.int8 and inits["m.weight_zero_point"].dtype == np.int8
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert dq.name == "m.weight/DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == 1


def test_narrow_per_channel_activation_is_an_error():
    class Act(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.full((3,), 0.1))
            self.register_buffer("z", torch.zeros(3))

        def forward(self, x):
            return quant_dequant(x, self.s, self.z, -127, 127, 1, 8, True, "act.out")

    gm = torch.fx.symbolic_trace(Act())
    with pytest.raises(ExportError, match=r"'act.out'.*per-channel activation.*narrower than int8"):
        _run(ExpandPlaceholdersPass(ORT), _raw(gm, (torch.randn(2, 3),)))


def test_bad_scale_is_an_error():
    model = _model([_placeholder(["x", "s", "z"], "y", qmin=0, qmax=255, bits=8, signed=0, name="a")],
                   [helper.make_tensor_value_info("x", F32, [2])], [helper.make_tensor_value_info("y", F32, [2])],
                   {"s": np.array(0.0, np.float32), "z": np.array(0.0, np.float32)}, qtrim=True)
    with pytest.raises(ExportError, match=r"'a': scales must be finite and > 0"):
        _run(ExpandPlaceholdersPass(ORT), model)


def test_graph_output_keeps_its_name():
    model = _model([_placeholder(["x", "s", "z"], "y", qmin=0, qmax=255, bits=8, signed=0, name="a")],
                   [helper.make_tensor_value_info("x", F32, [2])], [helper.make_tensor_value_info("y", F32, [2])],
                   {"s": np.array(0.1, np.float32), "z": np.array(3.0, np.float32)}, qtrim=True)
    out, _ = _run(ExpandPlaceholdersPass(ORT), model)
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.node[-1].output == ["y"]


# -- FoldWeightLayoutPass -----------------------------------------------------------------------
def _weight_dq_model(layout_nodes, w_shape, x_shape, per_channel=True):
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, w_shape).astype(np.int8)
    c = w_shape[0]
    scale = (rng.random(c) * 0.1 + 0.01).astype(np.float32) if per_channel else np.array(0.05, np.float32)
    zp = np.zeros(scale.shape, np.int8)
    dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="m.weight/DequantizeLinear",
                          **({"axis": 0} if per_channel else {}))
    inits = {"wq": codes, "ws": scale, "wz": zp, "shape": np.array([4, 2, 3], np.int64)}
    return _model([dq, *layout_nodes], [helper.make_tensor_value_info("x", F32, x_shape)],
                  [helper.make_tensor_value_info("y", F32, None)], inits)


@pytest.mark.parametrize(
    ("layout", "w_shape", "x_shape", "new_shape", "new_axis"),
    [
        (helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), (4, 3), (2, 5, 3), (3, 4), 1),
        (helper.make_node("Reshape", ["w", "shape"], ["wt"]), (4, 6), (4, 2, 3), (4, 2, 3), 0),
        (helper.make_node("Identity", ["w"], ["wt"]), (4, 3), (2, 5, 4), (4, 3), 0),
    ],
)
def test_fold_weight_layout(layout, w_shape, x_shape, new_shape, new_axis):
    consumer = {"Transpose": "MatMul", "Reshape": "Add", "Identity": "Gemm"}[layout.op_type]
    args = ["x", "wt"] if consumer != "Gemm" else ["xg", "wt"]
    nodes = [layout, helper.make_node(consumer, args, ["y"], **({"transB": 1} if consumer == "Gemm" else {}))]
    if consumer == "Gemm":
        nodes.insert(0, helper.make_node("Flatten", ["x"], ["xg"], axis=2))
        x_shape = (2, 1, 3)
    model = _weight_dq_model(nodes, w_shape, x_shape)
    out, modified = _run(FoldWeightLayoutPass(), model)
    assert modified and layout.op_type not in _op_types(out)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits["wq"].shape == new_shape
    dq = out.graph.node[0]
    assert helper.get_attribute_value(dq.attribute[0]) == new_axis
    x = torch.randn(*x_shape)
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])
    assert not _run(FoldWeightLayoutPass(), out)[1]


def test_fold_weight_layout_leaves_unfoldable_patterns():
    # per-channel axis 0 (4 channels) does not survive a reshape to (2, 12)
    reshape = _weight_dq_model([helper.make_node("Reshape", ["w", "shape2"], ["wt"]),
                                helper.make_node("Add", ["x", "wt"], ["y"])], (4, 6), (2, 12))
    reshape.graph.initializer.append(numpy_helper.from_array(np.array([2, 12], np.int64), "shape2"))
    # the DQ output has a second reader
    shared = _weight_dq_model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                               helper.make_node("MatMul", ["x", "wt"], ["y1"]),
                               helper.make_node("Add", ["w", "w"], ["y"])], (4, 3), (2, 3))
    for model in (reshape, shared):
        out, modified = _run(FoldWeightLayoutPass(), model)
        assert not modified and out == ir.to_proto(ir.from_proto(model))


# -- MergeDuplicateQDQPass ------------------------------------------------------------------------
def _qdq(x, out, s, z, tag):
    return [helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}_q"], name=f"{tag}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [out], name=f"{tag}/DequantizeLinear")]


def _merge_model(nodes, extra_inits=None):
    inits = {"s1": np.array(0.05, np.float32), "z1": np.array(128, np.uint8),
             "s2": np.array(0.05, np.float32), "z2": np.array(128, np.uint8),  # same values, other tensors
             "s3": np.array(0.07, np.float32), "z3": np.array(128, np.uint8)}
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [4, 8])],
                  [helper.make_tensor_value_info("y", F32, [4, 8])], {**inits, **(extra_inits or {})})


def test_merge_sibling_duplicates_by_value():
    model = _merge_model([*_qdq("x", "a", "s1", "z1", "a"), *_qdq("x", "b", "s2", "z2", "b"),
                          helper.make_node("Add", ["a", "b"], ["y"])])
    out, modified = _run(MergeDuplicateQDQPass(), model)
    assert modified and _op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Add"]
    assert list(out.graph.node[-1].input) == ["a", "a"]
    x = torch.randn(4, 8) * 5
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])
    assert not _run(MergeDuplicateQDQPass(), out)[1]


def test_merge_collapses_back_to_back_identical_sites():
    model = _merge_model([*_qdq("x", "a", "s1", "z1", "a"), *_qdq("a", "b", "s2", "z2", "b"),
                          helper.make_node("Relu", ["b"], ["y"])])
    out, modified = _run(MergeDuplicateQDQPass(), model)
    assert modified
    out, _ = _run(ir.passes.common.RemoveUnusedNodesPass(), out)
    assert _op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    x = torch.randn(4, 8) * 5
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])


def test_merge_keeps_different_parameters():
    siblings = _merge_model([*_qdq("x", "a", "s1", "z1", "a"), *_qdq("x", "b", "s3", "z3", "b"),
                             helper.make_node("Add", ["a", "b"], ["y"])])
    chain = _merge_model([*_qdq("x", "a", "s1", "z1", "a"), *_qdq("a", "b", "s3", "z3", "b"),
                          helper.make_node("Relu", ["b"], ["y"])])
    for model in (siblings, chain):
        out, modified = _run(MergeDuplicateQDQPass(), model)
        assert not modified and len(out.graph.node) == 5


# -- RequantizeAfterShapeOpsPass ----------------------------------------------------------------
def _flatten_gemm(per_channel_act=False, reader="Gemm"):
    rng = np.random.default_rng(1)
    act_axis = {"axis": 1} if per_channel_act else {}
    s = np.full(3, 0.05, np.float32) if per_channel_act else np.array(0.05, np.float32)
    inits = {"s": s, "z": np.zeros(s.shape, np.uint8), "wq": rng.integers(-127, 128, (4, 3)).astype(np.int8),
             "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="pool.out/QuantizeLinear", **act_axis),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="pool.out/DequantizeLinear",
                              **act_axis),
             helper.make_node("Flatten", ["xd"], ["xf"], name="/Flatten"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="fc.weight/DequantizeLinear"),
             helper.make_node(reader, ["xf", "w"] if reader == "Gemm" else ["xf"], ["y"],
                              **({"transB": 1} if reader == "Gemm" else {}))]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3, 1, 1])],
                  [helper.make_tensor_value_info("y", F32, None)], inits)


def test_requantize_after_flatten_feeds_gemm_a_dq():
    model = _flatten_gemm()
    out, modified = _run(RequantizeAfterShapeOpsPass(), model)
    assert modified
    assert _op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Flatten", "QuantizeLinear",
                              "DequantizeLinear", "DequantizeLinear", "Gemm"]
    gemm = out.graph.node[-1]
    assert gemm.input[0] == "pool.out.flatten_dequantized"
    x = torch.rand(2, 3, 1, 1) * 10
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])
    assert not _run(RequantizeAfterShapeOpsPass(), out)[1]


def test_requantize_through_a_chain_shared_by_two_convs():
    rng = np.random.default_rng(2)
    inits = {"s": np.array(0.05, np.float32), "z": np.array(10, np.uint8),
             "wq": rng.integers(-127, 128, (2, 3, 1, 1)).astype(np.int8), "ws": np.array(0.01, np.float32),
             "wz": np.array(0, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x/DequantizeLinear"),
             helper.make_node("Transpose", ["xd"], ["xt"], perm=[0, 1, 3, 2]),
             helper.make_node("MaxPool", ["xt"], ["xp"], kernel_shape=[2, 2]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="c.weight/DequantizeLinear"),
             helper.make_node("Conv", ["xp", "w"], ["a"]), helper.make_node("Conv", ["xp", "w"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])],
                   [helper.make_tensor_value_info("y", F32, None)], inits)
    out, modified = _run(RequantizeAfterShapeOpsPass(), model)
    assert modified and _op_types(out).count("QuantizeLinear") == 2
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert {c.input[0] for c in convs} == {"x.maxpool_dequantized"}
    x = torch.randn(1, 3, 4, 4) * 3
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])
    assert not _run(RequantizeAfterShapeOpsPass(), out)[1]


@pytest.mark.parametrize("kwargs", [{"per_channel_act": True}, {"reader": "Relu"}])
def test_requantize_leaves_other_patterns(kwargs):
    out, modified = _run(RequantizeAfterShapeOpsPass(), _flatten_gemm(**kwargs))
    assert not modified and "QuantizeLinear" not in _op_types(out)[2:]


def _gather_pool(reader="ReduceMean"):
    """DQ -> Transpose -> GatherND -> Transpose -> reader -> Q: the dynamo exporter's adaptive pooling."""
    inits = {"s": np.array(0.05, np.float32), "z": np.array(10, np.uint8),
             "idx": np.array([[0], [2], [1]], np.int64), "os": np.array(0.04, np.float32),
             "oz": np.array(3, np.uint8), "axes": np.array([3], np.int64)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="relu/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="relu/DequantizeLinear"),
             helper.make_node("Transpose", ["xd"], ["xt"], perm=[2, 0, 1, 3]),
             helper.make_node("GatherND", ["xt", "idx"], ["xg"]),
             helper.make_node("Transpose", ["xg"], ["xb"], perm=[1, 2, 0, 3]),
             helper.make_node(reader, ["xb", "axes"] if reader == "ReduceMean" else ["xb"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "os", "oz"], ["pq"], name="pool/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["pq", "os", "oz"], ["y"], name="pool/DequantizeLinear")]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [1, 2, 3, 4])],
                  [helper.make_tensor_value_info("y", F32, None)], inits, opset=19)


@pytest.mark.parametrize("reader", ["ReduceMean", "Sigmoid"])
def test_requantize_every_reader_on_integer_only_targets(reader):
    model = _gather_pool(reader)
    same, modified = _run(RequantizeAfterShapeOpsPass(ORT), model)  # a float-capable target: left alone
    assert not modified and _op_types(same) == _op_types(model)
    out, modified = _run(RequantizeAfterShapeOpsPass(get_profile("qnn")), model)
    assert modified
    made_by = {o: n for n in out.graph.node for o in n.output}
    (op,) = [n for n in out.graph.node if n.op_type == reader]
    assert made_by[op.input[0]].op_type == "DequantizeLinear"  # reads a DQ: one integer group on the HTP
    assert list(made_by[op.input[0]].input[1:]) == ["s", "z"]  # the source's own grid
    x = torch.randn(1, 2, 3, 4) * 3
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(model, x)[0])  # exact: moved values stay on grid
    from onnx.reference import ReferenceEvaluator
    np.testing.assert_array_equal(ReferenceEvaluator(out).run(None, {"x": x.numpy()})[0],
                                  ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0])
    assert not _run(RequantizeAfterShapeOpsPass(get_profile("qnn")), out)[1]


# -- QuantizeBiasPass -----------------------------------------------------------------------------
def test_quantize_bias_int32():
    qnn = get_profile("qnn")
    gm, args = convnet(qnn)
    model = _run(ExpandPlaceholdersPass(qnn), _raw(gm, args, qnn))[0]
    model = _run(RequantizeAfterShapeOpsPass(), model)[0]  # fc reads pool.out through a Flatten
    out, modified = _run(QuantizeBiasPass(qnn), model)
    assert modified
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits["conv1.bias_quantized"].dtype == np.int32
    want_scale = inits["input_scale"] * inits["conv1.weight_scale"]
    np.testing.assert_array_equal(inits["conv1.bias_scale"], want_scale.astype(np.float32))
    np.testing.assert_array_equal(inits["conv1.bias_quantized"],
                                  np.rint(gm.conv1.bias.detach().numpy() / want_scale).astype(np.int32))
    assert {"conv1.bias/DequantizeLinear", "conv2.bias/DequantizeLinear", "fc.bias/DequantizeLinear"} <= {
        n.name for n in out.graph.node}
    assert not _run(QuantizeBiasPass(qnn), out)[1]
    assert not _run(QuantizeBiasPass(ORT), model)[1]  # bias="float": no-op


# -- NameAfterSitesPass / FinalizeModelPass -----------------------------------------------------
def test_module_of_site():
    assert module_of_site("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert module_of_site("layer1.0.relu.out") == "layer1.0.relu"
    assert module_of_site("x") == "x"


def test_name_after_sites_is_idempotent():
    gm, args = token_mixer(ORT)
    model = _run(ExpandPlaceholdersPass(ORT), _raw(gm, args))[0]
    model = _run(FoldWeightLayoutPass(), model)[0]
    out, modified = _run(NameAfterSitesPass(), model)
    assert modified
    names = {n.name for n in out.graph.node}
    assert {"qkv/MatMul", "qkv/Add", "proj/MatMul", "attn/MatMul"} <= names
    assert not _run(NameAfterSitesPass(), out)[1]


def test_finalize_drops_placeholder_domain_and_sets_ir_version():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F32, [2])],
                   [helper.make_tensor_value_info("y", F32, [2])], {}, qtrim=True)
    model.ir_version = 8
    out, modified = _run(FinalizeModelPass(ORT), model)
    assert modified and [o.domain for o in out.opset_import] == [""] and out.ir_version == 10
    assert not _run(FinalizeModelPass(ORT), out)[1]


def test_finalize_rejects_custom_ops_and_new_opsets():
    custom = _model([helper.make_node("Foo", ["x"], ["y"], domain="com.acme")],
                    [helper.make_tensor_value_info("x", F32, [2])], [helper.make_tensor_value_info("y", F32, [2])], {})
    custom.opset_import.append(helper.make_opsetid("com.acme", 1))
    with pytest.raises(ExportError, match=r"non-standard ops left.*com.acme::Foo"):
        _run(FinalizeModelPass(ORT), custom)
    new = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F32, [2])],
                 [helper.make_tensor_value_info("y", F32, [2])], {}, opset=21)
    with pytest.raises(ExportError, match=r"opset 21 but target 'tensorrt' parses at most 20"):
        _run(FinalizeModelPass(get_profile("tensorrt")), new)


def test_validate_model_reports_invalid_graphs():
    broken = _model([helper.make_node("Relu", ["nope"], ["y"])], [helper.make_tensor_value_info("x", F32, [2])],
                    [helper.make_tensor_value_info("y", F32, [2])], {})
    with pytest.raises(ExportError, match=r"not valid ONNX"):
        validate_model(broken)


# -- the whole pipeline ----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", "qnn"])
def test_pipeline_is_idempotent(target):
    prof = get_profile(target)
    gm, args = token_mixer(prof)
    final = run_qdq_passes(_raw(gm, args, prof), prof)
    result = qdq_passes(prof)(ir.from_proto(final))
    assert not result.modified
    again = run_qdq_passes(final, prof)
    for field in ("node", "initializer", "input", "output"):
        assert getattr(again.graph, field) == getattr(final.graph, field)
    assert sorted(v.name for v in again.graph.value_info) == sorted(v.name for v in final.graph.value_info)
