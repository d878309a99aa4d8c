"""EmaQuantileObserver: subsampled quantiles, EMA, robustness, modes and state."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from qtrim_fx.core.fakequant import derive_qparams
from qtrim_fx.core.scheme import QuantScheme, SchemeError
from qtrim_fx.runtime.observer import EmaQuantileObserver

P_LO, P_HI = 0.001, 0.999


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _heavy(shape, seed=0) -> np.ndarray:
    """Skewed, heavy-tailed float32 data (so quantiles are not symmetric)."""
    r = _rng(seed)
    return (r.standard_t(3, size=shape) * 2.0 + r.exponential(1.0, size=shape) - 0.3).astype(np.float32)


def _observe(obs: EmaQuantileObserver, x: np.ndarray) -> None:
    obs.train()
    obs(torch.from_numpy(x))


def _channel_rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _close(actual: torch.Tensor, expected, rtol=1e-6, atol=1e-6) -> None:
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


# -- quantiles below S_max agree with numpy.quantile (linear interpolation) ------------------


@pytest.mark.parametrize("shape", [(5000,), (7, 13, 11), (3,), (1,)])
def test_range_mode_per_tensor_matches_numpy(shape):
    x = _heavy(shape)
    obs = EmaQuantileObserver("range")
    _observe(obs, x)
    assert obs.lo.shape == () and obs.hi.shape == ()
    _close(obs.lo, np.quantile(x, P_LO))
    _close(obs.hi, np.quantile(x, P_HI))


@pytest.mark.parametrize(("p_lo", "p_hi"), [(0.01, 0.99), (0.2, 0.7), (0.5, 0.6)])
def test_other_quantile_levels_match_numpy(p_lo, p_hi):
    x = _heavy((4001,), seed=3)
    obs = EmaQuantileObserver("range", p_lo=p_lo, p_hi=p_hi)
    _observe(obs, x)
    _close(obs.lo, np.quantile(x, p_lo))
    _close(obs.hi, np.quantile(x, p_hi))


def test_abs_mode_per_tensor_matches_numpy():
    x = _heavy((64, 3, 3, 3), seed=1)
    obs = EmaQuantileObserver("abs")
    _observe(obs, x)
    m = np.quantile(np.abs(x), P_HI)
    _close(obs.hi, m)
    _close(obs.lo, -m)


@pytest.mark.parametrize("mode", ["range", "abs"])
@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 40, 7), 0), ((5, 9, 30), 1), ((4, 30, 8), -1), ((50, 12), -1)]
)
def test_per_channel_matches_numpy(mode, shape, axis):
    x = _heavy(shape, seed=2)
    obs = EmaQuantileObserver(mode, axis=axis)
    _observe(obs, x)
    rows = _channel_rows(x, axis)
    assert obs.lo.shape == (shape[axis],)
    if mode == "range":
        _close(obs.lo, np.quantile(rows, P_LO, axis=1))
        _close(obs.hi, np.quantile(rows, P_HI, axis=1))
    else:
        m = np.quantile(np.abs(rows), P_HI, axis=1)
        _close(obs.hi, m)
        _close(obs.lo, -m)


def test_per_channel_on_a_non_contiguous_input():
    x = _heavy((8, 6, 10), seed=4)
    xt = torch.from_numpy(x).transpose(0, 2)  # (10, 6, 8), non-contiguous
    assert not xt.is_contiguous()
    obs = EmaQuantileObserver("range", axis=1)
    obs.train()
    obs(xt)
    rows = _channel_rows(xt.numpy(), 1)
    _close(obs.lo, np.quantile(rows, P_LO, axis=1))
    _close(obs.hi, np.quantile(rows, P_HI, axis=1))


@pytest.mark.parametrize(("mode", "axis"), [("range", None), ("abs", 0)])
def test_contiguous_and_strided_inputs_give_the_same_subsample(mode, axis):
    """Rows contiguous in memory are sampled from an unfold view, others by gather: same elements."""
    x = torch.from_numpy(_heavy((64, 5000), seed=15))
    strided = x.t().contiguous().t()  # same values, column-major
    assert torch.equal(x, strided) and not strided.is_contiguous()
    a = EmaQuantileObserver(mode, axis=axis, max_samples=4096, seed=3).train()
    b = EmaQuantileObserver(mode, axis=axis, max_samples=4096, seed=3).train()
    for _ in range(3):
        a(x)
        b(strided)
        assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)


def test_half_precision_input():
    x = _heavy((3000,), seed=5).astype(np.float16)
    obs = EmaQuantileObserver("range")
    obs.train()
    obs(torch.from_numpy(x))
    assert obs.lo.dtype == torch.float32
    _close(obs.lo, np.quantile(x.astype(np.float32), P_LO))
    _close(obs.hi, np.quantile(x.astype(np.float32), P_HI))


# -- EMA -----------------------------------------------------------------------------------


def test_first_observation_initializes_the_ema():
    x = _heavy((2000,), seed=6)
    obs = EmaQuantileObserver("range", momentum=1e-3)
    assert torch.isnan(obs.lo) and not obs.initialized
    _observe(obs, x)
    # Not 1e-3 * q: the first statistic is taken as is.
    _close(obs.lo, np.quantile(x, P_LO))
    _close(obs.hi, np.quantile(x, P_HI))
    assert obs.initialized and int(obs.num_updates) == 1


@pytest.mark.parametrize(("mode", "axis"), [("range", None), ("abs", None), ("range", 1), ("abs", 0)])
def test_ema_recursion_over_several_steps(mode, axis):
    mu = 0.2
    obs = EmaQuantileObserver(mode, axis=axis, momentum=mu)
    exp_lo = exp_hi = None
    for step in range(6):
        x = _heavy((9, 7, 20), seed=10 + step) * (1.0 + step)  # drifting range
        _observe(obs, x)
        rows = x.reshape(1, -1) if axis is None else _channel_rows(x, axis)
        if mode == "range":
            lo_t, hi_t = np.quantile(rows, P_LO, axis=1), np.quantile(rows, P_HI, axis=1)
        else:
            hi_t = np.quantile(np.abs(rows), P_HI, axis=1)
            lo_t = -hi_t
        if exp_lo is None:
            exp_lo, exp_hi = lo_t, hi_t
        else:
            exp_lo = (1 - mu) * exp_lo + mu * lo_t
            exp_hi = (1 - mu) * exp_hi + mu * hi_t
        lo, hi = (exp_lo[0], exp_hi[0]) if axis is None else (exp_lo, exp_hi)
        _close(obs.lo, lo, rtol=2e-6)
        _close(obs.hi, hi, rtol=2e-6)
    assert int(obs.num_updates) == 6


# -- robustness ----------------------------------------------------------------------------------


def test_non_finite_values_never_enter_the_statistics():
    x = _heavy((3000,), seed=7)
    bad = x.copy()
    bad[::7] = np.nan
    bad[3::11] = np.inf
    bad[5::13] = -np.inf
    finite = bad[np.isfinite(bad)]
    obs = EmaQuantileObserver("range")
    _observe(obs, bad)
    assert torch.isfinite(obs.lo) and torch.isfinite(obs.hi)
    _close(obs.lo, np.quantile(finite, P_LO))
    _close(obs.hi, np.quantile(finite, P_HI))


def test_non_finite_values_in_a_large_subsampled_tensor():
    x = torch.randn(400_000)
    x[::3] = math.nan
    x[1::5] = math.inf
    x[2::5] = -math.inf
    obs = EmaQuantileObserver("range", max_samples=10_000)
    obs.train()
    obs(x)
    assert torch.isfinite(obs.lo) and torch.isfinite(obs.hi)
    assert -4.5 < obs.lo.item() < -2.0 and 2.0 < obs.hi.item() < 4.5


@pytest.mark.parametrize(("mode", "axis"), [("range", None), ("abs", None), ("range", 0)])
def test_all_nan_input_leaves_statistics_unchanged(mode, axis):
    obs = EmaQuantileObserver(mode, axis=axis, momentum=0.5)
    _observe(obs, _heavy((4, 50), seed=8))
    lo, hi = obs.lo.clone(), obs.hi.clone()
    _observe(obs, np.full((4, 50), np.nan, np.float32))
    _observe(obs, np.full((4, 50), np.inf, np.float32))
    assert torch.equal(obs.lo, lo) and torch.equal(obs.hi, hi)


def test_one_all_nan_channel_keeps_its_statistics():
    obs = EmaQuantileObserver("range", axis=0, momentum=0.5)
    x = _heavy((3, 100), seed=9)
    _observe(obs, x)
    before = obs.lo.clone()
    y = _heavy((3, 100), seed=10)
    y[1] = np.nan
    _observe(obs, y)
    assert obs.lo[1] == before[1]
    _close(obs.lo[[0, 2]], 0.5 * before[[0, 2]].numpy() + 0.5 * np.quantile(y[[0, 2]], P_LO, axis=1))


def test_never_observed_statistics_give_finite_scales():
    obs = EmaQuantileObserver("range")
    _observe(obs, np.full(10, np.nan, np.float32))  # nothing finite ever seen
    lo, hi = obs.stats()
    scale, zp = derive_qparams(QuantScheme(signed=False, symmetric=False), lo, hi)
    assert torch.isfinite(scale) and scale.item() > 0 and torch.isfinite(zp)


@pytest.mark.parametrize(("mode", "symmetric"), [("range", False), ("range", True), ("abs", True)])
def test_all_zero_tensor_gives_eps_scale(mode, symmetric):
    eps = 1e-6
    obs = EmaQuantileObserver(mode)
    _observe(obs, np.zeros((16, 16), np.float32))
    scheme = QuantScheme(bits=8, signed=symmetric, symmetric=symmetric)
    scale, zp = derive_qparams(scheme, *obs.stats(), eps=eps)
    levels = 127 if symmetric else 255  # DESIGN: ε / (2^(b-1) - 1) symmetric, ε / (2^b - 1) asymmetric
    assert scale.item() == np.float32(np.float32(eps) / np.float32(levels))
    assert scale.item() > 0 and torch.isfinite(zp)


@pytest.mark.parametrize("c", [2.5, -0.75])
def test_constant_tensor_gives_finite_nonzero_scale(c):
    obs = EmaQuantileObserver("range")
    _observe(obs, np.full((1000,), c, np.float32))
    assert obs.lo.item() == obs.hi.item() == np.float32(c)
    scale, zp = derive_qparams(QuantScheme(bits=8, signed=False, symmetric=False), *obs.stats())
    # The range [c, c] is widened to include 0, so the scale is |c| / 255, never NaN or 0.
    assert scale.item() == pytest.approx(abs(c) / 255, rel=1e-6)
    assert zp.item() == (0.0 if c > 0 else 255.0)


# -- modes ------------------------------------------------------------------------------------------


def test_eval_mode_freezes_statistics():
    obs = EmaQuantileObserver("range", momentum=0.5)
    _observe(obs, _heavy((500,), seed=11))
    lo, hi, n = obs.lo.clone(), obs.hi.clone(), int(obs.num_updates)
    obs.eval()
    for s in range(3):
        obs(torch.from_numpy(_heavy((500,), seed=20 + s) * 10))
    assert torch.equal(obs.lo, lo) and torch.equal(obs.hi, hi) and int(obs.num_updates) == n
    obs.train()
    obs(torch.from_numpy(_heavy((500,), seed=30) * 10))
    assert int(obs.num_updates) == n + 1 and not torch.equal(obs.hi, hi)


def test_eval_mode_before_any_observation_records_nothing():
    obs = EmaQuantileObserver("range").eval()
    obs(torch.randn(100))
    assert not obs.initialized and torch.isnan(obs.lo)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_update_every_updates_on_calls_1_n_plus_1_2n_plus_1(every):
    obs = EmaQuantileObserver("range", momentum=1.0, update_every=every)
    obs.train()
    updated = []
    for call in range(1, 14):
        before = int(obs.num_updates)
        obs(torch.full((64,), float(call)))  # a constant tensor: the quantiles are the call index
        if int(obs.num_updates) > before:
            updated.append(call)
            assert obs.hi.item() == float(call)
    assert updated == [c for c in range(1, 14) if (c - 1) % every == 0]


# -- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "axis"), [("range", None), ("abs", 0), ("range", 1)])
def test_state_dict_round_trip_and_identical_next_update(mode, axis):
    kw = {"mode": mode, "axis": axis, "momentum": 0.3, "max_samples": 500, "seed": 7}
    src = EmaQuantileObserver(**kw)
    for s in range(3):
        _observe(src, _heavy((6, 40, 9), seed=40 + s))
    dst = EmaQuantileObserver(**kw)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.lo, src.lo) and torch.equal(dst.hi, src.hi)
    assert int(dst.num_updates) == int(src.num_updates) == 3
    assert dst.initialized
    # Above max_samples the next update subsamples: the seed sequence must continue identically.
    nxt = _heavy((6, 40, 9), seed=99)
    _observe(src, nxt)
    _observe(dst, nxt)
    assert torch.equal(dst.lo, src.lo) and torch.equal(dst.hi, src.hi)


def test_state_dict_holds_the_raw_statistics():
    obs = EmaQuantileObserver("range", axis=0)
    _observe(obs, _heavy((3, 100), seed=12))
    assert set(obs.state_dict()) == {"lo", "hi", "num_updates", "nonfinite", "calls"}
    assert obs.state_dict()["lo"].shape == (3,)


def test_per_channel_count_must_not_change():
    obs = EmaQuantileObserver("range", axis=0)
    _observe(obs, _heavy((3, 10)))
    with pytest.raises(SchemeError, match="fixed channel count"):
        _observe(obs, _heavy((4, 10)))


def test_subsampling_is_deterministic_for_a_seed():
    x = torch.from_numpy(_heavy((300_000,), seed=13))

    def run(seed):
        obs = EmaQuantileObserver("range", momentum=0.5, max_samples=2_000, seed=seed)
        obs.train()
        out = []
        for _ in range(3):
            obs(x)
            out.append((obs.lo.item(), obs.hi.item()))
        return out

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c  # a different seed draws a different subsample
    # The subsample changes between updates too (the update count is mixed into the seed).
    assert len({v for v, _ in a}) > 1


@pytest.mark.parametrize(
    ("mode", "axis", "shape"), [("range", None, (8, 64, 50, 50)), ("abs", 0, (256, 4096))]
)
def test_tensors_above_s_max_give_quantiles_close_to_numpy(mode, axis, shape):
    x = torch.from_numpy(_heavy(shape, seed=14))
    assert x.numel() > 1_000_000
    obs = EmaQuantileObserver(mode, axis=axis)
    obs.train()
    obs(x)
    xn = x.numpy()
    if axis is None:
        if mode == "range":
            np.testing.assert_allclose(obs.lo.item(), np.quantile(xn, P_LO), rtol=0.15)
            np.testing.assert_allclose(obs.hi.item(), np.quantile(xn, P_HI), rtol=0.15)
    else:
        # 390 samples per channel: use a level the subsample can resolve, checked per channel.
        obs = EmaQuantileObserver(mode, axis=axis, p_hi=0.9)
        obs.train()
        obs(x)
        ref = np.quantile(np.abs(_channel_rows(xn, axis)), 0.9, axis=1)
        np.testing.assert_allclose(obs.hi.numpy(), ref, rtol=0.25)
        assert abs(np.median(obs.hi.numpy() / ref) - 1) < 0.03


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "minmax"}, "mode must be"),
        ({"p_lo": 0.0}, "strictly between 0 and 1"),
        ({"p_hi": 1.0}, "strictly between 0 and 1"),
        ({"p_lo": 0.9, "p_hi": 0.5}, "must be below"),
        ({"momentum": 0.0}, r"\(0, 1\]"),
        ({"momentum": 1.5}, r"\(0, 1\]"),
        ({"max_samples": 0}, "max_samples"),
        ({"update_every": 0}, "update_every"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        EmaQuantileObserver(**kwargs)


def test_axis_out_of_range_raises():
    obs = EmaQuantileObserver("range", axis=3).train()
    with pytest.raises(SchemeError, match="out of range"):
        obs(torch.randn(4, 5))


# -- cost --------------------------------------------------------------------------------------------


def test_update_cost_is_bounded_by_the_subsample():
    """A 1e7-element update costs about the same as a 1e5 one (benchmarks/observer_cost.py).

    Timed alternately, best of several rounds, so load from other processes on a shared
    machine does not decide the outcome.
    """
    cases = []
    for n in (100_000, 10_000_000):
        obs = EmaQuantileObserver("range").train()
        x = torch.randn(n)
        obs(x)
        cases.append((obs, x, []))
    for _ in range(9):
        for obs, x, times in cases:
            t0 = time.perf_counter()
            obs(x)
            times.append(time.perf_counter() - t0)
    small, large = (min(times) for _, _, times in cases)
    assert large < 6 * small, f"1e7 update {large * 1e3:.2f} ms vs 1e5 {small * 1e3:.2f} ms"


def test_nonfinite_values_are_counted_without_entering_the_statistics():
    obs = EmaQuantileObserver("range")
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    x[:10] = np.nan
    x[10:15] = np.inf
    _observe(obs, x)
    assert int(obs.nonfinite) == 15
    assert torch.isfinite(obs.lo) and torch.isfinite(obs.hi)


def test_state_dict_keeps_the_update_every_phase():
    obs = EmaQuantileObserver(update_every=3)
    obs.train()
    for _ in range(5):  # updates on calls 1 and 4
        obs(torch.randn(64))
    state = {k: v.clone() for k, v in obs.state_dict().items()}  # the buffers change in place below
    assert int(state["calls"]) == 5 and int(state["num_updates"]) == 2
    fresh = EmaQuantileObserver(update_every=3)
    fresh.load_state_dict(state)  # strict: "calls" is consumed by the load hook
    assert fresh._calls == 5 and fresh._updates == 2
    x = torch.randn(64)
    obs(x)
    fresh(x)  # call 6: no update on either
    obs(x)
    fresh(x)  # call 7: both update, with the same seeded subsample
    assert int(fresh.num_updates) == int(obs.num_updates) == 3
    assert torch.equal(fresh.lo, obs.lo) and torch.equal(fresh.hi, obs.hi)
    legacy = {k: v for k, v in state.items() if k != "calls"}
    older = EmaQuantileObserver(update_every=3)
    older.load_state_dict(legacy)  # files from before the call count: next update N calls on
    assert older._calls == 6


@pytest.mark.parametrize(
    ("mode", "axis", "shape"),
    [("range", None, (8, 16, 40, 40)), ("range", None, (3, 50)), ("range", 1, (4, 24, 30, 30)), ("range", 0, (5, 7)),
     ("abs", 0, (64, 32, 3, 3)), ("abs", 0, (300, 700)), ("abs", None, (128, 96)), ("abs", 1, (16, 40, 3))],
)
def test_cpu_fast_path_is_bit_identical_to_the_general_path(mode, axis, shape):
    """All-finite CPU updates take host-side ranks and a mask-free EMA; nothing may change."""
    fast = EmaQuantileObserver(mode, axis=axis, momentum=0.3, max_samples=20_000)
    slow = EmaQuantileObserver(mode, axis=axis, momentum=0.3, max_samples=20_000)
    slow._cpu_fast_path = False
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x = torch.randn(shape, generator=gen) * (1 + step)
        if step == 3:
            x.view(-1)[::7] = float("nan")  # a step with non-finite values takes the general path in both
        if step == 4:
            x = x.round()  # ties in the order statistics
        fast.observe(x)
        slow.observe(x)
        assert torch.equal(fast.lo, slow.lo) and torch.equal(fast.hi, slow.hi), step
        assert torch.equal(fast.nonfinite, slow.nonfinite) and int(fast.num_updates) == int(slow.num_updates)
    # Buffers replaced or reloaded with never-observed (NaN) entries: the fast EMA must notice.
    state = {k: v.clone() for k, v in slow.state_dict().items()}
    state["lo"].view(-1)[0] = float("nan")
    state["hi"].view(-1)[0] = float("nan")
    fast.load_state_dict(state)
    slow.load_state_dict(state)
    x = torch.randn(shape, generator=gen)
    fast.observe(x)
    slow.observe(x)
    assert torch.equal(fast.lo, slow.lo) and torch.equal(fast.hi, slow.hi)
    assert not torch.isnan(fast.lo).any()



def test_observer_made_and_used_under_inference_mode():
    # Inference tensors have no version counter; the CPU fast path must not rely on one.
    with torch.inference_mode():
        obs = EmaQuantileObserver("range", momentum=0.5)
        ref = EmaQuantileObserver("range", momentum=0.5)
        ref._cpu_fast_path = False
        for seed in range(3):
            x = torch.randn(500, generator=torch.Generator().manual_seed(seed))
            obs.observe(x)
            ref.observe(x)
        assert torch.equal(obs.lo, ref.lo) and torch.equal(obs.hi, ref.hi)


def test_an_observer_pickled_before_the_attention_mask_rules_loads():
    """A whole prepared model saved with ``torch.save`` by an older qtrim_fx: its observers lack the new attributes."""
    from qtrim_fx.runtime.observer import EmaQuantileObserver

    old = EmaQuantileObserver()
    state = old.__dict__.copy()
    del state["softmax_dim"], state["mask_operand"]
    obs = EmaQuantileObserver.__new__(EmaQuantileObserver)
    obs.__setstate__(state)
    assert obs.softmax_dim is None and obs.mask_operand is None
    obs.train()
    obs(torch.randn(64))
    assert obs.initialized
