"""HoistWeightsPass: the weight sites (and bias shifts) run first, back to back, before the activations.

A weight site's inputs are parameters and buffers only (``get_attr`` → ``bn_fold_factor`` → site), so its
place in the graph is free up to the state it reads. Interleaved with the convolutions, each of these
small-tensor calls starts cold (the previous layer's kernels have evicted the interpreter's and the
allocator's working set): on a MobileNet-sized net a weight site costs several times its warm cost in
context. Moving every such chain to the front of the graph, in its original relative order, runs them as one
warm run (about 5 % of a training step on the digits MobileNet) without changing any value, edge or module::

    before:  xq = qtrim_sites.input_x(x)                      after:  w0 = conv0.weight  (get_attr)
             w0 = conv0.weight                                        f0 = bn_fold_factor(bn0.weight, ...)
             f0 = bn_fold_factor(bn0.weight, bn0.running_var)         w0q = qtrim_sites.conv0_weight(w0, f0)
             w0q = qtrim_sites.conv0_weight(w0, f0)                   b0 = qtrim_bias_shift.conv0_weight(None)
             b0 = qtrim_bias_shift.conv0_weight(None)                 w1 = conv1.weight ... (every chain)
             y0 = conv2d(xq, w0q, b0)                                 xq = qtrim_sites.input_x(x)
             ... conv1's chain, then its conv ...                     y0 = conv2d(xq, w0q, b0) ...

Moved: a weight site or bias shift (``call_module``) with every node it depends on, when none of them
depends on a graph input and each is a ``get_attr``, a pure call (not in place, not side-effecting, drawing no
random numbers; torch, ``operator`` or qtrim_fx's own runtime ops; a method not ending in ``_``) or another site /
bias shift, and
the layer's chains (weight site and bias shift, which move together) read at most :data:`MAX_HOISTED_ELEMENTS`
parameter and buffer elements. A large weight stays at its
layer: quantized there it is still in cache when the layer reads it (hoisting ViT-sized Linear weights, 192 x
768, measured ~1.5 % slower on timm's vit_tiny; its biases and LayerNorm-free small chains still move).
A chain never moves above a node that could change what it reads: a call with side effects (grad mode,
autocast, asserts, ``setitem``, in-place ops, functions and modules from user code) or a torch module that
owns one of the chain's tensors (a BatchNorm updating its running statistics: its own fold factor is read
before it anyway). Node names, meta and the ``SiteSpec`` s stay; ``modified`` is whether the order changed.

Memory: the moved quantized weights are alive from the start of the forward instead of from their layer on;
in training they are kept for backward either way, in inference it is at most one copy of the small weights.
"""

from __future__ import annotations

import bisect
import builtins
import operator

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.bias_shift import BiasShift
from qtrim_fx.runtime.site import QuantSite

__all__ = ["HOIST_ORDER", "MAX_HOISTED_ELEMENTS", "HoistWeightsPass", "weight_chains"]

#: node.meta key: the node's position before the hoist (every node of a graph the pass changed), so that
#: ``SinkWeightsPass`` gives back exactly that order (``node.meta`` does not survive pickling: it then sinks
#: each layer's chains to just before the layer).
HOIST_ORDER = "qtrim_hoist_order"

#: Chains reading more elements than this (parameters and buffers together) stay at their layer: a large
#: weight quantized just before its layer is still in cache when the layer reads it, and its call's fixed cost
#: is small beside its arithmetic. 64 Ki elements (256 KiB of float32) is an L2-sized weight.
MAX_HOISTED_ELEMENTS = 1 << 16

_MUTATING_OPERATORS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift})
_PURE_BUILTINS = frozenset({
    *(f for f in vars(operator).values() if callable(f) and f not in _MUTATING_OPERATORS),
    builtins.getattr, builtins.len})


#: Calls that draw random numbers: never moved (a chain moved past another draw would change which numbers each
#: gets); they are no barrier, since no moved chain draws any.
_RANDOM = (
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout native_dropout bernoulli rand randn "
    "randint rand_like randn_like randint_like randperm normal multinomial poisson uniform exponential geometric "
    "cauchy log_normal rrelu")
_RANDOM_NAMES = frozenset(_RANDOM.split())


def _random_call(node: fx.Node) -> bool:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.split(".")[0].rstrip("_") in _RANDOM_NAMES or (node.op == "call_function" and node.is_impure())


def _pure_call(node: fx.Node) -> bool:
    """A call_function / call_method that neither mutates its operands nor has other side effects."""
    if node.op == "call_method":
        return isinstance(node.target, str) and not node.target.endswith("_")
    if node.op != "call_function":
        return False
    target = node.target
    if target in _MUTATING_OPERATORS or node.is_impure() or "out" in node.kwargs:
        return False
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return not target.__name__.split(".")[0].endswith("_")
    if target in _PURE_BUILTINS:
        return True
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", "")
    known = module == "torch" or module.startswith(("torch.", "qtrim_fx.runtime.")) or module == "math"
    return known and not name.endswith("_")


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    m = resolve_attr(gm, str(node.target)) if node.op == "call_module" else None
    return m if isinstance(m, nn.Module) else None


def _numel(value: object) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _tensor_ids(value: object) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {id(value)}
    if isinstance(value, nn.Module):
        return {id(t) for t in (*value.parameters(), *value.buffers())}
    return set()


def _chain_root(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module(gm, node)
    return (isinstance(m, QuantSite) and m.kind == "weight") or isinstance(m, BiasShift)


def weight_chains(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(root, its chain in graph order)`` for every weight site / bias shift this pass would move (graph order)."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    depends_on_input: dict[fx.Node, bool] = {}
    for n in order:
        depends_on_input[n] = n.op == "placeholder" or any(depends_on_input[a] for a in n.all_input_nodes)
    chains = []
    for root in order:
        if not _chain_root(gm, root) or depends_on_input[root]:
            continue
        chain = _ancestors(root)
        if all(not depends_on_input[c] and _movable(gm, c) for c in chain):
            chains.append((root, sorted(chain, key=index.__getitem__)))
    return chains


def _movable(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "get_attr" or isinstance(_module(gm, n), QuantSite | BiasShift) or (
        n.op != "call_module" and _pure_call(n) and not _random_call(n))


class HoistWeightsPass(GraphPass):
    """Move weight-site and bias-shift chains to the front of the graph (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        order = list(graph.nodes)
        index = {n: i for i, n in enumerate(order)}
        global_barriers: list[int] = []          # indices of nodes no chain moves above
        owners: dict[int, list[int]] = {}        # tensor id -> indices of the torch modules owning it
        for n in order:
            m = _module(gm, n)
            if n.op in ("placeholder", "get_attr", "output") or isinstance(m, QuantSite | BiasShift):
                continue
            if m is not None and type(m).__module__.startswith("torch.nn."):
                for t in _tensor_ids(m):
                    owners.setdefault(t, []).append(index[n])
            elif not _pure_call(n):
                global_barriers.append(index[n])

        # A layer's chains (its weight site, its bias shift) move together or stay together.
        chains = weight_chains(gm)
        in_chain = {c for _, chain in chains for c in chain}
        layer_size: dict[fx.Node | None, int] = {}
        layer_of: dict[fx.Node, fx.Node | None] = {}
        for root, chain in chains:
            readers = [u for u in root.users if u not in in_chain]
            layer = min(readers, key=index.__getitem__) if readers else None
            layer_of[root] = layer
            layer_size[layer] = layer_size.get(layer, 0) + sum(
                _numel(resolve_attr(gm, str(c.target))) for c in chain if c.op == "get_attr")
        # Each chain may rise to just after its last barrier; a node shared by chains, to the earliest of theirs
        # (chains are closed under inputs, so a node's inputs never get a later anchor than the node).
        anchor_of: dict[fx.Node, int] = {}
        for root, chain in chains:
            if layer_size[layer_of[root]] > MAX_HOISTED_ELEMENTS:
                continue  # a large weight: quantized just before its layer, it is still in cache when read
            reads: set[int] = set()
            for c in chain:
                if c.op == "get_attr":
                    reads |= _tensor_ids(resolve_attr(gm, str(c.target)))
            limit = index[root]
            barrier = _last_before(global_barriers, limit)
            for t in reads:
                barrier = max(barrier, _last_before(owners.get(t, []), limit))
            for c in chain:
                anchor_of[c] = min(anchor_of.get(c, barrier), barrier)
        # Move in the original order, so that every run keeps the nodes' relative order.
        placeholders = [n for n in order if n.op == "placeholder"]
        tails: dict[int, fx.Node | None] = {}  # anchor index -> last node moved after it (None: the graph's start)
        for c in sorted(anchor_of, key=index.__getitem__):
            a = anchor_of[c]
            if index[c] <= a:
                continue
            tail = tails.get(a, order[a] if a >= 0 else (placeholders[-1] if placeholders else None))
            if tail is None:
                first = next(iter(graph.nodes))
                if first is not c:
                    first.prepend(c)
            else:
                tail.append(c)
            tails[a] = c
        modified = list(graph.nodes) != order
        if modified:
            for i, n in enumerate(order):
                n.meta[HOIST_ORDER] = i
        return finish(gm, modified)


def _ancestors(root: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen)


def _last_before(indices: list[int], limit: int) -> int:
    """The largest of the sorted ``indices`` below ``limit``, or -1."""
    i = bisect.bisect_left(indices, limit)
    return indices[i - 1] if i else -1
