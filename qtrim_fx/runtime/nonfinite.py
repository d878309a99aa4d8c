"""Non-finite values reaching quantization sites: counted on the device, reported by name at epoch boundaries.

Each observer counts the NaN/Inf values of its samples in a ``nonfinite`` buffer (on the
device, no host sync in the training step; they never enter the statistics). ``QuantTrim.epoch_start``
and ``calibrate`` read every counter once (one host transfer per device) and warn with a
:class:`NonFiniteWarning` naming the sites whose counts grew.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.prepared import iter_sites

__all__ = ["NonFiniteWarning", "SiteCounters", "nonfinite_counts", "site_counters", "warn_nonfinite"]


class NonFiniteWarning(UserWarning):
    """NaN or Inf values reached quantization sites (they are left out of the statistics)."""


@dataclass(frozen=True)
class SiteCounters:
    """The device-side counters of one site's observer, read back to the host."""

    name: str
    observer: EmaQuantileObserver
    nonfinite: int
    num_updates: int


def site_counters(model: nn.Module) -> list[SiteCounters]:
    """``nonfinite`` and ``num_updates`` of every site, in graph order (one host read per device)."""
    by_device: dict[torch.device, list[tuple[str, EmaQuantileObserver]]] = defaultdict(list)
    for spec, site, _ in iter_sites(model):
        by_device[site.observer.nonfinite.device].append((spec.name, site.observer))
    out: dict[str, SiteCounters] = {}
    for items in by_device.values():
        values = torch.stack([torch.stack([o.nonfinite, o.num_updates]) for _, o in items]).tolist()
        for (name, obs), (bad, n) in zip(items, values, strict=True):
            out[name] = SiteCounters(name, obs, int(bad), int(n))
    return [out[name] for name in (spec.name for spec, _, _ in iter_sites(model))]


def nonfinite_counts(model: nn.Module) -> dict[str, int]:
    """Non-finite sample values seen so far per site name (one host read per device)."""
    return {c.name: c.nonfinite for c in site_counters(model)}


def warn_nonfinite(before: dict[str, int], after: dict[str, int], when: str, stacklevel: int = 3) -> list[str]:
    """Warn naming the sites whose counts grew from ``before`` to ``after``; returns their names."""
    grown = [(n, c - before.get(n, 0)) for n, c in after.items() if c > before.get(n, 0)]
    if grown:
        shown = ", ".join(f"{n} (+{d})" for n, d in grown[:8]) + (f" and {len(grown) - 8} more" if len(grown) > 8 else "")
        warnings.warn(
            f"qtrim_fx: NaN/Inf values reached {len(grown)} quantization site(s) {when}: {shown} (sampled values). "
            "They were left out of the statistics, which stay finite, but the model computes NaN/Inf there: "
            "check the inputs and the loss, lower the learning rate, clip gradients, or use a GradScaler with AMP",
            NonFiniteWarning,
            stacklevel=stacklevel,
        )
    return [n for n, _ in grown]
