"""A file exported with a dynamic batch runs at every batch size (no traced sizes left in its shapes).

The TorchScript exporter gives a qtrim::QDQ placeholder whose input shape it cannot infer (after a computed
Reshape: ``nn.Unflatten``) the *traced* shape, batch size included, and infers later shapes from it. ONNX
Runtime trusted those shapes: the file of this net, exported at batch 2, failed at batch 1 and 5 in its
MatMul+Add -> Gemm fusion ("gemm_input_reshape").
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qtrim_fx
from tests.helpers.cpu import ort_cpu_session


class _UnflattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(1), nn.Unflatten(1, (4, 64)),
                                 nn.LayerNorm(64))
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(self.net(x)).mean(1)


@pytest.mark.parametrize("target", ["onnxruntime", "qnn"])
def test_file_runs_at_other_batch_sizes(tmp_path, target):

    torch.manual_seed(0)
    model, x = _UnflattenHead().eval(), torch.randn(2, 3, 8, 8)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target, exporter="torchscript")
    out = onnx.load(str(path)).graph.output[0]
    assert not out.type.tensor_type.shape.dim[0].HasField("dim_value")  # the batch is not the example's 2
    sess = ort_cpu_session(path)
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 8, 8)
        (got,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        want = qm(xb).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))
