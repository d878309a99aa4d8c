"""Capture: any ``nn.Module`` -> ``torch.fx.GraphModule``, without touching the model's code.

Front ends, in order:

1. ``torch.fx.symbolic_trace`` with a tracer that turns a submodule whose
   forward cannot be traced (data-dependent control flow, iteration over a
   proxy, ...) into a *leaf* on the spot: the partial nodes it emitted are
   erased, a ``call_module`` node takes their place and the reason is recorded.
   Libraries' own "do not trace" registrations (timm's) are honoured.
   ``nn.MultiheadAttention`` is traced through a reference implementation
   (``qtrim_fx.modules.mha``) so its projections and attention core appear as
   ordinary linear / sdpa nodes.
2. ``torch.export`` (non-strict, dynamic batch) when the root forward itself
   cannot be traced (Hugging Face transformers, data-dependent Python). Needs
   example inputs. Dropout nodes are turned back into ``nn.Dropout`` modules so
   ``train()``/``eval()`` keep working on the captured graph.
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import Scope, ScopeContextManager

from .modules.mha import mha_supported, traceable_mha_forward
from .scheme import SchemeError

__all__ = ["CaptureError", "CaptureResult", "Fallback", "capture"]

Frontend = Literal["symbolic_trace", "torch.export"]


class CaptureError(SchemeError):
    """The model could be captured by none of the front ends."""


@dataclass(frozen=True)
class Fallback:
    """A submodule kept as an opaque leaf, and why."""

    module: str
    reason: str


@dataclass(frozen=True)
class CaptureResult:
    gm: fx.GraphModule
    frontend: Frontend
    fallbacks: tuple[Fallback, ...]


def _library_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """Modules and functions that libraries register as not symbolically traceable (timm)."""
    try:
        from timm.layers import _fx as timm_fx  # type: ignore[import-not-found]
    except Exception:
        return (), ()
    mods = getattr(timm_fx, "_leaf_modules", set())
    fns = getattr(timm_fx, "_autowrap_functions", set())
    return tuple(mods), tuple(fns)


class _LeafFallbackTracer(fx.Tracer):
    """A tracer that leafs the innermost submodule that fails to trace."""

    def __init__(self, leaf_types: tuple[type, ...], autowrap_functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.fallbacks: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return not mha_supported(m)
        if qualname in self.fallbacks or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if isinstance(m, nn.MultiheadAttention) and mha_supported(m):
            forward = functools.partial(traceable_mha_forward, m)
        with ScopeContextManager(self.scope, Scope(qualname, type(m))) as scope:
            num_calls = self.num_calls.get(qualname, 0)
            key = f"{scope.module_path}@{num_calls}" if num_calls else scope.module_path
            self.module_stack[key] = (qualname, scope.module_type)
            self.num_calls[qualname] = num_calls + 1
            try:
                if self.is_leaf_module(m, qualname):
                    return self.create_proxy("call_module", qualname, args, kwargs)
                if not qualname:  # the root: failures go to the caller (torch.export fallback)
                    return forward(*args, **kwargs)
                return self._trace_or_leaf(m, qualname, forward, args, kwargs)
            finally:
                self.module_stack.pop(key, None)

    def _trace_or_leaf(self, m: nn.Module, qualname: str, forward: Callable, args: tuple, kwargs: dict) -> Any:
        mark = self.graph._root.prev  # last node before this call
        saved_stack = collections.OrderedDict(self.module_stack)
        try:
            return forward(*args, **kwargs)
        except Exception as e:  # any failure inside the submodule: leaf it
            node = self.graph._root.prev
            while node is not mark:
                prev = node.prev
                self.graph.erase_node(node)
                node = prev
            self.module_stack = saved_stack
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
            self.fallbacks[qualname] = reason
            return self.create_proxy("call_module", qualname, args, kwargs)


def _symbolic(model: nn.Module) -> CaptureResult:
    leaf_types, fns = _library_leaves()
    tracer = _LeafFallbackTracer(leaf_types, fns)
    graph = tracer.trace(model)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    fallbacks = tuple(Fallback(k, v) for k, v in tracer.fallbacks.items())
    return CaptureResult(gm, "symbolic_trace", fallbacks)


def _dynamic_shapes(args: tuple, kwargs: Mapping[str, Any]) -> tuple | dict:
    auto = torch.export.Dim.AUTO

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return dict.fromkeys(range(v.dim()), auto) if v.dim() else None
        return None

    if kwargs:
        return {**{f"_arg{i}": spec(a) for i, a in enumerate(args)}, **{k: spec(v) for k, v in kwargs.items()}}
    return tuple(spec(a) for a in args)


def _export(model: nn.Module, example_inputs: tuple | dict) -> CaptureResult:
    args, kwargs = (tuple(), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (
        tuple(example_inputs), {})
    was_training = model.training
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = _dynamic_shapes(args, kwargs)
            if kwargs and not args:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
            else:
                ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=None if kwargs else dyn,
                                         strict=False)
    finally:
        model.train(was_training)
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph, model.__class__.__name__)
    _restore_dropout(gm)
    gm.train(was_training)
    return CaptureResult(gm, "torch.export", ())


def _restore_dropout(gm: fx.GraphModule) -> None:
    """``aten.dropout(x, p, train)`` -> ``call_module`` of an ``nn.Dropout(p)`` that follows train()/eval()."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            p = float(node.args[1])
            name = f"qtrim_dropout_{count}"
            count += 1
            gm.add_submodule(name, nn.Dropout(p))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    if count:
        gm.graph.lint()
        gm.recompile()


def _check_inputs(example_inputs: Any) -> None:
    if example_inputs is None or isinstance(example_inputs, (tuple, list, Mapping)):
        return
    if isinstance(example_inputs, torch.Tensor):
        return
    raise CaptureError(
        f"example_inputs must be a tuple of positional inputs, a dict of keyword inputs or a tensor, "
        f"got {type(example_inputs).__name__}; e.g. prepare(model, (torch.randn(1, 3, 224, 224),))"
    )


def capture(model: nn.Module, example_inputs: Any = None) -> CaptureResult:
    """Capture ``model`` as an FX GraphModule (symbolic tracing first, then ``torch.export``).

    Args:
        model: any ``nn.Module``; its code is not modified. The result shares its parameters.
        example_inputs: positional inputs (tuple/list/tensor) or keyword inputs (dict);
            only needed when symbolic tracing cannot capture the model.

    Returns:
        :class:`CaptureResult` with the graph module, the front end used and the leaf fallbacks.

    Raises:
        CaptureError: when neither front end can capture the model.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"prepare() needs an nn.Module, got {type(model).__name__}")
    _check_inputs(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        return _symbolic(model)
    except Exception as e:  # the root forward is not traceable: try torch.export
        trace_error = f"{type(e).__name__}: {e}".splitlines()[0]
    if example_inputs is None:
        raise CaptureError(
            f"{model.__class__.__name__}.forward cannot be symbolically traced ({trace_error}). "
            "Pass example inputs so it can be captured with torch.export: "
            "qtrim_fx.prepare(model, example_inputs=(x,)) or example_inputs={'input_ids': ids, ...}"
        )
    try:
        return _export(model, example_inputs)
    except Exception as e:
        export_error = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CaptureError(
            f"cannot capture {model.__class__.__name__}: symbolic tracing failed ({trace_error}) and "
            f"torch.export failed ({export_error}). Options: make the data-dependent Python in the failing "
            "forward traceable, mark the offending submodule as a leaf, or check that example_inputs match "
            "the forward signature."
        ) from e
