"""The ``float_op`` rule of :func:`qtrim_fx.onnx.check`: ops an integer-only back end runs in float.

An integer back end (``TargetProfile.integer_only``: the QNN HTP, NPUs) runs an op on integers only
when the op sits in a complete QDQ group: every float input it computes on comes from a
DequantizeLinear (or is a constant), and every float output goes only to QuantizeLinear — with the
activations those back ends fuse into the op before its Q (``Conv -> Relu -> Q``). Anything else is a
*float island*: the HTP runs it in FLOAT_32 with extra conversions around it (5–6× slower on a
Concat -> GlobalAveragePool), an NPU falls back to its CPU. Each island is reported once, naming the op
and the tensor that is not quantized::

    DQ -> Concat -> cat -> GlobalAveragePool -> Q     float_op at Concat (output 'cat' feeds GlobalAveragePool)
                                                      float_op at GlobalAveragePool (input 'cat' is not dequantized)

Shape arithmetic (Shape, Size, integer-typed values) is not computation on activations and is skipped; a
``Shape`` reading a tensor next to its QuantizeLinear does not break the group.

Severity (:func:`island_severity`): an op of a kind the profile's ``activation_sites`` name (LayerNorm,
Softmax, GELU, Add, Concat, pooling, attention MatMul ...: :data:`ONNX_OPS_OF_KIND`) is an ``"error"``,
what ``prepare(..., target=...)`` would have quantized; other ops (data movement, mask arithmetic) are
``"warning"``.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

from qtrim_fx.core.errors import QtrimWarning
from qtrim_fx.core.profiles import GATED_ACTIVATIONS
from qtrim_fx.onnx._graph import const_array, is_op, source_value

__all__ = ["ONNX_OPS_OF_KIND", "FloatOpsWarning", "float_islands", "float_ops_summary", "gate_hint",
           "gated_activation", "island_severity", "prepare_fix"]

_FLOAT = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: ops that read only their input's shape.
_SHAPE_ONLY = ("Shape", "Size", "ConstantOfShape", "EyeLike")
#: activations an integer back end fuses into the op before the output Q (a constant bias Add too).
_FUSED_AFTER = ("Relu", "Clip")
#: the ONNX ops each op kind of ``TargetProfile.activation_sites`` is written as.
ONNX_OPS_OF_KIND: dict[str, tuple[str, ...]] = {
    "layernorm": ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization"),
    "batchnorm": ("BatchNormalization",),
    "softmax": ("Softmax", "LogSoftmax"),
    "activation": ("Gelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "LeakyRelu", "Softplus", "PRelu",
                   "Selu", "Celu", "Mish", "Erf"),
    "relu": ("Relu", "Clip"),
    "add": ("Add",), "sub": ("Sub",), "mul": ("Mul",), "div": ("Div",), "pow": ("Pow",), "erf": ("Erf",),
    "cat": ("Concat",),
    "pool": ("AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum"),
    "maxpool": ("MaxPool", "GlobalMaxPool"),
    "matmul": ("MatMul", "Gemm"), "bmm": ("MatMul",),
}


def island_severity(node: ir.Node, activation_sites: tuple[tuple[str, str], ...]) -> str:
    """``"error"`` for an op of a kind the profile runs on integers (``activation_sites``), else ``"warning"``."""
    kinds = {kind for kind, _ in activation_sites}
    return "error" if any(node.op_type in ONNX_OPS_OF_KIND.get(k, ()) for k in kinds) else "warning"


def gated_activation(node: ir.Node) -> str | None:
    """The :data:`~qtrim_fx.core.profiles.GATED_ACTIVATIONS` entry ``node`` is part of (``"silu"`` for the
    ``Sigmoid`` or the ``Mul`` of ``Mul(x, Sigmoid(x))``), else None: the same table ``prepare`` decomposes by."""
    gates = {op: name for name, (op, _) in GATED_ACTIVATIONS.items()}
    if is_op(node, "Mul") and len(node.inputs) == 2:
        for gate, x in (node.inputs, node.inputs[::-1]):
            src = gate.producer() if gate is not None else None
            if src is not None and src.op_type in gates and src.inputs and src.inputs[0] is x:
                return gates[src.op_type]
        return None
    if node.op_type in gates and node.inputs and any(
            gated_activation(user) == gates[node.op_type] for user, _ in node.outputs[0].uses()):
        return gates[node.op_type]
    return None


def gate_hint(node: ir.Node) -> str:
    """For ``check``'s fix: what a float gate is (``""`` for other ops)."""
    gated = gated_activation(node)
    return (f" (this is {gated} written as x * its gate: prepared for the target, the gate gets its own site)"
            if gated else "")

def _is_float(value: ir.Value | None, seen: set[ir.Value] | None = None) -> bool:
    """Float-typed; a value of unknown type is float when its producer computes on a float input."""
    if value is None:
        return False
    if value.dtype is not None:
        return value.dtype in _FLOAT
    src = value.producer()
    if src is None or is_op(src, *_SHAPE_ONLY, "QuantizeLinear"):
        return False
    if is_op(src, "DequantizeLinear"):
        return True
    seen = set() if seen is None else seen
    if value in seen:
        return False
    seen.add(value)
    return any(_is_float(v, seen) for v in src.inputs[:1])


def _quantized_input(value: ir.Value) -> bool:
    """Comes from a DQ, is a constant, or is a fused activation's input (checked at the activation)."""
    if const_array(value) is not None:
        return True
    return is_op(value.producer(), "DequantizeLinear")


def _constant_operand(node: ir.Node, value: ir.Value) -> bool:
    """``node`` is an Add of ``value`` and a constant (or a dequantized constant): a bias."""
    if not is_op(node, "Add") or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    if other is None or other is value:
        return False
    src = other.producer()
    return const_array(other) is not None or (is_op(src, "DequantizeLinear") and const_array(src.inputs[0]) is not None)


def _follower(user: ir.Node, value: ir.Value) -> bool:
    return is_op(user, *_FUSED_AFTER) or _constant_operand(user, value)


def _to_q(value: ir.Value, depth: int = 0) -> bool:
    """Read only by QuantizeLinear, possibly through a fused bias Add and/or Relu/Clip read only by Q."""
    uses = value.uses()
    if value.is_graph_output() or not uses:
        return False
    if all(is_op(user, *_SHAPE_ONLY) for user, _ in uses):
        return False
    for user, _ in uses:
        if is_op(user, "QuantizeLinear", *_SHAPE_ONLY):
            continue
        if depth < 2 and len(uses) == 1 and _follower(user, value) and _to_q(user.outputs[0], depth + 1):
            continue
        return False
    return True


def _fused_activation(node: ir.Node) -> bool:
    """A bias Add or Relu/Clip right after a computing op whose only reader it is, ending in a Q (one group)."""
    x = next((v for v in node.inputs if v is not None and not _quantized_input(v)), None)
    if x is None or not _follower(node, x):
        return False
    src = x.producer()
    return src is not None and not is_op(src, *_QDQ) and len(x.uses()) == 1 and _to_q(node.outputs[0], 1)


_NORMS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")


def _float_norm_param(node: ir.Node, float_bias: bool = False) -> str | None:
    """A normalization whose scale (γ) or bias (β) is a float constant: the QNN HTP then runs it in FLOAT_32
    (it wants γ dequantized from uint8 and β from int32, as ONNX Runtime's QNN recipe writes them). With
    ``float_bias`` (a profile whose back end takes float biases, ``bias="float"``: it quantizes them itself, as
    it does a Conv's) a float β is accepted; γ still needs its DequantizeLinear."""
    if not is_op(node, *_NORMS):
        return None
    for index, what in ((1, "scale"), (2, "bias"))[:1 if float_bias else 2]:
        v = node.inputs[index] if len(node.inputs) > index else None
        if v is not None and _is_float(v) and not is_op(v.producer(), "DequantizeLinear"):
            return f"{what} {v.name!r} is a float constant, not dequantized (uint8 scale, int32 bias)"
    return None


def _float_scalar_operand(node: ir.Node) -> str | None:
    """An elementwise op on a dequantized tensor and a float constant: not an integer op for the QNN HTP (the
    constant needs its own DequantizeLinear; qtrim_fx writes a scalar as one exact code). A ``Pow``'s constant
    exponent too: the HTP then runs a FLOAT_32 power between conversions."""
    if not is_op(node, "Add", "Mul", "Sub", "Div", "Pow") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for const, other in ((a, b), (b, a)):
        if const is None or other is None or not is_op(other.producer(), "DequantizeLinear") \
                or is_op(const.producer(), "DequantizeLinear"):
            continue
        # the value's type and shape only: reading a constant's data (even a Constant node's attribute) would
        # re-encode it in a file being written
        src = source_value(const)
        if not (src.is_initializer() or is_op(src.producer(), "Constant")) or not _is_float(const):
            continue
        dims = list(const.shape) if const.shape is not None else None
        scalar = dims is not None and all(isinstance(d, int) and d == 1 for d in dims)
        what = "a float constant" if scalar or dims is None else f"a float constant tensor {dims}"
        role = "exponent" if is_op(node, "Pow") and const is b else "operand"
        return f"{role} {const.name!r} is {what}, not dequantized"
    return None


def _float_table(node: ir.Node) -> str | None:
    """A lookup in a float constant table: the QNN HTP runs it in FLOAT_32 (with default options it cannot even
    finalize ``Gather(float table) -> Q``: MEM_ALLOC 1002); it wants ``DQ(uint8 table) -> Gather -> Q``."""
    if not is_op(node, "Gather", "GatherElements", "GatherND") or not node.inputs or node.inputs[0] is None:
        return None
    table = node.inputs[0]
    src = source_value(table)
    if not (src.is_initializer() or is_op(src.producer(), "Constant")) or not _is_float(table):
        return None
    return f"table {table.name!r} is a float constant, not dequantized (uint8 table + DequantizeLinear)"


def float_islands(graph: ir.Graph, float_bias: bool = False) -> Iterator[tuple[ir.Node, str]]:
    """Each op of ``graph`` that an integer-only back end would run in float, with the reason (``float_bias``:
    the back end takes float biases, so a normalization's float β is not one)."""
    for node in graph.all_nodes():
        if is_op(node, *_QDQ, *_SHAPE_ONLY, "Constant") or node.op_type == "Identity":
            continue
        inputs = [v for v in node.inputs if _is_float(v)]
        outputs = [v for v in node.outputs if _is_float(v)]
        if not inputs and not outputs:
            continue
        if _fused_activation(node):
            continue
        bad_param = _float_norm_param(node, float_bias) or _float_scalar_operand(node) or _float_table(node)
        if bad_param is not None:
            yield node, bad_param
            continue
        bad_in = next((v for v in inputs if not _quantized_input(v)), None)
        if bad_in is not None:
            src = bad_in.producer()
            where = f"from {src.op_type}" if src is not None else "a graph input"
            yield node, f"input {bad_in.name!r} ({where}) is not dequantized"
            continue
        bad_out = next((v for v in outputs if not _to_q(v)), None)
        if bad_out is not None:
            readers = sorted({u.op_type for u, _ in bad_out.uses()})
            where = "is a graph output" if bad_out.is_graph_output() else f"feeds {', '.join(readers) or 'nothing'}"
            yield node, f"output {bad_out.name!r} {where} without a QuantizeLinear"


class FloatOpsWarning(QtrimWarning):
    """An export to an integer-only target keeps ops in float (``float_op``); the file is correct, but slower there."""


def prepare_fix(target: str) -> str:
    """The fix for float ops of a model not prepared for an integer-only ``target``."""
    return (f"prepare the model with qtrim_fx.prepare(model, ..., target={target!r}) (or QuantConfig(target="
            f"{target!r})) and train or calibrate it, so these tensors get trained Q/DQ sites")


def float_ops_summary(violations: list, target: str, fix: str | None = None, shown: int = 6) -> str:
    """One message for the ``float_op`` violations of an export: how many, which ops, and the fix (``fix``:
    the caller knows it, e.g. an opset too old to write an op as one integer op)."""
    errors = [v for v in violations if v.severity == "error"]
    ops = sorted({v.message.split(" ", 1)[0] for v in violations})
    listed = errors or violations
    names = ", ".join(f"{v.message.split(' ', 1)[0]} {v.node!r}" for v in listed[:shown])
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    if errors and len(errors) < len(violations):
        more += f" (+ {len(violations) - len(errors)} other op(s))"
    fix = fix or (prepare_fix(target) if errors else "qtrim_fx.onnx.check lists each with the tensor that lacks a Q/DQ")
    return (f"target {target!r} is integer-only but {len(violations)} op(s) of the file run in float "
            f"({', '.join(ops)}): {names}{more}. The file computes the model correctly; on the back end they "
            f"run in FLOAT_32 or on its CPU. Fix: {fix}")
