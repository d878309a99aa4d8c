"""A quantization site: one observer + one blend-quant on one tensor.

Every site of a prepared model is a :class:`QuantSite` module called from the
FX graph (``call_module``). It records statistics in training, derives qparams
from them for its scheme, and blends the tensor towards its fake-quantized
value by the model's single global λ (:class:`qtrim_fx.blend.BlendControl`).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from .blend import BlendControl, blend_quant, blend_to
from .observer import EmaQuantileObserver
from .ops import channel_shape
from .quantize import derive_qparams, fake_quantize_raw
from .scheme import QuantScheme

__all__ = ["QuantSite"]

SiteKind = Literal["weight", "activation"]


class QuantSite(nn.Module):
    """Observer + blend-quant at one tensor of a prepared model.

    Args:
        scheme: the training-time integer grid (export may derive others from the same stats).
        observer: the statistics of this tensor.
        control: the model's shared :class:`BlendControl` (held by reference, not registered,
            so λ is stored once, on the prepared model's root).
        kind: ``"weight"`` or ``"activation"``.
        eps: lower bound of derived scales.
    """

    def __init__(
        self,
        scheme: QuantScheme,
        observer: EmaQuantileObserver,
        control: BlendControl,
        kind: SiteKind = "activation",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer = observer
        self.kind = kind
        self.eps = float(eps)
        self.enabled = True
        object.__setattr__(self, "_control", control)
        self._warned_unobserved = False

    @property
    def control(self) -> BlendControl:
        return self._control  # type: ignore[return-value]

    def bind(self, control: BlendControl) -> None:
        object.__setattr__(self, "_control", control)

    def qparams(self, scheme: QuantScheme | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``scheme`` (default: the training scheme) from the stored stats."""
        lo, hi = self.observer.stats()
        return derive_qparams(scheme or self.scheme, lo, hi, self.eps)

    def forward(self, x: torch.Tensor, fold: torch.Tensor | None = None) -> torch.Tensor:
        """Observe ``x`` (train mode) and blend it towards its fake-quantized value by λ.

        Args:
            x: the tensor of this site.
            fold: for a conv weight followed by BatchNorm, the per-output-channel factor
                γ/sqrt(var + eps): the site then observes and quantizes the folded weight
                ``x·fold`` (the one that is deployed) and returns ``Q(x·fold)/fold`` blended with ``x``.
        """
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        f = None if fold is None else channel_shape(fold.detach().to(x.dtype), x.dim(), 0)
        xs = x if f is None else x.detach() * f
        if self.training:
            self.observer(xs)
        if not self.enabled:
            return x
        if self.control.is_zero and not torch.compiler.is_compiling():
            return x
        if not self.observer.initialized:
            if not self._warned_unobserved:
                warnings.warn(
                    f"quantization site {self.observer_name()} has no statistics yet and is left in "
                    "float; run qtrim_fx.calibrate(model, batches) or train before raising λ",
                    stacklevel=2,
                )
                self._warned_unobserved = True
            return x
        scale, zp = self.qparams()
        s = self.scheme
        if f is None:
            return blend_quant(x, scale, zp, self.control.value, s.qmin, s.qmax, s.axis)
        q = fake_quantize_raw(xs.float(), scale, zp, s.qmin, s.qmax, s.axis).to(x.dtype)
        target = torch.where(f != 0, q / f, x.detach())
        return blend_to(x, target, self.control.value)

    def observer_name(self) -> str:
        return getattr(self, "_qtrim_name", self.__class__.__name__)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.scheme.describe()}"
