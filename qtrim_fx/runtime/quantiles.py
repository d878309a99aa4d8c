"""Quantile kernels of the observers: exact tail order statistics of subsampled rows.

Quantiles use linear interpolation between order statistics (``numpy.quantile``'s default).
Only the tail order statistics are needed, so they come from ``torch.topk`` on the rows
rather than a full sort, and only on the blocks whose extreme values can hold them (exact, see
:func:`top_values`). Where CPU ``topk`` would sort whole rows (it does when ``64·k > n``: the
per-tensor tails, short per-channel rows), ``numpy.partition`` selects the same values 3-5x
faster (see :func:`host_selects`; ``HOST_SELECT = False`` turns that off, for benchmarks).
Non-finite values never enter a quantile (:func:`fill_nonfinite`, :func:`finite_quantile`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "HOST_SELECT",
    "fill_nonfinite",
    "filled_quantile",
    "finite_quantile",
    "host_selects",
    "quantiles_of_sorted_tail",
    "refill",
    "tail_nodes",
    "tail_quantiles",
    "top_values",
    "two_tail_quantiles",
]

_BLOCK = 32


def tail_quantiles(v: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantile ``p`` of each row of ``v`` (2-D), ignoring non-finite entries.

    Returns ``(q, valid)``: the per-row quantile (linear interpolation, as
    ``numpy.quantile``) and a bool mask of rows that held any finite value.
    Only ``~min(p, 1-p) * n`` order statistics are extracted (``topk``).
    """
    vv, nf = fill_nonfinite(v, p)
    return filled_quantile(vv, nf, p), nf > 0


def fill_nonfinite(v: torch.Tensor, p: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` with non-finite values moved to the far end of the side quantile ``p`` does not read,
    and the count of finite values per row (one fast ``nan_to_num`` pass, one compare, one sum)."""
    far = -math.inf if p >= 0.5 else math.inf
    fill = torch.nan_to_num_ if inplace else torch.nan_to_num
    vv = fill(v, nan=far, posinf=far, neginf=far)
    nf = ((vv > far) if far < 0 else (vv < far)).sum(-1)
    return vv, nf


def refill(vv: torch.Tensor, p: float) -> torch.Tensor:
    """A ``fill_nonfinite``-ed row set filled for the other side (finite values untouched)."""
    far = -math.inf if p >= 0.5 else math.inf
    return torch.nan_to_num(vv, posinf=far, neginf=far)


def filled_quantile(vv: torch.Tensor, nf: torch.Tensor, p: float) -> torch.Tensor:
    """Quantile ``p`` of the ``nf`` finite values of each row of ``vv`` (non-finite ones filled by ``fill_nonfinite``)."""
    n = vv.shape[-1]
    upper = p >= 0.5
    k = min(n, math.ceil((1.0 - p if upper else p) * (n - 1)) + 2)
    pos = p * (nf - 1).clamp(min=0).to(torch.float64)
    lo_rank = torch.floor(pos)
    frac = (pos - lo_rank).to(vv.dtype)
    lo_rank = lo_rank.to(torch.int64)
    hi_rank = torch.clamp(lo_rank + 1, max=(nf - 1).clamp(min=0))
    top = top_values(vv, k, upper)
    if upper:
        # top[j] is the element of ascending rank nf-1-j among the finite values.
        i_lo, i_hi = nf - 1 - lo_rank, nf - 1 - hi_rank
    else:
        i_lo, i_hi = lo_rank, hi_rank
    i_lo = i_lo.clamp(0, k - 1).unsqueeze(-1)
    i_hi = i_hi.clamp(0, k - 1).unsqueeze(-1)
    a = top.gather(-1, i_lo).squeeze(-1)
    b = top.gather(-1, i_hi).squeeze(-1)
    return torch.lerp(a, b, frac)


def finite_quantile(vv: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`filled_quantile` of rows known to be all finite (``nf = n`` in every row).

    The ranks and the interpolation weight are then the same for every row and are computed on
    the host with the same float64 arithmetic; the values and the final ``lerp`` (same shapes,
    same dtype) are unchanged, so the result is bit-identical, with ~20 fewer small ops.
    """
    c, n = vv.shape
    upper = p >= 0.5
    k = min(n, math.ceil((1.0 - p if upper else p) * (n - 1)) + 2)
    i_lo, i_hi, frac = _finite_ranks(p, n, k, c, vv.dtype, vv.device)
    top = top_values(vv, k, upper)
    return torch.lerp(top[:, i_lo], top[:, i_hi], frac)


def tail_nodes(vv: torch.Tensor, nf: torch.Tensor | None, levels: tuple[float, ...]) -> torch.Tensor:
    """Quantiles of each row of ``vv`` at several ``levels`` of one tail, as ``filled_quantile`` each.

    ``levels`` all lie on one side of the median, the first the farthest from the extreme (it sets
    how many order statistics are selected, one ``top_values`` for all). ``nf``: the finite count per
    row (``fill_nonfinite``), or ``None`` for rows known to be all finite (host-side ranks, as
    :func:`finite_quantile`). Returns (C, len(levels)).
    """
    n = vv.shape[-1]
    p0 = levels[0]
    upper = p0 >= 0.5
    k = min(n, math.ceil((1.0 - p0 if upper else p0) * (n - 1)) + 2)
    top = top_values(vv, k, upper)
    if nf is None:
        i_lo, i_hi, frac = _finite_node_ranks(levels, n, k, vv.dtype, vv.device)
        # index_select: top[:, i] (same values, same contiguous layout) without Python's indexing parser
        return torch.lerp(torch.index_select(top, 1, i_lo), torch.index_select(top, 1, i_hi), frac)
    return quantiles_of_sorted_tail(top, nf, levels)


def quantiles_of_sorted_tail(top: torch.Tensor, nf: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """Quantiles at ``levels`` (one tail, as :func:`tail_nodes`) of rows of ``nf`` finite values whose extreme end is
    ``top`` (C, k): the k largest, descending, for an upper tail, the k smallest, ascending, for a lower one; k must
    reach the deepest level's order statistic. Linear between order statistics, as ``torch.quantile``."""
    upper = levels[0] >= 0.5
    k = top.shape[-1]
    lv = torch.tensor(levels, dtype=torch.float64, device=top.device)
    m1 = (nf - 1).clamp(min=0).unsqueeze(-1)
    pos = lv * m1.to(torch.float64)
    r0 = torch.floor(pos)
    frac = (pos - r0).to(top.dtype)
    r0 = r0.to(torch.int64)
    r1 = torch.minimum(r0 + 1, m1)
    if upper:  # ascending rank r is entry m1 - r of the descending top
        r0, r1 = m1 - r0, m1 - r1
    return torch.lerp(top.gather(-1, r0.clamp(0, k - 1)), top.gather(-1, r1.clamp(0, k - 1)), frac)


_NODE_RANKS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _finite_node_ranks(levels: tuple[float, ...], n: int, k: int, dtype: torch.dtype, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (levels, n, k, dtype, device)
    r = _NODE_RANKS.get(key)
    if r is None:
        if len(_NODE_RANKS) > 1024:
            _NODE_RANKS.clear()
        i0, i1, fr = [], [], []
        for p in levels:
            pos = p * float(n - 1)
            lo_rank = math.floor(pos)
            hi_rank = min(lo_rank + 1, n - 1)
            if p >= 0.5:
                lo_rank, hi_rank = n - 1 - lo_rank, n - 1 - hi_rank
            i0.append(min(max(lo_rank, 0), k - 1))
            i1.append(min(max(hi_rank, 0), k - 1))
            fr.append(pos - math.floor(pos))
        r = _NODE_RANKS[key] = (
            torch.tensor(i0, device=device), torch.tensor(i1, device=device),
            torch.tensor(fr, dtype=torch.float64).to(dtype=dtype, device=device),
        )
    return r


_FINITE_RANKS: dict[tuple, tuple[int, int, torch.Tensor]] = {}


def _finite_ranks(p: float, n: int, k: int, c: int, dtype: torch.dtype, device: torch.device
                  ) -> tuple[int, int, torch.Tensor]:
    key = (p, n, k, c, dtype, device)
    r = _FINITE_RANKS.get(key)
    if r is None:
        if len(_FINITE_RANKS) > 1024:
            _FINITE_RANKS.clear()
        pos = p * float(n - 1)  # float64, as p * (nf - 1).to(float64)
        lo_rank = math.floor(pos)
        hi_rank = min(lo_rank + 1, n - 1)
        if p >= 0.5:  # top[j] is the element of ascending rank n-1-j
            i_lo, i_hi = n - 1 - lo_rank, n - 1 - hi_rank
        else:
            i_lo, i_hi = lo_rank, hi_rank
        i_lo, i_hi = min(max(i_lo, 0), k - 1), min(max(i_hi, 0), k - 1)
        frac = torch.full((c,), pos - lo_rank, dtype=torch.float64).to(dtype=dtype, device=device)
        r = _FINITE_RANKS[key] = (i_lo, i_hi, frac)
    return r


def two_tail_quantiles(
    lo_fill: torch.Tensor, hi_fill: torch.Tensor, nf: torch.Tensor, p_lo: float, p_hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``filled_quantile`` at ``p_lo < 0.5 <= p_hi`` at once: the same arithmetic, element for
    element, with the rank bookkeeping of both levels done on (2, C) tensors (half the small ops)."""
    n = lo_fill.shape[-1]
    k_lo = min(n, math.ceil(p_lo * (n - 1)) + 2)
    k_hi = min(n, math.ceil((1.0 - p_hi) * (n - 1)) + 2)
    top = torch.cat([top_values(lo_fill, k_lo, False), top_values(hi_fill, k_hi, True)], -1)
    levels, sign, kmax, offset = _tail_constants(p_lo, p_hi, k_lo, k_hi, nf.device)
    last = nf - 1
    m1 = last.clamp(min=0)
    pos = levels * m1.to(torch.float64)
    r0 = torch.floor(pos)
    frac = (pos - r0).to(top.dtype)
    r0 = r0.to(torch.int64)
    r1 = torch.minimum(r0 + 1, m1)
    # Lower level: ascending rank r is top_lo[r]; upper level: it is top_hi[nf-1-r], after k_lo columns.
    base = torch.stack([torch.zeros_like(last), last])
    i0 = torch.minimum((base + sign * r0).clamp(min=0), kmax) + offset
    i1 = torch.minimum((base + sign * r1).clamp(min=0), kmax) + offset
    q = torch.lerp(top.gather(-1, i0.t()), top.gather(-1, i1.t()), frac.t())
    return q[:, 0], q[:, 1]


_TAIL_CONSTANTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _tail_constants(p_lo: float, p_hi: float, k_lo: int, k_hi: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Small per-configuration tensors of :func:`two_tail_quantiles`, built once (not per update)."""
    key = (p_lo, p_hi, k_lo, k_hi, device)
    c = _TAIL_CONSTANTS.get(key)
    if c is None:
        if len(_TAIL_CONSTANTS) > 256:
            _TAIL_CONSTANTS.clear()
        i64 = {"dtype": torch.int64, "device": device}
        c = (
            torch.tensor([[p_lo], [p_hi]], dtype=torch.float64, device=device),
            torch.tensor([[1], [-1]], **i64),
            torch.tensor([[k_lo - 1], [k_hi - 1]], **i64),
            torch.tensor([[0], [k_lo]], **i64),
        )
        _TAIL_CONSTANTS[key] = c
    return c


def top_values(vv: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The ``k`` largest (smallest) values of each row, sorted: ``topk(vv, k).values`` exactly.

    Long rows are cut into blocks of ``_BLOCK``; the k blocks with the largest maxima hold
    every one of the k largest values (a block outside them has k blocks, hence k values,
    at least as large as its maximum), so ``topk`` runs on k·_BLOCK candidates instead of n.
    """
    c, n = vv.shape
    nb = n // _BLOCK
    if n % _BLOCK or nb < 8 * k:
        return _topk_values(vv, k, largest)
    blocks = vv.view(c, nb, _BLOCK) if vv.is_contiguous() else vv.reshape(c, nb, _BLOCK)
    ends = blocks.amax(-1) if largest else blocks.amin(-1)
    if host_selects(ends, k):
        a = ends.detach().numpy()
        pick = np.argpartition(a, nb - k, axis=-1)[:, nb - k :] if largest else np.argpartition(a, k - 1, axis=-1)[:, :k]
        if c * k * _BLOCK >= HOST_SELECT_MIN:  # host_selects(cand, k) holds: gather the candidates on the host too
            cand_np = blocks.detach().numpy()[np.arange(c)[:, None], pick].reshape(c, k * _BLOCK)
            return _host_topk(cand_np, k, largest)  # the same candidates, in the same order, as the gather below
        pick = torch.from_numpy(np.ascontiguousarray(pick, dtype=np.int64))
    else:
        pick = torch.topk(ends, k, dim=-1, largest=largest, sorted=False).indices
    cand = blocks.gather(1, pick.unsqueeze(-1).expand(c, k, _BLOCK)).reshape(c, k * _BLOCK)
    return _topk_values(cand, k, largest)


HOST_SELECT = True  # module switch: tests compare the NumPy selection with torch.topk
HOST_SELECT_MIN = 256  # fewer elements: one topk call is cheaper than the NumPy round trip


def host_selects(v: torch.Tensor, k: int) -> bool:
    """Whether ``k`` extremes of each row of ``v`` are selected with NumPy instead of ``torch.topk``.

    Why: when ``64·k > n`` the CPU ``topk`` sorts every row whole (measured here, fresh data per
    call: 25 µs for k=102 of 3 125 values, 395 µs for k=3 of each of 768 rows of 128), while
    ``numpy.partition`` selects in linear time (5 µs, 115 µs). Only plain CPU float32/float64
    tensors qualify (not fakes or other subclasses, not under tracing); elsewhere ``topk`` runs.
    A selection is exact whichever algorithm finds it, so the values are the same (among equal
    values, which of ``+0.0``/``-0.0`` is returned may differ).
    """
    return (
        HOST_SELECT
        and type(v) is torch.Tensor
        and v.device.type == "cpu"
        and v.dtype in (torch.float32, torch.float64)
        and 64 * k > v.shape[-1]
        and v.numel() >= HOST_SELECT_MIN
        and not torch.compiler.is_compiling()
    )


def _topk_values(v: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """``torch.topk(v, k, dim=-1, largest=largest, sorted=True).values`` of a 2-D ``v`` without NaN."""
    if not host_selects(v, k):
        return torch.topk(v, k, dim=-1, largest=largest, sorted=True).values
    return _host_topk(v.detach().numpy(), k, largest)


def _host_topk(a: np.ndarray, k: int, largest: bool) -> torch.Tensor:
    """The host side of :func:`_topk_values`: ``numpy.partition`` of the 2-D array ``a``, sorted."""
    n = a.shape[-1]
    part = np.partition(a, n - k, axis=-1)[:, n - k :] if largest else np.partition(a, k - 1, axis=-1)[:, :k]
    part.sort(axis=-1)  # ascending, in the partitioned copy
    # copy, not ascontiguousarray: a reversed axis of length 1 (k = 1) counts as contiguous and keeps
    # its negative stride, which torch.from_numpy refuses
    return torch.from_numpy((part[:, ::-1] if largest else part).copy())
