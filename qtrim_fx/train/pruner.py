"""Reverse pruning: EMA'd quantile thresholds τ and in-place clipping of weight tails.

For each weight ℓ:  τ̂ = quantile(|w_ℓ|, p_clip) (subsampled),  τ_ℓ ← (1 − β) τ_ℓ + β τ̂
(the first estimate initializes τ), and at epoch ``start`` and every ``every`` epochs
after, ``w_ℓ ← clip(w_ℓ, −τ_ℓ, τ_ℓ)`` in place on the FP32 master weights.
Per tensor or per output channel (axis 0). A row with fewer than one expected element beyond the
quantile (``n · (1 − p_clip) < 1``: a 3×3 depthwise filter) is never clipped (``τ`` = its max |w|).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from qtrim_fx.core.scheme import SchemeError
from qtrim_fx.runtime.quantiles import tail_quantiles

__all__ = ["ReversePruner"]


class ReversePruner:
    """Reverse pruning schedule and thresholds (paper Section 3.2).

    Args:
        p_clip: quantile of |w| used as the clipping threshold, in (0, 1).
        every: K, epochs between pins (pins at ``start``, ``start + K``, ...).
        momentum: β in (0, 1], EMA momentum of τ (1 = use the latest quantile).
        per_channel: one τ per output channel (axis 0) instead of per tensor.
        start: E_w, the first pinning epoch; ``None`` takes the curriculum's warmup
            when driven by :class:`qtrim_fx.QuantTrim` (0 when used alone).
        max_samples: subsample bound for the quantile.
        seed: subsampling seed.
    """

    def __init__(
        self,
        p_clip: float = 0.95,
        every: int = 5,
        momentum: float = 0.5,
        per_channel: bool = False,
        start: float | None = None,
        max_samples: int = 100_000,
        seed: int = 0,
    ) -> None:
        p_clip = float(p_clip)
        if not 0.0 < p_clip < 1.0:
            raise SchemeError(f"p_clip={p_clip} must lie strictly between 0 and 1 (the paper uses 0.95)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise SchemeError(f"every={every!r} must be a positive int (epochs between pins, K)")
        momentum = float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise SchemeError(f"momentum={momentum} must lie in (0, 1]")
        if start is not None and (not math.isfinite(float(start)) or float(start) < 0):
            raise SchemeError(f"start={start!r} must be a non-negative epoch")
        self.p_clip = p_clip
        self.every = every
        self.momentum = momentum
        self.per_channel = bool(per_channel)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SchemeError(f"max_samples={max_samples!r} must be a positive int (quantile subsample bound)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SchemeError(f"seed={seed!r} must be an int (the subsampling seed, e.g. seed=0)")
        self.start = None if start is None else float(start)
        self.max_samples = max_samples
        self.seed = seed
        self.thresholds: list[torch.Tensor | None] = []
        self.num_updates = 0
        self.last_pinned_epoch: int | None = None

    # -- schedule --------------------------------------------------------------
    def is_pin_epoch(self, epoch: int, start: float | None = None) -> bool:
        """True at ``start`` and every ``every`` epochs after (integer epochs)."""
        s = self.start if self.start is not None else (0.0 if start is None else float(start))
        if epoch < s:
            return False
        offset = epoch - math.ceil(s)
        return offset >= 0 and offset % self.every == 0

    # -- thresholds --------------------------------------------------------------
    def _rows(self, w: torch.Tensor, idx: int) -> torch.Tensor:
        v = w.detach().float().abs()
        v = v.reshape(v.shape[0], -1) if (self.per_channel and v.dim() > 0) else v.reshape(1, -1)
        c, n = v.shape
        per_row = max(1, self.max_samples // c)
        if n > per_row:
            g = torch.Generator(device=v.device)
            g.manual_seed(self.seed * 1_000_003 + self.num_updates * 7919 + idx)
            cols = torch.randint(0, n, (per_row,), generator=g, device=v.device)
            v = v.index_select(1, cols)
        return v

    def _no_tail(self, w: torch.Tensor) -> bool:
        """A row of ``w`` (a channel, or the tensor) holds fewer than one expected element beyond the p_clip
        quantile: ``n · (1 − p_clip) < 1``. Its "quantile" then interpolates between its two largest
        values and pinning would cut its largest weights, not a tail (a 3×3 depthwise filter at 0.95:
        0.45 elements; pinned per channel at 0.99, the pretrained MobileNetV2 fell from 91 % to 11 %
        agreement with itself in 50 fine-tuning steps, benchmarks/RESULTS.md "Vendor variance:
        pretrained MobileNetV2"). Such rows are not clipped (τ = their max |w|)."""
        rows = w.shape[0] if (self.per_channel and w.dim() > 0) else 1
        n = w.numel() // max(rows, 1)
        return n * (1.0 - self.p_clip) < 1.0

    @torch.no_grad()
    def update_thresholds(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One EMA step of τ for every weight; returns the thresholds."""
        if len(self.thresholds) not in (0, len(weights)):
            raise SchemeError(
                f"pruner tracks {len(self.thresholds)} weights but got {len(weights)}; "
                "use one ReversePruner per model"
            )
        if not self.thresholds:
            self.thresholds = [None] * len(weights)
        for i, w in enumerate(weights):
            rows = self._rows(w, i)
            q, valid = tail_quantiles(rows, self.p_clip)
            if self._no_tail(w):  # too few weights per row for a p_clip tail: keep the row's max (no clip)
                q = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0).amax(dim=1)
            q = q if self.per_channel else q[0]
            prev = self.thresholds[i]
            if prev is None:
                new = q
            else:
                new = (1.0 - self.momentum) * prev + self.momentum * q
                new = torch.where(valid if self.per_channel else valid[0], new, prev)
            self.thresholds[i] = new
        self.num_updates += 1
        return list(self.thresholds)  # type: ignore[arg-type]

    @torch.no_grad()
    def pin(self, weights: Sequence[torch.Tensor]) -> None:
        """Clip every weight in place to its current ``[-τ, τ]``."""
        if len(self.thresholds) != len(weights) or any(t is None for t in self.thresholds):
            raise SchemeError("pin() needs thresholds: call update_thresholds(weights) first")
        for w, tau in zip(weights, self.thresholds, strict=True):
            t = tau.to(w.dtype)
            if self.per_channel and w.dim() > 1:
                t = t.reshape([-1] + [1] * (w.dim() - 1))
            w.copy_(torch.maximum(torch.minimum(w, t), -t))

    def step(self, epoch: int, weights: Sequence[torch.Tensor], start: float | None = None) -> bool:
        """Per-epoch hook: update τ from ``start`` on and pin on pin epochs.

        Returns:
            True when the weights were pinned this epoch.
        """
        s = self.start if self.start is not None else (0.0 if start is None else float(start))
        if epoch < s:
            return False
        self.update_thresholds(weights)
        if self.is_pin_epoch(epoch, start) and self.last_pinned_epoch != epoch:
            self.pin(weights)
            self.last_pinned_epoch = epoch
            return True
        return False

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "thresholds": [None if t is None else t.detach().clone() for t in self.thresholds],
            "num_updates": self.num_updates,
            "last_pinned_epoch": self.last_pinned_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the whole state is checked first, so a bad one changes nothing.

        Raises:
            SchemeError: ``state`` is not a ReversePruner state (the message names the entry).
        """
        problem = self.state_problem(state)
        if problem is not None:
            raise SchemeError(f"not a ReversePruner state dict ({problem}); pass ReversePruner.state_dict()")
        taus = [None if t is None else _as_threshold(t) for t in state["thresholds"]]
        self.thresholds = [None if t is None else t.detach().clone() for t in taus]
        self.num_updates = operator.index(state["num_updates"])
        last = state["last_pinned_epoch"]
        self.last_pinned_epoch = None if last is None else operator.index(last)

    def state_problem(self, state: Any) -> str | None:
        """What keeps ``state`` from loading into this pruner (``None``: it loads as it is).

        Checked: the three entries are there; ``thresholds`` is a list of ``None`` or finite,
        non-negative floating-point thresholds, 0-D (1-D allowed when ``per_channel``); the counters
        are non-negative ints (``last_pinned_epoch`` may be ``None``).
        """
        if not isinstance(state, dict):
            return f"got a {type(state).__name__}, not a dict"
        for key in ("thresholds", "num_updates", "last_pinned_epoch"):
            if key not in state:
                return f"KeyError: {key!r}"
        thresholds = state["thresholds"]
        if not isinstance(thresholds, (list, tuple)):
            return f"thresholds is a {type(thresholds).__name__}, not a list"
        max_dim = 1 if self.per_channel else 0
        for i, t in enumerate(thresholds):
            if t is None:
                continue
            t = _as_threshold(t)
            if t is None:
                return f"thresholds[{i}] is {state['thresholds'][i]!r}, not a floating-point tensor"
            if t.dim() > max_dim:
                return (f"thresholds[{i}] has shape {tuple(t.shape)}; a "
                        f"{'per-channel' if self.per_channel else 'per-tensor'} pruner keeps "
                        f"{'one value per output channel' if self.per_channel else 'one value per weight'}")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                return f"thresholds[{i}] is not finite and non-negative"
        for key, allow_none in (("num_updates", False), ("last_pinned_epoch", True)):
            v = state[key]
            if v is None and allow_none:
                continue
            if _as_count(v) is None:
                return f"{key}={v!r} is not a non-negative int"
        return None

    def __repr__(self) -> str:
        return (
            f"ReversePruner(p_clip={self.p_clip}, every={self.every}, momentum={self.momentum}, "
            f"per_channel={self.per_channel}, start={self.start})"
        )


def _as_threshold(t: Any) -> torch.Tensor | None:
    """A saved threshold as a floating-point tensor (a Python float becomes a 0-D float32 one), else ``None``."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.tensor(float(t))
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None


def _as_count(v: Any) -> int | None:
    """``v`` as a non-negative int (Python, NumPy or 0-D integer tensor), else ``None`` (also for bools)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_floating_point() or v.dtype == torch.bool):
        return None
    try:
        n = operator.index(v)
    except TypeError:
        return None
    return n if n >= 0 else None
