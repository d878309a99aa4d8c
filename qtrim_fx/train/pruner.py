"""Reverse pruning: EMA'd quantile thresholds τ and in-place clipping of weight tails.

For each weight ℓ:  τ̂ = quantile(|w_ℓ|, p_clip) (subsampled),  τ_ℓ ← (1 − β) τ_ℓ + β τ̂
(the first estimate initializes τ), and at epoch ``start`` and every ``every`` epochs
after, ``w_ℓ ← clip(w_ℓ, −τ_ℓ, τ_ℓ)`` in place on the FP32 master weights.
Per tensor or per output channel (axis 0).
"""

from __future__ import annotations

import math
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
        self.start = None if start is None else float(start)
        if int(max_samples) < 1:
            raise SchemeError(f"max_samples={max_samples!r} must be a positive int (quantile subsample bound)")
        self.max_samples = int(max_samples)
        self.seed = int(seed)
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
            q, valid = tail_quantiles(self._rows(w, i), self.p_clip)
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
        try:
            self.thresholds = [None if t is None else torch.as_tensor(t).clone() for t in state["thresholds"]]
            self.num_updates = int(state["num_updates"])
            self.last_pinned_epoch = state["last_pinned_epoch"]
        except (KeyError, TypeError) as e:
            raise SchemeError(f"not a ReversePruner state dict ({e}); pass ReversePruner.state_dict()") from e

    def __repr__(self) -> str:
        return (
            f"ReversePruner(p_clip={self.p_clip}, every={self.every}, momentum={self.momentum}, "
            f"per_channel={self.per_channel}, start={self.start})"
        )
