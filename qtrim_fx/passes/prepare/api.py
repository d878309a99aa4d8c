"""``qtrim_fx.prepare``: capture -> normalize -> functionalize -> annotate -> materialize.

The returned ``torch.fx.GraphModule`` computes exactly what the model computes
while λ = 0, shares the model's parameters (so the original ``state_dict``
loads into it with ``strict=False``) and follows the contract of
:mod:`qtrim_fx.runtime.prepared` (``qm.qtrim_blend``, ``qm.qtrim_sites``, ``qm.qtrim_info``).

Saving: ``qtrim_fx.checkpoint.save(qm, path)`` / ``qtrim_fx.checkpoint.load(model, path)``
store the ``state_dict`` and the config and re-prepare on load. ``torch.save(qm)`` of the
whole module also round-trips (``torch.load(..., weights_only=False)``): the site records
that live in ``node.meta`` (lost when a GraphModule is pickled) are kept in the module too
and re-attached on first use. Loading another model's ``state_dict`` raises a
:class:`~qtrim_fx.core.errors.CheckpointError` naming the sites or shapes that differ.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.errors import (
    ConfigError,
    CoverageError,
    CoverageWarning,
    NoSitesError,
    QtrimWarning,
    TracedBranchWarning,
)
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import OP_KIND
from qtrim_fx.frontend.trace import Fallback, capture
from qtrim_fx.passes.prepare.coverage import FloatWeight, float_weights, summarize
from qtrim_fx.passes.prepare.graph_walks import node_owner, static_value
from qtrim_fx.passes.prepare.pipeline import prepare_passes, run_passes
from qtrim_fx.passes.prepare.ranks import record_ranks
from qtrim_fx.runtime.batches import describe_batch, run_batch
from qtrim_fx.runtime.prepared import INFO_ATTR, SPECS_ATTR, blend_control, is_prepared, iter_sites, unwrap
from qtrim_fx.runtime.state_check import check_checkpoint

__all__ = ["PrepareInfo", "prepare"]

#: Buffers DDP must not broadcast from rank 0: per-rank diagnostics (non-finite sample counts).
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


@dataclass(frozen=True)
class PrepareInfo:
    frontend: str
    fallbacks: tuple[Fallback, ...]
    config: QuantConfig
    float_weights: tuple[FloatWeight, ...] = ()  # parameter-holding ops left in float, with the reason


def prepare(
    model: nn.Module, example_inputs: Any = None, config: QuantConfig | None = None, *, target: str | None = None
) -> fx.GraphModule:
    """Capture ``model`` and insert observer + blend-quant sites (λ starts at 0: exact FP32).

    Args:
        model: any ``nn.Module``; its code is not changed and its parameters are shared.
        example_inputs: tuple of positional inputs or dict of keyword inputs; needed only when
            symbolic tracing fails and ``torch.export`` takes over (batch dimension dynamic).
        config: :class:`~qtrim_fx.QuantConfig` (default: INT8 per-channel weights, UINT8 activations).
        target: train for one deployment target as well (``"qnn"``, ``"npu"``: integer-only back ends):
            the sites its profile's ``activation_sites`` ask for are added, so every op the back end
            runs sits in a DQ -> op -> Q group (no float islands), parameter operands of those ops
            (``x + self.pos_embed``) included; same as ``QuantConfig(target=...)``. ``qnn`` also trains
            per-tensor weights for Linear layers on 3+-D inputs (ONNX MatMul; the profile's
            ``matmul_weights_per_tensor``), which needs ``example_inputs`` (without them they stay per-channel).
            ``None`` (default): the hardware-neutral sites, exported to any target.

    Returns:
        The prepared ``GraphModule``; train it with your own loop.

    Raises:
        CaptureError: neither symbolic tracing nor ``torch.export`` could capture the model.
        NoSitesError: the model has no conv / linear / matmul-with-weight op to quantize.
        CoverageError: ``config.coverage == "error"`` and parameter-holding ops stay in float (listed);
            with ``"warn"`` (default) one :class:`~qtrim_fx.core.errors.CoverageWarning` lists them.
        ConfigError: ``model`` is already prepared (or wraps or contains a prepared model), ``target``
            is unknown or contradicts ``config.target``.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a qtrim_fx.QuantConfig, got {type(config).__name__}")
    config = _with_target(config, target)
    if isinstance(model, nn.Module):
        _refuse_prepared(model)
    if isinstance(model, nn.Module) and any(c in name for name, _ in model.named_modules() for c in _UNPRINTABLE):
        raise _unprintable_names(model)
    try:
        result = capture(model, example_inputs)
    except SyntaxError as e:
        raise _unprintable_names(model) from e
    gm = result.gm
    _warn_fallbacks(result.fallbacks)
    ranks_known = result.frontend != "symbolic_trace"  # torch.export records every shape
    profile = get_profile(config.target) if config.target is not None else None
    if example_inputs is not None and profile is not None and (profile.matmul_weights_per_tensor
                                                              or profile.integer_only):
        # MatMul vs Gemm form of each Linear (the profile's weight grid); GroupNorm's γ/β shape
        recorded = record_ranks(gm, example_inputs)
        if not recorded:  # fake tensors fail on some ops; real ones failing too means the inputs are wrong
            _require_runs(gm, example_inputs, model)
        ranks_known = recorded or ranks_known
    try:
        gm = run_passes(gm, prepare_passes(config))
    except SyntaxError as e:
        raise _unprintable_names(model) from e
    if not any(spec.kind == "weight" for spec, _, _ in iter_sites(gm)):
        floats = float_weights(gm, config, {f.module: f.reason for f in result.fallbacks})
        found = (f"; its parameter-holding ops all stay float:\n  {summarize(floats)}\n" if floats else
                 " (no Conv, ConvTranspose, Linear or matmul with a weight was found, or every one was excluded "
                 "by the config); ")
        raise NoSitesError(f"{model.__class__.__name__} has no quantizable site{found}check the model and the "
                           "config's exclude overrides")
    _warn_unknown_matmul_form(gm, config, ranks_known)
    _warn_unmatched_overrides(gm, config, model)
    floats = _check_coverage(gm, config, result.fallbacks, model)
    blend_control(gm)
    gm.__dict__[INFO_ATTR] = PrepareInfo(result.frontend, result.fallbacks, config, floats)
    # Only the new modules take the model's mode: shared submodules keep their own flags
    # (a BatchNorm frozen in eval inside a training model stays frozen).
    gm.training = model.training
    for m in (*gm.qtrim_sites.modules(), gm.qtrim_blend):
        m.training = model.training
    _make_saveable(gm)
    return gm


def _warn_unknown_matmul_form(gm: fx.GraphModule, config: QuantConfig, ranks_known: bool) -> None:
    """A target that trains per-tensor weights for Linear layers written as ONNX MatMul, without the ranks to tell."""
    if ranks_known or config.target is None or not get_profile(config.target).matmul_weights_per_tensor:
        return
    linears = [spec.name for spec, _, _ in iter_sites(gm) if spec.kind == "weight" and spec.op == "linear"
               and spec.scheme.axis is not None]
    if linears:
        warnings.warn(QtrimWarning(
            f"prepare(target={config.target!r}) could not tell which of {len(linears)} Linear layer(s) "
            f"({', '.join(linears[:3])}{', ...' if len(linears) > 3 else ''}) the file writes as ONNX MatMul "
            "(input with 3+ dims): they keep per-channel weights, which the target runs several times slower "
            "than per-tensor ones. Pass example_inputs to prepare(model, example_inputs, target=...)"),
            stacklevel=3)


def _require_runs(gm: fx.GraphModule, example_inputs: Any, model: nn.Module) -> None:
    """Run the captured graph once on ``example_inputs`` (eval, no grad, every module's mode restored).

    Raises:
        ConfigError: it does not run: the inputs do not fit the model (wrong shapes, dtypes or count), so
            what prepare derives from them (the ranks a target's weight grids depend on) would be wrong.
    """
    modes = [(m, m.training) for m in gm.modules()]
    args = example_inputs if isinstance(example_inputs, (dict, tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad():
            run_batch(gm.eval(), args, 0, "prepare", False)
    except ConfigError as e:
        cause = e.__cause__ or e
        raise ConfigError(f"prepare: {type(model).__name__} does not run on example_inputs "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0]}); they are {describe_batch(args)}; pass one "
                          "batch the model's forward takes, e.g. prepare(model, (x,)) with x from your data") from e
    finally:
        for m, training in modes:
            m.training = training


def _warn_unmatched_overrides(gm: fx.GraphModule, config: QuantConfig, model: nn.Module) -> None:
    """A :class:`QtrimWarning` for each ``Override`` that matches no op of the model: it changes nothing, which
    for a mistyped ``name=`` means the layer meant to stay float (or to get other bits) is quantized as usual."""
    if not config.overrides:
        return
    modules = dict(gm.named_modules())
    ops = {(node_owner(n), n.meta.get(OP_KIND)) for n in gm.graph.nodes if n.meta.get(OP_KIND) is not None}
    # A weight read by an op without an owner belongs to its parameter's module (as AnnotateSitesPass decides):
    # the sites record it, and an excluded weight is still read by its op.
    ops |= {(spec.module, spec.op) for spec, _, _ in iter_sites(gm)}
    ops |= {(str(n.target).rpartition(".")[0] or None, u.meta.get(OP_KIND)) for n in gm.graph.nodes
            if n.op == "get_attr" for u in n.users if u.meta.get(OP_KIND) is not None}
    seen = [(owner, type(modules.get(owner or "")), kind) for owner, kind in ops]
    unmatched = [o for o in config.overrides if not any(o.matches(*t) for t in seen)]
    if not unmatched:
        return
    weighted = sorted({o for o, _, k in seen if o and k in ("conv", "conv_transpose", "linear", "matmul")})
    names = ", ".join(weighted[:6]) + (", ..." if len(weighted) > 6 else "")
    for o in unmatched:
        warnings.warn(QtrimWarning(
            f"QuantConfig: {_short(o)} matches no op of {type(model).__name__}, so it changes nothing; Override(name=...) "
            f"is a regex matched against the whole qualified module name (its weighted ops: {names or 'none'}), "
            "module_type= against the module's class and op= against the op kind (qtrim_fx.inspect lists every "
            "site with its module and op)"), stacklevel=3)


def _short(o: object) -> str:
    """``Override(name='fcc', exclude=True)``: the fields that are set."""
    fields = ", ".join(f"{f.name}={getattr(o, f.name)!r}" for f in dataclasses.fields(o)  # type: ignore[arg-type]
                       if getattr(o, f.name) is not None)
    return f"{type(o).__name__}({fields})"


def _with_target(config: QuantConfig, target: str | None) -> QuantConfig:
    """``config`` with ``target`` set (validated by QuantConfig); a different ``config.target`` is refused."""
    if target is None:
        return config
    resolved = dataclasses.replace(config, target=target)
    if config.target is not None and config.target != resolved.target:
        raise ConfigError(f"prepare(target={target!r}) contradicts QuantConfig(target={config.target!r}); "
                          "give the target once")
    return resolved


def _warn_fallbacks(fallbacks: tuple[Fallback, ...]) -> None:
    """One warning per leaf capture made; a :class:`TracedBranchWarning` for those branching on values."""
    for fb in fallbacks:
        if fb.data_dependent:
            warnings.warn(TracedBranchWarning(
                f"qtrim_fx: submodule '{fb.module}' branches on tensor values and is kept as a leaf (its internals "
                f"are not quantized): {fb.reason}. Training runs its Python as written, but an ONNX export would "
                "trace only the branch its example inputs take, so export_onnx refuses it. Make the branch "
                "traceable (torch.where on both results), or move the decision out of the model"
            ), stacklevel=3)
            continue
        warnings.warn(
            f"qtrim_fx: submodule '{fb.module}' could not be traced and is kept as a leaf "
            f"(its internals are not quantized): {fb.reason}",
            stacklevel=3,
        )


def _check_coverage(
    gm: fx.GraphModule, config: QuantConfig, fallbacks: tuple[Fallback, ...], model: nn.Module
) -> tuple[FloatWeight, ...]:
    """The weights left in float; one warning listing them, or a :class:`CoverageError` (``config.coverage``).

    An error is raised only for weights left in float against the config's will: those its own
    ``exclude`` overrides leave out are listed in the warning, never refused.
    """
    floats = float_weights(gm, config, {f.module: f.reason for f in fallbacks})
    if not floats or config.coverage == "ignore":
        return floats
    what = (f"{len(floats)} weight(s) of parameter-holding ops in {model.__class__.__name__} stay in float "
            f"(not quantized, exported as float):\n  {summarize(floats)}")
    deliberate = "excluded by config"
    if config.coverage == "error" and any(not f.reason.startswith(deliberate) for f in floats):
        raise CoverageError(f"{what}\nQuantConfig(coverage='error') refuses this; make those ops quantizable, "
                            "exclude them explicitly, or pass coverage='warn'")
    warnings.warn(CoverageWarning(f"qtrim_fx: {what}\n(qtrim_fx.inspect lists them all; "
                                  "QuantConfig(coverage='ignore') silences this)"), stacklevel=3)
    return floats


def _refuse_prepared(model: nn.Module) -> None:
    """Raise a :class:`ConfigError` when ``model`` is, wraps (DDP / DataParallel) or contains a prepared model.

    Preparing one again would quantize every site twice (or fail to capture its site modules).
    """
    for name, m in model.named_modules():
        if not is_prepared(m):
            continue
        if m is model:
            where = f"the {type(model).__name__} passed is already prepared"
        elif name == "module" and unwrap(model) is m:
            where = f"the {type(model).__name__} passed wraps an already prepared model (its .module)"
        else:
            where = f"submodule {name!r} of the {type(model).__name__} passed is already prepared"
        raise ConfigError(
            f"qtrim_fx.prepare: {where}; preparing it again would quantize each site twice. "
            "Pass the float model, or use the prepared model as it is"
        )


class _RebuildTracer(fx.Tracer):
    """The tracer ``torch.load`` rebuilds a pickled prepared model with (from its generated code).

    Unpickling a GraphModule re-traces its code with ``_tracer_cls()`` (no arguments; capture's
    tracer needs some). qtrim_fx's graph helpers (BatchNorm fold factor, train/eval switch) stay
    calls here; a plain Tracer would evaluate them into constants.
    """

    def __init__(self) -> None:
        from qtrim_fx.frontend import mode
        from qtrim_fx.runtime import ops

        super().__init__(autowrap_modules=(math, ops, mode))


def _make_saveable(gm: fx.GraphModule) -> None:
    """Keep what pickling, DDP and ``load_state_dict`` need (see the module doc)."""
    gm.__dict__[SPECS_ATTR] = {spec.key: spec for spec, _, _ in iter_sites(gm)}
    _size_weight_statistics(gm)
    gm._tracer_cls = _RebuildTracer
    gm.__dict__[_DDP_IGNORE] = [n for n, _ in gm.named_buffers() if n.endswith(".observer.nonfinite")]
    gm.register_load_state_dict_pre_hook(check_checkpoint)


def _size_weight_statistics(gm: fx.GraphModule) -> None:
    """Give per-channel weight statistics their (C,) shape now rather than at the first observation.

    Buffers then have the same shapes whether or not a site has observed anything, so DDP's
    broadcast from rank 0 (at construction, and before each forward) never meets a rank whose
    statistics are still 0-D, and a checkpoint's shapes can be checked against the model's.
    """
    for spec, site, node in iter_sites(gm):
        obs = site.observer
        if spec.kind != "weight" or obs.axis is None or obs._updates or obs.lo.dim():
            continue
        if spec.param is None:  # a weight computed from parameters: evaluate it once for its shape
            w = static_value(gm, node.args[0]) if node is not None and node.args else None
            if w is None:
                continue
        else:
            try:
                w = gm.get_parameter(spec.param)
            except AttributeError:
                continue
        if -w.dim() <= obs.axis < w.dim():
            shape = (w.shape[obs.axis],)
            obs.lo = torch.full(shape, math.nan, device=obs.lo.device)
            obs.hi = torch.full(shape, math.nan, device=obs.hi.device)


#: characters of a submodule name that torch.fx cannot write into generated Python.
_UNPRINTABLE = "\"\n\r\x00\\"


def _unprintable_names(model: nn.Module) -> ConfigError:
    """torch.fx writes module names into generated Python; some names cannot be written there."""
    bad = [name for name, _ in model.named_modules() if any(c in name for c in _UNPRINTABLE)]
    shown = ", ".join(repr(n) for n in bad[:4]) or "(none found among the submodules)"
    return ConfigError(f"torch.fx cannot generate code for this model: submodule names such as {shown} contain "
                       "double quotes, backslashes, newlines or NUL; rename those submodules (e.g. add_module with a "
                       "plain identifier) and prepare again")
