"""Last pass: standard operators only, opset imports and IR version for the target; then validation.

::

    opset_import {"": 17, "qtrim": 1}, ir_version 8, (no qtrim nodes left)
      =>  opset_import {"": 17}, ir_version = profile.ir_version (10)

A node outside the default domain left at this point (an unconverted placeholder, a custom op
from the model) is an error: the file would not load on standard runtimes.
:func:`validate_model` then runs ``onnx.checker`` (full check) and strict shape inference.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.profiles import TargetProfile

__all__ = ["FinalizeModelPass", "validate_model"]

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


def validate_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` (full check) + strict shape inference; returns the model with inferred shapes.

    ``value_info`` entries that repeat an initializer's type are dropped from ``model`` first.

    Raises:
        ExportError: naming the checker's complaint.
    """
    inits = {i.name for i in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in inits]  # initializers carry their type
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported QDQ model is not valid ONNX: {e}") from e
