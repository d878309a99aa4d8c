"""LeanReluPass: a ReLU read only by quantization sites keeps a 1-byte mask for backward.

``torch.relu`` saves its float output for backward. In a prepared model the output of a
ReLU is usually read only by its activation site, whose blended copy is what the next
layer saves; the ReLU output then stays alive for the ReLU's backward alone (one extra
activation-sized tensor per site, about +40% training memory on a ResNet). This pass
swaps such ReLUs for :func:`qtrim_fx.runtime.ops.relu_keep_mask` (same value, same gradient,
saves ``relu(x) != 0`` as a 1-byte mask)::

    before:  y  = call_module[layer1.0.relu](x)              (nn.ReLU, inplace or not)
             yq = call_module[qtrim_sites.layer1_0_relu_out](y)

    after:   y  = call_function[relu_keep_mask](x)           (node name and meta kept)
             yq = call_module[qtrim_sites.layer1_0_relu_out](y)

Only a plain ReLU (``nn.ReLU``, ``torch.relu``, ``F.relu``, ``Tensor.relu``, ``aten.relu``;
not the in-place ``relu_`` forms) whose input has no other reader (so an ``inplace=True``
module has nothing else to affect) and whose every reader is a site module. The node is
edited in place, so its name, ``SiteSpec`` and shape meta stay. Values and gradients are
bit-identical. ``RestoreReluPass`` (:mod:`qtrim_fx.passes.lower.restore_relu`, run by ``qtrim_fx.lower``) turns the nodes back into
``torch.relu`` so the deployable graph holds only standard ops.

Invariant (other code relies on it): the output of a ``relu_keep_mask`` node is read by site modules
only. :func:`qtrim_fx.runtime.ops.relu_read` counts those reads, and when every one masks ``y <= 0``
itself (λ = 1, a grid whose lower end is exactly 0) the ReLU's backward skips its own mask. A pass that
adds another reader of such a node must turn it back into ``torch.relu`` first.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import relu_keep_mask
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
    """Swap site-only ReLUs for :func:`~qtrim_fx.runtime.ops.relu_keep_mask` (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            x = _relu_input(gm, node)
            if x is None or len(x.users) != 1 or not _read_only_by_sites(gm, node):
                continue
            node.op, node.target, node.args, node.kwargs = "call_function", relu_keep_mask, (x,), {}
            node.meta.pop("is_wrapped", None)
            modified = True
        return finish(gm, modified)
