"""``qtrim_fx.prepare``: capture -> normalize -> functionalize -> annotate -> materialize.

The returned ``torch.fx.GraphModule`` computes exactly what the model computes
while λ = 0, shares the model's parameters (so the original ``state_dict``
loads into it with ``strict=False``) and carries:

* ``qm.qtrim_blend``: the global blend λ (a buffer; :func:`set_blend`);
* ``qm.qtrim_sites``: one :class:`~qtrim_fx.site.QuantSite` per site;
* ``qm.qtrim_info``: :class:`PrepareInfo` (front end, leaf fallbacks, config).

Saving: ``qtrim_fx.checkpoint.save(qm, path)`` / ``qtrim_fx.checkpoint.load(model, path)``
store the ``state_dict`` and the config and re-prepare on load. ``torch.save(qm)`` of the
whole module also round-trips (``torch.load(..., weights_only=False)``): the site records
that live in ``node.meta`` (lost when a GraphModule is pickled) are kept in the module too
and re-attached on first use. Loading another model's ``state_dict`` raises a
:class:`~qtrim_fx.checkpoint.CheckpointError` naming the sites or shapes that differ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture import Fallback, capture
from .config import QuantConfig
from .passes.annotate import AnnotateSitesPass
from .passes.functionalize import FunctionalizeWeightedModulesPass
from .passes.lean_relu import LeanReluPass
from .passes.materialize import BLEND_ATTR, SITES_ATTR, InsertSitesPass, blend_control
from .passes.normalize import NormalizeOpsPass
from .passes.spec import SITE_NODE, SiteSpec
from .scheme import SchemeError
from .site import QuantSite

__all__ = ["PrepareInfo", "is_prepared", "iter_sites", "prepare", "set_blend"]

INFO_ATTR = "qtrim_info"
#: ``{site key: SiteSpec}`` kept on the module: ``node.meta`` does not survive pickling.
SPECS_ATTR = "qtrim_site_specs"
#: Buffers DDP must not broadcast from rank 0: per-rank diagnostics (non-finite sample counts).
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


class NoSitesError(SchemeError):
    """The model has nothing qtrim_fx can quantize."""


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
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise SchemeError(f"config must be a qtrim_fx.QuantConfig, got {type(config).__name__}")
    result = capture(model, example_inputs)
    gm = result.gm
    for fb in result.fallbacks:
        warnings.warn(
            f"qtrim_fx: submodule '{fb.module}' could not be traced and is kept as a leaf "
            f"(its internals are not quantized): {fb.reason}",
            stacklevel=2,
        )
    for p in (NormalizeOpsPass(), FunctionalizeWeightedModulesPass(), NormalizeOpsPass(),
              AnnotateSitesPass(config), InsertSitesPass(config), LeanReluPass()):
        gm = p(gm).graph_module
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


class _RebuildTracer(fx.Tracer):
    """The tracer ``torch.load`` rebuilds a pickled prepared model with (from its generated code).

    Unpickling a GraphModule re-traces its code with ``_tracer_cls()`` (no arguments; capture's
    tracer needs some). qtrim_fx's graph helpers (BatchNorm fold factor, train/eval switch) stay
    calls here; a plain Tracer would evaluate them into constants.
    """

    def __init__(self) -> None:
        from . import ops
        from .modules import mode

        super().__init__(autowrap_modules=(math, ops, mode))


def _make_saveable(gm: fx.GraphModule) -> None:
    """Keep what pickling, DDP and ``load_state_dict`` need (see the module doc)."""
    gm.__dict__[SPECS_ATTR] = {spec.key: spec for spec, _, _ in iter_sites(gm)}
    _size_weight_statistics(gm)
    gm._tracer_cls = _RebuildTracer
    gm.__dict__[_DDP_IGNORE] = [n for n, _ in gm.named_buffers() if n.endswith(".observer.nonfinite")]
    from .checkpoint import check_checkpoint  # imports this module

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


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, SITES_ATTR, None), nn.ModuleDict) and hasattr(model, BLEND_ATTR)


def _require_prepared(model: nn.Module, what: str) -> None:
    if not is_prepared(model):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and is_prepared(inner):
            raise SchemeError(f"{what} needs the prepared model itself, got the {type(model).__name__} "
                              f"wrapping it; pass wrapper.module")
        raise SchemeError(f"{what} needs a model returned by qtrim_fx.prepare(model); got a plain "
                          f"{type(model).__name__}")
    _restore_site_meta(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The prepared model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    inner = getattr(model, "module", None)
    if not is_prepared(model) and isinstance(inner, nn.Module) and is_prepared(inner):
        return inner
    return model


def _restore_site_meta(model: nn.Module) -> None:
    """Re-attach site records to the site nodes of an unpickled prepared model (pickling drops node.meta)."""
    specs = model.__dict__.get(SPECS_ATTR)
    graph = getattr(model, "graph", None)
    if not specs or graph is None:
        return
    head = SITES_ATTR + "."
    for node in graph.nodes:
        if node.op == "call_module" and SITE_NODE not in node.meta and str(node.target).startswith(head):
            spec = specs.get(str(node.target)[len(head):])
            if spec is not None:
                node.meta[SITE_NODE] = spec


def iter_sites(model: nn.Module) -> Iterator[tuple[SiteSpec, QuantSite, fx.Node | None]]:
    """(spec, site module, graph node) for every site of a prepared model, in graph order."""
    sites = getattr(model, SITES_ATTR, None)
    if sites is None:
        return
    graph = getattr(model, "graph", None)
    seen = set()
    _restore_site_meta(model)
    if graph is not None:
        for node in graph.nodes:
            spec = node.meta.get(SITE_NODE)
            if spec is not None and spec.key in sites and spec.key not in seen:
                seen.add(spec.key)
                yield spec, sites[spec.key], node


def set_blend(model: nn.Module, lam: float) -> None:
    """Set the global blend λ ∈ [0, 1] of a prepared model (0 = FP32, 1 = full fake quant)."""
    _require_prepared(model, "set_blend")
    getattr(model, BLEND_ATTR).set(lam)
