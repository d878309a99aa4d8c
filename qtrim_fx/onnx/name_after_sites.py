"""Name the ops next to each quantization site after the PyTorch module they came from.

A lowered GraphModule calls ``F.conv2d`` & co. from its root, so the exporter names them by
position (``/Conv_3``). The Q/DQ nodes carry their site's name (``layer1.0.conv1.weight/
DequantizeLinear``); this pass gives the ops they feed or read the site's module path::

    layer1.0.conv1.weight/DequantizeLinear -> /Conv_3 (out "/Conv_3_output_0")
      =>  layer1.0.conv1.weight/DequantizeLinear -> layer1.0.conv1/Conv (out "layer1.0.conv1/Conv_output_0")

    /Relu_2 -> layer1.0.relu.out/QuantizeLinear   =>   layer1.0.relu/Relu -> layer1.0.relu.out/QuantizeLinear

Only output sites (``<module>.out``) name their producer; other activation sites (``x``,
``layer1.0.conv1.input``) do not say which module made the tensor.

A bias ``Add`` right after a weighted MatMul joins its module (``layer1.0.fc/Add``). Only names
the exporter made up (starting with ``/``, or ``onnx::`` for values) are replaced; graph inputs
and outputs keep theirs, so the pass is idempotent.
"""

from __future__ import annotations

import onnx_ir as ir

from qtrim_fx.onnx._graph import NameScope, const_array, is_op

__all__ = ["NameAfterSitesPass", "module_of_site"]

_DQ_SUFFIX = "/DequantizeLinear"
_Q_SUFFIX = "/QuantizeLinear"
_CLIP_SUFFIX = "/Clip"


def module_of_site(site: str) -> str:
    """``layer1.0.conv1.weight`` -> ``layer1.0.conv1``; ``layer1.0.relu.out`` -> ``layer1.0.relu``."""
    for suffix in (".weight", ".out"):
        if site.endswith(suffix) and len(site) > len(suffix):
            return site[: -len(suffix)]
    return site


def _is_made_up(name: str | None) -> bool:
    return not name or name.startswith("/")


def _is_made_up_value(value: ir.Value) -> bool:
    if value.is_graph_input() or value.is_graph_output() or value.is_initializer():
        return False
    return not value.name or value.name.startswith(("/", "onnx::"))


class NameAfterSitesPass(ir.passes.InPlacePass):
    """Rename exporter-named ops adjacent to Q/DQ sites to ``<module>/<OpType>``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameScope(model.graph)
        modified = False
        for node in list(model.graph):
            for target, module in _targets(node):
                modified |= _rename(target, module, names)
        return ir.passes.PassResult(model, modified)


def _targets(node: ir.Node) -> list[tuple[ir.Node, str]]:
    """(op to rename, module) pairs implied by one site node."""
    name = node.name or ""
    if is_op(node, "DequantizeLinear") and name.endswith(_DQ_SUFFIX) and const_array(node.inputs[0]) is not None:
        module = module_of_site(name[: -len(_DQ_SUFFIX)])
        users = [u for u, _ in node.outputs[0].uses()]
        return [(u, module) for u in users] + [(a, module) for u in users for a in _bias_adds(u)]
    for suffix in (_Q_SUFFIX, _CLIP_SUFFIX):
        site = name[: -len(suffix)] if name.endswith(suffix) else ""
        # Only an output site (``<module>.out``) says which module produced the tensor.
        if is_op(node, "QuantizeLinear", "Clip") and site.endswith(".out"):
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is not None and not is_op(producer, "Clip", "QuantizeLinear", "DequantizeLinear"):
                return [(producer, module_of_site(site))]
    return []


def _bias_adds(node: ir.Node) -> list[ir.Node]:
    if not is_op(node, "MatMul"):
        return []
    users = [u for u, _ in node.outputs[0].uses()]
    return [u for u in users if is_op(u, "Add") and any(const_array(v) is not None for v in u.inputs)]


def _rename(node: ir.Node, module: str, names: NameScope) -> bool:
    if not _is_made_up(node.name):
        return False
    node.name = names.node(f"{module}/{node.op_type}")
    for i, out in enumerate(node.outputs):
        if _is_made_up_value(out):
            out.name = names.value(f"{node.name}_output_{i}")
    return True
