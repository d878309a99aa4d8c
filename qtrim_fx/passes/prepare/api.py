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

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.errors import ConfigError, NoSitesError
from qtrim_fx.frontend.trace import Fallback, capture
from qtrim_fx.passes.prepare.pipeline import prepare_passes, run_passes
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


def prepare(model: nn.Module, example_inputs: Any = None, config: QuantConfig | None = None) -> fx.GraphModule:
    """Capture ``model`` and insert observer + blend-quant sites (λ starts at 0: exact FP32).

    Args:
        model: any ``nn.Module``; its code is not changed and its parameters are shared.
        example_inputs: tuple of positional inputs or dict of keyword inputs; needed only when
            symbolic tracing fails and ``torch.export`` takes over (batch dimension dynamic).
        config: :class:`~qtrim_fx.QuantConfig` (default: INT8 per-channel weights, UINT8 activations).

    Returns:
        The prepared ``GraphModule``; train it with your own loop.

    Raises:
        CaptureError: neither symbolic tracing nor ``torch.export`` could capture the model.
        NoSitesError: the model has no conv / linear / matmul-with-weight op to quantize.
        ConfigError: ``model`` is already prepared (or wraps or contains a prepared model).
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a qtrim_fx.QuantConfig, got {type(config).__name__}")
    if isinstance(model, nn.Module):
        _refuse_prepared(model)
    if isinstance(model, nn.Module) and any(c in name for name, _ in model.named_modules() for c in _UNPRINTABLE):
        raise _unprintable_names(model)
    try:
        result = capture(model, example_inputs)
    except SyntaxError as e:
        raise _unprintable_names(model) from e
    gm = result.gm
    for fb in result.fallbacks:
        warnings.warn(
            f"qtrim_fx: submodule '{fb.module}' could not be traced and is kept as a leaf "
            f"(its internals are not quantized): {fb.reason}",
            stacklevel=2,
        )
    try:
        gm = run_passes(gm, prepare_passes(config))
    except SyntaxError as e:
        raise _unprintable_names(model) from e
    if not any(spec.kind == "weight" for spec, _, _ in iter_sites(gm)):
        raise NoSitesError(
            f"{model.__class__.__name__} has no quantizable site (no Conv, ConvTranspose, Linear or matmul "
            "with a weight was found, or every one was excluded by the config); check the model and the "
            "config's exclude overrides"
        )
    blend_control(gm)
    gm.__dict__[INFO_ATTR] = PrepareInfo(result.frontend, result.fallbacks, config)
    # Only the new modules take the model's mode: shared submodules keep their own flags
    # (a BatchNorm frozen in eval inside a training model stays frozen).
    gm.training = model.training
    for m in (*gm.qtrim_sites.modules(), gm.qtrim_blend):
        m.training = model.training
    _make_saveable(gm)
    return gm


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
    for spec, site, _ in iter_sites(gm):
        obs = site.observer
        if spec.kind != "weight" or spec.param is None or obs.axis is None or obs._updates or obs.lo.dim():
            continue
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
