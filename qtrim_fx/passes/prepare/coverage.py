"""Weight coverage: every parameter-holding op of a prepared graph that stays in float, and why (analysis only).

DESIGN.md: "Every parameter is accounted for." A prepared graph reads parameters in three ways;
each weight (rank >= 2) read by a parameter-holding op either flows through a weight site or is
listed here::

    w = get_attr[h.0.attn.c_attn.weight] -> call_module[qtrim_sites....](w) -> addmm(b, x, ·)   quantized
    w = get_attr[fc.weight] -> linear(x, w)            (an Override(exclude=True))   "excluded by config"
    w = get_attr[emb.weight] -> embedding(ids, w)                                    "embedding lookup ..."
    call_module[lstm](x)                   (nn.LSTM kept whole)                      "leaf module nn.LSTM ..."
    call_function[shifted_window_attention](x, qkv_weight, ...)   (fx.wrap'd)        "used inside wrapped ..."

Ops that read a parameter only as data (a positional embedding added, a layer scale multiplied,
norm affine parameters) are not weights of a parameter-holding op and are not listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.modules import is_plain_weighted
from qtrim_fx.core.spec import OP_KIND, SITE_NODE
from qtrim_fx.passes.prepare.graph_walks import node_owner
from qtrim_fx.passes.prepare.normalize import op_kind, target_name

__all__ = ["FloatWeight", "float_weights", "summarize"]

#: op kinds that hold a weight operand (the ones AnnotateSitesPass quantizes when it can)
_WEIGHT_OPS = frozenset({"conv", "conv_transpose", "linear", "matmul", "bmm", "addmm", "baddbmm", "einsum"})
_HELPER_MODULES = ("qtrim_sites", "qtrim_blend", "qtrim_mode")
_OWN_FUNCTIONS = ("torch", "operator", "builtins", "math", "_operator", "qtrim_fx")


@dataclass(frozen=True)
class FloatWeight:
    """A parameter read by a parameter-holding op that stays in floating point.

    Attributes:
        param: qualified parameter name (``lstm.weight_ih_l0``).
        op: the op reading it (``linear``, ``embedding``, ``nn.LSTM``, ``shifted_window_attention``).
        reason: why it is not quantized, and what to do about it.
    """

    param: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.param} ({self.op}): {self.reason}"


def _is_weight(p: torch.Tensor) -> bool:
    return p.dim() >= 2


def _is_site(n: fx.Node) -> bool:
    return n.op == "call_module" and str(n.target).startswith("qtrim_sites.")


def _readers(n: fx.Node, kinds: Mapping[fx.Node, str]) -> Iterable[fx.Node]:
    """The ops reading ``n`` through views (reshape, transpose, getitem, chunk ...)."""
    for u in n.users:
        if kinds.get(u) == "reshape" and u.op != "output":
            yield from _readers(u, kinds)
        else:
            yield u


def _is_user_function(n: fx.Node) -> bool:
    module = getattr(n.target, "__module__", None) or ""
    return n.op == "call_function" and module.split(".")[0] not in _OWN_FUNCTIONS


def _reader_reason(reader: fx.Node, kind: str, config: QuantConfig, modules: Mapping[str, nn.Module]) -> str | None:
    if kind in _WEIGHT_OPS:
        owner = node_owner(reader)
        if config.settings_for(owner, type(modules.get(owner or "")), kind).exclude:
            return "excluded by config (an Override with exclude=True matches it)"
        return ("unsupported form: the weight reaches the op through computation, not views, or the op has "
                "two parameter operands; quantize it in the model or exclude it to silence this")
    if kind == "embedding":
        return "embedding lookup: tables are not quantized (they are gathered, not multiplied)"
    if _is_user_function(reader):
        return ("parameter used inside a wrapped function (traced as one call, its ops are not seen): "
                "make the function traceable (remove its torch.fx.wrap) to quantize it")
    if kind == "other" and reader.op in ("call_function", "call_method"):
        if _derived_weight_of(reader) is not None:
            return ("weight computed from parameters before its op (weight standardization or normalization: "
                    "timm StdConv2d, weight_norm ...): only weights read directly or through views are "
                    "quantized; the computed weight stays float")
        return "unsupported op: qtrim_fx quantizes the weights of conv/linear/matmul-like ops only"
    return None


def _derived_weight_of(start: fx.Node, limit: int = 16) -> fx.Node | None:
    """The conv / linear whose weight operand ``start``'s value reaches through at most ``limit`` nodes, else None."""
    seen, frontier = {start}, [start]
    while frontier and len(seen) <= limit:
        n = frontier.pop()
        for u in n.users:
            if u.op == "output" or u in seen:
                continue
            weight = u.args[1] if u.op == "call_function" and len(u.args) > 1 else None
            if weight is n and getattr(u.target, "__name__", "") in ("conv1d", "conv2d", "conv3d", "linear",
                                                                     "conv_transpose1d", "conv_transpose2d",
                                                                     "conv_transpose3d", "convolution"):
                return u
            seen.add(u)
            frontier.append(u)
    return None


def _type_name(m: nn.Module) -> str:
    t = type(m)
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn.") else f"{t.__module__}.{t.__qualname__}"


def _leaf_reason(m: nn.Module, name: str, fallbacks: Mapping[str, str]) -> str:
    if name in fallbacks:
        return f"leaf module (could not be traced: {fallbacks[name]}); make it traceable to quantize inside"
    if isinstance(m, nn.Embedding):
        return "embedding lookup: tables are not quantized (they are gathered, not multiplied)"
    if isinstance(m, nn.MultiheadAttention):
        return "leaf module: a MultiheadAttention form the traced reference does not cover stays whole (float)"
    if isinstance(m, nn.RNNBase):
        return "leaf module: recurrent layers (LSTM/GRU/RNN) are kept whole and stay in float"
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not is_plain_weighted(m):
        return ("module call kept whole: it computes more than torch's op on its parameters (its class overrides "
                "forward, or a forward hook); its weights stay float")
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return "module call kept as is (its arguments cannot be expressed functionally, e.g. output_size=)"
    return "leaf module (its forward is not traced into, e.g. registered by its library as a leaf)"


def float_weights(
    gm: fx.GraphModule, config: QuantConfig | None = None, fallbacks: Mapping[str, str] | None = None
) -> tuple[FloatWeight, ...]:
    """The weights of parameter-holding ops in ``gm`` that no weight site quantizes, with the reason.

    Args:
        gm: a prepared (or annotated) graph module.
        config: the config it was prepared with (to tell exclusions apart).
        fallbacks: submodule -> reason of the leaves capture made (:class:`~qtrim_fx.frontend.trace.Fallback`).

    Returns:
        One :class:`FloatWeight` per (parameter, op) pair, in graph order.
    """
    config = config or QuantConfig()
    fallbacks = dict(fallbacks or {})
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters(remove_duplicate=False))
    kinds = {n: n.meta.get(OP_KIND) or op_kind(n, modules) for n in gm.graph.nodes}
    found: dict[tuple[str, str], FloatWeight] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and str(n.target) in params and _is_weight(params[str(n.target)]):
            for r in _readers(n, kinds):
                if _is_site(r) or SITE_NODE in r.meta:
                    continue
                derived = _derived_weight_of(r) if kinds[r] == "other" else None
                if derived is not None and _is_site(derived.args[1]):
                    continue  # a weight computed from it is quantized by its own site
                why = _reader_reason(r, kinds[r], config, modules)
                op = kinds[r] if kinds[r] in _WEIGHT_OPS or kinds[r] == "embedding" else target_name(r)
                if derived is not None:  # name the op the computed weight feeds, not the computation
                    op = f"{kinds.get(derived, target_name(derived))}, computed weight"
                if why is not None:
                    found.setdefault((str(n.target), op), FloatWeight(str(n.target), op, why))
        elif n.op == "call_module" and not str(n.target).startswith(_HELPER_MODULES):
            m = modules.get(str(n.target))
            if m is None:
                continue
            for pname, p in m.named_parameters():
                if _is_weight(p):
                    full = f"{n.target}.{pname}"
                    op = _type_name(m)
                    found.setdefault((full, op), FloatWeight(full, op, _leaf_reason(m, str(n.target), fallbacks)))
    return tuple(found.values())


def summarize(rows: Iterable[FloatWeight], limit: int = 8) -> str:
    """One line per reason, naming up to ``limit`` parameters in all."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        by_reason.setdefault(r.reason, []).append(f"{r.param} ({r.op})")
    parts, shown = [], 0
    for reason, names in by_reason.items():
        take = names[: max(1, limit - shown)]
        shown += len(take)
        more = f" and {len(names) - len(take)} more" if len(names) > len(take) else ""
        parts.append(f"{', '.join(take)}{more}: {reason}")
    return "\n  ".join(parts)
