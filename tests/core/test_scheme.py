"""QuantScheme: integer grids, validation and ONNX storage types."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import pytest
from onnx import TensorProto, helper

from qtrim_fx.core.scheme import QuantScheme, SchemeError


@pytest.mark.parametrize("bits", range(2, 17))
def test_signed_and_unsigned_grids(bits):
    s = QuantScheme(bits=bits, signed=True)
    u = QuantScheme(bits=bits, signed=False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    # Both grids hold 2^b levels.
    assert s.qmax - s.qmin + 1 == u.qmax - u.qmin + 1 == 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_narrow_drops_the_most_negative_level(bits):
    n = QuantScheme(bits=bits, signed=True, narrow=True)
    assert (n.qmin, n.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert n.qmin == -n.qmax


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_full_width_grids_equal_the_onnx_storage_range(bits, signed):
    """At 4/8/16 bits the grid is exactly the range of the ONNX element type (ml_dtypes for int4)."""
    scheme = QuantScheme(bits=bits, signed=signed)
    elem = getattr(TensorProto, scheme.onnx_type_name.upper())
    info = ml_dtypes.iinfo(helper.tensor_dtype_to_np_dtype(elem))
    assert (scheme.qmin, scheme.qmax) == (int(info.min), int(info.max))


@pytest.mark.parametrize(
    ("bits", "signed", "name"),
    [
        (2, True, "int4"),
        (3, False, "uint4"),
        (4, True, "int4"),
        (4, False, "uint4"),
        (5, True, "int8"),
        (8, True, "int8"),
        (8, False, "uint8"),
        (9, False, "uint16"),
        (12, True, "int16"),
        (16, False, "uint16"),
    ],
)
def test_onnx_type_name_is_the_smallest_holding_type(bits, signed, name):
    scheme = QuantScheme(bits=bits, signed=signed)
    assert scheme.onnx_type_name == name
    info = ml_dtypes.iinfo(helper.tensor_dtype_to_np_dtype(getattr(TensorProto, name.upper())))
    assert info.min <= scheme.qmin and scheme.qmax <= info.max


@pytest.mark.parametrize("bits", [-1, 0, 1, 17, 32])
def test_bits_outside_2_to_16_raise(bits):
    with pytest.raises(SchemeError, match=r"outside 2\.\.16"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("bits", [8.0, "8", True, None])
def test_non_int_bits_raise(bits):
    with pytest.raises(SchemeError, match="bits must be an int"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("axis", ["0", 1.0, True, [0]])
def test_bad_axis_raises(axis):
    with pytest.raises(SchemeError, match="axis must be None"):
        QuantScheme(axis=axis)


def test_narrow_unsigned_raises():
    with pytest.raises(SchemeError, match="narrow=True only applies to signed"):
        QuantScheme(signed=False, narrow=True)


def test_scheme_error_is_a_value_error():
    assert issubclass(SchemeError, ValueError)


def test_frozen_and_with_axis():
    s = QuantScheme(bits=4, signed=True, symmetric=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 8  # type: ignore[misc]
    c = s.with_axis(0)
    assert c.per_channel and c.axis == 0 and not s.per_channel
    assert (c.bits, c.signed, c.symmetric) == (4, True, True)
    assert c.with_axis(None) == s
    assert hash(c.with_axis(None)) == hash(s)


def test_describe():
    assert QuantScheme(bits=8, signed=True, symmetric=True, axis=0).describe() == "int8 sym per-channel(0)"
    assert QuantScheme(bits=8, signed=False, symmetric=False).describe() == "uint8 asym per-tensor"
    assert QuantScheme(bits=8, narrow=True).describe() == "int8n sym per-tensor"
