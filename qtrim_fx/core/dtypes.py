"""Integer storage types of QuantizeLinear / DequantizeLinear and the opset each needs.

A grid of ``bits`` bits is stored in the narrowest ONNX integer type that holds it
(2..4 -> INT4/UINT4, 5..8 -> INT8/UINT8, 9..16 -> INT16/UINT16); a grid narrower than its
storage (int4 codes in ``[-7, 7]``, int8 in ``[-127, 127]``) keeps its own ``qmin``/``qmax``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["StorageType", "storage_by_name", "storage_for", "storage_of"]


@dataclass(frozen=True)
class StorageType:
    """One ONNX integer type usable as a Q output / DQ input.

    Attributes:
        bits: storage width: 4, 8 or 16.
        signed: int vs uint.
    """

    bits: int
    signed: bool

    @property
    def name(self) -> str:
        return ("int" if self.signed else "uint") + str(self.bits)

    @property
    def lo(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def min_opset(self) -> int:
        """First ONNX opset whose QuantizeLinear accepts this type (INT4 and INT16 arrived in 21)."""
        return 10 if self.bits == 8 else 21

    @property
    def ir_dtype(self) -> ir.DataType:
        return ir.DataType[self.name.upper()]

    @property
    def numpy_dtype(self) -> np.dtype:
        """numpy dtype of the codes (``ml_dtypes`` int4/uint4 for 4 bits, via onnx-ir)."""
        return self.ir_dtype.numpy()


_STORAGE = {s.name: s for s in (StorageType(b, sg) for b in (4, 8, 16) for sg in (True, False))}


def storage_for(bits: int, signed: bool) -> StorageType:
    """The narrowest storage type holding a ``bits``-bit grid (``bits`` in 2..16)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits={bits} has no ONNX integer storage; use 2..16 (8 for INT8, 4 for INT4)")
    width = 4 if bits <= 4 else 8 if bits <= 8 else 16
    return StorageType(width, bool(signed))


def storage_by_name(name: str) -> StorageType:
    """``"int8"`` -> StorageType(8, True); raises ``ValueError`` naming the valid names."""
    try:
        return _STORAGE[name]
    except KeyError:
        raise ValueError(f"unknown integer storage type {name!r}; use one of {sorted(_STORAGE)}") from None


def storage_of(dtype: ir.DataType | None) -> StorageType | None:
    """The storage type of an ONNX data type, or ``None`` if it is not a Q/DQ integer type."""
    if dtype is None:
        return None
    return _STORAGE.get(dtype.name.lower())
