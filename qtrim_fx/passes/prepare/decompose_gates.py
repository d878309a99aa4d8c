"""DecomposeGatesPass: a gated activation (SiLU, HardSwish) as its gate and a product, so the gate gets a site.

The torch exporters write ``silu(x)`` as ``Mul(x, Sigmoid(x))`` (and ``hardswish`` as ``Mul(x,
HardSigmoid(x))`` below opset 14). On an integer-only back end (QNN HTP, NPUs) the gate between the two ops
is then a float tensor no site of the model covers: the back end runs Sigmoid and Mul in FLOAT_32 (or on
its CPU), and ``check`` reports both (``float_op``). For a model prepared for such a target (the profile's
:meth:`~qtrim_fx.core.profiles.TargetProfile.gated_activations`, one table with ``check``), this pass
writes the activation as the file will compute it::

    before:  y = call_module[blocks.0.act](x)                 (nn.SiLU; or F.silu / aten.silu)

    after:   g = call_function[torch.sigmoid](x)              meta GATE = "blocks.0.act"
             y = call_function[gate_product](x, g, "silu")    meta OWNER = "blocks.0.act"

Annotation then puts the profile's ``("activation", "out")`` site on ``g`` (named ``blocks.0.act.gate``)
and its ``("mul", "out")`` site on ``y`` (``blocks.0.act.out``, the name the activation's output had), so
the deployed ``x · DQ(Q(sigmoid(x)))`` is what was trained. :func:`~qtrim_fx.runtime.ops.gate_product`
returns the activation's own value wherever the gate is unchanged, so λ = 0 stays exact FP32; lowering
writes it as ``torch.mul`` (``MultiplyGatesPass``). An in-place activation whose input has other
readers is left alone (the rewrite is out of place; ``check`` still names it).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import GATE, OWNER
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.graph_walks import node_owner
from qtrim_fx.passes.prepare.normalize import target_name
from qtrim_fx.runtime.ops import GATES, gate_product

__all__ = ["DecomposeGatesPass"]

#: exact module types (a subclass may compute something else) -> activation name.
_MODULES: dict[type, str] = {nn.SiLU: "silu", nn.Hardswish: "hardswish"}
#: torch functions -> activation name (a user's own function of the same name is not one of them).
_FUNCTIONS: dict[object, str] = {F.silu: "silu", F.hardswish: "hardswish"}
#: ATen packet names (``torch.export`` graphs) -> (activation name, writes its input in place).
_ATEN: dict[str, tuple[str, bool]] = {
    "silu": ("silu", False), "silu_": ("silu", True), "hardswish": ("hardswish", False),
    "hardswish_": ("hardswish", True),
}
#: meta a new node inherits from the activation it replaces (same shape, same source line).
_INHERITED = ("nn_module_stack", "stack_trace", "val", "tensor_meta")


def _gated(gm: fx.GraphModule, node: fx.Node) -> tuple[str, bool] | None:
    """``(activation, in place)`` of a SiLU/HardSwish call on one tensor, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        name = _MODULES.get(type(m))
        return None if name is None else (name, bool(getattr(m, "inplace", False)))
    if node.op != "call_function":
        return None
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _ATEN.get(target_name(node))
    if node.target not in _FUNCTIONS:
        return None
    inplace = node.args[1] if len(node.args) > 1 else node.kwargs.get("inplace", False)
    return _FUNCTIONS[node.target], inplace is True


def _owner(node: fx.Node) -> str:
    """The name the activation's sites are named after: its module, else ``<owner>.<node>``."""
    if node.op == "call_module":
        return str(node.target)
    owner = node_owner(node)
    return f"{owner}.{node.name}" if owner else node.name


class DecomposeGatesPass(GraphPass):
    """Rewrite the profile's gated activations as ``gate_product(x, gate(x))`` (see the module doc)."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        target = config.target if config is not None else None
        self.activations = frozenset(get_profile(target).gated_activations()) if target is not None else frozenset()

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            found = _gated(gm, node) if self.activations else None
            if found is None or found[0] not in self.activations or not node.args:
                continue
            (activation, inplace), x = found, node.args[0]
            if not isinstance(x, fx.Node) or (inplace and len(x.users) > 1):
                continue
            _decompose(gm, node, x, activation)
            modified = True
        return finish(gm, modified)


def _decompose(gm: fx.GraphModule, node: fx.Node, x: fx.Node, activation: str) -> None:
    owner = _owner(node)
    inherited = {k: v for k, v in node.meta.items() if k in _INHERITED}
    with gm.graph.inserting_before(node):
        gate = gm.graph.call_function(GATES[activation][1], (x,))
        product = gm.graph.call_function(gate_product, (x, gate, activation))
    gate.meta.update(inherited, **{GATE: owner})
    product.meta.update(inherited)
    if node.op == "call_module":
        # the module's own settings (Override, exclude) govern both sites; a functional call keeps its stack
        gate.meta[OWNER] = product.meta[OWNER] = str(node.target)
    node.replace_all_uses_with(product)
    gm.graph.erase_node(node)

