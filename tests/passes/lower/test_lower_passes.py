"""Structural and numerical tests of the lowering passes (fold BN, lower sites, round bias)."""

from __future__ import annotations

import copy

import pytest
import torch
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import LOWER_PLAN, SITE_NODE
from qtrim_fx.onnx import get_profile
from qtrim_fx.passes.base import PassContractError
from qtrim_fx.passes.lower.api import lower
from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass
from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass as _Fold
from qtrim_fx.passes.lower.lower_sites import LowerSitesPass, UncalibratedSitesError
from qtrim_fx.passes.lower.plan import PlanLoweringPass, lowering_plan
from qtrim_fx.passes.lower.round_bias import RoundBiasPass
from qtrim_fx.runtime.qdq import quant_dequant
from tests.helpers.qmodels import calibrated


def _qdq_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is quant_dequant]


@pytest.fixture
def convnet():
    model, (x,) = get_model("tiny_convnet", batch_size=4)
    return calibrated(model, [x, 0.5 * x]), x


def test_fold_bn_removes_bn_keeps_function_and_is_idempotent(convnet):
    qm, x = convnet
    gm = copy.deepcopy(qm)
    n_bn = sum(isinstance(gm.get_submodule(str(n.target)), nn.BatchNorm2d) for n in gm.graph.nodes
               if n.op == "call_module")
    assert n_bn == 2
    with torch.no_grad():
        before = gm(x)
    res = FoldBatchNormPass()(gm)
    assert res.modified
    gm.graph.lint()
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.BatchNorm2d)
                   for n in gm.graph.nodes)
    with torch.no_grad():
        after = gm(x)
    # same function up to float rounding of the fold (and the quantization flips it may cause)
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-2
    assert not FoldBatchNormPass()(gm).modified


def test_fold_bn_exact_in_float():
    model, (x,) = get_model("tiny_convnet", batch_size=4)
    qm = calibrated(model, [x], lam=0.0)  # λ = 0: sites are identities, only the fold changes numerics
    gm = FoldBatchNormPass()(copy.deepcopy(qm)).graph_module
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_lower_sites_structure_and_parity(convnet):
    qm, x = convnet
    n_sites = len(list(qtrim_fx.iter_sites(qm)))
    logits = [s.name for s, site, _ in qtrim_fx.iter_sites(qm) if site.float_output]
    assert logits == ["fc.out"]  # the model output: trained float, left float
    lg = lower(qm, "onnxruntime")
    assert len(_qdq_nodes(lg)) == n_sites - 1
    assert "fc.out" not in {n.args[-1] for n in _qdq_nodes(lg)}
    assert not hasattr(lg, "qtrim_sites")
    assert not any(SITE_NODE in n.meta and n.op == "call_module" for n in lg.graph.nodes)
    lg.graph.lint()
    assert not LowerSitesPass()(lg).modified
    assert not PlanLoweringPass(get_profile("onnxruntime"))(lg).modified  # no sites left to plan
    assert qm.qtrim_sites is not None  # the prepared model is untouched
    with torch.no_grad():
        a, b = qm(x), lg(x)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum())) > 35


def test_lower_is_exact_without_batchnorm():
    model, (x,) = get_model("tiny_mlp", batch_size=8)
    qm = calibrated(model, [x])
    with torch.no_grad():
        same_grid = get_profile("onnxruntime").replace(name="ort-float-bias", bias="float")
        assert torch.equal(lower(qm, same_grid)(x), qm(x))


def test_tensorrt_drops_output_sites_and_uses_symmetric_int8(convnet):
    qm, _ = convnet
    outs = [s.name for s, _, _ in qtrim_fx.iter_sites(qm) if s.role == "output"]
    assert outs
    lg = lower(qm, "tensorrt")
    names = {n.args[-1] for n in _qdq_nodes(lg)}
    assert not names & set(outs)
    for n in _qdq_nodes(lg):
        assert n.args[3] in (-128, -127) and n.args[4] == 127 and n.args[7] is True
        assert not lg.get_buffer(str(n.args[2].target)).any()  # zero points are 0


def test_per_tensor_target_from_per_channel_statistics(convnet):
    qm, _ = convnet
    lg = lower(qm, "npu")
    for n in _qdq_nodes(lg):
        assert lg.get_buffer(str(n.args[1].target)).dim() == 0


def test_uncalibrated_sites_are_named():
    model, _ = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    with pytest.raises(UncalibratedSitesError, match=r"conv1\.weight"):
        lower(qm)


def test_round_bias_only_for_int32_targets(convnet):
    qm, _x = convnet
    prof = get_profile("onnxruntime").replace(name="ort-int32", bias="int32")
    lg = lower(qm, get_profile("onnxruntime").replace(name="ort-float", bias="float"))
    assert not RoundBiasPass(get_profile("tensorrt"))(lg).modified
    res = RoundBiasPass(prof)(lg)
    assert res.modified and hasattr(lg, "qtrim_bias")
    assert not RoundBiasPass(prof)(lg).modified
    for name, b in lg.qtrim_bias.named_buffers():
        assert torch.isfinite(b).all(), name


def test_plan_decides_without_editing_and_is_idempotent(convnet):
    qm, _ = convnet
    gm = _Fold()(copy.deepcopy(qm).eval()).graph_module
    code = gm.code
    first = PlanLoweringPass(get_profile("tensorrt"))(gm)
    assert first.modified and gm.code == code  # records only: the graph is unchanged
    assert not PlanLoweringPass(get_profile("tensorrt"))(gm).modified
    plans = [n.meta[LOWER_PLAN] for n in gm.graph.nodes if LOWER_PLAN in n.meta]
    assert len(plans) == len(list(qtrim_fx.iter_sites(qm)))
    assert PlanLoweringPass(get_profile("onnxruntime"))(gm).modified  # another target, other records


def test_lower_sites_requires_a_plan(convnet):
    qm, _ = convnet
    gm = copy.deepcopy(qm).eval()
    with pytest.raises(PassContractError, match="PlanLoweringPass"):
        LowerSitesPass()(gm)


def test_lowering_plan_says_why_a_site_is_dropped(convnet):
    qm, _ = convnet
    plan = lowering_plan(qm, "tensorrt")
    outs = {s.name for s, _, _ in qtrim_fx.iter_sites(qm) if s.role == "output"}
    dropped = {name for name, p in plan.items() if not p.kept}
    assert dropped == outs
    assert all("tensorrt" in plan[name].reason and plan[name].scale is None for name in dropped)
    kept = lowering_plan(qm, "onnxruntime")
    assert all(p.kept and p.scale is not None for name, p in kept.items() if name != "fc.out")
    assert not kept["fc.out"].kept and "model output" in kept["fc.out"].reason
    assert lowering_plan(qm, "qnn")["fc.out"].kept  # integer-only: quantized from its unclipped range
    lg = lower(qm, "onnxruntime")  # the plan is what lowering applies
    for n in _qdq_nodes(lg):
        assert torch.equal(lg.get_buffer(str(n.args[1].target)), kept[n.args[-1]].scale)
