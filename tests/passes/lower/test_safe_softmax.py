"""SafeSoftmaxPass: ``_safe_softmax`` of a quantize-dequantize is written as ``softmax`` (exact: the input is finite).

Bool-masked and causal attention are written out at prepare with torch's ``_safe_softmax`` (λ = 0 is torch's
attention, 0 on a row masked entirely); neither exporter writes it as one op (TorchScript refuses it).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.passes.lower.safe_softmax import SafeSoftmaxPass
from qtrim_fx.runtime.qdq import quant_dequant

_SAFE = torch.ops.aten._safe_softmax.default


class _Probe(nn.Module):
    def forward(self, x, s, z):
        a = _SAFE(quant_dequant(x, s, z, 0, 255, None, 8, False, "x"), -1)
        return a, _SAFE(x, -1)  # the second reads a float tensor: left alone


def test_safe_softmax_of_a_quantized_tensor_becomes_softmax():
    gm = fx.symbolic_trace(_Probe())
    x = torch.randn(3, 7) * 4
    s, z = torch.tensor(0.05), torch.tensor(128.0)
    want = gm(x, s, z)
    result = SafeSoftmaxPass()(gm)
    assert result.modified
    gm.graph.lint()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.softmax) == 1 and calls.count(_SAFE) == 1
    got = gm(x, s, z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # bit for bit
    assert not SafeSoftmaxPass()(gm).modified


def test_causal_attention_on_an_integer_target_exports_with_torchscript(tmp_path):
    """End to end: no ``_safe_softmax`` is left in the lowered graph, so the TorchScript exporter writes it."""

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 8)
    qm = qtrim_fx.prepare(Causal().eval(), (x,), target="qnn")
    assert any(n.target is _SAFE for n in qm.graph.nodes)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    lowered = qtrim_fx.lower(qm.eval(), "qnn")
    assert not any(n.target is _SAFE for n in lowered.graph.nodes)
    qtrim_fx.export_onnx(qm, (x,), tmp_path / "c.onnx", target="qnn", exporter="torchscript")
