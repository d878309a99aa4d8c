"""Progressive fake quantization: the blend-quant op and the global blend λ.

    x̃ = x + λ · (x̂ − x).detach()        x̂ = DequantizeLinear(QuantizeLinear(x))

The value is computed with ``torch.lerp(x, x̂, λ)``, which is exact at both
ends (λ = 0 gives x, λ = 1 gives x̂ bit for bit); the gradient with respect to
``x`` is the identity for every λ (straight-through, gradients follow FP32), and
nothing is saved for backward, so blend-quant adds no activation memory.

One :class:`BlendControl` per prepared model owns λ as a buffer: it is saved in
``state_dict``, restored on load, and broadcast by DDP like any other buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .quantize import fake_quantize_raw

__all__ = ["BlendControl", "blend_quant", "blend_to"]


class _BlendQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, lam, qmin: int, qmax: int, axis):  # type: ignore[override]
        xf = x if x.dtype == torch.float32 else x.float()
        xq = fake_quantize_raw(xf, scale, zero_point, qmin, qmax, axis)
        out = torch.lerp(xf, xq, lam.to(torch.float32))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None


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
        x: input tensor (any float dtype; quantization math runs in float32).
        scale, zero_point: float32 qparams, 0-D or 1-D along ``axis``.
        lam: blend in [0, 1], a 0-D tensor (preferred: no recompiles) or float.
        qmin, qmax: integer grid bounds.
        axis: channel axis of per-channel qparams.
    """
    if not isinstance(lam, torch.Tensor):
        lam = torch.tensor(float(lam), device=x.device)
    return _BlendQuantFn.apply(x, scale, zero_point, lam, qmin, qmax, axis)


class BlendControl(nn.Module):
    """Holds the single global blend λ of a prepared model.

    ``value`` is a 0-D float32 buffer (saved, restored, DDP-broadcast). A Python
    mirror lets sites skip all quantization work while λ == 0 (FP32 warmup)
    without reading the tensor back from the device.
    """

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(0.0, dtype=torch.float32))
        self._is_zero = True
        self.set(value)  # same [0, 1] check as later updates
        self._register_load_state_dict_pre_hook(self._on_load)

    def set(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"blend λ must lie in [0, 1], got {value}")
        self.value.fill_(value)
        self._is_zero = value == 0.0

    @property
    def is_zero(self) -> bool:
        return self._is_zero

    def get(self) -> float:
        return float(self.value)

    def _on_load(self, state_dict, prefix, *args: Any) -> None:
        v = state_dict.get(prefix + "value")
        if v is not None:
            self._is_zero = bool(float(v) == 0.0)

    def forward(self) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"λ={float(self.value):.4f}"
