"""FunctionalizeWeightedModulesPass: weighted module calls -> functional calls on their own parameters.

So that a weight can flow through a site node, every ``Conv*d``,
``ConvTranspose*d`` and ``Linear`` call becomes the functional op the module
itself runs, fed by ``get_attr`` nodes of its parameters (names unchanged, so
the original ``state_dict`` still loads)::

    before:  y = call_module[layer1.0.conv1](x)
    after:   w = get_attr[layer1.0.conv1.weight]
             y = call_function[torch.conv2d](x, w, None, (1, 1), (1, 1), (1, 1), 1)

Results are bit-identical (the module's forward makes the same call). Calls
this pass cannot express exactly are left as they are: ``ConvTranspose`` with
``output_size``, and modules that do more than torch's op on their own
parameters (a subclass overriding ``forward`` such as timm's ``Conv2dSame``,
forward hooks such as ``spectral_norm``, a weight that is neither a parameter nor a
``parametrize`` parametrization; see
:func:`~qtrim_fx.core.modules.is_plain_weighted`). Those stay module calls
and the coverage report lists their weights as float.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.modules import is_plain_weighted
from qtrim_fx.core.spec import OWNER
from qtrim_fx.passes.base import GraphPass, PassResult, finish

__all__ = ["FunctionalizeWeightedModulesPass"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _param_nodes(graph: fx.Graph, name: str, m: nn.Module) -> tuple[fx.Node, fx.Node | None]:
    w = graph.get_attr(f"{name}.weight")
    b = graph.get_attr(f"{name}.bias") if getattr(m, "bias", None) is not None else None
    return w, b


def _functional_call(graph: fx.Graph, node: fx.Node, m: nn.Module) -> fx.Node | None:
    name = str(node.target)
    if len(node.args) != 1 or node.kwargs or not is_plain_weighted(m):
        return None
    (x,) = node.args
    if isinstance(m, nn.Linear):
        w, b = _param_nodes(graph, name, m)
        return graph.call_function(F.linear, (x, w, b))
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        if m.padding_mode != "zeros":
            return None
        w, b = _param_nodes(graph, name, m)
        fn = _CONVT_FN[len(m.kernel_size)]
        return graph.call_function(fn, (x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation))
    if isinstance(m, nn.modules.conv._ConvNd):
        w, b = _param_nodes(graph, name, m)
        fn = _CONV_FN[len(m.kernel_size)]
        if m.padding_mode != "zeros":
            x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
            padding = (0,) * len(m.kernel_size)
        else:
            padding = m.padding
        return graph.call_function(fn, (x, w, b, m.stride, padding, m.dilation, m.groups))
    return None


class FunctionalizeWeightedModulesPass(GraphPass):
    """Rewrite ``call_module`` Conv/ConvTranspose/Linear nodes to functional calls (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            m = modules.get(str(node.target))
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            before = node.prev
            with gm.graph.inserting_before(node):
                new = _functional_call(gm.graph, node, m)
            if new is None:
                continue
            for n in _nodes_between(before, node):
                n.meta.update({k: v for k, v in node.meta.items() if k != "val" or n is new})
                n.meta[OWNER] = str(node.target)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return finish(gm, modified)


def _nodes_between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """Nodes strictly between ``first`` and ``last`` in graph order."""
    out, n = [], first.next
    while n is not last:
        out.append(n)
        n = n.next
    return out
