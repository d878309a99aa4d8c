"""DecomposeGroupNormPass: an affine GroupNorm as normalize -> ·γ -> +β, so each tensor gets a site.

The torch exporters write ``group_norm(x, G, γ, β)`` as ``Reshape -> InstanceNormalization(1, 0) -> Reshape
-> Mul(γ) -> Add(β)``. On an integer-only back end the tensors between those ops are float tensors no site
covers (``check``: ``float_op`` on the InstanceNormalization and the Mul) and the QNN HTP fails to finalize
the graph. For a model prepared for an integer-only target (``qnn``, ``npu``) this pass writes the layer
as the file will compute it::

    before:  y = call_module[g](x)                                   (nn.GroupNorm(G, C), affine)

    after:   n = call_function[F.group_norm](x, G, None, None, eps)  the normalized tensor: site g.group_norm
             w = call_function[torch.reshape](g.weight, (1, C, 1, 1)) γ as a parameter operand: site g.weight
             m = call_function[torch.mul](n, w)                      site g.mul
             b = call_function[torch.reshape](g.bias, (1, C, 1, 1))   β as a parameter operand: site g.bias
             y = call_function[torch.add](m, b)                      meta OWNER = "g": site g.out

The profile's integer-site rules put the sites (``("layernorm", "in+out")``, ``("mul", "out")``,
``("add", "out")``, parameter operands); the ONNX pass ``QuantizeInstanceNormPass`` writes the exporter's
InstanceNormalization with its constant scale and bias as exact codes and drops the identity ``Mul(·, 1)``
/ ``Add(·, 0)`` it adds, so the file is ``DQ -> InstanceNormalization -> Q`` and two integer ops.

Only plain ``nn.GroupNorm`` module calls and ``F.group_norm`` / ``aten.group_norm`` calls on ``get_attr``
parameters whose input rank is recorded are rewritten; anything else stays whole (and ``check`` names it). Values are the same up to
float rounding (torch's kernel folds γ into the normalization: ``x·(rstd·γ) + (β − μ·rstd·γ)``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.modules import is_plain_module
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import OWNER
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import arg
from qtrim_fx.passes.prepare.ranks import rank

__all__ = ["DecomposeGroupNormPass"]

_INHERITED = ("nn_module_stack", "stack_trace")


def _group_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int, str, str, float] | None:
    """``(x, groups, γ attr, β attr, eps)`` of an affine GroupNorm call, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if (not is_plain_module(m, nn.GroupNorm) or not m.affine or len(node.args) != 1 or node.kwargs
                or not isinstance(node.args[0], fx.Node)):
            return None
        return node.args[0], m.num_groups, f"{node.target}.weight", f"{node.target}.bias", m.eps
    if node.op != "call_function" or node.target not in (F.group_norm, torch.group_norm, torch.ops.aten.group_norm.default):
        return None
    x, groups = arg(node, 0, "input"), arg(node, 1, "num_groups")
    w, b, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)
    if not (isinstance(x, fx.Node) and isinstance(groups, int) and isinstance(eps, float)
            and all(isinstance(p, fx.Node) and p.op == "get_attr" for p in (w, b))):
        return None
    return x, groups, str(w.target), str(b.target), eps


class DecomposeGroupNormPass(GraphPass):
    """Rewrite affine GroupNorm as normalize, ``mul`` by γ, ``add`` β (see the module doc)."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        target = config.target if config is not None else None
        self.enabled = target is not None and get_profile(target).integer_only

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes) if self.enabled else []:
            found = _group_norm(gm, node)
            if found is None:
                continue
            x, groups, weight, bias, eps = found
            ndim = rank(x)
            if ndim is None or ndim < 2:
                continue
            gamma = resolve_attr(gm, weight)
            if not isinstance(gamma, torch.Tensor):
                continue
            channels = gamma.numel()
            shape = (1, channels) + (1,) * (ndim - 2)
            owner = str(node.target) if node.op == "call_module" else node.meta.get(OWNER)
            with gm.graph.inserting_before(node):
                norm = gm.graph.call_function(F.group_norm, (x, groups, None, None, eps))
                w = gm.graph.create_node("call_function", torch.reshape, (gm.graph.get_attr(weight), shape), name="weight")
                mul = gm.graph.call_function(torch.mul, (norm, w))
                b = gm.graph.create_node("call_function", torch.reshape, (gm.graph.get_attr(bias), shape), name="bias")
                out = gm.graph.call_function(torch.add, (mul, b))
            inherited = {k: v for k, v in node.meta.items() if k in _INHERITED}
            if node.op == "call_module":  # the module owns the primitives (sites named <module>.<op>)
                stack = dict(node.meta.get("nn_module_stack") or {})
                stack[owner] = (owner, type(gm.get_submodule(owner)))
                inherited["nn_module_stack"] = stack
            for n in (norm, w, mul, b, out):
                n.meta.update(inherited)
            for k in ("val", "tensor_meta"):
                if k in node.meta:
                    norm.meta[k] = mul.meta[k] = out.meta[k] = node.meta[k]
            if owner:
                out.meta[OWNER] = owner
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            modified = True
        return finish(gm, modified)
