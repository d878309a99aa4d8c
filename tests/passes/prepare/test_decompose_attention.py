"""DecomposeAttentionPass: on integer-only targets attention is written out as matmul -> scale -> softmax -> matmul,
so each step gets a trained site and the file runs it on integers (timm ViTs at their default fused attention:
72 float ops on the qnn file of a 12-block vit_tiny before, 0 now)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check
from qtrim_fx.passes.prepare.decompose_attention import DecomposeAttentionPass
from qtrim_fx.passes.prepare.ranks import record_ranks

NPU = qtrim_fx.QuantConfig(target="npu")


class Attention(nn.Module):
    """(N, H, L, E) attention with an optional mask/flags, a forward argument mask like timm's."""

    def __init__(self, mask: str = "none", causal: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.mask, self.causal, self.scale = mask, causal, scale

    def forward(self, x, attn_mask=None):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mask == "bool":
            attn_mask = x[:, None, :, :1] > x[:, None, None, :, 0]  # (N, 1, L, L)
        elif self.mask == "float":
            attn_mask = torch.tanh(x[:, None, :, :1] - x[:, None, None, :, 0])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(n, t, 16))


def _traced(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    assert record_ranks(gm, (x,))
    return gm


@pytest.mark.parametrize("mask,scale", [("none", None), ("float", 0.3), ("arg", None)])
def test_attention_is_written_out_with_the_same_values(mask, scale):
    torch.manual_seed(0)
    model = Attention("none" if mask == "arg" else mask, scale=scale).eval()
    x = torch.randn(2, 5, 16)
    gm = _traced(model, x)
    with torch.no_grad():
        want = model(x)
    assert DecomposeAttentionPass(NPU)(gm).modified
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets
    assert targets.count(torch.matmul) == 2 and torch.softmax in targets
    muls = [n for n in gm.graph.nodes if n.target is torch.mul]
    assert [m.args[1] for m in muls] == [pytest.approx(scale if scale is not None else 8 ** -0.5)]
    assert (torch.add in targets) == (mask == "float")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-6)  # float rounding of the reference math
    assert not DecomposeAttentionPass(NPU)(gm).modified


def test_a_mask_argument_left_at_its_default_is_refused_when_given():
    """timm's Attention.forward(x, attn_mask=None): written out for None; a caller's mask is an error, not ignored."""
    x = torch.randn(2, 5, 16)
    gm = _traced(Attention().eval(), x)
    DecomposeAttentionPass(NPU)(gm)
    gm(x)
    with pytest.raises(ValueError, match="attn_mask=None"):
        gm(x, torch.zeros(2, 2, 5, 5))


@pytest.mark.parametrize("mask,causal", [("bool", False), ("none", True)])
def test_bool_and_causal_masks_are_written_out_with_torchs_values(mask, causal):
    """A bool mask / ``is_causal=True``: the additive -inf mask and ``_safe_softmax`` of torch's math attention,
    including a row masked entirely (torch gives 0 there, a plain softmax NaN)."""
    torch.manual_seed(0)
    model = Attention(mask, causal=causal).eval()
    x = torch.randn(2, 5, 16)
    x[0, 1, 0] = 10.0  # with the bool mask, query 1 of sample 0 sees no key (x[..., 0] < 10 everywhere)
    gm = _traced(model, x)
    with torch.no_grad():
        want = model(x)
    assert DecomposeAttentionPass(NPU)(gm).modified
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets
    assert torch.ops.aten._safe_softmax.default in targets and torch.add in targets
    with torch.no_grad():
        got = gm(x)
        for xx in (x, torch.randn(3, 7, 16)):  # another batch and length: the causal mask follows the shapes
            torch.testing.assert_close(gm(xx), model(xx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if mask == "bool":
        assert bool((x[0, :, 0] > x[0, 1, 0]).logical_not().all())  # the fully masked row is there


def test_other_targets_are_left_whole():
    x = torch.randn(2, 5, 16)
    assert not DecomposeAttentionPass(qtrim_fx.QuantConfig(target="onnxruntime"))(_traced(Attention(), x)).modified
    assert not DecomposeAttentionPass(NPU)(fx.symbolic_trace(Attention())).modified  # no ranks: width unknown


@pytest.mark.parametrize("mask,causal", [("float", False), ("bool", False), ("none", True)])
@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_attention_runs_on_integers_in_the_file(tmp_path, target, mask, causal):
    torch.manual_seed(0)
    model = Attention(mask, causal=causal).eval()
    x = torch.randn(4, 6, 16)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "attn.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)  # the export self-check runs ORT against torch
    errors = [f"{v.node}" for v in check(str(path), target) if v.severity == "error"]
    assert errors == [], errors
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = qtrim_fx.lower(qm, target)(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 0.05 * abs(want).max()


class DropoutAttention(nn.Module):
    """``dropout_p=self.p if self.training else 0.0``, as Hugging Face's sdpa attention passes it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.p = nn.Linear(16, 48), 0.5

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)


def test_training_only_dropout_is_written_as_dropout_of_the_probabilities():
    torch.manual_seed(0)
    model = DropoutAttention().eval()
    x = torch.randn(2, 5, 16)
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    calls = [n.target for n in qm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in calls and F.dropout in calls
    qtrim_fx.calibrate(qm, [x])
    with torch.no_grad():
        qtrim_fx.set_blend(qm, 0.0)
        torch.testing.assert_close(qm.eval()(x), model(x), rtol=1e-5, atol=1e-6)  # eval: no dropout
        qm.train()
        a, b = qm(x), qm(x)
    assert not torch.equal(a, b)  # training: dropout on the probabilities, as sdpa does
