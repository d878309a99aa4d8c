"""Quantize / dequantize / fake-quantize with ONNX QuantizeLinear semantics.

    Q(x; s, z) = saturate(round_half_even(x / s) + z)      (QuantizeLinear)
    D(q; s, z) = (q - z) * s                              (DequantizeLinear)

Everything is computed in float32 exactly as the ONNX reference does it
(true division by the scale, not multiplication by its reciprocal), so a
model fake-quantized here and the exported QDQ graph agree bit for bit.
Per-channel scales broadcast along ``axis``.
"""

from __future__ import annotations

import torch

from qtrim_fx.core.scheme import QuantScheme, SchemeError

__all__ = [
    "dequantize",
    "derive_qparams",
    "fake_quantize",
    "quantize",
]


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-channel parameter (C,) so it broadcasts along ``axis`` of ``x``."""
    if axis is None or param.dim() == 0:
        return param
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = param.numel()
    return param.reshape(shape)


def _quantize_float(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QuantScheme,
) -> torch.Tensor:
    """ONNX ``QuantizeLinear``: returns the integer codes as an ``int32`` tensor.

    Args:
        x: float tensor.
        scale: 0-D tensor (per-tensor) or 1-D tensor of length ``x.shape[scheme.axis]``.
        zero_point: same shape as ``scale``; integer values stored in any dtype.
        scheme: gives ``qmin``/``qmax`` and the channel axis.

    Returns:
        ``int32`` tensor of codes in ``[scheme.qmin, scheme.qmax]``.
    """
    _check_params(x, scale, zero_point, scheme)
    xf = x.float()
    return _quantize_float(xf, scale.float(), zero_point.float(), scheme.qmin, scheme.qmax, scheme.axis).to(
        torch.int32
    )


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """ONNX ``DequantizeLinear``: ``(q - z) * s`` in float32."""
    s = _broadcast(scale.float(), q, axis)
    z = _broadcast(zero_point.float(), q, axis)
    return (q.float() - z) * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QuantScheme,
) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in float32 (no gradient rule; see ``blend_quant``)."""
    _check_params(x, scale, zero_point, scheme)
    return fake_quantize_raw(x, scale, zero_point, scheme.qmin, scheme.qmax, scheme.axis)


def fake_quantize_raw(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    """Unchecked hot-path form of :func:`fake_quantize` (float32 in, float32 out)."""
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def _check_params(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme) -> None:
    if scale.shape != zero_point.shape:
        raise SchemeError(
            f"scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} must have the same shape"
        )
    if scheme.axis is None:
        if scale.numel() != 1:
            raise SchemeError(f"a per-tensor scheme needs a single scale, got shape {tuple(scale.shape)}")
    else:
        if not -x.dim() <= scheme.axis < x.dim():
            raise SchemeError(f"axis {scheme.axis} is out of range for a {x.dim()}-D tensor")
        c = x.shape[scheme.axis]
        if scale.dim() != 1 or scale.numel() != c:
            raise SchemeError(
                f"per-channel scale must be 1-D with {c} entries (axis {scheme.axis}), got {tuple(scale.shape)}"
            )


def derive_qparams(
    scheme: QuantScheme, lo: torch.Tensor, hi: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``scheme`` from a raw statistic range ``[lo, hi]``.

    Symmetric: ``s = max(max(|lo|, |hi|), eps) / (2^(b-1) - 1)``, ``z = 0`` for signed
    grids and ``2^(b-1)`` for unsigned ones.
    Asymmetric: the range is widened to contain 0 (so zero padding and ReLU zeros are
    exact), ``s = max(hi - lo, eps) / (qmax - qmin)``, ``z = clip(qmin - round(lo / s))``.
    For weights, pass ``lo = -m, hi = m`` with ``m`` the |w| quantile.

    Returns:
        ``(scale, zero_point)`` as float32 tensors shaped like ``lo`` (zero point holds integers).
    """
    lo = lo.float()
    hi = hi.float()
    if scheme.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax, min=eps) / float(2 ** (scheme.bits - 1) - 1)
        zp = 0.0 if scheme.signed else float(2 ** (scheme.bits - 1))
        return scale, torch.full_like(scale, zp)
    lo0 = torch.clamp(lo, max=0.0)
    hi0 = torch.clamp(hi, min=0.0)
    scale = torch.clamp(hi0 - lo0, min=eps) / float(scheme.qmax - scheme.qmin)
    zp = torch.clamp(scheme.qmin - torch.round(lo0 / scale), scheme.qmin, scheme.qmax)
    return scale, zp
