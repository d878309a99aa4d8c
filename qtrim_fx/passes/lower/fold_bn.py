"""FoldBatchNormPass: fold each BatchNorm into the conv whose weight site carries it (lowering).

Training keeps the BatchNorm and lets the conv's weight site quantize the folded weight
(``site(w, γ/σ)``, see ``qtrim_fx.runtime.ops``). For deployment the BN disappears::

    before:  f  = bn_fold_factor(bn.weight, bn.running_var, eps)
             wq = qtrim_sites.conv_weight(conv.weight, f)
             y  = conv2d(x, wq, conv.bias, ...)
             z  = call_module[bn](y)

    after:   wq = qtrim_sites.conv_weight(qtrim_folded.conv_weight)     # w·f
             z  = conv2d(x, wq, qtrim_folded.conv_bias, ...)            # (b − μ)·f + β

The folded tensors are frozen buffers computed from the current parameters and
running statistics; the site keeps its statistics (they already describe ``w·f``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.spec import SITE_NODE
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.ops import bn_fold_factor, channel_shape

__all__ = ["FoldBatchNormPass"]

FOLDED_ATTR = "qtrim_folded"


def _folded(conv_w: torch.Tensor, conv_b: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    with torch.no_grad():
        gamma = None if bn.weight is None else bn.weight.detach()
        f = bn_fold_factor(gamma, bn.running_var, bn.eps)
        w = conv_w.detach() * channel_shape(f, conv_w.dim(), 0)
        b = torch.zeros_like(bn.running_mean) if conv_b is None else conv_b.detach()
        beta = torch.zeros_like(b) if bn.bias is None else bn.bias.detach()
        return w.clone(), ((b - bn.running_mean) * f + beta).clone()


class FoldBatchNormPass(GraphPass):
    """Fold ``conv → BatchNorm`` pairs recorded on weight sites (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for site in list(gm.graph.nodes):
            spec = site.meta.get(SITE_NODE)
            if spec is None or spec.folded_bn is None or len(site.args) != 2:
                continue
            conv = next(iter(site.users))
            bn_node = next(iter(conv.users))
            w_node, f_node = site.args
            bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
            w = gm.get_parameter(str(w_node.target))
            b = None if bias is None else get_attr_tensor(gm, bias)
            fw, fb = _folded(w, b, gm.get_submodule(spec.folded_bn))
            if not hasattr(gm, FOLDED_ATTR):
                gm.add_module(FOLDED_ATTR, nn.Module())
            holder = getattr(gm, FOLDED_ATTR)
            holder.register_buffer(f"{spec.key}_w", fw)
            holder.register_buffer(f"{spec.key}_b", fb)
            with gm.graph.inserting_before(site):
                fw_node = gm.graph.get_attr(f"{FOLDED_ATTR}.{spec.key}_w")
                fb_node = gm.graph.get_attr(f"{FOLDED_ATTR}.{spec.key}_b")
            site.args = (fw_node,)
            args = list(conv.args)
            if len(args) > 2:
                args[2] = fb_node
                conv.args = tuple(args)
            else:
                conv.kwargs = {**conv.kwargs, "bias": fb_node}
            bn_node.replace_all_uses_with(conv)
            gm.graph.erase_node(bn_node)
            for n in (f_node, *f_node.all_input_nodes, w_node, bias):
                if isinstance(n, fx.Node) and not n.users:
                    gm.graph.erase_node(n)
            modified = True
        return finish(gm, modified)
