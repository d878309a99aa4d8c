"""Model outputs: a site whose value reaches no other site and no weighted op (the logits) stays float.

No integer kernel reads such a tensor, so quantizing it only rounds, and may clip, what the user
reads (a range from train-mode BatchNorm logits clips eval-mode ones). A model prepared for no
target, or for a float-capable one, trains it in float and lowering leaves it float; an
integer-only target (qnn, npu) quantizes it, in training and in the file.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import ACT_SITE
from qtrim_fx.passes.lower import lower, lowering_plan
from qtrim_fx.runtime.prepared import iter_sites
from tests.helpers.cpu import ort_cpu_session


class Head(nn.Module):
    """Conv features, logits through a softmax; the pooled features are returned too and read by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.aux = nn.Linear(8, 5), nn.Linear(8, 2)

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(f).softmax(-1), f, self.aux(f)


def _prepared(target: str | None = None) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qm = qtrim_fx.prepare(Head(), (x,), target=target)
    qm.train()
    for _ in range(3):
        qm(x)
    qtrim_fx.set_blend(qm, 1.0)
    return qm, x


def _float_sites(qm) -> set[str]:
    return {spec.name for spec, site, _ in iter_sites(qm) if site.float_output}


def test_only_sites_that_feed_nothing_quantized_are_model_outputs():
    qm, _ = _prepared()
    marked = {spec.name for spec, _, _ in iter_sites(qm) if spec.model_output}
    # fc's and aux's outputs reach only the graph output (one through a softmax); the pooled features are
    # returned too, but fc and aux read them: they stay quantized.
    assert marked == {"fc.out", "aux.out"}
    assert _float_sites(qm) == marked
    specs = [n.meta[ACT_SITE] for n in qm.graph.nodes if ACT_SITE in n.meta]
    assert all(s.model_output == (s.name in marked) for s in specs)


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_integer_only_targets_train_the_model_outputs(target):
    qm, _ = _prepared(target)
    # the integer-only profile also quantizes the softmax output: that site is the model output now
    assert {spec.name for spec, _, _ in iter_sites(qm) if spec.model_output} == {"softmax", "aux.out"}
    assert _float_sites(qm) == set()


def test_float_output_site_is_identity_at_lambda_one_but_keeps_statistics():
    qm, _ = _prepared()
    site = next(site for spec, site, _ in iter_sites(qm) if spec.name == "fc.out")
    before = site.observer.hi.clone()
    y = (torch.randn(8, 5) * 50).requires_grad_()  # far outside the observed range: never clipped
    outs = [site(y) for _ in range(site.observer.update_every)]  # one of them updates the statistics
    assert all(out is y for out in outs)
    assert float(site.observer.hi) > float(before)  # an integer-only export still gets its range
    g, = torch.autograd.grad(site(y).sum(), y)
    assert torch.equal(g, torch.ones_like(y))


def test_lowering_keeps_what_was_trained():
    qm, _ = _prepared()
    plan = lowering_plan(qm, "onnxruntime")
    assert not plan["fc.out"].kept and not plan["aux.out"].kept
    assert all(p.kept for name, p in plan.items() if name not in ("fc.out", "aux.out"))
    qnn = lowering_plan(qm, "qnn")  # integer-only: quantized from the unclipped range it observed
    assert qnn["fc.out"].kept and qnn["aux.out"].kept
    q_qm, _ = _prepared("qnn")
    assert lowering_plan(q_qm, "onnxruntime")["fc.out"].kept  # trained quantized: deployed quantized


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", "openvino"])
def test_exported_logits_are_float_and_match_the_lowered_model(target, tmp_path):
    qm, x = _prepared()
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x[:1],), path, target=target)
    model = onnx.load(path)
    producers = {o: n for n in model.graph.node for o in n.output}
    logits = model.graph.output[0].name
    assert producers[logits].op_type == "Softmax"
    assert producers[producers[logits].input[0]].op_type == "Gemm"  # no Q/DQ between the head and softmax
    assert qtrim_fx.onnx.check(path, target) == []
    qm.eval()
    with torch.no_grad():  # the target's grid (tensorrt: symmetric int8 activations), logits float
        ref = [t.numpy() for t in lower(qm, target)(x)]
    sess = ort_cpu_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for r, o in zip(ref, out, strict=True):
        assert abs(r - o).max() <= 1e-4 * max(1.0, abs(r).max())


def test_qnn_file_quantizes_the_logits(tmp_path):
    qm, x = _prepared("qnn")
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (x[:1],), path, target="qnn")
    model = onnx.load(path)
    producers = {o: n for n in model.graph.node for o in n.output}
    gemm_out = producers[model.graph.output[2].name]  # aux logits
    assert gemm_out.op_type == "DequantizeLinear"


def test_inspect_says_the_logits_stay_float():
    qm, _ = _prepared()
    rows = {r.name: r for r in qtrim_fx.inspect(qm).rows}
    assert any("model output: float" in n for n in rows["fc.out"].notes)
    assert not any("model output" in n for n in rows["conv.weight"].notes)
