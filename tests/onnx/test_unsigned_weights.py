"""UnsignedWeightsPass / the ``onnxruntime_avx2`` target: the int8 weight grid stored as uint8 around 128."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import qtrim_fx
from tests.helpers.cpu import u8s8_kernels_saturate

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class ConvAttention(nn.Module):
    """A conv stem, one softmax attention over its pixels (MatMuls on weights), a Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 64, 16)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) * 0.25, dim=-1)
        return self.head(self.out(a @ v).mean(1))


def _export(tmp_path, target: str, opset: int | None = None) -> tuple[str, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvAttention().eval()
    x = torch.randn(4, 3, 8, 8) * 2
    qm = qtrim_fx.prepare(model, (x,), target="onnxruntime")
    qtrim_fx.calibrate(qm, [(x,)], bias_correction=False)
    qtrim_fx.set_blend(qm, 1.0)
    path = str(tmp_path / f"{target}{opset or ''}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target, **({"opset": opset} if opset else {}))
    return path, qm, x


def _weight_dqs(path: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    m = onnx.load(path)
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    readers = {}
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n.op_type, i))
    out = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init and \
                all(op in WEIGHTED and i == 1 for op, i in readers.get(n.output[0], [])):
            zp = init[n.input[2]] if len(n.input) > 2 and n.input[2] else None
            out.append((init[n.input[0]], zp))
    return out


def _run(path: str, x: torch.Tensor, fused: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_weights_are_stored_as_uint8_around_128_on_the_same_grid(tmp_path):
    signed, _, _ = _export(tmp_path, "onnxruntime")
    unsigned, _, _ = _export(tmp_path, "onnxruntime_avx2")
    s8, u8 = _weight_dqs(signed), _weight_dqs(unsigned)
    assert len(s8) == len(u8) == 4  # conv, qkv, out, head
    for (a, za), (b, zb) in zip(s8, u8, strict=True):
        assert a.dtype == np.int8 and (za is None or not za.any())
        assert b.dtype == np.uint8 and zb.dtype == np.uint8 and (zb == 128).all() and zb.shape == np.shape(za)
        assert np.array_equal(b.astype(np.int16) - 128, a.astype(np.int16))  # the same codes, shifted
        assert b.min() >= 1  # narrow range: -127 -> 1, never 0
    assert not [v for v in qtrim_fx.onnx.check(unsigned, "onnxruntime_avx2") if v.severity == "error"]
    # the plain onnxruntime profile takes int8 weights at zero point 0 only: check says what is off
    rules = {v.rule for v in qtrim_fx.onnx.check(unsigned, "onnxruntime")}
    assert {"weight_dtype", "weight_zero_point"} <= rules


def test_the_file_computes_the_same_values(tmp_path):
    signed, qm, x = _export(tmp_path, "onnxruntime")
    unsigned, _, _ = _export(tmp_path, "onnxruntime_avx2")
    with torch.no_grad():
        want = qm(x).numpy()
    a, b = _run(signed, x, fused=False), _run(unsigned, x, fused=False)
    np.testing.assert_array_equal(a, b)  # QDQ semantics: every weight dequantizes to the same float
    np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    at19, _, _ = _export(tmp_path, "onnxruntime_avx2", opset=19)  # onnx.reference implements DQ from opset 19
    ref = ReferenceEvaluator(at19).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_onnx_runtime_fused_kernels_are_exact_on_uint8_weights_on_any_cpu(tmp_path):
    signed, qm, x = _export(tmp_path, "onnxruntime")
    unsigned, _, _ = _export(tmp_path, "onnxruntime_avx2")
    with torch.no_grad():
        want = qm(x).numpy()
    scale = np.abs(want).max()
    u8 = _run(unsigned, x, fused=True)
    assert np.abs(u8 - want).max() <= 0.01 * scale  # U8U8 kernels: at most a requantization flip
    s8 = _run(signed, x, fused=True)
    if u8s8_kernels_saturate():  # x86 without VNNI: the U8S8 GEMM's int16 pair sums overflow
        assert np.abs(s8 - want).max() > 0.05 * scale
    else:
        assert np.abs(s8 - want).max() <= 0.01 * scale


def test_int4_and_activation_grids_are_left_alone(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    qm = qtrim_fx.prepare(model, (x,), target="onnxruntime",
                          config=qtrim_fx.QuantConfig(weight_bits=4))
    qtrim_fx.calibrate(qm, [(x,)], bias_correction=False)
    qtrim_fx.set_blend(qm, 1.0)
    path = str(tmp_path / "w4.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm.eval(), (x,), path, target="onnxruntime_avx2", opset=21)
    m = onnx.load(path)
    types = {i.name: i.data_type for i in m.graph.initializer}
    weight_codes = [n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in types
                    and "weight" in n.input[0]]
    assert weight_codes and all(types[c] == onnx.TensorProto.INT4 for c in weight_codes)


@pytest.mark.parametrize("bad", ["zero_point", "code_zero"])
def test_check_refuses_a_broken_uint8_weight_grid(tmp_path, bad):
    path, _, _ = _export(tmp_path, "onnxruntime_avx2")
    m = onnx.load(path)
    init = {i.name: i for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
              and numpy_helper.to_array(init[n.input[0]]).dtype == np.uint8 and "conv" in n.input[0])
    if bad == "zero_point":
        zp = numpy_helper.to_array(init[dq.input[2]]).copy()
        zp[0] = 127
        init[dq.input[2]].CopyFrom(numpy_helper.from_array(zp, dq.input[2]))
    else:
        codes = numpy_helper.to_array(init[dq.input[0]]).copy()
        codes.flat[0] = 0  # -128 around 128: off the narrow grid
        init[dq.input[0]].CopyFrom(numpy_helper.from_array(codes, dq.input[0]))
    broken = str(tmp_path / "broken.onnx")
    onnx.save(m, broken)
    rules = {v.rule for v in qtrim_fx.onnx.check(broken, "onnxruntime_avx2")}
    assert ("weight_zero_point" if bad == "zero_point" else "weight_narrow_range") in rules


def test_the_fused_self_check_names_a_saturating_cpu(tmp_path):
    """``verify_export(optimize=True)`` on an int8-weight file: on a CPU whose U8S8 kernels saturate the error says
    so and names the fix; elsewhere the file passes."""
    from qtrim_fx.core.errors import ExportError
    from qtrim_fx.onnx.self_check import verify_export

    signed, qm, x = _export(tmp_path, "onnxruntime")
    lowered = qtrim_fx.lower(qm, "onnxruntime")
    if u8s8_kernels_saturate():
        with pytest.raises(ExportError, match=r"(?s)no VNNI.*onnxruntime_avx2"):
            verify_export(lowered, (x,), signed, optimize=True)
    else:
        verify_export(lowered, (x,), signed, optimize=True)
    unsigned, _, _ = _export(tmp_path, "onnxruntime_avx2")
    verify_export(lowered, (x,), unsigned, optimize=True)  # exact on every CPU
