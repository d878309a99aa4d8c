"""RoundBiasPass: biases of quantized Conv/Linear rounded to the int32 accumulator grid (lowering).

Targets whose integer kernels add the bias in the int32 accumulator (``bias="int32"``:
ONNX Runtime's QGemm, QNN) store ``round(b / (s_x·s_w))`` as int32; the ONNX pass does that on
the exported file. This pass makes the lowered torch model compute the same bias, so torch
and the runtime agree::

    before:  y = conv2d(quant_dequant(x, s_x, ...), quant_dequant(w, s_w, ...), get_attr[conv.bias])
    after:   y = conv2d(quant_dequant(x, s_x, ...), quant_dequant(w, s_w, ...),
                        get_attr[qtrim_bias.conv_weight])      # k·(s_x·s_w), k = round_half_even(b / (s_x·s_w))

Only when the input is per-tensor quantized and the weight scale is per tensor or per
output channel (what the ONNX pass accepts); other biases stay float. The input may reach the layer
through ops that move values without changing them (a view, ``x[:, 0]``, a transpose): the file
re-quantizes after those, so its layer reads a DequantizeLinear too. ``addmm(b, x, w)`` (Hugging Face's
Conv1D, a Gemm in the file) is rounded like a linear layer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.core.spec import OUTPUT_CHANNEL_AXIS, SITE_NODE, site_key
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import op_kind, target_name
from qtrim_fx.runtime.qdq import quant_dequant

__all__ = ["RoundBiasPass"]

BIAS_ATTR = "qtrim_bias"
_INT32 = torch.iinfo(torch.int32)
_OUT_AXIS = OUTPUT_CHANNEL_AXIS


_attr = get_attr_tensor


#: torch ops that move, select or max values without changing them, written as the ONNX ops after which
#: ``RequantizeAfterShapeOpsPass`` re-quantizes (Reshape, Transpose, Squeeze, Gather, Slice, Expand, Tile,
#: MaxPool ...): the file's Gemm / Conv then reads a DequantizeLinear and stores an int32 bias.
_MOVES = frozenset({
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "contiguous", "expand", "expand_as", "select", "slice", "narrow", "getitem", "movedim", "repeat", "tile",
    "max_pool1d", "max_pool2d", "max_pool3d"})
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "unbind", "tensor_split"})


def _through_moves(node: object, modules: dict[str, nn.Module]) -> object:
    """The tensor a chain of such ops reads (values on the same grid; Hugging Face's Conv1D feeds ``x.view(-1, nx)``
    to addmm, a ViT head reads ``x[:, 0]``). A tuple element (``chunk(...)[0]``: an ONNX Split) is not looked
    through."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        if node.op == "call_module":
            moves = op_kind(node, modules) == "maxpool" or isinstance(modules.get(str(node.target)), nn.Flatten)
        else:
            moves = node.op in ("call_function", "call_method") and target_name(node) in _MOVES and not (
                node.target is operator.getitem and target_name(node.args[0]) in _SPLITS)
        if not moves:
            break
        node = node.args[0]
    return node


def _qdq_scale(gm: fx.GraphModule, node: object,
               modules: dict[str, nn.Module] | None = None) -> tuple[torch.Tensor, int | None] | None:
    node = _through_moves(node, modules if modules is not None else dict(gm.named_modules()))
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is quant_dequant):
        return None
    scale = _attr(gm, node.args[1])
    return None if scale is None else (scale, node.args[5])


def rounded_bias(bias: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``k·s`` with ``s = s_x·s_w`` (float32) and ``k = clip(round_half_even(b / s), int32)``."""
    s = (s_x.float() * s_w.float()).expand_as(bias)
    k = torch.clamp(torch.round(bias.detach().float() / s), _INT32.min, _INT32.max)
    return k * s


class RoundBiasPass(GraphPass):
    """Round quantized Conv/Linear/addmm biases to the int32 accumulator grid for ``bias="int32"`` targets."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.profile.bias != "int32":
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        modified = False
        for node in list(gm.graph.nodes):
            kind = op_kind(node, modules)
            # operand positions: conv / linear (x, w, b, ...); addmm (b, x, w) with w (in, out): Hugging Face's
            # Conv1D, a Gemm in the file, whose bias the ONNX pass stores as int32 like the others
            if kind in _OUT_AXIS:
                ib, ix, iw, out_axis = 2, 0, 1, _OUT_AXIS[kind]
            elif kind == "addmm" and not node.kwargs:
                ib, ix, iw, out_axis = 0, 1, 2, 1
            else:
                continue
            if len(node.args) < 3 or str(getattr(node.args[ib], "target", "")).startswith(BIAS_ATTR + "."):
                continue
            bias = _attr(gm, node.args[ib])
            x, w = _qdq_scale(gm, node.args[ix], modules), _qdq_scale(gm, node.args[iw], modules)
            if bias is None or x is None or w is None or x[0].dim() != 0:
                continue
            (s_x, _), (s_w, w_axis) = x, w
            if s_w.dim() == 1 and (w_axis != out_axis or s_w.numel() != bias.numel()):
                continue  # not one scale per output channel (a grouped ConvTranspose: O/g); the file keeps it float
            name = node.args[iw].meta.get(SITE_NODE).name if SITE_NODE in node.args[iw].meta else node.name
            if not hasattr(gm, BIAS_ATTR):
                gm.add_module(BIAS_ATTR, nn.Module())
            key = site_key(name)
            getattr(gm, BIAS_ATTR).register_buffer(key, rounded_bias(bias, s_x, s_w))
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(f"{BIAS_ATTR}.{key}")
            args = list(node.args)
            args[ib] = b
            node.args = tuple(args)
            modified = True
        return finish(gm, modified)
