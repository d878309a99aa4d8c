"""One update's statistics of an :class:`~qtrim_fx.runtime.observer.EmaQuantileObserver` (before the EMA).

Per row (one row per tensor, or one per channel) of the observed tensor:

    ``"range"`` + ``"quantile"``:  (quantile(x, p_lo), quantile(x, p_hi))
    ``"range"`` + ``"mse"``:       the lower / upper tail nodes (:mod:`qtrim_fx.runtime.range_rule`)
    ``"abs"``   + ``"quantile"``:  (−m, m), m = quantile(|w|, p_hi)   (the paper's weight statistic)
    ``"abs"``   + ``"max"``:       (−m, m), m = max |w|               (exact: every element is read)

on the rows the observer hands in (a seeded subsample, or every element for ``"max"``). Non-finite
values never enter a statistic: :func:`step_stats` masks them and counts them; :func:`finite_step_stats`
is the same arithmetic for rows known to be all finite (no masks).
"""

from __future__ import annotations

from typing import Any

import torch

from qtrim_fx.runtime.quantiles import (
    fill_nonfinite,
    filled_quantile,
    finite_quantile,
    refill,
    tail_nodes,
    two_tail_quantiles,
)
from qtrim_fx.runtime.range_rule import TAIL_FRACTIONS

# The observer is typed by name only: importing its module here would be a cycle.
EmaQuantileObserver = Any

__all__ = ["empty_stats", "finite_step_stats", "step_stats"]


def empty_stats(obs: EmaQuantileObserver, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Placeholder step statistics of an empty tensor, all invalid (a rank joining an all-reduce)."""
    shape = () if obs.axis is None else (x.shape[obs.axis],)
    nodes = (len(TAIL_FRACTIONS),) if obs._mse else ()
    z = torch.zeros(shape + nodes, device=x.device)
    return z, z.clone(), torch.zeros(shape, dtype=torch.bool, device=x.device)


def _abs_max(rows: torch.Tensor) -> torch.Tensor:
    """max |x| per row, no |x| copy (``amax`` and ``amin``: 4x faster than ``aminmax`` or ``abs().amax`` on
    the CPU, measured). NaN and ±inf propagate, so a finite result means every value was finite."""
    return torch.maximum(rows.amax(-1), rows.amin(-1).neg_())


def step_stats(
    obs: EmaQuantileObserver, rows: torch.Tensor, owned: bool, nonfinite: torch.Tensor, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This update's ``(lo, hi, valid)`` of ``rows`` (C, n), non-finite values left out and added to
    ``nonfinite``; ``valid``: rows holding any finite value. ``per_tensor``: drop the row axis."""
    numel = rows.numel()
    if obs.mode == "abs":
        a = rows.abs_() if owned else rows.abs()
        a, nf = fill_nonfinite(a, obs.p_hi, inplace=True)  # non-finite values → −inf
        m = a.amax(-1) if obs.weight_range == "max" else filled_quantile(a, nf, obs.p_hi)
        lo_t, hi_t = -m, m
    elif obs._mse:
        lo_fill, nf = fill_nonfinite(rows, obs.p_lo)
        lo_t = tail_nodes(lo_fill, nf, obs._levels[0])
        hi_t = tail_nodes(refill(lo_fill, obs.p_hi), nf, obs._levels[1])
    else:
        lo_fill, nf = fill_nonfinite(rows, obs.p_lo)
        if obs.p_lo < 0.5 <= obs.p_hi:
            lo_t, hi_t = two_tail_quantiles(lo_fill, refill(lo_fill, obs.p_hi), nf, obs.p_lo, obs.p_hi)
        else:  # both levels on the same side of the median read the same filled copy
            lo_t = filled_quantile(lo_fill, nf, obs.p_lo)
            hi_t = filled_quantile(lo_fill, nf, obs.p_hi)
    nonfinite += numel - nf.sum()
    valid = nf > 0
    if per_tensor:
        lo_t, hi_t, valid = lo_t[0], hi_t[0], valid[0]
    if lo_t.dtype != torch.float32:
        lo_t, hi_t = lo_t.float(), hi_t.float()
    return lo_t, hi_t, valid


def finite_step_stats(
    obs: EmaQuantileObserver, rows: torch.Tensor, owned: bool, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`step_stats` of rows known to be all finite (bit-identical, fewer small ops). The ``"max"``
    weight rule may be given any rows: a non-finite value then shows in its (non-finite) result."""
    if obs.mode == "abs":
        if obs.weight_range == "max":
            m = _abs_max(rows)
        else:
            m = finite_quantile(rows.abs_() if owned else rows.abs(), obs.p_hi)
        lo_t, hi_t = -m, m
    elif obs._mse:
        lo_t, hi_t = tail_nodes(rows, None, obs._levels[0]), tail_nodes(rows, None, obs._levels[1])
    else:
        lo_t, hi_t = finite_quantile(rows, obs.p_lo), finite_quantile(rows, obs.p_hi)
    if per_tensor:
        lo_t, hi_t = lo_t[0], hi_t[0]
    if lo_t.dtype != torch.float32:
        lo_t, hi_t = lo_t.float(), hi_t.float()
    return lo_t, hi_t
