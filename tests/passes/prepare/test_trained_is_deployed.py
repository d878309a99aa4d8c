"""Prepared for a target, the model trains on the grids that target deploys (issue 17: deployed = trained).

Two gaps found by comparing the lowered model with the *trained* one (not with our own export):

* ``tensorrt`` deploys INT8 symmetric activations, but a model prepared for it trained UINT8 asymmetric ones;
  lowering re-derived them, so a ReLU output deployed on half the levels it was trained on (a 5-layer conv net:
  44 dB between the trained and the lowered model, silently).
* ``tensorrt`` stores ConvTranspose weights per channel on axis 0 (ONNX Runtime and QNN on the output-channel
  axis 1), but training used axis 1; lowering re-derived the grid (54 dB on the same net).

Now ``QuantConfig.act_signed`` / ``act_symmetric`` left unset take the target's grid, and a weight's per-channel
grid is trained on the target's axis: for every built-in target the lowered model is the trained one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.profiles import get_profile, profile_names
from qtrim_fx.runtime.prepared import iter_sites


class _Net(nn.Module):
    """conv-ReLU, ConvTranspose + BatchNorm (folded), a residual add, a grouped ConvTranspose, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gup = nn.ConvTranspose2d(8, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        u = torch.relu(self.bn(self.up(h)))
        u = torch.relu(self.conv(u) + u)
        return self.head(self.gup(u).mean((2, 3)))


def _prepared(config: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # BatchNorm statistics of a trained net
        net.train()(torch.randn(8, 3, 8, 8))
    qm = qtrim_fx.prepare(net.eval(), (torch.randn(2, 3, 8, 8),), config)
    qtrim_fx.calibrate(qm, [(torch.randn(4, 3, 8, 8),) for _ in range(3)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


@pytest.mark.parametrize("target", profile_names())
def test_the_lowered_model_is_the_trained_one_on_every_builtin_target(target, tmp_path):
    qm = _prepared(QuantConfig(target=target))
    prof = get_profile(target)
    acts = {s.scheme for s, _, _ in iter_sites(qm) if s.kind == "activation"}
    assert {(a.signed, a.symmetric) for a in acts} == {(prof.activation_signed, prof.activation_symmetric)}
    ups = {s.name: s.scheme.axis for s, _, _ in iter_sites(qm) if s.kind == "weight" and s.op == "conv_transpose"}
    want = prof.weight_axes.conv_transpose if prof.weight_per_channel else None
    assert ups == {"up.weight": want, "gup.weight": want}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = qtrim_fx.lower(qm, target)
    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        trained, lowered = qm(y), low(y)
    off = (lowered - trained).abs() > 1e-5 + 1e-5 * trained.abs()
    if off.any():  # a rounding boundary that lowering's float order flips (BatchNorm folded into the weights)
        step = max(float(site.qparams()[0].max()) for s, site, _ in iter_sites(qm) if s.model_output)
        assert prof.integer_only and int(off.sum()) <= max(1, off.numel() // 20), int(off.sum())
        assert float((lowered - trained).abs().max()) <= 1.001 * step  # one step of the quantized output
    # and the file is the lowered model (export's own ONNX Runtime check raises otherwise), clean for its target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (y,), tmp_path / "m.onnx", target=target)
    assert [v for v in qtrim_fx.check(tmp_path / "m.onnx", target) if v.severity == "error"] == []


def test_an_explicit_activation_grid_wins_over_the_target():
    qm = _prepared(QuantConfig(target="tensorrt", act_signed=False, act_symmetric=False))
    assert {(s.scheme.signed, s.scheme.symmetric) for s, _, _ in iter_sites(qm) if s.kind == "activation"} == {
        (False, False)}
    # no target: the paper's UINT8 asymmetric grid and the output-channel axis
    qn = _prepared(QuantConfig())
    assert {(s.scheme.signed, s.scheme.symmetric) for s, _, _ in iter_sites(qn) if s.kind == "activation"} == {
        (False, False)}
    assert {s.scheme.axis for s, _, _ in iter_sites(qn) if s.kind == "weight" and s.op == "conv_transpose"} == {1}


def test_prepare_target_argument_gives_the_same_grid_as_the_config():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    a = qtrim_fx.prepare(_Net().eval(), (x,), target="tensorrt")
    b = qtrim_fx.prepare(_Net().eval(), (x,), QuantConfig(target="tensorrt"))
    assert [s.scheme for s, _, _ in iter_sites(a)] == [s.scheme for s, _, _ in iter_sites(b)]


@pytest.mark.parametrize("bad", ["yes", 1])
def test_a_non_bool_activation_grid_is_refused(bad):
    with pytest.raises(qtrim_fx.core.errors.SchemeError, match=r"act_signed=.*True, False or None"):
        QuantConfig(act_signed=bad)
