"""Export a lowered GraphModule to a clean QDQ ONNX file for one target.

::

    lowered GraphModule (quant_dequant calls)
      -> torch.onnx.export                         raw ONNX with qtrim::QDQ placeholders:
           exporter="dynamo"                       torch.export + onnxscript (dynamo_export.py), opset >= 18
           exporter="torchscript"                  the legacy TorchScript exporter (deprecated by torch)
           exporter="auto" (default)               dynamo for an ATen graph (torch.export front end: its
                                                   dims stay dynamic), else torchscript: the same file,
                                                   faster (benchmarks/RESULTS.md, "Export time: ...")
      -> qdq_passes(profile)                       standard Q/DQ, integer weights, target rules
      -> downgrade_opset                           dynamo only: to the profile's opset when it is < 18
      -> validate_model + check(profile)           onnx.checker, shape inference, target rules
      -> atomic write                              core.fileio: temp file beside the target + os.replace
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
import torch.fx
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from qtrim_fx.core.dtypes import storage_for
from qtrim_fx.core.errors import ExportError, QtrimError
from qtrim_fx.core.fileio import check_output_path, write_atomically
from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.onnx.check import Violation, check
from qtrim_fx.onnx.check_islands import FloatOpsWarning, float_ops_summary
from qtrim_fx.onnx.expand_placeholders import ExpandPlaceholdersPass, require_storage
from qtrim_fx.onnx.finalize import FinalizeModelPass, validate_model
from qtrim_fx.onnx.fold_weight_layout import FoldWeightLayoutPass
from qtrim_fx.onnx.fuse_gelu import FuseGeluPass
from qtrim_fx.onnx.gather_table_qdq import QuantizeGatherTablePass
from qtrim_fx.onnx.merge_qdq import MergeDuplicateQDQPass
from qtrim_fx.onnx.name_after_sites import NameAfterSitesPass
from qtrim_fx.onnx.quantize_bias import QuantizeBiasPass
from qtrim_fx.onnx.quantize_instance_norm import QuantizeInstanceNormPass
from qtrim_fx.onnx.quantize_scalar_operands import QuantizeScalarOperandsPass
from qtrim_fx.onnx.requantize_shape_ops import RequantizeAfterShapeOpsPass
from qtrim_fx.onnx.unsigned_weights import UnsignedWeightsPass
from qtrim_fx.runtime.qdq import PLACEHOLDER_DOMAIN, PLACEHOLDER_OPSET, is_quant_dequant

__all__ = ["EXPORTERS", "export_lowered", "qdq_passes", "run_qdq_passes"]

_BATCH = "batch"
#: the ``exporter=`` choices; the first is the default.
EXPORTERS = ("auto", "dynamo", "torchscript")


def qdq_passes(profile: TargetProfile) -> ir.passes.PassManager:
    """The ONNX passes, in order, that turn a raw placeholder export into a clean QDQ model."""
    return ir.passes.PassManager(
        [
            IdentityEliminationPass(),  # the exporter's Identity copies of shared parameters
            ExpandPlaceholdersPass(profile),
            FoldWeightLayoutPass(),
            MergeDuplicateQDQPass(),
            FuseGeluPass(profile),
            QuantizeGatherTablePass(profile),
            QuantizeInstanceNormPass(profile),  # before the re-quantization: it matches DQ -> Reshape -> InstanceNorm
            RequantizeAfterShapeOpsPass(profile),
            QuantizeBiasPass(profile),
            QuantizeScalarOperandsPass(profile),
            UnsignedWeightsPass(profile),
            RemoveUnusedNodesPass(),
            NameAfterSitesPass(),
            TopologicalSortPass(),
            FinalizeModelPass(profile),
        ]
    )


def run_qdq_passes(model: onnx.ModelProto, profile: str | TargetProfile) -> onnx.ModelProto:
    """Run :func:`qdq_passes` on a raw export and validate the result (``onnx.checker`` + shapes).

    Returns:
        A new, validated ``ModelProto`` with inferred shapes.
    """
    ir_model = ir.from_proto(model)
    try:
        qdq_passes(get_profile(profile))(ir_model)
    except ir.passes.PassError as e:
        # Surface our own, actionable errors rather than the pass manager's wrappers.
        cause: BaseException | None = e
        while isinstance(cause, ir.passes.PassError):
            cause = cause.__cause__
        if isinstance(cause, QtrimError):
            raise cause from None
        raise
    return validate_model(ir_model)


def export_lowered(
    gm: torch.nn.Module,
    example_inputs: tuple[object, ...] | torch.Tensor,
    path: str | os.PathLike[str],
    profile: str | TargetProfile,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    exporter: str = EXPORTERS[0],
    opset_floor: bool = False,
) -> onnx.ModelProto:
    """Export a lowered model (``quant_dequant`` at every site) as a clean QDQ ONNX file.

    Args:
        gm: the lowered module (usually a ``torch.fx.GraphModule``).
        example_inputs: positional inputs for tracing (a single tensor is accepted).
        path: output file; written atomically (a failed export leaves no file, or the old one
            intact); symlinks are followed, see :mod:`qtrim_fx.core.fileio`.
        profile: a :class:`TargetProfile` or its name (``"onnxruntime"``, ``"tensorrt"``, ...).
        input_names, output_names: ONNX names (default: the forward's argument names;
            ``output`` / ``output_<i>``).
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``; also keeps the dims a
            ``torch.export`` capture left symbolic, e.g. ``sequence``), ``"torchscript"`` (the legacy
            exporter, while torch ships it; batch only) or ``"auto"``: dynamo for a graph captured by
            ``torch.export`` (ATen ops), torchscript otherwise (see :func:`resolve_exporter`).
        opset_floor: the profile's opset is the oldest wanted, not a requirement: a dynamo export that cannot be
            written at it is written at the oldest newer opset that works, within the target's ``max_opset``.

    Returns:
        The written model.

    Raises:
        ExportError: the model needs something the target cannot take (INT4 below opset 21, a
            non-constant scale, ...) or the result breaks the target's rules (``check`` errors).
        ProfileError: unknown target name.
        OutputPathError: ``path`` is not a regular file that may be replaced (a directory, FIFO,
            device, socket or read-only file), checked before the export starts.
    """
    check_output_path(path)
    prof = get_profile(profile)
    _require_exporter(exporter)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _preflight(gm, prof)
    ins, outs = _io_names(gm, args, input_names, output_names)
    chosen = resolve_exporter(gm, exporter)
    try:
        raw = _raw_export(chosen, gm, args, prof, ins, outs, dynamic_batch)
    except ExportError as first:
        other = _fallback_exporter(gm, args, exporter, chosen, dynamic_batch)
        if other is None:
            raise
        try:
            raw = _raw_export(other, gm, args, prof, ins, outs, dynamic_batch)
        except ExportError as second:
            raise ExportError(f"{first}\nexporter='auto' tried the {other} exporter too, which failed as well: "
                              f"{second}") from first
        chosen = other
    model = run_qdq_passes(raw, prof)
    if chosen == "dynamo":  # torchlib writes opset >= 18: back to the profile's (see downgrade_for)
        model = downgrade_for(model, prof, opset_floor)
    _stamp(model, prof, gm)
    _enforce(check(model, prof), prof, gm)
    _write_atomically(model, Path(path))
    return model


def resolve_exporter(gm: torch.nn.Module, exporter: str) -> str:
    """``"auto"`` -> ``"dynamo"`` for an ATen graph (the ``torch.export`` front end) or when torch no longer
    has the TorchScript exporter, else ``"torchscript"``; other names are returned unchanged.

    Both write equivalent files (tests/onnx/test_dynamo_export.py); the TorchScript exporter is faster on
    symbolically traced models (dynamo adds seconds of fixed torch.export/decomposition cost per export:
    ~10x on a tiny model, ~2x on resnet18), and cannot keep a ``torch.export`` capture's dynamic dims.
    """
    if exporter != "auto":
        return exporter
    aten = isinstance(gm, torch.fx.GraphModule) and any(
        isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten" for n in gm.graph.nodes)
    return "dynamo" if aten or not _has_torchscript_exporter() else "torchscript"


def _has_torchscript_exporter() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch.onnx._internal.torchscript_exporter") is not None
    except ModuleNotFoundError:
        return False


def _require_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {', '.join(map(repr, EXPORTERS))}")


def _raw_export(
    exporter: str,
    gm: torch.nn.Module,
    args: tuple[object, ...],
    prof: TargetProfile,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
) -> onnx.ModelProto:
    """The exporter's file, placeholders not yet expanded; any failure of the exporter is an ``ExportError``."""
    if exporter == "torchscript":
        return _torch_export(gm, args, prof, input_names, output_names, dynamic_batch)
    from qtrim_fx.onnx.dynamo_export import export_dynamo

    return export_dynamo(gm, args, prof, input_names, output_names, dynamic_batch)


def _fallback_exporter(gm: torch.nn.Module, args: tuple[object, ...], exporter: str, chosen: str,
                       dynamic_batch: bool) -> str | None:
    """The exporter ``"auto"`` tries after ``chosen`` failed, or None.

    Each exporter fails on ops the other writes (the TorchScript one: BatchNorm without running statistics at
    a dynamic batch, shape checks on traced sizes such as ``max_unpool2d(output_size=x.shape)``; the dynamo one:
    3-D ``scaled_dot_product_attention``). Both write the same QDQ file where both work, and the export
    self-check runs on whichever wrote it. Never to TorchScript for a graph whose inputs keep dynamic dims other
    than the batch (a ``torch.export`` capture's sequence length): the TorchScript exporter would pin them.
    """
    if exporter != "auto":
        return None
    if chosen == "torchscript":
        return "dynamo"
    if not _has_torchscript_exporter():
        return None
    from qtrim_fx.onnx.dynamo_export import dynamic_dims

    try:
        dims = dynamic_dims(gm, args, dynamic_batch)
    except Exception:  # undecidable: keep the dynamo exporter's error
        return None
    if any(isinstance(d, dict) and set(d) - {0} for d in dims):
        return None
    return "torchscript"


def downgrade_for(model: onnx.ModelProto, prof: TargetProfile, opset_floor: bool = False) -> onnx.ModelProto:
    """A dynamo export written at ``prof.opset`` (validated), or, with ``opset_floor`` (the opset was picked, not
    given), at the oldest newer opset within ``prof.max_opset`` that holds it (Llama's ``Shape(start, end)``: 15).

    Raises:
        ExportError: no such opset; the message is the one for ``prof.opset``.
    """
    from qtrim_fx.onnx.dynamo_export import downgrade_opset, opset_of

    newest = min(prof.max_opset, max(prof.opset, opset_of(model))) if opset_floor else prof.opset
    first: ExportError | None = None
    for opset in range(prof.opset, newest + 1):
        try:
            downgraded = downgrade_opset(model, opset)
        except ExportError as e:
            first = first or e
            continue
        return model if downgraded is model else validate_model(downgraded)
    assert first is not None
    raise first


def _preflight(gm: torch.nn.Module, prof: TargetProfile) -> None:
    """Fail before the (slow) export when a site needs a newer opset than the profile's."""
    if not isinstance(gm, torch.fx.GraphModule):
        return
    for node in gm.graph.nodes:
        if node.op != "call_function" or not is_quant_dequant(node.target):
            continue
        bits, signed, name = (_arg(node, i, k) for i, k in ((6, "bits"), (7, "signed"), (8, "name")))
        if isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16:
            require_storage(storage_for(bits, bool(signed)), str(name), prof)


def _arg(node: torch.fx.Node, index: int, key: str) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(key)


def _io_names(
    gm: torch.nn.Module,
    args: tuple[object, ...],
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> tuple[list[str], list[str]]:
    if input_names is None:
        if isinstance(gm, torch.fx.GraphModule):
            input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"][: len(args)]
        else:
            input_names = [f"input_{i}" for i in range(len(args))]
    if output_names is None:
        n_out = _count_outputs(gm, args)
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    return list(input_names), list(output_names)


def _count_outputs(gm: torch.nn.Module, args: tuple[object, ...]) -> int:
    if isinstance(gm, torch.fx.GraphModule):
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        return len(torch.utils._pytree.tree_leaves(out.args[0]))
    was_training = gm.training
    try:
        with torch.no_grad():
            return len(torch.utils._pytree.tree_leaves(gm.eval()(*args)))
    finally:
        gm.train(was_training)


@contextlib.contextmanager
def _quiet_torchscript_log() -> Iterator[None]:
    """Keep the TorchScript exporter from printing its whole IR graph to stderr when it fails.

    torch 2.14's ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` instead of calling it,
    so every TorchScript export turns ONNX logging on (and leaves it on): a model the exporter cannot write
    prints hundreds of lines of IR before our ExportError, even when ``exporter="auto"`` then succeeds with
    dynamo. Logging is off while qtrim_fx exports (an earlier export anywhere in the process may have left it
    on) and is set back as it was afterwards.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as ts_utils
    except ImportError:  # another torch layout: nothing to quiet
        yield
        return
    original = getattr(ts_utils, "setup_onnx_logging", None)
    was_on = bool(torch._C._jit_is_onnx_log_enabled())
    if original is None:
        yield
        return
    ts_utils.setup_onnx_logging = lambda verbose: contextlib.nullcontext()
    torch._C._jit_set_onnx_log_enabled(False)
    try:
        yield
    finally:
        ts_utils.setup_onnx_logging = original
        torch._C._jit_set_onnx_log_enabled(was_on)


def _torch_export(
    gm: torch.nn.Module,
    args: tuple[object, ...],
    prof: TargetProfile,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {n: {0: _BATCH} for n in (*input_names, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings(), _quiet_torchscript_log():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
        # Opset 21 (INT4): the legacy exporter warns and emits opset-20 forms of ordinary ops, which
        # opset 21 only widened (types); checker and shape inference validate the result.
        warnings.filterwarnings("ignore", message=".*opset version 21 is not supported.*")
        try:
            torch.onnx.export(
                gm, args, buffer, dynamo=False, opset_version=prof.opset, do_constant_folding=True,
                custom_opsets={PLACEHOLDER_DOMAIN: PLACEHOLDER_OPSET}, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes,
            )
        except torch.onnx.errors.OnnxExporterError as e:  # SymbolicValueError, UnsupportedOperatorError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"the TorchScript ONNX exporter cannot write this model at opset {prof.opset}: {first}. "
                "Fix: export_onnx(..., exporter='dynamo'), a newer opset=, or change the op or the input "
                "size it fails on (e.g. adaptive pooling whose output size does not divide the input's)"
            ) from e
        except Exception as e:  # the exporter's own asserts and checks on traced sizes
            first = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            raise ExportError(
                f"the TorchScript ONNX exporter failed on the lowered model ({first}). Fix: "
                "export_onnx(..., exporter='dynamo'); or dynamic_batch=False when an op needs the batch size "
                "(BatchNorm without running statistics)"
            ) from e
    model = onnx.load_model_from_string(buffer.getvalue())
    if dynamic_batch:
        _forget_traced_shapes(model)
    return model


def _forget_traced_shapes(model: onnx.ModelProto) -> None:
    """Replace the shapes the TorchScript exporter *traced* (with the example's batch size) by inferred ones.

    The exporter infers shapes symbolically, but a qtrim::QDQ placeholder whose input shape it could not infer
    (after a computed Reshape) gets the traced shape, batch size included, and its inference carries that into
    every later op. ONNX Runtime trusts such shapes: a file exported at batch 2 failed at batch 1 in its
    MatMul+Add -> Gemm fusion ("gemm_input_reshape"). Those values (such a placeholder's output when every size
    in it is a number, and everything computed from it) get the shapes ONNX's own inference gives on a copy in which every placeholder is an
    Identity (a fake-quantizer keeps its input's shape), or none; every other shape is kept as written.
    """
    known = {v.name: v for v in (*model.graph.input, *model.graph.value_info)}
    known.update((t.name, t) for t in model.graph.initializer)

    def has_shape(name: str) -> bool:
        v = known.get(name)
        return v is not None and (isinstance(v, onnx.TensorProto) or len(v.type.tensor_type.shape.dim) > 0)

    def traced(name: str) -> bool:  # every size a number: the exporter lost track of which one is dynamic
        v = known.get(name)
        dims = v.type.tensor_type.shape.dim if v is not None and not isinstance(v, onnx.TensorProto) else ()
        return len(dims) > 0 and all(d.HasField("dim_value") for d in dims)

    tainted: set[str] = set()
    dynamic = {v.name for v in model.graph.input}  # values computed from the model's inputs
    for node in model.graph.node:
        if any(i in dynamic for i in node.input):
            dynamic.update(o for o in node.output if o)
        if any(i in tainted for i in node.input) or (
                node.domain == PLACEHOLDER_DOMAIN and node.input and node.input[0] in dynamic
                and not has_shape(node.input[0]) and traced(node.output[0])):
            tainted.update(o for o in node.output if o)
    if not tainted:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        out.type.tensor_type.ClearField("shape")
    for node in probe.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN:
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
            del node.input[1:]
    try:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.value_info}
    except Exception:  # inference is an aid here; the finished file is validated strictly
        inferred = {}
    kept = [v if v.name not in tainted else inferred.get(v.name) for v in model.graph.value_info]
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in kept if v is not None)
    for out in model.graph.output:
        if out.name in tainted:  # the rank stays; a size written as a number is inferred again at validation
            for dim in out.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dim.ClearField("dim_value")


def _enforce(violations: list[Violation], prof: TargetProfile, gm: torch.nn.Module | None = None) -> None:
    # float ops on an integer-only target: the file is right, only slower there; one warning names them
    # a weight left float (an Override excluded its layer): also right, only not integer there; warned below
    islands = [v for v in violations if v.rule == "float_op"]
    errors = [v for v in violations if v.severity == "error" and v.rule not in ("float_op", "weight_float")]
    if errors:
        lines = "\n  ".join(str(v) for v in errors)
        prepared_for = _prepared_for(gm)
        hint = ""
        if prepared_for is not None and prepared_for != prof.name:
            hint = (f"\nthe model was prepared for {prepared_for!r}, whose sites {prof.name!r} does not take: export "
                    f"it with target={prepared_for!r} (the default), or prepare the float model again for "
                    f"{prof.name!r}")
        raise ExportError(f"the export breaks target {prof.name!r}'s rules:\n  {lines}{hint}")
    for v in violations:
        if v.rule != "float_op":
            warnings.warn(f"target {prof.name!r}: {v}", stacklevel=3)
    if islands:
        warnings.warn(FloatOpsWarning(float_ops_summary(islands, prof.name, _float_ops_fix(gm, prof))), stacklevel=3)


def _float_ops_fix(gm: torch.nn.Module | None, prof: TargetProfile) -> str | None:
    """What the user can do about float ops that ``gm`` itself explains (None: the generic "prepare for it")."""
    if gm is None:
        return None
    from qtrim_fx.onnx.check_islands import prepare_fix

    fixes = [f for f in (_opset_fix(gm, prof), _attention_fix(gm), _leaf_fix(gm)) if f]
    prepared_for = _prepared_for(gm)
    if fixes and prepared_for != prof.name:
        fixes.insert(0, prepare_fix(prof.name))
    if not fixes and prepared_for == prof.name:  # "prepare for the target" would send the user in a circle
        return (f"the model is prepared for {prof.name!r} already: qtrim_fx has no integer form of these ops for "
                "this target, so they stay float there; replace them in the model if the back end must run every "
                "op on integers")
    return "; ".join(fixes) or None


#: ``metadata_props`` keys of a written file: the target it was written for, the one the model was prepared for.
TARGET_KEY, PREPARED_FOR_KEY = "qtrim_fx.target", "qtrim_fx.prepared_for"


def _stamp(model: onnx.ModelProto, prof: TargetProfile, gm: torch.nn.Module) -> None:
    """Record in the file which target it was written for and which the model was prepared for (``check`` of
    the file alone then knows whether "prepare for the target" is the fix for a float op)."""
    prepared_for = _prepared_for(gm)
    stamp = {TARGET_KEY: prof.name, PREPARED_FOR_KEY: prepared_for or "none"}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in stamp]
    del model.metadata_props[:]
    for key, value in [*kept, *stamp.items()]:
        model.metadata_props.add(key=key, value=value)


def _prepared_for(gm: torch.nn.Module | None) -> str | None:
    """The target the model ``gm`` was lowered from was prepared for (None: every target, or unknown)."""
    return getattr(getattr(_prepared_info(gm), "config", None), "target", None)


def _prepared_info(gm: torch.nn.Module | None) -> object:
    """The ``PrepareInfo`` of the model ``gm`` was lowered from (None for a GraphModule made elsewhere)."""
    from qtrim_fx.passes.lower.api import LOWERED_FROM

    meta = getattr(gm, "meta", None)
    return meta.get(LOWERED_FROM) if isinstance(meta, dict) else None


def _attention_fix(gm: torch.nn.Module) -> str | None:
    """``scaled_dot_product_attention`` stays one op in torch: the exporter writes its scores in float."""
    from qtrim_fx.passes.lower.require_opset import is_sdpa

    graph = getattr(gm, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or not any(
            n.op == "call_function" and is_sdpa(n.target) for n in graph.nodes):
        return None
    return ("scaled_dot_product_attention stays one op in torch and the exporter writes its scores (MatMul, Softmax) "
            "in float (prepare for an integer-only target writes it out, except with is_causal=True, dropout, "
            "grouped-query heads, a bool mask or no example inputs): write attention as matmul/softmax "
            "(Hugging Face: attn_implementation='eager'; timm: set the attention module's fused_attn = False) and "
            "prepare again")


def _leaf_fix(gm: torch.nn.Module) -> str | None:
    """Submodules prepare kept as opaque leaves: their ops are float in every file."""
    fallbacks = getattr(_prepared_info(gm), "fallbacks", ()) or ()
    if not fallbacks:
        return None
    names = ", ".join(repr(f.module) for f in fallbacks[:3]) + (", ..." if len(fallbacks) > 3 else "")
    return (f"{len(fallbacks)} submodule(s) could not be traced and stay float leaves ({names}; prepare's warning "
            "says why): make them traceable (torch.fx.wrap, or no data-dependent control flow) to quantize inside")


def _opset_fix(gm: torch.nn.Module | None, prof: TargetProfile) -> str | None:
    """The fix for float ops that an older opset than the target's integer op needs wrote as primitives."""
    from qtrim_fx.passes.lower.require_opset import integer_opset

    need = integer_opset(gm) if gm is not None else None
    if need is None or need[0] <= prof.opset:
        return None
    opset, op, where = need
    if opset > prof.max_opset:
        return None
    return (f"{where!r} is written as one {op} only from opset {opset} on (at opset {prof.opset} the exporter "
            f"writes it as float primitives): pass opset={opset} (target {prof.name!r} takes up to {prof.max_opset}), "
            "or leave opset unset and export picks it")


def _write_atomically(model: onnx.ModelProto, path: Path) -> None:
    write_atomically(path, lambda f: f.write(model.SerializeToString()))
