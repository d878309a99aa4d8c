"""Write the dynamo exporter's spellings of pooling heads as the operators the TorchScript exporter wrote.

``torch.export`` decomposes ``adaptive_avg_pool2d(x, 1)`` into ``mean`` and ``flatten`` into ``view``, so
torchlib writes ``ReduceMean`` and ``Reshape`` where the legacy exporter wrote ``GlobalAveragePool`` and
``Flatten``. Runtimes fuse the latter with Q/DQ (ORT: QLinearGlobalAveragePool) and the target rules
check them, so the raw dynamo export is normalized before the QDQ passes::

    x (N, C, H, W) -> ReduceMean(axes=[-1, -2] or [2, 3], keepdims=1)  =>  x -> GlobalAveragePool
    x (N, C, 1, 1) -> Reshape(shape=[-1, C] or [0, C])                  =>  x -> Flatten(axis=1)

Only these exact forms (constant axes/shape, static trailing dims) are rewritten; the result is the
same tensor, so values keep their names, shapes and uses.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qtrim_fx.onnx._graph import const_array, is_op

__all__ = ["LegacyPoolingFormsPass"]


class LegacyPoolingFormsPass(ir.passes.InPlacePass):
    """ReduceMean over all spatial dims -> GlobalAveragePool; Reshape to (N, C*H*W) -> Flatten(axis=1)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            op = _global_pool(node) or _flatten(node)
            if op is None:
                continue
            new = ir.node(op[0], [node.inputs[0]], op[1], name=node.name)
            model.graph.insert_before(node, new)
            out, new_out = node.outputs[0], new.outputs[0]
            new_out.name, new_out.shape, new_out.type = out.name, out.shape, out.type
            out.name = f"{out.name}__legacy_form"
            out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _rank_and_shape(value: ir.Value | None) -> tuple[int, list[object]] | None:
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape]
    return len(dims), dims


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _global_pool(node: ir.Node) -> tuple[str, dict] | None:
    if not is_op(node, "ReduceMean") or len(node.inputs) != 2 or _int_attr(node, "keepdims", 1) != 1:
        return None
    known = _rank_and_shape(node.inputs[0])
    axes = const_array(node.inputs[1])
    if known is None or axes is None or known[0] < 3:
        return None
    rank = known[0]
    if sorted(int(a) % rank for a in axes.reshape(-1)) != list(range(2, rank)):
        return None
    return "GlobalAveragePool", {}


def _flatten(node: ir.Node) -> tuple[str, dict] | None:
    if not is_op(node, "Reshape") or len(node.inputs) != 2:
        return None
    known = _rank_and_shape(node.inputs[0])
    shape = const_array(node.inputs[1])
    if known is None or shape is None or shape.shape != (2,) or known[0] < 3:
        return None
    trailing = known[1][1:]
    first = -1 if _int_attr(node, "allowzero", 0) else (-1, 0)  # with allowzero, 0 means an empty dim
    if any(d is None for d in trailing) or int(shape[0]) not in (first if isinstance(first, tuple) else (first,)):
        return None
    if int(shape[1]) != math.prod(trailing):
        return None
    return "Flatten", {"axis": 1}
