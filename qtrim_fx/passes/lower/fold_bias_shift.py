"""FoldBiasShiftPass: each BiasShift becomes the layer's frozen, corrected bias (lowering).

``calibrate``'s bias correction lives in :class:`~qtrim_fx.runtime.bias_shift.BiasShift` modules that
the prepared graph calls on each quantized layer's bias. For deployment the correction is a constant::

    before:  b = call_module[qtrim_bias_shift.conv_weight](get_attr[conv.bias])     (b − λ·δ)
             y = conv2d(xq, wq, b, ...)

    after:   y = conv2d(xq, wq, get_attr[qtrim_shifted.conv_weight], ...)          (frozen b − δ)

The lowered model quantizes every site fully whatever λ the prepared model is at (the PTQ flow exports
at λ = 0), so the shift is folded at λ = 1 too. A bias the graph computes (not a parameter) gets
``bias − δ`` as an op. A shift that was never set leaves the layer's own
operand (the bias, or None): a model calibrated without bias correction lowers to exactly the graph it
had before these modules existed.
Runs before ``FoldBatchNormPass``, which folds the corrected bias with the BatchNorm.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR, BiasShift

__all__ = ["FoldBiasShiftPass"]

SHIFTED_ATTR = "qtrim_shifted"


def _replace_uses(node: fx.Node, value: object) -> None:
    for user in list(node.users):
        user.args = tuple(value if a is node else a for a in user.args)
        user.kwargs = {k: (value if v is node else v) for k, v in user.kwargs.items()}


class FoldBiasShiftPass(GraphPass):
    """Replace every BiasShift call by its frozen value (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(BIAS_SHIFT_ATTR + "."):
                continue
            mod = gm.get_submodule(str(node.target))
            if not isinstance(mod, BiasShift):
                continue
            (bias,) = node.args
            value: object = bias
            if mod.active:
                b = get_attr_tensor(gm, bias) if bias is not None else None
                computed = bias is not None and b is None  # a bias computed in the graph: subtract δ there
                with torch.no_grad():
                    shifted = mod.delta.detach().clone() if computed else mod.shifted(
                        None if b is None else b.detach(), 1.0)
                if not hasattr(gm, SHIFTED_ATTR):
                    gm.add_module(SHIFTED_ATTR, nn.Module())
                key = str(node.target)[len(BIAS_SHIFT_ATTR) + 1:]
                getattr(gm, SHIFTED_ATTR).register_buffer(key, shifted.clone())
                with gm.graph.inserting_before(node):
                    value = gm.graph.get_attr(f"{SHIFTED_ATTR}.{key}")
                    if computed:
                        value = gm.graph.call_function(operator.sub, (bias, value))
            _replace_uses(node, value)
            gm.graph.erase_node(node)
            modified = True
        if modified and not any(n.op == "call_module" and str(n.target).startswith(BIAS_SHIFT_ATTR + ".")
                                for n in gm.graph.nodes):
            delattr(gm, BIAS_SHIFT_ATTR)
        return finish(gm, modified)
