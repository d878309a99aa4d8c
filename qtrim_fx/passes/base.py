"""The FX pass contract: ``GraphModule -> PassResult(graph_module, modified)``, with pre/postconditions.

Every qtrim_fx graph pass derives from :class:`GraphPass`, modelled on
``torch.fx.passes.infra.pass_base.PassBase`` and onnx-ir's ``passes/_pass_infra.py``:

* :meth:`GraphPass.requires` checks what the pass needs of its input and raises
  :class:`PassContractError` (naming the pass) before anything is edited;
* :meth:`GraphPass.call` does the work and reports a truthful ``modified``: running a pass
  a second time on its own output changes nothing and says so;
* :meth:`GraphPass.ensures` checks what the pass promises of its output;
* :attr:`GraphPass.in_place` declares whether the pass edits the GraphModule it is given
  (``True``, every pass here; the pipelines copy first where the input must survive) or returns
  a new one.

Editing passes lint and recompile the graph before returning (:func:`finish`).
:func:`run_passes` runs a named pipeline (``prepare_passes(config)``, ``lower_passes(profile)``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import ClassVar, NamedTuple

import torch.fx as fx

from qtrim_fx.core.errors import QtrimError

__all__ = ["GraphPass", "PassContractError", "PassResult", "finish", "run_passes"]


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


class PassContractError(QtrimError, RuntimeError):
    """A pass was run on a graph that breaks its precondition, or broke its own postcondition."""


class GraphPass(abc.ABC):
    """Base of every FX pass: ``requires`` → ``call`` → ``ensures``.

    Subclasses implement :meth:`call` and may override :meth:`requires` / :meth:`ensures`.
    """

    #: the pass edits the GraphModule it is given (and returns it) rather than building a new one.
    in_place: ClassVar[bool] = True

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PassContractError` when ``gm`` does not meet the pass's precondition."""

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PassContractError` when the result breaks the pass's postcondition."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult:
        """Run the pass on ``gm``."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            raise PassContractError(f"{type(self).__name__} runs on a torch.fx.GraphModule, got {type(gm).__name__}")
        self.requires(gm)
        result = self.call(gm)
        if self.in_place and result.graph_module is not gm:
            raise PassContractError(f"{type(self).__name__} is declared in place but returned another GraphModule")
        self.ensures(result.graph_module)
        return result

    def fail(self, message: str) -> PassContractError:
        """A :class:`PassContractError` prefixed with the pass's name (for ``raise self.fail(...)``)."""
        return PassContractError(f"{type(self).__name__}: {message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def finish(gm: fx.GraphModule, modified: bool) -> PassResult:
    """Lint and recompile an edited graph (no-op when nothing changed)."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def run_passes(gm: fx.GraphModule, passes: Iterable[GraphPass]) -> fx.GraphModule:
    """Run ``passes`` in order, each on the previous one's result; returns the final GraphModule."""
    for p in passes:
        gm = p(gm).graph_module
    return gm
