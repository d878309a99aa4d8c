"""RequantizeViewsPass: a frozen Q/DQ after every view or max-pool of a quantized tensor (integer-only targets).

An integer-only back end (the QNN HTP) runs a Reshape / Transpose / MaxPool on integers only when it
sits in a DQ -> op -> Q group; between a site and the op that reads it, a chain of views is otherwise
a float island. Views and max-pool keep values on their input's grid, so a copy of the input's
``quant_dequant`` after each of them changes no value (exact, in torch and in ONNX)::

    before:  xq = quant_dequant(x, s, z, ...);  h = xq.unflatten(-1, (H, D));  t = h.transpose(1, 2);  q @ t
    after:   xq = quant_dequant(x, s, z, ...);  h = xq.unflatten(-1, (H, D));  hq = quant_dequant(h, s, z, ...)
             t = hq.transpose(1, 2);  tq = quant_dequant(t, s, z, ...);  q @ tq

Only per-tensor sites are followed; a view whose readers are all ``quant_dequant`` already is in a
group. :func:`qtrim_fx.lower` runs this pass for a model prepared for an integer-only target
(``prepare(..., target="qnn")``) and lowered for one: default-prepared models lower as before.
"""

from __future__ import annotations

import torch.fx as fx

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


def _per_tensor(q: fx.Node) -> bool:
    axis = q.args[5] if len(q.args) > 5 else q.kwargs.get("axis")
    return axis is None


def _name(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))


class RequantizeViewsPass(GraphPass):
    """Copy a per-tensor ``quant_dequant`` after each view / max-pool chain of its output (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        todo = [n for n in gm.graph.nodes if _is_qdq(n) and _per_tensor(n)]
        modified = False
        while todo:
            q = todo.pop()
            for u in list(q.users):
                new = self._requantize(gm, q, u, modules)
                if new is not None:
                    todo.append(new)
                    modified = True
        return finish(gm, modified)

    @staticmethod
    def _requantize(gm: fx.GraphModule, q: fx.Node, u: fx.Node, modules: dict) -> fx.Node | None:
        """A copy of ``q`` on ``u``'s output when ``u`` is a grid-keeping op reading ``q`` as its data input."""
        if u.op not in ("call_function", "call_method", "call_module") or not u.args or u.args[0] is not q:
            return None
        if op_kind(u, modules) not in _GRID_KEEPING or _name(u) in _TUPLES:
            return None
        if not u.users or all(_is_qdq(r) for r in u.users):
            return None
        args = list(q.args)
        args[0] = u
        if len(args) > _NAME_ARG:
            args[_NAME_ARG] = f"{args[_NAME_ARG]}.{u.name}"
        with gm.graph.inserting_after(u):
            new = gm.graph.call_function(q.target, tuple(args), dict(q.kwargs))
        u.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        return new
