"""Structural and numerical tests of the prepare passes (normalize, functionalize, annotate, materialize)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import ACT_SITE, FLOAT_REGION, OP_KIND, SITE_NODE, WEIGHT_SITE
from qtrim_fx.frontend.trace import capture
from qtrim_fx.passes.prepare.annotate import AnnotateSitesPass
from qtrim_fx.passes.prepare.functionalize import FunctionalizeWeightedModulesPass
from qtrim_fx.passes.prepare.materialize import InsertSitesPass
from qtrim_fx.passes.prepare.normalize import NormalizeOpsPass


def _pipeline_until(gm: fx.GraphModule, stop: str) -> fx.GraphModule:
    gm = NormalizeOpsPass()(gm).graph_module
    gm = FunctionalizeWeightedModulesPass()(gm).graph_module
    gm = NormalizeOpsPass()(gm).graph_module
    if stop == "functionalize":
        return gm
    gm = AnnotateSitesPass()(gm).graph_module
    if stop == "annotate":
        return gm
    return InsertSitesPass()(gm).graph_module


def _graph_text(gm: fx.GraphModule) -> str:
    return str(gm.graph)


class Plain(nn.Module):
    """Nothing to quantize: no pass may touch it."""

    def forward(self, x):
        return x * 2 + x.size(0)


@pytest.fixture
def convnet():
    model, inputs = get_model("tiny_convnet")
    return model, inputs


# -- normalize ----------------------------------------------------------------------------------
def test_normalize_kinds_and_no_edits(convnet):
    model, _ = convnet
    gm = capture(model).gm
    before = _graph_text(gm)
    res = NormalizeOpsPass()(gm)
    assert not res.modified and _graph_text(gm) == before
    kinds = {n.name: n.meta[OP_KIND] for n in gm.graph.nodes}
    assert "conv" in kinds.values() and "linear" in kinds.values()
    assert all(k != "" for k in kinds.values())


def test_normalize_functional_method_and_aten_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            a = F.linear(x, self.w)
            b = torch.matmul(a, self.w)
            c = a.transpose(0, 1)
            return F.softmax(b, -1) + c.sum()

    gm = NormalizeOpsPass()(fx.symbolic_trace(M())).graph_module
    kinds = {n.name: n.meta[OP_KIND] for n in gm.graph.nodes}
    assert kinds["linear"] == "linear" and kinds["matmul"] == "matmul"
    assert kinds["transpose"] == "reshape" and kinds["softmax"] == "softmax" and kinds["add"] == "add"
    ep = torch.export.export(M(), (torch.randn(4, 4),))
    egm = NormalizeOpsPass()(ep.module()).graph_module
    ek = [n.meta[OP_KIND] for n in egm.graph.nodes if n.op == "call_function"]
    assert "linear" in ek and "softmax" in ek


# -- functionalize ------------------------------------------------------------------------------
def test_functionalize_is_exact_idempotent_and_keeps_names(convnet):
    model, (x,) = convnet
    gm = NormalizeOpsPass()(capture(model).gm).graph_module
    res = FunctionalizeWeightedModulesPass()(gm)
    assert res.modified
    gm.graph.lint()
    assert not any(
        n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (nn.Conv2d, nn.Linear))
        for n in gm.graph.nodes
    )
    assert torch.equal(gm(x), model(x))
    again = FunctionalizeWeightedModulesPass()(gm)
    assert not again.modified
    gm.load_state_dict(model.state_dict())  # parameter names unchanged


def test_functionalize_conv_padding_modes_and_transpose():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.b = nn.ConvTranspose2d(4, 2, 2, stride=2)
            self.c = nn.Conv1d(2, 2, 3, padding="same")

        def forward(self, x):
            y = self.b(self.a(x))
            return self.c(y.flatten(2))

    m = M().eval()
    x = torch.randn(1, 3, 5, 5)
    gm = FunctionalizeWeightedModulesPass()(NormalizeOpsPass()(capture(m).gm).graph_module).graph_module
    assert torch.equal(gm(x), m(x))


def test_passes_leave_non_matching_graphs_untouched():
    gm = fx.symbolic_trace(Plain())
    before = _graph_text(gm)
    for p in (NormalizeOpsPass(), FunctionalizeWeightedModulesPass(), NormalizeOpsPass(), AnnotateSitesPass()):
        assert not p(gm).modified
    assert not InsertSitesPass()(gm).modified
    assert _graph_text(gm) == before


# -- annotate -----------------------------------------------------------------------------------
def test_annotate_only_writes_meta_and_is_idempotent(convnet):
    model, _ = convnet
    gm = _pipeline_until(capture(model).gm, "functionalize")
    before = _graph_text(gm)
    res = AnnotateSitesPass()(gm)
    assert res.modified and _graph_text(gm) == before
    assert not AnnotateSitesPass()(gm).modified
    w = [n for n in gm.graph.nodes if WEIGHT_SITE in n.meta]
    assert {n.meta[WEIGHT_SITE].name for n in w} >= {"conv1.weight", "fc.weight"}


def test_weight_sites_on_every_weighted_op_and_bn_recorded(convnet):
    model, _ = convnet
    qm = qtrim_fx.prepare(model)
    weight_sites = {s.param for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight"}
    weighted = {n + ".weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert weight_sites == weighted
    folded = {s.param: s.folded_bn for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight"}
    bn_after_conv = [v for v in folded.values() if v is not None]
    assert bn_after_conv, "conv → BatchNorm pairs must be recorded for folding"


def test_one_site_per_tensor_and_none_on_non_tensors(convnet):
    model, _ = convnet
    qm = qtrim_fx.prepare(model)
    inputs = [n.args[0] for n in qm.graph.nodes if SITE_NODE in n.meta]
    assert len(inputs) == len(set(inputs)), "a tensor got two quantizers"
    for n in qm.graph.nodes:
        if SITE_NODE in n.meta:
            src = n.args[0]
            assert src.op != "call_method" or src.target not in ("size", "dim")
            assert all(u.target != n.target for u in n.users), "site feeds itself"


def test_residual_add_and_concat_inputs_are_quantized():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x) + self.b(x)
            z = torch.cat([self.a(x), y], 1)
            return self.c(z) * x.shape[1]

    qm = qtrim_fx.prepare(M())
    for n in qm.graph.nodes:
        if n.target in (operator.add, torch.cat) or (n.op == "call_function" and n.target is torch.cat):
            args = n.args[0] if n.target is torch.cat else n.args
            for a in args:
                assert a.op == "call_module" and a.target.startswith("qtrim_sites."), (n, a)
    # the scalar multiply by x.shape[1] gets no site on the shape
    for n in qm.graph.nodes:
        if SITE_NODE in n.meta:
            assert n.args[0].target not in ("size", getattr)


def _attention_checks(qm: fx.GraphModule, expect_qkv: int) -> None:
    sites = [n for n in qm.graph.nodes if SITE_NODE in n.meta]
    region = {n for n in qm.graph.nodes if n.meta.get(FLOAT_REGION)}
    for s in sites:
        src = s.args[0]
        assert src not in region, f"site {s.meta[SITE_NODE].name} on an attention score/probability"
        assert src.meta.get(OP_KIND) != "softmax"
        for u in s.users:
            assert u.meta.get(OP_KIND) != "softmax", "a quantized tensor feeds softmax"
    softmaxes = [n for n in qm.graph.nodes if n.meta.get(OP_KIND) == "softmax"]
    for sm in softmaxes:
        assert not any(SITE_NODE in u.meta for u in sm.users)
        assert SITE_NODE not in sm.args[0].meta
    qkv = [s for s in sites if s.meta[SITE_NODE].kind == "activation" and
           set(s.meta[SITE_NODE].consumers) & {"matmul", "bmm", "sdpa", "baddbmm"}]
    assert len(qkv) >= expect_qkv


@pytest.mark.parametrize("name", ["attention_block", "vit_tiny", "vit_tiny_sdpa", "vit_tiny_mha"])
def test_attention_sites_keep_scores_float(name):
    model, inputs = get_model(name)
    qm = qtrim_fx.prepare(model)
    _attention_checks(qm, expect_qkv=1)
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    weights = {s.param for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight"}
    assert linears <= weights
    for n in mhas:
        assert f"{n}.in_proj_weight" in weights
    qtrim_fx.calibrate(qm, [inputs])
    qtrim_fx.set_blend(qm, 0.0)
    model.train(False)
    qm.eval()
    assert torch.equal(qm(*inputs), model(*inputs))


def test_hand_written_attention_structure():
    class Attn(nn.Module):
        def __init__(self, d=16, h=2):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.h = h

        def forward(self, x, mask):
            b, t, d = x.shape
            q = self.q(x).view(b, t, self.h, -1).transpose(1, 2)
            k = self.k(x).view(b, t, self.h, -1).transpose(1, 2)
            v = self.v(x).view(b, t, self.h, -1).transpose(1, 2)
            s = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
            p = torch.softmax(s + mask, dim=-1)
            return self.o((p @ v).transpose(1, 2).reshape(b, t, d))

    qm = qtrim_fx.prepare(Attn())
    names = {s.name: s for s, _, _ in qtrim_fx.iter_sites(qm)}
    assert {"q.out", "k.out", "v.out"} <= set(names), sorted(names)
    assert "input.x" in names  # input of the projections
    assert not any(n.startswith("input.mask") for n in names)
    # attention output = the out projection's input
    o_in = [n for n in qm.graph.nodes if n.op == "call_function" and n.target is F.linear and
            n.args[1].target == "qtrim_sites.o_weight"]
    src = o_in[0].args[0]
    while not str(src.target).startswith("qtrim_sites.") and src.op == "call_method":
        src = src.args[0]  # views commute with per-tensor quantization; the site sits before them
    assert str(src.target).startswith("qtrim_sites.")
    _attention_checks(qm, expect_qkv=3)


def test_linear_output_gets_output_role_site(convnet):
    model, _ = convnet
    qm = qtrim_fx.prepare(model)
    out_sites = [s for s, _, _ in qtrim_fx.iter_sites(qm) if s.role == "output"]
    assert [s.name for s in out_sites] == ["fc.out"]


# -- materialize --------------------------------------------------------------------------------
def test_materialize_structure_lint_and_idempotence(convnet):
    model, (x,) = convnet
    gm = _pipeline_until(capture(model).gm, "annotate")
    n_specs = sum((WEIGHT_SITE in n.meta) + (ACT_SITE in n.meta) for n in gm.graph.nodes)
    res = InsertSitesPass()(gm)
    assert res.modified
    gm.graph.lint()
    site_nodes = [n for n in gm.graph.nodes if SITE_NODE in n.meta]
    assert len(site_nodes) == n_specs == len(gm.qtrim_sites)
    before = _graph_text(gm)
    assert not InsertSitesPass()(gm).modified and _graph_text(gm) == before
    gm.eval()
    assert torch.equal(gm(x), model(x))  # λ = 0


def test_state_dict_of_original_loads_and_prepared_state_round_trips(convnet):
    model, (x,) = convnet
    qm = qtrim_fx.prepare(model)
    missing, unexpected = qm.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("qtrim_sites.", "qtrim_blend.", "qtrim_bias_shift.")) for k in missing)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 0.7)
    sd = copy.deepcopy(qm.state_dict())
    fresh = qtrim_fx.prepare(get_model("tiny_convnet")[0])
    fresh.load_state_dict(sd)
    assert float(fresh.qtrim_blend.value) == pytest.approx(0.7)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    qm.eval()
    fresh.eval()
    assert torch.equal(fresh(x), qm(x))


def test_lambda_one_is_fake_quant_and_gradients_flow(convnet):
    model, (x,) = convnet
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    qm.train()
    out = qm(x)
    assert not torch.equal(out, model.train()(x))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
