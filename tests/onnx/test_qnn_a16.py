"""16-bit activations for the QNN HTP (A16W8, issue 20): ``prepare(target="qnn", config=QuantConfig(act_bits=16))``.

The export picks opset 21 (the first with uint16 Q/DQ) by itself, and an explicit older opset is refused with
the fix named. The scalar operand of a quantized elementwise op (the attention scale ``Mul``) is written on the
other operand's storage type: as uint8 next to uint16 activations the HTP ran each score ``Mul`` at ~3M cycles
(40 % of vit_tiny's time). The file loads strictly on the HTP simulator (default options and ``soc_model=60``),
0 CPU nodes, and matches the lowered torch model >= 30 dB (8-bit activations: ~22 dB on vit_tiny).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from tests.helpers.htp import require_htp

_VIT = {"batch_size": 1, "image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2}


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((out - ref) ** 2)))


@pytest.fixture(scope="module")
def a16(tmp_path_factory):
    """A tiny ViT prepared for qnn with 16-bit activations, calibrated, at λ = 1; its file; a test input."""
    model, (x,) = get_model("vit_tiny", **_VIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, (x,), target="qnn", config=qtrim_fx.QuantConfig(act_bits=16))
        qtrim_fx.calibrate(qm, [get_model("vit_tiny", **_VIT, seed=s)[1] for s in range(1, 5)])
        qtrim_fx.set_blend(qm, 1.0)
        qm.eval()
        path = tmp_path_factory.mktemp("a16") / "vit.qnn_a16.onnx"
        qtrim_fx.export_onnx(qm, (x,), path, target="qnn")
    return qm, path, get_model("vit_tiny", **_VIT, seed=99)[1][0]


def test_a16_qnn_file_is_opset_21_uint16_with_uint16_scalar_operands(a16):
    qm, path, test = a16
    m = onnx.load(path)
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    inits = {i.name: i for i in m.graph.initializer}
    quantizers = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and {inits[n.input[2]].data_type for n in quantizers} == {onnx.TensorProto.UINT16}
    scalars = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and ".constant/" in n.name]
    assert scalars, "the attention scale Mul has no dequantized scalar operand"
    assert {inits[n.input[0]].data_type for n in scalars} == {onnx.TensorProto.UINT16}
    assert qtrim_fx.onnx.check(path, "qnn") == []
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = qm(test).numpy()
    assert _sqnr(ref, sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0]) >= 30


def test_a16_below_opset_21_is_refused_with_the_fix(a16, tmp_path):
    qm, _, test = a16
    with pytest.raises(qtrim_fx.ProfileError, match=r"16-bit activations .* needs opset >= 21.*pass opset=21"):
        qtrim_fx.export_onnx(qm, (test,), tmp_path / "old.onnx", target="qnn", opset=20)


@pytest.mark.parametrize("options", [{}, {"soc_model": "60"}], ids=["default", "soc_model=60"])
def test_a16_qnn_file_runs_strictly_on_the_htp_and_matches_lowering(a16, options):
    require_htp()
    import onnxruntime as ort

    from qtrim_fx.verification.backend_worker import _assignment_info, _qnn_session

    qm, path, test = a16
    x = test.numpy()
    sess, _ = _qnn_session(ort, str(path), [x], options)  # strict: CPU fallback disabled
    assert set(_assignment_info(sess)[1]) == {"QNNExecutionProvider"}
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    del sess
    with torch.no_grad():
        ref = qm(test).numpy()
    assert _sqnr(ref, out) >= 30
