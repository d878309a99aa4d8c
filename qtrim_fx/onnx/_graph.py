"""Small onnx-ir helpers shared by the ONNX passes and ``check``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.dtypes import StorageType, storage_of

__all__ = [
    "NameScope",
    "QDQParams",
    "add_initializer",
    "const_array",
    "dequantizes_constant",
    "is_op",
    "qdq_params",
    "reaches_only_outputs",
    "source_value",
    "value_rank",
]

_STANDARD_DOMAINS = ("", "ai.onnx")


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """``node`` is a default-domain op of one of ``op_types``."""
    return node is not None and node.domain in _STANDARD_DOMAINS and node.op_type in op_types


def dequantizes_constant(node: ir.Node) -> bool:
    """A weight's Q/DQ: Q/DQ of a constant, or the DQ right after such a Q (float weight storage)."""
    if not is_op(node, "QuantizeLinear", "DequantizeLinear") or not node.inputs or node.inputs[0] is None:
        return False
    if const_array(node.inputs[0]) is not None:
        return True
    src = node.inputs[0].producer()
    return is_op(node, "DequantizeLinear") and src is not None and is_op(src, "QuantizeLinear") and \
        const_array(src.inputs[0]) is not None


def source_value(value: ir.Value) -> ir.Value:
    """Follow ``Identity`` producers back to the value they copy."""
    while is_op(value.producer(), "Identity"):
        nxt = value.producer().inputs[0]  # type: ignore[union-attr]
        if nxt is None:
            break
        value = nxt
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or ``Constant`` output (through ``Identity``), else ``None``."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(source_value(value))
    return None if tensor is None else tensor.numpy()


def value_rank(value: ir.Value | None) -> int | None:
    """Rank of a value: from its constant array, else its shape; None when unknown."""
    if value is None:
        return None
    array = const_array(value)
    if array is not None:
        return array.ndim
    return None if value.shape is None else len(value.shape)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register a new initializer (``name`` must be fresh; see :class:`NameScope`)."""
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


class NameScope:
    """Hands out node and value names not yet used in a graph (``base``, ``base_1``, ...)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._nodes = {n.name for n in graph.all_nodes() if n.name}
        self._values = {v.name for v in _all_values(graph) if v.name}

    def node(self, base: str) -> str:
        return self._fresh(base, self._nodes)

    def value(self, base: str) -> str:
        return self._fresh(base, self._values)

    @staticmethod
    def _fresh(base: str, used: set[str]) -> str:
        name, i = base, 0
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        return name


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from node.outputs


@dataclass(frozen=True)
class QDQParams:
    """The constant parameters of a QuantizeLinear / DequantizeLinear node, comparable by value.

    Attributes:
        scale: float array, 0-D or 1-D.
        zero_point: array in the storage dtype, ``None`` when the input is absent.
        axis: the ``axis`` attribute normalized by ``rank`` when known (``None`` per-tensor).
        storage: the integer type (from the zero point), ``None`` if absent or not integer.
        extra: other attributes as sorted ``(name, repr)`` pairs (``block_size``, ``saturate``...).
    """

    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    storage: StorageType | None
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def same_as(self, other: QDQParams) -> bool:
        def eq(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            if a is None or b is None:
                return a is b
            return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))

        return (eq(self.scale, other.scale) and eq(self.zero_point, other.zero_point)
                and self.axis == other.axis and self.storage == other.storage and self.extra == other.extra)


def qdq_params(node: ir.Node, rank: int | None = None) -> QDQParams | None:
    """Parameters of a Q/DQ node whose scale (and zero point, if any) are constants, else ``None``."""
    scale = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if scale is None:
        return None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = const_array(zp_value)
    if zp_value is not None and zp is None:
        return None
    axis = None
    if scale.ndim == 1 and (scale.size > 1 or "axis" in node.attributes):
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1  # spec default
        if rank is not None and axis < 0:
            axis += rank
    dtype = zp_value.dtype if zp_value is not None else None
    if dtype is None and zp is not None:
        dtype = ir.tensor(zp).dtype
    extra = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items() if k != "axis"))
    return QDQParams(scale, zp, axis, storage_of(dtype), extra)


def reaches_only_outputs(value: ir.Value) -> bool:
    """No QuantizeLinear reads ``value`` or anything computed from it: it only reaches graph outputs.

    Such a tensor is a model output that lowering leaves float on targets that run its op in float
    (``SiteSpec.model_output``, the logits): nothing reads it as an integer.
    """
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for user, _ in v.uses():
            if is_op(user, "QuantizeLinear") or len(seen) > 64:
                return False
            todo.extend(o for o in user.outputs if o is not None)
    return True
