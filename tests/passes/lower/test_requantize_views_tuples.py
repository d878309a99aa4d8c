"""RequantizeViewsPass on a view returning a tuple: the copies go on its getitem readers (issue 20, GPT-2).

``aten.split.Tensor`` (torch.export's form of GPT-2's q/k/v ``split``) used to get a ``quant_dequant`` on the
tuple itself (its ``__name__`` is ``split.Tensor``, not ``split``): the lowered model failed on its first call
(``'list' object has no attribute 'dtype'``) and ``export_onnx(target="qnn")`` of GPT-2 with it.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

from qtrim_fx.passes.lower.requantize_views import RequantizeViewsPass
from qtrim_fx.runtime.qdq import is_quant_dequant, quant_dequant


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.05))
        self.register_buffer("zero_point", torch.tensor(128.0))


def _graph(split) -> fx.GraphModule:
    """x -> quant_dequant -> split(2, dim=-1) -> (a, b) -> a @ b^T (the copies must land on a and b)."""
    g = fx.Graph()
    x = g.placeholder("x")
    s, z = g.get_attr("scale"), g.get_attr("zero_point")
    q = g.call_function(quant_dequant, (x, s, z, 0, 255, None, 8, False, "qkv"))
    parts = g.call_function(split, (q, 2, -1))
    a = g.call_function(operator.getitem, (parts, 0))
    b = g.call_function(operator.getitem, (parts, 1))
    g.output(g.call_function(torch.matmul, (a, g.call_function(torch.transpose, (b, -1, -2)))))
    return fx.GraphModule(_Holder(), g)


@pytest.mark.parametrize("split", [torch.ops.aten.split.Tensor, torch.split], ids=["aten", "torch"])
def test_copies_go_on_each_getitem_and_values_are_unchanged(split):
    gm = _graph(split)
    x = torch.randn(2, 3, 4) * 3
    with torch.no_grad():
        want = gm(x)
    result = RequantizeViewsPass()(gm)
    assert result.modified
    out = result.graph_module
    parts = next(n for n in out.graph.nodes if n.target is split)
    assert not any(is_quant_dequant(u.target) for u in parts.users)  # never on the tuple
    for item in parts.users:
        assert item.target is operator.getitem
        (copy,) = item.users
        assert copy.op == "call_function" and is_quant_dequant(copy.target)
        assert copy.args[1:8] == (*next(n for n in out.graph.nodes if n.name == "quant_dequant").args[1:8],)
    with torch.no_grad():
        assert torch.equal(out(x), want)  # the copies sit on values already on the grid
    assert not RequantizeViewsPass()(out).modified  # idempotent


def test_site_after_a_view_chain_is_copied_back_onto_the_op_output():
    """GPT-2's Conv1D: addmm -> view -> dropout -> site; the addmm gets its own copy (it ends in a Q in ONNX)."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = g.call_function(torch.ops.aten.mm.default, (x, w))
    y.meta["val"] = torch.empty(6, 4)
    v = g.call_function(torch.ops.aten.view.default, (y, [2, 3, 4]))
    d = g.call_function(torch.ops.aten.dropout.default, (v, 0.1, False))
    s, z = g.get_attr("scale"), g.get_attr("zero_point")  # after the op, as prepare leaves them
    q = g.call_function(quant_dequant, (d, s, z, 0, 255, None, 8, False, "proj"))
    g.output(q)
    gm = fx.GraphModule(_Holder(), g)
    args = (torch.randn(6, 5), torch.randn(5, 4))
    with torch.no_grad():
        want = gm(*args)
    result = RequantizeViewsPass()(gm)
    assert result.modified
    out = result.graph_module
    out.graph.lint()  # the copy's qparams are defined before it
    mm = next(n for n in out.graph.nodes if n.target is torch.ops.aten.mm.default)
    (copy,) = mm.users
    assert is_quant_dequant(copy.target) and copy.args[8] == f"proj.{mm.name}"
    with torch.no_grad():
        assert torch.equal(out(*args), want)
    assert not RequantizeViewsPass()(out).modified
