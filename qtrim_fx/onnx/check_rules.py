"""The rules of :func:`qtrim_fx.onnx.check`: each a small function ``(RuleContext) -> violations``.

A :class:`Violation` names the rule, the node and what to change. ``severity="error"`` means the
target rejects the file or computes something else than intended; ``"warning"`` means it runs but
misses integer kernels or stores more than needed. :data:`RULES` lists them in the order they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import PER_CHANNEL_MIN_OPSET, TargetProfile
from qtrim_fx.onnx._graph import (
    QDQParams,
    const_array,
    dequantizes_constant,
    is_op,
    qdq_params,
    reaches_only_outputs,
    value_rank,
)
from qtrim_fx.onnx.check_islands import float_islands, gate_hint, island_severity

__all__ = ["RULES", "RuleContext", "Violation", "quantized_ops"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops whose inputs TensorRT-style placement quantizes (a Q feeding only these is an input Q).
_INPUT_QUANTIZED = (*_WEIGHTED, "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean")
#: ops ONNX Runtime fuses between a weighted op and its output Q.
_FUSED_AFTER = ("Relu", "Clip")


@dataclass(frozen=True)
class Violation:
    """One broken rule.

    Attributes:
        rule: rule id (see the module docstring).
        node: the offending node's name (``<model>`` for model-level rules).
        message: what is wrong and how to fix it.
        severity: ``"error"`` (rejected or wrong) or ``"warning"`` (runs, but not as intended).
    """

    rule: str
    node: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule} at {self.node}: {self.message}"


@dataclass(frozen=True)
class RuleContext:
    """What a rule sees: the parsed model and the target profile."""

    model: ir.Model
    profile: TargetProfile

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return self.model.opset_imports.get("", 1)

    def qdq_nodes(self) -> Iterator[tuple[ir.Node, QDQParams | None]]:
        for node in self.graph.all_nodes():
            if is_op(node, *_QDQ):
                yield node, qdq_params(node, value_rank(node.inputs[0]))


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


# -- rules -----------------------------------------------------------------------------------
def quantized_ops(ctx: RuleContext) -> Iterator[Violation]:
    if not any(is_op(node, *_QDQ) for node in ctx.graph.all_nodes()):
        yield Violation("no_quantized_op", "<model>", "the model has no QuantizeLinear/DequantizeLinear: it is "
                        "a float model and every target runs it in float; check the QDQ export instead "
                        "(qtrim_fx.export_onnx, or onnxruntime quantize_static with QuantFormat.QDQ)")


def _smallest_normal(dtype: np.dtype) -> float:
    """The smallest positive normal number of a scale's float type (bfloat16 has float32's range)."""
    if dtype.kind == "f":
        return float(np.finfo(dtype).tiny)
    return float(np.finfo(np.float32).tiny)


def _scale_values(ctx: RuleContext) -> Iterator[Violation]:
    for node, p in ctx.qdq_nodes():
        if p is None or p.scale.size == 0:
            continue
        try:
            scale = p.scale.astype(np.float64).reshape(-1)
        except (TypeError, ValueError):
            continue  # not a float scale: onnx.checker's type check reports it
        tiny = _smallest_normal(p.scale.dtype)
        bad = ~np.isfinite(scale) | (scale <= 0.0) | (scale < tiny)
        if not bad.any():
            continue
        i = int(np.flatnonzero(bad)[0])
        s = float(scale[i])
        what = ("not finite" if not np.isfinite(s) else "zero" if s == 0.0 else "negative" if s < 0.0
                else f"subnormal (below {tiny:.3g}, the smallest normal {p.scale.dtype})")
        where = f"scale {s:g}" if scale.size == 1 else f"{int(bad.sum())} of {scale.size} channel scales, e.g. " \
            f"channel {i} = {s:g},"
        yield Violation("scale_value", _name(node), f"{where} is {what}: Q/DQ divide by it and multiply by it, so "
                        "the result is inf, NaN or garbage; a scale must be positive, finite and normal — "
                        "re-calibrate (an all-zero tensor needs a floor on its scale, e.g. 1e-8)")


#: a grid wider than this (scale x number of steps) is reported: ranges of trained activations stay far below
MAX_GRID_SPAN = 1e6
#: ... and one reaching float32's end (±3.4e38) is an error: only a mask's ``finfo.min`` or a clamped infinity
BROKEN_GRID_SPAN = 1e38


def _scale_spans(ctx: RuleContext) -> Iterator[Violation]:
    """A grid so wide that ordinary values all round to its zero point (``finfo.min`` masks calibrated in).

    Above :data:`MAX_GRID_SPAN` a warning: a model may hold such values (a diverging random-init net reaches
    1e30), a -1e9 mask calibrated in looks the same. Above :data:`BROKEN_GRID_SPAN` an error: the grid reaches
    float32's end, where only ``finfo.min`` / ``finfo.max`` (masks) or clamped infinities lie.
    """
    for node, p in ctx.qdq_nodes():
        if p is None or p.storage is None or p.storage.bits > 16 or p.scale.size == 0:
            continue
        with np.errstate(all="ignore"):
            scale = np.abs(p.scale.astype(np.float64).reshape(-1))
        steps = float(2 ** p.storage.bits - 1)
        span = scale * steps
        wide = np.isfinite(span) & (span > MAX_GRID_SPAN)
        if not wide.any():
            continue
        i = int(np.argmax(np.where(wide, span, 0.0)))
        broken = span[i] > BROKEN_GRID_SPAN
        where = f"scale {scale[i]:.3g}" if scale.size == 1 else f"channel {i}'s scale {scale[i]:.3g}"
        why = ("that is float32's end: the range was calibrated over a mask's finfo.min, a clamped infinity or a "
               "diverged model"
               if broken else f"trained activations stay far below {MAX_GRID_SPAN:g}, so unless the tensor really "
               "holds values this large the range was calibrated over a mask (-1e9, finfo.min) or diverging values")
        yield Violation("scale_range", _name(node), f"{where} spans {span[i]:.3g} over {int(steps)} {p.storage.name} "
                        f"steps: every value smaller than {scale[i] / 2:.3g} in magnitude rounds to the zero point; "
                        f"{why} — re-calibrate without them (qtrim_fx bounds masked attention scores)",
                        "error" if broken else "warning")


def _qdq_pairs(ctx: RuleContext) -> Iterator[Violation]:
    """A DequantizeLinear reading a QuantizeLinear must read the codes on the grid they were written on."""
    for node, p in ctx.qdq_nodes():
        if not is_op(node, "DequantizeLinear") or p is None or node.inputs[0] is None:
            continue
        q = node.inputs[0].producer()
        if q is None or not is_op(q, "QuantizeLinear"):
            continue
        qp = qdq_params(q, value_rank(q.inputs[0]))
        if qp is None:
            continue
        # compared flat: a scale of shape (1,) on one side and () on the other is the same grid
        scale_q, scale_d = qp.scale.astype(np.float64).reshape(-1), p.scale.astype(np.float64).reshape(-1)
        if not (np.all(np.isfinite(scale_q)) and np.all(np.isfinite(scale_d))):
            continue  # scale_value names it
        same_scale = scale_q.size == scale_d.size and bool(np.allclose(scale_q, scale_d, rtol=1e-6, atol=0.0))
        # an absent zero point is 0 (the spec's default)
        zp_q = np.zeros(scale_q.size, np.int64) if qp.zero_point is None else qp.zero_point.astype(np.int64).reshape(-1)
        zp_d = np.zeros(scale_d.size, np.int64) if p.zero_point is None else p.zero_point.astype(np.int64).reshape(-1)
        same_zp = zp_q.size == zp_d.size and bool(np.array_equal(zp_q, zp_d))
        same_axis = qp.axis == p.axis or scale_d.size == 1
        if same_scale and same_zp and same_axis:
            continue
        if not same_scale and scale_q.size == 1 and scale_d.size == 1:
            what = (f"scale {scale_q[0]:.6g} (QuantizeLinear) vs {scale_d[0]:.6g} (DequantizeLinear): every value "
                    f"comes out multiplied by {scale_d[0] / scale_q[0]:.4g}")
        elif not same_scale:
            what = f"scales differ ({scale_q.size} vs {scale_d.size} entries): values come out rescaled"
        elif not same_zp:
            what = f"zero points differ ({zp_q[:4].tolist()} vs {zp_d[:4].tolist()}): values come out shifted"
        else:
            what = f"per-channel axes differ ({qp.axis} vs {p.axis}): channels come out on other channels' scales"
        yield Violation("qdq_pair_mismatch", _name(node), f"reads {_name(q)!r} on another grid — {what}; a Q/DQ "
                        "pair must share scale, zero point and axis (a runtime that fuses the pair drops the "
                        "difference, one that does not applies it): give both the same parameters")


def _dq_scale(value: ir.Value | None) -> np.ndarray | None:
    """The scale of the DequantizeLinear producing ``value`` (float64, flat), else ``None``."""
    node = value.producer() if value is not None else None
    if node is None or not is_op(node, "DequantizeLinear"):
        return None
    p = qdq_params(node, value_rank(node.inputs[0]))
    return None if p is None else p.scale.astype(np.float64).reshape(-1)


def _bias_grids(ctx: RuleContext) -> Iterator[Violation]:
    """An int32 bias must sit on the grid input scale x weight scale, zero point 0.

    Fused integer kernels (ONNX Runtime's QLinearConv, QNN's Conv) add the int32 codes to the int32
    accumulator as they are, whatever scale the bias's DequantizeLinear says: a bias on another grid
    is one model without graph optimizations and another with them.
    """
    for node in ctx.graph.all_nodes():
        if not is_op(node, "Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        dq = node.inputs[2].producer()
        if dq is None or not is_op(dq, "DequantizeLinear"):
            continue
        p = qdq_params(dq, value_rank(dq.inputs[0]))
        codes = const_array(dq.inputs[0])
        if p is None or codes is None or codes.dtype != np.int32:
            continue
        sx, sw = _dq_scale(node.inputs[0]), _dq_scale(node.inputs[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        want = sx * sw
        have = p.scale.astype(np.float64).reshape(-1)
        if have.size not in (1, want.size) or not np.all(np.isfinite(have)):
            continue
        zp = p.zero_point
        if zp is not None and np.any(zp.astype(np.int64) != 0):
            yield Violation("bias_grid", _name(dq), f"int32 bias of {node.op_type} {_name(node)!r} has zero point "
                            f"{zp.astype(np.int64).reshape(-1)[:4].tolist()}; fused kernels take it as 0: write 0")
            continue
        if want.size > 1 and have.size == 1:
            have = np.broadcast_to(have, want.shape)
        rel = np.abs(have - want) / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
        if float(rel.max()) > 1e-5:
            i = int(np.argmax(rel))
            yield Violation("bias_grid", _name(dq), f"int32 bias of {node.op_type} {_name(node)!r} has scale "
                            f"{have[i]:.6g} where input scale x weight scale is {want[i]:.6g}"
                            f"{f' (channel {i})' if want.size > 1 else ''}: fused integer kernels add the codes "
                            "on the input x weight grid regardless, so the file computes one bias without graph "
                            "optimizations and another with them; quantize the bias with that scale")


#: ops between a stored weight and the op that reads it that change its layout, not its values.
_LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")


def _float_constant(value: ir.Value | None, depth: int = 0) -> bool:
    """``value`` is a float constant (an initializer / Constant, through layout ops), not a dequantized one."""
    if value is None or depth > 6:
        return False
    node = value.producer()
    if node is None or is_op(node, "Constant"):
        array = const_array(value)
        return array is not None and array.dtype.kind == "f" and array.size > 1
    if is_op(node, *_LAYOUT_OPS) and node.inputs:
        return _float_constant(node.inputs[0], depth + 1)
    return False


def _float_weights(ctx: RuleContext) -> Iterator[Violation]:
    """A Conv / ConvTranspose / Gemm / MatMul of a quantized file whose weight is stored in float."""
    prof = ctx.profile
    if not any(is_op(n, *_QDQ) for n in ctx.graph.all_nodes()):
        return  # a float model: quantized_ops says so once
    for node in ctx.graph.all_nodes():
        if not is_op(node, *_WEIGHTED):
            continue
        slots = (0, 1) if is_op(node, "MatMul", "Gemm") else (1,)
        for i in slots:
            if i < len(node.inputs) and _float_constant(node.inputs[i]):
                where = ("runs in float on an integer-only target (the back end converts around it or runs it on its "
                         "CPU)" if prof.integer_only else "cannot run as an integer kernel: the op stays float")
                yield Violation("weight_float", _name(node), f"{node.op_type}'s weight {node.inputs[i].name!r} is "
                                f"stored in float, not through a DequantizeLinear: it {where}; quantize it (a "
                                "qtrim_fx export quantizes every weight unless an Override excludes the layer)",
                                "error" if prof.integer_only else "warning")
                break


def _weight_codes(ctx: RuleContext) -> Iterator[Violation]:
    """Stored weight codes: all zero (the op outputs its bias only), or -2^(b-1) on a narrow-range target."""
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is None or p.storage is None or not is_op(node, "DequantizeLinear") or \
                _gather_table(node) or _norm_scale(node) or p.storage.bits > 8:
            continue
        offset = 0 if p.storage.signed else _unsigned_weight_zero(prof, p)
        codes = const_array(node.inputs[0])
        if offset is None or codes is None or codes.size < 2 or not np.issubdtype(codes.dtype, np.integer):
            continue
        codes = codes.astype(np.int64) - offset  # unsigned weights: the codes around their zero point
        users = [u for u, _ in node.outputs[0].uses()]
        if not any(is_op(u, *_WEIGHTED) for u in users):
            continue
        if not np.any(codes):
            yield Violation("weight_all_zero", _name(node), f"every one of the {codes.size} weight codes is 0: "
                            f"{', '.join(sorted({u.op_type for u in users}))} outputs its bias only; the weight "
                            "was lost (a scale far above the weights' range, a broken file) or the layer is still at a zero "
                            "initialisation — train it or re-export",
                            "warning")
        elif prof.weight_narrow and np.any(codes.astype(np.int64) == -(2 ** (p.storage.bits - 1))):
            n = int(np.sum(codes.astype(np.int64) == -(2 ** (p.storage.bits - 1))))
            yield Violation("weight_narrow_range", _name(node), f"{n} weight code(s) are "
                            f"{-(2 ** (p.storage.bits - 1))}; target {prof.name!r} takes symmetric weights on "
                            f"[-{2 ** (p.storage.bits - 1) - 1}, {2 ** (p.storage.bits - 1) - 1}] (u8 x s8 kernels "
                            "without VNNI can saturate on the extra code): clamp the codes", "warning")


def _unsigned_weight_zero(prof: TargetProfile, p: QDQParams) -> int | None:
    """The zero point of a profile's unsigned weight storage (``unsigned_weights``: 2^(b-1), the symmetric grid
    shifted), when ``p`` is one: uint8 codes around it; else None."""
    if not prof.unsigned_weights or p.storage is None or p.storage.signed or p.zero_point is None:
        return None
    zero = 2 ** (p.storage.bits - 1)
    return zero if np.all(p.zero_point.astype(np.int64) == zero) else None


def _runtime_qparams(ctx: RuleContext) -> Iterator[Violation]:
    """A scale or zero point computed at run time (dynamic quantization) is no static QDQ grid."""
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is not None or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        which = "scale" if const_array(node.inputs[1]) is None else "zero point"
        src = (node.inputs[1] if which == "scale" else node.inputs[2]).producer()
        made = f" (made by {src.op_type} {_name(src)!r})" if src is not None else " (a graph input)"
        effect = (f"target {prof.name!r} takes only constant Q/DQ parameters" if prof.constant_qparams
                  else "the back end cannot fuse it into an integer kernel and runs the op in float")
        yield Violation("runtime_qparams", _name(node), f"its {which} is computed at run time{made}: {effect}; "
                        "check cannot judge this grid either — export static Q/DQ (constant scale and zero point, "
                        "e.g. qtrim_fx.export_onnx after calibrate)", "error" if prof.constant_qparams else "warning")


def _channel_counts(ctx: RuleContext) -> Iterator[Violation]:
    """A per-channel scale needs one entry per channel of the quantized axis."""
    for node, p in ctx.qdq_nodes():
        if p is None or not p.per_channel or p.axis is None or node.inputs[0] is None:
            continue
        arr = const_array(node.inputs[0])
        shape = arr.shape if arr is not None else node.inputs[0].shape
        if shape is None or not (-len(shape) <= p.axis < len(shape)):
            continue
        dim = shape[p.axis]
        if not isinstance(dim, int) and getattr(dim, "value", None) is not None:
            dim = dim.value
        if isinstance(dim, int) and p.scale.size != dim and "block_size" not in dict(p.extra):
            yield Violation("scale_channels", _name(node), f"{p.scale.size} per-channel scales for axis {p.axis} "
                            f"of size {dim}: runtimes refuse it — one scale (and zero point) per channel")


def _non_standard_ops(ctx: RuleContext) -> Iterator[Violation]:
    for node in ctx.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            yield Violation("non_standard_op", _name(node), f"{node.domain}::{node.op_type} is not a default-"
                            "domain op; standard runtimes cannot load it (re-export with qtrim_fx)")


def _zero_points(ctx: RuleContext) -> Iterator[Violation]:
    for node, _ in ctx.qdq_nodes():
        if len(node.inputs) < 3 or node.inputs[2] is None:
            yield Violation("zero_point_missing", _name(node), "write an explicit zero point: without one "
                            "QuantizeLinear outputs uint8 by the spec while TensorRT assumes int8")


def _qparam_shapes(ctx: RuleContext) -> Iterator[Violation]:
    for node, p in ctx.qdq_nodes():
        if p is None:
            continue
        if p.axis is None and p.scale.ndim != 0:
            yield Violation("scale_not_scalar", _name(node), f"per-tensor scale has shape {p.scale.shape}; "
                            "make it 0-D (ONNX Runtime's QLinear kernels require scalars)")
        if p.zero_point is not None and p.zero_point.shape != p.scale.shape:
            yield Violation("zero_point_shape", _name(node), f"zero point shape {p.zero_point.shape} differs "
                            f"from scale shape {p.scale.shape}; they must match")


_NORMS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
_ELEMENTWISE_OPS = ("Add", "Mul", "Sub", "Div", "Pow")


def _gather_table(node: ir.Node) -> bool:
    """A DQ of a constant read only as a ``Gather``'s data: a lookup table (an activation grid, or a weight's)."""
    if not is_op(node, "DequantizeLinear") or not dequantizes_constant(node):
        return False
    uses = node.outputs[0].uses()
    return bool(uses) and all(is_op(user, "Gather") and index == 0 for user, index in uses)


def _norm_scale(node: ir.Node) -> bool:
    """A DQ of a constant read only as a LayerNormalization's scale (γ), or as an operand of Add/Mul/Sub/Div/Pow
    or Concat (a scalar: one exact code, a Pow's exponent too; a parameter such as a position embedding,
    ``x + DQ(pos_embed)``): stored on the activation grid (what QNN takes), not a weight."""
    if not is_op(node, "DequantizeLinear") or not dequantizes_constant(node):
        return False
    uses = node.outputs[0].uses()
    return bool(uses) and all((is_op(user, *_NORMS) and index == 1) or is_op(user, *_ELEMENTWISE_OPS, "Concat")
                              for user, index in uses)


def _activation_grids(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is None or p.storage is None or (dequantizes_constant(node) and not (_gather_table(node)
                                                                                 or _norm_scale(node))):
            continue
        if _gather_table(node) and p.storage.name in prof.weight_dtypes and (
                p.zero_point is None or not np.any(p.zero_point.astype(np.int64) != 0)):
            continue  # a table stored on the weight grid
        if p.storage.name not in prof.activation_dtypes:
            yield Violation("activation_dtype", _name(node), f"activation stored as {p.storage.name}; target "
                            f"{prof.name!r} takes {', '.join(prof.activation_dtypes)}")
        elif prof.activation_symmetric and p.zero_point is not None:
            want = 0 if p.storage.signed else 2 ** (p.storage.bits - 1)
            if np.any(p.zero_point.astype(np.int64) != want):
                yield Violation("activation_zero_point", _name(node), f"target {prof.name!r} needs symmetric "
                                f"activations (zero point {want}), found {p.zero_point.astype(np.int64).tolist()}")


def _weight_grids(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is None or p.storage is None or not dequantizes_constant(node) or _gather_table(node) \
                or _norm_scale(node):
            continue
        if is_op(node, "QuantizeLinear"):
            if prof.weight_storage == "integer":
                yield Violation("weight_float_storage", _name(node), "float weight + QuantizeLinear: store "
                                "the integer codes as an initializer feeding DequantizeLinear", "warning")
            continue
        if p.storage.name not in prof.weight_dtypes and p.storage.name != "int4":  # int4: _narrow_types
            yield Violation("weight_dtype", _name(node), f"weight stored as {p.storage.name}; target "
                            f"{prof.name!r} takes {', '.join(prof.weight_dtypes)}")
        want = 0 if p.storage.signed or not prof.unsigned_weights else 2 ** (p.storage.bits - 1)
        if p.zero_point is not None and np.any(p.zero_point.astype(np.int64) != want):
            yield Violation("weight_zero_point", _name(node), f"weights must be symmetric (zero point {want}"
                            f"{' for ' + p.storage.name + ' storage' if want else ''})")


def _expected_axis(consumer: ir.Node, rank: int, prof: TargetProfile) -> int | None:
    axes = prof.weight_axes
    if consumer.op_type == "Conv":
        axis = axes.conv
    elif consumer.op_type == "ConvTranspose":
        axis = axes.conv_transpose
    elif consumer.op_type == "Gemm":
        trans_b = "transB" in consumer.attributes and consumer.attributes["transB"].as_int()
        axis = axes.linear % 2 if trans_b else 1 - axes.linear % 2
    elif consumer.op_type == "MatMul":
        axis = axes.matmul
    else:
        return None
    return axis % rank


def _weight_axes(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is None or not p.per_channel or not is_op(node, "DequantizeLinear") or not dequantizes_constant(node):
            continue
        if not prof.weight_per_channel:
            yield Violation("weight_per_channel", _name(node), f"target {prof.name!r} takes per-tensor weights "
                            "only; export with one scale per weight")
            continue
        rank = value_rank(node.inputs[0]) or value_rank(node.outputs[0])
        for user, index in node.outputs[0].uses():
            want = _expected_axis(user, rank, prof) if rank and index == 1 and is_op(user, *_WEIGHTED) else None
            if want is not None and p.axis is not None and p.axis % rank != want:
                yield Violation("weight_axis", _name(node), f"per-channel axis {p.axis} feeding {user.op_type} "
                                f"{_name(user)!r}; target {prof.name!r} needs axis {want} (output channel)")


def _softmax(ctx: RuleContext) -> Iterator[Violation]:
    if ctx.profile.integer_attention_scores:
        return  # the back end runs softmax on integers (QNN HTP): a quantized softmax is what it wants
    for node in ctx.graph.all_nodes():
        if is_op(node, "DequantizeLinear") and any(is_op(u, "Softmax") for u, _ in node.outputs[0].uses()):
            yield Violation("softmax_quantized", _name(node), "DequantizeLinear feeds Softmax: attention scores "
                            "stay float; remove the Q/DQ before Softmax")
        src = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if is_op(node, "QuantizeLinear") and is_op(src, "Softmax"):
            yield Violation("softmax_quantized", _name(node), "QuantizeLinear on a Softmax output: attention "
                            "probabilities stay float; remove it")


def _has_weight_dq(node: ir.Node) -> bool:
    """A Conv/ConvTranspose/Gemm/MatMul whose second input is a dequantized constant."""
    weight = node.inputs[1] if is_op(node, *_WEIGHTED) and len(node.inputs) > 1 else None
    dq = weight.producer() if weight is not None else None
    return dq is not None and is_op(dq, "DequantizeLinear") and dequantizes_constant(dq)


def _output_chain(node: ir.Node) -> list[ir.Value]:
    """The op's output, then through single-user Relu/Clip/bias-Add (what ORT fuses before a Q)."""
    chain = [node.outputs[0]]
    while len(chain[-1].uses()) == 1:
        user = chain[-1].uses()[0][0]
        bias_add = is_op(user, "Add") and any(const_array(v) is not None for v in user.inputs)
        if not (is_op(user, *_FUSED_AFTER) or bias_add) or not user.outputs or user.outputs[0] in chain:
            break  # (a value already in the chain: a cycle, which only an invalid model has)
        chain.append(user.outputs[0])
    return chain


def _output_qs(node: ir.Node) -> list[tuple[ir.Node, bool]]:
    """(Q, whether it sits past the op's activation) for every Q on the op's output chain."""
    chain = _output_chain(node)
    return [(u, any(is_op(c.producer(), *_FUSED_AFTER) for c in chain[1 : k + 1]))
            for k, v in enumerate(chain) for u, i in v.uses() if i == 0 and is_op(u, "QuantizeLinear")]


#: ops that move data without computing on it; a Q read through them still feeds the op after them.
_VIEWS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather")


def _readers(value: ir.Value, depth: int = 0) -> list[ir.Node]:
    """The nodes that read ``value``, looking through view ops and the Q → DQ pairs after them (a few levels)."""
    out = []
    for user, _ in value.uses():
        if is_op(user, *_VIEWS) and user.outputs and depth < 4:
            out += [r for o in user.outputs for r in _readers(o, depth + 1)]
        elif depth and is_op(user, "QuantizeLinear") and depth < 4:  # a view's output re-quantized
            out += [r for dq, _ in user.outputs[0].uses() if is_op(dq, "DequantizeLinear")
                    for r in _readers(dq.outputs[0], depth + 1)]
        else:
            out.append(user)
    return out


def _is_input_q(q: ir.Node, after_activation: bool) -> bool:
    """This Q quantizes a tensor the target quantizes anyway, as an input of a later op.

    The same rule as lowering's (a site with role ``"input"``), so ``export`` and ``check`` agree:
    some reader of its DQs (through views) quantizes its inputs (Conv, Gemm, MatMul, pooling), or,
    once past the op's activation (Conv → ReLU → Q), an Add or Concat reads it. A Q directly on a
    Conv output read only by a residual Add blocks Conv+Add fusion.
    """
    dqs = [u for u, _ in q.outputs[0].uses()]
    if not dqs or not all(is_op(dq, "DequantizeLinear") for dq in dqs):
        return False
    wanted = (*_INPUT_QUANTIZED, "Add", "Concat") if after_activation else _INPUT_QUANTIZED
    return any(is_op(u, *wanted) for dq in dqs for u in _readers(dq.outputs[0]))


def _op_outputs(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    if not prof.enforce_op_outputs:
        return
    for node in ctx.graph:
        if not _has_weight_dq(node):
            continue
        qs = _output_qs(node)
        if prof.quantize_op_outputs and not qs and not reaches_only_outputs(node.outputs[0]):
            yield Violation("op_output_not_quantized", _name(node), f"target {prof.name!r} needs a Q/DQ on "
                            f"the {node.op_type} output to run it as an integer kernel; it stays float",
                            "warning")
        elif not prof.quantize_op_outputs and any(not _is_input_q(q, after) for q, after in qs):
            yield Violation("op_output_quantized", _name(node), f"target {prof.name!r} quantizes op inputs "
                            f"only; the Q on this {node.op_type} output blocks fusion (e.g. Conv+Add)", "warning")


def _op_inputs(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    if not (prof.enforce_op_outputs and prof.quantize_op_outputs):
        return
    for node in ctx.graph:
        if not _has_weight_dq(node) or node.inputs[0] is None:
            continue
        if not is_op(node.inputs[0].producer(), "DequantizeLinear"):
            yield Violation("op_input_not_dequantized", _name(node), f"target {prof.name!r} needs a "
                            f"DequantizeLinear right before the {node.op_type} data input (nothing in "
                            "between) to run it as an integer kernel; it stays float", "warning")


def _versions(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    if ctx.opset > prof.max_opset:
        yield Violation("opset_too_new", "<model>", f"opset {ctx.opset} > {prof.max_opset}, the newest target "
                        f"{prof.name!r} parses; re-export with opset <= {prof.max_opset}")
    if ctx.model.ir_version > prof.ir_version:
        yield Violation("ir_version", "<model>", f"IR version {ctx.model.ir_version} > {prof.ir_version}; "
                        "runtimes may refuse it (ONNX Runtime 1.31 loads <= 13); set model.ir_version")
    per_channel = [n for n, p in ctx.qdq_nodes() if p is not None and p.per_channel]
    if per_channel and ctx.opset < PER_CHANNEL_MIN_OPSET:
        yield Violation("opset_per_channel", _name(per_channel[0]), f"per-channel Q/DQ need opset >= "
                        f"{PER_CHANNEL_MIN_OPSET}, the model has {ctx.opset}")


def _narrow_types(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    for node, p in ctx.qdq_nodes():
        if p is None or p.storage is None or p.storage.bits == 8:
            continue
        if p.storage.min_opset > ctx.opset:
            yield Violation("int4_opset", _name(node), f"{p.storage.name} Q/DQ need opset >= "
                            f"{p.storage.min_opset}, the model has {ctx.opset}")
        if p.storage.bits == 4 and not prof.allow_int4:
            yield Violation("int4_not_allowed", _name(node), f"target {prof.name!r} does not run INT4; "
                            "quantize this tensor to 8 bits")


def _unfused_ops(ctx: RuleContext) -> Iterator[Violation]:
    """A profile that wants GELU as one op (``fused_ops``) cannot take the Erf decomposition."""
    if "Gelu" not in ctx.profile.fused_ops:
        return
    for node in ctx.graph.all_nodes():
        if is_op(node, "Erf"):
            yield Violation("unfused_gelu", _name(node), f"target {ctx.profile.name!r} has no integer Erf (the QNN "
                            "HTP fails to finalize a graph with the exporters' GELU decomposition); write GELU as "
                            "one Gelu op: re-export with qtrim_fx for this target at opset >= 20")


def _float_ops(ctx: RuleContext) -> Iterator[Violation]:
    prof = ctx.profile
    if not prof.integer_only or not any(is_op(n, *_QDQ) for n in ctx.graph.all_nodes()):
        return  # a float model: quantized_ops says so once
    for node, why in float_islands(ctx.graph, float_bias=prof.bias == "float"):
        severity = island_severity(node, prof.activation_sites)
        if "float constant tensor" in why:  # a parameter added or multiplied in (a position embedding)
            severity, fix = "warning", "that constant needs a DequantizeLinear (quantize it on its own grid)"
        elif severity == "error" and ctx.model.metadata_props.get("qtrim_fx.prepared_for") == prof.name:
            fix = (f"the model was prepared for {prof.name!r} and this op is still outside every trained site (an "
                   "opset without the op, attention kept as one SDPA op, an untraced leaf ...): export it again "
                   "with qtrim_fx, whose FloatOpsWarning names the fix" + gate_hint(node))
        elif severity == "error":
            fix = (f"prepare the model with qtrim_fx.prepare(model, ..., target={prof.name!r}) so that tensor is "
                   "quantized and trained" + gate_hint(node))
        else:
            fix = "it needs a Q/DQ on that tensor"
        yield Violation("float_op", _name(node), f"{node.op_type} runs in float on integer-only target "
                        f"{prof.name!r}: {why}; {fix} (else the back end converts around it and runs it in "
                        "float, or on its CPU)", severity)


RULES: tuple[Callable[[RuleContext], Iterator[Violation]], ...] = (
    quantized_ops, _scale_values, _scale_spans, _qdq_pairs, _bias_grids, _float_weights, _weight_codes, _runtime_qparams,
    _channel_counts, _non_standard_ops, _zero_points, _qparam_shapes, _activation_grids, _weight_grids, _weight_axes,
    _softmax, _op_outputs, _op_inputs, _versions, _narrow_types, _unfused_ops, _float_ops,
)
