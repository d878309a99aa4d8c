"""The export's FloatOpsWarning names the fix that applies to the model (issue 17 zoo: 16 "check" rows on qnn / npu).

Every float op on an integer-only target used to come with "prepare the model with target=..." -- also for models
prepared for that target, whose float ops come from elsewhere: ``scaled_dot_product_attention`` (one op in torch,
float scores in the exporters' decomposition: every Hugging Face model at its default ``sdpa``), submodules kept as
untraceable leaves (swin's windowed attention, TinyViT), or an opset too old for LayerNorm (test_default_opset.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.onnx.check_islands import FloatOpsWarning


class _Sdpa(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv, self.proj, self.dropout = nn.Linear(16, 48), nn.Linear(16, 16), dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout))


class _Branchy(nn.Module):
    """Data-dependent control flow: prepare keeps it as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.sigmoid(h) * h if h.mean() > 0 else torch.tanh(h)


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(16, 16), _Branchy(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(torch.relu(self.inp(x))))


def _warnings(model: nn.Module, target: str | None, tmp_path) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model.eval(), (x,), target=target)
    qtrim_fx.calibrate(qm, [(torch.randn(2, 5, 16),) for _ in range(2)])
    qtrim_fx.set_blend(qm, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qtrim_fx.export_onnx(qm.eval(), (x,), tmp_path / "m.onnx", target="npu", verify=False)
    return [str(w.message) for w in caught if isinstance(w.message, FloatOpsWarning)]


def _warning(model: nn.Module, target: str | None, tmp_path) -> str:
    found = _warnings(model, target, tmp_path)
    assert len(found) == 1
    return found[0]


def test_attention_of_a_model_prepared_for_the_target_names_eager_attention(tmp_path):
    """An attention with dropout in eval mode stays one op (DecomposeAttentionPass writes the others out): its fix
    is named."""
    msg = _warning(_Sdpa(dropout=0.25), "npu", tmp_path)
    assert "scaled_dot_product_attention" in msg and "attn_implementation='eager'" in msg
    assert "prepare the model with" not in msg  # it was


def test_attention_prepared_for_the_target_is_written_out_and_runs_on_integers(tmp_path):
    assert _warnings(_Sdpa(), "npu", tmp_path) == []  # DecomposeAttentionPass: no float op left


def test_a_model_not_prepared_for_the_target_gets_both_fixes(tmp_path):
    msg = _warning(_Sdpa(), None, tmp_path)
    assert "prepare the model with qtrim_fx.prepare(model, ..., target='npu')" in msg
    assert "scaled_dot_product_attention" in msg


def test_leaves_are_named(tmp_path):
    msg = _warning(_WithLeaf(), "npu", tmp_path)
    assert "could not be traced" in msg and "'block'" in msg


@pytest.mark.parametrize("target", ["npu", None])
def test_lowered_model_carries_how_it_was_prepared(target):
    from qtrim_fx.passes.lower.api import LOWERED_FROM

    x = torch.randn(2, 5, 16)
    qm = qtrim_fx.prepare(_Sdpa().eval(), (x,), target=target)
    qtrim_fx.calibrate(qm, [(x,)])
    gm = qtrim_fx.lower(qm, "npu", opset=14)
    assert gm.meta[LOWERED_FROM].config.target == target
