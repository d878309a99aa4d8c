"""check(): clean on our exports for every target; finds violations planted in hand-made models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtrim_fx.onnx import ProfileError, Violation, check, get_profile
from tests.onnx.qdq_models import convnet, exported, token_mixer, upsampler

PROFILES = ("onnxruntime", "tensorrt", "qnn", "openvino", "npu")
INT4 = get_profile("onnxruntime").replace(opset=21, weight_bits=4)


@pytest.mark.parametrize("factory", [convnet, token_mixer, upsampler])
@pytest.mark.parametrize("target", [*PROFILES, INT4])
def test_our_exports_are_clean(factory, target, tmp_path):
    prof = get_profile(target)
    _, _, model = exported(factory, prof)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)

    def rules(found: list[Violation]) -> list[Violation]:
        # Float islands on integer-only targets (pooling inputs, attention slices) are reported as warnings
        # and not yet quantized by lowering; tests/onnx/test_check_islands.py pins what they are.
        return [v for v in found if v.rule != "float_op"]

    assert rules(check(model, prof)) == []
    assert rules(check(path, prof)) == []  # from a file too
    assert rules(check(ir.from_proto(model), prof)) == []


# -- a hand-made QDQ conv, then one planted violation at a time -------------------------------
def _build(
    *,
    act_dtype=np.uint8,
    act_zp=128,
    w_dtype=np.int8,
    w_zp=0,
    w_axis: int | None = 0,
    op="Conv",
    out_q=True,
    out_consumer="Relu",
    x_scale_shape=(),
    weight_storage="integer",
    opset=17,
    ir_version=10,
    drop_act_zp=False,
    x_dq_scale: float | None = None,
    y_scale: float = 0.05,
    w_codes: np.ndarray | None = None,
    bias_scale: float | None = None,
    w_scale_drop: int = 0,
    dynamic_x_scale: bool = False,
    float_op_before=False,
    extra_nodes=(),
):
    """x -> Q -> DQ -> op(W) [-> Q -> DQ] -> out_consumer -> y, W as int codes + DQ."""
    rng = np.random.default_rng(0)
    w_shape = {"Conv": (4, 3, 1, 1), "ConvTranspose": (3, 4, 1, 1), "Gemm": (3, 4)}[op]
    x_shape = [1, 3] if op == "Gemm" else [1, 3, 2, 2]
    c = w_shape[w_axis] if w_axis is not None else 1
    w_scale = np.full(c - w_scale_drop, 0.01, np.float32) if w_axis is not None else np.array(0.01, np.float32)
    inits = {
        "xs": np.full(x_scale_shape, 0.02, np.float32), "xz": np.full(x_scale_shape, act_zp, act_dtype),
        "ws": w_scale, "wz": np.full(w_scale.shape, w_zp, w_dtype),
        "ys": np.array(y_scale, np.float32), "yz": np.array(act_zp, act_dtype),
    }
    if x_dq_scale is not None:  # the DQ reads x's codes on a grid of its own
        inits["xs_dq"] = np.full(x_scale_shape, x_dq_scale, np.float32)
    axis = {} if w_axis is None else {"axis": w_axis}
    xq_inputs = ["x", "xs"] if drop_act_zp else ["x", "xs", "xz"]
    nodes = []
    if dynamic_x_scale:  # dynamic quantization: the scale is max|x| / 127 of each run
        inits["c127"] = np.array(127.0, np.float32)
        nodes += [helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0, name="x/ReduceMax"),
                  helper.make_node("Div", ["xmax", "c127"], ["xs_dyn"], name="x/Div")]
        xq_inputs[1] = "xs_dyn"
    nodes += [helper.make_node("QuantizeLinear", xq_inputs, ["xq"], name="x/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "xs_dyn" if dynamic_x_scale else "xs" if x_dq_scale is None
                                                      else "xs_dq", "xz"], ["xd"],
                              name="x/DequantizeLinear")]
    if weight_storage == "none":  # the weight never quantized: a float initializer read by the op itself
        inits["wd"] = rng.standard_normal(w_shape).astype(np.float32) * 0.05
        inits.pop("ws"), inits.pop("wz")
    elif weight_storage == "integer":
        inits["wq"] = (rng.integers(-7, 8, w_shape) if w_codes is None else np.broadcast_to(w_codes, w_shape)
                       ).astype(w_dtype)
    else:
        inits["wf"] = rng.standard_normal(w_shape).astype(np.float32) * 0.05
        nodes.append(helper.make_node("QuantizeLinear", ["wf", "ws", "wz"], ["wq"], name="w/QuantizeLinear", **axis))
    if weight_storage != "none":
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w/DequantizeLinear",
                                      **axis))
    if float_op_before:
        nodes.append(helper.make_node("Relu", ["xd"], ["xr"], name="m/Relu_in"))
    op_inputs = ["xr" if float_op_before else "xd", "wd"]
    if bias_scale is not None:  # an int32 bias on its own grid (input x weight scale: 0.02 x 0.01 = 2e-4)
        c_out = w_shape[1] if op in ("ConvTranspose", "Gemm") else w_shape[0]
        inits["bq"] = rng.integers(-3000, 3000, c_out).astype(np.int32)
        inits["bs"] = np.array(bias_scale, np.float32)
        inits["bz"] = np.array(0, np.int32)
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], name="b/DequantizeLinear"))
        op_inputs.append("bd")
    nodes.append(helper.make_node(op, op_inputs, ["c"], name=f"m/{op}"))
    src = "c"
    if out_q:
        nodes += [helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"], name="c/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["cd"], name="c/DequantizeLinear")]
        src = "cd"
    pool = {"kernel_shape": [1, 1]} if out_consumer == "MaxPool" else {}
    nodes.append(helper.make_node(out_consumer, [src, src] if out_consumer == "Add" else [src], ["y"],
                                  name=f"m/{out_consumer}", **pool))
    nodes += list(extra_nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _rules(model, target) -> list[tuple[str, str]]:
    """The rules broken (float islands aside: the planted models are not complete QDQ groups)."""
    return sorted({(v.rule, v.severity) for v in check(model, target) if v.rule != "float_op"})


def test_hand_made_baseline_is_clean():
    assert check(_build(), "onnxruntime") == []
    assert check(_build(act_dtype=np.int8, act_zp=0, out_q=False), "tensorrt") == []


@pytest.mark.parametrize(
    ("kwargs", "target", "expected"),
    [
        # the Q without a zero point writes on zero point 0, its DQ reads on 128: a shifted pair as well
        ({"drop_act_zp": True}, "onnxruntime", [("qdq_pair_mismatch", "error"), ("zero_point_missing", "error")]),
        ({"x_scale_shape": (1,)}, "onnxruntime", [("scale_not_scalar", "error")]),
        ({"x_dq_scale": 0.03}, "onnxruntime", [("qdq_pair_mismatch", "error")]),  # every x read as 1.5 x
        ({"x_dq_scale": 0.02 * (1 + 1e-8)}, "onnxruntime", []),  # float noise in a re-written scale
        ({"y_scale": 1e30}, "onnxruntime", [("scale_range", "warning")]),  # a diverged net's activations, or a mask
        ({"y_scale": 1.3e36}, "onnxruntime", [("scale_range", "error")]),  # finfo.min calibrated in (session 35)
        ({"y_scale": 4e6}, "onnxruntime", [("scale_range", "warning")]),  # 255 steps span 1e9: a -1e9 mask?
        ({"y_scale": 3e3}, "onnxruntime", []),  # 255 steps span 7.7e5: below the rule's 1e6
        ({"y_scale": 100.0}, "onnxruntime", []),  # outliers of a large transformer: |x| up to 2.5e4
        ({"bias_scale": 0.02 * 0.01}, "onnxruntime", []),
        ({"bias_scale": 3 * 0.02 * 0.01}, "onnxruntime", [("bias_grid", "error")]),
        ({"bias_scale": 3 * 0.02 * 0.01, "op": "Gemm", "w_axis": 1}, "onnxruntime", [("bias_grid", "error")]),
        ({"w_scale_drop": 1}, "onnxruntime", [("scale_channels", "error")]),  # 3 scales for 4 channels
        ({"dynamic_x_scale": True}, "onnxruntime", [("runtime_qparams", "warning")]),  # runs, in float
        ({"dynamic_x_scale": True, "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt",
         [("runtime_qparams", "error")]),
        ({"w_codes": np.zeros(1)}, "onnxruntime", [("weight_all_zero", "warning")]),
        ({"w_codes": np.array([-128, 5, 127]).reshape(1, 3, 1, 1), "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt",
         [("weight_narrow_range", "warning")]),
        ({"out_q": False}, "tensorrt", [("activation_dtype", "error")]),
        ({"act_dtype": np.int8, "act_zp": 3, "out_q": False}, "tensorrt", [("activation_zero_point", "error")]),
        ({"act_dtype": np.uint8, "act_zp": 0}, "qnn", []),
        ({"weight_storage": "float"}, "onnxruntime", [("weight_float_storage", "warning")]),
        ({"weight_storage": "none"}, "onnxruntime", [("weight_float", "warning")]),  # runs, as a float Conv
        ({"weight_storage": "none", "act_dtype": np.uint8, "act_zp": 0}, "qnn", [("weight_float", "error")]),
        ({"weight_storage": "none", "op": "Gemm", "w_axis": None}, "onnxruntime", [("weight_float", "warning")]),
        ({"w_dtype": np.uint8, "w_zp": 0, "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt",
         [("weight_dtype", "error")]),
        ({"w_zp": 2}, "onnxruntime", [("weight_zero_point", "error")]),
        ({"w_axis": 1}, "onnxruntime", [("weight_axis", "error")]),
        ({"op": "ConvTranspose", "w_axis": 0}, "onnxruntime", [("weight_axis", "error")]),
        ({"op": "ConvTranspose", "w_axis": 1}, "onnxruntime", []),
        ({"op": "ConvTranspose", "w_axis": 0, "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt", []),
        ({"op": "Gemm", "w_axis": 0}, "onnxruntime", [("weight_axis", "error")]),  # transB=0: want axis 1
        ({"act_dtype": np.int8, "act_zp": 5}, "npu", [("weight_per_channel", "error")]),
        ({"w_axis": None, "act_dtype": np.int8, "act_zp": 5}, "npu", []),
        ({"out_q": False, "out_consumer": "MaxPool",
          "extra_nodes": [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"])]},
         "onnxruntime", [("op_output_not_quantized", "warning")]),
        ({"out_q": False}, "onnxruntime", []),  # read only as the model's output: left float on purpose
        ({"act_dtype": np.int8, "act_zp": 0, "out_consumer": "Add"}, "tensorrt", [("op_output_quantized", "warning")]),
        ({"act_dtype": np.int8, "act_zp": 0, "out_consumer": "MaxPool"}, "tensorrt", []),  # next op's input Q
        ({"out_q": False}, "openvino", []),  # openvino takes both placements
        ({"float_op_before": True}, "onnxruntime", [("op_input_not_dequantized", "warning")]),
        ({"float_op_before": True, "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt", []),
        ({"opset": 21, "act_dtype": np.int8, "act_zp": 0, "out_q": False}, "tensorrt", [("opset_too_new", "error")]),
        ({"ir_version": 11}, "onnxruntime", [("ir_version", "error")]),
        ({"opset": 11, "ir_version": 6}, "onnxruntime", [("opset_per_channel", "error")]),
    ],
)
def test_planted_violations(kwargs, target, expected):
    assert _rules(_build(**kwargs), target) == expected


def _with_int4_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    ir_model = ir.from_proto(model)
    for name in ("wq", "wz"):
        value = ir_model.graph.initializers[name]
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.int8), dtype=ir.DataType.INT4, name=name)
        value.type = ir.TensorType(ir.DataType.INT4)
    return ir.to_proto(ir_model)


def test_int4_rules():
    assert _rules(_with_int4_weights(_build(opset=21)), "onnxruntime") == []
    assert _rules(_with_int4_weights(_build(opset=19)), "onnxruntime") == [("int4_opset", "error")]
    trt = _with_int4_weights(_build(opset=21, act_dtype=np.int8, act_zp=0, out_q=False))
    assert _rules(trt, "tensorrt") == [("int4_not_allowed", "error"), ("opset_too_new", "error")]


def _softmax_model(q_after: bool) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    if q_after:
        nodes = [helper.make_node("Softmax", ["x"], ["p"], name="attn/Softmax"),
                 helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="p/QuantizeLinear"),
                 helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"], name="p/DequantizeLinear")]
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x/QuantizeLinear"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x/DequantizeLinear"),
                 helper.make_node("Softmax", ["xd"], ["y"], name="attn/Softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("q_after", [False, True])
def test_softmax_must_stay_float(q_after):
    found = check(_softmax_model(q_after), "onnxruntime")
    assert [(v.rule, v.node) for v in found] == [
        ("softmax_quantized", "p/QuantizeLinear" if q_after else "x/DequantizeLinear")]


def test_non_standard_ops_are_reported():
    model = _build(extra_nodes=[helper.make_node("QDQ", ["x"], ["junk"], domain="qtrim", name="/QDQ")])
    model.opset_import.append(helper.make_opsetid("qtrim", 1))
    found = check(model, "onnxruntime")
    assert [(v.rule, v.node) for v in found] == [("non_standard_op", "/QDQ")]
    assert "qtrim::QDQ" in found[0].message


def test_violation_reads_well():
    v = Violation("weight_axis", "w/DequantizeLinear", "use axis 0")
    assert str(v) == "[error] weight_axis at w/DequantizeLinear: use axis 0"


def test_unknown_target():
    with pytest.raises(ProfileError, match=r"unknown target"):
        check(_build(), "edgetpu")


def test_tensorrt_view_requantized_is_an_input_q(tmp_path):
    """Conv -> ReLU -> Q/DQ -> Flatten -> Q/DQ -> Gemm: the ReLU-output Q is the Gemm's input Q (seen through
    the re-quantized view), not an op-output Q that blocks fusion (it was reported as one)."""
    import warnings

    import torch
    from torch import nn

    import qtrim_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, (x[:1],))
        qtrim_fx.calibrate(qm, [x])
        path = tmp_path / "trt.onnx"
        qtrim_fx.export_onnx(qm, (x[:1],), path, target="tensorrt")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "Flatten" in ops  # the view is re-quantized
    assert [str(v) for v in check(str(path), "tensorrt")] == []


def test_mismatched_pair_changes_what_onnx_runtime_computes():
    """The pair rule names a real change: ONNX Runtime's output moves with the DQ's own scale."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 2, 2)).astype(np.float32)
    outs = []
    for model in (_build(), _build(x_dq_scale=0.03)):
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": x})[0])
    assert not np.allclose(outs[0], outs[1])  # the file computes something else
    assert _rules(_build(), "onnxruntime") == []
    assert [v.rule for v in check(_build(x_dq_scale=0.03), "onnxruntime")] == ["qdq_pair_mismatch"]


def test_a_bias_off_its_grid_is_two_models_in_onnx_runtime():
    """Why bias_grid is an error: ONNX Runtime's fused QGemm adds the int32 codes on x_scale * w_scale."""
    import onnxruntime as ort

    x = np.random.default_rng(2).uniform(0, 1, (1, 3)).astype(np.float32)

    def run(model, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    off, on = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    kw = {"op": "Gemm", "w_axis": 1, "out_consumer": "Identity"}
    good, bad = _build(bias_scale=0.02 * 0.01, **kw), _build(bias_scale=3 * 0.02 * 0.01, **kw)
    np.testing.assert_allclose(run(good, off), run(good, on), atol=0.05 + 1e-6)  # one output step at most
    assert np.abs(run(bad, off) - run(bad, on)).max() > 0.2  # the fused kernel reads the bias on another grid
    assert [v.rule for v in check(good, "onnxruntime")] == []
    assert [v.rule for v in check(bad, "onnxruntime")] == ["bias_grid"]


@pytest.mark.parametrize("target", ["onnxruntime", "qnn"])
def test_an_excluded_layer_exports_with_its_float_weight_named(tmp_path, target):
    """A layer an Override excludes keeps a float weight: export writes the file and names it; check names it
    as a warning on ONNX Runtime (a float Gemm) and as an error on an integer-only target."""
    import warnings

    import torch
    from torch import nn

    import qtrim_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    config = qtrim_fx.QuantConfig(target=target, overrides=(qtrim_fx.Override(name="2", exclude=True),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, (x,), config=config)
        qtrim_fx.calibrate(qm, [(torch.randn(4, 6),) for _ in range(2)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qtrim_fx.export_onnx(qm.eval(), (x,), str(path), target=target)
    assert any("weight_float" in str(w.message) and "'2.weight'" in str(w.message) for w in caught)
    found = [v for v in check(str(path), target) if v.rule == "weight_float"]
    assert len(found) == 1 and "'2.weight'" in found[0].message
    assert found[0].severity == ("error" if target == "qnn" else "warning")


def test_a_pair_whose_scales_differ_only_in_shape_is_one_grid():
    model = _build(x_dq_scale=0.02)  # the DQ reads its own initializer, same value
    init = next(t for t in model.graph.initializer if t.name == "xs_dq")
    init.CopyFrom(numpy_helper.from_array(np.array([0.02], np.float32), "xs_dq"))  # shape (1,) vs ()
    assert "qdq_pair_mismatch" not in {v.rule for v in check(model, "onnxruntime")}
