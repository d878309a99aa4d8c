"""Blend-quant (progressive fake quantization) and the global blend λ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtrim_fx.core.fakequant import fake_quantize
from qtrim_fx.core.scheme import QuantScheme
from qtrim_fx.runtime.blend import BlendControl, blend_quant

_SCHEMES = [
    QuantScheme(bits=8, signed=True, symmetric=True),
    QuantScheme(bits=8, signed=False, symmetric=False),
    QuantScheme(bits=4, signed=True, symmetric=True),
]

# Finite float32 values, including subnormals and far-out-of-grid magnitudes (saturation).
# -0.0 is left out: lerp(x, x̂, 0) = x + 0·(x̂ − x) turns -0.0 into +0.0 (equal value, other bits).
_FINITE = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False).filter(
    lambda v: not (v == 0.0 and math.copysign(1.0, v) < 0)
)


@st.composite
def _inputs(draw):
    scheme = draw(st.sampled_from(_SCHEMES))
    per_channel = draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=3, max_side=5))
    x = draw(hnp.arrays(np.float32, shape, elements=_FINITE))
    c = shape[1] if per_channel else 1
    scale = np.array(draw(st.lists(st.floats(2.0**-8, 4.0, width=32), min_size=c, max_size=c)), np.float32)
    zp = np.array(draw(st.lists(st.integers(scheme.qmin, scheme.qmax), min_size=c, max_size=c)), np.float32)
    if not per_channel:
        scale, zp = scale.reshape(()), zp.reshape(())
    return (
        scheme.with_axis(1 if per_channel else None),
        torch.from_numpy(x),
        torch.from_numpy(scale),
        torch.from_numpy(zp),
    )


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().view(np.int32)


def _blend(x, scale, zp, lam, scheme):
    return blend_quant(x, scale, zp, lam, scheme.qmin, scheme.qmax, scheme.axis)


@given(_inputs(), st.sampled_from(["float", "tensor"]))
@settings(max_examples=50, deadline=None)
def test_lambda_zero_is_the_input_bit_for_bit(case, lam_kind):
    scheme, x, scale, zp = case
    lam = 0.0 if lam_kind == "float" else torch.tensor(0.0)
    y = _blend(x, scale, zp, lam, scheme)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.array_equal(_bits(y), _bits(x))


@given(_inputs(), st.sampled_from(["float", "tensor"]))
@settings(max_examples=50, deadline=None)
def test_lambda_one_is_fake_quantize_bit_for_bit(case, lam_kind):
    scheme, x, scale, zp = case
    lam = 1.0 if lam_kind == "float" else torch.tensor(1.0)
    y = _blend(x, scale, zp, lam, scheme)
    assert np.array_equal(_bits(y), _bits(fake_quantize(x, scale, zp, scheme)))


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradient_is_the_clipped_straight_through_estimate(lam, per_channel):
    # ∂x̃/∂x = (1 − λ) + λ·1[lo < x̃ < hi]: rounding passes the gradient, saturation blocks the
    # quantized share of it (issue 19). Values sit off the grid edges and off the half steps.
    torch.manual_seed(0)
    x = ((torch.rand(4, 3, 50) - 0.5) * 40).requires_grad_()
    scale = torch.tensor([0.5, 0.25, 1.0]) if per_channel else torch.tensor(0.5)
    zp = torch.tensor([0.0, 2.0, -3.0]) if per_channel else torch.tensor(1.0)
    y = blend_quant(x, scale, zp, torch.tensor(lam), -8, 7, 1 if per_channel else None)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    s, z = (scale.view(1, 3, 1), zp.view(1, 3, 1)) if per_channel else (scale, zp)
    codes = x.detach() / s + z
    inside = (codes > -8) & (codes < 7)
    if lam == 1.0:  # x̃ = x̂: the two end levels carry the values within half a step of them
        inside = (codes > -7.5) & (codes < 6.5)
    expected = torch.where(inside, upstream, upstream * (1.0 - torch.tensor(lam)))
    assert 0 < int(inside.sum()) < inside.numel()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_saturated_gradient_is_blocked_in_half_precision_too():
    x = torch.tensor([-100.0, -0.3, 0.2, 100.0], dtype=torch.bfloat16, requires_grad=True)
    y = blend_quant(x, torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0), -128, 127)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_intermediate_lambda_is_the_design_formula():
    torch.manual_seed(1)
    x = torch.randn(1000) * 3
    scale, zp = torch.tensor(0.05), torch.tensor(0.0)
    scheme = QuantScheme(bits=8)
    xq = fake_quantize(x, scale, zp, scheme)
    for lam in (0.1, 0.5, 0.8):
        expected = x.double().numpy() + lam * (xq.double().numpy() - x.double().numpy())
        got = blend_quant(x, scale, zp, lam, -128, 127)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_half_precision_input_keeps_its_dtype():
    x = torch.randn(64).to(torch.bfloat16)
    y = blend_quant(x, torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0), -128, 127)
    assert y.dtype == torch.bfloat16
    expected = fake_quantize(x.float(), torch.tensor(0.1), torch.tensor(0.0), QuantScheme()).to(
        torch.bfloat16
    )
    assert torch.equal(y, expected)


class TestBlendControl:
    def test_value_is_a_buffer_in_state_dict(self):
        bc = BlendControl()
        assert "value" in dict(bc.named_buffers())
        assert bc.is_zero and bc.get() == 0.0
        bc.set(0.375)
        sd = bc.state_dict()
        assert set(sd) == {"value"}
        assert sd["value"].dtype == torch.float32 and sd["value"].dim() == 0
        assert sd["value"].item() == 0.375
        assert not bc.is_zero
        assert bc() is bc.value

    def test_state_dict_round_trip_restores_value_and_zero_flag(self):
        src = torch.nn.Module()
        src.blend = BlendControl()
        src.blend.set(0.6)
        dst = torch.nn.Module()
        dst.blend = BlendControl()
        assert dst.blend.is_zero
        dst.load_state_dict(src.state_dict())
        assert dst.blend.get() == np.float32(0.6)
        assert not dst.blend.is_zero
        # And back to zero: the host-side mirror follows the loaded buffer.
        src.blend.set(0.0)
        dst.load_state_dict(src.state_dict())
        assert dst.blend.is_zero and dst.blend.get() == 0.0

    @pytest.mark.parametrize("bad", [-0.01, 1.0001, 2.0, float("nan"), float("inf"), -float("inf")])
    def test_set_rejects_values_outside_unit_interval(self, bad):
        bc = BlendControl(0.5)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            bc.set(bad)
        assert bc.get() == 0.5

    @pytest.mark.parametrize("ok", [0.0, 1.0, 0.5])
    def test_set_accepts_the_closed_interval(self, ok):
        bc = BlendControl()
        bc.set(ok)
        assert bc.get() == ok
        assert bc.is_zero == (ok == 0.0)

    @pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan")])
    def test_constructor_rejects_values_outside_unit_interval(self, bad):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            BlendControl(bad)


@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (4, False), (16, False)])
@pytest.mark.parametrize("zp_at", ["qmin", "mid", "qmax", "none"])
def test_in_place_fake_quantize_moves_the_zero_point_into_the_bounds_bit_exactly(bits, signed, zp_at):
    # The CPU per-tensor path computes clip(round(x/s), qmin-z, qmax-z)*s + 0.0 instead of
    # (clip(round(x/s) + z, qmin, qmax) - z)*s: compare bits on ties, signed zeros, tiny
    # negatives (round to -0.0), saturating and beyond-2^24 values, subnormals and non-finites.
    from qtrim_fx.core.fakequant import fake_quantize_raw
    from qtrim_fx.runtime.blend import fake_quantize_

    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    z = {"qmin": qmin, "mid": (qmin + qmax) // 2, "qmax": qmax, "none": 0}[zp_at]
    s = 0.0375
    k = torch.arange(-300, 300, dtype=torch.float32)
    special = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -0.4 * s, -0.5 * s, 0.5 * s, 1.5 * s, 2.5 * s, -2.5 * s,
                            3e7, -3e7, 2.0**25 * s, -(2.0**25) * s, 1e-45, -1e-45,
                            float("inf"), -float("inf"), float("nan")], dtype=torch.float32)
    x = torch.cat([k * s, (k + 0.5) * s, (k - 0.5) * s, torch.randn(4000) * 40 * s, special])
    scale, zp = torch.tensor(s), torch.tensor(float(z))
    zp_arg = None if zp_at == "none" else zp  # None: z = 0 without the ± z passes
    ours = fake_quantize_(x.clone(), scale, zp_arg, qmin, qmax, inplace=True)
    ref = fake_quantize_raw(x, scale, zp, qmin, qmax, None)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(fake_quantize_(x, scale, zp_arg, qmin, qmax).view(torch.int32), ref.view(torch.int32))
    # The general (per-channel / accelerator) path: a zero point that is not a 0-D CPU tensor.
    general = fake_quantize_(x.clone().view(1, -1), scale, zp.reshape(1, 1), qmin, qmax, inplace=True)
    assert torch.equal(general.view(-1).view(torch.int32), ref.view(torch.int32))
