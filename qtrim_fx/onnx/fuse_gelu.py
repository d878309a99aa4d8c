"""FuseGeluPass: the exporters' decomposed GELU becomes one ONNX ``Gelu`` op (opset >= 20).

Both torch exporters write ``F.gelu`` as five float ops between the Q/DQ of its input and output.
An integer back end sees no Q/DQ around the inner ops and must run them in float — the QNN HTP
cannot even finalize such a graph (``QNN_COMMON_ERROR_MEM_ALLOC``), and has no ``Erf``::

    DQ -> x -> Div(x, √2) -> Erf -> Add(·, 1) -> Mul(·, 0.5) -> Mul(x, ·) -> Q
      =>  DQ -> x -> Gelu(x) -> Q                                (one DQ → op → Q group)

    the tanh form: Mul(x, 0.5) · (1 + Tanh(√(2/π) · (x + 0.044715 · x³)))
      =>  Gelu(x, approximate="tanh")

The multiplications may come in any order (``(x · 0.5) · u``, ``x · (u · 0.5)``, ``(x · u) · 0.5``),
the division by √2 may be a multiplication by 1/√2. Only exact matches fuse: every constant is
checked against its value (to float32 rounding), and every inner tensor must have no other reader.
The pass runs only for profiles that list ``"Gelu"`` in ``fused_ops`` (``qnn``) and at opset >= 20,
where ``Gelu`` is a standard op; it changes no value beyond float rounding (``Gelu`` computes the
same function).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import const_array, is_op

__all__ = ["GELU_MIN_OPSET", "FuseGeluPass"]

#: The first opset with ``Gelu`` in the default domain.
GELU_MIN_OPSET = 20


class FuseGeluPass(ir.passes.InPlacePass):
    """Replace exact erf- and tanh-GELU decompositions by ``Gelu`` (profiles with ``"Gelu"`` in ``fused_ops``)."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if "Gelu" not in self.profile.fused_ops or model.opset_imports.get("", 1) < GELU_MIN_OPSET:
            return ir.passes.PassResult(model, False)
        modified = False
        for node in list(model.graph):
            if node.graph is None:
                continue  # removed by an earlier match
            if is_op(node, "Erf"):
                modified |= _fuse(model.graph, node, _erf_input(node), "none")
            elif is_op(node, "Tanh"):
                modified |= _fuse(model.graph, node, _tanh_input(node), "tanh")
        return ir.passes.PassResult(model, modified)


def _const(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    return float(np.asarray(arr, dtype=np.float64).reshape(()))


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * abs(b)


def _sole_user(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0][0]


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _erf_input(erf: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` and the nodes of ``Div(x, √2)`` / ``Mul(x, 1/√2)`` before the Erf."""
    src = erf.inputs[0]
    pre = src.producer() if src is not None else None
    if pre is None or _sole_user(src) is not erf:  # type: ignore[arg-type]
        return None
    if is_op(pre, "Div") and _close(_const(pre.inputs[1]), math.sqrt(2.0)):
        return pre.inputs[0], [pre]  # type: ignore[return-value]
    if is_op(pre, "Mul"):
        for x, c in ((pre.inputs[0], pre.inputs[1]), (pre.inputs[1], pre.inputs[0])):
            if _close(_const(c), 1.0 / math.sqrt(2.0)) and _const(x) is None:
                return x, [pre]  # type: ignore[return-value]
    return None


def _tanh_input(tanh: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` and the nodes of ``√(2/π) · (x + 0.044715 · x³)`` before the Tanh (as torch exports it)."""
    src = tanh.inputs[0]
    scaled = src.producer() if src is not None else None
    if not is_op(scaled, "Mul") or _sole_user(src) is not tanh:  # type: ignore[arg-type]
        return None
    for inner, c in ((scaled.inputs[0], scaled.inputs[1]), (scaled.inputs[1], scaled.inputs[0])):  # type: ignore[union-attr]
        if not _close(_const(c), math.sqrt(2.0 / math.pi)) or inner is None:
            continue
        add = inner.producer()
        if not is_op(add, "Add") or _sole_user(inner) is not scaled:
            continue
        for x, cubic in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):  # type: ignore[union-attr]
            nodes = _cubic(cubic, x)
            if nodes is not None:
                return x, [*nodes, add, scaled]  # type: ignore[list-item, return-value]
    return None


def _cubic(value: ir.Value | None, x: ir.Value | None) -> list[ir.Node] | None:
    """The nodes of ``0.044715 · x³`` (``Mul(Pow(x, 3), c)`` or ``Mul(x·x·x, c)``)."""
    mul = value.producer() if value is not None else None
    if not is_op(mul, "Mul") or x is None or _sole_user(value) is None:  # type: ignore[arg-type]
        return None
    for cube, c in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):  # type: ignore[union-attr]
        if not _close(_const(c), 0.044715) or cube is None:
            continue
        pow_ = cube.producer()
        if is_op(pow_, "Pow") and pow_.inputs[0] is x and _close(_const(pow_.inputs[1]), 3.0) \
                and _sole_user(cube) is mul:  # type: ignore[union-attr]
            return [pow_, mul]  # type: ignore[list-item]
    return None


def _tail(start: ir.Node, x: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """From Erf/Tanh: ``Add(·, 1)`` then the two Muls with ``x`` and 0.5 (any order); the last node."""
    out = start.outputs[0]
    add = _sole_user(out)
    if not is_op(add, "Add") or not _close(_const(_other(add, out)), 1.0):  # type: ignore[arg-type]
        return None
    u = add.outputs[0]  # type: ignore[union-attr]
    first = _sole_user(u)
    if not is_op(first, "Mul"):
        return None
    k = _other(first, u)  # type: ignore[arg-type]
    if k is x or _close(_const(k), 0.5):  # (u · x) · 0.5  or  (u · 0.5) · x
        second = _sole_user(first.outputs[0])  # type: ignore[union-attr]
        want = 0.5 if k is x else None
        if not is_op(second, "Mul"):
            return None
        k2 = _other(second, first.outputs[0])  # type: ignore[arg-type, union-attr]
        if (want is not None and _close(_const(k2), want)) or (want is None and k2 is x):
            return second, [add, first, second]  # type: ignore[list-item]
        return None
    half = k.producer() if k is not None else None  # (x · 0.5) · u
    if is_op(half, "Mul") and _sole_user(k) is first and _close(_const(_other(half, x)), 0.5):  # type: ignore[arg-type]
        return first, [half, add, first]  # type: ignore[list-item]
    return None


def _fuse(graph: ir.Graph, start: ir.Node, head: tuple[ir.Value, list[ir.Node]] | None, approximate: str) -> bool:
    if head is None:
        return False
    x, before = head
    tail = _tail(start, x)
    if tail is None:
        return False
    last, after = tail
    attrs = {"approximate": approximate} if approximate != "none" else {}
    gelu = ir.node("Gelu", [x], attributes=attrs, name=(start.name or "gelu") + "/Gelu")
    graph.insert_before(last, gelu)
    old = last.outputs[0]
    gelu.outputs[0].name, old.name = old.name, None
    if old.dtype is not None:
        gelu.outputs[0].dtype = old.dtype
    if old.shape is not None:
        gelu.outputs[0].shape = old.shape
    old.replace_all_uses_with(gelu.outputs[0], replace_graph_outputs=True)
    for node in reversed([*before, start, *after]):
        graph.remove(node, safe=True)
    return True
