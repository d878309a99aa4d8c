"""Quantization schemes: the frozen description of one integer grid.

A :class:`QuantScheme` says *how* a tensor is quantized (bits, signedness,
symmetry, granularity); it holds no statistics. Scales and zero points are
derived from an observer's raw statistics for a given scheme, so the same
checkpoint can be lowered to several schemes (see ``qtrim_fx.qparams``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qtrim_fx.core.errors import SchemeError

__all__ = ["QuantScheme", "SchemeError"]


@dataclass(frozen=True)
class QuantScheme:
    """An integer grid for a tensor.

    Args:
        bits: integer width, 2..16 (INT8 and INT4 are what users ship).
        signed: ``True`` for int ``[-2^(b-1), 2^(b-1)-1]``, ``False`` for uint ``[0, 2^b-1]``.
        symmetric: ``True`` forces a zero point at the grid's middle (0 for signed grids,
            ``2^(b-1)`` for unsigned ones, as ONNX Runtime writes it).
        axis: ``None`` for one scale per tensor, else the channel axis for per-channel scales.
        narrow: drop the most negative level of a signed grid (``[-127, 127]`` for int8).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    narrow: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SchemeError(f"bits must be an int in 2..16, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise SchemeError(
                f"bits={self.bits} is outside 2..16; use 8 (INT8) or 4 (INT4) for deployable models"
            )
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise SchemeError(f"axis must be None (per-tensor) or an int, got {self.axis!r}")
        if self.narrow and not self.signed:
            raise SchemeError("narrow=True only applies to signed grids; use signed=True or narrow=False")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def onnx_type_name(self) -> str:
        """The ONNX storage type name: int8, uint8, int4, uint4, int16 or uint16."""
        for width in (4, 8, 16):
            if self.bits <= width:
                return ("int" if self.signed else "uint") + str(width)
        raise AssertionError("unreachable")

    def with_axis(self, axis: int | None) -> QuantScheme:
        return replace(self, axis=axis)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int8 sym per-channel(0)``."""
        gran = "per-tensor" if self.axis is None else f"per-channel({self.axis})"
        sym = "sym" if self.symmetric else "asym"
        kind = ("int" if self.signed else "uint") + str(self.bits)
        return f"{kind}{'n' if self.narrow else ''} {sym} {gran}"
