"""Front ends (the capture stage): ``torch.fx.symbolic_trace`` with automatic leaves, ``torch.export``
as the fallback, and traceable forms of modules FX keeps opaque."""

from __future__ import annotations

from qtrim_fx.core.errors import CaptureError
from qtrim_fx.frontend.trace import CaptureResult, Fallback, capture

__all__ = ["CaptureError", "CaptureResult", "Fallback", "capture"]
