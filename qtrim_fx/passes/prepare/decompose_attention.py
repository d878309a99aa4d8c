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

A bool mask (``True`` = attend) or ``is_causal=True`` is written as the additive mask torch's own math
attention builds, and the softmax as its ``_safe_softmax`` (0 on a row masked entirely, as torch gives)::

    before:  o = sdpa(q, k, v, attn_mask=keep)                    keep: bool
    after:   ...;  m = torch.where(keep, 0.0, -inf);  s = torch.add(s, m)
             p = aten._safe_softmax(s, -1);  o = torch.matmul(p, v)

    before:  o = sdpa(q, k, v, is_causal=True)
    after:   ...;  m = torch.where(causal_keep(q, k), 0.0, -inf);  s = torch.add(s, m);  p = aten._safe_softmax(s, -1)

On an integer-only target the sum's site never takes the mask's ``-inf`` for its range (the observer sees a
masked entry at the bound its grid must reach, :func:`~qtrim_fx.runtime.observer.masked_scores_bound`), and
lowering writes ``_safe_softmax`` of the (finite, quantized) sum as a plain ``softmax``
(:class:`~qtrim_fx.passes.lower.safe_softmax.SafeSoftmaxPass`).

The values are those of torch's reference (math) attention; they differ from the fused kernel's in float
rounding only, as timm's ``fused_attn = False`` path does (λ = 0 is the model up to that rounding on these
targets). A dropout probability that is one only in training (``dropout if self.training else 0.0``, captured as
``mode_select``) is written as ``F.dropout`` of the probabilities, in training mode only. Calls that need what
this form does not write are left whole (and ``export`` names them): a causal flag that is not a constant, a
causal flag with a mask, dropout in eval mode, grouped-query attention, a mask of unknown
dtype, or a head width not known at prepare (no example inputs). A mask or causal flag that is a forward
argument defaulting to ``None`` / ``False`` (timm's
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
from qtrim_fx.frontend.mode import mode_select
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import arg
from qtrim_fx.passes.prepare.ranks import FLOATING, RANK, last_dim, rank
from qtrim_fx.runtime.ops import attention_defaults, causal_keep

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
    """``(q, k, v, mask, scale, guarded, masking, dropout)`` of an attention call this pass can write, else None.

    ``masking``: ``None`` (no mask or an additive float one), ``"bool"`` (``mask`` keeps where True) or
    ``"causal"``. ``dropout``: a training-only dropout probability (``mode_select(training, p, 0.0)``), else None.
    """
    if node.op != "call_function" or node.target not in (F.scaled_dot_product_attention, _ATEN_SDPA):
        return None
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout, scale, gqa = arg(node, 4, "dropout_p", 0.0), arg(node, 6, "scale"), node.kwargs.get("enable_gqa", False)
    no_causal, causal_arg = _default(arg(node, 5, "is_causal", False), False)
    no_mask, mask_arg = _default(mask, None)
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or gqa:
        return None
    if not (_eval_free_dropout(dropout) or (not isinstance(dropout, fx.Node) and dropout == 0.0)):
        return None
    causal = arg(node, 5, "is_causal", False) is True
    if not (no_causal or causal):
        return None  # a flag computed in the graph (or a non-default argument): its value is not known here
    masking = "causal" if causal else None
    if no_mask:
        mask = None
    elif causal:
        return None  # torch refuses a mask with is_causal=True
    elif isinstance(mask, fx.Node) and mask.meta.get(FLOATING) is False:
        masking = "bool"  # sdpa takes bool or float masks: a non-floating one is bool
    elif not (isinstance(mask, fx.Node) and mask.meta.get(FLOATING) is True):
        return None  # a mask of unknown dtype
    width = last_dim(q)
    if (scale is None and not width) or not (scale is None or isinstance(scale, (int, float))) or rank(q) is None:
        return None
    guarded = (mask_arg, causal_arg) if mask_arg is not None or causal_arg is not None else None
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(width)
    return q, k, v, mask, scale, guarded, masking, dropout if isinstance(dropout, fx.Node) else None


def _eval_free_dropout(p: object) -> bool:
    """``p`` is ``mode_select(training, p_train, 0.0)`` (``dropout if self.training else 0.0``, as captured)."""
    return (isinstance(p, fx.Node) and p.op == "call_function" and p.target is mode_select and len(p.args) == 3
            and not isinstance(p.args[2], fx.Node) and p.args[2] == 0.0)


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
               scale: float, guarded: tuple[fx.Node | None, fx.Node | None] | None, masking: str | None,
               dropout: fx.Node | None) -> None:
    g = gm.graph
    r = rank(q)
    with g.inserting_before(node):
        kt = g.call_function(torch.transpose, (k, -2, -1))
        scores = g.call_function(torch.matmul, (q, kt))
        scaled = g.call_function(torch.mul, (scores, scale))
        new = [kt, scores, scaled]
        if masking is not None:  # a bool or causal mask: the additive mask torch's math attention adds
            keep = mask if masking == "bool" else g.call_function(causal_keep, (q, k))
            mask = g.call_function(torch.where, (keep, 0.0, float("-inf")))
            new += [mask] if masking == "bool" else [keep, mask]
        if mask is not None:
            scaled = g.call_function(torch.add, (scaled, mask))
            new.append(scaled)
        softmax = torch.softmax if masking is None else torch.ops.aten._safe_softmax.default
        probs = g.call_function(softmax, (scaled, -1))
        new.append(probs)
        if dropout is not None:  # sdpa's dropout on the probabilities, in training mode only
            probs = g.call_function(F.dropout, (probs,), {"p": dropout, "training": dropout.args[0]})
            new.append(probs)
        out = g.call_function(torch.matmul, (probs, v))
        new.append(out)
        if guarded is not None:  # a forward argument held the default: refuse a caller's mask (runtime.ops)
            out = g.call_function(attention_defaults, (out, *guarded))
            new.append(out)
    inherited = {key: val for key, val in node.meta.items() if key in _INHERITED}
    for n in new:
        n.meta.update(inherited)
        if n.target is causal_keep:
            n.meta[FLOATING] = False
        elif n is not new[-1] and RANK not in n.meta:
            n.meta[RANK] = r
            n.meta[FLOATING] = True
    out.meta.update({key: val for key, val in node.meta.items() if key in ("val", "tensor_meta", RANK, FLOATING,
                                                                          OWNER)})
    node.replace_all_uses_with(out)
    g.erase_node(node)
