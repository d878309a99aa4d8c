"""PlanLoweringPass deploys a weight on the output channel it was trained on, in the parameter's own layout.

A parameter reaches its MatMul through a view (``q @ rel.T``, timm's relative-position tables in BoTNet /
HaloNet; ``W @ x``): prepare follows the view and trains per row of ``rel`` (the MatMul's output channels). The
profile's matmul axis (-1, the right operand's N) is in the operand's layout; applied to ``rel`` itself it named
the reduction axis, the statistics were re-derived there, the lowered model left the trained one, and the
onnxruntime file was refused (``weight_axis``: per-channel along K cannot run as an integer MatMul).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import LOWER_PLAN, SITE_NODE
from qtrim_fx.onnx import check, get_profile
from qtrim_fx.passes.lower.api import lower
from qtrim_fx.passes.lower.plan import PlanLoweringPass
from tests.helpers.htp import require_htp


class _RelLogits(nn.Module):
    """``q @ rel.T`` (rel: one row per relative position, the output channels of the MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.rel = nn.Parameter(torch.randn(15, 8) * 0.1)

    def forward(self, x):
        return self.lin(x) @ self.rel.transpose(-1, -2)


class _LeftWeight(nn.Module):
    """``W @ x``: the parameter is the MatMul's left operand; its rows are the output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4) * 0.3)

    def forward(self, x):
        return torch.relu(self.w @ x)


def _prepared(model: nn.Module, x: torch.Tensor, target: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model.eval(), (x,), target=target)
        qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


@pytest.mark.parametrize("make, shape, param", [(_RelLogits, (2, 4, 8), "rel"), (_LeftWeight, (3, 4, 5), "w")])
@pytest.mark.parametrize("target", ["onnxruntime", "openvino", "tensorrt"])
def test_weight_deployed_on_its_trained_axis(make, shape, param, target):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    qm = _prepared(make(), x)
    trained_axis = qm.qtrim_sites[param].observer.axis
    assert trained_axis == 0  # the output channels: rel's rows (through the transpose), w's rows
    gm, _ = PlanLoweringPass(get_profile(target))(qm)
    (plan,) = [n.meta[LOWER_PLAN] for n in gm.graph.nodes if SITE_NODE in n.meta and n.meta[SITE_NODE].name == param]
    assert plan.axis == trained_axis and not plan.reason  # no statistics re-derived along another axis
    if target != "tensorrt":  # tensorrt deploys symmetric int8 activations: not the grid trained here
        lowered = lower(qm, get_profile(target))
        with torch.no_grad():
            assert torch.equal(lowered(x), qm(x))  # what is deployed is what was trained


def test_transposed_table_exports_for_onnxruntime_and_matches(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    qm = _prepared(_RelLogits(), x)
    path = str(tmp_path / "rel.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (x,), path)  # refused before: weight_axis error
    assert not [v for v in check(path, "onnxruntime") if v.severity == "error"]
    m = onnx.load(path)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and scales.get(n.input[1]) is not None
                   and scales[n.input[1]].size == 15]
    assert per_channel, "rel's 15 per-row scales are in the file"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = lower(qm, get_profile("onnxruntime"))(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_transposed_table_on_integer_only_targets(target, tmp_path):
    """On ``qnn`` / ``npu`` the weight (per-tensor there) is not re-quantized after its transpose as if it were an
    activation (that copy wrote the weight's int8 grid on an activation: refused by ``qnn``'s uint8 rule); the
    exporter folds the transpose into the initializer."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    qm = _prepared(_RelLogits(), x, target=target)
    path = str(tmp_path / f"rel_{target}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (x,), path)
    assert check(path, target) == []
    m = onnx.load(path)
    producers = {o: n for n in m.graph.node for o in n.output}
    (mm,) = [n for n in m.graph.node if n.op_type == "MatMul" and "rel" in n.name]
    assert producers[mm.input[1]].op_type == "DequantizeLinear"  # DQ(rel.T codes) -> MatMul, no Q/DQ copy
    if target == "qnn":
        require_htp()
        report = qtrim_fx.verify(path, lower(qm, get_profile("qnn")), [(torch.randn(2, 4, 8),)], backends=["qnn"])
        (htp,) = report.backends
        assert htp.status == "ok" and set(htp.ep_nodes) == {"QNNExecutionProvider"}, htp.message
