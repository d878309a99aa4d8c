"""Capture: any ``nn.Module`` -> ``torch.fx.GraphModule``, without touching the model's code.

Front ends, in order:

1. ``torch.fx.symbolic_trace`` with a tracer that turns a submodule whose
   forward cannot be traced (data-dependent control flow, iteration over a
   proxy, ...) into a *leaf* on the spot: the partial nodes it emitted are
   erased, a ``call_module`` node takes their place and the reason is recorded.
   Libraries' own "do not trace" registrations (timm's) are honoured for
   modules without weights; one holding weights is traced into like any other
   module and leafed (reported, since nothing inside it is quantized) only when
   that fails. ``nn.MultiheadAttention`` is traced through a reference
   implementation (``qtrim_fx.frontend.mha``) so its projections and attention
   core appear as ordinary linear / sdpa nodes.
2. ``torch.export`` (non-strict, dynamic shapes) when the root forward itself
   cannot be traced (Hugging Face transformers, ...). Needs example inputs
   (``qtrim_fx.frontend.export_frontend``).

Both front ends keep ``train()`` / ``eval()`` working on the captured graph
(tracing freezes every ``self.training`` it reads): the model is traced in
both modes and every constant that differs (dropout flags and probabilities,
``p if self.training else 0``) becomes a runtime ``mode_select``
(``qtrim_fx.frontend.mode``); weightless submodules whose graph changes with the
mode (stochastic depth, drop path) become leaves, so they keep their own
train/eval behaviour.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import Scope, ScopeContextManager

from qtrim_fx.core.errors import CaptureError
from qtrim_fx.frontend.mha import mha_supported, traceable_mha_forward
from qtrim_fx.frontend.mode import GraphMismatch, constant_diffs, merge_mode_constants

__all__ = ["CaptureError", "CaptureResult", "Fallback", "capture"]

Frontend = Literal["symbolic_trace", "torch.export"]

_MAX_MODE_ROUNDS = 16  # distinct mode-dependent module classes leafed before giving up
_TRACER_CONSTANTS = ("_tensor_constant", "_torchbind_obj", "_tree_spec_constant", "_opaque_obj")


class _RootNotTraceable(Exception):
    """Symbolic tracing failed in the root forward itself (``__cause__`` says why)."""


#: reason prefix of a leaf whose forward branches on tensor values (see :meth:`_LeafFallbackTracer.to_bool`)
VALUE_BRANCH = "data-dependent control flow on tensor values"


@dataclass(frozen=True)
class Fallback:
    """A submodule kept as an opaque leaf (its internals are not quantized), and why."""

    module: str
    reason: str

    @property
    def data_dependent(self) -> bool:
        """Its forward branches on tensor values: a tracing exporter captures only the branch taken."""
        return self.reason.startswith(VALUE_BRANCH)


@dataclass(frozen=True)
class CaptureResult:
    gm: fx.GraphModule
    frontend: Frontend
    fallbacks: tuple[Fallback, ...]


def _library_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """Modules and functions that libraries register as not symbolically traceable (timm).

    Only consulted when the library is already imported (a timm model implies it is):
    importing timm costs seconds and pulls in torch._dynamo.
    """
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import _fx as timm_fx  # type: ignore[import-not-found]
    except Exception:
        return (), ()
    mods = getattr(timm_fx, "_leaf_modules", set())
    fns = getattr(timm_fx, "_autowrap_functions", set())
    return tuple(mods), tuple(f for f in fns if callable(f))


@functools.cache
def _weighted_types() -> tuple[type, ...]:
    return (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)


def _has_weights(m: nn.Module) -> bool:
    """Whether quantizable weights live inside ``m`` (a weighted layer, or any parameter of rank ≥ 2)."""
    return any(isinstance(s, _weighted_types()) for s in m.modules()) or any(p.dim() >= 2 for p in m.parameters())


class _LeafFallbackTracer(fx.Tracer):
    """A tracer that leafs the innermost submodule that fails to trace.

    Args:
        leaf_types: module types registered as not traceable (by a library).
        autowrap_functions: functions registered as not traceable.
        forced: qualname -> reason of submodules to keep as leaves (found by an earlier trace).
        mode_leaves: weightless module types whose graph depends on train()/eval().
    """

    def __init__(
        self,
        leaf_types: tuple[type, ...],
        autowrap_functions: tuple[Callable, ...],
        forced: Mapping[str, str],
        mode_leaves: frozenset[type],
    ) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.mode_leaves = mode_leaves
        self.fallbacks: dict[str, str] = dict(forced)
        self._value_branch: str | None = None  # the last condition on tensor values tracing met

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Remember a condition on tensor values (``x.sum() > 0``), unlike one on shapes, then fail as fx does."""
        if _reads_values(obj.node):
            self._value_branch = _describe(obj.node, 3)
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return not mha_supported(m)
        if qualname in self.fallbacks:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            # A registered module holding weights is traced into all the same (as any module: a leaf only if that
            # fails, see _trace_or_leaf): timm registers modules for its own feature extraction, and some trace
            # fine (NFNet's NormFreeBlock, EdgeNeXt's PositionalEncodingFourier); as leaves their weights stayed
            # float. Those that do not (MobileViT's blocks, Conv2dSame's shape-computed padding) stay leaves.
            return not (qualname and _has_weights(m))
        if type(m) in self.mode_leaves and not _has_weights(m):
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
            branch, self._value_branch = self._value_branch, None
            if branch is not None and isinstance(e, fx.proxy.TraceError):
                reason = f"{VALUE_BRANCH} ({branch}); {reason}"
            elif self.leaf_types and isinstance(m, self.leaf_types):
                reason = (f"{type(m).__module__}.{type(m).__qualname__} is registered by its library as not "
                          f"symbolically traceable, and tracing it failed ({reason})")
            self.fallbacks[qualname] = reason
            return self.create_proxy("call_module", qualname, args, kwargs)


def _is_shape_access(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in ("size", "dim", "numel"):
        return True
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda")
    return n.op == "call_function" and n.target is len


def _reads_values(node: fx.Node) -> bool:
    """Whether ``node`` depends on tensor values (an input or attribute reached other than through shapes)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or _is_shape_access(n):
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _describe(n: Any, depth: int) -> str:
    """``gt(sum(x), 0)``: a node as a short expression."""
    if not isinstance(n, fx.Node):
        return repr(n)
    if depth == 0 or n.op in ("placeholder", "get_attr"):
        return str(n.target) if n.op == "get_attr" else n.name
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{name}({', '.join(_describe(a, depth - 1) for a in n.args)})"


@dataclass
class _Trace:
    gm: fx.GraphModule
    fallbacks: dict[str, str]


def _trace(model: nn.Module, training: bool | None, forced: Mapping[str, str], mode_leaves: frozenset[type],
           omitted: frozenset[str] = frozenset()) -> _Trace:
    """One symbolic trace with every module in ``training`` mode (``None``: as the model is); the forward's
    arguments named in ``omitted`` are traced as ``None`` (see :func:`_omitted_optional_args`)."""
    leaf_types, fns = _library_leaves()
    tracer = _LeafFallbackTracer(leaf_types, fns, forced, mode_leaves)
    modes = {m: m.training for m in model.modules()}
    attrs = set(vars(model))
    try:
        if training is not None:
            model.train(training)
        graph = tracer.trace(model, concrete_args=dict.fromkeys(omitted) or None)
        _keep_argument_names(graph, omitted)
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        gm.training = modes[model]  # the root's own flag only: submodules are the model's
    finally:
        for m, t in modes.items():
            m.training = t
        for name in set(vars(model)) - attrs:  # constants the tracer parked on the model (_tensor_constant0)
            if name.startswith(_TRACER_CONSTANTS):
                delattr(model, name)
    return _Trace(gm, tracer.fallbacks)


def _owner(node: fx.Node | None) -> str | None:
    stack = node.meta.get("nn_module_stack") if node is not None else None
    return list(stack.values())[-1][0] if stack else None


def _mode_leaf(model: nn.Module, nodes: tuple[fx.Node | None, fx.Node | None]) -> type | None:
    """The type of a weightless submodule owning one of the first nodes where the two traces differ."""
    for n in nodes:
        owner = _owner(n)
        try:
            m = model.get_submodule(owner) if owner else None
        except AttributeError:
            m = None
        if m is not None and not _has_weights(m):
            return type(m)
    return None


def _omitted_optional_args(model: nn.Module, example_inputs: Any) -> frozenset[str]:
    """The forward's ``None``-default arguments that ``example_inputs`` leave out.

    Symbolic tracing makes every argument a proxy, and a proxy ``is not None``: ``if mask is not None: x =
    x.masked_fill(mask, ...)`` (timm's Hiera, many attention blocks) would be captured on the branch the
    example inputs never take, and the prepared model would fail on the very call it was prepared with
    (``mask.view`` on ``None``). The example inputs say how the model is called: an optional argument they
    leave out is traced as ``None`` (the graph then asserts it is ``None``), unless the forward cannot be
    traced that way (then as before). Without example inputs nothing is assumed.
    """
    if example_inputs is None:
        return frozenset()
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    given = set(example_inputs) if isinstance(example_inputs, Mapping) else set()
    positional = 0 if isinstance(example_inputs, Mapping) else len(example_inputs)
    omitted = set()
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not None:
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and i < positional:
            continue
        if p.name not in given:
            omitted.add(p.name)
    return frozenset(omitted)


def _keep_argument_names(graph: fx.Graph, omitted: frozenset[str]) -> None:
    """torch.fx renames an argument traced as a constant (``mask`` -> ``mask_1``); give it its name back so the
    prepared model is called as the model is (``qm(x, mask=None)``)."""
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        base = str(n.target).rsplit("_", 1)[0]
        if base in omitted and str(n.target) != base and base not in taken:
            n.target = base
            taken.add(base)
        name = str(n.target)
        if name in omitted:
            for user in list(n.users):  # torch.fx's check that the argument is None: say why and what to do
                if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                    user.args = (user.args[0], (
                        f"the model was prepared with example inputs that leave out {name!r}, so it was captured "
                        f"for {name}=None; to call it with {name!r}, prepare it with {name!r} in example_inputs"))


def _symbolic(model: nn.Module, omitted: frozenset[str] = frozenset()) -> CaptureResult:
    """Trace in the model's mode and in the other one; merge them so the graph follows train()/eval()."""
    mode_leaves: frozenset[type] = frozenset()
    forced: dict[str, str] = {}
    try:
        kept = _trace(model, None, forced, mode_leaves, omitted)
    except Exception as e:  # submodule failures were leafed: this one is the root's own
        raise _RootNotTraceable() from e
    for _ in range(_MAX_MODE_ROUNDS):
        try:
            other = _trace(model, not model.training, kept.fallbacks, mode_leaves, omitted)
        except Exception as e:
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            _warn_mode(model, f"its forward cannot be traced in {_mode(not model.training)} mode ({why})")
            break
        if other.fallbacks.keys() != kept.fallbacks.keys():  # a submodule fails in one mode only: leaf it in both
            forced = {**other.fallbacks, **kept.fallbacks}
            kept = _trace(model, None, forced, mode_leaves, omitted)
            continue
        try:
            diffs = constant_diffs(kept.gm.graph, other.gm.graph)
        except GraphMismatch as e:
            leaf = _mode_leaf(model, e.nodes)
            if leaf is None or leaf in mode_leaves:
                where = next((o for o in map(_owner, e.nodes) if o), None)
                _warn_mode(model, f"the graph of {where or 'its forward'} changes with the mode")
                break
            mode_leaves = mode_leaves | {leaf}
            kept = _trace(model, None, forced, mode_leaves, omitted)
            continue
        if diffs:
            merge_mode_constants(kept.gm, diffs, model.training)
            kept.gm.graph.lint()
            kept.gm.recompile()
        break
    else:
        _warn_mode(model, f"more than {_MAX_MODE_ROUNDS} kinds of submodules change their graph with the mode")
    fallbacks = tuple(Fallback(k, v) for k, v in kept.fallbacks.items())
    return CaptureResult(kept.gm, "symbolic_trace", fallbacks)


def _mode(training: bool) -> str:
    return "train()" if training else "eval()"


def _warn_mode(model: nn.Module, why: str) -> None:
    warnings.warn(
        f"qtrim_fx: {model.__class__.__name__} was captured in {_mode(model.training)} mode and keeps that "
        f"behaviour after train()/eval() where {why}",
        stacklevel=5,
    )


def _check_inputs(example_inputs: Any) -> None:
    if example_inputs is None or isinstance(example_inputs, (tuple, list, Mapping, torch.Tensor)):
        return
    raise CaptureError(
        f"example_inputs must be a tuple of positional inputs, a dict of keyword inputs or a tensor, "
        f"got {type(example_inputs).__name__}; e.g. prepare(model, (torch.randn(1, 3, 224, 224),)) or "
        "prepare(model, {'input_ids': ids, 'attention_mask': mask})"
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
    return _capture(model, example_inputs)


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Capture leaves the model's state as it found it, or refuses the model.

    Symbolic tracing runs the forward's Python on proxies, but a buffer the forward reads as an attribute is
    a real tensor, and an in-place op on it alone *runs* instead of being recorded (``self.ema.mul_(0.9)`` in a
    ``if self.training:`` branch: torch.fx's own trace executes the ``mul_`` and records only the ``add_`` that
    a traced value takes part in). The graph then lacks that op: the prepared model would train differently
    from the user's, and the user's buffer came back changed. Buffers are restored and the model is refused
    with the fix; so is a parameter changed in place (restoring it would need a copy of every weight).
    """
    buffers = [(name, b, b.detach().clone()) for name, b in model.named_buffers() if isinstance(b, torch.Tensor)]
    params = [(name, p, p._version) for name, p in model.named_parameters()]
    changed: list[str] = []
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b, saved in buffers:
                if b.shape == saved.shape and not _same(b, saved):
                    b.copy_(saved)
                    changed.append(name)
    changed += [name for name, p, version in params if p._version != version]
    if changed:
        raise CaptureError(
            f"tracing {type(model).__name__}.forward changed {', '.join(changed[:4])} in place for real: torch.fx runs "
            "an in-place op on a buffer or parameter (x.mul_(0.9), .data.clamp_()) instead of recording it, so the "
            "captured graph would not do it (restored; the model is unchanged). Fix: move that update out of forward "
            "(e.g. into the training loop), or into a function decorated with @torch.fx.wrap, which is recorded "
            "as one call")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN matching NaN."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _weighted_leaves(model: nn.Module, result: CaptureResult) -> int:
    """How many of ``result``'s leaves hold weights (nothing inside them is quantized)."""
    count = 0
    for f in result.fallbacks:
        try:
            count += _has_weights(model.get_submodule(f.module))
        except AttributeError:
            count += 1
    return count


def _capture(model: nn.Module, example_inputs: Any) -> CaptureResult:
    omitted = _omitted_optional_args(model, example_inputs)
    # Left-out optional arguments as None first; if the forward then cannot be traced (another argument, say a
    # ``is_causal=False`` flag, decides a branch only once ``mask`` is None), every argument as an input, as before.
    # Nor when it leaves more weights inside untraceable submodules than tracing every argument does.
    first: CaptureResult | None = None
    for concrete in (omitted, frozenset()) if omitted else (frozenset(),):
        try:
            with _state_kept(model):  # a failed trace restores state silently; torch.export runs on fake tensors
                result = _symbolic(model, concrete)
        except _RootNotTraceable as e:  # the root forward is not traceable: try torch.export
            cause = e.__cause__
            trace_error = f"{type(cause).__name__}: {cause}".splitlines()[0]
            if first is not None:
                return first
            continue
        if first is None and concrete and result.fallbacks:
            first = result  # compare with the trace of every argument
            continue
        if first is not None and _weighted_leaves(model, first) <= _weighted_leaves(model, result):
            return first
        return result
    if example_inputs is None:
        raise CaptureError(
            f"{model.__class__.__name__}.forward cannot be symbolically traced ({trace_error}). "
            "Pass example inputs so it can be captured with torch.export: "
            "qtrim_fx.prepare(model, example_inputs=(x,)) or example_inputs={'input_ids': ids, ...}"
        )
    from qtrim_fx.frontend.export_frontend import ExportFailed, export_capture

    try:
        gm = export_capture(model, example_inputs)
    except ExportFailed as e:
        raise CaptureError(
            f"cannot capture {model.__class__.__name__}: symbolic tracing failed ({trace_error}) and "
            f"torch.export failed {e} (tried in train() mode, then eval()). Options: make the data-dependent "
            "Python in the failing forward traceable, mark the offending submodule as a leaf, check that "
            "example_inputs match the forward signature, or pass the inputs the failing mode needs "
            "(a train() forward that asks for targets or labels: include them, or call model.eval() first)."
        ) from e
    return CaptureResult(gm, "torch.export", ())
