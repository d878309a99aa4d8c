"""LowerSitesPass: apply the lowering plan — observer + blend-quant sites -> frozen ``quant_dequant`` calls.

Reads the :class:`~qtrim_fx.core.spec.LoweredSite` that ``PlanLoweringPass`` recorded on every
site node and only edits::

    before:  yq = call_module[qtrim_sites.layer1_0_relu_out](y)          (observes, blends by λ)
    after:   s  = get_attr[qtrim_qparams.layer1_0_relu_out_scale]
             z  = get_attr[qtrim_qparams.layer1_0_relu_out_zero_point]
             yq = quant_dequant(y, s, z, 0, 255, None, 8, False, "layer1.0.relu.out")

A site whose record says ``kept=False`` is removed (its tensor stays float).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from qtrim_fx.core.errors import UncalibratedSitesError
from qtrim_fx.core.modules import is_parametrized_attr
from qtrim_fx.core.spec import LOWER_PLAN, SITE_NODE, LoweredSite, SiteSpec
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.lower.plan import site_nodes
from qtrim_fx.passes.prepare.graph_walks import static_value
from qtrim_fx.runtime.qdq import quant_dequant

__all__ = ["QPARAMS_ATTR", "LowerSitesPass", "UncalibratedSitesError"]

QPARAMS_ATTR = "qtrim_qparams"


class LowerSitesPass(GraphPass):
    """Replace every planned site by its frozen quantize-dequantize, or drop it (see module doc)."""

    def requires(self, gm: fx.GraphModule) -> None:
        unplanned = [n.meta[SITE_NODE].name for n in site_nodes(gm) if LOWER_PLAN not in n.meta]
        if unplanned:
            raise self.fail(f"{len(unplanned)} site(s) have no lowering plan ({', '.join(unplanned[:4])}); "
                            "run PlanLoweringPass(profile) first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = site_nodes(gm)
        if sites and not hasattr(gm, QPARAMS_ATTR):
            gm.add_module(QPARAMS_ATTR, nn.Module())
        for node in sites:
            _apply(gm, node, node.meta[SITE_NODE], node.meta[LOWER_PLAN])
        if sites:
            gm.delete_all_unused_submodules()
        return finish(gm, bool(sites))


def _apply(gm: fx.GraphModule, node: fx.Node, spec: SiteSpec, plan: LoweredSite) -> None:
    x = node.args[0]
    if not plan.kept:
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return
    holder = getattr(gm, QPARAMS_ATTR)
    scheme = plan.scheme
    holder.register_buffer(f"{spec.key}_scale", plan.scale.clone())
    holder.register_buffer(f"{spec.key}_zero_point", plan.zero_point.clone())
    if spec.kind == "weight" and spec.param is None and isinstance(x, fx.Node) and (
            x.op != "get_attr" or is_parametrized_attr(gm, str(x.target))):
        x = _frozen_weight(gm, node, x, spec)
    with gm.graph.inserting_before(node):
        s = gm.graph.get_attr(f"{QPARAMS_ATTR}.{spec.key}_scale")
        z = gm.graph.get_attr(f"{QPARAMS_ATTR}.{spec.key}_zero_point")
        q = gm.graph.call_function(
            quant_dequant, (x, s, z, scheme.qmin, scheme.qmax, plan.axis, scheme.bits, scheme.signed, spec.name))
    q.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
    q.meta[SITE_NODE] = spec
    node.replace_all_uses_with(q)
    gm.graph.erase_node(node)


def _frozen_weight(gm: fx.GraphModule, site: fx.Node, x: fx.Node, spec: SiteSpec) -> fx.Node:
    """A weight computed from parameters (standardized, weight-normalized) as a constant buffer: deployed
    weights are constants, and the file must hold them as integer initializers, not as float ops."""
    value = static_value(gm, x)
    if value is None:
        return x
    getattr(gm, QPARAMS_ATTR).register_buffer(f"{spec.key}_weight", value.clone())
    with gm.graph.inserting_before(site):
        frozen = gm.graph.get_attr(f"{QPARAMS_ATTR}.{spec.key}_weight")
    site.replace_input_with(x, frozen)
    _erase_unused(gm, x)
    return frozen


def _erase_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and then its inputs while nothing reads them (the computation a frozen weight replaced)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output"):
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        stack.extend(inputs)
