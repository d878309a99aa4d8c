"""SinkWeightsPass: each weight chain back in front of the layer that reads it, for deployment.

``HoistWeightsPass`` (prepare) runs every weight site and bias shift, with the nodes they depend on, at the
front of the graph (faster in training; values unchanged). A lowered graph puts each chain back where the
layer reads it, so the exported file lists every layer's Q/DQ next to that layer, in the order it had
before the hoist::

    before:  w0 = conv0.weight; f0 = bn_fold_factor(...); w0q = qtrim_sites.conv0_weight(w0, f0)
             b0 = qtrim_bias_shift.conv0_weight(None); w1 = conv1.weight ...  (every chain)
             xq = qtrim_sites.input_x(x); y0 = conv2d(xq, w0q, b0) ...

    after:   xq = qtrim_sites.input_x(x)
             w0 = conv0.weight; f0 = bn_fold_factor(...); w0q = qtrim_sites.conv0_weight(w0, f0)
             b0 = qtrim_bias_shift.conv0_weight(None)
             y0 = conv2d(xq, w0q, b0) ...

The hoist records every node's position before it (``node.meta``): that order comes back exactly. A graph
without the record (an unpickled model: ``node.meta`` is not pickled) or edited since: the chains read by one
layer (its weight site and bias shift, with the nodes only they read) move together, in their current relative
order, to just before that layer (the first node reading the chain's result); a node read elsewhere too stays.
Only the order changes.
"""

from __future__ import annotations

import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.hoist_weights import HOIST_ORDER, weight_chains

__all__ = ["SinkWeightsPass"]


class SinkWeightsPass(GraphPass):
    """Lowering: weight-site / bias-shift chains to just before their first reader (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        order = list(graph.nodes)
        if not _restore_recorded_order(graph, order):
            _sink_chains(gm, order)
        return finish(gm, list(graph.nodes) != order)


def _restore_recorded_order(graph: fx.Graph, order: list[fx.Node]) -> bool:
    """Put the nodes back in the order ``HoistWeightsPass`` recorded, if every node has one and it is valid."""
    keys = [n.meta.get(HOIST_ORDER) for n in order]
    if any(k is None for k in keys) or len(set(keys)) != len(keys):
        return False
    position = dict(zip(order, keys, strict=True))
    if any(position[a] >= position[n] for n in order for a in n.all_input_nodes):
        return False  # edited since (not a topological order any more): sink by layer instead
    wanted = sorted(order, key=position.__getitem__)
    if wanted != order:
        output = order[-1]
        for n in wanted:
            if n is not output:
                output.prepend(n)
    return True


def _sink_chains(gm: fx.GraphModule, order: list[fx.Node]) -> None:
    """Each layer's chains, in their current relative order, to just before the layer."""
    index = {n: i for i, n in enumerate(order)}
    chains = weight_chains(gm)
    in_chain = {c for _, chain in chains for c in chain}
    groups: dict[fx.Node, list[tuple[fx.Node, list[fx.Node]]]] = {}  # first reader -> the chains it reads
    for root, chain in chains:
        readers = [u for u in root.users if u not in in_chain]
        if readers:
            groups.setdefault(min(readers, key=index.__getitem__), []).append((root, chain))
    for reader, group in groups.items():
        roots = {root for root, _ in group}
        members = {c for _, chain in group for c in chain}
        # a node read outside these chains stays where it is
        for c in sorted(members, key=index.__getitem__):
            if c in roots or all(u in members for u in c.users):
                reader.prepend(c)
