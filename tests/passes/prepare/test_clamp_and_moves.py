"""Op kinds found on models no test used (session 33 probe), on the integer-only targets:

* ``x.clamp(0.0, 6.0)`` (a hand-written ReLU6) was an unknown op: no site on its output, so ``qnn`` files ran the
  Clip and the pooling after it in float (``check``: float_op /Clip, /ReduceMean). Clamping to constant bounds is
  hardtanh, the ``relu`` kind; clamping to tensor bounds stays a binary op of its own.
* ``flip`` / ``roll`` move values without changing them: a copy of their input's Q/DQ follows them (exact).
* ``record_ranks`` also records whether each tensor holds floats, so a clamp of integer indices is never a site.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check
from qtrim_fx.passes.prepare.normalize import op_kind
from qtrim_fx.passes.prepare.ranks import FLOATING, record_ranks
from tests.helpers.cpu import ort_cpu_session


class ClampNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).clamp(min=0.0, max=6.0).flip(-1).mean((2, 3)))


class TensorBounds(nn.Module):
    def forward(self, x, lo):
        idx = torch.arange(x.shape[-1]).clamp(1, 3)  # integer indices
        return x.clamp(min=lo)[..., idx]


def test_clamp_to_constants_is_the_relu_kind_and_to_tensors_is_not():
    gm = fx.symbolic_trace(TensorBounds())
    kinds = {n.name: op_kind(n, {}) for n in gm.graph.nodes}
    assert kinds["clamp"] == "relu"  # constant bounds (here on integer indices)
    assert kinds["clamp_1"] == "other"  # bounds from a tensor: a binary op
    assert record_ranks(gm, (torch.randn(2, 5), torch.zeros(2, 5)))
    floating = {n.name: n.meta.get(FLOATING) for n in gm.graph.nodes}
    assert floating["clamp"] is False and floating["arange"] is False  # never a site
    assert floating["clamp_1"] is True


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_hand_written_relu6_runs_on_integers_on_integer_targets(tmp_path, target):
    torch.manual_seed(0)
    model = ClampNet()
    x = torch.randn(4, 3, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    qm = qtrim_fx.prepare(model, (x,), target=target)
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "clamp.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)
    assert [v for v in check(str(path), target) if v.severity == "error"] == []  # was: float Clip, ReduceMean
    sess = ort_cpu_session(path)
    with torch.no_grad():
        want = qm(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 0.02 * abs(want).max()


class IndexClamp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        idx = torch.arange(x.shape[-1]).clamp(1, 3)  # integer indices, clamped to constants
        return self.fc(x)[..., idx].clamp(0.0, 6.0)


@pytest.mark.parametrize("target", [None, "qnn"])
@pytest.mark.parametrize("with_inputs", [True, False], ids=["example_inputs", "no_inputs"])
def test_a_clamp_of_integer_indices_gets_no_site(tmp_path, target, with_inputs):
    """Without example inputs float-ness is inferred: arange's result is integers, and so is its clamp (a site
    there never saw data and the export failed: UncalibratedSitesError)."""
    x = torch.randn(3, 5)
    qm = qtrim_fx.prepare(IndexClamp().eval(), (x,) if with_inputs else None, target=target)
    sites = [name for name, _ in qm.qtrim_sites.named_children()]
    assert "clamp" not in sites and "clamp_1" in sites
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.export_onnx(qm.eval(), (x,), tmp_path / "m.onnx", target=target or "onnxruntime")
