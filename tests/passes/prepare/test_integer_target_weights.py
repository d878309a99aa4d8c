"""prepare(target="qnn"): parameter operands of integer ops are trained sites; MatMul weights per-tensor.

(a) ``x + self.pos`` (a parameter) and ``x * self.gain`` (a buffer) on an integer-only target: the operand
    gets an activation site, the file has DQ(codes) there and ``check`` finds no float op; ONNX Runtime
    computes what the lowered torch model computes.
(b) the ``qnn`` profile's ``matmul_weights_per_tensor``: Linear layers on 3-D inputs (ONNX MatMul) train and
    export one weight scale; a Linear on 2-D input (Gemm) keeps per-channel; a user Override wins; a weight
    trained per-tensor is deployed per-tensor on any target (the Override used to be dropped at lowering).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qtrim_fx
from qtrim_fx.core.config import Override, QuantConfig
from qtrim_fx.core.errors import ProfileError
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx import check
from qtrim_fx.runtime.prepared import iter_sites
from tests.helpers.cpu import ort_cpu_session


class _Tokens(nn.Module):
    """fc1 (3-D input: MatMul) + a position parameter, * a gain buffer, fc2 (MatMul), head on the mean (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.pos = nn.Parameter(torch.randn(1, 5, 16, generator=g) * 0.5)
        self.register_buffer("gain", torch.rand(16, generator=g) + 0.5)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x) + self.pos) * self.gain
        return self.head(self.fc2(h).mean(1))


def _x(seed: int) -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))


def _prepared(config: QuantConfig | None = None, **kw):
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(_Tokens().eval(), (_x(0),), config, **kw)
    qtrim_fx.calibrate(qm, [(_x(s),) for s in range(1, 5)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


def _export(qm, path, target: str = "qnn") -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (_x(0),), path, target=target)
    return onnx.load(str(path))


def _weight_scales(m: onnx.ModelProto) -> dict[str, tuple[str, tuple[int, ...]]]:
    """weight name -> (the ONNX op reading its DQ, the scale's shape)."""
    inits = {i.name: i for i in m.graph.initializer}
    readers = {i: n.op_type for n in m.graph.node for i in n.input}
    return {n.input[0].removesuffix("_quantized"): (readers[n.output[0]], tuple(inits[n.input[1]].dims))
            for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")}


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-30)))


# -- (a) parameter / buffer operands ----------------------------------------------------------------------------
def test_parameter_and_buffer_operands_are_sites_and_the_file_has_no_float_op(tmp_path):
    default = _prepared()
    assert not {"pos", "gain"} & {s.name for s, _, _ in iter_sites(default)}  # hardware-neutral: unchanged
    floats = [v for v in check(_export(default, tmp_path / "d.onnx"), "qnn") if v.rule == "float_op"]
    assert any("pos" in v.message for v in floats) and any("gain" in v.message for v in floats)

    qm = _prepared(target="qnn")
    acts = {s.name: s for s, _, _ in iter_sites(qm) if s.kind == "activation"}
    assert acts["pos"].consumers == ("add",) and acts["gain"].consumers == ("mul",)
    path = tmp_path / "q.onnx"
    m = _export(qm, path)
    assert check(path, "qnn") == []
    inits = {i.name: i for i in m.graph.initializer}
    for name in ("pos", "gain"):  # stored as codes on the activation grid, read through DequantizeLinear
        (dq,) = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(name)]
        assert numpy_helper.to_array(inits[dq.input[0]]).dtype == np.uint8
        assert name not in inits  # no float copy left
    x = _x(11)
    with torch.no_grad():
        ref = qtrim_fx.lower(qm, "qnn")(x).numpy()
        trained = qm(x).numpy()
    out = ort_cpu_session(path).run(None, {"x": x.numpy()})[0]
    assert _sqnr(ref, out) >= 30 and _sqnr(trained, out) >= 30


def test_parameter_operand_site_trains_the_parameter():
    qm = _prepared(target="qnn").train()
    qm(_x(3)).square().sum().backward()
    assert qm.pos.grad is not None and bool(qm.pos.grad.abs().sum() > 0)  # through the site (STE)


# -- (b) weight granularity of MatMul-form Linear layers --------------------------------------------------------
def test_qnn_profile_declares_per_tensor_matmul_weights():
    assert get_profile("qnn").matmul_weights_per_tensor
    assert not any(get_profile(t).matmul_weights_per_tensor for t in ("onnxruntime", "tensorrt", "openvino", "npu"))
    with pytest.raises(ProfileError, match="matmul_weights_per_tensor"):
        get_profile("qnn").replace(matmul_weights_per_tensor="yes")


def test_qnn_exports_per_tensor_matmul_weights_and_per_channel_gemm_weights(tmp_path):
    qm = _prepared(target="qnn")
    specs = {s.name: s for s, _, _ in iter_sites(qm) if s.kind == "weight"}
    assert specs["fc1.weight"].scheme.axis is None and specs["fc2.weight"].scheme.axis is None
    assert specs["head.weight"].scheme.axis == 0  # 2-D input: Gemm
    scales = _weight_scales(_export(qm, tmp_path / "q.onnx"))
    assert scales["fc1.weight"] == ("MatMul", ()) and scales["fc2.weight"] == ("MatMul", ())
    assert scales["head.weight"] == ("Gemm", (4,))
    # hardware-neutral prepare exported to qnn: per-channel as trained
    assert _weight_scales(_export(_prepared(), tmp_path / "d.onnx"))["fc1.weight"] == ("MatMul", (16,))


def test_user_override_wins_over_the_profile_and_reaches_the_file(tmp_path):
    keep = QuantConfig(target="qnn", overrides=(Override(name="fc1", weight_per_channel=True),))
    scales = _weight_scales(_export(_prepared(keep), tmp_path / "keep.onnx"))
    assert scales["fc1.weight"] == ("MatMul", (16,)) and scales["fc2.weight"] == ("MatMul", ())
    # per-tensor asked for a Gemm layer: trained and deployed per-tensor, on qnn and on onnxruntime alike
    flat = QuantConfig(overrides=(Override(op="linear", weight_per_channel=False),))
    qm = _prepared(flat)
    for target in ("qnn", "onnxruntime"):
        scales = _weight_scales(_export(qm, tmp_path / f"{target}.onnx", target))
        assert {v[1] for v in scales.values()} == {()}, (target, scales)


def test_rank_probe_leaves_model_state_and_rng_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    qm = qtrim_fx.prepare(model, (_x(0),), target="qnn")
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {s.scheme.axis for s, _, _ in iter_sites(qm) if s.kind == "weight"} == {None}


def test_qnn_without_example_inputs_says_matmul_weights_stay_per_channel():
    with pytest.warns(qtrim_fx.core.errors.QtrimWarning, match=r"fc1.*Pass example_inputs"):
        qm = qtrim_fx.prepare(_Tokens(), target="qnn")
    assert all(spec.scheme.axis is not None for spec, _, _ in iter_sites(qm) if spec.kind == "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error", qtrim_fx.core.errors.QtrimWarning)
        qtrim_fx.prepare(_Tokens(), (torch.randn(2, 5, 8),), target="qnn")  # ranks known: no warning
        qtrim_fx.prepare(_Tokens(), target="onnxruntime")  # a per-channel target: nothing to say


@pytest.mark.parametrize("net", ["mlp", "depthwise"])
def test_a_per_tensor_profile_trains_per_tensor_weights_so_the_lowered_model_is_the_trained_one(net):
    """``npu`` stores every weight per-tensor. A model prepared for it used to train per-channel weights, which
    lowering then re-derived per-tensor: the deployed model was not the trained one (~38 dB apart on a plain
    Linear-ReLU-Linear, silently). Prepared for the target, training quantizes them per-tensor as well."""
    torch.manual_seed(0)
    model, shape = ((nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (4, 16)) if net == "mlp" else
                    (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                   nn.Flatten(), nn.Linear(8 * 8 * 8, 4)), (4, 3, 8, 8)))
    x = torch.randn(*shape)
    assert not get_profile("npu").weight_per_channel
    qm = qtrim_fx.prepare(model.eval(), (x,), target="npu")
    assert all(s.scheme.axis is None for s, _, _ in iter_sites(qm) if s.kind == "weight")
    qtrim_fx.calibrate(qm, [(torch.randn(*shape),) for _ in range(2)])
    qtrim_fx.set_blend(qm, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = qtrim_fx.lower(qm.eval(), target="npu")
    y = torch.randn(*shape)
    with torch.no_grad():
        trained, lowered = qm(y), low(y)
    torch.testing.assert_close(lowered, trained, rtol=1e-5, atol=1e-6)
    # a user's Override still wins over the profile
    qc = qtrim_fx.prepare(model.eval(), (x,), config=QuantConfig(target="npu", overrides=(
        Override(op="linear", weight_per_channel=True),)))
    assert any(s.scheme.axis is not None for s, _, _ in iter_sites(qc) if s.kind == "weight" and s.op == "linear")
