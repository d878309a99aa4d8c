"""An op the TorchScript exporter cannot write is a qtrim ExportError that names it, never a raw torch error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import ExportError


def test_unsupported_adaptive_pool_is_a_named_export_error(tmp_path):
    # alexnet's head at a small input: AdaptiveAvgPool2d((6, 6)) on a 3x3 map (6 is not a factor of 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
                          nn.Linear(16, 2)).eval()
    x = torch.randn(1, 3, 7, 7)
    qm = qtrim_fx.prepare(model, example_inputs=(x,))
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"TorchScript ONNX exporter cannot write.*adaptive_avg_pool2d.*exporter='dynamo'"):
        qtrim_fx.export_onnx(qm.eval(), (x,), path, exporter="torchscript")
    assert not path.exists()
