"""The prepared-model contract: what every later stage may rely on, in one module.

A prepared model (what :func:`qtrim_fx.prepare` returns) is a ``torch.fx.GraphModule`` with

* ``qm.qtrim_blend`` (:data:`BLEND_ATTR`): the model's :class:`~qtrim_fx.runtime.blend.BlendControl`
  (the global λ, a buffer);
* ``qm.qtrim_sites`` (:data:`SITES_ATTR`): an ``nn.ModuleDict`` of
  :class:`~qtrim_fx.runtime.site.QuantSite`, keyed by :attr:`SiteSpec.key`; each is called from
  exactly one ``call_module`` node whose ``meta[SITE_NODE]`` is the site's :class:`SiteSpec`;
* ``qm.qtrim_info`` (:data:`INFO_ATTR`): how it was prepared (front end, leaf fallbacks, config);
* ``qm.qtrim_site_specs`` (:data:`SPECS_ATTR`): ``{key: SiteSpec}``, kept because ``node.meta``
  does not survive pickling (:func:`restore_site_meta` re-attaches it).

Stages read a prepared model only through this module (:func:`is_prepared`,
:func:`require_prepared`, :func:`unwrap`, :func:`iter_sites`, :func:`set_blend`) and the meta keys
of :mod:`qtrim_fx.core.spec`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.fx as fx
from torch import nn

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.core.spec import ACT_SITE, OP_KIND, SITE_NODE, WEIGHT_SITE, SiteSpec
from qtrim_fx.runtime.blend import BlendControl
from qtrim_fx.runtime.site import QuantSite

__all__ = [
    "ACT_SITE",
    "BLEND_ATTR",
    "INFO_ATTR",
    "OP_KIND",
    "SITES_ATTR",
    "SITE_NODE",
    "SPECS_ATTR",
    "WEIGHT_SITE",
    "blend_control",
    "is_prepared",
    "iter_sites",
    "prepared_target",
    "require_prepared",
    "restore_site_meta",
    "set_blend",
    "site_modules",
    "unwrap",
]

SITES_ATTR = "qtrim_sites"
BLEND_ATTR = "qtrim_blend"
INFO_ATTR = "qtrim_info"
#: ``{site key: SiteSpec}`` kept on the module: ``node.meta`` does not survive pickling.
SPECS_ATTR = "qtrim_site_specs"


def blend_control(gm: nn.Module) -> BlendControl:
    """The prepared model's global λ holder (created on first use)."""
    ctl = getattr(gm, BLEND_ATTR, None)
    if ctl is None:
        ctl = BlendControl(0.0)
        gm.add_module(BLEND_ATTR, ctl)
    return ctl


def site_modules(gm: nn.Module) -> nn.ModuleDict:
    """The prepared model's ``ModuleDict`` of sites (created on first use)."""
    sites = getattr(gm, SITES_ATTR, None)
    if sites is None:
        sites = nn.ModuleDict()
        gm.add_module(SITES_ATTR, sites)
    return sites


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` is a model returned by :func:`qtrim_fx.prepare` (not a wrapper of one)."""
    return isinstance(getattr(model, SITES_ATTR, None), nn.ModuleDict) and hasattr(model, BLEND_ATTR)


def prepared_target(model: nn.Module) -> str | None:
    """The target ``model`` was prepared for (``prepare(..., target=...)``); None: prepared for every target
    (or not a prepared model)."""
    config = getattr(getattr(model, INFO_ATTR, None), "config", None)
    target = getattr(config, "target", None)
    return target if isinstance(target, str) else None


def require_prepared(model: nn.Module, what: str) -> None:
    """Raise a :class:`ConfigError` naming ``what`` unless ``model`` is prepared; re-attach site records."""
    if not is_prepared(model):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and is_prepared(inner):
            raise ConfigError(f"{what} needs the prepared model itself, got the {type(model).__name__} "
                              f"wrapping it; pass wrapper.module")
        raise ConfigError(f"{what} needs a model returned by qtrim_fx.prepare(model); got a plain "
                          f"{type(model).__name__}")
    restore_site_meta(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The prepared model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    inner = getattr(model, "module", None)
    if not is_prepared(model) and isinstance(inner, nn.Module) and is_prepared(inner):
        return inner
    return model


def restore_site_meta(model: nn.Module) -> None:
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
    """(spec, site module, graph node) for every site of a prepared model, in layer order.

    Graph order, except that a weight site is listed just before the first node reading it (its layer):
    ``HoistWeightsPass`` runs the weight sites first, the listing stays in the order of the layers.
    """
    sites = getattr(model, SITES_ATTR, None)
    if sites is None:
        return
    graph = getattr(model, "graph", None)
    seen = set()
    restore_site_meta(model)
    if graph is None:
        return
    index = {n: i for i, n in enumerate(graph.nodes)}
    held: dict[fx.Node, list[tuple[SiteSpec, QuantSite, fx.Node]]] = {}  # first reader -> weight sites
    for node in graph.nodes:
        yield from held.pop(node, ())
        spec = node.meta.get(SITE_NODE)
        if spec is None or spec.key not in sites or spec.key in seen:
            continue
        seen.add(spec.key)
        entry = (spec, sites[spec.key], node)
        if spec.kind == "weight" and node.users:
            held.setdefault(min(node.users, key=index.__getitem__), []).append(entry)
        else:
            yield entry
    for entries in held.values():  # a reader that is not a node of this graph: never, but never lose a site
        yield from entries


def set_blend(model: nn.Module, lam: float) -> None:
    """Set the global blend λ ∈ [0, 1] of a prepared model (0 = FP32, 1 = full fake quant)."""
    require_prepared(model, "set_blend")
    getattr(model, BLEND_ATTR).set(lam)
