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
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtrim_fx.core.config import Override, QuantConfig
from qtrim_fx.core.errors import CheckpointError
from qtrim_fx.core.fileio import write_atomically
from qtrim_fx.passes.prepare.api import prepare
from qtrim_fx.runtime.prepared import INFO_ATTR, iter_sites, require_prepared, unwrap
from qtrim_fx.runtime.state_check import check_checkpoint

__all__ = ["CheckpointError", "check_checkpoint", "load", "save"]

FORMAT = "qtrim_fx.prepared"
VERSION = 1


# -- save / load --------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write a prepared model (its ``state_dict`` and ``QuantConfig``) to ``path``, atomically.

    Args:
        model: a model returned by :func:`qtrim_fx.prepare` (or a DDP wrapper of one).
        path: output file; a failed save leaves no file behind (or the old one intact). A symlink
            is followed (its target is replaced); an existing file keeps its mode, a new one gets
            the umask's.

    Raises:
        OutputPathError: ``path`` is a directory, FIFO, device or socket, or a read-only file.
    """
    model = unwrap(model)
    _model_first(model, path, "save")
    require_prepared(model, "save")
    info = model.__dict__.get(INFO_ATTR)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": f"{type(model).__name__}",
        "frontend": None if info is None else info.frontend,
        "config": None if info is None else config_to_plain(_resolved(model, info.config)),
        "sites": [spec.name for spec, _, _ in iter_sites(model)],
        "state_dict": model.state_dict(),
    }
    _write_atomically(payload, Path(path))


def _resolved(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """``config`` plus the weight granularity a profile chose per layer, pinned as overrides.

    A profile with ``matmul_weights_per_tensor`` (``qnn``) makes a Linear per-tensor when its input has
    3+ dims, which ``prepare`` learns from the example inputs. The saved config records each weight
    site's resolved granularity (an ``Override`` per owning module), so :func:`load` rebuilds the same
    grids whether or not it is given example inputs.
    """
    from qtrim_fx.core.profiles import get_profile

    if config.target is None or not get_profile(config.target).matmul_weights_per_tensor:
        return config
    pinned = tuple(
        Override(name=re.escape(spec.module), op=spec.op, weight_per_channel=spec.scheme.axis is not None)
        for spec, _, _ in iter_sites(model)
        if spec.kind == "weight" and spec.module and spec.op in ("linear", "matmul")
    )
    return dataclasses.replace(config, overrides=config.overrides + pinned) if pinned else config


def _model_first(model: object, path: object, caller: str) -> None:
    """Refuse swapped arguments (``load(path, model)``) with the order, not pathlib's ``TypeError``."""
    if isinstance(path, nn.Module) and not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint.{caller}(model, path) takes the model first and the file second; got "
                        f"{caller}({type(model).__name__}, {type(path).__name__}): swap the arguments")


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
            config names module types other than ``torch.nn`` classes and the classes of ``model``'s
            modules, the only ones a file may name: loading never imports a module a file names).
        map_location: as for ``torch.load``.

    Returns:
        The prepared model with the saved weights, statistics and λ.

    Raises:
        CheckpointError: the file is unreadable or not a qtrim_fx checkpoint, or it belongs to another
            model or config (the message names the sites or shapes that differ).
    """
    _model_first(model, path, "load")
    payload = _read(Path(path), map_location)
    if config is None:
        config = config_from_plain(payload.get("config"), model=model)
    qm = prepare(model, example_inputs=example_inputs, config=config)
    ours = [spec.name for spec, _, _ in iter_sites(qm)]
    if set(ours) != set(payload["sites"]):
        missing = sorted(set(ours) - set(payload["sites"]))
        extra = sorted(set(payload["sites"]) - set(ours))
        raise CheckpointError(
            f"{path} was saved from another model or config ({payload['model']}, this is {type(model).__name__}): "
            "sites not in the file: "
            f"{', '.join(missing[:6]) or '-'}; sites in the file but not in this model: {', '.join(extra[:6]) or '-'}. "
            "Pass the same model class and arguments (and config=) as when it was saved; if they are the same, "
            "the file comes from a qtrim_fx whose prepare placed sites differently (e.g. before attention, in-place "
            "ops or clamps got sites on integer-only targets): start again from the float weights"
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


def _resolve_type(name: Any, model: nn.Module | None) -> type[nn.Module]:
    """The module class a saved config names as ``module:qualname``, from an allow-list only.

    Allowed: ``nn.Module`` classes defined in ``torch.nn`` (or a submodule of it) and the classes
    of ``model``'s modules and their ``nn.Module`` bases. Nothing is imported: the names come from
    the file, and importing a module runs its code.
    """
    if not isinstance(name, str) or name.count(":") != 1:
        raise CheckpointError(f"corrupted checkpoint: its QuantConfig names module type {name!r}, not "
                              "'module:QualName'; pass config= to qtrim_fx.checkpoint.load")
    if model is not None:
        known = {_type_name(t): t for m in model.modules() for t in type(m).__mro__
                 if isinstance(t, type) and issubclass(t, nn.Module)}
        if name in known:
            return known[name]
    found = _torch_nn_type(name)
    if found is not None:
        return found
    what = (f"neither a torch.nn class nor the class of a module in this {type(model).__name__}" if model is not None
            else "not a torch.nn class (and no model= was given whose module classes it could be)")
    raise CheckpointError(
        f"the saved QuantConfig names module type {name!r}, which is {what}; a checkpoint may name only those "
        "(loading never imports a module a file names: that would run its code). Pass config= to "
        "qtrim_fx.checkpoint.load with the overrides you expect"
    )


def _torch_nn_type(name: str) -> type[nn.Module] | None:
    """The ``nn.Module`` class ``torch.nn[.sub]:QualName`` names, looked up in already imported modules only."""
    module, _, qualname = name.partition(":")
    if module != "torch.nn" and not module.startswith("torch.nn."):
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None or not part.isidentifier() or part.startswith("__"):
            return None
        obj = inspect.getattr_static(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return None
    defined_in = obj.__module__ or ""
    return obj if defined_in == "torch.nn" or defined_in.startswith("torch.nn.") else None


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


def config_from_plain(data: dict[str, Any] | None, model: nn.Module | None = None) -> QuantConfig:
    """Inverse of :func:`config_to_plain` (``None``: the default config).

    Module types are resolved from an allow-list, never imported: ``torch.nn`` classes and, when
    ``model`` is given, the classes of its modules (see :func:`load`).

    Raises:
        CheckpointError: ``data`` is not a saved QuantConfig, holds invalid values, or names a module
            type outside the allow-list (the message names it).
    """
    if data is None:
        return QuantConfig()
    try:
        data = dict(data)
        overrides = []
        for d in data.pop("overrides", []):
            d = dict(d)
            names = d.get("module_type")
            if names is not None:
                if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
                    raise CheckpointError(f"corrupted checkpoint: its QuantConfig has module_type={names!r}, not a "
                                          "list of 'module:QualName' names; pass config=")
                types = tuple(_resolve_type(n, model) for n in names)
                d["module_type"] = types[0] if len(types) == 1 else types
            overrides.append(Override(**d))
        return QuantConfig(**data, overrides=tuple(overrides))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"corrupted checkpoint: its QuantConfig does not load ({e}); pass config=") from e
