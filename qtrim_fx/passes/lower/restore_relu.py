"""RestoreReluPass: the lean ReLUs of a prepared model back to ``torch.relu`` for deployment.

``LeanReluPass`` (prepare) swaps site-only ReLUs for :func:`qtrim_fx.runtime.ops.deferred_relu`
(graphs prepared before it: :func:`~qtrim_fx.runtime.ops.relu_keep_mask`), whose output only
quantization sites may read. A lowered graph holds only standard ops::

    before:  y = call_function[deferred_relu](x)       (or relu_keep_mask)
    after:   y = call_function[torch.relu](x)          (node name and meta kept)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import deferred_relu, relu_keep_mask
from qtrim_fx.runtime.site import QuantSite

__all__ = ["RestoreReluPass"]


class RestoreReluPass(GraphPass):
    """Lowering: ``deferred_relu(x)`` / ``relu_keep_mask(x)`` back to ``torch.relu(x)`` (a standard op for export)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (deferred_relu, relu_keep_mask):
                node.target = torch.relu
                # A graph re-traced from a pickle marks calls of fx.wrap-ped functions; the mark makes
                # codegen emit ``wrap("torch.relu")``, which would break every later symbolic trace.
                node.meta.pop("is_wrapped", None)
                # torch.relu keeps its output for backward: a site reading it must not quantize it in place.
                for user in node.users:
                    site = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
                    if isinstance(site, QuantSite):
                        site.overwrite_input = False
                modified = True
        return finish(gm, modified)
