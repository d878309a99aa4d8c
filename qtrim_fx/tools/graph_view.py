"""Draw a prepared model's FX graph with its quantization sites highlighted (DOT, SVG, HTML).

    gm = qtrim_fx.prepare(model)
    write_graph(gm, "model.html")      # self-contained page: the SVG drawing + a table of the sites
    write_graph(gm, "model.svg")       # plain SVG, layered top to bottom, no graphviz needed
    write_graph(gm, "model.dot")       # Graphviz source (``dot -Tpng model.dot``)
    g = graph_to_networkx(gm)          # the same graph as a networkx.DiGraph, for your own analysis

Nodes are FX nodes, labelled with their name and normalized op kind (``node.meta["qtrim_op_kind"]``).
The observer + blend-quant site nodes inserted by ``prepare`` (``call_module qtrim_sites.<key>``) are
drawn as hexagons, weight sites in magenta, activation sites in orange; a legend explains every style.

This module renders; the networkx view, the node categories and the SVG layout (longest-path rows,
barycenter ordering, no graphviz needed) are in :mod:`qtrim_fx.tools.graph_layout`.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import torch.fx as fx

from qtrim_fx.tools.graph_layout import (
    CATEGORIES,
    LEGEND_W,
    MARGIN,
    NODE_H,
    NODE_W,
    ROW_PITCH,
    graph_to_networkx,
    layout,
)
from qtrim_fx.tools.graph_layout import SITE_PREFIX as SITE_PREFIX  # importable from here as before the split
from qtrim_fx.tools.sanitize import markup, printable

__all__ = ["CATEGORIES", "graph_to_networkx", "to_dot", "to_html", "to_svg", "write_graph"]


# --- DOT -----------------------------------------------------------------------------------------------


def _dot_str(s: str) -> str:
    # control characters (names come from the model) as \xNN; a newline stays one (a label's line break)
    s = printable(s, keep="\n")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_shape(shape: str) -> str:
    return {"note": "note", "hexagon": "hexagon", "ellipse": "ellipse"}.get(shape, "box")


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT source of a graph from :func:`graph_to_networkx`, with a legend cluster.

    Returns:
        The DOT text (render with ``dot -Tsvg file.dot``).
    """
    lines = [
        f"digraph {_dot_str(g.graph.get('name', 'graph'))} {{",
        "  rankdir=TB;",
        '  node [fontname="Helvetica", fontsize=10, style="filled"];',
        '  edge [color="#757575", arrowsize=0.6];',
    ]
    for n, a in g.nodes(data=True):
        st = CATEGORIES[a["category"]]
        extra = ', penwidth=2.2' if a["site"] else ""
        lines.append(
            f"  {_dot_str(n)} [label={_dot_str(a['label'] + chr(10) + a['detail'])}, shape={_dot_shape(st.shape)}, "
            f"fillcolor={_dot_str(st.fill)}, color={_dot_str(st.stroke)}, "
            f"tooltip={_dot_str(_tooltip(n, a))}{extra}];"
        )
    for u, v in g.edges():
        lines.append(f"  {_dot_str(u)} -> {_dot_str(v)};")
    lines += ["  subgraph cluster_legend {", '    label="legend"; fontname="Helvetica"; color="#bdbdbd";']
    keys = list(CATEGORIES)
    for key in keys:
        st = CATEGORIES[key]
        lines.append(
            f"    {_dot_str('qtrim_legend_' + key)} [label={_dot_str(st.label)}, shape={_dot_shape(st.shape)}, "
            f"fillcolor={_dot_str(st.fill)}, color={_dot_str(st.stroke)}];"
        )
    chain = " -> ".join(_dot_str("qtrim_legend_" + k) for k in keys)
    lines += [f"    {chain} [style=invis];", "  }", "}"]
    return "\n".join(lines) + "\n"


def _tooltip(name: str, a: dict) -> str:
    parts = [f"{name}: {a['op']} {a['target']}"]
    if a["kind"]:
        parts.append(f"op kind: {a['kind']}")
    if a["site"]:
        parts.append(f"site {a['site']} ({a['site_kind']}, {a['site_role']}): {a['scheme']}")
    return "\n".join(parts)


# --- SVG -----------------------------------------------------------------------------------------------


def _esc(s: str) -> str:
    # XML text or attribute: control characters (invalid in XML 1.0) as \xNN, then & < > " ' escaped
    return markup(s)


def _clip(s: str, n: int = 26) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _shape_svg(shape: str, x: float, y: float, w: float, h: float, fill: str, stroke: str, sw: float) -> str:
    common = f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"'
    if shape == "hexagon":
        d = 10
        pts = [(x - w / 2, y), (x - w / 2 + d, y - h / 2), (x + w / 2 - d, y - h / 2), (x + w / 2, y),
               (x + w / 2 - d, y + h / 2), (x - w / 2 + d, y + h / 2)]
        return f'<polygon points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in pts)}" {common}/>'
    if shape == "ellipse":
        return f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{w / 2:.1f}" ry="{h / 2:.1f}" {common}/>'
    dash = ' stroke-dasharray="4 2"' if shape == "note" else ""
    return (f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w}" height="{h}" rx="4" '
            f'{common}{dash}/>')


def _edge_svg(p: tuple[float, float], q: tuple[float, float], between: tuple[float, float] | None, k: int) -> str:
    """A data-flow edge; ``between`` is the x extent of the rows it spans (None for adjacent rows)."""
    (x1, y1), (x2, y2) = p, q
    if between is None:
        y1 += NODE_H / 2
        y2 -= NODE_H / 2 + 2
        c1, c2 = (x1, y1 + ROW_PITCH / 2), (x2, y2 - ROW_PITCH / 2)
    else:
        # A skip connection drawn straight would cross the nodes of the rows in between: leave the source
        # sideways, run down beside those rows and enter the target from the same side.
        lo, hi = between
        left = abs(x1 - lo) + abs(x2 - lo) <= abs(x1 - hi) + abs(x2 - hi)
        side = -1.0 if left else 1.0
        reach = NODE_W / 2 + 12 + 7 * (k % 4)
        bx = min(lo, x1, x2) - reach if left else max(hi, x1, x2) + reach
        x1, x2 = x1 + side * NODE_W / 2, x2 + side * (NODE_W / 2 + 2)
        c1, c2 = (bx, y1), (bx, y2)
    return (f'<path d="M{x1:.1f},{y1:.1f} C{c1[0]:.1f},{c1[1]:.1f} {c2[0]:.1f},{c2[1]:.1f} {x2:.1f},{y2:.1f}" '
            'class="edge" marker-end="url(#arrow)"/>')


def _edges_svg(g: nx.DiGraph, xy: dict[str, tuple[float, float]], rows: list[list[str]]) -> list[str]:
    row_of = {n: i for i, r in enumerate(rows) for n in r}
    extent = [(min(xy[n][0] for n in r), max(xy[n][0] for n in r)) for r in rows]
    out, k = [], 0
    for u, v in g.edges():
        a, b = row_of[u], row_of[v]
        between = None
        if b - a > 1:
            mid = extent[a + 1 : b]
            between = (min(e[0] for e in mid), max(e[1] for e in mid))
            k += 1
        out.append(_edge_svg(xy[u], xy[v], between, k))
    return out


def _legend_svg(x: float, y: float, counts: dict[str, int]) -> list[str]:
    out = [f'<g class="legend" transform="translate({x:.1f},{y:.1f})">',
           f'<rect x="0" y="0" width="{LEGEND_W}" height="{36 + 28 * len(CATEGORIES)}" fill="#fafafa" '
           'stroke="#bdbdbd"/>',
           '<text x="12" y="22" class="title">Legend</text>']
    for i, (key, st) in enumerate(CATEGORIES.items()):
        cy = 44 + 28 * i
        sw = 2.2 if key.endswith("_site") else 1.2
        out.append(_shape_svg(st.shape, 34, cy, 40, 18, st.fill, st.stroke, sw))
        out.append(f'<text x="62" y="{cy + 4}" class="legend-label">{_esc(st.label)} ({counts.get(key, 0)})</text>')
    out.append("</g>")
    return out


_SVG_STYLE = """
text { font-family: Helvetica, Arial, sans-serif; }
.name { font-size: 11px; fill: #212121; }
.site-name { font-size: 11px; font-weight: bold; fill: #212121; }
.detail { font-size: 9.5px; fill: #616161; }
.title { font-size: 13px; font-weight: bold; }
.legend-label { font-size: 11px; }
.edge { fill: none; stroke: #9e9e9e; stroke-width: 1.1; }
"""


def to_svg(g: nx.DiGraph) -> str:
    """A standalone SVG drawing of a graph from :func:`graph_to_networkx`, with a legend.

    Returns:
        The SVG text.
    """
    xy, rows, width, height = layout(g)
    counts: dict[str, int] = {}
    for _, a in g.nodes(data=True):
        counts[a["category"]] = counts.get(a["category"], 0) + 1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">',
        f"<style>{_SVG_STYLE}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9e9e9e"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        '<g class="edges">',
    ]
    out += _edges_svg(g, xy, rows)
    out.append('</g><g class="nodes">')
    for n, a in sorted(g.nodes(data=True), key=lambda t: t[1]["order"]):
        x, y = xy[n]
        st = CATEGORIES[a["category"]]
        is_site = a["site"] is not None
        cls = "site-name" if is_site else "name"
        out += [
            f'<g id="n-{_esc(n)}" class="node {a["category"]}">',
            f"<title>{_esc(_tooltip(n, a))}</title>",
            _shape_svg(st.shape, x, y, NODE_W, NODE_H, st.fill, st.stroke, 2.2 if is_site else 1.2),
            f'<text x="{x:.1f}" y="{y - 3:.1f}" text-anchor="middle" class="{cls}">{_esc(_clip(a["label"]))}</text>',
            f'<text x="{x:.1f}" y="{y + 11:.1f}" text-anchor="middle" class="detail">'
            f"{_esc(_clip(a['detail'], 30))}</text>",
            "</g>",
        ]
    out.append("</g>")
    out += _legend_svg(width - MARGIN - LEGEND_W, MARGIN, counts)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- HTML ----------------------------------------------------------------------------------------------

_HTML_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #212121; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #e0e0e0; padding: 4px 8px; text-align: left; }
th { background: #f5f5f5; }
tr.weight td:first-child { border-left: 4px solid #ad1457; }
tr.activation td:first-child { border-left: 4px solid #e65100; }
.graph { overflow: auto; border: 1px solid #e0e0e0; }
g.node:target polygon, g.node:target rect, g.node:target ellipse { stroke: #000; stroke-width: 4; }
code { background: #f5f5f5; padding: 1px 4px; }
"""


def _site_rows(gm: fx.GraphModule | None) -> dict[str, tuple[str, str, str]]:
    """Site name -> (scale, zero point, clipped) from :func:`qtrim_fx.inspect`, when it applies."""
    from qtrim_fx.runtime.prepared import is_prepared
    from qtrim_fx.tools.inspection import inspect

    if gm is None or not is_prepared(gm):
        return {}
    try:
        report = inspect(gm)
    except Exception:  # a drawing should not fail because statistics are odd
        return {}
    rng = lambda v, f: "-" if v is None else (f.format(v[0]) if v[0] == v[1] else f"{f.format(v[0])}..{f.format(v[1])}")  # noqa: E731
    return {r.name: (rng(r.scale, "{:.3g}"), rng(r.zero_point, "{}"),
                     "-" if r.clipped is None else f"{100 * r.clipped:.2f}%") for r in report.rows}


def to_html(g: nx.DiGraph, gm: fx.GraphModule | None = None, title: str | None = None) -> str:
    """A self-contained HTML page: the SVG drawing and a table of the sites (no external scripts or styles).

    Args:
        g: a graph from :func:`graph_to_networkx`.
        gm: the prepared model, to add scale / zero point / clipped columns from :func:`qtrim_fx.inspect`.
        title: page title (default: the graph's name).

    Returns:
        The HTML text.
    """
    title = title or f"qtrim graph: {g.graph.get('name', 'model')}"
    stats = _site_rows(gm)
    sites = [(n, a) for n, a in sorted(g.nodes(data=True), key=lambda t: t[1]["order"]) if a["site"]]
    head = ["#", "site", "kind", "role", "scheme", "module", "node", "consumers"]
    if stats:
        head += ["scale", "zero point", "clipped"]
    rows = []
    for i, (n, a) in enumerate(sites):
        consumers = ", ".join(sorted({g.nodes[s]["label"] for s in g.successors(n)}))
        cells = [str(i), f'<a href="#n-{_esc(n)}">{_esc(a["site"])}</a>', _esc(a["site_kind"]), _esc(a["site_role"]),
                 _esc(a["scheme"]), _esc(a["module"] or "-"), f"<code>{_esc(n)}</code>", _esc(consumers)]
        if stats:
            cells += [_esc(c) for c in stats.get(a["site"], ("-", "-", "-"))]
        rows.append(f'<tr class="{_esc(a["site_kind"])}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    n_w = sum(a["site_kind"] == "weight" for _, a in sites)
    summary = (f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges, {len(sites)} quantization sites "
               f"({n_w} weight, {len(sites) - n_w} activation). Hover a node for details; click a site name "
               "to outline it in the drawing.")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_HTML_STYLE}</style>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_esc(summary)}</p>",
        "<h2>Quantization sites</h2>",
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
        "<h2>Graph</h2>",
        '<div class="graph">',
        to_svg(g),
        "</div>",
        "</body></html>",
    ]) + "\n"


# --- files ---------------------------------------------------------------------------------------------

FORMATS = (".dot", ".gv", ".svg", ".html", ".htm")


def write_graph(gm: fx.GraphModule, path: str | os.PathLike[str]) -> Path:
    """Draw ``gm``'s graph into ``path``; the format follows the suffix.

    Args:
        gm: a ``torch.fx.GraphModule`` (a prepared model shows its sites highlighted).
        path: ``.dot``/``.gv`` (Graphviz source), ``.svg`` (drawing) or ``.html``/``.htm``
            (drawing + sites table, self-contained).

    Returns:
        The path written.

    The file is written atomically: a failed write leaves the previous file as it was.

    Raises:
        ValueError: the suffix is none of the above.
        OutputPathError: ``path`` is a directory, FIFO, device or read-only file (nothing written).
    """
    from qtrim_fx.core.fileio import write_text_atomically

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the graph format from {str(path)!r}: use a .dot, .svg or .html file name")
    g = graph_to_networkx(gm)
    if suffix in (".dot", ".gv"):
        text = to_dot(g)
    elif suffix == ".svg":
        text = to_svg(g)
    else:
        text = to_html(g, gm)
    write_text_atomically(path, text)
    return path
