"""Written files say which target they were written for and which the model was prepared for; ``check`` of the
file alone uses that to give the right fix for a float op on an integer-only target."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.onnx import check


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_stamps_target_and_prepared_for(tmp_path) -> None:
    model, ex = get_model("tiny_convnet")
    for prepared_for in (None, "qnn"):
        qm = qtrim_fx.prepare(model, ex, target=prepared_for)
        qtrim_fx.calibrate(qm, [ex])
        qtrim_fx.set_blend(qm, 1.0)
        path = tmp_path / f"m_{prepared_for}.onnx"
        qtrim_fx.export_onnx(qm, ex, str(path), target="qnn")
        assert _props(path) == {"qtrim_fx.target": "qnn", "qtrim_fx.prepared_for": prepared_for or "none"}


def _float_softmax_file(path, prepared_for: str | None) -> None:
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Softmax", ["xd"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [s, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    if prepared_for:
        helper.set_model_props(model, {"qtrim_fx.target": "qnn", "qtrim_fx.prepared_for": prepared_for})
    onnx.save(model, str(path))


def test_check_tells_apart_a_model_not_prepared_for_the_target(tmp_path) -> None:
    for prepared_for, expect in ((None, "prepare the model with qtrim_fx.prepare"), ("none", "prepare the model"),
                                 ("qnn", "the model was prepared for 'qnn'")):
        path = tmp_path / f"f_{prepared_for}.onnx"
        _float_softmax_file(path, prepared_for)
        (v,) = [v for v in check(str(path), "qnn") if v.rule == "float_op" and v.severity == "error"]
        assert expect in v.message, (prepared_for, v.message)
        if prepared_for == "qnn":
            assert "qtrim_fx.prepare(" not in v.message
