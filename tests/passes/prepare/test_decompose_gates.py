"""DecomposeGatesPass: SiLU / HardSwish prepared for an integer-only target train a site on their gate.

The exporters write ``silu(x)`` as ``Mul(x, Sigmoid(x))`` (``hardswish`` below opset 14 as ``Mul(x,
HardSigmoid(x))``); prepared for ``qnn`` / ``npu`` the gate is its own site, λ = 0 stays exact FP32 (values
and gradients), other targets and the default prepare keep the activation as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.profiles import GATED_ACTIVATIONS, get_profile
from qtrim_fx.runtime.ops import GATES, gate_product
from tests.helpers.qmodels import (
    activation_site_ops,
    assert_exact_at_lambda_0,
    decomposed_activations,
    image_batch,
)


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act, nn.Conv2d(8, 4, 1)).eval()


class FunctionalSilu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class InplaceAliased(nn.Module):
    """An in-place SiLU whose input is read again afterwards: rewriting it out of place would change that read."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.SiLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        y = self.act(h)
        return y + h


_x = image_batch
_acts = activation_site_ops


def _gates(qm) -> list[str]:
    return decomposed_activations(qm, gate_product)


def test_the_gate_table_is_one_source_for_prepare_and_check():
    assert set(GATED_ACTIVATIONS) == set(GATES)
    assert get_profile("qnn").gated_activations() == ("silu",)  # opset 20 writes HardSwish as one op
    assert get_profile("npu").gated_activations() == ("silu", "hardswish")  # opset 13: no HardSwish op
    assert get_profile("npu").gated_activations(opset=14) == ("silu",)
    for name in ("onnxruntime", "tensorrt", "openvino"):
        assert get_profile(name).gated_activations() == ()


@pytest.mark.parametrize(("act", "target", "gate_op"), [
    (nn.SiLU, "qnn", "activation"), (nn.SiLU, "npu", "activation"), (nn.Hardswish, "npu", "activation")])
def test_gated_activation_trains_a_gate_site_and_keeps_its_output_site(act, target, gate_op):
    qm = qtrim_fx.prepare(_net(act()), _x(), target=target)
    acts = _acts(qm)
    assert acts["2.gate"] == gate_op and acts["2.out"] == "mul"
    assert _gates(qm) == [act.__name__.lower()]
    assert not any(n.op == "call_module" and n.target == "2" for n in qm.graph.nodes)


@pytest.mark.parametrize(("act", "target"), [(nn.Hardswish, "qnn"), (nn.SiLU, "onnxruntime"), (nn.SiLU, None)])
def test_targets_that_run_the_activation_whole_keep_it(act, target):
    qm = qtrim_fx.prepare(_net(act()), _x(), **({"target": target} if target else {}))
    assert _gates(qm) == [] and "2.gate" not in _acts(qm) and "2.out" in _acts(qm)


@pytest.mark.filterwarnings("ignore:calibrate")  # BatchNorm statistics of a fresh net: not the point
@pytest.mark.parametrize("act", [nn.SiLU, nn.Hardswish])
def test_lambda_0_is_exact_fp32_in_value_and_gradient(act):
    model = _net(act())
    (x,) = _x()
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    qtrim_fx.calibrate(qm, [(x,), (0.5 * x,)])
    assert_exact_at_lambda_0(model, qm, x)  # at λ = 1 the quantized pieces change the value: what the file computes


def test_functional_silu_is_decomposed_and_named_after_its_node():
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(FunctionalSilu().eval(), (torch.randn(4, 6),), target="qnn")
    assert _gates(qm) == ["silu"]
    assert any(name.endswith(".gate") for name in _acts(qm))


def test_inplace_silu_with_another_reader_is_left_alone():
    torch.manual_seed(0)
    model = InplaceAliased().eval()
    x = torch.randn(4, 6)
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    assert _gates(qm) == []
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x.clone()), model(x.clone()))


def test_gate_product_is_the_activation_where_the_gate_is_float_and_the_product_elsewhere():
    x = torch.linspace(-6, 6, 1001)
    for name, (act, gate_of) in GATES.items():
        g = gate_of(x)
        assert torch.equal(gate_product(x, g, name), act(x))
        q = torch.round(g * 255) / 255
        changed = q != g
        assert changed.any()
        assert torch.equal(gate_product(x, q, name)[changed], (x * q)[changed])


@pytest.mark.filterwarnings("ignore:calibrate")
def test_a_checkpoint_of_a_gated_model_loads_with_its_gate_sites(tmp_path):
    (x,) = _x()
    qm = qtrim_fx.prepare(_net(nn.SiLU()), (x,), target="qnn")
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.checkpoint.save(qm, tmp_path / "c.pt")
    again = qtrim_fx.checkpoint.load(_net(nn.SiLU()), tmp_path / "c.pt")
    assert _acts(again) == _acts(qm) and "2.gate" in _acts(again)
    assert torch.equal(again.eval()(x), qm.eval()(x))
