"""The minimum-MSE activation range (act_range="mse"): the rule against brute force, the observer's use
of it (outputs unclipped, determinism, resume), and the paper's quantile rule kept exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.core.config import DEFAULT_UPDATE_EVERY, QuantConfig
from qtrim_fx.core.fakequant import derive_qparams
from qtrim_fx.core.scheme import QuantScheme, SchemeError
from qtrim_fx.runtime import range_rule
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.quantiles import tail_nodes
from qtrim_fx.runtime.range_rule import mse_range, tail_levels

P_LO, P_HI = 0.001, 0.999
U8 = QuantScheme(bits=8, signed=False, symmetric=False)
U4 = QuantScheme(bits=4, signed=False, symmetric=False)
S8 = QuantScheme(bits=8, signed=True, symmetric=True)


def _data(kind: str, n: int = 20_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "outliers":  # Gaussian bulk, 0.02 % at 30σ
        x = torch.randn(n, generator=g)
        x[:4] = 30 * torch.randn(4, generator=g)
        return x
    if kind == "relu":
        return torch.randn(n, generator=g).relu()
    raise ValueError(kind)


def _mse(x: torch.Tensor, lo: float, hi: float, grid: QuantScheme) -> float:
    s, z = derive_qparams(grid, torch.tensor(lo), torch.tensor(hi))
    q = torch.clamp(torch.round(x / s) + z, grid.qmin, grid.qmax)
    return float(((s * (q - z) - x) ** 2).double().mean())


def _brute(x: torch.Tensor, grid: QuantScheme, n: int = 24) -> float:
    """Least fake-quant MSE over a grid of clip points between the paper's quantiles and the extremes."""
    a = x.double().numpy()
    qlo, qhi = np.quantile(a, P_LO), np.quantile(a, P_HI)
    if grid.symmetric:
        amps = np.linspace(max(abs(qlo), abs(qhi)), np.abs(a).max(), 4 * n)
        return min(_mse(x, -h, h, grid) for h in amps)
    los = np.linspace(min(a.min(), 0.0), min(qlo, 0.0), n)
    his = np.linspace(max(qhi, 0.0), max(a.max(), 0.0), n)
    return min(_mse(x, float(lo), float(hi), grid) for lo in los for hi in his)


def _rule(x: torch.Tensor, grid: QuantScheme) -> tuple[float, float]:
    rows = x.view(1, -1)
    tl = tail_nodes(rows, None, tail_levels(P_LO, False))
    th = tail_nodes(rows, None, tail_levels(P_HI, True))
    lo, hi = mse_range(tl, th, P_LO, P_HI, grid)
    return float(lo), float(hi)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "outliers", "relu"])
@pytest.mark.parametrize("grid", [U8, U4, S8], ids=["u8", "u4", "s8"])
def test_rule_is_near_the_brute_force_minimum(kind, grid):
    x = _data(kind)
    lo, hi = _rule(x, grid)
    got, best = _mse(x, lo, hi, grid), _brute(x, grid)
    a = x.double().numpy()
    paper = _mse(x, float(np.quantile(a, P_LO)), float(np.quantile(a, P_HI)), grid)
    # Near the brute-force minimum (nodes, not a continuum, are searched; a handful of lone outliers
    # is where the node model is coarsest).
    assert got <= (1.5 if kind == "outliers" else 1.15) * best
    assert got <= paper * 1.0001  # never worse than the paper's pair, which is one of the candidates
    if kind in ("gauss", "laplace") and grid.bits == 8:
        assert got <= 1.02 * best


def test_tail_nodes_match_numpy_quantiles_and_the_general_path():
    x = _data("laplace").view(1, -1)
    for p, upper in ((P_HI, True), (P_LO, False)):
        levels = tail_levels(p, upper)
        fast = tail_nodes(x, None, levels)
        np.testing.assert_allclose(fast.numpy()[0], np.quantile(x.double().numpy(), levels), rtol=1e-5, atol=1e-6)
        nf = torch.tensor([x.shape[1]])
        assert torch.equal(tail_nodes(x, nf, levels), fast)
    assert fast[0, -1] == x.min()


def test_numpy_and_torch_paths_choose_the_same_range():
    x = torch.stack([_data("gauss", 20_000), _data("laplace", 20_000) * 2 + 1])
    tl = tail_nodes(x, None, tail_levels(P_LO, False))
    th = tail_nodes(x, None, tail_levels(P_HI, True))
    for grid in (U8, U4, S8):
        a = mse_range(tl, th, P_LO, P_HI, grid)
        b = range_rule._select(tl.double(), th.double(), P_LO, P_HI, grid, range_rule._Torch)
        torch.testing.assert_close(a[0], b[0].float())
        torch.testing.assert_close(a[1], b[1].float())


def _obs(**kw) -> EmaQuantileObserver:
    return EmaQuantileObserver("range", act_range="mse", momentum=0.1, max_samples=20_000, **kw).train()


def test_observer_range_is_the_rule_on_its_ema_tails():
    obs = _obs()
    for i in range(3):
        obs(_data("laplace", 30_000) + i)
    lo, hi = mse_range(obs.tail_lo[None], obs.tail_hi[None], P_LO, P_HI, U8)
    assert float(obs.lo) == float(lo) and float(obs.hi) == float(hi)
    assert obs.tail_lo.shape == (len(range_rule.TAIL_FRACTIONS),)
    assert obs.tail_hi[-1] >= obs.hi and obs.tail_lo[-1] <= obs.lo  # inside the EMA'd min / max


def test_unclipped_range_is_the_ema_min_max_widened_to_each_update():
    obs = _obs(clip=False)
    xs = [torch.randn(5000) * s for s in (1, 3, 1, 1)]
    lo = hi = None
    for x in xs:
        obs(x)
        # An envelope: the EMA of the extremes, never inside this update's own extremes.
        lo = float(x.min()) if lo is None else min(0.9 * lo + 0.1 * float(x.min()), float(x.min()))
        hi = float(x.max()) if hi is None else max(0.9 * hi + 0.1 * float(x.max()), float(x.max()))
        np.testing.assert_allclose([float(obs.lo), float(obs.hi)], [lo, hi], rtol=1e-5)
        assert float(obs.lo) <= float(x.min()) and float(obs.hi) >= float(x.max())
    assert float(obs.hi) > float(xs[-1].max())  # decaying from the large batch, not reset by the small ones


def test_per_channel_mse_range_and_nonfinite_values():
    obs = _obs(axis=1)
    x = torch.randn(8, 3, 20, 20)  # every element sampled
    x[0, 1, 0, 0] = float("nan")
    obs(x)
    assert obs.lo.shape == (3,) and obs.tail_hi.shape == (3, len(range_rule.TAIL_FRACTIONS))
    assert torch.isfinite(obs.lo).all() and torch.isfinite(obs.hi).all() and int(obs.nonfinite) == 1


def test_same_statistics_give_the_same_range_and_resume_is_exact():
    a, b = _obs(seed=3), _obs(seed=3)
    xs = [_data("gauss", 50_000) * (1 + i / 4) for i in range(6)]
    for x in xs[:3]:
        a(x)
        b(x)
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
    c = _obs(seed=3)
    c.load_state_dict(a.state_dict())
    for x in xs[3:]:
        a(x)
        c(x)
    for name in ("lo", "hi", "tail_lo", "tail_hi", "num_updates"):
        assert torch.equal(getattr(a, name), getattr(c, name)), name


def test_quantile_rule_state_dict_loads_into_an_mse_observer():
    old = EmaQuantileObserver("range", momentum=0.5).train()
    old(torch.randn(1000))
    new = _obs()
    new.load_state_dict(old.state_dict())  # no tail buffers in the file: flat tails from [lo, hi]
    assert float(new.tail_lo[0]) == float(old.lo) and float(new.tail_hi[-1]) == float(old.hi)


def test_update_every_compensates_the_momentum():
    obs = EmaQuantileObserver("range", momentum=0.01, update_every=4)
    assert obs.update_momentum == pytest.approx(1 - 0.99**4)
    assert EmaQuantileObserver("range", momentum=0.01).update_momentum == 0.01


def test_config_defaults_and_the_paper_recipe():
    d, p = QuantConfig(), QuantConfig.paper()
    assert (d.act_range, d.update_every, d.p_lo, d.p_hi) == ("mse", DEFAULT_UPDATE_EVERY, P_LO, P_HI)
    assert (p.act_range, p.update_every, p.p_lo, p.p_hi, p.momentum) == ("quantile", 1, P_LO, P_HI, 1e-3)
    assert QuantConfig(p_lo=1e-4, p_hi=0.9999).act_range == "quantile"  # explicit quantiles: the paper's rule
    assert QuantConfig(p_hi=0.9999, act_range="mse").act_range == "mse"
    with pytest.raises(SchemeError, match="act_range"):
        QuantConfig(act_range="minmax")


def _prepared(config: QuantConfig):
    model, (x,) = get_model("tiny_mlp", batch_size=16)
    qm = qtrim_fx.prepare(model, config=config)
    qtrim_fx.calibrate(qm, [x * (1 + i / 3) for i in range(3)])
    return qm


def test_prepared_defaults_leave_outputs_unclipped_and_paper_matches_quantiles():
    qm = _prepared(QuantConfig())
    out = [site for _, site, _ in qtrim_fx.iter_sites(qm) if site.kind == "activation" and not site.observer.clip]
    assert out and all(s.observer.act_range == "mse" for s in out)
    for s in out:
        assert torch.equal(s.observer.hi, s.observer.tail_hi[..., -1])
    paper = _prepared(QuantConfig.paper())
    for _, site, _ in qtrim_fx.iter_sites(paper):
        assert site.observer.act_range == "quantile" and not hasattr(site.observer, "tail_lo")
