"""Walks over a normalized FX graph that site annotation is built on (analysis only, no graph edits).

:class:`~qtrim_fx.passes.prepare.annotate.AnnotateSitesPass` asks, for a node: does it depend on a
graph input (:func:`dynamic_nodes`), which module owns it (:func:`node_owner`), which parameter does it
view (:func:`param_source`, with the channel axis carried through by :func:`map_axis`), which tensor
feeds an attention operand (:func:`data_source`), what a chain of reshapes views
(:func:`through_views`), which nodes compute attention scores and stay float
(:func:`attention_float_region`), whether a value is quantized downstream anyway (:func:`covered`) and
which sites only reach the model's outputs (:func:`model_output_sites`).
``kind`` arguments map each node to its ``node.meta[OP_KIND]``
(see :class:`~qtrim_fx.passes.prepare.normalize.NormalizeOpsPass`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Mapping

import torch
import torch.fx as fx

from qtrim_fx.core.spec import OWNER

__all__ = [
    "VIEW_KINDS",
    "attention_float_region",
    "covered",
    "data_source",
    "dynamic_nodes",
    "map_axis",
    "model_output_sites",
    "node_owner",
    "param_source",
    "static_value",
    "through_views",
]

#: op kinds that pass a tensor's values through unchanged (a quantizer before or after them is the same)
VIEW_KINDS = frozenset({"reshape", "dropout"})
# op kinds that may sit between QKᵀ, softmax and P·V in an attention score computation
_SCORE = frozenset({"mul", "div", "add", "sub", "softmax", "dropout", "mask", "reshape"})


def dynamic_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that depend on a graph input (placeholders and everything computed from them).

    Args:
        graph: the FX graph.

    Returns:
        The set of those nodes; the rest are parameters, constants and what is computed only from them.
    """
    dyn: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dyn for a in n.all_input_nodes):
            dyn.add(n)
    return dyn


def node_owner(n: fx.Node) -> str | None:
    """The qualified name of the module ``n`` belongs to, or None.

    Args:
        n: an FX node.

    Returns:
        A ``call_module`` node's target, else the ``OWNER`` meta set by the front end, else the
        innermost entry of ``nn_module_stack``; None when none of these is known.
    """
    if n.op == "call_module":
        return str(n.target)
    if OWNER in n.meta:
        return n.meta[OWNER]
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or None
    return None


def param_source(
    n: object, params: Mapping[str, torch.Tensor], kind: Mapping[fx.Node, str], dynamic: set[fx.Node]
) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """Walk back through views to a parameter.

    Args:
        n: an op's operand (a node or any other argument).
        params: the model's parameters by qualified name.
        kind: op kind of every node.
        dynamic: the nodes that depend on a graph input (:func:`dynamic_nodes`).

    Returns:
        ``(get_attr node, first user on the path, path)``, the path running from the op's operand back
        towards the parameter; None when ``n`` is not a (view of a) parameter.
    """
    path: list[fx.Node] = []
    while isinstance(n, fx.Node):
        if n.op == "get_attr":
            if str(n.target) in params:
                return n, (path[-1] if path else None), path  # type: ignore[return-value]
            return None
        # a view whose only input-dependent arguments are sizes (``W.expand(x.shape[0], -1, -1)``) still views W
        if kind[n] != "reshape" or (n in dynamic and (not n.args or n.args[0] in dynamic)):
            return None
        path.append(n)
        n = n.args[0] if n.args else None
    return None


def data_source(n: object, kind: Mapping[fx.Node, str], is_tensor: Callable[[object], bool]) -> fx.Node | None:
    """Walk back from an attention operand through views and scalar scaling to its producer.

    Args:
        n: the operand.
        kind: op kind of every node.
        is_tensor: whether an argument is a tensor-valued node.

    Returns:
        The producing node, or None when ``n`` is not a node.
    """
    while isinstance(n, fx.Node):
        k = kind[n]
        if k in VIEW_KINDS and n.args:
            n = n.args[0]
            continue
        if k in ("mul", "div") and len(n.args) == 2 and sum(is_tensor(a) for a in n.args) == 1:
            n = next(a for a in n.args if is_tensor(a))
            continue
        break
    return n if isinstance(n, fx.Node) else None


def through_views(n: object, kind: Mapping[fx.Node, str]) -> object:
    """The tensor ``n`` is a view of, through single-reader reshapes/transposes.

    Args:
        n: a node (anything else is returned as is).
        kind: op kind of every node.

    Returns:
        The first node up the chain that is not a reshape of a tensor read by that reshape alone.
    """
    while (isinstance(n, fx.Node) and kind[n] == "reshape" and n.args and isinstance(n.args[0], fx.Node)
           and len(n.args[0].users) == 1):
        n = n.args[0]
    return n


def map_axis(axis: int | None, path: list[fx.Node], ndim: int) -> int | None:
    """Output-channel axis in the parameter's layout, given the view ops between it and the op.

    Args:
        axis: the channel axis in the layout the op sees (None: no channel axis).
        path: the view nodes from the op's operand back to the parameter (:func:`param_source`).
        ndim: the parameter's rank.

    Returns:
        The axis in the parameter's own layout, or None when a view on the path moves it in a way
        that cannot be followed (then the weight is quantized per tensor).
    """
    if axis is None:
        return None
    axis = axis % ndim if ndim else None
    for n in reversed(path):  # from the parameter towards the op
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name in ("t", "transpose", "permute", "movedim"):
            if ndim != 2:
                return None
            axis = 1 - axis  # type: ignore[operator]
        elif name not in ("getitem", "chunk", "split", "contiguous", "to", "type_as", "float", "detach"):
            return None
    return axis


def attention_float_region(graph: fx.Graph, kind: Mapping[fx.Node, str], weight_ops: set[fx.Node]) -> set[fx.Node]:
    """Softmax, the score ops before it back to QKᵀ, and the probabilities after it up to P·V.

    Args:
        graph: the FX graph.
        kind: op kind of every node.
        weight_ops: the ops that read a weight (a matmul with a weight is a projection, not QKᵀ).

    Returns:
        The nodes of every attention score computation, which stay in float.
    """
    region: set[fx.Node] = set()
    for sm in (n for n in graph.nodes if kind[n] == "softmax"):
        region.add(sm)
        back = [a for a in sm.all_input_nodes]
        while back:
            n = back.pop()
            k = kind[n]
            if n in region or (n.op != "call_function" and n.op != "call_method"):
                continue
            if k in ("matmul", "bmm", "baddbmm") and n not in weight_ops:
                region.add(n)  # QKᵀ itself; its operands are Q and K
            elif k in _SCORE and k != "softmax":
                region.add(n)
                back.extend(n.all_input_nodes)
        fwd = list(sm.users)
        while fwd:
            n = fwd.pop()
            if n not in region and kind[n] in _SCORE and kind[n] != "add":
                region.add(n)
                fwd.extend(n.users)
    return region


def covered(n: fx.Node, candidates: Container[fx.Node], kind: Mapping[fx.Node, str], depth: int = 0) -> bool:
    """Whether every path from ``n`` reaches an activation candidate through views, ReLU and max-pool.

    Args:
        n: the node (an op's output).
        candidates: the nodes already chosen as activation sites.
        kind: op kind of every node.
        depth: how far the walk has come (it gives up after 8 steps).

    Returns:
        True when ``n``'s value is quantized downstream anyway (so ``n`` needs no output site).
    """
    if n in candidates:
        return True
    users = list(n.users)
    if not users or depth > 8:
        return False
    return all(
        kind[u] in (*VIEW_KINDS, "relu", "maxpool") and u.op != "output" and covered(u, candidates, kind, depth + 1)
        for u in users
    )


def model_output_sites(sites: Collection[fx.Node], weighted_ops: Collection[fx.Node]) -> set[fx.Node]:
    """The activation sites whose value reaches no other site and no weighted op: only the model's outputs.

    Such a tensor feeds no integer kernel (a logits tensor, a head output through a softmax or a
    view): quantizing it only rounds (and may clip) what the user reads. Targets that run the last
    op in float leave it float, in training and in the file (see ``SiteSpec.model_output``).
    """
    stop = set(sites) | set(weighted_ops)
    out = set()
    for site in sites:
        seen: set[fx.Node] = set()
        todo = list(site.users)
        alone = bool(todo)
        while todo and alone:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in stop:
                alone = False
            elif n.op != "output":
                todo.extend(n.users)
        if alone:
            out.add(site)
    return out


def static_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """Evaluate ``node`` from the module's parameters and buffers alone (no graph input reaches it), under
    ``no_grad``; None when something on the way is not a plain call (a placeholder, a site module).

    Used for weights computed from parameters (a standardized or weight-normalized conv weight): their
    per-channel statistics are sized at prepare, and lowering stores their value as a constant.
    """
    from qtrim_fx.core.attrs import resolve_attr

    order, seen, stack = [], {node}, [node]
    while stack:
        n = stack.pop()
        order.append(n)
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for n in sorted(order, key=position.__getitem__):
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "get_attr":
                env[n] = resolve_attr(gm, str(n.target))
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                return None
    value = env[node]
    return value.detach() if isinstance(value, torch.Tensor) else None
