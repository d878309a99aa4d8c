"""RoundBiasPass looks through value-moving ops (view, x[:, 0], transpose ...) to the input's quantizer.

The ONNX side re-quantizes after such ops (``RequantizeAfterShapeOpsPass``), so the file's Gemm reads a
DequantizeLinear and stores an int32 bias; the lowered torch model must round that bias the same way, or the
two differ by up to half an accumulator step (a class-token head ``head(x[:, 0])``, Hugging Face's Conv1D
``addmm(b, x.view(-1, n), w)``). A chunk's element (an ONNX Split, not re-quantized) is not looked through.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.passes.lower.round_bias import BIAS_ATTR


class ClassTokenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x))[:, 0])


class Conv1DHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.weight, self.bias = nn.Parameter(torch.randn(8, 5) * 0.3), nn.Parameter(torch.randn(5) * 0.3)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return torch.addmm(self.bias, h.view(-1, h.size(-1)), self.weight)


class ChunkHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 16), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)).chunk(2, -1)[0])


def _lowered(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model.eval(), (x,))
        qtrim_fx.calibrate(qm, [x, 0.7 * x])
    return qm, qtrim_fx.lower(qm, "qnn")




@pytest.mark.parametrize("model, rounded", [(ClassTokenHead, True), (Conv1DHead, True), (ChunkHead, False)])
def test_bias_behind_moves_is_rounded_like_the_file(model, rounded, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8)
    qm, low = _lowered(model(), x)
    layers = [n for n in low.graph.nodes if n.op == "call_function" and ("linear" in str(n.target)
                                                                          or "addmm" in str(n.target))]
    last = layers[-1]
    bias = last.args[0] if "addmm" in str(last.target) else last.args[2]
    assert str(bias.target).startswith(BIAS_ATTR + ".") == rounded
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (x,), path, target="qnn", input_names=["x"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = low(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
