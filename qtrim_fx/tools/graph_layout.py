"""The drawable form of a prepared model's FX graph: node categories, the networkx view and the layout.

:func:`graph_to_networkx` turns an FX graph into a ``networkx.DiGraph`` whose nodes carry what a
drawing needs (category, label, site details); :data:`CATEGORIES` says how each category is drawn;
:func:`layout` places the nodes for :mod:`qtrim_fx.tools.graph_view`, which renders DOT, SVG and HTML.

Each node's row is its longest-path depth from the inputs (parameter chains are pulled down next to
the op that reads them), and the order within a row comes from a few barycenter sweeps, which keeps
the main data path straight and crossings few.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from qtrim_fx.core.spec import OP_KIND, SITE_NODE

__all__ = [
    "CATEGORIES",
    "COL_PITCH",
    "GUTTER",
    "LEGEND_W",
    "MARGIN",
    "NODE_H",
    "NODE_W",
    "ROW_PITCH",
    "SITE_PREFIX",
    "NodeStyle",
    "graph_to_networkx",
    "layout",
]

SITE_PREFIX = "qtrim_sites."


@dataclass(frozen=True)
class NodeStyle:
    """How one node category is drawn: legend label, fill and stroke colours, shape."""

    label: str
    fill: str
    stroke: str
    shape: str  # "box", "hexagon", "ellipse", "note"


#: node category -> how it is drawn (legend order)
CATEGORIES: dict[str, NodeStyle] = {
    "weight_site": NodeStyle("weight site (observer + blend-quant)", "#f8bbd0", "#ad1457", "hexagon"),
    "activation_site": NodeStyle("activation site (observer + blend-quant)", "#ffe0b2", "#e65100", "hexagon"),
    "compute": NodeStyle("conv / linear / matmul", "#bbdefb", "#1565c0", "box"),
    "op": NodeStyle("other op", "#ffffff", "#616161", "box"),
    "parameter": NodeStyle("parameter / buffer (get_attr)", "#f5f5f5", "#9e9e9e", "note"),
    "io": NodeStyle("graph input / output", "#c8e6c9", "#2e7d32", "ellipse"),
}
_COMPUTE = {"conv", "conv_transpose", "linear", "matmul", "bmm", "einsum", "sdpa", "mha", "baddbmm"}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def _category(node: fx.Node, kind: str) -> str:
    spec = node.meta.get(SITE_NODE)
    if node.op == "call_module" and str(node.target).startswith(SITE_PREFIX):
        return "weight_site" if spec is not None and spec.kind == "weight" else "activation_site"
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "get_attr":
        return "parameter"
    return "compute" if kind in _COMPUTE else "op"


def graph_to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The FX graph of ``gm`` as a ``networkx.DiGraph`` (one node per FX node, edges data flow).

    Args:
        gm: a ``torch.fx.GraphModule``, usually one returned by :func:`qtrim_fx.prepare`.

    Returns:
        A DiGraph keyed by FX node name. Node attributes: ``op`` (FX op), ``target`` (str), ``kind``
        (normalized op kind, ``""`` when unknown), ``category`` (a key of :data:`CATEGORIES`),
        ``label``, ``order`` (position in the FX graph), ``site`` (the site's name, or None),
        ``site_kind``, ``site_role``, ``scheme`` and ``module`` (None unless a site node).
        Graph attribute ``name``: the module's class name.
    """
    g = nx.DiGraph(name=type(gm).__name__)
    for i, node in enumerate(gm.graph.nodes):
        kind = str(node.meta.get(OP_KIND) or "")
        spec = node.meta.get(SITE_NODE)
        category = _category(node, kind)
        site = spec.name if spec is not None and category.endswith("_site") else None
        if site is not None:
            detail = f"{spec.kind} site, {spec.role}"
        elif node.op == "get_attr":
            detail = _target_name(node)
        elif node.op in ("placeholder", "output"):
            detail = node.op
        else:
            detail = kind if kind and kind not in ("other", "module") else _target_name(node)
        g.add_node(
            node.name,
            op=node.op,
            target=_target_name(node),
            kind=kind,
            category=category,
            label=site or node.name,
            detail=detail,
            order=i,
            site=site,
            site_kind=spec.kind if site else None,
            site_role=spec.role if site else None,
            scheme=spec.scheme.describe() if site else None,
            module=spec.module if site else None,
        )
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


# --- layout --------------------------------------------------------------------------------------------

NODE_W, NODE_H = 168, 38  # node box
COL_PITCH, ROW_PITCH = 188, 64  # column and row pitch
MARGIN = 24
LEGEND_W = 300
GUTTER = 56  # room left and right of the node columns for skip connections


def _layers(g: nx.DiGraph) -> dict[str, int]:
    order = list(nx.topological_sort(g))
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = max((depth[p] + 1 for p in g.predecessors(n)), default=0)
    # Nodes that do not depend on a graph input (parameters and what is computed only from them, such as
    # BN fold factors and weight sites) sit right above their first reader instead of all in row 0.
    data = set()
    for n in order:
        if g.nodes[n]["op"] == "placeholder" or any(p in data for p in g.predecessors(n)):
            data.add(n)
    for n in reversed(order):
        succ = list(g.successors(n))
        if n not in data and succ:
            depth[n] = max(depth[n], min(depth[s] for s in succ) - 1)
    return depth


def _order_rows(g: nx.DiGraph, depth: dict[str, int]) -> list[list[str]]:
    rows: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["order"]):
        rows[depth[n]].append(n)
    pos = {n: i - (len(r) - 1) / 2 for r in rows for i, n in enumerate(r)}

    def sweep(rows_seq: Iterable[list[str]], neighbours) -> None:
        for r in rows_seq:
            def key(n: str, r=r) -> tuple[float, int]:
                nb = [pos[m] for m in neighbours(n)]
                return (sum(nb) / len(nb) if nb else pos[n], g.nodes[n]["order"])

            r.sort(key=key)
            for i, n in enumerate(r):
                pos[n] = i - (len(r) - 1) / 2

    for _ in range(2):
        sweep(rows, g.predecessors)
        sweep(reversed(rows), g.successors)
    sweep(rows, g.predecessors)
    return rows


def layout(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], list[list[str]], float, float]:
    """Where every node of ``g`` goes (see the module doc), in SVG user units.

    Args:
        g: a graph from :func:`graph_to_networkx`.

    Returns:
        ``(xy, rows, width, height)``: each node's centre, the node names of each row top to bottom,
        and the drawing's size including the legend column on the right.
    """
    if g.number_of_nodes() == 0:
        return {}, [], 2 * MARGIN + LEGEND_W, 2 * MARGIN
    rows = _order_rows(g, _layers(g))
    graph_w = max(len(r) for r in rows) * COL_PITCH
    xy = {}
    for y, r in enumerate(rows):
        for i, n in enumerate(r):
            x = MARGIN + GUTTER + graph_w / 2 + (i - (len(r) - 1) / 2) * COL_PITCH
            xy[n] = (x, MARGIN + y * ROW_PITCH + NODE_H / 2)
    total_w = MARGIN * 3 + 2 * GUTTER + graph_w + LEGEND_W
    total_h = MARGIN * 2 + len(rows) * ROW_PITCH
    return xy, rows, total_w, max(total_h, MARGIN * 2 + 40 + 28 * len(CATEGORIES))
