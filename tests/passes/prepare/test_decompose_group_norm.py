"""DecomposeGroupNormPass: on integer-only targets an affine GroupNorm is normalize -> ·γ -> +β, each a site."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.prepared import iter_sites


class _GroupNormNet(nn.Module):
    def __init__(self, functional: bool = False, affine: bool = True) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8, affine=affine)
        self.head = nn.Conv2d(8, 4, 1)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.group_norm(y, 2, self.norm.weight, self.norm.bias) if self.functional else self.norm(y)
        return self.head(torch.tanh(y)).mean((2, 3))


def _group_norm_calls(qm: torch.nn.Module) -> list:
    return [n for n in qm.graph.nodes if n.op == "call_function" and n.target is F.group_norm]


@pytest.mark.parametrize("target", ["qnn", "npu"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.group_norm"])
def test_affine_group_norm_is_decomposed_with_a_site_on_each_tensor(target: str, functional: bool) -> None:
    torch.manual_seed(0)
    model = _GroupNormNet(functional).eval()
    x = torch.randn(2, 3, 8, 8)
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,), target=target)
    (norm,) = _group_norm_calls(qm)
    assert norm.args[2:4] == (None, None)  # γ and β moved to their own ops
    names = {spec.name for spec, _, _ in iter_sites(qm)}
    if not functional:  # the module owns its primitives
        assert {"norm.group_norm", "norm.weight", "norm.mul", "norm.bias", "norm.out"} <= names
    assert not any(n.op == "call_module" and n.target == "norm" for n in qm.graph.nodes)
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    # float rounding only: torch's kernel folds γ into the normalization
    torch.testing.assert_close(qm(x), model(x), rtol=1e-5, atol=1e-6)


def test_float_capable_targets_and_no_affine_keep_group_norm_whole() -> None:
    x = torch.randn(2, 3, 8, 8)
    for target in (None, "onnxruntime", "tensorrt", "openvino"):
        qm = qtrim_fx.prepare(_GroupNormNet(), (x,), target=target)
        assert any(n.op == "call_module" and n.target == "norm" for n in qm.graph.nodes), target
    qm = qtrim_fx.prepare(_GroupNormNet(affine=False), (x,), target="qnn")
    assert any(n.op == "call_module" and n.target == "norm" for n in qm.graph.nodes)


def test_decomposed_group_norm_trains() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qm = qtrim_fx.prepare(_GroupNormNet(), (x,), target="qnn")
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.train()
    qm(x).square().mean().backward()
    norm = qm.get_submodule("norm")
    assert norm.weight.grad is not None and float(norm.weight.grad.abs().sum()) > 0
    assert norm.bias.grad is not None and float(norm.bias.grad.abs().sum()) > 0


class _BufferAffine(nn.Module):
    """F.group_norm with γ / β held as buffers (not parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("gamma", torch.rand(8) + 0.5)
        self.register_buffer("beta", torch.rand(8) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(self.conv(x), 4, self.gamma, self.beta).mean((2, 3))


def test_buffer_affine_is_decomposed_too() -> None:
    model = _BufferAffine().eval()
    x = torch.randn(2, 3, 8, 8)
    qm = qtrim_fx.prepare(copy.deepcopy(model), (x,), target="qnn")
    (norm,) = _group_norm_calls(qm)
    assert norm.args[2:4] == (None, None)
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    torch.testing.assert_close(qm(x), model(x), rtol=1e-5, atol=1e-6)
