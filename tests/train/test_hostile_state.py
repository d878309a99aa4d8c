"""Hostile or corrupted state is refused before it changes anything or runs any code.

* ``checkpoint.load`` resolves the module types a saved config names from an allow-list (``torch.nn``
  classes, the classes of the model loaded into); it never imports a module a file names.
* A per-tensor state loaded into a per-channel model (and back) and a blend λ outside [0, 1] raise
  :class:`CheckpointError` naming the key, through ``load_state_dict`` and ``checkpoint.load``.
* ``prepare`` refuses an already prepared model (also wrapped, or nested) with a clear ``ConfigError``.
* ``QuantConfig`` / ``ReversePruner`` arguments and ``QuantTrim.load_state_dict`` states are validated
  up front: a refused one leaves the objects as they were.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import CheckpointError, ConfigError
from qtrim_fx.runtime.blend import BlendControl
from qtrim_fx.train import checkpoint


def _raises(exc: type[BaseException], call, *fragments: str) -> str:
    """``call()`` raises ``exc`` whose message holds every fragment."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def _same(a: Any, b: Any) -> bool:
    """Deep equality of (nested) states holding tensors (NaN equals NaN: never-observed statistics)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# -- 1. checkpoint.load imports nothing a file names ------------------------------------------------


def test_checkpoint_load_never_imports_a_module_type_named_in_the_file(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "qtrim_hostile_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from torch import nn\n\n\nclass T(nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qtrim_hostile_mod", raising=False)  # and removed again afterwards
    model = get_model("tiny_mlp")[0]
    path = tmp_path / "qm.pt"
    checkpoint.save(qtrim_fx.prepare(model), path)
    payload = torch.load(path, weights_only=True)
    override = {"name": None, "module_type": ["qtrim_hostile_mod:T"], "op": None, "weight_bits": 4,
                "weight_per_channel": None, "act_bits": None, "act_signed": None, "act_symmetric": None,
                "exclude": None}
    payload["config"]["overrides"] = [override]
    torch.save(payload, path)

    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_mlp")[0], path),
            "module type 'qtrim_hostile_mod:T'", "neither a torch.nn class nor the class of a module in this TinyMLP",
            "never imports", "Pass config=")
    _raises(CheckpointError, lambda: checkpoint.config_from_plain(payload["config"]), "'qtrim_hostile_mod:T'")
    assert not marker.exists() and "qtrim_hostile_mod" not in sys.modules

    # The allow-list: torch.nn classes (any submodule, private bases too) and the model's own classes.
    model = get_model("tiny_mlp")[0]
    allowed = ["torch.nn.modules.linear:Linear", "torch.nn.modules.conv:_ConvNd",
               f"{type(model).__module__}:{type(model).__qualname__}"]
    payload["config"]["overrides"] = [dict(override, module_type=allowed)]
    torch.save(payload, path)
    qm = checkpoint.load(model, path)
    assert qm.qtrim_info.config.overrides[0].module_type == (nn.Linear, nn.modules.conv._ConvNd, type(model))
    # A name that only looks like torch.nn, or an object there that is not a module class, is refused.
    for name in ("torch.nn.functional:relu", "torch.nn:parameter.Parameter", "torch.nnx:Linear", "Linear"):
        payload["config"]["overrides"] = [dict(override, module_type=[name])]
        torch.save(payload, path)
        _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_mlp")[0], path), repr(name))


# -- 2. per-tensor vs per-channel statistics, blend λ outside [0, 1] --------------------------------


def _calibrated(per_channel: bool):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(weight_per_channel=per_channel))
    qtrim_fx.calibrate(qm, [x])
    return qm


@pytest.mark.parametrize("calibrated", [True, False])
def test_per_tensor_state_into_per_channel_model_and_back_is_refused(tmp_path, calibrated):
    per_tensor_cfg = qtrim_fx.QuantConfig(weight_per_channel=False)
    per_channel_cfg = qtrim_fx.QuantConfig(weight_per_channel=True)
    if calibrated:
        per_tensor, per_channel = _calibrated(False), _calibrated(True)
    else:
        per_tensor = qtrim_fx.prepare(get_model("tiny_convnet")[0], config=per_tensor_cfg)
        per_channel = qtrim_fx.prepare(get_model("tiny_convnet")[0], config=per_channel_cfg)
    pt_path, pc_path = tmp_path / "pt.pt", tmp_path / "pc.pt"
    checkpoint.save(per_tensor, pt_path)
    checkpoint.save(per_channel, pc_path)

    for target, source in ((per_channel, per_tensor), (per_tensor, per_channel)):
        before = _snapshot(target.state_dict())
        _raises(CheckpointError, lambda t=target, s=source: t.load_state_dict(s.state_dict()),
                "site 'conv1.weight' has statistics of shape", "qtrim_sites.conv1_weight.observer.lo",
                "prepare with the same config")
        assert _same(target.state_dict(), before)  # refused before anything was loaded
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_convnet")[0], pt_path, config=per_channel_cfg),
            "has statistics of shape () but the site is int8n sym per-channel(0) here", "conv1_weight")
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_convnet")[0], pc_path, config=per_tensor_cfg),
            "has statistics of shape (8,) but the site is int8n sym per-tensor here", "conv1_weight")
    # The matching combinations still load.
    checkpoint.load(get_model("tiny_convnet")[0], pt_path)
    checkpoint.load(get_model("tiny_convnet")[0], pc_path)


@pytest.mark.parametrize("value", [math.nan, -0.25, 5.0, math.inf])
def test_blend_value_outside_0_1_is_refused_on_load(tmp_path, value):
    qm = _calibrated(True)
    qtrim_fx.set_blend(qm, 0.5)
    state = qm.state_dict()
    state["qtrim_blend.value"] = torch.tensor(value)
    before = _snapshot(qm.state_dict())
    for strict in (True, False):
        _raises(CheckpointError, lambda s=strict: qm.load_state_dict(state, strict=s),
                "'qtrim_blend.value'", "outside [0, 1]")
    assert _same(qm.state_dict(), before) and qm.qtrim_blend.get() == 0.5
    _raises(CheckpointError, lambda: BlendControl(0.5).load_state_dict({"value": torch.tensor(value)}), "'value'")

    path = tmp_path / "qm.pt"
    checkpoint.save(qm, path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["qtrim_blend.value"] = torch.tensor(value)
    torch.save(payload, path)
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_convnet")[0], path), "'qtrim_blend.value'")
    # Not one number at all.
    state["qtrim_blend.value"] = torch.tensor([0.5, 0.5])
    _raises(CheckpointError, lambda: qm.load_state_dict(state), "'qtrim_blend.value'", "0-D tensor")


# -- 3. prepare() on a prepared model --------------------------------------------------------------


def test_prepare_refuses_an_already_prepared_model():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    sites = len(qm.qtrim_sites)
    fix = "Pass the float model, or use the prepared model as it is"
    _raises(ConfigError, lambda: qtrim_fx.prepare(qm), "the TinyMLP passed is already prepared", fix)
    _raises(ConfigError, lambda: qtrim_fx.prepare(qm, (x,)), "already prepared", fix)  # used to double-instrument
    _raises(ConfigError, lambda: qtrim_fx.prepare(nn.DataParallel(qm)),
            "DataParallel passed wraps an already prepared model", fix)
    _raises(ConfigError, lambda: qtrim_fx.prepare(nn.Sequential(qm, nn.ReLU())),
            "submodule '0' of the Sequential passed is already prepared", fix)
    assert len(qm.qtrim_sites) == sites
    assert qtrim_fx.is_prepared(qtrim_fx.prepare(get_model("tiny_mlp")[0]))  # the float model still prepares


# -- 4. validation up front -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    ({"seed": "abc"}, "seed='abc' must be an int"),
    ({"seed": True}, "seed=True must be an int"),
    ({"seed": 1.5}, "seed=1.5 must be an int"),
    ({"eps": 1e300}, "eps=1e+300 must be a number in [1e-30, 0.01]"),
    ({"eps": math.inf}, "eps=inf must be a number in"),
    ({"eps": math.nan}, "eps=nan must be a number in"),
    ({"eps": 0.5}, "eps=0.5 must be a number in"),
    ({"eps": 1e-45}, "eps=1e-45 must be a number in"),
    ({"eps": 0.0}, "eps=0.0 must be a number in"),
    ({"eps": True}, "eps=True must be a number in"),
])
def test_quant_config_refuses_bad_seed_and_eps(kwargs, fragment):
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.QuantConfig(**kwargs), fragment)


def test_quant_config_accepts_eps_and_seed_in_range():
    for kwargs in ({"eps": 1e-2}, {"eps": 1e-30}, {"eps": 1e-8}, {"seed": -7}, {"seed": 2**40}):
        qtrim_fx.QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_samples": math.inf}, "max_samples=inf must be a positive int"),
    ({"max_samples": 2.5}, "max_samples=2.5 must be a positive int"),
    ({"max_samples": "100"}, "max_samples='100' must be a positive int"),
    ({"max_samples": True}, "max_samples=True must be a positive int"),
    ({"seed": "x"}, "seed='x' must be an int"),
    ({"seed": 1.5}, "seed=1.5 must be an int"),
])
def test_pruner_refuses_non_int_max_samples_and_seed(kwargs, fragment):
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.ReversePruner(**kwargs), fragment)


def _trims():
    """A saved QuantTrim state (epoch 4, pinned) and another QuantTrim with its own, different state."""
    cur = qtrim_fx.Curriculum(warmup=1, ramp_end=3, horizon=2)
    models = []
    for _ in range(2):
        model, (x,) = get_model("tiny_mlp")
        qm = qtrim_fx.prepare(model.train())
        qtrim_fx.calibrate(qm, [x])
        models.append(qm)
    src = qtrim_fx.QuantTrim(models[0], cur, qtrim_fx.ReversePruner(every=1))
    for epoch in range(5):
        src.epoch_start(epoch)
    dst = qtrim_fx.QuantTrim(models[1], cur, qtrim_fx.ReversePruner(every=1))
    dst.epoch_start(1)
    return src.state_dict(), dst


def _edit(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(state)
    pruner = changes.pop("pruner", None)
    if pruner is not None:
        out["pruner"] = dict(state["pruner"], **pruner)
    out.update(changes)
    return out


@pytest.mark.parametrize("changes, fragment", [
    ({"pruner": {"num_updates": "many"}}, "num_updates='many' is not a non-negative int"),
    ({"pruner": {"num_updates": -1}}, "num_updates=-1 is not a non-negative int"),
    ({"pruner": {"last_pinned_epoch": "x"}}, "last_pinned_epoch='x' is not a non-negative int"),
    ({"pruner": {"thresholds": "abc"}}, "no 'thresholds' list"),
    ({"pruner": {"thresholds": [0.1, 0.1, 0.1]}}, "threshold τ of fc1.weight is not a finite, non-negative tensor"),
    ({"pruner": {"thresholds": [torch.ones(32)] * 3}}, "threshold τ of shape (32,) for fc1.weight"),
    ({"pruner": {"thresholds": [torch.tensor(1)] * 3}}, "thresholds[0] is tensor(1), not a floating-point tensor"),
    ({"epoch": "3"}, "epoch='3' is not an int"),
    ({"epoch": 2.5}, "epoch=2.5 is not an int"),
    ({"epoch": -5}, "epoch=-5 is not an int >= -1"),
    ({"blend": "0.5"}, "blend='0.5' is not a number in [0, 1]"),
    ({"pinned_epochs": "12"}, "pinned_epochs='12' is not a list of non-negative ints"),
    ({"pinned_epochs": [1, None]}, "is not a list of non-negative ints"),
    ({"weights": 5}, "weights=5 is not a list of parameter names"),
])
def test_failed_quant_trim_load_changes_nothing(changes, fragment):
    saved, trim = _trims()
    before, pruner_before = trim.state_dict(), trim.pruner.state_dict()
    lam = trim.model.qtrim_blend.get()
    assert not _same(saved, before)  # so an assignment before the failure would show
    _raises(CheckpointError, lambda: trim.load_state_dict(_edit(saved, **changes)), "QuantTrim state", fragment)
    assert _same(trim.state_dict(), before)
    assert _same(trim.pruner.state_dict(), pruner_before)
    assert trim.model.qtrim_blend.get() == lam
    trim.load_state_dict(saved)  # the unedited state loads
    assert _same(trim.state_dict(), saved)


def test_failed_pruner_load_changes_nothing():
    saved, trim = _trims()
    pruner = trim.pruner
    before = pruner.state_dict()
    bad = dict(saved["pruner"], num_updates="many")
    _raises(qtrim_fx.SchemeError, lambda: pruner.load_state_dict(bad),
            "not a ReversePruner state dict (num_updates='many' is not a non-negative int)",
            "pass ReversePruner.state_dict()")
    assert _same(pruner.state_dict(), before)
    pruner.load_state_dict(saved["pruner"])
    assert _same(pruner.state_dict(), saved["pruner"])
