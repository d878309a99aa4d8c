"""``torch.stack`` is a concatenation: its inputs and output get the sites a ``torch.cat`` gets.

It was an unknown op: on qnn / npu the exported Unsqueeze -> Concat and the mean after it ran in float.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import OP_KIND


class _Ensemble(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(6, 4) for _ in range(3))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.stack([F.relu(h(x)) for h in self.heads], 0).mean(0))


def test_stack_is_the_cat_kind():
    qm = qtrim_fx.prepare(_Ensemble().eval(), (torch.randn(3, 6),))
    (stack,) = [n for n in qm.graph.nodes if n.target is torch.stack]
    assert stack.meta[OP_KIND] == "cat"


@pytest.mark.parametrize("target", ["qnn", "npu", "onnxruntime"])
def test_stacked_branches_export_without_float_ops(tmp_path, target):
    torch.manual_seed(0)
    model, x = _Ensemble().eval(), torch.randn(3, 6)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm.eval()(x), model(x))
    qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / f"{target}.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)  # ORT self-check included
    assert [v for v in qtrim_fx.onnx.check(str(path), target) if v.severity == "error"] == []
