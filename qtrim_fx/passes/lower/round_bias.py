"""RoundBiasPass: biases of quantized Conv/Linear rounded to the int32 accumulator grid (lowering).

Targets whose integer kernels add the bias in the int32 accumulator (``bias="int32"``:
ONNX Runtime's QGemm, QNN) store ``round(b / (s_x·s_w))`` as int32; the ONNX pass does that on
the exported file. This pass makes the lowered torch model compute the same bias, so torch
and the runtime agree::

    before:  y = conv2d(quant_dequant(x, s_x, ...), quant_dequant(w, s_w, ...), get_attr[conv.bias])
    after:   y = conv2d(quant_dequant(x, s_x, ...), quant_dequant(w, s_w, ...),
                        get_attr[qtrim_bias.conv_weight])      # k·(s_x·s_w), k = round_half_even(b / (s_x·s_w))

Only when the input is per-tensor quantized and the weight scale is per tensor or per
output channel (what the ONNX pass accepts); other biases stay float.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.core.spec import OUTPUT_CHANNEL_AXIS, SITE_NODE, site_key
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import op_kind
from qtrim_fx.runtime.qdq import quant_dequant

__all__ = ["RoundBiasPass"]

BIAS_ATTR = "qtrim_bias"
_INT32 = torch.iinfo(torch.int32)
_OUT_AXIS = OUTPUT_CHANNEL_AXIS


_attr = get_attr_tensor


def _qdq_scale(gm: fx.GraphModule, node: object) -> tuple[torch.Tensor, int | None] | None:
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
    """Round quantized Conv/Linear biases to the int32 accumulator grid for ``bias="int32"`` targets."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.profile.bias != "int32":
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        modified = False
        for node in list(gm.graph.nodes):
            kind = op_kind(node, modules)
            if kind not in _OUT_AXIS or len(node.args) < 3 or str(getattr(node.args[2], "target", "")).startswith(
                    BIAS_ATTR):
                continue
            bias = _attr(gm, node.args[2])
            x, w = _qdq_scale(gm, node.args[0]), _qdq_scale(gm, node.args[1])
            if bias is None or x is None or w is None or x[0].dim() != 0:
                continue
            (s_x, _), (s_w, w_axis) = x, w
            if s_w.dim() == 1 and (w_axis != _OUT_AXIS[kind] or s_w.numel() != bias.numel()):
                continue  # not one scale per output channel (a grouped ConvTranspose: O/g); the file keeps it float
            name = node.args[1].meta.get(SITE_NODE).name if SITE_NODE in node.args[1].meta else node.name
            if not hasattr(gm, BIAS_ATTR):
                gm.add_module(BIAS_ATTR, nn.Module())
            key = site_key(name)
            getattr(gm, BIAS_ATTR).register_buffer(key, rounded_bias(bias, s_x, s_w))
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(f"{BIAS_ATTR}.{key}")
            node.args = (*node.args[:2], b, *node.args[3:])
            modified = True
        return finish(gm, modified)
