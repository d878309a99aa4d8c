"""RewireInplacePass: a tensor mutated by an in-place call whose result is discarded (``y.relu_()``).

Before, the sites sat on the in-place calls' nodes, which nothing read: the value the model went on with was
not quantized (on ``qnn`` / ``npu`` the file ran the Relu and Mul in float, ``check``: float_op /Relu, /Mul).
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check
from qtrim_fx.passes.prepare.rewire_inplace import RewireInplacePass


class InplaceMethods(nn.Module):
    def __init__(self, early: bool = True) -> None:
        super().__init__()
        self.conv, self.fc, self.early = nn.Conv2d(3, 8, 3), nn.Linear(8, 3), early

    def forward(self, x):
        y = self.conv(x)
        early = y.sum() if self.early else None  # reads y before the mutation: must keep reading y
        y.relu_()
        y.mul_(0.5)
        F.relu_(y)
        out = self.fc(y.mean((2, 3)))
        return out + 0 * early if self.early else out


def test_later_readers_read_the_mutating_call_and_values_are_unchanged():
    model = InplaceMethods().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = gm(x)
    result = RewireInplacePass()(gm)
    assert result.modified
    gm.graph.lint()
    nodes = {n.name: n for n in gm.graph.nodes}
    conv = nodes["conv"]
    assert {u.name for u in conv.users} == {"sum_1", "relu_"}  # the earlier reader and the first mutation
    assert nodes["relu_"].users.keys() == {nodes["mul_"]}
    assert nodes["mean"].args[0] is nodes["relu__1"]  # F.relu_ is the last mutation before the mean
    with torch.no_grad():
        assert torch.equal(gm(x), want)
    assert not RewireInplacePass()(gm).modified


def test_out_of_place_and_dunder_calls_are_left_alone():
    class Plain(nn.Module):
        def forward(self, x):
            y = x.relu()
            y += 1  # fx already rewires __iadd__'s readers
            return y * 2

    gm = fx.symbolic_trace(Plain())
    assert not RewireInplacePass()(gm).modified


@pytest.mark.parametrize("target", ["qnn", "npu", "onnxruntime"])
def test_in_place_activations_are_quantized_where_the_model_reads_them(tmp_path, target):
    torch.manual_seed(0)
    model = InplaceMethods(early=False).eval()
    x = torch.randn(4, 3, 8, 8)
    qm = qtrim_fx.prepare(model, (x,), target=target)
    read = [n for n in qm.graph.nodes if n.op == "call_method" and n.target == "mean"]
    assert read and str(read[0].args[0].target).startswith("qtrim_sites")  # the mean reads a site's output
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.train()(x).sum().backward()  # a site whose output is mutated in place keeps a mask, not its output
    assert qm.conv.weight.grad is not None and torch.isfinite(qm.conv.weight.grad).all()
    path = tmp_path / "inplace.onnx"
    qtrim_fx.export_onnx(qm.eval(), (x,), path, target=target)
    assert [v for v in check(str(path), target) if v.severity == "error"] == []  # was: float Relu, Mul, ReduceMean
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = qm(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 0.02 * abs(want).max()
