"""BindScalarInputsPass: forward arguments with a Python scalar default become that constant.

A captured forward keeps every argument as a placeholder, including flags such as timm's
``forward(x, attn_mask=None, is_causal=False)``. An ONNX graph input is always a tensor: the
exporter fills the default in and turns it into a tensor input, and the op that takes the flag
(``scaled_dot_product_attention(is_causal=...)``) then rejects it. A deployed graph is exported for
its defaults, so the lowered graph computes with them::

    before:  is_causal = placeholder[default=False];  y = sdpa(q, k, v, is_causal=is_causal)
    after:   is_causal = placeholder[default=False] (no users);  y = sdpa(q, k, v, is_causal=False)

The placeholder stays (positions and names of later arguments do not move); with no users, the
exporters leave it out of the file. Tensor inputs and ``None`` defaults are untouched.
"""

from __future__ import annotations

import torch.fx as fx

from qtrim_fx.passes.base import GraphPass, PassResult, finish

__all__ = ["BindScalarInputsPass"]

_SCALARS = (bool, int, float, str)


class BindScalarInputsPass(GraphPass):
    """Lowering: uses of a placeholder whose default is a bool/int/float/str become the default."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "placeholder" or not node.args or not isinstance(node.args[0], _SCALARS):
                continue
            if node.users:
                value = node.args[0]
                for user in list(node.users):
                    user.replace_input_with(node, value)  # type: ignore[arg-type]
                modified = True
        return finish(gm, modified)
