"""Regression test of issue 19: train-mode gradients at λ > 0 on a depthwise-separable net.

A small MobileNetV2-style net (benchmarks/grad_stability.py), BatchNorm warmed by 20 train-mode
forwards at the default momentum, sites calibrated in eval mode: its depthwise outputs run wider in
train mode than the calibrated ranges, so a share of them saturates at λ > 0, and train-mode BatchNorm
re-amplifies what is left. The former identity straight-through gradient also pushed gradient through
the saturated values and blew up; the clipped one stays within 3× of λ = 0 (deterministic seeds).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("grad_stability", BENCH / "grad_stability.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_depthwise_net_gradients_stay_within_3x_of_fp32_at_every_lambda():
    norms = _bench().grad_norms("tiny_depthwise", converged=False, size=32, batch=16)
    ident, clipped = norms["identity STE"], norms["clipped STE"]
    assert all(math.isfinite(v) and v > 0 for v in ident + clipped)
    assert ident[0] == clipped[0]  # λ = 0 is exact FP32 whatever the backward
    assert clipped[2] / clipped[0] < 3.0 and clipped[1] / clipped[0] < 1.25
    assert ident[2] / ident[0] > 10.0  # the failure the clipped gradient removes is present here


def test_depthwise_net_gradients_with_train_mode_statistics_match_fp32():
    """The acceptance protocol: BatchNorm and the sites warm together in train mode at λ = 0 (what the
    curriculum's first phase does), so the ranges fit train-mode activations and λ = 1 stays near λ = 0."""
    norms = _bench().grad_norms("tiny_depthwise", converged="train", size=32, batch=16)
    clipped = norms["clipped STE"]
    assert all(math.isfinite(v) and v > 0 for v in clipped)
    assert clipped[2] / clipped[0] < 3.0 and clipped[1] / clipped[0] < 1.5


def test_a_site_read_in_place_keeps_a_mask_and_the_same_gradient():
    import torch
    from torch import nn

    import qtrim_fx

    def net(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.0, inplace=inplace), nn.Linear(16, 4))

    grads = []
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3)) * 4
    for inplace in (False, True):
        qm = qtrim_fx.prepare(net(inplace), (x,))
        qtrim_fx.calibrate(qm, [x[:4]])  # narrow ranges: part of the batch saturates
        qm.train()
        qtrim_fx.set_blend(qm, 0.7)
        keep = {spec.name: site.keep_output for spec, site, _ in qtrim_fx.iter_sites(qm) if spec.kind == "activation"}
        assert any(not k for k in keep.values()) == inplace
        qm(x).square().sum().backward()  # in place after the site: no version error
        grads.append(torch.cat([p.grad.flatten() for p in qm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
