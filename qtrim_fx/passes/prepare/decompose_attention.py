"""DecomposeAttentionPass: ``scaled_dot_product_attention`` as its matmuls and softmax on integer-only targets.

``F.scaled_dot_product_attention`` is one op in torch, so no site can sit between its steps, and the exporters
write its scores (``MatMul``, ``Mul``, ``Softmax``, ``MatMul``) as float ops: an integer-only back end (the QNN
HTP) runs them in FLOAT_32 or on its CPU. For a model prepared for such a target
(``TargetProfile.integer_attention_scores``) this pass writes the attention as the file will compute it, so the
profile's integer-site rules quantize each step (``matmul`` in+out, ``mul`` out, ``softmax`` out)::

    before:  o = sdpa(q, k, v, attn_mask=m)                       (F.scaled_dot_product_attention / aten op)

    after:   kt = torch.transpose(k, -2, -1)
             s = torch.matmul(q, kt)
             s = torch.mul(s, 0.125)                              the scale: ``scale=`` or 1/sqrt(head width)
             s = torch.add(s, m)                                  (an additive float mask)
             p = torch.softmax(s, -1)
             o = torch.matmul(p, v)                               meta: the attention's owner and source line

The values are those of torch's reference (math) attention; they differ from the fused kernel's in float
rounding only, as timm's ``fused_attn = False`` path does (λ = 0 is the model up to that rounding on these
targets). Calls that need what this form does not write are left whole (and ``export`` names them): a causal
flag, dropout, grouped-query attention, a bool mask (torch's attention gives 0 on a row it masks entirely, a
plain softmax NaN) or one of unknown dtype, or a head width not known at prepare (no example inputs). A mask or causal flag that is a forward argument defaulting to ``None`` / ``False`` (timm's
``Attention.forward(x, attn_mask=None)``) is written for its default, behind
:func:`~qtrim_fx.runtime.ops.attention_defaults`, which refuses a caller's mask instead of ignoring it.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import OWNER
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import arg
from qtrim_fx.passes.prepare.ranks import FLOATING, RANK, last_dim, rank
from qtrim_fx.runtime.ops import attention_defaults

__all__ = ["DecomposeAttentionPass"]

_ATEN_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_INHERITED = ("nn_module_stack", "stack_trace")


def _default(value: object, default: object) -> tuple[bool, fx.Node | None]:
    """Whether ``value`` is ``default`` (a constant, or a forward argument defaulting to it: then that placeholder)."""
    if isinstance(value, fx.Node):
        if value.op == "placeholder" and value.args and value.args[0] is default:
            return True, value
        return False, None
    return value is default or (default is False and value is not None and value == default), None


def _plan(node: fx.Node) -> tuple | None:
    """``(q, k, v, mask, scale, guarded)`` of an attention call this pass can write, else None."""
    if node.op != "call_function" or node.target not in (F.scaled_dot_product_attention, _ATEN_SDPA):
        return None
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout, scale, gqa = arg(node, 4, "dropout_p", 0.0), arg(node, 6, "scale"), node.kwargs.get("enable_gqa", False)
    no_causal, causal_arg = _default(arg(node, 5, "is_causal", False), False)
    no_mask, mask_arg = _default(mask, None)
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or dropout != 0.0 or not no_causal or gqa:
        return None
    if no_mask:
        mask = None
    elif not (isinstance(mask, fx.Node) and mask.meta.get(FLOATING) is True):
        # A bool mask (or one of unknown dtype) stays whole: torch's attention gives 0 for a row it masks
        # entirely (a "safe" softmax), a plain softmax over -inf gives NaN there.
        return None
    width = last_dim(q)
    if (scale is None and not width) or not (scale is None or isinstance(scale, (int, float))) or rank(q) is None:
        return None
    guarded = (mask_arg, causal_arg) if mask_arg is not None or causal_arg is not None else None
    return q, k, v, mask, float(scale) if scale is not None else 1.0 / math.sqrt(width), guarded


class DecomposeAttentionPass(GraphPass):
    """Rewrite attention calls as matmul -> scale -> (mask) -> softmax -> matmul (see the module doc)."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        target = config.target if config is not None else None
        self.enabled = target is not None and get_profile(target).integer_attention_scores

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes) if self.enabled else []:
            plan = _plan(node)
            if plan is None:
                continue
            _decompose(gm, node, *plan)
            modified = True
        return finish(gm, modified)


def _decompose(gm: fx.GraphModule, node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None,
               scale: float, guarded: tuple[fx.Node | None, fx.Node | None] | None) -> None:
    g = gm.graph
    r = rank(q)
    with g.inserting_before(node):
        kt = g.call_function(torch.transpose, (k, -2, -1))
        scores = g.call_function(torch.matmul, (q, kt))
        scaled = g.call_function(torch.mul, (scores, scale))
        new = [kt, scores, scaled]
        if mask is not None:  # additive (float) masks only, see _plan
            scaled = g.call_function(torch.add, (scaled, mask))
            new.append(scaled)
        probs = g.call_function(torch.softmax, (scaled, -1))
        out = g.call_function(torch.matmul, (probs, v))
        new += [probs, out]
        if guarded is not None:  # a forward argument held the default: refuse a caller's mask (runtime.ops)
            out = g.call_function(attention_defaults, (out, *guarded))
            new.append(out)
    inherited = {key: val for key, val in node.meta.items() if key in _INHERITED}
    for n in new:
        n.meta.update(inherited)
        if n is not new[-1] and RANK not in n.meta:
            n.meta[RANK] = r
            n.meta[FLOATING] = True
    out.meta.update({key: val for key, val in node.meta.items() if key in ("val", "tensor_meta", RANK, FLOATING,
                                                                          OWNER)})
    node.replace_all_uses_with(out)
    g.erase_node(node)
