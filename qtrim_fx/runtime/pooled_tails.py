"""Tail order statistics of a whole calibration set, however it is batched.

``calibrate`` used to average each batch's tail nodes (momentum 1/k): the mean of per-batch quantiles
is not the quantile of the set, and in the tails the two part ways with the batch size. A batch of one
image holds ~4k elements of a ViT activation, so its "max" node is one image's max and the average over
64 images sits well below the set's max: the ranges shrank as the batches did (trained vit_tiny on the
digits, 64 calibration images, logit SQNR vs float at λ = 1: 28.0 dB calibrated one image at a time,
33.5 dB in batches of 8, 34.2 dB in one batch of 64). A :class:`PooledTails` instead keeps, per row,
the largest and smallest values of every batch seen so far (as many as the deepest node needs) and
the count of finite values, and reads the nodes off the pooled set: the same ``filled_quantile``
ranks, as if every batch had been one.

    batch 1 ─┐                          (C, k) largest, (C, k) smallest, (C,) count
    batch 2 ─┼─ top_values ─ merge ──►  nodes at levels L: rank L·(N − 1) of the N pooled values
    ...     ─┘

Memory: ``k ≈ (1 − p_hi)·N + 2`` values per tail and row (N the pooled count: 64 batches of at most
``max_samples`` = 1e5 subsampled elements at p_hi = 0.999 is at most 6.4k values; twice that when the
number of batches is not known in advance).
"""

from __future__ import annotations

import math

import torch

from qtrim_fx.runtime.quantiles import fill_nonfinite, quantiles_of_sorted_tail, refill, top_values

__all__ = ["PooledTails"]


class PooledTails:
    """Both tails of the finite values seen so far in each row of ``(C, n)`` batches (host-side state).

    A value of an early batch that the deepest node of the *final* pool reads must not have been dropped on
    the way: each merge keeps as many values as that node will need, from ``expected_batches`` (``calibrate``
    passes the number of batches when it is known: then the pool is exact for batches of at most the
    largest size seen) or, without it, twice what the batches so far need (exact unless a late part of the
    set holds more than half of the whole set's tail).

    Args:
        p_lo, p_hi: the levels of the first (innermost) node of the lower / upper tail; the nodes read
            from the pool lie between them and the extremes.
        expected_batches: how many batches will be pooled, if known.
    """

    def __init__(self, p_lo: float, p_hi: float, expected_batches: int | None = None) -> None:
        self.p_lo, self.p_hi = float(p_lo), float(p_hi)
        self.expected_batches = expected_batches if expected_batches and expected_batches > 0 else None
        self._widest = 0  # the most values one batch row held
        self.top: torch.Tensor | None = None  # (C, k) largest, descending; -inf pads rows with fewer values
        self.bottom: torch.Tensor | None = None  # (C, k) smallest, ascending; +inf pads
        self.count: torch.Tensor | None = None  # (C,) finite values pooled per row

    def _keep(self, n: int, p: float) -> int:
        """How many order statistics of ``n`` pooled values the node at level ``p`` (and beyond) reads."""
        return max(1, min(n, math.ceil((1.0 - p if p >= 0.5 else p) * max(n - 1, 0)) + 2))

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> int:
        """Pool one batch's ``(C, n)`` rows; returns how many of its values were non-finite (left out)."""
        if self.count is not None and rows.shape[0] != self.count.shape[0]:
            raise ValueError(f"pooled tails of {self.count.shape[0]} rows given a batch of {rows.shape[0]}")
        hi_fill, nf = fill_nonfinite(rows, self.p_hi)  # non-finite -> -inf (never among the largest)
        lo_fill = refill(hi_fill, self.p_lo)  # and -> +inf for the smallest
        count = nf if self.count is None else self.count + nf
        n = rows.shape[-1]
        self._widest = max(self._widest, n)
        total = int(count.max()) if count.numel() else 0
        # keep what the deepest node of the final pool reads (see the class doc), not only the pool so far's
        total = max(total, self._widest * self.expected_batches) if self.expected_batches else 2 * total
        k_hi, k_lo = self._keep(total, self.p_hi), self._keep(total, self.p_lo)
        new_top = top_values(hi_fill, min(n, k_hi), True)
        new_bottom = top_values(lo_fill, min(n, k_lo), False)
        if self.top is not None:
            new_top = torch.cat([self.top, new_top], -1)
            new_bottom = torch.cat([self.bottom, new_bottom], -1)
        self.top = _pad(top_values(new_top, min(new_top.shape[-1], k_hi), True), k_hi, -math.inf)
        self.bottom = _pad(top_values(new_bottom, min(new_bottom.shape[-1], k_lo), False), k_lo, math.inf)
        self.count = count
        return rows.numel() - int(nf.sum())

    def nodes(self, levels_lo: tuple[float, ...], levels_hi: tuple[float, ...]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lo_nodes, hi_nodes, valid)``: (C, K) quantiles of the pooled values at each level (linear
        between order statistics, as ``torch.quantile``), and the rows that hold any finite value."""
        if self.count is None:
            raise ValueError("no batch pooled yet")
        return _nodes(self.bottom, self.count, levels_lo), _nodes(self.top, self.count, levels_hi), self.count > 0


def _pad(values: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    if values.shape[-1] >= k:
        return values
    pad = values.new_full((values.shape[0], k - values.shape[-1]), fill)
    return torch.cat([values, pad], -1)


def _nodes(sorted_tail: torch.Tensor, count: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """Quantiles at ``levels`` of rows of ``count`` values whose extreme end is ``sorted_tail``; 0 for empty rows."""
    out = quantiles_of_sorted_tail(sorted_tail, count, levels)
    return torch.where(count.unsqueeze(-1) > 0, out, torch.zeros_like(out))
