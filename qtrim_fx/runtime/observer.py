"""Robust EMA-quantile statistics (DESIGN.md "Semantics").

Per update, on a seeded random subsample of at most ``max_samples`` elements
(non-finite values excluded; the step statistics are :mod:`qtrim_fx.runtime.observer_stats`):

    activations ("range"):  a_t = quantile(x, p_lo),  b_t = quantile(x, p_hi)  (or the tail nodes of
                            the minimum-MSE rule, :mod:`qtrim_fx.runtime.range_rule`)
    weights     ("abs"):    m_t = quantile(|w|, p_hi), or max |w| over every element (stored as lo = -m, hi = m)
    EMA:        s̃_t = (1 − μ) s̃_(t−1) + μ s_t,   the first observation initializes it

The subsample (:mod:`qtrim_fx.runtime.subsample`) is made of random runs of consecutive
elements (one random draw per run), so an update costs the same for 1e5 and 1e7 elements.
Quantiles use linear interpolation between order statistics (``numpy.quantile``'s
default), from ``torch.topk`` / ``numpy.partition`` on the tails only (:mod:`qtrim_fx.runtime.quantiles`).
On accelerators nothing here reads a tensor back to the host; first-observation and all-non-finite
cases are handled with ``torch.where``. On the CPU, where a host read costs no
device synchronization, an update reads one number (the subsample's sum): when it
is finite the ranks are host constants and the EMA needs no masks (about 20 fewer
small ops, bit-identical results; see ``_observe_into``).

Under ``torch.compile`` an update is one opaque custom op (``qtrim_fx::observe``,
:mod:`qtrim_fx.runtime.observer_support`): its host-side call counter (``update_every``),
seeded generator and optional all-reduce run eagerly at every call, and the graph
around it has no break.

The raw statistics (``lo``, ``hi``) are kept, not scales, so one checkpoint can
derive qparams for any scheme later (``qtrim_fx.core.fakequant.derive_qparams``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from qtrim_fx.core.scheme import QuantScheme, SchemeError
from qtrim_fx.runtime.observer_stats import empty_stats, finite_step_stats, step_stats
from qtrim_fx.runtime.observer_support import (
    LIVE,
    all_reduce_extremes,
    all_reduce_mean,
    is_distributed,
    load_state_pre_hook,
    save_calls,
    train_call_outside_graph,
)
from qtrim_fx.runtime.pooled_tails import PooledTails
from qtrim_fx.runtime.range_rule import TAIL_FRACTIONS, mse_range_into, tail_levels
from qtrim_fx.runtime.subsample import subsample_rows

__all__ = ["EmaQuantileObserver", "is_distributed", "masked_scores_bound"]

Mode = Literal["range", "abs"]
ActRange = Literal["quantile", "mse"]
WeightRange = Literal["quantile", "max"]
_UINT8 = QuantScheme(bits=8, signed=False, symmetric=False)


#: exp(x) of float32 is 0 below this: an entry this far below its row's max adds exactly nothing to a
#: float32 softmax (it is masked, as by -inf).
_SOFTMAX_UNDERFLOW = 104.0


def masked_scores_bound(x: torch.Tensor, dim: int, bits: int | None) -> torch.Tensor:
    """A softmax input as its observer sees it: no entry below the bound a grid must reach.

    An attention mask adds ``-inf``, ``finfo.min`` or ``-1e4`` to the scores it hides. Observed as they
    are, those values put the grid's low end at -3.4e38 (scale ~1e36: every real score rounds to one
    code, the attention becomes an average). A softmax needs no grid below ``row max − T``,
    ``T = (bits + 1)·ln 2 + ln n`` for ``n`` entries along ``dim``: an entry saturating there (at the grid's
    low end) keeps at most 2^-(bits+1) of its row's mass, half a step of the 8-bit probabilities. So every
    entry below it (a masked one, or a real score that far below its row's best) is observed at
    ``row max − T``, and every entry of a row whose max lies more than :data:`_SOFTMAX_UNDERFLOW` below the
    tensor's (a fully masked row: its softmax is uniform for any one value) at ``tensor max − T``.

    ``bits=None`` (the mask operand itself, see the observer's ``mask_operand``): only masked entries (more than
    :data:`_SOFTMAX_UNDERFLOW` = 104 below their row's max, where a float32 softmax weight is exactly 0) move, to
    ``row max − 104``: the mask's grid then holds a value that pushes any score within ~90 of its row's best below
    the sum's bound, on a scale integer kernels can rescale (``finfo.min``'s grid, scale ~1e36, made ONNX
    Runtime's fused QLinearAdd return garbage); a bias added with the mask (T5) keeps its values.
    """
    x = x.detach()
    if x.dim() == 0:
        return x
    row_max = x.amax(dim, keepdim=True)
    top = row_max.amax()
    masked_row = row_max < top - _SOFTMAX_UNDERFLOW
    ref = torch.where(masked_row, top, row_max)
    if bits is None:
        masked = (x < row_max - _SOFTMAX_UNDERFLOW).logical_or_(masked_row)
        return torch.where(masked, ref - _SOFTMAX_UNDERFLOW, x)
    bound = (bits + 1) * math.log(2.0) + math.log(max(x.shape[dim], 1))
    floor = ref - bound
    return torch.where(masked_row, floor, torch.maximum(x, floor))


def _check_p(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 < p < 1.0:
        raise SchemeError(f"{name}={p} must lie strictly between 0 and 1 (e.g. 0.999)")
    return p


def _versions(lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, int] | None:
    """In-place version counters of the EMA buffers; None for inference tensors (never "known")."""
    try:
        return lo._version, hi._version
    except RuntimeError:
        return None


class EmaQuantileObserver(nn.Module):
    """EMA of subsampled quantiles, per tensor or per channel.

    Args:
        mode: ``"range"`` (activations: low and high quantile of x) or ``"abs"``
            (weights: high quantile of |w|, symmetric).
        axis: ``None`` for per-tensor statistics, else the channel axis.
        p_lo, p_hi: quantile levels in (0, 1).
        momentum: EMA momentum μ in (0, 1].
        max_samples: subsample size bound S_max.
        seed: seed of the subsampling generator (the update count is mixed in, so the
            samples are reproducible across resume and identical across DDP ranks).
        update_every: update statistics on every N-th training call only. ``momentum`` stays the
            per-step μ: an update uses μ_N = 1 − (1 − μ)^N, so the EMA's horizon in training steps
            is the same for every N (exactly μ at N = 1).
        act_range: ``"quantile"`` (the paper: ``[lo, hi]`` = the EMA'd ``p_lo``/``p_hi`` quantiles) or
            ``"mse"`` (``"range"`` mode only: EMA'd tail nodes between those quantiles and the min/max,
            ``[lo, hi]`` = the range of least expected quantization error on ``grid``, see
            :mod:`qtrim_fx.runtime.range_rule`).
        grid: the integer grid an ``"mse"`` range is chosen for (default UINT8 asymmetric).
        clip: ``False``: an ``"mse"`` range is the EMA'd min/max widened to each update's own (never clips
            the latest batch; model outputs). With ``running_extremes`` set (``qtrim_fx.calibrate`` does) the
            min/max of every update so far. Under DDP these extremes are taken over all ranks.
        weight_range: ``"abs"`` mode only: ``"quantile"`` (the paper: the EMA'd ``p_hi`` quantile of |w|) or
            ``"max"`` (the EMA'd exact max |w|, every element read: nothing clipped).

    Buffers: ``lo``, ``hi`` (the range; 0-D or (C,), NaN until first observed), ``num_updates``,
    ``nonfinite``; with ``act_range="mse"`` also ``tail_lo``, ``tail_hi`` (the EMA'd tail nodes,
    (K,) or (C, K), from the ``p_lo``/``p_hi`` quantile out to the min/max). The state_dict also holds ``calls`` (training calls seen, host-side), so
    resuming with ``update_every > 1`` keeps the update phase.
    Statistics change only in ``train()`` mode.
    """

    _cpu_fast_path = True  # class switch: tests compare it with the general path

    def __init__(
        self,
        mode: Mode = "range",
        axis: int | None = None,
        p_lo: float = 0.001,
        p_hi: float = 0.999,
        momentum: float = 1e-3,
        max_samples: int = 100_000,
        seed: int = 0,
        update_every: int = 1,
        act_range: ActRange = "quantile",
        grid: QuantScheme | None = None,
        clip: bool = True,
        weight_range: WeightRange = "quantile",
        softmax_dim: int | None = None,
        mask_operand: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("range", "abs"):
            raise SchemeError(f"observer mode must be 'range' or 'abs', got {mode!r}")
        self.mode = mode
        self.axis = axis
        self.p_lo = _check_p("p_lo", p_lo)
        self.p_hi = _check_p("p_hi", p_hi)
        if mode == "range" and self.p_lo >= self.p_hi:
            raise SchemeError(f"p_lo={p_lo} must be below p_hi={p_hi}")
        momentum = float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise SchemeError(f"momentum={momentum} must lie in (0, 1] (the paper uses 1e-3)")
        self.momentum = momentum
        if int(max_samples) < 1:
            raise SchemeError(f"max_samples must be a positive int, got {max_samples!r}")
        self.max_samples = int(max_samples)
        if int(update_every) < 1:
            raise SchemeError(f"update_every must be a positive int, got {update_every!r}")
        self.update_every = int(update_every)
        self.seed = int(seed)
        if act_range not in ("quantile", "mse"):
            raise SchemeError(f"act_range must be 'quantile' (the paper's p_lo/p_hi) or 'mse', got {act_range!r}")
        self.act_range = act_range
        self.grid = grid or _UINT8
        self.clip = bool(clip)
        self._mse = mode == "range" and act_range == "mse"
        if weight_range not in ("quantile", "max"):
            raise SchemeError(f"weight_range must be 'quantile' (the paper's |w| quantile p_hi) or 'max', got "
                              f"{weight_range!r}")
        self.weight_range = weight_range
        self._absmax = mode == "abs" and weight_range == "max"
        # The tensor is a softmax's input along this dim: masked entries are observed at their bound.
        self.softmax_dim = None if softmax_dim is None or mode != "range" else int(softmax_dim)
        # The mask operand of the scores' add (``softmax(s + mask)`` along this dim): masked entries are
        # observed 104 below their row's max, and the range is its min / max (a masking value must stay).
        self.mask_operand = None if mask_operand is None or mode != "range" else int(mask_operand)
        # Set by calibrate: unclipped sites take the min / max of the calibration set, not an envelope
        # of per-batch extremes (host-side, never saved: it is a mode of one call, not a statistic).
        self.running_extremes = False
        self.enabled = True
        # NaN marks "never observed" (per channel): the first finite observation initializes the EMA.
        self.register_buffer("lo", torch.full((), math.nan))
        self.register_buffer("hi", torch.full((), math.nan))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        # Non-finite values seen in the samples (counted on the device: no sync in the hot path).
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64))
        if self._mse:
            self._levels = (tail_levels(self.p_lo, False), tail_levels(self.p_hi, True))
            self.register_buffer("tail_lo", torch.full((len(TAIL_FRACTIONS),), math.nan))
            self.register_buffer("tail_hi", torch.full((len(TAIL_FRACTIONS),), math.nan))
        self.sync_ranks = True
        self._calls = 0  # training calls seen (host side), drives update_every and the sample seed
        self._updates = 0  # host mirror of num_updates
        # A bool that flips once (``_updates`` changes every step: under torch.compile a guard on it
        # would recompile every step).
        self._initialized = False
        # (lo, hi, their versions) when the EMAs were last known to hold no NaN (see _finite_ema).
        self._nan_free: tuple | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._register_load_state_dict_pre_hook(self._on_load)
        self.register_state_dict_post_hook(save_calls)
        LIVE[id(self)] = self

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: reachable from graphs too
        super().__setstate__(state)
        # pickled before the attention-mask rules existed (a whole prepared model saved with torch.save)
        self.__dict__.setdefault("softmax_dim", None)
        self.__dict__.setdefault("mask_operand", None)
        LIVE[id(self)] = self

    # -- state ---------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        """True once at least one observation was recorded (host-side, no sync)."""
        return self._initialized

    @property
    def update_momentum(self) -> float:
        """The momentum of one update: μ_N = 1 − (1 − μ)^N for ``update_every = N`` (μ itself at N = 1)."""
        n, mu = self.update_every, self.momentum
        return mu if n == 1 else 1.0 - (1.0 - mu) ** n

    def _on_load(self, state_dict: dict, prefix: str, *args: Any) -> None:
        load_state_pre_hook(self, state_dict, prefix)

    # -- sampling ------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            self._generators[device] = g
        g.manual_seed((self.seed * 1_000_003 + self._updates) % (2**63))
        return g

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(C, n) float rows of ``x`` and whether they are a copy (see :func:`subsample_rows`): a seeded
        subsample, or every element for the ``"max"`` weight rule (an exact max, one pass)."""
        return subsample_rows(x, self.axis, max(x.numel(), 1) if self._absmax else self.max_samples, self._generator)

    # -- update --------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record one observation unconditionally (ignores train/eval and update_every).

        Under ``torch.distributed`` (``sync_ranks``, on by default) every rank contributes its
        step quantiles and all ranks apply the same mean, so the EMAs stay identical across ranks.
        """
        self._observe_into(x, self.lo, self.hi, self.num_updates, self.nonfinite)

    def _observe_into(
        self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_updates: torch.Tensor, nonfinite: torch.Tensor
    ) -> None:
        """:meth:`observe` writing into the given state tensors (the buffers, or their stand-ins in a
        compiled graph, see :mod:`qtrim_fx.runtime.observer_support`); only the buffers themselves may be resized."""
        sync = self.sync_ranks and is_distributed()
        if x.numel() == 0 and not sync:
            return
        if self.softmax_dim is not None and x.numel() and x.is_floating_point():
            x = masked_scores_bound(x, self.softmax_dim, self.grid.bits)
        elif self.mask_operand is not None and x.numel() and x.is_floating_point():
            x = masked_scores_bound(x, self.mask_operand, None)
        if self.running_extremes and self._mse and self.clip and lo is self.lo:
            self._observe_pooled(x, sync)
            return
        # The EMA'd statistics: the range itself (quantile rule) or the tail nodes it is chosen from.
        ema_lo, ema_hi = (self.tail_lo, self.tail_hi) if self._mse else (lo, hi)
        if self._cpu_fast_path and x.device.type == "cpu" and not sync and lo.shape == self._stat_shape(x):
            # On the CPU a host read costs no device synchronization: when the subsample is all
            # finite (the usual case) the ranks are host constants and the EMA needs no masks.
            rows, owned = self._rows(x)
            # A finite sum means every value is finite (one pass, no mask); an overflowing sum of
            # finite values only sends the step down the general path, which gives the same result.
            # The max |w| rule reads every element anyway: its own result tells (no extra pass).
            stats = finite_step_stats(self, rows, owned, self.axis is None) if self._absmax else None
            if math.isfinite(float(rows.sum() if stats is None else stats[1].sum())):
                lo_t, hi_t = stats or finite_step_stats(self, rows, owned, self.axis is None)
                prev = self._extremes(ema_lo, ema_hi)
                self._finite_ema(ema_lo, ema_hi, lo_t, hi_t)
                self._keep_extremes(ema_lo, ema_hi, prev, lo_t, hi_t, None)
                self._finish_update(lo, hi, num_updates)
                return
            lo_t, hi_t, valid = step_stats(self, rows, owned, nonfinite, self.axis is None)
        elif x.numel() == 0:
            lo_t, hi_t, valid = empty_stats(self, x)
        else:
            lo_t, hi_t, valid = step_stats(self, *self._rows(x), nonfinite, self.axis is None)
        prev = self._extremes(ema_lo, ema_hi)
        if sync:
            if self._mse and not self.clip:  # unclipped: the min / max over every rank, not the ranks' mean
                lo_t, hi_t = all_reduce_extremes(lo_t, hi_t, valid)
            lo_t, hi_t, valid = all_reduce_mean(lo_t, hi_t, valid)
        if ema_lo.shape != lo_t.shape:
            if self._updates or lo is not self.lo:
                raise SchemeError(
                    f"observer saw {tuple(lo_t.shape)[:1]} channels after {tuple(ema_lo.shape)[:1]}; "
                    "a per-channel site needs a fixed channel count"
                )
            ema_lo, ema_hi = self._resize(lo_t, hi_t)
            lo, hi = self.lo, self.hi
        row_valid = valid
        if ema_lo.dim() > valid.dim():
            valid = valid.unsqueeze(-1)
        first = torch.isnan(ema_lo)
        mu = self.update_momentum
        new_lo = torch.where(first, lo_t, (1.0 - mu) * ema_lo + mu * lo_t)
        new_hi = torch.where(first, hi_t, (1.0 - mu) * ema_hi + mu * hi_t)
        # Rows with no finite value keep their previous statistics.
        ema_lo.copy_(torch.where(valid, new_lo, ema_lo))
        ema_hi.copy_(torch.where(valid, new_hi, ema_hi))
        self._keep_extremes(ema_lo, ema_hi, prev, lo_t, hi_t, row_valid)
        self._finish_update(lo, hi, num_updates)

    def start_pool(self, expected_batches: int | None = None) -> None:
        """Forget the pooled calibration tails (``calibrate`` calls it before its first batch, with the number of
        batches to come when it is known, and after its last)."""
        self.__dict__.pop("_pool", None)
        self.__dict__["_pool_batches"] = expected_batches

    def _observe_pooled(self, x: torch.Tensor, sync: bool) -> None:
        """A calibration update of a clipped ``"mse"`` site: the tail nodes of every batch so far, pooled
        (:mod:`qtrim_fx.runtime.pooled_tails`: the calibration set's quantiles, whatever its batch size),
        not a mean of per-batch nodes; under DDP the mean over the ranks of each rank's pooled nodes."""
        pool = self.__dict__.get("_pool")
        if pool is None:
            pool = PooledTails(self.p_lo, self.p_hi, self.__dict__.get("_pool_batches"))
            self.__dict__["_pool"] = pool
        if x.numel():
            rows, _ = self._rows(x)
            if pool.count is not None and pool.count.shape[0] != rows.shape[0]:
                raise SchemeError(f"observer saw {rows.shape[0]} channels after {pool.count.shape[0]}; "
                                  "a per-channel site needs a fixed channel count")
            self.nonfinite.add_(pool.add(rows))
        if pool.count is None:  # nothing on this rank yet: join the other ranks' all-reduce with nothing
            lo_t, hi_t, valid = empty_stats(self, x)
        else:
            lo_t, hi_t, valid = pool.nodes(*self._levels)
            if self.axis is None:
                lo_t, hi_t, valid = lo_t[0], hi_t[0], valid[0]
        if sync:
            lo_t, hi_t, valid = all_reduce_mean(lo_t, hi_t, valid)
        ema_lo, ema_hi = self.tail_lo, self.tail_hi
        if ema_lo.shape != lo_t.shape:
            if self._updates:
                raise SchemeError(f"observer saw {tuple(lo_t.shape)[:1]} channels after {tuple(ema_lo.shape)[:1]}; "
                                  "a per-channel site needs a fixed channel count")
            ema_lo, ema_hi = self._resize(lo_t, hi_t)
        if ema_lo.dim() > valid.dim():
            valid = valid.unsqueeze(-1)
        ema_lo.copy_(torch.where(valid, lo_t, ema_lo))
        ema_hi.copy_(torch.where(valid, hi_t, ema_hi))
        self._finish_update(self.lo, self.hi, self.num_updates)

    def _extremes(self, ema_lo: torch.Tensor, ema_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An unclipped site's min / max before this update (``None`` for every other site)."""
        if not (self._mse and not self.clip) or self.update_momentum >= 1.0:
            return None  # clipped, or an update that replaces every earlier statistic
        return ema_lo[..., -1].clone(), ema_hi[..., -1].clone()

    def _keep_extremes(self, ema_lo: torch.Tensor, ema_hi: torch.Tensor, prev: tuple | None,
                       lo_t: torch.Tensor, hi_t: torch.Tensor, valid: torch.Tensor | None) -> None:
        """An unclipped site's range always holds this update's min / max.

        Training: the EMA'd extreme, widened to this update's (an envelope: it follows a growing
        signal at once and decays with the EMA; an EMA of per-batch maxima alone sits below them and
        clips the next batch). ``running_extremes`` (calibrate): the extreme of every update so far.
        """
        if prev is None or prev[0].shape != ema_lo[..., -1].shape:
            return  # not an unclipped site, or the first observation sized the buffers
        base_lo, base_hi = prev if self.running_extremes else (ema_lo[..., -1], ema_hi[..., -1])
        # fmin / fmax: a never-observed (NaN) entry takes this update's value.
        new_lo, new_hi = torch.fmin(base_lo, lo_t[..., -1]), torch.fmax(base_hi, hi_t[..., -1])
        if valid is not None:
            new_lo, new_hi = torch.where(valid, new_lo, prev[0]), torch.where(valid, new_hi, prev[1])
        ema_lo[..., -1] = new_lo
        ema_hi[..., -1] = new_hi

    def _resize(self, lo_t: torch.Tensor, hi_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size the (lazily per-channel) buffers for the first observation; returns the EMA'd ones."""
        if self._mse:
            self.tail_lo = torch.full_like(lo_t, math.nan)
            self.tail_hi = torch.full_like(hi_t, math.nan)
            self.lo = torch.full_like(lo_t[..., 0], math.nan)
            self.hi = torch.full_like(hi_t[..., 0], math.nan)
            return self.tail_lo, self.tail_hi
        self.lo = torch.full_like(lo_t, math.nan)
        self.hi = torch.full_like(hi_t, math.nan)
        return self.lo, self.hi

    def _finish_update(self, lo: torch.Tensor, hi: torch.Tensor, num_updates: torch.Tensor) -> None:
        if self._mse:
            self._select_range(lo, hi)
        num_updates += 1
        d = self.__dict__  # plain attributes: skips nn.Module.__setattr__ (see _train_call)
        d["_updates"] += 1
        d["_initialized"] = True

    def _select_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """``[lo, hi]`` from the EMA'd tail nodes: least expected error on ``grid`` (one-signed tensors
        unclipped, see :func:`mse_range`), or min/max (no clip)."""
        tl, th = self.tail_lo, self.tail_hi
        if not self.clip:
            lo.copy_(tl[..., -1])
            hi.copy_(th[..., -1])
            return
        mse_range_into(lo, hi, tl, th, self.p_lo, self.p_hi, self.grid)

    def _stat_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        if not -x.dim() <= self.axis < x.dim():
            return (-1,)  # never equal: the general path raises the error
        return (x.shape[self.axis],)

    def _finite_ema(self, lo: torch.Tensor, hi: torch.Tensor, lo_t: torch.Tensor, hi_t: torch.Tensor) -> None:
        """The EMA update of :meth:`_observe_into` for all-valid step statistics.

        Without never-observed (NaN) entries it is the plain blend, with the same arithmetic;
        whether the buffers hold NaN is read once and remembered against their version counters.
        """
        known = self._nan_free
        if not (known is not None and known[0] is lo and known[1] is hi and known[2] is not None
                and known[2] == _versions(lo, hi)):
            first = torch.isnan(lo)
            if bool(first.any()):
                mu = self.update_momentum
                lo.copy_(torch.where(first, lo_t, (1.0 - mu) * lo + mu * lo_t))
                hi.copy_(torch.where(first, hi_t, (1.0 - mu) * hi + mu * hi_t))
                self._nan_free = (lo, hi, _versions(lo, hi))  # every entry is now observed
                return
        mu = self.update_momentum
        # In place, in one call per step for both buffers: the same float32 products and sum as
        # ``(1 − μ)·lo + μ·lo_t`` (a fresh tensor copied back), six kernel launches fewer.
        products = torch._foreach_mul([lo_t, hi_t], mu)
        torch._foreach_mul_([lo, hi], 1.0 - mu)
        torch._foreach_add_([lo, hi], products)
        self.__dict__["_nan_free"] = (lo, hi, _versions(lo, hi))

    def _train_call(
        self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_updates: torch.Tensor, nonfinite: torch.Tensor
    ) -> None:
        """One training-mode call: count it, observe on calls 1, N+1, 2N+1, ... (N = update_every)."""
        d = self.__dict__  # a plain int attribute: skips nn.Module.__setattr__ (this runs every step)
        d["_calls"] = calls = d["_calls"] + 1
        if (calls - 1) % self.update_every == 0:
            with torch.no_grad():
                self._observe_into(x, lo, hi, num_updates, nonfinite)

    def reads_next_call(self) -> bool:
        """Whether the next :meth:`forward` reads its input (an update call), not only counts the call."""
        if not (self.training and self.enabled):
            return False
        return torch.compiler.is_compiling() or not self.__dict__["_calls"] % self.update_every

    def forward(self, x: torch.Tensor) -> None:
        if not (self.training and self.enabled):
            return
        if not torch.compiler.is_compiling():
            d = self.__dict__
            if d["_calls"] % self.update_every:  # not an update call: count it (as _train_call does), nothing else
                d["_calls"] += 1
                return
            self._train_call(x, self.lo, self.hi, self.num_updates, self.nonfinite)
        elif self.axis is not None and self.lo.dim() == 0:
            # Per-channel buffers are sized by the first observation, which a graph cannot do.
            train_call_outside_graph(self, x)
        else:
            # An opaque op in the graph: host-side counters, the seeded generator and the optional
            # all-reduce run eagerly each step, and the compiler sees exactly which buffers change.
            torch.ops.qtrim_fx.observe(x.detach(), self.lo, self.hi, self.num_updates, self.nonfinite, id(self))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` with never-observed entries as 0 (so derived scales fall back to ε)."""
        return torch.nan_to_num(self.lo, nan=0.0), torch.nan_to_num(self.hi, nan=0.0)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return (
            f"mode={self.mode}, {gran}, p=({self.p_lo}, {self.p_hi}), μ={self.momentum}, "
            f"{'range=' + self.act_range + ('' if self.clip else ' (no clip)') if self.mode == 'range' else 'weight_range=' + self.weight_range}, "
            f"S_max={self.max_samples}"
        )
