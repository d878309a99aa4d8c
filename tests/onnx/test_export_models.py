"""Export acceptance on real models: structure, parity with ONNX Runtime / onnx.reference, targets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.onnx import ExportError, ProfileError, check
from qtrim_fx.onnx.export_model import export_onnx
from qtrim_fx.onnx.self_check import verify_export
from tests.helpers.cpu import for_this_cpu, u8s8_kernels_saturate
from tests.helpers.qmodels import calibrated, train_on_digits


def _session(path, optimize=False, opt_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, x: torch.Tensor) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((out - ref).astype(np.float64) ** 2).sum()))


def _structure_ok(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert all(n.domain in ("", "ai.onnx") for n in g.node)
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3 and n.input[2], f"{n.name} has no explicit zero point"
            scale = inits.get(n.input[1])
            axis = [a for a in n.attribute if a.name == "axis"]
            if scale is not None and not axis:
                assert len(scale.dims) == 0, f"per-tensor scale of {n.name} is not 0-D"
        if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(n.input) > 1:
            w = n.input[1]
            dq = producers.get(w)
            if w in inits or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits):
                assert dq is not None and dq.op_type == "DequantizeLinear", f"{n.name}: float weight"
                assert inits[dq.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)


BATCH = 32


def _trained(name: str, epochs: int = 2, max_steps: int | None = None, lr: float = 1e-3):
    model, _ = get_model(name, num_classes=10, image_size=32)
    model, calib, xs, _ys = train_on_digits(model, epochs=epochs, max_steps=max_steps, lr=lr)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, calib)
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), xs[:BATCH]


@pytest.fixture(scope="module")
def resnet18():
    return _trained("tv_resnet18")


def _parity(qm, x, path, target="onnxruntime"):
    model = export_onnx(qm, (x[:1],), path, target)
    _structure_ok(model)
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _run(_session(path), x)
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert _sqnr(ref, out) >= 35.0
    return model


def test_resnet18_onnxruntime_structure_parity_and_integer_kernels(resnet18, tmp_path):
    qm, x = resnet18
    path = tmp_path / "r18.onnx"
    model = _parity(qm, x, path)
    assert model.ir_version <= 10
    assert check(path, "onnxruntime") == []
    opt = tmp_path / "r18.opt.onnx"
    _session(path, optimize=True, opt_path=opt)
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    # Every Conv on integers; the one float Gemm is the head, whose output (the logits) stays float.
    assert "Conv" not in ops and ops.count("Gemm") == 1, sorted(set(ops))
    head = next(n for n in onnx.load(opt).graph.node if n.op_type == "Gemm")
    assert head.output[0] in {o.name for o in onnx.load(opt).graph.output}
    assert ops.count("QLinearConv") == 20
    assert ops.count("QLinearAdd") == 8 and "Add" not in ops  # the residual after MaxPool included
    assert "MaxPool" not in ops  # runs on uint8 (NhwcMaxPool) between its Q/DQ pair


def test_resnet18_tensorrt_and_every_profile_from_one_checkpoint(resnet18, tmp_path):
    qm, x = resnet18
    for target in ("tensorrt", "openvino", "qnn", "npu", "onnxruntime"):
        path = tmp_path / f"{target}.onnx"
        model = export_onnx(qm, (x[:1],), path, target)
        _structure_ok(model)
        assert check(path, target) == [], target
        out = _run(_session(path), x[:8])
        assert np.isfinite(out).all()
    trt = onnx.load(tmp_path / "tensorrt.onnx")
    assert max(o.version for o in trt.opset_import if o.domain in ("", "ai.onnx")) <= 20
    inits = {i.name: i for i in trt.graph.initializer}
    for n in trt.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.data_type == onnx.TensorProto.INT8
            assert not onnx.numpy_helper.to_array(zp).any()


def test_openvino_runs_the_export_and_agrees_with_ort(resnet18, tmp_path):
    ov = pytest.importorskip("openvino")
    qm, x = resnet18
    path = tmp_path / "r18.onnx"
    export_onnx(qm, (x[:1],), path, for_this_cpu("onnxruntime"))  # x86 without VNNI: uint8 weights (see helper)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out_ov = compiled(x.numpy())[0]
    out_ort = _run(_session(path, optimize=True), x)
    assert (out_ov.argmax(1) == out_ort.argmax(1)).mean() >= 0.99
    conv_prec = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected")
    ]
    if u8s8_kernels_saturate():  # OpenVINO decompresses the uint8 weights used on this CPU to float (mostly)
        assert conv_prec and "f32" in conv_prec, conv_prec
    else:
        assert conv_prec and all(p in ("u8", "i8") for p in conv_prec), conv_prec


def test_small_model_matches_onnx_reference(tmp_path):
    from onnx.reference import ReferenceEvaluator

    model, (x,) = get_model("tiny_convnet")
    qm = calibrated(model, [x, x * 0.5])
    path = tmp_path / "tiny.onnx"
    export_onnx(qm, (x,), path, "onnxruntime", opset=19)
    ref = ReferenceEvaluator(str(path))
    out = ref.run(None, {ref.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        want = qm(x).numpy()
    assert _sqnr(want, out) >= 35.0 and (out.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_sdpa", "vit_tiny_mha"])
def test_vit_exports_keep_softmax_float(name, tmp_path):
    model, (x,) = get_model(name, batch_size=8)
    qm = calibrated(model, [x])
    path = tmp_path / f"{name}.onnx"
    m = export_onnx(qm, (x[:1],), path, "onnxruntime")
    _structure_ok(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "Softmax":
            p = producers.get(n.input[0])
            assert p is None or p.op_type != "DequantizeLinear"
            for c in m.graph.node:
                if n.output[0] in c.input:
                    assert c.op_type != "QuantizeLinear"
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _run(_session(path), x)
    # The file computes the model up to rounding: export's own rule on ORT (a value on a rounding boundary that
    # another summation order flips by one step; in a random-init ViT one flip moves a whole sample's logits),
    # and close overall.
    verify_export(qtrim_fx.lower(qm), (x,), path)
    assert _sqnr(ref, out) >= 30.0


def test_tv_mobilenet_v3_small_export(tmp_path):
    qm, x = _trained("tv_mobilenet_v3_small", epochs=2)
    _parity(qm, x, tmp_path / "mnv3.onnx")
    assert check(tmp_path / "mnv3.onnx", "onnxruntime") == []


def test_tv_vit_b_16_export(tmp_path):
    qm, x = _trained("tv_vit_b_16", epochs=1, max_steps=6, lr=1e-4)
    m = _parity(qm, x, tmp_path / "vit.onnx")
    assert check(tmp_path / "vit.onnx", "onnxruntime") == []
    assert not any(n.op_type == "Softmax" and n.input[0].endswith("_dequantized") for n in m.graph.node)


def test_int4_weights_need_opset_21_and_run_on_ort(tmp_path):
    model, (x,) = get_model("tiny_convnet")
    qm = calibrated(model, [x], config=qtrim_fx.QuantConfig(weight_bits=4))
    with pytest.raises((ExportError, ProfileError), match="21"):  # an explicit older opset is refused
        export_onnx(qm, (x,), tmp_path / "bad.onnx", "onnxruntime", opset=17)
    assert not (tmp_path / "bad.onnx").exists()
    auto = export_onnx(qm, (x,), tmp_path / "auto.onnx", "onnxruntime")  # no opset given: 21 is chosen
    assert {o.version for o in auto.opset_import if o.domain in ("", "ai.onnx")} == {21}
    with pytest.raises((ExportError, ProfileError)):
        export_onnx(qm, (x,), tmp_path / "trt.onnx", "tensorrt", opset=21)
    m = export_onnx(qm, (x,), tmp_path / "w4.onnx", "onnxruntime", opset=21)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in m.graph.initializer)
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _run(_session(tmp_path / "w4.onnx"), x)
    assert _sqnr(ref, out) >= 35.0


def test_export_errors(tmp_path):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    with pytest.raises(ExportError, match="never saw data") as e:
        export_onnx(qm, (x,), tmp_path / "a.onnx")
    assert "conv1.weight" in str(e.value) and "calibrate" in str(e.value)
    qtrim_fx.calibrate(qm, [x])
    with pytest.raises(ProfileError, match="unknown target"):
        export_onnx(qm, (x,), tmp_path / "b.onnx", "no-such-backend")
    assert not list(tmp_path.iterdir())


def test_small_bert_via_torch_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 8:] = 0
    qm = qtrim_fx.prepare(model, example_inputs={"input_ids": ids, "attention_mask": mask})
    assert qtrim_fx.inspect(qm).frontend == "torch.export"
    qtrim_fx.calibrate(qm, [{"input_ids": ids, "attention_mask": mask}])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    path = tmp_path / "bert.onnx"
    m = export_onnx(qm, (ids, mask), path)
    _structure_ok(m)
    assert check(path, "onnxruntime") == []
    producers = {o: n for n in m.graph.node for o in n.output}
    softmaxes = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for n in softmaxes:
        p = producers.get(n.input[0])
        assert p is None or p.op_type != "DequantizeLinear"
        assert not any(n.output[0] in c.input and c.op_type == "QuantizeLinear" for c in m.graph.node)
    sess = _session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy(), sess.get_inputs()[1].name: mask.numpy()})[0]
    with torch.no_grad():
        ref = qm(input_ids=ids, attention_mask=mask).logits.numpy()
    assert _sqnr(ref, out) >= 35.0 and (out.argmax(1) == ref.argmax(1)).all()
