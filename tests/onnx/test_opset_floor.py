"""A dynamo export is written at the oldest opset that holds it when the opset was picked (issue 17 zoo: HF Llama on npu).

The torch.export front end writes opset 18; ``npu`` starts at 13 (14 with attention). Llama's graph uses
``Shape(start, end)`` (opset 15), so the downgrade to 14 failed with "export with opset >= 18". With ``opset=None``
export now takes the oldest opset from the target's own up to its ``max_opset`` that holds the graph; an explicit
opset is a requirement and still fails, naming the fix.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.export import downgrade_for


def _shape_slice_model() -> onnx.ModelProto:
    """y = x reshaped to its own trailing dims: ``Shape(x, start=1)`` (opset 15+) -> Reshape, at opset 18."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1),
             helper.make_node("Reshape", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_picked_opset_rises_to_the_oldest_that_holds_the_graph():
    prof = get_profile("npu").replace(opset=14)
    with pytest.raises(ExportError, match="cannot be written at opset 14"):
        downgrade_for(_shape_slice_model(), prof)  # an explicit opset: a requirement
    model = downgrade_for(_shape_slice_model(), prof, opset_floor=True)
    assert _opset(model) == 15
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x[0])


def test_the_target_max_opset_still_bounds_it():
    prof = get_profile("npu").replace(opset=13, max_opset=14)
    with pytest.raises(ExportError, match="cannot be written at opset 13"):
        downgrade_for(_shape_slice_model(), prof, opset_floor=True)  # the first error, for the wanted opset


def test_a_graph_that_fits_keeps_the_wanted_opset():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert _opset(downgrade_for(model, get_profile("npu"), opset_floor=True)) == 13
