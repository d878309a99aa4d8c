"""The ``torch.onnx.export(dynamo=True)`` front half of the export: lowered GraphModule -> raw placeholder ONNX.

``quant_dequant`` (an autograd.Function with a TorchScript ``symbolic``) would be traced through by
``torch.export`` into its float arithmetic. For this exporter each call becomes the registered custom op
``torch.ops.qtrim.quant_dequant`` (same arguments, same math), which the exporter's custom translation
writes as the very ``qtrim::QDQ`` placeholder the legacy exporter writes, so the ONNX passes after it
are the same::

    lowered FX graph   quant_dequant(w, s, z, -127, 127, 0, 8, True, "conv.weight")   (a python leaf)
      => export graph  torch.ops.qtrim.quant_dequant.default(w, s, z, -127, 127, 0, 8, True, "conv.weight")
      => raw ONNX      qtrim::QDQ[qmin=-127, qmax=127, axis=0, bits=8, signed=1, name="conv.weight"](w, s, z)

Dynamic dims are declared, not traced: dimension 0 of every input is ``batch`` (``dynamic_batch``), and
every dimension a ``torch.export``-captured model kept symbolic (its placeholders' ``meta["val"]``) stays
dynamic (``sequence`` for dimension 1, ``dim<i>`` beyond). torchlib starts at opset 18; an older target
opset is reached by :func:`downgrade_opset` after the QDQ passes (standard operators only by then).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxscript
import onnxscript.optimizer
import onnxscript.rewriter
import torch
import torch.fx as fx
from onnx.defs import OpSchema
from onnx_ir.passes.common import DeduplicateInitializersPass

from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.fakequant import fake_quantize_raw
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx.legacy_forms import LegacyPoolingFormsPass
from qtrim_fx.onnx.legacy_names import LegacyNamesPass
from qtrim_fx.runtime.qdq import (
    PLACEHOLDER_DOMAIN,
    PLACEHOLDER_OP,
    PLACEHOLDER_OPSET,
    QDQAttrs,
    is_quant_dequant,
)

__all__ = ["TORCHLIB_MIN_OPSET", "downgrade_opset", "dynamic_dims", "export_dynamo", "export_float", "opset_of",
           "with_custom_op"]

#: the oldest opset torchlib (the dynamo exporter's operator library) emits.
TORCHLIB_MIN_OPSET = 18
_DIM_NAMES = {0: "batch", 1: "sequence"}
_NO_LIMIT = 1 << 40


@torch.library.custom_op(f"{PLACEHOLDER_DOMAIN}::quant_dequant", mutates_args=())
def _qdq_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
            axis: int | None, bits: int, signed: bool, name: str) -> torch.Tensor:
    """``quant_dequant`` as an opaque torch op (``torch.export`` keeps it as one node)."""
    y = fake_quantize_raw(x.float(), scale.float(), zero_point.float(), qmin, qmax, axis)
    return y.to(x.dtype).contiguous()


@_qdq_op.register_fake
def _qdq_fake(x, scale, zero_point, qmin, qmax, axis, bits, signed, name):  # type: ignore[no-untyped-def]
    # Contiguous, as the real op returns: a captured graph may ``view`` a site's output that the front
    # end saw contiguous (T5: transpose -> site -> view); ``empty_like`` would keep the transposed strides.
    return x.new_empty(x.shape)


_QDQ_OVERLOAD = torch.ops.qtrim.quant_dequant.default
_ATTR = OpSchema.AttrType
_SCHEMA = OpSchema(
    PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, PLACEHOLDER_OPSET,
    inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("scale", "tensor(float)"),
            OpSchema.FormalParameter("zero_point", "tensor(float)")],
    outputs=[OpSchema.FormalParameter("y", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "x's type")],
    attributes=[OpSchema.Attribute("qmin", _ATTR.INT, ""), OpSchema.Attribute("qmax", _ATTR.INT, ""),
                OpSchema.Attribute("axis", _ATTR.INT, "", required=False), OpSchema.Attribute("bits", _ATTR.INT, ""),
                OpSchema.Attribute("signed", _ATTR.INT, ""), OpSchema.Attribute("name", _ATTR.STRING, "")],
)
_PLACEHOLDER = onnxscript.values.Op(onnxscript.values.Opset(PLACEHOLDER_DOMAIN, PLACEHOLDER_OPSET),
                                    PLACEHOLDER_OP, _SCHEMA)


def _translate(x, scale, zero_point, qmin, qmax, axis, bits, signed, name):  # type: ignore[no-untyped-def]
    """Custom translation: one ``qtrim::QDQ`` node with the attributes the legacy ``symbolic`` writes."""
    return _PLACEHOLDER(x, scale, zero_point, **QDQAttrs(qmin, qmax, axis, bits, signed, name).onnx_attributes())


def with_custom_op(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and tensors whose ``quant_dequant`` calls are the custom op."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and is_quant_dequant(node.target):
            node.target = _QDQ_OVERLOAD
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def dynamic_dims(gm: torch.nn.Module, args: tuple[object, ...], dynamic_batch: bool) -> tuple[object, ...]:
    """``dynamic_shapes`` for ``torch.onnx.export``: per input ``{dim: name}`` (``None`` for non-tensors).

    Dimension 0 is ``batch`` when ``dynamic_batch``; a dimension the capture kept symbolic (placeholder
    ``meta["val"]`` of a ``torch.export``-captured graph) is dynamic too.
    """
    vals: list[object] = [None] * len(args)
    if isinstance(gm, fx.GraphModule):
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        vals = [n.meta.get("val") for n in places][: len(args)] + vals[len(places):]
    spec: list[object] = []
    for a, val in zip(args, vals, strict=False):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            spec.append(None)
            continue
        dims: dict[int, str] = {0: _DIM_NAMES[0]} if dynamic_batch else {}
        shape = getattr(val, "shape", None)
        if shape is not None and len(shape) == a.dim():
            for i, d in enumerate(shape):
                if i > 0 and isinstance(d, torch.SymInt) and d.node.expr.free_symbols:
                    dims[i] = _DIM_NAMES.get(i, f"dim{i}")
        spec.append(dims or None)
    return tuple(spec)


def export_dynamo(
    gm: torch.nn.Module,
    args: tuple[object, ...],
    prof: TargetProfile,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool,
    optimize: bool = False,
) -> onnx.ModelProto:
    """Raw placeholder ONNX of a lowered module through ``torch.export`` + onnxscript (opset >= 18)."""
    module = with_custom_op(gm) if isinstance(gm, fx.GraphModule) else gm
    dims = dynamic_dims(gm, args, dynamic_batch)
    opset = max(TORCHLIB_MIN_OPSET, prof.opset)
    with warnings.catch_warnings():
        # torch.export's notes on specialized dims / AUTO guards are about its own trace, not the file.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        try:
            return _export_cached(module, args, dims, opset, input_names, output_names, optimize)
        except _PRIVATE_API_GONE:
            pass  # another torch: the public call (which rebuilds the operator registry every time)
        except Exception as e:
            raise _export_error(e) from e
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dims, optimize=optimize, verbose=False,
                custom_translation_table={_QDQ_OVERLOAD: _translate}, report=False,
            )
        except Exception as e:
            raise _export_error(e) from e
    return _as_legacy(program.model)


def _as_legacy(model: ir.Model) -> onnx.ModelProto:
    """Shape arithmetic folded, pooling heads and names in the legacy exporter's forms (see module docstring)."""
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model)
        if _SHAPE_RULES:
            onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=_SHAPE_RULES)
    # The TorchScript exporter merges equal constants (two all-zero biases become one initializer).
    DeduplicateInitializersPass(size_limit=_NO_LIMIT)(model)
    LegacyPoolingFormsPass()(model)
    LegacyNamesPass()(model)
    model.producer_version = torch.onnx.producer_version  # "2.14.1", as the legacy exporter writes it
    return ir.to_proto(model)


def _shape_rules() -> tuple[object, ...]:
    """onnxscript's rewrite rules that only simplify shape arithmetic (no-op, Slice, Reshape, Cast forms).

    Not its whole default set (``optimize=True``): that also drops a Conv's all-zero bias (which a
    target profile asked for, e.g. QNN's int32 bias on every Conv) and fuses Relu/Clip and BatchNorm,
    changing the op list the target rules and the legacy export agree on.
    """
    try:
        from onnxscript.rewriter.rules.common import (
            _basic_rules,
            _cast_constant_of_shape,
            _collapse_slices,
            _materialize_reshape_shape,
            _no_op,
        )
    except ImportError:  # another onnxscript: constant folding alone (a Reshape may keep a computed shape)
        return ()
    return (*_no_op.rules, *_cast_constant_of_shape.rules, *_collapse_slices.rules,
            *_materialize_reshape_shape.rules, *_basic_rules.basic_optimization_rules())


_SHAPE_RULES = _shape_rules()


class _PrivateApiGone(Exception):
    """torch's internal exporter entry points moved; use the public ``torch.onnx.export``."""


_PRIVATE_API_GONE = (_PrivateApiGone,)


def _export_error(e: BaseException) -> ExportError:
    why = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return ExportError(f"torch.onnx.export(dynamo=True) could not export the lowered model ({why}); "
                       'retry with exporter="torchscript" while torch still ships it')


@lru_cache(maxsize=4)
def _registry(opset: int) -> object:
    """torchlib's operator registry with our placeholder, built once per opset.

    ``torch.onnx.export`` rebuilds it on every call (~500 onnxscript functions parsed from source:
    about half of a small model's export time).
    """
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    registry.register_op(_QDQ_OVERLOAD, _translate, is_complex=False)
    return registry


def _export_cached(module: torch.nn.Module, args: tuple[object, ...], dims: tuple[object, ...], opset: int,
                   input_names: Sequence[str], output_names: Sequence[str], optimize: bool) -> onnx.ModelProto:
    """What ``torch.onnx.export(dynamo=True)`` does for a module, with the registry from :func:`_registry`."""
    try:
        from torch.onnx._internal.exporter import _core, _dynamic_shapes

        registry = _registry(opset)
        export_dims, rename = _dynamic_shapes.convert_str_to_export_dim(dims)
    except (ImportError, AttributeError, TypeError) as e:
        raise _PrivateApiGone from e
    program = _core.export(module, args, None, registry=registry, dynamic_shapes=export_dims,
                           input_names=list(input_names), output_names=list(output_names),
                           optimize=optimize, opset_version=opset, verbose=False, report=False)
    if rename:
        program._rename_dynamic_axes(dims)
    return _as_legacy(program.model)


def downgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` (standard operators only) at ``opset``: onnx's version converter down to 17 (it moves the
    ``axes``/``split`` inputs of opset 18 back into attributes), then, below 17, each node is checked against
    the older schema (an op unknown there, or a newer attribute/input in use, is an ExportError)."""
    current = opset_of(model)
    if current <= opset:
        return model
    parked = _park_splits(model, current, opset) if current >= 18 > opset else []
    try:
        converted = onnx.version_converter.convert_version(model, max(opset, 17)) if current > 17 else model
    except Exception as e:
        raise _downgrade_error(current, opset, f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}") from e
    finally:
        _unpark(model)
    if parked:
        _unpark(converted)
    converted.ir_version = model.ir_version
    for node in converted.graph.node:
        if node.domain in ("", "ai.onnx"):
            _fit_schema(node, opset, converted.graph, current)
    if opset < 17:
        for entry in converted.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
    return converted


_PARK = "qtrim.parked"


def _park_splits(model: onnx.ModelProto, current: int, opset: int) -> list[str]:
    """onnx's converter has no Split 18 -> 17 adapter. Opset 18 only added ``num_outputs``; with explicit
    ``split`` sizes the node is valid at 13..17 as it is, so each Split gets its sizes (from the static
    shape of its input) and sits in a private domain while the converter runs (:func:`_unpark`)."""
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    if not splits:
        return []
    shapes = _static_shapes(model)
    for node in splits:
        count = next((a.i for a in node.attribute if a.name == "num_outputs"), None)
        if count is not None and (len(node.input) < 2 or not node.input[1]):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = shapes.get(node.input[0])
            dim = dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
            if not isinstance(dim, int):
                raise _downgrade_error(current, opset, f"Split {node.name!r} splits a dynamic dim into "
                                       f"{count} parts, which has no opset-{opset} form")
            chunk = -(-dim // count)
            sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
            name = f"{node.name or node.output[0]}__split_sizes"
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(sizes, np.int64), name))
            del node.input[1:]
            node.input.append(name)
            keep = [a for a in node.attribute if a.name != "num_outputs"]
            del node.attribute[:]
            node.attribute.extend(keep)
        node.domain = _PARK
    model.opset_import.append(onnx.helper.make_opsetid(_PARK, 1))
    return [n.name for n in splits]


def _unpark(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain == _PARK:
            node.domain = ""
    keep = [o for o in model.opset_import if o.domain != _PARK]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[object]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*g.value_info, *g.input, *g.output) if v.type.tensor_type.HasField("shape")}


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset an ONNX model imports (1 when it names none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _downgrade_error(current: int, opset: int, why: str) -> ExportError:
    return ExportError(f"the dynamo export (opset {current}) cannot be written at opset {opset}: {why}; export "
                       f'with opset >= {current} (opset={current}) or exporter="torchscript"')


def _fit_schema(node: onnx.NodeProto, opset: int, graph: onnx.GraphProto, current: int) -> None:
    """Drop attributes the older schema lacks when they keep the older meaning; refuse anything else."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError as e:
        raise _downgrade_error(current, opset, f"{node.op_type} (node {node.name!r}) does not exist") from e
    if len([i for i in node.input if i]) > len(schema.inputs) and not any(
            p.option == OpSchema.FormalParameterOption.Variadic for p in schema.inputs):
        raise _downgrade_error(current, opset, f"node {node.name!r} ({node.op_type}) uses a newer input")
    for attr in [a for a in node.attribute if a.name not in schema.attributes]:
        if not _old_meaning(node, attr, graph):
            raise _downgrade_error(current, opset, f"node {node.name!r} ({node.op_type}) sets {attr.name!r}")
        node.attribute.remove(attr)


def _old_meaning(node: onnx.NodeProto, attr: onnx.AttributeProto, graph: onnx.GraphProto) -> bool:
    """Whether dropping ``attr`` keeps the node's meaning (its value is the older behaviour)."""
    value = onnx.helper.get_attribute_value(attr)
    if attr.name in ("noop_with_empty_axes", "allowzero") and value == 0:
        return True
    if node.op_type == "Reshape" and attr.name == "allowzero":  # allowzero=1 only differs on a 0 in shape
        shape = next((t for t in graph.initializer if t.name == node.input[1]), None)
        return shape is not None and 0 not in onnx.numpy_helper.to_array(shape).tolist()
    return False


def export_float(
    module: torch.nn.Module,
    args: tuple[object, ...],
    path: str,
    input_names: Sequence[str],
    output_names: Sequence[str] | None = None,
    opset: int = 17,
) -> None:
    """FP32 ONNX of a float module (a reference or a vendor tool's input) through the dynamo exporter.

    Dimension 0 of every input is ``batch``; onnxscript's whole optimizer runs (nothing is quantized here);
    the file is written at ``opset`` (converted down from torchlib's 18 when older).
    """
    dims = tuple({0: _DIM_NAMES[0]} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    target = max(TORCHLIB_MIN_OPSET, opset)
    outs = list(output_names) if output_names is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        try:
            from torch.onnx._internal.exporter import _core, _dynamic_shapes

            export_dims, rename = _dynamic_shapes.convert_str_to_export_dim(dims)
            program = _core.export(module, args, None, registry=_registry(target), dynamic_shapes=export_dims,
                                   input_names=list(input_names), output_names=outs, optimize=True,
                                   opset_version=target, verbose=False, report=False)
            if rename:
                program._rename_dynamic_axes(dims)
        except (ImportError, AttributeError) as e:
            raise ExportError(f"torch's dynamo exporter is not available here ({e})") from e
        proto = downgrade_opset(program.model_proto, opset)
    onnx.save_model(proto, path)
