"""Optional ``None``-default forward arguments the example inputs leave out are captured as ``None``.

Symbolic tracing makes every argument a proxy, and a proxy ``is not None``: ``if mask is not None:`` was
captured on the branch the example inputs never take, so the prepared model failed on the very call it was
prepared with (timm's Hiera: ``'NoneType' object has no attribute 'view'`` at calibrate, from inside the
traced graph).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.frontend.trace import _omitted_optional_args, capture


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, mask=None, *, scale=None):
        if mask is not None:
            x = x.masked_fill(mask, 0.0)
        if scale is not None:
            x = x * scale
        return self.head(torch.relu(self.lin(x)))


def _float_twin(qm: nn.Module) -> _Masked:
    """The float model with the prepared model's weights (λ = 0 must reproduce it exactly)."""
    model = _Masked()
    model.load_state_dict({k: v for k, v in qm.state_dict().items() if k.split(".")[0] in ("lin", "head")})
    return model


def _prepared(example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(_Masked(), example)
        qtrim_fx.calibrate(qm, [example])
    return qm


def test_left_out_optional_arguments_are_captured_as_none():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    qm = _prepared((x,))
    assert qm.qtrim_info.frontend == "symbolic_trace"
    ops = [n.target for n in qm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "masked_fill" not in ops and not any(getattr(t, "__name__", "") == "mul" for t in ops)
    qtrim_fx.set_blend(qm, 0.0)
    model = _float_twin(qm)
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))
        assert torch.equal(qm(x, mask=None), model(x))  # the argument keeps its name
        assert torch.equal(qm(x, None, scale=None), model(x))


def test_passing_a_left_out_argument_names_the_fix():
    qm = _prepared((torch.randn(2, 4),))
    with pytest.raises(AssertionError, match=r"leave out 'mask'.*prepare it with 'mask' in example_inputs"):
        qm(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.bool))


def test_arguments_the_example_inputs_give_are_traced():
    x, mask = torch.randn(2, 4), torch.tensor([[True, False, False, True]] * 2)
    qm = _prepared((x, mask))
    qtrim_fx.set_blend(qm, 0.0)
    with torch.no_grad():
        assert torch.equal(qm(x, mask), _float_twin(qm)(x, mask))
    assert "masked_fill" in qm.code
    qk = _prepared({"x": x, "scale": torch.tensor(2.0)})
    assert "mask" in qk.code and "masked_fill" not in qk.code and "mul" in qk.code


def test_which_arguments_count_as_left_out():
    m = _Masked()
    assert _omitted_optional_args(m, None) == frozenset()  # no example inputs: nothing assumed
    assert _omitted_optional_args(m, (torch.randn(2, 4),)) == {"mask", "scale"}
    assert _omitted_optional_args(m, (torch.randn(2, 4), None)) == {"scale"}
    assert _omitted_optional_args(m, {"x": torch.randn(2, 4), "scale": 1.0}) == {"mask"}


def test_without_example_inputs_the_argument_stays_an_input():
    gm = capture(_Masked()).gm
    assert "masked_fill" in gm.code  # unchanged behaviour: prepare(model) alone assumes nothing
