"""The pass contract of every FX pass (``qtrim_fx/passes/base.py``), checked the same way for each.

For each pass, on the graph it meets in its pipeline (``prepare_passes`` / ``lower_passes`` run up
to it on a real model):

* it applies: ``modified`` is True, the GraphModule it returns is the one it was given (in place),
  the graph lints, and something observable changed (code, qtrim meta, submodules or tensors);
* it is idempotent: run again on its own output it reports ``modified=False`` and changes nothing;
* on a graph it does not match it reports ``modified=False`` and changes nothing.

"Changes nothing" is checked on a snapshot (generated code, node targets/args, the qtrim
``node.meta`` records, submodule names, parameter and buffer values), so a pass that edits while
saying ``modified=False`` fails here. ``node.meta[OP_KIND]`` is left out of the snapshot:
``NormalizeOpsPass`` is documented as analysis only (``modified`` always False) and has its own test.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
import qtrim_fx.passes
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import ACT_SITE, FLOAT_REGION, LOWER_PLAN, OP_KIND, OWNER, SITE_NODE, WEIGHT_SITE
from qtrim_fx.frontend.trace import capture
from qtrim_fx.passes.base import GraphPass, PassResult
from qtrim_fx.passes.lower.attention_rank4 import AttentionRank4Pass
from qtrim_fx.passes.lower.bind_scalar_inputs import BindScalarInputsPass
from qtrim_fx.passes.lower.fold_bias_shift import FoldBiasShiftPass
from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass
from qtrim_fx.passes.lower.lower_sites import LowerSitesPass
from qtrim_fx.passes.lower.multiply_gates import MultiplyGatesPass
from qtrim_fx.passes.lower.pipeline import lower_passes
from qtrim_fx.passes.lower.plan import PlanLoweringPass
from qtrim_fx.passes.lower.quantize_norm_affine import QuantizeNormAffinePass
from qtrim_fx.passes.lower.renorm_embeddings import RenormEmbeddingsPass
from qtrim_fx.passes.lower.requantize_views import RequantizeViewsPass
from qtrim_fx.passes.lower.restore_relu import RestoreReluPass
from qtrim_fx.passes.lower.round_bias import RoundBiasPass
from qtrim_fx.passes.lower.safe_softmax import SafeSoftmaxPass
from qtrim_fx.passes.lower.sink_weights import SinkWeightsPass
from qtrim_fx.passes.prepare.annotate import AnnotateSitesPass
from qtrim_fx.passes.prepare.bias_shift import InsertBiasShiftPass
from qtrim_fx.passes.prepare.decompose_attention import DecomposeAttentionPass
from qtrim_fx.passes.prepare.decompose_gates import DecomposeGatesPass
from qtrim_fx.passes.prepare.decompose_gelu import DecomposeGeluPass
from qtrim_fx.passes.prepare.decompose_group_norm import DecomposeGroupNormPass
from qtrim_fx.passes.prepare.functionalize import FunctionalizeWeightedModulesPass
from qtrim_fx.passes.prepare.hoist_weights import HoistWeightsPass
from qtrim_fx.passes.prepare.inplace_sites import InPlaceSitesPass
from qtrim_fx.passes.prepare.lean_relu import LeanReluPass
from qtrim_fx.passes.prepare.materialize import InsertSitesPass
from qtrim_fx.passes.prepare.normalize import NormalizeOpsPass
from qtrim_fx.passes.prepare.pipeline import prepare_passes
from qtrim_fx.passes.prepare.ranks import record_ranks
from qtrim_fx.passes.prepare.rewire_inplace import RewireInplacePass
from qtrim_fx.passes.prepare.split_norm_act import SplitNormActPass
from qtrim_fx.runtime.bias_shift import bias_shifts
from qtrim_fx.runtime.ops import deferred_relu
from qtrim_fx.runtime.qdq import quant_dequant
from qtrim_fx.runtime.site import QuantSite
from tests.helpers.qmodels import calibrated

#: qnn stores int32 biases, so every lowering pass (RoundBiasPass included) has work to do.
INT32_BIAS = get_profile("qnn")
_QTRIM_META = (ACT_SITE, WEIGHT_SITE, SITE_NODE, OWNER, LOWER_PLAN, FLOAT_REGION)


# -- inputs ---------------------------------------------------------------------------------------
class Plain(nn.Module):
    """No weights, no ReLU, no attention: no pass has anything to do."""

    def forward(self, x):
        return x * 2 + x.size(0)


class TanhMLP(nn.Module):
    """Linear layers without ReLU or BatchNorm."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FunctionalLinear(nn.Module):
    """A weight used through ``F.linear`` already: nothing to functionalize."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return F.linear(x, self.w)


class _BatchNormAct(nn.BatchNorm2d):
    """BatchNorm then its own ``act`` child (timm's BatchNormAct2d shape)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(super().forward(x))


class NormActNet(nn.Module):
    """conv -> BatchNorm+act module: SplitNormActPass's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _BatchNormAct(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class ScoresOnly(nn.Module):
    """Attention scores and probabilities (a float region) with no weight anywhere."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _prepare_stage(model: nn.Module, passes: int, config: qtrim_fx.QuantConfig | None = None) -> fx.GraphModule:
    """``model`` captured and run through the first ``passes`` passes of ``prepare_passes(config)``."""
    gm = capture(model).gm
    for p in prepare_passes(config or qtrim_fx.QuantConfig())[:passes]:
        gm = p(gm).graph_module
    return gm


@pytest.fixture(scope="module")
def calibrated_convnet() -> fx.GraphModule:
    model, (x,) = get_model("tiny_convnet", batch_size=4)
    return calibrated(model, [x, 0.5 * x])


@pytest.fixture(scope="module")
def calibrated_tanh_mlp() -> fx.GraphModule:
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    return calibrated(TanhMLP().eval(), [x])


class ScaledBy(nn.Module):
    """A forward flag with a Python scalar default (BindScalarInputsPass binds its uses)."""

    def forward(self, x, scale: float = 2.0):
        return x * scale


class InplaceRelu(nn.Module):
    """linear -> y.relu_() (result discarded) -> linear reads y: RewireInplacePass's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        y = self.fc(x)
        y.relu_()
        return self.out(y)


class MaxNormEmbedding(nn.Module):
    """An embedding that renormalizes looked-up rows (RenormEmbeddingsPass renormalizes its whole table)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, max_norm=0.5)

    def forward(self, ids):
        return self.emb(ids).sum(1)


class Attention3d(nn.Module):
    """Attention on (N, L, E) queries: no head axis (AttentionRank4Pass gives it one)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)


class CausalAttention(nn.Module):
    """Causal (N, H, L, E) attention: written out with ``_safe_softmax`` for integer-only targets."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.fixture(scope="module")
def calibrated_causal_net() -> fx.GraphModule:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 8)
    qm = qtrim_fx.prepare(CausalAttention().eval(), (x,), config=NPU)  # example inputs: the head width is known
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


def _safe_softmax_stage(calibrated_causal_net, **_) -> fx.GraphModule:
    """CausalAttention lowered for npu up to (not including) SafeSoftmaxPass, the third pass from the end."""
    gm = copy.deepcopy(calibrated_causal_net).eval()
    for p in lower_passes(get_profile("npu"), prepared_for=get_profile("npu"))[:-3]:
        gm = p(gm).graph_module
    return gm


def _ranked(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    assert record_ranks(gm, inputs)
    return gm


class ViewNormNet(nn.Module):
    """conv -> relu -> flatten (a view) -> linear -> LayerNorm -> linear: the integer-only lowering's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.ln, self.out = nn.Conv2d(3, 4, 3), nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.ln(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


@pytest.fixture(scope="module")
def calibrated_integer_net() -> fx.GraphModule:
    """ViewNormNet prepared for the integer-only ``qnn`` target (its LayerNorm and view sites)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    return calibrated(ViewNormNet().eval(), [x, 0.5 * x], config=qtrim_fx.QuantConfig(target="qnn"))


class SiluNet(nn.Module):
    """linear -> SiLU -> linear: DecomposeGatesPass's input on an integer-only target."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class GeluNet(nn.Module):
    """linear -> GELU -> linear: DecomposeGeluPass's input on an integer-only target without a Gelu op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class GroupNormNet(nn.Module):
    """conv -> GroupNorm -> conv: DecomposeGroupNormPass's input on an integer-only target."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.norm(self.conv(x)))


def _group_norm_graph(**_) -> fx.GraphModule:
    gm = capture(GroupNormNet()).gm
    record_ranks(gm, (torch.randn(1, 3, 6, 6),))  # as prepare does for integer-only targets
    return gm


NPU = qtrim_fx.QuantConfig(target="npu")


@pytest.fixture(scope="module")
def calibrated_gate_net() -> fx.GraphModule:
    """SiluNet prepared for ``npu``: its SiLU as gate_product(x, site(sigmoid(x)))."""
    torch.manual_seed(0)
    return calibrated(SiluNet().eval(), [torch.randn(8, 6)], config=NPU)


def _gate_stage(calibrated_gate_net, **_) -> fx.GraphModule:
    """SiluNet lowered for npu up to (not including) MultiplyGatesPass, the fourth pass from the end."""
    gm = copy.deepcopy(calibrated_gate_net).eval()
    for p in lower_passes(get_profile("npu"), prepared_for=get_profile("npu"))[:-4]:
        gm = p(gm).graph_module
    return gm


def _integer_stage(passes: int) -> Callable[..., fx.GraphModule]:
    def build(calibrated_integer_net, **_):
        gm = copy.deepcopy(calibrated_integer_net).eval()
        for p in lower_passes(INT32_BIAS, prepared_for=INT32_BIAS)[:passes]:
            gm = p(gm).graph_module
        return gm
    return build


def _lower_stage(qm: fx.GraphModule, passes: int, profile=INT32_BIAS) -> fx.GraphModule:
    """A copy of ``qm`` (eval) run through the first ``passes`` passes of ``lower_passes(profile)``."""
    gm = copy.deepcopy(qm).eval()
    for p in lower_passes(profile)[:passes]:
        gm = p(gm).graph_module
    return gm


# -- snapshot -------------------------------------------------------------------------------------
def _snapshot(gm: fx.GraphModule) -> dict:
    nodes = tuple(
        (n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs),
         tuple((k, repr(n.meta[k])) for k in _QTRIM_META if k in n.meta))
        for n in gm.graph.nodes
    )
    tensors = {name: t.detach().clone() for name, t in (*gm.named_parameters(), *gm.named_buffers())}
    # the run-time flags passes set on sites (how a site treats its input and output)
    flags = {name: (m.keep_output, m.overwrite_input, m.float_output) for name, m in gm.named_modules()
             if isinstance(m, QuantSite)}
    return {"code": gm.code, "nodes": nodes, "modules": sorted(n for n, _ in gm.named_modules()), "tensors": tensors,
            "flags": flags}


def _differences(a: dict, b: dict) -> list[str]:
    out = [k for k in ("code", "nodes", "modules", "flags") if a[k] != b[k]]
    ta, tb = a["tensors"], b["tensors"]
    if ta.keys() != tb.keys():
        out.append(f"tensors {sorted(ta.keys() ^ tb.keys())}")
    out += [f"tensor {k}" for k in sorted(ta.keys() & tb.keys()) if not _same_tensor(ta[k], tb[k])]
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaN matching NaN (observers start with NaN statistics)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _run(make_pass: Callable[[], GraphPass], gm: fx.GraphModule) -> tuple[PassResult, list[str]]:
    before = _snapshot(gm)
    result = make_pass()(gm)
    assert result.graph_module is gm, "every qtrim_fx pass is declared in place"
    gm.graph.lint()
    return result, _differences(before, _snapshot(gm))


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    make_pass: Callable[[], GraphPass]
    applies: Callable[..., fx.GraphModule]  # the graph the pass meets in its pipeline
    no_match: Callable[..., fx.GraphModule]  # a graph it has nothing to do on


def _convnet_prepare(passes: int) -> Callable[..., fx.GraphModule]:
    return lambda **_: _prepare_stage(get_model("tiny_convnet")[0], passes + 2)  # + SplitNormAct, RewireInplace


def _convnet_lower(passes: int) -> Callable[..., fx.GraphModule]:
    return lambda calibrated_convnet, **_: _lower_stage(calibrated_convnet, passes)


def _normalized(model: type[nn.Module]) -> Callable[..., fx.GraphModule]:
    return lambda **_: _prepare_stage(model(), 3)


# prepare_passes: SplitNormAct, RewireInplace, Normalize, Functionalize, Normalize, Annotate, Insert, LeanRelu, InPlaceSites,
# InsertBiasShift, HoistWeights
#                 (DecomposeGates after
#                 SplitNormAct only for a target with gated activations: qnn, npu)
# (_convnet_prepare(k) runs SplitNormAct, RewireInplace and then k of the others)
# lower_passes:   RequireOpset, BindScalarInputs, RestoreRelu, SinkWeights, FoldBiasShift, FoldBatchNorm, PlanLowering, LowerSites, RoundBias,
#                 MultiplyGates, AttentionRank4, RenormEmbeddings
CASES: dict[str, Case] = {
    "FunctionalizeWeightedModulesPass": Case(
        FunctionalizeWeightedModulesPass, _convnet_prepare(1), _normalized(FunctionalLinear)),
    "AnnotateSitesPass": Case(AnnotateSitesPass, _convnet_prepare(3), _normalized(Plain)),
    "InsertSitesPass": Case(InsertSitesPass, _convnet_prepare(4), lambda **_: _prepare_stage(Plain(), 6)),
    "LeanReluPass": Case(LeanReluPass, _convnet_prepare(5), lambda **_: _prepare_stage(TanhMLP(), 7)),
    "InPlaceSitesPass": Case(InPlaceSitesPass, _convnet_prepare(6), lambda **_: _prepare_stage(Plain(), 8)),
    "InsertBiasShiftPass": Case(InsertBiasShiftPass, _convnet_prepare(7), lambda **_: _prepare_stage(Plain(), 9)),
    "HoistWeightsPass": Case(HoistWeightsPass, _convnet_prepare(8), lambda **_: fx.symbolic_trace(TanhMLP())),
    "RewireInplacePass": Case(
        RewireInplacePass, lambda **_: capture(InplaceRelu()).gm, lambda **_: capture(TanhMLP()).gm),
    "SplitNormActPass": Case(
        SplitNormActPass, lambda **_: capture(NormActNet().eval()).gm, lambda **_: capture(TanhMLP()).gm),
    "BindScalarInputsPass": Case(
        BindScalarInputsPass, lambda **_: fx.symbolic_trace(ScaledBy()), lambda **_: fx.symbolic_trace(TanhMLP())),
    "RequantizeViewsPass": Case(
        RequantizeViewsPass, _integer_stage(8),
        lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 8)),  # no view of a quantized tensor
    "QuantizeNormAffinePass": Case(
        QuantizeNormAffinePass, _integer_stage(9), lambda calibrated_convnet, **_: _lower_stage(calibrated_convnet, 8)),
    "DecomposeGatesPass": Case(
        lambda: DecomposeGatesPass(NPU), lambda **_: capture(SiluNet()).gm, lambda **_: capture(TanhMLP()).gm),
    "DecomposeGeluPass": Case(
        lambda: DecomposeGeluPass(NPU), lambda **_: capture(GeluNet()).gm, lambda **_: capture(TanhMLP()).gm),
    "DecomposeAttentionPass": Case(
        lambda: DecomposeAttentionPass(NPU), lambda **_: _ranked(Attention3d(), torch.randn(2, 3, 5, 8)),
        lambda **_: _ranked(TanhMLP(), torch.randn(2, 6))),
    "DecomposeGroupNormPass": Case(
        lambda: DecomposeGroupNormPass(NPU), _group_norm_graph, lambda **_: capture(TanhMLP()).gm),
    "MultiplyGatesPass": Case(
        MultiplyGatesPass, _gate_stage, lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 9)),
    "SafeSoftmaxPass": Case(
        SafeSoftmaxPass, _safe_softmax_stage, lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 9)),
    "AttentionRank4Pass": Case(
        AttentionRank4Pass, lambda **_: _ranked(Attention3d(), torch.randn(2, 5, 8)),
        lambda **_: _ranked(Attention3d(), torch.randn(2, 3, 5, 8))),  # already 4-D
    "RenormEmbeddingsPass": Case(
        RenormEmbeddingsPass, lambda **_: fx.symbolic_trace(MaxNormEmbedding()),
        lambda **_: fx.symbolic_trace(TanhMLP())),
    "RestoreReluPass": Case(
        RestoreReluPass, _convnet_lower(2), lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 2)),
    "SinkWeightsPass": Case(  # no match: a graph already lowered through it (each chain before its layer)
        SinkWeightsPass, _convnet_lower(3), lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 4)),
    "FoldBiasShiftPass": Case(
        FoldBiasShiftPass, _convnet_lower(4), lambda **_: fx.symbolic_trace(TanhMLP())),  # calibrated: shifts set
    "FoldBatchNormPass": Case(
        FoldBatchNormPass, _convnet_lower(5), lambda calibrated_tanh_mlp, **_: _lower_stage(calibrated_tanh_mlp, 5)),
    "PlanLoweringPass": Case(
        lambda: PlanLoweringPass(INT32_BIAS), _convnet_lower(6),
        lambda calibrated_convnet, **_: _lower_stage(calibrated_convnet, 9)),  # fully lowered: no site modules
    "LowerSitesPass": Case(LowerSitesPass, _convnet_lower(7), lambda **_: fx.symbolic_trace(TanhMLP())),
    "RoundBiasPass": Case(
        lambda: RoundBiasPass(INT32_BIAS), _convnet_lower(8),
        lambda **_: fx.symbolic_trace(TanhMLP())),  # biases, but no quantized input or weight
}

#: passes that report modified=False while they change the GraphModule (see each reason).
#: passes known to report ``modified`` untruthfully on a graph they do not match (none at present).
UNTRUTHFUL_NO_MATCH: dict[str, str] = {}


def _inputs(request, build: Callable[..., fx.GraphModule]) -> fx.GraphModule:
    wanted = inspect.signature(build).parameters
    return build(**{name: request.getfixturevalue(name) for name in wanted if name != "_"})


def _no_match_params():
    for name in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=UNTRUTHFUL_NO_MATCH[name])] if name in UNTRUTHFUL_NO_MATCH else []
        yield pytest.param(name, marks=marks, id=name)


# -- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_pass_applies_then_is_idempotent(name, request):
    case = CASES[name]
    gm = _inputs(request, case.applies)
    first, changed = _run(case.make_pass, gm)
    assert first.modified, f"{name} found nothing to do on the graph its pipeline gives it"
    assert changed, f"{name} reported modified=True but nothing observable changed"
    again, changed = _run(case.make_pass, gm)
    assert not again.modified, f"{name} is not idempotent: a second run reports modified=True"
    assert not changed, f"{name} changed {changed} on its own output"


@pytest.mark.parametrize("name", _no_match_params())
def test_pass_leaves_a_graph_it_does_not_match_alone(name, request):
    case = CASES[name]
    gm = _inputs(request, case.no_match)
    result, changed = _run(case.make_pass, gm)
    assert not result.modified, f"{name} reported modified=True on a graph it should not match"
    assert not changed, f"{name} reported modified=False but changed {changed}"


def test_the_applying_graphs_are_the_pipeline_inputs(calibrated_convnet):
    """The ``applies`` stages above index the pipelines; keep them aligned with the pipelines' order."""
    assert [type(p).__name__ for p in prepare_passes(qtrim_fx.QuantConfig())] == [
        "SplitNormActPass", "RewireInplacePass", "NormalizeOpsPass", "FunctionalizeWeightedModulesPass", "NormalizeOpsPass", "AnnotateSitesPass",
        "InsertSitesPass", "LeanReluPass", "InPlaceSitesPass", "InsertBiasShiftPass", "HoistWeightsPass"]
    assert [type(p).__name__ for p in lower_passes(INT32_BIAS)] == [
        "RequireOpsetPass", "BindScalarInputsPass", "RestoreReluPass", "SinkWeightsPass", "FoldBiasShiftPass", "FoldBatchNormPass", "PlanLoweringPass", "LowerSitesPass", "RoundBiasPass",
        "MultiplyGatesPass", "SafeSoftmaxPass", "AttentionRank4Pass", "RenormEmbeddingsPass"]
    # what each stage holds that the next pass needs
    prepared = _prepare_stage(get_model("tiny_convnet")[0], 8)
    assert any(n.target is deferred_relu for n in prepared.graph.nodes)
    assert any(m.active for m in bias_shifts(calibrated_convnet).values())  # FoldBiasShiftPass has work
    lowered = _lower_stage(calibrated_convnet, 9)
    assert any(n.target is quant_dequant for n in lowered.graph.nodes) and hasattr(lowered, "qtrim_bias")


def test_every_fx_pass_is_covered():
    found = set()
    for info in pkgutil.walk_packages(qtrim_fx.passes.__path__, "qtrim_fx.passes."):
        module = importlib.import_module(info.name)
        found |= {
            cls.__name__ for cls in vars(module).values()
            if inspect.isclass(cls) and issubclass(cls, GraphPass) and cls is not GraphPass
            and cls.__module__ == module.__name__
        }
    assert found == {*CASES, "NormalizeOpsPass", "RequireOpsetPass"}  # analysis only: tags or refuses


# -- NormalizeOpsPass: analysis only ------------------------------------------------------------
@pytest.mark.parametrize("passes", [0, 4], ids=["captured", "functionalized"])
def test_normalize_ops_only_tags_nodes_and_says_so(passes):
    """Documented as analysis only: ``modified`` is always False; it writes ``node.meta[OP_KIND]``."""
    gm = _prepare_stage(get_model("tiny_convnet")[0], passes)
    result, changed = _run(NormalizeOpsPass, gm)
    assert not result.modified and not changed
    kinds = [n.meta[OP_KIND] for n in gm.graph.nodes]
    assert "conv" in kinds and "linear" in kinds
    tagged = {n.name: n.meta[OP_KIND] for n in gm.graph.nodes}
    again, changed = _run(NormalizeOpsPass, gm)
    assert not again.modified and not changed
    assert {n.name: n.meta[OP_KIND] for n in gm.graph.nodes} == tagged


# -- what the snapshot misses on purpose is still reported --------------------------------------
def test_annotate_reports_float_region_it_writes():
    cfg = qtrim_fx.QuantConfig(overrides=(qtrim_fx.Override(op="matmul", exclude=True),))
    gm = _prepare_stage(ScoresOnly(), 5, cfg)
    result, changed = _run(lambda: AnnotateSitesPass(cfg), gm)
    assert any(n.meta.get(FLOAT_REGION) for n in gm.graph.nodes)  # it did write the region
    assert not any(ACT_SITE in n.meta or WEIGHT_SITE in n.meta for n in gm.graph.nodes)
    assert changed == ["nodes"]
    assert result.modified


def test_annotate_removes_a_stale_float_region_and_says_so():
    cfg = qtrim_fx.QuantConfig(overrides=(qtrim_fx.Override(op="matmul", exclude=True),))
    gm = _prepare_stage(ScoresOnly(), 5, cfg)
    AnnotateSitesPass(cfg)(gm)
    stale = next(n for n in gm.graph.nodes if n.op == "placeholder")
    stale.meta[FLOAT_REGION] = True  # a mark no analysis would make
    assert AnnotateSitesPass(cfg)(gm).modified
    assert FLOAT_REGION not in stale.meta
    assert not AnnotateSitesPass(cfg)(gm).modified
