"""calibrate reports BatchNorm running statistics that do not describe the calibration data (issue 19).

Ranges calibrated in eval mode through a stale BatchNorm do not fit train-mode activations; training at
λ > 0 from them saturates most activations and the gradient blows up (README, "Gradients at λ > 0").
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

import qtrim_fx
from qtrim_fx.train.bn_check import StaleBatchNormWarning


def _net() -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for c in (8, 16, 16):
        blocks += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                   nn.Conv2d(c, 2 * c if c == 8 else c, 1, bias=False), nn.BatchNorm2d(2 * c if c == 8 else c)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _data(i: int) -> torch.Tensor:
    return torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) * 0.05


def _warm(model: nn.Module, converged: bool) -> nn.Module:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None if converged else 0.1
    model.train()
    with torch.no_grad():
        for i in range(20):
            model(_data(i))
    for m in bns:
        m.momentum = 0.1
    return model


def _calibrate(model: nn.Module) -> list[warnings.WarningMessage]:
    qm = qtrim_fx.prepare(model, (_data(0),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qtrim_fx.calibrate(qm, [_data(100 + i) for i in range(3)])
    return [w for w in caught if issubclass(w.category, StaleBatchNormWarning)]


def test_a_stale_warm_up_is_reported_naming_the_layers_and_the_fix():
    found = _calibrate(_warm(_net(), converged=False))
    assert len(found) == 1 and found[0].filename == __file__  # points at the user's calibrate call
    text = str(found[0].message)
    assert "BatchNorm layers normalise by running variances" in text and "×" in text
    assert re.search(r"(^|[ :,])(4|9|14) \([0-9.e+]+×\)", text)  # names a depthwise BatchNorm with its ratio
    assert "λ = 0 warm-up" in text and "momentum=None" in text  # the fix


def test_settled_statistics_give_no_warning():
    assert _calibrate(_warm(_net(), converged=True)) == []


def test_stale_statistics_really_break_train_mode_ranges():
    """What the warning is about: the calibrated output range of the stale net's last depthwise block is far
    narrower than the same tensor in train mode."""
    qm = qtrim_fx.prepare(_warm(_net(), converged=False), (_data(0),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.calibrate(qm, [_data(100 + i) for i in range(3)])
    recorded = {}
    bn = dict(qm.named_modules())["14"]  # the last depthwise conv's BatchNorm
    bn.register_forward_hook(lambda m, i, o: recorded.__setitem__(m.training, float(o.abs().max())))
    with torch.no_grad():
        qm.eval()
        qm(_data(7))
        qm.train()
        qm(_data(7))
    assert recorded[True] > 4 * recorded[False]
