"""Progressive fake quantization: the blend-quant op and the global blend λ.

    x̃ = x + λ · (x̂ − x).detach()        x̂ = DequantizeLinear(QuantizeLinear(x))

The value is computed with ``torch.lerp(x, x̂, λ)``, which is exact at both
ends (λ = 0 gives x, λ = 1 gives x̂ bit for bit). The gradient with respect to ``x`` is the
*clipped* straight-through estimate of that lerp (issue 19, see the README's "Gradients"):

    ∂x̃/∂x = (1 − λ) + λ · 1[lo < x̃ < hi]        lo = (q_min − z)·s,  hi = (q_max − z)·s

rounding passes the gradient unchanged, saturation blocks the quantized share of it. The mask
is recomputed in backward from the *output* (for λ < 1, ``lo < x̃ < hi`` ⇔ ``lo < x < hi``; at
λ = 1 it also drops the two end levels, half a step each): the output is the tensor the next
layer saves anyway, so blend-quant keeps no activation memory of its own.

Hot path (eager): x̂ is computed in place on one fresh float32 tensor
(``x / s`` → round → + z → clip → − z → · s: one allocation, at most six passes, five
for a per-tensor zero point on the CPU, which moves into the clip bounds; the bits are those of
:func:`~qtrim_fx.core.fakequant.fake_quantize`), the ``lerp`` is written into that tensor too, and it
is skipped when the host-side mirror of λ says λ = 1. The clipped-STE bounds of per-tensor CPU
qparams are host floats the site caches with its qparams (:func:`host_bounds`). A BN-folded weight
carries its identity gradient in an autograd ``clone`` (:func:`fold_product`), not in a Python
``autograd.Function``. Under ``torch.compile`` the plain functional form is traced instead (the
compiler fuses it into one kernel).

One :class:`BlendControl` per prepared model owns λ as a buffer: it is saved in
``state_dict``, restored on load, and broadcast by DDP like any other buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qtrim_fx.core.errors import CheckpointError, ConfigError
from qtrim_fx.core.fakequant import (
    channel_broadcast,
    fake_quantize_,
    fake_quantize_broadcast,
    quantize_codes,
    round_clip_,
)

__all__ = ["BlendControl", "BlendQuantFn", "blend_quant", "blend_to", "fold_product", "host_bounds",
           "quantize_folded_one", "quantize_owned_", "saturation_gradient"]


class BlendQuantFn(torch.autograd.Function):
    """``lerp(x, x̂, λ)`` with the clipped straight-through gradient ``(1 − λ) + λ·1[lo < x̃ < hi]``.

    ``scale`` / ``zero_point`` arrive shaped for broadcasting (``zero_point=None``: z = 0);
    ``lam_is_one`` is a host-side fact (never read from the tensor) that lets eager skip the
    ``lerp`` pass. ``keep_output``: save only its own output (shared with the reader that saves
    it) and the qparams and λ for backward; ``False`` (a reader modifies the output in place, e.g.
    ``Dropout(inplace=True)``): save a 1-byte in-range mask instead.
    """

    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, lam, qmin: int, qmax: int, lam_is_one: bool,  # type: ignore[override]
                keep_output: bool, clip: bool = True, host_bounds: tuple[float, float] | None = None,
                overwrite: bool = False):
        # ``host_bounds``: :func:`host_bounds` of these qparams, cached by the caller (a site derives them
        # once per statistics update, not per call); None: computed here. ``overwrite``: the caller owns
        # ``x`` (nothing reads or keeps it after this call, see InPlaceSitesPass): at λ = 1 a float32 x is
        # quantized in place and returned.
        bounds = None
        if torch.compiler.is_compiling():
            xf = x.float()
            out = torch.lerp(xf, fake_quantize_broadcast(xf, scale, zero_point, qmin, qmax), lam.float()).to(x.dtype)
        else:
            fp32 = x.dtype == torch.float32
            xf = x if fp32 else x.float()
            # Work in place in the float copy of a half-precision x unless the lerp still needs it, or in x
            # itself when the caller hands it over.
            overwrite = overwrite and fp32 and lam_is_one
            t = fake_quantize_(xf, scale, zero_point, qmin, qmax, inplace=lam_is_one and (not fp32 or overwrite))
            if overwrite:
                ctx.mark_dirty(x)
            if not lam_is_one:
                torch.lerp(xf, t, lam if lam.dtype == torch.float32 else lam.float(), out=t)
            out = t if fp32 else t.to(x.dtype)
            if fp32 and keep_output:  # per-tensor CPU qparams: the mask's bounds now, backward is one kernel
                bounds = host_bounds or _host_bounds(scale, zero_point, qmin, qmax)
        ctx.qrange = (qmin, qmax, lam_is_one, keep_output)
        ctx.bounds = bounds
        ctx.straight = not clip
        if not clip:  # a range that never clips (model outputs: min/max): the plain straight-through gradient
            return out
        if keep_output:
            zp = () if zero_point is None else (zero_point,)
            ctx.save_for_backward(out, scale, lam, *zp)
        else:  # a reader modifies the output in place: keep the 1-byte mask instead
            ctx.save_for_backward(_in_range_mask(out, scale, zero_point, lam, qmin, qmax), lam)
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        qmin, qmax, lam_is_one, keep_output = ctx.qrange
        nones = (None,) * (len(ctx.needs_input_grad) - 1)
        if getattr(ctx, "straight", False):
            return (grad, *nones)
        bounds = getattr(ctx, "bounds", None)  # absent on forwards of subclasses that do not set it
        if keep_output and bounds is not None and grad.dtype == torch.float32:
            out, _, lam, *_ = ctx.saved_tensors
            kept = torch.ops.aten.hardtanh_backward(grad, out, bounds[0], bounds[1])
            g = kept if lam_is_one else torch.lerp(grad, kept, lam.to(grad.dtype), out=kept)
        elif keep_output:
            out, scale, lam, *zp = ctx.saved_tensors
            g = saturation_gradient(grad, out, scale, zp[0] if zp else None, lam, qmin, qmax, lam_is_one)
        else:
            mask, lam = ctx.saved_tensors
            kept = _masked(grad, mask)
            g = kept if lam_is_one else torch.lerp(grad, kept, lam.to(grad.dtype), out=kept)
        return (g, *nones)


_POSITIVE_ZERO = torch.zeros((), dtype=torch.float32)  # ``+0.0 + s·k``: see fake_quantize_


class _OwnedQuantFn(torch.autograd.Function):
    """:func:`quantize_owned_`'s autograd: in place (``mark_dirty``), saves its output, backward one kernel."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, bounds: tuple[float, float]):  # type: ignore[override]
        lo, hi = bounds
        t = x.div_(scale).round_()
        torch.add(_POSITIVE_ZERO, t, alpha=scale.item(), out=t).clamp_(lo, hi)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.bounds = bounds
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, out, lo, hi), None, None


def quantize_owned_(x: torch.Tensor, scale: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """``x`` (float32, per-tensor CPU qparams, λ = 1, clipped STE) fake-quantized in place and returned: the value
    and gradient of :class:`BlendQuantFn` in four in-place passes and a lean autograd node.

    For a tensor its caller owns (nothing reads or keeps it afterwards, see ``InPlaceSitesPass``). ``round(x / s)``,
    then ``+0.0 + s·k`` (one rounding, −0.0 made +0.0), then a clamp to the grid's end values ``bounds`` =
    ``fl((q_min − z)·s)``, ``fl((q_max − z)·s)``: multiplying by ``s > 0`` is monotonic, so that gives the bits of
    clamping ``k`` to ``[q_min − z, q_max − z]`` first (NaN stays NaN, ±inf saturate). Backward is
    ``hardtanh_backward(grad, out, lo, hi)``, the clipped straight-through gradient at λ = 1, from the output it
    keeps (no copy of the input: torch's own in-place ``hardtanh_`` would keep one).
    """
    return _OwnedQuantFn.apply(x, scale, bounds)


def _in_range_mask(out: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, lam: torch.Tensor,
                   qmin: int, qmax: int) -> torch.Tensor:
    """``saturation_gradient(1, out, ...) != 0`` as a bool tensor: ``lo < out < hi``.

    Per-channel qparams: the two comparisons themselves (what that function's ``where`` selects with), without
    the float ``where`` (the slowest CPU pass here, ~10x a compare) and the ``!= 0`` after it. Per-tensor
    qparams keep the function's own path (its NaN handling is ``hardtanh_backward``'s).
    """
    if scale.numel() != 1 and not torch.compiler.is_compiling():
        z: Any = 0.0 if zero_point is None else zero_point
        lo = ((qmin - z) * scale).to(out.dtype)
        hi = ((qmax - z) * scale).to(out.dtype)
        return (out > lo).logical_and_(out < hi)
    ones = torch.ones((), dtype=out.dtype, device=out.device).expand_as(out)
    return saturation_gradient(ones, out, scale, zero_point, lam, qmin, qmax, True) != 0


def _masked(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, grad, 0.0)``, on the CPU as ``threshold_backward`` of the mask as 0/1 (bool → uint8 is a
    view): the same bits (+0.0 where masked, ``grad`` itself elsewhere), ~10x faster than ``where`` there."""
    if (mask.dtype == torch.bool and grad.device.type == "cpu" and grad.is_floating_point()
            and not torch.compiler.is_compiling()):
        return torch.ops.aten.threshold_backward(grad, mask.view(torch.uint8).to(grad.dtype), 0)
    return torch.where(mask, grad, 0.0)


def host_bounds(scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                qmax: int) -> tuple[float, float] | None:
    """``(lo, hi)`` of :func:`saturation_gradient` as host floats for float32 per-tensor CPU qparams, else None.

    Bit for bit the float32 values that function computes (``(q − z)`` then ``· s``, each rounded to
    float32: exact integers, then one IEEE float32 product, as NumPy's float32 arithmetic rounds it);
    reading 0-D CPU tensors costs no synchronization.
    """
    if (scale.numel() != 1 or scale.device.type != "cpu" or scale.dtype != torch.float32
            or torch.compiler.is_compiling()):
        return None
    if zero_point is not None and (zero_point.numel() != 1 or zero_point.dtype != torch.float32):
        return None
    s = np.float32(scale.item())
    z = np.float32(0.0 if zero_point is None else zero_point.item())
    return float((np.float32(qmin) - z) * s), float((np.float32(qmax) - z) * s)


_host_bounds = host_bounds  # the name used before it was public


def saturation_gradient(grad: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        lam: torch.Tensor, qmin: int, qmax: int, lam_is_one: bool = False) -> torch.Tensor:
    """``grad · ((1 − λ) + λ·1[lo < out < hi])``: the clipped straight-through gradient of a blend.

    ``lo``/``hi`` are the grid's end values ``(q_min − z)·s`` / ``(q_max − z)·s``, computed exactly
    as the forward computes a saturated element and cast to ``out``'s dtype, so a saturated
    element compares equal to its end value and is masked at λ = 1. With per-tensor qparams on the
    CPU the mask and product are one fused ``hardtanh_backward`` pass (its bounds are host scalars,
    a read that costs no synchronization there), plus one in-place ``lerp`` for λ < 1.
    """
    z: Any = 0.0 if zero_point is None else zero_point
    lo = ((qmin - z) * scale).to(out.dtype)
    hi = ((qmax - z) * scale).to(out.dtype)
    if scale.numel() == 1 and scale.device.type == "cpu" and not torch.compiler.is_compiling():
        kept = torch.ops.aten.hardtanh_backward(grad, out, float(lo), float(hi))
    else:
        kept = torch.where((out > lo).logical_and_(out < hi), grad, 0.0)
    if lam_is_one:
        return kept
    return torch.lerp(grad, kept, lam.to(grad.dtype), out=kept)


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
        if torch.compiler.is_compiling():
            z: Any = 0.0 if zero_point is None else zero_point
            q = quantize_codes(wf.float(), scale, z, qmin, qmax) - z
            return torch.lerp(w, torch.where(f != 0, (q * (scale / f)).to(w.dtype), w), lam.to(w.dtype))
        return _folded_values(w, wf, f, scale, zero_point, lam, qmin, qmax, lam_is_one)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None, None, None


def _folded_values(w: torch.Tensor, wf: torch.Tensor, f: torch.Tensor, scale: torch.Tensor,
                   zero_point: torch.Tensor | None, lam: torch.Tensor, qmin: int, qmax: int,
                   lam_is_one: bool) -> torch.Tensor:
    """The eager value of :class:`_BlendFoldedFn`, computed in place in ``wf`` when it is float32."""
    ratio = scale / f
    t = wf if wf.dtype == torch.float32 else wf.float()
    round_clip_(t.div_(scale), zero_point, qmin, qmax)  # a −0.0 it may leave is harmless here
    t.mul_(ratio)
    if t.dtype != w.dtype:
        t = t.to(w.dtype)
    # Channels with f = 0 (γ = 0) keep w. On the CPU a host read costs no synchronization,
    # and skipping the weight-sized ``where`` when no channel has f = 0 saves a slow pass
    # (the test on the C factors runs in NumPy: a tenth of two torch kernels and a read).
    if (type(f) is not torch.Tensor or f.dtype != torch.float32 or f.device.type != "cpu"
            or np.count_nonzero(f.detach().numpy()) != f.numel()):
        t = torch.where(f != 0, t, w)
    if not lam_is_one:
        torch.lerp(w, t, lam.to(w.dtype), out=t)
    return t


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
    """Blend ``x`` towards its fake-quantized value by ``lam``; clipped straight-through gradient.

    The gradient w.r.t. ``x`` is ``(1 − lam) + lam · 1[lo < x̃ < hi]`` (see :class:`BlendQuantFn`).

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
    s = channel_broadcast(scale, x, axis)
    z = channel_broadcast(zero_point, x, axis)
    return BlendQuantFn.apply(x, s, z, lam, qmin, qmax, lam_is_one, True)


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
        wf: ``w · f`` from :func:`fold_product`, a tensor the caller owns (it is overwritten in eager
            mode; one that requires grad carries w's identity gradient and is returned).
        f: per-output-channel fold factor shaped to broadcast against ``w``.
        scale, zero_point: qparams shaped to broadcast against ``w`` (``zero_point=None``: z = 0).
        lam: 0-D blend tensor; ``lam_is_one`` a host-side promise that it equals 1 (skips the lerp).
    """
    if not wf.requires_grad or torch.compiler.is_compiling():
        return _BlendFoldedFn.apply(w, wf, f, scale, zero_point, lam, qmin, qmax, lam_is_one)
    # ``wf`` from :func:`fold_product` in eager training: it carries w's identity gradient (a C++
    # ``clone`` node), the value is written into it through a detached alias (no autograd, no Python
    # backward per step; none of the other operands requires grad).
    wd = wf.detach()
    t = _folded_values(w.detach(), wd, f, scale, zero_point, lam, qmin, qmax, lam_is_one)
    if t is not wd:
        wd.copy_(t)
    return wf


def fold_product(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``w·f`` for :func:`blend_quant_folded` (``f`` shaped to broadcast against ``w``).

    In eager training (``w`` requires grad) the product is written into ``w.clone()``: a fresh tensor
    whose autograd node passes the gradient to ``w`` unchanged, which :func:`blend_quant_folded`
    overwrites with the blended weight and returns (the identity gradient of the blend). Otherwise
    (compiled, no grad) a plain product without gradient.
    """
    if torch.is_grad_enabled() and w.requires_grad and not torch.compiler.is_compiling() and w.dtype == f.dtype:
        out = w.clone()
        out.detach().mul_(f.detach())  # through a detached alias: no autograd, no no_grad() context
        return out
    with torch.no_grad():
        return w.detach() * f


def quantize_folded_one(w: torch.Tensor, fold: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``blend_quant_folded(w, fold_product(w, f), f, scale, None, 1, qmin, qmax, True)`` in one call: the eager
    training value at λ = 1 of a BN-folded weight on a symmetric grid (z = 0), with the identity gradient for ``w``.

    The same operations in the same order (so the same bits): ``w.clone()`` (the node that carries w's gradient),
    ``·f``, ``/s``, round, clip, ``·(s/f)`` through a detached alias, channels with ``f = 0`` keeping ``w``. Without
    the generic paths' dispatch (a weight site runs this for every conv + BN on every step, and on small nets that
    dispatch costs more than the arithmetic). The caller guarantees: float32 CPU ``w`` requiring grad with grad mode on,
    ``fold`` the 1-D float32 CPU per-output-channel factor without gradient, ``scale`` shaped to broadcast against
    ``w``.
    """
    f = fold.reshape((-1,) + (1,) * (w.dim() - 1))  # channel_shape(fold, w.dim(), 0), without the call
    out = w.clone()
    t = out.detach()
    t.mul_(f)
    ratio = scale / f
    t.div_(scale).round_().clamp_(qmin, qmax)
    t.mul_(ratio)
    if np.count_nonzero(fold.numpy()) != fold.numel():
        t.copy_(torch.where(f != 0, t, w.detach()))
    return out


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
        try:
            value = float(value)
        except (TypeError, ValueError, RuntimeError) as e:  # None, "abc", a tensor of several values
            raise ConfigError(f"blend λ must be a number in [0, 1] (e.g. set_blend(qm, 1.0)), got {value!r}") from e
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"blend λ must lie in [0, 1], got {value}")
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
        key = prefix + "value"
        if key in state_dict:
            v = self.check_loaded(state_dict[key], key)
            self._is_zero = v == 0.0
            self._is_one = v == 1.0

    @staticmethod
    def check_loaded(value: Any, key: str) -> float:
        """The λ a ``state_dict`` holds under ``key``, refused unless it is one number in [0, 1].

        Raises:
            CheckpointError: naming ``key``, for a NaN, negative or > 1 value or one that is not a
                single-number tensor (a corrupted or hand-edited checkpoint).
        """
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() > 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"checkpoint entry {key!r} must hold the blend λ as a 0-D tensor, got {shape}; "
                                  "the checkpoint is corrupted: save it again from the prepared model")
        v = float(value)
        if not 0.0 <= v <= 1.0:  # also false for NaN
            raise CheckpointError(f"checkpoint entry {key!r} holds blend λ = {v}, outside [0, 1]; the checkpoint "
                                  "is corrupted or was edited: save it again from the prepared model")
        return v

    def forward(self) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"λ={float(self.value):.4f}"
