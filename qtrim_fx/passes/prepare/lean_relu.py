"""LeanReluPass: a ReLU read only by quantization sites is deferred to its sites.

``torch.relu`` saves its float output for backward. In a prepared model the output of a
ReLU is usually read only by its activation site, whose blended copy is what the next
layer saves; the ReLU output then stays alive for the ReLU's backward alone (one extra
activation-sized tensor per site, about +40% training memory on a ResNet), and at λ = 1 the
ReLU is not even needed: the site's clamp at the grid's lower end 0 is the ReLU. This pass swaps
such ReLUs for :func:`qtrim_fx.runtime.ops.deferred_relu`::

    before:  y  = call_module[layer1.0.relu](x)              (nn.ReLU, inplace or not)
             yq = call_module[qtrim_sites.layer1_0_relu_out](y)

    after:   y  = call_function[deferred_relu](x)            (node name and meta kept)
             yq = call_module[qtrim_sites.layer1_0_relu_out](y)

In eager training ``deferred_relu`` hands the sites ``x`` itself, marked; a site quantizing at
λ = 1 on a grid starting at 0 quantizes ``x`` (same values and gradient, two passes and two
allocations fewer), any other read applies ``relu_keep_mask`` (relu's value and gradient, a 1-byte mask
saved for backward instead of the float output). Without autograd it is a plain ReLU.

Only a plain ReLU (``nn.ReLU``, ``torch.relu``, ``F.relu``, ``Tensor.relu``, ``aten.relu``;
not the in-place ``relu_`` forms) whose input has no other reader (so an ``inplace=True``
module has nothing else to affect) and whose every reader is a site module. The node is
edited in place, so its name, ``SiteSpec`` and shape meta stay. Values and gradients are
bit-identical. ``RestoreReluPass`` (:mod:`qtrim_fx.passes.lower.restore_relu`, run by ``qtrim_fx.lower``) turns the nodes back into
``torch.relu`` so the deployable graph holds only standard ops.

Invariant (other code relies on it): the output of a ``deferred_relu`` node is read by site modules
only — in eager training it is the ReLU's *input* until a site applies the ReLU. A pass that adds
another reader of such a node must turn it back into ``torch.relu`` first.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import deferred_relu
from qtrim_fx.runtime.site import QuantSite

__all__ = ["LeanReluPass"]

_RELU_FUNCTIONS = (torch.relu, F.relu, torch.ops.aten.relu.default)


def _relu_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of a plain (not in-place-method) ReLU call, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target)) if isinstance(node.target, str) else None
        ok = type(m) is nn.ReLU and is_plain_module(m, nn.ReLU) and len(node.args) == 1 and not node.kwargs
    elif node.op == "call_function":
        ok = node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
        ok = ok and set(node.kwargs) <= {"inplace"}
    elif node.op == "call_method":
        ok = node.target == "relu" and len(node.args) == 1 and not node.kwargs
    else:
        ok = False
    x = node.args[0] if ok else None
    return x if isinstance(x, fx.Node) else None


def _read_only_by_sites(gm: fx.GraphModule, node: fx.Node) -> bool:
    users = list(node.users)
    return bool(users) and all(
        u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), QuantSite) and u.args == (node,)
        and not u.kwargs
        for u in users
    )


class LeanReluPass(GraphPass):
    """Swap site-only ReLUs for :func:`~qtrim_fx.runtime.ops.deferred_relu` (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            x = _relu_input(gm, node)
            if x is None or len(x.users) != 1 or not _read_only_by_sites(gm, node):
                continue
            node.op, node.target, node.args, node.kwargs = "call_function", deferred_relu, (x,), {}
            node.meta.pop("is_wrapped", None)
            modified = True
        return finish(gm, modified)
