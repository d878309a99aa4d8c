"""Progressive fake quantization: the blend-quant op and the global blend λ.

    x̃ = x + λ · (x̂ − x).detach()        x̂ = DequantizeLinear(QuantizeLinear(x))

The value is computed with ``torch.lerp(x, x̂, λ)``, which is exact at both
ends (λ = 0 gives x, λ = 1 gives x̂ bit for bit); the gradient with respect to
``x`` is the identity for every λ (straight-through, gradients follow FP32), and
nothing is saved for backward, so blend-quant adds no activation memory.

Hot path (eager): x̂ is computed in place on one fresh float32 tensor
(``x / s`` → round → + z → clip → − z → · s: one allocation, at most six passes, five
for a per-tensor zero point on the CPU, which moves into the clip bounds; the bits are those of
:func:`~qtrim_fx.core.fakequant.fake_quantize`), the ``lerp`` is written into that tensor too, and it
is skipped when the host-side mirror of λ says λ = 1. Under ``torch.compile`` the
plain functional form is traced instead (the compiler fuses it into one kernel).

One :class:`BlendControl` per prepared model owns λ as a buffer: it is saved in
``state_dict``, restored on load, and broadcast by DDP like any other buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtrim_fx.core.fakequant import _broadcast

__all__ = ["BlendControl", "blend_quant", "blend_to"]


def _round_clip_(t: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> bool:
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

    ``x`` is float32; with ``inplace`` it is overwritten (the caller must own it). ``scale``
    and ``zero_point`` are already shaped to broadcast against ``x``; ``zero_point=None``
    means z = 0 (symmetric signed grids). Bit-identical to
    :func:`~qtrim_fx.core.fakequant.fake_quantize_raw` (a final ``+ 0.0`` turns a −0.0 left by
    :func:`_round_clip_` into the +0.0 that ``q − z`` gives there).
    """
    t = x.div_(scale) if inplace else torch.div(x, scale)
    signed_zero = _round_clip_(t, zero_point, qmin, qmax)
    t.mul_(scale)
    return t.add_(0.0) if signed_zero else t


def _fake_quantize_functional(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                              qmax: int) -> torch.Tensor:
    z: Any = 0.0 if zero_point is None else zero_point
    return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale


class _BlendQuantFn(torch.autograd.Function):
    """``lerp(x, x̂, λ)`` with an identity gradient for ``x``; saves nothing for backward.

    ``scale`` / ``zero_point`` arrive shaped for broadcasting; ``lam_is_one`` is a host-side
    fact (never read from the tensor) that lets eager skip the ``lerp`` pass.
    """

    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, lam, qmin: int, qmax: int, lam_is_one: bool):  # type: ignore[override]
        if torch.compiler.is_compiling():
            xf = x.float()
            out = torch.lerp(xf, _fake_quantize_functional(xf, scale, zero_point, qmin, qmax), lam.float())
            return out.to(x.dtype)
        fp32 = x.dtype == torch.float32
        xf = x if fp32 else x.float()
        # Work in place in the float copy of a half-precision x unless the lerp still needs it.
        t = fake_quantize_(xf, scale, zero_point, qmin, qmax, inplace=not fp32 and lam_is_one)
        if not lam_is_one:
            torch.lerp(xf, t, lam if lam.dtype == torch.float32 else lam.float(), out=t)
        return t if fp32 else t.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None


class _BlendFoldedFn(torch.autograd.Function):
    """``lerp(w, where(f ≠ 0, q · (s / f), w), λ)`` for a conv weight followed by BatchNorm.

    ``q = clip(round(w·f / s) + z) − z`` is the deployed integer grid of the folded weight ``w·f``,
    computed exactly as QuantizeLinear does (``w·f`` first, then ``/ s``). The float weight the
    training conv sees, ``Q(w·f) / f``, is taken as ``q · (s / f)``: one per-channel factor, one
    pass, instead of ``(q · s) / f`` (it may differ in the last bit; it has no deployed
    counterpart, the deployed conv uses ``q`` and ``s``). ``wf`` is ``w·f`` (computed by the
    caller, who observed it) and is consumed. Identity gradient for ``w``; saves nothing.
    """

    @staticmethod
    def forward(ctx: Any, w, wf, f, scale, zero_point, lam, qmin: int, qmax: int, lam_is_one: bool):  # type: ignore[override]
        ratio = scale / f
        if torch.compiler.is_compiling():
            z: Any = 0.0 if zero_point is None else zero_point
            q = torch.clamp(torch.round(wf.float() / scale) + z, qmin, qmax) - z
            return torch.lerp(w, torch.where(f != 0, (q * ratio).to(w.dtype), w), lam.to(w.dtype))
        t = wf if wf.dtype == torch.float32 else wf.float()
        _round_clip_(t.div_(scale), zero_point, qmin, qmax)  # a −0.0 it may leave is harmless here
        t.mul_(ratio)
        if t.dtype != w.dtype:
            t = t.to(w.dtype)
        # Channels with f = 0 (γ = 0) keep w. On the CPU a host read costs no synchronization,
        # and skipping the weight-sized ``where`` when no channel has f = 0 saves a slow pass.
        if f.device.type != "cpu" or bool((f == 0).any()):
            t = torch.where(f != 0, t, w)
        if not lam_is_one:
            torch.lerp(w, t, lam.to(w.dtype), out=t)
        return t

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None, None, None


class _BlendToFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, target, lam):  # type: ignore[override]
        return torch.lerp(x, target.to(x.dtype), lam.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return grad, None, None


def blend_to(x: torch.Tensor, target: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lerp(x, target, lam)`` with an identity gradient for ``x`` and none for ``target``."""
    return _BlendToFn.apply(x, target, lam)


def blend_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    lam: torch.Tensor | float,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Blend ``x`` towards its fake-quantized value by ``lam``; gradient w.r.t. ``x`` is identity.

    Args:
        x: input tensor (any float dtype; quantization math runs in float32, the result has x's dtype).
        scale, zero_point: float32 qparams, 0-D or 1-D along ``axis`` (zero points hold integers).
        lam: blend in [0, 1], a 0-D tensor (preferred: no recompiles) or float.
        qmin, qmax: integer grid bounds.
        axis: channel axis of per-channel qparams.
    """
    lam_is_one = False
    if not isinstance(lam, torch.Tensor):
        lam_is_one = float(lam) == 1.0
        lam = torch.tensor(float(lam), device=x.device)
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    return _BlendQuantFn.apply(x, s, z, lam, qmin, qmax, lam_is_one)


def blend_quant_folded(
    w: torch.Tensor,
    wf: torch.Tensor,
    f: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    lam: torch.Tensor,
    qmin: int,
    qmax: int,
    lam_is_one: bool = False,
) -> torch.Tensor:
    """Blend a BN-folded weight: ``lerp(w, where(f ≠ 0, q·(s/f), w), lam)``, identity gradient for ``w``.

    ``q`` is the integer grid of ``wf`` minus the zero point (see :class:`_BlendFoldedFn`).

    Args:
        w: the FP32 master weight.
        wf: ``w.detach() · f``, a tensor the caller owns (it is overwritten in eager mode).
        f: per-output-channel fold factor shaped to broadcast against ``w``.
        scale, zero_point: qparams shaped to broadcast against ``w`` (``zero_point=None``: z = 0).
        lam: 0-D blend tensor; ``lam_is_one`` a host-side promise that it equals 1 (skips the lerp).
    """
    return _BlendFoldedFn.apply(w, wf, f, scale, zero_point, lam, qmin, qmax, lam_is_one)


class BlendControl(nn.Module):
    """Holds the single global blend λ of a prepared model.

    ``value`` is a 0-D float32 buffer (saved, restored, DDP-broadcast). Python
    mirrors let sites skip all quantization work while λ == 0 (FP32 warmup) and
    the blend pass at λ == 1, without reading the tensor back from the device.
    """

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(0.0, dtype=torch.float32))
        self._is_zero = True
        self._is_one = False
        self.set(value)  # same [0, 1] check as later updates
        self._register_load_state_dict_pre_hook(self._on_load)

    def set(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"blend λ must lie in [0, 1], got {value}")
        self.value.fill_(value)
        self._is_zero = value == 0.0
        self._is_one = value == 1.0

    @property
    def is_zero(self) -> bool:
        return self._is_zero

    @property
    def is_one(self) -> bool:
        return self._is_one

    def get(self) -> float:
        return float(self.value)

    def _on_load(self, state_dict, prefix, *args: Any) -> None:
        v = state_dict.get(prefix + "value")
        if v is not None:
            v = float(v)
            self._is_zero = v == 0.0
            self._is_one = v == 1.0

    def forward(self) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"λ={float(self.value):.4f}"
