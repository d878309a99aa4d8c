"""``qtrim_fx.prepare``: capture -> normalize -> functionalize -> annotate -> materialize.

The returned ``torch.fx.GraphModule`` computes exactly what the model computes
while λ = 0, shares the model's parameters (so the original ``state_dict``
loads into it) and carries:

* ``qm.qtrim_blend``: the global blend λ (a buffer; :func:`set_blend`);
* ``qm.qtrim_sites``: one :class:`~qtrim_fx.site.QuantSite` per site;
* ``qm.qtrim_info``: :class:`PrepareInfo` (front end, leaf fallbacks, config).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .capture import Fallback, capture
from .config import QuantConfig
from .passes.annotate import AnnotateSitesPass
from .passes.functionalize import FunctionalizeWeightedModulesPass
from .passes.materialize import BLEND_ATTR, SITES_ATTR, InsertSitesPass, blend_control
from .passes.normalize import NormalizeOpsPass
from .passes.spec import SITE_NODE, SiteSpec
from .scheme import SchemeError
from .site import QuantSite

__all__ = ["PrepareInfo", "is_prepared", "iter_sites", "prepare", "set_blend"]

INFO_ATTR = "qtrim_info"


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
              AnnotateSitesPass(config), InsertSitesPass(config)):
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
    return gm


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, SITES_ATTR, None), nn.ModuleDict) and hasattr(model, BLEND_ATTR)


def _require_prepared(model: nn.Module, what: str) -> None:
    if not is_prepared(model):
        raise SchemeError(f"{what} needs a model returned by qtrim_fx.prepare(model); got a plain "
                          f"{type(model).__name__}")


def iter_sites(model: nn.Module) -> Iterator[tuple[SiteSpec, QuantSite, fx.Node | None]]:
    """(spec, site module, graph node) for every site of a prepared model, in graph order."""
    sites = getattr(model, SITES_ATTR, None)
    if sites is None:
        return
    graph = getattr(model, "graph", None)
    seen = set()
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
