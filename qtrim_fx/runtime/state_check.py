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
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR
from qtrim_fx.runtime.blend import BlendControl
from qtrim_fx.runtime.prepared import BLEND_ATTR, SITES_ATTR, SPECS_ATTR
from qtrim_fx.runtime.site import QuantSite

__all__ = ["check_checkpoint"]


def check_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a prepared model: name the sites and shapes a checkpoint gets wrong.

    Runs before the sites' own hooks (which resize per-channel statistics to the checkpoint's).
    Statistics of the wrong shape are refused always; a different set of sites only when loading
    is strict (``strict=False`` takes what matches, as torch does).
    """
    blend_key = prefix + BLEND_ATTR + ".value"
    if blend_key in state_dict:  # checked here too, before any submodule has loaded anything
        BlendControl.check_loaded(state_dict[blend_key], blend_key)
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
    _check_bias_shifts(module, state_dict, prefix)
    ours = set(sites.keys())
    if strict and theirs != ours:
        raise CheckpointError(
            f"checkpoint does not match this prepared model: {_diff('site', ours, theirs)}. It was saved from "
            "another model or QuantConfig; prepare the same model with the same config before loading it"
        )
    for key in sorted(ours & theirs):
        _check_site_shape(module, sites[key], key, state_dict, f"{head}{key}.observer.")


def _check_bias_shifts(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Bias corrections: absent from a checkpoint saved before they existed (read as none: zeros, added to the
    state being loaded), refused when not finite."""
    shifts = getattr(module, BIAS_SHIFT_ATTR, None)
    if not isinstance(shifts, nn.ModuleDict):
        return
    head = prefix + BIAS_SHIFT_ATTR + "."
    if not any(k.startswith(head) for k in state_dict):
        for key, m in shifts.items():
            state_dict[f"{head}{key}.delta"] = torch.zeros_like(m.delta)
        return
    for k, v in state_dict.items():
        if k.startswith(head) and isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(
                torch.isfinite(v).all()):
            raise CheckpointError(f"checkpoint entry {k!r} (a bias correction) holds NaN or Inf; the checkpoint is "
                                  "corrupted: save it again, or calibrate the model again")


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


def _check_site_shape(module: nn.Module, site: QuantSite, key: str, state_dict: dict, head: str) -> None:
    """Refuse statistics whose granularity (per tensor / per channel) or width differ from the site's.

    A per-channel site holds one statistic per channel of its weight (sized by ``prepare``), so 0-D
    statistics are a per-tensor config's, except at a site whose channel count is only known at its
    first observation (no resolvable weight) and that the checkpoint has not observed either.
    """
    specs = module.__dict__.get(SPECS_ATTR, {})
    spec = specs.get(key)
    name = spec.name if spec is not None else key
    axis = site.observer.axis
    channels = _channels(module, spec, axis)
    stats = {n: state_dict.get(head + n) for n in ("lo", "hi")}
    for stat, t in stats.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() > 1 or (axis is None and t.dim() == 1) or (axis is not None and t.dim() == 0 and (
                channels is not None or _observed(t, state_dict.get(head + "num_updates")))):
            raise CheckpointError(
                f"checkpoint site {name!r} has statistics of shape {tuple(t.shape)} but the site is "
                f"{site.scheme.describe()} here (key {head + stat!r}); the checkpoint was trained with another "
                "QuantConfig (weight_per_channel?): prepare with the same config before loading"
            )
        if t.dim() == 1 and channels is not None and t.numel() != channels:
            raise CheckpointError(
                f"checkpoint site {name!r} has {t.numel()} channels but {spec.param} has {channels} here "
                f"(key {head + stat!r}); the checkpoint belongs to a model of another width"
            )
    lo, hi = stats["lo"], stats["hi"]
    if isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) and lo.shape != hi.shape:
        raise CheckpointError(
            f"checkpoint site {name!r} has lo of shape {tuple(lo.shape)} but hi of shape {tuple(hi.shape)} "
            f"(keys {head}lo, {head}hi); the checkpoint is corrupted: save it again"
        )


def _channels(module: nn.Module, spec: Any, axis: int | None) -> int | None:
    """The channel count of a per-channel weight site (``None``: per tensor, or no resolvable weight)."""
    if axis is None or spec is None or spec.param is None:
        return None
    try:
        w = module.get_parameter(spec.param)
    except AttributeError:
        return None
    return w.shape[axis] if -w.dim() <= axis < w.dim() else None


def _observed(stat: torch.Tensor, num_updates: Any) -> bool:
    """Whether a checkpoint's statistic holds observations (a finite entry, or a positive update count)."""
    if isinstance(num_updates, torch.Tensor) and num_updates.numel() == 1 and int(num_updates) > 0:
        return True
    return bool(torch.isfinite(stat).any())


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
