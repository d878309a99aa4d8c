"""Curriculum λ_t against the paper's piecewise formula (DESIGN.md "Semantics")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrim_fx.train.curriculum import Curriculum


def paper_lambda(t: float, e_w: float, e_f: float, h: float, alpha_max: float = 1.0) -> float:
    """The formula as printed, written independently of qtrim_fx."""
    if t < e_w:
        lam = 0.0
    elif t < e_f:
        lam = min(0.5, 0.5 * ((t - e_w) / (e_f - e_w)) ** 4)
    else:
        lam = 0.5 + 0.5 * min(1.0, (t - e_f) / h) ** 2
    return min(lam, alpha_max)


E_W, E_F, H = 10.0, 50.0, 20.0


@pytest.mark.parametrize("max_blend", [1.0, 0.8])
@pytest.mark.parametrize(
    ("t", "expected_full"),
    [
        (0.0, 0.0),
        (9.999, 0.0),  # t < E_w
        (10.0, 0.0),  # t = E_w: the ramp starts from 0
        (30.0, 0.5 * 0.5**4),  # mid-ramp: ((30 - 10) / 40)^4 / 2
        (40.0, 0.5 * 0.75**4),
        (50.0, 0.5),  # t = E_f
        (60.0, 0.5 + 0.5 * 0.25),  # E_f + H/2
        (65.0, 0.5 + 0.5 * 0.75**2),
        (70.0, 1.0),  # E_f + H
        (1000.0, 1.0),  # beyond
    ],
)
def test_key_points(t, expected_full, max_blend):
    cur = Curriculum(warmup=E_W, ramp_end=E_F, horizon=H, max_blend=max_blend)
    expected = min(expected_full, max_blend)
    assert cur(t) == pytest.approx(expected, abs=1e-15)
    assert cur(t) == pytest.approx(paper_lambda(t, E_W, E_F, H, max_blend), abs=1e-15)


def test_continuous_at_ramp_end_from_the_left():
    cur = Curriculum(E_W, E_F, H)
    for d in (1e-3, 1e-6, 1e-9):
        assert cur(E_F - d) < 0.5
        assert cur(E_F - d) == pytest.approx(0.5, abs=3 * d)
    assert cur(E_F) == 0.5
    assert cur(E_F + 1e-9) == pytest.approx(0.5, abs=1e-9)


def test_fractional_epochs():
    cur = Curriculum(2, 6, 4)
    steps_per_epoch = 8
    values = [cur(epoch + step / steps_per_epoch) for epoch in range(12) for step in range(steps_per_epoch)]
    times = [epoch + step / steps_per_epoch for epoch in range(12) for step in range(steps_per_epoch)]
    assert values == pytest.approx([paper_lambda(t, 2, 6, 4) for t in times], abs=1e-15)
    # Monotone non-decreasing, 0 during warmup, 1 at the end.
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert cur(1.875) == 0.0 and cur(2.125) > 0.0 and cur(cur.end) == 1.0


def test_max_blend_caps_everywhere():
    cur = Curriculum(E_W, E_F, H, max_blend=0.8)
    assert max(cur(t / 4) for t in range(400)) == 0.8
    assert cur(E_F) == 0.5  # below the cap: unchanged
    assert cur(E_F + H) == 0.8


@given(
    t=st.floats(-5.0, 200.0, allow_nan=False),
    e_w=st.floats(0.0, 50.0),
    span=st.floats(0.5, 80.0),
    h=st.floats(0.1, 50.0),
    alpha=st.floats(0.05, 1.0),
)
@settings(max_examples=50, deadline=None)
def test_matches_the_formula_anywhere(t, e_w, span, h, alpha):
    e_f = e_w + span
    cur = Curriculum(e_w, e_f, h, alpha)
    got = cur(t)
    assert got == pytest.approx(paper_lambda(t, e_w, e_f, h, alpha), abs=1e-12)
    assert 0.0 <= got <= alpha


def test_end_is_ramp_end_plus_horizon():
    assert Curriculum(10, 50, 20).end == 70.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": 10, "ramp_end": 10}, "must be greater than warmup"),
        ({"warmup": 10, "ramp_end": 5}, "must be greater than warmup"),
        ({"horizon": 0}, "horizon=0 must be > 0"),
        ({"horizon": -1.0}, "must be > 0"),
        ({"max_blend": 0.0}, r"max_blend=0.0 must lie in \(0, 1\]"),
        ({"max_blend": 1.5}, r"must lie in \(0, 1\]"),
        ({"warmup": -1}, "warmup=-1 must be >= 0"),
        ({"warmup": math.nan}, "warmup must be a finite number"),
        ({"ramp_end": math.inf}, "ramp_end must be a finite number"),
        ({"horizon": "20"}, "horizon must be a finite number"),
        ({"max_blend": True}, "max_blend must be a finite number"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Curriculum(**kwargs)


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf])
def test_non_finite_time_raises(t):
    with pytest.raises(ValueError, match="must be finite"):
        Curriculum()(t)


def test_numpy_scalars_are_accepted():
    cur = Curriculum(np.int64(10), np.float32(50.0), np.float64(20.0), np.float32(0.8))
    assert cur(60.0) == pytest.approx(paper_lambda(60.0, 10, 50, 20, 0.8))
