"""RewireInplacePass: later readers of a tensor mutated in place read the in-place call's result instead.

An in-place tensor method whose result is discarded (``y.relu_()``, ``y.mul_(0.5)``) is traced as a node that
nothing reads, while the code after it reads ``y``'s node again. A site placed on the in-place call (its
output: a ReLU's) quantized a value nobody used, and the value that was used stayed unquantized (on ``qnn`` /
``npu`` a float Relu/Mul in the file). The in-place call returns ``y`` itself, so reading its node is the same
tensor, now in the graph's data flow::

    before:  y = conv(x);  relu_ = y.relu_();  m = y.mean((2, 3))          (relu_ has no reader)
    after:   y = conv(x);  relu_ = y.relu_();  m = relu_.mean((2, 3))      (same tensor at run time)

Only readers that come after the in-place call are rewired (earlier ones read ``y`` before the mutation), and
only calls that return their first argument: ``Tensor`` methods and ``torch`` / ``torch.nn.functional``
functions whose name ends in one underscore (``relu_``, ``add_``, ``clamp_``, ``F.relu_``); ``__iadd__``-style
dunders, whose readers fx already rewires, are left alone. Values are unchanged; the graph now says what runs.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from qtrim_fx.passes.base import GraphPass, PassResult, finish

__all__ = ["RewireInplacePass"]


def _in_place(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if not any(getattr(ns, name, None) is node.target for ns in (torch, F, torch.Tensor) if name):
            return False
    else:
        return False
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


class RewireInplacePass(GraphPass):
    """Prepare: readers of an in-place-mutated tensor that follow the mutation read the mutating call's node."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        modified = False
        for node in gm.graph.nodes:
            if not (_in_place(node) and node.args and isinstance(node.args[0], fx.Node)):
                continue
            mutated = node.args[0]
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)
                    modified = True
        return finish(gm, modified)
