"""GELU on an integer-only target without a ``Gelu`` op (``npu``, opset 13): every primitive in a DQ -> op -> Q group.

Before ``DecomposeGeluPass`` the file held ``Div -> Erf -> Add -> Mul -> Mul`` between the GELU's input and
output sites, all float (``check(path, "npu")``: 5 ``float_op`` errors per GELU; timm convnext_atto: 162).
Now each primitive reads dequantized tensors (its constant one exact code) and is read by its Q only, the
file computes the lowered model on ONNX Runtime, and ``qnn`` still writes one ``Gelu`` op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check
from tests.helpers.qdq_files import export_for_target, output_lsb

_GELU_OPS = {"none": ["Div", "Erf", "Add", "Mul", "Mul"],
             "tanh": ["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]}


class _Net(nn.Module):
    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.conv, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.GELU(approximate=approximate)
        self.fc, self.act2 = nn.Linear(8, 6), nn.GELU(approximate=approximate)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x)).mean((2, 3))
        return self.head(self.act2(self.fc(h)))


def _batches(n: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, 8, 8, generator=g),) for _ in range(n)]


def _export(target: str, approximate: str, path) -> tuple[object, tuple[torch.Tensor]]:
    return export_for_target(lambda: _Net(approximate), target, path, _batches(1)[0], _batches(3))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_npu_gelu_is_integer_groups_that_match_the_lowered_model(approximate, tmp_path):
    path = tmp_path / "npu.onnx"
    qm, x = _export("npu", approximate, path)
    assert [v for v in check(str(path), "npu") if v.rule == "float_op"] == []
    assert check(str(path), "npu") == []
    model = onnx.load(str(path))
    graph = model.graph
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {13}  # no Gelu op
    producer = {o: n.op_type for n in graph.node for o in n.output}
    compute = [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]
    gelus = [n for n in compute if n.op_type in _GELU_OPS[approximate] and n.op_type != "Add"]  # Add: biases too
    expected = [op for op in _GELU_OPS[approximate] if op != "Add"]
    assert sorted(n.op_type for n in gelus) == sorted(2 * expected)
    for n in gelus:  # every input dequantized (constants too: one exact code), the output read by its Q only
        assert {producer.get(i) for i in n.input} == {"DequantizeLinear"}, n
        assert {u.op_type for u in graph.node if n.output[0] in u.input} == {"QuantizeLinear"}, n
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x[0].numpy()})[0]
    with torch.no_grad():
        want = qtrim_fx.lower(qm, "npu")(*x).numpy()
    assert np.abs(got - want).max() <= 1.01 * output_lsb(graph)


def test_qnn_keeps_one_gelu_op(tmp_path):
    path = tmp_path / "qnn.onnx"
    _export("qnn", "none", path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Gelu") == 2 and "Erf" not in ops and "Div" not in ops
    assert [v for v in check(str(path), "qnn") if v.rule == "float_op"] == []
