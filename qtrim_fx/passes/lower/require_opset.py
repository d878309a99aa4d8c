"""RequireOpsetPass: refuse, before export, an op the target's opset cannot express.

Analysis only (no edits). The ONNX exporter writes ``scaled_dot_product_attention`` from opset 14
on; at an older opset it fails deep inside torch with ``UnsupportedOperatorError``. The ``npu``
profile exports at opset 13 (edge toolchains parse it), so every attention model hit that::

    graph with sdpa, profile.opset 13  ->  ProfileError naming the node, the opset it needs and
                                           ``opset=14`` (within the target's max_opset) as the fix

:func:`required_opset` gives the oldest opset a graph needs, and :func:`integer_opset` the oldest at
which an integer-only target runs each op as the one integer op its sites were trained around
(``LayerNormalization``: 17; below it the exporter writes ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add,
which the back end runs in float). ``export_onnx(opset=None)`` picks the newer of the two, within the
target's ``max_opset``, as it does for INT4 weights, instead of refusing or writing float ops.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.dtypes import storage_for
from qtrim_fx.core.errors import ProfileError
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.passes.base import GraphPass, PassResult

__all__ = ["RequireOpsetPass", "default_opset", "integer_opset", "is_sdpa", "required_opset"]

#: call_function targets -> the oldest opset the ONNX exporter writes them at
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default)
_MIN_OPSET: dict[object, int] = dict.fromkeys(_SDPA, 14)


def is_sdpa(target: object) -> bool:
    """``target`` is ``scaled_dot_product_attention`` (functional, C++ or ATen)."""
    return target in _SDPA


#: ops the exporter writes as one ONNX op only from an opset on (as float primitives below it), for
#: integer-only targets: call_function targets and module types -> (opset, the ONNX op)
_INTEGER_OP_OPSET: dict[object, tuple[int, str]] = {
    F.layer_norm: (17, "LayerNormalization"),
    torch.ops.aten.layer_norm.default: (17, "LayerNormalization"),
    torch.ops.aten.native_layer_norm.default: (17, "LayerNormalization"),
}
_INTEGER_MODULE_OPSET: tuple[tuple[type[nn.Module], tuple[int, str]], ...] = (
    (nn.LayerNorm, (17, "LayerNormalization")),  # and subclasses (timm's LayerNorm2d)
)


def integer_opset(gm: nn.Module) -> tuple[int, str, str] | None:
    """The oldest opset that writes every op of ``gm`` an integer-only target runs as one integer op.

    Returns ``(opset, onnx op, where)`` for the op that needs the newest one (``where``: the node or
    module name), or None. Looks at ``gm``'s call_function nodes and at every submodule (a LayerNorm
    inside a leaf is written by the same exporter).
    """
    need: tuple[int, str, str] | None = None

    def see(hit: tuple[int, str] | None, where: str) -> None:
        nonlocal need
        if hit is not None and (need is None or hit[0] > need[0]):
            need = (hit[0], hit[1], where)

    graph = getattr(gm, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            if node.op == "call_function":
                see(_INTEGER_OP_OPSET.get(node.target), node.name)
    for name, module in gm.named_modules():
        see(next((hit for cls, hit in _INTEGER_MODULE_OPSET if isinstance(module, cls)), None), name)
    return need


def required_opset(gm: fx.GraphModule) -> tuple[int, fx.Node] | None:
    """The oldest opset that exports every op of ``gm``, and the node that needs it (None: any opset)."""
    need: tuple[int, fx.Node] | None = None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        opset = _MIN_OPSET.get(node.target)
        if opset is not None and (need is None or opset > need[0]):
            need = (opset, node)
    return need


def default_opset(model: nn.Module, profile: TargetProfile) -> TargetProfile:
    """The profile at the oldest opset, from its own on, that writes the model as trained, when the target
    parses it; otherwise unchanged, and lowering (or the check) names what the target cannot take.

    That is the newest of: every site's storage (INT4 weights: 21), every op's ONNX form (scaled dot-product
    attention: 14) and, on an integer-only target, every op its sites were trained around as one integer op
    (LayerNorm: 17; below, the exporter writes float primitives the back end runs in float).
    """
    from qtrim_fx.runtime.prepared import iter_sites

    # signed and unsigned grids of one width share their oldest opset (int4/uint4: 21, int8/uint8: 10)
    needs = [profile.opset, *(storage_for(spec.scheme.bits, True).min_opset for spec, _, _ in iter_sites(model))]
    if isinstance(getattr(model, "graph", None), fx.Graph):
        op = required_opset(model)  # type: ignore[arg-type]
        needs.append(op[0] if op else 0)
    if profile.integer_only:
        integer = integer_opset(model)
        needs.append(integer[0] if integer else 0)
    needed = max(needs)
    if needed > profile.opset and needed <= profile.max_opset:
        try:
            return profile.replace(opset=needed)
        except ProfileError:
            return profile
    return profile


class RequireOpsetPass(GraphPass):
    """Lowering check: every op of the graph can be exported at ``profile.opset``."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def call(self, gm: fx.GraphModule) -> PassResult:
        need = required_opset(gm)
        p = self.profile
        if need is not None and need[0] > p.opset:
            opset, node = need
            fix = (f"pass opset={opset} (target {p.name!r} takes up to {p.max_opset})" if opset <= p.max_opset
                   else f"target {p.name!r} stops at opset {p.max_opset}: use another target")
            raise ProfileError(
                f"target {p.name!r} exports at opset {p.opset}, but {node.name} "
                f"({getattr(node.target, '__name__', node.target)}) is written to ONNX from opset {opset} on; {fix}")
        return PassResult(gm, False)
