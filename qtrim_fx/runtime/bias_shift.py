"""Bias correction at run time: one :class:`BiasShift` per quantized Conv / Linear.

A quantized layer's output carries a per-channel mean error: rounding the weights and the input does not
average out where the input repeats one value (a constant image background, a ReLU's zeros after a
bias) or where a ReLU rectifies the noise of the layer before. ``calibrate`` measures it against the
float model, layer by layer (:mod:`qtrim_fx.train.bias_correction`), and stores it here; the layer then
computes with the bias ``b − λ·δ``::

    y = conv2d(x̂, ŵ, bias_shift(b))        bias_shift(b) = b − λ·δ   (b = None: −λ·δ)

``δ`` is a float32 buffer (saved, restored and DDP-broadcast with the model); while it is all zeros
(``active`` False) the module returns ``b`` itself, so training and λ = 0 are exactly as without it.
A layer followed by a BatchNorm in training mode leaves the shift out: the batch statistics cancel a
per-channel constant, and the BatchNorm's running mean then keeps describing the uncorrected layer, so
the correction still holds in eval mode and in the file (where the BatchNorm is folded); training pays
nothing for it. Whether it is zero is re-read whenever the buffer changed by any route — ``set_delta``,
``load_state_dict``, a DDP buffer broadcast, ``.to()`` — (its identity and in-place version counter):
one host read on the CPU; on an accelerator a changed buffer is taken as set (``b − λ·0`` is ``b``),
so no step waits on the device. Lowering folds ``b − λ·δ`` into the layer's bias (``FoldBiasShiftPass``).
"""

from __future__ import annotations

import torch
from torch import nn

from qtrim_fx.runtime.blend import BlendControl

__all__ = ["BIAS_SHIFT_ATTR", "BiasShift", "bias_shifts"]

#: attribute of a prepared GraphModule holding the ``{key: BiasShift}`` ModuleDict
BIAS_SHIFT_ATTR = "qtrim_bias_shift"


class BiasShift(nn.Module):
    """``b − λ·δ`` for one layer's bias (see module doc).

    Args:
        channels: the layer's output channels (the bias length).
        axis: the output's channel axis (1 for convolutions, -1 for linear layers).
        control: the model's shared :class:`BlendControl` (held by reference, not registered).
        norm: the BatchNorm that reads the layer's output, if any (held by reference): while it is in
            training mode the shift is left out (see module doc).
        rank: the rank of the layer's batched output (a convolution's weight rank; linear: 0, any rank).
    """

    def __init__(self, channels: int, axis: int, control: BlendControl,
                 norm: nn.modules.batchnorm._BatchNorm | None = None, rank: int = 0) -> None:
        super().__init__()
        self.axis = int(axis)
        self.rank = int(rank)
        self.register_buffer("delta", torch.zeros(int(channels), dtype=torch.float32))
        self._active = False
        self._seen = self._key()
        object.__setattr__(self, "_control", control)
        object.__setattr__(self, "_norm", norm)

    @property
    def control(self) -> BlendControl:
        return self._control  # type: ignore[return-value]

    def _key(self) -> tuple[int, int]:
        return id(self.delta), self.delta._version

    @property
    def active(self) -> bool:
        """Whether a correction is stored (see module doc: re-read after the buffer changed)."""
        key = self._key()
        if key != self._seen:
            self._seen = key
            self._active = bool(self.delta.any()) if self.delta.device.type == "cpu" else True
        return self._active

    def set_delta(self, delta: torch.Tensor | None) -> None:
        """Store a correction (None or all zeros: none; the module then returns its input)."""
        with torch.no_grad():
            if delta is None:
                self.delta.zero_()
            else:
                self.delta.copy_(delta.detach().reshape(self.delta.shape).to(self.delta))
        self._seen = self._key()
        self._active = bool(self.delta.any())

    def shifted(self, bias: torch.Tensor | None, lam: torch.Tensor | float) -> torch.Tensor | None:
        """``bias − lam·δ`` (``bias`` None: ``−lam·δ``) in the bias' dtype, or ``bias`` when inactive."""
        if not self.active:
            return bias
        shift = self.delta * lam
        if bias is None:
            return -shift
        return bias - shift.to(bias.dtype)

    def forward(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        control = self._control
        norm = self._norm
        if norm is not None and norm.training:  # batch statistics cancel it (see module doc)
            return bias
        if torch.compiler.is_compiling():  # no host reads in a compiled graph; b − λ·0 is b
            shift = self.delta * control.value
            return -shift if bias is None else bias - shift.to(bias.dtype)
        if control._is_zero or not self.active:
            return bias
        return self.shifted(bias, control.value)

    def extra_repr(self) -> str:
        return f"channels={self.delta.numel()}, axis={self.axis}, active={self.active}"


def bias_shifts(model: nn.Module) -> dict[str, BiasShift]:
    """The prepared model's ``{key: BiasShift}`` (empty for a model prepared without them)."""
    holder = getattr(model, BIAS_SHIFT_ATTR, None)
    return dict(holder.items()) if isinstance(holder, nn.ModuleDict) else {}
