"""Name the dynamo exporter's nodes and values the way the TorchScript exporter did.

torchlib names nodes ``node_<Op>_<n>`` and values after the FX nodes (``conv2d``, ``quant_dequant_6``);
the legacy exporter wrote ``/<Op>``, ``/<Op>_1`` and ``/<Op>_output_0``. The QDQ passes (and users who
diff two exports) treat names starting with ``/`` as made up by the exporter (``NameAfterSitesPass``
then names the ops next to each site after its module), so the raw dynamo export is renamed first::

    node_Conv_8 (out "conv2d")       =>  /Conv (out "/Conv_output_0")
    node_Conv_12 (out "conv2d_1")    =>  /Conv_1 (out "/Conv_1_output_0")

Graph inputs, outputs and initializers keep their names; so do nodes of the placeholder domain (their
outputs are renamed like any other).
"""

from __future__ import annotations

import onnx_ir as ir

from qtrim_fx.onnx._graph import NameScope

__all__ = ["LegacyNamesPass"]


class LegacyNamesPass(ir.passes.InPlacePass):
    """``node_<Op>_<n>`` -> ``/<Op>[_k]``; their outputs -> ``/<Op>[_k]_output_<i>``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in graph:
            if node.name and not node.name.startswith("node_"):
                continue
            node.name = names.node(f"/{node.op_type}")
            for i, out in enumerate(node.outputs):
                if not (out.is_graph_output() or out.is_graph_input() or out.is_initializer()):
                    out.name = names.value(f"{node.name}_output_{i}")
            modified = True
        return ir.passes.PassResult(model, modified)
