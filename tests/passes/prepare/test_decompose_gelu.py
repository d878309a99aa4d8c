"""DecomposeGeluPass: GELU prepared for an integer-only target without a ``Gelu`` op trains a site on each primitive.

Below opset 20 the exporters write ``gelu(x)`` as ``Div -> Erf -> Add -> Mul -> Mul`` (tanh form: ``Pow -> Mul
-> Add -> Mul -> Tanh -> Add -> Mul -> Mul``). Prepared for ``npu`` (opset 13) each of those is its own site,
λ = 0 stays exact FP32 (values and gradients); ``qnn`` (one ``Gelu`` op at opset 20), the float-capable
targets and the default prepare keep the activation whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.profiles import get_profile, profile_names
from qtrim_fx.runtime.ops import GELU_STEPS, gelu_product, gelu_steps
from qtrim_fx.runtime.prepared import iter_sites
from tests.helpers.qmodels import (
    activation_site_ops,
    assert_exact_at_lambda_0,
    decomposed_activations,
    image_batch,
)


def _net(approximate: str = "none") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(approximate=approximate), nn.Conv2d(8, 4, 1)).eval()


class FunctionalGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


_x = image_batch
_acts = activation_site_ops


def _products(qm) -> list[str]:
    return decomposed_activations(qm, gelu_product)


def test_only_integer_targets_without_a_gelu_op_decompose_it():
    assert {n for n in profile_names() if get_profile(n).decomposes_gelu()} == {"npu"}
    assert "Gelu" in get_profile("qnn").fused_ops  # qnn writes one Gelu op (opset 20) instead


@pytest.mark.parametrize(("approximate", "ops"), [
    ("none", ["div", "erf", "add", "mul"]),
    ("tanh", ["pow", "mul", "add", "mul", "activation", "add", "mul"])])
def test_npu_puts_a_site_on_every_primitive_and_keeps_the_output_site(approximate, ops):
    qm = qtrim_fx.prepare(_net(approximate), _x(), target="npu")
    acts = _acts(qm)
    inner = [op for name, op in acts.items() if name.startswith("1.") and name != "1.out"]
    assert inner == ops and len(ops) == len(GELU_STEPS[approximate])
    assert acts["1.out"] == "mul"
    assert _products(qm) == [approximate]
    assert not any(n.op == "call_module" and n.target == "1" for n in qm.graph.nodes)


@pytest.mark.parametrize("target", ["qnn", "onnxruntime", "openvino", "tensorrt", None])
def test_other_targets_keep_gelu_whole(target):
    kw = {"target": target} if target else {}
    qm = qtrim_fx.prepare(_net(), _x(), **kw)
    names = {s.name for s, _, _ in iter_sites(qm)}
    assert _products(qm) == [] and not any(n.startswith("1.") and n != "1.out" for n in names)
    assert any(n.op == "call_module" and n.target == "1" for n in qm.graph.nodes)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_lambda_0_is_exact_fp32_in_value_and_gradient(approximate):
    model = _net(approximate)
    (x,) = _x()
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    qtrim_fx.calibrate(qm, [(x,), (0.5 * x,)])
    assert_exact_at_lambda_0(model, qm, x)  # at λ = 1 the quantized pieces change the value: what the file computes


def test_functional_gelu_is_decomposed():
    torch.manual_seed(0)
    model, x = FunctionalGelu().eval(), torch.randn(4, 6)
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    assert _products(qm) == ["none"]
    assert sorted(_acts(qm).values()).count("div") == 1
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))


def test_gelu_product_is_gelu_where_the_product_is_float_and_half_of_it_elsewhere():
    x = torch.linspace(-6, 6, 1001)
    for approximate in GELU_STEPS:
        m = gelu_steps(x, approximate)
        assert torch.equal(gelu_product(m, x, approximate), F.gelu(x, approximate=approximate))
        q = torch.round(m * 64) / 64
        changed = q != m
        assert changed.any()
        assert torch.equal(gelu_product(q, x, approximate)[changed], (0.5 * q)[changed])


class _Untraceable(nn.Module):
    """The root forward branches on a shape: captured with ``torch.export`` (ATen ``gelu``)."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(6, 5), nn.Linear(5, 3), approximate

    def forward(self, x):
        h = self.fc1(x)
        for _ in range(int(h.shape[0] > 0)):
            h = h + 1.0
        return self.fc2(F.gelu(h, approximate=self.approximate))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_torch_export_capture_is_decomposed_too(approximate):
    torch.manual_seed(0)
    model, x = _Untraceable(approximate).eval(), torch.randn(4, 6)
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    assert _products(qm) == [approximate]
    assert len(_acts(qm)) >= len(GELU_STEPS[approximate]) + 1
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))
