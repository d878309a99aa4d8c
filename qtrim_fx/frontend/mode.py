"""train()/eval() as a runtime value of a captured graph.

Tracing runs the model's Python once, so every ``self.training`` it reads is
frozen into the graph as a constant: ``F.dropout(x, 0.1, True)``,
``F.scaled_dot_product_attention(..., dropout_p=0.1)``,
``aten.batch_norm(..., True, ...)``. Capture replaces each such constant by a
value read when the graph runs::

    mode = call_module[qtrim_mode]()                    # TrainingFlag: its own .training
    p    = call_function[mode_select](mode, 0.1, 0.0)   # 0.1 in train(), 0.0 in eval()
    y    = F.scaled_dot_product_attention(q, k, v, None, p)

``qtrim_mode`` is a submodule of the captured ``GraphModule``, so
``gm.train()`` / ``gm.eval()`` switch it like any other module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "MODE_ATTR",
    "ConstantDiff",
    "GraphMismatch",
    "TrainingFlag",
    "constant_diffs",
    "flag_node",
    "merge_mode_constants",
    "mode_select",
    "mode_value",
]

MODE_ATTR = "qtrim_mode"


class TrainingFlag(nn.Module):
    """Returns its own ``training`` flag (a Python bool); no parameters, no buffers."""

    def forward(self) -> bool:
        return self.training


def mode_select(training: bool, train_value: Any, eval_value: Any) -> Any:
    """``train_value`` in training mode, ``eval_value`` otherwise."""
    return train_value if training else eval_value


# -- graph helpers used by capture ------------------------------------------------------------------


class GraphMismatch(Exception):
    """Two traces of one model differ in structure, not only in constants (``nodes``: first differing pair)."""

    def __init__(self, nodes: tuple[fx.Node | None, fx.Node | None]) -> None:
        super().__init__("graphs differ in structure")
        self.nodes = nodes


@dataclass(frozen=True)
class ConstantDiff:
    node: fx.Node  # in the graph being kept
    path: tuple[Any, ...]  # ("args", 2) / ("kwargs", "dropout_p") / deeper into tuples
    value: Any  # in the kept graph
    other: Any  # in the other graph


def _has_node(x: Any) -> bool:
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return n

    fx.node.map_arg(x, visit)
    return found


def constant_diffs(kept: fx.Graph, other: fx.Graph) -> list[ConstantDiff]:
    """Where two traces of one model differ only by constant arguments.

    Raises:
        GraphMismatch: the graphs differ in ops, targets or data flow.
    """
    a_nodes, b_nodes = list(kept.nodes), list(other.nodes)
    a_index = {n: i for i, n in enumerate(a_nodes)}
    b_index = {n: i for i, n in enumerate(b_nodes)}
    diffs: list[ConstantDiff] = []
    for i in range(max(len(a_nodes), len(b_nodes))):
        a = a_nodes[i] if i < len(a_nodes) else None
        b = b_nodes[i] if i < len(b_nodes) else None
        if a is None or b is None or a.op != b.op or not _same_target(a.target, b.target):
            raise GraphMismatch((a, b))

        def walk(x: Any, y: Any, path: tuple, a: fx.Node = a, b: fx.Node = b) -> None:
            if isinstance(x, fx.Node) or isinstance(y, fx.Node):
                if not (isinstance(x, fx.Node) and isinstance(y, fx.Node) and a_index[x] == b_index[y]):
                    raise GraphMismatch((a, b))
            elif not (_has_node(x) or _has_node(y)):
                if not _equal(x, y):
                    diffs.append(ConstantDiff(a, path, x, y))
            elif isinstance(x, (tuple, list)) and type(x) is type(y) and len(x) == len(y):
                for j, (u, v) in enumerate(zip(x, y, strict=True)):
                    walk(u, v, (*path, j))
            elif isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
                for k in x:
                    walk(x[k], y[k], (*path, k))
            elif isinstance(x, slice) and isinstance(y, slice):  # x[:, :h] with h a node: same nodes, same constants
                for u, v in ((x.start, y.start), (x.stop, y.stop), (x.step, y.step)):
                    if isinstance(u, fx.Node) or isinstance(v, fx.Node):
                        walk(u, v, path)
                    elif not _equal(u, v):
                        raise GraphMismatch((a, b))  # a constant inside a slice differs: not merged
            else:  # containers of different shapes
                raise GraphMismatch((a, b))

        if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
            raise GraphMismatch((a, b))
        for j, (u, v) in enumerate(zip(a.args, b.args, strict=True)):
            walk(u, v, ("args", j))
        for k in a.kwargs:
            walk(a.kwargs[k], b.kwargs[k], ("kwargs", k))
    return diffs


def _equal(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if type(x) is not type(y):
        return False
    try:
        return bool(x == y)
    except Exception:  # objects whose == is not a plain bool (tensors, arrays): compare identity only
        return False


def _same_target(x: Any, y: Any) -> bool:
    return x is y or (isinstance(x, str) and x == y)


def flag_node(gm: fx.GraphModule) -> fx.Node:
    """The graph's ``qtrim_mode()`` node (added, with its :class:`TrainingFlag`, on first use).

    A new flag starts in the mode of ``gm`` itself (``gm.training``).
    """
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == MODE_ATTR:
            return n
    if not isinstance(getattr(gm, MODE_ATTR, None), TrainingFlag):
        gm.add_module(MODE_ATTR, TrainingFlag().train(gm.training))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    ctx = gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before(None)
    with ctx:
        node = gm.graph.call_module(MODE_ATTR, ())
    node.meta["val"] = gm.training
    return node


def mode_value(gm: fx.GraphModule, train_value: Any, eval_value: Any, before: fx.Node) -> Any:
    """A node (or the constant itself, when both agree) worth ``train_value`` in train(), ``eval_value`` in eval()."""
    if _equal(train_value, eval_value):
        return train_value
    flag = flag_node(gm)
    if train_value is True and eval_value is False:
        return flag
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(mode_select, (flag, train_value, eval_value))
    node.meta["val"] = train_value if gm.training else eval_value
    return node


def replace_at(node: fx.Node, path: tuple[Any, ...], value: Any) -> None:
    """Set the argument of ``node`` at ``path`` (as produced by :func:`constant_diffs`) to ``value``."""

    def put(x: Any, rest: tuple) -> Any:
        if not rest:
            return value
        key, rest = rest[0], rest[1:]
        if isinstance(x, dict):
            return {**x, key: put(x[key], rest)}
        items = list(x)
        items[key] = put(items[key], rest)
        return type(x)(items) if isinstance(x, tuple) else items

    where, rest = path[0], path[1:]
    if where == "args":
        node.args = put(tuple(node.args), rest)
    else:
        node.kwargs = put(dict(node.kwargs), rest)


def merge_mode_constants(gm: fx.GraphModule, diffs: list[ConstantDiff], kept_training: bool) -> None:
    """Replace every constant that differs between the train and eval traces by a :func:`mode_select`."""
    for d in diffs:
        train_value, eval_value = (d.value, d.other) if kept_training else (d.other, d.value)
        replace_at(d.node, d.path, mode_value(gm, train_value, eval_value, d.node))
