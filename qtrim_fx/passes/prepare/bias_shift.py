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
``aten.conv*d`` / ``aten.linear``), and ``addmm(b, x, w)`` (Hugging Face's Conv1D, default ``beta`` /
``alpha``); transposed convolutions and bias-free matmuls are left as they are.
A weight read by several layers gives each its own shift (keys ``<site>``, ``<site>_2``, ...). A conv whose
weight site folds a BatchNorm hands the shift that BatchNorm (batch statistics cancel the shift in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.spec import OP_KIND, SITE_NODE
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR, BiasShift
from qtrim_fx.runtime.prepared import BLEND_ATTR

__all__ = ["InsertBiasShiftPass", "shifted_bias"]

@dataclass(frozen=True)
class _Layout:
    """Where a layer kind keeps its operands: weight and bias argument positions (and the bias keyword), the
    weight dimension that counts output channels, the output's channel axis."""

    weight: int
    bias: int
    bias_kw: str | None
    channels_dim: int
    axis: int


_LAYOUTS = {
    "conv": _Layout(1, 2, "bias", 0, 1),         # conv*d(x, w, b, ...), w (C_out, C_in/g, *k)
    "linear": _Layout(1, 2, "bias", 0, -1),      # linear(x, w, b), w (C_out, C_in)
    "addmm": _Layout(2, 0, None, 1, -1),         # addmm(b, x, w), w (C_in, C_out): Hugging Face's Conv1D
}


def shifted_bias(node: fx.Node, layout: _Layout | None = None) -> tuple[object, bool]:
    """(the bias operand of a conv / linear / addmm node, whether it is passed as a keyword)."""
    layout = layout or _LAYOUTS["linear"]
    if len(node.args) > layout.bias:
        return node.args[layout.bias], False
    if layout.bias_kw is None:
        return None, False
    return node.kwargs.get(layout.bias_kw), layout.bias_kw in node.kwargs


def _weight_site(node: fx.Node, layout: _Layout) -> fx.Node | None:
    w = node.args[layout.weight] if len(node.args) > layout.weight else None
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


def _is_shift(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(BIAS_SHIFT_ATTR + ".")


class InsertBiasShiftPass(GraphPass):
    """Insert a ``call_module`` BiasShift before the bias operand of quantized Conv / Linear / addmm nodes."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        control = getattr(gm, BLEND_ATTR, None)
        if control is None:  # nothing was quantized
            return finish(gm, False)
        modified = False
        used: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            layout = _LAYOUTS.get(node.meta.get(OP_KIND)) if node.op == "call_function" else None
            site = None if layout is None else _weight_site(node, layout)
            if site is None:
                continue
            if layout.bias_kw is None and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
                continue  # addmm(..., beta=) scales the bias: not a plain bias
            shape = _weight_shape(gm, site)
            bias, as_kw = shifted_bias(node, layout)
            if shape is None or _is_shift(bias) or (bias is not None and not isinstance(bias, fx.Node)):
                continue  # unknown channels, already shifted, or a constant bias
            if bias is None and layout.bias_kw is None:
                continue  # addmm always has its bias operand
            spec = site.meta[SITE_NODE]
            used[spec.key] = used.get(spec.key, 0) + 1
            key = spec.key if used[spec.key] == 1 else f"{spec.key}_{used[spec.key]}"
            if not hasattr(gm, BIAS_SHIFT_ATTR):
                gm.add_module(BIAS_SHIFT_ATTR, nn.ModuleDict())
            norm = gm.get_submodule(spec.folded_bn) if spec.folded_bn is not None else None
            getattr(gm, BIAS_SHIFT_ATTR)[key] = BiasShift(shape[layout.channels_dim], layout.axis, control, norm,
                                                          rank=len(shape) if layout.axis == 1 else 0)
            with gm.graph.inserting_before(node):
                shift = gm.graph.call_module(f"{BIAS_SHIFT_ATTR}.{key}", (bias,))
            if as_kw:
                node.kwargs = {**node.kwargs, layout.bias_kw: shift}
            elif len(node.args) > layout.bias:
                args = list(node.args)
                args[layout.bias] = shift
                node.args = tuple(args)
            else:  # conv / linear called without their optional bias operand
                node.args = (*node.args, shift)
            modified = True
        return finish(gm, modified)
