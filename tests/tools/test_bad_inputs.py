"""Bad input, clear errors: each mistake raises a qtrim_fx error (not one from deep inside torch) whose
message names the problem and the fix, and leaves no partially written file behind."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import CheckpointError
from qtrim_fx.runtime.nonfinite import NonFiniteWarning
from qtrim_fx.train import checkpoint
from qtrim_fx.train.bn_check import StaleBatchNormWarning


def _raises(exc: type[BaseException], call, *fragments: str) -> str:
    """``call()`` raises ``exc`` whose message holds every fragment (problem and fix)."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder that must still be empty at the end of the test (no partial files)."""
    yield tmp_path / "model.onnx"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mlp():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    return qm, x


class _NoWeights(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor: not symbolically traceable
            return self.fc(x)
        return self.fc(-x)


def test_model_with_no_quantizable_sites():
    _raises(qtrim_fx.NoSitesError, lambda: qtrim_fx.prepare(_NoWeights()),
            "_NoWeights has no quantizable site", "check the model and the config's exclude overrides")


def test_every_site_excluded_by_the_config():
    cfg = qtrim_fx.QuantConfig(overrides=(qtrim_fx.Override(module_type=nn.Linear, exclude=True),))
    _raises(qtrim_fx.NoSitesError, lambda: qtrim_fx.prepare(get_model("tiny_mlp")[0], config=cfg),
            "no quantizable site", "exclude overrides")


def test_untraceable_model_without_example_inputs():
    _raises(qtrim_fx.CaptureError, lambda: qtrim_fx.prepare(_DataDependent()),
            "_DataDependent.forward cannot be symbolically traced", "Pass example inputs",
            "prepare(model, example_inputs=(x,))")


def test_example_inputs_of_the_wrong_type(mlp, out):
    _raises(qtrim_fx.CaptureError, lambda: qtrim_fx.prepare(_DataDependent(), example_inputs="x"),
            "example_inputs must be a tuple of positional inputs", "got str", "prepare(model, (torch.randn(")
    qm, x = mlp
    _raises(TypeError, lambda: qtrim_fx.export_onnx(qm, (x.numpy(),), out),
            "example input #0 is a numpy.ndarray", "torch.as_tensor")
    _raises(TypeError, lambda: qtrim_fx.export_onnx(qm, "x", out), "got str", "export_onnx(qm, (x,), path)")
    _raises(TypeError, lambda: qtrim_fx.export_onnx(qm, {"y": x}, out), "['y'] are not inputs of the model's forward (x)",
            "argument names as keys")
    _raises(TypeError, lambda: qtrim_fx.export_onnx(qm, (x, x), out),
            "takes 1 input(s) (x) but export_onnx got 2", "one tensor per input")
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (torch.zeros(2, 5),), out),
            "does not run on the example inputs", "shapes cannot be multiplied", "(2, 5)",
            "pass inputs with the shapes and dtypes its forward expects")


@pytest.mark.parametrize("kwargs", [{"weight_bits": 1}, {"act_bits": 17}, {"weight_bits": 32},
                                    {"overrides": (qtrim_fx.Override(name="fc1", weight_bits=0),)}])
def test_bits_outside_2_to_16(kwargs):
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.QuantConfig(**kwargs), "is outside 2..16",
            "use 8 (INT8) or 4 (INT4)")


def test_bits_outside_2_to_16_in_a_target_profile():
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.TargetProfile("board", activation_bits=1),
            "activation_bits=1 is outside 2..16", "use 8 or 4")


@pytest.mark.parametrize("name, value", [("p_hi", 1.0), ("p_lo", 0.0), ("p_hi", 1.5), ("p_lo", -0.1),
                                         ("p_hi", math.nan)])
def test_quantile_levels_outside_0_1(name, value):
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.QuantConfig(**{name: value}),
            f"{name}={value!r} must lie strictly between 0 and 1", "p_lo=0.001, p_hi=0.999")


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_pruner_quantile_outside_0_1(p):
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.ReversePruner(p_clip=p),
            f"p_clip={p} must lie strictly between 0 and 1", "the paper uses 0.95")


def test_swapped_quantile_levels():
    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.QuantConfig(p_lo=0.9, p_hi=0.1),
            "p_lo=0.9 must be below p_hi=0.1", "p_lo=0.001, p_hi=0.999")


def test_nan_and_inf_activations_during_training():
    model, (x,) = get_model("tiny_mlp")
    # every call updates the statistics (the non-finite count is kept by each update; default: every 4th call)
    qm = qtrim_fx.prepare(model.train(), config=qtrim_fx.QuantConfig(update_every=1))
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(warmup=0, ramp_end=1, horizon=1))
    trim.epoch_start(0)
    qm(x)
    bad = x.clone()
    bad[0, :3] = math.nan
    bad[1, 5] = math.inf
    with warnings.catch_warnings(record=True) as during:  # no host sync, no warning inside the step
        warnings.simplefilter("always")
        qm(bad)
    assert not [w for w in during if issubclass(w.category, NonFiniteWarning)]
    for _, site, _ in qtrim_fx.iter_sites(qm):
        assert torch.isfinite(site.observer.lo).all() and torch.isfinite(site.observer.hi).all()
    with pytest.warns(NonFiniteWarning) as caught:
        trim.epoch_start(1)
    msg = str(caught[0].message)
    assert "NaN/Inf values reached" in msg and "input.x (+" in msg and "in epoch 0" in msg
    assert "left out of the statistics" in msg and "lower the learning rate" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        trim.epoch_start(2)  # nothing new: no second warning
        assert trim.check_nonfinite() == []


def test_nan_during_calibrate_warns_naming_the_site():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.warns(NonFiniteWarning, match=r"during calibrate: input\.x"):
        qtrim_fx.calibrate(qm, [x, bad])
    for _, site, _ in qtrim_fx.iter_sites(qm):
        assert torch.isfinite(site.observer.lo).all() and torch.isfinite(site.observer.hi).all()


def test_zero_size_batch_in_a_training_step_leaves_statistics_alone():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model.train())
    qm(x)
    act = {s.name: site.observer for s, site, _ in qtrim_fx.iter_sites(qm) if s.kind == "activation"}
    before = {n: (o.lo.clone(), o.hi.clone(), int(o.num_updates)) for n, o in act.items()}
    y = qm(x[:0])
    assert y.shape == (0, 10)
    for n, o in act.items():
        assert torch.equal(o.lo, before[n][0]) and torch.equal(o.hi, before[n][1]) and int(o.num_updates) == before[n][2]


def test_zero_size_batches_in_calibrate():
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    with pytest.warns(UserWarning, match="skipped an empty batch"):
        _raises(ValueError, lambda: qtrim_fx.calibrate(qm, [x[:0], x[:0]]),
                "calibrate got no (non-empty) batches", "pass at least one batch of model inputs")
    _raises(ValueError, lambda: qtrim_fx.calibrate(qm, []), "no (non-empty) batches", "calibrate(qm, [x])")
    with pytest.warns(UserWarning, match="skipped an empty batch"):
        assert qtrim_fx.calibrate(qm, [x[:0], x]) == 1


def test_export_before_any_calibration(out):
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (x,), out),
            "7 quantization site(s) never saw data: input.x, fc1.weight", "Run qtrim_fx.calibrate(model, batches)")


def test_unknown_target(mlp, out):
    qm, x = mlp
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.export_onnx(qm, (x,), out, target="tpu"),
            "unknown target 'tpu'", "known targets: onnxruntime, onnxruntime_avx2, tensorrt", "TargetProfile(")
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.export_onnx(qm, (x,), out, opset="17"),
            "opset must be an int", "17 or 21")


def test_int4_below_opset_21(out):
    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(weight_bits=4))
    qtrim_fx.calibrate(qm, [x])
    # an explicit older opset is refused; without one, export picks 21 (tests/onnx/test_trust.py)
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.export_onnx(qm, (x,), out, opset=19),
            "4-bit weights are stored as int4, which needs opset >= 21", "(pass opset=21)")
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.export_onnx(qm, (x,), out, target="tensorrt"),
            "target 'tensorrt' does not accept INT4 weights", "use bits=8")


@pytest.mark.parametrize("kwargs, fragments", [
    ({"allow_int4": True, "max_opset": 19}, ("allow_int4=True contradicts max_opset=19", "set allow_int4=False")),
    ({"opset": 21, "max_opset": 19}, ("opset=21 is above max_opset=19", "lower opset or raise max_opset")),
    ({"opset": 11}, ("opset=11 is too old", "use opset >= 13")),
    ({"weight_bits": 4}, ("weight_bits=4 needs allow_int4=True",)),
    ({"bias": "int64"}, ("bias must be 'float' or 'int32'",)),
])
def test_own_target_profile_with_contradictory_rules(kwargs, fragments):
    _raises(qtrim_fx.ProfileError, lambda: qtrim_fx.TargetProfile("board", **kwargs), "profile 'board'", *fragments)


def test_corrupted_or_mismatched_quant_trim_state():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    cur = qtrim_fx.Curriculum(warmup=0, ramp_end=2, horizon=1)
    trim = qtrim_fx.QuantTrim(qm, cur, qtrim_fx.ReversePruner())
    trim.epoch_start(1)
    state = trim.state_dict()
    fresh = qtrim_fx.QuantTrim(qtrim_fx.prepare(get_model("tiny_convnet")[0]), cur, qtrim_fx.ReversePruner())
    _raises(CheckpointError, lambda: fresh.load_state_dict({"epoch": 1}),
            "not a QuantTrim state dict (KeyError", "QuantTrim.state_dict()")
    _raises(CheckpointError, lambda: fresh.load_state_dict(dict(state, blend=float("nan"))),
            "corrupted QuantTrim state: blend=nan is outside [0, 1]")
    bad_tau = [t.clone() for t in state["pruner"]["thresholds"]]
    bad_tau[1] = torch.tensor(float("inf"))
    _raises(CheckpointError, lambda: fresh.load_state_dict(dict(state, pruner=dict(state["pruner"], thresholds=bad_tau))),
            "threshold τ of conv2.weight is not a finite, non-negative tensor")
    mlp_trim = qtrim_fx.QuantTrim(qtrim_fx.prepare(get_model("tiny_mlp")[0]), cur, qtrim_fx.ReversePruner())
    mlp_trim.epoch_start(0)
    _raises(CheckpointError, lambda: fresh.load_state_dict(mlp_trim.state_dict()),
            "saved for weights fc1.weight, fc2.weight, fc3.weight but this model's are conv1.weight",
            "belongs to another model or config")
    no_pruner = qtrim_fx.QuantTrim(qtrim_fx.prepare(get_model("tiny_convnet")[0]), cur)
    _raises(CheckpointError, lambda: no_pruner.load_state_dict(state),
            "has ReversePruner state but this QuantTrim has no pruner", "construct it as the saved run was")
    assert isinstance(CheckpointError("x"), RuntimeError) and isinstance(CheckpointError("x"), ValueError)


def test_prepared_model_loading_another_models_state():
    conv = qtrim_fx.prepare(get_model("tiny_convnet")[0])
    mlp = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    _raises(CheckpointError, lambda: conv.load_state_dict(mlp.state_dict()),
            "checkpoint does not match this prepared model", "sites missing from the checkpoint: add, conv1_weight",
            "sites this model does not have: fc1_weight", "prepare the same model with the same config")
    wide, _ = get_model("tiny_convnet", width=16)
    wide_qm = qtrim_fx.prepare(wide)
    _raises(CheckpointError, lambda: conv.load_state_dict(wide_qm.state_dict()),
            "site 'conv1.weight' has 16 channels but conv1.weight has 8 here", "a model of another width")
    per_tensor = qtrim_fx.prepare(get_model("tiny_convnet")[0],
                                  config=qtrim_fx.QuantConfig(weight_per_channel=False))
    _raises(CheckpointError, lambda: per_tensor.load_state_dict(conv.state_dict()),
            "site 'conv1.weight' has statistics of shape (8,) but the site is int8n sym per-tensor here",
            "prepare with the same config")
    _raises(CheckpointError, lambda: conv.load_state_dict(get_model("tiny_convnet")[0].state_dict()),
            "holds no qtrim_fx statistics (it is the float model's)", "strict=False")
    conv.load_state_dict(get_model("tiny_convnet")[0].state_dict(), strict=False)  # the documented way


def test_corrupted_or_mismatched_saved_model(tmp_path):
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    path = tmp_path / "qm.pt"
    checkpoint.save(qm, path)
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_convnet")[0], path),
            "was saved from another model or config (TinyMLP, this is TinyConvNet)",
            "sites not in the file: add, conv1.weight",
            "Pass the same model class and arguments")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_mlp")[0], truncated),
            "cannot read checkpoint", "truncated or not written by torch.save", "save it again")
    plain = tmp_path / "plain.pt"
    torch.save(qm.state_dict(), plain)
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_mlp")[0], plain),
            "is not a qtrim_fx.checkpoint.save file", "qm.load_state_dict(torch.load(path))")
    _raises(CheckpointError, lambda: checkpoint.load(get_model("tiny_mlp")[0], tmp_path / "missing.pt"),
            "does not exist", "qtrim_fx.checkpoint.save(qm, path)")


def test_api_on_a_ddp_style_wrapper_names_the_fix():
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    _raises(qtrim_fx.SchemeError, lambda: qtrim_fx.inspect(Wrapper(qm)), "got the Wrapper wrapping it",
            "pass wrapper.module")
    assert qtrim_fx.calibrate(Wrapper(qm), [torch.randn(2, 64)]) == 1  # calibrate and QuantTrim unwrap it


def test_numpy_batch_in_calibrate():
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    _raises(TypeError, lambda: qtrim_fx.calibrate(qm, [np.zeros((2, 64), np.float32)]),
            "a calibration batch must be a tensor", "pass input_fn=")


def test_calibrating_collapsed_activations_warns_with_the_sites_and_the_fix():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    net = Net()
    with torch.no_grad():
        net.conv1.weight.mul_(1e-9)  # eval-mode activations of ~1e-9 beside an untrained BatchNorm (var 1)
        net.conv1.bias.zero_()
    qm = qtrim_fx.prepare(net)
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(qtrim_fx.CollapsedRangeWarning, match=r"bn\.out|relu") as rec:
        qtrim_fx.calibrate(qm, [x])
    text = next(str(r.message) for r in rec if issubclass(r.category, qtrim_fx.CollapsedRangeWarning))
    assert "initial running statistics" in text and "warm-up" in text and "bn" in text
    # one cause, one warning: the general stale-BatchNorm one is not repeated beside it
    assert not any(issubclass(r.category, StaleBatchNormWarning) for r in rec)
    assert all(r.filename == __file__ for r in rec)  # points at the user's calibrate call
    healthy = qtrim_fx.prepare(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error", qtrim_fx.CollapsedRangeWarning)
        qtrim_fx.calibrate(healthy, [x])


@pytest.mark.parametrize("name", ['a"b', "a\nb", "a\\b"])
def test_submodule_names_fx_cannot_write_are_a_clear_error(name):
    model = torch.nn.Sequential()
    model.add_module(name, torch.nn.Linear(4, 4))
    for inputs in (None, (torch.randn(2, 4),)):
        with pytest.raises(qtrim_fx.ConfigError, match="rename those submodules"):
            qtrim_fx.prepare(model, inputs)


def test_names_fx_can_write_still_prepare():
    model = torch.nn.Sequential()
    model.add_module("a'b c-d", torch.nn.Linear(4, 4))
    qm = qtrim_fx.prepare(model)
    assert any(spec.kind == "weight" for spec, _, _ in qtrim_fx.iter_sites(qm))


# -- data the model does not take: calibrate and verify name the batch and the fix --------------------------


def test_calibrate_on_batches_the_model_does_not_take():
    model, (x,) = get_model("tiny_convnet")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=2)
    cases = [
        (loader, ("does not run on batch 0", "TypeError", "a list of 2: float32 (2, 3, 16, 16), float32 (2,)",
                  "input_fn=lambda b: b[0]")),
        ([x, torch.randn(2, 5, 9, 9)], ("does not run on batch 1", "5 channels", "float32 (2, 5, 9, 9)",
                                       "shapes and dtypes of your data")),
        ([torch.randint(0, 3, x.shape)], ("does not run on batch 0", "int64 (2, 3, 16, 16)", "input_fn=")),
        ([{"y": x}], ("unexpected keyword argument 'y'", "a dict {'y': float32 (2, 3, 16, 16)}")),
    ]
    for batches, fragments in cases:
        qm = qtrim_fx.prepare(copy.deepcopy(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            msg = _raises(qtrim_fx.ConfigError, lambda qm=qm, b=batches: qtrim_fx.calibrate(qm, b), "calibrate:",
                          *fragments)
        assert "Traceback" not in msg
    qm = qtrim_fx.prepare(copy.deepcopy(model))  # the fix the message names works
    assert qtrim_fx.calibrate(qm, loader, input_fn=lambda b: b[0]) == 1


def test_calibrate_keeps_the_model_error_chained():
    qm = qtrim_fx.prepare(get_model("tiny_convnet")[0])
    with pytest.raises(qtrim_fx.ConfigError) as info:
        qtrim_fx.calibrate(qm, [torch.randn(2, 5, 9, 9)])
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, for whoever needs it


def test_verify_on_inputs_the_file_or_reference_does_not_take(tmp_path):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    run = [("onnxruntime",)]
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.verify(path, qm, (torch.randn(2, 5, 9, 9),), backends=run[0]),
            "input 'x' has shape (2, 5, 9, 9)", "takes (?, 3, 16, 16)", "shaped like the ones the file was exported with")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.verify(path, qm, (x[0],), backends=run[0]),
            "has shape (3, 16, 16)", "takes (?, 3, 16, 16)")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.verify(path, qm, (x.long(),), backends=run[0]),
            "holds int64 values", "takes float32", "x.float()")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.verify(path, get_model("tiny_mlp")[0], (x,), backends=run[0]),
            "the torch reference TinyMLP does not run on batch 0", "cannot be multiplied",
            "float32 (2, 3, 16, 16)", "the model it was exported from")
    report = qtrim_fx.verify(path, qm, (x.double(),), backends=run[0])  # float64 data: cast, as before
    assert report.ok()


def test_an_override_that_matches_nothing_is_named():
    model, _ = get_model("tiny_convnet")
    typo = qtrim_fx.Override(name="fcc", exclude=True)
    with pytest.warns(qtrim_fx.core.errors.QtrimWarning, match="matches no op of TinyConvNet") as rec:
        qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(overrides=(typo,)))
    text = next(str(r.message) for r in rec if "matches no op" in str(r.message))
    assert "Override(name='fcc', exclude=True)" in text and "changes nothing" in text
    assert "conv1, conv2, fc" in text  # the names it could have meant
    assert all(r.filename == __file__ for r in rec if "matches no op" in str(r.message))  # the user's prepare call
    assert any(spec.name == "fc.weight" for spec, _, _ in qtrim_fx.iter_sites(qm))  # quantized: nothing excluded
    kinds = [qtrim_fx.Override(module_type=nn.LSTM, weight_bits=4), qtrim_fx.Override(op="embedding", exclude=True)]
    for o in kinds:
        with pytest.warns(qtrim_fx.core.errors.QtrimWarning, match="matches no op"):
            qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(overrides=(o,)))
    with warnings.catch_warnings(record=True) as rec:  # overrides that match warn nothing
        warnings.simplefilter("always")
        qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(overrides=(
            qtrim_fx.Override(name="fc", exclude=True), qtrim_fx.Override(module_type=nn.Conv2d, weight_bits=4),
            qtrim_fx.Override(op="add", act_bits=16))))
    assert not [r for r in rec if "matches no op" in str(r.message)]
    assert not any(spec.name == "fc.weight" for spec, _, _ in qtrim_fx.iter_sites(qm))


def test_prepare_for_a_target_with_example_inputs_the_model_does_not_take():
    """The ranks a target's weight grids depend on come from the example inputs: wrong ones are an error, not
    a silent fallback whose warning then asks for the example inputs the user gave."""
    model, (x,) = get_model("tiny_convnet")
    model.train()
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.prepare(model, (torch.randn(2, 5, 9, 9),), target="qnn"),
            "prepare: TinyConvNet does not run on example_inputs", "RuntimeError", "5 channels",
            "a tuple of 1: float32 (2, 5, 9, 9)", "pass one batch the model's forward takes")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.prepare(model, (x.long(),), target="npu"),
            "does not run on example_inputs", "int64 (2, 3, 16, 16)")
    assert model.training  # modes restored
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        qtrim_fx.prepare(model, (x,), target="qnn")
    assert not [r for r in rec if "could not tell" in str(r.message)]  # good inputs: ranks known


def test_checkpoint_with_swapped_arguments(tmp_path):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path / "c.pt"
    _raises(TypeError, lambda: checkpoint.save(path, qm), "checkpoint.save(model, path) takes the model first",
            "swap the arguments")
    checkpoint.save(qm, path)
    _raises(TypeError, lambda: checkpoint.load(path, get_model("tiny_convnet")[0]),
            "checkpoint.load(model, path) takes the model first", "load(PosixPath, TinyConvNet)")
    assert qtrim_fx.is_prepared(checkpoint.load(get_model("tiny_convnet")[0], path))


def test_vendor_sweep_on_batches_of_another_shape():
    model, (x,) = get_model("tiny_convnet")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.vendor_sweep(model, [torch.randn(2, 5, 9, 9)], [x]),
            "calibration batch 0 has shape (2, 5, 9, 9)", "first evaluation batch is (2, 3, 16, 16)", "(N, 3, 16, 16)")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.vendor_sweep(model, [x], [x, x[:, :2]]),
            "evaluation batch 1 has shape (2, 2, 16, 16)")


def test_export_mid_curriculum_says_the_file_is_fully_quantized(tmp_path):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    for lam, warned in ((0.0, False), (0.4, True), (1.0, False)):  # PTQ right after calibrate / mid-curriculum / done
        qtrim_fx.set_blend(qm, lam)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            qtrim_fx.export_onnx(qm, (x,), tmp_path / f"m{lam}.onnx")
        hits = [r for r in rec if "export_onnx at blend" in str(r.message)]
        assert bool(hits) == warned
        if warned:
            assert "λ = 0.4" in str(hits[0].message) and "quantizes every site fully" in str(hits[0].message)
            assert issubclass(hits[0].category, qtrim_fx.core.errors.QtrimWarning)
            assert hits[0].filename == __file__  # points at the user's export call


def test_overrides_and_blend_values_of_the_wrong_kind():
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.QuantConfig(overrides=qtrim_fx.Override(name="fc", exclude=True)),
            "must be a tuple of Override(...) records", "mind the trailing comma")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.Override(module_type="Linear"),
            "module_type='Linear' must be an nn.Module class", "module_type=torch.nn.Linear")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.Override(module_type=(nn.Linear, int)), "nn.Module class")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.Override(op="lineer", exclude=True),
            "op='lineer' is not an op kind", "linear")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.Override(name=3), "must be a regex string")
    assert qtrim_fx.QuantConfig(overrides=[qtrim_fx.Override(module_type=(nn.Linear, nn.Conv2d), op="linear")])
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    for bad in ("abc", None, torch.ones(2)):
        _raises(qtrim_fx.ConfigError, lambda b=bad: qtrim_fx.set_blend(qm, b), "blend λ must be a number in [0, 1]")
    _raises(ValueError, lambda: qtrim_fx.set_blend(qm, 1.5), "must lie in [0, 1]")  # a ConfigError, still a ValueError
    qtrim_fx.set_blend(qm, torch.tensor(0.25))
    assert float(qm.qtrim_blend.value) == 0.25


def test_calibrate_arguments_of_the_wrong_kind():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.calibrate(qm, x), "got one tensor of shape (2, 3, 16, 16)",
            "iterated sample by sample", "pass [x]")
    _raises(qtrim_fx.ConfigError, lambda: qtrim_fx.calibrate(qm, None), "iterable of batches", "got NoneType")
    for n in (0, -1, 1.5, True):
        _raises(qtrim_fx.ConfigError, lambda n=n: qtrim_fx.calibrate(qm, [x], num_batches=n),
                f"num_batches={n!r} must be a positive int")
    assert not any(site.observer.initialized for _, site, _ in qtrim_fx.iter_sites(qm))  # nothing ran


def test_export_names_and_example_values_of_the_wrong_kind(mlp, out):
    qm, x = mlp
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (x,), out, output_names="logits"),
            "output_names must be a list of non-empty strings", "got 'logits'")  # else the output is named 'l'
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (x,), out, input_names=["a", "b"]),
            "input_names has 2 names (a, b) but the model takes 1 tensor input(s)")
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (x,), out, input_names=["y"], output_names=["y"]),
            "name(s) y given twice")
    bad = x.clone()
    bad[0, 0] = math.nan
    _raises(qtrim_fx.ExportError, lambda: qtrim_fx.export_onnx(qm, (bad,), out), "example input #0 holds 1 NaN value(s)",
            "pass real data")


def test_export_names_that_fit(mlp, tmp_path):
    qm, x = mlp
    model = qtrim_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", input_names=["pixels"], output_names=["logits"])
    assert [i.name for i in model.graph.input] == ["pixels"] and [o.name for o in model.graph.output] == ["logits"]


def test_every_op_kind_the_passes_tag_is_one_an_override_may_name():
    """``Override(op=...)`` is checked against ``OpKind``: every kind NormalizeOpsPass writes must be in it."""
    from typing import get_args

    from qtrim_fx.core.spec import OpKind
    from qtrim_fx.passes.prepare import normalize

    kinds = set(normalize._NAME_KINDS.values()) | {k for _, k in normalize._MODULE_KINDS}
    assert kinds <= set(get_args(OpKind)), kinds - set(get_args(OpKind))
    qtrim_fx.Override(op="addmm", weight_bits=4)  # Hugging Face GPT-2's Conv1D


class _FunctionalWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.w = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.block.w))


def test_an_override_matching_a_weight_by_its_parameter_module_does_not_warn():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        qm = qtrim_fx.prepare(_FunctionalWeight(), config=qtrim_fx.QuantConfig(
            overrides=(qtrim_fx.Override(name="block", weight_bits=4),)))
    assert not [r for r in rec if "matches no op" in str(r.message)]
    assert [spec.scheme.bits for spec, _, _ in qtrim_fx.iter_sites(qm) if spec.name == "block.w"] == [4]
    with warnings.catch_warnings(record=True) as rec:  # an exclude that took effect: no site left to show it
        warnings.simplefilter("always")
        qm = qtrim_fx.prepare(_FunctionalWeight(), config=qtrim_fx.QuantConfig(
            overrides=(qtrim_fx.Override(name="block", exclude=True),), coverage="ignore"))
    assert not [r for r in rec if "matches no op" in str(r.message)]
    assert [spec.name for spec, _, _ in qtrim_fx.iter_sites(qm) if spec.kind == "weight"] == ["head.weight"]
