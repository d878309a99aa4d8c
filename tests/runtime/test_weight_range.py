"""Weight statistics at the defaults (``weight_range="max"``: the exact max |w|) and the paper's |w| quantile
kept exact; one-signed activations (ReLU outputs) unclipped by the MSE rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.scheme import QuantScheme, SchemeError
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.range_rule import mse_range

U8 = QuantScheme(bits=8, signed=False, symmetric=False)
S8 = QuantScheme(bits=8, signed=True, symmetric=True)


def _rows_absmax(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return w.abs().max()
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).abs().amax(1)


@pytest.mark.parametrize(("axis", "shape"), [(0, (32, 16, 3, 3)), (None, (300, 700)), (1, (16, 40, 3)),
                                              (0, (512, 4096))])
@pytest.mark.parametrize("fast", [True, False])
def test_max_rule_is_the_exact_max_abs_beyond_the_subsample(axis, shape, fast, monkeypatch):
    monkeypatch.setattr(EmaQuantileObserver, "_cpu_fast_path", fast)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w.view(-1)[12345 % w.numel()] = 9.0  # one outlier: a subsample of max_samples would miss it
    obs = EmaQuantileObserver("abs", axis=axis, weight_range="max", max_samples=1000).train()
    obs(w)
    assert torch.equal(obs.hi, _rows_absmax(w, axis)) and torch.equal(obs.lo, -obs.hi)
    paper = EmaQuantileObserver("abs", axis=axis, max_samples=10**7).train()  # the paper's quantile, unchanged
    paper(w)
    rows = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
    ref = np.quantile(rows.abs().double().numpy(), 0.999, axis=1)
    np.testing.assert_allclose(paper.hi.reshape(-1).numpy(), ref, rtol=1e-6)


def test_max_rule_is_an_ema_and_leaves_out_nonfinite_values():
    obs = EmaQuantileObserver("abs", axis=0, weight_range="max", momentum=0.25).train()
    w1, w2 = torch.randn(4, 50), 2 * torch.randn(4, 50)
    w2[1, 3] = float("nan")
    w2[2, :] = float("inf")  # a row with no finite value keeps its statistic
    obs(w1)
    obs(w2)
    m1, m2 = w1.abs().amax(1), w2.nan_to_num(0, 0, 0).abs().amax(1)
    exp = 0.75 * m1 + 0.25 * m2
    exp[2] = m1[2]
    torch.testing.assert_close(obs.hi, exp)
    assert int(obs.nonfinite) == 51


def test_max_rule_resumes_exactly():
    ws = [torch.randn(8, 20) * (1 + i) for i in range(6)]
    a = EmaQuantileObserver("abs", axis=0, weight_range="max", momentum=0.3, update_every=2).train()
    for w in ws[:3]:
        a(w)
    b = EmaQuantileObserver("abs", axis=0, weight_range="max", momentum=0.3, update_every=2).train()
    b.load_state_dict(a.state_dict())
    for w in ws[3:]:
        a(w)
        b(w)
    assert torch.equal(a.hi, b.hi) and torch.equal(a.num_updates, b.num_updates)


def test_config_weight_rule_defaults_and_the_paper():
    assert QuantConfig().weight_range == "max"
    assert QuantConfig.paper().weight_range == "quantile"
    assert QuantConfig(p_hi=0.9999).weight_range == "quantile"  # explicit levels: the paper's rules
    assert QuantConfig(act_range="quantile").weight_range == "quantile"
    assert QuantConfig(p_hi=0.9999, weight_range="max").weight_range == "max"
    d = QuantConfig().to_dict()
    d.pop("overrides")
    assert QuantConfig(**d).weight_range == "max"  # a saved config round-trips (its levels are explicit)
    with pytest.raises(SchemeError, match="weight_range"):
        QuantConfig(weight_range="mse")
    with pytest.raises(SchemeError, match="weight_range"):
        EmaQuantileObserver("abs", weight_range="minmax")


def test_prepared_weight_scales_are_max_abs_by_default_and_quantiles_in_the_paper():
    model, (x,) = get_model("tiny_mlp", batch_size=16)
    for config, rule in ((QuantConfig(), "max"), (QuantConfig.paper(), "quantile")):
        qm = qtrim_fx.prepare(model, config=config)
        qtrim_fx.calibrate(qm, [x])
        weights = [(s, site) for s, site, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight"]
        assert weights
        for spec, site in weights:
            assert site.observer.weight_range == rule and spec.folded_bn is None  # tiny_mlp: no BatchNorm
            m = _rows_absmax(qm.get_parameter(spec.param).detach(), site.observer.axis)
            if rule == "max":
                torch.testing.assert_close(site.qparams()[0].reshape(-1), (m / 127).reshape(-1))
            else:
                assert bool((site.observer.hi <= m).all())


def test_one_signed_rows_keep_their_extreme_and_signed_rows_the_mse_choice():
    g = torch.Generator().manual_seed(0)
    relu = torch.randn(20_000, generator=g).relu()
    relu[0] = 25.0  # a lone large activation the MSE rule half-clips
    signed = torch.randn(20_000, generator=g)
    signed[0] = 25.0
    for x, unclipped in ((relu, True), (signed, False), (-relu, True)):
        obs = EmaQuantileObserver("range", act_range="mse", momentum=1.0).train()
        obs(x)
        tl, th = obs.tail_lo[None], obs.tail_hi[None]
        lo_mse, hi_mse = mse_range(tl, th, 0.001, 0.999, U8)
        if not unclipped:
            assert float(obs.lo) == float(lo_mse) and float(obs.hi) == float(hi_mse) < 25.0
        elif float(x.min()) >= 0:
            assert float(obs.hi) == float(x.max()) > float(hi_mse)
        else:
            assert float(obs.lo) == float(x.min()) < float(lo_mse)
    obs = EmaQuantileObserver("range", act_range="mse", momentum=1.0, grid=S8).train()
    obs(relu)
    assert float(obs.hi) == float(relu.max()) == -float(obs.lo)
