"""A BatchNorm that cannot be folded gets sites on an integer-only target (issue 17 zoo: timm MixNet on qnn / npu).

MixNet's mixed-kernel conv is a ``split -> convs -> cat``, so the BatchNorm after it has no single conv to fold into
and is written as ``BatchNormalization``; prepared for ``qnn`` it read and wrote float tensors, and the SiLU after it
ran in float too (38 float ops in mixnet_s). Now the ``batchnorm`` kind is in ``INTEGER_ACTIVATION_SITES`` (in and
out), except a BatchNorm folded into its conv (that one is the conv's output). λ = 0 stays exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.profiles import INTEGER_ACTIVATION_SITES
from qtrim_fx.runtime.prepared import iter_sites


class _Mixed(nn.Module):
    """conv-BN (folded), then two convs on channel halves joined by cat, BN (not foldable) and SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.k3 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.k5 = nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        a, b = torch.split(h, 4, dim=1)
        h = nn.functional.silu(self.bn1(torch.cat([self.k3(a), self.k5(b)], 1)))
        return self.head(h)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Mixed()
    with torch.no_grad():
        net.train()(torch.randn(8, 3, 8, 8))
    return net.eval()


def test_unfolded_batchnorm_gets_sites_and_the_file_is_fully_integer(tmp_path):
    assert ("batchnorm", "in+out") in INTEGER_ACTIVATION_SITES
    x = torch.randn(2, 3, 8, 8)
    net = _net()
    qm = qtrim_fx.prepare(net, (x,), target="qnn")
    names = {s.name for s, _, _ in iter_sites(qm) if s.kind == "activation"}
    assert any(n.startswith("bn1") or "bn1" in n for n in names), names  # the unfolded one
    assert not any("bn0" in n for n in names), names  # the folded one is the stem's output
    with torch.no_grad():
        torch.testing.assert_close(qm(x), net(x), rtol=0, atol=0)  # λ = 0: the float model
    qtrim_fx.calibrate(qm, [(torch.randn(2, 3, 8, 8),) for _ in range(3)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qtrim_fx.export_onnx(qm.eval(), (x,), path, target="qnn")
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    assert [v for v in qtrim_fx.check(path, "qnn") if v.severity == "error"] == []
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        trained, lowered = qm(x), qtrim_fx.lower(qm, "qnn")(x)
    np.testing.assert_allclose(got, lowered.numpy(), atol=1e-5)
    # the trained model folds the stem's BatchNorm in another float order: a rare one-step rounding flip at most
    off = (lowered - trained).abs() > 1e-5
    assert off.float().mean() <= 0.01


def test_default_prepare_adds_no_batchnorm_site():
    qm = qtrim_fx.prepare(_net(), (torch.randn(2, 3, 8, 8),))
    assert not any("bn1" in s.name for s, _, _ in iter_sites(qm) if s.kind == "activation" and s.op == "batchnorm")
