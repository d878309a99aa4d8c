"""The exported file computes what was trained (issue: trust), on model shapes users bring."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qtrim_fx


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm + activation in one module, as timm's ``BatchNormAct2d`` (its forward adds the act)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(super().forward(x))


def _trained_at_full_blend(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        model(torch.randn(x.shape, generator=gen))
    model.eval()
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("bn_act", ["local", "timm"])
def test_batchnorm_subclass_with_activation_is_not_folded_away(tmp_path, bn_act):
    if bn_act == "timm":
        timm = pytest.importorskip("timm")
        norm = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU)
    else:
        norm = BatchNormAct(8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    qm = _trained_at_full_blend(model, x)
    folded = [spec.folded_bn for spec, _, _ in qtrim_fx.iter_sites(qm) if spec.folded_bn]
    if bn_act == "local":  # its forward adds arithmetic of its own: one leaf, never folded
        assert folded == []
    else:  # BatchNorm then its own children (drop, act), verified: BN folded, the children kept as calls
        assert folded == ["qtrim_norm.1"]
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Sigmoid" in ops or "Mul" in ops  # the activation is still there
    with torch.no_grad():
        trained = qm(x).numpy()
    out_scale = float(np.abs(trained).max())
    # what ORT computes is what was trained, up to rounding (before: max diff 0.24 on a 0.97 scale)
    assert np.abs(_ort(path, x) - trained).max() < 0.02 * out_scale


def test_plain_batchnorm_is_still_folded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    qm = _trained_at_full_blend(model, x)
    assert [spec.folded_bn for spec, _, _ in qtrim_fx.iter_sites(qm) if spec.folded_bn] == ["1"]
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(path).graph.node}


def _calibrated_mlp():
    from qtrim_fx.models import get_model

    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    return qm, x


@pytest.mark.parametrize("corrupt", ["nan_weight", "nan_statistics", "inverted_statistics"])
def test_non_finite_weights_or_statistics_are_refused_naming_the_site(tmp_path, corrupt):
    qm, x = _calibrated_mlp()
    sites = {spec.name: (spec, site) for spec, site, _ in qtrim_fx.iter_sites(qm)}
    weight = next(name for name, (spec, _) in sites.items() if spec.kind == "weight")
    act = next(name for name, (spec, _) in sites.items() if spec.kind == "activation")
    with torch.no_grad():
        if corrupt == "nan_weight":
            qm.get_parameter(sites[weight][0].param).view(-1)[0] = float("nan")  # a diverged step
            name = weight
        elif corrupt == "nan_statistics":
            sites[act][1].observer.lo.fill_(float("nan"))
            name = act
        else:
            obs = sites[act][1].observer
            obs.lo.fill_(1.0)
            obs.hi.fill_(-1.0)
            name = act
    path = tmp_path / "m.onnx"
    with pytest.raises(qtrim_fx.ExportError, match=name.replace(".", r"\.")):
        qtrim_fx.export_onnx(qm, (x,), path)
    assert not path.exists()


def test_keyword_example_inputs_export_like_positional_ones(tmp_path):
    from qtrim_fx.models import get_model

    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    qtrim_fx.export_onnx(qm, (x,), a)
    qtrim_fx.export_onnx(qm, {"x": x}, b)  # as prepare takes them (Hugging Face users hold dicts)
    assert a.read_bytes() == b.read_bytes()


def test_four_bit_weights_export_without_naming_the_opset(tmp_path):
    from qtrim_fx.models import get_model

    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(weight_bits=4))
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path / "int4.onnx"
    m = qtrim_fx.export_onnx(qm, (x,), path, target=qtrim_fx.get_profile("onnxruntime").replace(allow_int4=True))
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert onnx.TensorProto.INT4 in {t.data_type for t in m.graph.initializer}
    with torch.no_grad():
        ref = qm.eval()(x).numpy()
    assert _ort(path, x).shape == ref.shape  # ONNX Runtime loads and runs the INT4 file


@pytest.mark.parametrize("name", ["cifar_resnet18", "tv_resnet18", "mobilenet_small", "tiny_convnet"])
def test_tensorrt_export_passes_its_own_check(tmp_path, name):
    """export and check apply one rule for where TensorRT files carry a Q (residual nets included)."""
    from qtrim_fx.models import get_model

    model, (x,) = get_model(name)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path / "trt.onnx"
    qtrim_fx.export_onnx(qm, (x,), path, target="tensorrt")
    assert qtrim_fx.check(path, "tensorrt") == []
