"""``x ** c`` on integer-only targets: ``DQ -> Pow(·, DQ(c)) -> Q``, no float op, and the file computes the lowered model.

Measured on the QNN HTP simulator (issue 20, QNN detailed profile): with a float exponent constant the HTP
dequantizes, runs a FLOAT_32 power and quantizes again (~2x the time of the block); with the exponent
dequantized (one exact code) the power runs on integers, as fast as ``x * x * x`` written with Q/DQ between.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check
from tests.helpers.htp import require_htp
from tests.helpers.qdq_files import export_for_target, output_lsb


class _GeluNew(nn.Module):  # Hugging Face's NewGELUActivation (GPT-2's "gelu_new"), as written there
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), _GeluNew(), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h - 0.1 * h ** 2)


def _batches(n: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 4, 16, generator=g),) for _ in range(n)]


def _export(target: str, path) -> tuple[object, tuple[torch.Tensor]]:
    return export_for_target(_Net, target, path, _batches(1)[0], _batches(3))


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_power_exports_as_an_integer_group_that_matches_the_lowered_model(target, tmp_path):
    path = tmp_path / f"{target}.onnx"
    qm, x = _export(target, path)
    assert check(str(path), target) == []
    assert [v for v in check(str(path), "qnn") if v.rule == "float_op"] == []
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    pows = [n for n in graph.node if n.op_type == "Pow"]
    assert len(pows) == 2
    for n in pows:  # base and exponent dequantized, the power read by its Q only
        assert [producer.get(i) for i in n.input] == ["DequantizeLinear", "DequantizeLinear"], n
        assert {u.op_type for u in graph.node if n.output[0] in u.input} == {"QuantizeLinear"}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x[0].numpy()})[0]
    with torch.no_grad():
        want = qtrim_fx.lower(qm, target)(*x).numpy()
    assert np.abs(got - want).max() <= 1.01 * output_lsb(graph)


def _pow_file(path, exponent_dequantized: bool) -> None:
    scalar = lambda name, v, t: numpy_helper.from_array(np.array(v, t), name)  # noqa: E731
    inits = [scalar("s", 0.02, np.float32), scalar("z", 128, np.uint8), scalar("s3", 0.07, np.float32)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    if exponent_dequantized:
        inits += [scalar("e_q", 1, np.uint8), scalar("e_s", 3.0, np.float32), scalar("e_z", 0, np.uint8)]
        nodes.append(helper.make_node("DequantizeLinear", ["e_q", "e_s", "e_z"], ["e"]))
    else:
        inits.append(scalar("e", 3.0, np.float32))
    nodes += [helper.make_node("Pow", ["xd", "e"], ["p"]), helper.make_node("QuantizeLinear", ["p", "s3", "z"], ["pq"]),
              helper.make_node("DequantizeLinear", ["pq", "s3", "z"], ["y"])]
    graph = helper.make_graph(nodes, "pow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_check_names_a_float_exponent_and_accepts_a_dequantized_one(tmp_path):
    _pow_file(tmp_path / "float.onnx", exponent_dequantized=False)
    found = [v for v in check(str(tmp_path / "float.onnx"), "qnn") if v.rule == "float_op"]
    assert [v.severity for v in found] == ["error"] and found[0].message.startswith("Pow ")
    assert "exponent 'e' is a float constant, not dequantized" in found[0].message
    _pow_file(tmp_path / "dq.onnx", exponent_dequantized=True)
    assert check(str(tmp_path / "dq.onnx"), "qnn") == []  # the exponent's codes are no weight


def test_qnn_power_runs_strictly_on_the_htp(tmp_path):
    require_htp()
    from qtrim_fx.verification.backend_worker import _assignment_info, _qnn_session

    path = tmp_path / "qnn.onnx"
    qm, _ = _export("qnn", path)
    x = _batches(5)[4][0]
    sess, _ = _qnn_session(ort, str(path), [x.numpy()], {})  # default options, strict (CPU fallback disabled)
    assert set(_assignment_info(sess)[1]) == {"QNNExecutionProvider"}
    got = sess.run(None, {"x": x.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        want = qtrim_fx.lower(qm, "qnn")(x).numpy().astype(np.float64)
    assert 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)) >= 30
