"""A sum over an axis (``x.sum(dim)``: ResNeSt's and SKNet's sum over branches) on integer-only targets.

It is a reduction like ``mean``, so the ``pool`` op kind of the profiles' ``activation_sites`` covers it: prepared
for ``qnn`` / ``npu`` its output is a trained site. Before, the ReduceSum ran in float on the HTP and the ReduceMean
it fed was a ``check`` error (its input not dequantized); ``check`` now names a float ReduceSum as an error there.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check, get_profile
from qtrim_fx.passes.lower.api import lower
from tests.helpers.htp import require_htp


class _SplitAttention(nn.Module):
    """Two branches, their sum, a gate from the pooled sum (softmax over the branches), the gated sum."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        b = torch.stack([torch.relu(self.c1(x)), torch.relu(self.c2(x))], dim=1)
        s = b.sum(dim=1)
        a = self.fc(s.mean((2, 3), keepdim=True)).view(x.shape[0], 2, 16, 1, 1).softmax(dim=1)
        return self.head((b * a).sum(dim=1).mean((2, 3)))


def _export(target: str, path) -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(_SplitAttention().eval(), (x,), target=target)
        qtrim_fx.calibrate(qm, [(x,), (torch.randn(2, 8, 8, 8),)])
        qtrim_fx.set_blend(qm, 1.0)
        qtrim_fx.export_onnx(qm.eval(), (x,), str(path))
    return qm


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_sum_output_is_a_trained_site_on_integer_only_targets(target, tmp_path):
    qm = _export(target, tmp_path / "sk.onnx")
    assert [v for v in check(str(tmp_path / "sk.onnx"), target) if v.severity == "error"] == []
    m = onnx.load(str(tmp_path / "sk.onnx"))
    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n.op_type)
    sums = [n for n in m.graph.node if n.op_type == "ReduceSum"]
    assert len(sums) == 2 and all(users[n.output[0]] == ["QuantizeLinear"] for n in sums)
    assert "activation" in {s.kind for _, s, _ in qtrim_fx.iter_sites(qm)}
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():  # what is deployed is what was trained (the file is checked against the lowering on export)
        assert torch.equal(lower(qm, get_profile(target))(x), qm(x))


def test_float_reduce_sum_is_an_error_on_qnn(tmp_path):
    """A hand-made file: DQ -> ReduceSum -> (float) on qnn is an error; on onnxruntime nothing is asked."""
    from onnx import TensorProto, helper, numpy_helper

    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("ReduceSum", ["xd", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [s, z, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = str(tmp_path / "sum.onnx")
    onnx.save(model, path)
    errors = [v for v in check(path, "qnn") if v.severity == "error" and v.rule == "float_op"]
    assert errors and "ReduceSum" in str(errors[0])
    assert not [v for v in check(path, "onnxruntime") if v.severity == "error"]


def test_sum_file_runs_strictly_on_the_htp(tmp_path):
    require_htp()
    path = tmp_path / "sk.onnx"
    qm = _export("qnn", path)
    report = qtrim_fx.verify(str(path), lower(qm, get_profile("qnn")), [(torch.randn(2, 8, 8, 8),) for _ in range(2)],
                             backends=["qnn"])
    (htp,) = report.backends
    assert htp.status == "ok" and set(htp.ep_nodes) == {"QNNExecutionProvider"}, htp.message
    assert htp.outputs[0].sqnr_db >= 30
