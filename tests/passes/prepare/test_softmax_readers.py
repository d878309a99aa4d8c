"""A softmax reading a weighted op's output directly keeps float scores where the target wants them float.

Attention pooling (``softmax(conv(h))``) and a tensor read by both a softmax and another layer used to get a
quantizer that fed the Softmax: export then refused the model on onnxruntime / tensorrt / openvino
(``softmax_quantized``: attention scores stay float). Now a softmax in a float region reads the float tensor,
in training and in the file.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.prepared import site_modules
from tests.helpers.cpu import ort_cpu_session


class _AttentionPool(nn.Module):
    """softmax over a 1x1 conv's logits, then a weighted sum of the features (audio / point-cloud pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.score, self.head = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 1, 1), nn.Linear(8, 2)

    def forward(self, x):
        h = F.gelu(self.conv(x))
        a = torch.softmax(self.score(h), -1)
        return self.head(torch.bmm(h, a.transpose(1, 2)).squeeze(-1))


class _SharedLogits(nn.Module):
    """One Linear output read by a softmax and by another Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(torch.softmax(h, -1) * self.b(h))


_CASES = {"attention_pool": (_AttentionPool, (2, 4, 10)), "shared_logits": (_SharedLogits, (3, 6))}


def _prepared(name: str, target: str | None):
    make, shape = _CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    return model, qm, x


@pytest.mark.parametrize("name", sorted(_CASES))
def test_float_target_softmax_reads_the_float_tensor(name):
    _, qm, _ = _prepared(name, "onnxruntime")
    sites = {n.target for n in qm.graph.nodes if n.op == "call_module" and str(n.target).startswith("qtrim_sites.")}
    for sm in (n for n in qm.graph.nodes if "softmax" in str(n.target)):
        (src,) = sm.all_input_nodes
        assert src.target not in sites, f"{sm.name} reads the quantizer {src.target}"
    if name == "shared_logits":  # the shared tensor keeps its site for the other reader
        assert "a_out" in site_modules(qm)


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", "openvino", "qnn"])
def test_exports_and_deploys_what_was_trained(tmp_path, name, target):

    model, qm, x = _prepared(name, target)
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm.eval()(x), model(x))  # λ = 0: the float model, bit for bit
    qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / f"{name}_{target}.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)  # self-check against ORT included
    errors = [v for v in qtrim_fx.onnx.check(str(path), target) if v.severity == "error"]
    assert errors == []
    graph = onnx.load(str(path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        src = made_by.get(sm.input[0])
        if target != "qnn":  # float scores: no DequantizeLinear feeds the Softmax
            assert src is None or src.op_type != "DequantizeLinear"
    sess = ort_cpu_session(path)
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    trained = qm(x).detach().numpy()
    assert abs(out - trained).max() <= 1e-2 * abs(trained).max() + 1e-6
