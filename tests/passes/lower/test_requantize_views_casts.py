"""RequantizeViewsPass leaves casts to integer dtypes alone (issue 17 zoo: Hugging Face T5 on qnn / npu).

``x.to(torch.long)`` is a "view" kind to the graph walks (``to`` / ``type`` move values without arithmetic), so on
an integer-only target the pass copied the quantizer of a float tensor onto the integer result of the cast (T5's
relative-position buckets: ``(log-ratio * n).to(torch.long)``); export then refused the file with "site ... quantizes
a INT64 tensor". A cast to an integer or bool dtype now ends the chain; float casts keep their copy.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.qdq import is_quant_dequant


class _Buckets(nn.Module):
    """A float score cast to integer bucket ids that index an embedding (T5's relative-position bias in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.emb = nn.Embedding(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        idx = (torch.sigmoid(h) * 15).to(torch.long)
        return h + self.emb(idx).sum(-2)


def _qdq_inputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and is_quant_dequant(n.target)]


def test_no_quantizer_on_the_integer_result_of_a_cast(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    qm = qtrim_fx.prepare(_Buckets().eval(), (x,), target="qnn")
    qtrim_fx.calibrate(qm, [(torch.randn(2, 5, 8),) for _ in range(2)])
    qtrim_fx.set_blend(qm, 1.0)
    gm = qtrim_fx.lower(qm.eval(), "qnn")
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert casts and not any(c in _qdq_inputs(gm) for c in casts)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), qm(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in ("qnn", "npu"):  # used to raise ExportError: "... quantizes a INT64 tensor"
            qtrim_fx.export_onnx(qm, (x,), tmp_path / f"{target}.onnx", target=target)
