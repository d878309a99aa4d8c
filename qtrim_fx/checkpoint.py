"""Save and load a prepared model as a whole: ``state_dict`` + config, re-prepared on load.

::

    qtrim_fx.checkpoint.save(qm, "qm.pt")                  # atomic; plain tensors and strings only
    qm = qtrim_fx.checkpoint.load(make_model(), "qm.pt")     # prepare(model, config) + load_state_dict

The file holds the prepared model's ``state_dict`` (weights, BatchNorm statistics, site
statistics, λ), its :class:`~qtrim_fx.QuantConfig` as plain data and the list of sites, so
it loads with ``torch.load(weights_only=True)``, does not pickle code, and survives library
updates that change how graphs are built. The float model is rebuilt by the caller (the same
class and arguments), exactly as for any PyTorch ``state_dict``.

``torch.save(qm)`` of the whole module also round-trips (``torch.load(path, weights_only=False)``)
when the model's code is importable where it is loaded.

Every prepared model also carries :func:`check_checkpoint` as a ``load_state_dict`` pre-hook, so
``qm.load_state_dict(another_models_state)`` raises :class:`CheckpointError` naming the sites or
shapes that differ instead of loading mismatched statistics.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import write_atomically
from .config import Override, QuantConfig
from .passes.materialize import BLEND_ATTR, SITES_ATTR
from .prepare import INFO_ATTR, SPECS_ATTR, _require_prepared, iter_sites, prepare, unwrap
from .scheme import SchemeError
from .site import QuantSite

__all__ = ["CheckpointError", "check_checkpoint", "load", "save"]

FORMAT = "qtrim_fx.prepared"
VERSION = 1


class CheckpointError(SchemeError, RuntimeError):
    """A checkpoint that is corrupted or belongs to another model or config.

    Also a ``RuntimeError``, like the errors of ``nn.Module.load_state_dict``.
    """


# -- load_state_dict of a prepared model ----------------------------------------------------------
def check_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a prepared model: name the sites and shapes a checkpoint gets wrong.

    Runs before the sites' own hooks (which resize per-channel statistics to the checkpoint's).
    Statistics of the wrong shape are refused always; a different set of sites only when loading
    is strict (``strict=False`` takes what matches, as torch does).
    """
    sites: nn.ModuleDict = getattr(module, SITES_ATTR)
    head = prefix + SITES_ATTR + "."
    theirs = {k[len(head):].split(".", 1)[0] for k in state_dict if k.startswith(head)}
    strict = _caller_strict()
    if not theirs:
        if strict and not any(k.startswith(prefix + BLEND_ATTR + ".") for k in state_dict):
            raise CheckpointError(
                "this state_dict holds no qtrim_fx statistics (it is the float model's); load it into the "
                "model before qtrim_fx.prepare(model), or use qm.load_state_dict(state, strict=False) to take "
                "its parameters and keep the current statistics"
            )
        return
    ours = set(sites.keys())
    if strict and theirs != ours:
        raise CheckpointError(
            f"checkpoint does not match this prepared model: {_diff('site', ours, theirs)}. It was saved from "
            "another model or QuantConfig; prepare the same model with the same config before loading it"
        )
    for key in sorted(ours & theirs):
        lo = state_dict.get(f"{head}{key}.observer.lo")
        if isinstance(lo, torch.Tensor):
            _check_site_shape(module, sites[key], key, lo)


def _caller_strict() -> bool:
    """The ``strict`` argument of the ``nn.Module.load_state_dict`` call running this hook.

    ``load_state_dict`` hands every hook ``strict=True`` whatever its caller asked for, so the
    caller's frame is the only place that knows; ``False`` when it cannot be found.
    """
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return False


def _check_site_shape(module: nn.Module, site: QuantSite, key: str, lo: torch.Tensor) -> None:
    specs = module.__dict__.get(SPECS_ATTR, {})
    spec = specs.get(key)
    name = spec.name if spec is not None else key
    axis = site.observer.axis
    if lo.dim() > 1 or (axis is None and lo.dim() == 1):
        raise CheckpointError(
            f"checkpoint site {name!r} has statistics of shape {tuple(lo.shape)} but the site is "
            f"{site.scheme.describe()} here; the checkpoint was trained with another QuantConfig "
            "(weight_per_channel?): prepare with the same config before loading"
        )
    if lo.dim() == 1 and spec is not None and spec.param is not None:
        try:
            w = module.get_parameter(spec.param)
        except AttributeError:
            return
        channels = w.shape[axis] if axis is not None and -w.dim() <= axis < w.dim() else None
        if channels is not None and lo.numel() != channels:
            raise CheckpointError(
                f"checkpoint site {name!r} has {lo.numel()} channels but {spec.param} has {channels} here; "
                "the checkpoint belongs to a model of another width"
            )


def _diff(what: str, ours: set[str], theirs: set[str]) -> str:
    def show(keys: set[str]) -> str:
        keys_ = sorted(keys)
        return ", ".join(keys_[:6]) + (f" and {len(keys_) - 6} more" if len(keys_) > 6 else "")

    parts = []
    if ours - theirs:
        parts.append(f"{what}s missing from the checkpoint: {show(ours - theirs)}")
    if theirs - ours:
        parts.append(f"{what}s this model does not have: {show(theirs - ours)}")
    return "; ".join(parts)


# -- save / load --------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write a prepared model (its ``state_dict`` and ``QuantConfig``) to ``path``, atomically.

    Args:
        model: a model returned by :func:`qtrim_fx.prepare` (or a DDP wrapper of one).
        path: output file; a failed save leaves no file behind.
    """
    model = unwrap(model)
    _require_prepared(model, "save")
    info = model.__dict__.get(INFO_ATTR)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": f"{type(model).__name__}",
        "frontend": None if info is None else info.frontend,
        "config": None if info is None else config_to_plain(info.config),
        "sites": [spec.name for spec, _, _ in iter_sites(model)],
        "state_dict": model.state_dict(),
    }
    _write_atomically(payload, Path(path))


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    config: QuantConfig | None = None,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Prepare ``model`` like the saved one and load the saved state into it.

    Args:
        model: a fresh float model of the same class and size as the one that was prepared.
        path: a file written by :func:`save`.
        example_inputs: as for :func:`qtrim_fx.prepare` (models captured with ``torch.export``).
        config: the ``QuantConfig`` to prepare with (default: the saved one; needed when the saved
            config names module types that cannot be imported here).
        map_location: as for ``torch.load``.

    Returns:
        The prepared model with the saved weights, statistics and λ.

    Raises:
        CheckpointError: the file is unreadable or not a qtrim_fx checkpoint, or it belongs to another
            model or config (the message names the sites or shapes that differ).
    """
    payload = _read(Path(path), map_location)
    if config is None:
        config = config_from_plain(payload.get("config"))
    qm = prepare(model, example_inputs=example_inputs, config=config)
    ours = [spec.name for spec, _, _ in iter_sites(qm)]
    if set(ours) != set(payload["sites"]):
        missing = sorted(set(ours) - set(payload["sites"]))
        extra = sorted(set(payload["sites"]) - set(ours))
        raise CheckpointError(
            f"{path} was saved from another model or config ({payload['model']}, this is {type(model).__name__}): "
            "sites not in the file: "
            f"{', '.join(missing[:6]) or '-'}; sites in the file but not in this model: {', '.join(extra[:6]) or '-'}. "
            "Pass the same model class and arguments (and config=) as when it was saved"
        )
    qm.load_state_dict(payload["state_dict"])
    return qm


def _read(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; write one with "
                              "qtrim_fx.checkpoint.save(qm, path)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({why}); the file is truncated or not written by "
            "torch.save / qtrim_fx.checkpoint.save: save it again"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a qtrim_fx.checkpoint.save file (no '{FORMAT}' header); a plain state_dict loads with "
            "qm.load_state_dict(torch.load(path)) into a model prepared the same way"
        )
    if int(payload.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has format version {payload['version']}, newer than this qtrim_fx "
                              f"reads ({VERSION}); upgrade qtrim_fx")
    for key, kind in (("state_dict", dict), ("sites", list)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"corrupted checkpoint {path}: '{key}' is missing or not a {kind.__name__}")
    return payload


def _write_atomically(payload: dict[str, Any], path: Path) -> None:
    write_atomically(path, lambda f: torch.save(payload, f))


# -- QuantConfig as plain data (loadable with weights_only=True) ----------------------------------
def _type_name(t: type) -> str:
    return f"{t.__module__}:{t.__qualname__}"


def _import_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(
            f"the saved QuantConfig names module type {name}, which cannot be imported here ({e}); "
            "pass config= to qtrim_fx.checkpoint.load"
        ) from e
    return obj


def config_to_plain(config: QuantConfig) -> dict[str, Any]:
    """``QuantConfig`` -> dict of str/int/float/bool/None/lists (module types as ``module:qualname``)."""
    out: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "overrides"}
    overrides = []
    for o in config.overrides:
        d = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
        t = d["module_type"]
        if t is not None:
            d["module_type"] = [_type_name(x) for x in (t if isinstance(t, tuple) else (t,))]
        overrides.append(d)
    out["overrides"] = overrides
    return out


def config_from_plain(data: dict[str, Any] | None) -> QuantConfig:
    """Inverse of :func:`config_to_plain` (``None``: the default config)."""
    if data is None:
        return QuantConfig()
    try:
        data = dict(data)
        overrides = []
        for d in data.pop("overrides", []):
            d = dict(d)
            if d.get("module_type") is not None:
                types = tuple(_import_type(n) for n in d["module_type"])
                d["module_type"] = types[0] if len(types) == 1 else types
            overrides.append(Override(**d))
        return QuantConfig(**data, overrides=tuple(overrides))
    except TypeError as e:
        raise CheckpointError(f"corrupted checkpoint: its QuantConfig does not load ({e}); pass config=") from e
