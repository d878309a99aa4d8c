"""DecomposeGeluPass: GELU as the primitives the exporters write below opset 20, so each gets a site.

ONNX has ``Gelu`` only from opset 20; below it the torch exporters write ``gelu(x)`` as ``Div(x, √2) ->
Erf -> Add(·, 1) -> Mul(x, ·) -> Mul(·, 0.5)`` (the tanh form: ``Pow -> Mul -> Add -> Mul -> Tanh -> Add ->
Mul -> Mul``). On an integer-only back end without ``Gelu`` (``npu``, opset 13) the tensors between those
ops are float tensors no site covers, and ``check`` reports every one of them (``float_op``). For a model
prepared for such a target (:meth:`~qtrim_fx.core.profiles.TargetProfile.decomposes_gelu`; ``qnn`` writes
one ``Gelu`` op instead) this pass writes the activation as the file will compute it::

    before:  y = call_module[blocks.0.act](x)                           (nn.GELU; or F.gelu / aten.gelu)

    after:   d = call_function[torch.div](x, 1.4142135623730951)        (runtime.ops.GELU_STEPS)
             e = call_function[torch.erf](d)
             a = call_function[torch.add](e, 1.0)
             m = call_function[torch.mul](x, a)
             y = call_function[gelu_product](m, x, "none")              meta OWNER = "blocks.0.act"

The profile's integer-site rules then put a site on each primitive's output (``blocks.0.act.erf`` ...) and
its ``("mul", "out")`` site on ``y`` (``blocks.0.act.out``, the name the activation's output had); the
constants are written as one exact code each by ``QuantizeScalarOperandsPass``, so every op sits in a
complete DQ -> op -> Q group. :func:`~qtrim_fx.runtime.ops.gelu_product` returns ``F.gelu(x)`` wherever
``m`` is the float one, so λ = 0 stays exact FP32; lowering writes it as ``torch.mul(m, 0.5)``
(``MultiplyGatesPass``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import OWNER
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import arg, target_name
from qtrim_fx.runtime.ops import GELU_STEPS, gelu_product

__all__ = ["DecomposeGeluPass"]

#: meta a new node inherits from the activation it replaces (same shape, same source line).
_INHERITED = ("nn_module_stack", "stack_trace", "val", "tensor_meta")


def _gelu(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ``approximate`` of a GELU call on one tensor (exact ``nn.GELU``, ``F.gelu``, ``aten.gelu``), else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return m.approximate if type(m) is nn.GELU and is_plain_module(m, nn.GELU) else None  # no hooks to drop
    if node.op != "call_function":
        return None
    aten = isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
    if not (node.target is F.gelu or (aten and target_name(node) == "gelu")):
        return None
    approximate = arg(node, 1, "approximate", "none")
    return approximate if approximate in GELU_STEPS else None


class DecomposeGeluPass(GraphPass):
    """Rewrite GELU as :data:`~qtrim_fx.runtime.ops.GELU_STEPS` and ``gelu_product`` (see the module doc)."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        target = config.target if config is not None else None
        self.enabled = target is not None and get_profile(target).decomposes_gelu()

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes) if self.enabled else []:
            approximate = _gelu(gm, node)
            x = node.args[0] if node.args else None
            if approximate is None or not isinstance(x, fx.Node):
                continue
            _decompose(gm, node, x, approximate)
            modified = True
        return finish(gm, modified)


def _decompose(gm: fx.GraphModule, node: fx.Node, x: fx.Node, approximate: str) -> None:
    inherited = {k: v for k, v in node.meta.items() if k in _INHERITED}
    new: list[fx.Node] = []
    with gm.graph.inserting_before(node):
        prev = x
        for fn, operands in GELU_STEPS[approximate]:
            prev = gm.graph.call_function(fn, tuple(x if o == "x" else prev if o == "prev" else o for o in operands))
            new.append(prev)
        product = gm.graph.call_function(gelu_product, (prev, x, approximate))
    for n in (*new, product):
        n.meta.update(inherited)
    if node.op == "call_module":
        # the module owns every primitive (its Override / exclude govern them; sites named <module>.<op>)
        module = str(node.target)
        stack = dict(node.meta.get("nn_module_stack") or {})
        stack[module] = (module, type(gm.get_submodule(module)))
        for n in new:
            n.meta["nn_module_stack"] = stack
        product.meta[OWNER] = module
    node.replace_all_uses_with(product)
    gm.graph.erase_node(node)
