"""qtrim_fx.tools.graph_view: the networkx view of a prepared graph and its DOT / SVG / HTML drawings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch.fx as fx
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.tools.graph_view import CATEGORIES, graph_to_networkx, to_dot, to_html, to_svg, write_graph

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def prepared():
    model, inputs = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [inputs])
    return qm


def test_networkx_mirrors_the_fx_graph(prepared):
    g = graph_to_networkx(prepared)
    nodes = list(prepared.graph.nodes)
    assert list(g.nodes) == [n.name for n in nodes]
    assert {(a.name, n.name) for n in nodes for a in n.all_input_nodes} == set(g.edges)
    assert nx.is_directed_acyclic_graph(g)
    assert g.nodes["conv2d"]["kind"] == "conv" and g.nodes["conv2d"]["category"] == "compute"
    assert g.nodes["x"]["category"] == "io" and g.nodes["conv1_weight"]["category"] == "parameter"


def test_site_nodes_carry_their_spec(prepared):
    g = graph_to_networkx(prepared)
    sites = {a["site"]: a for _, a in g.nodes(data=True) if a["site"]}
    specs = {spec.name: spec for spec, _, _ in qtrim_fx.iter_sites(prepared)}
    assert set(sites) == set(specs)
    for name, a in sites.items():
        assert a["category"] == f"{specs[name].kind}_site"
        assert a["site_role"] == specs[name].role and a["scheme"] == specs[name].scheme.describe()
        assert a["target"].startswith("qtrim_sites.")


def test_svg_layout_keeps_data_flowing_down(prepared):
    g = graph_to_networkx(prepared)
    root = ET.fromstring(to_svg(g))
    ys = {}
    for group in root.iter(f"{SVG_NS}g"):
        if group.get("id", "").startswith("n-"):
            ys[group.get("id")[2:]] = float(group.find(f"{SVG_NS}text").get("y"))
    assert set(ys) == set(g.nodes)
    assert all(ys[u] < ys[v] for u, v in g.edges)
    assert len(list(root.iter(f"{SVG_NS}path"))) >= g.number_of_edges()
    legend = next(el for el in root.iter(f"{SVG_NS}g") if el.get("class") == "legend")
    assert len([t for t in legend.iter(f"{SVG_NS}text")]) == len(CATEGORIES) + 1


def test_html_has_stats_columns_for_a_calibrated_model(prepared):
    page = to_html(graph_to_networkx(prepared), prepared)
    assert "<th>scale</th>" in page and "<th>clipped</th>" in page
    assert page.count('<tr class="weight">') == 3 and page.count('<tr class="activation">') == 6


def test_plain_graph_module_without_sites(tmp_path):
    model, _ = get_model("tiny_mlp")
    gm = fx.symbolic_trace(model)
    g = graph_to_networkx(gm)
    assert not any(a["site"] for _, a in g.nodes(data=True))
    for suffix in (".dot", ".svg", ".html"):
        assert write_graph(gm, tmp_path / f"g{suffix}").stat().st_size > 0
    assert "digraph" in to_dot(g)


def test_dot_escapes_names(prepared):
    dot = to_dot(graph_to_networkx(prepared))
    assert "\n  " in dot and '\\n' in dot  # one statement per line, labels use \n escapes
    assert all(line.count('"') % 2 == 0 for line in dot.splitlines())


def test_write_graph_refuses_unknown_format(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"\.dot, \.svg or \.html"):
        write_graph(prepared, tmp_path / "g.png")
