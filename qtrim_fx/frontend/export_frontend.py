"""The ``torch.export`` front end of capture (models whose root forward cannot be traced symbolically).

``torch.export.export`` (non-strict, every tensor dimension ``Dim.AUTO``) gives an
ATen graph whose ``self.training`` decisions are frozen at export time, and
whose unlifted module cannot be switched with ``.eval()``. The graph is
exported in train mode and then made mode-aware and readable (when the train()
forward cannot be exported, or its graph does not reproduce eval(), the eval()
graph is captured instead, with a warning; see :func:`export_capture`)::

    before (exported in train mode)                  after
    add_ = aten.add_(bn.num_batches_tracked, 1)      (gone: the BatchNorm module counts itself)
    y = aten.batch_norm(x, bn.weight, ..., True, ..) y = call_module[bn](x)         # nn.BatchNorm2d
    d = aten.dropout(h, 0.1, True)                   d = aten.dropout(h, 0.1, qtrim_mode())
    a = aten.scaled_dot_product_attention(q, k, v,   p = mode_select(qtrim_mode(), 0.1, 0.0)
            mask, 0.1)                               a = aten.scaled_dot_product_attention(q, k, v, mask, p)

The submodules of the result are the model's own (``bert.encoder.layer.0.attention.self.query`` is the
``nn.Linear``), so parameters are shared, names match ``state_dict`` and module types are visible to
config overrides and BatchNorm folding.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.core.modules import is_plain_batchnorm
from qtrim_fx.frontend.mode import mode_value

__all__ = ["ExportFailed", "export_capture"]


class ExportFailed(Exception):
    """``torch.export.export`` itself rejected the model (``__cause__`` says why)."""

_aten = torch.ops.aten
# ATen ops whose third argument is the ``train`` flag.
_DROPOUTS = frozenset({
    _aten.dropout.default,
    _aten.feature_dropout.default,
    _aten.alpha_dropout.default,
    _aten.feature_alpha_dropout.default,
})
_RANDOM = frozenset({_aten.bernoulli.default, _aten.bernoulli_.float, _aten.bernoulli.p, _aten.bernoulli_.Tensor})
_MISSING = object()


def _dynamic_shapes(value: Any) -> Any:
    """``Dim.AUTO`` for every dimension of every tensor (nested containers followed)."""
    if isinstance(value, torch.Tensor):
        return dict.fromkeys(range(value.dim()), torch.export.Dim.AUTO) if value.dim() else None
    if isinstance(value, Mapping):
        return {k: _dynamic_shapes(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_dynamic_shapes(v) for v in value)
    return None


def export_capture(model: nn.Module, example_inputs: tuple | list | Mapping[str, Any]) -> fx.GraphModule:
    """Export ``model`` (dynamic shapes) and return a mode-aware GraphModule sharing its modules.

    The train() graph is preferred: its dropout and BatchNorm flags become runtime switches, so one
    graph serves both modes. It is kept only when, switched to eval(), it computes what the model
    computes in eval() on ``example_inputs``; otherwise (train-only code baked in as constants, such as
    a sampled time mask) or when the train() forward cannot be exported (a detection model asking for
    targets, layerdrop deciding on a random number), the eval() graph is captured instead, with a
    warning that train() runs it too.

    Args:
        model: the model; its modules' train/eval flags are restored afterwards.
        example_inputs: a tuple of positional inputs or a dict of keyword inputs.

    Returns:
        A ``GraphModule`` in the model's mode whose ``train()`` / ``eval()`` drive dropout and BatchNorm.

    Raises:
        ExportFailed: ``torch.export`` could not export the model in either mode (the message says
            what failed in each).
    """
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), None
    failed: dict[bool, str] = {}
    for training in (True, False):
        try:
            gm = _export_in_mode(model, training, args, kwargs)
        except ExportFailed as e:
            failed[training] = f"{type(e.__cause__).__name__}: {e.__cause__}".splitlines()[0]
            continue
        if training and not _same_in_eval(gm, model, args, kwargs):
            failed[True] = ("its graph, switched to eval(), does not compute what the model computes in eval() "
                            "(train-only code frozen into it)")
            continue
        if not training:
            warnings.warn(
                f"qtrim_fx: {model.__class__.__name__} was captured with torch.export in eval() mode: in train() "
                f"mode {failed[True]}. train() on the prepared model runs this eval() graph (BatchNorm still "
                "follows the mode; dropout and other train-only code are not in it); to train with them, make the "
                "train() forward exportable with these example inputs",
                stacklevel=4,
            )
        return gm
    raise ExportFailed(f"in train() mode: {failed[True]}; in eval() mode: {failed[False]}")


def _export_in_mode(
    model: nn.Module, training: bool, args: tuple, kwargs: dict[str, Any] | None
) -> fx.GraphModule:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(kwargs or args),
                                     strict=False)
    except Exception as e:
        raise ExportFailed() from e
    finally:
        for m, t in modes.items():
            m.training = t
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph, model.__class__.__name__)
    gm.training = modes[model]
    _adopt_modules(gm, model)
    _batchnorm_modules(gm)
    _mode_dependent_ops(gm, model)
    _warn_static_batch(ep, model)
    gm.graph.lint()
    gm.recompile()
    return gm


def _same_in_eval(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict[str, Any] | None) -> bool:
    """Whether ``gm`` in eval() computes what ``model`` computes in eval() on the example inputs."""
    modes = {m: m.training for m in (*model.modules(), *gm.modules())}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = torch.utils._pytree.tree_leaves(model.eval()(*args, **(kwargs or {})))
            got = torch.utils._pytree.tree_leaves(gm.eval()(*args, **(kwargs or {})))
    except Exception:
        return True  # the eval() forward does not run on these inputs: nothing to compare against
    finally:
        for m, t in modes.items():
            m.training = t
    want = [t for t in want if isinstance(t, torch.Tensor)]
    got = [t for t in got if isinstance(t, torch.Tensor)]
    if len(want) != len(got):
        return False
    for w, g in zip(want, got, strict=True):
        if w.shape != g.shape or w.dtype != g.dtype:
            return False
        if w.is_floating_point():
            tol = 1e-4 * float(w.abs().max()) + 1e-6 if w.numel() else 0.0
            if not torch.allclose(g, w, rtol=1e-4, atol=tol, equal_nan=True):
                return False
        elif not torch.equal(g, w):
            return False
    return True


def _resolve(root: nn.Module, target: str) -> Any:
    return resolve_attr(root, target, _MISSING)


def _adopt_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Replace the unlifted module's plain containers by the model's own submodules (same tensors)."""
    targets: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            targets.setdefault(str(n.target).split(".")[0], []).append(str(n.target))
    for name, child in list(gm.named_children()):
        orig = model._modules.get(name)
        if orig is None or orig is child:
            continue
        if all(_resolve(gm, t) is _resolve(model, t) is not _MISSING for t in targets.get(name, ())):
            setattr(gm, name, orig)


def _get_attr_target(node: Any) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _batchnorm_modules(gm: fx.GraphModule) -> None:
    """``aten.batch_norm`` on a BatchNorm module's own tensors -> ``call_module`` of that module."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.target is not _aten.batch_norm.default or len(node.args) < 8:
            continue
        x, w, b, mean, var, _training, momentum, eps = node.args[:8]
        path = (_get_attr_target(mean) or "").removesuffix(".running_mean")
        bn = modules.get(path) if path else None
        if not is_plain_batchnorm(bn):  # a subclass's own forward would run on top of this batch_norm
            continue
        expect = ((w, "weight" if bn.weight is not None else None), (b, "bias" if bn.bias is not None else None),
                  (var, "running_var"))
        if any(_get_attr_target(a) != (f"{path}.{f}" if f else None) for a, f in expect) or (
                eps != bn.eps or momentum != (bn.momentum or 0.0)):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for n in list(gm.graph.nodes):  # the module counts its own batches
            if n.target is _aten.add_.Tensor and _get_attr_target(n.args[0]) == f"{path}.num_batches_tracked":
                gm.graph.erase_node(n)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)


def _mode_dependent_ops(gm: fx.GraphModule, model: nn.Module) -> None:
    """Dropout flags, SDPA dropout and functional batch-norm flags frozen at export -> follow train()/eval()."""
    for node in list(gm.graph.nodes):
        if node.target in _DROPOUTS and len(node.args) >= 3 and node.args[2] is True:
            node.args = (*node.args[:2], mode_value(gm, True, False, node), *node.args[3:])
        elif node.target is _aten.scaled_dot_product_attention.default:
            _sdpa_dropout(gm, node)
        elif node.target is _aten.batch_norm.default and len(node.args) > 5 and node.args[5] is True and (
                node.args[3] is not None):
            node.args = (*node.args[:5], mode_value(gm, True, False, node), *node.args[6:])
    random = [n for n in gm.graph.nodes if n.target in _RANDOM]
    if random:
        warnings.warn(
            f"qtrim_fx: {model.__class__.__name__} was exported in train mode and its graph samples random "
            f"masks ({', '.join(n.name for n in random[:3])}); if they come from train-only code (drop path, "
            "stochastic depth) they now also run in eval(): set those rates to 0 or make them modules",
            stacklevel=5,
        )


def _sdpa_dropout(gm: fx.GraphModule, node: fx.Node) -> None:
    if len(node.args) > 4:
        p = node.args[4]
        if isinstance(p, float) and p > 0.0:
            node.args = (*node.args[:4], mode_value(gm, p, 0.0, node), *node.args[5:])
    else:
        p = node.kwargs.get("dropout_p", 0.0)
        if isinstance(p, float) and p > 0.0:
            node.kwargs = {**node.kwargs, "dropout_p": mode_value(gm, p, 0.0, node)}


def _warn_static_batch(ep: torch.export.ExportedProgram, model: nn.Module) -> None:
    """Warn when an input's dim 0 (batch) came out static: only that size will be accepted."""
    names = set(ep.graph_signature.user_inputs)
    static = []
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if (n.op == "placeholder" and n.name in names and isinstance(val, torch.Tensor) and val.dim() > 0
                and is_concrete_int(val.shape[0])):
            static.append(f"{n.name} (dim 0 = {val.shape[0]})")
    if static:
        warnings.warn(
            f"qtrim_fx: {model.__class__.__name__} was exported with a static first dimension for "
            f"{', '.join(static)}: the prepared model accepts only that size. Use example inputs with a "
            "batch of 2 or more, and check the model's code for int()/.item() on shapes",
            stacklevel=5,
        )
