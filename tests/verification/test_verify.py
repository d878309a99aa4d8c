"""qtrim_fx.verify on real runtimes, with FP32 and QDQ models built here (torch export + ORT quantize_static)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from qtrim_fx.models import get_model

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.verification import backend_worker as worker
from qtrim_fx.verification.metrics import _Accumulator
from qtrim_fx.verification.run import VerifyReport, verify

BOGUS_PYTHON = "/nonexistent/venv/bin/python"
IN_PROCESS = ("onnxruntime", "onnxruntime-noopt", "openvino", "onnx-reference")


def _export(module: torch.nn.Module, example: torch.Tensor, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), path, dynamo=False, opset_version=17, input_names=["x"],
            output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    return path


def _quantize(fp32_path: str, path: str, calibration: list[np.ndarray]) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"x": x} for x in calibration)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        fp32_path, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A TinyConvNet, its FP32 ONNX, a QDQ version of it, and input batches."""
    tmp = tmp_path_factory.mktemp("verify")
    module, (example,) = get_model("tiny_convnet", batch_size=4)
    fp32 = _export(module, example, str(tmp / "fp32.onnx"))
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((4, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    qdq = _quantize(fp32, str(tmp / "qdq.onnx"), calibration)
    batches = [torch.from_numpy(rng.standard_normal((4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    return {"module": module, "fp32": fp32, "qdq": qdq, "batches": batches, "tmp": tmp}


@pytest.fixture(scope="module")
def qdq_report(setup) -> VerifyReport:
    return verify(setup["qdq"], setup["fp32"], setup["batches"], qnn_python=BOGUS_PYTHON, per_layer=True)


def _by_backend(report: VerifyReport) -> dict:
    return {b.backend: b for b in report.backends}


def test_identical_model_against_itself(setup):
    report = verify(setup["fp32"], setup["fp32"], setup["batches"], backends=["onnxruntime-noopt"])
    (result,) = report.backends
    assert result.status == "ok"
    (out,) = result.outputs
    assert out.output == "logits" and out.shape == [4, 10]
    assert out.sqnr_db == math.inf and out.mse == 0.0 and out.max_abs_err == 0.0
    assert out.top1 == 1.0 and out.cosine == pytest.approx(1.0)
    assert report.ok(min_sqnr_db=100, min_top1=1.0)
    assert "inf" in report.table() and "100.00%" in report.table()


def test_qdq_against_fp32_has_plausible_figures(qdq_report):
    results = _by_backend(qdq_report)
    assert list(results) == ["onnxruntime", "onnxruntime-noopt", "openvino", "onnx-reference", "qnn"]
    for name in IN_PROCESS:
        assert results[name].status == "ok", results[name].message
        (out,) = results[name].outputs
        assert math.isfinite(out.sqnr_db) and 10.0 < out.sqnr_db < 80.0
        assert 0.0 < out.mse < 1.0 and 0.0 < out.max_abs_err < 5.0
        assert 0.95 < out.cosine < 1.0
        assert 0.5 <= out.top1 <= 1.0
    assert "INFERENCE_PRECISION_HINT=f32" in results["openvino"].info
    assert qdq_report.ok(min_sqnr_db=10)
    assert not qdq_report.ok(min_sqnr_db=200)
    assert any("SQNR" in f for f in qdq_report.failures(min_sqnr_db=200))


def test_missing_backend_is_skipped_with_hint(qdq_report):
    qnn = _by_backend(qdq_report)["qnn"]
    assert qnn.status == "skipped" and not qnn.outputs
    assert BOGUS_PYTHON in qnn.message
    assert "pip install onnxruntime-qnn" in qnn.message and "QTRIM_QNN_PYTHON" in qnn.message
    assert "skipped" in qdq_report.table() and "QTRIM_QNN_PYTHON" in qdq_report.table()


def test_pairwise_section(qdq_report):
    pairs = {(p.a, p.b): p for p in qdq_report.pairs}
    assert len(pairs) == 6  # every pair of the four backends that ran
    noopt_vs_ref = pairs[("onnxruntime-noopt", "onnx-reference")].outputs[0]
    assert noopt_vs_ref.sqnr_db > 60  # both implement the spec; only float rounding differs
    ort_vs_ov = pairs[("onnxruntime", "openvino")].outputs[0]
    assert ort_vs_ov.sqnr_db > 20 and ort_vs_ov.top1 is not None
    assert "Backend pairs" in qdq_report.table()


def test_json_and_markdown_hold_the_figures(qdq_report, setup):
    path = setup["tmp"] / "report.json"
    text = qdq_report.to_json(path)
    data = json.loads(path.read_text())
    assert json.loads(text) == data
    ort = next(b for b in data["backends"] if b["backend"] == "onnxruntime")
    out = ort["outputs"][0]
    expected = _by_backend(qdq_report)["onnxruntime"].outputs[0]
    for key in ("mse", "sqnr_db", "max_abs_err", "cosine", "top1"):
        assert out[key] == pytest.approx(getattr(expected, key))
    assert {"a", "b", "outputs"} <= set(data["pairs"][0])
    pair_sqnrs = [p["outputs"][0]["sqnr_db"] for p in data["pairs"]]
    assert all(isinstance(s, float) or s == "inf" for s in pair_sqnrs)
    assert data["per_layer"]["layers"] and data["per_layer"]["worst"]
    md = qdq_report.to_markdown(setup["tmp"] / "report.md")
    assert (setup["tmp"] / "report.md").read_text() == md
    table = qdq_report.table()
    for text_form in (md, table):
        assert f"{expected.sqnr_db:.2f}" in text_form
        assert f"{expected.mse:.3e}" in text_form
        assert f"{100 * expected.top1:.2f}%" in text_form
        assert "openvino" in text_form and "onnx-reference" in text_form
    assert "| backend | status |" in md


def test_json_encodes_infinity_as_strings(setup):
    report = verify(setup["fp32"], setup["fp32"], setup["batches"][:1], backends=["onnxruntime-noopt"])
    data = json.loads(report.to_json())
    assert data["backends"][0]["outputs"][0]["sqnr_db"] == "inf"
    assert report.to_dict()["backends"][0]["outputs"][0]["sqnr_db"] == math.inf


def test_per_layer_names_layers(qdq_report):
    pl = qdq_report.per_layer
    assert pl is not None and pl.status == "ok", pl.message
    names = [la.layer for la in pl.layers]
    assert "/conv1/Conv" in names and "/conv2/Conv" in names and "/fc/Gemm" in names
    assert any(la.op_type == "DequantizeLinear" for la in pl.layers)
    assert len(set(names)) == len(names)
    assert pl.worst and set(pl.worst) <= set(names)
    worst = next(la for la in pl.layers if la.layer == pl.worst[0])
    assert all(worst.sqnr_db <= la.sqnr_db for la in pl.layers)
    assert all(math.isfinite(la.sqnr_db) and la.sqnr_db > 5 for la in pl.layers)
    table = qdq_report.table()
    assert "Worst layers:" in table and "/conv1/Conv" in table


def test_torch_module_reference_and_per_layer_export(setup):
    module = setup["module"].train()
    report = verify(
        setup["qdq"], module, setup["batches"], backends=["onnxruntime", "onnxruntime-noopt"], per_layer=True
    )
    assert module.training  # restored after running it in eval mode
    assert "torch TinyConvNet" in report.reference
    for result in report.backends:
        assert result.status == "ok"
        assert 10 < result.outputs[0].sqnr_db < 80
    assert report.per_layer.status == "ok", report.per_layer.message
    assert "/conv1/Conv" in [la.layer for la in report.per_layer.layers]
    module.eval()


def test_torch_reference_fp32_export_is_close(setup):
    report = verify(setup["fp32"], setup["module"], setup["batches"], backends=["onnxruntime"])
    out = report.backends[0].outputs[0]
    assert out.sqnr_db > 100 and out.top1 == 1.0  # only float rounding between torch and ORT


def test_backend_out_of_process_matches_in_process(setup):
    args = (setup["qdq"], setup["fp32"], setup["batches"])
    inproc = verify(*args, backends=["onnxruntime-noopt"])
    outproc = verify(
        *args, backends=["onnxruntime-noopt"], subprocess_python={"onnxruntime-noopt": sys.executable}
    )
    assert outproc.backends[0].status == "ok", outproc.backends[0].message
    assert "out of process" in outproc.backends[0].info
    assert outproc.backends[0].outputs[0].mse == inproc.backends[0].outputs[0].mse


def test_backend_error_is_reported_not_raised(setup):
    model = onnx.load(setup["fp32"])
    model.graph.node[0].op_type = "NoSuchOp"  # every runtime rejects it
    broken = str(setup["tmp"] / "broken.onnx")
    onnx.save(model, broken)
    report = verify(broken, setup["fp32"], setup["batches"][:1], backends=["onnxruntime", "openvino"])
    for result in report.backends:
        assert result.status == "error" and "NoSuchOp" in result.message
    assert not report.ok()
    assert any("error" in f for f in report.failures())
    assert report.pairs == []


def test_onnx_reference_skipped_for_large_models(setup, monkeypatch):
    monkeypatch.setattr(worker, "REFERENCE_MAX_PARAMS", 10)
    report = verify(setup["qdq"], setup["fp32"], setup["batches"][:1], backends=["onnx-reference"])
    (result,) = report.backends
    assert result.status == "skipped" and "parameters" in result.message
    assert not report.ok()  # nothing ran


def test_argument_errors(setup):
    with pytest.raises(ValueError, match="unknown backend"):
        verify(setup["qdq"], setup["fp32"], setup["batches"], backends=["tensorrt-on-cpu"])
    with pytest.raises(ValueError, match="takes 1 input"):
        verify(setup["qdq"], setup["fp32"], [(setup["batches"][0], torch.zeros(4))], backends=["onnxruntime"])
    with pytest.raises(ValueError, match="empty"):
        verify(setup["qdq"], setup["fp32"], [], backends=["onnxruntime"])
    with pytest.raises(FileNotFoundError):
        verify(str(setup["tmp"] / "missing.onnx"), setup["fp32"], setup["batches"])
    with pytest.raises(TypeError, match="reference"):
        verify(setup["qdq"], 42, setup["batches"], backends=["onnxruntime"])
    report = verify(setup["fp32"], setup["fp32"], setup["batches"][:1], backends=["onnxruntime-noopt"])
    with pytest.raises(ValueError, match="fraction"):
        report.ok(min_top1=99)


def test_accumulator_edge_cases():
    acc = _Accumulator()
    acc.update(np.zeros((2, 3)), np.zeros((2, 3)))
    m = acc.metrics("zeros")
    assert m.sqnr_db == math.inf and m.mse == 0 and m.cosine == 1.0 and m.top1 == 1.0
    acc = _Accumulator()
    acc.update(np.zeros(4), np.ones(4))
    m = acc.metrics("bias")
    assert m.sqnr_db == -math.inf and m.mse == 1.0 and m.top1 is None
    acc = _Accumulator()
    acc.update(np.array([[1.0, 2.0]]), np.array([[1.0, math.nan]]))
    assert math.isnan(acc.metrics("nan").mse)
    acc = _Accumulator()
    acc.update(np.array([[3.0, 4.0]]), np.array([[3.0, 5.0]]))
    m = acc.metrics("one")
    assert m.sqnr_db == pytest.approx(10 * math.log10(25.0)) and m.mse == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros(3), np.zeros(4))


def _qnn_python() -> str | None:
    python = os.environ.get("QTRIM_QNN_PYTHON")
    if python and os.path.exists(python):
        return python
    return sys.executable if importlib.util.find_spec("onnxruntime_qnn") else None


@pytest.mark.skipif(_qnn_python() is None, reason="onnxruntime-qnn not installed; set QTRIM_QNN_PYTHON")
def test_qnn_htp_simulator(setup):
    report = verify(
        setup["qdq"], setup["fp32"], setup["batches"][:2], backends=["qnn"], qnn_python=_qnn_python()
    )
    (result,) = report.backends
    assert result.status == "ok", result.message
    assert "QNNExecutionProvider" in result.info
    assert 10 < result.outputs[0].sqnr_db < 80


class _TwoInTwoOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(a + b), (a * b).unsqueeze(1)


def test_several_inputs_and_outputs(tmp_path):
    module = _TwoInTwoOut().eval()
    a, b = torch.randn(3, 6), torch.randn(3, 6)
    path = str(tmp_path / "two.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (a, b), path, dynamo=False, input_names=["a", "b"], output_names=["y", "z"])
    batches = [(a.double(), b.double()), (a, b)]  # float64 is cast to the graph's float32
    report = verify(path, module, batches, backends=["onnxruntime", "onnx-reference"])
    assert report.output_names == ["y", "z"] and report.num_samples == 6
    for result in report.backends:
        assert result.status == "ok", result.message
        y, z = result.outputs
        assert y.shape == [3, 5] and y.top1 == 1.0 and y.sqnr_db > 100
        assert z.shape == [3, 1, 6] and z.top1 is None
    assert report.ok(min_sqnr_db=100, min_top1=1.0)


def test_per_layer_matches_our_export_against_the_float_model(tmp_path):
    from qtrim_fx.models import get_model

    import qtrim_fx

    model, (x,) = get_model("tiny_convnet", batch_size=4)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "q.onnx"
    qtrim_fx.export_onnx(qm, (x[:1],), path)
    report = qtrim_fx.verify(path, model, [x], backends=("onnxruntime-noopt",), per_layer=True)
    convs = [layer for layer in report.per_layer.layers if layer.op_type in ("Conv", "Gemm")]
    assert len(convs) == 3  # conv1, conv2, fc
    assert all(layer.sqnr_db > 10 for layer in convs)


# -- QNN HTP (simulated): strict by default, options, per-EP node counts ----------------------------------
_QNN_PLATFORM = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def _require_qnn() -> str:
    python = _qnn_python()
    if python is None and _QNN_PLATFORM:
        pytest.fail("onnxruntime-qnn is part of the dev extra on Linux x86-64: pip install -e '.[dev]'")
    if python is None:
        pytest.skip("onnxruntime-qnn has no wheel for this platform")
    return python


def test_qnn_strict_by_default_with_node_counts_and_options(setup):
    python = _require_qnn()
    report = verify(setup["qdq"], setup["fp32"], setup["batches"][:1], backends=["qnn"], qnn_python=python,
                    backend_options={"qnn": {"soc_model": "60"}})
    (result,) = report.backends
    assert result.status == "ok", result.message
    assert "strict (CPU fallback disabled)" in result.info and "soc_model=60" in result.info
    # Every node on the HTP (ORT may duplicate shared DequantizeLinear nodes before placing them).
    assert list(result.ep_nodes) == ["QNNExecutionProvider"]
    assert result.ep_nodes["QNNExecutionProvider"] >= len(onnx.load(setup["qdq"]).graph.node)
    assert report.to_dict()["backends"][0]["ep_nodes"] == result.ep_nodes


def _float_erf(tmp_path) -> str:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="the_erf")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = str(tmp_path / "erf.onnx")
    onnx.save(model, path)
    return path


def test_qnn_strict_run_names_the_nodes_the_htp_refuses(tmp_path):
    python = _require_qnn()
    path = _float_erf(tmp_path)
    x = [np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)]
    report = verify(path, path, x, backends=["qnn"], qnn_python=python)
    (result,) = report.backends
    assert result.status == "error"
    assert "the_erf (Erf)" in result.message and "strict=0" in result.message
    loose = verify(path, path, x, backends=["qnn"], qnn_python=python, backend_options={"qnn": {"strict": "0"}})
    (result,) = loose.backends
    assert result.status == "ok", result.message
    assert result.ep_nodes.get("CPUExecutionProvider") == 1 and "CPU fallback allowed" in result.info


@pytest.mark.parametrize("options, match", [
    ({"onnxruntime": {"x": "1"}}, "only qnn take options"),
    ({"qnn": "soc_model=60"}, "must be a dict"),
    ("soc_model=60", "must be a dict"),
])
def test_backend_options_are_validated_before_running(setup, options, match):
    with pytest.raises(ConfigError, match=match):
        verify(setup["qdq"], setup["fp32"], setup["batches"][:1], backends=["onnxruntime"], backend_options=options)


def test_qnn_option_strict_value_is_checked(setup):
    python = _require_qnn()
    report = verify(setup["qdq"], setup["fp32"], setup["batches"][:1], backends=["qnn"], qnn_python=python,
                    backend_options={"qnn": {"strict": "maybe"}})
    assert report.backends[0].status == "error" and "strict='maybe'" in report.backends[0].message
