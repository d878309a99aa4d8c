"""The minimum-MSE activation range: pick ``[lo, hi]`` from EMA'd tail order statistics.

The default activation statistics (``act_range="mse"``) keep, per tail, the quantile
function between the paper's level and the extreme at :data:`TAIL_FRACTIONS` (tail
probabilities ``t_j = (1 − p_hi)·g_j`` above, ``p_lo·g_j`` below, ``g`` from 1 down to 0, the
last node being the max / min). Between nodes the quantile function is taken as linear in
``t`` (except the last piece, from the node next to the extreme out to it: that mass is about one
sample, the extreme itself, so it is taken at the extreme's value; linear interpolation there made a
single outlier look spread out and cheap to clip). That makes the two error terms of a grid with clip
points ``[lo, hi]`` closed-form:

    clipping:  C_hi(c) = ∫_{q(t) > c} (q(t) − c)² dt      (and C_lo alike on the lower tail)
    rounding:  R(lo, hi) = s²/12 · (1 − T_hi(hi) − T_lo(lo)),   s = (hi' − lo') / (q_max − q_min)

(``hi' = max(hi, 0)``, ``lo' = min(lo, 0)``: the grid always holds 0; ``T`` the tail mass beyond the clip
point; symmetric grids use ``s = max(|lo'|, |hi'|) / (2^(b−1) − 1)``). The chosen range minimises
``R + C_lo + C_hi`` over the nodes (the paper's quantile pair and the min/max included), so it never
does worse than either on the modelled distribution. Pure
functions of the statistics: deterministic, identical on every rank that holds the same EMAs.

One-signed tensors (``one_signed_unclipped``, what the observers use): on a tensor whose values all lie
on one side of 0 (ReLU outputs) every clipping error has the same sign, so it is a bias, and the next
layer (a convolution summing N inputs, a global average pool) adds N such biases coherently (N² times
their square) while zero-mean rounding noise adds incoherently (N times its variance). Per-element MSE
weighs both alike and so clips these tensors too much (measured on ReLU outputs, issue 19: worse than
min/max on 14 of 17 in a ResNet-18): such rows keep their extreme (max; −min for max ≤ 0). On a signed
tensor the two tails' clipping errors have opposite signs and partly cancel; those keep the MSE choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qtrim_fx.core.scheme import QuantScheme

__all__ = ["TAIL_FRACTIONS", "mse_range", "mse_range_into", "mse_range_numpy", "tail_clip_error", "tail_levels"]

#: g_j: tail probabilities of the stored nodes as fractions of the paper's tail mass (1 − p_hi or p_lo);
#: 2^(−j/3) for j = 0..20 (down to ~1 % of it), then 0 (the extreme itself).
TAIL_FRACTIONS: tuple[float, ...] = (*(2.0 ** (-j / 3) for j in range(21)), 0.0)
_FRACTIONS = np.asarray(TAIL_FRACTIONS)
_INNER = (0.25, 0.5, 0.75)  # extra candidates inside the last piece, as fractions of its width


def tail_levels(p: float, upper: bool) -> tuple[float, ...]:
    """Quantile levels of the tail nodes (ascending distance into the tail; the last is 1 or 0)."""
    t = (1.0 - p) if upper else p
    return tuple((1.0 - t * g) if upper else (t * g) for g in TAIL_FRACTIONS)


class _Torch:
    where = staticmethod(torch.where)

    @staticmethod
    def maximum(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        return torch.clamp(a, min=b) if isinstance(b, float) else torch.maximum(a, b)

    @staticmethod
    def cat(xs: list, axis: int) -> torch.Tensor:
        return torch.cat(xs, axis)

    @staticmethod
    def take(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, i[..., None])[..., 0]

    @staticmethod
    def const(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)


class _NumPy:
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def cat(xs: list, axis: int) -> np.ndarray:
        return np.concatenate(xs, axis)

    @staticmethod
    def take(x: np.ndarray, i: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, i[..., None], -1)[..., 0]

    @staticmethod
    def const(values: tuple[float, ...], like: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=like.dtype)


def tail_clip_error(nodes: Any, mass: float, points: Any, xp: Any = _Torch) -> tuple[Any, Any]:
    """Clipping error and tail mass beyond each point of an upper tail.

    Args:
        nodes: (C, K) upper-tail nodes, ascending (the first at tail mass ``mass``, the last the max).
        mass: the tail mass of the first node (1 − p_hi).
        points: (C, M) clip points, each at or above the first node.
        xp: the array namespace (torch tensors by default; ``_NumPy`` for arrays).

    Returns:
        ``(∫ (q − c)₊² dt, ∫ [q > c] dt)``, both (C, M).
    """
    g = xp.const(TAIL_FRACTIONS, nodes) * mass
    dt = g[:-1] - g[1:]
    starts = xp.cat([nodes[..., :-2], nodes[..., -1:]], -1)
    a = starts[..., None, :] - points[..., None]  # (C, M, K-1): piece values relative to the point
    b = nodes[..., None, 1:] - points[..., None]
    width = b - a
    safe = xp.where(width > 0, width, 1.0)
    bp = xp.maximum(b, 0.0)
    crossing = (a < 0) & (b > 0)
    inside = (a >= 0) * 1.0
    # Whole piece above the point: ∫ of a linear function squared; a crossing piece: its part above.
    sq = xp.where(crossing, bp * bp * bp / (3.0 * safe), (a * a + a * b + b * b) / 3.0 * inside)
    above = xp.where(crossing, bp / safe, inside)
    return (sq * dt).sum(-1), (above * dt).sum(-1)


def _node_errors(nodes: np.ndarray, mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tail_clip_error` at the nodes themselves, in closed form (NumPy, any leading shape).

    Above a node every piece lies wholly above it, and ∫ (q − c)² over a linear piece is a
    quadratic in c: suffix sums of its three coefficients give the error at every node at once.
    """
    t = mass * _FRACTIONS
    dt = t[..., :-1] - t[..., 1:]
    a, b = np.concatenate([nodes[..., :-2], nodes[..., -1:]], -1), nodes[..., 1:]
    coef = np.stack([np.broadcast_to(dt, a.shape), dt * (a + b), dt * (a * a + a * b + b * b) / 3.0])
    s0, s1, s2 = np.cumsum(coef[..., ::-1], -1)[..., ::-1]
    pad = np.zeros((*a.shape[:-1], 1))
    # Inside the last (step) piece: its mass at the extreme's squared distance.
    dt_last = dt[..., -1:]
    inner = dt_last * ((1.0 - np.asarray(_INNER)) * (b[..., -1:] - nodes[..., -2:-1])) ** 2
    c = nodes[..., :-1]  # the points: each node below the extreme
    e = np.concatenate([s2 - c * s1 + c * c * s0, pad, inner], -1)
    return e, np.concatenate([s0, pad, np.broadcast_to(dt_last, inner.shape)], -1)


def _candidates(nodes: Any, xp: Any) -> Any:
    """The nodes, then points inside the last piece (a lone extreme may be worth half-covering)."""
    return xp.cat([nodes, nodes[..., -2:-1] + xp.const(_INNER, nodes) * (nodes[..., -1:] - nodes[..., -2:-1])], -1)


def mse_range(
    tail_lo: torch.Tensor, tail_hi: torch.Tensor, p_lo: float, p_hi: float, grid: QuantScheme,
    one_signed_unclipped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[lo, hi]`` of minimum expected squared quantization error for ``grid`` (see module doc).

    On the CPU the arithmetic runs in NumPy (float64; ~40 tiny ops cost a tenth of what they
    cost as torch kernels); elsewhere in torch (float64), with nothing read back to the host.

    Args:
        tail_lo: (C, K) lower-tail nodes (descending: the ``p_lo`` quantile first, the min last).
        tail_hi: (C, K) upper-tail nodes (ascending: the ``p_hi`` quantile first, the max last).
        p_lo, p_hi: the levels of the first nodes.
        grid: the integer grid the range is for.
        one_signed_unclipped: rows whose values all lie on one side of 0 (min ≥ 0: ReLU outputs; or
            max ≤ 0) keep their extreme (see module doc, "One-signed tensors").

    Returns:
        ``(lo, hi)``, each (C,), float32 on the device of the nodes.
    """
    if tail_hi.device.type == "cpu" and type(tail_hi) is torch.Tensor and not torch.compiler.is_compiling():
        lo, hi = mse_range_numpy(tail_lo.detach().numpy(), tail_hi.detach().numpy(), p_lo, p_hi, grid,
                                 one_signed_unclipped)
        return torch.from_numpy(lo), torch.from_numpy(hi)
    nl, nh = tail_lo.double(), tail_hi.double()
    lo, hi = _select(nl, nh, p_lo, p_hi, grid, _Torch)
    if one_signed_unclipped:
        lo, hi = _unclip_one_signed(nl, nh, lo, hi, grid, _Torch)
    return lo.float(), hi.float()


def mse_range_into(lo: torch.Tensor, hi: torch.Tensor, tail_lo: torch.Tensor, tail_hi: torch.Tensor, p_lo: float,
                   p_hi: float, grid: QuantScheme) -> None:
    """Write :func:`mse_range` (one-signed rows unclipped) of (K,) or (C, K) tails into ``lo`` / ``hi`` (an observer's).

    On the CPU the NumPy path reads views of the tails and its results are copied in directly (no tensor
    round trip in between: the same values).
    """
    per_tensor = tail_lo.dim() == 1
    if tail_hi.device.type == "cpu" and type(tail_hi) is torch.Tensor and not torch.compiler.is_compiling():
        nl, nh = tail_lo.detach().numpy(), tail_hi.detach().numpy()
        lo_c, hi_c = mse_range_numpy(nl[None] if per_tensor else nl, nh[None] if per_tensor else nh, p_lo, p_hi,
                                     grid, one_signed_unclipped=True)
        lo.copy_(torch.from_numpy(lo_c.reshape(lo.shape)))
        hi.copy_(torch.from_numpy(hi_c.reshape(hi.shape)))
        return
    lo_t, hi_t = mse_range(tail_lo.unsqueeze(0) if per_tensor else tail_lo, tail_hi.unsqueeze(0) if per_tensor
                           else tail_hi, p_lo, p_hi, grid, one_signed_unclipped=True)
    lo.copy_(lo_t.view(lo.shape))
    hi.copy_(hi_t.view(hi.shape))


def mse_range_numpy(tail_lo: np.ndarray, tail_hi: np.ndarray, p_lo: float, p_hi: float, grid: QuantScheme,
                    one_signed_unclipped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mse_range` of NumPy tail nodes (any float dtype, computed in float64), as float32 arrays."""
    nl, nh = tail_lo.astype(np.float64), tail_hi.astype(np.float64)
    lo, hi = _select(nl, nh, p_lo, p_hi, grid, _NumPy)
    if one_signed_unclipped:
        lo, hi = _unclip_one_signed(nl, nh, lo, hi, grid, _NumPy)
    return np.asarray(lo, np.float32), np.asarray(hi, np.float32)


def _unclip_one_signed(tail_lo: Any, tail_hi: Any, lo: Any, hi: Any, grid: QuantScheme, xp: Any) -> tuple[Any, Any]:
    """The chosen range with one-signed rows' far end moved to their extreme (max, or −min)."""
    mn, mx = tail_lo[..., -1], tail_hi[..., -1]
    nonneg, nonpos = mn >= 0, mx <= 0
    if grid.symmetric:
        a = xp.where(nonneg, mx, xp.where(nonpos, -mn, hi))
        return -a, a
    return xp.where(nonpos, mn, lo), xp.where(nonneg, mx, hi)


def _select(tail_lo: Any, tail_hi: Any, p_lo: float, p_hi: float, grid: QuantScheme, xp: Any) -> tuple[Any, Any]:
    up, down = tail_hi, -tail_lo  # the lower tail mirrored into an upper one
    if xp is _NumPy and not grid.symmetric and bool((up[..., 0] >= 0).all() and (down[..., 0] >= 0).all()):
        # Every node is at or beyond 0 (the grid's zero-widening moves no candidate): closed form.
        if FAST_CLOSED_FORM and up.ndim == 2:
            return _closed_form(up, down, p_lo, p_hi, grid)
        e, t = _node_errors(np.stack([up, down]), np.array([1.0 - p_hi, p_lo]).reshape(2, *(1,) * up.ndim))
        cu, cd = _candidates(up, xp), _candidates(down, xp)
        return _pick_pair(cu, cd, cu, cd, e[0], t[0], e[1], t[1], grid, xp)
    cu, cd = _candidates(up, xp), _candidates(down, xp)
    if grid.symmetric:
        amp = xp.maximum(xp.cat([cu, cd], -1), xp.maximum(xp.maximum(up[..., :1], down[..., :1]), 0.0))
        e_hi, t_hi = tail_clip_error(up, 1.0 - p_hi, amp, xp)
        e_lo, t_lo = tail_clip_error(down, p_lo, amp, xp)
        step = amp / float(2 ** (grid.bits - 1) - 1)
        cost = step * step / 12.0 * (1.0 - t_hi - t_lo) + e_hi + e_lo
        a = xp.take(amp, cost.argmin(-1))
        return -a, a
    hi_eff, lo_eff = xp.maximum(cu, 0.0), xp.maximum(cd, 0.0)  # lo_eff: −lo', the zero-widened distance
    e_hi, t_hi = tail_clip_error(up, 1.0 - p_hi, xp.maximum(hi_eff, up[..., :1]), xp)
    e_lo, t_lo = tail_clip_error(down, p_lo, xp.maximum(lo_eff, down[..., :1]), xp)
    return _pick_pair(cu, cd, hi_eff, lo_eff, e_hi, t_hi, e_lo, t_lo, grid, xp)


FAST_CLOSED_FORM = True  # module switch: tests compare it with the general closed form (_node_errors, _pick_pair)
_CLOSED_FORM_CONSTANTS: dict[tuple[float, float], tuple[np.ndarray, ...]] = {}


def _closed_form_constants(p_lo: float, p_hi: float) -> tuple[np.ndarray, ...]:
    """The parts of :func:`_node_errors` / :func:`_pick_pair` that depend on the tail masses only, built once."""
    key = (p_lo, p_hi)
    c = _CLOSED_FORM_CONSTANTS.get(key)
    if c is None:
        if len(_CLOSED_FORM_CONSTANTS) > 64:
            _CLOSED_FORM_CONSTANTS.clear()
        t = np.array([1.0 - p_hi, p_lo]).reshape(2, 1, 1) * _FRACTIONS  # (2, 1, K): upper, lower tail
        dt = t[..., :-1] - t[..., 1:]
        s0 = np.cumsum(dt[..., ::-1], -1)[..., ::-1]  # suffix sums, as _node_errors accumulates them
        dt_last = dt[..., -1:]
        mass = np.concatenate([s0, np.zeros((2, 1, 1)), np.broadcast_to(dt_last, (2, 1, len(_INNER)))], -1)
        kept = 1.0 - mass[0][..., :, None] - mass[1][..., None, :]  # (1, M, M)
        c = _CLOSED_FORM_CONSTANTS[key] = (dt, s0, dt_last, 1.0 - np.asarray(_INNER), np.asarray(_INNER), kept)
    return c


def _closed_form(up: np.ndarray, down: np.ndarray, p_lo: float, p_hi: float, grid: QuantScheme
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The closed-form branch of :func:`_select` for (C, K) NumPy tails, bit for bit (issue 22).

    Every element is computed by the same float64 expression as :func:`_node_errors`, :func:`_candidates`
    and :func:`_pick_pair` (suffix sums accumulate in the same order); the parts that depend on the tail
    masses only are built once, and both tails share each NumPy call: about half the calls.
    """
    dt, s0, dt_last, inner_w, inner, kept = _closed_form_constants(p_lo, p_hi)
    nodes = np.stack([up, down])  # (2, C, K)
    a, b = np.concatenate([nodes[..., :-2], nodes[..., -1:]], -1), nodes[..., 1:]
    s1 = np.cumsum((dt * (a + b))[..., ::-1], -1)[..., ::-1]
    s2 = np.cumsum((dt * (a * a + a * b + b * b) / 3.0)[..., ::-1], -1)[..., ::-1]
    c = nodes[..., :-1]
    last = nodes[..., -2:-1]
    e_inner = dt_last * (inner_w * (b[..., -1:] - last)) ** 2
    e = np.concatenate([s2 - c * s1 + c * c * s0, np.zeros((*a.shape[:-1], 1)), e_inner], -1)
    cand = np.concatenate([nodes, last + inner * (nodes[..., -1:] - last)], -1)  # (2, C, M)
    cu, cd = cand[0], cand[1]
    step = (cu[..., :, None] + cd[..., None, :]) / float(grid.qmax - grid.qmin)
    cost = step * step / 12.0 * kept + e[0][..., :, None] + e[1][..., None, :]
    flat = cost.reshape(cost.shape[0], -1).argmin(-1)
    rows, m = np.arange(cd.shape[0]), cd.shape[-1]
    return -cd[rows, flat % m], cu[rows, flat // m]


def _pick_pair(cu: Any, cd: Any, hi_eff: Any, lo_eff: Any, e_hi: Any, t_hi: Any, e_lo: Any, t_lo: Any,
               grid: QuantScheme, xp: Any) -> tuple[Any, Any]:
    """The (lo, hi) candidate pair of least rounding + clipping error on an asymmetric grid."""
    step = (hi_eff[..., :, None] + lo_eff[..., None, :]) / float(grid.qmax - grid.qmin)  # (C, M_hi, M_lo)
    kept = 1.0 - t_hi[..., :, None] - t_lo[..., None, :]
    cost = step * step / 12.0 * kept + e_hi[..., :, None] + e_lo[..., None, :]
    flat = cost.reshape(*cost.shape[:-2], -1).argmin(-1)
    m = cd.shape[-1]
    return -xp.take(cd, flat % m), xp.take(cu, flat // m)
