"""The extra activation sites of a target-aware ``prepare``: a profile's ``activation_sites``, as candidates.

A step of :class:`~qtrim_fx.passes.prepare.annotate.AnnotateSitesPass` (analysis only), run when
``QuantConfig.target`` names a profile with ``activation_sites`` (``qnn``, ``npu``). Each
``(op kind, place)`` entry asks for a site on the data inputs (``"in"``), the output (``"out"``) or
both of every op of that kind, so that an integer-only back end finds each of them in a complete
DQ -> op -> Q group instead of running it in FLOAT_32 (or on its CPU)::

    default:          cat = torch.cat([Q(relu1), Q(relu2)]);  pool(cat) -> Q      Concat, pool in float
    target="qnn":     cat = Q(torch.cat([Q(relu1), Q(relu2)]));  pool(cat) -> Q  both integer

    default:          ln = layer_norm(x); Q(ln) -> fc1             LayerNorm reads a float tensor
    target="qnn":     ln = layer_norm(Q(x)); Q(ln) -> fc1          (x: the residual stream)

With ``integer_attention_scores`` the attention-score region is not kept float (the analysis then
finds no region) and QKᵀ, its scaling, the softmax and P·V get sites like any other op of their kind.
The rest — one site per tensor, shared by its readers; views of a quantized tensor share its grid —
is the analysis' own business (``add_candidate``, ``share_grid_preserving``).
"""

from __future__ import annotations

from typing import Protocol

import torch.fx as fx

from qtrim_fx.core.profiles import TargetProfile

__all__ = ["add_integer_sites", "site_rules"]

#: kinds whose first two arguments are both data inputs.
_BINARY = frozenset({"add", "sub", "mul", "div", "matmul", "bmm"})


class _Analysis(Protocol):  # the part of annotate's analysis this step uses
    gm: fx.GraphModule
    kind: dict[fx.Node, str]
    region: set[fx.Node]
    candidates: dict[fx.Node, object]

    def add_candidate(self, n: object, role: str, consumer: str, owner: str | None) -> None: ...

    def weight_ops(self) -> set[fx.Node]: ...

    @staticmethod
    def owner(n: fx.Node) -> str | None: ...


def site_rules(profile: TargetProfile | None) -> dict[str, tuple[bool, bool]]:
    """``op kind -> (inputs, output)`` from a profile's ``activation_sites`` (empty for ``None``)."""
    rules: dict[str, tuple[bool, bool]] = {}
    for kind, place in (profile.activation_sites if profile is not None else ()):
        old_in, old_out = rules.get(kind, (False, False))
        rules[kind] = (old_in or "in" in place.split("+"), old_out or "out" in place.split("+"))
    return rules


def _data_inputs(n: fx.Node, kind: str) -> list[object]:
    if kind == "cat":
        first = n.args[0] if n.args else n.kwargs.get("tensors", ())
        return list(first) if isinstance(first, (list, tuple)) else []
    if kind in _BINARY:
        return list(n.args[:2])
    return list(n.args[:1])


def _fused_into_relu(a: _Analysis, n: fx.Node) -> bool:
    """Every reader of ``n`` is a quantized ReLU: back ends fuse ``op -> Relu -> Q`` into one group."""
    return bool(n.users) and all(a.kind[u] == "relu" and u in a.candidates for u in n.users)


def add_integer_sites(a: _Analysis, rules: dict[str, tuple[bool, bool]]) -> None:
    """Add the candidates ``rules`` ask for (see the module doc); weighted ops are left to their own rules."""
    if not rules:
        return
    weighted = a.weight_ops()
    for n in list(a.gm.graph.nodes):
        k = a.kind[n]
        if k not in rules or n in weighted or n in a.region or n.op not in ("call_function", "call_method",
                                                                            "call_module"):
            continue
        inputs, output = rules[k]
        owner = a.owner(n)
        if inputs:
            for x in _data_inputs(n, k):
                a.add_candidate(x, "input", k, owner)
        if output and not _fused_into_relu(a, n):
            a.add_candidate(n, "input", k, owner)
