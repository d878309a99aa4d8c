"""Quantize / dequantize / fake-quantize with ONNX QuantizeLinear semantics.

    Q(x; s, z) = saturate(round_half_even(x / s) + z)      (QuantizeLinear)
    D(q; s, z) = (q - z) * s                              (DequantizeLinear)

Everything is computed in float32 exactly as the ONNX reference does it
(true division by the scale, not multiplication by its reciprocal), so a
model fake-quantized here and the exported QDQ graph agree bit for bit.
Per-channel scales broadcast along ``axis``.
"""

from __future__ import annotations

from typing import Any

import torch

from qtrim_fx.core.scheme import QuantScheme, SchemeError

__all__ = [
    "channel_broadcast",
    "channel_view",
    "dequantize",
    "derive_qparams",
    "fake_quantize",
    "fake_quantize_",
    "fake_quantize_broadcast",
    "fake_quantize_raw",
    "quantize",
    "quantize_codes",
    "round_clip_",
]


def channel_view(param: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Shape a per-channel parameter (C,) so it broadcasts along ``axis`` of an ``ndim``-D tensor.

    A 0-D parameter (per-tensor) or ``axis=None`` is returned as it is.
    """
    if axis is None or param.dim() == 0:
        return param
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = param.numel()
    return param.reshape(shape)


def channel_broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """:func:`channel_view` for the rank of ``x``."""
    return channel_view(param, x.dim(), axis)


def quantize_codes(x: torch.Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int) -> torch.Tensor:
    """``clip(round_half_even(x / s) + z, qmin, qmax)``: the one QuantizeLinear formula, as float codes.

    ``scale`` and ``zero_point`` are already shaped to broadcast against ``x`` (tensors or Python
    numbers). Every fake-quant and quantize form in qtrim_fx (eager, compiled, ONNX weight
    initializers, inspect's clipping count) computes its codes here or, for the in-place hot path,
    with :func:`fake_quantize_` (same bits, tested).
    """
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def _quantize_float(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    return quantize_codes(x, channel_broadcast(scale, x, axis), channel_broadcast(zero_point, x, axis), qmin, qmax)


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
    s = channel_broadcast(scale.float(), q, axis)
    z = channel_broadcast(zero_point.float(), q, axis)
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
    """Unchecked form of :func:`fake_quantize` (float32 in, float32 out)."""
    return fake_quantize_broadcast(x, channel_broadcast(scale, x, axis), channel_broadcast(zero_point, x, axis),
                                   qmin, qmax)


def fake_quantize_broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                            qmax: int) -> torch.Tensor:
    """``(codes − z) · s`` with qparams already shaped for ``x``; ``zero_point=None`` means z = 0."""
    z: Any = 0.0 if zero_point is None else zero_point
    return (quantize_codes(x, scale, z, qmin, qmax) - z) * scale


def round_clip_(t: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> bool:
    """``t ← clip(round(t) + z, qmin, qmax) − z`` in place (``t`` holds ``x / s``): the integer grid
    minus the zero point. Returns whether a −0.0 may be left where that difference is 0.

    A per-tensor zero point on the CPU is read to the host (no synchronization) and moved into the
    bounds: ``clip(r + z, qmin, qmax) − z = clip(r, qmin − z, qmax − z)`` for the integer-valued
    ``r = round(t)`` (beyond 2^24 both sides saturate alike), one pass fewer. ``zero_point=None``
    means z = 0 and needs no ± z pass. Both leave the −0.0 that ``round`` gives for small negative
    ``t``; ``(r + z) − z`` (the general path) gives +0.0 there.
    """
    t.round_()
    if zero_point is None:
        t.clamp_(qmin, qmax)
        return True
    if zero_point.dim() == 0 and zero_point.device.type == "cpu":
        z = float(zero_point)
        t.clamp_(qmin - z, qmax - z)
        return True
    t.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point)
    return False


def fake_quantize_(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                   qmax: int, inplace: bool = False) -> torch.Tensor:
    """``(clip(round(x / s) + z) − z) · s`` in float32 with one allocation (none if ``inplace``).

    The training hot path. ``x`` is float32; with ``inplace`` it is overwritten (the caller must
    own it). ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``;
    ``zero_point=None`` means z = 0 (symmetric signed grids). Bit-identical to
    :func:`fake_quantize_raw` (a final ``+ 0.0`` turns a −0.0 left by :func:`round_clip_` into the
    +0.0 that ``q − z`` gives there).
    """
    t = x.div_(scale) if inplace else torch.div(x, scale)
    signed_zero = round_clip_(t, zero_point, qmin, qmax)
    if signed_zero and scale.dim() == 0 and scale.device.type == "cpu" and t.device.type == "cpu":
        # ``+0.0 + s·t`` in one pass (the add kernel's ``a + alpha·b``): the product rounded once, as ``mul_``
        # rounds it (a fused multiply-add with an exact 0 rounds the same), and −0.0 becomes +0.0 as the
        # ``add_(0.0)`` below makes it; a 0-D CPU scale is read without synchronization. Half the time of
        # ``mul_`` + ``add_`` on an activation-sized tensor (two passes over memory instead of four).
        return torch.add(_POSITIVE_ZERO, t, alpha=scale.item(), out=t)
    t.mul_(scale)
    return t.add_(0.0) if signed_zero else t


_POSITIVE_ZERO = torch.zeros((), dtype=torch.float32)


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
    # QuantizeLinear divides by the scale and stores the zero point in the integer type: a scale of 0 (x / 0 is
    # ±inf, every code saturates) or a zero point off the grid gives codes no runtime reproduces. One host read.
    s, z = scale.detach().float(), zero_point.detach().float()
    bad_s = ~(torch.isfinite(s) & (s > 0))
    bad_z = ~((z == torch.round(z)) & (z >= scheme.qmin) & (z <= scheme.qmax))
    flags = torch.stack([bad_s.any(), bad_z.any()]).tolist() if s.numel() else [False, False]
    if flags[0]:
        first = s.reshape(-1)[bad_s.reshape(-1)][0].item()
        raise SchemeError(f"scale must be finite and positive, got {first!r} (in {int(bad_s.sum())} of {s.numel()} "
                          "entries); derive it with qtrim_fx.derive_qparams, which floors it at eps")
    if flags[1]:
        first = z.reshape(-1)[bad_z.reshape(-1)][0].item()
        raise SchemeError(f"zero_point must be an integer in [{scheme.qmin}, {scheme.qmax}] for {scheme.describe()}, "
                          f"got {first!r}; derive it with qtrim_fx.derive_qparams for this scheme")


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
