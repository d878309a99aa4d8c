"""InPlaceSitesPass: an activation site whose input dies with it quantizes that input in place.

An activation site allocates its output. When the site is the only reader of a tensor that a
fresh-output op produced (a Linear, a LayerNorm, a GELU, an Add ...) and that op's backward does not
keep its own output, nothing else will read the tensor again: at λ = 1 the site may write the
quantized values into it — one activation-sized allocation, its first-touch page faults and part of the
memory traffic fewer — and, on the common path (per-tensor float32 CPU qparams, clipped STE), do it
through a lean autograd node (:func:`qtrim_fx.runtime.blend.quantize_owned_`). This pass decides
where; the site decides per call (eager, float32, λ = 1, no hooks that could hold the tensor)::

    before:  h  = call_function[linear](x, w, b)           (h read only by the site)
             hq = call_module[qtrim_sites.fc1_out](h)      QuantSite.overwrite_input = False

    after:   the same graph                                 QuantSite.overwrite_input = True

Eligible: the site's only argument is a node read by nothing else, produced by a call from
:data:`FRESH_OUTPUT` (by function / method name) or a plain module of :data:`FRESH_OUTPUT_MODULES`
(not ``inplace``, ``forward`` not overridden); or a ``deferred_relu`` read by this site only, whose input
is such a node (the site quantizes the ReLU's input itself at λ = 1). Ops that return a view or their input
(``reshape``, ``contiguous``, ``float``, ``relu_`` ...), that keep their output for backward (``relu``,
``sigmoid``, ``tanh``, ``softmax``, ``exp``), graph inputs and parameters never are. At run time the site
refuses any module hook of its own, of that producer module or a global one (a hook could keep a
reference to the tensor), and writes a view only through a base that holds exactly its elements and is
a deferred ReLU's input or a fresh matrix product (a Linear's output on 3-D input is a view of its 2-D
product). Autograd's version counters would refuse a tensor some backward still needs, loudly; the lists
keep it from coming to that.

Invariant (like ``LeanReluPass``'s): a later pass that adds a reader of an eligible input must clear
the site's ``overwrite_input``. The flag is never set on weight sites.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import target_name
from qtrim_fx.runtime.ops import deferred_relu
from qtrim_fx.runtime.site import QuantSite

__all__ = ["FRESH_OUTPUT", "FRESH_OUTPUT_MODULES", "InPlaceSitesPass"]

#: Calls (function, method or ATen packet names) that return a new tensor their backward does not save.
_FRESH_NAMES = (
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear matmul mm bmm addmm baddbmm "
    "add sub mul div truediv __add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ gate_product "
    "gelu_product layer_norm group_norm batch_norm instance_norm gelu silu hardswish mish leaky_relu elu softplus "
    "cat concat stack avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "mean sum")
FRESH_OUTPUT = frozenset(_FRESH_NAMES.split())

#: Module types whose plain ``forward`` returns such a tensor.
FRESH_OUTPUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _producer(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, nn.Module | None]:
    """(whether ``node`` is a fresh output nothing keeps, the module that computes it or None)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        base = next((t for t in FRESH_OUTPUT_MODULES if type(m) is t), None)
        ok = base is not None and is_plain_module(m, base) and not getattr(m, "inplace", False)
        return ok, m
    if node.op in ("call_function", "call_method"):
        # ``inplace`` by keyword or by position (``F.silu(x, True)``): the output would be the input itself.
        ok = (target_name(node) in FRESH_OUTPUT and not node.kwargs.get("inplace", False)
              and not any(a is True for a in node.args[1:]))
        if node.op == "call_function" and "out" in node.kwargs:
            ok = False
        return ok, None
    return False, None


class InPlaceSitesPass(GraphPass):
    """Mark activation sites that may quantize their input in place (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            site = gm.get_submodule(str(node.target))
            x = node.args[0]
            if not isinstance(site, QuantSite) or site.kind != "activation" or not isinstance(x, fx.Node):
                continue
            if site.overwrite_input or len(x.users) != 1:
                continue
            if x.op == "call_function" and x.target is deferred_relu:
                # The site quantizes the ReLU's input itself at λ = 1 (see deferred_relu): that input counts.
                x = x.args[0]
                if not isinstance(x, fx.Node) or len(x.users) != 1:
                    continue
            ok, module = _producer(gm, x)
            if ok:
                site.overwrite_input = True
                object.__setattr__(site, "_input_module", module)  # not registered: the graph owns it
                modified = True
        return finish(gm, modified)
