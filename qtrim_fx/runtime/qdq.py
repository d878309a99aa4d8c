"""``quant_dequant``: the one quantization op of a lowered GraphModule, and its ONNX placeholder.

In torch it is exactly ONNX ``DequantizeLinear(QuantizeLinear(x))`` (float32 math, result cast
back to ``x.dtype``, straight-through gradient). It is an FX leaf, so tracing keeps it as one
``call_function`` node, and the legacy TorchScript exporter writes it as one placeholder node
that the ONNX passes then rewrite into standard operators::

    lowered FX graph   get_attr conv.weight -> quant_dequant(w, s, z, -127, 127, 0, 8, True,
                                                             "conv.weight") -> F.conv2d
    torch.onnx.export  conv.weight -> qtrim::QDQ[qmin=-127, qmax=127, axis=0, bits=8, signed=1,
                                                 name="conv.weight"](w, s, z) -> Conv
    ONNX passes        conv.weight_quantized (int8) -> DequantizeLinear(axis=0) -> Conv

The placeholder's attributes are parsed back by :meth:`QDQAttrs.from_node`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import onnx_ir as ir
import torch
import torch.fx

from qtrim_fx.core.dtypes import StorageType, storage_for
from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.fakequant import fake_quantize_raw

__all__ = [
    "PLACEHOLDER_DOMAIN",
    "PLACEHOLDER_OP",
    "PLACEHOLDER_OPSET",
    "QDQAttrs",
    "is_placeholder",
    "is_quant_dequant",
    "quant_dequant",
]

PLACEHOLDER_DOMAIN = "qtrim"
PLACEHOLDER_OP = "QDQ"
#: version of the placeholder domain, for ``torch.onnx.export(custom_opsets=...)``.
PLACEHOLDER_OPSET = 1


@dataclass(frozen=True)
class QDQAttrs:
    """The static arguments of one ``quant_dequant`` call (one quantization site).

    Attributes:
        qmin, qmax: integer grid, possibly narrower than the storage type.
        axis: ``None`` per-tensor, else the channel axis of ``x`` (torch layout).
        bits, signed: the grid's width and signedness; they choose the storage type.
        name: human-readable site name (``layer1.0.conv1.weight``, ``layer1.0.relu.out``).
    """

    qmin: int
    qmax: int
    axis: int | None
    bits: int
    signed: bool
    name: str

    def __post_init__(self) -> None:
        for field in ("qmin", "qmax", "bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ExportError(f"quant_dequant {field} must be an int, got {value!r} at site {self.name!r}")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ExportError(f"quant_dequant axis must be None or an int, got {self.axis!r} at {self.name!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ExportError(f"quant_dequant needs a non-empty site name, got {self.name!r}")
        if not 2 <= self.bits <= 16:
            raise ExportError(f"site {self.name!r}: bits={self.bits} is outside 2..16")
        st = self.storage
        if not st.lo <= self.qmin < self.qmax <= st.hi:
            raise ExportError(
                f"site {self.name!r}: range [{self.qmin}, {self.qmax}] does not fit {st.name} "
                f"[{st.lo}, {st.hi}] (bits={self.bits}, signed={self.signed}); fix qmin/qmax or bits/signed"
            )

    @property
    def storage(self) -> StorageType:
        return storage_for(self.bits, self.signed)

    @property
    def narrow(self) -> bool:
        """True when ``[qmin, qmax]`` is a strict sub-range of the storage type's range."""
        st = self.storage
        return (self.qmin, self.qmax) != (st.lo, st.hi)

    def onnx_attributes(self) -> dict[str, int | str]:
        """Attributes of the placeholder node (``axis`` only when per-channel)."""
        attrs: dict[str, int | str] = {
            "qmin": self.qmin,
            "qmax": self.qmax,
            "bits": self.bits,
            "signed": int(self.signed),
            "name": self.name,
        }
        if self.axis is not None:
            attrs["axis"] = self.axis
        return attrs

    @classmethod
    def from_node(cls, node: ir.Node) -> QDQAttrs:
        """Parse a ``qtrim::QDQ`` node written by :func:`quant_dequant`'s symbolic."""
        a = node.attributes
        missing = [k for k in ("qmin", "qmax", "bits", "signed", "name") if k not in a]
        if missing:
            raise ExportError(f"placeholder node {node.name!r} lacks attributes {missing}; was it written by "
                              "qtrim_fx.runtime.qdq.quant_dequant?")
        axis = a["axis"].as_int() if "axis" in a else None
        return cls(a["qmin"].as_int(), a["qmax"].as_int(), axis, a["bits"].as_int(),
                   bool(a["signed"].as_int()), a["name"].as_string())


def is_placeholder(node: ir.Node) -> bool:
    return node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP


def _f32(t: torch.Tensor) -> torch.Tensor:
    # Never ``t.float()`` on a float32 tensor: it returns ``t`` itself, and the ONNX exporter's
    # trace then routes every later use of ``t`` through a stray ``Cast`` node.
    return t if t.dtype == torch.float32 else t.float()


class _QuantDequant(torch.autograd.Function):
    """Fake quantization with ONNX semantics; exports as one ``qtrim::QDQ`` placeholder."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, bits, signed, name):  # type: ignore[override]
        y = fake_quantize_raw(_f32(x), _f32(scale), _f32(zero_point), qmin, qmax, axis)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None, None, None

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, axis, bits, signed, name):  # type: ignore[no-untyped-def]
        attrs = QDQAttrs(qmin, qmax, axis, bits, signed, name).onnx_attributes()
        typed = {f"{k}_{'s' if isinstance(v, str) else 'i'}": v for k, v in attrs.items()}
        # setType: without it the exporter cannot see a weight's shape (Conv needs its kernel shape).
        return g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, scale, zero_point, **typed).setType(x.type())


def _check_call(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, name: str) -> None:
    if not isinstance(scale, torch.Tensor) or not isinstance(zero_point, torch.Tensor):
        raise ExportError(f"site {name!r}: scale and zero_point must be tensors (register them as buffers)")
    if scale.shape != zero_point.shape:
        raise ExportError(f"site {name!r}: scale {tuple(scale.shape)} and zero_point "
                          f"{tuple(zero_point.shape)} must have the same shape")
    if axis is None and scale.numel() != 1:
        raise ExportError(f"site {name!r}: per-tensor (axis=None) needs one scale, got shape {tuple(scale.shape)}")
    if axis is not None and (scale.dim() != 1 or scale.numel() != x.shape[axis]):
        raise ExportError(f"site {name!r}: per-channel scale must be 1-D with x.shape[{axis}]="
                          f"{x.shape[axis]} entries, got shape {tuple(scale.shape)}")


@lru_cache(maxsize=4096)
def _validated_attrs(qmin: int, qmax: int, axis: int | None, bits: int, signed: bool, name: str) -> QDQAttrs:
    return QDQAttrs(qmin, qmax, axis, bits, signed, name)


@torch.fx.wrap
def quant_dequant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None,
    bits: int,
    signed: bool,
    name: str,
) -> torch.Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x))`` at one quantization site (an FX leaf).

    Args:
        x: the tensor (a weight or an activation).
        scale: float32, 0-D per-tensor or 1-D along ``axis`` of ``x``.
        zero_point: like ``scale``, holding integer values.
        qmin, qmax: the integer grid; may be narrower than the storage type chosen by
            ``bits``/``signed`` (``[-127, 127]`` in int8, ``[-7, 7]`` in INT4).
        axis: ``None`` for per-tensor, else the channel axis of ``x``.
        bits, signed: grid width and signedness (storage: INT4 for 2..4 bits, INT8 for 5..8,
            INT16 for 9..16).
        name: the site's human-readable name; ONNX nodes and initializers are named after it.

    Returns:
        ``s * (clip(round_half_even(x / s) + z, qmin, qmax) - z)`` in ``x.dtype``; the gradient
        w.r.t. ``x`` passes straight through.
    """
    _validated_attrs(qmin, qmax, axis, bits, signed, name)
    args = (x, scale, zero_point, qmin, qmax, axis, bits, signed, name)
    proxy = next((a for a in args[:3] if isinstance(a, torch.fx.Proxy)), None)
    if proxy is not None:
        # Traced from a module that imported this function by name (fx.wrap only patches the
        # name in this module): record the leaf call ourselves, as fx.wrap's wrapper would.
        out = proxy.tracer.create_proxy("call_function", _QUANT_DEQUANT, args, {})
        out.node.meta["is_wrapped"] = True
        return out
    if not torch.jit.is_tracing():  # the ONNX exporter's trace would warn on every tensor -> bool
        _check_call(x, scale, zero_point, axis, name)
    return _QuantDequant.apply(x, scale, zero_point, qmin, qmax, axis, bits, signed, name)


# While FX traces, the module global ``quant_dequant`` is fx.wrap's patched wrapper; graph nodes
# must target the function itself.
_QUANT_DEQUANT = quant_dequant


def is_quant_dequant(target: object) -> bool:
    """Whether an FX node target is :func:`quant_dequant` (or fx.wrap's wrapper around it)."""
    return target is _QUANT_DEQUANT or getattr(target, "__wrapped__", None) is _QUANT_DEQUANT
