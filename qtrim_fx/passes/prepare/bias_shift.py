"""InsertBiasShiftPass: each Conv / Linear with a quantized weight reads its bias through a BiasShift.

``calibrate`` corrects the mean quantization error of these layers' outputs by shifting their biases
(:mod:`qtrim_fx.runtime.bias_shift`); the node that applies it is part of the prepared graph from the
start, so the graph does not change after ``prepare`` and a checkpoint of a calibrated model loads into a
freshly prepared one::

    before:  wq = qtrim_sites.conv_weight(conv.weight, f)
             y  = conv2d(xq, wq, conv.bias, ...)               (bias None: conv2d(xq, wq, None, ...))

    after:   wq = qtrim_sites.conv_weight(conv.weight, f)
             b  = qtrim_bias_shift.conv_weight(conv.bias)      (b − λ·δ; b itself until calibrate sets δ)
             y  = conv2d(xq, wq, b, ...)

Only functional ``conv`` / ``linear`` nodes (after ``FunctionalizeWeightedModulesPass``) whose weight
operand is a weight site, with the bias as their third operand (``F.conv*d``, ``F.linear``,
``aten.conv*d`` / ``aten.linear``); transposed convolutions, ``addmm`` and matmuls keep their bias.
A weight read by several layers gives each its own shift (keys ``<site>``, ``<site>_2``, ...). A conv whose
weight site folds a BatchNorm hands the shift that BatchNorm (batch statistics cancel the shift in training).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.spec import OP_KIND, SITE_NODE
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR, BiasShift
from qtrim_fx.runtime.prepared import BLEND_ATTR

__all__ = ["InsertBiasShiftPass", "shifted_bias"]

_AXIS = {"conv": 1, "linear": -1}


def shifted_bias(node: fx.Node) -> tuple[object, bool]:
    """(the bias operand of a conv / linear node, whether it is passed as the ``bias`` keyword)."""
    if len(node.args) > 2:
        return node.args[2], False
    return node.kwargs.get("bias"), "bias" in node.kwargs


def _weight_site(node: fx.Node) -> fx.Node | None:
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "call_module":
        spec = w.meta.get(SITE_NODE)
        if spec is not None and spec.kind == "weight":
            return w
    return None


def _weight_shape(gm: fx.GraphModule, site: fx.Node) -> tuple[int, ...] | None:
    src = site.args[0] if site.args else None
    t = get_attr_tensor(gm, src)
    if t is None and isinstance(src, fx.Node):
        t = src.meta.get("val")
    shape = getattr(t, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None and len(shape) >= 2 else None


class InsertBiasShiftPass(GraphPass):
    """Insert a ``call_module`` BiasShift before the bias operand of quantized Conv / Linear nodes."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        control = getattr(gm, BLEND_ATTR, None)
        if control is None:  # nothing was quantized
            return finish(gm, False)
        modified = False
        used: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            kind = node.meta.get(OP_KIND)
            if node.op != "call_function" or kind not in _AXIS:
                continue
            site = _weight_site(node)
            if site is None:
                continue
            shape = _weight_shape(gm, site)
            channels = None if shape is None else shape[0]
            bias, as_kw = shifted_bias(node)
            if isinstance(bias, fx.Node) and bias.op == "call_module" and str(bias.target).startswith(
                    BIAS_SHIFT_ATTR + "."):
                continue  # already reads its bias through a shift
            if channels is None or (bias is not None and not isinstance(bias, fx.Node)) or (
                    not as_kw and len(node.args) < 2):
                continue
            spec = site.meta[SITE_NODE]
            used[spec.key] = used.get(spec.key, 0) + 1
            key = spec.key if used[spec.key] == 1 else f"{spec.key}_{used[spec.key]}"
            if not hasattr(gm, BIAS_SHIFT_ATTR):
                gm.add_module(BIAS_SHIFT_ATTR, nn.ModuleDict())
            norm = gm.get_submodule(spec.folded_bn) if spec.folded_bn is not None else None
            getattr(gm, BIAS_SHIFT_ATTR)[key] = BiasShift(channels, _AXIS[kind], control, norm,
                                                          rank=len(shape) if kind == "conv" else 0)
            with gm.graph.inserting_before(node):
                shift = gm.graph.call_module(f"{BIAS_SHIFT_ATTR}.{key}", (bias,))
            if as_kw:
                node.kwargs = {**node.kwargs, "bias": shift}
            elif len(node.args) > 2:
                args = list(node.args)
                args[2] = shift
                node.args = tuple(args)
            else:
                node.args = (*node.args, shift)
            modified = True
        return finish(gm, modified)
