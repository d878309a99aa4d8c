"""HoistWeightsPass / SinkWeightsPass: weight sites run first in training, in layer order when lowered.

Structural: every weight site and bias shift (with the nodes it depends on) precedes the first node that
depends on a graph input, in the chains' original order; a call with side effects is never passed; a second
run changes nothing; ``SinkWeightsPass`` gives back exactly the order ``prepare`` had without the hoist, and
``iter_sites`` lists the sites in layer order either way. Numerical: training steps (λ < 1 and λ = 1,
statistics updates and counted calls) give the same outputs, gradients, statistics and weights, bit for bit,
with the hoist and without it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.passes.base import PassResult
from qtrim_fx.passes.lower.sink_weights import SinkWeightsPass
from qtrim_fx.passes.prepare.hoist_weights import (
    HOIST_ORDER,
    MAX_HOISTED_ELEMENTS,
    HoistWeightsPass,
    weight_chains,
)
from qtrim_fx.runtime.bias_shift import BiasShift
from qtrim_fx.runtime.site import QuantSite


def _prepare(model: nn.Module, x: torch.Tensor, hoist: bool, monkeypatch, **config) -> fx.GraphModule:
    with monkeypatch.context() as m:
        if not hoist:
            m.setattr(HoistWeightsPass, "call", lambda self, gm: PassResult(gm, False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return qtrim_fx.prepare(copy.deepcopy(model), example_inputs=(x,),
                                    config=qtrim_fx.QuantConfig(**config))


def _is_chain_root(gm: fx.GraphModule, n: fx.Node) -> bool:
    m = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
    return (isinstance(m, QuantSite) and m.kind == "weight") or isinstance(m, BiasShift)


def _chain_elements(gm: fx.GraphModule, chain: list[fx.Node]) -> int:
    return sum(getattr(resolve_attr(gm, str(c.target)), "numel", lambda: 0)() for c in chain if c.op == "get_attr")


def _input_dependent(gm: fx.GraphModule) -> list[fx.Node]:
    dep: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        dep[n] = n.op == "placeholder" or any(dep[a] for a in n.all_input_nodes)
    return [n for n in gm.graph.nodes if dep[n] and n.op != "placeholder"]


MODELS = ["tiny_convnet", "cifar_resnet18", "vit_tiny"]  # cifar_resnet18: small and large weights


@pytest.mark.parametrize("name", MODELS)
def test_weight_chains_run_first_in_their_original_order(name, monkeypatch):
    model, (x,) = get_model(name)
    hoisted = _prepare(model, x, True, monkeypatch)
    plain = _prepare(model, x, False, monkeypatch)
    order = {n.name: i for i, n in enumerate(hoisted.graph.nodes)}
    plain_order = {n.name: i for i, n in enumerate(plain.graph.nodes)}
    first_activation = order[_input_dependent(hoisted)[0].name]
    layers: dict[str, list[tuple[fx.Node, list[fx.Node]]]] = {}  # a layer's chains: weight site, bias shift
    for root, chain in weight_chains(hoisted):
        layers.setdefault(min(root.users, key=lambda u: order[u.name]).name, []).append((root, chain))
    moved = 0
    for reader, chains in layers.items():
        if sum(_chain_elements(hoisted, chain) for _, chain in chains) <= MAX_HOISTED_ELEMENTS:
            assert all(order[c.name] < first_activation for _, chain in chains for c in chain)
            moved += 1
        else:  # a large weight (and its bias shift) stays just before its layer
            for root, _ in chains:
                assert order[reader] - order[root.name] == plain_order[reader] - plain_order[root.name]
    assert moved
    early = {n.name for n in hoisted.graph.nodes if _is_chain_root(hoisted, n) and order[n.name] < first_activation}
    for kept in (early, None):  # the moved chains keep their relative order, and so do the others
        roots = [n.name for n in hoisted.graph.nodes if _is_chain_root(hoisted, n) and (n.name in early) == bool(kept)]
        assert roots == [n.name for n in plain.graph.nodes
                         if _is_chain_root(plain, n) and (n.name in early) == bool(kept)]
    assert HoistWeightsPass()(hoisted).modified is False  # idempotent, and says so


@pytest.mark.parametrize("name", MODELS)
def test_sink_gives_back_the_unhoisted_order_and_sites_list_in_layer_order(name, monkeypatch):
    model, (x,) = get_model(name)
    hoisted = _prepare(model, x, True, monkeypatch)
    plain = _prepare(model, x, False, monkeypatch)
    assert [s.key for s, _, _ in qtrim_fx.iter_sites(hoisted)] == [s.key for s, _, _ in qtrim_fx.iter_sites(plain)]
    assert [n.name for n in hoisted.graph.nodes] != [n.name for n in plain.graph.nodes]
    assert SinkWeightsPass()(hoisted).modified is True
    assert [n.name for n in hoisted.graph.nodes] == [n.name for n in plain.graph.nodes]
    assert SinkWeightsPass()(hoisted).modified is False


def _train(qm: nn.Module, x: torch.Tensor, lam: float, steps: int = 4) -> list[torch.Tensor]:
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, lam)
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    record = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = qm(x)
        out.float().square().mean().backward()
        record.append(out.detach().clone())
        record += [p.grad.clone() for p in qm.parameters() if p.grad is not None]
        opt.step()
    record += [t.detach().clone() for t in qm.state_dict().values() if isinstance(t, torch.Tensor)]
    return record


@pytest.mark.parametrize("name", ["tiny_convnet", "vit_tiny"])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_hoisting_changes_no_bit_of_training(name, lam, monkeypatch):
    model, (x,) = get_model(name)
    runs = [_train(_prepare(model, x, hoist, monkeypatch, update_every=2), x, lam) for hoist in (True, False)]
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


_EVENTS: list[str] = []


@torch.fx.wrap
def _log_call(x: torch.Tensor) -> torch.Tensor:
    """A user function with a side effect: a chain must not move above it."""
    _EVENTS.append("called")
    return x


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = _log_call(h)
        return self.conv2(h)


def test_a_call_with_side_effects_is_never_passed(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    qm = _prepare(_Net(), x, True, monkeypatch)
    order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
    barrier = next(n for n in qm.graph.nodes if n.op == "call_function" and n.target is _log_call)
    roots = {str(n.target): order[n.name] for n in qm.graph.nodes if _is_chain_root(qm, n)}
    conv1_chain = [i for t, i in roots.items() if "conv1" in t]
    conv2_chain = [i for t, i in roots.items() if "conv2" in t]
    assert conv1_chain and conv2_chain
    assert max(conv1_chain) < order[_input_dependent(qm)[0].name]  # before the barrier: to the front
    assert min(conv2_chain) > order[barrier.name]  # after it: stays after it
    _EVENTS.clear()
    qm(x)
    assert _EVENTS == ["called"]


class _ExportOnly(nn.Module):
    """``len(x)`` stops symbolic tracing: prepare captures it with torch.export, parameters read at the top."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(h) * len(x)


def test_sink_restores_the_recorded_order_of_the_export_front_end(monkeypatch):
    x, model = torch.randn(2, 3, 8, 8), _ExportOnly()
    hoisted = _prepare(model, x, True, monkeypatch)
    plain = _prepare(model, x, False, monkeypatch)
    assert hoisted.qtrim_info.frontend != "fx"  # the export front end: its own node order
    names = [n.name for n in plain.graph.nodes]
    assert [n.name for n in hoisted.graph.nodes] != names
    restored = copy.deepcopy(hoisted)  # lowering works on a deep copy: the record travels with it
    assert SinkWeightsPass()(restored).modified and [n.name for n in restored.graph.nodes] == names
    hoisted.eval()
    plain.eval()
    assert torch.equal(hoisted(x), plain(x))


def test_an_unpickled_model_sinks_each_layer_chain_back_in_front_of_its_layer(monkeypatch):
    import pickle

    model, (x,) = get_model("tiny_convnet")
    hoisted = _prepare(model, x, True, monkeypatch)
    plain = _prepare(model, x, False, monkeypatch)
    unpickled = pickle.loads(pickle.dumps(hoisted))  # node.meta (the recorded order) is not pickled
    assert all(HOIST_ORDER not in n.meta for n in unpickled.graph.nodes)
    assert SinkWeightsPass()(unpickled).modified
    def ops(gm):  # a re-traced graph names some nodes afresh: compare what each node does
        return [(n.op, str(n.target)) for n in gm.graph.nodes]

    assert ops(unpickled) == ops(plain)
    assert SinkWeightsPass()(unpickled).modified is False
    unpickled.eval()
    plain.eval()
    assert torch.equal(unpickled(x), plain(x))


class _DropConnect(nn.Module):
    """A weight computed with a random draw (DropConnect): its chain must not move past the activation dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.nn.functional.dropout(self.fc1(x), 0.5, self.training)
        w = self.fc2.weight * self.fc2.weight.new_full(self.fc2.weight.shape, 0.9).bernoulli()
        return torch.nn.functional.linear(h, w, self.fc2.bias)


def test_a_chain_that_draws_random_numbers_stays(monkeypatch):
    x = torch.randn(4, 8)
    model = _DropConnect()
    hoisted = _prepare(model, x, True, monkeypatch)
    plain = _prepare(model, x, False, monkeypatch)
    random_chain = [c for _, chain in weight_chains(hoisted) for c in chain
                    if "bernoulli" in str(getattr(c.target, "__name__", c.target))]
    assert not random_chain  # a chain with a draw is not a chain the pass moves
    for m in (hoisted, plain):
        torch.manual_seed(2)  # calibration draws too
        qtrim_fx.calibrate(m, [x])
        qtrim_fx.set_blend(m, 1.0)
        m.train()
    torch.manual_seed(3)
    a = hoisted(x)
    torch.manual_seed(3)
    assert torch.equal(a, plain(x))  # the same draws in the same order
