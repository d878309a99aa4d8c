"""The ``load_state_dict`` contract of a prepared model: refuse a state that belongs to another model.

Every prepared model carries :func:`check_checkpoint` as a ``load_state_dict`` pre-hook, so
``qm.load_state_dict(another_models_state)`` raises :class:`~qtrim_fx.core.errors.CheckpointError`
naming the sites or shapes that differ instead of loading mismatched statistics.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from qtrim_fx.core.errors import CheckpointError
from qtrim_fx.runtime.prepared import BLEND_ATTR, SITES_ATTR, SPECS_ATTR
from qtrim_fx.runtime.site import QuantSite

__all__ = ["check_checkpoint"]


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
