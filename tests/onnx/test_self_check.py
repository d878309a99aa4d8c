"""export_onnx checks the written file against the lowered model (issue 17: "Export checks itself")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.fx
from onnx import numpy_helper
from torch import nn

import qtrim_fx
import qtrim_fx.onnx.export_model as export_model
from qtrim_fx.core.errors import ExportError
from qtrim_fx.onnx.self_check import MAX_OFF_SHARE, compare_outputs
from tests.helpers.cpu import for_this_cpu


def _calibrated(name: str = "tiny_convnet"):
    from qtrim_fx.models import get_model

    model, ex = get_model(name)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [ex])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), ex


def _corrupt_one_dequantize(path) -> str:
    """Give one activation DequantizeLinear 1.5x the scale its QuantizeLinear used (a mis-scaled site)."""
    m = onnx.load(path)
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        src = producer.get(node.input[0])
        if node.op_type == "DequantizeLinear" and src is not None and src.op_type == "QuantizeLinear":
            scale = numpy_helper.to_array(inits[node.input[1]])
            new = numpy_helper.from_array((scale * 1.5).astype(scale.dtype), node.input[1] + "_corrupted")
            m.graph.initializer.append(new)
            node.input[1] = new.name
            onnx.save(m, path)
            return node.name
    raise AssertionError("no activation Q/DQ pair in the export")


@pytest.fixture
def corrupting_export(monkeypatch):
    original = export_model.export_lowered

    def export_then_corrupt(gm, args, path, *rest, **kw):
        written = original(gm, args, path, *rest, **kw)
        _corrupt_one_dequantize(path)
        return written

    monkeypatch.setattr(export_model, "export_lowered", export_then_corrupt)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_corrupted_file_is_refused_and_removed(tmp_path, corrupting_export, target):
    qm, ex = _calibrated()
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        qtrim_fx.export_onnx(qm, ex, path, target=target)
    msg = str(info.value)
    assert "output 'output'" in msg and "% of elements differ" in msg and "largest difference" in msg
    assert "verify=False" in msg and "removed" in msg
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left either


def test_verify_false_skips_the_check(tmp_path, corrupting_export):
    qm, ex = _calibrated()
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, ex, path, verify=False)
    assert path.exists()  # written as asked (and corrupted by the test)


@pytest.mark.parametrize(("name", "target"), [
    ("tiny_convnet", "onnxruntime"), ("tiny_convnet", "tensorrt"), ("tiny_mlp", "openvino"),
    ("attention_block", "onnxruntime"), ("convtranspose_net", "qnn"),
])
def test_normal_exports_pass_the_check(tmp_path, name, target, monkeypatch):
    import qtrim_fx.onnx.self_check as self_check

    seen = []
    original = self_check.compare_outputs
    monkeypatch.setattr(self_check, "compare_outputs", lambda *a: seen.append(a) or original(*a))
    qm, ex = _calibrated(name)
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, ex, path, target=target)
    assert path.exists() and len(seen) == 1  # the check ran, and passed


def test_threshold_tolerates_rounding_flips_but_not_a_mismatch():
    rng = np.random.default_rng(0)
    step = 0.02
    ref = np.round(rng.normal(size=(8, 100)) / step) * step
    flips = ref.copy()
    flips.flat[rng.choice(ref.size, 4, replace=False)] += step  # 0.5 % of elements one step off
    assert compare_outputs(["y"], [flips], [ref], {"y": step}) == []
    shifted = ref + 2 * step * (rng.random(ref.shape) < 2 * MAX_OFF_SHARE)  # 2 % two steps off
    (bad,) = compare_outputs(["y"], [shifted], [ref], {"y": step})
    assert bad.output == "y" and bad.off_share > MAX_OFF_SHARE
    one_far = ref.copy()
    one_far[3, 7] += 40 * step  # a single element 40 steps off
    (bad,) = compare_outputs(["y"], [one_far], [ref], {"y": step})
    assert bad.where == (3, 7)
    assert compare_outputs(["f"], [ref * 1.001], [ref], {}) == []  # float output: 0.1 % relative
    assert len(compare_outputs(["f"], [ref * 1.5], [ref], {})) == 1
    assert len(compare_outputs(["i"], [np.array([1, 2, 3])], [np.array([1, 2, 4])], {})) == 1


def test_check_runs_the_exported_inputs_by_name(tmp_path):
    """Keyword example inputs and renamed inputs still reach the right ONNX inputs."""

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) - self.b(y)

    torch.manual_seed(0)
    x, y = torch.randn(3, 4), 5 * torch.randn(3, 4)
    qm = qtrim_fx.prepare(Two())
    qtrim_fx.calibrate(qm, [(x, y)])
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.export_onnx(qm.eval(), {"x": x, "y": y}, tmp_path / "a.onnx")
    qtrim_fx.export_onnx(qm, (x, y), tmp_path / "b.onnx", input_names=["first", "second"])


def test_rounding_cascades_within_the_models_own_noise_floor_pass():
    """Deep nets cascade rounding flips (tv_resnet18 for TensorRT: ORT vs torch 39 dB, as far off as torch
    itself with its quantizer inputs moved by a few ulps); a mismatch stays far above that floor."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 1000))
    cascade = ref + 0.02 * rng.normal(size=ref.shape)  # every element a few "units" off
    (bad,) = compare_outputs(["y"], [cascade], [ref], {"y": 0.005})  # beyond one-flip units ...
    jittered = [[ref + 0.02 * rng.normal(size=ref.shape)], [ref + 0.015 * rng.normal(size=ref.shape)]]
    assert compare_outputs(["y"], [cascade], [ref], {"y": 0.005}, jittered) == []  # ... but noise
    (bad,) = compare_outputs(["y"], [ref * 1.5], [ref], {"y": 0.005}, jittered)  # a mis-scaled output is not
    assert bad.off_share > 0.5
    one_channel = cascade.copy()
    one_channel[:, 7] += 1.0  # one element per row far off: beyond the noise's largest element
    assert len(compare_outputs(["y"], [one_channel], [ref], {"y": 0.005}, jittered)) == 1


class _TopKHead(nn.Module):
    """Top-3 of a ReLU output (many exact zeros) and their indices: ties that either side breaks its own way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(3, 2)

    def forward(self, x):
        values, idx = torch.topk(torch.relu(self.fc(x)), 3, dim=-1)
        return (self.out(values), idx, torch.argmax(torch.relu(self.fc(x)) * 0.0, dim=-1),
                torch.max(torch.relu(self.fc(x)) * 0.0, 1)[1])


def test_indices_of_tied_values_are_not_a_disagreement(tmp_path):
    torch.manual_seed(0)
    model, x = _TopKHead().eval(), torch.randn(6, 8)
    qm = qtrim_fx.prepare(model, (x,))
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.export_onnx(qm.eval(), (x,), tmp_path / "m.onnx")  # raised ExportError: the indices "differed"


def test_indices_of_different_values_are_still_a_disagreement():
    from qtrim_fx.onnx.self_check import _tied_index_outputs

    gm = torch.fx.symbolic_trace(_TopKHead().eval())
    x = torch.randn(4, 8)
    ref = [t.detach().numpy() for t in gm(x)]
    got = [r.copy() for r in ref]
    assert _tied_index_outputs(gm, (x,), got, ref) == {1, 2, 3}  # the same answers: trivially "tied"
    got[1] = (ref[1] + 1) % 8  # other positions: other values (the relu output is not all ties)
    assert 1 not in _tied_index_outputs(gm, (x,), got, ref)


def test_ties_are_recognised_in_torch_export_graphs_too():
    from qtrim_fx.onnx.self_check import _tied_index_outputs

    x = torch.randn(4, 8)
    gm = torch.export.export(_TopKHead().eval(), (x,)).module()  # aten.topk / aten.argmax / aten.max.dim
    assert isinstance(gm, torch.fx.GraphModule)
    ref = [t.detach().numpy() for t in gm(x)]
    got = [r.copy() for r in ref]
    got[2] = (ref[2] + 3) % 8  # argmax of an all-zero row: every index selects the same value
    got[3] = (ref[3] + 5) % 8
    assert {2, 3} <= _tied_index_outputs(gm, (x,), got, ref)


@pytest.mark.parametrize(("name", "target"), [("tiny_convnet", "onnxruntime"), ("tiny_mlp", "qnn")])
def test_fused_kernels_agree_within_rounding_on_small_models(tmp_path, name, target):
    """``verify_export(optimize=True)`` (``benchmarks/zoo.py --ort-optimize``): ONNX Runtime's fused integer
    kernels (QLinearConv, QGemm) requantize in fixed point, so they may flip roundings, never more."""
    from qtrim_fx.onnx.self_check import verify_export

    qm, ex = _calibrated(name)
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, ex, path, target=for_this_cpu(target))  # uint8 weights where int8 ones saturate
    verify_export(qtrim_fx.lower(qm, target), ex, path, optimize=True)  # raises ExportError on a disagreement
    assert path.exists()
    _corrupt_one_dequantize(path)
    with pytest.raises(ExportError):
        verify_export(qtrim_fx.lower(qm, target), ex, path, optimize=True)
