"""ReversePruner: EMA'd quantile thresholds, pin schedule and in-place clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qtrim_fx.core.scheme import SchemeError
from qtrim_fx.train.pruner import ReversePruner


def _weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A conv weight, a linear weight and a bias-like vector, heavy tailed so clipping bites.
    return [
        nn.Parameter(
            torch.randn(8, 4, 3, 3, generator=g) / torch.rand(8, 4, 3, 3, generator=g).clamp_min(0.05)
        ),
        nn.Parameter(torch.randn(16, 32, generator=g) ** 3),
        nn.Parameter(torch.randn(16, generator=g)),
    ]


def _quantile_rows(w: torch.Tensor, p: float, per_channel: bool) -> np.ndarray:
    a = np.abs(w.detach().numpy().astype(np.float64))
    rows = a.reshape(a.shape[0], -1) if per_channel else a.reshape(1, -1)
    # a row with fewer than one expected element beyond the quantile has no tail: τ = its max
    q = np.quantile(rows, p, axis=1) if rows.shape[1] * (1 - p) >= 1 else rows.max(axis=1)
    return q if per_channel else q[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_pin_bounds_every_weight_by_its_threshold(per_channel):
    ws = _weights()
    before = [w.detach().clone() for w in ws]
    pr = ReversePruner(p_clip=0.9, per_channel=per_channel)
    taus = pr.update_thresholds(ws)
    pr.pin(ws)
    for w, w0, tau in zip(ws, before, taus, strict=True):
        t = tau.reshape([-1] + [1] * (w.dim() - 1)) if per_channel else tau
        assert (w.detach().abs() <= t).all()
        # Only the tails move: values inside [-τ, τ] are untouched, the rest land exactly on ±τ.
        inside = w0.abs() <= t
        assert torch.equal(w.detach()[inside], w0[inside])
        clipped = ~inside
        # A per-channel bias has one value per channel: its own quantile, nothing to clip.
        assert clipped.any() == (w.dim() > 1 or not per_channel)
        assert torch.equal(w.detach()[clipped].abs(), torch.broadcast_to(t, w.shape)[clipped])
        assert torch.equal(torch.sign(w.detach()[clipped]), torch.sign(w0[clipped]))


@pytest.mark.parametrize("per_channel", [False, True])
def test_thresholds_are_quantiles_of_abs_weights(per_channel):
    ws = _weights(1)
    pr = ReversePruner(p_clip=0.95, per_channel=per_channel)
    taus = pr.update_thresholds(ws)
    for w, tau in zip(ws, taus, strict=True):
        np.testing.assert_allclose(tau.numpy(), _quantile_rows(w, 0.95, per_channel), rtol=1e-6)
        assert tau.shape == ((w.shape[0],) if per_channel else ())


@pytest.mark.parametrize("p_clip", [0.95, 0.99])
def test_depthwise_filters_have_no_tail_to_clip(p_clip):
    """3×3 depthwise filters (9 weights per channel) have no p_clip tail: per-channel pinning leaves them
    alone instead of cutting each filter's largest taps; a dense conv of the same net is clipped."""
    g = torch.Generator().manual_seed(3)
    depthwise = nn.Parameter(torch.randn(16, 1, 3, 3, generator=g))
    dense = nn.Parameter(torch.randn(16, 64, 3, 3, generator=g))
    before = depthwise.detach().clone()
    pr = ReversePruner(p_clip=p_clip, per_channel=True)
    taus = pr.update_thresholds([depthwise, dense])
    pr.pin([depthwise, dense])
    assert torch.equal(depthwise.detach(), before)
    assert torch.equal(taus[0], before.abs().reshape(16, -1).amax(1))
    assert (dense.detach().abs().reshape(16, -1).amax(1) == taus[1]).all()  # clipped to τ in every channel


@pytest.mark.parametrize("per_channel", [False, True])
def test_tau_follows_its_ema(per_channel):
    beta = 0.3
    pr = ReversePruner(p_clip=0.9, momentum=beta, per_channel=per_channel)
    expected = None
    for step in range(5):
        ws = [w * (1.0 + 0.5 * step) for w in _weights(step)]  # the tails drift between epochs
        qs = [_quantile_rows(w, 0.9, per_channel) for w in ws]
        expected = (
            qs if expected is None else [(1 - beta) * e + beta * q for e, q in zip(expected, qs, strict=True)]
        )
        taus = pr.update_thresholds(ws)
        for tau, e in zip(taus, expected, strict=True):
            np.testing.assert_allclose(tau.numpy(), e, rtol=2e-6)
    assert pr.num_updates == 5


def test_schedule_pins_at_start_and_every_k_epochs():
    e_w, k = 7, 5
    ws = _weights()
    pr = ReversePruner(every=k, start=e_w)
    pinned = [epoch for epoch in range(31) if pr.step(epoch, ws)]
    assert pinned == [e for e in range(31) if e >= e_w and (e - e_w) % k == 0]
    assert pinned == [7, 12, 17, 22, 27]
    # τ is updated on every epoch from E_w on (24 epochs: 7..30), not only on pin epochs.
    assert pr.num_updates == 31 - e_w
    assert pr.last_pinned_epoch == 27


def test_start_can_come_from_the_driver():
    ws = _weights()
    pr = ReversePruner(every=4)  # start=None: the curriculum's warmup is passed by the caller
    pinned = [epoch for epoch in range(20) if pr.step(epoch, ws, start=3)]
    assert pinned == [3, 7, 11, 15, 19]
    assert ReversePruner(every=4, start=5).is_pin_epoch(5, start=3)  # an explicit start wins
    assert [e for e in range(12) if ReversePruner(every=4).is_pin_epoch(e)] == [0, 4, 8]


def test_fractional_start_pins_from_the_next_whole_epoch():
    pr = ReversePruner(every=3, start=2.5)
    assert [e for e in range(12) if pr.is_pin_epoch(e)] == [3, 6, 9]


def test_no_double_pin_in_the_same_epoch():
    ws = _weights()
    pr = ReversePruner(every=2, start=0)
    assert pr.step(0, ws) is True
    assert pr.step(0, ws) is False


def test_pin_clips_the_parameter_in_place_without_touching_autograd_state():
    ws = _weights()
    ptr = [w.data_ptr() for w in ws]
    pr = ReversePruner(p_clip=0.5, start=0)
    assert pr.step(0, ws)
    assert [w.data_ptr() for w in ws] == ptr
    assert all(w.requires_grad and w.grad is None for w in ws)


def test_state_dict_round_trip():
    kw = {
        "p_clip": 0.9,
        "every": 3,
        "momentum": 0.4,
        "per_channel": True,
        "start": 1,
        "max_samples": 64,
        "seed": 5,
    }
    src = ReversePruner(**kw)
    ws_src = _weights()
    for epoch in range(6):
        src.step(epoch, ws_src)
    dst = ReversePruner(**kw)
    dst.load_state_dict(src.state_dict())
    assert dst.num_updates == src.num_updates == 5
    assert dst.last_pinned_epoch == src.last_pinned_epoch == 4
    for a, b in zip(dst.thresholds, src.thresholds, strict=True):
        assert torch.equal(a, b)
    # The saved thresholds are copies, and the next (subsampled) update continues identically.
    src.state_dict()["thresholds"][0].fill_(123.0)
    assert not (src.thresholds[0] == 123.0).any()
    ws_dst = [w.detach().clone() for w in ws_src]
    assert src.step(7, ws_src) == dst.step(7, ws_dst) is True
    for a, b in zip(dst.thresholds, src.thresholds, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ws_src, ws_dst, strict=True):
        assert torch.equal(a.detach(), b)


def test_large_weights_are_subsampled_deterministically():
    w = [torch.randn(400, 1000)]
    taus = [ReversePruner(max_samples=5000, seed=s).update_thresholds(w)[0].item() for s in (0, 0, 1)]
    assert taus[0] == taus[1] and taus[0] != taus[2]
    np.testing.assert_allclose(taus[0], _quantile_rows(w[0], 0.95, False), rtol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_clip": 0.0}, "strictly between 0 and 1"),
        ({"p_clip": 1.0}, "strictly between 0 and 1"),
        ({"every": 0}, "must be a positive int"),
        ({"every": 2.5}, "must be a positive int"),
        ({"every": True}, "must be a positive int"),
        ({"momentum": 0.0}, r"must lie in \(0, 1\]"),
        ({"momentum": 1.01}, r"must lie in \(0, 1\]"),
        ({"start": -1}, "non-negative epoch"),
        ({"start": math.nan}, "non-negative epoch"),
        ({"max_samples": 0}, "max_samples=0 must be a positive int"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        ReversePruner(**kwargs)


def test_misuse_raises_with_a_message():
    pr = ReversePruner()
    with pytest.raises(SchemeError, match="call update_thresholds"):
        pr.pin(_weights())
    pr.update_thresholds(_weights())
    with pytest.raises(SchemeError, match="tracks 3 weights but got 2"):
        pr.update_thresholds(_weights()[:2])
    with pytest.raises(SchemeError, match="not a ReversePruner state dict"):
        pr.load_state_dict({"thresholds": []})
