"""Capture leaves the model's state alone, or refuses it (session 33 probe).

A buffer updated in place in a training-only branch (``if self.training: self.ema.mul_(0.9).add_(...)``) is a real
tensor during symbolic tracing: torch.fx ran the ``mul_`` on it (and recorded only the ``add_``). ``prepare``
returned the user's model with ``ema`` scaled by 0.9 (λ = 0 no longer reproduced the float model: 2.8e-3 off),
and a prepared model whose training updates the buffer differently from the user's. Now: restored, and refused
with the fix (``torch.fx.wrap`` the update, or move it out of forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import CaptureError


class BufferEma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        y = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * y.mean(0).detach())
        return self.fc(y - self.ema)


@torch.fx.wrap
def _wrapped_update_impl(ema: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ema.mul_(0.9).add_(0.1 * y.mean(0).detach())


class WrappedEma(BufferEma):
    def forward(self, x):
        y = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            _wrapped_update_impl(self.ema, y)
        return self.fc(y - self.ema)


def test_a_buffer_changed_while_tracing_is_restored_and_refused():
    torch.manual_seed(0)
    model, x = BufferEma(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(3):
            model(x)  # train mode: the buffer moves away from 0
    model.eval()
    before = model.ema.clone()
    with pytest.raises(CaptureError, match=r"changed ema in place for real.*torch\.fx\.wrap"):
        qtrim_fx.prepare(model, (x,))
    assert torch.equal(model.ema, before)  # the user's model is as it was


def test_the_wrapped_update_is_recorded_and_trains_like_the_model():
    torch.manual_seed(0)
    model, x = WrappedEma(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    before = model.ema.clone()
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))  # train mode: the update is in the graph
    assert torch.equal(qm.get_buffer("ema"), before)
    qtrim_fx.set_blend(qm, 0.0)
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))
    assert torch.equal(qm.get_buffer("ema"), model.ema)  # the update ran in the prepared model as in the user's
    assert not torch.equal(model.ema, before)
