"""Only layers that compute exactly torch's op on their own parameters become functional calls.

Before: every ``isinstance(m, nn.Conv2d)`` module call was rewritten as ``F.conv2d(x, m.weight, ...)``,
so a subclass's own forward (timm ``Conv2dSame`` pads from the input size) or a forward pre-hook
(``spectral_norm``) was silently dropped: timm ``tf_efficientnet_b0`` at 224x224 at λ = 0 differed from
its float model by more than the output's own scale, with no error.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import CoverageWarning
from qtrim_fx.core.modules import is_plain_weighted

timm_layers = pytest.importorskip("timm.layers")


class _DoubledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.flip(-1), bias)


def test_is_plain_weighted() -> None:
    assert is_plain_weighted(nn.Conv2d(3, 4, 3))
    assert is_plain_weighted(nn.Conv1d(3, 4, 3, bias=False))
    assert is_plain_weighted(nn.Linear(3, 4))
    assert is_plain_weighted(nn.ConvTranspose2d(3, 4, 3))
    # a parametrization is recomputed on every read of .weight: a get_attr of it stays exact
    assert is_plain_weighted(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)))
    assert not is_plain_weighted(timm_layers.Conv2dSame(3, 4, 3))
    assert not is_plain_weighted(timm_layers.StdConv2d(3, 4, 3))
    assert not is_plain_weighted(_DoubledConv(3, 4, 3))
    assert not is_plain_weighted(_OwnConvForward(3, 4, 3))
    assert not is_plain_weighted(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert not is_plain_weighted(nn.utils.weight_norm(nn.Linear(3, 4)))
    assert not is_plain_weighted(nn.BatchNorm2d(3))


def _same_padding_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        timm_layers.Conv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        timm_layers.Conv2dSame(8, 4, 5, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()


def test_conv2d_same_stays_whole_exact_at_every_size_and_reported() -> None:
    model = _same_padding_net()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(CoverageWarning, match=r"0\.weight \(timm\.layers\.conv2d_same\.Conv2dSame\)"):
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    for size in (32, 45, 17):  # "same" padding differs per size: the module's own forward must run
        xi = torch.randn(2, 3, size, size)
        assert torch.equal(qm(xi), model(xi)), size
    # the plain conv between them is still quantized
    names = {spec.name for spec, _, _ in qtrim_fx.iter_sites(qm)}
    assert "3.weight" in names
    assert not any(n.startswith(("0.", "5.")) and n.endswith("weight") for n in names)


def test_conv2d_same_exports_and_matches_onnxruntime(tmp_path) -> None:
    model = _same_padding_net()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        qm = qtrim_fx.prepare(model, (x,))
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "same.onnx"
    qtrim_fx.export_onnx(qm, (x,), str(path))  # self-check: ORT vs the lowered model, raises on mismatch
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    qm.eval()
    assert got.shape == (2, 4)
    assert float((torch.from_numpy(got) - qm(x)).abs().max()) < 0.05


def test_spectral_norm_conv_keeps_its_hook_in_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(),
                          nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    x = torch.randn(4, 3, 8, 8)
    ref = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    qm.train()
    qtrim_fx.set_blend(qm, 0.0)
    for _ in range(3):  # power iteration updates u on every train-mode forward, in both models alike
        assert torch.equal(qm(x), ref(x))
    qm(x).sum().backward()
    sn = qm.get_submodule("0")
    assert sn.weight_orig.grad is not None and float(sn.weight_orig.grad.abs().sum()) > 0


def test_parametrized_weight_is_quantized_as_computed() -> None:
    """Functionalized, a parametrized weight is read live through get_attr; its site quantizes the computed
    weight (it was float and unreported before weight sites took computed weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)  # nothing left float
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))
    specs = {spec.name: spec for spec, _, _ in qtrim_fx.iter_sites(qm)}
    assert specs["0.weight"].kind == "weight" and specs["0.weight"].param is None


def test_no_sites_error_names_the_layers_kept_whole() -> None:
    from qtrim_fx.core.errors import NoSitesError

    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 5)), nn.ReLU()).eval()
    with pytest.raises(NoSitesError, match=r"0\.weight_orig \(nn\.Linear\): module call kept whole"):
        qtrim_fx.prepare(model, (torch.randn(3, 6),))


class _ScaledMHA(nn.MultiheadAttention):
    def forward(self, q, k, v, **kw):
        out, w = super().forward(q, k, v, **kw)
        return out * 0.5, w


@pytest.mark.parametrize("how", ["subclass", "hook"])
def test_multihead_attention_with_its_own_forward_or_a_hook_stays_whole(how: str) -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = (_ScaledMHA if how == "subclass" else nn.MultiheadAttention)(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Net().eval()
    if how == "hook":
        model.attn.register_forward_hook(lambda m, i, o: (o[0] + 1.0, o[1]))
    x = torch.randn(2, 5, 8)
    with pytest.warns(CoverageWarning, match=r"attn\.in_proj_weight"):
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))


def test_layernorm_with_a_hook_keeps_it_when_lowered_for_an_integer_target() -> None:
    """QuantizeNormAffinePass rewrites LayerNorm module calls as F.layer_norm on integer-only targets; a
    LayerNorm that runs more than nn.LayerNorm.forward (here a forward hook) must stay a module call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    model[1].register_forward_hook(lambda m, i, o: o * 0.25 + 1.0)
    x = torch.randn(16, 8)
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,), target="qnn")
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    lowered = qtrim_fx.lower(qm, "qnn")
    # the hook's affine change is far larger than one output step; without it they differ by ~1
    assert float((lowered(x) - qm(x)).abs().max()) < 0.1


@pytest.mark.parametrize("act,target", [(nn.ReLU, None), (nn.GELU, "qnn")])
def test_activation_modules_with_a_hook_are_not_rewritten(act: type[nn.Module], target: str | None) -> None:
    """LeanReluPass (ReLU → relu_keep_mask) and DecomposeGeluPass (GELU → its steps) replace module calls:
    a module with a forward hook keeps its call, so the hook still runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), act(), nn.Linear(8, 3)).eval()
    model[1].register_forward_hook(lambda m, i, o: o + 0.5)
    x = torch.randn(16, 8)
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,), target=target)
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))


def test_batchnorm_with_a_hook_is_not_folded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].register_forward_hook(lambda m, i, o: o * 2.0)
    x = torch.randn(2, 3, 8, 8)
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 0.0)
    qm.eval()
    assert torch.allclose(qm(x), model(x), atol=1e-5)
    qtrim_fx.set_blend(qm, 1.0)
    lowered = qtrim_fx.lower(qm)
    assert float((lowered(x) - qm(x)).abs().max()) < 0.1 * float(qm(x).abs().max())


def test_a_weight_computed_in_forward_is_quantized_and_exported_as_a_constant(tmp_path) -> None:
    """``conv2d(x, f(parameters))``: the site quantizes the computed weight (trained as computed); lowering
    stores its value as a constant, so the file holds integer weight codes, not float ops."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.s = nn.Parameter(torch.rand(4) + 0.5)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(torch.conv2d(x, (self.w * self.s).t().reshape(4, 6, 1, 1))).flatten(1))

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(2, 6, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,))
    assert [s.name for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight" and s.param is None] == ["conv2d.weight"]
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "scaled.onnx"
    qtrim_fx.export_onnx(qm, (x,), str(path))
    import onnx

    m = onnx.load(str(path))
    producers = {o: n for n in m.graph.node for o in n.output}
    (conv,) = [n for n in m.graph.node if n.op_type == "Conv"]
    dq = producers[conv.input[1]]
    inits = {i.name: i for i in m.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
