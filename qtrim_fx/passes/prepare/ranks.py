"""Tensor ranks of a captured graph, from the example inputs (analysis only; ``node.meta[RANK]``).

Some export forms depend on a tensor's rank: ``F.linear`` on a 2-D input is written as ONNX ``Gemm``,
on a 3-D or wider one as ``MatMul`` (+ ``Add``), and a profile may want different weight grids for the
two (``TargetProfile.matmul_weights_per_tensor``). Symbolic tracing records no shapes, so
:func:`record_ranks` runs the graph once on fake tensors (no arithmetic, no parameter, buffer or
RNG state touched) and keeps only each tensor's rank::

    x = placeholder                 meta[RANK] = 3   (batch, tokens, features)
    fc1 = call_module[blocks.0.mlp.fc1](x)           -> MatMul (per-tensor weight on qnn)
    head = call_module[head](cls)   cls: meta[RANK] = 2   -> Gemm (per-channel)

A graph that cannot run on fake tensors gets no ranks (:func:`rank` answers ``None``: unknown), never an error.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx

__all__ = ["FLOATING", "LAST_DIM", "RANK", "last_dim", "rank", "record_ranks"]

#: ``node.meta`` key of a tensor node's rank (``int``).
RANK = "qtrim_rank"
#: ``node.meta`` key: whether a tensor node holds floating-point values (``bool``; recorded with the rank).
FLOATING = "qtrim_floating"
#: ``node.meta`` key: the size of a tensor node's last dimension on the example inputs (``int``; an attention
#: head's width, which sets its score scale).
LAST_DIM = "qtrim_last_dim"


class _RankInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta[RANK] = out.dim()
            n.meta[FLOATING] = out.is_floating_point()
            if out.dim() and isinstance(out.shape[-1], int):
                n.meta[LAST_DIM] = int(out.shape[-1])
        elif isinstance(out, (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
            # A Python number (shape arithmetic: ``1 / math.sqrt(x.shape[-1])``): not a tensor, never a site.
            n.meta[FLOATING] = False
        return out


class _Holder(torch.nn.Module):
    """``gm`` as a submodule, so ``functional_call`` can swap its state while the interpreter runs it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _RankInterpreter(self.gm).run(*args)


def record_ranks(gm: fx.GraphModule, example_inputs: Any) -> bool:
    """Write ``meta[RANK]`` on every tensor node of ``gm`` (one fake-tensor run); ``False`` if it cannot run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(v: Any) -> Any:
        return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v

    try:
        with warnings.catch_warnings(), mode, torch.no_grad():
            warnings.simplefilter("ignore")
            if isinstance(example_inputs, dict):
                names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
                args = [fake(example_inputs[k]) if k in example_inputs else None for k in names]
            else:
                args = [fake(v) for v in example_inputs]
            # fake parameters and buffers too: a train-mode BatchNorm updates its running statistics in place
            holder = _Holder(gm)
            state = {k: fake(v) for k, v in (*holder.named_parameters(remove_duplicate=False),
                                             *holder.named_buffers(remove_duplicate=False))}
            torch.func.functional_call(holder, state, tuple(args))
    except Exception:  # ranks are an optimisation hint: unknown is a valid answer
        for n in gm.graph.nodes:
            n.meta.pop(RANK, None)
            n.meta.pop(FLOATING, None)
            n.meta.pop(LAST_DIM, None)
        return False
    return True


def rank(n: object) -> int | None:
    """The rank of a tensor node: ``meta[RANK]``, else the shape of a ``torch.export`` ``meta["val"]``."""
    if not isinstance(n, fx.Node):
        return None
    if RANK in n.meta:
        return int(n.meta[RANK])
    val = n.meta.get("val")
    shape = getattr(val, "shape", None)
    return len(shape) if shape is not None and not isinstance(val, (tuple, list)) else None


def last_dim(n: object) -> int | None:
    """The size of a tensor node's last dimension: ``meta[LAST_DIM]``, else a static one of ``meta["val"]``."""
    if not isinstance(n, fx.Node):
        return None
    if LAST_DIM in n.meta:
        return int(n.meta[LAST_DIM])
    shape = getattr(n.meta.get("val"), "shape", None)
    if shape is None or not len(shape):
        return None
    size = shape[-1]
    return int(size) if isinstance(size, int) else None
