"""A site's output written in place through an alias (Identity, a view, a custom leaf) keeps a mask, not
the output, for its backward: training steps instead of failing in autograd (timm mobilenetv3's head:
conv_head -> norm_head = Identity -> Hardswish(inplace=True))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qtrim_fx


class PassThrough(nn.Module):  # a custom leaf that returns its input itself
    def forward(self, x):
        return x


@pytest.mark.parametrize("between", [nn.Identity, nn.Dropout, nn.Flatten, PassThrough], ids=lambda c: c.__name__)
def test_in_place_write_through_an_alias_trains(between):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), between(), nn.Hardswish(inplace=True), nn.Flatten(),
                          nn.Linear(36, 2))
    x = torch.randn(2, 3, 3, 3)
    qm = qtrim_fx.prepare(model.eval(), example_inputs=(x,))
    qtrim_fx.calibrate(qm, [x])
    qm.train()
    for lam in (0.5, 1.0):
        qtrim_fx.set_blend(qm, lam)
        qm.zero_grad()
        qm(x).square().mean().backward()  # raised "modified by an inplace operation" before
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in qm.parameters() if p.requires_grad)
