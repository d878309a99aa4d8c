"""prepare(..., target=...): the profile's activation_sites become trained sites; default prepare is unchanged."""

from __future__ import annotations

import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.core.errors import ConfigError, ProfileError
from qtrim_fx.core.profiles import INTEGER_ACTIVATION_SITES, get_profile
from qtrim_fx.core.spec import FLOAT_REGION, OP_KIND
from qtrim_fx.passes.prepare.integer_sites import site_rules
from qtrim_fx.runtime.prepared import iter_sites


def _acts(qm) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {s.name: (s.op, s.consumers) for s, _, _ in iter_sites(qm) if s.kind == "activation"}


def _prepare(name: str, **kw):
    model, inputs = get_model(name)
    return qtrim_fx.prepare(model, inputs, **kw)


def test_profiles_declare_integer_sites_as_data():
    for name in ("qnn", "npu"):
        p = get_profile(name)
        assert p.integer_only and p.integer_attention_scores and p.activation_sites == INTEGER_ACTIVATION_SITES
    for name in ("onnxruntime", "tensorrt", "openvino"):
        p = get_profile(name)
        assert p.activation_sites == () and not p.integer_attention_scores
    rules = site_rules(get_profile("qnn"))
    assert rules["layernorm"] == (True, True) and rules["softmax"] == (False, True)
    assert rules["matmul"] == (True, True) and rules["cat"] == (False, True)
    with pytest.raises(ProfileError, match="activation_sites"):
        get_profile("qnn").replace(activation_sites=(("layernorm", "around"),))
    with pytest.raises(ProfileError, match="activation_sites"):
        get_profile("qnn").replace(activation_sites=(("conv2d", "out"),))


def test_tiny_convnet_for_qnn_adds_exactly_the_concat_output():
    default, qnn = _acts(_prepare("tiny_convnet")), _acts(_prepare("tiny_convnet", target="qnn"))
    added = {k: v for k, v in qnn.items() if k not in default}
    assert [v[0] for v in added.values()] == ["cat"]  # the Concat feeding GlobalAveragePool
    assert {k: v for k, v in qnn.items() if k in default}.keys() == default.keys()


def test_vit_for_qnn_quantizes_norms_softmax_and_attention_matmuls():
    default = _prepare("vit_tiny")
    qm = _prepare("vit_tiny", target="qnn")
    assert any(n.meta.get(FLOAT_REGION) for n in default.graph.nodes)
    assert not any(n.meta.get(FLOAT_REGION) for n in qm.graph.nodes)  # integer_attention_scores
    added = {k: v for k, v in _acts(qm).items() if k not in _acts(default)}
    depth = 4
    ops = sorted(v[0] for v in added.values())
    # per block: QKᵀ output, its scaling, the softmax (P, read by P·V); once: the class-token Concat, the
    # last residual Add (read by the final LayerNorm; the other residual sums were sites already) and the
    # position-embedding parameter (the Add's other operand)
    assert ops == sorted(["matmul", "mul", "softmax"] * depth + ["cat", "add", "get_attr"])
    assert added["pos_embed"] == ("get_attr", ("add",))
    assert all(v[1] == ("matmul", "softmax") for v in added.values() if v[0] == "softmax")
    assert [v[1] for v in added.values() if v[0] == "add"] == [("add", "layernorm")]
    # every LayerNorm reads and writes a quantized tensor
    sites = {s.name for s, _, _ in iter_sites(qm)}
    site_nodes = {n.args[0] for n in qm.graph.nodes if n.op == "call_module" and str(n.target).startswith("qtrim_sites")}
    norms = [n for n in qm.graph.nodes if n.meta.get(OP_KIND) == "layernorm"]
    assert len(norms) == 2 * depth + 1 and sites
    for n in norms:
        assert n.args[0].op == "call_module" and str(n.args[0].target).startswith("qtrim_sites"), n
        assert n in site_nodes, n
    # λ = 0 is still exact FP32
    model, x = get_model("vit_tiny")
    with torch.no_grad():
        assert torch.equal(qm(*x), model(*x))


def test_prepare_target_equals_config_target_and_is_checked():
    a = _acts(_prepare("tiny_convnet", target="qnn"))
    b = _acts(_prepare("tiny_convnet", config=qtrim_fx.QuantConfig(target="qnn")))
    assert a == b
    assert qtrim_fx.QuantConfig(target="QNN").target == "qnn"
    with pytest.raises(ConfigError, match="unknown target 'nope'"):
        _prepare("tiny_convnet", target="nope")
    with pytest.raises(ConfigError, match="contradicts"):
        _prepare("tiny_convnet", config=qtrim_fx.QuantConfig(target="npu"), target="qnn")


@pytest.mark.parametrize("target", ["tensorrt", "openvino"])
def test_targets_without_activation_sites_prepare_like_the_default(target):
    """The default's sites, less those on Conv/Gemm/MatMul outputs only, which these targets do not deploy."""
    default = _prepare("vit_tiny")
    inputs = {s.name for s, _, _ in iter_sites(default) if s.kind == "activation" and s.role != "output"}
    assert inputs and len(inputs) < len(_acts(default))
    assert _acts(_prepare("vit_tiny", target=target)) == {k: v for k, v in _acts(default).items() if k in inputs}


def test_the_target_is_saved_with_the_checkpoint(tmp_path):
    model, x = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, x, target="qnn")
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.checkpoint.save(qm, tmp_path / "c.pt")
    again = qtrim_fx.checkpoint.load(get_model("tiny_convnet")[0], tmp_path / "c.pt")
    assert _acts(again) == _acts(qm) != _acts(qtrim_fx.prepare(model, x))


class _CenteredInput(torch.nn.Module):
    """The model's first op reads its input and a buffer: no op before it would quantize the input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(1, 3, 1, 1))
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x - self.mean)).mean((2, 3)))


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_a_model_input_read_by_an_integer_op_is_quantized(target, tmp_path):
    from qtrim_fx.onnx import check

    x = torch.randn(2, 3, 10, 10)
    qm = qtrim_fx.prepare(_CenteredInput(), (x,), target=target)
    names = [spec.name for spec, _, _ in iter_sites(qm)]
    assert "input.x" in names and "mean" in names
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x,), str(path), target=target)
    errors = [v for v in check(str(path), target) if v.severity == "error"]
    assert errors == []  # was: float_op on the Sub reading the raw input
    # the default prepare leaves the input float: ONNX Runtime runs the Sub in float, as trained
    assert "input.x" not in [spec.name for spec, _, _ in iter_sites(qtrim_fx.prepare(_CenteredInput(), (x,)))]
