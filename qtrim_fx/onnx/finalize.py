"""Last pass: standard operators only, opset imports and IR version for the target; then validation.

::

    opset_import {"": 17, "qtrim": 1}, ir_version 8, (no qtrim nodes left)
      =>  opset_import {"": 17}, ir_version = profile.ir_version (10)

A node outside the default domain left at this point (an unconverted placeholder, a custom op
from the model) is an error: the file would not load on standard runtimes.
:func:`validate_model` then runs onnx-ir's checker and strict shape-inference passes (:func:`validation_passes`).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass, ShapeInferencePass

from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.profiles import TargetProfile

__all__ = ["FinalizeModelPass", "validate_model", "validation_passes"]

_STANDARD = ("", "ai.onnx")


class FinalizeModelPass(ir.passes.InPlacePass):
    """Require default-domain nodes, drop unused opset imports, set the profile's IR version."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _require_standard_ops(model.graph)
        modified = False
        used = {n.domain for n in model.graph.all_nodes()} | {""}
        for domain in [d for d in model.opset_imports if d not in used]:
            del model.opset_imports[domain]
            modified = True
        opset = model.opset_imports.get("", None)
        if opset is not None and opset > self.profile.max_opset:
            raise ExportError(f"the model uses opset {opset} but target {self.profile.name!r} parses at most "
                              f"{self.profile.max_opset}; export with opset <= {self.profile.max_opset}")
        if model.ir_version != self.profile.ir_version:
            model.ir_version = self.profile.ir_version
            modified = True
        return ir.passes.PassResult(model, modified)


def _require_standard_ops(graph: ir.Graph) -> None:
    odd = sorted({f"{n.domain}::{n.op_type}" for n in graph.all_nodes() if n.domain not in _STANDARD})
    if odd:
        raise ExportError(f"non-standard ops left in the graph: {', '.join(odd)}. A qtrim::QDQ inside a "
                          "subgraph (If/Loop) is not supported; other custom ops must be removed from the "
                          "model (or decomposed) before a clean QDQ export")


def validation_passes() -> ir.passes.PassManager:
    """onnx-ir's own checker and shape-inference passes: full ``onnx.checker``, then strict, type-checked
    shape inference whose results are merged into the model."""
    return ir.passes.PassManager([
        CheckerPass(full_check=True),
        ShapeInferencePass(check_type=True, strict_mode=True, data_prop=False),
    ])


def validate_model(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """Run :func:`validation_passes` on ``model``; returns it as a ``ModelProto`` with inferred shapes.

    An ``ir.Model`` is validated in place; a ``ModelProto`` is read into one first.

    ``value_info`` entries that repeat an initializer's type are not written (initializers carry
    their type).

    Raises:
        ExportError: naming the checker's or shape inference's complaint.
    """
    # Value types known before inference keep their place ahead of the inferred ones (as onnx's own
    # shape inference orders value_info), so a file's bytes do not depend on which tool inferred them.
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    before = ir.to_proto(model).graph
    typed_before = {v.name for v in before.value_info}
    init_order = {t.name: i for i, t in enumerate(before.initializer)}
    try:
        validation_passes()(model)
    except ir.passes.PassError as e:
        cause: BaseException = e
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise ExportError(f"the exported QDQ model is not valid ONNX: {cause}") from e
    proto = ir.to_proto(model)
    ordered = sorted(proto.graph.initializer, key=lambda t: init_order.get(t.name, len(init_order)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(ordered)
    inits = {i.name for i in proto.graph.initializer}
    kept = [vi for vi in proto.graph.value_info if vi.name not in inits]
    kept.sort(key=lambda vi: vi.name not in typed_before)  # stable: each group stays in graph order
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto
