"""A power by a constant exponent gets its own site on integer-only targets (issue 20), and only there.

GPT-2's ``gelu_new`` computes ``x ** 3`` in Python; without a site on the power, ``Pow -> Mul(0.044715)`` is a
float island of the ``qnn`` file. Every spelling of a constant power gets the site (``x ** 3``, ``torch.pow``,
``Tensor.pow``, ``aten.pow.Tensor_Scalar`` from ``torch.export``); a tensor exponent and arithmetic on
shapes do not.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.profiles import INTEGER_ACTIVATION_SITES
from qtrim_fx.core.spec import OP_KIND
from qtrim_fx.runtime.prepared import iter_sites


class _Power(nn.Module):
    def __init__(self, power) -> None:
        super().__init__()
        self.fc1, self.fc2, self.power = nn.Linear(8, 8), nn.Linear(8, 4), power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(0.5 * self.power(h))


class _Untraceable(_Power):
    """The root forward branches on a shape: captured with ``torch.export`` (ATen ``pow.Tensor_Scalar``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        for _ in range(int(h.shape[0] > 0)):
            h = h + 1.0
        return self.fc2(0.5 * torch.pow(h, 3))


class _Scaled(_Power):
    """``d ** -0.5`` on a shape, a tensor exponent, a constant base: no site on any."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * h.size(-1) ** -0.5 * torch.pow(h.abs() + 1.0, torch.sigmoid(h)) * 2.0 ** h)


_POWERS = {
    "x**3": lambda h: h ** 3,
    "x**2": lambda h: h ** 2,
    "torch.pow": lambda h: torch.pow(h, 3.0),
    "Tensor.pow": lambda h: h.pow(2),
    "exponent=": lambda h: torch.pow(h, exponent=0.5 * 4),
}


def _sites(model: nn.Module, target: str | None) -> dict[str, str]:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    qm = qtrim_fx.prepare(model, (x,), **({"target": target} if target else {}))
    with torch.no_grad():  # λ = 0 is still exact FP32
        assert torch.equal(qm(x), model(x))
    return {s.name: s.op for s, _, _ in iter_sites(qm) if s.kind == "activation"}


def test_integer_only_profiles_declare_pow_sites():
    assert ("pow", "out") in INTEGER_ACTIVATION_SITES


@pytest.mark.parametrize("spelling", list(_POWERS))
@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_constant_power_gets_a_site_on_integer_only_targets(spelling, target):
    sites = _sites(_Power(_POWERS[spelling]).eval(), target)
    assert list(sites.values()).count("pow") == 1, sites


@pytest.mark.parametrize("target", [None, "onnxruntime", "tensorrt", "openvino"])
def test_float_capable_targets_leave_the_power_alone(target):
    sites = _sites(_Power(_POWERS["x**3"]).eval(), target)
    assert "pow" not in sites.values(), sites


def test_torch_export_capture_gets_the_site_too():
    sites = _sites(_Untraceable(None).eval(), "qnn")
    assert list(sites.values()).count("pow") == 1, sites


def test_tensor_exponents_and_shape_arithmetic_get_no_site():
    model = _Scaled(None).eval()
    sites = _sites(model, "qnn")
    assert "pow" not in sites.values(), sites
    qm = qtrim_fx.prepare(model, (torch.randn(2, 8),), target="qnn")
    assert sum(n.meta.get(OP_KIND) == "pow" for n in qm.graph.nodes) == 3  # seen as powers, refused as sites


def test_gelu_new_is_quantized_at_every_op():
    class GeluNew(nn.Module):  # Hugging Face's NewGELUActivation, as written there
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    model = nn.Sequential(nn.Linear(8, 16), GeluNew(), nn.Linear(16, 4)).eval()
    ops = sorted(v for k, v in _sites(model, "qnn").items() if k.startswith("1."))
    assert ops == sorted(["pow", "mul", "add", "mul", "activation", "add", "mul", "mul"])
