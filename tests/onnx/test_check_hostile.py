"""check() and ``qtrim check`` on broken and hostile files: never "0 violations", never a hang.

Each test plants one defect in a small valid QDQ model (x -> Q -> DQ -> Conv(DQ(W)) -> y) that
passes every rule of every target.
"""

from __future__ import annotations

import contextlib
import io
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.onnx import check
from qtrim_fx.tools.cli import main

TARGETS = ("onnxruntime", "tensorrt", "qnn", "openvino", "npu")


def _qdq_model(x_scale: float = 0.02, quantized: bool = True) -> onnx.ModelProto:
    """A valid symmetric int8 QDQ conv (clean for tensorrt and openvino), or its float twin."""
    w = (np.arange(4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3) % 7 - 3) * 0.01
    inits = {"xs": np.array(x_scale, np.float32), "xz": np.array(0, np.int8),
             "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8), "wq": np.round(w / 0.01).astype(np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w/DequantizeLinear"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="m/Conv", pads=[1, 1, 1, 1])]
    if not quantized:
        inits = {"w": w}
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="m/Conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _errors(found) -> set[str]:
    return {v.rule for v in found if v.severity == "error"}


def _error_list(found) -> list[tuple[str, str]]:
    return [(v.rule, v.node) for v in found if v.severity == "error"]


def _cli(path, target: str = "onnxruntime") -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check", str(path), "--target", target])
    return code, out.getvalue()


def test_baseline_is_clean_for_every_target(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(_qdq_model(), path)
    for target in TARGETS:
        if target != "qnn":  # qnn takes uint8/uint16 activations only
            assert _error_list(check(path, target)) == [], target
    assert check(path, "tensorrt") == []
    code, out = _cli(path, "tensorrt")
    assert code == 0 and "0 violation(s)" in out


def test_zero_byte_file_is_invalid(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "invalid_model" in _errors(check(path, "onnxruntime"))
    code, out = _cli(path)
    assert code == 1 and "0 violation(s)" not in out and "invalid_model" in out


def test_unparseable_file_is_a_violation_not_a_traceback(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(_qdq_model().SerializeToString()[:57] + b"\xff\xff\xff")
    (found,) = check(path, "tensorrt")
    assert found.rule == "invalid_model" and "does not parse" in found.message


def test_cycle_is_invalid():
    model = _qdq_model()
    model.graph.node[0].input[0] = "y"  # Q reads the Conv output: Q -> DQ -> Conv -> Q
    found = check(model, "onnxruntime")
    assert "invalid_model" in _errors(found)
    assert "topologically sorted" in next(v.message for v in found if v.rule == "invalid_model")


def test_dangling_input_is_invalid():
    model = _qdq_model()
    model.graph.node[3].input[1] = "nothing_produces_this"
    assert "invalid_model" in _errors(check(model, "openvino"))


@pytest.mark.parametrize("target", TARGETS)
def test_float_model_has_no_quantized_op(target):
    found = check(_qdq_model(quantized=False), target)
    assert [(v.rule, v.severity) for v in found] == [("no_quantized_op", "error")]


@pytest.mark.parametrize("scale", [0.0, math.nan, -1.0, 1e-45, math.inf])
def test_bad_scale_values(scale, tmp_path):
    model = _qdq_model(x_scale=scale)
    assert onnx.checker.check_model(model, full_check=True) is None  # valid ONNX, broken arithmetic
    found = check(model, "tensorrt")
    assert [(v.rule, v.node) for v in found] == [("scale_value", "x/QuantizeLinear"),
                                                 ("scale_value", "x/DequantizeLinear")]
    path = tmp_path / "s.onnx"
    onnx.save(model, path)
    assert _cli(path, "tensorrt")[0] == 1


def test_subnormal_per_channel_scale_names_the_channel():
    model = _qdq_model()
    ws = np.array([0.01, 0.01, 1e-40, 0.01], np.float32)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(ws, "ws"))
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.zeros(4, np.int8), "wz"))
    model.graph.node[2].attribute.append(helper.make_attribute("axis", 0))
    (found,) = check(model, "tensorrt")
    assert found.rule == "scale_value" and "channel 2" in found.message and "subnormal" in found.message


# -- external data ---------------------------------------------------------------------------
def _relocate(path: str, location: str) -> None:
    """Point every external tensor of the file at ``location``."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def _external(tmp_path, location: str = "m.data") -> str:
    """The model saved in ``tmp_path/model`` with every tensor in ``m.data``, then relocated."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = str(folder / "m.onnx")
    onnx.save_model(_qdq_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    _relocate(path, location)
    return path


def test_external_data_inside_the_folder_is_fine(tmp_path):
    path = _external(tmp_path)
    assert check(path, "tensorrt") == []
    assert check(onnx.load(path), "tensorrt") == []  # loaded with its data


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(where, tmp_path):
    path = _external(tmp_path)
    folder = os.path.dirname(path)
    secret = tmp_path / "secret.data"  # a real file with the right bytes: onnx-ir would happily read it
    os.replace(os.path.join(folder, "m.data"), secret)
    if where == "symlink":
        os.symlink(secret, os.path.join(folder, "link.data"))
    _relocate(path, {"parent": "../secret.data", "absolute": str(secret), "symlink": "link.data"}[where])
    found = check(path, "onnxruntime")
    assert [v.rule for v in found] == ["external_data"]
    assert "refuse" in found[0].message and "more tensor(s)" in found[0].message  # one line for the file
    assert _cli(path)[0] == 1


def test_external_data_absolute_in_memory_model_is_refused(tmp_path):
    model = onnx.load(_external(tmp_path, "/etc/hostname"), load_external_data=False)
    assert [v.rule for v in check(model, "onnxruntime")] == ["external_data"]


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_external_data_fifo_does_not_hang(tmp_path):
    path = _external(tmp_path, "pipe")
    os.remove(os.path.join(os.path.dirname(path), "m.data"))
    os.mkfifo(os.path.join(os.path.dirname(path), "pipe"))  # opening it for reading blocks forever
    found = check(path, "onnxruntime")
    assert [v.rule for v in found] == ["external_data"] and "FIFO" in found[0].message
    assert _cli(path)[0] == 1


def test_external_data_file_too_short(tmp_path):
    path = _external(tmp_path)
    with open(os.path.join(os.path.dirname(path), "m.data"), "r+b") as f:
        f.truncate(10)
    found = check(path, "onnxruntime")
    assert [v.rule for v in found] == ["external_data"] and "needs" in found[0].message


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_model_path_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="FIFO"):
        check(fifo, "onnxruntime")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check(tmp_path / "missing.onnx", "onnxruntime")
