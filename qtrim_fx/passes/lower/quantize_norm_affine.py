"""QuantizeNormAffinePass: a LayerNorm's γ on an 8-bit grid and its β on the int32 grid (integer-only targets).

The QNN HTP runs a LayerNorm on integers only when its γ (scale) is quantized (uint8) and its β
(bias) is int32 with scale ``s_x · s_γ`` — the form ONNX Runtime's QNN recipe writes; with float γ/β it
runs the op in FLOAT_32 (measured: vit_tiny 2.4 s -> 0.5 s per image on the simulated HTP). The
lowered model computes with the deployed values, so torch and the file agree::

    before:  y = layer_norm(quant_dequant(x, s_x, ...), (D,), norm.weight, norm.bias, eps)
    after:   y = layer_norm(quant_dequant(x, s_x, ...), (D,),
                            quant_dequant(norm.weight, s_γ, z_γ, 0, 255, None, 8, False, "norm.weight"),
                            qtrim_bias.norm_weight, eps)        # k·(s_x·s_γ), k = round_half_even(β / (s_x·s_γ))

γ's grid: 8 bit in the target's activation storage (uint8 for ``qnn``, int8 for ``npu``: ``check`` reads a
dequantized γ as an activation-grid tensor), asymmetric, per tensor, over [min(γ, 0), max(γ, 0)]. Only affine LayerNorms
(an ``nn.LayerNorm`` module call that runs exactly ``nn.LayerNorm.forward``, or a ``layer_norm`` call on parameters) reading a per-tensor ``quant_dequant``. :func:`qtrim_fx.lower` runs the pass
for a model prepared for an integer-only target and lowered for one (like ``RequantizeViewsPass``);
``QuantizeBiasPass`` then stores β as int32 in the ONNX file.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.core.spec import site_key
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.lower.lower_sites import QPARAMS_ATTR
from qtrim_fx.passes.lower.round_bias import BIAS_ATTR, rounded_bias
from qtrim_fx.runtime.qdq import is_quant_dequant, quant_dequant

__all__ = ["QuantizeNormAffinePass", "gamma_qparams"]

def _grid(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


def gamma_qparams(gamma: torch.Tensor, eps: float = 1e-12, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (0-D) of γ's 8-bit per-tensor grid, unsigned or signed (0 exactly representable)."""
    qmin, qmax = _grid(signed)
    g = gamma.detach().float()
    lo, hi = torch.clamp(g.min(), max=0.0), torch.clamp(g.max(), min=0.0)
    scale = torch.clamp(hi - lo, min=eps) / (qmax - qmin)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)  # float, as derive_qparams gives it
    return scale, zero


def _input_scale(gm: fx.GraphModule, x: object) -> torch.Tensor | None:
    if not (isinstance(x, fx.Node) and x.op == "call_function" and is_quant_dequant(x.target)):
        return None
    axis = x.args[5] if len(x.args) > 5 else x.kwargs.get("axis")
    scale = get_attr_tensor(gm, x.args[1])
    return scale if axis is None and scale is not None and scale.dim() == 0 else None


class QuantizeNormAffinePass(GraphPass):
    """``nn.LayerNorm`` after a per-tensor site -> ``F.layer_norm`` with quantized γ and int32-grid β.

    Args:
        profile: the target lowered for; γ takes its activation storage (default: uint8).
    """

    def __init__(self, profile: TargetProfile | None = None) -> None:
        super().__init__()
        self.signed = profile is not None and profile.activation_signed

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            found = _layer_norm(gm, node)
            if found is None:
                continue
            s_x = _input_scale(gm, found[0])
            if s_x is None:
                continue
            _rewrite(gm, node, found, s_x, self.signed)
            modified = True
        return finish(gm, modified)


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """``(x, normalized_shape, γ get_attr or name, β tensor, eps)`` of an affine LayerNorm, else None.

    ``nn.LayerNorm`` modules (symbolic trace) and ``layer_norm`` calls on ``get_attr`` parameters
    (``F.layer_norm``, ``aten.layer_norm``: the ``torch.export`` front end).
    """
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if not is_plain_module(m, nn.LayerNorm) or m.weight is None or m.bias is None or len(node.args) != 1:
            return None
        return node.args[0], tuple(m.normalized_shape), f"{node.target}.weight", m.bias, m.eps
    if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] != "layer_norm":
        return None
    args = [*node.args, *([None] * 5)][:5]
    x, shape, w, b, eps = args
    w, b = node.kwargs.get("weight", w), node.kwargs.get("bias", b)
    eps = node.kwargs.get("eps", 1e-5 if eps is None else eps)
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    bias = get_attr_tensor(gm, b)
    return (x, shape, str(w.target), bias, eps) if bias is not None else None


def _rewrite(gm: fx.GraphModule, node: fx.Node, found: tuple, s_x: torch.Tensor, signed: bool) -> None:
    x, shape, weight_name, bias, eps = found
    gamma = gm.get_parameter(weight_name)
    key = site_key(weight_name)
    for attr in (QPARAMS_ATTR, BIAS_ATTR):
        if not hasattr(gm, attr):
            gm.add_module(attr, nn.Module())
    s_g, z_g = gamma_qparams(gamma, signed=signed)
    getattr(gm, QPARAMS_ATTR).register_buffer(f"{key}_scale", s_g)
    getattr(gm, QPARAMS_ATTR).register_buffer(f"{key}_zero_point", z_g)
    getattr(gm, BIAS_ATTR).register_buffer(key, rounded_bias(bias, s_x, s_g))
    name = weight_name.rpartition(".")[0] or weight_name
    with gm.graph.inserting_before(node):
        w = gm.graph.get_attr(weight_name)
        s = gm.graph.get_attr(f"{QPARAMS_ATTR}.{key}_scale")
        z = gm.graph.get_attr(f"{QPARAMS_ATTR}.{key}_zero_point")
        wq = gm.graph.call_function(quant_dequant, (w, s, z, *_grid(signed), None, 8, signed, f"{name}.weight"))
        b = gm.graph.get_attr(f"{BIAS_ATTR}.{key}")
        if node.op == "call_module":
            ln = gm.graph.call_function(F.layer_norm, (x, shape, wq, b, eps))
        else:
            ln = gm.graph.call_function(node.target, (x, shape, wq, b, eps))
    ln.meta.update(node.meta)
    node.replace_all_uses_with(ln)
    gm.graph.erase_node(node)
