"""quant_dequant in torch, and export_lowered end to end: structure, numerics, errors, files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qtrim_fx.core.fakequant import fake_quantize_raw
from qtrim_fx.onnx import ExportError, ProfileError, TargetProfile, export_lowered, get_profile
from qtrim_fx.runtime.qdq import is_quant_dequant, quant_dequant
from tests.helpers.cpu import for_this_cpu
from tests.onnx.qdq_models import act_only, convnet, exported, run_ort, token_mixer, upsampler

PROFILES = ("onnxruntime", "tensorrt", "qnn", "openvino", "npu")
INT4 = get_profile("onnxruntime").replace(opset=21, weight_bits=4)


# -- quant_dequant in torch ------------------------------------------------------------------
def test_quant_dequant_is_onnx_fake_quant_with_straight_through_grad():
    x = torch.randn(4, 6, requires_grad=True)
    s, z = torch.rand(6) * 0.05 + 0.01, torch.zeros(6)
    y = quant_dequant(x, s, z, -127, 127, 1, 8, True, "w")
    assert torch.equal(y, fake_quantize_raw(x.detach(), s, z, -127, 127, 1))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_quant_dequant_keeps_dtype():
    x = torch.randn(8, dtype=torch.float64)
    y = quant_dequant(x, torch.tensor(0.1), torch.tensor(3.0), 0, 255, None, 8, False, "a")
    assert y.dtype == torch.float64
    assert torch.equal(y.float(), fake_quantize_raw(x.float(), torch.tensor(0.1), torch.tensor(3.0), 0, 255, None))


def test_quant_dequant_is_an_fx_leaf():
    gm, _ = convnet(get_profile("onnxruntime"))
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and is_quant_dequant(n.target)]
    assert len(sites) == 9  # input, 3 weights, 3 op outputs, relu1.out, pool.out
    retraced = torch.fx.symbolic_trace(gm)  # survives re-tracing of the generated code
    assert sum(is_quant_dequant(n.target) for n in retraced.graph.nodes if n.op == "call_function") == 9


def test_shared_tensor_gets_no_stray_cast(tmp_path):
    # A tensor read by quant_dequant and by another op: no aliasing Cast in the trace.
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(0.05))
            self.register_buffer("z", torch.tensor(0.0))
            self.w = torch.nn.Parameter(torch.randn(3, 3, 1, 1))

        def forward(self, x):
            y = torch.relu(x)
            q = quant_dequant(y, self.s, self.z, -128, 127, None, 8, True, "relu.out")
            return F.conv2d(q, self.w) + y

    gm = torch.fx.symbolic_trace(Residual())
    prof = TargetProfile("loose", quantize_op_outputs=False, enforce_op_outputs=False, activation_signed=True)
    model = export_lowered(gm, (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx", prof)
    assert [n.op_type for n in model.graph.node] == ["Relu", "QuantizeLinear", "DequantizeLinear", "Conv", "Add"]
    assert model.graph.node[0].name == "relu/Relu"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-129, 127, None, 8, True), r"does not fit int8"),
        ((0, 300, None, 8, False), r"does not fit uint8"),
        ((5, 5, None, 8, False), r"does not fit"),
        ((0, 15, None, 17, False), r"outside 2..16"),
        ((0, 255, 1.0, 8, False), r"axis must be None or an int"),
    ],
)
def test_quant_dequant_rejects_bad_grids(args, match):
    with pytest.raises(ExportError, match=match):
        quant_dequant(torch.randn(3), torch.tensor(0.1), torch.tensor(0.0), *args, "bad.site")


def test_quant_dequant_rejects_bad_qparam_shapes():
    x = torch.randn(4, 3)
    with pytest.raises(ExportError, match=r"per-tensor"):
        quant_dequant(x, torch.ones(3), torch.zeros(3), 0, 255, None, 8, False, "a")
    with pytest.raises(ExportError, match=r"per-channel scale must be 1-D with x.shape"):
        quant_dequant(x, torch.ones(4), torch.zeros(4), -127, 127, 1, 8, True, "w")
    with pytest.raises(ExportError, match=r"same shape"):
        quant_dequant(x, torch.ones(3), torch.zeros(()), -127, 127, 1, 8, True, "w")


# -- structure -------------------------------------------------------------------------------
def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


@pytest.mark.parametrize("target", PROFILES)
def test_export_structure(target, tmp_path):
    prof = get_profile(target)
    gm, args = convnet(prof)
    model = export_lowered(gm, args, tmp_path / "m.onnx", target)
    inits = _inits(model)
    assert {n.domain for n in model.graph.node} == {""}
    assert [(o.domain, o.version) for o in model.opset_import] == [("", prof.opset)]
    assert model.ir_version == 10
    n_act = 7 if prof.quantize_op_outputs else 4  # sites + the re-quantization after Flatten
    assert len(_ops(model, "QuantizeLinear")) == n_act
    n_bias = 3 if prof.bias == "int32" else 0
    assert len(_ops(model, "DequantizeLinear")) == n_act + 3 + n_bias
    for node in _ops(model, "QuantizeLinear") + _ops(model, "DequantizeLinear"):
        assert len(node.input) == 3, "explicit zero point"
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        assert scale.shape == zp.shape
        assert (scale.ndim == 0) == (not any(a.name == "axis" for a in node.attribute))
    for op in ("Conv", "Gemm"):
        for node in _ops(model, op):
            dq = next(n for n in model.graph.node if node.input[1] in n.output)
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
            assert (inits[dq.input[1]].ndim == 1) == prof.weight_per_channel
    # no float weights, no dangling initializers or nodes
    assert not {"conv1.weight", "conv2.weight", "fc.weight"} & set(inits)
    used = {i for n in model.graph.node for i in n.input}
    assert set(inits) <= used
    produced = [o for n in model.graph.node for o in n.output]
    assert all(o in used or o == "output" for o in produced)
    assert os.path.exists(tmp_path / "m.onnx")
    assert onnx.load(tmp_path / "m.onnx") == model


def test_names_point_back_to_modules(tmp_path):
    gm, args = convnet(get_profile("onnxruntime"))
    model = export_lowered(gm, args, tmp_path / "m.onnx", "onnxruntime")
    names = {n.name for n in model.graph.node}
    assert {"conv1/Conv", "conv2/Conv", "fc/Gemm", "relu1/Relu", "input/QuantizeLinear",
            "conv1.weight/DequantizeLinear", "relu1.out/QuantizeLinear"} <= names
    assert {"conv1.weight_quantized", "conv1.weight_scale", "conv1.weight_zero_point",
            "relu1.out_scale", "conv1.bias"} <= set(_inits(model))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["output"]


def test_linear_on_3d_folds_transpose_into_weight(tmp_path):
    gm, args = token_mixer(get_profile("onnxruntime"))
    model = export_lowered(gm, args, tmp_path / "m.onnx", "onnxruntime")
    inits = _inits(model)
    assert inits["qkv.weight_quantized"].shape == (8, 24)  # (in, out) for MatMul
    dq = next(n for n in model.graph.node if n.name == "qkv.weight/DequantizeLinear")
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 1
    # the only Transpose left is the float k^T of the attention scores
    assert [n.name for n in _ops(model, "Transpose")] == ["/Transpose_1"]
    softmax_in = _ops(model, "Softmax")[0].input[0]
    assert not any(n.op_type == "DequantizeLinear" and softmax_in in n.output for n in model.graph.node)


# -- numerics: torch vs ONNX Runtime (no graph optimizations) ---------------------------------
@pytest.mark.parametrize("factory", [convnet, token_mixer, upsampler])
@pytest.mark.parametrize("target", [*PROFILES, INT4])
def test_matches_onnxruntime(factory, target):
    prof = get_profile(target)
    gm, args, model = exported(factory, prof)
    x = torch.randn(3, *args[0].shape[1:])  # another batch size: the batch axis is dynamic
    want = gm(x).detach().numpy()
    got = run_ort(model, x)[0]
    if prof.bias == "int32":
        # bias rounded to the accumulator grid s_x * s_w; an output code may move by one step
        assert np.abs(got - want).max() <= 0.01
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


ANY_ACTIVATION = TargetProfile("any_activation", extra_activation_dtypes=("int8", "int4", "uint4", "uint16"),
                               allow_int4=True, opset=19)


@pytest.mark.parametrize(
    ("grid", "opset"),
    [
        ((0.05, 3, 0, 255, 8, False), 19),  # uint8 asymmetric
        ((0.05, 3, 0, 200, 8, False), 19),  # narrow uint8: Clip before Q
        ((0.04, 0, -127, 127, 8, True), 19),  # narrow int8 symmetric
        ((0.3, 0, -8, 7, 4, True), 21),  # INT4 activation storage
        ((0.3, 1, -7, 7, 4, True), 21),  # narrow INT4
        ((0.001, 300, 0, 65535, 16, False), 21),  # UINT16
    ],
)
def test_activation_qdq_is_bit_exact(grid, opset, tmp_path):
    gm, (x,) = act_only(*grid)
    model = export_lowered(gm, (x,), tmp_path / "a.onnx", ANY_ACTIVATION.replace(opset=opset))
    assert len(_ops(model, "Clip")) == (1 if grid[2:4] not in ((0, 255), (-8, 7), (0, 65535)) else 0)
    want = gm(x).numpy()
    np.testing.assert_array_equal(run_ort(model, x)[0], want)
    # onnx.reference implements QuantizeLinear from opset 19 on
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0], want)


@pytest.mark.parametrize("target", ["onnxruntime", "npu", INT4])
def test_weight_codes_are_exact(target, tmp_path):
    prof = get_profile(target)
    gm, args = convnet(prof)
    model = export_lowered(gm, args, tmp_path / "m.onnx", prof)
    inits = _inits(model)
    scheme_axis = 0 if prof.weight_per_channel else None
    for name in ("conv1", "conv2", "fc"):
        w = getattr(gm, name).weight.detach()
        s, z = getattr(gm, f"{name}_weight_scale"), getattr(gm, f"{name}_weight_zp")
        q = inits[f"{name}.weight_quantized"].astype(np.int64)
        shape = [-1] + [1] * (q.ndim - 1) if scheme_axis == 0 else []
        deq = (q - inits[f"{name}.weight_zero_point"].astype(np.int64).reshape(shape)) * \
            inits[f"{name}.weight_scale"].reshape(shape)
        expected = fake_quantize_raw(w, s, z, -7 if prof is INT4 else -127, 7 if prof is INT4 else 127,
                                     scheme_axis).numpy()
        np.testing.assert_array_equal(deq.astype(np.float32), expected)


def test_reference_evaluator_on_tiny_model(tmp_path):
    prof = get_profile("onnxruntime").replace(opset=19)  # onnx.reference has Q/DQ from opset 19
    gm, args = upsampler(prof)
    model = export_lowered(gm, args, tmp_path / "m.onnx", prof)
    got = ReferenceEvaluator(model).run(None, {"x": args[0].numpy()})[0]
    np.testing.assert_allclose(got, gm(*args).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_int4_weights_are_packed_int4(tmp_path):
    gm, args = convnet(INT4)
    model = export_lowered(gm, args, tmp_path / "m.onnx", INT4)
    packed = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("weight_quantized")}
    assert set(packed.values()) == {onnx.TensorProto.INT4}
    assert model.opset_import[0].version == 21


def test_float_weight_storage_profile(tmp_path):
    prof = get_profile("tensorrt").replace(name="trt8", weight_storage="float")
    gm, args = convnet(prof)
    model = export_lowered(gm, args, tmp_path / "m.onnx", prof)
    assert len(_ops(model, "QuantizeLinear")) == 3 + 4
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(run_ort(model, x)[0], gm(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_static_batch(tmp_path):
    gm, args = convnet(get_profile("onnxruntime"))
    model = export_lowered(gm, args, tmp_path / "m.onnx", "onnxruntime", input_names=["image"],
                           output_names=["logits"], dynamic_batch=False)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]
    assert model.graph.output[0].name == "logits"


# -- errors leave no file ----------------------------------------------------------------------
def _no_files(folder) -> bool:
    return not any(folder.iterdir())


def test_unknown_target_raises_and_writes_nothing(tmp_path):
    gm, args = convnet(get_profile("onnxruntime"))
    with pytest.raises(ProfileError, match=r"unknown target 'tflite'"):
        export_lowered(gm, args, tmp_path / "m.onnx", "tflite")
    assert _no_files(tmp_path)


def test_int4_below_opset_21_raises(tmp_path):
    gm, args = convnet(INT4)
    with pytest.raises(ExportError, match=r"INT4 weights need opset >= 21.*pass opset=21"):
        export_lowered(gm, args, tmp_path / "m.onnx", "onnxruntime")
    with pytest.raises(ExportError, match=r"INT4 weights need opset >= 21.*'tensorrt' does not accept INT4"):
        export_lowered(gm, args, tmp_path / "m.onnx", "tensorrt")
    assert _no_files(tmp_path)


def test_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    gm, args = convnet(INT4)
    with pytest.raises(ExportError):
        export_lowered(gm, args, path, "onnxruntime")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_rule_breaking_export_raises(tmp_path):
    # Lowered for ONNX Runtime (uint8 asymmetric activations) but exported for TensorRT.
    gm, args = convnet(get_profile("onnxruntime"))
    with pytest.raises(ExportError, match=r"(?s)breaks target 'tensorrt'.*activation_dtype"):
        export_lowered(gm, args, tmp_path / "m.onnx", "tensorrt")
    assert _no_files(tmp_path)


def test_non_constant_scale_raises(tmp_path):
    class Dynamic(torch.nn.Module):
        def forward(self, x):
            return quant_dequant(x, x.abs().amax() / 127, torch.zeros(()), -127, 127, None, 8, True, "dyn")

    gm = torch.fx.symbolic_trace(Dynamic())
    with pytest.raises(ExportError, match=r"'dyn'.*not constants.*buffers"):
        export_lowered(gm, (torch.randn(2, 4),), tmp_path / "m.onnx", "tensorrt")
    assert _no_files(tmp_path)


# -- deployment back ends --------------------------------------------------------------------
def test_onnxruntime_picks_integer_kernels(tmp_path):
    import onnxruntime as ort

    gm, args = convnet(get_profile("onnxruntime"))
    export_lowered(gm, args, tmp_path / "m.onnx", "onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert {"QLinearConv", "QGemm"} <= ops and "Conv" not in ops


@pytest.mark.parametrize("factory", [convnet, token_mixer])
@pytest.mark.parametrize("target", ["openvino", get_profile("openvino").replace(opset=21, weight_bits=4)])
def test_matches_openvino(factory, target, tmp_path):
    ov = pytest.importorskip("openvino")
    prof = get_profile(target)
    gm, args = factory(prof)
    # x86 without VNNI: OpenVINO's int8 kernels are off on int8 weights (token mixer 9.9 dB); uint8 ones it runs in float
    export_lowered(gm, args, tmp_path / "m.onnx", for_this_cpu(prof) if prof.weight_bits == 8 else prof)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(tmp_path / "m.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(args[0].numpy())[0], gm(*args).detach().numpy(), rtol=1e-5, atol=1e-6)
