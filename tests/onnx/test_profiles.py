"""Target profiles: built-in rules, lookup, user profiles and their validation."""

from __future__ import annotations

import dataclasses

import pytest

from qtrim_fx.core import profiles
from qtrim_fx.core.errors import ProfileError, QtrimError
from qtrim_fx.core.profiles import TargetProfile, WeightAxes, get_profile, profile_names, register_profile


def test_builtin_names_and_aliases():
    assert set(profile_names()) >= {"onnxruntime", "tensorrt", "qnn", "openvino", "npu"}
    assert get_profile("ORT") is get_profile("onnxruntime")
    assert get_profile("trt") is get_profile("tensorrt")
    p = TargetProfile("mine")
    assert get_profile(p) is p


def test_unknown_target_lists_known_names():
    with pytest.raises(ProfileError, match=r"unknown target 'tpu'.*onnxruntime.*tensorrt"):
        get_profile("tpu")
    with pytest.raises(QtrimError) as err:  # ProfileError is a QtrimError (and a ValueError)
        get_profile(42)
    assert isinstance(err.value, ProfileError) and isinstance(err.value, ValueError)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "act", "sym", "out_q", "ct_axis", "per_channel"),
    [
        ("onnxruntime", "uint8", False, True, 1, True),
        ("tensorrt", "int8", True, False, 0, True),
        ("qnn", "uint8", False, True, 1, True),
        ("openvino", "uint8", False, False, 1, True),
        ("npu", "int8", False, True, 1, False),
    ],
)
def test_builtin_rules(name, act, sym, out_q, ct_axis, per_channel):
    p = get_profile(name)
    assert p.activation_dtypes[0] == act
    assert p.activation_symmetric is sym
    assert p.quantize_op_outputs is out_q
    assert p.weight_axes.conv_transpose == ct_axis
    assert p.weight_per_channel is per_channel
    assert p.ir_version == 10
    assert p.opset <= p.max_opset


def test_tensorrt_stops_at_opset_20_without_int4():
    p = get_profile("tensorrt")
    assert p.max_opset == 20 and not p.allow_int4
    assert get_profile("qnn").extra_activation_dtypes == ("uint16",)
    assert get_profile("qnn").bias == "int32"


def test_weight_scheme_axis_per_op():
    ort = get_profile("onnxruntime")
    assert ort.weight_scheme("conv").axis == 0
    assert ort.weight_scheme("linear").axis == 0
    assert ort.weight_scheme("conv_transpose").axis == 1
    assert ort.weight_scheme("matmul").axis == -1
    assert ort.weight_scheme("bmm").axis is None  # no channel rule: per-tensor
    assert get_profile("tensorrt").weight_scheme("conv_transpose").axis == 0
    assert get_profile("npu").weight_scheme("conv").axis is None
    s = ort.weight_scheme("conv")
    assert (s.bits, s.signed, s.symmetric, s.qmin, s.qmax) == (8, True, True, -127, 127)


def test_activation_scheme_follows_profile():
    a = get_profile("tensorrt").activation_scheme()
    assert (a.signed, a.symmetric, a.axis, a.qmin, a.qmax) == (True, True, None, -128, 127)
    a = get_profile("onnxruntime").activation_scheme()
    assert (a.signed, a.symmetric, a.qmin, a.qmax) == (False, False, 0, 255)


def test_int4_weight_scheme_needs_opset_21():
    ort = get_profile("onnxruntime")
    with pytest.raises(ProfileError, match=r"needs opset >= 21"):
        ort.weight_scheme("conv", bits=4)
    s = ort.replace(opset=21).weight_scheme("conv", bits=4)
    assert (s.qmin, s.qmax) == (-7, 7)
    with pytest.raises(ProfileError, match=r"does not accept INT4"):
        get_profile("tensorrt").weight_scheme("conv", bits=4)


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("onnxruntime").opset = 21  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"allow_int4": True, "max_opset": 20}, "allow_int4=True contradicts max_opset=20"),
        ({"opset": 21, "max_opset": 20}, "opset=21 is above max_opset=20"),
        ({"weight_bits": 4}, "weight_bits=4 needs allow_int4=True"),
        ({"weight_bits": 4, "allow_int4": True}, "needs opset >= 21"),
        ({"activation_bits": 16}, "needs opset >= 21"),
        ({"opset": 11}, "per-channel weights >= 13"),
        ({"weight_axes": {"conv": 0}}, "weight_axes must be a WeightAxes"),
        ({"bias": "int8"}, "bias must be 'float' or 'int32'"),
        ({"weight_storage": "fp32"}, "weight_storage must be"),
        ({"extra_activation_dtypes": ("int3",)}, "unknown integer storage type 'int3'"),
        ({"extra_activation_dtypes": ("uint16",), "max_opset": 20}, "uint16 needs opset >= 21"),
        ({"extra_activation_dtypes": "uint8"}, "must be a tuple"),
        ({"ir_version": 7}, "needs IR version >= 8"),
        ({"ir_version": 11}, "newer than runtimes load"),
        ({"activation_bits": 1}, "outside 2..16"),
        ({"quantize_op_outputs": 1}, "must be True or False"),
        ({"name": ""}, "non-empty"),
    ],
)
def test_contradictory_user_profiles_are_rejected(changes, match):
    with pytest.raises(ProfileError, match=match):
        TargetProfile(**{"name": "custom", **changes})


@pytest.mark.parametrize("bad", [{"conv": True}, {"conv_transpose": "1"}, {"matmul": 1.0}])
def test_weight_axes_must_be_ints(bad):
    with pytest.raises(ProfileError, match=r"must be an int axis"):
        WeightAxes(**bad)


def test_replace_revalidates():
    with pytest.raises(ProfileError, match=r"above max_opset"):
        get_profile("tensorrt").replace(opset=21)
    p = get_profile("onnxruntime").replace(opset=21, weight_bits=4)
    assert p.weight_dtypes[0] == "int4" and p.name == "onnxruntime"


def test_register_user_profile(monkeypatch):
    monkeypatch.setattr(profiles, "_REGISTRY", dict(profiles._REGISTRY))
    board = TargetProfile("myboard", activation_signed=True, weight_per_channel=False, opset=13, max_opset=13)
    register_profile(board)
    assert get_profile("myboard") is board
    with pytest.raises(ProfileError, match=r"exists; pass overwrite=True"):
        register_profile(board)
    with pytest.raises(ProfileError, match=r"exists"):
        register_profile(TargetProfile("ort"))  # an alias is taken too
    board2 = board.replace(description="v2")
    assert register_profile(board2, overwrite=True) is get_profile("myboard")
