"""The dynamo exporter (torch.export + onnxscript) writes the same QDQ files as the TorchScript one.

Per built-in model and target: same opset and IR version, the same operators on tensor data (the legacy
file also computes its dynamic reshapes with int64 Shape/Slice/Concat/... nodes, which dynamo folds), the
same graph inputs and outputs (names and symbolic dims), the same integer initializers, the same Q/DQ
nodes (by site name, with their scales, zero points and axes), and the same outputs in ONNX Runtime.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.core.errors import ExportError
from qtrim_fx.onnx.export import EXPORTERS, export_lowered, resolve_exporter
from qtrim_fx.passes.lower.api import lower

TARGETS = ("onnxruntime", "tensorrt", "openvino", "qnn", "npu")
SLOW = pytest.mark.slow


def _ops(m: onnx.ModelProto) -> collections.Counter:
    """Operators on tensor data: not Constant, not the int64/bool shape arithmetic of a dynamic dim (the
    legacy exporter computes ``x.shape[0]`` reshapes with Shape/Slice/Concat/Add/Mod, dynamo folds them)."""
    inferred = onnx.shape_inference.infer_shapes(m)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)}
    shape_math = (onnx.TensorProto.INT64, onnx.TensorProto.BOOL)
    return collections.Counter(n.op_type for n in g.node if n.op_type != "Constant"
                               and any(types.get(o) not in shape_math for o in n.output))


def _qdq(m: onnx.ModelProto) -> list:
    """Every Q/DQ node by site name with its scale, zero point and axis (initializer or Constant)."""
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    consts |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    rows = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s, z = consts[n.input[1]], consts[n.input[2]]
            axis = [a.i for a in n.attribute if a.name == "axis"]
            rows.append((n.op_type, n.name, s.dtype.str, s.tobytes(), z.dtype.str, z.tobytes(), axis))
    return sorted(rows)


def _io(values) -> list:
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def _values(m: onnx.ModelProto, keep) -> list:
    arrays = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer]
    return sorted((a.dtype.str, a.shape, a.tobytes()) for a in arrays if keep(a))


def _integer(a: np.ndarray) -> bool:
    return a.dtype.kind in "iu" and a.dtype != np.int64


def _run(path, inputs) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)})


def assert_equivalent(legacy: onnx.ModelProto, dynamo: onnx.ModelProto) -> None:
    assert [(o.domain, o.version) for o in dynamo.opset_import] == [(o.domain, o.version) for o in legacy.opset_import]
    assert dynamo.ir_version == legacy.ir_version
    assert _ops(dynamo) == _ops(legacy)
    assert _io(dynamo.graph.input) == _io(legacy.graph.input)
    assert _io(dynamo.graph.output) == _io(legacy.graph.output)
    assert _values(dynamo, _integer) == _values(legacy, _integer)  # codes, zero points, int32 biases
    assert _qdq(dynamo) == _qdq(legacy)  # same sites, scales, zero points, axes


@pytest.fixture(scope="module")
def calibrated():
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model, inputs = get_model(name)
            qm = qtrim_fx.prepare(model)
            qtrim_fx.calibrate(qm, [inputs, tuple(x * 0.5 for x in inputs)])
            qtrim_fx.set_blend(qm, 1.0)
            cache[name] = (qm.eval(), inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["tiny_convnet", *(pytest.param(m, marks=SLOW) for m in (
    "mobilenet_small", "vit_tiny", "cifar_resnet18", "tv_resnet18"))])  # slow: 10-30 s each unloaded
@pytest.mark.parametrize("target", TARGETS)
def test_both_exporters_write_equivalent_files(tmp_path, calibrated, name, target):
    qm, inputs = calibrated(name)
    gm = lower(qm, target)
    files = {ex: tmp_path / f"{ex}.onnx" for ex in ("torchscript", "dynamo")}
    if target == "npu" and name == "vit_tiny":
        # npu parses opset 13; torchlib writes LayerNormalization (opset 17) and Shape(start, end) (opset 15),
        # which have no opset-13 form short of decomposing them: refused, naming the node and the fix.
        with pytest.raises(ExportError, match=r"cannot be written at opset 13: .*opset=18"):
            export_lowered(gm, inputs, files["dynamo"], target, exporter="dynamo")
        assert not files["dynamo"].exists()
        return
    models = {ex: export_lowered(gm, inputs, files[ex], target, exporter=ex) for ex in files}
    assert_equivalent(models["torchscript"], models["dynamo"])
    for a, b in zip(_run(files["torchscript"], inputs), _run(files["dynamo"], inputs), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(np.abs(a).max()))


def test_auto_exporter_and_unknown_is_refused(tmp_path, calibrated):
    qm, inputs = calibrated("tiny_convnet")
    assert EXPORTERS[0] == "auto"
    gm = lower(qm, "onnxruntime")
    assert resolve_exporter(gm, "auto") == "torchscript"  # symbolic trace: same file, faster
    aten = torch.export.export(gm, inputs).module()
    assert resolve_exporter(aten, "auto") == "dynamo"  # ATen graph (torch.export front end)
    with pytest.raises(ExportError, match="unknown exporter 'jit'"):
        qtrim_fx.export_onnx(qm, inputs, tmp_path / "a.onnx", exporter="jit")
    assert not list(tmp_path.iterdir())


def test_default_export_raises_no_deprecation_warning(tmp_path, calibrated):
    qm, inputs = calibrated("tiny_convnet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        qtrim_fx.export_onnx(qm, inputs, tmp_path / "m.onnx", "npu")
        qtrim_fx.export_onnx(qm, inputs, tmp_path / "d.onnx", "npu", exporter="dynamo")
