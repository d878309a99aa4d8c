"""Regressions found by benchmarks/zoo.py (issue 17, items 4 and 5), on small models.

* item 4: timm's ViT forward takes ``is_causal: bool = False`` and hands it to
  ``scaled_dot_product_attention``; the ONNX exporter filled the default in as a tensor input
  (``argument 'is_causal' must be bool, not Tensor``). Lowering binds scalar defaults.
* item 5: ``target="npu"`` (opset 13) failed on every SDPA model with a raw
  ``UnsupportedOperatorError``; export now picks opset 14 when none is given, and an explicit
  ``opset=13`` is refused with a ProfileError naming opset 14.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import ProfileError
from qtrim_fx.passes.lower.bind_scalar_inputs import BindScalarInputsPass
from qtrim_fx.passes.lower.require_opset import required_opset


class FlagAttention(nn.Module):
    """timm's ``Attention`` pattern: the causal flag is a forward argument with a bool default."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def _calibrated() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(FlagAttention().eval())
    x = torch.randn(2, 5, 16)
    qtrim_fx.calibrate(qm, [x, torch.randn(2, 5, 16)])
    return qm, x


def _ort(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_bool_default_argument_is_bound_in_the_lowered_graph():
    qm, x = _calibrated()
    flag = next(n for n in qm.graph.nodes if n.op == "placeholder" and n.name == "is_causal")
    assert flag.users  # the prepared model still takes the flag at run time
    gm = qtrim_fx.lower(qm, "onnxruntime")
    flag = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "is_causal")
    assert not flag.users
    sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target))
    assert sdpa.kwargs["is_causal"] is False
    assert BindScalarInputsPass()(gm).modified is False  # idempotent
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x, None, False))  # computes with the default


def test_bool_default_argument_exports_and_matches(tmp_path):
    qm, x = _calibrated()
    path = tmp_path / "attn.onnx"
    qtrim_fx.export_onnx(qm, (x,), path, target="onnxruntime")
    sess = _ort(path)
    assert [i.name for i in sess.get_inputs()] == ["x"]  # no tensor input for the flag
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = qtrim_fx.lower(qm, "onnxruntime")(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_npu_opset_13_names_sdpa_and_the_opset_it_needs(tmp_path):
    qm, x = _calibrated()
    gm = qtrim_fx.lower(qm, "onnxruntime")
    opset, node = required_opset(gm)
    assert opset == 14 and "scaled_dot_product_attention" in str(node.target)
    # an explicit opset the op cannot be written at is refused, naming the op and the fix
    with pytest.raises(ProfileError, match=r"'npu' exports at opset 13.*opset 14.*pass opset=14"):
        qtrim_fx.lower(qm, "npu", opset=13)
    with pytest.raises(ProfileError, match=r"opset=14"):
        qtrim_fx.export_onnx(qm, (x,), tmp_path / "npu.onnx", target="npu", opset=13)
    assert not (tmp_path / "npu.onnx").exists()
    # left unset, lowering and export pick the oldest opset that writes it (within npu's max_opset 19)
    assert qtrim_fx.lower(qm, "npu") is not None
    model = qtrim_fx.export_onnx(qm, (x,), tmp_path / "npu14.onnx", target="npu")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 14
    # float_op: this model is prepared without target="npu" (its attention stays float); the opset is the point here
    assert [v for v in qtrim_fx.check(tmp_path / "npu14.onnx", "npu") if v.severity == "error" and v.rule != "float_op"] == []


def test_models_without_sdpa_keep_opset_13_for_npu(tmp_path):
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval())
    x = torch.randn(2, 3, 8, 8)
    qtrim_fx.calibrate(qm, [x])
    assert required_opset(qtrim_fx.lower(qm, "npu")) is None
    model = qtrim_fx.export_onnx(qm, (x,), tmp_path / "conv.onnx", target="npu")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
