"""QuantizeInstanceNormPass: a GroupNorm file for qnn / npu is integer end to end, and the HTP runs it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check


class _AudioNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 5, padding=2)
        self.norm = nn.GroupNorm(4, 8)
        self.out = nn.Conv1d(8, 3, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.conv(x))))


def _export(target: str, tmp_path) -> tuple[str, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 32)
    qm = qtrim_fx.prepare(_AudioNet().eval(), (x,), target=target)
    qtrim_fx.calibrate(qm, [(torch.randn(2, 2, 32),) for _ in range(3)])
    qtrim_fx.set_blend(qm, 1.0)
    path = str(tmp_path / f"gn_{target}.onnx")
    qtrim_fx.export_onnx(qm, (x,), path, target=target)
    qm.eval()
    return path, qtrim_fx.lower(qm, target), x


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_group_norm_file_is_integer_and_computes_the_lowered_model(target: str, tmp_path) -> None:
    path, lowered, x = _export(target, tmp_path)
    assert [v for v in check(path, target) if v.severity == "error"] == []  # was: float InstanceNorm and Mul
    model = onnx.load(path)
    producers = {o: n for n in model.graph.node for o in n.output}
    (norm,) = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert all(producers[i].op_type == "DequantizeLinear" for i in norm.input)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[producers[norm.input[2]].input[0]].dtype == np.int32  # β: int32 codes
    for n in model.graph.node:  # the exporter's identity Mul(·, 1) / Add(·, 0) are gone
        if n.op_type in ("Mul", "Add"):
            assert all(producers.get(i) is None or producers[i].op_type != "Constant" for i in n.input)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    want = lowered(x).detach().numpy()
    step = float(np.abs(want).max()) / 127  # coarser than the output grid: one step at most
    assert float(np.abs(got - want).max()) <= step


def test_group_norm_file_runs_strictly_on_the_htp(tmp_path) -> None:
    path, lowered, x = _export("qnn", tmp_path)
    report = qtrim_fx.verify(path, lowered, [x], backends=["qnn"], min_sqnr_db=None, min_top1=None)
    (htp,) = report.backends
    assert htp.status == "ok", htp.message  # was: QNN_COMMON_ERROR_MEM_ALLOC at graph finalize
    assert set(htp.ep_nodes) == {"QNNExecutionProvider"}
    assert htp.outputs[0].sqnr_db >= 30


class _ExportCapturedNet(_AudioNet):
    """Not symbolically traceable at the root (``int`` of a size): captured by torch.export, written by the
    dynamo exporter (aten.group_norm; the identity affine's constants come as ``CastLike(constant, x)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., : int(x.shape[-1])]
        return super().forward(x)


def test_group_norm_captured_by_torch_export_is_integer_too(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 32)
    qm = qtrim_fx.prepare(_ExportCapturedNet().eval(), (x,), target="qnn")
    assert qm.qtrim_info.frontend == "torch.export"
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = str(tmp_path / "gn_export.onnx")
    qtrim_fx.export_onnx(qm, (x,), path, target="qnn")
    assert [v for v in check(path, "qnn") if v.severity == "error"] == []
