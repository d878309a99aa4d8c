"""A leaf branching on tensor values is named at prepare and refused at export (issue 17, item 7).

Before: the leaf was exported as the branch its example inputs took (max diff 0.11 on a 0.44
scale on the other branch) and the only sign was torch's generic TracerWarning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import ExportError, TracedBranchWarning
from tests.helpers.qmodels import SignGate


class WidthGate(nn.Module):
    """Branches on a shape only: every input of one width takes the same branch, so tracing is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[-1] == 16:
            return self.fc(x)
        return x


class Net(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.gate = gate
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.gate(self.proj(x))))


def _prepared(gate: nn.Module):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qtrim_fx.prepare(Net(gate).eval())
    qtrim_fx.calibrate(qm, [x, -x])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), x, caught


def test_value_branch_is_named_at_prepare_and_refused_at_export(tmp_path):
    qm, x, caught = _prepared(SignGate())
    branch = [w for w in caught if issubclass(w.category, TracedBranchWarning)]
    assert len(branch) == 1
    msg = str(branch[0].message)
    assert "'gate'" in msg and "sum" in msg and "torch.where" in msg
    (fb,) = qm.qtrim_info.fallbacks
    assert fb.module == "gate" and fb.data_dependent
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"'gate'.*tensor values") as info:
        qtrim_fx.export_onnx(qm, (x,), path)
    assert "verify=False" in str(info.value)
    assert not path.exists()
    from qtrim_fx.onnx.export import EXPORTERS

    if "torchscript" in EXPORTERS:  # a tracing exporter writes the traced branch when the user insists
        qtrim_fx.export_onnx(qm, (x,), path, verify=False, exporter="torchscript")
        assert path.exists()


def test_shape_branch_is_a_plain_leaf_and_exports():
    qm, _, caught = _prepared(WidthGate())
    assert not any(issubclass(w.category, TracedBranchWarning) for w in caught)
    assert any("'gate' could not be traced" in str(w.message) for w in caught)
    (fb,) = qm.qtrim_info.fallbacks
    assert not fb.data_dependent


def test_shape_branch_leaf_exports(tmp_path):
    qm, x, _ = _prepared(WidthGate())
    qtrim_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists()
