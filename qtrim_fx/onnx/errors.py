"""Errors raised by the ONNX back end (all are :class:`qtrim_fx.SchemeError`, hence ``ValueError``)."""

from __future__ import annotations

from ..scheme import SchemeError

__all__ = ["ExportError", "ProfileError"]


class ProfileError(SchemeError):
    """A target profile that is unknown or contradicts itself."""


class ExportError(SchemeError):
    """A lowered model that cannot be exported as a clean QDQ graph for the requested target."""
