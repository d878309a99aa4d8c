"""The pass protocol: ``GraphModule -> PassResult(graph_module, modified)``.

``modified`` is truthful: a pass that changed nothing says so, and running a pass
a second time on its own output changes nothing. Editing passes lint and
recompile the graph before returning (:func:`finish`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch.fx as fx

__all__ = ["GraphPass", "PassResult", "finish"]


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


class GraphPass(Protocol):
    def __call__(self, gm: fx.GraphModule) -> PassResult: ...


def finish(gm: fx.GraphModule, modified: bool) -> PassResult:
    """Lint and recompile an edited graph (no-op when nothing changed)."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
