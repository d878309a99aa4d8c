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
A parameter or buffer operand of such an op (``x + self.pos_embed``) gets a site too, whatever the place,
and so does a model input it reads (no op before it would quantize it)::

    default:          x + pos_embed                               Add reads a float initializer
    target="qnn":     x + Q(pos_embed)                            DQ(uint8 codes) -> Add: integer
    target="qnn":     Q(input) - Q(self.mean)                     the model's first op: integer too

A BatchNorm that lowering folds into its conv is the conv's output; one it cannot fold (after a Concat of
convs, MixNet's mixed kernels) is written as ``BatchNormalization`` and gets its sites like LayerNorm::

    default:          bn = batch_norm(cat(...));  silu(bn)          BatchNormalization, Sigmoid, Mul in float
    target="qnn":     bn = Q(batch_norm(Q(cat(...))));  ...           integer

A ``pow`` gets its site only with a constant exponent (``x ** 3``, ``torch.pow(x, 2.0)``); the file writes
the exponent as one exact code (``DQ -> Pow(·, DQ(3)) -> Q``). A tensor exponent (``x ** y``, ``2 ** x``)
is left as it is::

    default:          y = x ** 3;  0.044715 * y                   Pow, Mul in float (GPT-2's gelu_new)
    target="qnn":     y = Q(x ** 3);  Q(0.044715 * y)             both integer

The rest — one site per tensor, shared by its readers; views of a quantized tensor share its grid —
is the analysis' own business (``add_candidate``, ``share_grid_preserving``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.fx as fx

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.passes.prepare.normalize import arg

__all__ = ["add_integer_sites", "site_rules"]

#: kinds whose first two arguments are both data inputs.
_BINARY = frozenset({"add", "sub", "mul", "div", "matmul", "bmm"})


class _Analysis(Protocol):  # the part of annotate's analysis this step uses
    gm: fx.GraphModule
    kind: dict[fx.Node, str]
    region: set[fx.Node]
    candidates: dict[fx.Node, object]
    weights: dict[fx.Node, object]
    dynamic: set[fx.Node]

    def add_candidate(self, n: object, role: str, consumer: str, owner: str | None,
                      static: bool = False) -> None: ...

    def weight_ops(self) -> set[fx.Node]: ...

    def is_weighted_output(self, n: object) -> bool: ...

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


def _constant_power(n: fx.Node) -> bool:
    """``n`` is a power of a tensor by a Python number (``x ** 3``, ``aten.pow.Tensor_Scalar``)."""
    exponent = arg(n, 1, "exponent")
    return (isinstance(arg(n, 0, "input"), fx.Node) and isinstance(exponent, (int, float))
            and not isinstance(exponent, bool))


def _fused_into_relu(a: _Analysis, n: fx.Node) -> bool:
    """Every reader of ``n`` is a quantized ReLU: back ends fuse ``op -> Relu -> Q`` into one group."""
    return bool(n.users) and all(a.kind[u] == "relu" and u in a.candidates for u in n.users)


def _static_operand(a: _Analysis, x: object, weights: set[fx.Node]) -> bool:
    """``x`` is a parameter or buffer (or a view of one computed without the inputs) of more than one value.

    One-value constants are left to the ONNX pass that writes them as one exact code
    (:mod:`qtrim_fx.onnx.quantize_scalar_operands`); parameters that are weight sites have their own.
    """
    if not isinstance(x, fx.Node) or x in a.dynamic or x in weights:
        return False
    root = x
    while root.op != "get_attr" and a.kind[root] == "reshape" and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    if root.op != "get_attr" or root in weights:
        return False
    value = _attr(a.gm, str(root.target))
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1
            and bool(torch.isfinite(value).all()))  # a -inf mask is not a grid's business


def _graph_input(a: _Analysis, x: object) -> fx.Node | None:
    """The model input ``x`` is (or a view of), else None: an ``"out"``-only rule relies on the op before an
    input to quantize it, and a model input has none (``x - self.mean`` as the model's first op)."""
    root = x
    while isinstance(root, fx.Node) and root.op != "placeholder" and a.kind[root] == "reshape" and root.args:
        root = root.args[0]
    return root if isinstance(root, fx.Node) and root.op == "placeholder" else None


def _attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def add_integer_sites(a: _Analysis, rules: dict[str, tuple[bool, bool]]) -> None:
    """Add the candidates ``rules`` ask for (see the module doc); weighted ops are left to their own rules.

    A parameter or buffer operand of an op ``rules`` names (``x + self.pos_embed``) gets a site whatever the
    place: the op is integer only when every input is dequantized, and the deployed codes are the trained ones.
    """
    if not rules:
        return
    weighted = a.weight_ops()
    weights = set(a.weights)
    for n in list(a.gm.graph.nodes):
        k = a.kind[n]
        if k not in rules or n in weighted or n in a.region or n.op not in ("call_function", "call_method",
                                                                            "call_module"):
            continue
        if k == "pow" and not _constant_power(n):
            continue
        if k == "batchnorm" and a.is_weighted_output(n):
            continue  # folded into its conv: deployed as the conv's output, which has its own rules
        inputs, output = rules[k]
        owner = a.owner(n)
        for x in _data_inputs(n, k):
            if _static_operand(a, x, weights):
                a.add_candidate(x, "input", k, owner, static=True)
            elif inputs:
                a.add_candidate(x, "input", k, owner)
            elif (graph_input := _graph_input(a, x)) is not None:  # no op before it quantizes it
                a.add_candidate(graph_input, "input", k, owner)
        if output and not _fused_into_relu(a, n):
            a.add_candidate(n, "input", k, owner)
