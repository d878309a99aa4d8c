"""Python arithmetic on sizes gets no site (issue 17 zoo: timm swin on qnn / npu).

Swin pads its feature map to a multiple of the window: ``pad_h = (w - H % w) % w`` with ``H`` from ``x.shape``. The
graph walks took ``H % w`` (an ``operator.mod`` node, no kind of its own) for a tensor, so a model prepared for an
integer-only target got a ``sub`` site on a Python int, which never saw data: export failed with
``UncalibratedSitesError: 24 quantization site(s) never saw data: layers.0.blocks.0.sub, ...``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.prepared import iter_sites


class _PadToWindow(nn.Module):
    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        pad_h = (self.window - h % self.window) % self.window
        pad_w = (self.window - w % self.window) % self.window
        y = F.pad(self.fc(x), (0, 0, 0, pad_w, 0, pad_h))
        return y - y.mean()


def test_no_site_on_size_arithmetic_and_the_export_runs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 8)
    for target in ("qnn", "npu"):
        qm = qtrim_fx.prepare(_PadToWindow().eval(), (x,), target=target)
        sited = {s.name for s, _, _ in iter_sites(qm)}
        # sub / sub_1 (and the mods) are the two paddings' Python ints; sub_2 is the tensor y - mean
        assert not sited & {"sub", "sub_1", "mod", "mod_1", "mod_2", "mod_3"}, sited
        assert "sub_2" in sited, sited
        qtrim_fx.calibrate(qm, [(torch.randn(2, 6, 5, 8),) for _ in range(2)])
        qtrim_fx.set_blend(qm, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qtrim_fx.export_onnx(qm.eval(), (x,), tmp_path / f"{target}.onnx", target=target)  # used to raise


class _ScaleFromShape(nn.Module):
    """Attention scaled by ``1 / math.sqrt(x.shape[-1])``: a Python float computed from a size."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import math

        s = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * (1.0 / math.sqrt(x.shape[-1]))
        return torch.softmax(s, -1)


def test_no_site_on_a_float_computed_from_a_size(tmp_path):
    """Regression (session-35 probe): ``math.sqrt`` of a size got a ``truediv`` site on qnn / npu that never saw
    data, so ``lower`` / ``export`` failed with ``UncalibratedSitesError`` after a calibration."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for target in ("qnn", "npu"):
        model = _ScaleFromShape().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qtrim_fx.prepare(model, (x,), target=target)
            assert not any("truediv" in s.name or "sqrt" in s.name for s, _, _ in iter_sites(qm))
            qtrim_fx.calibrate(qm, [x, torch.randn(2, 5, 16)])
            qtrim_fx.set_blend(qm, 1.0)
            qtrim_fx.export_onnx(qm.eval(), (x,), tmp_path / f"{target}.onnx", target=target)
        assert qtrim_fx.onnx.check(tmp_path / f"{target}.onnx", target) == []
        with torch.no_grad():
            ref, out = model(x), qtrim_fx.lower(qm, target)(x)
        assert float((ref - out).abs().max()) < 0.05
