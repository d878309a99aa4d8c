"""RequantizeViewsPass: a frozen Q/DQ after every view or max-pool of a quantized tensor (integer-only targets).

An integer-only back end (the QNN HTP) runs a Reshape / Transpose / MaxPool on integers only when it
sits in a DQ -> op -> Q group; between a site and the op that reads it, a chain of views is otherwise
a float island. Views and max-pool keep values on their input's grid, so a copy of the input's
``quant_dequant`` after each of them changes no value (exact, in torch and in ONNX)::

    before:  xq = quant_dequant(x, s, z, ...);  h = xq.unflatten(-1, (H, D));  t = h.transpose(1, 2);  q @ t
    after:   xq = quant_dequant(x, s, z, ...);  h = xq.unflatten(-1, (H, D));  hq = quant_dequant(h, s, z, ...)
             t = hq.transpose(1, 2);  tq = quant_dequant(t, s, z, ...);  q @ tq

A site that reads a view chain of an op's output, the op having no other reader (GPT-2's ``Conv1D``: ``addmm ->
view -> dropout -> site``), is copied back onto that output too, so the op ends in its own Q (exact: the chain
keeps the grid)::

    before:  y = addmm(b, x, W);  v = y.view(B, T, C);  vq = quant_dequant(v, s, z, ...)
    after:   y = addmm(b, x, W);  yq = quant_dequant(y, s, z, ...);  v = yq.view(B, T, C);  vq = ...

A view returning a tuple (``split``, ``chunk``, ``unbind``; GPT-2's q/k/v ``split``) gets the copy on each of
its ``getitem`` readers; a max-pool returning ``(values, indices)`` on its values only (the indices are integers). Only per-tensor sites are followed; a view whose readers are all ``quant_dequant`` already is in a
group; a weight's quantizer is not followed (the exporter folds views of a constant into its initializer).
:func:`qtrim_fx.lower` runs this pass for a model prepared for an integer-only target
(``prepare(..., target="qnn")``) and lowered for one: default-prepared models lower as before.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qtrim_fx.core.spec import SITE_NODE
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.passes.prepare.normalize import op_kind
from qtrim_fx.runtime.qdq import is_quant_dequant

__all__ = ["RequantizeViewsPass"]

#: kinds that move or select values of one input (max-pool: picks them) without changing them.
_GRID_KEEPING = ("reshape", "maxpool", "dropout")
#: view-kind calls returning a tuple; their ``getitem`` readers are the tensors.
_TUPLES = frozenset({"chunk", "split", "split_with_sizes", "unbind", "tensor_split"})
_NAME_ARG = 8


def _is_qdq(n: fx.Node) -> bool:
    return n.op == "call_function" and is_quant_dequant(n.target)


def _weight_quantizer(q: fx.Node) -> bool:
    """``q`` is the quantizer of a weight site (LowerSitesPass keeps the site's spec on it)."""
    spec = q.meta.get(SITE_NODE)
    return getattr(spec, "kind", None) == "weight"


def _per_tensor(q: fx.Node) -> bool:
    axis = q.args[5] if len(q.args) > 5 else q.kwargs.get("axis")
    return axis is None


def _name(n: fx.Node) -> str:
    """``split`` for ``Tensor.split``, ``torch.split`` and ``aten.split.Tensor`` (an ATen overload's ``__name__``
    is ``split.Tensor``)."""
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    return name.split(".")[0]


class RequantizeViewsPass(GraphPass):
    """Copy a per-tensor ``quant_dequant`` after each view / max-pool chain of its output (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        # A weight's quantizer is left alone: the exporter folds a view of it into the initializer
        # (FoldWeightLayoutPass: ``DQ(W) -> Transpose`` becomes ``DQ(W.T)``), and a copy would write the weight's
        # signed grid as an activation (BoTNet's ``q @ rel.T`` on ``qnn``). A parameter quantized as an activation
        # (a position embedding added to activations) is followed as before.
        todo = [n for n in gm.graph.nodes if _is_qdq(n) and _per_tensor(n) and not _weight_quantizer(n)]
        back = [new for q in todo if (new := _copy_before_views(gm, q, modules)) is not None]
        todo += back
        modified = bool(back)
        while todo:
            q = todo.pop()
            for u in list(q.users):
                new = self._requantize(gm, q, u, modules)
                todo += new
                modified |= bool(new)
        return finish(gm, modified)

    @staticmethod
    def _requantize(gm: fx.GraphModule, q: fx.Node, u: fx.Node, modules: dict) -> list[fx.Node]:
        """Copies of ``q`` on ``u``'s output (on each ``getitem`` of it when ``u`` returns a tuple) when ``u`` is a
        grid-keeping op reading ``q`` as its data input."""
        if u.op not in ("call_function", "call_method", "call_module") or not u.args or u.args[0] is not q:
            return []
        if op_kind(u, modules) not in _GRID_KEEPING or not _float_output(u):
            return []
        indices = _returns_indices(u, modules)
        if _name(u) not in _TUPLES and not indices:
            new = _copy_after(gm, q, u)
            return [] if new is None else [new]
        items = list(u.users)
        if not all(i.op == "call_function" and i.target is operator.getitem for i in items):
            return []
        # a max-pool's indices (item 1) are integers, never on the grid
        values = [i for i in items if (i.args[1] == 0 if indices else _float_output(i))]
        return [new for i in values if (new := _copy_after(gm, q, i)) is not None]


def _returns_indices(u: fx.Node, modules: dict) -> bool:
    """``u`` returns ``(values, indices)``: ``max_pool*d(..., return_indices=True)`` (module or function, whose
    traced target is ``max_pool*d_with_indices``; ATen's ``max_pool2d_with_indices``)."""
    if u.op == "call_module":
        return bool(getattr(modules.get(str(u.target)), "return_indices", False))
    return _name(u).endswith("_with_indices") or bool(u.kwargs.get("return_indices", False))


def _float_output(n: fx.Node) -> bool:
    """``n`` yields floats: not a cast to an integer or bool dtype (``x.to(torch.long)`` is a "view" kind, but a
    quantizer on its output would quantize integers; T5's relative-position buckets)."""
    val = n.meta.get("val", n.meta.get("tensor_meta"))
    dtype = getattr(val, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return all(a.is_floating_point for a in (*n.args[1:], *n.kwargs.values()) if isinstance(a, torch.dtype))


def _copy_after(gm: fx.GraphModule, q: fx.Node, u: fx.Node, params: list | None = None) -> fx.Node | None:
    """A copy of ``q`` reading ``u``, which ``u``'s readers now read (none when they all are ``quant_dequant``)."""
    if not u.users or all(_is_qdq(r) for r in u.users):
        return None
    args = [u, *(q.args[1:] if params is None else params)]
    if len(args) > _NAME_ARG:
        args[_NAME_ARG] = f"{args[_NAME_ARG]}.{u.name}"
    with gm.graph.inserting_after(u):
        new = gm.graph.call_function(q.target, tuple(args), dict(q.kwargs))
    u.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _copy_before_views(gm: fx.GraphModule, q: fx.Node, modules: dict) -> fx.Node | None:
    """A copy of ``q`` on the output of the op that a chain of single-reader views leads back from ``q`` to."""
    v, chain = q.args[0], 0
    while (isinstance(v, fx.Node) and v.op in ("call_function", "call_method", "call_module") and len(v.users) == 1
           and v.target is not operator.getitem and op_kind(v, modules) in _GRID_KEEPING and _name(v) not in _TUPLES
           and v.args and isinstance(v.args[0], fx.Node)):
        v, chain = v.args[0], chain + 1
    if not chain or v.op not in ("call_function", "call_method", "call_module") or _is_qdq(v) or len(v.users) != 1:
        return None
    val = v.meta.get("val")
    if v.target is operator.getitem or not (isinstance(val, torch.Tensor) and val.is_floating_point()):
        return None  # a tuple's item or a value of unknown type: leave it
    if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in q.args[1:]):
        return None
    with gm.graph.inserting_before(v):  # the qparams' get_attr nodes sit before q, maybe after v: read them again
        params = [gm.graph.get_attr(a.target) if isinstance(a, fx.Node) else a for a in q.args[1:]]
    return _copy_after(gm, q, v, params)
