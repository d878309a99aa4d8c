"""Capture in the mode the model is in; errors say which mode failed (issue 17, item 8)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qtrim_fx


class TrainNeedsTargets(nn.Module):
    """Like torchvision's detection models: train() asks for targets. Item assignment makes symbolic
    tracing fail, so torch.export captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, targets=None):
        if self.training and targets is None:
            raise ValueError("targets should not be none when in training mode")
        y = self.conv(x).mean((2, 3)).clone()
        y[:, 0] = 0.0
        return self.fc(y)


class TrainOnlyMask(nn.Module):
    """Like Wav2Vec2's time masking: a mask sampled with numpy in train() only (a constant to the exporter)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x).clone()
        if self.training:
            mask = torch.tensor(np.random.default_rng(0).random(h.shape[-1]) < 0.5)
            h = h * mask
        h[:, 0] = 0.0  # item assignment: torch.export captures it
        return self.fc2(h)


class AlwaysFails(TrainNeedsTargets):
    def forward(self, x, targets=None):
        if x.sum() > 0:  # data-dependent in both modes
            return super().forward(x, targets)
        return -super().forward(x, targets)


def _check_eval_matches(model: nn.Module, qm: nn.Module, x: torch.Tensor) -> None:
    qm.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(qm(x), model(x), atol=1e-6)


def test_model_in_eval_whose_train_forward_fails_is_captured_in_eval():
    torch.manual_seed(0)
    model = TrainNeedsTargets().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"captured with torch.export in eval\(\) mode.*targets should not be none"):
        qm = qtrim_fx.prepare(model, (x,))
    assert qm.qtrim_info.frontend == "torch.export"
    assert not qm.training and not model.training  # modes left as they were
    _check_eval_matches(model, qm, x)


def test_train_only_constant_is_not_baked_into_the_eval_graph():
    torch.manual_seed(0)
    model = TrainOnlyMask().eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"eval\(\) mode.*does not compute what the model computes in eval"):
        qm = qtrim_fx.prepare(model, (x,))
    _check_eval_matches(model, qm, x)  # before: the train() mask multiplied the eval() output too


def test_train_graph_is_kept_when_it_reproduces_eval():
    class Dropping(TrainNeedsTargets):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.conv(x).mean((2, 3)).clone()
            y[:, 0] = 0.0
            return self.fc(self.drop(y))

    torch.manual_seed(0)
    model = Dropping().eval()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eval()-capture warning
        qm = qtrim_fx.prepare(model, (x,))
    _check_eval_matches(model, qm, x)
    qm.train()
    with torch.no_grad():
        a, b = qm(x), qm(x)
    assert not torch.equal(a, b)  # dropout follows train(): the train() graph was kept


def test_both_modes_failing_names_each_mode():
    with pytest.raises(qtrim_fx.CaptureError) as info:
        qtrim_fx.prepare(AlwaysFails().train(), (torch.randn(2, 3, 8, 8),))
    msg = str(info.value)
    assert "in train() mode:" in msg and "in eval() mode:" in msg
    assert "targets" in msg or "model.eval()" in msg  # what to pass


def test_symbolic_capture_keeps_the_models_mode_when_graphs_differ():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.training:  # a different graph in train(): traced in the model's own mode
                x = x + 1.0
            return self.fc(x)

    for training in (False, True):
        model = Noisy().train(training)
        x = torch.randn(3, 4)
        with pytest.warns(UserWarning, match=r"captured in (eval|train)\(\) mode"):
            qm = qtrim_fx.prepare(model)
        with torch.no_grad():
            assert torch.allclose(qm.train(training)(x), model.train(training)(x))
