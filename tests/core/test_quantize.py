"""qtrim_fx.core.fakequant against the ONNX reference QuantizeLinear / DequantizeLinear (opset 21).

Codes must match exactly and dequantized values bit for bit, for int8, uint8, int4 and
uint4, per tensor and per channel, including exact .5 ties (round half to even) and
saturation at both ends of the grid.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qtrim_fx.core.fakequant import dequantize, derive_qparams, fake_quantize, quantize
from qtrim_fx.core.scheme import QuantScheme, SchemeError

OPSET = 21
# dtype name -> (ONNX element type, scheme). The ranges come from the ONNX spec, not from QuantScheme.
DTYPES = {
    "int8": (TensorProto.INT8, QuantScheme(bits=8, signed=True, symmetric=False), (-128, 127)),
    "uint8": (TensorProto.UINT8, QuantScheme(bits=8, signed=False, symmetric=False), (0, 255)),
    "int4": (TensorProto.INT4, QuantScheme(bits=4, signed=True, symmetric=False), (-8, 7)),
    "uint4": (TensorProto.UINT4, QuantScheme(bits=4, signed=False, symmetric=False), (0, 15)),
}
AXES = [None, 0, 1, -1]


@functools.cache
def _reference(dtype: str, axis: int | None) -> tuple[ReferenceEvaluator, ReferenceEvaluator]:
    """One QuantizeLinear and one DequantizeLinear model per (dtype, axis), built once."""
    elem = DTYPES[dtype][0]
    attrs = {} if axis is None else {"axis": axis}

    def model(op: str, x_type: int, y_type: int) -> onnx.ModelProto:
        node = helper.make_node(op, ["x", "scale", "zero_point"], ["y"], **attrs)
        graph = helper.make_graph(
            [node],
            op,
            [
                helper.make_tensor_value_info("x", x_type, None),
                helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("zero_point", elem, None),
            ],
            [helper.make_tensor_value_info("y", y_type, None)],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        return m

    q = ReferenceEvaluator(model("QuantizeLinear", TensorProto.FLOAT, elem))
    dq = ReferenceEvaluator(model("DequantizeLinear", elem, TensorProto.FLOAT))
    return q, dq


def _onnx_zero_point(dtype: str, values: np.ndarray, per_channel: bool) -> np.ndarray:
    """Zero point as ONNX stores it: a TensorProto of the exact element type (INT4/UINT4 included)."""
    elem = DTYPES[dtype][0]
    dims = [values.size] if per_channel else []
    return numpy_helper.to_array(helper.make_tensor("zero_point", elem, dims, values.reshape(-1).tolist()))


def _check_against_onnx(dtype: str, axis: int | None, x: np.ndarray, scale: np.ndarray, zp: np.ndarray):
    """Compare quantize / dequantize / fake_quantize with the ONNX reference; returns the codes."""
    _, scheme, _ = DTYPES[dtype]
    scheme = scheme.with_axis(axis)
    ref_q, ref_dq = _reference(dtype, axis)
    onnx_zp = _onnx_zero_point(dtype, zp, axis is not None)

    (q_ref,) = ref_q.run(None, {"x": x, "scale": scale, "zero_point": onnx_zp})
    (y_ref,) = ref_dq.run(None, {"x": q_ref, "scale": scale, "zero_point": onnx_zp})
    assert y_ref.dtype == np.float32

    xt, st_, zt = torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp.astype(np.float32))
    q = quantize(xt, st_, zt, scheme)
    assert q.dtype == torch.int32
    np.testing.assert_array_equal(q.numpy(), q_ref.astype(np.int32))

    y = dequantize(q, st_, zt, axis)
    assert y.dtype == torch.float32
    assert np.array_equal(y.numpy().view(np.int32), y_ref.view(np.int32)), "dequantize is not bit-exact"

    fq = fake_quantize(xt, st_, zt, scheme)
    assert fq.dtype == torch.float32
    assert np.array_equal(fq.numpy().view(np.int32), y.numpy().view(np.int32)), "fake_quantize != DQ(Q(x))"
    return q_ref.astype(np.int32)


# Fractional parts: exact ties (±.5), exact grid points, near-ties and a free value.
_FRACS = st.one_of(st.sampled_from([0.0, 0.5, -0.5, 0.25, 0.49999, 0.50001]), st.floats(-1.0, 1.0))
# Powers of two make (k + 0.5) * s and its division by s exact, so ties really are ties.
_SCALES = st.one_of(
    st.integers(-10, 6).map(lambda e: float(2.0**e)),
    st.floats(2.0**-10, 50.0, width=32),
)


@st.composite
def _cases(draw, dtype: str, per_channel: bool):
    _, _, (qmin, qmax) = DTYPES[dtype]
    if per_channel:
        axis = draw(st.sampled_from([0, 1, -1]))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
        channels = shape[axis]
    else:
        axis = None
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
        channels = 1
    scale = np.array(draw(st.lists(_SCALES, min_size=channels, max_size=channels)), dtype=np.float32)
    zp = np.array(draw(st.lists(st.integers(qmin, qmax), min_size=channels, max_size=channels)), np.int64)
    n = int(np.prod(shape))
    # Integer part spans past the grid on both sides (saturation) by a margin of the grid width.
    span = qmax - qmin
    ks = np.array(draw(st.lists(st.integers(qmin - qmax - span, qmax - qmin + span), min_size=n, max_size=n)))
    fr = np.array(draw(st.lists(_FRACS, min_size=n, max_size=n)), dtype=np.float64)
    if axis is None:
        s_b = float(scale[0])
        scale, zp = scale.reshape(()), zp.reshape(())
    else:
        b_shape = [1] * len(shape)
        b_shape[axis] = channels
        s_b = scale.astype(np.float64).reshape(b_shape)
    x = ((ks.reshape(shape) + fr.reshape(shape)) * s_b).astype(np.float32)
    return axis, np.ascontiguousarray(x), scale, zp


_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=st.data())
@_SETTINGS
def test_per_tensor_matches_onnx_reference(dtype, data):
    axis, x, scale, zp = data.draw(_cases(dtype, per_channel=False))
    _check_against_onnx(dtype, axis, x, scale, zp)


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=st.data())
@_SETTINGS
def test_per_channel_matches_onnx_reference(dtype, data):
    axis, x, scale, zp = data.draw(_cases(dtype, per_channel=True))
    _check_against_onnx(dtype, axis, x, scale, zp)


def _grid(values: np.ndarray, per_channel: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """3-D broadcasts of ``values`` (along dim 0) and a per-channel vector, channel moved to ``axis``."""
    shape = (values.size, per_channel.size, 4)
    v = np.broadcast_to(values.astype(np.float64).reshape(-1, 1, 1), shape)
    c = np.broadcast_to(per_channel.astype(np.float64).reshape(1, -1, 1), shape)
    return np.moveaxis(v, 1, axis), np.moveaxis(c, 1, axis)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", AXES)
def test_exact_ties_round_half_to_even(dtype, axis):
    """x = (k + 0.5) s lands exactly between two codes: the even one wins, as in ONNX."""
    _, _, (qmin, qmax) = DTYPES[dtype]
    ties = np.arange(-6, 6, dtype=np.float64) + 0.5
    z0 = max(qmin, 0)
    if axis is None:
        scale, zp = np.array(0.25, np.float32), np.array(z0 + 1, np.int64)
        x, s_b = (ties * 0.25).astype(np.float32).reshape(3, 4), 0.25
    else:
        scale = np.array([0.25, 2.0, 0.0078125], np.float32)
        zp = np.array([z0, z0 + 2, min(qmax, z0 + 3)], np.int64)
        t_b, s_b = _grid(ties, scale, axis)
        x = np.ascontiguousarray(t_b * s_b).astype(np.float32)
    ratio = x.astype(np.float64) / s_b
    assert np.all(ratio - np.floor(ratio) == 0.5), "test inputs must be exact ties"
    codes = _check_against_onnx(dtype, axis, x, scale, zp)
    inside = (codes > qmin) & (codes < qmax)
    assert inside.any()
    # Independently of ONNX: unsaturated ties round to the even integer.
    z_b = zp if axis is None else _grid(ties, zp, axis)[1]
    unsat = codes - z_b
    assert np.all(unsat[inside] % 2 == 0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", AXES)
def test_saturation_at_both_ends(dtype, axis):
    _, _, (qmin, qmax) = DTYPES[dtype]
    span = qmax - qmin
    vals = np.array([-1e6, -1e3, -(span + 0.5), -1.0, 0.0, 1.0, span + 0.5, 1e3, 1e6])
    if axis is None:
        scale, zp = np.array(0.5, np.float32), np.array((qmin + qmax) // 2, np.int64)
        x = (vals * 0.5).astype(np.float32)
    else:
        scale = np.array([0.5, 3.0], np.float32)
        zp = np.array([qmin, qmax], np.int64)  # each channel's zero point sits at one end of the grid
        v_b, s_b = _grid(vals, scale, axis)
        x = np.ascontiguousarray(v_b * s_b).astype(np.float32)
    codes = _check_against_onnx(dtype, axis, x, scale, zp)
    assert codes.min() == qmin and codes.max() == qmax


def test_dequantize_accepts_any_integer_dtype_for_codes():
    q = torch.tensor([-8, -1, 0, 7], dtype=torch.int8)
    y = dequantize(q, torch.tensor(0.5), torch.tensor(-1.0))
    np.testing.assert_array_equal(y.numpy(), np.array([-3.5, 0.0, 0.5, 4.0], np.float32))


def test_parameter_shapes_are_checked():
    x = torch.randn(3, 4)
    per_tensor = QuantScheme()
    with pytest.raises(SchemeError, match="same shape"):
        quantize(x, torch.tensor(1.0), torch.zeros(1), per_tensor)
    with pytest.raises(SchemeError, match="single scale"):
        quantize(x, torch.ones(3), torch.zeros(3), per_tensor)
    with pytest.raises(SchemeError, match="out of range"):
        quantize(x, torch.ones(3), torch.zeros(3), per_tensor.with_axis(2))
    with pytest.raises(SchemeError, match="4 entries"):
        fake_quantize(x, torch.ones(3), torch.zeros(3), per_tensor.with_axis(1))


class TestDeriveQparams:
    def test_asymmetric_range_is_widened_to_contain_zero(self):
        scheme = QuantScheme(bits=8, signed=False, symmetric=False)
        scale, zp = derive_qparams(scheme, torch.tensor(0.5), torch.tensor(2.0))
        # Range [0, 2] after widening: s = 2 / 255, z = 0, and 0 quantizes exactly.
        assert scale.item() == pytest.approx(2.0 / 255, rel=1e-7)
        assert zp.item() == 0.0
        assert fake_quantize(torch.zeros(3), scale, zp, scheme).abs().max().item() == 0.0

    def test_asymmetric_zero_point_from_design_formula(self):
        scheme = QuantScheme(bits=8, signed=True, symmetric=False)
        lo, hi = torch.tensor([-1.0, -3.0]), torch.tensor([3.0, 1.0])
        scale, zp = derive_qparams(scheme, lo, hi)
        np.testing.assert_allclose(scale.numpy(), np.array([4.0, 4.0], np.float32) / 255, rtol=1e-7)
        expected_zp = np.clip(
            -128 - np.round(np.array([-1.0, -3.0]) / scale.numpy().astype(np.float64)), -128, 127
        )
        np.testing.assert_array_equal(zp.numpy(), expected_zp.astype(np.float32))
        # The widened range maps onto the grid ends.
        assert quantize(lo, scale, zp, scheme.with_axis(0)).tolist() == [-128, -128]

    @pytest.mark.parametrize("bits", [4, 8])
    @pytest.mark.parametrize("signed", [True, False])
    def test_symmetric(self, bits, signed):
        scheme = QuantScheme(bits=bits, signed=signed, symmetric=True)
        scale, zp = derive_qparams(scheme, torch.tensor(-3.0), torch.tensor(1.5))
        assert scale.item() == pytest.approx(3.0 / (2 ** (bits - 1) - 1), rel=1e-7)
        assert zp.item() == (0.0 if signed else float(2 ** (bits - 1)))

    @pytest.mark.parametrize("symmetric", [True, False])
    def test_collapsed_range_falls_back_to_eps(self, symmetric):
        scheme = QuantScheme(bits=8, signed=not symmetric, symmetric=symmetric)
        scale, zp = derive_qparams(scheme, torch.tensor(0.0), torch.tensor(0.0), eps=1e-6)
        levels = 127 if symmetric else 255
        assert scale.item() == np.float32(np.float32(1e-6) / np.float32(levels))
        assert torch.isfinite(zp).all()


@pytest.mark.parametrize("fn", ["quantize", "fake_quantize"])
def test_qparams_no_runtime_reproduces_are_refused(fn):
    """A scale of 0 / NaN / inf or a zero point off the integer grid: a SchemeError naming the value, not codes."""
    import qtrim_fx

    call = getattr(qtrim_fx, fn)
    x = torch.randn(2, 3)
    u8 = QuantScheme(bits=8, signed=False, symmetric=False)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(SchemeError, match="scale must be finite and positive"):
            call(x, torch.tensor(bad), torch.tensor(128.0), u8)
    for zp in (256.0, -1.0, 3.5):
        with pytest.raises(SchemeError, match=r"zero_point must be an integer in \[0, 255\]"):
            call(x, torch.tensor(0.1), torch.tensor(zp), u8)
    pc = QuantScheme(bits=8, signed=True, symmetric=True, axis=1)
    with pytest.raises(SchemeError, match="in 1 of 3 entries"):
        call(x, torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3), pc)
    scale, zp = qtrim_fx.derive_qparams(u8, torch.tensor(-1.0), torch.tensor(0.0))  # degenerate but derived
    call(x, scale, zp, u8)
