"""The opset lowering and export pick when none is given (issue 17: LayerNorm on ``npu``).

``npu`` exports at opset 13 (edge toolchains parse it), where the exporter writes LayerNorm as seven
float primitives (ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul) around the one integer op the sites were
trained for: every LayerNorm model prepared for ``npu`` exported with float ops, and the warning told
the user to prepare for ``npu`` (which they had). Left unset, the opset is now the oldest that writes
the model as trained (LayerNormalization: 17), within the target's ``max_opset``; an explicit older
opset keeps its float ops and the warning names the opset that fixes them.
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
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.check_islands import FloatOpsWarning
from qtrim_fx.passes.lower.require_opset import default_opset, integer_opset
from tests.helpers.qdq_files import output_lsb


class _LayerNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm subclass (timm's ``LayerNorm2d`` shape): permute, F.layer_norm, permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _prepared(target: str = "npu") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 10, 16)
    qm = qtrim_fx.prepare(_TokenNet().eval(), (x,), target=target)
    qtrim_fx.calibrate(qm, [(torch.randn(4, 10, 16),) for _ in range(2)] + [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), x


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_npu_layernorm_exports_as_one_integer_op_at_opset_17(tmp_path):
    qm, x = _prepared()
    path = tmp_path / "ln.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatOpsWarning)  # no float op left to warn about
        model = qtrim_fx.export_onnx(qm, (x,), path, target="npu")
    assert _opset(model) == 17
    compute = [n.op_type for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert compute.count("LayerNormalization") == 1 and "ReduceMean" not in compute and "Sqrt" not in compute
    assert qtrim_fx.check(path, "npu") == []
    # lowering picks the same opset by itself; the file computes what it computes (ORT, no optimizations)
    gm = qtrim_fx.lower(qm, "npu")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x).numpy()
    off = np.abs(got - ref) > output_lsb(model.graph) * 1.01
    assert off.mean() <= 0.01, f"{off.mean():.2%} of the outputs off by more than one step"


def test_an_explicit_older_opset_is_kept_and_the_warning_names_the_fix(tmp_path):
    qm, x = _prepared()
    with pytest.warns(FloatOpsWarning, match=r"LayerNormalization only from opset 17.*pass opset=17 \(target 'npu' "
                                             r"takes up to 19\)"):
        model = qtrim_fx.export_onnx(qm, (x,), tmp_path / "ln13.onnx", target="npu", opset=13)
    assert _opset(model) == 13
    assert "LayerNormalization" not in {n.op_type for n in model.graph.node}


def test_float_capable_targets_keep_their_opset():
    qm, _ = _prepared(target="onnxruntime")
    for name in ("onnxruntime", "tensorrt", "openvino"):
        prof = get_profile(name)
        assert default_opset(qm, prof.replace(opset=13)).opset == 13, name  # LayerNorm's primitives are fine there


def test_layernorm_found_in_graph_calls_and_in_subclassed_modules():
    assert integer_opset(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())) is None
    assert integer_opset(nn.Sequential(nn.Conv2d(3, 4, 1), _LayerNorm2d(4)))[:2] == (17, "LayerNormalization")
    gm = torch.fx.symbolic_trace(lambda t: torch.nn.functional.layer_norm(t, (8,)))
    opset, op, where = integer_opset(gm)
    assert (opset, op) == (17, "LayerNormalization") and where == "layer_norm"


def test_the_target_max_opset_bounds_the_choice():
    qm, _ = _prepared()
    npu = get_profile("npu")
    assert default_opset(qm, npu).opset == 17
    capped = npu.replace(max_opset=16)
    assert default_opset(qm, capped).opset == 13  # cannot reach 17: unchanged, the check names the float ops
