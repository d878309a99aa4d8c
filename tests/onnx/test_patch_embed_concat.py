"""A conv output that reaches a Concat through views (a ViT's patch embedding + class token).

OpenVINO 2026.4 mis-computes ``Conv -> Q/DQ -> Reshape -> Transpose -> [Q/DQ] -> Concat`` (its
result drifts by whole classes: 68 % top-1 agreement with ONNX Runtime on a trained digits ViT),
while the same graph without a Q/DQ between the Conv and the Concat agrees exactly. So the site on
such a conv output has the role "output": ONNX Runtime keeps it (QLinearConv needs it), the
inputs-only profiles (openvino, tensorrt) drop it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qtrim_fx
from tests.helpers.cpu import for_this_cpu


class PatchEmbedCat(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    qm = qtrim_fx.prepare(PatchEmbedCat().eval())
    qtrim_fx.calibrate(qm, [x])
    return qm, x


def test_conv_output_into_concat_is_an_output_site(calibrated):
    qm, _ = calibrated
    roles = {spec.name: spec.role for spec, _, _ in qtrim_fx.iter_sites(qm)}
    assert roles["conv.out"] == "output"
    assert roles["expand"] == "input"  # the class token is an ordinary concat input


def _qdq_between_conv_and_concat(path) -> int:
    g = onnx.load(str(path)).graph
    prod = {o: n for n in g.node for o in n.output}
    (cat,) = [n for n in g.node if n.op_type == "Concat" and any("expand" in i for i in n.input)]
    count, todo = 0, [i for i in cat.input if "expand" not in i]
    while todo:
        n = prod.get(todo.pop())
        if n is None or n.op_type == "Conv":
            continue
        count += n.op_type in ("QuantizeLinear", "DequantizeLinear")
        todo += [i for i in n.input[:1]]
    return count


@pytest.mark.parametrize("target", ["onnxruntime", "openvino", "tensorrt"])
def test_targets_place_the_conv_output_qdq(calibrated, tmp_path, target):
    qm, x = calibrated
    path = tmp_path / f"{target}.onnx"
    qtrim_fx.export_onnx(qm, (x[:2],), path, target=target, input_names=["input"], output_names=["out"])
    between = _qdq_between_conv_and_concat(path)
    assert between >= 2 if target == "onnxruntime" else between == 0


def test_openvino_export_agrees_with_onnx_runtime(calibrated, tmp_path):
    ov = pytest.importorskip("openvino")
    ort = pytest.importorskip("onnxruntime")
    qm, x = calibrated
    path = tmp_path / "ov.onnx"
    qtrim_fx.export_onnx(qm, (x[:2],), path, target=for_this_cpu("openvino"), input_names=["input"],
                         output_names=["out"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.asarray(compiled.create_infer_request().infer({0: x.numpy()})[compiled.outputs[0]])
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))
