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


_VIT = {"batch_size": 1, "image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2}


def _vit_prepared_for(target: str | None):
    import warnings

    model, ex = get_model("vit_tiny", **_VIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, ex, target=target)
        qtrim_fx.calibrate(qm, [get_model("vit_tiny", **_VIT, seed=s)[1] for s in range(1, 3)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), ex


def test_export_defaults_to_the_target_the_model_was_prepared_for(tmp_path) -> None:
    """``prepare(target="qnn")`` then ``export_onnx`` without a target writes the qnn file (attention scores
    quantized, which onnxruntime's rules refuse); a model prepared for every target still defaults to onnxruntime."""
    import warnings

    for prepared_for, written_for in (("qnn", "qnn"), (None, "onnxruntime")):
        qm, ex = _vit_prepared_for(prepared_for)
        path = tmp_path / f"vit_{prepared_for}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qtrim_fx.export_onnx(qm, ex, str(path))
        assert _props(path)["qtrim_fx.target"] == written_for
        assert not [v for v in check(str(path), written_for) if v.severity == "error"]
        if prepared_for == "qnn":  # the scores' Q/DQ around Softmax are in the file, as trained
            m = onnx.load(str(path))
            producers = {o: n for n in m.graph.node for o in n.output}
            softmax = [n for n in m.graph.node if n.op_type == "Softmax"]
            assert softmax and all(producers[n.input[0]].op_type == "DequantizeLinear" for n in softmax)


def test_export_for_another_target_names_the_prepared_one(tmp_path) -> None:
    import pytest

    qm, ex = _vit_prepared_for("qnn")
    with pytest.raises(qtrim_fx.ExportError, match=r"prepared for 'qnn'.*target='qnn'") as info:
        qtrim_fx.export_onnx(qm, ex, str(tmp_path / "vit.onnx"), target="onnxruntime")
    assert "softmax" in str(info.value).lower()
    assert not (tmp_path / "vit.onnx").exists()
