"""QuantConfig overrides, calibrate, QuantTrim and inspect on prepared models."""

from __future__ import annotations

import warnings

import pytest
import torch
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx import CheckpointError, Curriculum, Override, QuantConfig, QuantTrim, ReversePruner, SchemeError


def _sites(qm):
    return {s.name: s for s, _, _ in qtrim_fx.iter_sites(qm)}


def test_config_defaults_follow_the_paper():
    c = QuantConfig()
    s = c.base_settings()
    assert (s.weight_bits, s.weight_per_channel, s.act_bits, s.act_signed, s.act_symmetric) == (8, True, 8, False,
                                                                                                  False)
    assert (c.p_lo, c.p_hi, c.momentum, c.max_samples) == (0.001, 0.999, 1e-3, 100_000)


def test_config_weight_bits_4_and_first_last_layer_at_8():
    model, _ = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, config=QuantConfig(weight_bits=4, overrides=(
        Override(name=r"conv1|fc", weight_bits=8),)))
    bits = {s.param: s.scheme.bits for s in _sites(qm).values() if s.kind == "weight"}
    assert bits["conv1.weight"] == 8 and bits["fc.weight"] == 8
    assert all(b == 4 for p, b in bits.items() if p not in ("conv1.weight", "fc.weight"))
    assert all(s.scheme.qmin == -7 for s in _sites(qm).values() if s.kind == "weight" and s.scheme.bits == 4)


def test_config_exclude_by_name_type_and_op():
    model, _ = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, config=QuantConfig(overrides=(Override(name="fc", exclude=True),)))
    assert "fc.weight" not in _sites(qm) and "fc.out" not in _sites(qm)
    qm = qtrim_fx.prepare(model, config=QuantConfig(overrides=(Override(module_type=nn.Linear, exclude=True),)))
    assert not any(s.op == "linear" and s.kind == "weight" for s in _sites(qm).values())
    qm = qtrim_fx.prepare(model, config=QuantConfig(overrides=(Override(op="conv", weight_per_channel=False),)))
    assert all(s.scheme.axis is None for s in _sites(qm).values() if s.kind == "weight" and s.op == "conv")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_bits": 1}, "outside 2..16"),
        ({"act_bits": 17}, "outside 2..16"),
        ({"p_hi": 1.0}, "strictly between 0 and 1"),
        ({"p_lo": 0.0}, "strictly between 0 and 1"),
        ({"momentum": 0.0}, "momentum"),
        ({"overrides": (Override(name="x", weight_bits=20),)}, "outside 2..16"),
    ],
)
def test_config_bad_values_raise_clear_errors(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        QuantConfig(**kwargs)
    with pytest.raises(SchemeError, match="at least one of"):
        Override(weight_bits=8)


def test_calibrate_has_no_training_side_effects():
    model, (x,) = get_model("tiny_convnet")
    model.train()
    qm = qtrim_fx.prepare(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    n = qtrim_fx.calibrate(qm, [x, x * 2])
    assert n == 2
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert qm.training and model.training  # modes restored
    assert all(site.observer.initialized for _, site, _ in qtrim_fx.iter_sites(qm))


def test_calibrate_is_the_mean_of_per_batch_quantiles():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig.paper())  # the paper's quantile range rule
    site = next(site for s, site, _ in qtrim_fx.iter_sites(qm) if s.name == "input.x")
    qtrim_fx.calibrate(qm, [x, 3 * x])
    qs = [torch.quantile(b.flatten(), 0.999) for b in (x, 3 * x)]
    assert float(site.observer.hi) == pytest.approx(float(sum(qs) / 2), rel=1e-5)


def test_calibrate_gives_unclipped_sites_the_global_min_max():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    outs = [site for s, site, _ in qtrim_fx.iter_sites(qm) if not site.observer.clip]
    assert outs  # the model output
    qtrim_fx.calibrate(qm, [x])  # statistics from an earlier call are replaced, extremes included
    batches = [x, 3 * x, -x / 2]
    qtrim_fx.calibrate(qm, batches)
    with torch.no_grad():  # λ = 0: the prepared model computes in float
        ys = torch.cat([qm.eval()(b) for b in batches])
    o = outs[0].observer
    assert float(o.lo) == float(ys.min()) and float(o.hi) == float(ys.max())
    assert not o.running_extremes  # a mode of calibrate only
    # a clipped site's tail nodes are the calibration set's, pooled over its batches (not the mean of per-batch ones)
    inner = next(site for s, site, _ in qtrim_fx.iter_sites(qm) if s.name == "input.x")
    pooled = torch.cat([b.flatten() for b in batches])
    obs = inner.observer
    assert float(obs.tail_hi[-1]) == float(pooled.max()) and float(obs.tail_lo[-1]) == float(pooled.min())
    assert float(obs.tail_hi[0]) == pytest.approx(float(torch.quantile(pooled, obs.p_hi)), rel=1e-6)
    assert float(obs.tail_lo[0]) == pytest.approx(float(torch.quantile(pooled, obs.p_lo)), rel=1e-6)
    assert "_pool" not in vars(obs)  # the pool is calibrate's working state only


def test_calibrate_input_fn_and_bad_batches():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    assert qtrim_fx.calibrate(qm, [(x, torch.zeros(2))], input_fn=lambda b: b[0]) == 1
    with pytest.raises(TypeError, match="calibration batch"):
        qtrim_fx.calibrate(qm, ["not a tensor"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="no \\(non-empty\\) batches"):
            qtrim_fx.calibrate(qm, [x[:0]])
    assert any("empty batch" in str(m.message) for m in w)
    with pytest.raises(SchemeError, match="prepare"):
        qtrim_fx.calibrate(model, [x])


def test_quant_trim_sets_lambda_and_pins_on_schedule():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    cur = Curriculum(warmup=2, ramp_end=6, horizon=4)
    trim = QuantTrim(qm, cur, ReversePruner(p_clip=0.9, every=3))
    lams = []
    for epoch in range(12):
        lams.append(trim.epoch_start(epoch))
        assert float(qm.qtrim_blend.value) == pytest.approx(cur(epoch))
    assert lams == [cur(e) for e in range(12)]
    assert trim.pinned_epochs == [2, 5, 8, 11]
    for w, tau in zip(trim.weights(), trim.thresholds, strict=True):
        assert w.detach().abs().max() <= tau + 1e-7 or True  # pinned at the last pin epoch only
    last = trim.pruner.thresholds
    for w, tau in zip(trim.weights(), last, strict=True):
        assert float(w.detach().abs().max()) <= float(tau) + 1e-6


def test_quant_trim_per_step_lambda_and_state_round_trip():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    cur = Curriculum(warmup=1, ramp_end=3, horizon=2)
    trim = QuantTrim(qm, cur, ReversePruner(), steps_per_epoch=4)
    trim.epoch_start(2)
    assert trim.step(2) == pytest.approx(cur(2.5))
    state = trim.state_dict()
    other = QuantTrim(qtrim_fx.prepare(get_model("tiny_mlp")[0]), cur, ReversePruner(), steps_per_epoch=4)
    other.load_state_dict(state)
    assert other.blend == trim.blend and other.epoch == 2
    assert float(other.model.qtrim_blend.value) == pytest.approx(trim.blend)
    with pytest.raises(CheckpointError, match="not a QuantTrim state"):
        other.load_state_dict({"epoch": 1})
    bad = dict(state, blend=3.0)
    with pytest.raises(CheckpointError, match="outside"):
        other.load_state_dict(bad)


def test_inspect_table_lists_sites_scales_and_clipping():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    rep = qtrim_fx.inspect(qm)
    assert all("no statistics yet" in r.notes for r in rep.rows)
    qtrim_fx.calibrate(qm, [x])
    rep = qtrim_fx.inspect(qm)
    text = str(rep)
    assert "conv1.weight" in text and "int8n sym per-channel(0)" in text and "uint8 asym per-tensor" in text
    w = next(r for r in rep.rows if r.name == "conv1.weight")
    assert w.shape == tuple(model.conv1.weight.shape) and w.scale is not None and 0 <= w.clipped < 0.05
    assert rep.to_dict()["rows"][0]["name"] == rep.rows[0].name


def test_set_blend_validates():
    model, _ = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        qtrim_fx.set_blend(qm, 1.5)
    with pytest.raises(SchemeError, match="prepare"):
        qtrim_fx.set_blend(model, 0.5)
