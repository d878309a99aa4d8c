"""FuseGeluPass: exact GELU decompositions become one Gelu op for profiles that ask (qnn), values unchanged."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qtrim_fx.core.errors import ProfileError
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.check import check
from qtrim_fx.onnx.fuse_gelu import FuseGeluPass
from tests.helpers.cpu import u8s8_kernels_saturate

QNN = get_profile("qnn")
SHAPE = [2, 5, 8]


def _c(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _model(body: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 20) -> onnx.ModelProto:
    """``x -> Q -> DQ -> xd -> body -> g -> Q -> DQ -> y``: GELU between an input DQ and an output Q."""
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        *body,
        helper.make_node("QuantizeLinear", ["g", "s", "z"], ["gq"]),
        helper.make_node("DequantizeLinear", ["gq", "s", "z"], ["y"]),
    ]
    inits = [_c("s", 0.02), numpy_helper.from_array(np.array(128, np.uint8), "z"), *inits]
    graph = helper.make_graph(qdq, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _erf(order: str, scale_op: str = "Div") -> onnx.ModelProto:
    k = math.sqrt(2.0) if scale_op == "Div" else 1.0 / math.sqrt(2.0)
    body = [helper.make_node(scale_op, ["xd", "k"], ["t"]), helper.make_node("Erf", ["t"], ["e"], name="erf"),
            helper.make_node("Add", ["e", "one"], ["u"])]
    body += {
        "u*half*x": [helper.make_node("Mul", ["u", "half"], ["v"]), helper.make_node("Mul", ["xd", "v"], ["g"])],
        "u*x*half": [helper.make_node("Mul", ["u", "xd"], ["v"]), helper.make_node("Mul", ["v", "half"], ["g"])],
        "x*half*u": [helper.make_node("Mul", ["xd", "half"], ["v"]), helper.make_node("Mul", ["v", "u"], ["g"])],
    }[order]
    return _model(body, [_c("k", k), _c("one", 1.0), _c("half", 0.5)])


def _tanh() -> onnx.ModelProto:
    body = [
        helper.make_node("Pow", ["xd", "three"], ["x3"]), helper.make_node("Mul", ["x3", "a"], ["ax3"]),
        helper.make_node("Add", ["xd", "ax3"], ["inner"]), helper.make_node("Mul", ["inner", "k"], ["t"]),
        helper.make_node("Tanh", ["t"], ["e"], name="tanh"), helper.make_node("Add", ["e", "one"], ["u"]),
        helper.make_node("Mul", ["xd", "half"], ["v"]), helper.make_node("Mul", ["v", "u"], ["g"]),
    ]
    return _model(body, [_c("three", 3.0), _c("a", 0.044715), _c("k", math.sqrt(2 / math.pi)), _c("one", 1.0),
                         _c("half", 0.5)])


def _run_pass(model: onnx.ModelProto, profile=QNN) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.from_proto(model)
    result = FuseGeluPass(profile)(ir_model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.modified


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0], ReferenceEvaluator(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("model", [
    _erf("u*half*x"), _erf("u*x*half"), _erf("x*half*u"), _erf("u*half*x", scale_op="Mul"), _tanh(),
], ids=["erf_u_half_x", "erf_u_x_half", "erf_x_half_u", "erf_mul_inv_sqrt2", "tanh"])
def test_decomposed_gelu_becomes_one_gelu_with_the_same_values(model):
    fused, modified = _run_pass(model)
    assert modified
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "Gelu", "QuantizeLinear", "DequantizeLinear"]
    gelu = fused.graph.node[2]
    assert list(gelu.input) == ["xd"] and list(gelu.output) == ["g"]
    want = "tanh" if "Tanh" in [n.op_type for n in model.graph.node] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in gelu.attribute}
    assert attrs.get("approximate", b"none") in ((want or "none").encode(), want or "none")
    x = np.random.default_rng(0).uniform(-2.5, 2.5, SHAPE).astype(np.float32)
    before_ort, _ = _outputs(model, x)
    after_ort, after_ref = _outputs(fused, x)
    # Same function up to float rounding; after the output Q, at most one code apart at a rounding tie.
    assert np.abs(after_ort - before_ort).max() <= 0.02 + 1e-6
    assert np.mean(after_ort != before_ort) < 0.02
    np.testing.assert_allclose(after_ref, after_ort, atol=1e-6)


def test_near_misses_are_left_alone():
    wrong_constant = _erf("u*half*x")
    for init in wrong_constant.graph.initializer:
        if init.name == "k":
            init.CopyFrom(_c("k", 2.0))
    shared = _erf("u*half*x")  # the Erf output has a second reader: fusing would drop it
    shared.graph.node.append(helper.make_node("Identity", ["e"], ["e2"]))
    shared.graph.output.append(helper.make_tensor_value_info("e2", TensorProto.FLOAT, SHAPE))
    for model in (wrong_constant, shared):
        out, modified = _run_pass(model)
        assert not modified and "Erf" in [n.op_type for n in out.graph.node]


def test_only_profiles_that_ask_and_only_from_opset_20():
    assert not _run_pass(_erf("u*half*x"), get_profile("onnxruntime"))[1]
    assert _run_pass(_erf("u*half*x"), QNN)[1]  # qnn at opset 20: fused
    old = _erf("u*half*x")
    old.opset_import[0].version = 17
    assert not _run_pass(old)[1]
    with pytest.raises(ProfileError, match="opset >= 20"):
        QNN.replace(opset=17)


def test_check_flags_erf_only_for_profiles_that_need_gelu_fused(tmp_path):
    path = tmp_path / "erf.onnx"
    onnx.save(_erf("u*half*x"), path)
    rules = {v.rule for v in check(path, "qnn")}
    assert "unfused_gelu" in rules
    assert "unfused_gelu" not in {v.rule for v in check(path, "onnxruntime")}
    fused = tmp_path / "gelu.onnx"
    onnx.save(_run_pass(_erf("u*half*x"))[0], fused)
    assert "unfused_gelu" not in {v.rule for v in check(fused, "qnn")}


def test_qnn_export_of_a_gelu_mlp_runs_strictly_on_the_htp(tmp_path):
    """End to end: the qnn file has Gelu (no Erf), passes check, and the HTP takes every node."""
    import importlib.util
    import platform
    import sys

    import torch

    import qtrim_fx
    from qtrim_fx.runtime.prepared import set_blend
    from qtrim_fx.verification.run import verify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    prepared = qtrim_fx.prepare(model, (x,))
    qtrim_fx.calibrate(prepared, [torch.randn(4, 16) for _ in range(4)])
    set_blend(prepared, 1.0)
    path = tmp_path / "mlp.qnn.onnx"
    qtrim_fx.export_onnx(prepared, (x,), path, target="qnn")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "Gelu" in ops and "Erf" not in ops
    assert check(path, "qnn") == []
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("onnxruntime-qnn is part of the dev extra on Linux x86-64: pip install -e '.[dev]'")
        return
    prepared.eval()
    # ORT's fused int8 kernels saturate on x86 without VNNI (tests/onnx/test_unsigned_weights.py): QDQ semantics there
    cpu = "onnxruntime-noopt" if u8s8_kernels_saturate() else "onnxruntime"
    report = verify(path, prepared, [x], backends=[cpu, "qnn"], min_sqnr_db=25)
    by = {b.backend: b for b in report.backends}
    assert by["qnn"].status == "ok", by["qnn"].message
    assert list(by["qnn"].ep_nodes) == ["QNNExecutionProvider"]
    assert report.ok(), report.failures()
