"""AttentionRank4Pass: attention on (N, L, E) tensors gets a head axis of 1 (the form both exporters write).

Found on a model no test used: ``F.scaled_dot_product_attention(q, k, v, attn_mask=causal)`` on 3-D tensors,
captured by ``torch.export`` (the mask's size comes from ``x.shape``), could not be exported at all (the dynamo
exporter's translation asserts 4-D inputs).
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.passes.lower.attention_rank4 import AttentionRank4Pass
from qtrim_fx.passes.prepare.ranks import record_ranks
from tests.helpers.cpu import u8s8_kernels_saturate


class Attention3d(nn.Module):
    def __init__(self, mask: str = "none") -> None:
        super().__init__()
        self.qkv, self.out, self.mask = nn.Linear(8, 24), nn.Linear(8, 3), mask

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if self.mask == "causal":  # (L, L) from the input's size: symbolic tracing cannot capture it
            m = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        elif self.mask == "batched":  # (N, L, L)
            m = (x[..., :1] > -1.0) & (x[..., :1] > -1.0).transpose(1, 2)
        else:
            m = None
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=m))


def _sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]


@pytest.mark.parametrize("mask", ["none", "batched"])
def test_three_d_attention_gets_a_head_axis_and_computes_the_same(mask):
    model = Attention3d(mask).eval()
    x = torch.randn(2, 5, 8)
    gm = fx.symbolic_trace(model)
    assert record_ranks(gm, (x,))
    with torch.no_grad():
        want = gm(x)
    result = AttentionRank4Pass()(gm)
    assert result.modified
    gm.graph.lint()
    (sdpa,) = _sdpa_nodes(gm)
    lifted = [a for a in (*sdpa.args, *sdpa.kwargs.values()) if isinstance(a, fx.Node)]
    assert len(lifted) == (4 if mask == "batched" else 3)  # q, k, v (and a 3-D mask) through unsqueeze(., 1)
    assert all(a.target is torch.unsqueeze and a.args[1] == 1 for a in lifted)
    (out,) = sdpa.users
    assert out.target is torch.squeeze and out.args[1] == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)
    assert not AttentionRank4Pass()(gm).modified  # idempotent: the call is 4-D now


def test_four_d_attention_and_unknown_ranks_are_left_alone():
    four = fx.symbolic_trace(Attention3d())
    assert record_ranks(four, (torch.randn(2, 3, 5, 8),))
    assert not AttentionRank4Pass()(four).modified
    unknown = fx.symbolic_trace(Attention3d())  # no ranks recorded: nothing is assumed
    assert not AttentionRank4Pass()(unknown).modified


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", "qnn"])  # qnn: through lowering's Q/DQ copies
def test_three_d_causal_attention_exports_and_matches_on_onnx_runtime(tmp_path, target):
    """torch.export capture (the mask's size comes from x.shape) -> dynamo exporter: it used to refuse 3-D sdpa."""
    torch.manual_seed(0)
    model = Attention3d("causal").eval()
    x = torch.randn(2, 6, 8)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    # integer-only qnn: the bool-masked attention is written out at prepare (DecomposeAttentionPass)
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default
               for n in qm.graph.nodes) == (target != "qnn")
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "attn.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)  # the export self-check compares ORT with torch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for shape in ((2, 6, 8), (3, 4, 8)):  # batch and sequence stay dynamic
        xs = torch.randn(*shape)
        with torch.no_grad():
            want = qm(xs).numpy()
        got = exact.run(None, {exact.get_inputs()[0].name: xs.numpy()})[0]  # the file's QDQ semantics
        assert got.shape == want.shape
        assert abs(got - want).max() <= 1e-5 * abs(want).max()
        if u8s8_kernels_saturate():
            continue  # int8 weights on ORT's fused x8S8 kernels saturate on this CPU: see test_unsigned_weights.py
        fused = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
        assert abs(fused - want).max() <= 0.05 * abs(want).max()
